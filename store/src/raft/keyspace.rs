//! The replicated key space: the deterministic part of the state machine.
//!
//! It is plain data plus [`KeySpace::apply`], with no I/O and no clock, so that every
//! replica that applies the same log reaches byte-for-byte the same state, and so that it
//! can be serialized whole into a snapshot. Watch history lives here too (a bounded ring
//! of recent events): it is part of the snapshot, so a replica rebuilt from disk can still
//! serve watches that resume from a recent revision.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::command::{CasPut, Command, CommandResponse, StoredKv};
use crate::{Event, EventKind, LeaseId, Revision};

/// Bounds of the in-memory watch history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HistoryLimits {
    /// Most events kept.
    pub(crate) max_events: usize,
    /// Most bytes (keys + values) kept.
    pub(crate) max_bytes: usize,
}

/// One event in the history ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HistoryEvent {
    /// `true` for a put, `false` for a delete.
    pub(crate) put: bool,
    /// The key after the change (value empty for deletes).
    pub(crate) kv: StoredKv,
}

impl HistoryEvent {
    fn size(&self) -> usize {
        self.kv.key.len() + self.kv.value.len() + 48
    }

    /// The public form of this event.
    pub(crate) fn to_event(&self) -> Event {
        Event {
            kind: if self.put {
                EventKind::Put
            } else {
                EventKind::Delete
            },
            kv: self.kv.clone().into(),
        }
    }
}

/// A bounded ring of recent events, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct History {
    events: VecDeque<HistoryEvent>,
    bytes: usize,
    /// Smallest revision a watch may start from: every event with a revision `>= floor`
    /// is still in `events`.
    floor: Revision,
    limits: HistoryLimits,
}

/// A watch asked for a revision older than the history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompactedError {
    /// Smallest revision still held.
    pub(crate) floor: Revision,
}

impl History {
    fn new(limits: HistoryLimits) -> Self {
        History {
            events: VecDeque::new(),
            bytes: 0,
            floor: 1,
            limits,
        }
    }

    /// Smallest revision a watch may start from.
    pub(crate) fn floor(&self) -> Revision {
        self.floor
    }

    fn push(&mut self, event: HistoryEvent) {
        self.bytes += event.size();
        self.events.push_back(event);
        self.trim();
    }

    /// Evicts whole revisions from the front until both limits hold again (a revision
    /// with several events, from a prefix delete, is never split).
    fn trim(&mut self) {
        while self.events.len() > self.limits.max_events || self.bytes > self.limits.max_bytes {
            let Some(front) = self.events.front() else {
                break;
            };
            let rev = front.kv.mod_revision;
            self.drop_before(rev + 1);
        }
    }

    fn drop_before(&mut self, revision: Revision) {
        while let Some(front) = self.events.front() {
            if front.kv.mod_revision >= revision {
                break;
            }
            self.bytes = self.bytes.saturating_sub(front.size());
            self.events.pop_front();
        }
        self.floor = self.floor.max(revision);
    }

