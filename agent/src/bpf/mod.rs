//! The eBPF datapath: socket-level load balancing enforced by cgroup `sock_addr` programs.
//!
//! [`BpfDatapath`] loads the programs built from `ebpf/programs` (embedded in this binary),
//! pins their maps and links under a pin directory and programs services into the maps:
//! a services map (frontend → table offset/size), a backends map, one Maglev slab array
//! holding every table, and an LRU reverse-NAT map the programs fill themselves.
//!
//! What to write is decided by a pure planner (`plan`: ids, slab regions, backend
//! refcounts → ordered map operations with their undo); `exec` applies the operations to a
//! `MapStore` (the aya maps of `aya_maps`, or in-memory maps in unit tests) and `state`
//! ties the two together.
//!
//! Everything is pinned, so traffic keeps being balanced while the agent restarts; a new
//! agent reuses the pinned maps and reconciles them with the desired state instead of
//! clearing them. [`BpfDatapath::cleanup`] is the only way the programs are detached.
//!
//! Policy ([`BpfPolicy`], from [`BpfDatapath::policy`]) shares the object, the pins and the
//! cgroup: egress verdicts in the same `sock_addr` programs, ingress in a `cgroup_skb`
//! program.
//!
//! Kernel requirements: cgroup v2, bpf links for cgroups (5.7), `bpf_set_retval` in
//! sock_addr programs (5.18, for `ECONNREFUSED`), mmapable arrays (5.5),
//! `bpf_get_current_cgroup_id` in sock_addr programs (6.1, for policy), ring buffers (5.8).

mod aya_maps;
mod config;
mod encode;
mod error;
mod exec;
mod ids;
mod layout;
mod links;
#[cfg(test)]
mod mem_maps;
mod plan;
mod policy;
mod slab;
mod slab_map;
mod state;
mod system;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use aya::{
    maps::{Array, HashMap, Map, PerCpuArray},
    EbpfLoader,
};
use clustermesh_ebpf_common::{map_names, slab_elements, SLAB_CHUNK};

pub use config::{BpfConfig, DEFAULT_BPFFS, DEFAULT_PIN_DIR};
pub use encode::{addr_words, service_key, words_addr};
pub use error::{BpfError, Result};
pub use ids::IdAllocator;
pub use links::{links_present, PROGRAMS};
pub use policy::{BpfPolicy, DeniedFlow};
pub use slab::{Region, SlabAllocator};
pub use system::{cgroup2_mount, ensure_pin_dir, mount_bpffs, resolve_cgroup, BpffsMount};

use aya_maps::AyaMaps;
use clustermesh_agent_core::datapath::{
    ApplyReport, Datapath, DatapathError, DesiredChanges, DesiredService,
};
use clustermesh_api::admin::BpfDump;
use clustermesh_api::model::ServicePortId;
use state::State;

/// The eBPF object built by `build.rs` (empty when the build was skipped).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clustermesh-lb"));

/// What [`BpfDatapath::reconcile`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Services written (new or changed).
    pub programmed: usize,
    /// Services already up to date.
    pub unchanged: usize,
    /// Services removed because they are no longer desired.
    pub removed: usize,
    /// Services that failed (their previous state, if any, stays in force).
    pub failed: usize,
}

/// The eBPF implementation of [`Datapath`].
#[derive(Debug)]
pub struct BpfDatapath {
    config: BpfConfig,
    cgroup: PathBuf,
    reused: bool,
    state: Mutex<State<AyaMaps>>,
}

fn load_error(pin_dir: &Path, e: aya::EbpfError) -> BpfError {
    if let Some(source) = error::permission_denied(&e) {
        return BpfError::MissingPrivileges {
            step: "create or open the eBPF maps".into(),
            source,
        };
    }
    BpfError::Load {
        pin_dir: pin_dir.to_path_buf(),
        source: Box::new(e),
    }
}

fn take_map(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or_else(|| BpfError::Map {
        map: name,
        step: "find it in the eBPF object".into(),
        source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }),
    })
}

fn typed<T>(name: &'static str, r: std::result::Result<T, aya::maps::MapError>) -> Result<T> {
    r.map_err(|source| BpfError::Map {
        map: name,
        step: "open it with the expected layout".into(),
        source: Box::new(source),
    })
}

