//! From computed endpoint policies to datapath rules: port ranges become port blocks, and
//! address blocks (`ipBlock`) become agent-local CIDR identities in the IP cache.
//!
//! CIDR identities follow Cilium's model: every prefix named by a policy (a block's CIDR or
//! one of its `except` holes) gets an identity of its own in the IP cache, and a rule that
//! allows a block allows every prefix identity inside the block but outside its holes.
//! The IP cache's longest-prefix match then decides for an address: its longest named
//! prefix P is inside a block's CIDR and outside all its holes exactly when the address
//! is. Pod and host addresses have /32 and /128 entries of their own, so a block never
//! selects a pod or the node (Cilium's behaviour too; Kubernetes leaves it to the
//! implementation and tells users to use ipBlock for cluster-external addresses).

use std::collections::{BTreeMap, BTreeSet};

use clustermesh_api::cidr::Cidr;
use clustermesh_api::policy::PolicyProtocol;

use super::datapath::{port_blocks, EndpointRules, RuleKey};
use super::{AllowEntry, AllowPeer, EndpointPolicy};

/// First agent-local CIDR identity (Cilium's local-scope identities start at 2^24 too, so
/// they can never collide with cluster-scoped ones, which stay below it).
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

/// IP protocol number of a policy protocol.
#[must_use]
pub fn protocol_number(p: PolicyProtocol) -> u8 {
    match p {
        PolicyProtocol::Tcp => 6,
        PolicyProtocol::Udp => 17,
        PolicyProtocol::Sctp => 132,
    }
}

/// The CIDR identities of every prefix the policies name, stable while a prefix stays
/// in use.
#[derive(Debug, Default, Clone)]
pub struct CidrIdentities {
    ids: BTreeMap<Cidr, u32>,
    free: Vec<u32>,
    next: u32,
}

impl CidrIdentities {
    /// Makes the set of named prefixes exactly the CIDRs and holes of `blocks`; returns
    /// whether it changed.
    pub fn sync<'a>(&mut self, blocks: impl IntoIterator<Item = (&'a Cidr, &'a [Cidr])>) -> bool {
        let wanted: BTreeSet<Cidr> = blocks
            .into_iter()
            .flat_map(|(c, except)| std::iter::once(*c).chain(except.iter().copied()))
            .collect();
        let gone: Vec<Cidr> = self
            .ids
            .keys()
            .filter(|c| !wanted.contains(c))
            .copied()
            .collect();
        let mut changed = !gone.is_empty();
        for c in gone {
            if let Some(id) = self.ids.remove(&c) {
                self.free.push(id);
            }
        }
        for c in wanted {
            if self.ids.contains_key(&c) {
                continue;
            }
            changed = true;
            let id = self.free.pop().unwrap_or_else(|| {
                let id = FIRST_CIDR_IDENTITY + self.next;
                self.next += 1;
                id
            });
            self.ids.insert(c, id);
        }
        changed
    }

    /// Every named prefix and its identity.
    #[must_use]
    pub fn prefixes(&self) -> &BTreeMap<Cidr, u32> {
        &self.ids
    }

    /// The identities of the prefixes inside `cidr` and outside every hole of `except`.
    #[must_use]
    pub fn of_block(&self, cidr: &Cidr, except: &[Cidr]) -> Vec<u32> {
        self.ids
            .iter()
            .filter(|(p, _)| within(p, cidr) && !except.iter().any(|e| within(p, e)))
            .map(|(_, id)| *id)
            .collect()
    }
}

/// Whether prefix `inner` lies within prefix `outer`.
fn within(inner: &Cidr, outer: &Cidr) -> bool {
    inner.prefix_len() >= outer.prefix_len() && outer.contains(inner.addr())
}

fn lower_set(entries: &BTreeSet<AllowEntry>, cidrs: &CidrIdentities) -> BTreeSet<RuleKey> {
    let mut rules = BTreeSet::new();
    for e in entries {
        let identities: Vec<u32> = match &e.peer {
            AllowPeer::Any => vec![0],
            AllowPeer::Identity(id) => vec![id.get()],
            AllowPeer::Cidr { cidr, except } => cidrs.of_block(cidr, except),
        };
        let ports: Vec<(u8, u16, u8)> = match e.ports.protocol {
            None => vec![(0, 0, 0)],
            Some(p) => port_blocks(e.ports.first, e.ports.last)
                .into_iter()
                .map(|(port, bits)| (protocol_number(p), port, bits))
                .collect(),
        };
        for identity in identities {
            for &(protocol, port, port_bits) in &ports {
                rules.insert(RuleKey {
                    identity,
                    protocol,
                    port,
                    port_bits,
                });
            }
        }
    }
    rules
}