    /// Events with revision `>= from` whose key starts with `prefix`, at most `max` of
    /// them but never splitting a revision. Fails when `from` was compacted away.
    pub(crate) fn read_from(
        &self,
        from: Revision,
        prefix: &[u8],
        max: usize,
    ) -> Result<Vec<HistoryEvent>, CompactedError> {
        if from < self.floor {
            return Err(CompactedError { floor: self.floor });
        }
        let start = self.events.partition_point(|e| e.kv.mod_revision < from);
        let mut out = Vec::new();
        let mut last_rev = 0;
        for e in self.events.range(start..) {
            if out.len() >= max && e.kv.mod_revision != last_rev {
                break;
            }
            if e.kv.key.starts_with(prefix) {
                last_rev = e.kv.mod_revision;
                out.push(e.clone());
            }
        }
        Ok(out)
    }
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lease {
    /// Time to live in milliseconds.
    pub(crate) ttl_ms: u64,
    /// Keys bound to it.
    keys: BTreeSet<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Value {
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    lease: Option<LeaseId>,
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeySpace {
    kvs: BTreeMap<Vec<u8>, Value>,
    revision: Revision,
    leases: BTreeMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: History,
}

impl KeySpace {
    /// An empty key space at revision 0.
    pub(crate) fn new(limits: HistoryLimits) -> Self {
        KeySpace {
            kvs: BTreeMap::new(),
            revision: 0,
            leases: BTreeMap::new(),
            next_lease: 1,
            history: History::new(limits),
        }
    }

    /// Applies the history limits configured on this replica (after loading a snapshot
    /// written with other limits).
    pub(crate) fn set_history_limits(&mut self, limits: HistoryLimits) {
        self.history.limits = limits;
        self.history.trim();
    }

    /// The latest revision.
    pub(crate) fn revision(&self) -> Revision {
        self.revision
    }

    /// The watch history.
    pub(crate) fn history(&self) -> &History {
        &self.history
    }

    /// Every lease with its TTL.
    pub(crate) fn leases(&self) -> impl Iterator<Item = (LeaseId, u64)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl_ms))
    }

    /// The lease's TTL in milliseconds, if it exists.
    pub(crate) fn lease_ttl(&self, lease: LeaseId) -> Option<u64> {
        self.leases.get(&lease).map(|l| l.ttl_ms)
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.kvs.len()
    }

    /// Reads one key.
    pub(crate) fn get(&self, key: &[u8]) -> Option<StoredKv> {
        self.kvs.get(key).map(|v| stored(key, v))
    }

