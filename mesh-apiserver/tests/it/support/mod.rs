//! Shared helpers of the mesh API server's scenarios: real stores (embedded raft, or the
//! test kit's etcd process on loopback ports), a throwaway mesh PKI, and a mesh API server
//! on 127.0.0.1.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_api::v1;
use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_apiserver::cache::{Cache, CacheConfig};
use clustermesh_apiserver::grpc::{AccessPolicy, MeshApiService, ServiceConfig};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::peer_view::PodExport;
use clustermesh_apiserver::server::serve_grpc_with;
use clustermesh_certs::issue::{MeshCa, ServerNames, Validity, DEFAULT_LEAF_VALIDITY};
use clustermesh_certs::transport::{IncomingConfig, MeshEndpoint};
use clustermesh_certs::trust_bundle::TrustBundle;
use clustermesh_certs::{IssuedCert, MeshTls, TlsSource, TrustDomain};
use clustermesh_store::raft::LocalCluster;
use clustermesh_store::Store;
use clustermesh_test_support::etcd::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const TRUST_DOMAIN: &str = "mesh.test";

/// Which store backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Raft,
    Etcd,
}

/// A running store and whatever keeps it alive.
pub struct TestStore {
    pub store: Arc<dyn Store>,
    raft: Option<LocalCluster>,
    etcd: Option<EtcdServer>,
    pub dir: tempfile::TempDir,
}

impl TestStore {
    /// Starts a store; `None` (with a message) when the backend's prerequisite (the etcd
    /// binary) is missing and not required (see
    /// [`clustermesh_test_support::prerequisites::prerequisites_required`]).
    pub async fn start(backend: Backend) -> Option<TestStore> {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Raft => {
                let cluster = LocalCluster::start(1, dir.path(), None).await.unwrap();
                let store: Arc<dyn Store> = Arc::new(cluster.store(0).unwrap());
                Some(TestStore {
                    store,
                    raft: Some(cluster),
                    etcd: None,
                    dir,
                })
            }
            Backend::Etcd => {
                let etcd = EtcdServer::start_or_skip("mesh-apiserver store").await?;
                let store: Arc<dyn Store> = Arc::new(etcd.connect().await);
                Some(TestStore {
                    store,
                    raft: None,
                    etcd: Some(etcd),
                    dir,
                })
            }
        }
    }

    pub async fn shutdown(self) {
        if let Some(cluster) = self.raft {
            cluster.shutdown().await;
        }
        drop(self.etcd);
    }
}

/// Peer clusters the test PKI has CAs for (as if connected to the server's cluster).
pub const PEERS: [&str; 3] = ["west", "north", "south"];

/// A throwaway mesh PKI shaped like a real mesh: the server's own CA (`ca`, for its own
/// cluster's roles and admins) and one CA per connected peer ([`PEERS`]); every party
/// trusts the labelled bundle of all of them.
pub struct Pki {
    pub ca: MeshCa,
    pub peers: std::collections::BTreeMap<String, MeshCa>,
    home: std::sync::Mutex<Option<String>>,
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            ca: MeshCa::generate(td()).unwrap(),
            peers: PEERS
                .iter()
                .map(|p| ((*p).to_owned(), MeshCa::generate(td()).unwrap()))
                .collect(),
            home: std::sync::Mutex::new(None),
        }
    }

    fn home(&self) -> String {
        self.home
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| "east".to_owned())
    }

    /// Writes the bundle directory a `clustermesh-apiserver` of `cluster` reads with
    /// `--tls-dir` at `dir`: a replica certificate for `localhost`/127.0.0.1 issued by `ca`,
    /// and the labelled trust bundle of [`Pki::bundle_pem`].
    pub fn write_loopback_bundle(&self, cluster: &str, dir: &std::path::Path) {
        let mut bundle = clustermesh_certs::files::ClusterBundle::issue(
            &self.ca,
            cluster,
            &loopback_names(),
            Validity::from_now(DEFAULT_LEAF_VALIDITY),
        )
        .unwrap();
        bundle.ca_pem = self.bundle_pem();
        clustermesh_certs::files::write_cluster_bundle(dir, &bundle).unwrap();
    }

    /// The labelled trust bundle: `ca` for the server's cluster, each peer's for itself.
    pub fn bundle_pem(&self) -> String {
        let mut bundle = TrustBundle::from_pem(self.ca.cert_pem().as_bytes()).unwrap();
        let own = bundle.clone();
        bundle = TrustBundle::new();
        bundle.merge_as(&own, &self.home());
        for (name, ca) in &self.peers {
            if *name != self.home() {
                bundle.merge_as(
                    &TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap(),
                    name,
                );
            }
        }
        bundle.to_pem()
    }

    pub fn tls(&self, leaf: &IssuedCert) -> Arc<dyn TlsSource> {
        Arc::new(
            MeshTls::from_pem(
                td(),
                self.bundle_pem().as_bytes(),
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
            )
            .unwrap(),
        )
    }

    /// The API server's certificate for cluster `cluster`, valid for localhost/127.0.0.1,
    /// issued by the home CA (the PKI's clusters other than [`PEERS`] are its own).
    pub fn server(&self, cluster: &str) -> Arc<dyn TlsSource> {
        *self.home.lock().unwrap() = Some(cluster.to_owned());
        let names = ServerNames::new(
            ["localhost".to_owned()],
            [std::net::IpAddr::from([127, 0, 0, 1])],
        );
        self.tls(
            &self
                .ca
                .issue_server(cluster, &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))
                .unwrap(),
        )
    }

    /// The CA that issues cluster `cluster`'s certificates.
    pub fn ca_of(&self, cluster: &str) -> &MeshCa {
        match self.peers.get(cluster) {
            Some(ca) if cluster != self.home() => ca,
            _ => &self.ca,
        }
    }

    /// The agent certificate of cluster `cluster` (the server's own agents, or a
    /// connected peer's agents in direct mode), issued by that cluster's CA.
    pub fn cluster_client(&self, cluster: &str) -> Arc<dyn TlsSource> {
        self.tls(
            &self
                .ca_of(cluster)
                .issue_agent(cluster, Validity::from_now(DEFAULT_LEAF_VALIDITY))
                .unwrap(),
        )
    }

    /// The mesh API server certificate of peer `cluster` (what a mirroring peer presents).
    pub fn peer_server(&self, cluster: &str) -> Arc<dyn TlsSource> {
        self.tls(
            &self
                .ca_of(cluster)
                .issue_server(
                    cluster,
                    &ServerNames::default(),
                    Validity::from_now(DEFAULT_LEAF_VALIDITY),
                )
                .unwrap(),
        )
    }

    /// An admin certificate (issued by the server cluster's own CA).
    pub fn admin(&self, name: &str) -> Arc<dyn TlsSource> {
        self.tls(
            &self
                .ca
                .issue_admin(name, Validity::from_now(DEFAULT_LEAF_VALIDITY))
                .unwrap(),
        )
    }
}

