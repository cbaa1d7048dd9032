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
//!
//! The store holds this cluster's records and, when the server mirrors its peers
//! ([`crate::mirror`]), theirs under their cluster names. Three audiences are served from
//! the one cache ([`Viewer`]): the cluster's own agents and admins see every record of
//! this cluster, and in an `all_clusters` watch the mirrored peers' records too, with
//! per-cluster synced markers; peers see the subset of this cluster's records the export
//! rules allow ([`crate::peer_view`]) and never a mirrored record. Every published event is addressed ([`Audience`]); a record
//! whose visibility changes produces a peers-only Delete or Upsert at the revision of the
//! change, in the live stream and in the history alike, so live watchers, resuming
//! watchers and new watchers (whose full state is filtered by the same view) agree.

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
use crate::peer_view::{Applied, PeerView, PodExport};
use crate::timed;

/// Who is watching: what a Watch stream may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer {
    /// This cluster's own agents and admins: every record of this cluster.
    Own,
    /// This cluster's own agents in mirror mode: every record of every cluster held
    /// (this one and the mirrored peers).
    Mesh,
    /// Another cluster (its mesh API server or agents): this cluster's exported records
    /// only.
    Peer,
}

/// Who a published event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every watcher.
    Everyone,
    /// The cluster's own watchers only (a change to a record peers do not see).
    Own,
    /// Peers only (a record became visible or invisible to them).
    Peers,
    /// All-clusters watchers only (a mirrored peer's record or marker).
    Mesh,
}

impl Audience {
    /// Whether `viewer` receives events addressed to `self`.
    #[must_use]
    pub fn includes(self, viewer: Viewer) -> bool {
        match self {
            Audience::Everyone => true,
            Audience::Own => matches!(viewer, Viewer::Own | Viewer::Mesh),
            Audience::Peers => viewer == Viewer::Peer,
            Audience::Mesh => viewer == Viewer::Mesh,
        }
    }
}

