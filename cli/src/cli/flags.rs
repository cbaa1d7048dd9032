//! Command-line definition and dispatch of the `clustermesh` binary.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::admin::{self, BpfLbEntry, ServiceStatus};
use crate::standalone::{self, EnableOptions};
use crate::state::StateDir;
use crate::status;

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
  clustermesh completion bash > /etc/bash_completion.d/clustermesh";

/// Connect clusters into one service mesh and inspect it.
#[derive(Debug, Parser)]
#[command(name = "clustermesh", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// State directory of the cluster to operate on (standalone mode).
    #[arg(long, global = true, env = "CLUSTERMESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Kubeconfig context of the cluster to operate on (Kubernetes mode).
    #[arg(long, global = true, conflicts_with = "state_dir")]
    pub context: Option<String>,
    /// Kubeconfig context of the other cluster for `connect`/`disconnect` (Kubernetes mode).
    #[arg(long, global = true)]
    pub destination_context: Option<String>,
    /// Namespace of the mesh components (Kubernetes mode).
    #[arg(long, global = true, default_value = crate::k8s::context::DEFAULT_NAMESPACE)]
    pub namespace: String,
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

/// A failed command: one line for the user and the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No --state-dir.
    #[error("no state directory given; pass --state-dir DIR (or set CLUSTERMESH_STATE_DIR)")]
    NoStateDir,
    /// A standalone operation failed.
    #[error(transparent)]
    Standalone(#[from] standalone::StandaloneError),
    /// A state directory could not be read.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// An agent could not be queried.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// `status --wait` timed out.
    #[error(
        "the mesh was not ready after {waited}: {missing}; check the agents' and apiservers' logs"
    )]
    NotReady {
        /// How long it waited.
        waited: String,
        /// What was missing.
        missing: String,
    },
    /// Plain `status` found something down (the report was printed).
    #[error("the mesh is not fully up: {0}")]
    Degraded(String),
    /// No agent socket configured or given.
    #[error(
        "no agent admin socket known; pass --agent-socket or add agent_sockets to cluster.yaml"
    )]
    NoAgent,
    /// A kubeconfig context could not be used.
    #[error(transparent)]
    Kube(#[from] crate::k8s::KubeError),
    /// The verb has no Kubernetes mode in this build.
    #[error(
        "`{verb}` is not available in Kubernetes mode yet (context {context} is reachable); use --state-dir (standalone mode)"
    )]
    KubeVerbUnavailable {
        /// The verb.
        verb: &'static str,
        /// The context that was reached.
        context: String,
    },
    /// `--destination-state-dir` missing in standalone mode.
    #[error("no destination state directory given; pass --destination-state-dir DIR")]
    NoDestinationStateDir,
    /// `--destination-context` without `--context`.
    #[error("--destination-context needs --context (the source cluster's kubeconfig context)")]
    DestinationContextWithoutContext,
    /// A Kubernetes-mode verb failed.
    #[error(transparent)]
    KubeMode(Box<crate::k8s::KubeModeError>),
    /// An option of the other mode was given.
    #[error("{0}")]
    WrongMode(String),
    /// `connect`/`disconnect` in Kubernetes mode without `--destination-context`.
    #[error("no destination cluster given; pass --destination-context CONTEXT (the other cluster's kubeconfig context)")]
    NoDestinationContext,
    /// JSON encoding failed.
    #[error("cannot encode output: {0}")]
    Encode(String),
}

impl From<crate::k8s::KubeModeError> for CliError {
    fn from(e: crate::k8s::KubeModeError) -> Self {
        Self::KubeMode(Box::new(e))
    }
}

fn state_dir(cli: &Cli) -> Result<StateDir, CliError> {
    cli.state_dir
        .clone()
        .map(StateDir::new)
        .ok_or(CliError::NoStateDir)
}

fn destination_dir(dir: Option<&PathBuf>) -> Result<StateDir, CliError> {
    dir.map(StateDir::new)
        .ok_or(CliError::NoDestinationStateDir)
}