impl BpfDatapath {
    /// Loads (or reuses) the pinned maps, attaches the programs to the configured cgroup and
    /// rebuilds the programmed state from the maps. Nothing is flushed: services programmed
    /// by a previous run keep working until [`BpfDatapath::reconcile`] says otherwise.
    ///
    /// # Errors
    /// Missing cgroup, bpffs unavailable, missing privileges, incompatible pinned maps, or
    /// any load/attach failure, each naming the cause and the fix.
    pub fn open(config: BpfConfig) -> Result<Self> {
        if OBJECT.is_empty() {
            return Err(BpfError::ObjectMissing);
        }
        let cgroup = system::resolve_cgroup(config.cgroup())?;
        system::ensure_pin_dir(config.pin_dir(), config.bpffs_mount())?;
        let pinned = layout::check_pinned(config.pin_dir())?;
        let elements = pinned
            .slab_capacity
            .unwrap_or_else(|| slab_elements(config.slab_entries().max(1)));
        let slab_entries = elements.saturating_mul(SLAB_CHUNK as u32);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(config.pin_dir())
            .map_max_entries(map_names::SLAB, elements)
            .load(OBJECT)
            .map_err(|e| load_error(config.pin_dir(), e))?;

        let slab_map = match take_map(&mut ebpf, map_names::SLAB)? {
            Map::Array(data) => data,
            _ => {
                return Err(BpfError::Map {
                    map: map_names::SLAB,
                    step: "open it as an array".into(),
                    source: Box::new(aya::maps::MapError::InvalidName {
                        name: map_names::SLAB.into(),
                    }),
                })
            }
        };
        let slab = slab_map_mapping(&slab_map, slab_entries)?;
        let mut maps = AyaMaps {
            services: typed(
                map_names::SERVICES,
                HashMap::try_from(take_map(&mut ebpf, map_names::SERVICES)?),
            )?,
            backends: typed(
                map_names::BACKENDS,
                HashMap::try_from(take_map(&mut ebpf, map_names::BACKENDS)?),
            )?,
            meta: typed(
                map_names::SERVICE_META,
                HashMap::try_from(take_map(&mut ebpf, map_names::SERVICE_META)?),
            )?,
            clusters: typed(
                map_names::CLUSTERS,
                Array::try_from(take_map(&mut ebpf, map_names::CLUSTERS)?),
            )?,
            layout: typed(
                map_names::LAYOUT,
                Array::try_from(take_map(&mut ebpf, map_names::LAYOUT)?),
            )?,
            stats: typed(
                map_names::STATS,
                PerCpuArray::try_from(take_map(&mut ebpf, map_names::STATS)?),
            )?,
            slab,
        };
        // Rebuild before attaching: a corrupt pin directory fails here without touching
        // the programs that are currently attached.
        maps.init_layout()?;
        let state = State::rebuild(maps)?;
        links::attach_all(&mut ebpf, &cgroup, &config.links_dir())?;
        tracing::info!(
            pin_dir = %config.pin_dir().display(),
            cgroup = %cgroup.display(),
            reused = pinned.reused,
            slab_entries,
            "eBPF datapath ready"
        );
        Ok(Self {
            config,
            cgroup,
            reused: pinned.reused,
            state: Mutex::new(state),
        })
    }

    /// The cgroup the programs are attached to.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The configuration in use.
    #[must_use]
    pub fn config(&self) -> &BpfConfig {
        &self.config
    }

    /// The policy half of the datapath on the same pinned maps: the IP cache, policy
    /// owners and rules the programs attached by [`Self::open`] enforce. Maps pinned by an
    /// earlier run keep their content (and their verdicts) until the returned
    /// [`BpfPolicy`] changes them.
    ///
    /// # Errors
    /// A policy map cannot be opened or read.
    pub fn policy(&self) -> Result<BpfPolicy> {
        BpfPolicy::open(self.config.pin_dir())
    }

    /// True when this datapath reused maps pinned by an earlier run.
    #[must_use]
    pub fn reused_pinned_maps(&self) -> bool {
        self.reused
    }

    fn lock(&self) -> MutexGuard<'_, State<AyaMaps>> {
        // A panic while holding the lock cannot leave the maps half-programmed (every
        // service update is ordered so the old state stays valid), so keep going.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of services currently programmed.
    #[must_use]
    pub fn service_count(&self) -> usize {
        self.lock().service_count()
    }

    /// Makes the maps hold exactly `desired`: unchanged services are not touched, changed
    /// ones are replaced atomically, the rest are removed, and leftovers of an interrupted
    /// run are cleaned. Call it once with the full state after start (and after a resync).
    ///
    /// # Errors
    /// The first per-service failure (after trying every service). Services that failed
    /// keep their previous state.
    pub fn reconcile(&self, desired: &[DesiredService]) -> Result<ReconcileReport> {
        let (report, failed) = self.reconcile_each(desired);
        failed
            .into_iter()
            .next()
            .map_or(Ok(report), |(_, e)| Err(e))
    }

