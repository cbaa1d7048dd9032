//! [`PolicyDatapath`] over any [`PolicyStore`]: the IP cache, owner installs with the
//! generation flip, removal and reconciliation, with the kernel's state mirrored in an
//! [`Index`] so an update knows what to retire without listing the maps again.

use std::collections::{BTreeMap, BTreeSet};

use clustermesh_agent_core::policy::datapath::{
    EndpointRules, IpCacheValue, PolicyCounters, PolicyDatapath, PolicyDatapathError, PolicyOwner,
};
use clustermesh_api::cidr::Cidr;

use super::{
    keys::{ipcache_entry, IpKey},
    ops::{Index, PolicyOp},
    plan::{plan_install, plan_remove},
    store::{execute, PolicyStore},
};

/// The policy maps and the index of what they hold.
#[derive(Debug)]
pub(crate) struct PolicyEngine<S> {
    pub(crate) store: S,
    pub(crate) index: Index,
}

impl<S: PolicyStore> PolicyEngine<S> {
    /// Reads the owners and rules the maps hold (pinned state of an earlier run).
    ///
    /// # Errors
    /// A map cannot be listed.
    pub(crate) fn rebuild(store: S) -> Result<Self, PolicyDatapathError> {
        let index = Index::from_maps(store.read_owners()?, store.read_rules()?);
        Ok(Self { store, index })
    }

    fn apply_all(&mut self, ops: &[PolicyOp]) -> Result<(), PolicyDatapathError> {
        for op in ops {
            self.store.apply(op)?;
            self.index.apply(op);
        }
        Ok(())
    }

    /// Owners the kernel holds anything of.
    pub(crate) fn owner_count(&self) -> usize {
        self.index.owners.len()
    }
}

fn ipcache_op(cidr: &Cidr, value: Option<&IpCacheValue>) -> PolicyOp {
    let key = IpKey::of(cidr);
    match value {
        Some(v) => PolicyOp::PutIpCache {
            key,
            value: ipcache_entry(v),
        },
        None => PolicyOp::DeleteIpCache { key },
    }
}

impl<S: PolicyStore + Send> PolicyDatapath for PolicyEngine<S> {
    fn apply_ipcache(
        &mut self,
        changes: &[(Cidr, Option<IpCacheValue>)],
    ) -> Result<(), PolicyDatapathError> {
        let ops: Vec<PolicyOp> = changes
            .iter()
            .map(|(cidr, value)| ipcache_op(cidr, value.as_ref()))
            .collect();
        self.apply_all(&ops)
    }

    fn reconcile_ipcache(
        &mut self,
        entries: &[(Cidr, IpCacheValue)],
    ) -> Result<(), PolicyDatapathError> {
        let desired: BTreeMap<IpKey, _> = entries
            .iter()
            .map(|(cidr, v)| (IpKey::of(cidr), ipcache_entry(v)))
            .collect();
        let current: BTreeMap<IpKey, _> = self.store.read_ipcache()?.into_iter().collect();
        let deletes = current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .map(|key| PolicyOp::DeleteIpCache { key: *key });
        let puts = desired
            .iter()
            .filter(|(k, v)| current.get(k) != Some(v))
            .map(|(key, value)| PolicyOp::PutIpCache {
                key: *key,
                value: *value,
            });
        let ops: Vec<PolicyOp> = deletes.chain(puts).collect();
        let changed = ops.len();
        self.apply_all(&ops)?;
        tracing::debug!(prefixes = desired.len(), changed, "reconciled the IP cache");
        Ok(())
    }

    fn install(
        &mut self,
        owner: &PolicyOwner,
        rules: &EndpointRules,
    ) -> Result<(), PolicyDatapathError> {
        let plan = plan_install(&self.index, owner, rules);
        if plan.is_empty() {
            return Ok(());
        }
        let retire_failures = execute(&mut self.store, &mut self.index, &plan)?;
        tracing::debug!(
            owner = owner.owner,
            identity = owner.identity,
            steps = plan.steps.len(),
            retired = plan.retire.len() - retire_failures.len(),
            "installed endpoint policy"
        );
        Ok(())
    }

