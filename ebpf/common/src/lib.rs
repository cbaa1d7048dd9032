//! Map layouts shared by the clustermesh eBPF programs (kernel) and the agent (userspace).
//!
//! Both sides must agree byte for byte on every key and value, so the types live in one
//! `no_std` crate compiled for `bpfel-unknown-none` and for the host. Every type is
//! `#[repr(C)]` with explicit padding fields so that no byte is uninitialised (the kernel
//! hashes whole keys). Addresses and ports are stored in **network byte order**, exactly as
//! the kernel hands them to `cgroup/sock_addr` programs, so the datapath never converts.
//!
//! With the `user` feature the types implement [`aya::Pod`] for the agent.
#![no_std]

/// Layout version of every map below. Bump it whenever a key or value changes shape: the
/// agent refuses to reuse pinned maps written with another version.
pub const ABI_VERSION: u32 = 1;

/// Magic number stored in the [`LayoutMeta`] map (`"CMESHLB1"` as a big-endian u64).
pub const LAYOUT_MAGIC: u64 = u64::from_be_bytes(*b"CMESHLB1");

/// `BPF_F_MMAPABLE`: the slab array is created mappable so the agent writes tables with
/// plain memory stores instead of one syscall per entry.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `BPF_F_NO_PREALLOC`: hash maps whose capacity is a ceiling, not a reservation. The
/// services, backends and service-meta maps allocate entries as services are programmed,
/// so an agent with few services does not pin the memory of 131k of them.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Backend ids per slab array element.
///
/// The kernel stores array values at an 8-byte stride, so an array of plain `u32` would
/// waste half its memory and could not be written through the mmap as a flat `u32` slice.
/// Each element therefore holds a chunk of 16 ids (64 bytes, one cache line); table entry
/// `i` is `chunk[i / 16][i % 16]`, and the mmap is exactly a flat `u32` array.
pub const SLAB_CHUNK: usize = 16;

/// One element of the slab array.
pub type SlabChunk = [u32; SLAB_CHUNK];

/// Number of slab array elements needed for `entries` table entries.
#[must_use]
pub const fn slab_elements(entries: u32) -> u32 {
    entries.div_ceil(SLAB_CHUNK as u32)
}

/// Names of the maps, as declared by the programs and pinned under the pin directory.
pub mod map_names {
    /// Frontend ([`super::ServiceKey`]) → [`super::ServiceValue`].
    pub const SERVICES: &str = "CM_SERVICES";
    /// Backend id (`u32`) → [`super::BackendValue`].
    pub const BACKENDS: &str = "CM_BACKENDS";
    /// The Maglev slab: [`super::SlabChunk`]s of backend ids, every service's table at its
    /// own entry offset.
    pub const SLAB: &str = "CM_SLAB";
    /// Reverse NAT: [`super::RevNatKey`] → [`super::RevNatValue`] (LRU).
    pub const REVNAT: &str = "CM_REVNAT";
    /// Service id (`u32`) → [`super::ServiceMeta`] (userspace bookkeeping only).
    pub const SERVICE_META: &str = "CM_SVC_META";
    /// Cluster index (`u32`) → [`super::ClusterName`] (userspace bookkeeping only).
    pub const CLUSTERS: &str = "CM_CLUSTERS";
    /// Index 0 → [`super::LayoutMeta`]: which layout version wrote the pinned maps.
    pub const LAYOUT: &str = "CM_LAYOUT";
    /// Per-CPU `u64` counters indexed by [`super::stats`].
    pub const STATS: &str = "CM_STATS";
    /// IP cache, IPv4: [`super::IpCacheKey4`] (LPM) → [`super::IpCacheEntry`].
    pub const IPCACHE4: &str = "CM_IPCACHE4";
    /// IP cache, IPv6: [`super::IpCacheKey6`] (LPM) → [`super::IpCacheEntry`].
    pub const IPCACHE6: &str = "CM_IPCACHE6";
    /// Cgroup id (`u64`) → [`super::PolicyOwnerEntry`]: which sockets are enforced.
    pub const POL_CGROUPS: &str = "CM_POL_CGROUPS";
    /// Policy rules: [`super::PolicyKey`] (LPM) → [`super::POLICY_ALLOW`].
    pub const POLICY: &str = "CM_POLICY";
    /// Per-CPU `u64` policy verdict counters indexed by [`super::pol_stats`].
    pub const POL_STATS: &str = "CM_POL_STATS";
    /// UDP peers pod sockets sent to: [`super::UdpPeerKey`] → `u8` (LRU).
    pub const POL_UDP: &str = "CM_POL_UDP";
    /// Ring buffer of denied flows ([`super::PolicyEvent`] records).
    pub const POL_EVENTS: &str = "CM_POL_EVENTS";
}

