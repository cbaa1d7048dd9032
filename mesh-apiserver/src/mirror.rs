//! Peer mirroring: the mesh API server watches every connected peer's mesh API and keeps
//! the peer's records in its own store, under the peer's cluster name, so that the
//! cluster's agents can read every cluster from their own server (ARCHITECTURE.md,
//! "Mirroring").
//!
//! One watcher per peer, the same implementation the agents use
//! ([`clustermesh_agent_core::watcher`], in raw mode): mTLS with our server certificate
//! (`spiffe://<td>/cluster/<us>`, which peers serve read-only), the peer must present its
//! own `cluster/<peer>` identity, its name, ID and pod CIDRs are checked against the
//! configuration, against the other peers and against our own cluster (a peer claiming our
//! name, ID or pod CIDRs is refused); resume from the last revision, sync gating (a peer's
//! records are replaced only once its full state arrived), stale TTL, and refusal of keys
//! outside the peer's own cluster name or of records that do not decode.
//!
//! What the watchers hand over is written by one task ([`Mirror`]):
//! - the peer's cluster config (`mesh/v1/cluster-config/<peer>`) when a session opens;
//! - a full sync: the difference between the peer's records in the store and the new set
//!   (writes only what changed), then the peer's synced markers
//!   (`mesh/v1/synced/<peer>/<kind>`), so readers never take a half-written peer as
//!   complete;
//! - live upserts and deletes as they come;
//! - a peer dropped (removed from the configuration, or stale for longer than the TTL):
//!   every key of the peer is deleted, markers included.
//!
//! A peer is held to [`MirrorLimits`]: a full state with more records than allowed ends
//! the session while it is being received (the watcher never buffers more; it retries
//! slowly, status "refused" with the reason), and is refused whole should it arrive
//! anyway (the last good state stays); live records that would exceed the limit are
//! refused. All are logged with the peer's name; the mirror's refusals are counted
//! (`clustermesh_apiserver_mirror_refused_total{peer,reason}`).
//!
//! The peers are the clusters of a cluster list in the agent configuration format (what
//! `clustermesh connect` maintains), re-read when it changes; our own entry is skipped.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clustermesh_agent_core::metrics::Metrics as WatchMetrics;
use clustermesh_agent_core::watcher::{
    self, ClusterRegistry, ReconnectBackoff, RecordsInForce, StatusBoard, Update, WatcherConfig,
    WatcherStatus,
};
use clustermesh_api::agent_config::{AgentConfig, ClusterEntry};
use clustermesh_api::keys::{self, Kind};
use clustermesh_api::v1;
use clustermesh_certs::TrustDomain;
use clustermesh_store::{Store, StoreError};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::timed;

/// Store writes of one peer's full state in flight at once.
const WRITES_IN_FLIGHT: usize = 64;

/// The kinds mirrored from a peer: what peers serve and agents read.
pub const MIRRORED_KINDS: [Kind; 3] = [Kind::Identity, Kind::Endpoint, Kind::Service];

/// Bounds on what one peer may make us store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorLimits {
    /// Records (all mirrored kinds together) per peer.
    pub max_records_per_peer: usize,
    /// Bytes of one record's value (at most the store's own limit, which a peer's
    /// exporter also keeps to).
    pub max_value_bytes: usize,
}

impl Default for MirrorLimits {
    fn default() -> Self {
        Self {
            max_records_per_peer: 2_000_000,
            max_value_bytes: clustermesh_store::MAX_VALUE_SIZE,
        }
    }
}

