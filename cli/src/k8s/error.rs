//! Errors of the Kubernetes-mode verbs. Each message is one line that names the object
//! or cluster concerned and says what to do.

use crate::chart::TemplateError;

/// A Kubernetes-mode verb failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeModeError {
    /// Invalid arguments.
    #[error("{0}")]
    Invalid(String),
    /// `enable` with another name/ID/trust domain on an enabled cluster.
    #[error(
        "context {context} already runs mesh cluster {name} (id {id}) in namespace {namespace}{detail}; pass --cluster-name {name} --cluster-id {id}{flags} to upgrade it, or run `clustermesh --context {context} --namespace {namespace} disable` first to replace it"
    )]
    AlreadyEnabled {
        /// The context.
        context: String,
        /// The namespace.
        namespace: String,
        /// Cluster name there.
        name: String,
        /// Its ID.
        id: u32,
        /// What else differs (may be empty).
        detail: String,
        /// The other flags an upgrade needs (may be empty).
        flags: String,
    },
    /// The mesh is not (completely) enabled on a context.
    #[error(
        "the mesh is not enabled in namespace {namespace} of context {context} ({missing} not found); run `clustermesh --context {context} --namespace {namespace} enable --cluster-name NAME --cluster-id ID` first"
    )]
    NotEnabled {
        /// The context.
        context: String,
        /// The namespace.
        namespace: String,
        /// The object that is missing.
        missing: String,
    },
    /// Connecting a cluster to itself.
    #[error(
        "contexts {source_context} and {destination_context} both reach mesh cluster {name} ({why}); cannot connect a cluster to itself, pass the other cluster's context as --destination-context"
    )]
    SelfConnect {
        /// Cluster name.
        name: String,
        /// Source context.
        source_context: String,
        /// Destination context.
        destination_context: String,
        /// How that was detected.
        why: &'static str,
    },
    /// Name or ID already used in the mesh.
    #[error(
        "{0}; every cluster in a mesh needs a unique name and ID (disable one of them and enable it again with another --cluster-name/--cluster-id)"
    )]
    Duplicate(String),
    /// The CAs or trust settings do not fit together.
    #[error("CA mismatch: {0}")]
    CaMismatch(String),
    /// The mesh API of a cluster has no address other clusters can reach yet.
    #[error("{0}")]
    NoAddress(String),
    /// `disconnect` of clusters that are not connected.
    #[error("clusters {0} and {1} are not connected; nothing to disconnect")]
    NotConnected(String, String),
    /// `disable` while still connected.
    #[error(
        "cluster {name} is still connected to {peers}; run `clustermesh --context {context} --destination-context <peer's context> disconnect` for each first, or `disable --force`"
    )]
    StillConnected {
        /// This cluster.
        name: String,
        /// The context.
        context: String,
        /// Its peers.
        peers: String,
    },
    /// A stored object does not have the expected content.
    #[error(
        "{object} in namespace {namespace} of context {context} is malformed: {reason}; {fix}"
    )]
    Malformed {
        /// The context.
        context: String,
        /// The namespace.
        namespace: String,
        /// The object, e.g. `Secret clustermesh-ca`.
        object: String,
        /// What is wrong.
        reason: String,
        /// What to do.
        fix: &'static str,
    },
    /// A Kubernetes API request failed.
    #[error("cannot {action} {object} in namespace {namespace} of context {context}: {reason}")]
    Api {
        /// The context.
        context: String,
        /// The namespace (or `-` for cluster-scoped objects).
        namespace: String,
        /// What was being done (get, list, apply, replace, delete).
        action: &'static str,
        /// The object.
        object: String,
        /// The API server's answer or the transport error.
        reason: String,
    },
    /// A multi-object update failed part-way; earlier writes were undone (or not).
    #[error(transparent)]
    Txn(Box<crate::txn::TxnError>),
    /// A chart value override (`--set`, `--values`, or the stored ones) cannot be used.
    #[error(transparent)]
    Values(Box<super::values::ValuesError>),
    /// Certificate generation failed.
    /// Some agents gave no answer (listed with the reason).
    #[error("{failed} of {total} agents in context {context} gave no {what}: {detail}")]
    AgentsFailed {
        /// The context.
        context: String,
        /// Agents without an answer.
        failed: usize,
        /// Agents asked.
        total: usize,
        /// What was asked for.
        what: &'static str,
        /// `pod (node n): reason` for each.
        detail: String,
    },
    /// The agent DaemonSet has no pods.
    #[error("no agent pods in namespace {namespace} of context {context}; check the clustermesh-agent DaemonSet (`clustermesh --context {context} status`)")]
    NoAgents {
        /// The context.
        context: String,
        /// The namespace.
        namespace: String,
    },
    /// `--node` names a node without an agent pod.
    #[error("no agent pod runs on node {node} in namespace {namespace} of context {context} (agents run on: {nodes}); pass one of those to --node")]
    NoAgentOnNode {
        /// The node asked for.
        node: String,
        /// The context.
        context: String,
        /// The namespace.
        namespace: String,
        /// Nodes with an agent.
        nodes: String,
    },
    #[error("cannot issue certificates: {0}")]
    Issue(String),
    /// The embedded chart did not render with the values.
    #[error("cannot render the clustermesh chart: {0}")]
    Chart(#[from] TemplateError),
    /// A rendered chart document is not a Kubernetes object this CLI can apply.
    #[error("rendered chart document from {template} cannot be applied: {reason}")]
    BadManifest {
        /// Template file.
        template: String,
        /// Why.
        reason: String,
    },
}

impl From<super::values::ValuesError> for KubeModeError {
    fn from(e: super::values::ValuesError) -> Self {
        Self::Values(Box::new(e))
    }
}

impl From<crate::txn::TxnError> for KubeModeError {
    fn from(e: crate::txn::TxnError) -> Self {
        Self::Txn(Box::new(e))
    }
}
