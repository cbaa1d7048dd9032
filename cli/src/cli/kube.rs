//! The verbs on a cluster reached through a kubeconfig context (`--context`).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use clustermesh_api::admin_policy::{EndpointEntry, IdentityEntry, PolicyReport};

use crate::admin::{BpfDump, ServiceStatus};
use crate::k8s::agents::{AgentAnswer, AgentAnswers};
use crate::k8s::connect::{ConnectReport, DisconnectReport};
use crate::k8s::enable::{DisableReport, EnableReport};
use crate::k8s::status::KubeStatus;
use crate::k8s::{self, KubeModeError, KubeTarget};
use crate::render::Checked;
use crate::status::Readiness;
use crate::visibility::{self, Ordered, PodRef};

use super::error::CliError;
use super::flags::{BpfCommand, BpfLbCommand, Cli, Command, EnableArgs, ServiceCommand};
use super::target::{AgentPick, MeshTarget, Peer, StatusArgs};

/// How long the API server has to answer a context probe and the agents' proxy requests.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A cluster reached through a kubeconfig context, and for `connect`/`disconnect` the
/// other one (`--destination-context`).
#[derive(Clone)]
pub struct KubeMesh {
    target: KubeTarget,
    destination: Option<KubeTarget>,
    /// `enable`'s chart value overrides, checked before any cluster was dialed.
    overrides: Vec<Value>,
}

impl std::fmt::Debug for KubeMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeMesh")
            .field("context", &self.target.context)
            .field("namespace", &self.target.namespace)
            .finish_non_exhaustive()
    }
}

impl KubeMesh {
    /// Resolves the context(s) first so a wrong name or an unreachable API server is the
    /// one line the user sees; `enable`'s chart values are checked even before that (they
    /// need no cluster).
    pub async fn resolve(cli: &Cli, context: &str) -> Result<Self, CliError> {
        let mut overrides = Vec::new();
        if let Command::Enable(a) = &cli.command {
            let chart = k8s::embedded::chart().map_err(KubeModeError::from)?;
            overrides =
                k8s::values::user_overrides(&a.values_files, &a.sets, chart.default_values())
                    .map_err(KubeModeError::from)?;
        }
        let namespace = &cli.kube.namespace;
        let kubeconfig = k8s::context::read_kubeconfig()?;
        let target = k8s::context::connect(kubeconfig.clone(), context, namespace, TIMEOUT).await?;
        let destination = match (&cli.command, cli.kube.destination_context.as_deref()) {
            (Command::Connect { .. } | Command::Disconnect { .. }, Some(dest)) => {
                Some(k8s::context::connect(kubeconfig, dest, namespace, TIMEOUT).await?)
            }
            _ => None,
        };
        Ok(Self {
            target,
            destination,
            overrides,
        })
    }

    fn destination(&self) -> Option<Self> {
        self.destination.clone().map(|target| Self {
            target,
            destination: None,
            overrides: Vec::new(),
        })
    }
}

fn wrong_mode(line: impl Into<String>) -> CliError {
    CliError::WrongMode(line.into())
}

fn no_socket_in_kube_mode(socket: Option<&PathBuf>) -> Result<(), CliError> {
    match socket {
        Some(_) => Err(wrong_mode(
            "--agent-socket is for standalone mode (--state-dir); with --context the agents are asked through the API server (pick one with --node NODE)",
        )),
        None => Ok(()),
    }
}

const DESTINATION_STATE_DIR_IS_STANDALONE: &str =
    "--destination-state-dir is for standalone mode; with --context pass --destination-context";

/// `Some(failure)` naming the agents without an answer.
fn agents_failure<T>(answers: &AgentAnswers<T>, what: &'static str) -> Option<CliError> {
    answers.check(what).err().map(CliError::from)
}

/// Every answer in the order the CLI shows it.
fn ordered<T: Ordered>(mut answers: AgentAnswers<T>) -> AgentAnswers<T> {
    for a in &mut answers.agents {
        if let Some(v) = a.answer.as_mut() {
            v.order();
        }
    }
    answers
}

