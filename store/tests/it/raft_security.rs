//! The raft port against certificates minted the way an attacker would: with a node's
//! agent certificate, the cluster's own mesh API server certificate or an admin
//! certificate (all from our own CA), with a connected peer's CA key, or with a foreign
//! CA. Only a replica certificate of our own cluster, issued by our own CA, may write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::{
    IssuedCert, MeshCa, MeshTls, ServerNames, TlsSource, TrustBundle, TrustDomain, Validity,
};
use clustermesh_store::raft::{peer_status, peer_write, Command, LocalCluster, ReplicaTls};
use clustermesh_store::{Store, StoreError};

const TD: &str = "clustermesh.test";

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn validity() -> Validity {
    Validity::from_now(DEFAULT_LEAF_VALIDITY)
}

fn loopback() -> ServerNames {
    ServerNames::new(["localhost".to_owned()], ["127.0.0.1".parse().unwrap()])
}

/// East's CA and its connected peer west's CA, and east's labelled trust bundle.
struct Mesh {
    east: MeshCa,
    west: MeshCa,
    bundle: String,
}

impl Mesh {
    fn new() -> Mesh {
        let east = MeshCa::generate(td()).unwrap();
        let west = MeshCa::generate(td()).unwrap();
        let mut bundle = TrustBundle::new();
        bundle.merge_as(
            &TrustBundle::from_pem(east.cert_pem().as_bytes()).unwrap(),
            "east",
        );
        bundle.merge_as(
            &TrustBundle::from_pem(west.cert_pem().as_bytes()).unwrap(),
            "west",
        );
        Mesh {
            east,
            west,
            bundle: bundle.to_pem(),
        }
    }

    /// What an attacker dials with: presents `leaf` and accepts whatever server answers
    /// (so the refusal measured is the server's, never the attacker's own verifier).
    fn attacker(&self, leaf: &IssuedCert) -> ReplicaTls {
        let honest = MeshTls::from_pem(
            td(),
            self.bundle.as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = clustermesh_certs::pem::parse_certs(leaf.cert_pem.as_bytes()).unwrap();
        let key = clustermesh_certs::pem::parse_private_key(leaf.key_pem.as_bytes()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
            .with_client_auth_cert(chain, key)
            .unwrap();
        client.alpn_protocols = vec![b"h2".to_vec()];
        ReplicaTls::new(
            Arc::new(AttackerTls {
                server: honest.server_config(),
                client: Arc::new(client),
            }),
            "east",
        )
    }

    /// Replica TLS presenting `leaf`, trusting east's bundle, for cluster east.
    fn tls(&self, leaf: &IssuedCert) -> ReplicaTls {
        let tls = MeshTls::from_pem(
            td(),
            self.bundle.as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap();
        ReplicaTls::new(Arc::new(tls), "east")
    }
}

/// A client-side verifier that accepts any server certificate (signatures still checked).
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct AttackerTls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl TlsSource for AttackerTls {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }
    fn trust_domain(&self) -> TrustDomain {
        td()
    }
}

fn put(key: &str) -> Command {
    Command::Put {
        key: key.as_bytes().to_vec(),
        value: b"attacker".to_vec(),
        lease: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_replica_certificates_of_our_own_cluster_can_write_the_store() {
    let mesh = Mesh::new();
    let dir = tempfile::tempdir().unwrap();
    let replica = mesh.tls(
        &mesh
            .east
            .issue_replica("east", 1, &loopback(), validity())
            .unwrap(),
    );
    let cluster = LocalCluster::start(3, dir.path(), Some(replica.clone()))
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let addr = cluster.replica(leader).unwrap().addr().to_string();
    let timeout = Duration::from_secs(5);

    // Control: a replica of east writes through the raft port.
    peer_write(&addr, Some(replica.clone()), put("ok/replica"), timeout)
        .await
        .unwrap();

    let foreign = MeshCa::generate(td()).unwrap();
    let attackers: Vec<(&str, IssuedCert, &str)> = vec![
        (
            "east's agent certificate (handed to every node)",
            mesh.east.issue_agent("east", validity()).unwrap(),
            "permission",
        ),
        (
            "east's own mesh API server certificate",
            mesh.east
                .issue_server("east", &loopback(), validity())
                .unwrap(),
            "permission",
        ),
        (
            "an admin certificate of east",
            mesh.east.issue_admin("ops", validity()).unwrap(),
            "permission",
        ),
        (
            "west's CA key minting east's replica identity",
            mesh.west
                .issue_replica("east", 1, &loopback(), validity())
                .unwrap(),
            "tls",
        ),
        (
            "west's CA key minting a west replica identity",
            mesh.west
                .issue_replica("west", 1, &loopback(), validity())
                .unwrap(),
            "tls",
        ),
        (
            "west's own mesh API server certificate",
            mesh.west
                .issue_server("west", &loopback(), validity())
                .unwrap(),
            "permission",
        ),
        (
            "a foreign CA minting east's replica identity",
            foreign
                .issue_replica("east", 1, &loopback(), validity())
                .unwrap(),
            "tls",
        ),
    ];
    for (who, leaf, how) in attackers {
        let tls = mesh.attacker(&leaf);
        let err = peer_write(&addr, Some(tls.clone()), put("evil/key"), timeout)
            .await
            .expect_err(who);
        let StoreError::Unavailable(msg) = &err else {
            panic!("{who}: unexpected error {err:?}");
        };
        match how {
            "permission" => assert!(
                msg.contains("not a replica of cluster east"),
                "{who}: expected a role refusal, got: {msg}"
            ),
            _ => assert!(
                !msg.contains("not a replica of cluster east"),
                "{who}: the TLS handshake should have refused it, got: {msg}"
            ),
        }
        // Every other RPC of the port is refused the same way.
        assert!(
            peer_status(&addr, Some(tls), timeout).await.is_err(),
            "{who}: status served"
        );
    }

    // Nothing the attackers sent reached the store.
    let store = cluster.store(leader).unwrap();
    assert!(store.list(b"evil/").await.unwrap().kvs.is_empty());
    assert_eq!(store.list(b"ok/").await.unwrap().kvs.len(), 1);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_peer_ca_cannot_vouch_for_our_replica_identity_even_to_a_dialling_replica() {
    // A replica dialling a peer address must get a replica of its own cluster from its
    // own CA: a server certificate minted with west's CA for east's replica identity is
    // refused by the dialler's verifier.
    let mesh = Mesh::new();
    let dir = tempfile::tempdir().unwrap();
    let fake = mesh.tls(
        &mesh
            .west
            .issue_replica("east", 2, &loopback(), validity())
            .unwrap(),
    );
    let cluster = LocalCluster::start(1, dir.path(), Some(fake))
        .await
        .unwrap();
    let addr = cluster.replica(0).unwrap().addr().to_string();
    let honest = mesh.tls(
        &mesh
            .east
            .issue_replica("east", 1, &loopback(), validity())
            .unwrap(),
    );
    let err = peer_status(&addr, Some(honest), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("trusted only for"), "{err}");
    cluster.shutdown().await;
}