pub fn td() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).unwrap()
}

/// A mesh API server (cache + gRPC, no exporter) over `store`.
pub struct TestServer {
    pub addr: SocketAddr,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub struct ServerSetup {
    pub cluster: String,
    pub cache: CacheConfig,
    /// Which pods peers are served (`--export-pods`).
    pub export_pods: PodExport,
    pub policy: AccessPolicy,
    pub stream_buffer: usize,
    /// Accept loop tuning; the server's metrics are added as its observer.
    pub incoming: IncomingConfig,
}

impl ServerSetup {
    pub fn new(cluster: &str) -> ServerSetup {
        ServerSetup {
            cluster: cluster.to_owned(),
            cache: CacheConfig::default(),
            export_pods: PodExport::All,
            policy: AccessPolicy::new(cluster),
            stream_buffer: 64,
            incoming: IncomingConfig::default(),
        }
    }
}

impl TestServer {
    pub async fn start(store: Arc<dyn Store>, pki: &Pki, setup: ServerSetup) -> TestServer {
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(Cache::with_export(
            setup.cluster.clone(),
            setup.cache,
            Arc::clone(&metrics),
            setup.export_pods,
        ));
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(
            Arc::clone(&cache).run(store, shutdown.clone()),
        ));
        cache.wait_loaded().await;
        let mut export = clustermesh_apiserver::export::ExportConfig::new(setup.cluster.clone(), 1);
        export.pod_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
        let service = MeshApiService::new(
            Arc::clone(&cache),
            ServiceConfig {
                cluster_config: export.cluster_config(),
                policy: setup.policy,
                stream_buffer: setup.stream_buffer,
            },
            Arc::clone(&metrics),
        )
        .with_shutdown(shutdown.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = pki.server(&setup.cluster);
        let token = shutdown.clone();
        let incoming = setup.incoming.observer(metrics.clone());
        tasks.push(tokio::spawn(async move {
            serve_grpc_with(service, listener, tls, incoming, token)
                .await
                .unwrap();
        }));
        TestServer {
            addr,
            cache,
            metrics,
            shutdown,
            tasks,
        }
    }

    /// A client presenting `tls`.
    pub async fn client(&self, tls: Arc<dyn TlsSource>) -> MeshApiClient<Channel> {
        let channel = MeshEndpoint::new(&format!("localhost:{}", self.addr.port()), tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        MeshApiClient::new(channel)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Receives the next event within 10 s.
pub async fn next_event(stream: &mut tonic::Streaming<v1::WatchEvent>) -> v1::watch_event::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no watch event within 10s")
        .expect("watch stream failed")
        .expect("watch stream ended")
        .event
        .expect("empty watch event")
}

/// A loopback TCP port that was free a moment ago (for binaries that take a port number).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `127.0.0.1:port` over HTTP/1.0; returns (status code, body), or `None`
/// while nothing answers there.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Server names of a replica reached on loopback: `localhost` and 127.0.0.1.
pub fn loopback_names() -> ServerNames {
    ServerNames::new(
        ["localhost".to_owned()],
        [std::net::IpAddr::from([127, 0, 0, 1])],
    )
}

/// Log output of every test in this binary, captured by one global subscriber.
///
/// A thread-scoped subscriber (`set_default`) is not enough here: tracing caches each
/// callsite's interest process-wide, and with tests running in parallel a callsite first
/// hit on a thread without a subscriber could be cached as uninteresting, so a test's own
/// warning went missing. Each test searches the shared text for lines only it produces.
#[derive(Debug, Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();

impl Logs {
    /// The binary-wide capture of INFO and above, installed on first use.
    pub fn global() -> Logs {
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            logs
        })
        .clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
