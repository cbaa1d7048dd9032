//! Behaviour of the standalone verbs on real state directories, against mesh API servers
//! speaking the real gRPC API over real mTLS (certificates from the state directories),
//! and agents answering the admin API on a unix socket.
//!
//! The servers here are test doubles of `clustermesh-apiserver` and `clustermesh-agent`
//! (they answer `GetClusterInfo`/`Status` and `/v1/status` from fixed data); the real
//! binaries are exercised by the namespace harness. Every server listens on 127.0.0.1.

// Helpers outside #[test] fns: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use clustermesh_api::v1::mesh_api_server::{MeshApi, MeshApiServer};
use clustermesh_api::v1::{
    ClusterConfig, GetClusterInfoRequest, GetClusterInfoResponse, StatusRequest, StatusResponse,
    WatchEvent, WatchRequest,
};
use clustermesh_certs::transport::{self, IncomingConfig};
use clustermesh_certs::{MeshTls, TlsPaths, TrustDomain};
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

/// Answers as cluster `name`/`id`; Status only for admin identities, like the real one.
#[derive(Debug, Clone)]
struct TestMeshApi {
    name: String,
    id: u32,
}

#[tonic::async_trait]
impl MeshApi for TestMeshApi {
    async fn get_cluster_info(
        &self,
        req: Request<GetClusterInfoRequest>,
    ) -> Result<Response<GetClusterInfoResponse>, Status> {
        transport::require_peer(&req)?;
        Ok(Response::new(GetClusterInfoResponse {
            config: Some(ClusterConfig {
                name: self.name.clone(),
                id: self.id,
                ..Default::default()
            }),
            revision: 7,
        }))
    }

    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<WatchEvent, Status>>;

    async fn watch(
        &self,
        _req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("test server has no Watch"))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        transport::require_admin(&req)?;
        Ok(Response::new(StatusResponse {
            cluster: self.name.clone(),
            cluster_id: self.id,
            revision: 7,
            ..Default::default()
        }))
    }
}

/// A mesh API server for the cluster in `dir`, serving with the cluster's own server
/// certificate. Reports `as_name`/`as_id` (normally the cluster's own). Dropping it
/// drops the runtime, which stops the server.
struct Server {
    _rt: tokio::runtime::Runtime,
}

fn serve(dir: &Path, port: u16, as_name: &str, as_id: u32) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let td = TrustDomain::new("clustermesh.local").unwrap();
    let tls = Arc::new(MeshTls::load(td, &TlsPaths::server(&dir.join("tls"))).unwrap());
    let svc = TestMeshApi {
        name: as_name.into(),
        id: as_id,
    };
    let listener = match reserved().remove(&port) {
        // The port `free_port` held for us: start listening on that very socket.
        Some(socket) => {
            socket.listen(128).unwrap();
            socket.set_nonblocking(true).unwrap();
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(socket.into()).unwrap()
        }
        None => rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap(),
    };
    rt.spawn(async move {
        let incoming = transport::incoming(listener, tls, IncomingConfig::default());
        tonic::transport::Server::builder()
            .add_service(MeshApiServer::new(svc))
            .serve_with_incoming(incoming)
            .await
    });
    Server { _rt: rt }
}

/// Ports handed out by [`free_port`], still bound (not listening) until [`serve`] takes
/// them, so a parallel test cannot grab one in between; a connection to a reserved port
/// is refused, like one to a closed port.
fn reserved() -> std::sync::MutexGuard<'static, BTreeMap<u16, socket2::Socket>> {
    static RESERVED: std::sync::Mutex<BTreeMap<u16, socket2::Socket>> =
        std::sync::Mutex::new(BTreeMap::new());
    RESERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn free_port() -> u16 {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    reserved().insert(port, socket);
    port
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn cm(args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CLUSTERMESH_STATE_DIR")
        .output()
        .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn enable(dir: &Path, name: &str, id: u32, port: u16, extra: &[&str]) {
    let id = id.to_string();
    let ep = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--state-dir",
        s(dir),
        "enable",
        "--cluster-name",
        name,
        "--cluster-id",
        &id,
        "--mesh-endpoint",
        &ep,
    ];
    args.extend_from_slice(extra);
    let r = cm(&args);
    assert!(r.ok, "enable {name}: {}", r.stderr);
}

/// Every file of a directory tree with its contents, to prove "unchanged".
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Asserts the error is exactly one line and contains `want`.
fn assert_one_line_error(r: &Run, want: &str) {
    assert!(!r.ok, "expected failure, got success: {}", r.stdout);
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line, got: {:?}",
        r.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(want),
        "{:?} does not contain {want:?}",
        lines[0]
    );
}

