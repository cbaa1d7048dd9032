//! The plain-HTTP operations endpoint: `/healthz`, `/readyz`, `/statusz`, `/metrics`.
//!
//! Kept on its own port and without TLS so kubelet probes and Prometheus can reach it
//! without mesh certificates; it exposes no records. It is started before anything else
//! of the server, so that while the server waits for its store (a raft replica whose peers
//! are still down) `/readyz` already answers "not ready" with the reason.

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

use crate::export::ExportProblems;
use crate::metrics::Metrics;

/// Where the server is on its way to serving, as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The store has not answered yet (no raft quorum, etcd unreachable); the last
    /// error, if an attempt failed already.
    WaitingForStore(Option<String>),
    /// The exporter runs; the initial sync of some kind is not exported yet (or, on a
    /// follower, its cache has not loaded the store yet).
    Syncing,
    /// This replica leads: every kind is synced and exported.
    Synced,
    /// Another replica leads (named, when known): this one serves Watch from its loaded
    /// cache.
    Following(Option<String>),
    /// This replica has just won the election and runs its initial sync; it served before
    /// and its cache holds the previous leader's complete records, so it stays ready.
    TakingOver,
}

impl Readiness {
    /// Whether `/readyz` may answer "ready" (the store is probed too).
    #[must_use]
    pub fn is_ready(&self) -> bool {
        matches!(
            self,
            Readiness::Synced | Readiness::Following(_) | Readiness::TakingOver
        )
    }
}

/// What the endpoint reports on.
#[derive(Clone)]
pub struct OpsState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Store to probe for `/readyz`.
    pub store: Arc<dyn Store>,
    /// Start-up progress (see [`Readiness`]).
    pub readiness: watch::Receiver<Readiness>,
    /// Records the exporter could not write, for `/statusz`.
    pub problems: ExportProblems,
}

impl std::fmt::Debug for OpsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsState")
            .field("readiness", &*self.readiness.borrow())
            .finish_non_exhaustive()
    }
}

/// The router (exposed for tests).
pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/statusz", get(statusz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    let not_ready = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"));
    let readiness = state.readiness.borrow().clone();
    match readiness {
        Readiness::WaitingForStore(None) => {
            return not_ready("waiting for the store to answer".to_owned())
        }
        Readiness::WaitingForStore(Some(error)) => {
            return not_ready(format!("waiting for the store: {error}"))
        }
        Readiness::Syncing => return not_ready("initial sync not complete".to_owned()),
        Readiness::Synced | Readiness::Following(_) | Readiness::TakingOver => {}
    }
    match tokio::time::timeout(Duration::from_secs(2), state.store.current_revision()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n".to_owned()),
        // The store error names itself ("store unavailable: …"); no prefix of our own.
        Ok(Err(error)) => not_ready(error.to_string()),
        Err(_) => not_ready("store did not answer within 2s".to_owned()),
    }
}

/// One line per record the exporter cannot write (or "no problems").
async fn statusz(State(state): State<OpsState>) -> impl IntoResponse {
    let lines = state.problems.lines();
    if lines.is_empty() {
        return "no export problems\n".to_owned();
    }
    let mut out = String::new();
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    out
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
