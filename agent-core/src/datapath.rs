//! The contract between the agent's control plane and a datapath.
//!
//! The control plane computes the complete desired state: for every load-balanced
//! frontend, the active backends and the finished Maglev table. A [`Datapath`] makes the
//! kernel (or a test recorder) enforce it. Only services whose state changed are sent.

use std::net::IpAddr;
use std::sync::Arc;

/// Transport protocol of a frontend or backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Identifies one load-balanced service port: `namespace/name` plus the service port name
/// (empty for an unnamed single port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbServiceId {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Service port name ("" if unnamed).
    pub port_name: String,
}

/// A frontend address: a service cluster IP (v4 or v6) with port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// Virtual IP.
    pub ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// Locality tier of a backend relative to this node (lower is closer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Same node.
    Node,
    /// Same zone.
    Zone,
    /// Same cluster.
    Cluster,
    /// Another cluster.
    Remote,
}

/// Whether a backend takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Takes new connections (appears in the Maglev table).
    Active,
    /// Terminating: no new connections, existing flows kept (weight 0, not in the table).
    Terminating,
}

/// One backend of an [`LbService`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Backend (pod) IP.
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Cluster the backend lives in.
    pub cluster: String,
    /// Node name, if known.
    pub node: String,
    /// Zone, if known.
    pub zone: String,
    /// Locality tier chosen for this node.
    pub tier: Tier,
    /// Maglev weight (0 for terminating backends).
    pub weight: u32,
    /// Active or terminating.
    pub state: BackendState,
}

/// Desired state of one service port: its frontends, backends and Maglev table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbService {
    /// Which service port this is.
    pub id: LbServiceId,
    /// Frontends (every cluster IP of the service, v4 and/or v6, with this port).
    pub frontends: Vec<Frontend>,
    /// Backends; active ones are referenced by the table, terminating ones are kept so
    /// existing flows continue.
    pub backends: Vec<Backend>,
    /// Maglev lookup table of prime size M; each entry is an index into `backends`.
    /// Empty when no backend is usable (the datapath must refuse connections then).
    pub table: Arc<[u32]>,
}

/// A batch of changes: upserted services (complete new state) and removed ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredChanges {
    /// Services created or changed, each with its complete new state.
    pub upserts: Vec<LbService>,
    /// Services that no longer exist.
    pub removals: Vec<LbServiceId>,
}

impl DesiredChanges {
    /// True when there is nothing to apply.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// Error a datapath reports when it cannot enforce a change.
#[derive(Debug, thiserror::Error)]
#[error("datapath failed to program {service}: {reason}")]
pub struct DatapathError {
    /// Service that could not be programmed (or "*" for a global failure).
    pub service: String,
    /// What went wrong and what to do.
    pub reason: String,
}

/// Something that enforces the desired state: the eBPF maps, or a recorder in tests.
///
/// Implementations must be atomic per service: a service's old state stays in force until
/// its new state is complete.
pub trait Datapath: Send + Sync {
    /// Applies a batch of changes.
    fn apply(&self, changes: &DesiredChanges) -> Result<(), DatapathError>;
}
