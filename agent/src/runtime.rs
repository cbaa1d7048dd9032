//! The running agent: a supervisor that keeps one watcher per configured cluster, and a
//! reconciler that turns watcher updates into datapath changes.
//!
//! ```text
//! agent.yaml ──(poll)──> supervisor ──spawn/cancel──> watcher per cluster
//!                                                        │ Update (mpsc)
//!                              reconciler <──────────────┘
//!    DesiredState.compute() on a blocking thread ──> Datapath::reconcile (once, full state)
//!                                                     then Datapath::apply (failed services
//!                                                     stay pending and are retried)
//! ```
//!
//! The reconciler applies every update that is already queued before computing, so a
//! burst of events costs one compute, while a single event is applied on its own (the
//! "within one event" latency). Views for the admin API are published after every round.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clustermesh_certs::TrustDomain;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use clustermesh_agent_core::datapath::{Datapath, DesiredService};
use clustermesh_agent_core::desired::DesiredState;
use clustermesh_agent_core::maglev::Maglev;
use clustermesh_agent_core::merge::Locality;
use clustermesh_agent_core::metrics::Metrics;
use clustermesh_agent_core::policy::plane::{
    CgroupResolver, PlaneConfig, PlaneUpdate, PolicyPlane,
};
use clustermesh_agent_core::policy::PolicyDatapath;
use clustermesh_agent_core::watcher::{
    self, ClusterRegistry, ReconnectBackoff, RecordsInForce, StatusBoard, Update, WatcherConfig,
};
use clustermesh_api::agent_config::{AgentConfig, ClusterEntry, ConfigError, WatchMode};
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::model::ServicePortId;
use clustermesh_api::policy::PeerClusters;

use crate::enforcement::{self, Enforcement};

/// How long to wait before retrying services the datapath refused.
const DATAPATH_RETRY: Duration = Duration::from_secs(1);

/// Options of a running agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The configuration file (re-read when it changes).
    pub config_path: PathBuf,
    /// This node's name.
    pub node: String,
    /// This node's zone ("" if unknown).
    pub zone: String,
    /// Drop a disconnected cluster's records after this long (`None`: keep).
    pub stale_ttl: Option<Duration>,
    /// Table builder.
    pub maglev: Maglev,
    /// Reconnect policy.
    pub backoff: ReconnectBackoff,
    /// How often the configuration file is checked for changes.
    pub config_poll: Duration,
    /// Connect + TLS handshake timeout.
    pub connect_timeout: Duration,
    /// Time a connected server has to answer `GetClusterInfo` and to open the watch
    /// stream; a server that accepts connections but does not answer is retried (and
    /// its cluster's stale TTL keeps running).
    pub request_timeout: Duration,
    /// After start, nothing is sent to the datapath until every configured cluster has
    /// synced once, or this long has passed (so a restart does not program services with
    /// only part of their backends, and a reconciling datapath does not prune what an
    /// unsynced cluster still provides).
    pub initial_sync_timeout: Duration,
    /// What a policy peer selector without the cluster label selects (Cilium's
    /// `policy-default-local-cluster`: the local cluster only, by default).
    pub peer_clusters: PeerClusters,
    /// The node's own addresses (the reserved `host` identity in policy).
    pub host_addresses: Vec<std::net::IpAddr>,
}

impl AgentOptions {
    /// Defaults for `config_path` and `node`.
    #[must_use]
    pub fn new(config_path: impl Into<PathBuf>, node: impl Into<String>) -> Self {
        Self {
            config_path: config_path.into(),
            node: node.into(),
            zone: String::new(),
            stale_ttl: None,
            maglev: Maglev::default(),
            backoff: ReconnectBackoff::default(),
            config_poll: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            initial_sync_timeout: Duration::from_secs(10),
            peer_clusters: PeerClusters::Local,
            host_addresses: Vec::new(),
        }
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration file cannot be read.
    #[error("cannot read agent config {path}: {error}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, as the configuration's other errors carry theirs).
        error: std::io::Error,
    },
    /// The initial configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The trust domain in the configuration is invalid.
    #[error("agent config: trust_domain {0:?} is invalid: {1}")]
    TrustDomain(String, String),
    /// The Maglev settings are invalid.
    #[error(transparent)]
    Maglev(#[from] clustermesh_agent_core::maglev::MaglevError),
}

/// Reads and validates the agent configuration file at `path`.
///
/// # Errors
/// [`AgentError::ReadConfig`] when the file cannot be read, [`AgentError::Config`] when it
/// is not a valid configuration.
pub fn load_config(path: &std::path::Path) -> Result<AgentConfig, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|error| AgentError::ReadConfig {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(AgentConfig::parse(path, &text)?)
}

/// What the admin API reads: published by the running agent.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    /// Node name.
    pub node: String,
    /// Local cluster.
    pub local_cluster: String,
    /// Watcher statuses.
    pub clusters: StatusBoard,
    /// Desired state of every service port after the last compute.
    pub services: Arc<RwLock<Arc<BTreeMap<ServicePortId, DesiredService>>>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Reconcile rounds completed: incremented after each desired-state computation
    /// (and the datapath flush and view publication that follow it).
    pub rounds: Arc<AtomicU64>,
    /// Identities, endpoints and policy (`None` when the agent enforces no policy).
    pub enforcement: Option<Enforcement>,
}

