//! The clustermesh API server: reads one cluster's Kubernetes state, keeps its records in
//! the store, and serves them to every other cluster over the mTLS gRPC mesh API.
//!
//! ```text
//! source (kubernetes | dir:PATH) ─> state (translate) ─> export ─> Store
//!                                                                   │ one watch
//!                              gRPC MeshApi (mTLS, authz) <─ cache <┘
//! ```
//!
//! - [`source`]: where Kubernetes objects come from ([`source::Source`]).
//! - [`translate`] and [`state`]: objects → records, incrementally.
//! - [`identity`]: numeric identities by compare-and-swap.
//! - [`export`]: minimal writes, synced markers.
//! - [`cache`]: the fan-out cache every watcher reads.
//! - [`peer_view`]: what other clusters may see (export rules).
//! - [`grpc`]: the `MeshApi` service and its authorization.
//! - [`mirror`]: connected peers' records copied into the store.
//! - [`leader`]: which replica writes (election with fencing); all serve Watch.
//! - [`http`] and [`metrics`]: health, readiness, Prometheus.
//! - [`server`]: wiring and graceful shutdown.
#![forbid(unsafe_code)]

pub mod cache;
pub mod export;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod mirror;
pub mod peer_view;
pub mod server;
pub mod source;
pub mod state;
pub mod translate;

/// Runs a store operation and records its latency under `op`.
pub(crate) async fn timed<T>(
    metrics: &metrics::Metrics,
    op: &str,
    operation: impl std::future::Future<Output = T>,
) -> T {
    let start = std::time::Instant::now();
    let result = operation.await;
    metrics.store_op(op, start.elapsed());
    result
}
