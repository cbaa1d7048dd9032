//! The commands replicated through the raft log and the answers the state machine gives.
//!
//! Every change to the key space — including lease expiry and history compaction — is a
//! [`Command`] in the log, so every replica applies exactly the same sequence and agrees
//! on revisions, lease ownership and which keys an expired lease removed.

use serde::{Deserialize, Serialize};

use crate::{LeaseId, Revision};

/// A state machine command, stored in the raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Write a value, optionally bound to a lease.
    Put {
        /// Key to write.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// New value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Lease to bind the key to.
        lease: Option<LeaseId>,
    },
    /// Delete one key.
    Delete {
        /// Key to delete.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Delete every key under a prefix in one revision.
    DeletePrefix {
        /// The prefix.
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
    },
    /// Compare `mod_revision` and write on success.
    CompareAndSwap {
        /// Key compared and written.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Expected `mod_revision` (`0`: the key must not exist).
        expected_mod_revision: Revision,
        /// Write applied when the comparison holds; `None` deletes the key.
        put: Option<CasPut>,
    },
    /// Grant a lease; the state machine picks its id.
    GrantLease {
        /// Time to live in milliseconds.
        ttl_ms: u64,
    },
    /// Revoke a lease at a client's request.
    RevokeLease {
        /// The lease.
        lease: LeaseId,
    },
    /// Expire a lease: proposed by the leader when the lease's deadline passed.
    ExpireLease {
        /// The lease.
        lease: LeaseId,
    },
    /// Drop watch history before `revision`.
    Compact {
        /// First revision still held afterwards.
        revision: Revision,
    },
    /// Several client commands proposed as one log entry, applied in order (each with
    /// its own revision). Batching amortises one append, one fsync and one replication
    /// round over every write that arrived while the previous entry was in flight.
    Batch(Vec<Command>),
    /// Apply `command` only while `fence_key`'s `mod_revision` equals
    /// `fence_mod_revision` (`0`: while it is absent); see `Store::fenced_write`. Added
    /// last so that logs written before it still decode.
    Fenced {
        /// The fence key.
        #[serde(with = "serde_bytes")]
        fence_key: Vec<u8>,
        /// The `mod_revision` it must have.
        fence_mod_revision: Revision,
        /// The guarded write: a put, delete, prefix delete or compare-and-swap.
        command: Box<Command>,
    },
}

impl Command {
    /// Approximate encoded size, for batch limits.
    pub(crate) fn size(&self) -> usize {
        16 + match self {
            Command::Put { key, value, .. } => key.len() + value.len(),
            Command::Delete { key } => key.len(),
            Command::DeletePrefix { prefix } => prefix.len(),
            Command::CompareAndSwap { key, put, .. } => {
                key.len() + put.as_ref().map_or(0, |p| p.value.len())
            }
            Command::Batch(cmds) => cmds.iter().map(Command::size).sum(),
            Command::Fenced {
                fence_key, command, ..
            } => fence_key.len() + command.size(),
            _ => 0,
        }
    }

    /// Whether proposing the command twice leaves the same final state (a put of the
    /// same value, a prefix delete, a compaction), so an ambiguous failure may be retried.
    pub(crate) fn retry_safe(&self) -> bool {
        match self {
            Command::Put { .. } | Command::DeletePrefix { .. } | Command::Compact { .. } => true,
            Command::Batch(cmds) => cmds.iter().all(Command::retry_safe),
            // A second application either repeats the first (the fence still holds) or
            // is fenced off; the state is the same either way.
            Command::Fenced { command, .. } => command.retry_safe(),
            _ => false,
        }
    }
}

/// The write of a successful compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CasPut {
    /// New value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Lease to bind the key to.
    pub lease: Option<LeaseId>,
}

/// The state machine's answer to one applied log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Entry without a command (blank leader entry, membership change).
    None,
    /// A write happened at this revision.
    Written {
        /// Revision of the write.
        revision: Revision,
    },
    /// A delete of a key that did not exist; no revision consumed.
    NotFound,
    /// Number of keys a prefix delete removed.
    DeletedPrefix {
        /// How many keys were removed.
        count: u64,
    },
    /// A compare-and-swap whose comparison failed.
    CasFailed {
        /// The key as it is (absent: `None`).
        current: Option<StoredKv>,
    },
    /// A lease was granted.
    LeaseGranted {
        /// The new lease id.
        lease: LeaseId,
    },
    /// A lease was revoked or expired.
    LeaseRemoved,
    /// The command named a lease that does not exist.
    LeaseNotFound {
        /// The missing lease.
        lease: LeaseId,
    },
    /// History was compacted; the first revision still held.
    Compacted {
        /// First revision watches may start from.
        floor: Revision,
    },
    /// The answers to a [`Command::Batch`], in order.
    Batch(Vec<CommandResponse>),
    /// A [`Command::Fenced`] whose fence did not hold; nothing was written.
    Fenced {
        /// The fence key's `mod_revision` (`0`: absent).
        current: Revision,
    },
}

/// A key with its metadata, in the serializable form the state machine stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKv {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of creation.
    pub create_revision: Revision,
    /// Revision of the last write.
    pub mod_revision: Revision,
    /// Lease the key is bound to.
    pub lease: Option<LeaseId>,
}

impl From<StoredKv> for crate::KeyValue {
    fn from(kv: StoredKv) -> Self {
        crate::KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}