fn verb_name(command: &Command) -> &'static str {
    match command {
        Command::Enable(_) => "enable",
        Command::Disable { .. } => "disable",
        Command::Connect { .. } => "connect",
        Command::Disconnect { .. } => "disconnect",
        Command::Status { .. } => "status",
        Command::Service { .. } => "service list",
        Command::Bpf { .. } => "bpf lb list",
        Command::Completion { .. } => "completion",
    }
}

/// Kubernetes mode: resolves the context(s) first so a wrong name or an unreachable API
/// server is the one line the user sees.
async fn run_kube(cli: &Cli, context: &str) -> Result<String, CliError> {
    let timeout = Duration::from_secs(10);
    let mut enable_overrides = Vec::new();
    if let Command::Enable(a) = &cli.command {
        // Chart value mistakes need no cluster to be found: say so before dialing one.
        let chart = crate::k8s::embedded::chart().map_err(crate::k8s::KubeModeError::from)?;
        enable_overrides =
            crate::k8s::values::user_overrides(&a.values_files, &a.sets, chart.default_values())
                .map_err(crate::k8s::KubeModeError::from)?;
    }
    let kubeconfig = crate::k8s::context::read_kubeconfig()?;
    let target =
        crate::k8s::context::connect(kubeconfig.clone(), context, &cli.namespace, timeout).await?;
    let destination = match (&cli.command, cli.destination_context.as_deref()) {
        (Command::Connect { .. } | Command::Disconnect { .. }, Some(dest)) => {
            Some(crate::k8s::context::connect(kubeconfig, dest, &cli.namespace, timeout).await?)
        }
        _ => None,
    };
    match &cli.command {
        Command::Enable(_) | Command::Disable { .. } if cli.destination_context.is_some() => {
            Err(CliError::WrongMode(format!(
                "--destination-context is only for connect and disconnect; `{}` acts on --context alone",
                verb_name(&cli.command)
            )))
        }
        Command::Enable(a) => {
            if !a.mesh_endpoints.is_empty() || !a.agent_sockets.is_empty() {
                return Err(CliError::WrongMode(
                    "--mesh-endpoint and --agent-socket are for standalone mode (--state-dir); with --context the address comes from the clustermesh-apiserver Service (see --service-type)".into(),
                ));
            }
            if a.kubernetes_namespace.is_some() {
                return Err(CliError::WrongMode(
                    "--kubernetes-namespace is for standalone mode (--state-dir, certificates for the plain Helm chart); with --context pass --namespace".into(),
                ));
            }
            let r = crate::k8s::enable::enable(
                &target,
                &crate::k8s::enable::EnableOptions {
                    name: a.cluster_name.clone(),
                    id: a.cluster_id,
                    max_connected_clusters: a.max_connected_clusters,
                    trust_domain: a.trust_domain.clone(),
                    service_type: a.service_type,
                    overrides: enable_overrides,
                },
            )
            .await?;
            match cli.output {
                Output::Json => json(&r),
                Output::Table => Ok(format!(
                    "{} cluster {} (id {}) in namespace {} of context {}: {} CA, {} chart objects applied{}, mesh API Service type {}{}\n{}  next: `clustermesh --context {} --destination-context <other> connect` once the Service has an address\n",
                    if r.upgraded { "upgraded" } else { "enabled" },
                    r.cluster,
                    r.id,
                    r.namespace,
                    r.context,
                    if r.ca_created { "new" } else { "existing" },
                    r.applied.len(),
                    if r.pruned.is_empty() {
                        String::new()
                    } else {
                        format!(", removed {} no longer rendered", r.pruned.join(" "))
                    },
                    r.service_type.as_str(),
                    if r.connected.is_empty() {
                        String::new()
                    } else {
                        format!(", still connected to {}", r.connected.join(", "))
                    },
                    {
                        let recreated: String = r
                            .recreated
                            .iter()
                            .map(|step| format!("  recreated: {step}\n"))
                            .collect();
                        let set = crate::k8s::values::flatten(&r.values);
                        if set.is_empty() {
                            recreated
                        } else {
                            format!("{recreated}  chart values set: {}\n", set.join(" "))
                        }
                    },
                    r.context,
                )),
            }
        }
        Command::Disable { force } => {
            let r = crate::k8s::enable::disable(&target, *force).await?;
            match cli.output {
                Output::Json => json(&r),
                Output::Table => Ok(format!(
                    "disabled cluster {} in context {} ({} objects deleted){}\n",
                    r.cluster,
                    r.context,
                    r.deleted.len(),
                    if r.peers_left.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; {} still list it: run `clustermesh --context <peer> disconnect --destination-cluster {}` on each",
                            r.peers_left.join(", "),
                            r.cluster
                        )
                    }
                )),
            }
        }
        Command::Connect {
            destination_state_dir,
            ..
        } => {
            if destination_state_dir.is_some() {
                return Err(CliError::WrongMode(
                    "--destination-state-dir is for standalone mode; with --context pass --destination-context".into(),
                ));
            }
            let dest = destination.ok_or(CliError::NoDestinationContext)?;
            let r = crate::k8s::mesh::connect(&target, &dest).await?;
            match cli.output {
                Output::Json => json(&r),
                Output::Table => Ok(format!(
                    "connected {} ({}) <-> {} ({}){}; agents pick up the change without a restart\n",
                    r.source,
                    r.source_endpoints.join(","),
                    r.destination,
                    r.destination_endpoints.join(","),
                    if r.already_connected {
                        " (were already connected; configuration refreshed)"
                    } else {
                        ""
                    }
                )),
            }
        }
        Command::Disconnect {
            destination_state_dir,
            destination_cluster,
        } => {
            if destination_state_dir.is_some() {
                return Err(CliError::WrongMode(
                    "--destination-state-dir is for standalone mode; with --context pass --destination-context".into(),
                ));
            }
            let r = match (destination, destination_cluster) {
                (Some(_), Some(_)) => {
                    return Err(CliError::WrongMode(
                        "pass either --destination-context (disconnect both sides) or --destination-cluster (forget a peer on this side only), not both".into(),
                    ))
                }
                (None, Some(peer)) => crate::k8s::mesh::forget(&target, peer).await?,
                (Some(dest), None) => crate::k8s::mesh::disconnect(&target, &dest).await?,
                (None, None) => return Err(CliError::NoDestinationContext),
            };
            if r.one_sided {
                return match cli.output {
                    Output::Json => json(&r),
                    Output::Table => Ok(format!(
                        "cluster {} no longer lists {} (this side only)\n",
                        r.source, r.destination
                    )),
                };
            }
            match cli.output {
                Output::Json => json(&r),
                Output::Table => Ok(format!("disconnected {} <-> {}\n", r.source, r.destination)),
            }
        }
        Command::Status {
            wait,
            wait_duration,
            timeout,
            agent_sockets,
        } => {
            no_socket_in_kube_mode(agent_sockets.first())?;
            kube_status(cli, &target, *wait, *wait_duration, *timeout).await
        }
        Command::Service {
            command: ServiceCommand::List { agent_socket, node },
        } => {
            no_socket_in_kube_mode(agent_socket.as_ref())?;
            let r = crate::k8s::agents::services(&target, node.as_deref(), timeout).await?;
            kube_agents_output(cli, &r, "service list", |source, services| {
                services_table(source, services)
            })
        }
        Command::Bpf {
            command:
                BpfCommand::Lb {
                    command: BpfLbCommand::List { agent_socket, node },
                },
        } => {
            no_socket_in_kube_mode(agent_socket.as_ref())?;
            let r = crate::k8s::agents::bpf_lb(&target, node.as_deref(), timeout).await?;
            kube_agents_output(cli, &r, "datapath dump", |source, dump| {
                bpf_table(source, &admin::bpf_lb_entries(dump))
            })
        }
        _ => Err(CliError::KubeVerbUnavailable {
            verb: verb_name(&cli.command),
            context: target.context,
        }),
    }
}

