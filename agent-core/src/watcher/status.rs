//! What each watcher reports about its cluster, shared with the admin API.
//!
//! Watchers write their status on a [`StatusBoard`] as they go; the admin API and the
//! runtime's initial-sync gate read snapshots of it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use clustermesh_api::model::Phase;

/// One cluster's watcher status; the admin API serves it as
/// [`clustermesh_api::admin::ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherStatus {
    /// Cluster name.
    pub name: String,
    /// Current phase.
    pub phase: Phase,
    /// The watch stream is established.
    pub connected: bool,
    /// The cluster's records are in force (initial sync done at least once).
    pub synced: bool,
    /// Disconnected, serving last-known records.
    pub stale: bool,
    /// Last revision applied.
    pub revision: u64,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Endpoint of the current or last session.
    pub endpoint: String,
    /// Records ignored because they did not decode.
    pub decode_errors: u64,
    /// Records refused (wrong cluster, unexpected key).
    pub refused_records: u64,
}

impl WatcherStatus {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            phase: Phase::Connecting,
            connected: false,
            synced: false,
            stale: false,
            revision: 0,
            last_error: None,
            endpoint: String::new(),
            decode_errors: 0,
            refused_records: 0,
        }
    }
}

/// Statuses of every watcher, shared with the admin API.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<BTreeMap<String, WatcherStatus>>>,
}

impl StatusBoard {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, WatcherStatus>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of every status.
    #[must_use]
    pub fn snapshot(&self) -> Vec<WatcherStatus> {
        self.lock().values().cloned().collect()
    }

    /// The status of one cluster.
    #[must_use]
    pub fn get(&self, cluster: &str) -> Option<WatcherStatus> {
        self.lock().get(cluster).cloned()
    }

    /// Changes the status of `cluster` with `f`, adding it first if it is not listed.
    pub fn update(&self, cluster: &str, f: impl FnOnce(&mut WatcherStatus)) {
        let mut all = self.lock();
        f(all
            .entry(cluster.to_owned())
            .or_insert_with(|| WatcherStatus::new(cluster)));
    }

    /// Adds `cluster` (not connected, not synced) unless it is already listed.
    pub fn register(&self, cluster: &str) {
        self.update(cluster, |_| {});
    }

    /// Forgets a cluster (removed from the configuration).
    pub fn remove(&self, cluster: &str) {
        self.lock().remove(cluster);
    }
}
