//! The `bpf lb list` view of the programmed state, built from the planner's mirror and
//! the slab (served through the admin API as `GET /v1/bpf/lb`).

use std::{collections::BTreeMap, net::SocketAddr};

use clustermesh_ebpf_common::backend_state;

use clustermesh_api::admin::{BackendDump, BpfDump, Reported, ServiceDump, SlabDump};

use super::{fmt_frontend, Planner, SlabRead};
use crate::bpf::{
    encode::{frontend_of, proto_from},
    slab::Region,
};

impl Planner {
    /// Services, backends and slab usage; `counters` are the datapath's statistics and
    /// the tables are included on request. Pin directory and cgroup are left empty.
    pub(crate) fn listing(
        &self,
        slab: &(impl SlabRead + ?Sized),
        include_tables: bool,
        counters: BTreeMap<String, u64>,
    ) -> BpfDump {
        let mut services: Vec<ServiceDump> = self
            .services
            .values()
            .map(|s| {
                let table = slab
                    .read_slab(Region {
                        offset: s.region.offset,
                        len: s.table_size,
                    })
                    .unwrap_or_default();
                let mut slots = BTreeMap::new();
                for id in &table {
                    *slots.entry(*id).or_insert(0u32) += 1;
                }
                ServiceDump {
                    id: s.id,
                    name: s.name.clone(),
                    frontends: s
                        .frontends
                        .iter()
                        .filter_map(frontend_of)
                        .map(|f| fmt_frontend(&f))
                        .collect(),
                    table_offset: s.region.offset,
                    table_size: s.table_size,
                    backends: s.backend_ids.clone(),
                    slots,
                    table: include_tables.then_some(table),
                }
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let mut backends: Vec<BackendDump> = self
            .backends
            .iter()
            .map(|(identity, e)| BackendDump {
                id: e.id,
                address: SocketAddr::new(identity.ip, identity.port).to_string(),
                protocol: proto_from(identity.proto).map_or_else(
                    || Reported::Unknown(identity.proto.to_string()),
                    Reported::Known,
                ),
                cluster: self
                    .cluster_names
                    .get(&identity.cluster)
                    .cloned()
                    .unwrap_or_default(),
                state: if e.value.state == backend_state::TERMINATING {
                    "terminating".into()
                } else {
                    "active".into()
                },
                services: e.refs,
            })
            .collect();
        backends.sort_by_key(|b| b.id);
        BpfDump {
            pin_dir: String::new(),
            cgroup: String::new(),
            services,
            backends,
            slab: SlabDump {
                capacity: self.slab.capacity(),
                used: self.slab.used(),
                largest_free: self.slab.largest_free(),
            },
            counters,
        }
    }
}