/// Capacities the programs declare. The slab capacity is overridden by the agent at load
/// time (it is configurable); the others are fixed by the layout version.
pub mod capacity {
    /// Frontends (one service with a v4 and a v6 VIP uses two entries).
    pub const SERVICES: u32 = 131_072;
    /// Distinct backends across all services.
    pub const BACKENDS: u32 = 524_288;
    /// Default slab size in table entries (4 bytes each): 16 Mi entries = 64 MiB.
    pub const SLAB_DEFAULT: u32 = 16 * 1024 * 1024;
    /// Default slab size in array elements ([`super::SlabChunk`]s).
    pub const SLAB_DEFAULT_ELEMENTS: u32 = super::slab_elements(SLAB_DEFAULT);
    /// Reverse-NAT entries (one per load-balanced socket and backend; LRU evicts).
    pub const REVNAT: u32 = 262_144;
    /// Service ids (dense, reused).
    pub const SERVICE_META: u32 = 131_072;
    /// Cluster names (cluster ids are 1..=511 in ClusterMesh; index 0 is unused).
    pub const CLUSTERS: u32 = 512;
    /// Number of counters in the stats map.
    pub const STATS: u32 = super::stats::COUNT;
    /// IPv4 IP cache prefixes (pods of every cluster, CIDRs, ipBlocks).
    pub const IPCACHE4: u32 = 524_288;
    /// IPv6 IP cache prefixes.
    pub const IPCACHE6: u32 = 131_072;
    /// Cgroups attributed to policy owners (pods and their containers on one node).
    pub const POL_CGROUPS: u32 = 65_536;
    /// Policy rules of every owner, both generations during a flip.
    pub const POLICY: u32 = 1_048_576;
    /// Number of counters in the policy stats map.
    pub const POL_STATS: u32 = super::pol_stats::COUNT;
    /// Remembered UDP peers (LRU evicts; an evicted peer's reply is checked by policy).
    pub const POL_UDP: u32 = 262_144;
    /// Bytes of the denied-flow ring buffer (a power of two, page aligned).
    pub const POL_EVENTS: u32 = 256 * 1024;
}

/// Address family tags used in keys (not the kernel's `AF_*`, to keep them one byte).
pub mod family {
    /// IPv4: only `addr[0]` is used, the other words are zero.
    pub const V4: u8 = 4;
    /// IPv6: all four words are used.
    pub const V6: u8 = 6;
}

/// Transport protocol numbers (IANA), as in `bpf_sock_addr.protocol`.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Backend states stored in [`BackendValue::state`].
pub mod backend_state {
    /// Takes new connections.
    pub const ACTIVE: u8 = 0;
    /// Terminating: kept for reverse translation of existing flows, never chosen by a table.
    pub const TERMINATING: u8 = 1;
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// The service has no usable backend: connects fail with `ECONNREFUSED`.
    pub const REFUSE: u32 = 1;
}

/// Indices of the per-CPU counters in the stats map.
pub mod stats {
    /// connect() to a frontend translated to a backend.
    pub const CONNECT_LB: u32 = 0;
    /// connect() to a frontend refused (no usable backend).
    pub const CONNECT_REFUSED: u32 = 1;
    /// sendmsg() to a frontend translated to a backend.
    pub const SENDMSG_LB: u32 = 2;
    /// sendmsg() to a frontend refused (no usable backend).
    pub const SENDMSG_REFUSED: u32 = 3;
    /// recvmsg()/getpeername() translated back to the frontend.
    pub const REVNAT_HIT: u32 = 4;
    /// A table slot pointed to a backend id missing from the backends map.
    pub const BACKEND_MISSING: u32 = 5;
    /// The reverse-NAT entry could not be written (the connect still proceeds).
    pub const REVNAT_UPDATE_FAILED: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;
    /// Counter names, indexed like the constants above (for dumps and metrics).
    pub const NAMES: [&str; COUNT as usize] = [
        "connect_lb",
        "connect_refused",
        "sendmsg_lb",
        "sendmsg_refused",
        "revnat_hit",
        "backend_missing",
        "revnat_update_failed",
    ];
}

