//! The pinned policy maps behind the [`PolicyStore`] seam, through aya.

use std::path::Path;

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, Map, MapData, MapError, PerCpuArray,
};
use clustermesh_agent_core::policy::datapath::{PolicyCounters, PolicyDatapathError};
use clustermesh_ebpf_common::{
    map_names, pol_stats, IpCacheEntry, IpCacheKey4, IpCacheKey6, PolicyKey, PolicyOwnerEntry,
    POLICY_ALLOW,
};

use super::{
    keys::{IpKey, RuleEntry},
    ops::PolicyOp,
    store::PolicyStore,
};
use crate::bpf::error::{BpfError, Result};

/// Typed handles on the pinned policy maps.
pub(crate) struct AyaPolicyMaps {
    ipcache4: LpmTrie<MapData, IpCacheKey4, IpCacheEntry>,
    ipcache6: LpmTrie<MapData, IpCacheKey6, IpCacheEntry>,
    cgroups: HashMap<MapData, u64, PolicyOwnerEntry>,
    rules: LpmTrie<MapData, PolicyKey, u32>,
    stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for AyaPolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AyaPolicyMaps").finish_non_exhaustive()
    }
}

/// Opens the map pinned as `name` in `pin_dir` as the aya map type `T`.
pub(crate) fn open_pinned<T>(pin_dir: &Path, name: &'static str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_dir.join(name);
    let open = || -> std::result::Result<T, MapError> {
        let data = MapData::from_pin(&path)?;
        T::try_from(Map::from_map_data(data)?)
    };
    open().map_err(|source| BpfError::Map {
        map: name,
        step: format!("open the pinned map {}", path.display()),
        source: Box::new(source),
    })
}

impl AyaPolicyMaps {
    /// Opens the policy maps pinned in `pin_dir` by [`crate::bpf::BpfDatapath::open`].
    ///
    /// # Errors
    /// A map is missing or has another layout.
    pub(crate) fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            ipcache4: open_pinned(pin_dir, map_names::IPCACHE4)?,
            ipcache6: open_pinned(pin_dir, map_names::IPCACHE6)?,
            cgroups: open_pinned(pin_dir, map_names::POL_CGROUPS)?,
            rules: open_pinned(pin_dir, map_names::POLICY)?,
            stats: open_pinned(pin_dir, map_names::POL_STATS)?,
        })
    }
}

fn failed(map: &str, operation: &str, e: &MapError) -> PolicyDatapathError {
    PolicyDatapathError {
        map: map.to_owned(),
        operation: operation.to_owned(),
        detail: e.to_string(),
    }
}

/// Treats "no such key" as done: deleting what is not there succeeds.
fn deleted(r: std::result::Result<(), MapError>) -> std::result::Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
    }
}

impl PolicyStore for AyaPolicyMaps {
    fn apply(&mut self, op: &PolicyOp) -> Result<(), PolicyDatapathError> {
        match *op {
            PolicyOp::PutRule(rule) => self
                .rules
                .insert(&Key::new(rule.prefix_len, rule.key), POLICY_ALLOW, 0)
                .map_err(|e| failed(map_names::POLICY, "write a rule", &e)),
            PolicyOp::DeleteRule(rule) => {
                deleted(self.rules.remove(&Key::new(rule.prefix_len, rule.key)))
                    .map_err(|e| failed(map_names::POLICY, "delete a rule", &e))
            }
            PolicyOp::PutOwner { cgroup, entry } => self
                .cgroups
                .insert(cgroup, entry, 0)
                .map_err(|e| failed(map_names::POL_CGROUPS, "write a cgroup's owner", &e)),
            PolicyOp::DeleteOwner { cgroup } => deleted(self.cgroups.remove(&cgroup))
                .map_err(|e| failed(map_names::POL_CGROUPS, "delete a cgroup", &e)),
            PolicyOp::PutIpCache { key, value } => match key {
                IpKey::V4 { prefix_len, addr } => self
                    .ipcache4
                    .insert(&Key::new(prefix_len, addr), value, 0)
                    .map_err(|e| failed(map_names::IPCACHE4, "write a prefix", &e)),
                IpKey::V6 { prefix_len, addr } => self
                    .ipcache6
                    .insert(&Key::new(prefix_len, addr), value, 0)
                    .map_err(|e| failed(map_names::IPCACHE6, "write a prefix", &e)),
            },
            PolicyOp::DeleteIpCache { key } => match key {
                IpKey::V4 { prefix_len, addr } => {
                    deleted(self.ipcache4.remove(&Key::new(prefix_len, addr)))
                        .map_err(|e| failed(map_names::IPCACHE4, "delete a prefix", &e))
                }
                IpKey::V6 { prefix_len, addr } => {
                    deleted(self.ipcache6.remove(&Key::new(prefix_len, addr)))
                        .map_err(|e| failed(map_names::IPCACHE6, "delete a prefix", &e))
                }
            },
        }
    }

    fn read_owners(&self) -> Result<Vec<(u64, PolicyOwnerEntry)>, PolicyDatapathError> {
        self.cgroups
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| failed(map_names::POL_CGROUPS, "list", &e))
    }

    fn read_rules(&self) -> Result<Vec<RuleEntry>, PolicyDatapathError> {
        self.rules
            .keys()
            .map(|k| k.map(|k| RuleEntry::canonical(k.prefix_len(), k.data())))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| failed(map_names::POLICY, "list", &e))
    }

    fn read_ipcache(&self) -> Result<Vec<(IpKey, IpCacheEntry)>, PolicyDatapathError> {
        let mut entries = Vec::new();
        for item in self.ipcache4.iter() {
            let (k, v) = item.map_err(|e| failed(map_names::IPCACHE4, "list", &e))?;
            let key = IpKey::V4 {
                prefix_len: k.prefix_len(),
                addr: k.data(),
            };
            entries.push((key.canonical(), v));
        }
        for item in self.ipcache6.iter() {
            let (k, v) = item.map_err(|e| failed(map_names::IPCACHE6, "list", &e))?;
            let key = IpKey::V6 {
                prefix_len: k.prefix_len(),
                addr: k.data(),
            };
            entries.push((key.canonical(), v));
        }
        Ok(entries)
    }

    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError> {
        let read = |index: u32| -> Result<u64, PolicyDatapathError> {
            self.stats
                .get(&index, 0)
                .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                .map_err(|e| failed(map_names::POL_STATS, "read counters", &e))
        };
        Ok(PolicyCounters {
            egress_allowed: read(pol_stats::EGRESS_ALLOWED)?,
            egress_denied: read(pol_stats::EGRESS_DENIED)?,
            ingress_allowed: read(pol_stats::INGRESS_ALLOWED)?,
            ingress_denied: read(pol_stats::INGRESS_DENIED)?,
            syncing_passed: read(pol_stats::SYNCING_PASSED)?,
            reply_passed: read(pol_stats::REPLY_PASSED)?,
        })
    }
}