    /// Every key under `prefix`, sorted.
    pub(crate) fn list(&self, prefix: &[u8]) -> Vec<StoredKv> {
        self.kvs
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| stored(k, v))
            .collect()
    }

    /// Applies one command deterministically.
    pub(crate) fn apply(&mut self, cmd: Command) -> CommandResponse {
        match cmd {
            Command::Put { key, value, lease } => self.put(key, value, lease),
            Command::Delete { key } => {
                if self.kvs.contains_key(&key) {
                    self.revision += 1;
                    self.remove_key(key);
                    CommandResponse::Written {
                        revision: self.revision,
                    }
                } else {
                    CommandResponse::NotFound
                }
            }
            Command::DeletePrefix { prefix } => {
                let keys: Vec<Vec<u8>> = self.list(&prefix).into_iter().map(|kv| kv.key).collect();
                let count = keys.len() as u64;
                if !keys.is_empty() {
                    self.revision += 1;
                    for key in keys {
                        self.remove_key(key);
                    }
                }
                CommandResponse::DeletedPrefix { count }
            }
            Command::CompareAndSwap {
                key,
                expected_mod_revision,
                put,
            } => {
                let current = self.kvs.get(&key).map(|v| v.mod_revision).unwrap_or(0);
                if current != expected_mod_revision {
                    return CommandResponse::CasFailed {
                        current: self.get(&key),
                    };
                }
                match put {
                    Some(CasPut { value, lease }) => self.put(key, value, lease),
                    None if current == 0 => CommandResponse::Written {
                        revision: self.revision,
                    },
                    None => {
                        self.revision += 1;
                        self.remove_key(key);
                        CommandResponse::Written {
                            revision: self.revision,
                        }
                    }
                }
            }
            Command::GrantLease { ttl_ms } => {
                let lease = self.next_lease;
                self.next_lease += 1;
                self.leases.insert(
                    lease,
                    Lease {
                        ttl_ms,
                        keys: BTreeSet::new(),
                    },
                );
                CommandResponse::LeaseGranted { lease }
            }
            Command::RevokeLease { lease } | Command::ExpireLease { lease } => {
                let Some(l) = self.leases.remove(&lease) else {
                    return CommandResponse::LeaseNotFound { lease };
                };
                if !l.keys.is_empty() {
                    self.revision += 1;
                    for key in l.keys {
                        self.remove_key(key);
                    }
                }
                CommandResponse::LeaseRemoved
            }
            Command::Batch(cmds) => {
                CommandResponse::Batch(cmds.into_iter().map(|c| self.apply(c)).collect())
            }
            Command::Fenced {
                fence_key,
                fence_mod_revision,
                command,
            } => {
                let current = self.kvs.get(&fence_key).map_or(0, |v| v.mod_revision);
                if current != fence_mod_revision {
                    return CommandResponse::Fenced { current };
                }
                match *command {
                    cmd @ (Command::Put { .. }
                    | Command::Delete { .. }
                    | Command::DeletePrefix { .. }
                    | Command::CompareAndSwap { .. }) => self.apply(cmd),
                    // The store only fences key writes; anything else would be a bug in
                    // the proposer, answered without a state change.
                    _ => CommandResponse::None,
                }
            }
            Command::Compact { revision } => {
                let target = revision.min(self.revision + 1);
                self.history.drop_before(target);
                CommandResponse::Compacted {
                    floor: self.history.floor,
                }
            }
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>, lease: Option<LeaseId>) -> CommandResponse {
        if let Some(id) = lease {
            if !self.leases.contains_key(&id) {
                return CommandResponse::LeaseNotFound { lease: id };
            }
        }
        self.revision += 1;
        let rev = self.revision;
        let old = self.kvs.get(&key);
        let create_revision = old.map(|v| v.create_revision).unwrap_or(rev);
        let old_lease = old.and_then(|v| v.lease);
        if old_lease != lease {
            if let Some(l) = old_lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(&key);
            }
        }
        if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.insert(key.clone());
        }
        let v = Value {
            value,
            create_revision,
            mod_revision: rev,
            lease,
        };
        self.history.push(HistoryEvent {
            put: true,
            kv: stored(&key, &v),
        });
        self.kvs.insert(key, v);
        CommandResponse::Written { revision: rev }
    }

    /// Removes a key at the current revision (the caller bumped it) and records the event.
    fn remove_key(&mut self, key: Vec<u8>) {
        let Some(old) = self.kvs.remove(&key) else {
            return;
        };
        if let Some(l) = old.lease.and_then(|id| self.leases.get_mut(&id)) {
            l.keys.remove(&key);
        }
        self.history.push(HistoryEvent {
            put: false,
            kv: StoredKv {
                key,
                value: Vec::new(),
                create_revision: old.create_revision,
                mod_revision: self.revision,
                lease: old.lease,
            },
        });
    }
}

