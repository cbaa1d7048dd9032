//! The replicated key-value store every clustermesh API server keeps its records in.
//!
//! [`Store`] is the one contract; two backends implement it and both pass the shared
//! conformance suite in `conformance` (built with the `testing` feature, which the crates'
//! dev-dependencies enable; it is test scaffolding, not part of the default API):
//! - `raft` (default): an embedded openraft cluster of 1, 3 or 5 replicas;
//! - `etcd`: an external etcd reached through etcd-client.
//!
//! Semantics follow etcd's v3 model, which the rest of the mesh relies on:
//! - every successful write (put, delete, lease expiry) bumps one global **revision**;
//! - each key carries `create_revision`, `mod_revision` and an optional lease;
//! - `watch(prefix, from)` yields every event with revision `>= from` in revision order,
//!   or [`StoreError::Compacted`] when `from` is older than the history still held.
#![forbid(unsafe_code)]

#[cfg(feature = "testing")]
pub mod conformance;
mod etcd;
pub mod raft;
mod types;

pub use etcd::{EtcdConfig, EtcdConnectError, EtcdStore, EtcdTls};

pub use types::{
    CasOutcome, CasWrite, Event, EventKind, Fence, FencedOp, FencedOutcome, KeyValue, LeaseId,
    ListResult, Revision, WatchStream, MAX_VALUE_SIZE,
};

use std::time::Duration;

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested watch start revision has been compacted away; re-list and watch from
    /// the list's revision.
    #[error("revision {requested} has been compacted (oldest revision still held is {compacted}); re-list and watch from the list revision")]
    Compacted {
        /// The revision the caller asked for.
        requested: Revision,
        /// The compaction point: revisions `< compacted` are gone.
        compacted: Revision,
    },
    /// The value is larger than [`MAX_VALUE_SIZE`].
    #[error(
        "value for key {key:?} is {size} bytes, larger than the {max} byte limit; split the record"
    )]
    ValueTooLarge {
        /// Key the write was for (lossy UTF-8).
        key: String,
        /// Size of the rejected value.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The lease does not exist (never granted, revoked, or expired).
    #[error("lease {0:x} not found (expired or revoked); grant a new lease")]
    LeaseNotFound(LeaseId),
    /// A [`Store::fenced_write`] was refused: its fence key no longer has the expected
    /// `mod_revision` (the writer was deposed); nothing was written.
    #[error("write fenced off: {key} is at mod_revision {current} (0: absent), not {expected}")]
    Fenced {
        /// The fence key (lossy UTF-8).
        key: String,
        /// The `mod_revision` the fence required.
        expected: Revision,
        /// The fence key's `mod_revision` when the write was refused (`0`: absent).
        current: Revision,
    },
    /// No leader / no quorum right now; the operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Persisted data could not be read back (corrupt or truncated file).
    #[error("corrupt store data in {path}: {detail}")]
    Corrupt {
        /// File or directory holding the bad data.
        path: String,
        /// What is wrong with it and what to do.
        detail: String,
    },
    /// Another replica (in this or another process) holds the data directory's lock.
    #[error(
        "another clustermesh-apiserver{holder} is using {dir}; stop it or use another --raft-data-dir",
        holder = pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    DataDirInUse {
        /// The data directory.
        dir: String,
        /// Process id the holder wrote into the lock file, if readable.
        pid: Option<u32>,
    },
    /// An I/O error on the local data directory.
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The backend reported an error that fits none of the above.
    #[error("store backend error: {0}")]
    Backend(String),
}

/// A key-value store with revisions, watches and leases (etcd v3 semantics).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key (linearizable).
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>>;

    /// Lists every key starting with `prefix`, sorted by key, together with the revision
    /// the list was read at (linearizable). Watching from `revision + 1` continues it
    /// without a gap.
    async fn list(&self, prefix: &[u8]) -> Result<ListResult>;

    /// Writes `value` at `key`, bound to `lease` if given; returns the new revision.
    async fn put(&self, key: &[u8], value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision>;

    /// Deletes `key`; returns the deletion's revision, or `None` if the key did not exist
    /// (no revision is consumed then).
    async fn delete(&self, key: &[u8]) -> Result<Option<Revision>>;

    /// Deletes every key under `prefix` in one revision; returns how many were deleted.
    async fn delete_prefix(&self, prefix: &[u8]) -> Result<u64>;

    /// Applies `write` only if `key`'s `mod_revision` equals `expected_mod_revision`
    /// (`0` means "the key must not exist").
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected_mod_revision: Revision,
        write: CasWrite,
    ) -> Result<CasOutcome>;

    /// Applies `op` only if `fence.key`'s `mod_revision` equals `fence.mod_revision`,
    /// atomically (the check and the write happen at one revision). When the fence does
    /// not hold nothing is written and the call fails with [`StoreError::Fenced`]; a
    /// compare-and-swap whose fence holds but whose own comparison fails returns
    /// [`CasOutcome::Failed`] as usual.
    async fn fenced_write(&self, fence: &Fence, op: FencedOp) -> Result<FencedOutcome>;

    /// Streams every event under `prefix` with revision `>= from_revision`, in revision
    /// order. `from_revision == 0` means "from the next write". A start revision older
    /// than the retained history fails with [`StoreError::Compacted`]; the same error
    /// ends the stream if the watcher falls so far behind that its next event was
    /// compacted away.
    async fn watch(&self, prefix: &[u8], from_revision: Revision) -> Result<WatchStream>;

    /// Grants a lease with the given time to live.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Refreshes a lease; returns its TTL. Fails with [`StoreError::LeaseNotFound`] once
    /// it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Revokes a lease, deleting every key bound to it (with delete events).
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// The current (latest committed) revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// Discards history before `revision`; watches from older revisions then fail with
    /// [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<()>;
}
