//! The verbs on a standalone cluster: a local state directory (`--state-dir`).

use std::path::PathBuf;
use std::time::Duration;

use clustermesh_api::admin_policy::{EndpointEntry, IdentityEntry, PolicyReport};

use crate::admin::{self, BpfDump, ServiceStatus};
use crate::render::{
    Checked, FromAgent, StandaloneDisabled, StandaloneDisconnected, StandaloneEnabled,
};
use crate::standalone::{self, ConnectReport, EnableOptions};
use crate::state::StateDir;
use crate::status::{self, MeshStatus};
use crate::visibility::{self, Ordered, PodRef};

use super::error::CliError;
use super::flags::{BpfCommand, BpfLbCommand, Cli, Command, EnableArgs, ServiceCommand};
use super::target::{AgentPick, MeshTarget, Peer, StatusArgs};

/// How long an agent has to answer `service list`, `bpf lb list` and the policy views.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A cluster kept in a state directory; the directory is only required by the verbs
/// that read it (`service list --agent-socket` does not).
#[derive(Debug, Clone)]
pub struct StateDirMesh {
    dir: Option<PathBuf>,
}

impl StateDirMesh {
    /// The cluster of `--state-dir` (or `CLUSTERMESH_STATE_DIR`), if given.
    #[must_use]
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    fn dir(&self) -> Result<StateDir, CliError> {
        self.dir
            .clone()
            .map(StateDir::new)
            .ok_or(CliError::NoStateDir)
    }

