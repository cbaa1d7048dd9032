//! The embedded raft backend: an openraft cluster of 1, 3 or 5 replicas holding the key
//! space, so a clustermesh API server needs no external database.
//!
//! Layout, bottom up:
//! - `dir_lock`: the exclusive `LOCK` on a replica's data directory;
//! - `record`: checksummed framing for every file this backend writes;
//! - `durable_file`: whole-file atomic replacement and directory fsync;
//! - `log_store`: the durable raft log (segments + vote), fsynced before an append is
//!   acknowledged, with torn-tail repair and corruption refusal on open;
//! - `keyspace`: the deterministic key space (revisions, leases, watch history);
//! - `state_machine`: applies the log to the key space, snapshots it to disk;
//! - `network` / `rpc` / `tls`: replica traffic over gRPC (tonic) with mTLS from
//!   the `certs` crate;
//! - `node`: one running [`Replica`] with write forwarding and ReadIndex reads;
//! - `store`: [`RaftStore`], the [`crate::Store`] implementation;
//! - `cluster`: `LocalCluster`, N replicas in one process for tests and demos (with the
//!   `testing` feature, like the `NetworkFaults` switch it drives).

use std::io::Cursor;

#[cfg(feature = "testing")]
mod cluster;
mod command;
mod config;
mod dir_lock;
mod durable_file;
mod keyspace;
mod leases;
mod log_store;
mod network;
mod node;
mod record;
mod rpc;
mod state_machine;
#[cfg(test)]
mod storage_suite;
mod store;
mod tls;
mod watch;

#[cfg(feature = "testing")]
pub use cluster::LocalCluster;
pub use command::{CasPut, Command, CommandResponse, StoredKv};
pub use config::{ConfigError, NodeId, RaftConfig, RaftConfigBuilder};
#[cfg(feature = "testing")]
pub use network::NetworkFaults;
pub use node::{peer_status, peer_write, PeerStatus, Replica};
pub use store::RaftStore;
pub use tls::ReplicaTls;

openraft::declare_raft_types!(
    /// The openraft type configuration of the store.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);
