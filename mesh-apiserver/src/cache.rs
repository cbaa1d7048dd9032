//! The in-memory copy of the cluster's records that every Watch stream is served from.
//!
//! One store watch feeds the cache ([`Cache::run`]); watchers never touch the store, so
//! the store's load does not grow with the number of agents. The cache keeps:
//! - every record (key → the upsert event that wrote it, shared by reference, so the full
//!   state for a new watcher is a list of pointer copies);
//! - which kinds have their synced marker;
//! - a bounded history of recent events, so a watcher that reconnects with the revision
//!   it last saw gets only what it missed;
//! - a bounded broadcast channel to live watchers. A watcher that falls further behind
//!   than the channel holds is not allowed to grow memory: it gets a Reset and the full
//!   state again.
//!
//! If the store watch breaks (including compaction of the revision it needs) the cache
//! re-lists and turns the difference between its contents and the list into ordinary
//! events at the list's revision, so connected watchers stay correct without a Reset.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use clustermesh_api::keys::{self, Kind, MeshKey};
use clustermesh_store::{EventKind, KeyValue, Revision, Store, StoreError};
use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::timed;

/// One change as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// A record was written.
    Upsert {
        /// Its kind.
        kind: Kind,
        /// Its key.
        key: Arc<str>,
        /// Its encoded value.
        value: Bytes,
        /// Revision of the write.
        revision: Revision,
    },
    /// A record was removed.
    Delete {
        /// Its kind.
        kind: Kind,
        /// Its key.
        key: Arc<str>,
        /// Revision of the removal.
        revision: Revision,
    },
    /// The exporter finished the initial sync of `kind`.
    Synced {
        /// The kind.
        kind: Kind,
        /// Revision of the marker.
        revision: Revision,
    },
}

impl CacheEvent {
    /// Revision of the event.
    #[must_use]
    pub fn revision(&self) -> Revision {
        match self {
            CacheEvent::Upsert { revision, .. }
            | CacheEvent::Delete { revision, .. }
            | CacheEvent::Synced { revision, .. } => *revision,
        }
    }

    /// Kind of the event.
    #[must_use]
    pub fn kind(&self) -> Kind {
        match self {
            CacheEvent::Upsert { kind, .. }
            | CacheEvent::Delete { kind, .. }
            | CacheEvent::Synced { kind, .. } => *kind,
        }
    }
}

/// Sizes of the cache's bounded buffers.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Events kept for resuming watchers.
    pub history: usize,
    /// Events a live watcher may lag behind before it is Reset.
    pub watcher_lag: usize,
    /// Delay before re-establishing a broken store watch.
    pub retry_delay: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            history: 100_000,
            watcher_lag: 65_536,
            retry_delay: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<Arc<str>, Arc<CacheEvent>>,
    synced: BTreeMap<Kind, Revision>,
    counts: BTreeMap<Kind, usize>,
    revision: Revision,
    history: VecDeque<Arc<CacheEvent>>,
    /// Every event with a revision greater than this is in `history`.
    history_floor: Revision,
    loaded: bool,
}

/// Why a subscription starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The requested revision is older than the history the cache keeps.
    Compacted,
    /// The requested revision is newer than anything the cache has seen (the client
    /// talked to another store, or the store was rebuilt).
    Future,
    /// The watcher fell behind by more than the lag bound.
    SlowWatcher,
}

impl ResetReason {
    /// Short name (metric label, Reset message).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Compacted => "compacted",
            ResetReason::Future => "future-revision",
            ResetReason::SlowWatcher => "slow-watcher",
        }
    }
}

/// The start of a watch: what to send first, then the live receiver.
#[derive(Debug)]
pub struct Subscription {
    /// Set when the client must drop what it has (its revision is unusable).
    pub reset: Option<(ResetReason, Revision)>,
    /// Events to send before the live ones: the full state plus Synced events, or the
    /// missed history.
    pub initial: Vec<Arc<CacheEvent>>,
    /// Live events after `initial`.
    pub live: broadcast::Receiver<Arc<CacheEvent>>,
    /// Revision the cache was at when `initial` was taken.
    pub revision: Revision,
}

