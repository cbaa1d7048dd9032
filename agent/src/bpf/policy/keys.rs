//! Encoding of the policy contract's values into map keys and values: IP cache prefixes
//! into LPM keys, allow rules into prefixes of the rule trie, endpoints into owner entries.
//!
//! Keys are canonical (bits past the prefix are zero) so that what the agent writes and
//! what it reads back from the kernel after a restart compare equal: the kernel matches
//! only the prefix bits but stores and lists the whole key as written.

use std::net::IpAddr;

use clustermesh_agent_core::policy::datapath::{EndpointRules, IpCacheValue, PolicyOwner, RuleKey};
use clustermesh_api::cidr::Cidr;
use clustermesh_ebpf_common::{
    direction, ipcache_flags, owner_flags, IpCacheEntry, PolicyKey, PolicyOwnerEntry,
    POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_PROTOCOL,
};

/// An IP cache key: prefix length and address bytes (network order, host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum IpKey {
    /// An IPv4 prefix (`CM_IPCACHE4`).
    V4 {
        /// Prefix length, 0..=32.
        prefix_len: u32,
        /// Address bytes.
        addr: [u8; 4],
    },
    /// An IPv6 prefix (`CM_IPCACHE6`).
    V6 {
        /// Prefix length, 0..=128.
        prefix_len: u32,
        /// Address bytes.
        addr: [u8; 16],
    },
}

/// Zeroes the bits of `bytes` past the first `prefix_len`.
fn mask_bytes<const N: usize>(mut bytes: [u8; N], prefix_len: u32) -> [u8; N] {
    for (i, b) in bytes.iter_mut().enumerate() {
        let start = u32::try_from(i * 8).unwrap_or(u32::MAX);
        if prefix_len <= start {
            *b = 0;
        } else if prefix_len < start + 8 {
            *b &= 0xffu8 << (8 - (prefix_len - start));
        }
    }
    bytes
}

impl IpKey {
    /// The key of a CIDR (canonical: a `Cidr` never has host bits set).
    pub(crate) fn of(cidr: &Cidr) -> Self {
        let prefix_len = u32::from(cidr.prefix_len());
        match cidr.addr() {
            IpAddr::V4(a) => Self::V4 {
                prefix_len,
                addr: mask_bytes(a.octets(), prefix_len),
            },
            IpAddr::V6(a) => Self::V6 {
                prefix_len,
                addr: mask_bytes(a.octets(), prefix_len),
            },
        }
    }

    /// The key as read back from the kernel, made canonical.
    pub(crate) fn canonical(self) -> Self {
        match self {
            Self::V4 { prefix_len, addr } => Self::V4 {
                prefix_len,
                addr: mask_bytes(addr, prefix_len),
            },
            Self::V6 { prefix_len, addr } => Self::V6 {
                prefix_len,
                addr: mask_bytes(addr, prefix_len),
            },
        }
    }
}

/// The map value of an IP cache entry.
pub(crate) fn ipcache_entry(value: &IpCacheValue) -> IpCacheEntry {
    IpCacheEntry {
        identity: value.identity,
        cluster_id: value.cluster_id,
        flags: if value.syncing {
            ipcache_flags::SYNCING
        } else {
            0
        },
        pad: 0,
    }
}

/// One rule as stored in `CM_POLICY`: its prefix length and canonical key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RuleEntry {
    /// LPM prefix length in bits.
    pub(crate) prefix_len: u32,
    /// The key (bits past the prefix are zero).
    pub(crate) key: PolicyKey,
}

impl RuleEntry {
    /// The owner cgroup the rule belongs to.
    pub(crate) fn owner(&self) -> u64 {
        self.key.owner()
    }

    /// The generation the rule belongs to.
    pub(crate) fn generation(&self) -> u8 {
        self.key.generation
    }

