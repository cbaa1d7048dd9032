//! Serializable snapshot of what the kernel maps hold, for `clustermesh bpf lb list`
//! (served through the agent's admin API).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything the datapath has programmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BpfDump {
    /// Pin directory the maps live in.
    pub pin_dir: String,
    /// Cgroup the programs are attached to.
    pub cgroup: String,
    /// Services sorted by name.
    pub services: Vec<ServiceDump>,
    /// Backends sorted by id.
    pub backends: Vec<BackendDump>,
    /// Slab usage.
    pub slab: SlabDump,
    /// Kernel counters summed over CPUs.
    pub counters: BTreeMap<String, u64>,
}

/// One service as programmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDump {
    /// Service id in the maps.
    pub id: u32,
    /// `namespace/name/port-name`.
    pub name: String,
    /// Frontends as `ip:port/proto` (`[v6]:port/proto`).
    pub frontends: Vec<String>,
    /// Table offset in the slab.
    pub table_offset: u32,
    /// Table size M (0: connections are refused).
    pub table_size: u32,
    /// Backend ids of the service (active and terminating).
    pub backends: Vec<u32>,
    /// Table slots owned by each backend id.
    pub slots: BTreeMap<u32, u32>,
    /// The table itself (backend ids), when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<Vec<u32>>,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendDump {
    /// Backend id.
    pub id: u32,
    /// `ip:port` (`[v6]:port`).
    pub address: String,
    /// "TCP" or "UDP".
    pub protocol: String,
    /// Cluster name.
    pub cluster: String,
    /// "active" or "terminating".
    pub state: String,
    /// Number of services referencing it.
    pub services: u32,
}

/// Slab usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlabDump {
    /// Capacity in entries.
    pub capacity: u32,
    /// Entries in use (tables, backend lists, and regions waiting to be reused).
    pub used: u64,
    /// Largest free block.
    pub largest_free: u32,
}
