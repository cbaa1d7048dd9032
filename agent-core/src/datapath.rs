//! The contract between the agent's control plane and a datapath.
//!
//! The control plane computes the complete desired state: for every load-balanced
//! frontend, the active backends and the finished Maglev table. A [`Datapath`] makes the
//! kernel (or a test recorder) enforce it. Only services whose state changed are sent.

use std::net::IpAddr;
use std::sync::Arc;

use clustermesh_api::model::{Affinity, BackendState, Protocol, ServicePortId, Tier};

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

/// One backend of a [`DesiredService`].
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

/// Desired state of one service port: its frontends, backends and Maglev table, and how
/// they were selected (shown by the admin API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// Which service port this is.
    pub id: ServicePortId,
    /// Frontends (every cluster IP of the service, v4 and/or v6, with this port).
    pub frontends: Vec<Frontend>,
    /// Backends; active ones are referenced by the table, terminating ones are kept so
    /// existing flows continue.
    pub backends: Vec<Backend>,
    /// Maglev lookup table of prime size M; each entry is an index into `backends`.
    /// Empty when no backend is usable (the datapath must refuse connections then).
    pub table: Arc<[u32]>,
    /// The farthest tier that takes new connections; `None` when no backend is usable.
    pub active_tier: Option<Tier>,
    /// The affinity that selected the backends (the local service's).
    pub affinity: Affinity,
}

/// A batch of changes: upserted services (complete new state) and removed ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredChanges {
    /// Services created or changed, each with its complete new state.
    pub upserts: Vec<DesiredService>,
    /// Services that no longer exist.
    pub removals: Vec<ServicePortId>,
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