fn no_socket_in_kube_mode(socket: Option<&PathBuf>) -> Result<(), CliError> {
    match socket {
        Some(_) => Err(CliError::WrongMode(
            "--agent-socket is for standalone mode (--state-dir); with --context the agents are asked through the API server (pick one with --node NODE)".into(),
        )),
        None => Ok(()),
    }
}

/// Kubernetes-mode `service list` / `bpf lb list` output: one block per agent (an agent
/// without an answer is listed with the reason); any such agent fails the command after
/// the output is printed.
fn kube_agents_output<T: serde::Serialize>(
    cli: &Cli,
    r: &crate::k8s::agents::AgentAnswers<T>,
    what: &'static str,
    table: impl Fn(&str, &T) -> String,
) -> Result<String, CliError> {
    let text = match cli.output {
        Output::Json => json(&r.agents)?,
        // Nobody answered: the error line says it all.
        Output::Table if r.agents.iter().all(|a| a.answer.is_none()) => String::new(),
        Output::Table => {
            let mut out = String::new();
            for a in &r.agents {
                match (&a.answer, &a.error) {
                    (Some(v), _) => out.push_str(&table(&format!("pod {}", a.label()), v)),
                    (None, e) => out.push_str(&format!(
                        "# agent pod {}: {}\n",
                        a.label(),
                        e.as_deref().unwrap_or("no answer")
                    )),
                }
            }
            out
        }
    };
    match r.check(what) {
        Ok(()) => Ok(text),
        Err(e) => {
            print!("{text}");
            Err(e.into())
        }
    }
}