impl AgentView {
    /// Reconcile rounds completed so far. Rounds only happen when updates arrive (or a
    /// refused datapath batch is retried), so a test or an operator can tell that every
    /// update queued before a given moment has been computed once this number moved.
    #[must_use]
    pub fn reconcile_rounds(&self) -> u64 {
        self.rounds.load(Ordering::Acquire)
    }

    /// The current services.
    #[must_use]
    pub fn services(&self) -> Arc<BTreeMap<ServicePortId, DesiredService>> {
        self.services
            .read()
            .map_or_else(|p| Arc::clone(&p.into_inner()), |g| Arc::clone(&g))
    }

    fn publish(&self, services: BTreeMap<ServicePortId, DesiredService>) {
        let services = Arc::new(services);
        match self.services.write() {
            Ok(mut g) => *g = services,
            Err(p) => *p.into_inner() = services,
        }
    }
}

/// A started agent: its view and the task running it.
#[derive(Debug)]
pub struct Agent {
    /// What the admin API shows.
    pub view: AgentView,
    /// Runs until the cancellation token passed to [`Agent::start`] fires.
    pub task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Loads the configuration and starts the supervisor and reconciler; with `policy`
    /// (a policy datapath and the way to find pods' cgroups) also the policy task.
    pub fn start(
        options: AgentOptions,
        datapath: Arc<dyn Datapath>,
        policy: Option<(Box<dyn PolicyDatapath>, Box<dyn CgroupResolver>)>,
        cancel: CancellationToken,
    ) -> Result<Agent, AgentError> {
        options.maglev.validate()?;
        let config = load_config(&options.config_path)?;
        let trust_domain = TrustDomain::new(config.trust_domain.clone())
            .map_err(|e| AgentError::TrustDomain(config.trust_domain.clone(), e.to_string()))?;
        let enforcement = policy.map(|(dp, resolver)| {
            let plane = PolicyPlane::new(
                PlaneConfig {
                    local_cluster: config.local_cluster.clone(),
                    node: options.node.clone(),
                    peer_clusters: options.peer_clusters,
                    mode: ClusterIdMode::default(),
                    host_addresses: options.host_addresses.clone(),
                },
                resolver,
            );
            Enforcement::new(plane, dp)
        });
        let view = AgentView {
            node: options.node.clone(),
            local_cluster: config.local_cluster.clone(),
            metrics: Arc::new(Metrics::new()),
            enforcement: enforcement.clone(),
            ..AgentView::default()
        };
        let here = Locality {
            cluster: config.local_cluster.clone(),
            node: options.node.clone(),
            zone: options.zone.clone(),
        };
        let (tx, rx) = mpsc::channel(4096);
        let desired = DesiredState::new(here, options.maglev);
        let deadline = tokio::time::Instant::now() + options.initial_sync_timeout;
        let (plane_tx, plane_task) = match enforcement {
            Some(e) => {
                let (ptx, prx) = mpsc::channel(4096);
                let task = enforcement::run(
                    e,
                    prx,
                    view.clusters.clone(),
                    deadline,
                    Arc::clone(&view.metrics),
                    cancel.clone(),
                );
                (Some(ptx), Some(task))
            }
            None => (None, None),
        };
        let reconciler = reconcile(
            desired,
            rx,
            plane_tx,
            datapath,
            view.clone(),
            deadline,
            cancel.clone(),
        );
        let supervisor = Supervisor {
            options,
            trust_domain,
            updates: tx,
            view: view.clone(),
            registry: Arc::new(ClusterRegistry::default()),
            running: BTreeMap::new(),
            client: None,
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(async move {
            let plane = async move {
                if let Some(t) = plane_task {
                    t.await;
                }
            };
            tokio::join!(reconciler, supervisor.run(config), plane);
        });
        Ok(Agent { view, task })
    }
}

/// Applies queued updates, computes on a blocking thread, flushes to the datapath.
async fn reconcile(
    mut desired: DesiredState,
    mut rx: mpsc::Receiver<Update>,
    plane: Option<mpsc::Sender<PlaneUpdate>>,
    datapath: Arc<dyn Datapath>,
    view: AgentView,
    initial_sync_deadline: tokio::time::Instant,
    cancel: CancellationToken,
) {
    let mut gate_open = false;
    // The first hand-over is the complete state (`Datapath::reconcile`), later ones are
    // incremental.
    let mut reconciled = false;
    loop {
        let first = if desired.has_pending() {
            // Changes are waiting (refused by the datapath, or held until the initial
            // sync): retry after a pause unless updates come first.
            let wake = if gate_open {
                tokio::time::Instant::now() + DATAPATH_RETRY
            } else {
                initial_sync_deadline
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                u = rx.recv() => u,
                () = tokio::time::sleep_until(wake) => None,
            }
        } else {
            tokio::select! {
                () = cancel.cancelled() => return,
                u = rx.recv() => match u { Some(u) => Some(u), None => return },
            }
        };
        let mut for_plane = Vec::new();
        if let Some(u) = first {
            for_plane.extend(apply(&mut desired, u));
        }
        while let Ok(u) = rx.try_recv() {
            for_plane.extend(apply(&mut desired, u));
        }
        if let Some(tx) = &plane {
            for u in for_plane {
                // The policy task lives as long as the agent; closed means shutdown.
                if tx.send(u).await.is_err() {
                    return;
                }
            }
        }
        if !gate_open {
            let clusters = view.clusters.snapshot();
            let all_synced = !clusters.is_empty() && clusters.iter().all(|c| c.synced);
            if all_synced || tokio::time::Instant::now() >= initial_sync_deadline {
                gate_open = true;
                tracing::info!(all_synced, "initial sync done; programming the datapath");
            }
        }
        let dp = Arc::clone(&datapath);
        let (flush, full) = (gate_open, gate_open && !reconciled);
        let round = tokio::task::spawn_blocking(move || {
            let stats = desired.compute();
            let result = if full {
                desired.reconcile(dp.as_ref())
            } else if flush {
                desired.flush(dp.as_ref())
            } else {
                Ok(0)
            };
            (desired, stats, result)
        })
        .await;
        reconciled |= full;
        let (d, stats, result) = match round {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "desired-state computation panicked; the agent cannot continue");
                return;
            }
        };
        desired = d;
        view.metrics.computed(
            stats.tables_built,
            stats.build_errors,
            desired.services().len(),
        );
        match result {
            Ok(0) => {}
            Ok(n) => {
                view.metrics.datapath_result(true);
                tracing::debug!(
                    services = n,
                    merged = stats.merged,
                    tables = stats.tables_built,
                    "datapath updated"
                );
            }
            Err(e) => {
                view.metrics.datapath_result(false);
                let failed: Vec<String> = e.failed.values().map(|f| f.service.clone()).collect();
                tracing::error!(error = %e, applied = e.applied, ?failed, "datapath refused some services; retrying those");
            }
        }
        view.publish(desired.services().clone());
        view.rounds.fetch_add(1, Ordering::AcqRel);
    }
}