/// Reserved security identities the datapath itself relies on (Cilium's numbering).
pub mod identity {
    /// Any peer: in a rule, admits every identity; never an address's identity.
    pub const ANY: u32 = 0;
    /// Everything outside the IP cache.
    pub const WORLD: u32 = 2;
}

/// Bits of [`IpCacheEntry::flags`].
pub mod ipcache_flags {
    /// The owning cluster is not synced yet: the prefix is not enforced.
    pub const SYNCING: u8 = 1;
}

/// Bits of [`PolicyOwnerEntry::flags`].
pub mod owner_flags {
    /// New inbound connections/flows need an ingress rule.
    pub const INGRESS_ISOLATED: u8 = 1;
    /// Connects/sends need an egress rule.
    pub const EGRESS_ISOLATED: u8 = 2;
}

/// Direction byte of a [`PolicyKey`] (and of a [`PolicyEvent`]).
pub mod direction {
    /// Into the endpoint.
    pub const INGRESS: u8 = 0;
    /// Out of the endpoint.
    pub const EGRESS: u8 = 1;
}

/// Indices of the per-CPU counters in the policy stats map, in the order of the agent's
/// `PolicyCounters` fields.
pub mod pol_stats {
    /// Connects/sends of an enforced socket allowed (by a rule, a non-isolated owner).
    pub const EGRESS_ALLOWED: u32 = 0;
    /// Connects/sends refused with `EPERM`.
    pub const EGRESS_DENIED: u32 = 1;
    /// New inbound connections/flows of an isolated owner allowed by a rule.
    pub const INGRESS_ALLOWED: u32 = 2;
    /// New inbound connections/flows dropped.
    pub const INGRESS_DENIED: u32 = 3;
    /// Verdicts skipped because the peer's prefix is syncing.
    pub const SYNCING_PASSED: u32 = 4;
    /// Inbound replies to what an isolated owner opened (TCP SYN-ACK, remembered UDP peers).
    pub const REPLY_PASSED: u32 = 5;
    /// Number of counters.
    pub const COUNT: u32 = 6;
}

/// Data of an IPv4 IP cache key: the address bytes in network order (prefix length in the
/// LPM key header).
pub type IpCacheKey4 = [u8; 4];
/// Data of an IPv6 IP cache key: the address bytes in network order.
pub type IpCacheKey6 = [u8; 16];

/// What the IP cache says of a prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpCacheEntry {
    /// Security identity.
    pub identity: u32,
    /// Cluster ID of the owning cluster (0: none).
    pub cluster_id: u16,
    /// [`ipcache_flags`] bits.
    pub flags: u8,
    /// Always zero.
    pub pad: u8,
}

/// A cgroup whose sockets are enforced, and the policy owner (pod cgroup) it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyOwnerEntry {
    /// Cgroup id of the pod cgroup owning the rules (first field of [`PolicyKey`]).
    pub owner: u64,
    /// The owner's own security identity (reported in denied-flow events).
    pub identity: u32,
    /// Active rule generation (the second field of [`PolicyKey`]).
    pub generation: u8,
    /// [`owner_flags`] bits.
    pub flags: u8,
    /// Always zero.
    pub pad: u16,
}

/// Value of a rule in the policy map.
pub const POLICY_ALLOW: u32 = 1;

/// Prefix length (bits) of a rule that admits every protocol: owner, generation,
/// direction and peer identity.
pub const POLICY_PREFIX_ANY_PROTOCOL: u32 = 112;
/// Prefix length of a rule for one protocol and every port.
pub const POLICY_PREFIX_PROTOCOL: u32 = 120;
/// Prefix length of a lookup (and of a rule for exactly one port).
pub const POLICY_PREFIX_FULL: u32 = 136;