/// `policy get --pod`: only the agents that run `pod`, their reports cut down to it. A
/// pod runs on one node, so the other agents (answering or not) are left out once it is
/// found; when no agent has it, the error names the nodes asked and the agents that did
/// not answer.
fn pod_only(
    answers: AgentAnswers<PolicyReport>,
    pod: &PodRef,
) -> Result<AgentAnswers<PolicyReport>, CliError> {
    let asked = answers.agents.len();
    let mut nodes = Vec::new();
    let mut silent = Vec::new();
    let mut found = Vec::new();
    for a in answers.agents {
        let Some(report) = &a.answer else {
            silent.push(format!(
                "{}: {}",
                a.label(),
                a.error.as_deref().unwrap_or("no answer")
            ));
            continue;
        };
        nodes.push(a.node.clone().unwrap_or_else(|| a.pod.clone()));
        if let Some(one) = visibility::only_pod(report, pod) {
            found.push(AgentAnswer {
                answer: Some(one),
                ..a
            });
        }
    }
    if found.is_empty() {
        let mut searched = format!(
            "any of the {asked} agents of context {} (answering on: {})",
            answers.context,
            if nodes.is_empty() {
                "no node".to_owned()
            } else {
                nodes.join(", ")
            }
        );
        if !silent.is_empty() {
            searched.push_str(&format!("; without an answer: {}", silent.join("; ")));
        }
        return Err(CliError::UnknownPod {
            pod: pod.to_string(),
            searched,
        });
    }
    Ok(AgentAnswers {
        context: answers.context,
        agents: found,
    })
}

impl MeshTarget for KubeMesh {
    type Enabled = EnableReport;
    type Disabled = DisableReport;
    type Connected = ConnectReport;
    type Disconnected = DisconnectReport;
    type Status = KubeStatus;
    type Services = AgentAnswers<Vec<ServiceStatus>>;
    type BpfLb = AgentAnswers<BpfDump>;
    type Identities = AgentAnswers<Vec<IdentityEntry>>;
    type Endpoints = AgentAnswers<Vec<EndpointEntry>>;
    type Policy = AgentAnswers<PolicyReport>;

