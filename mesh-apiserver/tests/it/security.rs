//! The mesh API against certificates minted the way an attacker would: a node's agent
//! certificate, the cluster's own server or replica certificate, a connected peer's CA
//! key minting our admin or cluster identities, a cluster that is not connected, a
//! foreign CA. Read access is for our agents, connected peers and admins; `Status` for
//! admins only; and the set of connected peers follows the trust bundle on disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crate::support;
use clustermesh_api::v1;
use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_apiserver::cache::{Cache, CacheConfig};
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::grpc::{AccessPolicy, MeshApiService, ServiceConfig};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::server::serve_grpc;
use clustermesh_certs::files::{write_cert, write_private_key};
use clustermesh_certs::issue::{MeshCa, ServerNames, Validity, DEFAULT_LEAF_VALIDITY};
use clustermesh_certs::transport::MeshEndpoint;
use clustermesh_certs::{IssuedCert, MeshTls, ReloadingTls, TlsPaths, TlsSource, TrustBundle};
use support::{td, Backend, TestStore};
use tokio_util::sync::CancellationToken;
use tonic::Code;

fn validity() -> Validity {
    Validity::from_now(DEFAULT_LEAF_VALIDITY)
}

fn loopback() -> ServerNames {
    ServerNames::new(["localhost".to_owned()], ["127.0.0.1".parse().unwrap()])
}

fn labelled(cas: &[(&MeshCa, &str)]) -> String {
    let mut bundle = TrustBundle::new();
    for (ca, cluster) in cas {
        bundle.merge_as(
            &TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap(),
            cluster,
        );
    }
    bundle.to_pem()
}

/// What a caller got.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The call was answered.
    Served,
    /// The call reached the service and was refused with PERMISSION_DENIED.
    Denied,
    /// The connection was refused (TLS handshake) before any RPC ran.
    Refused,
}

struct Server {
    addr: std::net::SocketAddr,
    tls: Arc<ReloadingTls>,
    ca_file: std::path::PathBuf,
    shutdown: CancellationToken,
    _store: TestStore,
    _dir: tempfile::TempDir,
}

impl Server {
    /// East's mesh API server, trusting `bundle` (a file, re-read on `reload`).
    async fn start(east: &MeshCa, bundle: &str) -> Server {
        let store = TestStore::start(Backend::Raft).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let leaf = east.issue_server("east", &loopback(), validity()).unwrap();
        let paths = TlsPaths::server(dir.path());
        write_cert(&paths.ca, bundle).unwrap();
        write_private_key(&paths.key, &leaf.key_pem).unwrap();
        write_cert(&paths.cert, &leaf.cert_pem).unwrap();
        let tls = ReloadingTls::load(td(), paths.clone()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(Cache::new(
            "east".to_owned(),
            CacheConfig::default(),
            Arc::clone(&metrics),
        ));
        let shutdown = CancellationToken::new();
        tokio::spawn(Arc::clone(&cache).run(Arc::clone(&store.store), shutdown.clone()));
        cache.wait_loaded().await;
        let service = MeshApiService::new(
            cache,
            ServiceConfig {
                cluster_config: ExportConfig::new("east".to_owned(), 1).cluster_config(),
                policy: AccessPolicy::new("east"),
                stream_buffer: 64,
            },
            metrics,
        )
        .with_shutdown(shutdown.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: Arc<dyn TlsSource> = tls.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let _ = serve_grpc(service, listener, source, token).await;
        });
        Server {
            addr,
            tls,
            ca_file: paths.ca,
            shutdown,
            _store: store,
            _dir: dir,
        }
    }

    /// Rewrites the trust bundle (what `connect`/`disconnect` do) and reloads it.
    fn set_bundle(&self, bundle: &str) {
        write_cert(&self.ca_file, bundle).unwrap();
        self.tls.reload().unwrap();
    }

