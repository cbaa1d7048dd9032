//! The pure planner of policy owner updates: from what the kernel holds (the [`Index`])
//! and what is desired, the ordered map operations with their undo.
//!
//! An install writes the new rules under the owner's inactive generation, then switches
//! every cgroup of the owner to that generation (one map update each: a packet sees the
//! old rule set or the new one), then retires the old generation. Rules left in the
//! inactive generation by an earlier interrupted or partly failed update are deleted
//! before the switch, so they can never become active.

use std::collections::BTreeSet;

use clustermesh_agent_core::policy::datapath::{EndpointRules, PolicyOwner};

use super::{
    keys::{owner_entry, rule_entries},
    ops::{Index, Plan, PolicyOp, Step},
};

/// The operation that puts `cgroup` back the way `index` has it.
fn restore_cgroup(index: &Index, cgroup: u64) -> PolicyOp {
    match index.cgroup_entry(cgroup) {
        Some(entry) => PolicyOp::PutOwner { cgroup, entry },
        None => PolicyOp::DeleteOwner { cgroup },
    }
}

/// Plans installing `rules` for `owner`. An empty plan means the kernel already holds
/// exactly this.
pub(crate) fn plan_install(index: &Index, owner: &PolicyOwner, rules: &EndpointRules) -> Plan {
    let view = index.owner(owner.owner);
    let cgroups: BTreeSet<u64> = owner
        .cgroups
        .iter()
        .copied()
        .chain(std::iter::once(owner.owner))
        .collect();
    let active = view.and_then(|v| v.active_generation(owner.owner));

    if let (Some(view), Some(active)) = (view, active) {
        let entry = owner_entry(owner, active, rules);
        let same_cgroups = view.cgroups.len() == cgroups.len()
            && cgroups.iter().all(|c| view.cgroups.get(c) == Some(&entry));
        if same_cgroups && view.rules == rule_entries(owner.owner, active, rules) {
            return Plan::default();
        }
    }

    let target = active.map_or(0, |g| g ^ 1);
    let desired = rule_entries(owner.owner, target, rules);
    let entry = owner_entry(owner, target, rules);
    let mut plan = Plan::default();
    let existing = view.map(|v| &v.rules);

    // Leftovers in the target generation must not become active with the switch.
    for stale in existing
        .into_iter()
        .flatten()
        .filter(|r| r.generation() == target && !desired.contains(r))
    {
        plan.steps.push(Step {
            op: PolicyOp::DeleteRule(*stale),
            undo: None,
        });
    }
    for rule in &desired {
        if existing.is_some_and(|e| e.contains(rule)) {
            continue;
        }
        plan.steps.push(Step {
            op: PolicyOp::PutRule(*rule),
            undo: Some(PolicyOp::DeleteRule(*rule)),
        });
    }
    // The switch: the pod cgroup first (it decides the active generation after a restart).
    let ordered =
        std::iter::once(owner.owner).chain(cgroups.iter().copied().filter(|c| *c != owner.owner));
    for cgroup in ordered {
        plan.steps.push(Step {
            op: PolicyOp::PutOwner { cgroup, entry },
            undo: Some(restore_cgroup(index, cgroup)),
        });
    }
    // Cgroups no longer part of the owner stop being enforced with the same update.
    for cgroup in view
        .into_iter()
        .flat_map(|v| v.cgroups.keys())
        .filter(|c| !cgroups.contains(c))
    {
        plan.steps.push(Step {
            op: PolicyOp::DeleteOwner { cgroup: *cgroup },
            undo: Some(restore_cgroup(index, *cgroup)),
        });
    }
    plan.retire = existing
        .into_iter()
        .flatten()
        .filter(|r| r.generation() != target)
        .map(|r| PolicyOp::DeleteRule(*r))
        .collect();
    plan
}