/// `status` in Kubernetes mode: the report on stdout; not ready is an error line (after
/// printing the report), like standalone mode.
async fn kube_status(
    cli: &Cli,
    target: &crate::k8s::KubeTarget,
    wait: bool,
    wait_duration: Duration,
    timeout: Duration,
) -> Result<String, CliError> {
    let (st, ready) = if wait {
        crate::k8s::status::wait_ready(target, wait_duration, Duration::from_secs(1), timeout)
            .await?
    } else {
        let st = crate::k8s::status::collect(target, timeout).await?;
        let ready = st.ready;
        (st, ready)
    };
    let text = match cli.output {
        Output::Json => json(&st)?,
        Output::Table => st.table(),
    };
    if ready {
        return Ok(text);
    }
    print!("{text}");
    let missing = crate::status::Readiness::missing(&st);
    Err(if wait {
        CliError::NotReady {
            waited: humantime::format_duration(wait_duration).to_string(),
            missing,
        }
    } else {
        CliError::Degraded(missing)
    })
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(v).map_err(|e| CliError::Encode(e.to_string()))
}

/// Runs the command; returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, CliError> {
    if !matches!(cli.command, Command::Completion { .. }) {
        match (cli.context.as_deref(), cli.destination_context.is_some()) {
            (Some(context), _) => return run_kube(&cli, context).await,
            (None, true) => return Err(CliError::DestinationContextWithoutContext),
            (None, false) => {}
        }
    }
    match &cli.command {
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "clustermesh", &mut buf);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        Command::Enable(a) => {
            if !a.sets.is_empty() || !a.values_files.is_empty() {
                return Err(CliError::WrongMode(
                    "--set and --values are chart values for Kubernetes mode (--context); a standalone cluster (--state-dir) has no chart, configure its processes with their own flags".into(),
                ));
            }
            if a.service_type.is_some() {
                return Err(CliError::WrongMode(
                    "--service-type is for Kubernetes mode; pass --context CONTEXT, or --mesh-endpoint host:port for a standalone cluster".into(),
                ));
            }
            let dir = state_dir(&cli)?;
            let state = standalone::enable(
                &dir,
                &EnableOptions {
                    name: a.cluster_name.clone(),
                    id: a.cluster_id,
                    max_connected_clusters: a.max_connected_clusters,
                    trust_domain: a.trust_domain.clone(),
                    mesh_endpoints: a.mesh_endpoints.clone(),
                    agent_sockets: a.agent_sockets.clone(),
                    kubernetes_namespace: a.kubernetes_namespace.clone(),
                },
            )?;
            match cli.output {
                Output::Json => json(&state),
                Output::Table => Ok(format!(
                    "enabled cluster {} (id {}) in {}\n  mesh API server: clustermesh-apiserver --cluster-name {} --cluster-id {} --tls-dir {} --source dir:{}\n  agents:          clustermesh-agent --config {}\n",
                    state.name,
                    state.id,
                    dir.root().display(),
                    state.name,
                    state.id,
                    dir.tls_dir().display(),
                    dir.manifests_dir().display(),
                    dir.agent_config().display()
                )),
            }
        }
        Command::Disable { force } => {
            let name = standalone::disable(&state_dir(&cli)?, *force)?;
            match cli.output {
                Output::Json => json(&serde_json::json!({ "disabled": name })),
                Output::Table => Ok(format!("disabled cluster {name}\n")),
            }
        }
        Command::Connect {
            destination_state_dir,
            timeout,
        } => {
            let r = standalone::connect(
                &state_dir(&cli)?,
                &destination_dir(destination_state_dir.as_ref())?,
                *timeout,
            )
            .await?;
            match cli.output {
                Output::Json => json(&serde_json::json!({
                    "source": r.source, "destination": r.destination, "already_connected": r.already_connected,
                })),
                Output::Table => Ok(format!(
                    "connected {} <-> {}{}; agents pick up the change without a restart (check with `clustermesh status --wait`)\n",
                    r.source,
                    r.destination,
                    if r.already_connected { " (were already connected; configuration refreshed)" } else { "" }
                )),
            }
        }
        Command::Disconnect {
            destination_state_dir,
            destination_cluster,
        } => {
            if destination_cluster.is_some() {
                return Err(CliError::WrongMode(
                    "--destination-cluster is for Kubernetes mode (--context); pass --destination-state-dir".into(),
                ));
            }
            let (a, b) = standalone::disconnect(
                &state_dir(&cli)?,
                &destination_dir(destination_state_dir.as_ref())?,
            )?;
            match cli.output {
                Output::Json => json(&serde_json::json!({ "source": a, "destination": b })),
                Output::Table => Ok(format!("disconnected {a} <-> {b}\n")),
            }
        }
        Command::Status {
            wait,
            wait_duration,
            timeout,
            agent_sockets,
        } => {
            let dir = state_dir(&cli)?;
            let mut state = dir.load()?;
            if !agent_sockets.is_empty() {
                state.agent_sockets.clone_from(agent_sockets);
            }
            // With no agent listed there is nothing to wait for: say so at once.
            let wait = &(*wait && !state.agent_sockets.is_empty());
            let (st, ready) = if *wait {
                status::wait_ready(&dir, &state, *wait_duration, Duration::from_millis(500)).await
            } else {
                let st = status::collect(&dir, &state, *timeout).await;
                let ready = st.ready();
                (st, ready)
            };
            let text = match cli.output {
                Output::Json => json(&st)?,
                Output::Table => st.table(),
            };
            if ready {
                Ok(text)
            } else {
                // The report still goes to stdout; the error line says what is missing.
                print!("{text}");
                Err(if *wait {
                    CliError::NotReady {
                        waited: humantime::format_duration(*wait_duration).to_string(),
                        missing: st.missing(),
                    }
                } else {
                    CliError::Degraded(st.missing())
                })
            }
        }
        Command::Service {
            command: ServiceCommand::List { agent_socket, node },
        } => {
            no_node_in_standalone(node.as_ref())?;
            let (node, services): (String, Vec<ServiceStatus>) =
                ask_agent(&cli, agent_socket.as_ref(), "/v1/services").await?;
            match cli.output {
                Output::Json => json(&services),
                Output::Table => Ok(services_table(&node, &services)),
            }
        }
        Command::Bpf {
            command:
                BpfCommand::Lb {
                    command: BpfLbCommand::List { agent_socket, node },
                },
        } => {
            no_node_in_standalone(node.as_ref())?;
            // The agent's datapath dump (its `bpf::BpfDump`), one row per frontend.
            let (node, dump): (String, admin::BpfDump) =
                ask_agent(&cli, agent_socket.as_ref(), "/v1/bpf/lb").await?;
            match cli.output {
                Output::Json => json(&dump),
                Output::Table => Ok(bpf_table(&node, &admin::bpf_lb_entries(&dump))),
            }
        }
    }
}

