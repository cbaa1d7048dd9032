//! `clustermesh-apiserver`: exports one cluster's state to the mesh.
//!
//! Flags can also come from a TOML file (`--config`), whose keys are the long flag names
//! with `-` replaced by `_`; a flag on the command line wins over the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use clustermesh_agent_core::watcher::ReconnectBackoff;
use clustermesh_api::cidr::Cidr;
use clustermesh_api::cluster::{validate_cluster_id, validate_cluster_name, ClusterIdMode};
use clustermesh_apiserver::cache::CacheConfig;
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::grpc::AccessPolicy;
use clustermesh_apiserver::leader::{ElectionConfig, DEFAULT_LEASE_TTL};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::mirror::{MirrorConfig, MirrorLimits};
use clustermesh_apiserver::peer_view::PodExport;
use clustermesh_apiserver::server::{self, ServerOptions, SourceFactory};
use clustermesh_apiserver::source::{DirSource, KubernetesSource, Source};
use clustermesh_certs::{PeerIdentity, ReloadingTls, TlsPaths, TlsSource, TrustDomain};
use clustermesh_store::raft::{RaftConfig, RaftStore, Replica, ReplicaTls};
use clustermesh_store::{EtcdConfig, EtcdConnectError, EtcdStore, EtcdTls, Store};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    Raft,
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Json,
    Text,
}