    /// [`Self::reconcile`] with every failure, by service.
    fn reconcile_each(
        &self,
        desired: &[DesiredService],
    ) -> (ReconcileReport, Vec<(ServicePortId, BpfError)>) {
        let mut st = self.lock();
        let mut report = ReconcileReport::default();
        let mut failed = Vec::new();
        for svc in desired {
            match st.upsert(svc) {
                Ok(true) => report.programmed += 1,
                Ok(false) => report.unchanged += 1,
                Err(e) => {
                    tracing::warn!(service = %plan::service_name(&svc.id), error = %e, "failed to program service");
                    failed.push((svc.id.clone(), e));
                }
            }
        }
        let keep: HashSet<_> = desired.iter().map(|s| s.id.clone()).collect();
        let gc = st.gc(&keep);
        report.removed = gc.removed;
        failed.extend(gc.failed);
        report.failed = failed.len();
        tracing::info!(
            programmed = report.programmed,
            unchanged = report.unchanged,
            removed = report.removed,
            failed = report.failed,
            "reconciled eBPF datapath"
        );
        (report, failed)
    }

    /// Applies a batch of incremental changes (removals first, then upserts). Every
    /// service is attempted; the first failure is returned.
    ///
    /// # Errors
    /// The first per-service failure; services that failed keep their previous state.
    pub fn apply_changes(&self, changes: &DesiredChanges) -> Result<usize> {
        let (changed, failed) = self.apply_each(changes);
        failed
            .into_iter()
            .next()
            .map_or(Ok(changed), |(_, e)| Err(e))
    }

    /// [`Self::apply_changes`] with every failure, by service. Returns the number of
    /// services changed and the failures.
    fn apply_each(&self, changes: &DesiredChanges) -> (usize, Vec<(ServicePortId, BpfError)>) {
        let mut st = self.lock();
        let mut failed = Vec::new();
        let mut changed = 0;
        for id in &changes.removals {
            match st.remove(id) {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(service = %plan::service_name(id), error = %e, "failed to remove service");
                    failed.push((id.clone(), e));
                }
            }
        }
        for svc in &changes.upserts {
            match st.upsert(svc) {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(service = %plan::service_name(&svc.id), error = %e, "failed to program service");
                    failed.push((svc.id.clone(), e));
                }
            }
        }
        (changed, failed)
    }

    /// Snapshot of services, backends, slab usage and counters (tables only on request).
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn dump(&self, include_tables: bool) -> Result<BpfDump> {
        let mut d = self.lock().dump(include_tables)?;
        d.pin_dir = self.config.pin_dir().display().to_string();
        d.cgroup = self.cgroup.display().to_string();
        Ok(d)
    }

    /// Detaches the programs and unpins every map of this datapath (`--cleanup`).
    ///
    /// # Errors
    /// When a pin cannot be removed.
    pub fn cleanup(self) -> Result<()> {
        let config = self.config.clone();
        drop(self);
        Self::cleanup_pins(&config)
    }

    /// Detaches and unpins everything under the configured pin directory without loading
    /// anything (works even when the pinned maps are incompatible).
    ///
    /// # Errors
    /// When a pin cannot be removed.
    pub fn cleanup_pins(config: &BpfConfig) -> Result<()> {
        let detached = links::detach_all(&config.links_dir())?;
        let mut unpinned = 0;
        for path in layout::pinned_paths(config.pin_dir()) {
            match std::fs::remove_file(&path) {
                Ok(()) => unpinned += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BpfError::Io {
                        step: "unpin",
                        path,
                        source,
                    })
                }
            }
        }
        match std::fs::remove_dir(config.pin_dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                pin_dir = %config.pin_dir().display(),
                error = %e,
                "pin directory not removed (it holds other files)"
            ),
        }
        tracing::info!(
            pin_dir = %config.pin_dir().display(),
            links = detached.len(),
            maps = unpinned,
            "eBPF datapath cleaned up"
        );
        Ok(())
    }
}

fn slab_map_mapping(data: &aya::maps::MapData, entries: u32) -> Result<slab_map::SlabMapping> {
    let fd = data.fd();
    slab_map::SlabMapping::new(fd, entries).map_err(|source| BpfError::Io {
        step: "mmap the Maglev slab",
        path: PathBuf::from(map_names::SLAB),
        source,
    })
}

/// Per-service reports for the control plane: a service that failed keeps its previous
/// state and is named in the report, so only it is retried.
impl Datapath for BpfDatapath {
    fn apply(&self, changes: &DesiredChanges) -> ApplyReport {
        let (_, failed) = self.apply_each(changes);
        let attempted = changes.removals.len() + changes.upserts.len();
        report(attempted.saturating_sub(failed.len()), failed)
    }

    fn reconcile(&self, desired: &[DesiredService]) -> ApplyReport {
        let (summary, failed) = self.reconcile_each(desired);
        report(
            summary.programmed + summary.unchanged + summary.removed,
            failed,
        )
    }
}

fn report(applied: usize, failed: Vec<(ServicePortId, BpfError)>) -> ApplyReport {
    let failed = failed
        .into_iter()
        .map(|(id, e)| {
            let error = DatapathError {
                service: plan::service_name(&id),
                reason: e.to_string(),
            };
            (id, error)
        })
        .collect();
    ApplyReport { applied, failed }
}
