//! Wiring: source → exporter → store → cache → gRPC, plus the operations endpoint and the
//! leader election.
//!
//! [`run`] owns every task of an API server and stops them all when its shutdown token
//! is cancelled (SIGTERM in the binary), waiting for in-flight gRPC streams to close.
//!
//! Every replica runs the cache and the gRPC service. The writers — the source feeding the
//! exporter, and the peer mirror — run only while the replica leads ([`crate::leader`]):
//! each won term starts them afresh (a new source, an exporter that loads the store and
//! writes only differences, so a new leader does not touch unchanged records) on a
//! [`FencedStore`], and they are stopped when the term ends. A single replica wins at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_certs::transport::{incoming, IncomingConfig};
use clustermesh_certs::TlsSource;
use clustermesh_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, CacheConfig};
use crate::export::{ExportConfig, ExportError, Exporter};
use crate::grpc::{AccessPolicy, MeshApiService, ServiceConfig};
use crate::http::{self, OpsState, Readiness};
use crate::leader::{Election, ElectionConfig, FencedStore, LeaderState, Term};
use crate::metrics::Metrics;
use crate::mirror::{self, MirrorConfig, MirrorStatus};
use crate::peer_view::PodExport;
use crate::source::{Source, SourceError};

/// Makes a fresh source for each leader term (each term's exporter starts with a full
/// initial sync, so it needs a source that reports everything from the start).
pub type SourceFactory = Arc<dyn Fn() -> Box<dyn Source> + Send + Sync>;

/// Everything [`run`] needs besides the store and the source.
#[derive(Debug)]
pub struct ServerOptions {
    /// Cluster identity and export tuning.
    pub export: ExportConfig,
    /// Cache bounds.
    pub cache: CacheConfig,
    /// Which pods' identities and endpoints peers are served.
    pub export_pods: PodExport,
    /// Authorization.
    pub policy: AccessPolicy,
    /// Bound gRPC listener.
    pub grpc_listener: TcpListener,
    /// Server TLS (fixed or hot-reloading).
    pub tls: Arc<dyn TlsSource>,
    /// Bound operations (health, metrics) listener, if any.
    pub ops_listener: Option<TcpListener>,
    /// Messages buffered per Watch stream.
    pub stream_buffer: usize,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// Mirror the connected peers into the store ([`crate::mirror`]); `None`: off.
    pub mirror: Option<MirrorConfig>,
    /// This replica's part in the election of the cluster's writer.
    pub election: ElectionConfig,
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The exporter could not start.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The store failed in a way waiting cannot mend.
    #[error("the store failed")]
    Store(#[source] StoreError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The source stopped with an error (the server stops with it, so that the process
    /// exits non-zero and its supervisor restarts it).
    #[error("the source stopped")]
    Source(#[source] SourceError),
}

/// First and largest pause between attempts to reach the store at start-up.
const STORE_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(10));

/// Where this replica's writers are, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WriterPhase {
    /// Not leading.
    Idle,
    /// Leading; the exporter waits for the store (the last error).
    WaitingForStore(Option<String>),
    /// Leading; the initial sync is not exported yet.
    Syncing,
    /// Leading; every kind is synced and exported.
    Synced,
}

/// What a leader term needs to start the writers.
struct Writers {
    store: Arc<dyn Store>,
    source: SourceFactory,
    export: ExportConfig,
    mirror: Option<MirrorConfig>,
    /// What the mirror of the current term reports (`Status`); empty between terms.
    mirror_status: Option<MirrorStatus>,
    metrics: Arc<Metrics>,
    phase: watch::Sender<WriterPhase>,
    /// The error that stops the server, set before `shutdown` is cancelled.
    fatal: Mutex<Option<ServerError>>,
    shutdown: CancellationToken,
}

impl Writers {
    /// Stops the server with `error`.
    fn fail(&self, error: ServerError) {
        self.fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
        self.shutdown.cancel();
    }

