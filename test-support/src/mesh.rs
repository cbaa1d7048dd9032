//! Shared fixture for tests and benches that need real mesh API servers: an in-process
//! cache + gRPC server per cluster (real mTLS on 127.0.0.1), the PKI files an agent needs,
//! and its configuration file.
//!
//! Used by the agent's two-cluster scenarios (`agent/tests/it/two_clusters.rs`) and its
//! propagation benchmark.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clustermesh_api::agent_config::{AgentConfig, ClusterEntry};
use clustermesh_apiserver::cache::{Cache, CacheConfig};
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::grpc::{AccessPolicy, MeshApiService, ServiceConfig};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::server::serve_grpc;
use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::transport::accept_mesh_tls;
use clustermesh_certs::{MeshCa, MeshTls, ServerNames, TlsSource, TrustDomain, Validity};
use clustermesh_store::Store;
use tokio_util::sync::CancellationToken;

/// What one in-process mesh API server exports about its cluster.
#[derive(Debug, Clone)]
pub struct ServerSpec<'a> {
    /// Trust domain of the mesh.
    pub trust_domain: &'a str,
    /// Cluster name.
    pub cluster: &'a str,
    /// Cluster ID.
    pub id: u32,
    /// Pod CIDRs the cluster reports.
    pub pod_cidrs: &'a [&'a str],
    /// Per-watch stream buffer of the server.
    pub stream_buffer: usize,
}

/// A running mesh API server; `stop` ends its watch streams and tasks.
///
/// `stop_serving` / `serve_again` take only the gRPC side down and up again while the
/// cache (and its resume history) keeps following the store, like a server whose agents
/// lost their connections without the server losing its state.
#[derive(Debug)]
pub struct MeshServer {
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    config: ServiceConfig,
    tls: Arc<dyn TlsSource>,
    cache_stop: CancellationToken,
    cache_task: tokio::task::JoinHandle<()>,
    grpc_stop: CancellationToken,
    grpc_task: Option<tokio::task::JoinHandle<()>>,
}

impl MeshServer {
    /// Serves `store` as cluster `spec.cluster` on `listener`, with a server certificate
    /// for `localhost`/127.0.0.1 issued by `ca`. Returns once the cache has loaded.
    pub async fn start(
        store: Arc<dyn Store>,
        ca: &MeshCa,
        spec: &ServerSpec<'_>,
        listener: tokio::net::TcpListener,
    ) -> MeshServer {
        let td = TrustDomain::new(spec.trust_domain).unwrap();
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(Cache::new(
            spec.cluster.to_owned(),
            CacheConfig::default(),
            Arc::clone(&metrics),
        ));
        let cache_stop = CancellationToken::new();
        let cache_task = tokio::spawn(Arc::clone(&cache).run(store, cache_stop.clone()));
        cache.wait_loaded().await;
        let mut export = ExportConfig::new(spec.cluster.to_owned(), spec.id);
        export.pod_cidrs = spec.pod_cidrs.iter().map(|c| c.parse().unwrap()).collect();
        let config = ServiceConfig {
            cluster_config: export.cluster_config(),
            policy: AccessPolicy::new(spec.cluster),
            stream_buffer: spec.stream_buffer,
        };
        let names = ServerNames::new(
            ["localhost".to_owned()],
            [std::net::IpAddr::from([127, 0, 0, 1])],
        );
        let leaf = ca
            .issue_server(
                spec.cluster,
                &names,
                Validity::from_now(DEFAULT_LEAF_VALIDITY),
            )
            .unwrap();
        let tls: Arc<dyn TlsSource> = Arc::new(
            MeshTls::from_pem(
                td,
                crate::certs::shared(ca).as_bytes(),
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
            )
            .unwrap(),
        );
        let mut server = MeshServer {
            cache,
            metrics,
            config,
            tls,
            cache_stop,
            cache_task,
            grpc_stop: CancellationToken::new(),
            grpc_task: None,
        };
        server.serve_again(listener);
        server
    }

    /// Starts (again) serving gRPC on `listener` from the running cache.
    pub fn serve_again(&mut self, listener: tokio::net::TcpListener) {
        assert!(self.grpc_task.is_none(), "already serving");
        self.grpc_stop = CancellationToken::new();
        let service = MeshApiService::new(
            Arc::clone(&self.cache),
            self.config.clone(),
            Arc::clone(&self.metrics),
        )
        // Ends the watch streams on stop, so a stopped server really drops its agents.
        .with_shutdown(self.grpc_stop.clone());
        let (tls, token) = (Arc::clone(&self.tls), self.grpc_stop.clone());
        self.grpc_task = Some(tokio::spawn(async move {
            serve_grpc(service, listener, tls, token).await.unwrap();
        }));
    }

