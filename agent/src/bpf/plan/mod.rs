//! The pure half of the eBPF datapath: which map operations program a service.
//!
//! [`Planner`] mirrors what the kernel maps hold (programmed services, backends with
//! reference counts, cluster names, id and slab allocations) and turns a desired service
//! into a [`Plan`], an ordered list of [`MapOp`]s. Programming one service never leaves it
//! half-done:
//! 1. new cluster names and backends are written and changed backends updated — harmless,
//!    no table points to the new ones yet;
//! 2. the new table and backend list go into free slab space, then the service record;
//! 3. every frontend is flipped to the new table, one map update each;
//! 4. only then are stale frontends removed, the old region retired (reusable after
//!    [`REGION_GRACE`], since a program may still be reading it) and unreferenced backends
//!    deleted.
//!
//! Steps 1–3 carry their undo: when one fails the executor reverts the executed ones and
//! [`Planner::abort`] forgets the plan, so the old state stays in force. Step 4 is best
//! effort. The planner never touches a map, so all of this is unit- and property-tested
//! without privileges (`tests`); `super::exec` applies plans to the maps.

mod listing;
mod ops;
mod rebuild;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use clustermesh_ebpf_common::{
    backend_state, capacity, service_flags, BackendValue, ClusterName, ServiceKey, ServiceMeta,
    ServiceValue, CLUSTER_NAME_MAX, SERVICE_NAME_MAX,
};

pub(crate) use ops::{MapOp, Plan, Step};
pub(crate) use rebuild::MapSnapshot;

use super::{
    encode::{addr_words, frontend_of, port_be, proto_num, service_key},
    ids::IdAllocator,
    slab::{Region, SlabAllocator},
};
use clustermesh_agent_core::datapath::{Backend, DesiredService, Frontend};
use clustermesh_api::model::{BackendState, ServicePortId};

/// How long a retired slab region waits before reuse. sock_addr programs run for
/// microseconds inside an RCU read section; a program that read the old service entry just
/// before the flip is long done after this.
pub(crate) const REGION_GRACE: Duration = Duration::from_millis(20);

/// Read access to the slab a plan is made against (the kernel's mapping, or a test buffer).
pub(crate) trait SlabRead {
    /// The ids in `region`; `None` when it lies outside the slab.
    fn read_slab(&self, region: Region) -> Option<Vec<u32>>;
}

/// Why a service cannot be planned. Nothing was written and the planner is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PlanError {
    /// The desired state cannot be programmed as given.
    #[error("service {service} cannot be programmed: {reason}")]
    Invalid {
        /// The service.
        service: String,
        /// What is wrong.
        reason: String,
    },
    /// No free slab block is large enough for the new table.
    #[error("Maglev slab full: service {service} needs {needed} entries but the largest free block has {largest_free} of {capacity}")]
    SlabFull {
        /// The service.
        service: String,
        /// Entries needed (table plus backend list).
        needed: u32,
        /// Largest free block.
        largest_free: u32,
        /// Slab capacity.
        capacity: u32,
        /// When retired regions still in their grace period become free (planning again
        /// after that instant may succeed); `None` when nothing is waiting.
        retry_at: Option<Instant>,
    },
    /// Service, backend or cluster ids are exhausted.
    #[error("no free {what} id left (limit {limit})")]
    IdsExhausted {
        /// "service", "backend" or "cluster".
        what: &'static str,
        /// The limit.
        limit: u32,
    },
}

/// A backend as identified across services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BackendIdentity {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    pub(crate) proto: u8,
    pub(crate) cluster: u16,
}

/// A backend in the maps and how many programmed services use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackendEntry {
    pub(crate) id: u32,
    pub(crate) value: BackendValue,
    pub(crate) refs: u32,
}

/// A service as the maps hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProgrammedService {
    /// Dense service id (key of the service record).
    pub(crate) id: u32,
    /// `namespace/name/port-name`.
    pub(crate) name: String,
    /// Frontends pointing at the table.
    pub(crate) frontends: BTreeSet<ServiceKey>,
    /// Slab region: the table, then the backend list.
    pub(crate) region: Region,
    /// Table size M.
    pub(crate) table_size: u32,
    /// Distinct backend ids, in the order of the service's backend list.
    pub(crate) backend_ids: Vec<u32>,
}

