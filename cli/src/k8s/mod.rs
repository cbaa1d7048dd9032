//! Kubernetes mode of the CLI: the verbs act on a cluster reached through a kubeconfig
//! context (`--context`) instead of a local state directory.
//!
//! - [`context`]: resolves a kubeconfig context to a [`kube::Client`] and proves the API
//!   server answers, so every verb fails early with one clear line.

pub mod context;

pub use context::{KubeError, KubeTarget};
