//! The agent's mirror of the kernel maps and the per-service programming sequence.
//!
//! Programming one service never leaves it half-done:
//! 1. backends are inserted (new ids) — harmless, nothing points to them yet;
//! 2. the new table and backend list are written into free slab space;
//! 3. every frontend entry is flipped to the new table, one map update each;
//! 4. only then are stale frontends removed, the old region released (after a grace
//!    period, since a program may still be reading it) and unreferenced backends deleted.
//!
//! A failure before step 3 undoes steps 1–2 and leaves the old table in force. On start the
//! mirror is rebuilt from the pinned maps alone (service names and backend lists are kept in
//! the userspace-only meta map and in the slab), so nothing is flushed across a restart.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet},
    net::IpAddr,
    sync::atomic::{fence, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use clustermesh_ebpf_common::{
    backend_state, capacity, map_names, service_flags, stats, BackendValue, ClusterName,
    LayoutMeta, ServiceKey, ServiceMeta, ServiceValue, ABI_VERSION, CLUSTER_NAME_MAX, LAYOUT_MAGIC,
    SERVICE_NAME_MAX,
};

use clustermesh_agent_core::datapath::{DesiredService, Frontend};
use clustermesh_api::admin::{BackendDump, BpfDump, Reported, ServiceDump, SlabDump};
use clustermesh_api::model::{BackendState, ServicePortId};

use super::{
    encode::{
        addr_words, frontend_of, port_be, port_host, proto_from, proto_num, service_key, words_addr,
    },
    error::{BpfError, Result},
    ids::IdAllocator,
    slab::{Region, SlabAllocator},
    slab_map::SlabMapping,
};

/// How long a released slab region waits before reuse. sock_addr programs run for
/// microseconds inside an RCU read section; a program that read the old service entry just
/// before the flip is long done after this.
const REGION_GRACE: Duration = Duration::from_millis(20);

/// Typed handles on the pinned maps.
pub(crate) struct Maps {
    pub(crate) services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(crate) backends: HashMap<MapData, u32, BackendValue>,
    pub(crate) meta: HashMap<MapData, u32, ServiceMeta>,
    pub(crate) clusters: Array<MapData, ClusterName>,
    pub(crate) layout: Array<MapData, LayoutMeta>,
    pub(crate) stats: PerCpuArray<MapData, u64>,
    pub(crate) slab: SlabMapping,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps")
            .field("slab", &self.slab)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str, step: impl Into<String>) -> impl FnOnce(MapError) -> BpfError {
    let step = step.into();
    move |source| BpfError::Map {
        map,
        step,
        source: Box::new(source),
    }
}

/// Whether a map error only says "no such key".
fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
}

/// A backend as identified across services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BackendIdentity {
    ip: IpAddr,
    port: u16,
    proto: u8,
    cluster: u16,
}

#[derive(Debug, Clone, Copy)]
struct BackendEntry {
    id: u32,
    value: BackendValue,
    refs: u32,
}

#[derive(Debug, Clone)]
struct ServiceState {
    id: u32,
    name: String,
    frontends: BTreeSet<ServiceKey>,
    region: Region,
    table_size: u32,
    /// Distinct backend ids, in the order of the service's backend list.
    backend_ids: Vec<u32>,
}

/// The agent's view of the kernel maps.
#[derive(Debug)]
pub(crate) struct State {
    maps: Maps,
    services: StdHashMap<ServicePortId, ServiceState>,
    frontend_owner: StdHashMap<ServiceKey, u32>,
    backends: StdHashMap<BackendIdentity, BackendEntry>,
    backend_by_id: StdHashMap<u32, BackendIdentity>,
    clusters: StdHashMap<String, u16>,
    cluster_names: BTreeMap<u16, String>,
    cluster_ids: IdAllocator,
    slab: SlabAllocator,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    quarantine: Vec<(Instant, Region)>,
    /// Left over by an interrupted run; cleaned by [`State::gc`].
    orphan_regions: Vec<Region>,
    orphan_frontends: Vec<ServiceKey>,
    orphan_meta: Vec<u32>,
}

/// `namespace/name/port-name`.
pub(crate) fn service_name(id: &ServicePortId) -> String {
    format!("{}/{}/{}", id.namespace, id.name, id.port_name)
}

fn parse_service_name(s: &str) -> Option<ServicePortId> {
    let mut it = s.splitn(3, '/');
    Some(ServicePortId {
        namespace: it.next()?.to_owned(),
        name: it.next()?.to_owned(),
        port_name: it.next()?.to_owned(),
    })
}

