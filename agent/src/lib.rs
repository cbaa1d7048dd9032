//! clustermesh node agent.
//!
//! Control plane: cluster watchers → merge (affinity, tiers, weights) → weighted Maglev →
//! desired state handed to a [`datapath::Datapath`].

pub mod admin;
pub mod bpf;
pub mod config;
pub mod datapath;
pub mod desired;
pub mod http;
pub mod maglev;
pub mod merge;
pub mod metrics;
pub mod recording;
pub mod records;
pub mod runtime;
pub mod watcher;
