//! The optional TCP HTTP endpoint (`--http-listen`): what the kubelet probes, what
//! Prometheus scrapes and what `clustermesh status` reads through the Kubernetes API
//! server's pod proxy, where the admin unix socket cannot be reached.
//!
//! | request            | response |
//! |--------------------|----------|
//! | `GET /healthz`     | `ok` while the agent runs (anyone: the kubelet's probes) |
//! | `GET /metrics`     | Prometheus text, the same registry as the admin socket (anyone: Prometheus) |
//! | `GET /v1/status`   | [`admin::AgentStatus`], the same JSON as the admin socket (token) |
//! | `GET /v1/services` | list of [`admin::ServiceStatus`], as on the admin socket (token) |
//! | `GET /v1/bpf/lb`   | the datapath dump, as on the admin socket (token; 503 with `--datapath record`) |
//! | `GET /v1/identities`, `/v1/endpoints`, `/v1/policy` | the policy views, as on the admin socket (token; 503 with `--policy=false`) |
//!
//! In Kubernetes the agent uses the host network, so this port is open on every node. The
//! `/v1` routes describe every service and backend of the mesh, so over TCP they answer
//! only a request whose [`TOKEN_HEADER`] holds the token of `--http-token-file` (the
//! chart mounts Secret `clustermesh-agent-admin-token`, which `clustermesh enable`
//! creates). The token travels in a header of its own because the Kubernetes API server
//! authenticates the pod-proxy request with `Authorization` and removes that header
//! before forwarding (kubernetes/kubernetes#34076); other headers reach the pod. Without
//! `--http-token-file` the `/v1` routes are refused over TCP and stay on the admin socket.
//! `/healthz` and `/metrics` stay open: the probes and scrapers send no credentials, and
//! the metrics carry counts and cluster names only.
//!
//! Read-only: every route is the admin socket's own handler; nothing here changes the
//! agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::runtime::AgentView;

/// Request header carrying the admin token (not `Authorization`, which the Kubernetes API
/// server's pod proxy consumes and strips).
pub const TOKEN_HEADER: &str = "x-clustermesh-token";

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

/// Who may read the admin routes (`/v1/...`) over TCP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AdminAccess {
    /// Nobody: they are served on the admin socket only.
    #[default]
    Off,
    /// Requests carrying the token in this file (read at every request, so a rotated
    /// Secret applies without a restart; surrounding whitespace is ignored).
    TokenFile(PathBuf),
}

/// Why a request for an admin route was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// No token file is configured.
    NotServed,
    /// The token file is missing, unreadable or empty.
    NoToken(String),
    /// The request has no token, or another one.
    BadToken(&'static str),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::NotServed => (
                StatusCode::FORBIDDEN,
                "the admin routes are not served over TCP by this agent (no --http-token-file); use the admin socket",
            )
                .into_response(),
            Self::NoToken(why) => (
                StatusCode::FORBIDDEN,
                format!("the admin routes are not served over TCP now: {why}"),
            )
                .into_response(),
            Self::BadToken(why) => (StatusCode::UNAUTHORIZED, why).into_response(),
        }
    }
}