struct Pair {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    pa: u16,
    pb: u16,
}

fn pair() -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("east"), tmp.path().join("west"));
    let (pa, pb) = (free_port(), free_port());
    enable(&a, "east", 1, pa, &[]);
    enable(&b, "west", 2, pb, &[]);
    Pair {
        _tmp: tmp,
        a,
        b,
        pa,
        pb,
    }
}

fn agent_yaml(dir: &Path) -> serde_json::Value {
    clustermesh_api::yaml::from_str(&std::fs::read_to_string(dir.join("agent.yaml")).unwrap())
        .unwrap()
}

#[test]
fn enable_writes_certificates_keys_0600_and_agent_config() {
    let p = pair();
    use std::os::unix::fs::PermissionsExt;
    for key in [
        "ca/ca.key",
        "tls/server.key",
        "tls/client.key",
        "admin/client.key",
    ] {
        let mode = std::fs::metadata(p.a.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let cfg = agent_yaml(&p.a);
    assert_eq!(cfg["local_cluster"], "east");
    assert_eq!(cfg["clusters"].as_array().unwrap().len(), 1);
    assert_eq!(
        cfg["clusters"][0]["endpoints"][0],
        format!("127.0.0.1:{}", p.pa)
    );
    // The server certificate must be usable by a real mTLS server: load it.
    MeshTls::load(
        TrustDomain::new("clustermesh.local").unwrap(),
        &TlsPaths::server(&p.a.join("tls")),
    )
    .unwrap();
}

#[test]
fn connect_exchanges_cas_and_endpoints_in_both_directions() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    let _sb = serve(&p.b, p.pb, "west", 2);
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&p.b),
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("connected east <-> west"), "{}", r.stdout);

    for (dir, peer, peer_port, other) in [(&p.a, "west", p.pb, &p.b), (&p.b, "east", p.pa, &p.a)] {
        let cfg = agent_yaml(dir);
        let names: Vec<&str> = cfg["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 2);
        let entry = cfg["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == peer)
            .unwrap();
        assert_eq!(entry["endpoints"][0], format!("127.0.0.1:{peer_port}"));
        let pinned = std::fs::read_to_string(entry["ca_file"].as_str().unwrap()).unwrap();
        assert_eq!(
            pinned,
            std::fs::read_to_string(other.join("ca/ca.crt")).unwrap()
        );
        let bundle = std::fs::read_to_string(dir.join("tls/ca.crt")).unwrap();
        assert!(
            bundle.contains(pinned.trim()),
            "trust bundle lacks the peer CA"
        );
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    }

    // A third cluster reusing west's ID cannot join east's mesh, though it differs from east.
    let tmp = tempfile::tempdir().unwrap();
    let south = tmp.path().join("south");
    let ps = free_port();
    enable(&south, "south", 2, ps, &[]);
    let _ss = serve(&south, ps, "south", 2);
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&south),
    ]);
    assert_one_line_error(
        &r,
        "cluster ID 2 is used by west (known to east) and by south",
    );

    // Connecting again is idempotent.
    let before = (snapshot(&p.a), snapshot(&p.b));
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "-o",
        "json",
        "connect",
        "--destination-state-dir",
        s(&p.b),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["already_connected"], true);
    assert_eq!(before, (snapshot(&p.a), snapshot(&p.b)));

    // Disconnect removes everything connect added, on both sides.
    let r = cm(&[
        "--state-dir",
        s(&p.b),
        "disconnect",
        "--destination-state-dir",
        s(&p.a),
    ]);
    assert!(r.ok, "{}", r.stderr);
    for dir in [&p.a, &p.b] {
        assert_eq!(agent_yaml(dir)["clusters"].as_array().unwrap().len(), 1);
        assert_eq!(
            std::fs::read_to_string(dir.join("tls/ca.crt"))
                .unwrap()
                .matches("BEGIN CERTIFICATE")
                .count(),
            1
        );
        assert_eq!(std::fs::read_dir(dir.join("remotes")).unwrap().count(), 0);
    }
    let r = cm(&[
        "--state-dir",
        s(&p.b),
        "disconnect",
        "--destination-state-dir",
        s(&p.a),
    ]);
    assert_one_line_error(&r, "are not connected");
}

#[test]
fn connect_to_a_peer_that_is_down_changes_nothing() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    let before = (snapshot(&p.a), snapshot(&p.b));
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&p.b),
        "--timeout",
        "2s",
    ]);
    assert_one_line_error(&r, "mesh API of cluster west is not reachable");
    assert_eq!(before, (snapshot(&p.a), snapshot(&p.b)));
}

