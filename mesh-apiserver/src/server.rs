//! Wiring: source → exporter → store → cache → gRPC, plus the operations endpoint.
//!
//! [`run`] owns every task of an API server and stops them all when its shutdown token
//! is cancelled (SIGTERM in the binary), waiting for in-flight gRPC streams to close.

use std::sync::Arc;

use clustermesh_certs::transport::{incoming, IncomingConfig};
use clustermesh_certs::TlsSource;
use clustermesh_store::Store;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, CacheConfig};
use crate::export::{ExportConfig, ExportError, Exporter};
use crate::grpc::{AccessPolicy, MeshApiService, ServiceConfig};
use crate::http::{self, OpsState};
use crate::metrics::Metrics;
use crate::source::Source;

/// Everything [`run`] needs besides the store and the source.
#[derive(Debug)]
pub struct ServerOptions {
    /// Cluster identity and export tuning.
    pub export: ExportConfig,
    /// Cache bounds.
    pub cache: CacheConfig,
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
}

/// Runs the API server until `shutdown` is cancelled.
///
/// # Errors
/// [`ServerError`] when start-up fails or the gRPC server dies.
pub async fn run(
    store: Arc<dyn Store>,
    source: Box<dyn Source>,
    options: ServerOptions,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let metrics = options.metrics;
    let cluster_config = options.export.cluster_config();
    let exporter = Exporter::start(
        Arc::clone(&store),
        options.export.clone(),
        Arc::clone(&metrics),
    )
    .await?;
    let synced = exporter.ready();

    let cache = Arc::new(Cache::new(
        options.export.cluster.clone(),
        options.cache,
        Arc::clone(&metrics),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Arc::clone(&cache).run(Arc::clone(&store), shutdown.clone()));

    let (tx, rx) = mpsc::channel(1024);
    let source_shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(error) = source.run(tx, source_shutdown.clone()).await {
            tracing::error!(%error, "source failed; the API server stops");
            source_shutdown.cancel();
        }
    });
    tasks.spawn(exporter.run(rx, shutdown.clone()));

    if let Some(listener) = options.ops_listener {
        let state = OpsState {
            metrics: Arc::clone(&metrics),
            store: Arc::clone(&store),
            synced,
        };
        let ops_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(error) = http::serve(listener, state, ops_shutdown).await {
                tracing::error!(%error, "operations endpoint failed");
            }
        });
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
    result.map_err(ServerError::from)
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
