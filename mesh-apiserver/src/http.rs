//! The plain-HTTP operations endpoint: `/healthz`, `/readyz`, `/metrics`.
//!
//! Kept on its own port and without TLS so kubelet probes and Prometheus can reach it
//! without mesh certificates; it exposes no records.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clustermesh_store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct OpsState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Store to probe for `/readyz`.
    pub store: Arc<dyn Store>,
    /// Turns true once the initial sync of every kind is exported.
    pub synced: watch::Receiver<bool>,
}

impl std::fmt::Debug for OpsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsState")
            .field("synced", &*self.synced.borrow())
            .finish_non_exhaustive()
    }
}

/// The router (exposed for tests).
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    if !*state.synced.borrow() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "initial sync not complete\n".to_owned(),
        );
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.current_revision()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {error}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store did not answer within 2s\n".to_owned(),
        ),
    }
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Serves the endpoint on `listener` until `shutdown`.
///
/// # Errors
/// The I/O error that stopped the server.
pub async fn serve(
    listener: TcpListener,
    state: OpsState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
