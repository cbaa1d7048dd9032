//! In-memory maps behind the executor's [`MapStore`] seam, with injectable failures, so
//! plan + execute is tested end to end without privileges.

use std::collections::BTreeMap;

use clustermesh_ebpf_common::{
    stats, BackendValue, ClusterName, ServiceKey, ServiceMeta, ServiceValue,
};

use super::{
    error::{BpfError, Result},
    exec::MapStore,
    plan::{MapOp, MapSnapshot, SlabRead},
    slab::Region,
};

/// What the maps hold, comparable as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MemContent {
    pub(crate) services: BTreeMap<ServiceKey, ServiceValue>,
    pub(crate) backends: BTreeMap<u32, BackendValue>,
    pub(crate) meta: BTreeMap<u32, ServiceMeta>,
    pub(crate) clusters: BTreeMap<u32, ClusterName>,
    pub(crate) slab: Vec<u32>,
}

/// In-memory maps.
#[derive(Debug, Clone)]
pub(crate) struct MemMaps {
    pub(crate) content: MemContent,
    /// Every operation applied successfully, in order.
    pub(crate) log: Vec<MapOp>,
    /// Lets this many more operations succeed, then fails the next one (once).
    pub(crate) fail_after: Option<usize>,
    /// Fails every operation this returns true for.
    pub(crate) fail_when: Option<fn(&MapOp) -> bool>,
}

impl MemMaps {
    /// Empty maps with a slab of `slab_entries`.
    pub(crate) fn new(slab_entries: u32) -> Self {
        Self {
            content: MemContent {
                slab: vec![0; slab_entries as usize],
                ..MemContent::default()
            },
            log: Vec::new(),
            fail_after: None,
            fail_when: None,
        }
    }

    fn injected(op: &MapOp) -> BpfError {
        BpfError::Map {
            map: "in-memory",
            step: format!("apply {op:?}"),
            source: Box::new(aya::maps::MapError::IoError(std::io::Error::other(
                "injected failure",
            ))),
        }
    }
}

impl SlabRead for MemMaps {
    fn read_slab(&self, region: Region) -> Option<Vec<u32>> {
        let start = region.offset as usize;
        let end = usize::try_from(region.end()).ok()?;
        self.content.slab.get(start..end).map(<[u32]>::to_vec)
    }
}

impl MapStore for MemMaps {
    fn apply(&mut self, op: &MapOp) -> Result<()> {
        if let Some(n) = self.fail_after {
            if n == 0 {
                self.fail_after = None;
                return Err(Self::injected(op));
            }
            self.fail_after = Some(n - 1);
        }
        if self.fail_when.is_some_and(|f| f(op)) {
            return Err(Self::injected(op));
        }
        let c = &mut self.content;
        match op {
            MapOp::PutCluster { index, name } => {
                if name.len == 0 {
                    c.clusters.remove(index);
                } else {
                    c.clusters.insert(*index, *name);
                }
            }
            MapOp::PutBackend { id, value } => {
                c.backends.insert(*id, *value);
            }
            MapOp::DeleteBackend { id } => {
                c.backends.remove(id);
            }
            MapOp::PutSlab { offset, ids } => {
                let start = *offset as usize;
                let Some(dst) = c.slab.get_mut(start..start + ids.len()) else {
                    return Err(Self::injected(op));
                };
                dst.copy_from_slice(ids);
            }
            MapOp::PutMeta { service_id, meta } => {
                c.meta.insert(*service_id, *meta);
            }
            MapOp::DeleteMeta { service_id } => {
                c.meta.remove(service_id);
            }
            MapOp::PutService { key, value } => {
                c.services.insert(*key, *value);
            }
            MapOp::DeleteService { key } => {
                c.services.remove(key);
            }
        }
        self.log.push(op.clone());
        Ok(())
    }

    fn snapshot(&self) -> Result<MapSnapshot> {
        let c = &self.content;
        Ok(MapSnapshot {
            slab_capacity: u32::try_from(c.slab.len()).unwrap_or(u32::MAX),
            clusters: c.clusters.iter().map(|(k, v)| (*k, *v)).collect(),
            meta: c.meta.iter().map(|(k, v)| (*k, *v)).collect(),
            services: c.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: c.backends.iter().map(|(k, v)| (*k, *v)).collect(),
        })
    }

    fn counters(&self) -> Result<BTreeMap<String, u64>> {
        Ok(stats::NAMES.iter().map(|n| ((*n).to_owned(), 0)).collect())
    }
}
