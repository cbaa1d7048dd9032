//! [`RaftStore`]: the [`Store`] implementation on top of one replica.

use std::sync::Arc;
use std::time::Duration;

use super::command::{CasPut, Command, CommandResponse};
use super::node::Replica;
use super::watch;
use crate::{
    CasOutcome, CasWrite, Fence, FencedOp, FencedOutcome, KeyValue, LeaseId, ListResult, Result,
    Revision, Store, StoreError, WatchStream, MAX_VALUE_SIZE,
};

/// A [`Store`] served by one local replica of the embedded raft cluster.
///
/// Writes go through the raft log (batched, and forwarded to the leader when this replica
/// follows); reads are linearizable (ReadIndex confirmed with the leader) and served from
/// the local state; watches start linearizably and are served from this replica's
/// history.
///
/// Failure semantics: an error means the write was not acknowledged. When the connection
/// to the leader breaks mid-request the outcome is unknown; puts, prefix deletes and
/// compactions are then retried (re-applying them leaves the same state, though a watch
/// sees the put twice), other writes fail with [`StoreError::Unavailable`] saying the
/// write may or may not have been applied.
#[derive(Debug, Clone)]
pub struct RaftStore {
    replica: Arc<Replica>,
}

impl RaftStore {
    /// A store handle on `replica`.
    #[must_use]
    pub fn new(replica: Arc<Replica>) -> Self {
        RaftStore { replica }
    }

    /// The replica behind this handle.
    #[must_use]
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    fn check_value(key: &[u8], value: &[u8]) -> Result<()> {
        if value.len() > MAX_VALUE_SIZE {
            return Err(StoreError::ValueTooLarge {
                key: String::from_utf8_lossy(key).into_owned(),
                size: value.len(),
                max: MAX_VALUE_SIZE,
            });
        }
        Ok(())
    }

    /// The command of a key write (shared by the plain and the fenced operations).
    fn write_command(op: FencedOp) -> Result<Command> {
        Ok(match op {
            FencedOp::Put { key, value, lease } => {
                Self::check_value(&key, &value)?;
                Command::Put { key, value, lease }
            }
            FencedOp::Delete { key } => Command::Delete { key },
            FencedOp::DeletePrefix { prefix } => Command::DeletePrefix { prefix },
            FencedOp::CompareAndSwap {
                key,
                expected_mod_revision,
                write,
            } => {
                let put = match write {
                    CasWrite::Put { value, lease } => {
                        Self::check_value(&key, &value)?;
                        Some(CasPut { value, lease })
                    }
                    CasWrite::Delete => None,
                };
                Command::CompareAndSwap {
                    key,
                    expected_mod_revision,
                    put,
                }
            }
        })
    }
}

/// Which key write a [`FencedOp`] is, to read the state machine's answer.
#[derive(Debug, Clone, Copy)]
enum WriteKind {
    Put,
    Delete,
    DeletePrefix,
    CompareAndSwap,
}

impl WriteKind {
    fn of(op: &FencedOp) -> Self {
        match op {
            FencedOp::Put { .. } => WriteKind::Put,
            FencedOp::Delete { .. } => WriteKind::Delete,
            FencedOp::DeletePrefix { .. } => WriteKind::DeletePrefix,
            FencedOp::CompareAndSwap { .. } => WriteKind::CompareAndSwap,
        }
    }
}

/// The state machine's answer to a key write, as the plain operation's result.
fn write_outcome(kind: WriteKind, resp: CommandResponse) -> Result<FencedOutcome> {
    match (kind, resp) {
        (WriteKind::Put, CommandResponse::Written { revision }) => Ok(FencedOutcome::Put(revision)),
        (WriteKind::Delete, CommandResponse::Written { revision }) => {
            Ok(FencedOutcome::Delete(Some(revision)))
        }
        (WriteKind::Delete, CommandResponse::NotFound) => Ok(FencedOutcome::Delete(None)),
        (WriteKind::DeletePrefix, CommandResponse::DeletedPrefix { count }) => {
            Ok(FencedOutcome::DeletePrefix(count))
        }
        (WriteKind::CompareAndSwap, CommandResponse::Written { revision }) => {
            Ok(FencedOutcome::CompareAndSwap(CasOutcome::Succeeded {
                revision,
            }))
        }
        (WriteKind::CompareAndSwap, CommandResponse::CasFailed { current }) => {
            Ok(FencedOutcome::CompareAndSwap(CasOutcome::Failed {
                current: current.map(Into::into),
            }))
        }
        (_, CommandResponse::LeaseNotFound { lease }) => Err(StoreError::LeaseNotFound(lease)),
        (_, other) => Err(unexpected("fenced_write", &other)),
    }
}