/// Exports one cluster's nodes, identities, endpoints and services to the mesh.
#[derive(Debug, Parser, Default)]
#[command(version, about)]
struct Cli {
    /// TOML file with any of the options below (flags win).
    #[arg(long, env = "CLUSTERMESH_CONFIG")]
    config: Option<PathBuf>,
    /// This cluster's name (≤32 lowercase alphanumerics and '-').
    #[arg(long, env = "CLUSTERMESH_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// This cluster's ID (1..=255, or 1..=511 with --max-connected-clusters 511).
    #[arg(long, env = "CLUSTERMESH_CLUSTER_ID")]
    cluster_id: Option<u32>,
    /// 255 or 511.
    #[arg(long)]
    max_connected_clusters: Option<u32>,
    /// Pod CIDR of the cluster (repeat for several), exported in the cluster config.
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<String>,
    /// Store backend.
    #[arg(long, value_enum)]
    store: Option<StoreKind>,
    /// raft: this replica's ID.
    #[arg(long)]
    raft_id: Option<u64>,
    /// raft: data directory.
    #[arg(long)]
    raft_data_dir: Option<PathBuf>,
    /// raft: address replicas talk to this one on.
    #[arg(long)]
    raft_listen: Option<SocketAddr>,
    /// raft: a member as ID=HOST:PORT (repeat for each replica, this one included);
    /// default: this replica alone.
    #[arg(long = "raft-peer")]
    raft_peers: Vec<String>,
    /// etcd: client URLs, comma-separated.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// etcd: CA file for an https endpoint.
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// etcd: client certificate.
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// etcd: client key.
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// `kubernetes` or `dir:PATH`.
    #[arg(long)]
    source: Option<String>,
    /// Poll interval of the dir source.
    #[arg(long, value_parser = humantime::parse_duration)]
    dir_poll_interval: Option<Duration>,
    /// kubernetes source: kubeconfig context to use (default: in-cluster config in a
    /// pod, else the kubeconfig's current context).
    #[arg(long)]
    kube_context: Option<String>,
    /// gRPC listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory with ca.crt (the labelled trust bundle), server.crt, server.key (the
    /// mesh API server's `cluster/<name>` certificate) and, for the raft store,
    /// replica.crt/replica.key.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// raft: this replica's certificate (`spiffe://<td>/cluster/<name>/replica/<raft-id>`);
    /// default `<tls-dir>/replica.crt`.
    #[arg(long)]
    replica_cert: Option<PathBuf>,
    /// raft: the replica certificate's key; default `<tls-dir>/replica.key`.
    #[arg(long)]
    replica_key: Option<PathBuf>,
    /// SPIFFE trust domain of the mesh.
    #[arg(long)]
    trust_domain: Option<String>,
    /// Connected cluster allowed to read this mesh API (repeat); default: every connected
    /// cluster (those whose CA `clustermesh connect` added to the trust bundle).
    #[arg(long = "allowed-cluster")]
    allowed_clusters: Vec<String>,
    /// Which pods' identities and endpoints other clusters are served: `all` (default),
    /// `services` (pods backing a global shared service) or `selector=<label selector>`
    /// (kubectl `-l` syntax over identity labels, e.g.
    /// `selector=io.kubernetes.pod.namespace=shop,app in (web,api)`). Services are served
    /// only when global and shared, whatever this says.
    #[arg(long)]
    export_pods: Option<String>,
    /// Health and metrics listen address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// How long an unused identity is kept.
    #[arg(long, value_parser = humantime::parse_duration)]
    identity_gc_grace: Option<Duration>,
    /// Mirror the connected peers into this cluster's store: the cluster list (agent
    /// configuration format, as `clustermesh connect` keeps it) naming them; re-read when
    /// it changes. Our server certificate is the client certificate towards peers.
    #[arg(long)]
    mirror_peers: Option<PathBuf>,
    /// Drop an unreachable peer's mirrored records after this long (default: keep).
    #[arg(long, value_parser = humantime::parse_duration)]
    mirror_stale_ttl: Option<Duration>,
    /// Records one peer may make this cluster store (all kinds together).
    #[arg(long)]
    mirror_max_records_per_peer: Option<usize>,
    /// Bytes of one mirrored record's value (default and maximum: the store's value limit,
    /// 1.5 MiB); a peer's larger record is refused.
    #[arg(long)]
    mirror_max_value_bytes: Option<usize>,
    /// Longest pause between reconnects to an unreachable peer (default 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    mirror_max_backoff: Option<Duration>,
    /// How often the peer list is checked for changes (default 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    mirror_peers_poll: Option<Duration>,
    /// This replica's name in the election of the cluster's writer (one replica at a time
    /// runs the exporter and the mirror); must be unique among the cluster's replicas.
    /// Default: `replica-<raft-id>` with the raft store, the host (pod) name with etcd.
    #[arg(long, env = "CLUSTERMESH_REPLICA_NAME")]
    replica_name: Option<String>,
    /// TTL of the election lease: a crashed leader is replaced within about this long (a
    /// stopped one at once). Default 5s.
    #[arg(long, value_parser = humantime::parse_duration)]
    leader_lease_ttl: Option<Duration>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// The same options from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cluster_name: Option<String>,
    cluster_id: Option<u32>,
    max_connected_clusters: Option<u32>,
    #[serde(default)]
    pod_cidrs: Vec<String>,
    store: Option<StoreKind>,
    raft_id: Option<u64>,
    raft_data_dir: Option<PathBuf>,
    raft_listen: Option<SocketAddr>,
    #[serde(default)]
    raft_peers: Vec<String>,
    #[serde(default)]
    etcd_endpoints: Vec<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    source: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    dir_poll_interval: Option<Duration>,
    kube_context: Option<String>,
    listen: Option<SocketAddr>,
    tls_dir: Option<PathBuf>,
    replica_cert: Option<PathBuf>,
    replica_key: Option<PathBuf>,
    trust_domain: Option<String>,
    #[serde(default)]
    allowed_clusters: Vec<String>,
    export_pods: Option<String>,
    metrics_addr: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde::option")]
    identity_gc_grace: Option<Duration>,
    mirror_peers: Option<PathBuf>,
    #[serde(default, with = "humantime_serde::option")]
    mirror_stale_ttl: Option<Duration>,
    mirror_max_records_per_peer: Option<usize>,
    mirror_max_value_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde::option")]
    mirror_max_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    mirror_peers_poll: Option<Duration>,
    replica_name: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    leader_lease_ttl: Option<Duration>,
    log_format: Option<LogFormat>,
}

impl Cli {
    /// Fills unset flags from the config file.
    fn merge(mut self, file: FileConfig) -> Self {
        macro_rules! fill {
            ($($field:ident),*) => {$(
                if self.$field.is_none() { self.$field = file.$field; }
            )*};
        }
        macro_rules! fill_vec {
            ($($field:ident),*) => {$(
                if self.$field.is_empty() { self.$field = file.$field; }
            )*};
        }
        fill!(
            cluster_name,
            cluster_id,
            max_connected_clusters,
            store,
            raft_id,
            raft_data_dir,
            raft_listen,
            etcd_ca,
            etcd_cert,
            etcd_key,
            source,
            dir_poll_interval,
            kube_context,
            listen,
            tls_dir,
            replica_cert,
            replica_key,
            trust_domain,
            export_pods,
            metrics_addr,
            identity_gc_grace,
            mirror_peers,
            mirror_stale_ttl,
            mirror_max_records_per_peer,
            mirror_max_value_bytes,
            mirror_max_backoff,
            mirror_peers_poll,
            replica_name,
            leader_lease_ttl,
            log_format
        );
        fill_vec!(pod_cidrs, raft_peers, etcd_endpoints, allowed_clusters);
        self
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("clustermesh-apiserver: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let cli = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let file: FileConfig = toml::from_str(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?;
            cli.merge(file)
        }
        None => cli,
    };
    init_logging(cli.log_format.unwrap_or(LogFormat::Text));

