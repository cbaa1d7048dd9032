//! The mesh API server's behaviour tests, one binary with one module per scenario, sharing
//! the server fixtures in `support`.

mod support;

mod binary;
mod binary_data_dir_lock;
mod binary_exit_and_quorum;
mod binary_identity;
mod dir_source;
mod dir_source_hostile;
mod export;
mod export_filter;
mod export_oversized;
mod grpc;
mod identity;
mod idle_connections;
mod kubernetes_policy;
mod kubernetes_source;
mod leader;
mod mirror;
mod policy_source;
mod policy_watch;
mod readyz;
mod security;
mod translate;
mod weights;
