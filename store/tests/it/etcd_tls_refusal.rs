//! An etcd that refuses our client certificate: connecting fails at once with etcd's
//! reason, rather than retrying for the whole connect deadline and then reporting a
//! closed connection.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use clustermesh_test_support as support;

use std::time::{Duration, Instant};

use clustermesh_certs::{MeshCa, ServerNames, TrustDomain, Validity};
use clustermesh_store::{EtcdConfig, EtcdConnectError, EtcdStore, EtcdTls};
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
    let validity = || Validity::from_now(Duration::from_secs(3600));
    let server_cert = ca
        .issue_server(
            "etcd",
            &ServerNames::new([], ["127.0.0.1".parse().unwrap()]),
            validity(),
        )
        .unwrap();
    // Signed by a CA etcd does not trust.
    let wrong_client = other_ca.issue_agent("east", validity()).unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_file = write("ca.pem", ca.cert_pem());
    let tls = ServerTls {
        ca_file: ca_file.clone(),
        cert_file: write("server.pem", &server_cert.cert_pem),
        key_file: write("server-key.pem", &server_cert.key_pem),
    };
    let client_pem = write("client.pem", &wrong_client.cert_pem);
    let client_key = write("client-key.pem", &wrong_client.key_pem);
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