    let cluster = cli
        .cluster_name
        .clone()
        .context("--cluster-name is required")?;
    validate_cluster_name(&cluster)?;
    let mode = ClusterIdMode::from_max_clusters(cli.max_connected_clusters.unwrap_or(255))?;
    let cluster_id = cli.cluster_id.context("--cluster-id is required")?;
    validate_cluster_id(cluster_id, mode)?;
    let pod_cidrs = cli
        .pod_cidrs
        .iter()
        .map(|c| Cidr::parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let trust_domain = TrustDomain::new(
        cli.trust_domain
            .clone()
            .unwrap_or_else(|| "clustermesh.local".to_owned()),
    )?;
    let tls_dir = cli
        .tls_dir
        .clone()
        .context("--tls-dir is required (the mesh API only serves mTLS)")?;
    let tls = ReloadingTls::load(trust_domain.clone(), TlsPaths::server(&tls_dir))
        .with_context(|| format!("cannot load TLS material from {}", tls_dir.display()))?;
    let server_identity = tls.current().identity().clone();
    if !server_identity.is_cluster(&cluster) {
        bail!(
            "the server certificate {} names {server_identity}, but this is cluster {cluster:?} (--cluster-name); use the certificates issued for {cluster} (server.crt must name spiffe://{trust_domain}/cluster/{cluster})",
            tls_dir.join(clustermesh_certs::layout::SERVER_CERT_FILE).display()
        );
    }
    let _tls_watcher = tls.spawn_watcher(clustermesh_certs::reload::DEFAULT_POLL_INTERVAL);
    let tls: Arc<dyn TlsSource> = tls;

    let metrics = Arc::new(Metrics::new());
    let source = build_source(&cli, &metrics).await?;
    let replica_tls = match cli.store.unwrap_or(StoreKind::Raft) {
        StoreKind::Raft => Some(load_replica_tls(&cli, &cluster, &trust_domain, &tls_dir)?),
        StoreKind::Etcd => None,
    };
    let _replica_tls_watcher = replica_tls
        .as_ref()
        .map(|t| t.spawn_watcher(clustermesh_certs::reload::DEFAULT_POLL_INTERVAL));
    let (store, replica) = build_store(&cli, &cluster, replica_tls).await?;

    let mut export = ExportConfig::new(cluster.clone(), cluster_id);
    export.mode = mode;
    export.pod_cidrs = pod_cidrs;
    if let Some(grace) = cli.identity_gc_grace {
        export.identity_gc_grace = grace;
    }
    let listen = cli
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 32379)));
    let grpc_listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--listen)"))?;
    let metrics_addr = cli
        .metrics_addr
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9963)));
    let ops_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} (--metrics-addr)"))?;
    let policy = AccessPolicy {
        cluster: cluster.clone(),
        allowed_clusters: if cli.allowed_clusters.is_empty() {
            None
        } else {
            Some(cli.allowed_clusters.iter().cloned().collect())
        },
    };
    let export_pods: PodExport = match cli.export_pods.as_deref() {
        None => PodExport::All,
        Some(text) => text
            .parse()
            .with_context(|| format!("--export-pods {text:?}"))?,
    };
    let mirror = cli.mirror_peers.clone().map(|peers_file| MirrorConfig {
        cluster: cluster.clone(),
        cluster_id,
        pod_cidrs: cli.pod_cidrs.clone(),
        trust_domain: trust_domain.clone(),
        peers_file,
        poll: cli.mirror_peers_poll.unwrap_or(Duration::from_secs(1)),
        cert_file: tls_dir.join(clustermesh_certs::layout::SERVER_CERT_FILE),
        key_file: tls_dir.join(clustermesh_certs::layout::SERVER_KEY_FILE),
        backoff: ReconnectBackoff {
            max: cli
                .mirror_max_backoff
                .unwrap_or(ReconnectBackoff::default().max),
            ..ReconnectBackoff::default()
        },
        stale_ttl: cli.mirror_stale_ttl,
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        limits: MirrorLimits {
            max_records_per_peer: cli
                .mirror_max_records_per_peer
                .unwrap_or(MirrorLimits::default().max_records_per_peer),
            max_value_bytes: cli
                .mirror_max_value_bytes
                .unwrap_or(MirrorLimits::default().max_value_bytes)
                .min(MirrorLimits::default().max_value_bytes),
        },
    });
    let replica_name = match &cli.replica_name {
        Some(name) if name.trim().is_empty() => bail!("--replica-name must not be empty"),
        Some(name) => name.clone(),
        None => match cli.store.unwrap_or(StoreKind::Raft) {
            StoreKind::Raft => format!("replica-{}", cli.raft_id.unwrap_or(1)),
            StoreKind::Etcd => host_name(),
        },
    };
    let lease_ttl = cli.leader_lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
    if lease_ttl < Duration::from_secs(1) {
        bail!("--leader-lease-ttl must be at least 1s (got {lease_ttl:?})");
    }
    let election =
        ElectionConfig::new(cluster.clone(), replica_name.clone()).with_lease_ttl(lease_ttl);
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    tracing::info!(%cluster, cluster_id, %listen, %metrics_addr, %export_pods, replica = %replica_name, ?lease_ttl, "starting");
    let options = ServerOptions {
        export,
        cache: CacheConfig::default(),
        export_pods,
        policy,
        grpc_listener,
        tls,
        ops_listener: Some(ops_listener),
        stream_buffer: 1024,
        metrics,
        mirror,
        election,
    };
    let result = server::run(store, source, options, shutdown).await;
    if let Some(replica) = replica {
        replica.shutdown().await;
    }
    result.context("API server failed")
}

