//! Hot reload: rotated files are used for new connections, established connections keep
//! working, and bad new files leave the last good material in place.
// Test helpers outside #[test] fns unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_certs::files::{
    write_cert, write_cluster_bundle, write_private_key, ClusterBundle,
};
use clustermesh_certs::reload::ReloadOutcome;
use clustermesh_certs::transport::{
    incoming, IncomingConfig, MeshEndpoint, MeshIncoming, MeshTlsStream,
};
use clustermesh_certs::{MeshCa, ReloadingTls, TlsError, TlsPaths, TlsSource};
use clustermesh_test_support::certs::*;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_stream::StreamExt;

const DEADLINE: Duration = Duration::from_secs(20);

/// A bundle directory's content whose `ca.crt` is the tests' shared, labelled CA.
fn bundle(ca: &MeshCa, cluster: &str) -> ClusterBundle {
    let mut b = ClusterBundle::issue(ca, cluster, &loopback_names(), valid()).unwrap();
    b.ca_pem = shared(ca);
    b
}

fn server_cert_der(b: &ClusterBundle) -> CertificateDer<'static> {
    leaf_der(&b.server)
}

struct Server {
    tls: Arc<ReloadingTls>,
    conns: MeshIncoming,
    addr: String,
}

async fn start_server(dir: &Path) -> Server {
    let tls = ReloadingTls::load(td(), TlsPaths::server(dir)).unwrap();
    let (listener, addr) = loopback_listener().await;
    let conns = incoming(listener, tls.clone(), IncomingConfig::default());
    Server {
        tls,
        conns,
        addr: addr.to_string(),
    }
}

impl Server {
    async fn next_conn(&mut self) -> MeshTlsStream {
        tokio::time::timeout(DEADLINE, self.conns.next())
            .await
            .expect("no connection accepted")
            .unwrap()
            .unwrap()
    }
}

async fn dial(addr: &str, tls: Arc<dyn TlsSource>) -> TlsStream<TcpStream> {
    MeshEndpoint::new(addr, tls)
        .unwrap()
        .dial()
        .await
        .unwrap()
        .0
}

fn presented_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Proves the connection still carries data both ways.
async fn round_trip(client: &mut TlsStream<TcpStream>, server: &mut MeshTlsStream) {
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(DEADLINE, server.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    server.flush().await.unwrap();
    tokio::time::timeout(DEADLINE, client.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn rotated_server_certificate_is_used_for_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let first = bundle(&ca, "east");
    write_cluster_bundle(dir.path(), &first).unwrap();
    let mut server = start_server(dir.path()).await;
    let client = client_tls(&ca, "west");

    let mut old_client = dial(&server.addr, client.clone()).await;
    let mut old_server = server.next_conn().await;
    assert_eq!(presented_cert(&old_client), server_cert_der(&first));

    let second = bundle(&ca, "east");
    write_cluster_bundle(dir.path(), &second).unwrap();
    assert_eq!(server.tls.reload().unwrap(), ReloadOutcome::Reloaded);
    assert_eq!(server.tls.generation(), 1);

    let mut new_client = dial(&server.addr, client).await;
    let mut new_server = server.next_conn().await;
    assert_eq!(presented_cert(&new_client), server_cert_der(&second));
    round_trip(&mut new_client, &mut new_server).await;
    round_trip(&mut old_client, &mut old_server).await;
}

#[tokio::test]
async fn ca_rotation_refuses_old_clients_on_new_connections_but_keeps_established_ones() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = ca();
    write_cluster_bundle(dir.path(), &bundle(&old_ca, "east")).unwrap();
    let mut server = start_server(dir.path()).await;
    let old_client_tls = client_tls(&old_ca, "west");
    let mut old_client = dial(&server.addr, old_client_tls.clone()).await;
    let mut old_server = server.next_conn().await;

    let new_ca = ca();
    write_cluster_bundle(dir.path(), &bundle(&new_ca, "east")).unwrap();
    assert_eq!(server.tls.reload().unwrap(), ReloadOutcome::Reloaded);

    let refused = MeshEndpoint::new(&server.addr, old_client_tls)
        .unwrap()
        .dial()
        .await;
    assert!(refused.is_err(), "a client of the retired CA got in");
    let mut new_client = dial(&server.addr, client_tls(&new_ca, "west")).await;
    let mut new_server = server.next_conn().await;
    round_trip(&mut new_client, &mut new_server).await;
    round_trip(&mut old_client, &mut old_server).await;
}

#[tokio::test]
async fn bad_new_material_is_rejected_and_last_good_material_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let good = bundle(&ca, "east");
    let paths = write_cluster_bundle(dir.path(), &good).unwrap();
    let mut server = start_server(dir.path()).await;
    let client = client_tls(&ca, "west");

    // Corrupt certificate: the error names the file, the old cert is still served.
    write_cert(
        &paths.server_cert,
        "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = server.tls.reload().unwrap_err();
    assert!(
        err.to_string()
            .contains(&paths.server_cert.display().to_string()),
        "{err}"
    );
    assert_eq!(server.tls.reload().unwrap(), ReloadOutcome::Unchanged);
    let conn = dial(&server.addr, client.clone()).await;
    server.next_conn().await;
    assert_eq!(presented_cert(&conn), server_cert_der(&good));

    // A valid certificate with somebody else's key.
    let other = bundle(&ca, "east");
    write_cert(&paths.server_cert, &other.server.cert_pem).unwrap();
    let err = server.tls.reload().unwrap_err();
    assert!(
        matches!(err, TlsError::Material { .. }) && err.to_string().contains("private key"),
        "{err}"
    );
    // A certificate of another trust domain.
    let foreign = clustermesh_certs::PeerIdentity::cluster(
        clustermesh_certs::TrustDomain::new("other.mesh").unwrap(),
        "east",
    )
    .unwrap();
    let foreign_leaf = ca
        .issue(
            &foreign,
            &loopback_names(),
            &[rcgen::ExtendedKeyUsagePurpose::ServerAuth],
            valid(),
        )
        .unwrap();
    write_private_key(&paths.server_key, &foreign_leaf.key_pem).unwrap();
    write_cert(&paths.server_cert, &foreign_leaf.cert_pem).unwrap();
    let err = server.tls.reload().unwrap_err();
    assert!(err.to_string().contains("other.mesh"), "{err}");
    assert_eq!(server.tls.generation(), 0);
    let conn = dial(&server.addr, client.clone()).await;
    server.next_conn().await;
    assert_eq!(presented_cert(&conn), server_cert_der(&good));

    // The fixed pair is picked up.
    write_private_key(&paths.server_key, &other.server.key_pem).unwrap();
    write_cert(&paths.server_cert, &other.server.cert_pem).unwrap();
    assert_eq!(server.tls.reload().unwrap(), ReloadOutcome::Reloaded);
    let conn = dial(&server.addr, client).await;
    server.next_conn().await;
    assert_eq!(presented_cert(&conn), server_cert_der(&other));
}

#[tokio::test]
async fn missing_file_during_rotation_keeps_last_good_material() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let paths = write_cluster_bundle(dir.path(), &bundle(&ca, "east")).unwrap();
    let mut server = start_server(dir.path()).await;
    std::fs::remove_file(&paths.server_key).unwrap();
    let err = server.tls.reload().unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    dial(&server.addr, client_tls(&ca, "west")).await;
    server.next_conn().await;
}