/// The cache. Share it with `Arc`.
#[derive(Debug)]
pub struct Cache {
    cluster: String,
    config: CacheConfig,
    inner: RwLock<Inner>,
    tx: broadcast::Sender<Arc<CacheEvent>>,
    loaded: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Cache {
    /// An empty cache for `cluster`'s records.
    #[must_use]
    pub fn new(cluster: impl Into<String>, config: CacheConfig, metrics: Arc<Metrics>) -> Self {
        let (tx, _) = broadcast::channel(config.watcher_lag.max(1));
        let (loaded, _) = watch::channel(false);
        Cache {
            cluster: cluster.into(),
            config,
            inner: RwLock::new(Inner::default()),
            tx,
            loaded,
            metrics,
        }
    }

    /// Resolves once the first store list has been loaded.
    pub async fn wait_loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Follows the store until `shutdown`: list, then watch; re-list whenever the watch
    /// breaks.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, shutdown: CancellationToken) {
        loop {
            let revision = match self.relist(store.as_ref()).await {
                Ok(r) => r,
                Err(error) => {
                    tracing::warn!(%error, "cache: listing the store failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(self.config.retry_delay) => continue,
                    }
                }
            };
            let mut stream = match store.watch(keys::ROOT.as_bytes(), revision + 1).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(%error, "cache: store watch failed; re-listing");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(self.config.retry_delay) => continue,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(event)) => self.apply_store_event(event.kind, event.kv),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "cache: store watch broke; re-listing");
                        break;
                    }
                    None => {
                        tracing::warn!("cache: store watch ended; re-listing");
                        break;
                    }
                }
            }
        }
    }

    /// Lists the store and folds the difference into the cache; returns the list revision.
    async fn relist(&self, store: &dyn Store) -> Result<Revision, StoreError> {
        let list = timed(&self.metrics, "list", store.list(keys::ROOT.as_bytes())).await?;
        let mut inner = self.write();
        let revision = list.revision;
        let mut present_records: HashSet<String> = HashSet::new();
        let mut present_markers: BTreeSet<Kind> = BTreeSet::new();
        for kv in list.kvs {
            if let Some(key) = self.owned_key(&kv.key) {
                match &key {
                    MeshKeyOrMarker::Record(_, k) => {
                        present_records.insert(k.clone());
                    }
                    MeshKeyOrMarker::Marker(kind) => {
                        present_markers.insert(*kind);
                    }
                }
                let unchanged = match &key {
                    MeshKeyOrMarker::Record(_, k) => inner.entries.get(k.as_str()).is_some_and(|e| {
                        matches!(e.as_ref(), CacheEvent::Upsert { value, .. } if value.as_ref() == kv.value.as_slice())
                    }),
                    MeshKeyOrMarker::Marker(kind) => inner.synced.contains_key(kind),
                };
                if !unchanged {
                    let kv = KeyValue {
                        mod_revision: revision,
                        ..kv
                    };
                    self.apply_locked(&mut inner, EventKind::Put, kv);
                }
            }
        }
        let stale: Vec<Arc<str>> = inner
            .entries
            .keys()
            .filter(|k| !present_records.contains(k.as_ref()))
            .cloned()
            .collect();
        for key in stale {
            let kv = KeyValue {
                key: key.as_bytes().to_vec(),
                value: Vec::new(),
                create_revision: 0,
                mod_revision: revision,
                lease: None,
            };
            self.apply_locked(&mut inner, EventKind::Delete, kv);
        }
        let stale_markers: Vec<Kind> = inner
            .synced
            .keys()
            .copied()
            .filter(|k| !present_markers.contains(k))
            .collect();
        for kind in stale_markers {
            inner.synced.remove(&kind);
        }
        inner.revision = inner.revision.max(revision);
        if !inner.loaded {
            inner.loaded = true;
            inner.history_floor = revision;
            self.loaded.send_replace(true);
        }
        tracing::info!(
            revision,
            records = inner.entries.len(),
            "cache: loaded store state"
        );
        Ok(revision)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Classifies a store key: one of this cluster's records or markers, or `None`.
    fn owned_key(&self, key: &[u8]) -> Option<MeshKeyOrMarker> {
        let parsed = keys::parse_key(key).ok()?;
        if parsed.cluster() != self.cluster {
            return None;
        }
        match parsed {
            MeshKey::Synced { kind, .. } => Some(MeshKeyOrMarker::Marker(kind)),
            other => {
                let kind = other.kind()?;
                Some(MeshKeyOrMarker::Record(kind, other.to_string()))
            }
        }
    }

    fn apply_store_event(&self, kind: EventKind, kv: KeyValue) {
        let mut inner = self.write();
        self.apply_locked(&mut inner, kind, kv);
    }

    fn apply_locked(&self, inner: &mut Inner, kind: EventKind, kv: KeyValue) {
        let revision = kv.mod_revision;
        inner.revision = inner.revision.max(revision);
        let Some(key) = self.owned_key(&kv.key) else {
            return;
        };
        let event = match (key, kind) {
            (MeshKeyOrMarker::Marker(kind), EventKind::Put) => {
                if inner.synced.insert(kind, revision).is_some() {
                    return;
                }
                CacheEvent::Synced { kind, revision }
            }
            (MeshKeyOrMarker::Marker(kind), EventKind::Delete) => {
                inner.synced.remove(&kind);
                return;
            }
            (MeshKeyOrMarker::Record(kind, key), EventKind::Put) => {
                let key: Arc<str> = Arc::from(key);
                let event = Arc::new(CacheEvent::Upsert {
                    kind,
                    key: Arc::clone(&key),
                    value: Bytes::from(kv.value),
                    revision,
                });
                if inner.entries.insert(key, Arc::clone(&event)).is_none() {
                    *inner.counts.entry(kind).or_default() += 1;
                }
                self.publish(inner, event);
                return;
            }
            (MeshKeyOrMarker::Record(kind, key), EventKind::Delete) => {
                let Some((key, _)) = inner.entries.remove_entry(key.as_str()) else {
                    return;
                };
                if let Some(c) = inner.counts.get_mut(&kind) {
                    *c = c.saturating_sub(1);
                }
                CacheEvent::Delete {
                    kind,
                    key,
                    revision,
                }
            }
        };
        self.publish(inner, Arc::new(event));
    }

    fn publish(&self, inner: &mut Inner, event: Arc<CacheEvent>) {
        inner.history.push_back(Arc::clone(&event));
        while inner.history.len() > self.config.history {
            if let Some(old) = inner.history.pop_front() {
                inner.history_floor = inner.history_floor.max(old.revision());
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(event);
    }

    /// Starts a watch of `kinds` (all kinds if empty) for a client that has seen
    /// everything up to `from_revision` (0: nothing).
    #[must_use]
    pub fn subscribe(&self, kinds: &BTreeSet<Kind>, from_revision: Revision) -> Subscription {
        let inner = self.read();
        let live = self.tx.subscribe();
        let wanted = |k: Kind| kinds.is_empty() || kinds.contains(&k);
        let resume = from_revision != 0
            && from_revision >= inner.history_floor
            && from_revision <= inner.revision;
        if resume {
            let initial = inner
                .history
                .iter()
                .filter(|e| e.revision() > from_revision && wanted(e.kind()))
                .cloned()
                .collect();
            return Subscription {
                reset: None,
                initial,
                live,
                revision: inner.revision,
            };
        }
        let reset = match from_revision {
            0 => None,
            r if r > inner.revision => Some((ResetReason::Future, inner.revision)),
            _ => Some((ResetReason::Compacted, inner.revision)),
        };
        Subscription {
            reset,
            initial: Self::full_state(&inner, &wanted),
            live,
            revision: inner.revision,
        }
    }

    /// Re-subscribes a watcher that lagged: Reset, then the full state.
    #[must_use]
    pub fn resubscribe_after_lag(&self, kinds: &BTreeSet<Kind>) -> Subscription {
        let inner = self.read();
        let live = self.tx.subscribe();
        let wanted = |k: Kind| kinds.is_empty() || kinds.contains(&k);
        Subscription {
            reset: Some((ResetReason::SlowWatcher, inner.revision)),
            initial: Self::full_state(&inner, &wanted),
            live,
            revision: inner.revision,
        }
    }

    /// Every record of the wanted kinds (kinds in dependency order), then a Synced event
    /// for each wanted kind whose marker is present.
    fn full_state(inner: &Inner, wanted: &dyn Fn(Kind) -> bool) -> Vec<Arc<CacheEvent>> {
        let mut by_kind: BTreeMap<Kind, Vec<Arc<CacheEvent>>> = BTreeMap::new();
        for event in inner.entries.values() {
            if wanted(event.kind()) {
                by_kind
                    .entry(event.kind())
                    .or_default()
                    .push(Arc::clone(event));
            }
        }
        let mut out: Vec<Arc<CacheEvent>> = Kind::ALL
            .iter()
            .flat_map(|k| by_kind.remove(k).unwrap_or_default())
            .collect();
        for (kind, _) in inner.synced.iter().filter(|(k, _)| wanted(**k)) {
            out.push(Arc::new(CacheEvent::Synced {
                kind: *kind,
                revision: inner.revision,
            }));
        }
        out
    }

    /// Current revision, record counts per kind and synced kinds.
    #[must_use]
    pub fn snapshot_stats(&self) -> CacheStats {
        let inner = self.read();
        CacheStats {
            revision: inner.revision,
            history_floor: inner.history_floor,
            counts: Kind::ALL
                .iter()
                .map(|k| (*k, inner.counts.get(k).copied().unwrap_or(0)))
                .collect(),
            synced: inner.synced.keys().copied().collect(),
        }
    }
}

/// Figures for `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStats {
    /// Revision the cache is at.
    pub revision: Revision,
    /// Oldest revision a watcher can resume from.
    pub history_floor: Revision,
    /// Records per kind.
    pub counts: BTreeMap<Kind, usize>,
    /// Kinds whose synced marker is present.
    pub synced: BTreeSet<Kind>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum MeshKeyOrMarker {
    Record(Kind, String),
    Marker(Kind),
}