    /// Calls `GetClusterInfo`, `Watch` and `Status` presenting `leaf`, verifying the
    /// server with `client_bundle`.
    async fn calls(&self, leaf: &IssuedCert, client_bundle: &str) -> [Outcome; 3] {
        let tls = Arc::new(
            MeshTls::from_pem(
                td(),
                client_bundle.as_bytes(),
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
            )
            .unwrap(),
        );
        let endpoint = MeshEndpoint::new(&format!("localhost:{}", self.addr.port()), tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5));
        let Ok(channel) = endpoint.connect().await else {
            return [Outcome::Refused, Outcome::Refused, Outcome::Refused];
        };
        let mut client = MeshApiClient::new(channel);
        let classify = |r: Result<(), tonic::Status>| match r {
            Ok(()) => Outcome::Served,
            Err(s) if s.code() == Code::PermissionDenied => Outcome::Denied,
            Err(s) => {
                assert!(
                    matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                    ),
                    "unexpected refusal {s:?}"
                );
                Outcome::Refused
            }
        };
        let info = classify(
            client
                .get_cluster_info(v1::GetClusterInfoRequest {})
                .await
                .map(|_| ()),
        );
        let watch = classify(
            client
                .watch(v1::WatchRequest {
                    kinds: vec![],
                    from_revision: 0,
                    all_clusters: false,
                })
                .await
                .map(|_| ()),
        );
        let status = classify(client.status(v1::StatusRequest {}).await.map(|_| ()));
        [info, watch, status]
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_gets_exactly_its_role_on_the_mesh_api() {
    use Outcome::{Denied, Refused, Served};
    let (east, west, north) = (
        MeshCa::generate(td()).unwrap(),
        MeshCa::generate(td()).unwrap(),
        MeshCa::generate(td()).unwrap(),
    );
    // East is connected to west; north is not.
    let server = Server::start(&east, &labelled(&[(&east, "east"), (&west, "west")])).await;
    // Every caller verifies the server with east's CA; what it presents is the attack.
    let client_bundle = labelled(&[(&east, "east")]);
    let foreign = MeshCa::generate(td()).unwrap();
    let cases: Vec<(&str, IssuedCert, [Outcome; 3])> = vec![
        (
            "east agent",
            east.issue_agent("east", validity()).unwrap(),
            [Served, Served, Denied],
        ),
        (
            "east admin",
            east.issue_admin("ops", validity()).unwrap(),
            [Served, Served, Served],
        ),
        (
            "east's own server certificate",
            east.issue_server("east", &loopback(), validity()).unwrap(),
            [Denied, Denied, Denied],
        ),
        (
            "east replica certificate",
            east.issue_replica("east", 1, &loopback(), validity())
                .unwrap(),
            [Denied, Denied, Denied],
        ),
        (
            "west's mesh API server (connected peer)",
            west.issue_server("west", &loopback(), validity()).unwrap(),
            [Served, Served, Denied],
        ),
        (
            "west agent (direct mode)",
            west.issue_agent("west", validity()).unwrap(),
            [Served, Served, Denied],
        ),
        (
            "west CA minting an admin",
            west.issue_admin("x", validity()).unwrap(),
            [Refused, Refused, Refused],
        ),
        (
            "west CA minting east's server identity",
            west.issue_server("east", &loopback(), validity()).unwrap(),
            [Refused, Refused, Refused],
        ),
        (
            "west CA minting east's agent identity",
            west.issue_agent("east", validity()).unwrap(),
            [Refused, Refused, Refused],
        ),
        (
            "west CA minting an east replica",
            west.issue_replica("east", 1, &loopback(), validity())
                .unwrap(),
            [Refused, Refused, Refused],
        ),
        (
            "west CA minting north's identity",
            west.issue_server("north", &loopback(), validity()).unwrap(),
            [Refused, Refused, Refused],
        ),
        (
            "north (not connected)",
            north
                .issue_server("north", &loopback(), validity())
                .unwrap(),
            [Refused, Refused, Refused],
        ),
        (
            "foreign CA minting an admin",
            foreign.issue_admin("ops", validity()).unwrap(),
            [Refused, Refused, Refused],
        ),
    ];
    for (who, leaf, expected) in &cases {
        assert_eq!(&server.calls(leaf, &client_bundle).await, expected, "{who}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_peers_follow_the_trust_bundle_without_a_restart() {
    use Outcome::{Denied, Refused, Served};
    let (east, west, north) = (
        MeshCa::generate(td()).unwrap(),
        MeshCa::generate(td()).unwrap(),
        MeshCa::generate(td()).unwrap(),
    );
    let server = Server::start(&east, &labelled(&[(&east, "east"), (&west, "west")])).await;
    let client_bundle = labelled(&[(&east, "east")]);
    let west_server = west.issue_server("west", &loopback(), validity()).unwrap();
    let north_server = north
        .issue_server("north", &loopback(), validity())
        .unwrap();
    let agent = east.issue_agent("east", validity()).unwrap();
    assert_eq!(
        server.calls(&west_server, &client_bundle).await,
        [Served, Served, Denied]
    );
    assert_eq!(
        server.calls(&north_server, &client_bundle).await[0],
        Refused
    );

    // `connect` to north and `disconnect` from west rewrite the bundle.
    server.set_bundle(&labelled(&[(&east, "east"), (&north, "north")]));
    assert_eq!(
        server.calls(&west_server, &client_bundle).await[0],
        Refused,
        "disconnected west still served"
    );
    assert_eq!(
        server.calls(&north_server, &client_bundle).await,
        [Served, Served, Denied]
    );
    assert_eq!(
        server.calls(&agent, &client_bundle).await,
        [Served, Served, Denied]
    );

    // A CA without a label (appended by hand) is trusted for nothing.
    let mut unlabelled = labelled(&[(&east, "east")]);
    unlabelled.push_str(west.cert_pem());
    server.set_bundle(&unlabelled);
    assert_eq!(server.calls(&west_server, &client_bundle).await[0], Refused);
    assert_eq!(
        server.calls(&agent, &client_bundle).await,
        [Served, Served, Denied]
    );
}