/// Everything the mirror needs.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Our cluster's name (skipped in the peer list; no peer may claim it).
    pub cluster: String,
    /// Our cluster ID (no peer may claim it).
    pub cluster_id: u32,
    /// Our pod CIDRs (no peer may overlap them).
    pub pod_cidrs: Vec<String>,
    /// Trust domain of the mesh.
    pub trust_domain: TrustDomain,
    /// The cluster list (agent configuration format) naming the peers.
    pub peers_file: PathBuf,
    /// How often `peers_file` is checked for changes.
    pub poll: Duration,
    /// Our server certificate, presented as the client certificate to peers.
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
    /// Reconnect policy per peer.
    pub backoff: ReconnectBackoff,
    /// Drop an unreachable peer's records after this long (`None`: keep).
    pub stale_ttl: Option<Duration>,
    /// Time allowed to connect to a peer.
    pub connect_timeout: Duration,
    /// Time a connected peer has to answer.
    pub request_timeout: Duration,
    /// Bounds per peer.
    pub limits: MirrorLimits,
}

/// The mirror's view of its peers, for status and tests.
#[derive(Debug, Clone, Default)]
pub struct MirrorStatus {
    board: StatusBoard,
    /// Records of each peer in our store.
    records: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
}

impl MirrorStatus {
    /// Records of `peer` in our store (as far as the mirror has written them).
    #[must_use]
    pub fn records(&self, peer: &str) -> usize {
        self.records_lock().get(peer).copied().unwrap_or(0)
    }

    fn records_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_records(&self, peer: &str, n: Option<usize>) {
        let mut all = self.records_lock();
        match n {
            Some(n) => {
                all.insert(peer.to_owned(), n);
            }
            None => {
                all.remove(peer);
            }
        }
    }

    /// The `Status` RPC form of every peer.
    #[must_use]
    pub fn to_proto(&self) -> Vec<v1::MirrorPeerStatus> {
        self.peers()
            .into_iter()
            .map(|s| v1::MirrorPeerStatus {
                records: self.records(&s.name) as u64,
                phase: s.phase.to_string(),
                connected: s.connected,
                synced: s.synced,
                stale: s.stale,
                revision: s.revision,
                endpoint: s.endpoint,
                last_error: s.last_error.unwrap_or_default(),
                refused_records: s.refused_records,
                decode_errors: s.decode_errors,
                cluster: s.name,
            })
            .collect()
    }

    /// Every peer's watcher status.
    #[must_use]
    pub fn peers(&self) -> Vec<WatcherStatus> {
        self.board.snapshot()
    }

    /// One peer's watcher status.
    #[must_use]
    pub fn peer(&self, name: &str) -> Option<WatcherStatus> {
        self.board.get(name)
    }
}

struct RunningPeer {
    entry: ClusterEntry,
    cancel: CancellationToken,
    task: JoinHandle<Option<RecordsInForce>>,
}