    /// Runs the writers of one term until it ends.
    async fn run(self: Arc<Self>, term: Term) {
        let stop = term.ended().clone();
        let store: Arc<dyn Store> = Arc::new(FencedStore::new(
            Arc::clone(&self.store),
            term,
            Arc::clone(&self.metrics),
        ));
        let exporter =
            match start_exporter(&store, &self.export, &self.metrics, &self.phase, &stop).await {
                Ok(Some(exporter)) => exporter,
                Ok(None) => {
                    self.phase.send_replace(WriterPhase::Idle);
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "the exporter cannot start; the API server stops");
                    self.fail(error.into());
                    self.phase.send_replace(WriterPhase::Idle);
                    return;
                }
            };
        let mut synced = exporter.ready();
        let mut tasks = tokio::task::JoinSet::new();
        let (tx, rx) = mpsc::channel(1024);
        let source = (self.source)();
        let source_stop = stop.clone();
        let this = Arc::clone(&self);
        tasks.spawn(async move {
            if let Err(error) = source.run(tx, source_stop).await {
                tracing::error!(%error, "source failed; the API server stops");
                this.fail(ServerError::Source(error));
            }
        });
        tasks.spawn(exporter.run(rx, stop.clone()));
        if let (Some(config), Some(status)) = (self.mirror.clone(), self.mirror_status.clone()) {
            tasks.spawn(mirror::run(
                Arc::clone(&store),
                config,
                Arc::clone(&self.metrics),
                status,
                stop.clone(),
            ));
        }
        loop {
            let phase = if *synced.borrow_and_update() {
                WriterPhase::Synced
            } else {
                WriterPhase::Syncing
            };
            self.phase.send_replace(phase);
            tokio::select! {
                () = stop.cancelled() => break,
                changed = synced.changed() => if changed.is_err() { break },
            }
        }
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        self.phase.send_replace(WriterPhase::Idle);
    }
}

/// Runs the API server until `shutdown` is cancelled.
///
/// The operations endpoint starts first; while the store cannot answer (a raft replica
/// without quorum, an unreachable etcd) the server waits with backoff, reporting the
/// reason on `/readyz`, instead of giving up. Then the cache, the gRPC service and the
/// leader election start; the writers run while this replica leads (see the module docs).
///
/// # Errors
/// [`ServerError`] when start-up fails, the source fails or the gRPC server dies.
pub async fn run(
    store: Arc<dyn Store>,
    source: SourceFactory,
    options: ServerOptions,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let metrics = options.metrics;
    let cluster_config = options.export.cluster_config();
    let (readiness, readiness_rx) = watch::channel(Readiness::WaitingForStore(None));
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = options.ops_listener {
        let state = OpsState {
            metrics: Arc::clone(&metrics),
            store: Arc::clone(&store),
            readiness: readiness_rx,
            problems: options.export.problems.clone(),
        };
        let ops_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = http::serve(listener, state, ops_shutdown).await {
                tracing::error!(%error, "operations endpoint failed");
            }
        });
    }

    match wait_for_store(&store, &readiness, &shutdown).await {
        Ok(true) => {}
        Ok(false) => {
            while tasks.join_next().await.is_some() {}
            return Ok(());
        }
        Err(error) => {
            shutdown.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(ServerError::Store(error));
        }
    }

    let cache = Arc::new(Cache::with_export(
        options.export.cluster.clone(),
        options.cache,
        Arc::clone(&metrics),
        options.export_pods,
    ));
    tasks.spawn(Arc::clone(&cache).run(Arc::clone(&store), shutdown.clone()));

    let election = Election::new(Arc::clone(&store), options.election, Arc::clone(&metrics));
    let leader_status = election.status();
    let (phase, phase_rx) = watch::channel(WriterPhase::Idle);
    tasks.spawn(track_readiness(
        readiness,
        election.status().subscribe(),
        phase_rx,
        Arc::clone(&cache),
        shutdown.clone(),
    ));
    let writers = Arc::new(Writers {
        store: Arc::clone(&store),
        source,
        export: options.export,
        mirror_status: options.mirror.as_ref().map(|_| MirrorStatus::default()),
        mirror: options.mirror,
        metrics: Arc::clone(&metrics),
        phase,
        fatal: Mutex::new(None),
        shutdown: shutdown.clone(),
    });
    let term_writers = Arc::clone(&writers);
    tasks.spawn(election.run(shutdown.clone(), move |term| {
        Arc::clone(&term_writers).run(term)
    }));

    let service = MeshApiService::new(
        Arc::clone(&cache),
        ServiceConfig {
            cluster_config,
            policy: options.policy,
            stream_buffer: options.stream_buffer,
        },
        Arc::clone(&metrics),
    )
    .with_shutdown(shutdown.clone())
    .with_leader_status(leader_status);
    let service = match &writers.mirror_status {
        Some(status) => service.with_mirror(status.clone()),
        None => service,
    };
    let result = serve_grpc_with(
        service,
        options.grpc_listener,
        options.tls,
        IncomingConfig::default().observer(metrics),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    tracing::info!("API server stopped");
    result.map_err(ServerError::from)?;
    let fatal = writers
        .fatal
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    match fatal {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Waits until the store answers, with doubling pauses while it is unavailable; false
/// when `shutdown` came first.
async fn wait_for_store(
    store: &Arc<dyn Store>,
    readiness: &watch::Sender<Readiness>,
    shutdown: &CancellationToken,
) -> Result<bool, StoreError> {
    let mut pause = STORE_BACKOFF.0;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            answer = store.current_revision() => match answer {
                Ok(_) => {
                    if attempts > 1 {
                        tracing::info!(attempts, "the store answers; starting to serve");
                    }
                    return Ok(true);
                }
                Err(StoreError::Unavailable(cause)) => StoreError::Unavailable(cause).to_string(),
                Err(error) => return Err(error),
            },
        };
        // One line per attempt; attempts are at least as far apart as the store's own
        // timeout, so a replica waiting for its peers logs every few seconds at most.
        tracing::warn!(attempts, %error, retry_in = ?pause, "waiting for the store");
        readiness.send_replace(Readiness::WaitingForStore(Some(error)));
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(STORE_BACKOFF.1);
    }
}

