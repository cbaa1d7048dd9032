//! clustermesh node agent.
//!
//! Control plane: cluster watchers → merge (affinity, tiers, weights) → weighted Maglev →
//! desired state handed to a [`datapath::Datapath`].

pub mod bpf;
pub mod datapath;
pub mod desired;
pub mod maglev;
pub mod merge;
pub mod recording;
pub mod records;
