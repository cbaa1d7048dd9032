//! Map operations on the policy maps, the plans made of them, and the in-memory index of
//! what the kernel holds (kept in step with every operation that succeeded).

use std::collections::{BTreeMap, BTreeSet};

use clustermesh_ebpf_common::{IpCacheEntry, PolicyOwnerEntry};

use super::keys::{IpKey, RuleEntry};

/// One write to a policy map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PolicyOp {
    /// Adds an allow rule to `CM_POLICY`.
    PutRule(RuleEntry),
    /// Deletes an allow rule (missing: success).
    DeleteRule(RuleEntry),
    /// Sets a cgroup's entry in `CM_POL_CGROUPS`.
    PutOwner {
        /// Cgroup id.
        cgroup: u64,
        /// Its owner, generation and flags.
        entry: PolicyOwnerEntry,
    },
    /// Stops enforcing a cgroup (missing: success).
    DeleteOwner {
        /// Cgroup id.
        cgroup: u64,
    },
    /// Sets an IP cache prefix.
    PutIpCache {
        /// The prefix.
        key: IpKey,
        /// What it maps to.
        value: IpCacheEntry,
    },
    /// Deletes an IP cache prefix (missing: success).
    DeleteIpCache {
        /// The prefix.
        key: IpKey,
    },
}

/// A step of a plan and the operation that restores what it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// What to do.
    pub(crate) op: PolicyOp,
    /// How to undo it if a later step fails (`None`: nothing to restore).
    pub(crate) undo: Option<PolicyOp>,
}

/// What an update does: `steps` all or nothing, then `retire` best effort (entries nothing
/// reads any more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Ordered steps, undone in reverse on failure.
    pub(crate) steps: Vec<Step>,
    /// Cleanup after the steps succeeded.
    pub(crate) retire: Vec<PolicyOp>,
}

impl Plan {
    /// True when the plan changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.retire.is_empty()
    }
}

/// What the kernel holds for one policy owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OwnerView {
    /// Cgroups attributed to the owner and their entries.
    pub(crate) cgroups: BTreeMap<u64, PolicyOwnerEntry>,
    /// The owner's rules, every generation.
    pub(crate) rules: BTreeSet<RuleEntry>,
}

impl OwnerView {
    /// The generation the owner's cgroups use: the pod cgroup's entry if present (it is
    /// written with the others), else any cgroup's, else `None` (nothing enforced).
    pub(crate) fn active_generation(&self, owner: u64) -> Option<u8> {
        self.cgroups
            .get(&owner)
            .or_else(|| self.cgroups.values().next())
            .map(|e| e.generation)
    }

    fn is_empty(&self) -> bool {
        self.cgroups.is_empty() && self.rules.is_empty()
    }
}

/// The kernel's policy owners and rules as this agent knows them, rebuilt from the maps
/// on start and updated after every successful operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Index {
    /// By owner cgroup id.
    pub(crate) owners: BTreeMap<u64, OwnerView>,
    /// Cgroup id → owner cgroup id.
    cgroup_owner: BTreeMap<u64, u64>,
}

impl Index {
    /// Builds the index from the maps' content.
    pub(crate) fn from_maps(
        cgroups: impl IntoIterator<Item = (u64, PolicyOwnerEntry)>,
        rules: impl IntoIterator<Item = RuleEntry>,
    ) -> Self {
        let mut index = Self::default();
        for (cgroup, entry) in cgroups {
            index.apply(&PolicyOp::PutOwner { cgroup, entry });
        }
        for rule in rules {
            index.apply(&PolicyOp::PutRule(rule));
        }
        index
    }

    /// The view of `owner`, if the kernel holds anything of it.
    pub(crate) fn owner(&self, owner: u64) -> Option<&OwnerView> {
        self.owners.get(&owner)
    }

    /// The entry of `cgroup`, whoever owns it.
    pub(crate) fn cgroup_entry(&self, cgroup: u64) -> Option<PolicyOwnerEntry> {
        let owner = self.cgroup_owner.get(&cgroup)?;
        self.owners.get(owner)?.cgroups.get(&cgroup).copied()
    }

    /// Records an operation the kernel accepted.
    pub(crate) fn apply(&mut self, op: &PolicyOp) {
        match *op {
            PolicyOp::PutRule(rule) => {
                self.owners
                    .entry(rule.owner())
                    .or_default()
                    .rules
                    .insert(rule);
            }
            PolicyOp::DeleteRule(rule) => {
                if let Some(view) = self.owners.get_mut(&rule.owner()) {
                    view.rules.remove(&rule);
                }
                self.prune(rule.owner());
            }
            PolicyOp::PutOwner { cgroup, entry } => {
                self.forget_cgroup(cgroup);
                self.cgroup_owner.insert(cgroup, entry.owner);
                self.owners
                    .entry(entry.owner)
                    .or_default()
                    .cgroups
                    .insert(cgroup, entry);
            }
            PolicyOp::DeleteOwner { cgroup } => self.forget_cgroup(cgroup),
            PolicyOp::PutIpCache { .. } | PolicyOp::DeleteIpCache { .. } => {}
        }
    }

    fn forget_cgroup(&mut self, cgroup: u64) {
        if let Some(owner) = self.cgroup_owner.remove(&cgroup) {
            if let Some(view) = self.owners.get_mut(&owner) {
                view.cgroups.remove(&cgroup);
            }
            self.prune(owner);
        }
    }

    fn prune(&mut self, owner: u64) {
        if self.owners.get(&owner).is_some_and(OwnerView::is_empty) {
            self.owners.remove(&owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_ebpf_common::PolicyKey;

    fn entry(owner: u64, generation: u8) -> PolicyOwnerEntry {
        PolicyOwnerEntry {
            owner,
            identity: 1,
            generation,
            flags: 0,
            pad: 0,
        }
    }

    #[test]
    fn a_cgroup_moved_to_another_owner_leaves_the_first() {
        let mut index = Index::default();
        index.apply(&PolicyOp::PutOwner {
            cgroup: 5,
            entry: entry(1, 0),
        });
        index.apply(&PolicyOp::PutOwner {
            cgroup: 5,
            entry: entry(2, 1),
        });
        assert!(index.owner(1).is_none(), "owner 1 has nothing left");
        assert_eq!(index.cgroup_entry(5), Some(entry(2, 1)));
        index.apply(&PolicyOp::DeleteOwner { cgroup: 5 });
        assert!(index.owners.is_empty());
    }

    #[test]
    fn rebuilt_index_groups_rules_and_cgroups_by_owner() {
        let rule = RuleEntry {
            prefix_len: 112,
            key: PolicyKey::new(7, 1, 0, 3, 0, 0),
        };
        let index = Index::from_maps([(70, entry(7, 1)), (7, entry(7, 1))], [rule]);
        let view = index.owner(7).unwrap();
        assert_eq!(view.cgroups.len(), 2);
        assert_eq!(view.active_generation(7), Some(1));
        assert!(view.rules.contains(&rule));
    }
}
