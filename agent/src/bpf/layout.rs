//! Compatibility check of maps pinned by an earlier run.
//!
//! aya reuses a pinned map by name without comparing its shape, so a map left by another
//! clustermesh version would be silently misread. Before loading, every pinned map is
//! compared with the layout this agent was built with; any difference is a clear error
//! telling the operator to clean up, instead of a corrupted datapath.

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData, MapInfo, MapType};
use clustermesh_ebpf_common::{
    capacity, map_names, BackendValue, ClusterName, IpCacheEntry, IpCacheKey4, IpCacheKey6,
    LayoutMeta, PolicyKey, PolicyOwnerEntry, RevNatKey, RevNatValue, ServiceKey, ServiceMeta,
    ServiceValue, SlabChunk, UdpPeerKey, ABI_VERSION, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC,
    LAYOUT_MAGIC,
};

use super::error::{BpfError, Result};

/// Expected shape of one map.
#[derive(Debug, Clone, Copy)]
struct Spec {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    /// `None`: any size (the slab is sized by configuration).
    max_entries: Option<u32>,
    flags: u32,
}

fn size<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
}

/// Size of an LPM trie key: the 4-byte prefix length, then the data.
fn lpm_key<T>() -> u32 {
    4 + size::<T>()
}

fn specs() -> [Spec; 15] {
    [
        Spec {
            name: map_names::SERVICES,
            map_type: MapType::Hash,
            key_size: size::<ServiceKey>(),
            value_size: size::<ServiceValue>(),
            max_entries: Some(capacity::SERVICES),
            flags: BPF_F_NO_PREALLOC,
        },
        Spec {
            name: map_names::BACKENDS,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: size::<BackendValue>(),
            max_entries: Some(capacity::BACKENDS),
            flags: BPF_F_NO_PREALLOC,
        },
        Spec {
            name: map_names::SLAB,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size::<SlabChunk>(),
            max_entries: None,
            flags: BPF_F_MMAPABLE,
        },
        Spec {
            name: map_names::REVNAT,
            map_type: MapType::LruHash,
            key_size: size::<RevNatKey>(),
            value_size: size::<RevNatValue>(),
            max_entries: Some(capacity::REVNAT),
            flags: 0,
        },
        Spec {
            name: map_names::SERVICE_META,
            map_type: MapType::Hash,
            key_size: 4,
            value_size: size::<ServiceMeta>(),
            max_entries: Some(capacity::SERVICE_META),
            flags: BPF_F_NO_PREALLOC,
        },
        Spec {
            name: map_names::CLUSTERS,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size::<ClusterName>(),
            max_entries: Some(capacity::CLUSTERS),
            flags: 0,
        },
        Spec {
            name: map_names::LAYOUT,
            map_type: MapType::Array,
            key_size: 4,
            value_size: size::<LayoutMeta>(),
            max_entries: Some(1),
            flags: 0,
        },
        Spec {
            name: map_names::STATS,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: Some(capacity::STATS),
            flags: 0,
        },
        Spec {
            name: map_names::IPCACHE4,
            map_type: MapType::LpmTrie,
            key_size: lpm_key::<IpCacheKey4>(),
            value_size: size::<IpCacheEntry>(),
            max_entries: Some(capacity::IPCACHE4),
            flags: BPF_F_NO_PREALLOC,
        },
        Spec {
            name: map_names::IPCACHE6,
            map_type: MapType::LpmTrie,
            key_size: lpm_key::<IpCacheKey6>(),
            value_size: size::<IpCacheEntry>(),
            max_entries: Some(capacity::IPCACHE6),
            flags: BPF_F_NO_PREALLOC,
        },
        Spec {
            name: map_names::POL_CGROUPS,
            map_type: MapType::Hash,
            key_size: 8,
            value_size: size::<PolicyOwnerEntry>(),
            max_entries: Some(capacity::POL_CGROUPS),
            flags: BPF_F_NO_PREALLOC,
        },
        Spec {
            name: map_names::POLICY,
            map_type: MapType::LpmTrie,
            key_size: lpm_key::<PolicyKey>(),
            value_size: 4,
            max_entries: Some(capacity::POLICY),
            flags: BPF_F_NO_PREALLOC,
        },
        Spec {
            name: map_names::POL_STATS,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: Some(capacity::POL_STATS),
            flags: 0,
        },
        Spec {
            name: map_names::POL_UDP,
            map_type: MapType::LruHash,
            key_size: size::<UdpPeerKey>(),
            value_size: 1,
            max_entries: Some(capacity::POL_UDP),
            flags: 0,
        },
        Spec {
            name: map_names::POL_EVENTS,
            map_type: MapType::RingBuf,
            key_size: 0,
            value_size: 0,
            max_entries: Some(capacity::POL_EVENTS),
            flags: 0,
        },
    ]
}