impl ProgrammedService {
    /// The services-map value of every frontend of this service.
    fn entry(&self) -> ServiceValue {
        service_value(self.id, self.region.offset, self.table_size)
    }

    /// The bookkeeping record of this service.
    fn meta(&self) -> ServiceMeta {
        let mut meta = ServiceMeta {
            region_offset: self.region.offset,
            table_size: self.table_size,
            backend_count: u32::try_from(self.backend_ids.len()).unwrap_or(u32::MAX),
            name_len: u32::try_from(self.name.len()).unwrap_or(0),
            ..ServiceMeta::default()
        };
        let len = self.name.len().min(SERVICE_NAME_MAX);
        meta.name[..len].copy_from_slice(&self.name.as_bytes()[..len]);
        meta
    }
}

fn service_value(service_id: u32, table_offset: u32, table_size: u32) -> ServiceValue {
    ServiceValue {
        service_id,
        table_offset,
        table_size,
        flags: if table_size == 0 {
            service_flags::REFUSE
        } else {
            0
        },
    }
}

/// A planned create-or-replace of one service, with the allocations it made. Hand it back
/// to [`Planner::commit`] once executed, or to [`Planner::abort`] if execution failed.
#[derive(Debug)]
#[must_use = "a planned upsert must be committed or aborted"]
pub(crate) struct UpsertPlan {
    /// The operations to execute.
    pub(crate) plan: Plan,
    lb_id: ServicePortId,
    service: ProgrammedService,
    new_service_id: bool,
    new_clusters: Vec<(u16, String)>,
    /// Backends created by this plan, with their final value.
    new_backends: Vec<(BackendIdentity, u32, BackendValue)>,
    /// Existing backends whose value this plan changes, with the new value.
    updated_backends: Vec<(BackendIdentity, BackendValue)>,
    now: Instant,
}

/// Allocations of a plan being built, released if planning fails.
#[derive(Debug, Default)]
struct Staged {
    service_id: Option<u32>,
    clusters: Vec<(u16, String)>,
    backends: Vec<(BackendIdentity, u32, BackendValue)>,
    updated: Vec<(BackendIdentity, BackendValue)>,
    region: Option<Region>,
}

/// The planner's mirror of the kernel maps.
#[derive(Debug)]
pub(crate) struct Planner {
    services: HashMap<ServicePortId, ProgrammedService>,
    frontend_owner: HashMap<ServiceKey, u32>,
    backends: HashMap<BackendIdentity, BackendEntry>,
    backend_by_id: HashMap<u32, BackendIdentity>,
    clusters: HashMap<String, u16>,
    cluster_names: BTreeMap<u16, String>,
    cluster_ids: IdAllocator,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    slab: SlabAllocator,
    /// Retired regions and when they were retired.
    quarantine: Vec<(Instant, Region)>,
    /// Left over by an interrupted run; cleaned by [`Planner::plan_cleanup`].
    orphan_regions: Vec<Region>,
    orphan_frontends: Vec<ServiceKey>,
    orphan_meta: Vec<u32>,
}

/// `namespace/name/port-name`.
pub(crate) fn service_name(id: &ServicePortId) -> String {
    format!("{}/{}/{}", id.namespace, id.name, id.port_name)
}

fn invalid(service: &str, reason: impl Into<String>) -> PlanError {
    PlanError::Invalid {
        service: service.to_owned(),
        reason: reason.into(),
    }
}

fn len_u32(n: usize, service: &str) -> Result<u32, PlanError> {
    u32::try_from(n).map_err(|_| invalid(service, format!("{n} entries do not fit the slab")))
}

fn dedup(ids: &[u32]) -> Vec<u32> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

fn backend_value(b: &Backend, cluster: u16) -> BackendValue {
    let (addr, family) = addr_words(b.ip);
    BackendValue {
        addr,
        port: port_be(b.port),
        family,
        state: match b.state {
            BackendState::Active => backend_state::ACTIVE,
            BackendState::Terminating => backend_state::TERMINATING,
        },
        cluster,
        proto: proto_num(b.protocol),
        pad: 0,
    }
}

fn cluster_name_value(name: &str) -> ClusterName {
    let mut value = ClusterName::default();
    let len = name.len().min(CLUSTER_NAME_MAX);
    value.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    value.len = u32::try_from(len).unwrap_or(0);
    value
}

