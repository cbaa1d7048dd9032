//! Operators debug refused peers and expiring certificates from logs: these tests check
//! that the log lines carry the remote address and the reason.
// Test helpers outside #[test] fns unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use clustermesh_certs::files::{write_cluster_bundle, ClusterBundle};
use clustermesh_certs::transport::{incoming, IncomingConfig, MeshEndpoint};
use clustermesh_certs::{PeerIdentity, ReloadingTls, TlsPaths, TrustDomain, Validity};
use clustermesh_test_support::certs::*;

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

    /// Waits until `check` finds what it needs in the log.
    async fn wait_until<T>(&self, mut check: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text();
            if let Some(found) = check(&text) {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "log never had what the test waits for:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    assert!(line.contains("not issued by a trusted CA"), "{line}");
    assert!(line.contains("WARN"), "{line}");

    // The client side logs its failures too (here: the server is not in its CA).
    let stranger = MeshEndpoint::new(&addr.to_string(), client_tls(&theirs, "west")).unwrap();
    assert!(stranger.connect().await.is_err());
    logs.wait_for("mesh connection attempt failed").await;
}

/// Connects from a fresh socket with `config` and waits until the server has answered
/// or closed; returns the client's local address.
async fn attempt(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::net::SocketAddr {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        let _ = tls.read(&mut buf).await;
    }
    local
}

fn warn_lines(text: &str, needle: &str) -> usize {
    text.lines()
        .filter(|l| l.contains("WARN") && l.contains(needle))
        .count()
}

#[tokio::test]
async fn refused_identity_is_logged_in_plain_words_with_the_remote_address() {
    let logs = Captured::default();
    let _guard = logs.install();
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let _conns = incoming(listener, server_tls(&ca, "east"), IncomingConfig::default());

    // Our CA, but an identity of another trust domain: our verifier refuses it.
    let foreign = PeerIdentity::cluster(TrustDomain::new("other.mesh").unwrap(), "west").unwrap();
    let leaf = ca
        .issue(
            &foreign,
            &loopback_names(),
            &[rcgen::ExtendedKeyUsagePurpose::ClientAuth],
            valid(),
        )
        .unwrap();
    let local = attempt(addr, raw_client_config(ca.cert_pem(), Some(&leaf))).await;

    let text = logs.wait_for("handshake failed").await;
    let line = text
        .lines()
        .find(|l| l.contains("handshake failed"))
        .unwrap();
    assert!(line.contains(&format!("remote={local}")), "{line}");
    assert!(line.contains("spiffe://other.mesh/cluster/west"), "{line}");
    assert!(line.contains("reason=\"certificate_refused\""), "{line}");
    assert!(
        !line.contains("OtherError"),
        "Debug form in the log: {line}"
    );
}

#[tokio::test]
async fn a_flood_of_refused_handshakes_logs_one_warning_not_one_per_connection() {
    let logs = Captured::default();
    let _guard = logs.install();
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let conns = incoming(listener, server_tls(&ca, "east"), IncomingConfig::default());
    let stats = conns.stats();

    for _ in 0..30 {
        attempt(addr, raw_client_config(ca.cert_pem(), None)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stats.handshake_failures() < 30 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            stats.handshake_failures()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = logs.text();
    assert_eq!(warn_lines(&text, "handshake failed"), 1, "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("WARN") && l.contains("handshake failed"))
        .unwrap();
    assert!(line.contains("the peer sent no certificate"), "{line}");
    // Every attempt is still there at debug level, with its address.
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("DEBUG") && l.contains("no certificate"))
            .count(),
        29,
        "{text}"
    );
}

#[tokio::test]
async fn failures_not_logged_one_by_one_are_summarised_per_interval() {
    let logs = Captured::default();
    let _guard = logs.install();
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let config = IncomingConfig::default()
        .handshake_timeout(Duration::from_secs(600))
        .max_handshakes_per_source(1)
        .failure_log_interval(Duration::from_secs(1));
    let conns = incoming(listener, server_tls(&ca, "east"), config);
    let stats = conns.stats();

    // One idle connection holds the only slot of 127.0.0.1; ten more are refused.
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut refused = Vec::new();
    for _ in 0..10 {
        refused.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stats.refused() < 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            stats.refused()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = logs.wait_for("than were logged").await;
    let summary = text
        .lines()
        .find(|l| l.contains("than were logged"))
        .unwrap();
    assert!(summary.contains("WARN"), "{summary}");
    assert!(summary.contains("source_limit="), "{summary}");
    // The interval may have ended during the burst: the refusals logged at WARN one by
    // one and those in summaries add up to all ten.
    let one_by_one = warn_lines(&text, "mesh connection refused");
    assert!(one_by_one >= 1, "{text}");
    let summarised: u64 = logs
        .wait_until(|text| {
            let summed = summed_counts(text, "source_limit=");
            (warn_lines(text, "mesh connection refused") as u64 + summed >= 10).then_some(summed)
        })
        .await;
    assert_eq!(
        warn_lines(&logs.text(), "mesh connection refused") as u64 + summarised,
        10,
        "{}",
        logs.text()
    );
}

/// Sums the numbers after `key` in every summary line.
fn summed_counts(text: &str, key: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains("than were logged"))
        .filter_map(|l| {
            let rest = &l[l.find(key)? + key.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
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