/// Data of a policy map key. Every field is a big-endian byte string so that the LPM
/// prefix bits run from the owner down to the port: a rule's prefix ends after the
/// identity (any protocol), after the protocol (any port) or inside the port (a port
/// block). Lookups use [`POLICY_PREFIX_FULL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Owner cgroup id, big-endian.
    pub owner: [u8; 8],
    /// Rule generation.
    pub generation: u8,
    /// [`direction`] byte.
    pub direction: u8,
    /// Peer security identity, big-endian (0: any peer).
    pub identity: [u8; 4],
    /// IP protocol number (0 only in rules admitting every protocol).
    pub protocol: u8,
    /// Port, big-endian (bits past the rule's prefix are zero).
    pub port: [u8; 2],
}

impl PolicyKey {
    /// Builds a key from host-order numbers.
    #[inline(always)]
    #[must_use]
    pub fn new(
        owner: u64,
        generation: u8,
        direction: u8,
        identity: u32,
        protocol: u8,
        port: u16,
    ) -> Self {
        Self {
            owner: owner.to_be_bytes(),
            generation,
            direction,
            identity: identity.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
        }
    }

    /// Owner cgroup id (host order).
    #[must_use]
    pub fn owner(&self) -> u64 {
        u64::from_be_bytes(self.owner)
    }

    /// Peer identity (host order).
    #[must_use]
    pub fn identity(&self) -> u32 {
        u32::from_be_bytes(self.identity)
    }

    /// Port (host order).
    #[must_use]
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Key of the UDP peers map: a socket of an enforced owner and a peer it sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct UdpPeerKey {
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Peer address words, network byte order (IPv4, also v4-mapped: `addr[0]` only).
    pub addr: [u32; 4],
    /// Peer port, network byte order.
    pub port: u16,
    /// [`family`] tag of the peer address.
    pub family: u8,
    /// Always zero.
    pub pad: u8,
    /// Always zero.
    pub pad2: u32,
}

/// A denied flow, as read from the events ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyEvent {
    /// Owner cgroup id.
    pub owner: u64,
    /// Peer address words, network byte order (IPv4: `addr[0]` only).
    pub peer_addr: [u32; 4],
    /// The owner's security identity.
    pub owner_identity: u32,
    /// The peer's security identity (from the IP cache, `WORLD` without a match).
    pub peer_identity: u32,
    /// Destination port of the flow (the peer's for egress, the owner's for ingress),
    /// host order.
    pub port: u16,
    /// IP protocol number.
    pub protocol: u8,
    /// [`direction`] byte.
    pub direction: u8,
    /// [`family`] tag of `peer_addr`.
    pub family: u8,
    /// Always zero.
    pub pad: [u8; 11],
}

/// Key of the services map: one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Address words in network byte order (IPv4 uses `addr[0]` only).
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// [`family`] tag.
    pub family: u8,
}

/// Value of the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// Dense service id (key of the service meta map).
    pub service_id: u32,
    /// Offset of the service's Maglev table in the slab.
    pub table_offset: u32,
    /// Table size M (0 when the service has no usable backend).
    pub table_size: u32,
    /// [`service_flags`] bits.
    pub flags: u32,
}

/// Value of the backends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    /// Address words in network byte order (IPv4 uses `addr[0]` only).
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port: u16,
    /// [`family`] tag.
    pub family: u8,
    /// [`backend_state`].
    pub state: u8,
    /// Index into the clusters map naming the backend's cluster.
    pub cluster: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}

/// Key of the reverse-NAT map: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatKey {
    /// Socket cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// Backend address words, network byte order.
    pub addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// [`family`] tag of the socket's address (v4-mapped v6 addresses use `V6`).
    pub family: u8,
    /// Always zero.
    pub pad: u8,
    /// Always zero.
    pub pad2: u32,
}

/// Value of the reverse-NAT map: the frontend the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatValue {
    /// Frontend address words, network byte order.
    pub addr: [u32; 4],
    /// Frontend port, network byte order.
    pub port: u16,
    /// [`family`] tag.
    pub family: u8,
    /// Always zero.
    pub pad: u8,
}

/// Longest service name stored in [`ServiceMeta`] (`namespace/name:port`).
pub const SERVICE_NAME_MAX: usize = 240;

