//! The admin API: HTTP/1.1 with JSON bodies on a local unix socket.
//!
//! `clustermesh status`, `service list` and `bpf lb list` read the agent through it. The
//! bodies are the types of [`clustermesh_api::admin`], which the CLI decodes too: fields
//! are only added, never renamed, and readers ignore unknown ones.
//!
//! | request            | response |
//! |--------------------|----------|
//! | `GET /v1/status`   | [`AgentStatus`] |
//! | `GET /v1/services` | list of [`ServiceStatus`] (one per service port) |
//! | `GET /v1/bpf/lb`   | what the datapath dump hook returns, a [`BpfDump`](clustermesh_api::admin::BpfDump) (503 without one) |
//! | `GET /v1/identities` | list of [`IdentityEntry`](clustermesh_api::admin_policy::IdentityEntry) (503 without policy) |
//! | `GET /v1/endpoints`  | list of [`EndpointEntry`](clustermesh_api::admin_policy::EndpointEntry) (503 without policy) |
//! | `GET /v1/policy`     | [`PolicyReport`](clustermesh_api::admin_policy::PolicyReport) (503 without policy) |
//! | `GET /metrics`     | Prometheus text |

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use clustermesh_api::admin::{AgentStatus, BackendStatus, ServiceStatus};

use clustermesh_agent_core::datapath::Frontend;
use clustermesh_agent_core::watcher::WatcherStatus;
use clustermesh_api::admin::Reported;

use crate::runtime::AgentView;

/// Produces the `GET /v1/bpf/lb` body (JSON) from the live datapath.
pub type BpfDumpHook = Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

/// The wire form of a watcher's status. Every field is named (no `..`), so a field added
/// to the watcher's status does not compile until it is placed here too.
fn cluster_status(s: WatcherStatus) -> clustermesh_api::admin::ClusterStatus {
    let WatcherStatus {
        name,
        phase,
        connected,
        synced,
        stale,
        revision,
        last_error,
        endpoint,
        decode_errors,
        refused_records,
    } = s;
    clustermesh_api::admin::ClusterStatus {
        name,
        phase: Reported::Known(phase),
        connected,
        synced,
        stale,
        revision,
        last_error,
        endpoint,
        decode_errors,
        refused_records,
    }
}

