//! The pinned kernel maps behind the executor's [`MapStore`] seam, through aya.

use std::{
    collections::BTreeMap,
    sync::atomic::{fence, Ordering},
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use clustermesh_ebpf_common::{
    capacity, map_names, stats, BackendValue, ClusterName, LayoutMeta, ServiceKey, ServiceMeta,
    ServiceValue, ABI_VERSION, LAYOUT_MAGIC,
};

use super::{
    error::{BpfError, Result},
    exec::MapStore,
    plan::{MapOp, MapSnapshot, SlabRead},
    slab::Region,
    slab_map::SlabMapping,
};

/// Typed handles on the pinned maps.
pub(crate) struct AyaMaps {
    pub(crate) services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub(crate) backends: HashMap<MapData, u32, BackendValue>,
    pub(crate) meta: HashMap<MapData, u32, ServiceMeta>,
    pub(crate) clusters: Array<MapData, ClusterName>,
    pub(crate) layout: Array<MapData, LayoutMeta>,
    pub(crate) stats: PerCpuArray<MapData, u64>,
    pub(crate) slab: SlabMapping,
}

impl std::fmt::Debug for AyaMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AyaMaps")
            .field("slab", &self.slab)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str, step: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map {
        map,
        step: step.to_owned(),
        source: Box::new(source),
    }
}

/// Treats "no such key" as done: deleting what is not there succeeds.
fn deleted(r: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
    }
}

impl AyaMaps {
    /// Writes the layout record into maps created by this run (pinned maps keep theirs).
    ///
    /// # Errors
    /// When the layout map cannot be read or written.
    pub(crate) fn init_layout(&mut self) -> Result<()> {
        let layout = self
            .layout
            .get(&0, 0)
            .map_err(map_err(map_names::LAYOUT, "read the layout record"))?;
        if layout.magic == 0 {
            let meta = LayoutMeta {
                magic: LAYOUT_MAGIC,
                abi_version: ABI_VERSION,
                slab_capacity: self.slab.entries(),
            };
            self.layout
                .set(0, meta, 0)
                .map_err(map_err(map_names::LAYOUT, "write the layout record"))?;
        }
        Ok(())
    }
}

impl SlabRead for AyaMaps {
    fn read_slab(&self, region: Region) -> Option<Vec<u32>> {
        self.slab.read(region)
    }
}

impl MapStore for AyaMaps {
    fn apply(&mut self, op: &MapOp) -> Result<()> {
        match op {
            MapOp::PutCluster { index, name } => self
                .clusters
                .set(*index, *name, 0)
                .map_err(map_err(map_names::CLUSTERS, "write a cluster name")),
            MapOp::PutBackend { id, value } => self
                .backends
                .insert(*id, *value, 0)
                .map_err(map_err(map_names::BACKENDS, "write a backend")),
            MapOp::DeleteBackend { id } => deleted(self.backends.remove(id))
                .map_err(map_err(map_names::BACKENDS, "delete a backend")),
            MapOp::PutSlab { offset, ids } => {
                if self.slab.write(*offset, ids) {
                    Ok(())
                } else {
                    Err(BpfError::Map {
                        map: map_names::SLAB,
                        step: "write a table".to_owned(),
                        source: Box::new(MapError::OutOfBounds {
                            index: offset
                                .saturating_add(u32::try_from(ids.len()).unwrap_or(u32::MAX)),
                            max_entries: self.slab.entries(),
                        }),
                    })
                }
            }
            MapOp::PutMeta { service_id, meta } => self
                .meta
                .insert(*service_id, *meta, 0)
                .map_err(map_err(map_names::SERVICE_META, "write a service record")),
            MapOp::DeleteMeta { service_id } => deleted(self.meta.remove(service_id))
                .map_err(map_err(map_names::SERVICE_META, "remove a service record")),
            MapOp::PutService { key, value } => {
                // Tables are written through the mmap with plain stores; they must be
                // visible before the map update that lets a program read them.
                fence(Ordering::SeqCst);
                self.services
                    .insert(*key, *value, 0)
                    .map_err(map_err(map_names::SERVICES, "program a frontend"))
            }
            MapOp::DeleteService { key } => deleted(self.services.remove(key))
                .map_err(map_err(map_names::SERVICES, "remove a frontend")),
        }
    }

    fn snapshot(&self) -> Result<MapSnapshot> {
        let mut clusters = Vec::new();
        for idx in 1..capacity::CLUSTERS {
            let c = self
                .clusters
                .get(&idx, 0)
                .map_err(map_err(map_names::CLUSTERS, "read cluster names"))?;
            if c.len != 0 {
                clusters.push((idx, c));
            }
        }
        let mut meta = Vec::new();
        for item in self.meta.iter() {
            meta.push(item.map_err(map_err(map_names::SERVICE_META, "iterate"))?);
        }
        let mut services = Vec::new();
        for item in self.services.iter() {
            services.push(item.map_err(map_err(map_names::SERVICES, "iterate"))?);
        }
        let mut backends = Vec::new();
        for item in self.backends.iter() {
            backends.push(item.map_err(map_err(map_names::BACKENDS, "iterate"))?);
        }
        Ok(MapSnapshot {
            slab_capacity: self.slab.entries(),
            clusters,
            meta,
            services,
            backends,
        })
    }

    fn counters(&self) -> Result<BTreeMap<String, u64>> {
        let mut counters = BTreeMap::new();
        for (i, name) in stats::NAMES.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(0);
            let sum = self
                .stats
                .get(&idx, 0)
                .map(|v| v.iter().sum::<u64>())
                .map_err(map_err(map_names::STATS, "read counters"))?;
            counters.insert((*name).to_owned(), sum);
        }
        Ok(counters)
    }
}
