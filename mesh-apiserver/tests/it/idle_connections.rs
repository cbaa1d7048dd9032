//! Idle TCP connections must not stall the mesh API (issue 11, item 7): 600 connections
//! that never speak TLS made a valid `GetClusterInfo` take 8.5 s and wrote a WARN line
//! each. Now one address gets a few handshake slots, the excess is refused at once and
//! counted in `/metrics`, and other clients are served meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use clustermesh_api::v1;
use clustermesh_certs::transport::IncomingConfig;
use support::{Backend, Pki, ServerSetup, TestServer, TestStore};
use tokio::net::{TcpSocket, TcpStream};

/// Reads one sample of the handshake failure counter from the Prometheus text.
fn failures(metrics: &str, reason: &str) -> u64 {
    let prefix =
        format!("clustermesh_apiserver_tls_handshake_failures_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in\n{metrics}"))
        .parse()
        .unwrap()
}

async fn tcp_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_idle_connections_do_not_stall_get_cluster_info() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let pki = Pki::new();
    let mut setup = ServerSetup::new("east");
    // Production caps; the timeout is stretched beyond the test so that no idle
    // connection's timeout is what lets the client in.
    setup.incoming = IncomingConfig::default().handshake_timeout(Duration::from_secs(600));
    let per_source = setup.incoming.max_handshakes_per_source as u64;
    let server = TestServer::start(Arc::clone(&ts.store), &pki, setup).await;

    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(tcp_from("127.0.0.2", server.addr).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while failures(&server.metrics.encode(), "source_limit") < 600 - per_source {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle excess not refused:\n{}",
            server.metrics.encode()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A real client (from 127.0.0.1) is served while 127.0.0.2 holds its slots.
    let call = async {
        let mut client = server.client(pki.cluster_client("west")).await;
        client
            .get_cluster_info(v1::GetClusterInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let info = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("GetClusterInfo stalled behind idle connections");
    assert_eq!(info.config.unwrap().name, "east");

    let metrics = server.metrics.encode();
    assert_eq!(failures(&metrics, "source_limit"), 600 - per_source);
    assert_eq!(failures(&metrics, "timeout"), 0, "{metrics}");
    assert!(
        metrics.contains("clustermesh_apiserver_tls_handshakes_accepted_total 1"),
        "{metrics}"
    );
    drop(idle);
    server.stop().await;
}