/// `ip:port/TCP`.
pub(crate) fn fmt_frontend(f: &Frontend) -> String {
    format!(
        "{}/{}",
        std::net::SocketAddr::new(f.ip, f.port),
        format!("{:?}", f.protocol).to_uppercase()
    )
}

fn validate(svc: &DesiredService, name: &str) -> Result<(), PlanError> {
    if name.len() > SERVICE_NAME_MAX {
        return Err(invalid(
            name,
            format!("the name is longer than {SERVICE_NAME_MAX} bytes"),
        ));
    }
    if svc.frontends.is_empty() {
        return Err(invalid(name, "it has no frontend"));
    }
    for (slot, &i) in svc.table.iter().enumerate() {
        match svc.backends.get(i as usize) {
            None => {
                return Err(invalid(
                    name,
                    format!(
                        "table slot {slot} names backend {i} but only {} backends are listed",
                        svc.backends.len()
                    ),
                ))
            }
            Some(b) if b.state != BackendState::Active => {
                return Err(invalid(
                    name,
                    format!("table slot {slot} names terminating backend {}", b.ip),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

impl Planner {
    /// A planner for empty maps with a slab of `slab_capacity` entries.
    pub(crate) fn new(slab_capacity: u32) -> Self {
        Self {
            services: HashMap::new(),
            frontend_owner: HashMap::new(),
            backends: HashMap::new(),
            backend_by_id: HashMap::new(),
            clusters: HashMap::new(),
            cluster_names: BTreeMap::new(),
            cluster_ids: IdAllocator::new(1, capacity::CLUSTERS),
            service_ids: IdAllocator::new(1, capacity::SERVICE_META),
            backend_ids: IdAllocator::new(1, capacity::BACKENDS),
            slab: SlabAllocator::new(slab_capacity),
            quarantine: Vec::new(),
            orphan_regions: Vec::new(),
            orphan_frontends: Vec::new(),
            orphan_meta: Vec::new(),
        }
    }

    /// Number of services programmed.
    pub(crate) fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Ids of the programmed services not in `keep`.
    pub(crate) fn stale_services(&self, keep: &HashSet<ServicePortId>) -> Vec<ServicePortId> {
        self.services
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect()
    }

    /// True when the maps already hold exactly `svc`.
    fn is_unchanged(
        &self,
        svc: &DesiredService,
        keys: &BTreeSet<ServiceKey>,
        slab: &(impl SlabRead + ?Sized),
    ) -> bool {
        let Some(st) = self.services.get(&svc.id) else {
            return false;
        };
        if &st.frontends != keys || st.table_size as usize != svc.table.len() {
            return false;
        }
        let mut ids = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let cluster = if b.cluster.is_empty() {
                0
            } else {
                match self.clusters.get(&b.cluster) {
                    Some(&c) => c,
                    None => return false,
                }
            };
            let identity = BackendIdentity {
                ip: b.ip,
                port: b.port,
                proto: proto_num(b.protocol),
                cluster,
            };
            match self.backends.get(&identity) {
                Some(e) if e.value == backend_value(b, cluster) => ids.push(e.id),
                _ => return false,
            }
        }
        if dedup(&ids) != st.backend_ids {
            return false;
        }
        let Some(current) = slab.read_slab(Region {
            offset: st.region.offset,
            len: st.table_size,
        }) else {
            return false;
        };
        svc.table
            .iter()
            .zip(current.iter())
            .all(|(&i, &cur)| ids.get(i as usize) == Some(&cur))
    }

    /// Plans creating or replacing `svc` at time `now`. `Ok(None)`: the maps already hold
    /// it. On error nothing is allocated.
    pub(crate) fn plan_upsert(
        &mut self,
        svc: &DesiredService,
        slab: &(impl SlabRead + ?Sized),
        now: Instant,
    ) -> Result<Option<UpsertPlan>, PlanError> {
        let name = service_name(&svc.id);
        validate(svc, &name)?;
        let keys: BTreeSet<ServiceKey> = svc.frontends.iter().map(service_key).collect();
        if self.is_unchanged(svc, &keys, slab) {
            return Ok(None);
        }
        let old = self.services.get(&svc.id);
        for k in &keys {
            if let Some(&owner) = self.frontend_owner.get(k) {
                if Some(owner) != old.map(|s| s.id) {
                    let f = frontend_of(k).map_or_else(|| "?".into(), |f| fmt_frontend(&f));
                    return Err(invalid(
                        &name,
                        format!(
                            "frontend {f} already belongs to another service; remove it there first"
                        ),
                    ));
                }
            }
        }
        let mut staged = Staged::default();
        match self.stage(svc, name, keys, now, &mut staged) {
            Ok(plan) => Ok(Some(plan)),
            Err(e) => {
                self.release(staged);
                Err(e)
            }
        }
    }

    fn stage(
        &mut self,
        svc: &DesiredService,
        name: String,
        keys: BTreeSet<ServiceKey>,
        now: Instant,
        staged: &mut Staged,
    ) -> Result<UpsertPlan, PlanError> {
        let old = self.services.get(&svc.id).cloned();
        let sid = match &old {
            Some(s) => s.id,
            None => {
                let sid = self.service_ids.allocate().ok_or(PlanError::IdsExhausted {
                    what: "service",
                    limit: capacity::SERVICE_META,
                })?;
                staged.service_id = Some(sid);
                sid
            }
        };
        let mut steps = Vec::new();

        // Step 1: cluster names and backends.
        let mut ids = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let cluster = self.stage_cluster(&b.cluster, &name, staged, &mut steps)?;
            ids.push(self.stage_backend(b, cluster, staged, &mut steps)?);
        }
        let distinct = dedup(&ids);
        let mut buf: Vec<u32> = svc.table.iter().map(|&i| ids[i as usize]).collect();
        let table_size = len_u32(buf.len(), &name)?;
        buf.extend_from_slice(&distinct);
        let needed = len_u32(buf.len(), &name)?;

        // Step 2: the new table in free space, then the service record.
        self.release_matured(now);
        let Some(region) = self.slab.allocate(needed) else {
            return Err(PlanError::SlabFull {
                service: name,
                needed,
                largest_free: self.slab.largest_free(),
                capacity: self.slab.capacity(),
                retry_at: self.quarantine.iter().map(|(t, _)| *t + REGION_GRACE).max(),
            });
        };
        staged.region = Some(region);
        if !buf.is_empty() {
            steps.push(Step {
                op: MapOp::PutSlab {
                    offset: region.offset,
                    ids: buf,
                },
                undo: None,
            });
        }
        let service = ProgrammedService {
            id: sid,
            name,
            frontends: keys,
            region,
            table_size,
            backend_ids: distinct,
        };
        steps.push(Step {
            op: MapOp::PutMeta {
                service_id: sid,
                meta: service.meta(),
            },
            undo: Some(match &old {
                Some(o) => MapOp::PutMeta {
                    service_id: sid,
                    meta: o.meta(),
                },
                None => MapOp::DeleteMeta { service_id: sid },
            }),
        });

        // Step 3: flip every frontend.
        let value = service.entry();
        for &key in &service.frontends {
            let undo = match &old {
                Some(o) if o.frontends.contains(&key) => MapOp::PutService {
                    key,
                    value: o.entry(),
                },
                _ => MapOp::DeleteService { key },
            };
            steps.push(Step {
                op: MapOp::PutService { key, value },
                undo: Some(undo),
            });
        }

        // Step 4: retire what only the old state used.
        let mut retire = Vec::new();
        if let Some(o) = &old {
            for &key in o.frontends.difference(&service.frontends) {
                retire.push(MapOp::DeleteService { key });
            }
            let kept: HashSet<u32> = service.backend_ids.iter().copied().collect();
            for id in &o.backend_ids {
                let last_user = !kept.contains(id)
                    && self
                        .backend_by_id
                        .get(id)
                        .and_then(|i| self.backends.get(i))
                        .is_some_and(|e| e.refs <= 1);
                if last_user {
                    retire.push(MapOp::DeleteBackend { id: *id });
                }
            }
        }

        Ok(UpsertPlan {
            plan: Plan {
                service: service.name.clone(),
                steps,
                retire,
            },
            lb_id: svc.id.clone(),
            service,
            new_service_id: staged.service_id.take().is_some(),
            new_clusters: std::mem::take(&mut staged.clusters),
            new_backends: std::mem::take(&mut staged.backends),
            updated_backends: std::mem::take(&mut staged.updated),
            now,
        })
    }

    /// The cluster index of `name`, staging a new one (and its map write) if needed.
    fn stage_cluster(
        &mut self,
        name: &str,
        service: &str,
        staged: &mut Staged,
        steps: &mut Vec<Step>,
    ) -> Result<u16, PlanError> {
        if name.is_empty() {
            return Ok(0);
        }
        if let Some(&i) = self.clusters.get(name) {
            return Ok(i);
        }
        if let Some((i, _)) = staged.clusters.iter().find(|(_, n)| n == name) {
            return Ok(*i);
        }
        if name.len() > CLUSTER_NAME_MAX {
            return Err(invalid(
                service,
                format!("cluster name {name:?} is longer than {CLUSTER_NAME_MAX} bytes"),
            ));
        }
        let exhausted = PlanError::IdsExhausted {
            what: "cluster",
            limit: capacity::CLUSTERS,
        };
        let idx = self.cluster_ids.allocate().ok_or(exhausted.clone())?;
        let Ok(idx16) = u16::try_from(idx) else {
            self.cluster_ids.release(idx);
            return Err(exhausted);
        };
        staged.clusters.push((idx16, name.to_owned()));
        steps.push(Step {
            op: MapOp::PutCluster {
                index: idx,
                name: cluster_name_value(name),
            },
            undo: Some(MapOp::PutCluster {
                index: idx,
                name: ClusterName::default(),
            }),
        });
        Ok(idx16)
    }

    /// The id of backend `b`, staging its creation or update (and the map write) if needed.
    fn stage_backend(
        &mut self,
        b: &Backend,
        cluster: u16,
        staged: &mut Staged,
        steps: &mut Vec<Step>,
    ) -> Result<u32, PlanError> {
        let identity = BackendIdentity {
            ip: b.ip,
            port: b.port,
            proto: proto_num(b.protocol),
            cluster,
        };
        let value = backend_value(b, cluster);
        // The value the maps will hold for this backend once the steps so far ran.
        let (id, current) = if let Some(e) = staged.backends.iter_mut().find(|e| e.0 == identity) {
            let current = e.2;
            e.2 = value;
            (e.1, current)
        } else if let Some(entry) = self.backends.get(&identity) {
            let current = match staged.updated.iter_mut().find(|u| u.0 == identity) {
                Some(u) => std::mem::replace(&mut u.1, value),
                None => {
                    staged.updated.push((identity, value));
                    entry.value
                }
            };
            (entry.id, current)
        } else {
            let id = self.backend_ids.allocate().ok_or(PlanError::IdsExhausted {
                what: "backend",
                limit: capacity::BACKENDS,
            })?;
            staged.backends.push((identity, id, value));
            steps.push(Step {
                op: MapOp::PutBackend { id, value },
                undo: Some(MapOp::DeleteBackend { id }),
            });
            return Ok(id);
        };
        if current != value {
            steps.push(Step {
                op: MapOp::PutBackend { id, value },
                undo: Some(MapOp::PutBackend { id, value: current }),
            });
        }
        Ok(id)
    }

    /// Releases what a plan allocated.
    fn release(&mut self, staged: Staged) {
        if let Some(sid) = staged.service_id {
            self.service_ids.release(sid);
        }
        for (idx, _) in staged.clusters {
            self.cluster_ids.release(u32::from(idx));
        }
        for (_, id, _) in staged.backends {
            self.backend_ids.release(id);
        }
        if let Some(r) = staged.region {
            self.slab.release(r);
        }
    }

    /// Records that `plan` was executed: its service is now in force and the old state
    /// retired.
    pub(crate) fn commit(&mut self, plan: UpsertPlan) {
        let UpsertPlan {
            lb_id,
            service,
            new_clusters,
            new_backends,
            updated_backends,
            now,
            ..
        } = plan;
        for (idx, name) in new_clusters {
            self.clusters.insert(name.clone(), idx);
            self.cluster_names.insert(idx, name);
        }
        for (identity, id, value) in new_backends {
            self.backends
                .insert(identity, BackendEntry { id, value, refs: 0 });
            self.backend_by_id.insert(id, identity);
        }
        for (identity, value) in updated_backends {
            if let Some(e) = self.backends.get_mut(&identity) {
                e.value = value;
            }
        }
        for id in &service.backend_ids {
            if let Some(e) = self
                .backend_by_id
                .get(id)
                .and_then(|i| self.backends.get_mut(i))
            {
                e.refs += 1;
            }
        }
        if let Some(old) = self.services.remove(&lb_id) {
            for k in old.frontends.difference(&service.frontends) {
                self.frontend_owner.remove(k);
            }
            self.retire_region(old.region, now);
            for id in &old.backend_ids {
                self.deref_backend(*id);
            }
        }
        for k in &service.frontends {
            self.frontend_owner.insert(*k, service.id);
        }
        self.services.insert(lb_id, service);
    }

    /// Forgets a plan whose execution failed (the executor reverted its steps): the old
    /// state stays as it was and the plan's allocations are freed.
    pub(crate) fn abort(&mut self, plan: UpsertPlan) {
        let UpsertPlan {
            service,
            new_service_id,
            new_clusters,
            new_backends,
            ..
        } = plan;
        self.release(Staged {
            service_id: new_service_id.then_some(service.id),
            clusters: new_clusters,
            backends: new_backends,
            updated: Vec::new(),
            region: Some(service.region),
        });
    }

    /// Plans removing a service; `None` when it is not programmed. The planner forgets the
    /// service at once: a failed deletion leaves an entry nothing refers to.
    pub(crate) fn plan_remove(&mut self, id: &ServicePortId, now: Instant) -> Option<Plan> {
        let old = self.services.remove(id)?;
        let mut plan = Plan {
            service: old.name.clone(),
            ..Plan::default()
        };
        for &key in &old.frontends {
            plan.retire.push(MapOp::DeleteService { key });
            self.frontend_owner.remove(&key);
        }
        plan.retire.push(MapOp::DeleteMeta { service_id: old.id });
        self.retire_region(old.region, now);
        for bid in &old.backend_ids {
            if self.deref_backend(*bid) {
                plan.retire.push(MapOp::DeleteBackend { id: *bid });
            }
        }
        self.service_ids.release(old.id);
        Some(plan)
    }

    /// Plans removing what an interrupted run left behind (frontends and records of no
    /// service, tables no service owns) and backends no service references. Meant to
    /// follow a full reconcile.
    pub(crate) fn plan_cleanup(&mut self, now: Instant) -> Plan {
        let mut plan = Plan::default();
        for key in std::mem::take(&mut self.orphan_frontends) {
            if !self.frontend_owner.contains_key(&key) {
                plan.retire.push(MapOp::DeleteService { key });
            }
        }
        for sid in std::mem::take(&mut self.orphan_meta) {
            plan.retire.push(MapOp::DeleteMeta { service_id: sid });
            self.service_ids.release(sid);
        }
        for r in std::mem::take(&mut self.orphan_regions) {
            self.retire_region(r, now);
        }
        let mut unreferenced: Vec<u32> = self
            .backends
            .values()
            .filter(|e| e.refs == 0)
            .map(|e| e.id)
            .collect();
        unreferenced.sort_unstable();
        for id in unreferenced {
            self.forget_backend(id);
            plan.retire.push(MapOp::DeleteBackend { id });
        }
        plan
    }

    /// Drops one reference; returns true when it was the last (the backend is forgotten
    /// and must be deleted from the map).
    fn deref_backend(&mut self, id: u32) -> bool {
        let Some(identity) = self.backend_by_id.get(&id).copied() else {
            return false;
        };
        let remaining = match self.backends.get_mut(&identity) {
            Some(e) => {
                e.refs = e.refs.saturating_sub(1);
                e.refs
            }
            None => return false,
        };
        if remaining == 0 {
            self.forget_backend(id);
        }
        remaining == 0
    }

    fn forget_backend(&mut self, id: u32) {
        if let Some(identity) = self.backend_by_id.remove(&id) {
            self.backends.remove(&identity);
        }
        self.backend_ids.release(id);
    }

    fn release_matured(&mut self, now: Instant) {
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .quarantine
            .drain(..)
            .partition(|(t, _)| now.saturating_duration_since(*t) >= REGION_GRACE);
        self.quarantine = waiting;
        for (_, r) in ready {
            if !self.slab.release(r) {
                tracing::warn!(offset = r.offset, len = r.len, "slab region released twice");
            }
        }
    }

    fn retire_region(&mut self, r: Region, now: Instant) {
        if r.len > 0 {
            self.quarantine.push((now, r));
        }
    }
}