    /// A rule read back from the kernel, made canonical (prefix bits only).
    pub(crate) fn canonical(prefix_len: u32, key: PolicyKey) -> Self {
        let bytes = [
            key.owner[0],
            key.owner[1],
            key.owner[2],
            key.owner[3],
            key.owner[4],
            key.owner[5],
            key.owner[6],
            key.owner[7],
            key.generation,
            key.direction,
            key.identity[0],
            key.identity[1],
            key.identity[2],
            key.identity[3],
            key.protocol,
            key.port[0],
            key.port[1],
        ];
        let b = mask_bytes(bytes, prefix_len);
        Self {
            prefix_len,
            key: PolicyKey {
                owner: [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]],
                generation: b[8],
                direction: b[9],
                identity: [b[10], b[11], b[12], b[13]],
                protocol: b[14],
                port: [b[15], b[16]],
            },
        }
    }
}

/// The trie entry of one allow rule: a rule for every protocol ends its prefix after the
/// peer identity; otherwise the prefix covers the protocol and `port_bits` of the port.
pub(crate) fn rule_entry(owner: u64, generation: u8, dir: u8, rule: &RuleKey) -> RuleEntry {
    if rule.protocol == 0 {
        return RuleEntry {
            prefix_len: POLICY_PREFIX_ANY_PROTOCOL,
            key: PolicyKey::new(owner, generation, dir, rule.identity, 0, 0),
        };
    }
    let bits = rule.port_bits.min(16);
    let mask = if bits == 0 {
        0
    } else {
        u16::MAX << (16 - bits)
    };
    RuleEntry {
        prefix_len: POLICY_PREFIX_PROTOCOL + u32::from(bits),
        key: PolicyKey::new(
            owner,
            generation,
            dir,
            rule.identity,
            rule.protocol,
            rule.port & mask,
        ),
    }
}

/// Every trie entry of an endpoint's rules under `generation` (a direction that is not
/// isolated has no entries: its flag is off).
pub(crate) fn rule_entries(
    owner: u64,
    generation: u8,
    rules: &EndpointRules,
) -> std::collections::BTreeSet<RuleEntry> {
    let ingress = rules
        .ingress
        .iter()
        .flatten()
        .map(|r| rule_entry(owner, generation, direction::INGRESS, r));
    let egress = rules
        .egress
        .iter()
        .flatten()
        .map(|r| rule_entry(owner, generation, direction::EGRESS, r));
    ingress.chain(egress).collect()
}

