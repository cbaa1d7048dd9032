//! Where a cluster's Kubernetes objects come from.
//!
//! A source turns some view of the cluster (the Kubernetes API, a directory of YAML) into
//! one stream of [`SourceEvent`]s. The exporter consumes that stream and does not care
//! which source produced it, so a new source (kube-rs watchers) only has to implement
//! [`Source`].

mod dir;
pub mod kubernetes;
mod object;

pub use dir::{
    parse_manifests, DirSource, DirSourceError, LimitExceeded, ManifestError,
    DEFAULT_POLL_INTERVAL, DEFAULT_SETTLE_TIME, MAX_DOCUMENT_SIZE, MAX_FILE_SIZE,
    MAX_NESTING_DEPTH,
};
pub use kubernetes::{KubernetesSource, KubernetesSourceError};
pub use object::{K8sObject, ObjectKind, ObjectRef, PolicyObject};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One change reported by a source.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// An object was created or changed.
    Apply(K8sObject),
    /// An object was removed.
    Delete(ObjectRef),
    /// The complete current set of objects of `kind`: anything of that kind not listed is
    /// gone. Implies the initial sync of `kind` is done (a kube watcher's re-list and every
    /// directory scan end with one of these).
    Replace {
        /// The kind being replaced.
        kind: ObjectKind,
        /// Every object of that kind.
        objects: Vec<K8sObject>,
    },
    /// Every object of `kind` that exists has been reported by `Apply` events: the initial
    /// sync of `kind` is complete.
    Synced(ObjectKind),
}

/// Error that ends a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The directory source failed.
    #[error(transparent)]
    Dir(#[from] DirSourceError),
    /// The Kubernetes source failed.
    #[error(transparent)]
    Kubernetes(#[from] KubernetesSourceError),
    /// Another source failed.
    #[error("source failed: {0}")]
    Other(String),
}

/// A producer of [`SourceEvent`]s.
#[async_trait::async_trait]
pub trait Source: Send + std::fmt::Debug {
    /// Runs until `shutdown` is cancelled or the receiver is dropped, sending events to
    /// `events`. Transient read errors are logged and retried inside the source; only
    /// errors that make further progress impossible end it.
    async fn run(
        self: Box<Self>,
        events: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError>;
}