/// Userspace bookkeeping per service id, so a restarted agent can rebuild its allocator
/// and its view of the kernel state from the pinned maps alone.
///
/// The service's slab region is `[table (table_size ids) | backends (backend_count ids)]`:
/// the backend list (active and terminating) follows the table and is never read by the
/// kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceMeta {
    /// Start of the service's slab region (equals the table offset).
    pub region_offset: u32,
    /// Table size M.
    pub table_size: u32,
    /// Number of backend ids stored after the table.
    pub backend_count: u32,
    /// Length of the name in `name`.
    pub name_len: u32,
    /// UTF-8 `namespace/name/port-name`, zero padded.
    pub name: [u8; SERVICE_NAME_MAX],
}

impl Default for ServiceMeta {
    fn default() -> Self {
        Self {
            region_offset: 0,
            table_size: 0,
            backend_count: 0,
            name_len: 0,
            name: [0; SERVICE_NAME_MAX],
        }
    }
}

/// Longest cluster name (Cilium allows 32 characters).
pub const CLUSTER_NAME_MAX: usize = 60;

/// A cluster name stored in the clusters map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClusterName {
    /// Length of the name in `name` (0: slot unused).
    pub len: u32,
    /// UTF-8 name, zero padded.
    pub name: [u8; CLUSTER_NAME_MAX],
}

impl Default for ClusterName {
    fn default() -> Self {
        Self {
            len: 0,
            name: [0; CLUSTER_NAME_MAX],
        }
    }
}

/// Stored at index 0 of the layout map: which layout wrote the pinned maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LayoutMeta {
    /// [`LAYOUT_MAGIC`] once initialised (zero in a fresh map).
    pub magic: u64,
    /// [`ABI_VERSION`] of the writer.
    pub abi_version: u32,
    /// Slab capacity in entries.
    pub slab_capacity: u32,
}

/// Picks a Maglev table slot for a flow hash.
///
/// The input (a socket cookie, optionally mixed with the frontend) is passed through the
/// 64-bit finaliser of SplitMix64 (Steele, Lea, Flood: "Fast splittable pseudorandom number
/// generators", OOPSLA 2014; constants from Stafford's "Mix13" variant) so that
/// consecutive cookies land on unrelated slots, then reduced modulo the table size.
/// Returns 0 for an empty table (callers check the size first).
#[inline(always)]
#[must_use]
pub fn maglev_slot(flow: u64, table_size: u32) -> u32 {
    if table_size == 0 {
        return 0;
    }
    let mut z = flow;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // The remainder is < table_size <= u32::MAX, so the cast is lossless.
    (z % u64::from(table_size)) as u32
}