#[tokio::test]
async fn watcher_picks_up_rotation_and_notifies_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    write_cluster_bundle(dir.path(), &bundle(&ca, "east")).unwrap();
    let mut server = start_server(dir.path()).await;
    let mut generations = server.tls.subscribe();
    let _watcher = server.tls.spawn_watcher(Duration::from_millis(50));

    let rotated = bundle(&ca, "east");
    write_cluster_bundle(dir.path(), &rotated).unwrap();
    tokio::time::timeout(DEADLINE, generations.changed())
        .await
        .expect("watcher did not reload")
        .unwrap();
    assert!(*generations.borrow() >= 1);
    let conn = dial(&server.addr, client_tls(&ca, "west")).await;
    server.next_conn().await;
    assert_eq!(presented_cert(&conn), server_cert_der(&rotated));
}

#[tokio::test]
async fn client_side_reload_keeps_the_identity_and_refuses_a_certificate_naming_another() {
    let server_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let ca = ca();
    write_cluster_bundle(server_dir.path(), &bundle(&ca, "east")).unwrap();
    write_cluster_bundle(client_dir.path(), &bundle(&ca, "west")).unwrap();
    let mut server = start_server(server_dir.path()).await;
    let client = ReloadingTls::load(td(), TlsPaths::client(client_dir.path())).unwrap();
    let endpoint = MeshEndpoint::new(&server.addr, client.clone()).unwrap();

    endpoint.dial().await.unwrap();
    assert_eq!(server.next_conn().await.peer().name(), "west");

    // Another cluster's files copied over ours: refused, the last good material stays.
    write_cluster_bundle(client_dir.path(), &bundle(&ca, "west-2")).unwrap();
    let err = client.reload().unwrap_err();
    assert!(err.to_string().contains("this process runs as"), "{err}");
    endpoint.dial().await.unwrap();
    assert_eq!(server.next_conn().await.peer().name(), "west");

    // A rotation of our own identity is picked up.
    write_cluster_bundle(client_dir.path(), &bundle(&ca, "west")).unwrap();
    assert_eq!(client.reload().unwrap(), ReloadOutcome::Reloaded);
    endpoint.dial().await.unwrap();
    assert_eq!(server.next_conn().await.peer().name(), "west");
}

#[tokio::test]
async fn initial_load_of_corrupt_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let paths = write_cluster_bundle(dir.path(), &bundle(&ca, "east")).unwrap();
    std::fs::write(&paths.ca, "not pem at all").unwrap();
    let err = ReloadingTls::load(td(), TlsPaths::server(dir.path())).unwrap_err();
    assert!(err.to_string().contains("ca.crt"), "{err}");
}

#[tokio::test]
async fn unchanged_files_do_not_bump_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    write_cluster_bundle(dir.path(), &bundle(&ca(), "east")).unwrap();
    let tls = ReloadingTls::load(td(), TlsPaths::server(dir.path())).unwrap();
    assert_eq!(tls.reload().unwrap(), ReloadOutcome::Unchanged);
    assert_eq!(tls.generation(), 0);
    assert_eq!(tls.current().identity().name(), "east");
}
