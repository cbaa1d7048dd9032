//! The vocabulary between the planner and the executor: single map writes and the ordered
//! plan that programs or retires one service.
//!
//! Values are the kernel layouts of `clustermesh_ebpf_common` (plain `#[repr(C)]` data), so
//! a plan says byte for byte what the maps will hold, while staying free of map handles.

use clustermesh_ebpf_common::{BackendValue, ClusterName, ServiceKey, ServiceMeta, ServiceValue};

/// One write to the kernel maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MapOp {
    /// Names a cluster index in the clusters map (an empty name frees the slot).
    PutCluster {
        /// Cluster index.
        index: u32,
        /// The name stored there.
        name: ClusterName,
    },
    /// Creates or updates a backend.
    PutBackend {
        /// Backend id.
        id: u32,
        /// Its address, state and cluster.
        value: BackendValue,
    },
    /// Deletes a backend (a missing one counts as deleted).
    DeleteBackend {
        /// Backend id.
        id: u32,
    },
    /// Writes backend ids into slab space no frontend points to.
    PutSlab {
        /// First slab entry written.
        offset: u32,
        /// The ids: the Maglev table followed by the service's backend list.
        ids: Vec<u32>,
    },
    /// Writes a service's bookkeeping record (read back after a restart).
    PutMeta {
        /// Service id.
        service_id: u32,
        /// Name, slab region and sizes.
        meta: ServiceMeta,
    },
    /// Deletes a service's bookkeeping record (a missing one counts as deleted).
    DeleteMeta {
        /// Service id.
        service_id: u32,
    },
    /// Points a frontend at a table: the single update that switches its traffic.
    PutService {
        /// The frontend.
        key: ServiceKey,
        /// Service id, table offset and size, flags.
        value: ServiceValue,
    },
    /// Deletes a frontend (a missing one counts as deleted).
    DeleteService {
        /// The frontend.
        key: ServiceKey,
    },
}

/// One step that builds a service's new state, with the operation that reverts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// What to write.
    pub(crate) op: MapOp,
    /// What restores the previous content if a later step fails (`None`: nothing to
    /// restore, e.g. a write into free slab space).
    pub(crate) undo: Option<MapOp>,
}

/// The map operations for one service, in the order that keeps its old state in force
/// until the new state is complete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// `namespace/name/port-name` of the service ("" for clean-up of leftovers), for errors
    /// and logs.
    pub(crate) service: String,
    /// Builds the new state, ending with the frontend flips. All or nothing: if a step
    /// fails, the executed ones are undone in reverse order.
    pub(crate) steps: Vec<Step>,
    /// Retires what the old state used once the new one is in force. Best effort: a
    /// failure leaves an unreferenced entry behind, never a broken service.
    pub(crate) retire: Vec<MapOp>,
}

#[cfg(test)]
impl Plan {
    /// Every operation in execution order (when nothing fails).
    pub(crate) fn ops(&self) -> impl Iterator<Item = &MapOp> {
        self.steps.iter().map(|s| &s.op).chain(&self.retire)
    }
}
