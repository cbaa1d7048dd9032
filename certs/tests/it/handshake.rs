//! mTLS handshakes between our server and client configs: who gets in, who is refused,
//! and what the server learns about the peer.
// Test helpers outside #[test] fns unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_certs::transport::{
    accept_mesh_tls, incoming, ConnectError, HandshakeError, HandshakeFailure, HandshakeObserver,
    IncomingConfig, MeshEndpoint, MeshTlsStream,
};
use clustermesh_certs::{IdentityError, MeshCa, MeshTls, PeerIdentity, TlsSource, TrustDomain};
use clustermesh_test_support::certs::*;
use rustls::pki_types::ServerName;
use rustls::CertificateError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;

const DEADLINE: Duration = Duration::from_secs(20);

/// Runs one handshake of `client` against our server config and returns the server's
/// verdict and whether the client could complete a round trip.
async fn handshake_with(
    server: Arc<MeshTls>,
    client: Arc<rustls::ClientConfig>,
) -> (Result<MeshTlsStream, HandshakeError>, std::io::Result<()>) {
    let (listener, addr) = loopback_listener().await;
    let server_side = tokio::spawn(async move {
        let (tcp, remote) = listener.accept().await.unwrap();
        let result = accept_mesh_tls(tcp, remote, server.server_config(), &td(), DEADLINE).await;
        match result {
            Ok(mut stream) => {
                let mut buf = [0u8; 4];
                stream.read_exact(&mut buf).await.unwrap();
                stream.write_all(b"pong").await.unwrap();
                stream.flush().await.unwrap();
                Ok(stream)
            }
            Err(e) => Err(e),
        }
    });
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(())
    };
    let client_result = tokio::time::timeout(DEADLINE, client_side)
        .await
        .expect("client side hung");
    let server_result = tokio::time::timeout(DEADLINE, server_side)
        .await
        .expect("server side hung")
        .unwrap();
    (server_result, client_result)
}

fn server_rustls_error(result: Result<MeshTlsStream, HandshakeError>) -> rustls::Error {
    match result {
        Err(HandshakeError::Tls(e)) => rustls_error(&e)
            .unwrap_or_else(|| panic!("not a rustls error: {e}"))
            .clone(),
        Err(other) => panic!("unexpected handshake error: {other}"),
        Ok(stream) => panic!("handshake accepted {}", stream.peer()),
    }
}

fn identity_error(err: &rustls::Error) -> &IdentityError {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other
            .0
            .downcast_ref::<IdentityError>()
            .unwrap_or_else(|| panic!("not an identity error: {err}")),
        _ => panic!("not an identity rejection: {err:?}"),
    }
}

