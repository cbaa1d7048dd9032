//! One running replica of the embedded raft store, split by job:
//!
//! - [`replica`]: starting and stopping a replica (raft core, storage, RPC server,
//!   background tasks) and what it reports about itself;
//! - [`proposer`]: the write path: client writes batched into log entries, proposed here
//!   or forwarded to the leader;
//! - [`forwarding`]: the other follower-to-leader paths (ReadIndex reads, lease
//!   keep-alives) and the one-shot peer calls status tools and tests make;
//! - [`membership`]: bootstrapping a new cluster and adding or removing voters;
//! - [`service`]: what a replica answers on the raft port;
//! - [`ticker`]: the periodic duties (lease expiry, size-triggered snapshots).
//!
//! [`Replica`] is defined here so every part can reach its state; each part adds its own
//! `impl Replica` block.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use openraft::Raft;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::config::RaftConfig;
use super::dir_lock::DirLock;
use super::leases::LeaseDeadlines;
use super::network::Peers;
use super::state_machine::SharedState;
use super::{NodeId, TypeConfig};
use crate::StoreError;
use proposer::Pending;

mod forwarding;
mod membership;
mod proposer;
mod replica;
mod service;
mod ticker;

pub use forwarding::{peer_status, peer_write, PeerStatus};

/// Answer of a forwarded request when the receiving replica cannot serve it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardError {
    /// The receiver is not the leader (it names the leader if it knows one).
    NotLeader,
    /// The receiver is stopping or lost quorum.
    Unavailable(String),
    /// The lease does not exist.
    LeaseNotFound,
}

/// A running replica.
pub struct Replica {
    id: NodeId,
    addr: SocketAddr,
    config: RaftConfig,
    raft: Raft<TypeConfig>,
    shared: Arc<SharedState>,
    peers: Arc<Peers>,
    leases: LeaseDeadlines,
    stopped: AtomicBool,
    batch_tx: mpsc::Sender<Pending>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    server_stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Exclusive hold on `config.data_dir`, released once the raft core has stopped.
    dir_lock: Mutex<Option<DirLock>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .field("stopped", &self.stopped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A [`StoreError::Unavailable`] with `msg`.
fn unavailable(msg: impl Into<String>) -> StoreError {
    StoreError::Unavailable(msg.into())
}
