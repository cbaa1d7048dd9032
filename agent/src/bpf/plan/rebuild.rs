//! Rebuilding the planner from what pinned maps hold, so a restarted agent neither flushes
//! the maps nor trusts anything it cannot check.
//!
//! Service names and backend lists live in the userspace-only record map and in the slab,
//! so the mirror is rebuilt from the maps alone. Entries that do not add up (a frontend of
//! no known service, an unreadable record) are kept as orphans: they keep routing until a
//! full reconcile removes them ([`Planner::plan_cleanup`]).

use std::collections::{BTreeSet, HashMap};

use clustermesh_ebpf_common::{
    capacity, BackendValue, ClusterName, ServiceKey, ServiceMeta, ServiceValue, CLUSTER_NAME_MAX,
    SERVICE_NAME_MAX,
};

use super::{BackendEntry, BackendIdentity, Planner, ProgrammedService, SlabRead};
use crate::bpf::{
    encode::{port_host, words_addr},
    slab::Region,
};
use clustermesh_api::model::ServicePortId;

/// Everything the maps hold that the planner needs, in map iteration order.
#[derive(Debug, Clone, Default)]
pub(crate) struct MapSnapshot {
    /// Slab capacity in entries.
    pub(crate) slab_capacity: u32,
    /// Cluster index → name (unused slots have an empty name).
    pub(crate) clusters: Vec<(u32, ClusterName)>,
    /// Service id → bookkeeping record.
    pub(crate) meta: Vec<(u32, ServiceMeta)>,
    /// Frontend → service entry.
    pub(crate) services: Vec<(ServiceKey, ServiceValue)>,
    /// Backend id → backend.
    pub(crate) backends: Vec<(u32, BackendValue)>,
}

/// Parses `namespace/name/port-name` (the port name may be empty).
pub(crate) fn parse_service_name(s: &str) -> Option<ServicePortId> {
    let mut it = s.splitn(3, '/');
    Some(ServicePortId {
        namespace: it.next()?.to_owned(),
        name: it.next()?.to_owned(),
        port_name: it.next()?.to_owned(),
    })
}

impl Planner {
    /// The planner for maps holding `snapshot`, with the slab readable through `slab`.
    pub(crate) fn rebuild(snapshot: &MapSnapshot, slab: &(impl SlabRead + ?Sized)) -> Self {
        let mut p = Self::new(snapshot.slab_capacity);
        p.load_clusters(&snapshot.clusters);
        p.load_services(&snapshot.meta, slab);
        p.load_frontends(&snapshot.services);
        p.load_backends(&snapshot.backends);
        p
    }

    /// Leftover frontends and service records of an interrupted run, awaiting clean-up.
    pub(crate) fn orphan_count(&self) -> usize {
        self.orphan_frontends.len() + self.orphan_meta.len()
    }

    /// Number of backends in the maps.
    pub(crate) fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Slab entries in use (including retired regions in their grace period).
    pub(crate) fn slab_used(&self) -> u64 {
        self.slab.used()
    }

    fn load_clusters(&mut self, clusters: &[(u32, ClusterName)]) {
        for (idx, c) in clusters {
            if c.len == 0 || *idx == 0 || *idx >= capacity::CLUSTERS {
                continue;
            }
            let Ok(idx16) = u16::try_from(*idx) else {
                continue;
            };
            let len = (c.len as usize).min(CLUSTER_NAME_MAX);
            let name = String::from_utf8_lossy(&c.name[..len]).into_owned();
            if self.clusters.contains_key(&name) || !self.cluster_ids.reserve(*idx) {
                continue;
            }
            self.clusters.insert(name.clone(), idx16);
            self.cluster_names.insert(idx16, name);
        }
    }

    fn load_services(&mut self, meta: &[(u32, ServiceMeta)], slab: &(impl SlabRead + ?Sized)) {
        for (sid, m) in meta {
            let sid = *sid;
            let len = (m.name_len as usize).min(SERVICE_NAME_MAX);
            let name = String::from_utf8_lossy(&m.name[..len]).into_owned();
            let region = Region {
                offset: m.region_offset,
                len: m.table_size.saturating_add(m.backend_count),
            };
            let parsed = parse_service_name(&name).filter(|id| !self.services.contains_key(id));
            let backend_list = slab.read_slab(Region {
                offset: m.region_offset.saturating_add(m.table_size),
                len: m.backend_count,
            });
            let adopted = match (parsed, backend_list) {
                (Some(id), Some(backend_ids)) if self.service_ids.reserve(sid) => {
                    if self.slab.reserve(region) {
                        self.services.insert(
                            id,
                            ProgrammedService {
                                id: sid,
                                name: name.clone(),
                                frontends: BTreeSet::new(),
                                region,
                                table_size: m.table_size,
                                backend_ids,
                            },
                        );
                        true
                    } else {
                        self.service_ids.release(sid);
                        false
                    }
                }
                _ => false,
            };
            if !adopted {
                tracing::warn!(
                    service_id = sid,
                    name,
                    "dropping inconsistent service record"
                );
                // Held until clean-up so no new service reuses the id of a record that is
                // still in the map.
                self.service_ids.reserve(sid);
                self.orphan_meta.push(sid);
            }
        }
    }

    fn load_frontends(&mut self, entries: &[(ServiceKey, ServiceValue)]) {
        let by_sid: HashMap<u32, ServicePortId> = self
            .services
            .iter()
            .map(|(k, v)| (v.id, k.clone()))
            .collect();
        for (key, value) in entries {
            let owner = by_sid.get(&value.service_id);
            let owned_region = owner
                .and_then(|o| self.services.get(o))
                .map(|s| (s.region.offset, s.table_size));
            if owned_region != Some((value.table_offset, value.table_size)) {
                // Interrupted flip or foreign entry: keep its table alive until clean-up.
                let region = Region {
                    offset: value.table_offset,
                    len: value.table_size,
                };
                if self.slab.reserve(region) {
                    self.orphan_regions.push(region);
                }
            }
            match owner.and_then(|o| self.services.get_mut(o)) {
                Some(s) => {
                    s.frontends.insert(*key);
                    self.frontend_owner.insert(*key, s.id);
                }
                None => self.orphan_frontends.push(*key),
            }
        }
    }

    fn load_backends(&mut self, entries: &[(u32, BackendValue)]) {
        let mut refs: HashMap<u32, u32> = HashMap::new();
        for s in self.services.values() {
            for id in &s.backend_ids {
                *refs.entry(*id).or_default() += 1;
            }
        }
        for (id, value) in entries {
            let Some(ip) = words_addr(value.addr, value.family) else {
                continue;
            };
            let identity = BackendIdentity {
                ip,
                port: port_host(value.port),
                proto: value.proto,
                cluster: value.cluster,
            };
            if self.backends.contains_key(&identity) || !self.backend_ids.reserve(*id) {
                continue;
            }
            self.backend_by_id.insert(*id, identity);
            self.backends.insert(
                identity,
                BackendEntry {
                    id: *id,
                    value: *value,
                    refs: refs.get(id).copied().unwrap_or(0),
                },
            );
        }
    }
}
