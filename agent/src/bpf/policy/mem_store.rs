//! In-memory policy maps behind the [`PolicyStore`] seam, with injectable failures and a
//! reference verdict (the kernel's longest-prefix lookups, in Rust), so installs, flips and
//! undo are tested without privileges.

use std::collections::BTreeMap;

use clustermesh_agent_core::policy::datapath::{PolicyCounters, PolicyDatapathError};
use clustermesh_ebpf_common::{
    identity, IpCacheEntry, PolicyKey, PolicyOwnerEntry, POLICY_PREFIX_FULL,
};

use super::{
    keys::{IpKey, RuleEntry},
    ops::PolicyOp,
    store::PolicyStore,
};

/// In-memory maps.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemStore {
    pub(crate) cgroups: BTreeMap<u64, PolicyOwnerEntry>,
    pub(crate) rules: BTreeMap<RuleEntry, u32>,
    pub(crate) ipcache: BTreeMap<IpKey, IpCacheEntry>,
    /// Every operation applied successfully, in order.
    pub(crate) log: Vec<PolicyOp>,
    /// Fails every operation this returns true for.
    pub(crate) fail_when: Option<fn(&PolicyOp) -> bool>,
}

impl MemStore {
    /// Whether the owner of `cgroup` may talk to `peer_identity` on `protocol`/`port` in
    /// `dir`, the way the kernel program decides (`None`: the cgroup is not enforced).
    pub(crate) fn allows(
        &self,
        cgroup: u64,
        dir: u8,
        peer_identity: u32,
        protocol: u8,
        port: u16,
    ) -> Option<bool> {
        let owner = self.cgroups.get(&cgroup)?;
        let matches = |id: u32| {
            let probe = PolicyKey::new(owner.owner, owner.generation, dir, id, protocol, port);
            self.rules.keys().any(|r| {
                r.prefix_len <= POLICY_PREFIX_FULL
                    && RuleEntry::canonical(r.prefix_len, probe) == *r
            })
        };
        Some(matches(peer_identity) || matches(identity::ANY))
    }
}

fn injected(op: &PolicyOp) -> PolicyDatapathError {
    PolicyDatapathError {
        map: "in-memory".into(),
        operation: format!("{op:?}"),
        detail: "injected failure".into(),
    }
}

impl PolicyStore for MemStore {
    fn apply(&mut self, op: &PolicyOp) -> Result<(), PolicyDatapathError> {
        if self.fail_when.is_some_and(|f| f(op)) {
            return Err(injected(op));
        }
        match *op {
            PolicyOp::PutRule(rule) => {
                self.rules.insert(rule, 1);
            }
            PolicyOp::DeleteRule(rule) => {
                self.rules.remove(&rule);
            }
            PolicyOp::PutOwner { cgroup, entry } => {
                self.cgroups.insert(cgroup, entry);
            }
            PolicyOp::DeleteOwner { cgroup } => {
                self.cgroups.remove(&cgroup);
            }
            PolicyOp::PutIpCache { key, value } => {
                self.ipcache.insert(key, value);
            }
            PolicyOp::DeleteIpCache { key } => {
                self.ipcache.remove(&key);
            }
        }
        self.log.push(*op);
        Ok(())
    }

    fn read_owners(&self) -> Result<Vec<(u64, PolicyOwnerEntry)>, PolicyDatapathError> {
        Ok(self.cgroups.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn read_rules(&self) -> Result<Vec<RuleEntry>, PolicyDatapathError> {
        Ok(self.rules.keys().copied().collect())
    }

    fn read_ipcache(&self) -> Result<Vec<(IpKey, IpCacheEntry)>, PolicyDatapathError> {
        Ok(self.ipcache.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError> {
        Ok(PolicyCounters::default())
    }
}
