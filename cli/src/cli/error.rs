//! Why a command failed: one line for the user, exit status 1.

use crate::k8s::{KubeError, KubeModeError};
use crate::standalone::StandaloneError;
use crate::{admin, state};

/// A failed command: one line for the user and the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No --state-dir.
    #[error("no state directory given; pass --state-dir DIR (or set CLUSTERMESH_STATE_DIR)")]
    NoStateDir,
    /// A standalone operation failed.
    #[error(transparent)]
    Standalone(#[from] StandaloneError),
    /// A state directory could not be read.
    #[error(transparent)]
    State(#[from] state::StateError),
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
    Kube(#[from] KubeError),
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
    KubeMode(Box<KubeModeError>),
    /// An option of the other mode was given.
    #[error("{0}")]
    WrongMode(String),
    /// `connect`/`disconnect` in Kubernetes mode without `--destination-context`.
    #[error("no destination cluster given; pass --destination-context CONTEXT (the other cluster's kubeconfig context)")]
    NoDestinationContext,
    /// A `--pod` value that is not `NAMESPACE/NAME`.
    #[error(transparent)]
    BadPod(#[from] crate::visibility::BadPodRef),
    /// `policy get --pod` named a pod no asked agent has as a local endpoint.
    #[error("pod {pod} is not a local endpoint of {searched}; an agent lists only its own cluster's pods on its own node that have an address (`clustermesh endpoint list` shows every pod address it knows)")]
    UnknownPod {
        /// The pod, `namespace/name`.
        pod: String,
        /// Which agents were asked and what they have.
        searched: String,
    },
    /// JSON encoding failed.
    #[error("cannot encode output: {0}")]
    Encode(String),
}

impl From<KubeModeError> for CliError {
    fn from(e: KubeModeError) -> Self {
        Self::KubeMode(Box::new(e))
    }
}