    fn remove(&mut self, owner: &PolicyOwner) -> Result<(), PolicyDatapathError> {
        let ops = plan_remove(&self.index, owner.owner, &owner.cgroups);
        self.apply_all(&ops)
    }

    fn reconcile_owners(&mut self, live: &[PolicyOwner]) -> Result<(), PolicyDatapathError> {
        let live_owners: BTreeMap<u64, BTreeSet<u64>> = live
            .iter()
            .map(|o| {
                let cgroups = o.cgroups.iter().copied().chain([o.owner]).collect();
                (o.owner, cgroups)
            })
            .collect();
        let mut ops = Vec::new();
        for (owner, view) in &self.index.owners {
            match live_owners.get(owner) {
                None => ops.extend(plan_remove(&self.index, *owner, &[])),
                Some(cgroups) => ops.extend(
                    view.cgroups
                        .keys()
                        .filter(|c| !cgroups.contains(c))
                        .map(|cgroup| PolicyOp::DeleteOwner { cgroup: *cgroup }),
                ),
            }
        }
        let removed = ops.len();
        self.apply_all(&ops)?;
        tracing::debug!(
            live = live.len(),
            removed_entries = removed,
            "reconciled policy owners"
        );
        Ok(())
    }

    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError> {
        self.store.counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::policy::mem_store::MemStore;
    use clustermesh_agent_core::policy::datapath::RuleKey;
    use clustermesh_ebpf_common::direction::{EGRESS, INGRESS};

    fn owner(cgroups: &[u64]) -> PolicyOwner {
        PolicyOwner {
            owner: 100,
            cgroups: cgroups.to_vec(),
            identity: 5000,
        }
    }

    fn tcp(identity: u32, port: u16) -> RuleKey {
        RuleKey {
            identity,
            protocol: 6,
            port,
            port_bits: 16,
        }
    }

    fn rules(ingress: Option<&[RuleKey]>, egress: Option<&[RuleKey]>) -> EndpointRules {
        EndpointRules {
            ingress: ingress.map(|r| r.iter().copied().collect()),
            egress: egress.map(|r| r.iter().copied().collect()),
        }
    }

    fn engine() -> PolicyEngine<MemStore> {
        PolicyEngine::rebuild(MemStore::default()).unwrap()
    }

    #[test]
    fn installed_rules_decide_and_a_reinstall_replaces_them() {
        let mut e = engine();
        e.install(&owner(&[100, 101]), &rules(None, Some(&[tcp(7, 80)])))
            .unwrap();
        assert_eq!(e.store.allows(101, EGRESS, 7, 6, 80), Some(true));
        assert_eq!(e.store.allows(101, EGRESS, 7, 6, 81), Some(false));
        assert_eq!(e.store.allows(101, EGRESS, 8, 6, 80), Some(false));
        assert_eq!(e.store.allows(102, EGRESS, 7, 6, 80), None);

        e.install(&owner(&[100, 101]), &rules(None, Some(&[tcp(8, 80)])))
            .unwrap();
        assert_eq!(e.store.allows(100, EGRESS, 7, 6, 80), Some(false));
        assert_eq!(e.store.allows(100, EGRESS, 8, 6, 80), Some(true));
        assert_eq!(e.store.rules.len(), 1, "the old generation is retired");
        assert_eq!(e.store.cgroups[&101].generation, 1);
    }

    #[test]
    fn any_peer_and_any_protocol_rules_match_through_the_second_lookup() {
        let mut e = engine();
        let any_peer_dns = RuleKey {
            identity: 0,
            protocol: 17,
            port: 53,
            port_bits: 16,
        };
        let all_from_9 = RuleKey {
            identity: 9,
            protocol: 0,
            port: 0,
            port_bits: 0,
        };
        e.install(
            &owner(&[]),
            &rules(Some(&[all_from_9]), Some(&[any_peer_dns])),
        )
        .unwrap();
        assert_eq!(e.store.allows(100, EGRESS, 1234, 17, 53), Some(true));
        assert_eq!(e.store.allows(100, EGRESS, 1234, 6, 53), Some(false));
        assert_eq!(e.store.allows(100, INGRESS, 9, 132, 9999), Some(true));
        assert_eq!(e.store.allows(100, INGRESS, 10, 6, 80), Some(false));
    }

    /// A failing switch of the second cgroup leaves the old rules in force everywhere and
    /// no new-generation rule behind.
    #[test]
    fn failed_install_leaves_the_previous_rules_in_force() {
        let mut e = engine();
        e.install(&owner(&[100, 101]), &rules(None, Some(&[tcp(7, 80)])))
            .unwrap();
        let before = (e.store.cgroups.clone(), e.store.rules.clone());
        let index_before = e.index.clone();
        e.store.fail_when = Some(|op| matches!(op, PolicyOp::PutOwner { cgroup: 101, .. }));
        let err = e
            .install(
                &owner(&[100, 101]),
                &rules(None, Some(&[tcp(8, 80), tcp(9, 80)])),
            )
            .unwrap_err();
        assert_eq!(err.detail, "injected failure");
        assert_eq!((e.store.cgroups.clone(), e.store.rules.clone()), before);
        assert_eq!(e.index, index_before, "the index mirrors the maps");
        assert_eq!(e.store.allows(101, EGRESS, 7, 6, 80), Some(true));

        // A failure while writing rules is undone too.
        let logged = e.store.log.len();
        e.store.fail_when = Some(|op| matches!(op, PolicyOp::PutRule(r) if r.key.identity() == 9));
        assert!(e
            .install(
                &owner(&[100, 101]),
                &rules(None, Some(&[tcp(8, 80), tcp(9, 80)]))
            )
            .is_err());
        assert!(
            e.store.log.len() > logged,
            "something was written, then undone"
        );
        assert_eq!((e.store.cgroups.clone(), e.store.rules.clone()), before);

        e.store.fail_when = None;
        e.install(
            &owner(&[100, 101]),
            &rules(None, Some(&[tcp(8, 80), tcp(9, 80)])),
        )
        .unwrap();
        assert_eq!(e.store.allows(101, EGRESS, 9, 6, 80), Some(true));
        assert_eq!(e.store.allows(101, EGRESS, 7, 6, 80), Some(false));
    }

    /// A restarted agent finds the active generation and the rules in the maps: it flips
    /// relative to the kernel and retires what the previous run wrote.
    #[test]
    fn restarted_engine_flips_relative_to_the_kernel() {
        let mut first = engine();
        first
            .install(&owner(&[100]), &rules(None, Some(&[tcp(7, 80)])))
            .unwrap();
        first
            .install(&owner(&[100]), &rules(None, Some(&[tcp(8, 80)])))
            .unwrap();
        assert_eq!(first.store.cgroups[&100].generation, 1);

        let mut second = PolicyEngine::rebuild(first.store.clone()).unwrap();
        assert_eq!(second.index, first.index);
        // Same rules: nothing is written.
        let logged = second.store.log.len();
        second
            .install(&owner(&[100]), &rules(None, Some(&[tcp(8, 80)])))
            .unwrap();
        assert_eq!(second.store.log.len(), logged);
        second
            .install(&owner(&[100]), &rules(None, Some(&[tcp(9, 80)])))
            .unwrap();
        assert_eq!(second.store.cgroups[&100].generation, 0);
        assert_eq!(second.store.rules.len(), 1);
        assert_eq!(second.store.allows(100, EGRESS, 9, 6, 80), Some(true));
    }

    #[test]
    fn a_failed_retire_is_cleaned_by_the_next_install() {
        let mut e = engine();
        e.install(&owner(&[100]), &rules(None, Some(&[tcp(7, 80)])))
            .unwrap();
        e.store.fail_when = Some(|op| matches!(op, PolicyOp::DeleteRule(_)));
        // The switch succeeds; retiring generation 0 fails (logged, not an error).
        e.install(&owner(&[100]), &rules(None, Some(&[tcp(8, 80)])))
            .unwrap();
        assert_eq!(e.store.rules.len(), 2);
        assert_eq!(e.store.allows(100, EGRESS, 7, 6, 80), Some(false));
        e.store.fail_when = None;
        // Back to generation 0: the stale identity-7 rule must not come back to life.
        e.install(&owner(&[100]), &rules(None, Some(&[tcp(9, 80)])))
            .unwrap();
        assert_eq!(e.store.allows(100, EGRESS, 7, 6, 80), Some(false));
        assert_eq!(e.store.allows(100, EGRESS, 9, 6, 80), Some(true));
        assert_eq!(e.store.rules.len(), 1);
    }

    #[test]
    fn remove_and_reconcile_owners_drop_cgroups_and_rules() {
        let mut e = engine();
        e.install(&owner(&[100, 101]), &rules(None, Some(&[tcp(7, 80)])))
            .unwrap();
        let other = PolicyOwner {
            owner: 200,
            cgroups: vec![201],
            identity: 1,
        };
        e.install(&other, &rules(Some(&[tcp(7, 80)]), None))
            .unwrap();
        let third = PolicyOwner {
            owner: 300,
            cgroups: vec![],
            identity: 1,
        };
        e.install(&third, &rules(Some(&[]), None)).unwrap();

        e.remove(&third).unwrap();
        assert_eq!(e.store.allows(300, INGRESS, 7, 6, 80), None);

        // Owner 100 lost cgroup 101; owner 200 is gone.
        e.reconcile_owners(&[owner(&[100])]).unwrap();
        assert_eq!(e.store.allows(101, EGRESS, 7, 6, 80), None);
        assert_eq!(e.store.allows(100, EGRESS, 7, 6, 80), Some(true));
        assert_eq!(e.store.allows(201, INGRESS, 7, 6, 80), None);
        assert!(e.store.rules.keys().all(|r| r.owner() == 100));
        assert_eq!(e.owner_count(), 1);
    }

    #[test]
    fn reconcile_ipcache_deletes_leftovers_and_writes_only_changes() {
        let mut e = engine();
        let cidr = |s: &str| Cidr::parse(s).unwrap();
        let value = |identity| IpCacheValue {
            identity,
            cluster_id: 1,
            syncing: false,
        };
        e.apply_ipcache(&[
            (cidr("10.0.0.1/32"), Some(value(7))),
            (cidr("10.0.0.2/32"), Some(value(8))),
            (cidr("fd00::/64"), Some(value(9))),
        ])
        .unwrap();
        e.apply_ipcache(&[(cidr("10.0.0.2/32"), None), (cidr("10.9.0.0/16"), None)])
            .unwrap();
        assert_eq!(e.store.ipcache.len(), 2);
        let logged = e.store.log.len();
        e.reconcile_ipcache(&[
            (cidr("10.0.0.1/32"), value(7)),
            (
                cidr("10.1.0.0/16"),
                IpCacheValue {
                    identity: 0,
                    cluster_id: 2,
                    syncing: true,
                },
            ),
        ])
        .unwrap();
        // fd00::/64 deleted, 10.1.0.0/16 written, 10.0.0.1 untouched.
        assert_eq!(e.store.log.len() - logged, 2);
        assert_eq!(e.store.ipcache.len(), 2);
        let syncing = e.store.ipcache[&IpKey::of(&cidr("10.1.0.0/16"))];
        assert_eq!(
            syncing.flags,
            clustermesh_ebpf_common::ipcache_flags::SYNCING
        );
    }
}
