//! The `clustermesh` command line: flags, the one dispatcher, and the two targets.
//!
//! Standalone mode (`--state-dir`) and Kubernetes mode (`--context`) offer the same
//! verbs. [`run`] resolves which kind of cluster the flags name ([`Mode`]), builds that
//! target and calls the [`target::MeshTarget`] methods for the verb; [`crate::render`]
//! shows the result.
//!
//! - [`flags`]: the clap definition, with one argument group per mode.
//! - [`target`]: what a mesh target must do.
//! - [`state_dir`]: the verbs on a local state directory.
//! - [`kube`]: the verbs on a cluster reached through a kubeconfig context.
//! - [`error`]: why a command failed, one line each.

pub mod error;
pub mod flags;
pub mod kube;
pub mod state_dir;
pub mod target;

use crate::render::{emit, emit_checked};
use crate::visibility::PodRef;

use self::error::CliError;
use self::flags::{
    BpfCommand, BpfLbCommand, Cli, Command, EndpointCommand, IdentityCommand, PolicyCommand,
    ServiceCommand,
};
use self::kube::KubeMesh;
use self::state_dir::StateDirMesh;
use self::target::{AgentPick, MeshTarget, StatusArgs};

/// Which kind of cluster the flags name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode<'a> {
    /// A local state directory (the default; the directory itself may still be missing).
    StateDir,
    /// A kubeconfig context.
    Kubernetes {
        /// The context.
        context: &'a str,
    },
}

impl<'a> Mode<'a> {
    /// The mode of `cli`: Kubernetes with `--context`, standalone otherwise.
    pub fn of(cli: &'a Cli) -> Result<Self, CliError> {
        match (
            cli.kube.context.as_deref(),
            cli.kube.destination_context.is_some(),
        ) {
            (Some(context), _) => Ok(Self::Kubernetes { context }),
            (None, true) => Err(CliError::DestinationContextWithoutContext),
            (None, false) => Ok(Self::StateDir),
        }
    }
}

/// Runs the command; returns what to print on stdout.
pub async fn run(cli: Cli) -> Result<String, CliError> {
    if let Command::Completion { shell } = &cli.command {
        return Ok(completion(*shell));
    }
    // A malformed --pod is refused before any cluster is dialed.
    let pod = pod_flag(&cli.command)?;
    match Mode::of(&cli)? {
        Mode::Kubernetes { context } => {
            let target = KubeMesh::resolve(&cli, context).await?;
            dispatch(&cli, &target, pod.as_ref()).await
        }
        Mode::StateDir => {
            let target = StateDirMesh::new(cli.standalone.state_dir.clone());
            dispatch(&cli, &target, pod.as_ref()).await
        }
    }
}

/// `policy get --pod NS/NAME`, parsed.
fn pod_flag(command: &Command) -> Result<Option<PodRef>, CliError> {
    match command {
        Command::Policy {
            command: PolicyCommand::Get { pod: Some(p), .. },
        } => Ok(Some(PodRef::parse(p)?)),
        _ => Ok(None),
    }
}

/// The shell completion script for `shell`.
fn completion(shell: clap_complete::Shell) -> String {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "clustermesh", &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Calls the verb on `target` and renders its result (`pod`: the parsed `--pod`).
async fn dispatch<T: MeshTarget>(
    cli: &Cli,
    target: &T,
    pod: Option<&PodRef>,
) -> Result<String, CliError> {
    target.check_flags(cli)?;
    let output = cli.output;
    match &cli.command {
        Command::Completion { shell } => Ok(completion(*shell)),
        Command::Enable(args) => emit(output, &target.enable(args).await?),
        Command::Disable { force } => emit(output, &target.disable(*force).await?),
        Command::Connect { timeout, .. } => {
            let peer = target.connect_peer(cli)?;
            emit(output, &target.connect(&peer, *timeout).await?)
        }
        Command::Disconnect { .. } => {
            let peer = target.disconnect_peer(cli)?;
            emit(output, &target.disconnect(&peer).await?)
        }
        Command::Status {
            wait,
            wait_duration,
            timeout,
            agent_sockets,
        } => {
            let args = StatusArgs {
                wait: *wait,
                wait_duration: *wait_duration,
                timeout: *timeout,
                agent_sockets: agent_sockets.clone(),
            };
            emit_checked(output, target.status(&args).await?)
        }
        Command::Service {
            command: ServiceCommand::List { agent_socket, node },
        } => {
            let pick = AgentPick {
                agent_socket: agent_socket.clone(),
                node: node.clone(),
            };
            emit_checked(output, target.services(&pick).await?)
        }
        Command::Bpf {
            command:
                BpfCommand::Lb {
                    command: BpfLbCommand::List { agent_socket, node },
                },
        } => {
            let pick = AgentPick {
                agent_socket: agent_socket.clone(),
                node: node.clone(),
            };
            emit_checked(output, target.bpf_lb(&pick).await?)
        }
        Command::Identity {
            command: IdentityCommand::List(agent),
        } => emit_checked(output, target.identities(&agent.into()).await?),
        Command::Endpoint {
            command: EndpointCommand::List(agent),
        } => emit_checked(output, target.endpoints(&agent.into()).await?),
        Command::Policy {
            command: PolicyCommand::Get { agent, .. },
        } => emit_checked(output, target.policy(&agent.into(), pod).await?),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("clustermesh").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn context_picks_kubernetes_mode_and_anything_else_standalone() {
        let cli = parse(&["--context", "east", "status"]);
        assert_eq!(
            Mode::of(&cli).unwrap(),
            Mode::Kubernetes { context: "east" }
        );
        let cli = parse(&["--state-dir", "/x", "status"]);
        assert_eq!(Mode::of(&cli).unwrap(), Mode::StateDir);
        let cli = parse(&["--destination-context", "west", "connect"]);
        assert_eq!(
            Mode::of(&cli).unwrap_err().to_string(),
            "--destination-context needs --context (the source cluster's kubeconfig context)"
        );
    }

    #[test]
    fn context_and_state_dir_conflict_in_clap() {
        let err = Cli::try_parse_from([
            "clustermesh",
            "--context",
            "east",
            "--state-dir",
            "/x",
            "status",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[tokio::test]
    async fn flags_of_the_other_mode_are_refused_before_the_state_directory_is_read() {
        let cases: [(&[&str], &str); 5] = [
            (
                &[
                    "enable",
                    "--cluster-name",
                    "a",
                    "--cluster-id",
                    "1",
                    "--set",
                    "x=1",
                ],
                "--set and --values are chart values",
            ),
            (
                &["disconnect", "--destination-cluster", "west"],
                "--destination-cluster is for Kubernetes mode",
            ),
            (
                &["service", "list", "--node", "n1"],
                "--node picks an agent pod in Kubernetes mode",
            ),
            (
                &["policy", "get", "--node", "n1"],
                "--node picks an agent pod in Kubernetes mode",
            ),
            (
                &["policy", "get", "--pod", "web"],
                "--pod takes NAMESPACE/NAME",
            ),
        ];
        for (args, want) in cases {
            let err = run(parse(args)).await.unwrap_err().to_string();
            assert!(err.starts_with(want), "{args:?}: {err}");
        }
        let err = run(parse(&["status"])).await.unwrap_err();
        assert!(matches!(err, CliError::NoStateDir), "{err}");
    }
}
