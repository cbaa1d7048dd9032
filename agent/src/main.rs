//! `clustermesh-agent`: the node agent binary.
//!
//! Parses flags, sets up logging, opens the datapath (eBPF, or a recorder for dry runs),
//! starts the control plane, the admin API and the optional HTTP endpoint, and exits
//! non-zero with one clear line when it cannot start.
//!
//! `clustermesh-agent mount-bpffs` is the one-shot exception: it mounts bpffs and exits.
//! The Helm chart runs it in a privileged init container (the image has no shell), so the
//! long-running agent keeps its minimal capabilities.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use clustermesh_agent::admin::{self, BpfDumpHook};
use clustermesh_agent::bpf::{BpfConfig, BpfDatapath, BpfError, BpffsMount};
use clustermesh_agent::enforcement::CgroupTree;
use clustermesh_agent::http;
use clustermesh_agent::runtime::{Agent, AgentOptions};
use clustermesh_agent_core::datapath::Datapath;
use clustermesh_agent_core::maglev::{Maglev, TableSize, DEFAULT_SEED};
use clustermesh_agent_core::policy::memory::MemPolicyDatapath;
use clustermesh_agent_core::policy::plane::CgroupResolver;
use clustermesh_agent_core::policy::PolicyDatapath;
use clustermesh_agent_core::recording::RecordingDatapath;
use clustermesh_agent_core::watcher::ReconnectBackoff;
use clustermesh_api::policy::PeerClusters;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DatapathKind {
    /// Program the eBPF maps (needs root, bpffs and cgroup v2).
    Bpf,
    /// Compute everything but program nothing (dry run; see the admin API).
    Record,
}

/// clustermesh node agent: watches every cluster, merges global services, builds
/// weighted Maglev tables and programs the eBPF datapath.
#[derive(Debug, Parser)]
#[command(
    name = "clustermesh-agent",
    version,
    propagate_version = true,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Mount bpffs (unless it is mounted already) and exit. Needs CAP_SYS_ADMIN; the Helm
    /// chart runs it in a privileged init container whose volume has Bidirectional mount
    /// propagation, so the mount reaches the host and the agent container.
    MountBpffs {
        /// Where to mount bpffs.
        #[arg(long, default_value = clustermesh_agent::bpf::DEFAULT_BPFFS)]
        path: PathBuf,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
}

/// Flags of the long-running agent.
#[derive(Debug, clap::Args)]
struct Args {
    /// Agent configuration file (written by `clustermesh enable/connect`), reloaded on change.
    #[arg(long, env = "CLUSTERMESH_AGENT_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// This node's name.
    #[arg(long, env = "NODE_NAME", required = true)]
    node_name: Option<String>,
    /// This node's zone (`topology.kubernetes.io/zone`).
    #[arg(long, env = "NODE_ZONE", default_value = "")]
    zone: String,
    /// Admin API unix socket.
    #[arg(long, default_value = "/var/run/clustermesh/agent.sock")]
    admin_socket: PathBuf,
    /// Also serve /healthz and /metrics over TCP on this address (e.g. 0.0.0.0:9963), for
    /// the kubelet and Prometheus; default: off.
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<std::net::SocketAddr>,
    /// Serve the admin routes (/v1/status, /v1/services, /v1/bpf/lb) on --http-listen too,
    /// to requests whose X-Clustermesh-Token header holds the token in this file (read at
    /// each request). `clustermesh status` in Kubernetes mode reads them this way.
    #[arg(long, value_name = "FILE", requires = "http_listen")]
    http_token_file: Option<PathBuf>,
    /// Drop an unreachable cluster's records after this long (e.g. `10m`); default: keep.
    #[arg(long, value_parser = humantime::parse_duration)]
    stale_ttl: Option<Duration>,
    /// Maglev hash seed (must be the same on every node of the mesh).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    maglev_seed: u64,
    /// Fixed Maglev table size (a prime); default: per service, ≥ 100 × backends.
    #[arg(long)]
    maglev_table_size: Option<u32>,
    /// Datapath to program.
    #[arg(long, value_enum, default_value = "bpf")]
    datapath: DatapathKind,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = clustermesh_agent::bpf::DEFAULT_PIN_DIR)]
    bpf_pin_dir: PathBuf,
    /// cgroup v2 directory to attach the socket load balancer to (default: the root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// How often to check the configuration file for changes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    config_poll: Duration,
    /// Largest reconnect backoff.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// What a policy peer selector without `io.cilium.k8s.policy.cluster` selects: the
    /// local cluster only (Cilium's default since 1.18) or every connected cluster.
    #[arg(
        long,
        value_enum,
        default_value = "local",
        env = "CLUSTERMESH_POLICY_PEER_CLUSTERS"
    )]
    policy_peer_clusters: PeerClustersArg,
    /// This node's own addresses (repeatable): traffic from them has the reserved `host`
    /// identity, which isolated pods always admit (kubelet probes).
    #[arg(
        long = "host-ip",
        value_name = "IP",
        env = "HOST_IPS",
        value_delimiter = ','
    )]
    host_ips: Vec<std::net::IpAddr>,
    /// Enforce network policy (identities, endpoints and the local cluster's policies).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    policy: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PeerClustersArg {
    /// Only the local cluster.
    Local,
    /// Every connected cluster.
    All,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::MountBpffs { path, log_format }) => {
            init_logging(log_format);
            mount_bpffs(&path)
        }
        None => {
            init_logging(cli.args.log_format);
            run(cli.args)
        }
    };
    if let Err(e) = result {
        eprintln!("clustermesh-agent: {e:#}");
        std::process::exit(1);
    }
}

