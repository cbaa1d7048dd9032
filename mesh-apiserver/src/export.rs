//! Writing the cluster's records to the store with as few writes as possible.
//!
//! The exporter owns the translation state ([`ClusterObjects`]) and a mirror of what the
//! store holds under this cluster's keys, loaded once at start. A record is written only
//! when its encoding differs from the mirror, and deleted only when the mirror has it and
//! the sources no longer do; since encodings are deterministic, a restart with unchanged
//! sources writes nothing.
//!
//! Until the initial sync of a kind's inputs is complete the exporter only collects that
//! kind's records (a partial view must not delete anything); at sync it writes the
//! difference, then the kind's synced marker `mesh/v1/synced/<cluster>/<kind>` (once: an
//! existing marker is left alone). The API server is ready when every kind is synced.
//!
//! A record larger than the store's value limit ([`MAX_VALUE_SIZE`], e.g. a service with
//! tens of thousands of endpoints) is not sent and not retried: it is reported once per
//! change (an ERROR line naming the record and its size, the
//! `clustermesh_apiserver_oversized_records` gauge and an [`ExportProblems`] entry shown on
//! `/statusz`), and the store keeps the record's previous version until a version that
//! fits replaces it. Splitting one service's backends over several keys would change the
//! record layout every agent reads (one key per service), so it is not done here.
//!
//! The exporter assumes it is the only writer of its cluster's record keys: of several API
//! server replicas only the elected leader runs one, and its writes are fenced, so a
//! deposed leader's writes cannot land ([`crate::leader`]). A new leader's exporter starts
//! like a restarted one: it loads the store and writes only the differences once its
//! sources are synced, so records its predecessor wrote are not touched again. Identities
//! are allocated by compare-and-swap (see [`crate::identity`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_api::cidr::Cidr;
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::keys::{self, Kind};
use clustermesh_api::v1;
use clustermesh_store::{Revision, Store, StoreError, MAX_VALUE_SIZE};
use futures::StreamExt;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::identity::{AllocError, IdentityAllocator};
use crate::metrics::Metrics;
use crate::source::SourceEvent;
use crate::state::{ClusterObjects, RecordChange};
use crate::timed;
use crate::translate::{InputWarning, Labels, NamedPort};

/// What the exporter needs to know about its cluster.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Cluster name (validated by the caller).
    pub cluster: String,
    /// Cluster ID (validated by the caller).
    pub cluster_id: u32,
    /// 255- or 511-cluster mode.
    pub mode: ClusterIdMode,
    /// The cluster's pod CIDRs, exported in the cluster config.
    pub pod_cidrs: Vec<Cidr>,
    /// How long an identity stays after its last user is gone.
    pub identity_gc_grace: Duration,
    /// How often failed writes are retried and garbage is collected.
    pub maintenance_interval: Duration,
    /// Store writes in flight at once during a bulk sync.
    pub write_concurrency: usize,
    /// Where the exporter reports records it cannot write (shared with `/statusz`).
    pub problems: ExportProblems,
}

impl ExportConfig {
    /// Defaults for a cluster: 255-cluster mode, no pod CIDRs, identity grace 5 minutes,
    /// maintenance every 5 seconds, 32 concurrent writes.
    #[must_use]
    pub fn new(cluster: impl Into<String>, cluster_id: u32) -> Self {
        ExportConfig {
            cluster: cluster.into(),
            cluster_id,
            mode: ClusterIdMode::Max255,
            pod_cidrs: Vec::new(),
            identity_gc_grace: Duration::from_secs(300),
            maintenance_interval: Duration::from_secs(5),
            write_concurrency: 32,
            problems: ExportProblems::default(),
        }
    }

    /// The [`v1::ClusterConfig`] record for this configuration.
    #[must_use]
    pub fn cluster_config(&self) -> v1::ClusterConfig {
        v1::ClusterConfig {
            name: self.cluster.clone(),
            id: self.cluster_id,
            pod_cidrs: self.pod_cidrs.iter().map(ToString::to_string).collect(),
            capabilities: Some(v1::ClusterCapabilities {
                max_connected_clusters: self.mode.max_cluster_id(),
                identity_local_bits: self.mode.identity_local_bits(),
            }),
        }
    }
}