fn stored(key: &[u8], v: &Value) -> StoredKv {
    StoredKv {
        key: key.to_vec(),
        value: v.value.clone(),
        create_revision: v.create_revision,
        mod_revision: v.mod_revision,
        lease: v.lease,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: HistoryLimits = HistoryLimits {
        max_events: 1000,
        max_bytes: 1 << 20,
    };

    fn put(ks: &mut KeySpace, k: &str, v: &str, lease: Option<LeaseId>) -> CommandResponse {
        ks.apply(Command::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
            lease,
        })
    }

    #[test]
    fn put_tracks_create_and_mod_revision() {
        let mut ks = KeySpace::new(LIMITS);
        assert_eq!(
            put(&mut ks, "a", "1", None),
            CommandResponse::Written { revision: 1 }
        );
        assert_eq!(
            put(&mut ks, "a", "2", None),
            CommandResponse::Written { revision: 2 }
        );
        let kv = ks.get(b"a").unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (1, 2));
        assert_eq!(kv.value, b"2");
    }

    #[test]
    fn delete_of_missing_key_consumes_no_revision() {
        let mut ks = KeySpace::new(LIMITS);
        assert_eq!(
            ks.apply(Command::Delete { key: b"x".to_vec() }),
            CommandResponse::NotFound
        );
        assert_eq!(ks.revision(), 0);
    }

    #[test]
    fn delete_prefix_uses_one_revision_for_all_keys() {
        let mut ks = KeySpace::new(LIMITS);
        put(&mut ks, "p/a", "1", None);
        put(&mut ks, "p/b", "1", None);
        put(&mut ks, "q", "1", None);
        let r = ks.apply(Command::DeletePrefix {
            prefix: b"p/".to_vec(),
        });
        assert_eq!(r, CommandResponse::DeletedPrefix { count: 2 });
        assert_eq!(ks.revision(), 4);
        let evs = ks.history().read_from(4, b"", 100).unwrap();
        assert_eq!(evs.len(), 2);
        assert!(evs.iter().all(|e| !e.put && e.kv.mod_revision == 4));
        assert_eq!(ks.list(b"").len(), 1);
    }

    #[test]
    fn lease_expiry_deletes_bound_keys_with_events() {
        let mut ks = KeySpace::new(LIMITS);
        let CommandResponse::LeaseGranted { lease } =
            ks.apply(Command::GrantLease { ttl_ms: 1000 })
        else {
            panic!("grant failed")
        };
        put(&mut ks, "a", "1", Some(lease));
        put(&mut ks, "b", "1", Some(lease));
        put(&mut ks, "c", "1", None);
        // Rebinding a key to no lease releases it from the lease.
        put(&mut ks, "b", "2", None);
        assert_eq!(
            ks.apply(Command::ExpireLease { lease }),
            CommandResponse::LeaseRemoved
        );
        assert!(ks.get(b"a").is_none());
        assert!(ks.get(b"b").is_some());
        assert_eq!(ks.revision(), 5);
        assert_eq!(
            ks.apply(Command::RevokeLease { lease }),
            CommandResponse::LeaseNotFound { lease }
        );
        assert_eq!(
            put(&mut ks, "d", "1", Some(lease)),
            CommandResponse::LeaseNotFound { lease }
        );
    }

    #[test]
    fn cas_compares_mod_revision() {
        let mut ks = KeySpace::new(LIMITS);
        let cas = |expected, value: &str| Command::CompareAndSwap {
            key: b"k".to_vec(),
            expected_mod_revision: expected,
            put: Some(CasPut {
                value: value.as_bytes().to_vec(),
                lease: None,
            }),
        };
        assert_eq!(
            ks.apply(cas(0, "a")),
            CommandResponse::Written { revision: 1 }
        );
        assert!(matches!(
            ks.apply(cas(0, "b")),
            CommandResponse::CasFailed { current: Some(_) }
        ));
        assert_eq!(
            ks.apply(cas(1, "c")),
            CommandResponse::Written { revision: 2 }
        );
    }

    #[test]
    fn fenced_command_applies_only_while_the_fence_holds() {
        let mut ks = KeySpace::new(LIMITS);
        put(&mut ks, "leader", "a", None);
        let fenced = |rev, key: &str| Command::Fenced {
            fence_key: b"leader".to_vec(),
            fence_mod_revision: rev,
            command: Box::new(Command::Put {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                lease: None,
            }),
        };
        assert_eq!(
            ks.apply(fenced(1, "x")),
            CommandResponse::Written { revision: 2 }
        );
        put(&mut ks, "leader", "b", None);
        assert_eq!(
            ks.apply(fenced(1, "y")),
            CommandResponse::Fenced { current: 3 }
        );
        assert!(ks.get(b"y").is_none());
        assert_eq!(ks.revision(), 3);
        // Inside a batch, a fenced-off write leaves its neighbours alone.
        let batch = Command::Batch(vec![fenced(3, "z"), fenced(1, "w")]);
        assert_eq!(
            ks.apply(batch),
            CommandResponse::Batch(vec![
                CommandResponse::Written { revision: 4 },
                CommandResponse::Fenced { current: 3 },
            ])
        );
        assert!(ks.get(b"z").is_some() && ks.get(b"w").is_none());
    }

    #[test]
    fn history_evicts_whole_revisions_and_reports_compaction() {
        let mut ks = KeySpace::new(HistoryLimits {
            max_events: 3,
            max_bytes: 1 << 20,
        });
        for i in 0..5 {
            put(&mut ks, &format!("k{i}"), "v", None);
        }
        assert_eq!(ks.history().floor(), 3);
        assert_eq!(
            ks.history().read_from(2, b"", 10),
            Err(CompactedError { floor: 3 })
        );
        assert_eq!(ks.history().read_from(3, b"", 10).unwrap().len(), 3);
        ks.apply(Command::Compact { revision: 5 });
        assert!(ks.history().read_from(4, b"", 10).is_err());
        assert_eq!(ks.history().read_from(5, b"", 10).unwrap().len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, u8),
        Delete(u8),
        DeletePrefix(u8),
        Grant,
        PutLeased(u8, u8),
        Expire(u8),
        Compact(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            (0u8..16).prop_map(Op::Delete),
            (0u8..4).prop_map(Op::DeletePrefix),
            Just(Op::Grant),
            (0u8..16, 0u8..4).prop_map(|(k, l)| Op::PutLeased(k, l)),
            (0u8..4).prop_map(Op::Expire),
            any::<u8>().prop_map(Op::Compact),
        ]
    }

    fn key(k: u8) -> Vec<u8> {
        format!("{}/{k}", k % 4).into_bytes()
    }

    fn to_cmd(op: &Op) -> Command {
        match *op {
            Op::Put(k, v) => Command::Put {
                key: key(k),
                value: vec![v],
                lease: None,
            },
            Op::Delete(k) => Command::Delete { key: key(k) },
            Op::DeletePrefix(p) => Command::DeletePrefix {
                prefix: format!("{p}/").into_bytes(),
            },
            Op::Grant => Command::GrantLease { ttl_ms: 10 },
            Op::PutLeased(k, l) => Command::Put {
                key: key(k),
                value: vec![1],
                lease: Some(u64::from(l) + 1),
            },
            Op::Expire(l) => Command::ExpireLease {
                lease: u64::from(l) + 1,
            },
            Op::Compact(r) => Command::Compact {
                revision: u64::from(r),
            },
        }
    }

    proptest! {
        /// Replaying the history from the floor onto the key space as it was at the
        /// floor reproduces the final key space; revisions never go backwards; every
        /// replica applying the same commands agrees.
        #[test]
        fn history_replays_to_the_same_keys(ops in proptest::collection::vec(op(), 1..200)) {
            let limits = HistoryLimits { max_events: 10_000, max_bytes: 1 << 30 };
            let mut ks = KeySpace::new(limits);
            let mut other = KeySpace::new(limits);
            let mut last = 0;
            for op in &ops {
                let cmd = to_cmd(op);
                let a = ks.apply(cmd.clone());
                let b = other.apply(cmd);
                prop_assert_eq!(a, b);
                prop_assert!(ks.revision() >= last);
                last = ks.revision();
            }
            prop_assert_eq!(&ks, &other);
            // Rebuild the latest value of every key from the retained history.
            let floor = ks.history().floor();
            let events = ks.history().read_from(floor, b"", usize::MAX).unwrap();
            let mut prev = 0;
            for e in &events {
                prop_assert!(e.kv.mod_revision >= prev);
                prev = e.kv.mod_revision;
            }
            if floor == 1 {
                let mut rebuilt: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
                for e in events {
                    if e.put { rebuilt.insert(e.kv.key, e.kv.value); } else { rebuilt.remove(&e.kv.key); }
                }
                let now: BTreeMap<Vec<u8>, Vec<u8>> =
                    ks.list(b"").into_iter().map(|kv| (kv.key, kv.value)).collect();
                prop_assert_eq!(rebuilt, now);
            }
        }
    }
}
