//! Wiring: source → exporter → store → cache → gRPC, plus the operations endpoint.
//!
//! [`run`] owns every task of an API server and stops them all when its shutdown token
//! is cancelled (SIGTERM in the binary), waiting for in-flight gRPC streams to close.

use std::sync::Arc;
use std::time::Duration;

use clustermesh_certs::transport::{incoming, IncomingConfig};
use clustermesh_certs::TlsSource;
use clustermesh_store::Store;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, CacheConfig};
use crate::export::{ExportConfig, ExportError, Exporter};
use crate::grpc::{AccessPolicy, MeshApiService, ServiceConfig};
use crate::http::{self, OpsState, Readiness};
use crate::metrics::Metrics;
use crate::mirror::{self, MirrorConfig, MirrorStatus};
use crate::peer_view::PodExport;
use crate::source::{Source, SourceError};

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
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The exporter could not start.
    #[error(transparent)]
    Export(#[from] ExportError),
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

/// Runs the API server until `shutdown` is cancelled.
///
/// The operations endpoint starts first; then the exporter loads the store, and while the
/// store cannot answer (a raft replica without quorum, an unreachable etcd) the server waits
/// with backoff, reporting the reason on `/readyz`, instead of giving up.
///
/// # Errors
/// [`ServerError`] when start-up fails, the source fails or the gRPC server dies.
pub async fn run(
    store: Arc<dyn Store>,
    source: Box<dyn Source>,
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

    let started = start_exporter(&store, &options.export, &metrics, &readiness, &shutdown).await;
    let exporter = match started {
        Ok(Some(exporter)) => exporter,
        Ok(None) => {
            while tasks.join_next().await.is_some() {}
            return Ok(());
        }
        Err(error) => {
            shutdown.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(error.into());
        }
    };
    let mut synced = exporter.ready();
    readiness.send_replace(Readiness::Syncing);
    let readiness_shutdown = shutdown.clone();
    tasks.spawn(async move {
        loop {
            let state = if *synced.borrow_and_update() {
                Readiness::Synced
            } else {
                Readiness::Syncing
            };
            readiness.send_replace(state);
            tokio::select! {
                () = readiness_shutdown.cancelled() => return,
                changed = synced.changed() => if changed.is_err() { return },
            }
        }
    });

    let cache = Arc::new(Cache::with_export(
        options.export.cluster.clone(),
        options.cache,
        Arc::clone(&metrics),
        options.export_pods,
    ));
    tasks.spawn(Arc::clone(&cache).run(Arc::clone(&store), shutdown.clone()));

    let (tx, rx) = mpsc::channel(1024);
    let source_shutdown = shutdown.clone();
    let (source_error_tx, source_error) = oneshot::channel();
    tasks.spawn(async move {
        if let Err(error) = source.run(tx, source_shutdown.clone()).await {
            tracing::error!(%error, "source failed; the API server stops");
            let _ = source_error_tx.send(error);
            source_shutdown.cancel();
        }
    });
    tasks.spawn(exporter.run(rx, shutdown.clone()));
    let mirror_status = options.mirror.as_ref().map(|_| MirrorStatus::default());
    if let (Some(mirror_config), Some(status)) = (options.mirror, &mirror_status) {
        tasks.spawn(mirror::run(
            Arc::clone(&store),
            mirror_config,
            Arc::clone(&metrics),
            status.clone(),
            shutdown.clone(),
        ));
    }

    let service = MeshApiService::new(
        Arc::clone(&cache),
        ServiceConfig {
            cluster_config,
            policy: options.policy,
            stream_buffer: options.stream_buffer,
        },
        Arc::clone(&metrics),
    )
    .with_shutdown(shutdown.clone());
    let service = match mirror_status {
        Some(status) => service.with_mirror(status),
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
    match source_error.await {
        Ok(error) => Err(ServerError::Source(error)),
        Err(_) => Ok(()),
    }
}

/// Starts the exporter, retrying with doubling pauses while the store is unavailable;
/// `None` when `shutdown` came first.
async fn start_exporter(
    store: &Arc<dyn Store>,
    config: &ExportConfig,
    metrics: &Arc<Metrics>,
    readiness: &watch::Sender<Readiness>,
    shutdown: &CancellationToken,
) -> Result<Option<Exporter>, ExportError> {
    let mut pause = STORE_BACKOFF.0;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = Exporter::start(Arc::clone(store), config.clone(), Arc::clone(metrics));
        let error = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            started = attempt => match started {
                Ok(exporter) => {
                    if attempts > 1 {
                        tracing::info!(attempts, "the store answers; starting to serve");
                    }
                    return Ok(Some(exporter));
                }
                Err(error) => match error.store_unavailable() {
                    Some(cause) => cause.to_string(),
                    None => return Err(error),
                },
            },
        };
        // One line per attempt; attempts are at least as far apart as the store's own
        // timeout, so a replica waiting for its peers logs every few seconds at most.
        tracing::warn!(attempts, %error, retry_in = ?pause, "waiting for the store");
        readiness.send_replace(Readiness::WaitingForStore(Some(error)));
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
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
