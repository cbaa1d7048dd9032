//! The command line of the `clustermesh` binary (clap): global flags, verbs and their
//! arguments.
//!
//! The flags that pick the cluster are two argument groups, one per mode:
//! [`StateDirFlags`] (standalone) and [`KubeFlags`] (Kubernetes). Which one is used
//! decides the target ([`super::Mode`]); the flags a verb has only in one mode are
//! refused in the other by that mode's target ([`super::target::MeshTarget::check_flags`]),
//! with the same one-line errors as before the groups existed.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples (Kubernetes, one kubeconfig context per cluster):
  clustermesh --context east enable --cluster-name east --cluster-id 1 --service-type LoadBalancer
  clustermesh --context west enable --cluster-name west --cluster-id 2 --service-type NodePort \\
      --set image.tag=v0.1.0 --set apiserver.service.nodePort=32379
  clustermesh --context east --destination-context west connect
  clustermesh --context east --destination-context west disconnect

Examples (standalone hosts, one state directory per cluster):
  clustermesh --state-dir /var/lib/clustermesh/east enable --cluster-name east --cluster-id 1 \\
      --mesh-endpoint 10.0.0.1:2379 --agent-socket /run/clustermesh/agent.sock
  clustermesh --state-dir /var/lib/clustermesh/west enable --cluster-name west --cluster-id 2 \\
      --mesh-endpoint 10.0.1.1:2379
  clustermesh --state-dir /var/lib/clustermesh/east connect --destination-state-dir /var/lib/clustermesh/west
  clustermesh --state-dir /var/lib/clustermesh/east status --wait --wait-duration 2m
  clustermesh --state-dir /var/lib/clustermesh/east -o json service list
  clustermesh --context east policy get --pod default/web
  clustermesh completion bash > /etc/bash_completion.d/clustermesh";

/// Connect clusters into one service mesh and inspect it.
#[derive(Debug, Parser)]
#[command(name = "clustermesh", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// Standalone mode: the cluster is a local state directory.
    #[command(flatten)]
    pub standalone: StateDirFlags,
    /// Kubernetes mode: the cluster is reached through a kubeconfig context.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Log format (logs go to stderr; RUST_LOG sets the level, default error).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags of standalone mode.