/// Applies the service part of `u` to `desired`; returns its policy part.
fn apply(desired: &mut DesiredState, u: Update) -> Option<PlaneUpdate> {
    match u {
        Update::Replace {
            cluster,
            services,
            inputs,
        } => {
            desired.replace_cluster_keeping(&cluster, services);
            Some(PlaneUpdate::Replace { cluster, inputs })
        }
        Update::Upsert(r) => {
            desired.upsert(r);
            None
        }
        Update::Remove { cluster, name } => {
            desired.remove(&cluster, &name);
            None
        }
        Update::DropCluster { cluster } => {
            desired.remove_cluster(&cluster);
            Some(PlaneUpdate::DropCluster { cluster })
        }
        Update::ClusterInfo {
            cluster,
            id,
            pod_cidrs,
        } => Some(PlaneUpdate::ClusterInfo {
            cluster,
            id,
            pod_cidrs,
        }),
        Update::UpsertInput { cluster, input } => Some(PlaneUpdate::Upsert { cluster, input }),
        Update::RemoveInput { cluster, key } => Some(PlaneUpdate::Remove { cluster, key }),
        // The agent's watchers decode (`WatcherConfig::raw` is false): never sent here.
        Update::RawReplace { cluster, .. }
        | Update::RawUpsert { cluster, .. }
        | Update::RawRemove { cluster, .. } => {
            tracing::error!(cluster = %cluster, "undecoded watcher output reached the agent; ignored");
            None
        }
    }
}

