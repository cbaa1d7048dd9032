//! The optional TCP HTTP endpoint (`--http-listen`): what Prometheus scrapes and what
//! `clustermesh status` reads through the Kubernetes API server's pod proxy, where the
//! admin unix socket cannot be reached.
//!
//! | request          | response |
//! |------------------|----------|
//! | `GET /metrics`   | Prometheus text (the same registry as the admin socket) |
//! | `GET /healthz`   | `ok` while the agent runs |
//! | `GET /v1/status` | [`admin::StatusBody`], the same JSON as the admin socket |
//!
//! Read-only on purpose: services and datapath dumps stay on the local admin socket.

use std::net::SocketAddr;

use axum::http::header;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::runtime::AgentView;

/// Content type of the metrics body (prometheus-client writes OpenMetrics text).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Errors starting the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address cannot be bound.
    #[error(
        "cannot listen on {addr} (--http-listen): {error}; pick a free port or another address"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// The HTTP endpoint's routes.
pub fn router(view: AgentView) -> Router {
    let for_status = view.clone();
    let for_metrics = view;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/v1/status",
            get(move || async move { admin::json(&admin::status(&for_status)) }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                    for_metrics.metrics.render(),
                )
            }),
        )
}

/// Binds `addr` (so a taken port fails the agent at startup, not later).
///
/// # Errors
/// [`HttpError::Bind`] naming the address.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| HttpError::Bind { addr, error })
}

/// Serves the endpoint on `listener` until `cancel`.
pub async fn serve(listener: tokio::net::TcpListener, view: AgentView, cancel: CancellationToken) {
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "HTTP endpoint listening (/metrics, /healthz, /v1/status)");
    let result = axum::serve(listener, router(view))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One real HTTP/1.1 GET over TCP; returns (status line, body).
    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_status_metrics_and_health_over_tcp() {
        let view = AgentView {
            node: "node-a".into(),
            local_cluster: "east".into(),
            ..AgentView::default()
        };
        view.metrics.decode_error("west");
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, view.clone(), cancel.clone()));

        let (line, body) = get(addr, "/v1/status").await;
        assert_eq!(line, "HTTP/1.1 200 OK");
        let got: serde_json::Value = serde_json::from_str(&body).unwrap();
        // Exactly what the admin socket serves.
        assert_eq!(got, serde_json::to_value(admin::status(&view)).unwrap());
        assert_eq!(got["node"], "node-a");
        assert_eq!(got["local_cluster"], "east");

        let (line, body) = get(addr, "/metrics").await;
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert!(
            body.contains("clustermesh_agent_record_decode_errors_total{cluster=\"west\"} 1"),
            "{body}"
        );

        assert_eq!(
            get(addr, "/healthz").await,
            ("HTTP/1.1 200 OK".to_owned(), "ok\n".to_owned())
        );
        // Nothing else is exposed on the network.
        assert_eq!(get(addr, "/v1/services").await.0, "HTTP/1.1 404 Not Found");

        cancel.cancel();
        task.await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on {addr} (--http-listen): ")),
            "{err}"
        );
    }
}