/// The entry every cgroup of `owner` gets for `generation`.
pub(crate) fn owner_entry(
    owner: &PolicyOwner,
    generation: u8,
    rules: &EndpointRules,
) -> PolicyOwnerEntry {
    let mut flags = 0;
    if rules.ingress.is_some() {
        flags |= owner_flags::INGRESS_ISOLATED;
    }
    if rules.egress.is_some() {
        flags |= owner_flags::EGRESS_ISOLATED;
    }
    PolicyOwnerEntry {
        owner: owner.owner,
        identity: owner.identity,
        generation,
        flags,
        pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_ebpf_common::POLICY_PREFIX_FULL;
    use proptest::prelude::*;

    fn rule(identity: u32, protocol: u8, port: u16, port_bits: u8) -> RuleKey {
        RuleKey {
            identity,
            protocol,
            port,
            port_bits,
        }
    }

    #[test]
    fn any_protocol_rule_ends_after_the_identity() {
        let e = rule_entry(0xaabb, 1, direction::EGRESS, &rule(7, 0, 0, 0));
        assert_eq!(e.prefix_len, 112);
        assert_eq!(e.key, PolicyKey::new(0xaabb, 1, 1, 7, 0, 0));
    }

    #[test]
    fn port_block_prefix_is_120_plus_port_bits() {
        let exact = rule_entry(1, 0, direction::INGRESS, &rule(9, 6, 8080, 16));
        assert_eq!(exact.prefix_len, POLICY_PREFIX_FULL);
        assert_eq!(exact.key.port, [0x1f, 0x90]);
        let block = rule_entry(1, 0, direction::INGRESS, &rule(9, 6, 8080, 14));
        assert_eq!(block.prefix_len, 134);
        let every_port = rule_entry(1, 0, direction::INGRESS, &rule(9, 17, 0, 0));
        assert_eq!(every_port.prefix_len, 120);
        assert_eq!(every_port.key.protocol, 17);
    }

    #[test]
    fn stray_port_bits_are_masked_and_oversized_blocks_clamped() {
        // 8081 with 14 bits is the block of 8080: the key must be canonical.
        let e = rule_entry(1, 0, direction::INGRESS, &rule(9, 6, 8081, 14));
        assert_eq!(e.key.port(), 8080);
        let e = rule_entry(1, 0, direction::INGRESS, &rule(9, 6, 80, 40));
        assert_eq!(e.prefix_len, 136);
    }

    #[test]
    fn key_bytes_are_big_endian_so_prefix_bits_run_owner_first() {
        let e = rule_entry(
            0x0102_0304_0506_0708,
            1,
            direction::EGRESS,
            &rule(0x0a0b_0c0d, 6, 443, 16),
        );
        assert_eq!(e.key.owner, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(e.key.identity, [0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(e.key.port, 443u16.to_be_bytes());
    }

    #[test]
    fn canonical_clears_bits_past_the_prefix() {
        let raw = PolicyKey::new(5, 1, 0, 77, 6, 0xffff);
        let c = RuleEntry::canonical(120, raw);
        assert_eq!(c.key, PolicyKey::new(5, 1, 0, 77, 6, 0));
        let c = RuleEntry::canonical(112, raw);
        assert_eq!(c.key, PolicyKey::new(5, 1, 0, 77, 0, 0));
        let c = RuleEntry::canonical(130, raw);
        assert_eq!(c.key.port(), 0xffc0);
    }

    #[test]
    fn ip_keys_follow_the_cidr() {
        let k = IpKey::of(&Cidr::parse("10.1.0.0/16").unwrap());
        assert_eq!(
            k,
            IpKey::V4 {
                prefix_len: 16,
                addr: [10, 1, 0, 0]
            }
        );
        let k = IpKey::of(&Cidr::parse("fd00::1/128").unwrap());
        let IpKey::V6 { prefix_len, addr } = k else {
            panic!("v6 expected");
        };
        assert_eq!(prefix_len, 128);
        assert_eq!(addr[0], 0xfd);
        assert_eq!(addr[15], 1);
        let raw = IpKey::V4 {
            prefix_len: 12,
            addr: [10, 255, 1, 1],
        };
        assert_eq!(
            raw.canonical(),
            IpKey::V4 {
                prefix_len: 12,
                addr: [10, 240, 0, 0]
            }
        );
    }

    #[test]
    fn owner_entry_flags_follow_isolated_directions() {
        let owner = PolicyOwner {
            owner: 42,
            cgroups: vec![42],
            identity: 1234,
        };
        let rules = EndpointRules {
            ingress: Some(Default::default()),
            egress: None,
        };
        let e = owner_entry(&owner, 1, &rules);
        assert_eq!(e.flags, owner_flags::INGRESS_ISOLATED);
        assert_eq!((e.owner, e.identity, e.generation), (42, 1234, 1));
        let both = EndpointRules {
            ingress: Some(Default::default()),
            egress: Some(Default::default()),
        };
        assert_eq!(
            owner_entry(&owner, 0, &both).flags,
            owner_flags::INGRESS_ISOLATED | owner_flags::EGRESS_ISOLATED
        );
    }

    proptest! {
        /// A rule's entry matches exactly the lookups the rule admits: same owner,
        /// generation, direction and identity, and a port inside the block.
        #[test]
        fn rule_prefix_matches_exactly_its_ports(
            identity in 1u32..100, protocol in prop_oneof![Just(0u8), Just(6u8), Just(17u8)],
            port in any::<u16>(), bits in 0u8..=16, probe in any::<u16>(), probe_proto in prop_oneof![Just(6u8), Just(17u8)],
        ) {
            let r = rule(identity, protocol, port, if protocol == 0 { 0 } else { bits });
            let e = rule_entry(9, 1, direction::INGRESS, &r);
            let lookup = RuleEntry::canonical(e.prefix_len, PolicyKey::new(9, 1, 0, identity, probe_proto, probe));
            let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
            let admits = protocol == 0 || (protocol == probe_proto && probe & mask == port & mask);
            prop_assert_eq!(lookup == e, admits);
        }
    }
}