/// Starts, stops and restarts watchers as the configuration changes.
struct Supervisor {
    options: AgentOptions,
    trust_domain: TrustDomain,
    updates: mpsc::Sender<Update>,
    view: AgentView,
    registry: Arc<ClusterRegistry>,
    running: BTreeMap<String, RunningWatcher>,
    /// The client certificate and key paths every running watcher was started with
    /// (`None` before the first start).
    client: Option<(PathBuf, PathBuf)>,
    cancel: CancellationToken,
}

/// A spawned watcher: its settings, its stop token and its task.
struct RunningWatcher {
    entry: ClusterEntry,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Option<RecordsInForce>>,
}

impl RunningWatcher {
    /// Cancels the watcher and waits until its task has ended, so nothing it does
    /// (a last update, a status change) can come after what the caller does next.
    /// Returns the records it left in force (their claim still held).
    async fn stop(self, name: &str, board: &StatusBoard) -> Option<RecordsInForce> {
        self.cancel.cancel();
        match self.task.await {
            Ok(left) => left,
            Err(e) => {
                tracing::error!(cluster = %name, error = %e, "cluster watcher task failed");
                // Whatever it merged is still there: the board says whether it had synced.
                board
                    .get(name)
                    .filter(|s| s.synced)
                    .map(|_| RecordsInForce {
                        stale_since: tokio::time::Instant::now(),
                        clusters: vec![name.to_owned()],
                    })
            }
        }
    }
}

impl Supervisor {
    async fn run(mut self, mut config: AgentConfig) {
        self.sync_watchers(&config).await;
        // What the file said last (`config` is what is applied: the mode stays as started).
        let mut loaded = config.clone();
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                () = tokio::time::sleep(self.options.config_poll) => {}
            }
            match load_config(&self.options.config_path) {
                Ok(new) if new != loaded => {
                    loaded = new.clone();
                    if new.local_cluster != config.local_cluster
                        || new.trust_domain != config.trust_domain
                        || new.mode != config.mode
                    {
                        tracing::error!(old = %config.local_cluster, new = %new.local_cluster, old_mode = %config.mode, new_mode = %new.mode, "local_cluster, trust_domain or mode changed in the agent config; restart the agent to apply that (other changes are applied)");
                    }
                    tracing::info!(path = %self.options.config_path.display(), "agent config changed; updating cluster watchers");
                    let new = AgentConfig {
                        mode: config.mode,
                        ..new
                    };
                    self.sync_watchers(&new).await;
                    config = new;
                }
                Ok(_) => {
                    if config.mode == WatchMode::Mirror {
                        // A cluster the server stopped mirroring leaves the board; while
                        // it is still configured, it is listed again (not synced).
                        for c in &config.clusters {
                            self.view.clusters.register(&c.name);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload the agent config; keeping the running configuration");
                }
            }
        }
        for (name, watcher) in std::mem::take(&mut self.running) {
            watcher.stop(&name, &self.view.clusters).await;
        }
    }