#[test]
fn connect_refuses_a_server_that_is_another_cluster() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    // West's address answers with west's certificate but claims to be another cluster.
    let _sb = serve(&p.b, p.pb, "north", 9);
    let before = (snapshot(&p.a), snapshot(&p.b));
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&p.b),
    ]);
    assert_one_line_error(&r, "reports cluster north (id 9)");
    assert_eq!(before, (snapshot(&p.a), snapshot(&p.b)));
}

#[test]
fn connect_refuses_a_server_whose_certificate_is_from_another_ca() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    // West's port is served by east's certificate: the CLI expects west's identity.
    let _sb = serve(&p.a, p.pb, "west", 2);
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&p.b),
        "--timeout",
        "2s",
    ]);
    assert_one_line_error(&r, "not reachable");
}

#[test]
fn bad_input_fails_with_one_line_and_leaves_both_sides_unchanged() {
    let p = pair();
    let tmp = tempfile::tempdir().unwrap();
    let dup_id = tmp.path().join("dup-id");
    enable(&dup_id, "south", 1, free_port(), &[]);
    let dup_name = tmp.path().join("dup-name");
    enable(&dup_name, "east", 3, free_port(), &[]);
    let other_td = tmp.path().join("other-td");
    enable(
        &other_td,
        "north",
        4,
        free_port(),
        &["--trust-domain", "other.example"],
    );
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["connect", "--destination-state-dir", s(&p.a)],
            "cannot connect cluster east to itself",
        ),
        (
            vec!["connect", "--destination-state-dir", s(&dup_id)],
            "clusters east and south both have ID 1",
        ),
        (
            vec!["connect", "--destination-state-dir", s(&dup_name)],
            "both clusters are named east",
        ),
        (
            vec!["connect", "--destination-state-dir", s(&other_td)],
            "trust domain",
        ),
        (
            vec!["connect", "--destination-state-dir", s(&plain)],
            "is not a clustermesh state directory",
        ),
        (
            vec!["connect", "--destination-state-dir", "/nonexistent/dir"],
            "does not exist",
        ),
        (
            vec![
                "enable",
                "--cluster-name",
                "east",
                "--cluster-id",
                "5",
                "--mesh-endpoint",
                "1.2.3.4:1",
            ],
            "already holds cluster east",
        ),
    ];
    let dirs = [&p.a, &p.b, &dup_id, &dup_name, &other_td, &plain];
    let before: Vec<_> = dirs.iter().map(|d| snapshot(d)).collect();
    for (args, want) in cases {
        let mut full = vec!["--state-dir", s(&p.a)];
        full.extend(args);
        assert_one_line_error(&cm(&full), want);
    }
    let after: Vec<_> = dirs.iter().map(|d| snapshot(d)).collect();
    assert_eq!(before, after, "a failed command changed a state directory");

    let fresh = tmp.path().join("fresh");
    for (args, want) in [
        (
            vec!["--cluster-name", "Bad_Name", "--cluster-id", "1"],
            "invalid cluster name",
        ),
        (
            vec!["--cluster-name", "ok", "--cluster-id", "0"],
            "cluster ID",
        ),
        (
            vec!["--cluster-name", "ok", "--cluster-id", "256"],
            "cluster ID",
        ),
    ] {
        let mut full = vec![
            "--state-dir",
            s(&fresh),
            "enable",
            "--mesh-endpoint",
            "127.0.0.1:1",
        ];
        full.extend(args);
        assert_one_line_error(&cm(&full), want);
        assert!(!fresh.join("cluster.yaml").exists());
    }
    assert_one_line_error(&cm(&["status"]), "no state directory given");
}

#[test]
fn a_write_failure_on_the_peer_side_rolls_back_the_source_side() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    let _sb = serve(&p.b, p.pb, "west", 2);
    // A file where west's remotes/ directory must go makes the west half fail after the
    // east half was written.
    std::fs::write(p.b.join("remotes"), b"not a directory").unwrap();
    let before = (snapshot(&p.a), snapshot(&p.b));
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&p.b),
    ]);
    assert_one_line_error(&r, "nothing was changed");
    assert_eq!(before, (snapshot(&p.a), snapshot(&p.b)));
}