fn unexpected(op: &str, resp: &CommandResponse) -> StoreError {
    StoreError::Backend(format!(
        "raft state machine gave an unexpected answer to {op}: {resp:?}"
    ))
}

#[async_trait::async_trait]
impl Store for RaftStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        self.replica.read_barrier().await?;
        Ok(self.replica.shared().read().ks.get(key).map(Into::into))
    }

    async fn list(&self, prefix: &[u8]) -> Result<ListResult> {
        self.replica.read_barrier().await?;
        let applied = self.replica.shared().read();
        Ok(ListResult {
            kvs: applied
                .ks
                .list(prefix)
                .into_iter()
                .map(Into::into)
                .collect(),
            revision: applied.ks.revision(),
        })
    }

    async fn put(&self, key: &[u8], value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        Self::check_value(key, &value)?;
        let cmd = Command::Put {
            key: key.to_vec(),
            value,
            lease,
        };
        match self.replica.write(cmd).await? {
            CommandResponse::Written { revision } => Ok(revision),
            CommandResponse::LeaseNotFound { lease } => Err(StoreError::LeaseNotFound(lease)),
            other => Err(unexpected("put", &other)),
        }
    }

    async fn delete(&self, key: &[u8]) -> Result<Option<Revision>> {
        match self
            .replica
            .write(Command::Delete { key: key.to_vec() })
            .await?
        {
            CommandResponse::Written { revision } => Ok(Some(revision)),
            CommandResponse::NotFound => Ok(None),
            other => Err(unexpected("delete", &other)),
        }
    }

    async fn delete_prefix(&self, prefix: &[u8]) -> Result<u64> {
        let cmd = Command::DeletePrefix {
            prefix: prefix.to_vec(),
        };
        match self.replica.write(cmd).await? {
            CommandResponse::DeletedPrefix { count } => Ok(count),
            other => Err(unexpected("delete_prefix", &other)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected_mod_revision: Revision,
        write: CasWrite,
    ) -> Result<CasOutcome> {
        let put = match write {
            CasWrite::Put { value, lease } => {
                Self::check_value(key, &value)?;
                Some(CasPut { value, lease })
            }
            CasWrite::Delete => None,
        };
        let cmd = Command::CompareAndSwap {
            key: key.to_vec(),
            expected_mod_revision,
            put,
        };
        match self.replica.write(cmd).await? {
            CommandResponse::Written { revision } => Ok(CasOutcome::Succeeded { revision }),
            CommandResponse::CasFailed { current } => Ok(CasOutcome::Failed {
                current: current.map(Into::into),
            }),
            CommandResponse::LeaseNotFound { lease } => Err(StoreError::LeaseNotFound(lease)),
            other => Err(unexpected("compare_and_swap", &other)),
        }
    }

    async fn fenced_write(&self, fence: &Fence, op: FencedOp) -> Result<FencedOutcome> {
        let kind = WriteKind::of(&op);
        let cmd = Command::Fenced {
            fence_key: fence.key.clone(),
            fence_mod_revision: fence.mod_revision,
            command: Box::new(Self::write_command(op)?),
        };
        match self.replica.write(cmd).await? {
            CommandResponse::Fenced { current } => Err(StoreError::Fenced {
                key: String::from_utf8_lossy(&fence.key).into_owned(),
                expected: fence.mod_revision,
                current,
            }),
            resp => write_outcome(kind, resp),
        }
    }

    async fn watch(&self, prefix: &[u8], from_revision: Revision) -> Result<WatchStream> {
        // Linearizable start: this replica has applied everything committed before the
        // call (a compaction or write acknowledged elsewhere included).
        self.replica.read_barrier().await?;
        let from = if from_revision == 0 {
            self.replica.shared().read().ks.revision() + 1
        } else {
            from_revision
        };
        let floor = self.replica.shared().read().ks.history().floor();
        if from < floor {
            return Err(StoreError::Compacted {
                requested: from,
                compacted: floor,
            });
        }
        Ok(watch::stream(
            self.replica.shared().clone(),
            prefix.to_vec(),
            from,
        ))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        match self.replica.write(Command::GrantLease { ttl_ms }).await? {
            CommandResponse::LeaseGranted { lease } => Ok(lease),
            other => Err(unexpected("grant_lease", &other)),
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.replica.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self.replica.write(Command::RevokeLease { lease }).await? {
            CommandResponse::LeaseRemoved => Ok(()),
            CommandResponse::LeaseNotFound { lease } => Err(StoreError::LeaseNotFound(lease)),
            other => Err(unexpected("revoke_lease", &other)),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.replica.read_barrier().await?;
        Ok(self.replica.shared().read().ks.revision())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.replica.write(Command::Compact { revision }).await? {
            CommandResponse::Compacted { .. } => Ok(()),
            other => Err(unexpected("compact", &other)),
        }
    }
}