/// What the check found in the pin directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PinnedState {
    /// Elements ([`SlabChunk`]s) of an already pinned slab (it keeps its size across
    /// restarts).
    pub slab_capacity: Option<u32>,
    /// True when at least one map was already pinned (a restart, not a first start).
    pub reused: bool,
}

/// Compares every pinned map in `pin_dir` with this build's layout.
///
/// # Errors
/// [`BpfError::IncompatiblePinnedMap`] naming the first mismatch.
pub(crate) fn check_pinned(pin_dir: &Path) -> Result<PinnedState> {
    let mut state = PinnedState {
        slab_capacity: None,
        reused: false,
    };
    for spec in specs() {
        let path = pin_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        state.reused = true;
        let incompatible = |found: String, expected: String| BpfError::IncompatiblePinnedMap {
            path: path.clone(),
            pin_dir: pin_dir.to_path_buf(),
            found,
            expected,
        };
        let info = MapInfo::from_pin(&path).map_err(|e| {
            incompatible(format!("not a readable BPF map ({e})"), "a BPF map".into())
        })?;
        let map_type = info.map_type().map_err(|e| {
            incompatible(
                format!("unknown map type ({e})"),
                format!("{:?}", spec.map_type),
            )
        })?;
        let found = (
            map_type,
            info.key_size(),
            info.value_size(),
            info.map_flags(),
        );
        let expected = (spec.map_type, spec.key_size, spec.value_size, spec.flags);
        if found != expected {
            return Err(incompatible(
                describe(found.0, found.1, found.2, found.3, info.max_entries()),
                describe(
                    expected.0,
                    expected.1,
                    expected.2,
                    expected.3,
                    spec.max_entries.unwrap_or(info.max_entries()),
                ),
            ));
        }
        match spec.max_entries {
            Some(max) if max != info.max_entries() => {
                return Err(incompatible(
                    format!("{} entries", info.max_entries()),
                    format!("{max} entries"),
                ));
            }
            Some(_) => {}
            None => state.slab_capacity = Some(info.max_entries()),
        }
    }
    check_layout_version(pin_dir)?;
    Ok(state)
}

fn describe(t: MapType, key: u32, value: u32, flags: u32, max: u32) -> String {
    format!("{t:?} key {key}B value {value}B flags {flags:#x} max {max}")
}

fn check_layout_version(pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join(map_names::LAYOUT);
    if !path.exists() {
        return Ok(());
    }
    let read = || -> std::result::Result<LayoutMeta, aya::maps::MapError> {
        let data = MapData::from_pin(&path)?;
        let array: Array<MapData, LayoutMeta> = Array::try_from(Map::Array(data))?;
        array.get(&0, 0)
    };
    let meta = read().map_err(|e| BpfError::IncompatiblePinnedMap {
        path: path.clone(),
        pin_dir: pin_dir.to_path_buf(),
        found: format!("an unreadable layout record ({e})"),
        expected: format!("layout version {ABI_VERSION}"),
    })?;
    if meta.magic == 0 {
        return Ok(());
    }
    if meta.magic != LAYOUT_MAGIC || meta.abi_version != ABI_VERSION {
        return Err(BpfError::IncompatiblePinnedMap {
            path,
            pin_dir: pin_dir.to_path_buf(),
            found: format!(
                "layout magic {:#x} version {}",
                meta.magic, meta.abi_version
            ),
            expected: format!("layout version {ABI_VERSION}"),
        });
    }
    Ok(())
}

/// Every path the datapath pins under `pin_dir` (maps, then the links directory).
pub(crate) fn pinned_paths(pin_dir: &Path) -> Vec<PathBuf> {
    specs().iter().map(|s| pin_dir.join(s.name)).collect()
}
