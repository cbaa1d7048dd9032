//! Kubernetes mode (`--context`): what a user sees when the context is wrong, unreachable
//! or fine. No Kubernetes cluster exists here; the "reachable" case is a loopback HTTP
//! server that answers `GET /version` like an API server does.

// Test helpers outside #[test] functions panic on setup failure on purpose.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clustermesh_cli::k8s::context::connect;
use kube::config::Kubeconfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\ncontexts:\n- name: east\n  context:\n    cluster: c\n    user: u\n- name: west\n  context:\n    cluster: c\n    user: u\nusers:\n- name: u\n  user:\n    token: t\ncurrent-context: east\n"
    )
}

fn run_cli(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clustermesh"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("CLUSTERMESH_STATE_DIR")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_kubeconfig(dir: &Path, server: &str) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(&path, kubeconfig_yaml(server)).unwrap();
    path
}

/// A loopback port nothing listens on: bind, note the port, close.
fn closed_loopback_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn unknown_context_is_one_clear_line_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_kubeconfig(dir.path(), "https://127.0.0.1:1");
    let (ok, stdout, stderr) = run_cli(&cfg, &["--context", "north", "status"]);
    assert!(!ok);
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(
            "error: context \"north\" not found in kubeconfig: known contexts are [east, west]"
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn unknown_destination_context_is_reported_for_connect() {
    let (port, _requests) = fake_version_server().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"));
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
        run_cli(
            &cfg,
            &[
                "--context",
                "east",
                "--destination-context",
                "south",
                "connect",
            ],
        )
    })
    .await
    .unwrap();
    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: context \"south\" not found in kubeconfig: "),
        "{stderr}"
    );
}

#[tokio::test]
async fn service_list_without_the_mesh_says_to_enable_it_after_reaching_the_cluster() {
    let (port, mut requests) = fake_version_server().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"));
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_cli(&cfg, &["--context", "west", "service", "list"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr
            .starts_with("error: the mesh is not enabled in namespace kube-system of context west"),
        "{stderr}"
    );
    assert_eq!(requests.recv().await.unwrap(), "GET /version HTTP/1.1");
    assert!(requests
        .recv()
        .await
        .unwrap()
        .starts_with("GET /api/v1/namespaces/kube-system/configmaps/clustermesh-config"),);
}

#[test]
fn unreachable_context_names_context_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_loopback_port();
    let cfg = write_kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"));
    let (ok, _, stderr) = run_cli(&cfg, &["--context", "west", "status"]);
    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: cannot reach the Kubernetes API of context west: "),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("connection refused by 127.0.0.1:{port}")),
        "the refused address is named: {stderr}"
    );
    assert!(!stderr.contains("ServiceError"), "{stderr}");
}

/// A kubeconfig user whose exec credential plugin is not installed: the plugin is named.
#[test]
fn a_missing_exec_credential_plugin_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    let yaml = kubeconfig_yaml(&format!("http://127.0.0.1:{}", closed_loopback_port()))
        .replace(
            "  user:\n    token: t\n",
            "  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: /nonexistent-plugin\n      interactiveMode: Never\n",
        );
    assert!(yaml.contains("/nonexistent-plugin"), "{yaml}");
    std::fs::write(&path, yaml).unwrap();
    let (ok, stdout, stderr) = run_cli(&path, &["--context", "east", "status"]);
    assert!(!ok);
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(
            "error: context \"east\": the kubeconfig's credential plugin \"/nonexistent-plugin\" (user u) cannot be started: "
        ),
        "{stderr}"
    );
}

#[test]
fn destination_context_without_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_kubeconfig(dir.path(), "https://127.0.0.1:1");
    let (ok, _, stderr) = run_cli(&cfg, &["--destination-context", "west", "connect"]);
    assert!(!ok);
    assert!(
        stderr.contains("--destination-context needs --context"),
        "{stderr}"
    );
}

#[test]
fn standalone_connect_still_requires_a_destination() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_kubeconfig(dir.path(), "https://127.0.0.1:1");
    let (ok, _, stderr) = run_cli(&cfg, &["--state-dir", "/nonexistent", "connect"]);
    assert!(!ok);
    assert!(stderr.contains("--destination-state-dir"), "{stderr}");
}

/// Serves one loopback HTTP/1.1 connection per request, answering `/version` only, and
/// records each request line.
async fn fake_version_server() -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&got).into_owned();
                let line = head.lines().next().unwrap_or_default().to_owned();
                let _ = tx.send(line.clone());
                let (status, body) = if line.starts_with("GET /version ") {
                    (
                        "200 OK",
                        r#"{"major":"1","minor":"34","gitVersion":"v1.34.0","gitCommit":"","gitTreeState":"","buildDate":"","goVersion":"","compiler":"","platform":"linux/amd64"}"#,
                    )
                } else {
                    (
                        "404 Not Found",
                        r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#,
                    )
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(resp.as_bytes()).await.unwrap();
            });
        }
    });
    (port, rx)
}

#[tokio::test]
async fn reachable_context_yields_a_client_for_the_requested_namespace() {
    let (port, mut requests) = fake_version_server().await;
    let kc = Kubeconfig::from_yaml(&kubeconfig_yaml(&format!("http://127.0.0.1:{port}"))).unwrap();
    let target = connect(kc, "west", "mesh-system", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(target.context, "west");
    assert_eq!(target.namespace, "mesh-system");
    assert_eq!(target.client.default_namespace(), "mesh-system");
    assert_eq!(requests.recv().await.unwrap(), "GET /version HTTP/1.1");
}

#[tokio::test]
async fn a_server_that_does_not_answer_in_time_is_unreachable() {
    // Accepts connections but never replies.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let kc = Kubeconfig::from_yaml(&kubeconfig_yaml(&format!("http://127.0.0.1:{port}"))).unwrap();
    let err = connect(kc, "east", "kube-system", Duration::from_millis(300))
        .await
        .unwrap_err();
    holder.abort();
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot reach the Kubernetes API of context east: "),
        "{msg}"
    );
    assert!(msg.contains("no answer within 300ms"), "{msg}");
}
