//! Idle and slow connections must not starve real clients (issue 11, item 7): the accept
//! loop caps handshakes in flight per source address, refuses the excess at once and
//! keeps serving everybody else. Loopback has many addresses (127.0.0.0/8), so each test
//! plays several hosts by binding its client sockets.
// Test helpers outside #[test] fns unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use clustermesh_certs::transport::{incoming, IncomingConfig, MeshIncoming, MeshTlsStream};
use clustermesh_certs::{MeshCa, TlsSource};
use clustermesh_test_support::certs::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_stream::StreamExt;

const DEADLINE: Duration = Duration::from_secs(20);

/// Long enough that no idle connection of a test times out while the test runs: what
/// lets a real client in is the cap, not a timeout freeing a slot.
const NEVER: Duration = Duration::from_secs(600);

async fn tcp_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// A real mTLS client of `ca` connecting from `source`; returns its local address.
async fn mtls_client_from(source: &str, addr: SocketAddr, ca: &MeshCa) -> SocketAddr {
    let tcp = tcp_from(source, addr).await;
    let local = tcp.local_addr().unwrap();
    let config = client_tls(ca, "west").client_config();
    let name = ServerName::try_from("localhost").unwrap();
    // In TLS 1.3 the client finishes first; the server's verdict shows in `incoming`.
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    // Keep the client side open while the server picks the connection up.
    tokio::spawn(async move {
        let _tls = tls;
        tokio::time::sleep(DEADLINE).await;
    });
    local
}

async fn next_conn(conns: &mut MeshIncoming) -> MeshTlsStream {
    tokio::time::timeout(DEADLINE, conns.next())
        .await
        .expect("no verified connection came through the accept loop")
        .unwrap()
        .unwrap()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server closed `tcp` (EOF or reset) instead of leaving it waiting.
async fn assert_closed_by_server(tcp: &mut TcpStream) {
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
        .await
        .expect("the server left the connection open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn six_hundred_idle_connections_from_one_address_do_not_starve_a_client_from_another() {
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    // Production caps (512 in total, 32 per source); only the timeout is stretched.
    let mut conns = incoming(
        listener,
        server_tls(&ca, "east"),
        IncomingConfig::default().handshake_timeout(NEVER),
    );
    let stats = conns.stats();
    let config = IncomingConfig::default();

    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(tcp_from("127.0.0.2", addr).await);
    }
    let excess = 600 - config.max_handshakes_per_source as u64;
    eventually("the accept loop to refuse the idle excess", || {
        stats.refused() == excess
    })
    .await;
    assert_eq!(
        stats.handshakes_in_flight(),
        config.max_handshakes_per_source as u64
    );
    // The last idle connection was over the cap: it was closed, not parked.
    assert_closed_by_server(idle.last_mut().unwrap()).await;

    let client = mtls_client_from("127.0.0.3", addr, &ca).await;
    let conn = next_conn(&mut conns).await;
    assert_eq!(conn.info().remote_addr, client);
    assert_eq!(conn.peer().name(), "west");
    // The client did not get in because idle connections timed out.
    assert_eq!(stats.handshake_timeouts(), 0);
}

#[tokio::test]
async fn per_source_cap_refuses_the_excess_of_one_address_while_another_is_served() {
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let config = IncomingConfig::default()
        .handshake_timeout(NEVER)
        .max_handshakes_per_source(4);
    let mut conns = incoming(listener, server_tls(&ca, "east"), config);
    let stats = conns.stats();

    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from("127.0.0.4", addr).await);
    }
    eventually("four handshakes in flight", || {
        stats.handshakes_in_flight() == 4
    })
    .await;
    let mut fifth = tcp_from("127.0.0.4", addr).await;
    assert_closed_by_server(&mut fifth).await;
    assert_eq!(stats.refused(), 1);

    // Another address is served while 127.0.0.4 is at its cap.
    let client = mtls_client_from("127.0.0.5", addr, &ca).await;
    assert_eq!(next_conn(&mut conns).await.info().remote_addr, client);

    // Even a real client from the capped address is refused until a slot frees.
    let mut sixth = tcp_from("127.0.0.4", addr).await;
    assert_closed_by_server(&mut sixth).await;
    assert_eq!(stats.refused(), 2);
    drop(held.pop());
    // The server notices the close (an early close) and frees the slot.
    eventually("a freed slot", || stats.handshakes_in_flight() == 3).await;
    let client = mtls_client_from("127.0.0.4", addr, &ca).await;
    assert_eq!(next_conn(&mut conns).await.info().remote_addr, client);
}

#[test]
fn default_handshake_timeout_is_a_few_seconds() {
    // Our own components finish a TLS 1.3 handshake in milliseconds; an idle connection
    // holds a slot for at most this long.
    let timeout = IncomingConfig::default().handshake_timeout;
    assert!(timeout <= Duration::from_secs(5), "{timeout:?}");
    assert!(timeout >= Duration::from_secs(3), "{timeout:?}");
}