/// `clustermesh-agent mount-bpffs`.
fn mount_bpffs(path: &std::path::Path) -> anyhow::Result<()> {
    match clustermesh_agent::bpf::mount_bpffs(path) {
        Ok(BpffsMount::AlreadyMounted) => {
            tracing::info!(path = %path.display(), "bpffs is mounted already");
            Ok(())
        }
        Ok(BpffsMount::Mounted) => {
            tracing::info!(path = %path.display(), "mounted bpffs");
            Ok(())
        }
        Err(e @ BpfError::BpffsMount { .. }) => Err(anyhow::anyhow!(
            "{:#}; mount-bpffs needs CAP_SYS_ADMIN (the Helm chart runs it in a privileged \
             init container), and in a container the mount reaches the host only through a \
             volume with Bidirectional mount propagation",
            anyhow::Error::new(e)
        )),
        Err(e) => Err(e.into()),
    }
}

/// A datapath that cannot open, with the advice for the user running this binary.
fn datapath_error(e: BpfError) -> anyhow::Error {
    match e {
        BpfError::BpffsNotMounted { .. } => anyhow::anyhow!(
            "cannot open the eBPF datapath: {e}; mount it before the agent starts (the Helm \
             chart's mount-bpffs init container does; on a host run `clustermesh-agent \
             mount-bpffs` as root or enable systemd's sys-fs-bpf.mount), or use --datapath record"
        ),
        e => anyhow::Error::new(e)
            .context("cannot open the eBPF datapath (or run with --datapath record)"),
    }
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let size = args
        .maglev_table_size
        .map_or(TableSize::Auto, TableSize::Fixed);
    let maglev = Maglev::new(args.maglev_seed).with_table_size(size);
    let mut policy: Option<Box<dyn PolicyDatapath>> = None;
    let (datapath, bpf_hook): (Arc<dyn Datapath>, Option<BpfDumpHook>) = match args.datapath {
        DatapathKind::Record => {
            // A dry run computes policy too (shown by the admin API), into memory.
            policy = Some(Box::new(MemPolicyDatapath::new()));
            (Arc::new(RecordingDatapath::new()), None)
        }
        DatapathKind::Bpf => {
            let mut cfg = BpfConfig::default().with_pin_dir(&args.bpf_pin_dir);
            if let Some(cg) = &args.cgroup {
                cfg = cfg.with_cgroup(cg);
            }
            let bpf = match BpfDatapath::open(cfg) {
                Ok(bpf) => Arc::new(bpf),
                Err(e) => return Err(datapath_error(e)),
            };
            if args.policy {
                let pol = bpf.policy().map_err(datapath_error)?;
                policy = Some(Box::new(pol));
            }
            let for_dump = Arc::clone(&bpf);
            let hook: BpfDumpHook = Arc::new(move || {
                let dump = for_dump.dump(false).map_err(|e| e.to_string())?;
                serde_json::to_value(dump).map_err(|e| e.to_string())
            });
            (bpf, Some(hook))
        }
    };
    let (Some(config), Some(node_name)) = (&args.config, &args.node_name) else {
        anyhow::bail!("--config and --node-name are required");
    };
    let mut options = AgentOptions::new(config, node_name);
    options.zone = args.zone;
    options.stale_ttl = args.stale_ttl;
    options.maglev = maglev;
    options.config_poll = args.config_poll;
    options.backoff = ReconnectBackoff {
        max: args.max_backoff,
        ..ReconnectBackoff::default()
    };
    options.peer_clusters = match args.policy_peer_clusters {
        PeerClustersArg::Local => PeerClusters::Local,
        PeerClustersArg::All => PeerClusters::All,
    };
    options.host_addresses = args.host_ips.clone();
    let root = match &args.cgroup {
        Some(cg) => Some(cg.clone()),
        None => clustermesh_agent::bpf::cgroup2_mount().ok(),
    };
    let policy = match (policy.filter(|_| args.policy), root) {
        (Some(dp), Some(root)) => {
            let resolver: Box<dyn CgroupResolver> = Box::new(CgroupTree::new(root));
            Some((dp, resolver))
        }
        (Some(_), None) => {
            tracing::warn!("no cgroup v2 hierarchy found: pods' cgroups cannot be found, so network policy is not enforced; mount cgroup2 or pass --cgroup");
            None
        }
        (None, _) => None,
    };
    let cancel = CancellationToken::new();
    let agent = Agent::start(options, datapath, policy, cancel.clone())
        .with_context(|| format!("cannot start with config {}", config.display()))?;
    if let Some(dir) = args.admin_socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create admin socket directory {}", dir.display()))?;
    }
    if let Some(addr) = args.http_listen {
        let listener = http::bind(addr).await?;
        let access = args
            .http_token_file
            .clone()
            .map_or(http::AdminAccess::Off, http::AdminAccess::TokenFile);
        tokio::spawn(http::serve(
            listener,
            agent.view.clone(),
            bpf_hook.clone(),
            access,
            cancel.clone(),
        ));
    }
    let admin_cancel = cancel.clone();
    let admin_task = tokio::spawn({
        let view = agent.view.clone();
        let path = args.admin_socket.clone();
        async move { admin::serve(&path, view, bpf_hook, admin_cancel).await }
    });
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    };
    let mut control = agent.task;
    tokio::select! {
        r = shutdown => { r.context("cannot listen for shutdown signals")?; }
        r = &mut Box::pin(admin_task) => {
            r.context("admin API task failed")??;
        }
        // It only ends when cancelled, which has not happened yet: a panic or a bug.
        r = &mut control => {
            cancel.cancel();
            r.context("the control loop failed")?;
            anyhow::bail!("the control loop stopped unexpectedly");
        }
    }
    tracing::info!("shutting down (pinned eBPF state stays in force)");
    cancel.cancel();
    let _ = control.await;
    Ok(())
}