fn no_node_in_standalone(node: Option<&String>) -> Result<(), CliError> {
    match node {
        Some(_) => Err(CliError::WrongMode(
            "--node picks an agent pod in Kubernetes mode (--context); in standalone mode pass --agent-socket PATH".into(),
        )),
        None => Ok(()),
    }
}

/// Queries the given agent, or the first answering agent of the state directory.
async fn ask_agent<T: serde::de::DeserializeOwned>(
    cli: &Cli,
    socket: Option<&PathBuf>,
    request: &str,
) -> Result<(String, T), CliError> {
    let timeout = Duration::from_secs(5);
    let sockets: Vec<PathBuf> = match socket {
        Some(s) => vec![s.clone()],
        None => state_dir(cli)?.load()?.agent_sockets,
    };
    let mut last = None;
    for s in &sockets {
        match admin::get::<T>(s, request, timeout).await {
            Ok(v) => return Ok((s.display().to_string(), v)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or(CliError::NoAgent, CliError::Admin))
}

/// One row per service port: a multi-port service shows one row per port name.
fn services_table(source: &str, services: &[ServiceStatus]) -> String {
    let mut out = format!("# from agent {source}\n");
    out.push_str(&format!(
        "{:<32} {:<10} {:<24} {:<8} {:<8} BACKENDS\n",
        "SERVICE", "PORT", "FRONTENDS", "AFFINITY", "TIER"
    ));
    for s in services {
        let backends: Vec<String> = s
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}/{}({},{},w{})",
                    b.cluster, b.address, b.state, b.tier, b.weight
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<32} {:<10} {:<24} {:<8} {:<8} {}\n",
            format!("{}/{}", s.namespace, s.name),
            if s.port_name.is_empty() {
                "-"
            } else {
                &s.port_name
            },
            s.frontends.join(","),
            s.affinity,
            s.active_tier,
            backends.join(" ")
        ));
    }
    out
}

