//! The contract between the policy control plane and the kernel: what the agent writes
//! into the pinned policy maps, in datapath terms (numbers, prefixes, port blocks), and
//! the [`PolicyDatapath`] trait the eBPF implementation (and the in-memory one used by
//! tests) provides.
//!
//! Shape of the datapath (ARCHITECTURE.md, "Policy and identities in the agent"):
//! * an **IP cache** (longest-prefix match, v4 and v6): address prefix → (security
//!   identity, cluster ID, syncing). Pod addresses are /32 and /128 entries; a cluster's pod
//!   CIDRs are `syncing` entries until its identities and endpoints are synced; address
//!   blocks named by policies (`ipBlock`) carry agent-local CIDR identities; the node's
//!   addresses carry `host`; no match is `world`;
//! * **policy owners**: a local endpoint is the pod's cgroup (the kernel's cgroup ID); its
//!   processes' sockets are attributed to it by the cgroup they run in. Each owner has an
//!   active generation and per-direction "isolated" flags;
//! * **rules**: (owner, generation, direction, peer identity or 0 = any, protocol or 0 =
//!   any, port block) → allow. An owner's new rules are written under the inactive
//!   generation and then the owner's generation is flipped in one map update, so a packet
//!   sees the old rule set or the new one, never half of each (the Maglev slab's rule).

use std::collections::BTreeSet;

use clustermesh_api::cidr::Cidr;

/// Traffic direction of a rule, seen from the local endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Into the endpoint (the peer is the source).
    Ingress,
    /// Out of the endpoint (the peer is the destination, after service translation).
    Egress,
}

/// What the IP cache says of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCacheValue {
    /// Security identity (reserved, cluster-scoped or agent-local CIDR identity).
    pub identity: u32,
    /// Cluster ID of the owning cluster (0: none, for reserved and CIDR identities).
    pub cluster_id: u16,
    /// The owning cluster's identities and endpoints are not synced yet: traffic to or
    /// from the prefix is not enforced.
    pub syncing: bool,
}

/// One allow rule of one direction of an endpoint, in datapath form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    /// Peer security identity; 0 admits every peer.
    pub identity: u32,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP); 0 admits every protocol (and then
    /// `port_bits` is 0).
    pub protocol: u8,
    /// First port of the block (host order); its low `16 - port_bits` bits are zero.
    pub port: u16,
    /// Leading port bits that must match (16: exactly `port`; 0: every port).
    pub port_bits: u8,
}

/// The rules of one local endpoint; `None` in a direction: not isolated (everything
/// passes in that direction).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointRules {
    /// Allowed into the endpoint.
    pub ingress: Option<BTreeSet<RuleKey>>,
    /// Allowed out of the endpoint.
    pub egress: Option<BTreeSet<RuleKey>>,
}

/// A local endpoint as the datapath knows it: the pod cgroup that owns its rules and
/// every cgroup whose sockets belong to it (the pod cgroup and its container cgroups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOwner {
    /// Kernel cgroup ID of the pod cgroup (the rules' owner key).
    pub owner: u64,
    /// Cgroup IDs attributed to this owner (includes `owner`).
    pub cgroups: Vec<u64>,
    /// The endpoint's own security identity (for logs of denied flows).
    pub identity: u32,
}

/// Per-reason verdict counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// Connects/sends allowed by an egress rule or because the endpoint is not isolated.
    pub egress_allowed: u64,
    /// Connects/sends refused with `EPERM` by egress policy.
    pub egress_denied: u64,
    /// New inbound connections/flows allowed.
    pub ingress_allowed: u64,
    /// New inbound connections/flows dropped by ingress policy.
    pub ingress_denied: u64,
    /// Verdicts skipped because the peer's cluster is still syncing.
    pub syncing_passed: u64,
    /// Inbound packets of connections or flows the endpoint opened itself (passed).
    pub reply_passed: u64,
}

