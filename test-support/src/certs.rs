//! Certificate fixtures: a throwaway mesh CA for one trust domain, leaves for loopback
//! servers and agents, and plain rustls configs that play a misbehaving peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::{IssuedCert, MeshCa, MeshTls, ServerNames, TrustDomain, Validity};
use rustls::pki_types::CertificateDer;

/// The trust domain of [`ca`].
pub const TD: &str = "clustermesh.local";

/// [`TD`] as a trust domain.
pub fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

/// A fresh mesh CA for [`TD`].
pub fn ca() -> MeshCa {
    MeshCa::generate(td()).unwrap()
}

/// Validity of a leaf issued now with the default lifetime.
pub fn valid() -> Validity {
    Validity::from_now(DEFAULT_LEAF_VALIDITY)
}

/// A validity window that ended a day ago.
pub fn expired() -> Validity {
    let now = SystemTime::now();
    Validity::between(
        now - Duration::from_secs(10 * 24 * 3600),
        now - Duration::from_secs(24 * 3600),
    )
}

/// Server names of a loopback server: `localhost` and 127.0.0.1.
pub fn loopback_names() -> ServerNames {
    ServerNames::new(["localhost".to_owned()], ["127.0.0.1".parse().unwrap()])
}

/// Our TLS configuration for `leaf`, trusting the CAs in `ca_pem`.
pub fn tls(ca_pem: &str, leaf: &IssuedCert) -> Arc<MeshTls> {
    Arc::new(
        MeshTls::from_pem(
            td(),
            ca_pem.as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap(),
    )
}

/// Clusters of the tests' shared CA.
pub const TEST_CLUSTERS: [&str; 4] = ["east", "west", "north", "south"];

/// The one test CA as a trust bundle labelled with every test cluster (a mesh whose
/// clusters share one CA).
pub fn shared(ca: &MeshCa) -> String {
    let one = clustermesh_certs::TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap();
    let mut bundle = clustermesh_certs::TrustBundle::new();
    for cluster in TEST_CLUSTERS {
        bundle.merge_as(&one, cluster);
    }
    bundle.to_pem()
}

/// TLS of cluster `cluster`'s loopback server, issued by `ca`.
pub fn server_tls(ca: &MeshCa, cluster: &str) -> Arc<MeshTls> {
    tls(
        &shared(ca),
        &ca.issue_server(cluster, &loopback_names(), valid())
            .unwrap(),
    )
}

/// TLS of an agent of cluster `cluster`, issued by `ca`.
pub fn client_tls(ca: &MeshCa, cluster: &str) -> Arc<MeshTls> {
    tls(&shared(ca), &ca.issue_agent(cluster, valid()).unwrap())
}

/// A rustls root store holding the certificates in `ca_pem`.
pub fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for cert in clustermesh_certs::pem::parse_certs(ca_pem.as_bytes()).unwrap() {
        store.add(cert).unwrap();
    }
    store
}

/// The crypto provider the workspace uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A plain rustls client config trusting `ca_pem` and presenting `leaf` (or nothing),
/// with none of our identity checks: it plays the misbehaving peer.
pub fn raw_client_config(ca_pem: &str, leaf: Option<&IssuedCert>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca_pem));
    let mut config = match leaf {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                clustermesh_certs::pem::parse_certs(leaf.cert_pem.as_bytes()).unwrap(),
                clustermesh_certs::pem::parse_private_key(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The DER of `leaf`'s certificate.
pub fn leaf_der(leaf: &IssuedCert) -> CertificateDer<'static> {
    clustermesh_certs::pem::parse_certs(leaf.cert_pem.as_bytes())
        .unwrap()
        .remove(0)
}

/// A listener on a free 127.0.0.1 port, and its address.
pub async fn loopback_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Writes `pem` to `dir/name`; returns the path.
pub fn write_pem(dir: &std::path::Path, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// Writes `leaf`'s certificate and key into `dir` as `<name>.pem` and `<name>-key.pem`;
/// returns (certificate, key) paths.
pub fn write_leaf(
    dir: &std::path::Path,
    name: &str,
    leaf: &IssuedCert,
) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        write_pem(dir, &format!("{name}.pem"), &leaf.cert_pem),
        write_pem(dir, &format!("{name}-key.pem"), &leaf.key_pem),
    )
}

/// The rustls error inside an I/O error from tokio-rustls.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}