fn bpf_table(source: &str, entries: &[BpfLbEntry]) -> String {
    let mut out = format!("# from agent {source}\n");
    out.push_str(&format!(
        "{:<26} {:>6} {:>8} {:>7} BACKENDS (id address cluster state slots)\n",
        "FRONTEND", "SVC", "OFFSET", "M"
    ));
    for e in entries {
        let backends: Vec<String> = e
            .backends
            .iter()
            .map(|b| {
                format!(
                    "#{} {} {} {} {}",
                    b.id, b.address, b.cluster, b.state, b.slots
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<26} {:>6} {:>8} {:>7} {}\n",
            e.frontend,
            e.service_id,
            e.table_offset,
            e.table_size,
            backends.join("; ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::BackendStatus;

    #[test]
    fn service_list_shows_port_and_affinity_per_row() {
        let row = |port: &str, frontend: &str| ServiceStatus {
            namespace: "default".into(),
            name: "dns".into(),
            port_name: port.into(),
            frontends: vec![frontend.into()],
            affinity: "remote".into(),
            active_tier: "remote".into(),
            backends: vec![BackendStatus {
                cluster: "west".into(),
                address: "10.2.0.5:5353".into(),
                state: "active".into(),
                tier: "remote".into(),
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let table = services_table(
            "/run/agent.sock",
            &[
                row("tcp", "10.96.0.10:53/TCP"),
                row("udp", "10.96.0.10:53/UDP"),
            ],
        );
        let lines: Vec<Vec<&str>> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0][..5],
            ["SERVICE", "PORT", "FRONTENDS", "AFFINITY", "TIER"]
        );
        assert_eq!(
            lines[1][..5],
            [
                "default/dns",
                "tcp",
                "10.96.0.10:53/TCP",
                "remote",
                "remote"
            ]
        );
        assert_eq!(
            lines[2][..5],
            [
                "default/dns",
                "udp",
                "10.96.0.10:53/UDP",
                "remote",
                "remote"
            ]
        );
    }
}