/// Keeps `/readyz` in line with the election, the writers and the cache.
async fn track_readiness(
    readiness: watch::Sender<Readiness>,
    mut leader: watch::Receiver<LeaderState>,
    mut phase: watch::Receiver<WriterPhase>,
    cache: Arc<Cache>,
    shutdown: CancellationToken,
) {
    let mut loaded = false;
    let mut ever_ready = false;
    let cache_loaded = cache.wait_loaded();
    tokio::pin!(cache_loaded);
    loop {
        let state = readiness_of(
            &leader.borrow_and_update(),
            &phase.borrow_and_update(),
            loaded,
            ever_ready,
        );
        ever_ready |= state.is_ready();
        readiness.send_if_modified(|r| {
            let changed = *r != state;
            *r = state;
            changed
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = &mut cache_loaded, if !loaded => loaded = true,
            changed = leader.changed() => if changed.is_err() { return },
            changed = phase.changed() => if changed.is_err() { return },
        }
    }
}

/// The readiness of a replica: a leader once its exporter has synced (or at once, if it
/// served before: its cache holds the previous leader's records); a follower once its
/// cache has loaded the store.
fn readiness_of(
    leader: &LeaderState,
    phase: &WriterPhase,
    cache_loaded: bool,
    ever_ready: bool,
) -> Readiness {
    let served = ever_ready && cache_loaded;
    if leader.is_leader {
        return match phase {
            WriterPhase::Synced => Readiness::Synced,
            _ if served => Readiness::TakingOver,
            WriterPhase::WaitingForStore(error) => Readiness::WaitingForStore(error.clone()),
            WriterPhase::Idle | WriterPhase::Syncing => Readiness::Syncing,
        };
    }
    if !cache_loaded {
        return Readiness::Syncing;
    }
    match (&leader.holder, &leader.problem) {
        (Some(holder), _) => Readiness::Following(Some(holder.clone())),
        _ if served => Readiness::Following(None),
        (None, Some(problem)) => Readiness::WaitingForStore(Some(problem.clone())),
        (None, None) => Readiness::Syncing,
    }
}

/// Starts the exporter, retrying with doubling pauses while the store is unavailable;
/// `None` when `stop` came first.
async fn start_exporter(
    store: &Arc<dyn Store>,
    config: &ExportConfig,
    metrics: &Arc<Metrics>,
    phase: &watch::Sender<WriterPhase>,
    stop: &CancellationToken,
) -> Result<Option<Exporter>, ExportError> {
    let mut pause = STORE_BACKOFF.0;
    let mut attempts = 0u32;
    phase.send_replace(WriterPhase::Syncing);
    loop {
        attempts += 1;
        let attempt = Exporter::start(Arc::clone(store), config.clone(), Arc::clone(metrics));
        let error = tokio::select! {
            () = stop.cancelled() => return Ok(None),
            started = attempt => match started {
                Ok(exporter) => {
                    if attempts > 1 {
                        tracing::info!(attempts, "the store answers; the exporter starts");
                    }
                    return Ok(Some(exporter));
                }
                Err(error) => match error.store_unavailable() {
                    Some(cause) => cause.to_string(),
                    None => return Err(error),
                },
            },
        };
        tracing::warn!(attempts, %error, retry_in = ?pause, "exporter waiting for the store");
        phase.send_replace(WriterPhase::WaitingForStore(Some(error)));
        tokio::select! {
            () = stop.cancelled() => return Ok(None),
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(STORE_BACKOFF.1);
    }
}

/// Serves `service` over mTLS on `listener` until `shutdown` is cancelled, with the
/// default accept loop tuning and no handshake metrics.
///
/// # Errors
/// The transport error that stopped the server.
pub async fn serve_grpc(
    service: MeshApiService,
    listener: TcpListener,
    tls: Arc<dyn TlsSource>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    serve_grpc_with(service, listener, tls, IncomingConfig::default(), shutdown).await
}

/// Serves `service` over mTLS on `listener` until `shutdown` is cancelled, accepting
/// connections as `incoming_config` says: handshake timeout, caps of handshakes in
/// flight (per source address and in total), and the observer that counts handshake
/// outcomes ([`Metrics`] in [`run`]).
///
/// # Errors
/// The transport error that stopped the server.
pub async fn serve_grpc_with(
    service: MeshApiService,
    listener: TcpListener,
    tls: Arc<dyn TlsSource>,
    incoming_config: IncomingConfig,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let local = listener.local_addr().ok();
    let incoming = incoming(listener, tls, incoming_config);
    tracing::info!(listen = ?local, "mesh API serving");
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(is_leader: bool, holder: Option<&str>, problem: Option<&str>) -> LeaderState {
        LeaderState {
            is_leader,
            holder: holder.map(str::to_owned),
            token: 7,
            terms_won: 0,
            problem: problem.map(str::to_owned),
        }
    }

    #[test]
    fn readiness_follows_the_role() {
        let err = Some("store unavailable: x".to_owned());
        let cases = [
            // (leader state, writers, cache loaded, ever ready) → readiness
            (
                leader(true, Some("r1"), None),
                WriterPhase::Syncing,
                true,
                false,
                Readiness::Syncing,
            ),
            (
                leader(true, Some("r1"), None),
                WriterPhase::WaitingForStore(err.clone()),
                false,
                false,
                Readiness::WaitingForStore(err.clone()),
            ),
            (
                leader(true, Some("r1"), None),
                WriterPhase::Synced,
                true,
                false,
                Readiness::Synced,
            ),
            // A follower that wins keeps serving while its exporter syncs.
            (
                leader(true, Some("r1"), None),
                WriterPhase::Syncing,
                true,
                true,
                Readiness::TakingOver,
            ),
            (
                leader(false, Some("r2"), None),
                WriterPhase::Idle,
                false,
                false,
                Readiness::Syncing,
            ),
            (
                leader(false, Some("r2"), None),
                WriterPhase::Idle,
                true,
                false,
                Readiness::Following(Some("r2".to_owned())),
            ),
            // Between two leaders: still ready once it served.
            (
                leader(false, None, None),
                WriterPhase::Idle,
                true,
                true,
                Readiness::Following(None),
            ),
            (
                leader(false, None, None),
                WriterPhase::Idle,
                true,
                false,
                Readiness::Syncing,
            ),
            (
                leader(false, None, err.as_deref()),
                WriterPhase::Idle,
                true,
                false,
                Readiness::WaitingForStore(err.clone()),
            ),
        ];
        for (state, phase, loaded, ever, want) in cases {
            assert_eq!(
                readiness_of(&state, &phase, loaded, ever),
                want,
                "{state:?} {phase:?} loaded={loaded} ever_ready={ever}"
            );
        }
    }
}
