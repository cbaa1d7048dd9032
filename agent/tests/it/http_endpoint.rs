//! `clustermesh-agent --http-listen`: the binary serves /healthz and /metrics over TCP to
//! anyone and /v1/status only with the token of `--http-token-file`, and a taken port
//! stops it at startup with one clear line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Kills the agent when the test ends, however it ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A config whose only cluster (this one) is at a loopback port nothing listens on, with
/// certificate files that do not exist: the agent runs and reports it disconnected.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let path = dir.join("agent.yaml");
    std::fs::write(
        &path,
        format!(
            "local_cluster: east\ntrust_domain: clustermesh.local\ncert_file: {d}/client.crt\nkey_file: {d}/client.key\nclusters:\n  - name: east\n    id: 1\n    endpoints: [\"127.0.0.1:{port}\"]\n    ca_file: {d}/ca.crt\n",
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

fn agent_command(dir: &Path, config: &Path, http: SocketAddr) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clustermesh-agent"));
    cmd.args(["--config"])
        .arg(config)
        .args([
            "--node-name",
            "node-a",
            "--datapath",
            "record",
            "--admin-socket",
        ])
        .arg(dir.join("agent.sock"))
        .arg(format!("--http-listen={http}"))
        .arg("--http-token-file")
        .arg(dir.join("token"))
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// The token the tests write to `--http-token-file`.
const TOKEN: &str = "binary-test-token";

async fn get(addr: SocketAddr, path: &str) -> Option<(String, String)> {
    get_with(addr, path, &format!("X-Clustermesh-Token: {TOKEN}\r\n")).await
}

async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Option<(String, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

#[tokio::test]
async fn the_binary_serves_status_health_and_metrics_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let _agent = Agent(agent_command(dir.path(), &config, addr).spawn().unwrap());

    // Wait (bounded) for the endpoint to come up.
    let mut health = None;
    for _ in 0..300 {
        health = get(addr, "/healthz").await;
        if health.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        health,
        Some(("HTTP/1.1 200 OK".to_owned(), "ok\n".to_owned())),
        "the agent's HTTP endpoint never answered on {addr}"
    );

    // Without the token, the node's port gives nothing away.
    let (line, body) = get_with(addr, "/v1/status", "").await.unwrap();
    assert_eq!(line, "HTTP/1.1 401 Unauthorized");
    assert!(!body.contains("node-a"), "{body}");

    let (line, body) = get(addr, "/v1/status").await.unwrap();
    assert_eq!(line, "HTTP/1.1 200 OK");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["local_cluster"], "east");
    assert_eq!(status["clusters"][0]["name"], "east");
    assert_eq!(status["clusters"][0]["connected"], false);

    let (line, body) = get(addr, "/metrics").await.unwrap();
    assert_eq!(line, "HTTP/1.1 200 OK");
    assert!(body.contains("clustermesh_agent_"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
}

#[tokio::test]
async fn a_taken_http_port_stops_the_agent_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = tokio::task::spawn_blocking({
        let mut cmd = agent_command(dir.path(), &config, addr);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    drop(taken);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "clustermesh-agent: cannot listen on {addr} (--http-listen): "
        )),
        "{stderr}"
    );
}
