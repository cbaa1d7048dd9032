//! The `clustermesh-apiserver` binary as an operator runs it: raft store, `dir:` source,
//! mTLS from a bundle directory; health, readiness and metrics over HTTP; a remote cluster
//! watching over gRPC; a SIGTERM ending it cleanly. Loopback addresses only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support;
use clustermesh_api::v1;
use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_certs::transport::MeshEndpoint;
use support::{free_port, http_get, next_event, Pki};

fn copy_fixture(name: &str, to: &Path) {
    let from = format!(
        "{}/tests/fixtures/translate/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::copy(from, to.join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_exports_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let tls_dir = dir.path().join("tls");
    pki.write_loopback_bundle("east", &tls_dir);
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    copy_fixture("dualstack.yaml", &manifests);
    copy_fixture("nodes-pods.yaml", &manifests);

    let (grpc, ops, raft) = (free_port(), free_port(), free_port());
    let log_path = dir.path().join("apiserver.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args([
            "--cluster-name",
            "east",
            "--cluster-id",
            "3",
            "--pod-cidr",
            "10.0.0.0/16",
        ])
        .args(["--store", "raft", "--raft-id", "1"])
        .arg("--raft-data-dir")
        .arg(dir.path().join("raft"))
        .args(["--raft-listen", &format!("127.0.0.1:{raft}")])
        .arg(format!("--source=dir:{}", manifests.display()))
        .args(["--dir-poll-interval", "100ms"])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{ops}")])
        .arg("--tls-dir")
        .arg(&tls_dir)
        .args([
            "--trust-domain",
            support::TRUST_DOMAIN,
            "--log-format",
            "json",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    // Ready once the store is up and every kind is synced.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _)) = http_get(ops, "/readyz").await {
            break;
        }
        assert!(Instant::now() < deadline, "not ready within 60s");
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("apiserver exited with {status}: {log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http_get(ops, "/healthz").await.unwrap().0, 200);
    let (status, metrics) = http_get(ops, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("clustermesh_apiserver_records{kind=\"services\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("clustermesh_apiserver_records{kind=\"endpoints\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("clustermesh_apiserver_rejected_inputs_total{reason=\"port\"} 1"),
        "{metrics}"
    );

    // A remote cluster watches services: the exported ones only.
    let channel = MeshEndpoint::new(&format!("localhost:{grpc}"), pki.cluster_client("west"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = MeshApiClient::new(channel);
    let info = client
        .get_cluster_info(v1::GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.config.unwrap().id, 3);
    let request = v1::WatchRequest {
        kinds: vec![v1::Kind::Service.into()],
        from_revision: 0,
        all_clusters: false,
    };
    let mut stream = client.watch(request).await.unwrap().into_inner();
    let mut services = Vec::new();
    loop {
        match next_event(&mut stream).await {
            v1::watch_event::Event::Upsert(u) => services.push(u.key),
            v1::watch_event::Event::Synced(_) => break,
            other => panic!("{other:?}"),
        }
    }
    services.sort();
    // `bad-port` is not global: it is in the store (the metrics count it) but never
    // leaves the cluster.
    assert_eq!(services, ["mesh/v1/services/east/shop/web"]);

    // Editing a manifest reaches the watcher (only the exported service's delete).
    std::fs::remove_file(manifests.join("dualstack.yaml")).unwrap();
    let mut deleted = Vec::new();
    while deleted.is_empty() {
        if let v1::watch_event::Event::Delete(d) = next_event(&mut stream).await {
            deleted.push(d.key);
        }
    }
    assert_eq!(deleted, ["mesh/v1/services/east/shop/web"]);

    // SIGTERM: the open watch ends and the process exits 0.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within 20s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "exit status {status}: {log}");
    assert!(log.contains("SIGTERM"), "{log}");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    assert!(
        !matches!(end, Ok(Some(_))),
        "stream still delivering after shutdown: {end:?}"
    );
}
