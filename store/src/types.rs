//! Plain data types of the store contract.

use std::pin::Pin;

use futures::Stream;

/// A store revision. Revision 0 is "before the first write". On a fresh raft store the
/// first write is 1; a fresh etcd starts at revision 1, so there the first write is 2.
/// Callers rely only on order and on the values the store hands out, never on absolute
/// numbers.
pub type Revision = u64;

/// A lease identifier.
pub type LeaseId = u64;

/// Largest value a store accepts (1.5 MiB, etcd's default request limit).
pub const MAX_VALUE_SIZE: usize = 3 * 512 * 1024;

/// One key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in a delete event).
    pub value: Vec<u8>,
    /// Revision at which the key was created (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to the key (in a delete event: the deletion's revision).
    pub mod_revision: Revision,
    /// Lease the key is bound to, if any.
    pub lease: Option<LeaseId>,
}

/// Result of [`crate::Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    /// Keys under the prefix, sorted by key.
    pub kvs: Vec<KeyValue>,
    /// Revision the list was read at.
    pub revision: Revision,
}

/// Whether an event wrote or removed a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted (explicitly, by prefix, or by lease expiry).
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for deletes the value is empty and `mod_revision` is the
    /// revision of the deletion.
    pub kv: KeyValue,
}

impl Event {
    /// Revision of this event.
    #[must_use]
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// The write half of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasWrite {
    /// Put a value (optionally bound to a lease).
    Put {
        /// New value.
        value: Vec<u8>,
        /// Lease to bind the key to.
        lease: Option<LeaseId>,
    },
    /// Delete the key.
    Delete,
}

/// Result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The comparison held and the write was applied at this revision.
    Succeeded {
        /// Revision of the write.
        revision: Revision,
    },
    /// The comparison failed; nothing was written.
    Failed {
        /// The key as it currently is (`None` if absent).
        current: Option<KeyValue>,
    },
}

/// A fencing condition of [`crate::Store::fenced_write`]: the write applies only while
/// `key`'s `mod_revision` equals `mod_revision` (`0`: while the key does not exist).
///
/// A leader-elected writer fences its writes on its election key: the key's `mod_revision`
/// when it won is its fencing token, and once the key is deleted (lease expiry,
/// resignation) or rewritten by a new leader, every later write of the deposed writer
/// fails with [`crate::StoreError::Fenced`] instead of overwriting the new leader's work.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The guard key.
    pub key: Vec<u8>,
    /// The `mod_revision` the guard key must have.
    pub mod_revision: Revision,
}

/// The write of a [`crate::Store::fenced_write`]: one of the store's writes, with the
/// semantics of the plain operation of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FencedOp {
    /// [`crate::Store::put`].
    Put {
        /// Key to write.
        key: Vec<u8>,
        /// New value.
        value: Vec<u8>,
        /// Lease to bind the key to.
        lease: Option<LeaseId>,
    },
    /// [`crate::Store::delete`].
    Delete {
        /// Key to delete.
        key: Vec<u8>,
    },
    /// [`crate::Store::delete_prefix`].
    DeletePrefix {
        /// Prefix of the keys to delete.
        prefix: Vec<u8>,
    },
    /// [`crate::Store::compare_and_swap`].
    CompareAndSwap {
        /// Key compared and written.
        key: Vec<u8>,
        /// Expected `mod_revision` of `key` (`0`: absent).
        expected_mod_revision: Revision,
        /// Write applied when both the fence and the comparison hold.
        write: CasWrite,
    },
}

/// The result of a [`crate::Store::fenced_write`] whose fence held: the plain operation's
/// result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FencedOutcome {
    /// A put's revision.
    Put(Revision),
    /// A delete's revision, `None` when the key did not exist.
    Delete(Option<Revision>),
    /// How many keys a prefix delete removed.
    DeletePrefix(u64),
    /// The compare-and-swap's outcome.
    CompareAndSwap(CasOutcome),
}

/// Stream returned by [`crate::Store::watch`].
pub type WatchStream = Pin<Box<dyn Stream<Item = crate::Result<Event>> + Send>>;
