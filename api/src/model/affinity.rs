//! Which cluster's backends a global service prefers.

/// Backend selection preference of a global service (Cilium's `service.cilium.io/affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Affinity {
    /// Every ready backend of every cluster.
    #[default]
    None,
    /// Local cluster first; remote backends only when no local backend is ready.
    Local,
    /// Remote clusters first; local backends only when no remote cluster has a backend
    /// that is ready or terminating (Cilium counts terminating remote backends).
    Remote,
}

super::words!(Affinity { None => "none", Local => "local", Remote => "remote" });