    /// Queries the given agent, or the first answering agent of the state directory.
    async fn ask_agent<T: serde::de::DeserializeOwned>(
        &self,
        socket: Option<&PathBuf>,
        request: &str,
    ) -> Result<FromAgent<T>, CliError> {
        let sockets: Vec<PathBuf> = match socket {
            Some(s) => vec![s.clone()],
            None => self.dir()?.load()?.agent_sockets,
        };
        let mut last = None;
        for s in &sockets {
            match admin::get::<T>(s, request, AGENT_TIMEOUT).await {
                Ok(answer) => {
                    return Ok(FromAgent {
                        source: s.display().to_string(),
                        answer,
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or(CliError::NoAgent, CliError::Admin))
    }

    /// [`Self::ask_agent`], the answer in the order the CLI shows it.
    async fn ask_ordered<T: serde::de::DeserializeOwned + Ordered>(
        &self,
        socket: Option<&PathBuf>,
        request: &str,
    ) -> Result<FromAgent<T>, CliError> {
        let mut r = self.ask_agent::<T>(socket, request).await?;
        r.answer.order();
        Ok(r)
    }
}

/// How many of an agent's pods the unknown-pod message names.
const PODS_NAMED: usize = 10;

fn wrong_mode(line: &str) -> CliError {
    CliError::WrongMode(line.into())
}

const NODE_IS_KUBERNETES: &str = "--node picks an agent pod in Kubernetes mode (--context); in standalone mode pass --agent-socket PATH";

impl MeshTarget for StateDirMesh {
    type Enabled = StandaloneEnabled;
    type Disabled = StandaloneDisabled;
    type Connected = ConnectReport;
    type Disconnected = StandaloneDisconnected;
    type Status = MeshStatus;
    type Services = FromAgent<Vec<ServiceStatus>>;
    type BpfLb = FromAgent<BpfDump>;
    type Identities = FromAgent<Vec<IdentityEntry>>;
    type Endpoints = FromAgent<Vec<EndpointEntry>>;
    type Policy = FromAgent<PolicyReport>;

    fn check_flags(&self, cli: &Cli) -> Result<(), CliError> {
        match &cli.command {
            Command::Enable(a) if !a.sets.is_empty() || !a.values_files.is_empty() => Err(wrong_mode(
                "--set and --values are chart values for Kubernetes mode (--context); a standalone cluster (--state-dir) has no chart, configure its processes with their own flags",
            )),
            Command::Enable(a) if a.service_type.is_some() => Err(wrong_mode(
                "--service-type is for Kubernetes mode; pass --context CONTEXT, or --mesh-endpoint host:port for a standalone cluster",
            )),
            Command::Disconnect {
                destination_cluster: Some(_),
                ..
            } => Err(wrong_mode(
                "--destination-cluster is for Kubernetes mode (--context); pass --destination-state-dir",
            )),
            Command::Service {
                command: ServiceCommand::List { node: Some(_), .. },
            }
            | Command::Bpf {
                command:
                    BpfCommand::Lb {
                        command: BpfLbCommand::List { node: Some(_), .. },
                    },
            } => Err(wrong_mode(NODE_IS_KUBERNETES)),
            c if c.policy_view_agent().is_some_and(|a| a.node.is_some()) => {
                Err(wrong_mode(NODE_IS_KUBERNETES))
            }
            _ => Ok(()),
        }
    }

    fn connect_peer(&self, cli: &Cli) -> Result<Self, CliError> {
        self.dir()?;
        match &cli.command {
            Command::Connect {
                destination_state_dir: Some(dir),
                ..
            }
            | Command::Disconnect {
                destination_state_dir: Some(dir),
                ..
            } => Ok(Self::new(Some(dir.clone()))),
            _ => Err(CliError::NoDestinationStateDir),
        }
    }

    fn disconnect_peer(&self, cli: &Cli) -> Result<Peer<Self>, CliError> {
        self.connect_peer(cli).map(Peer::Target)
    }

    async fn enable(&self, a: &EnableArgs) -> Result<StandaloneEnabled, CliError> {
        let dir = self.dir()?;
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
                agent_mode: a.agent_mode,
            },
        )
        .await?;
        Ok(StandaloneEnabled { state, dir })
    }

    async fn disable(&self, force: bool) -> Result<StandaloneDisabled, CliError> {
        let name = standalone::disable(&self.dir()?, force).await?;
        Ok(StandaloneDisabled { name })
    }

    async fn connect(&self, peer: &Self, timeout: Duration) -> Result<ConnectReport, CliError> {
        Ok(standalone::connect(&self.dir()?, &peer.dir()?, timeout).await?)
    }

    async fn disconnect(&self, peer: &Peer<Self>) -> Result<StandaloneDisconnected, CliError> {
        let Peer::Target(peer) = peer else {
            return Err(wrong_mode(
                "--destination-cluster is for Kubernetes mode (--context); pass --destination-state-dir",
            ));
        };
        let (source, destination) = standalone::disconnect(&self.dir()?, &peer.dir()?).await?;
        Ok(StandaloneDisconnected {
            source,
            destination,
        })
    }

    async fn status(&self, args: &StatusArgs) -> Result<Checked<MeshStatus>, CliError> {
        let dir = self.dir()?;
        let mut state = dir.load()?;
        if !args.agent_sockets.is_empty() {
            state.agent_sockets.clone_from(&args.agent_sockets);
        }
        // With no agent listed there is nothing to wait for: say so at once.
        let wait = args.wait && !state.agent_sockets.is_empty();
        let (st, ready) = if wait {
            status::wait_ready(&dir, &state, args.wait_duration, Duration::from_millis(500)).await
        } else {
            let st = status::collect(&dir, &state, args.timeout).await;
            let ready = st.ready();
            (st, ready)
        };
        if ready {
            return Ok(Checked::ok(st));
        }
        // The report still goes to stdout; the error line says what is missing.
        let failure = if wait {
            CliError::NotReady {
                waited: humantime::format_duration(args.wait_duration).to_string(),
                missing: st.missing(),
            }
        } else {
            CliError::Degraded(st.missing())
        };
        Ok(Checked {
            report: st,
            failure: Some(failure),
        })
    }

    async fn services(
        &self,
        pick: &AgentPick,
    ) -> Result<Checked<FromAgent<Vec<ServiceStatus>>>, CliError> {
        self.ask_agent(pick.agent_socket.as_ref(), "/v1/services")
            .await
            .map(Checked::ok)
    }

    async fn bpf_lb(&self, pick: &AgentPick) -> Result<Checked<FromAgent<BpfDump>>, CliError> {
        // The agent's datapath dump (its `bpf::BpfDump`), one row per frontend.
        self.ask_agent(pick.agent_socket.as_ref(), "/v1/bpf/lb")
            .await
            .map(Checked::ok)
    }

    async fn identities(
        &self,
        pick: &AgentPick,
    ) -> Result<Checked<FromAgent<Vec<IdentityEntry>>>, CliError> {
        self.ask_ordered(pick.agent_socket.as_ref(), "/v1/identities")
            .await
            .map(Checked::ok)
    }

    async fn endpoints(
        &self,
        pick: &AgentPick,
    ) -> Result<Checked<FromAgent<Vec<EndpointEntry>>>, CliError> {
        self.ask_ordered(pick.agent_socket.as_ref(), "/v1/endpoints")
            .await
            .map(Checked::ok)
    }

    async fn policy(
        &self,
        pick: &AgentPick,
        pod: Option<&PodRef>,
    ) -> Result<Checked<FromAgent<PolicyReport>>, CliError> {
        let mut r = self
            .ask_ordered::<PolicyReport>(pick.agent_socket.as_ref(), "/v1/policy")
            .await?;
        if let Some(pod) = pod {
            r.answer = visibility::only_pod(&r.answer, pod).ok_or_else(|| {
                let pods = visibility::local_pods(&r.answer);
                let named = match pods.len() {
                    0 => "none".to_owned(),
                    n if n > PODS_NAMED => format!(
                        "{} and {} more",
                        pods[..PODS_NAMED].join(", "),
                        n - PODS_NAMED
                    ),
                    _ => pods.join(", "),
                };
                CliError::UnknownPod {
                    pod: pod.to_string(),
                    searched: format!(
                        "the agent at {} (node {}; its local pods: {named})",
                        r.source, r.answer.node
                    ),
                }
            })?;
        }
        Ok(Checked::ok(r))
    }
}