#[derive(Debug, Args)]
#[group(id = "standalone-mode", multiple = true)]
pub struct StateDirFlags {
    /// State directory of the cluster to operate on (standalone mode).
    #[arg(long, global = true, env = "CLUSTERMESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Flags of Kubernetes mode.
#[derive(Debug, Args)]
#[group(id = "kubernetes-mode", multiple = true)]
pub struct KubeFlags {
    /// Kubeconfig context of the cluster to operate on (Kubernetes mode).
    #[arg(long, global = true, conflicts_with = "state_dir")]
    pub context: Option<String>,
    /// Kubeconfig context of the other cluster for `connect`/`disconnect` (Kubernetes mode).
    #[arg(long, global = true)]
    pub destination_context: Option<String>,
    /// Namespace of the mesh components (Kubernetes mode).
    #[arg(long, global = true, default_value = crate::k8s::context::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create this cluster's CA, certificates and configuration (Kubernetes: and install
    /// or upgrade the mesh API server and agents).
    #[command(
        long_about = "Create this cluster's CA, certificates and configuration.\n\n\
Standalone (--state-dir): writes the state directory; --mesh-endpoint is required.\n\n\
Kubernetes (--context): stores the CA and the server, agent-client and admin certificates \
as Secrets (clustermesh-ca, clustermesh-apiserver-server, clustermesh-agent-client, \
clustermesh-apiserver-admin, clustermesh-ca-bundle), the name and ID in ConfigMap \
clustermesh-config, and server-side applies the clustermesh chart (field manager \
clustermesh). Running it again on an enabled cluster upgrades it: the CA is reused, leaf \
certificates are renewed and connected clusters are kept; a different name, ID or trust \
domain is refused. A failed enable can simply be run again.\n\n\
Chart values (Kubernetes only): --values FILE and --set KEY.PATH=VALUE override the \
chart's defaults like helm does (--set wins over files). They are stored in ConfigMap \
clustermesh-config, so a later enable, connect or disconnect keeps them and a later \
--set merges over them; --set KEY=null restores a default. Unknown top-level keys, a map \
replaced by a single value, and the values the CLI sets itself (cluster.name, cluster.id, \
cluster.maxConnectedClusters, trustDomain, apiserver.service.type, agent.remoteClusters, \
tls.*) are refused before anything is written.",
        after_help = "Examples:\n  clustermesh --state-dir ./east enable --cluster-name east --cluster-id 1 --mesh-endpoint 127.0.0.1:2379\n  clustermesh --context east enable --cluster-name east --cluster-id 1 --service-type NodePort \\\n      --set image.tag=v0.3.0 --set apiserver.service.nodePort=32379\n  clustermesh --context east enable --cluster-name east --cluster-id 1 --values my-values.yaml"
    )]
    Enable(EnableArgs),
    /// Remove this cluster's mesh configuration and certificates (standalone: keeps
    /// manifests/; Kubernetes: also uninstalls the mesh API server and agents).
    #[command(
        long_about = "Remove this cluster's mesh configuration and certificates.\n\n\
Standalone (--state-dir): removes the state directory's mesh files, keeps manifests/.\n\n\
Kubernetes (--context): deletes every object of the chart and the CLI labelled with this \
cluster (workloads first), the Secrets (CA last) and ConfigMap clustermesh-config. Refused \
while other clusters are connected: disconnect them first. With --force it proceeds anyway; \
the peers then still list this cluster (their agents report it unreachable) until you \
disable them too or re-enable this cluster with the same name, ID and a reconnect."
    )]
    Disable {
        /// Disable even while still connected to other clusters.
        #[arg(long)]
        force: bool,
    },
    /// Connect this cluster with another one, in both directions.
    #[command(
        long_about = "Connect this cluster with another one, in both directions.\n\n\
Kubernetes (--context A --destination-context B): reads both clusters' settings, CAs and \
mesh API addresses (LoadBalancer ingress + port, or node InternalIPs + nodePort), checks \
that names and IDs are unique across both meshes, then adds each cluster's CA to the other's \
clustermesh-ca-bundle and each cluster to the other's clustermesh-agent-config (agents \
reload it). The server certificates are reissued if they do not yet cover the address the \
peer dials. All or nothing: if a write fails, the earlier ones are undone.",
        after_help = "Examples:\n  clustermesh --state-dir ./east connect --destination-state-dir ./west\n  clustermesh --context east --destination-context west connect"
    )]
    Connect {
        /// State directory of the other cluster.
        #[arg(long)]
        destination_state_dir: Option<PathBuf>,
        /// How long to wait for each mesh API server to answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Disconnect this cluster from another one, in both directions (Kubernetes:
    /// --context A --destination-context B; all or nothing like connect).
    Disconnect {
        /// State directory of the other cluster.
        #[arg(long)]
        destination_state_dir: Option<PathBuf>,
        /// Kubernetes mode, instead of --destination-context: forget connected cluster NAME
        /// on this side only (for a peer that was disabled or whose context is gone).
        #[arg(long, value_name = "NAME", conflicts_with = "destination_state_dir")]
        destination_cluster: Option<String>,
    },
    /// Show the mesh API server, the agents and their cluster connections.
    #[command(
        after_help = "Example:\n  clustermesh --state-dir ./east status --wait --wait-duration 1m"
    )]
    Status {
        /// Wait until every agent is connected to every configured cluster.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits before failing.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        wait_duration: Duration,
        /// Timeout of each request.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Standalone mode: ask these agent admin sockets instead of the agent_sockets of
        /// cluster.yaml (repeatable).
        #[arg(long = "agent-socket", value_name = "PATH")]
        agent_sockets: Vec<PathBuf>,
    },
    /// Services as the agents see them.
    Service {
        /// What to do.
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// The eBPF datapath.
    Bpf {
        /// What to inspect.
        #[command(subcommand)]
        command: BpfCommand,
    },
    /// Security identities as the agents know them (network policy).
    Identity {
        /// What to do.
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Pod addresses as the agents know them (network policy).
    Endpoint {
        /// What to do.
        #[command(subcommand)]
        command: EndpointCommand,
    },
    /// Network policy of the pods on the agents' nodes.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print a shell completion script.
    Completion {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

/// `enable` arguments.
#[derive(Debug, Args)]
pub struct EnableArgs {
    /// Cluster name: at most 32 lowercase letters, digits and '-'.
    #[arg(long)]
    pub cluster_name: String,
    /// Cluster ID, unique in the mesh: 1..=255 (1..=511 with --max-connected-clusters 511).
    #[arg(long)]
    pub cluster_id: u32,
    /// 255 or 511.
    #[arg(long, default_value_t = 255)]
    pub max_connected_clusters: u32,
    /// Trust domain of the SPIFFE identities; every cluster of a mesh uses the same.
    #[arg(long, default_value = "clustermesh.local")]
    pub trust_domain: String,
    /// host:port where other clusters reach this cluster's mesh API (repeatable;
    /// standalone mode, required there).
    #[arg(long = "mesh-endpoint")]
    pub mesh_endpoints: Vec<String>,
    /// Standalone mode: also issue the server certificate for the in-cluster names of the
    /// plain Helm chart in this namespace (`clustermesh-apiserver.<NS>.svc`, …, and the
    /// replica's peer name), for Secrets made from the state directory.
    #[arg(long = "kubernetes-namespace", value_name = "NS")]
    pub kubernetes_namespace: Option<String>,
    /// Kubernetes mode: how other clusters reach the mesh API (default: the current
    /// type on an enabled cluster, else LoadBalancer).
    #[arg(long, value_enum)]
    pub service_type: Option<crate::k8s::objects::ServiceType>,
    /// Admin socket of one of this cluster's agents (repeatable), for status.
    #[arg(long = "agent-socket")]
    pub agent_sockets: Vec<PathBuf>,
    /// Standalone mode: how this cluster's agents reach the other clusters: `mirror`
    /// (watch only this cluster's mesh API server, which mirrors the connected peers;
    /// start it with `--mirror-peers <state-dir>/agent.yaml`) or `direct` (every agent
    /// watches every cluster). Kubernetes mode: `--set mode=direct`.
    #[arg(long, default_value = "mirror")]
    pub agent_mode: clustermesh_api::agent_config::WatchMode,
    /// Kubernetes mode: chart value override KEY.PATH=VALUE (repeatable; the value is a
    /// YAML scalar, `null` restores the chart default, `\.` is a dot inside a key). Stored
    /// in ConfigMap clustermesh-config and kept by later enable/connect/disconnect.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Kubernetes mode: YAML file of chart values merged over the chart defaults and the
    /// stored overrides (repeatable, later files win; --set wins over files). Stored like
    /// --set.
    #[arg(long = "values", value_name = "FILE")]
    pub values_files: Vec<PathBuf>,
}

/// `service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// List merged services with their backends per cluster.
    List {
        /// Ask this agent (default: the first answering agent of cluster.yaml).
        #[arg(long)]
        agent_socket: Option<PathBuf>,
        /// Kubernetes mode: ask only the agent pod on this node (default: every agent).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
    },
}

/// `bpf` subcommands.
#[derive(Debug, Subcommand)]
pub enum BpfCommand {
    /// Load balancing state.
    Lb {
        /// What to do.
        #[command(subcommand)]
        command: BpfLbCommand,
    },
}

/// `bpf lb` subcommands.
#[derive(Debug, Subcommand)]
pub enum BpfLbCommand {
    /// List programmed frontends, their Maglev tables and backends.
    List {
        /// Ask this agent (default: the first answering agent of cluster.yaml).
        #[arg(long)]
        agent_socket: Option<PathBuf>,
        /// Kubernetes mode: ask only the agent pod on this node (default: every agent).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
    },
}

/// Which agent answers: one flag per mode (see [`super::target::AgentPick`]).
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Ask this agent (default: the first answering agent of cluster.yaml).
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
    /// Kubernetes mode: ask only the agent pod on this node (default: every agent).
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
}

/// `identity` subcommands.
#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// List every security identity the agent knows: number, cluster, labels.
    List(AgentArgs),
}