/// Runs the mirror until `cancel`: watches the peers named in the configuration, starts and
/// stops their watchers as it changes, and writes what they report into `store`.
pub async fn run(
    store: Arc<dyn Store>,
    config: MirrorConfig,
    metrics: Arc<Metrics>,
    status: MirrorStatus,
    cancel: CancellationToken,
) {
    let registry = Arc::new(ClusterRegistry::default());
    // Our own cluster holds its name, ID and pod CIDRs: a peer claiming any is refused.
    if let Err(e) = registry.claim(&config.cluster, config.cluster_id, &config.pod_cidrs) {
        tracing::error!(error = %e, "cannot register our own cluster with the mirror; mirroring is off");
        return;
    }
    let watch_metrics = Arc::new(WatchMetrics::new());
    let (tx, rx) = mpsc::channel(1024);
    let mut writer = Mirror::new(
        Arc::clone(&store),
        config.cluster.clone(),
        config.limits,
        Arc::clone(&metrics),
    );
    writer.status = Some(status.clone());
    let writer_cancel = cancel.clone();
    let writer_task = tokio::spawn(async move { writer.run(rx, writer_cancel).await });

    let mut running: BTreeMap<String, RunningPeer> = BTreeMap::new();
    let mut inherited: BTreeMap<String, RecordsInForce> = BTreeMap::new();
    let mut last_text: Option<String> = None;
    let mut last_problem: Option<String> = None;
    let mut first = true;
    let mut tick = tokio::time::interval(config.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        for peer in status.peers() {
            metrics.set_mirror_connected(&peer.name, Some(peer.connected));
        }
        let text = match tokio::fs::read_to_string(&config.peers_file).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && first => {
                // No peers yet (no `connect` so far): nothing to mirror, but peers left
                // in the store by an earlier run are dropped below.
                String::new()
            }
            Err(e) => {
                let problem = e.to_string();
                if last_problem.as_deref() != Some(problem.as_str()) {
                    tracing::warn!(file = %config.peers_file.display(), error = %e, "cannot read the peer list; keeping the current peers");
                    last_problem = Some(problem);
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        let peers = if text.trim().is_empty() {
            BTreeMap::new()
        } else {
            match AgentConfig::parse(&config.peers_file, &text) {
                Ok(c) => c
                    .clusters
                    .into_iter()
                    .filter(|e| e.name != config.cluster)
                    .map(|e| (e.name.clone(), e))
                    .collect::<BTreeMap<_, _>>(),
                Err(e) => {
                    let problem = e.to_string();
                    if last_problem.as_deref() != Some(problem.as_str()) {
                        tracing::warn!(error = %e, "invalid peer list; keeping the current peers (fix the file)");
                        last_problem = Some(problem);
                    }
                    continue;
                }
            }
        };
        last_text = Some(text);
        last_problem = None;
        // Stop watchers of peers gone or changed.
        let stop: Vec<String> = running
            .iter()
            .filter(|(name, r)| peers.get(*name) != Some(&r.entry))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stop {
            let Some(r) = running.remove(&name) else {
                continue;
            };
            r.cancel.cancel();
            let left = r.task.await.ok().flatten();
            if peers.contains_key(&name) {
                if let Some(left) = left {
                    inherited.insert(name.clone(), left);
                }
            } else {
                tracing::info!(peer = %name, "peer removed from the configuration; dropping its records");
                registry.release(&name);
                status.board.remove(&name);
                metrics.set_mirror_connected(&name, None);
                let _ = tx.send(Update::DropCluster { cluster: name }).await;
            }
        }
        if first {
            first = false;
            // Peers mirrored by an earlier run and no longer configured.
            for name in mirrored_clusters(&store, &config.cluster, &metrics).await {
                if !peers.contains_key(&name) {
                    tracing::info!(peer = %name, "records of a peer that is no longer configured; dropping them");
                    let _ = tx.send(Update::DropCluster { cluster: name }).await;
                }
            }
        }
        for (name, entry) in &peers {
            if running.contains_key(name) {
                continue;
            }
            status.board.register(name);
            let token = cancel.child_token();
            let wc = WatcherConfig {
                entry: entry.clone(),
                local: false,
                trust_domain: config.trust_domain.clone(),
                cert_file: config.cert_file.clone(),
                key_file: config.key_file.clone(),
                backoff: config.backoff,
                stale_ttl: config.stale_ttl,
                connect_timeout: config.connect_timeout,
                request_timeout: config.request_timeout,
                raw: true,
                max_records: Some(config.limits.max_records_per_peer),
                all_clusters: false,
            };
            tracing::info!(peer = %name, endpoints = ?entry.endpoints, "mirroring peer");
            let task = tokio::spawn(watcher::run(
                wc,
                inherited.remove(name),
                tx.clone(),
                status.board.clone(),
                Arc::clone(&registry),
                Arc::clone(&watch_metrics),
                token.clone(),
            ));
            running.insert(
                name.clone(),
                RunningPeer {
                    entry: entry.clone(),
                    cancel: token,
                    task,
                },
            );
        }
    }
    for (name, r) in running {
        r.cancel.cancel();
        let _ = r.task.await;
        // Another replica mirrors from now on (or nobody, at shutdown).
        status.board.remove(&name);
        status.set_records(&name, None);
        metrics.set_mirror_connected(&name, None);
    }
    drop(tx);
    let _ = writer_task.await;
}

/// Clusters other than `own` that have a cluster config in the store (mirrored peers).
async fn mirrored_clusters(store: &Arc<dyn Store>, own: &str, metrics: &Metrics) -> Vec<String> {
    let prefix = Kind::ClusterConfig.prefix();
    match timed(metrics, "list", store.list(prefix.as_bytes())).await {
        Ok(list) => list
            .kvs
            .iter()
            .filter_map(|kv| std::str::from_utf8(&kv.key).ok())
            .filter_map(|k| k.strip_prefix(prefix.as_str()))
            .filter(|name| *name != own && !name.contains('/'))
            .map(str::to_owned)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list mirrored peers in the store");
            Vec::new()
        }
    }
}

/// Writes what the peer watchers report into the store.
pub struct Mirror {
    store: Arc<dyn Store>,
    own: String,
    limits: MirrorLimits,
    metrics: Arc<Metrics>,
    /// Keys of each peer in the store (loaded on the peer's first update).
    keys: BTreeMap<String, HashSet<String>>,
    /// Where record counts are reported.
    status: Option<MirrorStatus>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("own", &self.own)
            .field("peers", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why a mirror write failed.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The store refused or failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl Mirror {
    /// A writer of peers' records into `store` (`own`: our cluster, never written).
    #[must_use]
    pub fn new(
        store: Arc<dyn Store>,
        own: String,
        limits: MirrorLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            own,
            limits,
            metrics,
            keys: BTreeMap::new(),
            status: None,
        }
    }

    /// Applies updates until the channel closes or `cancel`. A write that fails is retried
    /// with backoff (the store may be without quorum for a while); updates queue meanwhile.
    pub async fn run(&mut self, mut rx: mpsc::Receiver<Update>, cancel: CancellationToken) {
        loop {
            let update = tokio::select! {
                () = cancel.cancelled() => return,
                u = rx.recv() => match u {
                    Some(u) => u,
                    None => return,
                },
            };
            let mut delay = Duration::from_millis(100);
            loop {
                match self.apply(&update).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "writing a peer's records failed; retrying");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                        // The store may have changed meanwhile: reload the peer's keys.
                        self.keys.clear();
                    }
                }
            }
        }
    }

    /// Applies one update.
    ///
    /// # Errors
    /// [`MirrorError`] when the store fails; nothing is known to be written then, and the
    /// update can be applied again.
    pub async fn apply(&mut self, update: &Update) -> Result<(), MirrorError> {
        match update {
            Update::ClusterInfo {
                cluster,
                id,
                pod_cidrs,
            } => {
                if self.refuse_own(cluster) {
                    return Ok(());
                }
                let value = v1::ClusterConfig {
                    name: cluster.clone(),
                    id: *id,
                    pod_cidrs: pod_cidrs.clone(),
                    ..v1::ClusterConfig::default()
                }
                .encode_to_vec();
                let key = keys::cluster_config_key(cluster);
                let current = timed(&self.metrics, "get", self.store.get(key.as_bytes())).await?;
                if current.is_none_or(|kv| kv.value != value) {
                    timed(
                        &self.metrics,
                        "put",
                        self.store.put(key.as_bytes(), value, None),
                    )
                    .await?;
                }
            }
            Update::RawReplace { cluster, records } => {
                if self.refuse_own(cluster) {
                    return Ok(());
                }
                self.replace(cluster, records).await?;
            }
            Update::RawUpsert {
                cluster,
                key,
                value,
            } => {
                if self.refuse_own(cluster) {
                    return Ok(());
                }
                if value.len() > self.limits.max_value_bytes {
                    self.refused(cluster, "value-size");
                    tracing::error!(peer = %cluster, key = %key, bytes = value.len(), limit = self.limits.max_value_bytes, "peer record exceeds the value size limit; refused, its previous value (if any) stays");
                    return Ok(());
                }
                let known = self.peer_keys(cluster).await?;
                if !known.contains(key) && known.len() >= self.limits.max_records_per_peer {
                    self.refused(cluster, "limit");
                    tracing::error!(peer = %cluster, key = %key, limit = self.limits.max_records_per_peer, "peer exceeds the record limit; record refused (raise --mirror-max-records-per-peer if the peer is legitimately this large)");
                    return Ok(());
                }
                timed(
                    &self.metrics,
                    "put",
                    self.store.put(key.as_bytes(), value.to_vec(), None),
                )
                .await?;
                self.peer_keys(cluster).await?.insert(key.clone());
                self.count(cluster);
            }
            Update::RawRemove { cluster, key } => {
                if self.refuse_own(cluster) {
                    return Ok(());
                }
                timed(&self.metrics, "delete", self.store.delete(key.as_bytes())).await?;
                self.peer_keys(cluster).await?.remove(key);
                self.count(cluster);
            }
            Update::DropCluster { cluster } => {
                if self.refuse_own(cluster) {
                    return Ok(());
                }
                for kind in MIRRORED_KINDS {
                    let prefix = kind.cluster_prefix(cluster);
                    timed(
                        &self.metrics,
                        "delete",
                        self.store.delete_prefix(prefix.as_bytes()),
                    )
                    .await?;
                }
                let markers = keys::synced_prefix(cluster);
                timed(
                    &self.metrics,
                    "delete",
                    self.store.delete_prefix(markers.as_bytes()),
                )
                .await?;
                let config = keys::cluster_config_key(cluster);
                timed(
                    &self.metrics,
                    "delete",
                    self.store.delete(config.as_bytes()),
                )
                .await?;
                self.keys.remove(cluster);
                if let Some(status) = &self.status {
                    status.set_records(cluster, None);
                }
                self.metrics.set_mirror_records(cluster, 0);
                self.metrics.set_mirror_synced(cluster, false);
            }
            // Decoded updates come only from watchers not in raw mode.
            Update::Replace { .. }
            | Update::Upsert(_)
            | Update::Remove { .. }
            | Update::UpsertInput { .. }
            | Update::RemoveInput { .. } => {
                tracing::error!("decoded watcher output reached the mirror; ignored");
            }
        }
        Ok(())
    }

    fn refuse_own(&self, cluster: &str) -> bool {
        if cluster == self.own {
            // The registry already refuses a peer claiming our name; this is a second line.
            tracing::error!(peer = %cluster, "a peer update names our own cluster; refused");
            self.refused(cluster, "own-cluster");
            return true;
        }
        false
    }

    fn refused(&self, cluster: &str, reason: &'static str) {
        self.metrics.mirror_refused(cluster, reason);
    }

    fn count(&self, cluster: &str) {
        let n = self.keys.get(cluster).map_or(0, HashSet::len);
        self.metrics.set_mirror_records(cluster, n);
        if let Some(status) = &self.status {
            status.set_records(cluster, Some(n));
        }
    }

    /// The peer's keys in the store (listed on first use).
    async fn peer_keys(&mut self, cluster: &str) -> Result<&mut HashSet<String>, MirrorError> {
        if !self.keys.contains_key(cluster) {
            let mut found = HashSet::new();
            for kind in MIRRORED_KINDS {
                let prefix = kind.cluster_prefix(cluster);
                let list = timed(&self.metrics, "list", self.store.list(prefix.as_bytes())).await?;
                found.extend(
                    list.kvs
                        .into_iter()
                        .filter_map(|kv| String::from_utf8(kv.key).ok()),
                );
            }
            self.keys.insert(cluster.to_owned(), found);
        }
        Ok(self.keys.entry(cluster.to_owned()).or_default())
    }

    /// One write of a full sync as an owned future: `Some` puts, `None` deletes.
    fn write(
        &self,
        key: String,
        value: Option<Bytes>,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (store, metrics) = (Arc::clone(&self.store), Arc::clone(&self.metrics));
        async move {
            match value {
                Some(v) => timed(&metrics, "put", store.put(key.as_bytes(), v.to_vec(), None))
                    .await
                    .map(drop),
                None => timed(&metrics, "delete", store.delete(key.as_bytes()))
                    .await
                    .map(drop),
            }
        }
    }

    /// A full sync of `cluster`: writes what differs, deletes what is gone, then marks the
    /// peer synced.
    async fn replace(
        &mut self,
        cluster: &str,
        records: &BTreeMap<String, Option<Bytes>>,
    ) -> Result<(), MirrorError> {
        if records.len() > self.limits.max_records_per_peer {
            self.refused(cluster, "limit");
            tracing::error!(
                peer = %cluster,
                records = records.len(),
                limit = self.limits.max_records_per_peer,
                "peer's full state exceeds the record limit; refused whole, its last good state stays (raise --mirror-max-records-per-peer if the peer is legitimately this large)"
            );
            return Ok(());
        }
        let mut current: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for kind in MIRRORED_KINDS {
            let prefix = kind.cluster_prefix(cluster);
            let list = timed(&self.metrics, "list", self.store.list(prefix.as_bytes())).await?;
            for kv in list.kvs {
                if let Ok(k) = String::from_utf8(kv.key) {
                    current.insert(k, kv.value);
                }
            }
        }
        // The writes of a full state are independent (the markers come after all of
        // them): up to WRITES_IN_FLIGHT at once, so the store can commit them in batches
        // instead of one round trip (and fsync) per record.
        let oversized: Vec<&String> = records
            .iter()
            .filter(|(_, v)| {
                v.as_ref()
                    .is_some_and(|v| v.len() > self.limits.max_value_bytes)
            })
            .map(|(k, _)| k)
            .collect();
        for key in &oversized {
            self.refused(cluster, "value-size");
            tracing::error!(peer = %cluster, key = %key, limit = self.limits.max_value_bytes, "peer record exceeds the value size limit; refused, its previous value (if any) stays");
        }
        let puts: Vec<(String, Bytes)> = records
            .iter()
            .filter_map(|(key, value)| {
                // `None`: did not validate; the previous value (if any) stays. So does
                // the previous value of a record over the size limit.
                let value = value
                    .as_ref()
                    .filter(|v| v.len() <= self.limits.max_value_bytes)?;
                let same = current
                    .get(key)
                    .is_some_and(|v| v.as_slice() == value.as_ref());
                (!same).then(|| (key.clone(), value.clone()))
            })
            .collect();
        let deletes: Vec<String> = current
            .keys()
            .filter(|key| !records.contains_key(*key))
            .cloned()
            .collect();
        let (puts, deletes) = (puts.len(), {
            let writes: Vec<_> = puts
                .into_iter()
                .map(|(key, value)| self.write(key, Some(value)))
                .chain(deletes.iter().cloned().map(|key| self.write(key, None)))
                .collect();
            futures::stream::iter(writes)
                .buffer_unordered(WRITES_IN_FLIGHT)
                .try_collect::<()>()
                .await?;
            deletes.len()
        });
        for kind in MIRRORED_KINDS {
            let marker = keys::synced_key(cluster, kind);
            if timed(&self.metrics, "get", self.store.get(marker.as_bytes()))
                .await?
                .is_none()
            {
                let value = v1::SyncedMarker { revision: 0 }.encode_to_vec();
                timed(
                    &self.metrics,
                    "put",
                    self.store.put(marker.as_bytes(), value, None),
                )
                .await?;
            }
        }
        let kept: HashSet<String> = records
            .keys()
            .filter(|k| records[*k].is_some() || current.contains_key(*k))
            .cloned()
            .collect();
        tracing::info!(peer = %cluster, records = kept.len(), puts, deletes, "peer synced into the store");
        self.keys.insert(cluster.to_owned(), kept);
        self.count(cluster);
        self.metrics.set_mirror_synced(cluster, true);
        Ok(())
    }
}
