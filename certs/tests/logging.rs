//! Operators debug refused peers and expiring certificates from logs: these tests check
//! that the log lines carry the remote address and the reason.
// Test helpers outside #[test] fns unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clustermesh_certs::files::{write_cluster_bundle, ClusterBundle};
use clustermesh_certs::transport::{incoming, IncomingConfig, MeshEndpoint};
use clustermesh_certs::{ReloadingTls, TlsPaths, Validity};
use common::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Installs a subscriber writing into this buffer for the current thread (the
    /// tests use tokio's current-thread runtime, so spawned tasks log here too).
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    async fn wait_for(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "log never contained {needle:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn refused_handshake_is_logged_with_remote_address_and_reason() {
    let logs = Captured::default();
    let _guard = logs.install();
    let ours = ca();
    let theirs = ca();
    let (listener, addr) = loopback_listener().await;
    let _conns = incoming(
        listener,
        server_tls(&ours, "east"),
        IncomingConfig::default(),
    );

    // Client presents a certificate of another CA but trusts ours.
    let leaf = theirs.issue_agent("west", valid()).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let config = raw_client_config(ours.cert_pem(), Some(&leaf));
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let _ = tls.read(&mut buf).await;
    }

    let text = logs.wait_for("handshake failed").await;
    let line = text
        .lines()
        .find(|l| l.contains("handshake failed"))
        .unwrap();
    assert!(line.contains(&local.to_string()), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(line.contains("WARN"), "{line}");

    // The client side logs its failures too (here: the server is not in its CA).
    let stranger = MeshEndpoint::new(&addr.to_string(), client_tls(&theirs, "west")).unwrap();
    assert!(stranger.connect().await.is_err());
    logs.wait_for("mesh connection attempt failed").await;
}

#[tokio::test]
async fn watcher_warns_about_a_certificate_close_to_expiry() {
    let logs = Captured::default();
    let _guard = logs.install();
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let now = SystemTime::now();
    let soon = Validity::between(
        now - Duration::from_secs(60),
        now + Duration::from_secs(24 * 3600),
    );
    let bundle = ClusterBundle::issue(&ca, "east", &loopback_names(), soon).unwrap();
    write_cluster_bundle(dir.path(), &bundle).unwrap();
    let tls = ReloadingTls::load(td(), TlsPaths::server(dir.path())).unwrap();
    let _watcher = tls.spawn_watcher(Duration::from_millis(50));
    let text = logs.wait_for("expires soon").await;
    let line = text.lines().find(|l| l.contains("expires soon")).unwrap();
    assert!(
        line.contains("spiffe://clustermesh.local/cluster/east"),
        "{line}"
    );
    assert!(line.contains("server.crt"), "{line}");
}

#[tokio::test]
async fn watcher_is_quiet_about_a_certificate_far_from_expiry() {
    let logs = Captured::default();
    let _guard = logs.install();
    let dir = tempfile::tempdir().unwrap();
    let bundle = ClusterBundle::issue(&ca(), "east", &loopback_names(), valid()).unwrap();
    write_cluster_bundle(dir.path(), &bundle).unwrap();
    let tls = ReloadingTls::load(td(), TlsPaths::server(dir.path())).unwrap();
    let mut generations = tls.subscribe();
    let watcher = tls.spawn_watcher(Duration::from_millis(20));
    // Let the watcher run a few polls: a rotation proves it ticked.
    let rotated = ClusterBundle::issue(&ca(), "east", &loopback_names(), valid()).unwrap();
    write_cluster_bundle(dir.path(), &rotated).unwrap();
    tokio::time::timeout(Duration::from_secs(20), generations.changed())
        .await
        .unwrap()
        .unwrap();
    drop(watcher);
    // The reload itself logs from a blocking-pool thread (not captured here); the
    // expiry check runs on the watcher task, which is.
    let text = logs.text();
    assert!(!text.contains("expires soon"), "{text}");
}