fn socket_addr(ip: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn frontend(f: &Frontend) -> String {
    format!("{}/{}", socket_addr(f.ip, f.port), f.protocol)
}

/// The status body for `view`.
#[must_use]
pub fn status(view: &AgentView) -> AgentStatus {
    AgentStatus {
        node: view.node.clone(),
        local_cluster: view.local_cluster.clone(),
        clusters: view
            .clusters
            .snapshot()
            .into_iter()
            .map(cluster_status)
            .collect(),
        services: view.services().len(),
        reconcile_rounds: view.reconcile_rounds(),
    }
}

/// The services body for `view`.
#[must_use]
pub fn services(view: &AgentView) -> Vec<ServiceStatus> {
    view.services()
        .values()
        .map(|s| {
            let mut slots = vec![0u32; s.backends.len()];
            for &i in s.table.iter() {
                if let Some(c) = slots.get_mut(i as usize) {
                    *c += 1;
                }
            }
            ServiceStatus {
                namespace: s.id.namespace.clone(),
                name: s.id.name.clone(),
                port_name: s.id.port_name.clone(),
                frontends: s.frontends.iter().map(frontend).collect(),
                affinity: Reported::Known(s.affinity),
                global: s.global,
                shared: s.shared,
                active_tier: Reported::Known(s.active_tier),
                table_size: s.table.len(),
                backends: s
                    .backends
                    .iter()
                    .zip(slots)
                    .map(|(b, slots)| BackendStatus {
                        cluster: b.cluster.clone(),
                        address: socket_addr(b.ip, b.port),
                        state: Reported::Known(b.state),
                        tier: Reported::Known(b.tier),
                        weight: b.weight,
                        slots,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// A JSON 200 response (500 when `value` cannot be encoded).
pub(crate) fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(bytes),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode response: {e}"),
        )
            .into_response(),
    }
}

/// The admin router.
pub fn router(view: AgentView, bpf: Option<BpfDumpHook>) -> Router {
    let v1 = view.clone();
    let v2 = view.clone();
    let v3 = view.clone();
    let policy_route = |what: fn(&crate::enforcement::Enforcement) -> serde_json::Value| {
        let e = view.enforcement.clone();
        get(move || async move {
            let Some(e) = e else {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "this agent does not enforce policy (--policy=false)",
                )
                    .into_response();
            };
            // The plane's lock is held by a flush for at most a round: off the workers.
            match tokio::task::spawn_blocking(move || what(&e)).await {
                Ok(v) => json(&v),
                Err(err) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("policy view failed: {err}"),
                )
                    .into_response(),
            }
        })
    };
    Router::new()
        .route(
            "/v1/identities",
            policy_route(|e| {
                serde_json::to_value(crate::admin_policy::identities(&e.plane()))
                    .unwrap_or_default()
            }),
        )
        .route(
            "/v1/endpoints",
            policy_route(|e| {
                serde_json::to_value(crate::admin_policy::endpoints(&e.plane())).unwrap_or_default()
            }),
        )
        .route(
            "/v1/policy",
            policy_route(|e| {
                let counters = e.counters().ok();
                serde_json::to_value(crate::admin_policy::report(&e.plane(), counters))
                    .unwrap_or_default()
            }),
        )
        .route("/v1/status", get(move || async move { json(&status(&v1)) }))
        .route(
            "/v1/services",
            get(move || async move { json(&services(&v2)) }),
        )
        .route(
            "/v1/bpf/lb",
            get(move || async move {
                match &bpf {
                    None => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "this agent runs without the eBPF datapath",
                    )
                        .into_response(),
                    Some(hook) => {
                        // Map reads are syscalls: keep them off the runtime's workers.
                        let hook = Arc::clone(hook);
                        match tokio::task::spawn_blocking(move || hook()).await {
                            Ok(Ok(v)) => json(&v),
                            Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
                            Err(e) => (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("datapath dump failed: {e}"),
                            )
                                .into_response(),
                        }
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    v3.metrics.render(),
                )
            }),
        )
}

/// Errors starting the admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket cannot be created.
    #[error(
        "cannot listen on admin socket {path}: {error}; check the directory exists and is writable"
    )]
    Bind {
        /// Socket path.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// Serves the admin API on unix socket `path` (replacing a stale socket file) until
/// `cancel`.
pub async fn serve(
    path: &Path,
    view: AgentView,
    bpf: Option<BpfDumpHook>,
    cancel: CancellationToken,
) -> Result<(), AdminError> {
    if path.exists() {
        // A previous agent's socket; nobody can be listening on it if we are starting.
        let _ = std::fs::remove_file(path);
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|error| AdminError::Bind {
        path: path.to_path_buf(),
        error,
    })?;
    tracing::info!(socket = %path.display(), "admin API listening");
    serve_until_cancelled(listener, router(view, bpf), cancel, "admin API").await;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Serves `app` on `listener` until `cancel` (in-flight requests finish), logging why
/// serving stopped if it failed; `what` names the server in that log.
pub(crate) async fn serve_until_cancelled<L>(
    listener: L,
    app: Router,
    cancel: CancellationToken,
    what: &str,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "{what} stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_api::model::Phase;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(path: &Path, request: &str) -> String {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        s.write_all(
            format!("GET {request} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// What `clustermesh service list` and `status` print comes from these fields: one
    /// row per service port with its port name and the service's affinity, and each
    /// cluster's phase (so a refused cluster shows as refused).
    #[test]
    fn bodies_carry_affinity_port_names_and_phase() {
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
        let record = ServiceRecord {
            cluster: "east".into(),
            name: ServiceName {
                namespace: "default".into(),
                name: "dns".into(),
            },
            frontends: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![
                port("tcp", 53, Protocol::Tcp),
                port("udp", 53, Protocol::Udp),
            ],
            backends: vec![BackendRecord {
                ip: "10.1.0.5".parse().unwrap(),
                ports: vec![
                    port("tcp", 5353, Protocol::Tcp),
                    port("udp", 5353, Protocol::Udp),
                ],
                ready: true,
                terminating: false,
                node: "n2".into(),
                zone: String::new(),
                weight: 1,
            }],
            global: true,
            shared: true,
            affinity: Affinity::Remote,
            topology_aware: false,
        };
        let here = Locality {
            cluster: "east".into(),
            node: "n1".into(),
            zone: String::new(),
        };
        let mut desired = DesiredState::new(here, Maglev::default());
        desired.upsert(record);
        desired.compute();
        let view = AgentView::default();
        *view.services.write().unwrap() = Arc::new(desired.services().clone());
        view.clusters.update("south", |s| {
            s.phase = Phase::Refused;
            s.last_error = Some("reports cluster ID 2, which cluster west already uses".into());
        });

        let body = serde_json::to_value(services(&view)).unwrap();
        let rows: Vec<(&str, &str, &str)> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap(),
                    s["port_name"].as_str().unwrap(),
                    s["affinity"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(rows, [("dns", "tcp", "remote"), ("dns", "udp", "remote")]);
        let body = serde_json::to_value(status(&view)).unwrap();
        assert_eq!(body["clusters"][0]["name"], "south");
        assert_eq!(body["clusters"][0]["phase"], "refused");
    }

    /// `/v1/status` carries every field of each cluster's watcher status, under the wire
    /// names agents served before the body moved to `clustermesh_api`, in every phase.
    #[test]
    fn cluster_entries_carry_every_watcher_status_field() {
        let view = AgentView::default();
        let phases = [
            (Phase::Connecting, "connecting"),
            (Phase::Syncing, "syncing"),
            (Phase::Watching, "watching"),
            (Phase::Backoff, "backoff"),
            (Phase::Refused, "refused"),
        ];
        let mut expected = Vec::new();
        for (i, (phase, wire)) in phases.into_iter().enumerate() {
            let n = i as u64;
            view.clusters.update(&format!("c{i}"), |s| {
                s.phase = phase;
                s.connected = i % 2 == 0;
                s.synced = i > 1;
                s.stale = i == 3;
                s.revision = 10 + n;
                s.last_error = (i == 4).then(|| "refused: cluster ID taken".to_owned());
                s.endpoint = format!("127.0.0.{i}:2379");
                s.decode_errors = n;
                s.refused_records = 2 * n;
            });
            expected.push(serde_json::json!({
                "name": format!("c{i}"),
                "phase": wire,
                "connected": i % 2 == 0,
                "synced": i > 1,
                "stale": i == 3,
                "revision": 10 + n,
                "last_error": (i == 4).then_some("refused: cluster ID taken"),
                "endpoint": format!("127.0.0.{i}:2379"),
                "decode_errors": n,
                "refused_records": 2 * n,
            }));
        }
        let served = serde_json::to_value(status(&view)).unwrap();
        assert_eq!(served["clusters"], serde_json::Value::Array(expected));
    }

    #[tokio::test]
    async fn serves_status_services_and_metrics_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let view = AgentView {
            node: "n1".into(),
            local_cluster: "east".into(),
            ..AgentView::default()
        };
        view.metrics.decode_error("west");
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (sock, view, cancel) = (sock.clone(), view.clone(), cancel.clone());
            async move { serve(&sock, view, None, cancel).await }
        });
        for _ in 0..200 {
            if tokio::net::UnixStream::connect(&sock).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let status = get(&sock, "/v1/status").await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(status.contains(r#""local_cluster":"east""#), "{status}");
        let services = get(&sock, "/v1/services").await;
        assert!(services.ends_with("[]"), "{services}");
        let bpf = get(&sock, "/v1/bpf/lb").await;
        assert!(bpf.starts_with("HTTP/1.1 503"), "{bpf}");
        let metrics = get(&sock, "/metrics").await;
        assert!(
            metrics.contains("clustermesh_agent_record_decode_errors_total"),
            "{metrics}"
        );
        cancel.cancel();
        task.await.unwrap().unwrap();
        assert!(!sock.exists(), "socket removed on shutdown");
    }
}