    fn check_flags(&self, cli: &Cli) -> Result<(), CliError> {
        match &cli.command {
            Command::Enable(_) | Command::Disable { .. }
                if cli.kube.destination_context.is_some() =>
            {
                Err(wrong_mode(format!(
                    "--destination-context is only for connect and disconnect; `{}` acts on --context alone",
                    cli.command.verb()
                )))
            }
            Command::Enable(a) if !a.mesh_endpoints.is_empty() || !a.agent_sockets.is_empty() => Err(wrong_mode(
                "--mesh-endpoint and --agent-socket are for standalone mode (--state-dir); with --context the address comes from the clustermesh-apiserver Service (see --service-type)",
            )),
            Command::Enable(a) if a.kubernetes_namespace.is_some() => Err(wrong_mode(
                "--kubernetes-namespace is for standalone mode (--state-dir, certificates for the plain Helm chart); with --context pass --namespace",
            )),
            Command::Connect {
                destination_state_dir: Some(_),
                ..
            }
            | Command::Disconnect {
                destination_state_dir: Some(_),
                ..
            } => Err(wrong_mode(DESTINATION_STATE_DIR_IS_STANDALONE)),
            Command::Disconnect {
                destination_cluster: Some(_),
                ..
            } if self.destination.is_some() => Err(wrong_mode(
                "pass either --destination-context (disconnect both sides) or --destination-cluster (forget a peer on this side only), not both",
            )),
            Command::Status { agent_sockets, .. } => no_socket_in_kube_mode(agent_sockets.first()),
            Command::Service {
                command: ServiceCommand::List { agent_socket, .. },
            }
            | Command::Bpf {
                command:
                    BpfCommand::Lb {
                        command: BpfLbCommand::List { agent_socket, .. },
                    },
            } => no_socket_in_kube_mode(agent_socket.as_ref()),
            c if c.policy_view_agent().is_some() => no_socket_in_kube_mode(
                c.policy_view_agent()
                    .and_then(|a| a.agent_socket.as_ref()),
            ),
            Command::Completion { .. } => Err(CliError::KubeVerbUnavailable {
                verb: cli.command.verb(),
                context: self.target.context.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn connect_peer(&self, _cli: &Cli) -> Result<Self, CliError> {
        self.destination().ok_or(CliError::NoDestinationContext)
    }

    fn disconnect_peer(&self, cli: &Cli) -> Result<Peer<Self>, CliError> {
        let named = match &cli.command {
            Command::Disconnect {
                destination_cluster,
                ..
            } => destination_cluster.clone(),
            _ => None,
        };
        match (self.destination(), named) {
            (Some(dest), _) => Ok(Peer::Target(dest)),
            (None, Some(name)) => Ok(Peer::Name(name)),
            (None, None) => Err(CliError::NoDestinationContext),
        }
    }

    async fn enable(&self, a: &EnableArgs) -> Result<EnableReport, CliError> {
        Ok(k8s::enable::enable(
            &self.target,
            &k8s::enable::EnableOptions {
                name: a.cluster_name.clone(),
                id: a.cluster_id,
                max_connected_clusters: a.max_connected_clusters,
                trust_domain: a.trust_domain.clone(),
                service_type: a.service_type,
                overrides: self.overrides.clone(),
            },
        )
        .await?)
    }

    async fn disable(&self, force: bool) -> Result<DisableReport, CliError> {
        Ok(k8s::enable::disable(&self.target, force).await?)
    }

    async fn connect(&self, peer: &Self, _timeout: Duration) -> Result<ConnectReport, CliError> {
        Ok(k8s::connect::connect(&self.target, &peer.target).await?)
    }

    async fn disconnect(&self, peer: &Peer<Self>) -> Result<DisconnectReport, CliError> {
        Ok(match peer {
            Peer::Target(dest) => k8s::connect::disconnect(&self.target, &dest.target).await?,
            Peer::Name(name) => k8s::connect::forget(&self.target, name).await?,
        })
    }

    /// The report on stdout; not ready is an error line after it, like standalone mode.
    async fn status(&self, args: &StatusArgs) -> Result<Checked<KubeStatus>, CliError> {
        let (st, ready) = if args.wait {
            k8s::status::wait_ready(
                &self.target,
                args.wait_duration,
                Duration::from_secs(1),
                args.timeout,
            )
            .await?
        } else {
            let st = k8s::status::collect(&self.target, args.timeout).await?;
            let ready = st.ready;
            (st, ready)
        };
        if ready {
            return Ok(Checked::ok(st));
        }
        let missing = Readiness::missing(&st);
        let failure = if args.wait {
            CliError::NotReady {
                waited: humantime::format_duration(args.wait_duration).to_string(),
                missing,
            }
        } else {
            CliError::Degraded(missing)
        };
        Ok(Checked {
            report: st,
            failure: Some(failure),
        })
    }

    async fn services(
        &self,
        pick: &AgentPick,
    ) -> Result<Checked<AgentAnswers<Vec<ServiceStatus>>>, CliError> {
        let r = k8s::agents::services(&self.target, pick.node.as_deref(), TIMEOUT).await?;
        let failure = agents_failure(&r, "service list");
        Ok(Checked { report: r, failure })
    }

    async fn bpf_lb(&self, pick: &AgentPick) -> Result<Checked<AgentAnswers<BpfDump>>, CliError> {
        let r = k8s::agents::bpf_lb(&self.target, pick.node.as_deref(), TIMEOUT).await?;
        let failure = agents_failure(&r, "datapath dump");
        Ok(Checked { report: r, failure })
    }

    async fn identities(
        &self,
        pick: &AgentPick,
    ) -> Result<Checked<AgentAnswers<Vec<IdentityEntry>>>, CliError> {
        let r = k8s::agents::identities(&self.target, pick.node.as_deref(), TIMEOUT).await?;
        let failure = agents_failure(&r, "identity list");
        Ok(Checked {
            report: ordered(r),
            failure,
        })
    }

    async fn endpoints(
        &self,
        pick: &AgentPick,
    ) -> Result<Checked<AgentAnswers<Vec<EndpointEntry>>>, CliError> {
        let r = k8s::agents::endpoints(&self.target, pick.node.as_deref(), TIMEOUT).await?;
        let failure = agents_failure(&r, "endpoint list");
        Ok(Checked {
            report: ordered(r),
            failure,
        })
    }

    async fn policy(
        &self,
        pick: &AgentPick,
        pod: Option<&PodRef>,
    ) -> Result<Checked<AgentAnswers<PolicyReport>>, CliError> {
        let r = ordered(k8s::agents::policy(&self.target, pick.node.as_deref(), TIMEOUT).await?);
        if let Some(pod) = pod {
            return pod_only(r, pod).map(Checked::ok);
        }
        let failure = agents_failure(&r, "policy report");
        Ok(Checked { report: r, failure })
    }
}
