//! The contract between the agent's control plane and a datapath.
//!
//! The control plane computes the complete desired state: for every load-balanced
//! frontend, the active backends and the finished Maglev table. A [`Datapath`] makes the
//! kernel (or a test recorder) enforce it: the complete state once at start
//! ([`Datapath::reconcile`]), then only services whose state changed ([`Datapath::apply`]),
//! each reported as applied or failed on its own.

use std::collections::BTreeMap;
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
    /// The local service is global (merged with other clusters' services of its name).
    pub global: bool,
    /// The local service is shared (its backends are offered to other clusters).
    pub shared: bool,
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

/// What a datapath did with a batch: how many services it applied and which failed.
///
/// Every service of a batch is attempted on its own; one failure does not hold back the
/// others, so the control plane re-sends only the services listed in `failed`.
#[derive(Debug, Default)]
#[must_use = "services that failed must stay pending"]
pub struct ApplyReport {
    /// Services whose change is in force (written, removed, or already up to date).
    pub applied: usize,
    /// Services that could not be programmed, with why; each keeps its previous state.
    pub failed: BTreeMap<ServicePortId, DatapathError>,
}

impl ApplyReport {
    /// True when every service was applied.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }

    /// The number of services applied, or an error naming every service that failed.
    ///
    /// # Errors
    /// When at least one service failed.
    pub fn into_result(self) -> Result<usize, ApplyError> {
        if self.failed.is_empty() {
            Ok(self.applied)
        } else {
            Err(ApplyError {
                applied: self.applied,
                failed: self.failed,
            })
        }
    }
}

/// Some services of a batch could not be programmed (the rest were).
#[derive(Debug, thiserror::Error)]
#[error(
    "datapath failed to program {} service(s) ({} applied): {}",
    failed.len(),
    applied,
    failed.values().next().map(ToString::to_string).unwrap_or_default()
)]
pub struct ApplyError {
    /// Services applied.
    pub applied: usize,
    /// Services that failed, with why; each keeps its previous state.
    pub failed: BTreeMap<ServicePortId, DatapathError>,
}

/// Something that enforces the desired state: the eBPF maps, or a recorder in tests.
///
/// Implementations must be atomic per service: a service's old state stays in force until
/// its new state is complete. Failures are per service and reported, never all-or-nothing
/// for a batch.
pub trait Datapath: Send + Sync {
    /// Applies a batch of incremental changes: removals, then upserts. Services not named
    /// in the batch are left alone.
    fn apply(&self, changes: &DesiredChanges) -> ApplyReport;

    /// Makes the datapath enforce exactly `desired`, the complete desired state: unchanged
    /// services are not touched, changed ones are replaced, services programmed earlier
    /// (e.g. by a previous agent run, in pinned maps) that are not in `desired` are
    /// removed, and leftovers of an interrupted run are cleaned. Existing flows of
    /// unchanged services are kept. The agent calls it once, when its first full view is
    /// ready; a failed removal is reported under the removed service's id.
    fn reconcile(&self, desired: &[DesiredService]) -> ApplyReport;
}