    /// Stops serving gRPC (ending every watch stream) but keeps the cache following the
    /// store, with its history.
    pub async fn stop_serving(&mut self) {
        self.grpc_stop.cancel();
        if let Some(t) = self.grpc_task.take() {
            let _ = t.await;
        }
    }

    /// Stops the server and waits for its tasks.
    pub async fn stop(mut self) {
        self.stop_serving().await;
        self.cache_stop.cancel();
        let _ = self.cache_task.await;
    }
}

/// A server that completes the mTLS handshake as cluster `cluster` and then never says a
/// word (it holds every connection open, unread), like a hung mesh API server.
#[derive(Debug)]
pub struct MuteServer {
    task: tokio::task::JoinHandle<()>,
}

impl MuteServer {
    /// Accepts on `listener` with a server certificate for `cluster` issued by `ca`.
    pub fn start(
        ca: &MeshCa,
        trust_domain: &str,
        cluster: &str,
        listener: tokio::net::TcpListener,
    ) -> MuteServer {
        let td = TrustDomain::new(trust_domain).unwrap();
        let names = ServerNames::new(
            ["localhost".to_owned()],
            [std::net::IpAddr::from([127, 0, 0, 1])],
        );
        let leaf = ca
            .issue_server(cluster, &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        let tls = MeshTls::from_pem(
            td.clone(),
            crate::certs::shared(ca).as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap();
        let config = tls.server_config();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((tcp, addr)) = listener.accept().await else {
                    return;
                };
                let timeout = std::time::Duration::from_secs(5);
                if let Ok(stream) =
                    accept_mesh_tls(tcp, addr, Arc::clone(&config), &td, timeout).await
                {
                    held.push(stream);
                }
            }
        });
        MuteServer { task }
    }

    /// Stops accepting and closes every held connection.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Writes `ca.crt`, `client.crt` and `client.key` (a client certificate for cluster
/// `local`) into `dir`; returns the CA.
pub fn pki(dir: &Path, trust_domain: &str, local: &str) -> MeshCa {
    let ca = MeshCa::generate(TrustDomain::new(trust_domain).unwrap()).unwrap();
    let client = ca
        .issue_agent(local, Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("client.crt"), &client.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &client.key_pem).unwrap();
    ca
}

/// Writes the agent configuration for cluster `local` to `path`: every `(name, id, port)`
/// in `clusters` is watched at `localhost:<port>` with the PKI files `pki` wrote in `dir`,
/// in direct mode (the agent dials every cluster).
/// Write-then-rename, so a running agent never reads a half-written file.
pub fn write_agent_config(
    path: &Path,
    dir: &Path,
    trust_domain: &str,
    local: &str,
    clusters: &[(&str, u32, u16)],
) -> PathBuf {
    write_agent_config_in_mode(
        path,
        dir,
        trust_domain,
        local,
        clusters,
        clustermesh_api::agent_config::WatchMode::Direct,
    )
}

/// [`write_agent_config`] with the agents' `mode`.
pub fn write_agent_config_in_mode(
    path: &Path,
    dir: &Path,
    trust_domain: &str,
    local: &str,
    clusters: &[(&str, u32, u16)],
    mode: clustermesh_api::agent_config::WatchMode,
) -> PathBuf {
    let config = AgentConfig {
        local_cluster: local.to_owned(),
        mode,
        trust_domain: trust_domain.to_owned(),
        cert_file: dir.join("client.crt"),
        key_file: dir.join("client.key"),
        clusters: clusters
            .iter()
            .map(|&(name, id, port)| ClusterEntry {
                name: name.to_owned(),
                id,
                endpoints: vec![format!("localhost:{port}")],
                ca_file: dir.join("ca.crt"),
            })
            .collect(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, clustermesh_api::yaml::to_string(&config).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    path.to_path_buf()
}

/// Binds `addr` again after a server on it was stopped. The stopped server's accept task
/// is aborted, not joined, so its listening socket may close a moment after `stop`
/// returns; retry `AddrInUse` for a while instead of failing on that race.
pub async fn rebind(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}