/// The host name (a pod's name in Kubernetes), for the default replica name.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "replica".to_owned())
}

/// The source factory: each leader term runs a fresh copy of the configured source.
async fn build_source(cli: &Cli, metrics: &Arc<Metrics>) -> Result<SourceFactory> {
    let spec = cli
        .source
        .clone()
        .context("--source is required: kubernetes or dir:PATH")?;
    if let Some(path) = spec.strip_prefix("dir:") {
        if cli.kube_context.is_some() {
            bail!("--kube-context only applies to --source kubernetes");
        }
        let mut source = DirSource::new(path).with_metrics(Arc::clone(metrics));
        if let Some(interval) = cli.dir_poll_interval {
            source = source.with_poll_interval(interval);
        }
        return Ok(Arc::new(move || {
            Box::new(source.clone()) as Box<dyn Source>
        }));
    }
    if spec == "kubernetes" {
        let source = KubernetesSource::connect(cli.kube_context.as_deref())
            .await
            .context("cannot set up the Kubernetes source")?;
        let source = source.with_metrics(Arc::clone(metrics));
        return Ok(Arc::new(move || {
            Box::new(source.clone()) as Box<dyn Source>
        }));
    }
    bail!("invalid --source {spec:?}: use kubernetes or dir:PATH")
}

/// Loads the raft replica's own certificate (its own role: the mesh API server's
/// certificate may not call the raft port) and checks that it names this replica.
fn load_replica_tls(
    cli: &Cli,
    cluster: &str,
    trust_domain: &TrustDomain,
    tls_dir: &std::path::Path,
) -> Result<Arc<ReloadingTls>> {
    let defaults = TlsPaths::replica(tls_dir);
    let paths = TlsPaths {
        ca: defaults.ca,
        cert: cli.replica_cert.clone().unwrap_or(defaults.cert),
        key: cli.replica_key.clone().unwrap_or(defaults.key),
    };
    let cert = paths.cert.display().to_string();
    let tls = ReloadingTls::load(trust_domain.clone(), paths).with_context(|| {
        format!("cannot load the raft replica certificate {cert} (--replica-cert; `clustermesh enable` issues it as replica.crt)")
    })?;
    let id = cli.raft_id.unwrap_or(1);
    let identity = tls.current().identity().clone();
    let expected = PeerIdentity::replica(trust_domain.clone(), cluster, id)?;
    if identity != expected {
        bail!(
            "the replica certificate {cert} names {identity}, but this is replica {id} of cluster {cluster:?}; it must name {expected} (re-run `clustermesh enable` to issue replica certificates)"
        );
    }
    Ok(tls)
}