#[test]
fn disable_refuses_while_connected_then_removes_the_mesh_state() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    let _sb = serve(&p.b, p.pb, "west", 2);
    assert!(
        cm(&[
            "--state-dir",
            s(&p.a),
            "connect",
            "--destination-state-dir",
            s(&p.b)
        ])
        .ok
    );
    std::fs::write(p.a.join("manifests/svc.yaml"), "kind: Service\n").unwrap();
    assert_one_line_error(
        &cm(&["--state-dir", s(&p.a), "disable"]),
        "still connected to west",
    );
    let r = cm(&["--state-dir", s(&p.a), "disable", "--force"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(!p.a.join("cluster.yaml").exists());
    assert!(!p.a.join("ca/ca.key").exists());
    assert!(
        p.a.join("manifests/svc.yaml").exists(),
        "user manifests are kept"
    );
    // It can be enabled again.
    enable(&p.a, "east", 1, p.pa, &[]);
}

#[test]
fn completion_and_help_are_available() {
    let r = cm(&["completion", "bash"]);
    assert!(r.ok && r.stdout.contains("clustermesh"), "{}", r.stderr);
    let r = cm(&["--help"]);
    assert!(r.ok && r.stdout.contains("Examples"), "{}", r.stdout);
}

/// A stand-in for `clustermesh-agent --admin-socket`: answers `GET /v1/status` on a unix
/// socket with the admin API's `AgentStatus` (what the agent serves) serialized (the body can be changed while it
/// runs). Dropping it stops it.
struct FakeAgent {
    _rt: tokio::runtime::Runtime,
    body: Arc<std::sync::Mutex<String>>,
}

/// The agent's `/v1/status` for node `node` of cluster `local`: `clusters` is
/// `(name, connected)`; a connected cluster is synced.
fn agent_status(node: &str, local: &str, clusters: &[(&str, bool)]) -> String {
    use clustermesh_api::admin::{AgentStatus, ClusterStatus};
    let body = AgentStatus {
        node: node.into(),
        local_cluster: local.into(),
        clusters: clusters
            .iter()
            .map(|(name, up)| ClusterStatus {
                name: (*name).into(),
                phase: if *up { "watching" } else { "backoff" }.into(),
                connected: *up,
                synced: *up,
                stale: false,
                revision: 7,
                last_error: (!up).then(|| "connection refused".to_string()),
                endpoint: "127.0.0.1:1".into(),
                decode_errors: 0,
                refused_records: 0,
            })
            .collect(),
        services: 0,
        reconcile_rounds: 1,
    };
    serde_json::to_string(&body).unwrap()
}

fn fake_agent(socket: &Path, body: String) -> FakeAgent {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(socket) })
        .unwrap();
    let body = Arc::new(std::sync::Mutex::new(body));
    let served = Arc::clone(&body);
    rt.spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let served = Arc::clone(&served);
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let reply = if text.starts_with("GET /v1/status ") {
                    let body = served.lock().unwrap().clone();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
                };
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    FakeAgent { _rt: rt, body }
}

#[test]
fn status_with_no_agents_listed_is_not_ready_and_says_how_to_list_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("east");
    let port = free_port();
    enable(&dir, "east", 1, port, &[]);
    let _server = serve(&dir, port, "east", 1);
    let want = "no agents listed; pass --agent-socket PATH (repeatable) or list their admin sockets under agent_sockets in cluster.yaml";
    let r = cm(&["--state-dir", s(&dir), "status"]);
    assert_one_line_error(&r, want);
    assert!(
        r.stdout
            .contains(&format!("Agents:      0/0 answering ({want})")),
        "{}",
        r.stdout
    );
    // --wait does not wait for agents nobody listed (and does not claim to have waited).
    let r = cm(&[
        "--state-dir",
        s(&dir),
        "status",
        "--wait",
        "--wait-duration",
        "10m",
    ]);
    assert_one_line_error(&r, want);
    assert!(!r.stderr.contains("not ready after"), "{}", r.stderr);
}