/// An event as the cache publishes it: the event and who may receive it.
#[derive(Debug, Clone)]
pub struct Fanout {
    /// The event.
    pub event: Arc<CacheEvent>,
    /// Its audience.
    pub audience: Audience,
}

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
    /// The initial sync of `cluster`'s `kind` is complete (its exporter, or our mirror of
    /// that peer, wrote the marker).
    Synced {
        /// The cluster.
        cluster: Arc<str>,
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

/// One record in the cache.
#[derive(Debug)]
struct Entry {
    /// The upsert that wrote it.
    event: Arc<CacheEvent>,
    /// A record of this cluster (else of a mirrored peer).
    own: bool,
}

#[derive(Debug)]
struct Inner {
    entries: BTreeMap<Arc<str>, Entry>,
    /// Synced markers by cluster and kind.
    synced: BTreeMap<(Arc<str>, Kind), Revision>,
    /// This cluster's records per kind.
    counts: BTreeMap<Kind, usize>,
    revision: Revision,
    history: VecDeque<Fanout>,
    /// Every event with a revision greater than this is in `history`.
    history_floor: Revision,
    /// The revision of the first load: peers resume only from later revisions.
    loaded_at: Revision,
    loaded: bool,
    peers: PeerView,
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
    /// A peer resumes from a revision this server process did not serve: what the peer
    /// was shown then depended on the previous process's export rule, which may have
    /// been different, so the peer starts over.
    PeerViewUnknown,
}

impl ResetReason {
    /// Short name (metric label, Reset message).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Compacted => "compacted",
            ResetReason::Future => "future-revision",
            ResetReason::SlowWatcher => "slow-watcher",
            ResetReason::PeerViewUnknown => "peer-view-unknown",
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
    /// `initial` is a full state for an all-clusters watcher: say so after it (a cluster
    /// the watcher holds that had nothing in it is gone).
    pub complete: bool,
    /// Live events after `initial`, for every audience (filter with
    /// [`Audience::includes`]).
    pub live: broadcast::Receiver<Fanout>,
    /// Revision the cache was at when `initial` was taken.
    pub revision: Revision,
}

/// The cache. Share it with `Arc`.
#[derive(Debug)]
pub struct Cache {
    cluster: String,
    config: CacheConfig,
    inner: RwLock<Inner>,
    tx: broadcast::Sender<Fanout>,
    loaded: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Cache {
    /// An empty cache for `cluster`'s records.
    #[must_use]
    pub fn new(cluster: impl Into<String>, config: CacheConfig, metrics: Arc<Metrics>) -> Self {
        Self::with_export(cluster, config, metrics, PodExport::All)
    }

    /// An empty cache for `cluster`'s records that serves peers the pods `pods` allows.
    #[must_use]
    pub fn with_export(
        cluster: impl Into<String>,
        config: CacheConfig,
        metrics: Arc<Metrics>,
        pods: PodExport,
    ) -> Self {
        let cluster = cluster.into();
        let (tx, _) = broadcast::channel(config.watcher_lag.max(1));
        let (loaded, _) = watch::channel(false);
        Cache {
            inner: RwLock::new(Inner {
                entries: BTreeMap::new(),
                synced: BTreeMap::new(),
                counts: BTreeMap::new(),
                revision: 0,
                history: VecDeque::new(),
                history_floor: 0,
                loaded_at: 0,
                loaded: false,
                peers: PeerView::new(&cluster, pods),
            }),
            cluster,
            config,
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
        let mut present_markers: BTreeSet<(Arc<str>, Kind)> = BTreeSet::new();
        for kv in list.kvs {
            if let Some(key) = self.classify(&kv.key) {
                match &key {
                    Classified::Record { key, .. } => {
                        present_records.insert(key.clone());
                    }
                    Classified::Marker { cluster, kind } => {
                        present_markers.insert((Arc::clone(cluster), *kind));
                    }
                }
                let unchanged = match &key {
                    Classified::Record { key, .. } => inner.entries.get(key.as_str()).is_some_and(|e| {
                        matches!(e.event.as_ref(), CacheEvent::Upsert { value, .. } if value.as_ref() == kv.value.as_slice())
                    }),
                    Classified::Marker { cluster, kind } => {
                        inner.synced.contains_key(&(Arc::clone(cluster), *kind))
                    }
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
        let stale_markers: Vec<(Arc<str>, Kind)> = inner
            .synced
            .keys()
            .filter(|k| !present_markers.contains(*k))
            .cloned()
            .collect();
        for marker in stale_markers {
            inner.synced.remove(&marker);
        }
        inner.revision = inner.revision.max(revision);
        if !inner.loaded {
            inner.loaded = true;
            inner.history_floor = revision;
            inner.loaded_at = revision;
            self.loaded.send_replace(true);
        }
        tracing::info!(
            revision,
            records = inner.entries.len(),
            pods_exported = %inner.peers.rule(),
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

    /// Classifies a store key: a record or marker of this cluster or of a mirrored peer,
    /// or `None` (not a mesh key; a peer's policy, which is never mirrored nor served).
    fn classify(&self, key: &[u8]) -> Option<Classified> {
        let parsed = keys::parse_key(key).ok()?;
        let own = parsed.cluster() == self.cluster;
        match parsed {
            MeshKey::Synced { kind, cluster } => Some(Classified::Marker {
                cluster: Arc::from(cluster),
                kind,
            }),
            other => {
                let kind = other.kind()?;
                if !own && !kind.exported() {
                    return None;
                }
                Some(Classified::Record {
                    kind,
                    key: other.to_string(),
                    own,
                })
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
        let Some(key) = self.classify(&kv.key) else {
            return;
        };
        match (key, kind) {
            (Classified::Marker { cluster, kind }, EventKind::Put) => {
                let own = *cluster == *self.cluster;
                if inner
                    .synced
                    .insert((Arc::clone(&cluster), kind), revision)
                    .is_some()
                {
                    return;
                }
                let event = Arc::new(CacheEvent::Synced {
                    cluster,
                    kind,
                    revision,
                });
                let audience = if own {
                    Audience::Everyone
                } else {
                    Audience::Mesh
                };
                self.publish(inner, event, audience);
            }
            (Classified::Marker { cluster, kind }, EventKind::Delete) => {
                inner.synced.remove(&(cluster, kind));
            }
            (Classified::Record { kind, key, own }, EventKind::Put) => {
                let key: Arc<str> = Arc::from(key);
                let value = Bytes::from(kv.value);
                let applied = own.then(|| inner.peers.apply(&key, Some(&value)));
                let event = Arc::new(CacheEvent::Upsert {
                    kind,
                    key: Arc::clone(&key),
                    value,
                    revision,
                });
                let entry = Entry {
                    event: Arc::clone(&event),
                    own,
                };
                if inner.entries.insert(key, entry).is_none() && own {
                    *inner.counts.entry(kind).or_default() += 1;
                }
                match applied {
                    Some(applied) => self.publish_record(inner, event, &applied),
                    None => self.publish(inner, event, Audience::Mesh),
                }
            }
            (Classified::Record { kind, key, own }, EventKind::Delete) => {
                let Some((key, _)) = inner.entries.remove_entry(key.as_str()) else {
                    return;
                };
                if !own {
                    let event = Arc::new(CacheEvent::Delete {
                        kind,
                        key,
                        revision,
                    });
                    self.publish(inner, event, Audience::Mesh);
                    return;
                }
                if let Some(c) = inner.counts.get_mut(&kind) {
                    *c = c.saturating_sub(1);
                }
                let applied = inner.peers.apply(&key, None);
                let event = Arc::new(CacheEvent::Delete {
                    kind,
                    key,
                    revision,
                });
                self.publish_record(inner, event, &applied);
            }
        }
    }

    /// Publishes a record's change to the audiences that see it, and the peers-only
    /// events of the records whose peer visibility changed with it.
    ///
    /// | change | visible to peers before → after | own watchers | peers |
    /// |--------|---------------------------------|--------------|-------|
    /// | upsert | any → yes                       | upsert       | upsert |
    /// | upsert | yes → no                        | upsert       | delete |
    /// | upsert | no → no                         | upsert       | —      |
    /// | delete | yes → no                        | delete       | delete |
    /// | delete | no → no                         | delete       | —      |
    fn publish_record(&self, inner: &mut Inner, event: Arc<CacheEvent>, applied: &Applied) {
        let revision = event.revision();
        match (event.as_ref(), applied.before, applied.after) {
            (CacheEvent::Upsert { .. }, _, true) | (CacheEvent::Delete { .. }, true, _) => {
                self.publish(inner, event, Audience::Everyone);
            }
            (CacheEvent::Upsert { kind, key, .. }, true, false) => {
                let hide = Arc::new(CacheEvent::Delete {
                    kind: *kind,
                    key: Arc::clone(key),
                    revision,
                });
                self.publish(inner, event, Audience::Own);
                self.publish(inner, hide, Audience::Peers);
            }
            _ => self.publish(inner, event, Audience::Own),
        }
        for transition in &applied.derived {
            let event = if transition.visible {
                let Some(CacheEvent::Upsert { value, .. }) =
                    inner.entries.get(&transition.key).map(|e| e.event.as_ref())
                else {
                    continue;
                };
                CacheEvent::Upsert {
                    kind: transition.kind,
                    key: Arc::clone(&transition.key),
                    value: value.clone(),
                    revision,
                }
            } else {
                CacheEvent::Delete {
                    kind: transition.kind,
                    key: Arc::clone(&transition.key),
                    revision,
                }
            };
            self.publish(inner, Arc::new(event), Audience::Peers);
        }
    }

    fn publish(&self, inner: &mut Inner, event: Arc<CacheEvent>, audience: Audience) {
        let fanout = Fanout { event, audience };
        inner.history.push_back(fanout.clone());
        while inner.history.len() > self.config.history {
            if let Some(old) = inner.history.pop_front() {
                inner.history_floor = inner.history_floor.max(old.event.revision());
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(fanout);
    }

    /// Starts a watch of `kinds` (all kinds if empty) by `viewer` that has seen
    /// everything up to `from_revision` (0: nothing).
    ///
    /// A peer resumes only from a revision after this process first loaded the store
    /// ([`ResetReason::PeerViewUnknown`]): before that, what it was shown depended on the
    /// previous process's export rule.
    #[must_use]
    pub fn subscribe(
        &self,
        kinds: &BTreeSet<Kind>,
        from_revision: Revision,
        viewer: Viewer,
    ) -> Subscription {
        let inner = self.read();
        let live = self.tx.subscribe();
        let wanted = |k: Kind| kinds.is_empty() || kinds.contains(&k);
        let view_known = viewer == Viewer::Own || from_revision > inner.loaded_at;
        let resume = from_revision != 0
            && from_revision >= inner.history_floor
            && from_revision <= inner.revision
            && view_known;
        if resume {
            let initial = inner
                .history
                .iter()
                .filter(|f| {
                    f.event.revision() > from_revision
                        && wanted(f.event.kind())
                        && f.audience.includes(viewer)
                })
                .map(|f| Arc::clone(&f.event))
                .collect();
            return Subscription {
                reset: None,
                initial,
                complete: false,
                live,
                revision: inner.revision,
            };
        }
        let reset = match from_revision {
            0 => None,
            r if r > inner.revision => Some((ResetReason::Future, inner.revision)),
            r if r >= inner.history_floor && !view_known => {
                Some((ResetReason::PeerViewUnknown, inner.revision))
            }
            _ => Some((ResetReason::Compacted, inner.revision)),
        };
        Subscription {
            reset,
            initial: self.full_state(&inner, &wanted, viewer),
            complete: viewer == Viewer::Mesh,
            live,
            revision: inner.revision,
        }
    }

    /// Re-subscribes a watcher that lagged: Reset, then the full state.
    #[must_use]
    pub fn resubscribe_after_lag(&self, kinds: &BTreeSet<Kind>, viewer: Viewer) -> Subscription {
        let inner = self.read();
        let live = self.tx.subscribe();
        let wanted = |k: Kind| kinds.is_empty() || kinds.contains(&k);
        Subscription {
            reset: Some((ResetReason::SlowWatcher, inner.revision)),
            initial: self.full_state(&inner, &wanted, viewer),
            complete: viewer == Viewer::Mesh,
            live,
            revision: inner.revision,
        }
    }

    /// Every record of the wanted kinds `viewer` may see (kinds in dependency order, so
    /// every cluster's config comes first), then a Synced event for each wanted kind
    /// (and cluster) whose marker is present.
    fn full_state(
        &self,
        inner: &Inner,
        wanted: &dyn Fn(Kind) -> bool,
        viewer: Viewer,
    ) -> Vec<Arc<CacheEvent>> {
        let mut by_kind: BTreeMap<Kind, Vec<Arc<CacheEvent>>> = BTreeMap::new();
        for (key, entry) in &inner.entries {
            let visible = match viewer {
                Viewer::Mesh => true,
                Viewer::Own => entry.own,
                Viewer::Peer => entry.own && inner.peers.is_visible(key),
            };
            let kind = entry.event.kind();
            if visible && wanted(kind) {
                by_kind
                    .entry(kind)
                    .or_default()
                    .push(Arc::clone(&entry.event));
            }
        }
        let mut out: Vec<Arc<CacheEvent>> = Kind::ALL
            .iter()
            .flat_map(|k| by_kind.remove(k).unwrap_or_default())
            .collect();
        for (cluster, kind) in inner.synced.keys() {
            let own = **cluster == *self.cluster;
            if wanted(*kind) && (own || viewer == Viewer::Mesh) {
                out.push(Arc::new(CacheEvent::Synced {
                    cluster: Arc::clone(cluster),
                    kind: *kind,
                    revision: inner.revision,
                }));
            }
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
            synced: inner
                .synced
                .keys()
                .filter(|(cluster, _)| **cluster == *self.cluster)
                .map(|(_, kind)| *kind)
                .collect(),
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

/// What a store key is to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Classified {
    /// A record (`own`: of this cluster, else of a mirrored peer).
    Record { kind: Kind, key: String, own: bool },
    /// A synced marker.
    Marker { cluster: Arc<str>, kind: Kind },
}