/// Compares two tokens in time that depends on their lengths only.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Decides whether a request for an admin route with header value `given` may pass.
async fn check(access: &AdminAccess, given: Option<&[u8]>) -> Result<(), Refusal> {
    let AdminAccess::TokenFile(path) = access else {
        return Err(Refusal::NotServed);
    };
    let expected = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return Err(Refusal::NoToken(format!(
                "cannot read token file {}: {e}",
                path.display()
            )))
        }
    };
    let expected = expected.trim_ascii();
    if expected.is_empty() {
        return Err(Refusal::NoToken(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    match given {
        None => Err(Refusal::BadToken("missing X-Clustermesh-Token header")),
        Some(given) if same_token(given.trim_ascii(), expected) => Ok(()),
        Some(_) => Err(Refusal::BadToken("wrong X-Clustermesh-Token")),
    }
}

/// Lets `/healthz` and `/metrics` through and checks the token on everything else.
async fn guard(State(access): State<AdminAccess>, request: Request, next: Next) -> Response {
    if matches!(request.uri().path(), "/healthz" | "/metrics") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(TOKEN_HEADER)
        .map(|v| v.as_bytes().to_vec());
    match check(&access, given.as_deref()).await {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            tracing::debug!(path = %request.uri().path(), reason = ?refusal, "admin route refused over TCP");
            refusal.into_response()
        }
    }
}

/// The HTTP endpoint's routes: the admin API's read-only routes (behind `access`) plus
/// `/healthz`.
pub fn router(view: AgentView, bpf: Option<admin::BpfDumpHook>, access: AdminAccess) -> Router {
    admin::router(view, bpf)
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(middleware::from_fn_with_state(access, guard))
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
    access: AdminAccess,
    cancel: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    tracing::info!(
        addr = ?addr,
        admin_routes = match &access { AdminAccess::Off => "off", AdminAccess::TokenFile(_) => "token" },
        "HTTP endpoint listening (/healthz, /metrics; /v1/status, /v1/services, /v1/bpf/lb with a token)"
    );
    admin::serve_until_cancelled(listener, router(view, bpf, access), cancel, "HTTP endpoint")
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TOKEN: &str = "s3cret-token";

    /// One real HTTP/1.1 GET over TCP with the right token; returns (status line, body).
    async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        get_with(addr, path, &format!("X-Clustermesh-Token: {TOKEN}\r\n")).await
    }

    /// One real HTTP/1.1 GET over TCP with `headers` (each ending in CRLF).
    async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (String, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: agent\r\n{headers}Connection: close\r\n\r\n")
                .as_bytes(),
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
        use clustermesh_agent_core::desired::DesiredState;
        use clustermesh_agent_core::maglev::Maglev;
        use clustermesh_agent_core::merge::Locality;
        use clustermesh_api::model::{
            Affinity, BackendRecord, PortSpec, Protocol, ServiceName, ServiceRecord,
        };

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

    /// A token file holding [`TOKEN`] (with the newline a `kubectl create secret
    /// --from-file` would keep).
    fn token_file() -> (tempfile::TempDir, AdminAccess) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        (dir, AdminAccess::TokenFile(path))
    }

    #[tokio::test]
    async fn serves_the_admin_read_routes_and_health_over_tcp() {
        let view = view_with_a_service();
        view.metrics.decode_error("west");
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let (_dir, access) = token_file();
        let task = tokio::spawn(serve(listener, view.clone(), None, access, cancel.clone()));

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
        let (_dir, access) = token_file();
        let task = tokio::spawn(serve(
            listener,
            AgentView::default(),
            Some(hook),
            access,
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

    /// Anything that reaches the node's port gets the probes' and Prometheus' routes, but
    /// the services, backends and BPF table only with the token.
    #[tokio::test]
    async fn the_admin_routes_need_the_token_and_health_and_metrics_do_not() {
        let view = view_with_a_service();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let (dir, access) = token_file();
        let task = tokio::spawn(serve(listener, view, None, access, cancel.clone()));

        for path in ["/v1/status", "/v1/services", "/v1/bpf/lb"] {
            let (line, body) = get_with(addr, path, "").await;
            assert_eq!(line, "HTTP/1.1 401 Unauthorized", "{path}");
            assert_eq!(body, "missing X-Clustermesh-Token header", "{path}");
            assert!(!body.contains("echo"), "{body}");
            let (line, body) = get_with(addr, path, "X-Clustermesh-Token: guess\r\n").await;
            assert_eq!(line, "HTTP/1.1 401 Unauthorized", "{path}");
            assert_eq!(body, "wrong X-Clustermesh-Token", "{path}");
            // What the pod proxy would strip anyway is no way in either.
            let (line, _) =
                get_with(addr, path, &format!("Authorization: Bearer {TOKEN}\r\n")).await;
            assert_eq!(line, "HTTP/1.1 401 Unauthorized", "{path}");
        }
        assert_eq!(
            get_with(addr, "/healthz", "").await,
            ("HTTP/1.1 200 OK".to_owned(), "ok\n".to_owned())
        );
        assert_eq!(get_with(addr, "/metrics", "").await.0, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/v1/status").await.0, "HTTP/1.1 200 OK");

        // A rotated token applies at once; a removed one closes the routes.
        std::fs::write(dir.path().join("token"), "rotated").unwrap();
        assert_eq!(get(addr, "/v1/status").await.0, "HTTP/1.1 401 Unauthorized");
        assert_eq!(
            get_with(addr, "/v1/status", "X-Clustermesh-Token: rotated\r\n")
                .await
                .0,
            "HTTP/1.1 200 OK"
        );
        std::fs::remove_file(dir.path().join("token")).unwrap();
        let (line, body) = get(addr, "/v1/status").await;
        assert_eq!(line, "HTTP/1.1 403 Forbidden");
        assert!(body.contains("cannot read token file"), "{body}");

        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn without_a_token_file_the_admin_routes_stay_on_the_socket() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            view_with_a_service(),
            None,
            AdminAccess::Off,
            cancel.clone(),
        ));
        let (line, body) = get(addr, "/v1/services").await;
        assert_eq!(line, "HTTP/1.1 403 Forbidden");
        assert!(body.contains("use the admin socket"), "{body}");
        assert_eq!(get(addr, "/healthz").await.0, "HTTP/1.1 200 OK");
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"", b"abc"));
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
