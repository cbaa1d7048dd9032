//! The `clustermesh` command-line tool as a library, so behaviour tests can drive it.
//!
//! Standalone mode works on local state directories; Kubernetes mode renders the chart
//! in `deploy/helm/clustermesh` and applies it.

pub mod chart;
