//! What a mesh target must do, whatever the cluster is: a local state directory or a
//! namespace reached through a kubeconfig context.
//!
//! The one dispatcher ([`super::run`]) resolves the target from the flags and calls
//! these methods; each mode implements them once ([`super::state_dir`],
//! [`super::kube`]). `connect` and `disconnect` join two targets of the same kind.

use std::path::PathBuf;
use std::time::Duration;

use crate::render::{Checked, Report};
use crate::visibility::PodRef;

use super::error::CliError;
use super::flags::{AgentArgs, Cli, EnableArgs};

/// The other side of `disconnect`.
#[derive(Debug)]
pub enum Peer<T> {
    /// Another cluster of the same kind: both sides are changed.
    Target(T),
    /// A connected cluster named on this side only, which is forgotten there.
    Name(String),
}

/// `status` arguments.
#[derive(Debug, Clone)]
pub struct StatusArgs {
    /// Wait until every agent is connected to every configured cluster.
    pub wait: bool,
    /// How long to wait.
    pub wait_duration: Duration,
    /// Timeout of each request.
    pub timeout: Duration,
    /// Agent admin sockets to ask instead of the configured ones (standalone).
    pub agent_sockets: Vec<PathBuf>,
}

/// Which agent answers `service list`, `bpf lb list`, `identity list`, `endpoint list`
/// and `policy get`.
#[derive(Debug, Clone, Default)]
pub struct AgentPick {
    /// This agent admin socket (standalone).
    pub agent_socket: Option<PathBuf>,
    /// The agent pod on this node (Kubernetes).
    pub node: Option<String>,
}

impl From<&AgentArgs> for AgentPick {
    fn from(a: &AgentArgs) -> Self {
        Self {
            agent_socket: a.agent_socket.clone(),
            node: a.node.clone(),
        }
    }
}

/// One cluster the verbs act on.
///
/// Every method returns a typed result that [`crate::render`] shows; the errors are the
/// one-line errors of the mode.
#[allow(async_fn_in_trait)] // only used with concrete types, inside this crate
pub trait MeshTarget: Sized {
    /// Result of `enable`.
    type Enabled: Report;
    /// Result of `disable`.
    type Disabled: Report;
    /// Result of `connect`.
    type Connected: Report;
    /// Result of `disconnect`.
    type Disconnected: Report;
    /// Result of `status`.
    type Status: Report;
    /// Result of `service list`.
    type Services: Report;
    /// Result of `bpf lb list`.
    type BpfLb: Report;
    /// Result of `identity list`.
    type Identities: Report;
    /// Result of `endpoint list`.
    type Endpoints: Report;
    /// Result of `policy get`.
    type Policy: Report;

    /// Refuses the flags of the verb that belong to the other mode.
    fn check_flags(&self, cli: &Cli) -> Result<(), CliError>;
    /// The other cluster of `connect`, as the flags name it.
    fn connect_peer(&self, cli: &Cli) -> Result<Self, CliError>;
    /// The other cluster of `disconnect`, as the flags name it.
    fn disconnect_peer(&self, cli: &Cli) -> Result<Peer<Self>, CliError>;

    /// Creates (or upgrades) the cluster's mesh configuration and certificates.
    async fn enable(&self, args: &EnableArgs) -> Result<Self::Enabled, CliError>;
    /// Removes them (`force`: even while connected).
    async fn disable(&self, force: bool) -> Result<Self::Disabled, CliError>;
    /// Connects this cluster and `peer` in both directions, all or nothing.
    async fn connect(&self, peer: &Self, timeout: Duration) -> Result<Self::Connected, CliError>;
    /// Undoes `connect`, all or nothing.
    async fn disconnect(&self, peer: &Peer<Self>) -> Result<Self::Disconnected, CliError>;
    /// The mesh API server, the agents and their cluster connections; not ready is the
    /// failure.
    async fn status(&self, args: &StatusArgs) -> Result<Checked<Self::Status>, CliError>;
    /// The services as the agents see them; agents without an answer are the failure.
    async fn services(&self, pick: &AgentPick) -> Result<Checked<Self::Services>, CliError>;
    /// The agents' datapath (programmed frontends, Maglev tables, backends).
    async fn bpf_lb(&self, pick: &AgentPick) -> Result<Checked<Self::BpfLb>, CliError>;
    /// The security identities the agents know, by number.
    async fn identities(&self, pick: &AgentPick) -> Result<Checked<Self::Identities>, CliError>;
    /// The pod addresses the agents know, by address.
    async fn endpoints(&self, pick: &AgentPick) -> Result<Checked<Self::Endpoints>, CliError>;
    /// The policy of the pods on the agents' nodes, by pod; with `pod`, only that pod, and
    /// a pod no asked agent runs is the failure.
    async fn policy(
        &self,
        pick: &AgentPick,
        pod: Option<&PodRef>,
    ) -> Result<Checked<Self::Policy>, CliError>;
}