/// A failed datapath operation (the map, the operation, the kernel's error).
#[derive(Debug, thiserror::Error)]
#[error("policy datapath: {operation} on {map}: {detail}")]
pub struct PolicyDatapathError {
    /// Map name.
    pub map: String,
    /// What was attempted.
    pub operation: String,
    /// The kernel's (or the implementation's) error.
    pub detail: String,
}

/// The kernel side of policy: the IP cache, policy owners and their rules.
///
/// Pinned state survives an agent restart and keeps being enforced; the restarted agent
/// overwrites what changed as it syncs and calls the `reconcile_*` methods once with the
/// complete state to drop leftovers.
pub trait PolicyDatapath: Send {
    /// Sets (`Some`) or deletes (`None`) IP cache prefixes, in order.
    ///
    /// # Errors
    /// The first failing map operation; earlier changes stay applied.
    fn apply_ipcache(
        &mut self,
        changes: &[(Cidr, Option<IpCacheValue>)],
    ) -> Result<(), PolicyDatapathError>;

    /// Makes the IP cache hold exactly `entries` (deleting every other prefix).
    ///
    /// # Errors
    /// The first failing map operation.
    fn reconcile_ipcache(
        &mut self,
        entries: &[(Cidr, IpCacheValue)],
    ) -> Result<(), PolicyDatapathError>;

    /// Installs or replaces the rules of `owner`, all or nothing: rules are written under
    /// the owner's inactive generation, then every cgroup of the owner is switched to it,
    /// then the old generation's rules are deleted. On failure the previous rules stay in
    /// force.
    ///
    /// # Errors
    /// The failing map operation (after undoing what was written).
    fn install(
        &mut self,
        owner: &PolicyOwner,
        rules: &EndpointRules,
    ) -> Result<(), PolicyDatapathError>;

    /// Removes an owner: its cgroups stop being enforced and its rules are deleted.
    ///
    /// # Errors
    /// The failing map operation.
    fn remove(&mut self, owner: &PolicyOwner) -> Result<(), PolicyDatapathError>;

    /// Removes every owner (and its cgroups and rules) not in `live`.
    ///
    /// # Errors
    /// The first failing map operation.
    fn reconcile_owners(&mut self, live: &[PolicyOwner]) -> Result<(), PolicyDatapathError>;

    /// Verdict counters.
    ///
    /// # Errors
    /// The counter map cannot be read.
    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError>;

    /// Takes the denied flows reported since the last call and logs each at debug level
    /// with both identities; returns how many. A datapath without such reports has none.
    fn drain_denied(&mut self) -> usize {
        0
    }
}

/// The port blocks (first port, leading bits) covering `first..=last` exactly, fewest
/// first: e.g. 8080..=8083 is one block (8080, 14); 0..=65535 is (0, 0).
#[must_use]
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    if first > last {
        return blocks;
    }
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        // The largest aligned block starting at `start` that stays within `end`.
        let mut size_bits = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        // `start` fits u16 and `size_bits` is at most 16 by construction.
        blocks.push((
            u16::try_from(start).unwrap_or(u16::MAX),
            16 - u8::try_from(size_bits).unwrap_or(16),
        ));
        start += 1 << size_bits;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn port_blocks_examples() {
        assert_eq!(port_blocks(0, u16::MAX), vec![(0, 0)]);
        assert_eq!(port_blocks(8080, 8080), vec![(8080, 16)]);
        assert_eq!(port_blocks(8080, 8083), vec![(8080, 14)]);
        assert_eq!(port_blocks(1, 3), vec![(1, 16), (2, 15)]);
        assert_eq!(port_blocks(5, 4), vec![]);
    }

    proptest! {
        #[test]
        fn port_blocks_cover_exactly(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let blocks = port_blocks(first, last);
            let covering = blocks
                .iter()
                .filter(|(start, bits)| {
                    let mask = if *bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                    probe & mask == *start
                })
                .count();
            let inside = (first..=last).contains(&probe);
            prop_assert_eq!(covering, usize::from(inside));
            // At most two blocks per bit length.
            prop_assert!(blocks.len() <= 32);
        }
    }
}
