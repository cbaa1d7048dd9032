//! The openraft state machine: applies committed commands to the [`KeySpace`], builds and
//! installs snapshots, and keeps the latest snapshot durable on disk.
//!
//! The applied state itself lives in memory; on restart it is rebuilt from the snapshot
//! file plus the log entries after it (openraft re-applies them up to the persisted
//! commit point). The snapshot file is one checksummed record (see [`super::record`]), so a
//! damaged snapshot is reported with [`StoreError::Corrupt`] instead of being loaded.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::command::CommandResponse;
use super::durable_file::{read_single_record, write_atomic};
use super::keyspace::{HistoryLimits, KeySpace};
use super::record;
use super::TypeConfig;
use crate::{Revision, StoreError};

type NodeId = u64;

/// Applied state plus what openraft needs to know about it.
#[derive(Debug)]
pub(crate) struct Applied {
    /// The key space.
    pub(crate) ks: KeySpace,
    /// Last applied log id.
    pub(crate) last_applied: Option<LogId<NodeId>>,
    /// Last applied membership.
    pub(crate) membership: StoredMembership<NodeId, BasicNode>,
}

/// State shared by the state machine, the read path and watchers of one replica.
#[derive(Debug)]
pub(crate) struct SharedState {
    applied: RwLock<Applied>,
    /// Latest applied revision, bumped after every apply so watchers wake up.
    revision: watch::Sender<Revision>,
    /// Set when the replica stopped; watchers then end with an error.
    closed: AtomicBool,
    /// Command bytes applied since the last snapshot (triggers a snapshot by size).
    since_snapshot: AtomicU64,
}

impl SharedState {
    /// Read access to the applied state.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.applied.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that changes whenever the applied revision does.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    fn notify(&self, revision: Revision) {
        self.revision.send_replace(revision);
    }

    /// Marks the replica as stopped and wakes every watcher so it ends its stream.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.revision.send_modify(|_| {});
    }

    /// Command bytes applied since the last snapshot was built or installed.
    pub(crate) fn bytes_since_snapshot(&self) -> u64 {
        self.since_snapshot.load(Ordering::Relaxed)
    }

    /// Whether the replica stopped.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine half of the openraft storage.
#[derive(Debug)]
pub(crate) struct StateMachine {
    shared: Arc<SharedState>,
    snapshot_path: PathBuf,
    limits: HistoryLimits,
    seq: u64,
}

impl StateMachine {
    /// Opens the state machine, loading the snapshot in `dir` if there is one.
    pub(crate) fn open(dir: &Path, limits: HistoryLimits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let snapshot_path = dir.join("snapshot.bin");
        let mut applied = Applied {
            ks: KeySpace::new(limits),
            last_applied: None,
            membership: StoredMembership::default(),
        };
        if let Some(file) = read_single_record::<SnapshotFile>(&snapshot_path)? {
            let mut ks: KeySpace = record::decode(&file.data).map_err(|e| StoreError::Corrupt {
                path: snapshot_path.display().to_string(),
                detail: format!("snapshot data does not decode: {e}; remove this replica's data directory and re-add it to the cluster"),
            })?;
            ks.set_history_limits(limits);
            tracing::info!(
                file = %snapshot_path.display(),
                last_log = ?file.meta.last_log_id.map(|l| l.index),
                revision = ks.revision(),
                keys = ks.len(),
                "loaded raft snapshot"
            );
            applied = Applied {
                ks,
                last_applied: file.meta.last_log_id,
                membership: file.meta.last_membership,
            };
        }
        let revision = applied.ks.revision();
        Ok(StateMachine {
            shared: Arc::new(SharedState {
                applied: RwLock::new(applied),
                revision: watch::Sender::new(revision),
                closed: AtomicBool::new(false),
                since_snapshot: AtomicU64::new(0),
            }),
            snapshot_path,
            limits,
            seq: 0,
        })
    }

    /// The state shared with readers and watchers.
    pub(crate) fn shared(&self) -> Arc<SharedState> {
        self.shared.clone()
    }

    fn persist(&self, file: &SnapshotFile) -> std::io::Result<()> {
        let bytes = record::encode(file).map_err(|e| std::io::Error::other(e.to_string()))?;
        write_atomic(&self.snapshot_path, &record::frame(&bytes))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        self.shared.since_snapshot.store(0, Ordering::Relaxed);
        let (data, meta) = {
            let applied = self.shared.read();
            let data = record::encode(&applied.ks).map_err(|e| {
                StorageIOError::read_state_machine(&std::io::Error::other(e.to_string()))
            })?;
            self.seq += 1;
            let id = match applied.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
                None => format!("none-{}", self.seq),
            };
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
                snapshot_id: id,
            };
            (data, meta)
        };
        let file = SnapshotFile { meta, data };
        self.persist(&file)
            .map_err(|e| StorageIOError::write_snapshot(Some(file.meta.signature()), &e))?;
        tracing::debug!(snapshot = %file.meta.snapshot_id, bytes = file.data.len(), "built raft snapshot");
        Ok(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(file.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let applied = self.shared.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut out = Vec::new();
        let revision = {
            let mut applied = self.shared.write();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let resp = match entry.payload {
                    EntryPayload::Blank => CommandResponse::None,
                    EntryPayload::Normal(cmd) => {
                        self.shared
                            .since_snapshot
                            .fetch_add(cmd.size() as u64, Ordering::Relaxed);
                        applied.ks.apply(cmd)
                    }
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        CommandResponse::None
                    }
                };
                out.push(resp);
            }
            applied.ks.revision()
        };
        self.shared.notify(revision);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachine {
            shared: self.shared.clone(),
            snapshot_path: self.snapshot_path.clone(),
            limits: self.limits,
            seq: self.seq + 1_000_000,
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let mut ks: KeySpace = record::decode(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), &std::io::Error::other(e))
        })?;
        ks.set_history_limits(self.limits);
        let file = SnapshotFile {
            meta: meta.clone(),
            data,
        };
        self.persist(&file)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let revision = ks.revision();
        self.shared.since_snapshot.store(0, Ordering::Relaxed);
        {
            let mut applied = self.shared.write();
            applied.ks = ks;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
        }
        tracing::info!(snapshot = %meta.snapshot_id, revision, "installed raft snapshot from the leader");
        self.shared.notify(revision);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let file = read_single_record::<SnapshotFile>(&self.snapshot_path).map_err(|e| {
            StorageIOError::read_snapshot(None, &std::io::Error::other(e.to_string()))
        })?;
        Ok(file.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}