/// Plans removing `owner`: its cgroups stop being enforced first, then its rules go.
/// Cgroups listed for the owner that the kernel attributes to another owner are left
/// alone.
pub(crate) fn plan_remove(index: &Index, owner: u64, listed: &[u64]) -> Vec<PolicyOp> {
    let view = index.owner(owner);
    let mut cgroups: BTreeSet<u64> = view
        .map(|v| v.cgroups.keys().copied().collect())
        .unwrap_or_default();
    cgroups.extend(
        listed
            .iter()
            .copied()
            .chain(std::iter::once(owner))
            .filter(|c| index.cgroup_entry(*c).is_none_or(|e| e.owner == owner)),
    );
    let deletes = cgroups
        .into_iter()
        .map(|cgroup| PolicyOp::DeleteOwner { cgroup });
    let rules = view
        .into_iter()
        .flat_map(|v| v.rules.iter())
        .map(|r| PolicyOp::DeleteRule(*r));
    deletes.chain(rules).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::policy::keys::RuleEntry;
    use clustermesh_agent_core::policy::datapath::RuleKey;
    use clustermesh_ebpf_common::owner_flags;

    fn owner(cgroups: &[u64]) -> PolicyOwner {
        PolicyOwner {
            owner: 100,
            cgroups: cgroups.to_vec(),
            identity: 5000,
        }
    }

    fn egress(identities: &[u32]) -> EndpointRules {
        EndpointRules {
            ingress: None,
            egress: Some(
                identities
                    .iter()
                    .map(|&identity| RuleKey {
                        identity,
                        protocol: 6,
                        port: 80,
                        port_bits: 16,
                    })
                    .collect(),
            ),
        }
    }

    /// Applies a plan to an index as if every operation succeeded.
    fn run(index: &mut Index, plan: &Plan) {
        for s in &plan.steps {
            index.apply(&s.op);
        }
        for op in &plan.retire {
            index.apply(op);
        }
    }

    fn install(index: &mut Index, owner: &PolicyOwner, rules: &EndpointRules) {
        let plan = plan_install(index, owner, rules);
        run(index, &plan);
    }

    fn generations(index: &Index) -> BTreeSet<u8> {
        index
            .owner(100)
            .map(|v| v.rules.iter().map(RuleEntry::generation).collect())
            .unwrap_or_default()
    }

    #[test]
    fn first_install_writes_rules_before_switching_cgroups() {
        let index = Index::default();
        let plan = plan_install(&index, &owner(&[100, 101]), &egress(&[7, 8]));
        let kinds: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| match s.op {
                PolicyOp::PutRule(_) => "rule",
                PolicyOp::PutOwner { .. } => "owner",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["rule", "rule", "owner", "owner"]);
        assert!(plan.retire.is_empty());
        // Undo of a fresh cgroup is its deletion.
        assert_eq!(
            plan.steps[2].undo,
            Some(PolicyOp::DeleteOwner { cgroup: 100 })
        );
        let PolicyOp::PutOwner { entry, .. } = plan.steps[2].op else {
            panic!("owner entry expected");
        };
        assert_eq!(entry.generation, 0);
        assert_eq!(entry.flags, owner_flags::EGRESS_ISOLATED);
    }

    #[test]
    fn reinstall_flips_generation_and_retires_the_old_one() {
        let mut index = Index::default();
        install(&mut index, &owner(&[100]), &egress(&[7]));
        assert_eq!(generations(&index), BTreeSet::from([0]));
        let plan = plan_install(&index, &owner(&[100]), &egress(&[8]));
        let PolicyOp::PutOwner { entry, .. } = plan.steps[1].op else {
            panic!("owner entry expected");
        };
        assert_eq!(entry.generation, 1);
        assert_eq!(plan.retire.len(), 1);
        run(&mut index, &plan);
        assert_eq!(generations(&index), BTreeSet::from([1]));
        let view = index.owner(100).unwrap();
        assert!(view.rules.iter().all(|r| r.key.identity() == 8));
    }

    #[test]
    fn identical_install_is_a_no_op() {
        let mut index = Index::default();
        let o = owner(&[100, 101]);
        install(&mut index, &o, &egress(&[7]));
        assert!(plan_install(&index, &o, &egress(&[7])).is_empty());
        // Changing only the identity or the isolation is not a no-op.
        let other = PolicyOwner {
            identity: 1,
            ..o.clone()
        };
        assert!(!plan_install(&index, &other, &egress(&[7])).is_empty());
        assert!(!plan_install(&index, &o, &EndpointRules::default()).is_empty());
    }

    #[test]
    fn leftovers_in_the_target_generation_are_deleted_before_the_switch() {
        let mut index = Index::default();
        install(&mut index, &owner(&[100]), &egress(&[7]));
        // A stale generation-1 rule (a retire that failed earlier).
        let stale = crate::bpf::policy::keys::rule_entry(
            100,
            1,
            clustermesh_ebpf_common::direction::EGRESS,
            &RuleKey {
                identity: 666,
                protocol: 0,
                port: 0,
                port_bits: 0,
            },
        );
        index.apply(&PolicyOp::PutRule(stale));
        let plan = plan_install(&index, &owner(&[100]), &egress(&[8]));
        let delete_at = plan
            .steps
            .iter()
            .position(|s| s.op == PolicyOp::DeleteRule(stale))
            .expect("stale rule deleted");
        let switch_at = plan
            .steps
            .iter()
            .position(|s| matches!(s.op, PolicyOp::PutOwner { .. }))
            .unwrap();
        assert!(delete_at < switch_at);
    }

    #[test]
    fn dropped_cgroups_stop_being_enforced_with_the_switch() {
        let mut index = Index::default();
        install(&mut index, &owner(&[100, 101]), &egress(&[7]));
        let plan = plan_install(&index, &owner(&[100]), &egress(&[7]));
        let step = plan
            .steps
            .iter()
            .find(|s| s.op == PolicyOp::DeleteOwner { cgroup: 101 })
            .expect("cgroup 101 dropped");
        assert!(matches!(
            step.undo,
            Some(PolicyOp::PutOwner { cgroup: 101, .. })
        ));
        run(&mut index, &plan);
        assert_eq!(index.cgroup_entry(101), None);
    }

    #[test]
    fn remove_deletes_cgroups_before_rules_and_spares_other_owners() {
        let mut index = Index::default();
        install(&mut index, &owner(&[100, 101]), &egress(&[7]));
        let other = PolicyOwner {
            owner: 200,
            cgroups: vec![200, 102],
            identity: 1,
        };
        install(&mut index, &other, &egress(&[7]));
        let ops = plan_remove(&index, 100, &[100, 101, 102]);
        assert_eq!(ops[0], PolicyOp::DeleteOwner { cgroup: 100 });
        assert_eq!(ops[1], PolicyOp::DeleteOwner { cgroup: 101 });
        assert!(matches!(ops[2], PolicyOp::DeleteRule(_)));
        assert!(!ops.contains(&PolicyOp::DeleteOwner { cgroup: 102 }));
        for op in &ops {
            index.apply(op);
        }
        assert!(index.owner(100).is_none());
        assert!(index.owner(200).is_some());
    }
}