fn invalid(service: &str, reason: impl Into<String>) -> BpfError {
    BpfError::InvalidService {
        service: service.to_owned(),
        reason: reason.into(),
    }
}

fn len_u32(n: usize, service: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| invalid(service, format!("{n} entries do not fit the slab")))
}

impl State {
    /// Rebuilds the mirror from the pinned maps and initialises the layout record.
    pub(crate) fn rebuild(mut maps: Maps) -> Result<Self> {
        let layout = maps
            .layout
            .get(&0, 0)
            .map_err(map_err(map_names::LAYOUT, "read the layout record"))?;
        if layout.magic == 0 {
            let meta = LayoutMeta {
                magic: LAYOUT_MAGIC,
                abi_version: ABI_VERSION,
                slab_capacity: maps.slab.entries(),
            };
            maps.layout
                .set(0, meta, 0)
                .map_err(map_err(map_names::LAYOUT, "write the layout record"))?;
        }
        let capacity_entries = maps.slab.entries();
        let mut st = Self {
            services: StdHashMap::new(),
            frontend_owner: StdHashMap::new(),
            backends: StdHashMap::new(),
            backend_by_id: StdHashMap::new(),
            clusters: StdHashMap::new(),
            cluster_names: BTreeMap::new(),
            cluster_ids: IdAllocator::new(1, capacity::CLUSTERS),
            slab: SlabAllocator::new(capacity_entries),
            service_ids: IdAllocator::new(1, capacity::SERVICE_META),
            backend_ids: IdAllocator::new(1, capacity::BACKENDS),
            quarantine: Vec::new(),
            orphan_regions: Vec::new(),
            orphan_frontends: Vec::new(),
            orphan_meta: Vec::new(),
            maps,
        };
        st.load_clusters()?;
        st.load_services()?;
        st.load_frontends()?;
        st.load_backends()?;
        tracing::info!(
            services = st.services.len(),
            backends = st.backends.len(),
            slab_used = st.slab.used(),
            orphans = st.orphan_frontends.len() + st.orphan_meta.len(),
            "rebuilt datapath state from pinned maps"
        );
        Ok(st)
    }

    fn load_clusters(&mut self) -> Result<()> {
        for idx in 1..capacity::CLUSTERS {
            let c = self
                .maps
                .clusters
                .get(&idx, 0)
                .map_err(map_err(map_names::CLUSTERS, "read cluster names"))?;
            if c.len == 0 {
                continue;
            }
            let len = (c.len as usize).min(CLUSTER_NAME_MAX);
            let name = String::from_utf8_lossy(&c.name[..len]).into_owned();
            let Ok(idx16) = u16::try_from(idx) else {
                continue;
            };
            self.cluster_ids.reserve(u32::from(idx16));
            self.clusters.insert(name.clone(), idx16);
            self.cluster_names.insert(idx16, name);
        }
        Ok(())
    }

    fn load_services(&mut self) -> Result<()> {
        let mut entries = Vec::new();
        for item in self.maps.meta.iter() {
            entries.push(item.map_err(map_err(map_names::SERVICE_META, "iterate"))?);
        }
        for (sid, m) in entries {
            let len = (m.name_len as usize).min(SERVICE_NAME_MAX);
            let name = String::from_utf8_lossy(&m.name[..len]).into_owned();
            let region = Region {
                offset: m.region_offset,
                len: m.table_size.saturating_add(m.backend_count),
            };
            let parsed = parse_service_name(&name);
            let backend_list = self.maps.slab.read(Region {
                offset: m.region_offset.saturating_add(m.table_size),
                len: m.backend_count,
            });
            match (parsed, backend_list) {
                (Some(id), Some(backend_ids))
                    if self.slab.reserve(region) && self.service_ids.reserve(sid) =>
                {
                    self.services.insert(
                        id,
                        ServiceState {
                            id: sid,
                            name,
                            frontends: BTreeSet::new(),
                            region,
                            table_size: m.table_size,
                            backend_ids,
                        },
                    );
                }
                _ => {
                    tracing::warn!(
                        service_id = sid,
                        name,
                        "dropping inconsistent service record"
                    );
                    self.orphan_meta.push(sid);
                }
            }
        }
        Ok(())
    }