    async fn sync_watchers(&mut self, config: &AgentConfig) {
        let client = (config.cert_file.clone(), config.key_file.clone());
        // The client certificate is part of every watcher's settings: a new one restarts all.
        let client_changed = self.client.as_ref() != Some(&client);
        let mirror = config.mode == WatchMode::Mirror;
        // Mirror mode: one watcher, of our own cluster, brings every cluster; the server
        // decides which peers it mirrors (the same list), and drops those it stops
        // mirroring.
        let wanted: BTreeMap<&str, &ClusterEntry> = config
            .clusters
            .iter()
            .filter(|c| !mirror || c.name == config.local_cluster)
            .map(|c| (c.name.as_str(), c))
            .collect();
        let stop: Vec<String> = self
            .running
            .iter()
            .filter(|(name, w)| client_changed || wanted.get(name.as_str()) != Some(&&w.entry))
            .map(|(name, _)| name.clone())
            .collect();
        // Records left in force by restarted watchers, for their successors.
        let mut inherited: BTreeMap<String, RecordsInForce> = BTreeMap::new();
        for name in stop {
            // Stopped and awaited before its records and status are dropped: a watcher
            // still finishing an event could otherwise bring the cluster back afterwards.
            let left = match self.running.remove(&name) {
                Some(watcher) => watcher.stop(&name, &self.view.clusters).await,
                None => None,
            };
            let still_configured = wanted.contains_key(name.as_str());
            match left {
                // The claim goes with the records: kept for the next watcher.
                Some(left) if still_configured => {
                    inherited.insert(name.clone(), left);
                }
                _ => self.registry.release(&name),
            }
            if !still_configured {
                tracing::info!(cluster = %name, "cluster removed from the configuration; dropping its records");
                self.view.clusters.remove(&name);
                // The reconciler lives as long as the agent; a closed channel means shutdown.
                let _ = self
                    .updates
                    .send(Update::DropCluster { cluster: name })
                    .await;
            } else {
                tracing::info!(cluster = %name, "cluster settings changed; restarting its watcher (records and claims kept until resynced or dropped by the stale TTL)");
            }
        }
        // Every configured cluster is on the board before any watcher runs, so the
        // initial-sync gate ("every cluster synced") cannot open while a watcher that was
        // spawned but not yet polled is missing from it.
        for c in &config.clusters {
            self.view.clusters.register(&c.name);
        }
        self.client = Some(client);
        for (name, entry) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            let token = self.cancel.child_token();
            let wc = WatcherConfig {
                entry: entry.clone(),
                local: name == config.local_cluster,
                trust_domain: self.trust_domain.clone(),
                cert_file: config.cert_file.clone(),
                key_file: config.key_file.clone(),
                backoff: self.options.backoff,
                stale_ttl: self.options.stale_ttl,
                connect_timeout: self.options.connect_timeout,
                request_timeout: self.options.request_timeout,
                raw: false,
                max_records: None,
                all_clusters: mirror,
            };
            tracing::info!(cluster = %name, endpoints = ?entry.endpoints, "starting cluster watcher");
            let task = tokio::spawn(watcher::run(
                wc,
                inherited.remove(name),
                self.updates.clone(),
                self.view.clusters.clone(),
                Arc::clone(&self.registry),
                Arc::clone(&self.view.metrics),
                token.clone(),
            ));
            self.running.insert(
                name.to_owned(),
                RunningWatcher {
                    entry: entry.clone(),
                    cancel: token,
                    task,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_agent_core::recording::RecordingDatapath;
    use clustermesh_api::model::{
        Affinity, BackendRecord, PortSpec, Protocol, ServiceName, ServiceRecord,
    };

    fn record(name: &str, vip: &str, backend_ip: &str) -> ServiceRecord {
        let http = PortSpec {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        ServiceRecord {
            cluster: "east".into(),
            name: ServiceName {
                namespace: "default".into(),
                name: name.into(),
            },
            frontends: vec![vip.parse().unwrap()],
            ports: vec![http.clone()],
            backends: vec![BackendRecord {
                ip: backend_ip.parse().unwrap(),
                ports: vec![http],
                ready: true,
                terminating: false,
                node: "n1".into(),
                zone: String::new(),
                weight: 1,
            }],
            global: true,
            shared: true,
            affinity: Affinity::None,
            topology_aware: false,
        }
    }

    fn lb_id(name: &str) -> ServicePortId {
        ServicePortId {
            namespace: "default".into(),
            name: name.into(),
            port_name: "http".into(),
        }
    }

    /// The first hand-over is the full state; afterwards only the service the datapath
    /// refused is sent again (after the retry pause, about a second).
    #[tokio::test]
    async fn the_first_round_reconciles_and_only_a_refused_service_is_retried() {
        let dp = Arc::new(RecordingDatapath::new());
        dp.fail_service(&lb_id("b"), 1);
        let view = AgentView::default();
        let here = Locality {
            cluster: "east".into(),
            node: "n1".into(),
            zone: String::new(),
        };
        let (tx, rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(reconcile(
            DesiredState::new(here, Maglev::default()),
            rx,
            None,
            Arc::clone(&dp) as Arc<dyn Datapath>,
            view.clone(),
            tokio::time::Instant::now(),
            cancel.clone(),
        ));
        let services = [
            record("a", "10.96.0.10", "10.0.0.1"),
            record("b", "10.96.0.11", "10.0.0.2"),
        ]
        .into_iter()
        .map(|r| (r.name.clone(), Some(r)))
        .collect();
        tx.send(Update::Replace {
            cluster: "east".into(),
            services,
            inputs: BTreeMap::new(),
        })
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while view.reconcile_rounds() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            view.reconcile_rounds() >= 2,
            "the refused service was retried"
        );
        let sent: Vec<Vec<String>> = dp
            .batches()
            .iter()
            .map(|b| b.upserts.iter().map(|s| s.id.name.clone()).collect())
            .collect();
        assert_eq!(sent, [vec!["a".to_owned()], vec!["b".to_owned()]]);
        assert_eq!(dp.programmed().len(), 2);
        cancel.cancel();
        task.await.unwrap();
    }

    /// The agent reads its configuration file itself (`api` only parses text); the errors
    /// name the file and say what is wrong.
    #[test]
    fn config_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("agent.yaml");
        let e = load_config(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot read agent config {}: ", missing.display())),
            "{e}"
        );
        std::fs::write(&missing, "clusters: 3\n").unwrap();
        let e = load_config(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "agent config {} is not valid: ",
                missing.display()
            )),
            "{e}"
        );
    }

    /// A cluster entry whose server cannot be reached (the watcher never connects).
    fn entry(name: &str) -> ClusterEntry {
        ClusterEntry {
            name: name.into(),
            id: 0,
            endpoints: vec!["127.0.0.1:1".into()],
            ca_file: "/nonexistent/ca.crt".into(),
        }
    }

    /// A supervisor of nothing yet, its view, its stop token and the updates it sends.
    fn test_supervisor() -> (
        Supervisor,
        AgentView,
        CancellationToken,
        mpsc::Receiver<Update>,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let view = AgentView::default();
        let supervisor = Supervisor {
            options: AgentOptions::new("/nonexistent/agent.yaml", "n1"),
            trust_domain: TrustDomain::new("mesh.test").unwrap(),
            updates: tx,
            view: view.clone(),
            registry: Arc::new(ClusterRegistry::default()),
            running: BTreeMap::new(),
            client: None,
            cancel: cancel.clone(),
        };
        (supervisor, view, cancel, rx)
    }

    /// On a single-threaded runtime the spawned watchers have not run when
    /// `sync_watchers` returns; the status board must list every cluster already.
    #[tokio::test(flavor = "current_thread")]
    async fn every_configured_cluster_is_on_the_board_before_its_watcher_runs() {
        let config = AgentConfig {
            local_cluster: "east".into(),
            mode: clustermesh_api::agent_config::WatchMode::Direct,
            trust_domain: "mesh.test".into(),
            cert_file: "/nonexistent/client.crt".into(),
            key_file: "/nonexistent/client.key".into(),
            clusters: vec![entry("east"), entry("west"), entry("north")],
        };
        let (supervisor, view, cancel, _rx) = test_supervisor();
        let mut supervisor = supervisor;
        supervisor.sync_watchers(&config).await;
        let board: Vec<(String, bool)> = view
            .clusters
            .snapshot()
            .into_iter()
            .map(|s| (s.name, s.synced))
            .collect();
        assert_eq!(
            board,
            [
                ("east".to_owned(), false),
                ("north".to_owned(), false),
                ("west".to_owned(), false)
            ]
        );
        cancel.cancel();
        for (name, w) in std::mem::take(&mut supervisor.running) {
            w.stop(&name, &view.clusters).await;
        }
    }

    /// Mirror mode: one watcher, of the local cluster (its server brings every cluster),
    /// while every configured cluster is on the board for the initial-sync gate.
    #[tokio::test(flavor = "current_thread")]
    async fn mirror_mode_runs_one_watcher_of_the_local_cluster() {
        let config = AgentConfig {
            local_cluster: "east".into(),
            mode: WatchMode::Mirror,
            trust_domain: "mesh.test".into(),
            cert_file: "/nonexistent/client.crt".into(),
            key_file: "/nonexistent/client.key".into(),
            clusters: vec![entry("east"), entry("west")],
        };
        let (supervisor, view, cancel, _rx) = test_supervisor();
        let mut supervisor = supervisor;
        supervisor.sync_watchers(&config).await;
        assert_eq!(
            supervisor.running.keys().collect::<Vec<_>>(),
            ["east"],
            "one stream, to our own server"
        );
        let board: Vec<String> = view
            .clusters
            .snapshot()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(board, ["east", "west"]);
        cancel.cancel();
        for (name, w) in std::mem::take(&mut supervisor.running) {
            w.stop(&name, &view.clusters).await;
        }
    }
}
