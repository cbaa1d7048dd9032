//! The namespace harness's tests, one binary with one module per scenario.
//!
//! The failover and control-plane scenarios are privileged and heavy (network namespaces,
//! real processes, real eBPF, timing measurements): each holds
//! [`clustermesh_test_support::prerequisites::exclusive`] for its whole run, and the small
//! topology scenarios hold [`clustermesh_test_support::prerequisites::shared`], so in this
//! one process they overlap no more than they did as separate binaries.

mod deploy_flags;
mod failover;
mod kind_prerequisites;
mod mesh_control_plane;
mod policy;
mod topology;