    fn load_frontends(&mut self) -> Result<()> {
        let by_sid: StdHashMap<u32, ServicePortId> = self
            .services
            .iter()
            .map(|(k, v)| (v.id, k.clone()))
            .collect();
        let mut entries = Vec::new();
        for item in self.maps.services.iter() {
            entries.push(item.map_err(map_err(map_names::SERVICES, "iterate"))?);
        }
        for (key, value) in entries {
            let owner = by_sid.get(&value.service_id).cloned();
            let owned_region = owner
                .as_ref()
                .and_then(|o| self.services.get(o))
                .map(|s| (s.region.offset, s.table_size));
            if owned_region != Some((value.table_offset, value.table_size)) {
                // Interrupted flip or foreign entry: keep its table alive until gc().
                let region = Region {
                    offset: value.table_offset,
                    len: value.table_size,
                };
                if self.slab.reserve(region) {
                    self.orphan_regions.push(region);
                }
            }
            match owner.and_then(|o| self.services.get_mut(&o)) {
                Some(s) => {
                    s.frontends.insert(key);
                    self.frontend_owner.insert(key, s.id);
                }
                None => self.orphan_frontends.push(key),
            }
        }
        Ok(())
    }

    fn load_backends(&mut self) -> Result<()> {
        let mut entries = Vec::new();
        for item in self.maps.backends.iter() {
            entries.push(item.map_err(map_err(map_names::BACKENDS, "iterate"))?);
        }
        let mut refs: StdHashMap<u32, u32> = StdHashMap::new();
        for s in self.services.values() {
            for id in &s.backend_ids {
                *refs.entry(*id).or_default() += 1;
            }
        }
        for (id, value) in entries {
            let Some(ip) = words_addr(value.addr, value.family) else {
                continue;
            };
            if !self.backend_ids.reserve(id) {
                continue;
            }
            let identity = BackendIdentity {
                ip,
                port: port_host(value.port),
                proto: value.proto,
                cluster: value.cluster,
            };
            self.backend_by_id.insert(id, identity);
            self.backends.insert(
                identity,
                BackendEntry {
                    id,
                    value,
                    refs: refs.get(&id).copied().unwrap_or(0),
                },
            );
        }
        Ok(())
    }

    /// Number of services programmed.
    pub(crate) fn service_count(&self) -> usize {
        self.services.len()
    }

    fn cluster_index(&mut self, name: &str, service: &str) -> Result<u16> {
        if name.is_empty() {
            return Ok(0);
        }
        if let Some(&i) = self.clusters.get(name) {
            return Ok(i);
        }
        if name.len() > CLUSTER_NAME_MAX {
            return Err(invalid(
                service,
                format!("cluster name {name:?} is longer than {CLUSTER_NAME_MAX} bytes"),
            ));
        }
        let idx = self.cluster_ids.allocate().ok_or(BpfError::IdsExhausted {
            what: "cluster",
            limit: capacity::CLUSTERS,
        })?;
        let mut value = ClusterName {
            len: len_u32(name.len(), service)?,
            ..ClusterName::default()
        };
        value.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Err(e) = self.maps.clusters.set(idx, value, 0) {
            self.cluster_ids.release(idx);
            return Err(map_err(map_names::CLUSTERS, "write a cluster name")(e));
        }
        let idx16 = u16::try_from(idx).unwrap_or(0);
        self.clusters.insert(name.to_owned(), idx16);
        self.cluster_names.insert(idx16, name.to_owned());
        Ok(idx16)
    }

    fn backend_value(b: &clustermesh_agent_core::datapath::Backend, cluster: u16) -> BackendValue {
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

    /// Finds or creates the backend; returns its id and whether it was created.
    fn ensure_backend(
        &mut self,
        b: &clustermesh_agent_core::datapath::Backend,
        service: &str,
    ) -> Result<(u32, bool)> {
        let cluster = self.cluster_index(&b.cluster, service)?;
        let identity = BackendIdentity {
            ip: b.ip,
            port: b.port,
            proto: proto_num(b.protocol),
            cluster,
        };
        let value = Self::backend_value(b, cluster);
        if let Some(entry) = self.backends.get_mut(&identity) {
            if entry.value != value {
                self.maps
                    .backends
                    .insert(entry.id, value, 0)
                    .map_err(map_err(map_names::BACKENDS, "update a backend"))?;
                entry.value = value;
            }
            return Ok((entry.id, false));
        }
        let id = self.backend_ids.allocate().ok_or(BpfError::IdsExhausted {
            what: "backend",
            limit: capacity::BACKENDS,
        })?;
        if let Err(e) = self.maps.backends.insert(id, value, 0) {
            self.backend_ids.release(id);
            return Err(map_err(map_names::BACKENDS, "insert a backend")(e));
        }
        self.backends
            .insert(identity, BackendEntry { id, value, refs: 0 });
        self.backend_by_id.insert(id, identity);
        Ok((id, true))
    }

    /// Drops a backend nobody references any more.
    fn delete_backend(&mut self, id: u32) {
        if let Some(identity) = self.backend_by_id.remove(&id) {
            self.backends.remove(&identity);
        }
        match self.maps.backends.remove(&id) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => tracing::warn!(backend_id = id, error = %e, "failed to delete backend"),
        }
        self.backend_ids.release(id);
    }