/// A record the store refused (or would refuse) as too large.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OversizedRecord {
    /// Its kind.
    pub kind: Kind,
    /// Encoded size in bytes.
    pub size: usize,
    /// The store's value limit in bytes.
    pub limit: usize,
}

/// Records the exporter cannot write right now, by store key: a cheap handle shared by
/// the exporter (which fills it) and the operations endpoint (which shows it).
#[derive(Debug, Clone, Default)]
pub struct ExportProblems(Arc<Mutex<BTreeMap<String, OversizedRecord>>>);

impl ExportProblems {
    /// The records over the store's value limit, by key.
    #[must_use]
    pub fn oversized(&self) -> BTreeMap<String, OversizedRecord> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One human-readable line per problem, sorted by key.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        self.oversized()
            .iter()
            .map(|(key, r)| {
                format!(
                    "oversized {} record {key}: {} bytes, over the store's {}-byte value limit; \
                     not written (the store keeps its previous version)",
                    r.kind, r.size, r.limit
                )
            })
            .collect()
    }

    /// Records `key` as oversized; true when this is news (a new key or another size).
    fn set_oversized(&self, key: &str, record: OversizedRecord) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(key.to_owned(), record.clone()) != Some(record)
    }

    /// Forgets `key` (written, deleted, or back under the limit); true if it was listed.
    fn clear(&self, key: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .is_some()
    }

    /// Number of oversized records of `kind`.
    fn count(&self, kind: Kind) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| r.kind == kind)
            .count()
    }
}

