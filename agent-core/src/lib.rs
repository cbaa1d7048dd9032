//! The clustermesh agent's control plane, without the eBPF datapath.
//!
//! Everything here is plain Rust with no kernel dependency, so it builds and is tested on
//! any OS; the `clustermesh-agent` binary adds the eBPF datapath, the runtime that wires
//! these parts together, and the admin endpoints.
//!
//! Cluster [`watcher`]s → [`merge`] (affinity, tiers, weights) → weighted [`maglev`] →
//! [`desired`] state handed to a [`datapath::Datapath`]; [`ipcache`] says which cluster and
//! security identity an address has, and [`policy`] computes what each local endpoint may
//! send and receive.
#![forbid(unsafe_code)]

pub mod datapath;
pub mod desired;
pub mod ipcache;
pub mod maglev;
pub mod merge;
pub mod metrics;
pub mod policy;
pub mod recording;
pub mod watcher;