    fn deref_backend(&mut self, id: u32) {
        let Some(identity) = self.backend_by_id.get(&id).copied() else {
            return;
        };
        let remaining = match self.backends.get_mut(&identity) {
            Some(e) => {
                e.refs = e.refs.saturating_sub(1);
                e.refs
            }
            None => return,
        };
        if remaining == 0 {
            self.delete_backend(id);
        }
    }

    fn release_matured(&mut self, now: Instant) {
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .quarantine
            .drain(..)
            .partition(|(t, _)| now.duration_since(*t) >= REGION_GRACE);
        self.quarantine = waiting;
        for (_, r) in ready {
            if !self.slab.release(r) {
                tracing::warn!(offset = r.offset, len = r.len, "slab region released twice");
            }
        }
    }

    fn allocate_region(&mut self, len: u32) -> Option<Region> {
        self.release_matured(Instant::now());
        if let Some(r) = self.slab.allocate(len) {
            return Some(r);
        }
        let newest = self.quarantine.iter().map(|(t, _)| *t).max()?;
        let wait = REGION_GRACE.saturating_sub(newest.elapsed());
        std::thread::sleep(wait);
        self.release_matured(Instant::now());
        self.slab.allocate(len)
    }

    fn retire_region(&mut self, r: Region) {
        if r.len > 0 {
            self.quarantine.push((Instant::now(), r));
        }
    }