/// The datapath rules of a computed endpoint policy. `extra_ingress` identities are
/// always admitted on ingress when the endpoint is isolated (the node itself, as Cilium's
/// default `allow-localhost` does, so kubelet probes keep working).
#[must_use]
pub fn lower(
    policy: &EndpointPolicy,
    cidrs: &CidrIdentities,
    extra_ingress: &[u32],
) -> EndpointRules {
    EndpointRules {
        ingress: policy.ingress.as_ref().map(|set| {
            let mut rules = lower_set(set, cidrs);
            rules.extend(extra_ingress.iter().map(|&identity| RuleKey {
                identity,
                protocol: 0,
                port: 0,
                port_bits: 0,
            }));
            rules
        }),
        egress: policy.egress.as_ref().map(|set| lower_set(set, cidrs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PortSpan;
    use clustermesh_api::security_identity::SecurityIdentity;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn blocks_allow_their_prefixes_but_not_their_holes() {
        let mut ids = CidrIdentities::default();
        let a = (cidr("10.0.0.0/8"), vec![cidr("10.1.0.0/16")]);
        let b = (cidr("10.1.2.0/24"), vec![]);
        assert!(ids.sync([(&a.0, a.1.as_slice()), (&b.0, b.1.as_slice())]));
        let id = |ids: &CidrIdentities, c: &str| ids.prefixes()[&cidr(c)];
        let mut of_a = ids.of_block(&a.0, &a.1);
        of_a.sort_unstable();
        // 10.0.0.0/8 itself; not the hole nor the /24 inside the hole.
        assert_eq!(of_a, vec![id(&ids, "10.0.0.0/8")]);
        assert_eq!(ids.of_block(&b.0, &b.1), vec![id(&ids, "10.1.2.0/24")]);
        // Stable when nothing changes; a removed prefix's identity is reused.
        assert!(!ids.sync([(&a.0, a.1.as_slice()), (&b.0, b.1.as_slice())]));
        let old_b = id(&ids, "10.1.2.0/24");
        assert!(ids.sync([(&b.0, b.1.as_slice())]));
        assert_eq!(ids.prefixes().len(), 1);
        assert_eq!(ids.prefixes()[&cidr("10.1.2.0/24")], old_b);
    }

    #[test]
    fn lowering_makes_port_blocks_and_admits_the_host_on_ingress() {
        let ids = CidrIdentities::default();
        let entries: BTreeSet<AllowEntry> = [
            AllowEntry {
                peer: AllowPeer::Identity(SecurityIdentity::new(65_800)),
                ports: PortSpan {
                    protocol: Some(PolicyProtocol::Tcp),
                    first: 8080,
                    last: 8083,
                },
            },
            AllowEntry {
                peer: AllowPeer::Any,
                ports: PortSpan::ALL,
            },
        ]
        .into();
        let policy = EndpointPolicy {
            ingress: Some(entries.clone()),
            egress: Some(BTreeSet::new()),
        };
        let rules = lower(&policy, &ids, &[1]);
        let ingress = rules.ingress.unwrap();
        assert!(ingress.contains(&RuleKey {
            identity: 65_800,
            protocol: 6,
            port: 8080,
            port_bits: 14
        }));
        assert!(ingress.contains(&RuleKey {
            identity: 0,
            protocol: 0,
            port: 0,
            port_bits: 0
        }));
        assert!(ingress.contains(&RuleKey {
            identity: 1,
            protocol: 0,
            port: 0,
            port_bits: 0
        }));
        // Isolated egress with nothing allowed stays isolated (empty, not `None`).
        assert_eq!(rules.egress, Some(BTreeSet::new()));
        let open = lower(&EndpointPolicy::default(), &ids, &[1]);
        assert_eq!(open, EndpointRules::default());
    }
}
