//! An etcd that refuses our client certificate: connecting fails at once with etcd's
//! reason, rather than retrying for the whole connect deadline and then reporting a
//! closed connection.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::time::{Duration, Instant};

use clustermesh_certs::{MeshCa, TrustDomain, Validity};
use clustermesh_store::{EtcdConfig, EtcdConnectError, EtcdStore, EtcdTls};
use clustermesh_test_support as support;
use support::certs::write_leaf;
use support::etcd::{etcd_binary, free_ports, EtcdServer, ServerTls};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_fails_fast_with_etcds_reason() {
    support::init_tracing();
    let Some(binary) = etcd_binary() else {
        let _ = EtcdServer::start_or_skip("a_refused_client_certificate_fails_fast").await;
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("test.mesh").unwrap();
    let ca = MeshCa::generate(td.clone()).unwrap();
    let other_ca = MeshCa::generate(td).unwrap();
    let tls = ServerTls::issue(&ca, dir.path());
    let ca_file = tls.ca_file.clone();
    // Signed by a CA etcd does not trust.
    let wrong_client = other_ca
        .issue_agent("east", Validity::from_now(Duration::from_secs(3600)))
        .unwrap();
    let (client_pem, client_key) = write_leaf(dir.path(), "client", &wrong_client);
    let (client_port, peer_port) = free_ports();
    let mut server = EtcdServer::prepared(binary, client_port, peer_port).with_tls(tls);
    server.launch().await.expect("etcd with TLS starts");

    // The default 60 s deadline: a refusal must not wait for it.
    let config = EtcdConfig::new([server.client_url()])
        .with_tls(EtcdTls::new(&ca_file).with_client_identity(&client_pem, &client_key));
    let started = Instant::now();
    let err = EtcdStore::connect(config)
        .await
        .expect_err("a client certificate from another CA");
    let waited = started.elapsed();
    let text = err.to_string();
    assert!(
        matches!(err, EtcdConnectError::TlsRefused { .. }),
        "{err:?}: {text}"
    );
    assert!(
        waited < Duration::from_secs(20),
        "gave up only after {waited:?}: {text}"
    );
    assert!(
        text.contains("TLS with etcd at")
            && (text.contains("BadCertificate")
                || text.contains("UnknownCA")
                || text.contains("CertificateRequired")),
        "etcd's reason is missing: {text}"
    );
    assert!(!text.contains("operation was canceled"), "{text}");
}