/// `endpoint` subcommands.
#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// List every pod address the agent knows: cluster, identity, pod, labels.
    List(AgentArgs),
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show, per local pod, whether each direction is isolated, its allow rules and the
    /// node's verdict counters.
    #[command(
        after_help = "Examples:\n  clustermesh --context east policy get --pod default/web\n  clustermesh --state-dir ./east -o json policy get"
    )]
    Get {
        /// Which agent answers.
        #[command(flatten)]
        agent: AgentArgs,
        /// Only this pod, as NAMESPACE/NAME (an agent knows the local cluster's pods on its
        /// own node).
        #[arg(long, value_name = "NS/NAME")]
        pod: Option<String>,
    },
}

impl Command {
    /// The agent-picking flags of `identity list`, `endpoint list` and `policy get`.
    #[must_use]
    pub fn policy_view_agent(&self) -> Option<&AgentArgs> {
        match self {
            Self::Identity {
                command: IdentityCommand::List(a),
            }
            | Self::Endpoint {
                command: EndpointCommand::List(a),
            }
            | Self::Policy {
                command: PolicyCommand::Get { agent: a, .. },
            } => Some(a),
            _ => None,
        }
    }

    /// The verb as users type it, for error lines.
    #[must_use]
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Enable(_) => "enable",
            Self::Disable { .. } => "disable",
            Self::Connect { .. } => "connect",
            Self::Disconnect { .. } => "disconnect",
            Self::Status { .. } => "status",
            Self::Service { .. } => "service list",
            Self::Bpf { .. } => "bpf lb list",
            Self::Identity { .. } => "identity list",
            Self::Endpoint { .. } => "endpoint list",
            Self::Policy { .. } => "policy get",
            Self::Completion { .. } => "completion",
        }
    }
}