    /// True when `svc` is exactly what the maps already hold for it.
    fn is_unchanged(&self, svc: &DesiredService, keys: &BTreeSet<ServiceKey>) -> bool {
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
                Some(e) if e.value == Self::backend_value(b, cluster) => ids.push(e.id),
                _ => return false,
            }
        }
        if dedup(&ids) != st.backend_ids {
            return false;
        }
        let Some(current) = self.maps.slab.read(Region {
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

    fn validate(svc: &DesiredService, name: &str) -> Result<()> {
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

    /// Programs one service (create or replace). Returns false when nothing changed.
    pub(crate) fn upsert(&mut self, svc: &DesiredService) -> Result<bool> {
        let name = service_name(&svc.id);
        Self::validate(svc, &name)?;
        let keys: BTreeSet<ServiceKey> = svc.frontends.iter().map(service_key).collect();
        if self.is_unchanged(svc, &keys) {
            return Ok(false);
        }
        let existing = self.services.get(&svc.id).cloned();
        for k in &keys {
            if let Some(&owner) = self.frontend_owner.get(k) {
                if Some(owner) != existing.as_ref().map(|s| s.id) {
                    let f = frontend_of(k).map_or_else(|| "?".into(), |f| fmt_frontend(&f));
                    return Err(invalid(
                        &name,
                        format!("frontend {f} already belongs to another service; remove it there first"),
                    ));
                }
            }
        }
        let (sid, new_sid) = match &existing {
            Some(s) => (s.id, false),
            None => (
                self.service_ids.allocate().ok_or(BpfError::IdsExhausted {
                    what: "service",
                    limit: capacity::SERVICE_META,
                })?,
                true,
            ),
        };

        // Step 1: backends.
        let mut created = Vec::new();
        let mut ids = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            match self.ensure_backend(b, &name) {
                Ok((id, was_new)) => {
                    if was_new {
                        created.push(id);
                    }
                    ids.push(id);
                }
                Err(e) => {
                    self.rollback(&created, new_sid.then_some(sid), None);
                    return Err(e);
                }
            }
        }
        let distinct = dedup(&ids);
        let mut buf: Vec<u32> = svc.table.iter().map(|&i| ids[i as usize]).collect();
        let table_size = len_u32(buf.len(), &name)?;
        buf.extend_from_slice(&distinct);
        let needed = len_u32(buf.len(), &name)?;

        // Step 2: the new table in free space.
        let Some(region) = self.allocate_region(needed) else {
            self.rollback(&created, new_sid.then_some(sid), None);
            return Err(BpfError::SlabFull {
                service: name,
                needed,
                largest_free: self.slab.largest_free(),
                capacity: self.slab.capacity(),
            });
        };
        if !self.maps.slab.write(region.offset, &buf) {
            self.rollback(&created, new_sid.then_some(sid), Some(region));
            return Err(invalid(&name, "the allocated slab region is out of bounds"));
        }
        let mut meta = ServiceMeta {
            region_offset: region.offset,
            table_size,
            backend_count: len_u32(distinct.len(), &name)?,
            name_len: len_u32(name.len(), &name)?,
            ..ServiceMeta::default()
        };
        meta.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Err(e) = self.maps.meta.insert(sid, meta, 0) {
            self.rollback(&created, new_sid.then_some(sid), Some(region));
            return Err(map_err(map_names::SERVICE_META, "write a service record")(
                e,
            ));
        }

        // Step 3: flip every frontend to the new table.
        fence(Ordering::SeqCst);
        let value = ServiceValue {
            service_id: sid,
            table_offset: region.offset,
            table_size,
            flags: if table_size == 0 {
                service_flags::REFUSE
            } else {
                0
            },
        };
        let mut flipped = Vec::new();
        for k in &keys {
            if let Err(e) = self.maps.services.insert(*k, value, 0) {
                self.undo_flip(&flipped, existing.as_ref(), sid);
                self.rollback(&created, new_sid.then_some(sid), Some(region));
                return Err(map_err(
                    map_names::SERVICES,
                    format!("program a frontend of {name}"),
                )(e));
            }
            flipped.push(*k);
        }

        // Step 4: retire the old state.
        for id in &distinct {
            if let Some(identity) = self.backend_by_id.get(id).copied() {
                if let Some(e) = self.backends.get_mut(&identity) {
                    e.refs += 1;
                }
            }
        }
        if let Some(old) = &existing {
            for k in old.frontends.difference(&keys) {
                match self.maps.services.remove(k) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        tracing::warn!(service = %name, error = %e, "failed to remove a stale frontend")
                    }
                }
                self.frontend_owner.remove(k);
            }
            self.retire_region(old.region);
            for id in &old.backend_ids {
                self.deref_backend(*id);
            }
        }
        for k in &keys {
            self.frontend_owner.insert(*k, sid);
        }
        tracing::debug!(service = %name, service_id = sid, table_size, offset = region.offset, "programmed service");
        self.services.insert(
            svc.id.clone(),
            ServiceState {
                id: sid,
                name,
                frontends: keys,
                region,
                table_size,
                backend_ids: distinct,
            },
        );
        Ok(true)
    }

    /// Restores frontends already flipped when a later flip failed.
    fn undo_flip(&mut self, flipped: &[ServiceKey], old: Option<&ServiceState>, sid: u32) {
        for k in flipped {
            let restored = match old.filter(|o| o.frontends.contains(k)) {
                Some(o) => self.maps.services.insert(
                    *k,
                    ServiceValue {
                        service_id: sid,
                        table_offset: o.region.offset,
                        table_size: o.table_size,
                        flags: if o.table_size == 0 {
                            service_flags::REFUSE
                        } else {
                            0
                        },
                    },
                    0,
                ),
                None => self.maps.services.remove(k),
            };
            if let Err(e) = restored {
                tracing::error!(error = %e, "failed to restore a frontend after a failed update");
            }
        }
        if let Some(o) = old {
            let mut meta = ServiceMeta {
                region_offset: o.region.offset,
                table_size: o.table_size,
                backend_count: u32::try_from(o.backend_ids.len()).unwrap_or(0),
                name_len: u32::try_from(o.name.len()).unwrap_or(0),
                ..ServiceMeta::default()
            };
            meta.name[..o.name.len()].copy_from_slice(o.name.as_bytes());
            if let Err(e) = self.maps.meta.insert(sid, meta, 0) {
                tracing::error!(error = %e, "failed to restore a service record");
            }
        }
    }

    /// Undoes steps 1–2 of a failed upsert.
    fn rollback(&mut self, created: &[u32], new_sid: Option<u32>, region: Option<Region>) {
        for &id in created {
            let unused = self
                .backend_by_id
                .get(&id)
                .and_then(|i| self.backends.get(i))
                .is_some_and(|e| e.refs == 0);
            if unused {
                self.delete_backend(id);
            }
        }
        if let Some(sid) = new_sid {
            match self.maps.meta.remove(&sid) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    tracing::warn!(service_id = sid, error = %e, "failed to remove a service record")
                }
            }
            self.service_ids.release(sid);
        }
        if let Some(r) = region {
            self.slab.release(r);
        }
    }

    /// Removes a service. Returns false if it was not programmed.
    pub(crate) fn remove(&mut self, id: &ServicePortId) -> Result<bool> {
        let Some(st) = self.services.remove(id) else {
            return Ok(false);
        };
        let mut first_err = None;
        for k in &st.frontends {
            match self.maps.services.remove(k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    first_err.get_or_insert(map_err(
                        map_names::SERVICES,
                        format!("remove a frontend of {}", st.name),
                    )(e));
                }
            }
            self.frontend_owner.remove(k);
        }
        match self.maps.meta.remove(&st.id) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                first_err
                    .get_or_insert(map_err(map_names::SERVICE_META, "remove a service record")(
                        e,
                    ));
            }
        }
        self.retire_region(st.region);
        for bid in &st.backend_ids {
            self.deref_backend(*bid);
        }
        self.service_ids.release(st.id);
        tracing::debug!(service = %st.name, "removed service");
        first_err.map_or(Ok(true), Err)
    }

    /// After a full reconcile: removes services not in `keep`, entries left by an
    /// interrupted run, and backends no service references.
    pub(crate) fn gc(&mut self, keep: &HashSet<ServicePortId>) -> Result<usize> {
        let stale: Vec<ServicePortId> = self
            .services
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        let removed = stale.len();
        for id in stale {
            self.remove(&id)?;
        }
        for k in std::mem::take(&mut self.orphan_frontends) {
            if !self.frontend_owner.contains_key(&k) {
                if let Err(e) = self.maps.services.remove(&k) {
                    if !is_not_found(&e) {
                        tracing::warn!(error = %e, "failed to remove an orphan frontend");
                    }
                }
            }
        }
        for sid in std::mem::take(&mut self.orphan_meta) {
            if let Err(e) = self.maps.meta.remove(&sid) {
                if !is_not_found(&e) {
                    tracing::warn!(error = %e, "failed to remove an orphan service record");
                }
            }
        }
        for r in std::mem::take(&mut self.orphan_regions) {
            self.retire_region(r);
        }
        let unreferenced: Vec<u32> = self
            .backends
            .values()
            .filter(|e| e.refs == 0)
            .map(|e| e.id)
            .collect();
        for id in unreferenced {
            self.delete_backend(id);
        }
        Ok(removed)
    }

    /// Snapshot for `bpf lb list`.
    pub(crate) fn dump(&self, include_tables: bool) -> Result<BpfDump> {
        let mut services: Vec<ServiceDump> = self
            .services
            .values()
            .map(|s| {
                let table = self
                    .maps
                    .slab
                    .read(Region {
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
                address: fmt_addr(identity.ip, identity.port),
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
        let mut counters = BTreeMap::new();
        for (i, name) in stats::NAMES.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(0);
            let sum = self
                .maps
                .stats
                .get(&idx, 0)
                .map(|v| v.iter().sum::<u64>())
                .map_err(map_err(map_names::STATS, "read counters"))?;
            counters.insert((*name).to_owned(), sum);
        }
        Ok(BpfDump {
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
        })
    }
}

fn dedup(ids: &[u32]) -> Vec<u32> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

fn fmt_addr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// `ip:port/TCP`.
pub(crate) fn fmt_frontend(f: &Frontend) -> String {
    format!(
        "{}/{}",
        fmt_addr(f.ip, f.port),
        format!("{:?}", f.protocol).to_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_round_trip_including_empty_port_names() {
        let id = ServicePortId {
            namespace: "default".into(),
            name: "web".into(),
            port_name: String::new(),
        };
        assert_eq!(parse_service_name(&service_name(&id)), Some(id));
        assert_eq!(parse_service_name("no-slashes"), None);
    }

    #[test]
    fn dedup_keeps_first_occurrence_order() {
        assert_eq!(dedup(&[3, 1, 3, 2, 1]), vec![3, 1, 2]);
    }
}
