//! The `clustermesh` command-line tool as a library, so behaviour tests can drive it.
//!
//! - [`cli`]: the command line (clap) and dispatch.
//! - [`state`]: the standalone state-directory layout (the agent configuration file's
//!   format is [`clustermesh_api::agent_config`]); [`standalone`]: enable / disable /
//!   connect / disconnect.
//! - [`meshapi`]: admin queries to a mesh API server; [`admin`]: the agent admin API
//!   client; [`status`]: `status` and `--wait`.
//! - [`txn`]: all-or-nothing updates (files or Kubernetes objects) with a rollback report.
//! - [`render`]: every verb's result as a table or JSON, for both targets [`cli`]
//!   dispatches to (state directory, Kubernetes; one trait).
//! - [`trust`]: trust-bundle edits both modes share.
//! - [`visibility`]: `identity list`, `endpoint list`, `policy get`: the agents' policy
//!   views in a stable order, `--pod`.
//! - [`k8s`]: Kubernetes mode (`--context`): enable / disable / connect / disconnect /
//!   status / service list / bpf lb list / identity list / endpoint list / policy get
//!   against clusters reached through kubeconfig
//!   contexts (certificates as Secrets, the embedded chart applied server-side).
//! - [`chart`]: renders `deploy/helm/clustermesh` (Kubernetes mode and chart validation).

pub mod admin;
pub mod chart;
pub mod cli;
pub mod k8s;
pub mod meshapi;
pub mod render;
pub mod standalone;
pub mod state;
pub mod status;
pub mod trust;
pub mod txn;
pub mod visibility;