/// Mixes a frontend into a flow hash for unconnected UDP, where one socket may talk to
/// several services: the same socket keeps the same backend per frontend.
#[inline(always)]
#[must_use]
pub fn flow_with_frontend(cookie: u64, key: &ServiceKey) -> u64 {
    let a = (u64::from(key.addr[0]) << 32) | u64::from(key.addr[3]);
    let b = (u64::from(key.addr[1]) << 32) | u64::from(key.addr[2]);
    cookie ^ a.rotate_left(17) ^ b.rotate_left(41) ^ (u64::from(key.port) << 48)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, has no pointers, and its fields (including
    // the explicit padding fields) cover every byte, so any bit pattern is valid and no
    // byte is uninitialised.
    #[allow(unsafe_code)]
    mod impls {
        use crate::{
            BackendValue, ClusterName, IpCacheEntry, LayoutMeta, PolicyEvent, PolicyKey,
            PolicyOwnerEntry, RevNatKey, RevNatValue, ServiceKey, ServiceMeta, ServiceValue,
            UdpPeerKey,
        };
        unsafe impl aya::Pod for ServiceKey {}
        unsafe impl aya::Pod for ServiceValue {}
        unsafe impl aya::Pod for BackendValue {}
        unsafe impl aya::Pod for RevNatKey {}
        unsafe impl aya::Pod for RevNatValue {}
        unsafe impl aya::Pod for ServiceMeta {}
        unsafe impl aya::Pod for ClusterName {}
        unsafe impl aya::Pod for LayoutMeta {}
        unsafe impl aya::Pod for IpCacheEntry {}
        unsafe impl aya::Pod for PolicyOwnerEntry {}
        unsafe impl aya::Pod for PolicyKey {}
        unsafe impl aya::Pod for UdpPeerKey {}
        unsafe impl aya::Pod for PolicyEvent {}
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;
    use proptest::prelude::*;
    use std::vec;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<BackendValue>(), 16 + 2 + 1 + 1 + 2 + 1 + 1);
        assert_eq!(size_of::<RevNatKey>(), 8 + 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<RevNatValue>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<ServiceMeta>(), 16 + SERVICE_NAME_MAX);
        assert_eq!(size_of::<ClusterName>(), 4 + CLUSTER_NAME_MAX);
        assert_eq!(size_of::<LayoutMeta>(), 16);
        assert_eq!(size_of::<IpCacheEntry>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<PolicyOwnerEntry>(), 8 + 4 + 1 + 1 + 2);
        assert_eq!(size_of::<PolicyKey>(), 17);
        assert_eq!(core::mem::align_of::<PolicyKey>(), 1);
        assert_eq!(size_of::<UdpPeerKey>(), 8 + 16 + 2 + 1 + 1 + 4);
        assert_eq!(
            size_of::<PolicyEvent>(),
            8 + 16 + 4 + 4 + 2 + 1 + 1 + 1 + 11
        );
    }

    #[test]
    fn policy_key_is_big_endian_in_prefix_order() {
        let key = PolicyKey::new(
            0x0102_0304_0506_0708,
            1,
            direction::EGRESS,
            0x0a0b_0c0d,
            6,
            0x1f90,
        );
        assert_eq!(key.owner, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(key.identity, [0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(key.port, [0x1f, 0x90]);
        // Fields in prefix order: owner, generation, direction, identity, protocol, port.
        assert_eq!(core::mem::offset_of!(PolicyKey, generation), 8);
        assert_eq!(core::mem::offset_of!(PolicyKey, direction), 9);
        assert_eq!(core::mem::offset_of!(PolicyKey, identity), 10);
        assert_eq!(core::mem::offset_of!(PolicyKey, protocol), 14);
        assert_eq!(core::mem::offset_of!(PolicyKey, port), 15);
        assert_eq!(key.owner(), 0x0102_0304_0506_0708);
        assert_eq!(key.identity(), 0x0a0b_0c0d);
        assert_eq!(key.port(), 8080);
        // The protocol ends at bit 120, the port at 136.
        assert_eq!(POLICY_PREFIX_ANY_PROTOCOL, 8 * 14);
        assert_eq!(POLICY_PREFIX_PROTOCOL, 8 * 15);
        assert_eq!(POLICY_PREFIX_FULL, 8 * 17);
    }

    #[test]
    fn stats_names_cover_every_counter() {
        assert_eq!(stats::NAMES.len(), stats::COUNT as usize);
        assert_eq!(stats::NAMES[stats::REVNAT_HIT as usize], "revnat_hit");
    }

    #[test]
    fn empty_table_maps_to_slot_zero() {
        assert_eq!(maglev_slot(12345, 0), 0);
    }

    #[test]
    fn consecutive_cookies_spread_evenly_over_a_prime_table() {
        // Socket cookies are allocated sequentially; the mixer must still spread them.
        let m = 251u32;
        let mut counts = vec![0u32; m as usize];
        let n: u32 = 251 * 400;
        for cookie in 1..=u64::from(n) {
            counts[maglev_slot(cookie, m) as usize] += 1;
        }
        let expected = f64::from(n) / f64::from(m);
        // Binomial std-dev is sqrt(400) = 20; allow 6 sigma.
        for (slot, &c) in counts.iter().enumerate() {
            assert!(
                (f64::from(c) - expected).abs() < 120.0,
                "slot {slot} got {c}, expected about {expected}"
            );
        }
    }

    proptest! {
        #[test]
        fn slot_is_always_inside_the_table(flow in any::<u64>(), size in 1u32..=131_071) {
            prop_assert!(maglev_slot(flow, size) < size);
        }

        #[test]
        fn frontend_mixing_separates_ports(cookie in any::<u64>(), p1 in any::<u16>(), p2 in any::<u16>()) {
            prop_assume!(p1 != p2);
            let k1 = ServiceKey { port: p1, ..ServiceKey::default() };
            let k2 = ServiceKey { port: p2, ..ServiceKey::default() };
            prop_assert_ne!(flow_with_frontend(cookie, &k1), flow_with_frontend(cookie, &k2));
        }
    }
}