#[tokio::test]
async fn valid_client_is_accepted_and_server_sees_its_identity() {
    let ca = ca();
    let leaf = ca.issue_agent("west", valid()).unwrap();
    let (server, client) = handshake_with(
        server_tls(&ca, "east"),
        raw_client_config(ca.cert_pem(), Some(&leaf)),
    )
    .await;
    client.unwrap();
    let stream = server.unwrap();
    assert_eq!(stream.peer(), &PeerIdentity::agent(td(), "west").unwrap());
    assert!(stream.info().remote_addr.ip().is_loopback());
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = ca();
    let (server, client) = handshake_with(
        server_tls(&ca, "east"),
        raw_client_config(ca.cert_pem(), None),
    )
    .await;
    assert!(
        client.is_err(),
        "client completed a round trip without a certificate"
    );
    assert_eq!(
        server_rustls_error(server),
        rustls::Error::NoCertificatesPresented
    );
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ours = ca();
    let theirs = ca();
    let leaf = theirs.issue_agent("west", valid()).unwrap();
    // The client trusts our CA (so it accepts the server) but its own cert is foreign.
    let (server, client) = handshake_with(
        server_tls(&ours, "east"),
        raw_client_config(ours.cert_pem(), Some(&leaf)),
    )
    .await;
    assert!(client.is_err());
    assert_eq!(
        server_rustls_error(server),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = ca();
    let leaf = ca.issue_agent("west", expired()).unwrap();
    let (server, client) = handshake_with(
        server_tls(&ca, "east"),
        raw_client_config(ca.cert_pem(), Some(&leaf)),
    )
    .await;
    assert!(client.is_err());
    let err = server_rustls_error(server);
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_from_other_trust_domain_is_refused() {
    let ca = ca();
    let foreign = PeerIdentity::cluster(TrustDomain::new("other.mesh").unwrap(), "west").unwrap();
    let leaf = ca
        .issue(
            &foreign,
            &Default::default(),
            &[rcgen::ExtendedKeyUsagePurpose::ClientAuth],
            valid(),
        )
        .unwrap();
    let (server, client) = handshake_with(
        server_tls(&ca, "east"),
        raw_client_config(ca.cert_pem(), Some(&leaf)),
    )
    .await;
    assert!(client.is_err());
    let err = server_rustls_error(server);
    assert!(
        matches!(identity_error(&err), IdentityError::ForeignTrustDomain { got, .. } if got == "other.mesh"),
        "{err}"
    );
}

/// Signs a leaf with `ca` whose URI SANs are exactly `uris` (bypassing `MeshCa::issue`).
fn leaf_with_uris(ca: &MeshCa, uris: &[&str]) -> clustermesh_certs::IssuedCert {
    let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca.cert_pem(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    for uri in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
    }
    let cert = params.signed_by(&key, &issuer).unwrap();
    clustermesh_certs::IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test]
async fn client_without_exactly_one_identity_is_refused() {
    let ca = ca();
    type Expect = fn(&IdentityError) -> bool;
    let cases: [(&[&str], Expect); 3] = [
        (&[], |e| matches!(e, IdentityError::NoIdentity)),
        (&["https://example.com/x"], |e| {
            matches!(e, IdentityError::NoIdentity)
        }),
        (
            &[
                "spiffe://clustermesh.local/cluster/a",
                "spiffe://clustermesh.local/admin/b",
            ],
            |e| matches!(e, IdentityError::MultipleIdentities { count: 2 }),
        ),
    ];
    for (uris, expected) in cases {
        let leaf = leaf_with_uris(&ca, uris);
        let (server, client) = handshake_with(
            server_tls(&ca, "east"),
            raw_client_config(ca.cert_pem(), Some(&leaf)),
        )
        .await;
        assert!(client.is_err(), "{uris:?}");
        let err = server_rustls_error(server);
        assert!(expected(identity_error(&err)), "{uris:?}: {err}");
    }
}

#[tokio::test]
async fn admin_client_is_accepted_with_admin_identity() {
    let ca = ca();
    let leaf = ca.issue_admin("alice", valid()).unwrap();
    let (server, client) = handshake_with(
        server_tls(&ca, "east"),
        raw_client_config(ca.cert_pem(), Some(&leaf)),
    )
    .await;
    client.unwrap();
    let stream = server.unwrap();
    assert!(stream.peer().is_admin());
    assert_eq!(stream.peer().name(), "alice");
}

#[tokio::test]
async fn incoming_yields_verified_connections_and_client_sees_server_identity() {
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let mut conns = incoming(listener, server_tls(&ca, "east"), IncomingConfig::default());
    let endpoint = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    let (mut client, server_peer) = endpoint.dial().await.unwrap();
    assert_eq!(server_peer, PeerIdentity::cluster(td(), "east").unwrap());
    let mut server = tokio::time::timeout(DEADLINE, conns.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(server.peer(), &PeerIdentity::agent(td(), "west").unwrap());
    assert_eq!(
        Some(server.info().remote_addr),
        client.get_ref().0.local_addr().ok()
    );
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(conns.stats().accepted(), 1);
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

#[tokio::test]
async fn failed_handshakes_do_not_stop_the_accept_loop() {
    let ca = ca();
    let other = MeshCa::generate(td()).unwrap();
    let (listener, addr) = loopback_listener().await;
    let mut conns = incoming(listener, server_tls(&ca, "east"), IncomingConfig::default());
    let stats = conns.stats();

    // A client of another CA: the client refuses the server, the server sees an abort.
    let bad = MeshEndpoint::new(&addr.to_string(), client_tls(&other, "west")).unwrap();
    let err = bad.dial().await.unwrap_err();
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
    // A client without certificate: the server refuses it.
    let no_cert = raw_client_config(ca.cert_pem(), None);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(no_cert)
        .connect(name, tcp)
        .await
    {
        let mut buf = [0u8; 1];
        assert!(!matches!(tls.read(&mut buf).await, Ok(n) if n > 0));
    }
    eventually("two handshake failures", || stats.handshake_failures() == 2).await;

    let good = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    good.dial().await.unwrap();
    let conn = tokio::time::timeout(DEADLINE, conns.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(conn.peer().name(), "west");
    assert_eq!(stats.accepted(), 1);
}

#[tokio::test]
async fn stalled_handshake_times_out_without_blocking_others() {
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let config = IncomingConfig::default().handshake_timeout(Duration::from_millis(300));
    let mut conns = incoming(listener, server_tls(&ca, "east"), config);
    let stats = conns.stats();

    // Opens TCP and never speaks TLS.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let good = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    good.dial().await.unwrap();
    tokio::time::timeout(DEADLINE, conns.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(DEADLINE, silent.read(&mut buf))
        .await
        .expect("stalled connection was not closed");
    assert!(matches!(n, Ok(0) | Err(_)));
    eventually("a handshake timeout", || stats.handshake_timeouts() == 1).await;
    assert_eq!(stats.handshake_failures(), 0);
}

#[tokio::test]
async fn full_handshake_slots_refuse_new_connections_at_once_and_established_streams_keep_working()
{
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    // One slot, and a timeout longer than the test: nothing frees the slot by itself.
    let config = IncomingConfig::default()
        .max_concurrent_handshakes(1)
        .handshake_timeout(Duration::from_secs(600));
    let mut conns = incoming(listener, server_tls(&ca, "east"), config);
    let stats = conns.stats();

    let good = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    let (mut client, _) = good.dial().await.unwrap();
    let mut established = tokio::time::timeout(DEADLINE, conns.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The silent client takes the only handshake slot.
    let _silent = TcpStream::connect(addr).await.unwrap();
    eventually("the slot to be taken", || stats.handshakes_in_flight() == 1).await;
    // A new client is refused at once: the server closes it instead of parking it in
    // the listen backlog until the dial times out.
    let err = good.dial().await.unwrap_err();
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
    assert_eq!(stats.refused(), 1);

    // The established connection is served all along.
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 4];
    established.read_exact(&mut buf).await.unwrap();
    established.write_all(b"pong").await.unwrap();
    established.flush().await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(stats.accepted(), 1);
    assert_eq!(stats.handshake_timeouts(), 0);
}

/// Counts what the accept loop reports, per outcome.
#[derive(Debug, Default)]
struct Recorder {
    accepted: AtomicU64,
    failed: Mutex<HashMap<HandshakeFailure, u64>>,
}

impl HandshakeObserver for Recorder {
    fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self, reason: HandshakeFailure) {
        *self.failed.lock().unwrap().entry(reason).or_default() += 1;
    }
}

impl Recorder {
    fn failed(&self, reason: HandshakeFailure) -> u64 {
        self.failed
            .lock()
            .unwrap()
            .get(&reason)
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn observer_counts_every_outcome_by_reason() {
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let recorder = Arc::new(Recorder::default());
    let config = IncomingConfig::default()
        .max_handshakes_per_source(1)
        // Long enough for the refused connection to arrive while the slot is held.
        .handshake_timeout(Duration::from_secs(2))
        .observer(recorder.clone());
    let mut conns = incoming(listener, server_tls(&ca, "east"), config);
    let stats = conns.stats();

    // No client certificate.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(raw_client_config(ca.cert_pem(), None))
        .connect(name, tcp)
        .await
    {
        let mut buf = [0u8; 1];
        let _ = tls.read(&mut buf).await;
    }
    eventually("a no-certificate failure", || {
        recorder.failed(HandshakeFailure::NoCertificate) == 1
    })
    .await;
    // A probe that closes at once.
    drop(TcpStream::connect(addr).await.unwrap());
    eventually("an early close", || {
        recorder.failed(HandshakeFailure::EarlyClose) == 1
    })
    .await;
    // A silent client holds the address's only slot; the next one is refused; then the
    // silent one times out.
    let _silent = TcpStream::connect(addr).await.unwrap();
    eventually("the slot to be taken", || stats.handshakes_in_flight() == 1).await;
    let _refused = TcpStream::connect(addr).await.unwrap();
    eventually("a refusal and a timeout", || {
        recorder.failed(HandshakeFailure::SourceLimit) == 1
            && recorder.failed(HandshakeFailure::Timeout) == 1
    })
    .await;
    // And a good client.
    let good = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    good.dial().await.unwrap();
    tokio::time::timeout(DEADLINE, conns.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(recorder.accepted.load(Ordering::Relaxed), 1);
    assert_eq!(stats.refused(), 1);
    assert_eq!(stats.handshake_failures(), 1);
}

#[tokio::test]
async fn dial_gives_up_after_the_connect_timeout() {
    let ca = ca();
    // A listener nobody accepts on: TCP completes in the kernel, TLS never answers.
    let (_listener, addr) = loopback_listener().await;
    let endpoint = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west"))
        .unwrap()
        .connect_timeout(Duration::from_millis(200));
    let err = endpoint.dial().await.unwrap_err();
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn tcp_probe_counts_as_early_close_not_as_failure() {
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let mut conns = incoming(listener, server_tls(&ca, "east"), IncomingConfig::default());
    let stats = conns.stats();
    // A load balancer health check: connect, then close without a byte.
    drop(TcpStream::connect(addr).await.unwrap());
    // A probe that sends a partial ClientHello record header and closes.
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    drop(partial);
    eventually("two early closes", || stats.early_closes() == 2).await;
    assert_eq!(stats.handshake_failures(), 0);

    let good = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    good.dial().await.unwrap();
    tokio::time::timeout(DEADLINE, conns.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn client_refuses_server_of_other_trust_domain() {
    let ca = ca();
    let foreign = PeerIdentity::cluster(TrustDomain::new("other.mesh").unwrap(), "east").unwrap();
    let leaf = ca
        .issue(
            &foreign,
            &loopback_names(),
            &[rcgen::ExtendedKeyUsagePurpose::ServerAuth],
            valid(),
        )
        .unwrap();
    // The server side of this test runs without our identity check (plain rustls).
    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_der(&leaf)],
            clustermesh_certs::pem::parse_private_key(leaf.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = tokio_rustls::TlsAcceptor::from(Arc::new(server_config))
            .accept(tcp)
            .await;
    });
    let endpoint = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    let err = endpoint.dial().await.unwrap_err();
    let ConnectError::Tls { source, .. } = &err else {
        panic!("{err}");
    };
    let rustls_err = rustls_error(source).unwrap();
    assert!(
        matches!(
            identity_error(rustls_err),
            IdentityError::ForeignTrustDomain { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn client_checks_server_name_and_expected_identity() {
    let ca = ca();
    let (listener, addr) = loopback_listener().await;
    let _conns = incoming(listener, server_tls(&ca, "east"), IncomingConfig::default());

    let wrong_name = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west"))
        .unwrap()
        .with_server_name("mesh.elsewhere.example")
        .unwrap();
    let err = wrong_name.dial().await.unwrap_err();
    let ConnectError::Tls { source, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        matches!(
            rustls_error(source),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{err}"
    );

    let by_dns = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west"))
        .unwrap()
        .with_server_name("localhost")
        .unwrap();
    by_dns.dial().await.unwrap();

    let expecting_other = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west"))
        .unwrap()
        .expect_peer(PeerIdentity::cluster(td(), "north").unwrap());
    let err = expecting_other.dial().await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::UnexpectedPeer { got, .. } if got.name() == "east"),
        "{err}"
    );
}

#[tokio::test]
async fn client_refuses_expired_server_certificate() {
    let ca = ca();
    let leaf = ca
        .issue_server("east", &loopback_names(), expired())
        .unwrap();
    let (listener, addr) = loopback_listener().await;
    let _conns = incoming(
        listener,
        tls(ca.cert_pem(), &leaf),
        IncomingConfig::default(),
    );
    let endpoint = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west")).unwrap();
    let err = endpoint.dial().await.unwrap_err();
    let ConnectError::Tls { source, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        matches!(
            rustls_error(source),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ),
        "{err}"
    );
}