async fn build_store(
    cli: &Cli,
    cluster: &str,
    replica_tls: Option<Arc<ReloadingTls>>,
) -> Result<(Arc<dyn Store>, Option<Arc<Replica>>)> {
    match cli.store.unwrap_or(StoreKind::Raft) {
        StoreKind::Etcd => {
            if cli.etcd_endpoints.is_empty() {
                bail!("--store etcd needs --etcd-endpoints");
            }
            let mut config = EtcdConfig::new(cli.etcd_endpoints.iter().cloned());
            if let Some(etcd_tls) = etcd_tls(cli)? {
                config = config.with_tls(etcd_tls);
            }
            let store = EtcdStore::connect(config).await.map_err(|e| {
                let advice = match e {
                    EtcdConnectError::TlsRefused { .. } => {
                        " (check that etcd's --trusted-ca-file signed --etcd-cert, and --etcd-ca \
                         signed etcd's certificate)"
                    }
                    _ => "",
                };
                anyhow::Error::new(e).context(format!("cannot connect to etcd{advice}"))
            })?;
            Ok((Arc::new(store), None))
        }
        StoreKind::Raft => {
            let id = cli.raft_id.unwrap_or(1);
            let data_dir = cli
                .raft_data_dir
                .clone()
                .context("--store raft needs --raft-data-dir")?;
            let listen = cli
                .raft_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 32380)));
            let replica_tls: Arc<dyn TlsSource> =
                replica_tls.context("the raft store needs the replica certificate")?;
            let mut builder = RaftConfig::builder(id, data_dir)
                .listen(listen)
                .tls(ReplicaTls::new(replica_tls, cluster));
            if cli.raft_peers.is_empty() {
                builder = builder.member(id, listen.to_string());
            }
            for peer in &cli.raft_peers {
                let (peer_id, addr) = peer
                    .split_once('=')
                    .and_then(|(i, a)| Some((i.parse::<u64>().ok()?, a)))
                    .with_context(|| format!("invalid --raft-peer {peer:?}: use ID=HOST:PORT"))?;
                builder = builder.member(peer_id, addr);
            }
            let config = builder.build().context("invalid raft configuration")?;
            let replica = Replica::start(config)
                .await
                .context("cannot start the raft replica")?;
            let store = RaftStore::new(Arc::clone(&replica));
            Ok((Arc::new(store), Some(replica)))
        }
    }
}

/// The etcd TLS flags, refusing combinations that would silently drop the client
/// certificate.
fn etcd_tls(cli: &Cli) -> Result<Option<EtcdTls>> {
    let identity = match (&cli.etcd_cert, &cli.etcd_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            bail!("--etcd-cert needs --etcd-key (the client certificate's private key)")
        }
        (None, Some(_)) => bail!("--etcd-key needs --etcd-cert (the client certificate)"),
    };
    match (&cli.etcd_ca, identity) {
        (Some(ca), identity) => {
            let mut tls = EtcdTls::new(ca);
            if let Some((cert, key)) = identity {
                tls = tls.with_client_identity(cert, key);
            }
            Ok(Some(tls))
        }
        (None, Some(_)) => bail!(
            "--etcd-cert/--etcd-key need --etcd-ca (the CA that signed etcd's server \
             certificate): a client certificate is only presented over TLS"
        ),
        (None, None) => Ok(None),
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_durations_use_humantime_syntax() {
        let file: FileConfig =
            toml::from_str("dir_poll_interval = \"250ms\"\nidentity_gc_grace = \"1h 30m\"\n")
                .unwrap();
        assert_eq!(file.dir_poll_interval, Some(Duration::from_millis(250)));
        assert_eq!(file.identity_gc_grace, Some(Duration::from_secs(5400)));
        let file: FileConfig =
            toml::from_str("leader_lease_ttl = \"3s\"\nreplica_name = \"east-0\"\n").unwrap();
        assert_eq!(file.leader_lease_ttl, Some(Duration::from_secs(3)));
        assert_eq!(file.replica_name.as_deref(), Some("east-0"));
        let file: FileConfig = toml::from_str("").unwrap();
        assert_eq!(file.dir_poll_interval, None);
        let err = toml::from_str::<FileConfig>("dir_poll_interval = \"5 fortnights\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 fortnights"), "{err}");
        assert!(toml::from_str::<FileConfig>("dir_poll_interval = 5\n").is_err());
    }
}
