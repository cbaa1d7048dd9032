//! The optional TCP HTTP endpoint (`--http-listen`): what Prometheus scrapes and what
//! `clustermesh status` reads through the Kubernetes API server's pod proxy, where the
//! admin unix socket cannot be reached.
//!
//! | request            | response |
//! |--------------------|----------|
//! | `GET /metrics`     | Prometheus text (the same registry as the admin socket) |
//! | `GET /healthz`     | `ok` while the agent runs |
//! | `GET /v1/status`   | [`admin::AgentStatus`], the same JSON as the admin socket |
//! | `GET /v1/services` | list of [`admin::ServiceStatus`], the same JSON as the admin socket |
//! | `GET /v1/bpf/lb`   | the datapath dump, as on the admin socket (503 with `--datapath record`) |
//!
//! Read-only: every route is the admin socket's own handler (`clustermesh service list`
//! and `bpf lb list` read them through the pod proxy in Kubernetes mode); nothing here
//! changes the agent.

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::runtime::AgentView;

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

/// The HTTP endpoint's routes: the admin API's read-only routes plus `/healthz`.
pub fn router(view: AgentView, bpf: Option<admin::BpfDumpHook>) -> Router {
    admin::router(view, bpf).route("/healthz", get(|| async { "ok\n" }))
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
pub async fn serve(
    listener: tokio::net::TcpListener,
    view: AgentView,
    bpf: Option<admin::BpfDumpHook>,
    cancel: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    tracing::info!(
        addr = ?addr,
        "HTTP endpoint listening (/metrics, /healthz, /v1/status, /v1/services, /v1/bpf/lb)"
    );
    admin::serve_until_cancelled(listener, router(view, bpf), cancel, "HTTP endpoint").await;
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

    /// A view with one computed service (two ports) and one watched cluster.
    fn view_with_a_service() -> AgentView {
        use crate::datapath::Protocol;
        use crate::desired::DesiredState;
        use crate::maglev::Maglev;
        use crate::merge::Locality;
        use crate::records::{Affinity, BackendRecord, PortSpec, ServiceName, ServiceRecord};

        let port = |name: &str, port: u16, protocol| PortSpec {
            name: name.into(),
            port,
            protocol,
        };
        let mut desired = DesiredState::new(
            Locality {
                cluster: "east".into(),
                node: "node-a".into(),
                zone: String::new(),
            },
            Maglev::default(),
        );
        desired.upsert(ServiceRecord {
            cluster: "east".into(),
            name: ServiceName {
                namespace: "default".into(),
                name: "echo".into(),
            },
            frontends: vec!["10.96.0.20".parse().unwrap()],
            ports: vec![port("http", 80, Protocol::Tcp)],
            backends: vec![BackendRecord {
                ip: "10.1.0.7".parse().unwrap(),
                ports: vec![port("http", 8080, Protocol::Tcp)],
                ready: true,
                terminating: false,
                node: "node-a".into(),
                zone: String::new(),
                weight: 1,
            }],
            global: true,
            shared: true,
            affinity: Affinity::Local,
            topology_aware: false,
        });
        desired.compute();
        let view = AgentView {
            node: "node-a".into(),
            local_cluster: "east".into(),
            ..AgentView::default()
        };
        *view.services.write().unwrap() = std::sync::Arc::new(desired.services().clone());
        view
    }

    #[tokio::test]
    async fn serves_the_admin_read_routes_and_health_over_tcp() {
        let view = view_with_a_service();
        view.metrics.decode_error("west");
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, view.clone(), None, cancel.clone()));

        let (line, body) = get(addr, "/v1/status").await;
        assert_eq!(line, "HTTP/1.1 200 OK");
        let got: serde_json::Value = serde_json::from_str(&body).unwrap();
        // Exactly what the admin socket serves.
        assert_eq!(got, serde_json::to_value(admin::status(&view)).unwrap());
        assert_eq!(got["node"], "node-a");
        assert_eq!(got["local_cluster"], "east");
        assert_eq!(got["services"], 1);

        let (line, body) = get(addr, "/v1/services").await;
        assert_eq!(line, "HTTP/1.1 200 OK");
        let got: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(got, serde_json::to_value(admin::services(&view)).unwrap());
        assert_eq!(got[0]["name"], "echo");
        assert_eq!(
            got[0]["frontends"],
            serde_json::json!(["10.96.0.20:80/TCP"])
        );
        assert_eq!(got[0]["backends"][0]["address"], "10.1.0.7:8080");

        // An agent without the eBPF datapath (--datapath record) says so.
        let (line, body) = get(addr, "/v1/bpf/lb").await;
        assert_eq!(line, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(body, "this agent runs without the eBPF datapath");

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
        assert_eq!(get(addr, "/v1/config").await.0, "HTTP/1.1 404 Not Found");

        cancel.cancel();
        task.await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn the_datapath_dump_is_served_when_the_agent_has_one() {
        let hook: admin::BpfDumpHook =
            std::sync::Arc::new(|| Ok(serde_json::json!({"services": [], "backends": []})));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            AgentView::default(),
            Some(hook),
            cancel.clone(),
        ));
        let (line, body) = get(addr, "/v1/bpf/lb").await;
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"services": [], "backends": []})
        );
        cancel.cancel();
        task.await.unwrap();
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