#[test]
fn status_counts_configured_clusters_from_what_each_agent_reports() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    let _sb = serve(&p.b, p.pb, "west", 2);
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&p.b),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let sockets = tempfile::tempdir().unwrap();
    let (s1, s2) = (
        sockets.path().join("n1.sock"),
        sockets.path().join("n2.sock"),
    );
    // n1 has reloaded agent.yaml and watches west (not connected yet); n2 has not.
    let n1 = fake_agent(
        &s1,
        agent_status("n1", "east", &[("east", true), ("west", false)]),
    );
    let _n2 = fake_agent(&s2, agent_status("n2", "east", &[("east", true)]));
    let status = || {
        cm(&[
            "--state-dir",
            s(&p.a),
            "status",
            "--agent-socket",
            s(&s1),
            "--agent-socket",
            s(&s2),
        ])
    };
    let r = status();
    assert!(!r.ok, "{}", r.stdout);
    for line in [
        "Agents:      2/2 answering",
        "Clusters:    1/2 configured, 1/2 connected (least agent)",
        "  node n1                  2/2 configured, 1/2 connected",
        "  node n2                  1/2 configured, 1/2 connected",
    ] {
        assert!(
            r.stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{}",
            r.stdout
        );
    }
    assert_one_line_error(&r, "n1: 1/2 clusters connected, n2: 1/2 clusters connected");

    *n1.body.lock().unwrap() = agent_status("n1", "east", &[("east", true), ("west", true)]);
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "status",
        "--agent-socket",
        s(&s1),
        "-o",
        "json",
    ]);
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["agents"][0]["configured_clusters"], 2);
    assert_eq!(v["agents"][0]["connected_clusters"], 2);
}

/// The identity a PEM certificate file names.
fn identity_of(path: &Path) -> String {
    let pem = std::fs::read(path).unwrap();
    let der = clustermesh_certs::pem::parse_certs(&pem).unwrap();
    clustermesh_certs::PeerIdentity::from_certificate_any_domain(&der[0])
        .unwrap()
        .to_string()
}

#[test]
fn enable_again_upgrades_a_connected_cluster_to_per_role_certificates_and_labels_its_bundle() {
    let p = pair();
    let _sa = serve(&p.a, p.pa, "east", 1);
    let _sb = serve(&p.b, p.pb, "west", 2);
    let r = cm(&[
        "--state-dir",
        s(&p.a),
        "connect",
        "--destination-state-dir",
        s(&p.b),
    ]);
    assert!(r.ok, "{}", r.stderr);
    let tls = p.a.join("tls");
    assert_eq!(
        identity_of(&tls.join("server.crt")),
        "spiffe://clustermesh.local/cluster/east"
    );
    assert_eq!(
        identity_of(&tls.join("client.crt")),
        "spiffe://clustermesh.local/cluster/east/agent"
    );
    assert_eq!(
        identity_of(&tls.join("replica.crt")),
        "spiffe://clustermesh.local/cluster/east/replica/1"
    );
    let bundle = std::fs::read_to_string(tls.join("ca.crt")).unwrap();
    assert!(
        bundle.contains("# clustermesh-ca: east\n") && bundle.contains("# clustermesh-ca: west\n"),
        "{bundle}"
    );

    // A directory written before roles and labels existed: the agents' certificate named
    // the cluster itself (and could write the store), the bundle had no labels.
    let ca = clustermesh_certs::files::load_ca(
        &p.a.join("ca"),
        TrustDomain::new("clustermesh.local").unwrap(),
    )
    .unwrap();
    let old_agent = ca
        .issue_server(
            "east",
            &clustermesh_certs::ServerNames::default(),
            clustermesh_certs::Validity::from_now(std::time::Duration::from_secs(3600)),
        )
        .unwrap();
    std::fs::write(tls.join("client.crt"), &old_agent.cert_pem).unwrap();
    std::fs::write(tls.join("client.key"), &old_agent.key_pem).unwrap();
    std::fs::remove_file(tls.join("replica.crt")).unwrap();
    std::fs::remove_file(tls.join("replica.key")).unwrap();
    let unlabelled: String = bundle
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(tls.join("ca.crt"), &unlabelled).unwrap();
    let agent_before = std::fs::read(p.a.join("agent.yaml")).unwrap();

    // `enable` with the same name and ID upgrades in place.
    enable(&p.a, "east", 1, p.pa, &[]);
    assert_eq!(
        identity_of(&tls.join("client.crt")),
        "spiffe://clustermesh.local/cluster/east/agent"
    );
    assert_eq!(
        identity_of(&tls.join("replica.crt")),
        "spiffe://clustermesh.local/cluster/east/replica/1"
    );
    let relabelled =
        clustermesh_certs::TrustBundle::from_pem(&std::fs::read(tls.join("ca.crt")).unwrap())
            .unwrap();
    assert_eq!(
        relabelled.clusters().into_iter().collect::<Vec<_>>(),
        ["east", "west"],
        "bundle not relabelled"
    );
    assert_eq!(relabelled.len(), 2);
    assert_eq!(
        std::fs::read(p.a.join("agent.yaml")).unwrap(),
        agent_before,
        "connections lost"
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(tls.join("replica.key"))
            .unwrap()
            .permissions(),
    ) & 0o777;
    assert_eq!(key_mode, 0o600);
}