/// Errors that stop the exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Loading the store's current state failed.
    #[error("exporter start-up: reading the store failed: {0}; check that the store is reachable")]
    Load(#[source] StoreError),
    /// Loading identities failed.
    #[error("exporter start-up: {0}")]
    Identities(#[source] AllocError),
}

impl ExportError {
    /// The store error behind this one when the store could not answer (no raft quorum,
    /// etcd unreachable): waiting may help, unlike with the other errors.
    #[must_use]
    pub fn store_unavailable(&self) -> Option<&StoreError> {
        let cause = match self {
            ExportError::Load(e) | ExportError::Identities(AllocError::Store(e)) => e,
            ExportError::Identities(_) => return None,
        };
        matches!(cause, StoreError::Unavailable(_)).then_some(cause)
    }
}

/// A write and its outcome.
type WriteResult = ((Kind, Write), Result<Option<Revision>, StoreError>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

impl Write {
    fn key(&self) -> &str {
        match self {
            Write::Put(k, _) | Write::Delete(k) => k,
        }
    }
}

/// The exporter. Build with [`Exporter::start`], drive with [`Exporter::run`].
pub struct Exporter {
    store: Arc<dyn Store>,
    config: ExportConfig,
    metrics: Arc<Metrics>,
    objects: ClusterObjects,
    identities: IdentityAllocator,
    /// Store contents under this cluster's record keys, per kind.
    written: BTreeMap<Kind, HashMap<String, Vec<u8>>>,
    /// What the sources say each record should be, per kind.
    desired: BTreeMap<Kind, HashMap<String, Vec<u8>>>,
    /// Synced markers present in the store.
    markers: BTreeSet<Kind>,
    /// Kinds whose initial full diff has been written.
    exported: BTreeSet<Kind>,
    /// Labels each endpoint's identity was acquired for.
    endpoint_labels: HashMap<IpAddr, Labels>,
    /// Keys whose last write failed, retried by maintenance.
    retry: HashSet<(Kind, String)>,
    ready: watch::Sender<bool>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("cluster", &self.config.cluster)
            .field("exported", &self.exported)
            .field("markers", &self.markers)
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Loads what the store holds for the cluster and writes the cluster config if it
    /// differs.
    ///
    /// # Errors
    /// [`ExportError`] when the store cannot be read.
    pub async fn start(
        store: Arc<dyn Store>,
        config: ExportConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ExportError> {
        let mut written: BTreeMap<Kind, HashMap<String, Vec<u8>>> = BTreeMap::new();
        for kind in Kind::ALL {
            let prefix = kind.cluster_prefix(&config.cluster);
            let list = timed(&metrics, "list", store.list(prefix.as_bytes()))
                .await
                .map_err(ExportError::Load)?;
            let map = written.entry(kind).or_default();
            for kv in list.kvs {
                // `cluster_prefix` of cluster-config is the exact key; other kinds' lists
                // might also catch a longer cluster name sharing the prefix, which cannot
                // happen because the prefix ends with '/'.
                if kind == Kind::ClusterConfig && kv.key != prefix.as_bytes() {
                    continue;
                }
                map.insert(String::from_utf8_lossy(&kv.key).into_owned(), kv.value);
            }
        }
        let synced = timed(
            &metrics,
            "list",
            store.list(keys::synced_prefix(&config.cluster).as_bytes()),
        )
        .await
        .map_err(ExportError::Load)?;
        let markers = synced
            .kvs
            .iter()
            .filter_map(|kv| match keys::parse_key(&kv.key) {
                Ok(keys::MeshKey::Synced { kind, .. }) => Some(kind),
                _ => None,
            })
            .collect();
        let identities = IdentityAllocator::load(
            Arc::clone(&store),
            &config.cluster,
            config.cluster_id,
            config.mode,
            Arc::clone(&metrics),
        )
        .await
        .map_err(ExportError::Identities)?;
        let (ready, _) = watch::channel(false);
        let mut this = Exporter {
            objects: ClusterObjects::new(config.cluster.clone()),
            store,
            metrics,
            identities,
            written,
            desired: Kind::ALL.into_iter().map(|k| (k, HashMap::new())).collect(),
            markers,
            exported: BTreeSet::new(),
            endpoint_labels: HashMap::new(),
            retry: HashSet::new(),
            ready,
            config,
        };
        let config_key = keys::cluster_config_key(&this.config.cluster);
        let config_value = this.config.cluster_config().encode_to_vec();
        this.desired
            .entry(Kind::ClusterConfig)
            .or_default()
            .insert(config_key, config_value);
        this.finish_initial_sync(Kind::ClusterConfig).await;
        Ok(this)
    }

    /// A receiver that turns `true` once every kind has been synced and exported.
    #[must_use]
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Applies source events until `events` closes or `shutdown` is cancelled.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        shutdown: CancellationToken,
    ) {
        let mut maintenance = tokio::time::interval(self.config.maintenance_interval);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.recv() => {
                    let Some(event) = event else { return };
                    self.objects.apply(event);
                    // Apply whatever else is queued before translating, so a burst of
                    // events costs one pass.
                    while let Ok(event) = events.try_recv() {
                        self.objects.apply(event);
                    }
                    self.sync().await;
                }
                _ = maintenance.tick() => self.maintain().await,
            }
        }
    }

    /// Applies one event and exports its effects (for tests and embedders that drive the
    /// exporter by hand).
    pub async fn apply(&mut self, event: SourceEvent) {
        self.objects.apply(event);
        self.sync().await;
    }

    /// Retries failed writes and collects unused identities.
    pub async fn maintain(&mut self) {
        if !self.retry.is_empty() {
            let keys: Vec<(Kind, String)> = self.retry.drain().collect();
            let writes = keys
                .into_iter()
                .filter_map(|(kind, key)| self.write_for(kind, &key).map(|w| (kind, w)))
                .collect();
            self.execute(writes).await;
        }
        if self.exported.contains(&Kind::Endpoint) {
            match self
                .identities
                .collect_garbage(self.config.identity_gc_grace)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "identity garbage collection"),
                Err(error) => {
                    tracing::warn!(%error, "identity garbage collection failed; will retry")
                }
            }
        }
    }

    /// The write that makes the store match `desired` for `key`, if any.
    fn write_for(&self, kind: Kind, key: &str) -> Option<Write> {
        let want = self.desired.get(&kind).and_then(|m| m.get(key));
        let have = self.written.get(&kind).and_then(|m| m.get(key));
        match (want, have) {
            (Some(w), Some(h)) if w == h => None,
            (Some(w), _) => Some(Write::Put(key.to_owned(), w.clone())),
            (None, Some(_)) => Some(Write::Delete(key.to_owned())),
            (None, None) => None,
        }
    }

    async fn sync(&mut self) {
        let mut warnings = Vec::new();
        let changes = self.objects.take_changes(&mut warnings);
        self.report(&warnings);
        let mut touched: Vec<(Kind, String)> = Vec::new();
        for change in changes {
            let (kind, key, value) = match change {
                RecordChange::Service {
                    namespace,
                    name,
                    record,
                } => (
                    Kind::Service,
                    keys::service_key(&self.config.cluster, &namespace, &name),
                    record.map(|r| r.encode_to_vec()),
                ),
                RecordChange::Node { name, record } => (
                    Kind::Node,
                    keys::node_key(&self.config.cluster, &name),
                    record.map(|r| r.encode_to_vec()),
                ),
                RecordChange::Endpoint { ip, spec } => {
                    let old = self.endpoint_labels.remove(&ip);
                    let value = match spec {
                        None => None,
                        Some(spec) => match self.identities.acquire(&spec.labels).await {
                            Ok(identity) => {
                                self.endpoint_labels.insert(ip, spec.labels.clone());
                                Some(
                                    v1::Endpoint {
                                        ip: ip.to_string(),
                                        identity,
                                        node: spec.node,
                                        namespace: spec.namespace,
                                        pod: spec.pod,
                                        cluster: self.config.cluster.clone(),
                                        named_ports: spec
                                            .named_ports
                                            .iter()
                                            .map(NamedPort::to_proto)
                                            .collect(),
                                        pod_uid: spec.pod_uid,
                                    }
                                    .encode_to_vec(),
                                )
                            }
                            Err(error) => {
                                tracing::error!(%ip, pod = %spec.pod, %error, "no identity for endpoint; it is not exported");
                                self.metrics.rejected_input("identity");
                                None
                            }
                        },
                    };
                    if let Some(old) = old {
                        self.identities.release(&old);
                    }
                    (
                        Kind::Endpoint,
                        keys::endpoint_key(&self.config.cluster, ip),
                        value,
                    )
                }
                RecordChange::Policy {
                    source,
                    namespace,
                    name,
                    record,
                } => (
                    Kind::Policy,
                    keys::policy_key(&self.config.cluster, &namespace, source, &name),
                    record.map(|r| r.encode_to_vec()),
                ),
            };
            let map = self.desired.entry(kind).or_default();
            match value {
                Some(v) => map.insert(key.clone(), v),
                None => map.remove(&key),
            };
            touched.push((kind, key));
        }
        let mut writes = Vec::new();
        for (kind, key) in touched {
            if !self.exported.contains(&kind) {
                continue;
            }
            match self.write_for(kind, &key) {
                Some(write) => writes.push((kind, write)),
                // Back to what the store holds: nothing left to report for this key.
                None => self.clear_problem(kind, &key),
            }
        }
        self.execute(writes).await;

        for kind in [
            Kind::Node,
            Kind::Service,
            Kind::Endpoint,
            Kind::Identity,
            Kind::Policy,
        ] {
            if !self.exported.contains(&kind) && self.objects.is_synced(kind) {
                self.finish_initial_sync(kind).await;
            }
        }
        for kind in Kind::ALL {
            let count = match kind {
                Kind::Identity => self.identities.len(),
                _ => self.desired.get(&kind).map_or(0, HashMap::len),
            };
            self.metrics.set_records(kind.segment(), count);
        }
    }

    /// Writes the full difference for `kind`, then its synced marker.
    async fn finish_initial_sync(&mut self, kind: Kind) {
        if kind != Kind::Identity {
            let mut keys: BTreeSet<&String> = BTreeSet::new();
            keys.extend(self.desired.get(&kind).into_iter().flat_map(HashMap::keys));
            keys.extend(self.written.get(&kind).into_iter().flat_map(HashMap::keys));
            let writes: Vec<(Kind, Write)> = keys
                .into_iter()
                .filter_map(|key| self.write_for(kind, key).map(|w| (kind, w)))
                .collect();
            tracing::info!(%kind, writes = writes.len(), records = self.desired.get(&kind).map_or(0, HashMap::len), "initial sync: writing differences");
            self.execute(writes).await;
        }
        self.exported.insert(kind);
        if !self.markers.contains(&kind) {
            let key = keys::synced_key(&self.config.cluster, kind);
            let revision = self.store.current_revision().await.unwrap_or_default();
            let value = v1::SyncedMarker { revision }.encode_to_vec();
            match timed(
                &self.metrics,
                "put",
                self.store.put(key.as_bytes(), value, None),
            )
            .await
            {
                Ok(_) => {
                    self.markers.insert(kind);
                }
                Err(error) => {
                    tracing::warn!(%key, %error, "writing synced marker failed; will retry")
                }
            }
        }
        tracing::info!(%kind, "initial sync complete");
        self.update_ready();
    }

    fn update_ready(&self) {
        let all = Kind::ALL
            .iter()
            .all(|k| self.exported.contains(k) && self.markers.contains(k));
        self.ready.send_if_modified(|r| {
            let changed = *r != all;
            *r = all;
            changed
        });
    }

    async fn execute(&mut self, writes: Vec<(Kind, Write)>) {
        if writes.is_empty() {
            return;
        }
        let store = &self.store;
        let metrics = &self.metrics;
        let results: Vec<WriteResult> = futures::stream::iter(writes)
            .map(|(kind, write)| async move {
                let result = match &write {
                    // Not sent: the store would refuse it, and a retry cannot help.
                    Write::Put(key, value) if value.len() > MAX_VALUE_SIZE => {
                        Err(StoreError::ValueTooLarge {
                            key: key.clone(),
                            size: value.len(),
                            max: MAX_VALUE_SIZE,
                        })
                    }
                    Write::Put(key, value) => timed(
                        metrics,
                        "put",
                        store.put(key.as_bytes(), value.clone(), None),
                    )
                    .await
                    .map(Some),
                    Write::Delete(key) => {
                        timed(metrics, "delete", store.delete(key.as_bytes())).await
                    }
                };
                ((kind, write), result)
            })
            .buffer_unordered(self.config.write_concurrency.max(1))
            .collect()
            .await;
        for ((kind, write), result) in results {
            match result {
                Ok(_) => {
                    self.clear_problem(kind, write.key());
                    let map = self.written.entry(kind).or_default();
                    match write {
                        Write::Put(key, value) => {
                            map.insert(key, value);
                        }
                        Write::Delete(key) => {
                            map.remove(&key);
                        }
                    }
                }
                Err(StoreError::ValueTooLarge { size, max, .. }) => {
                    self.report_oversized(kind, write.key(), size, max);
                }
                Err(error) => {
                    tracing::warn!(key = write.key(), %error, "store write failed; will retry");
                    self.retry.insert((kind, write.key().to_owned()));
                }
            }
        }
        // Markers that failed earlier are retried with the next batch of writes.
        let missing: Vec<Kind> = self
            .exported
            .iter()
            .copied()
            .filter(|k| !self.markers.contains(k))
            .collect();
        for kind in missing {
            let key = keys::synced_key(&self.config.cluster, kind);
            let value = v1::SyncedMarker { revision: 0 }.encode_to_vec();
            if timed(
                &self.metrics,
                "put",
                self.store.put(key.as_bytes(), value, None),
            )
            .await
            .is_ok()
            {
                self.markers.insert(kind);
            }
        }
        self.update_ready();
    }

    /// Reports a record the store cannot take: once per new version (a changed record is
    /// tried, and reported, again), never retried by maintenance.
    fn report_oversized(&self, kind: Kind, key: &str, size: usize, limit: usize) {
        let record = OversizedRecord { kind, size, limit };
        if self.config.problems.set_oversized(key, record) {
            tracing::error!(
                %kind,
                key,
                size,
                limit,
                "record is larger than the store's value limit and is not written; the store \
                 keeps its previous version. Make it smaller: split the service into several \
                 Services with fewer endpoints each (or fewer ports)"
            );
            self.metrics.rejected_input("oversized");
        }
        self.metrics
            .set_oversized(kind.segment(), self.config.problems.count(kind));
    }

    fn clear_problem(&self, kind: Kind, key: &str) {
        if self.config.problems.clear(key) {
            tracing::info!(%kind, key, "record fits the store again and is written");
            self.metrics
                .set_oversized(kind.segment(), self.config.problems.count(kind));
        }
    }

    fn report(&self, warnings: &[InputWarning]) {
        for warning in warnings {
            match warning {
                InputWarning::Policy {
                    api,
                    namespace,
                    name,
                    error,
                } => tracing::warn!(
                    reason = warning.reason(),
                    kind = api.kubernetes_kind(),
                    namespace,
                    name,
                    %error,
                    "policy does not validate; its record is written as is, and agents refuse it and keep its last valid version"
                ),
                _ => tracing::warn!(reason = warning.reason(), %warning, "input partly rejected"),
            }
            self.metrics.rejected_input(warning.reason());
        }
    }
}
