//! NetworkPolicy verdicts: egress in the `sock_addr` hooks (after service translation),
//! ingress in a `cgroup_skb/ingress` program.
//!
//! A socket is enforced only when its cgroup is in `CM_POL_CGROUPS`; everything else (the
//! agent, host processes) pays one hash miss and is left alone. An enforced cgroup names
//! its owner (the pod cgroup) and the owner's active rule generation; rules live in one
//! LPM trie keyed by (owner, generation, direction, peer identity, protocol, port), so a
//! rule may end its prefix after the identity (any protocol), after the protocol (any
//! port) or inside the port (a port range as aligned blocks). A peer's identity comes from
//! the IP cache (LPM over addresses, `WORLD` without a match); a prefix still marked
//! syncing is not enforced, so a cluster that has not delivered its identities yet is not
//! cut off.
//!
//! There is no connection tracking. It is not needed for the socket model:
//! * egress is decided once per connect (TCP, connected UDP) or per send (unconnected UDP),
//!   before any packet exists; packets of an allowed socket need no further verdict;
//! * ingress decides only what opens something: a TCP SYN without ACK (a new connection
//!   to a listener) and a UDP datagram from a peer the socket never sent to. Every other
//!   TCP segment belongs to a connection that exists in the kernel, which could only have
//!   been created through a SYN this program admitted or a connect the pod made itself (a
//!   stray segment of a connection that does not exist is answered with a RST by the
//!   kernel, exactly as without policy). UDP peers a pod socket sent to are remembered
//!   (per socket cookie, LRU) so their replies pass.
//!
//! Other protocols (ICMP, SCTP ...) pass ingress unchecked; raw sockets are not seen by
//! the `sock_addr` hooks at all. Packets reaching a socket are already reassembled, so
//! there are no fragments without transport header here.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_skb_cgroup_id},
    maps::lpm_trie::Key,
    programs::SkBuffContext,
    EbpfContext as _,
};
use clustermesh_ebpf_common::{
    direction, family, identity, ipcache_flags, owner_flags, pol_stats, proto, IpCacheEntry,
    PolicyEvent, PolicyKey, PolicyOwnerEntry, UdpPeerKey, POLICY_PREFIX_FULL,
};

use crate::{IPCACHE4, IPCACHE6, POLICY, POL_CGROUPS, POL_EVENTS, POL_STATS, POL_UDP};

/// `cgroup_skb` verdict: deliver the packet.
const PASS: i32 = 1;
/// `cgroup_skb` verdict: drop the packet.
const DROP: i32 = 0;

fn count(index: u32) {
    if let Some(counter) = POL_STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it points to
        // this CPU's 8-byte slot, which no other CPU writes.
        unsafe { *counter += 1 };
    }
}

/// A peer of a flow: address (network order words, IPv4 in `addr[0]`) and family tag.
#[derive(Clone, Copy)]
pub(crate) struct Peer {
    pub(crate) family: u8,
    pub(crate) addr: [u32; 4],
}

fn owner_of(cgroup: u64) -> Option<PolicyOwnerEntry> {
    // SAFETY: owner entries are replaced whole by userspace, never mutated in place.
    unsafe { POL_CGROUPS.get(&cgroup) }.copied()
}

fn ipcache(peer: &Peer) -> IpCacheEntry {
    let found = if peer.family == family::V4 {
        let key = Key::new(32, peer.addr[0].to_ne_bytes());
        IPCACHE4.get(&key).copied()
    } else {
        let w = peer.addr;
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        let key = Key::new(
            128,
            [
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
                d[2], d[3],
            ],
        );
        IPCACHE6.get(&key).copied()
    };
    found.unwrap_or(IpCacheEntry {
        identity: identity::WORLD,
        cluster_id: 0,
        flags: 0,
        pad: 0,
    })
}

/// True when the owner's active generation has a rule admitting `peer_identity` (or any
/// peer) on `protocol`/`port` (host order) in `dir`.
fn allowed(owner: &PolicyOwnerEntry, dir: u8, peer_identity: u32, protocol: u8, port: u16) -> bool {
    let key = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey::new(
            owner.owner,
            owner.generation,
            dir,
            peer_identity,
            protocol,
            port,
        ),
    );
    if POLICY.get(&key).is_some() {
        return true;
    }
    let any = Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey::new(
            owner.owner,
            owner.generation,
            dir,
            identity::ANY,
            protocol,
            port,
        ),
    );
    POLICY.get(&any).is_some()
}

fn report_denied(
    owner: &PolicyOwnerEntry,
    dir: u8,
    peer: &Peer,
    peer_identity: u32,
    protocol: u8,
    port: u16,
) {
    let event = PolicyEvent {
        owner: owner.owner,
        peer_addr: peer.addr,
        owner_identity: owner.identity,
        peer_identity,
        port,
        protocol,
        direction: dir,
        family: peer.family,
        pad: [0; 11],
    };
    // A full ring buffer loses the event, never the verdict.
    let _ = POL_EVENTS.output::<PolicyEvent>(&event, 0);
}

/// Remembers that socket `cookie` sent to `peer`:`port_net` so the peer's replies pass an
/// isolated ingress.
fn remember_udp_peer(cookie: u64, peer: &Peer, port_net: u16) {
    let key = UdpPeerKey {
        cookie,
        addr: peer.addr,
        port: port_net,
        family: peer.family,
        pad: 0,
        pad2: 0,
    };
    // An LRU insert only fails under memory pressure; the reply is then checked by policy.
    let _ = POL_UDP.insert(&key, &1u8, 0);
}

/// Egress verdict of a connect/sendmsg to `peer`:`port_net` (the destination after
/// service translation). Returns the `sock_addr` verdict: 1 allow, 0 reject (the syscall
/// fails with `EPERM`: no `bpf_set_retval`, and the service path that sets
/// `ECONNREFUSED` never reaches this function).
#[inline(always)]
pub(crate) fn egress(cookie: u64, protocol: u8, peer: &Peer, port_net: u16) -> i32 {
    // SAFETY: available to sock_addr programs since Linux 6.1 (bpf_base_func_proto).
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let Some(owner) = owner_of(cgroup) else {
        return crate::ALLOW;
    };
    if protocol == proto::UDP {
        remember_udp_peer(cookie, peer, port_net);
    }
    if owner.flags & owner_flags::EGRESS_ISOLATED == 0 {
        count(pol_stats::EGRESS_ALLOWED);
        return crate::ALLOW;
    }
    let entry = ipcache(peer);
    if entry.flags & ipcache_flags::SYNCING != 0 {
        count(pol_stats::SYNCING_PASSED);
        return crate::ALLOW;
    }
    let port = u16::from_be(port_net);
    if allowed(&owner, direction::EGRESS, entry.identity, protocol, port) {
        count(pol_stats::EGRESS_ALLOWED);
        crate::ALLOW
    } else {
        count(pol_stats::EGRESS_DENIED);
        report_denied(
            &owner,
            direction::EGRESS,
            peer,
            entry.identity,
            protocol,
            port,
        );
        crate::REJECT
    }
}

/// IPv6 extension headers walked before giving up (each costs one load).
const MAX_EXT_HEADERS: u32 = 6;

/// Transport protocol and the offset of its header, or `None` when the packet cannot be
/// parsed (truncated, too many extension headers).
fn transport(ctx: &SkBuffContext, first: u8) -> Option<(Peer, u8, usize)> {
    match first >> 4 {
        4 => {
            let header: [u8; 20] = ctx.load(0).ok()?;
            let ihl = usize::from(header[0] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let src = u32::from_ne_bytes([header[12], header[13], header[14], header[15]]);
            let peer = Peer {
                family: family::V4,
                addr: [src, 0, 0, 0],
            };
            Some((peer, header[9], ihl))
        }
        6 => {
            let header: [u8; 40] = ctx.load(0).ok()?;
            let word = |i: usize| {
                u32::from_ne_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]])
            };
            let peer = Peer {
                family: family::V6,
                addr: [word(8), word(12), word(16), word(20)],
            };
            let mut next = header[6];
            let mut offset = 40usize;
            for _ in 0..MAX_EXT_HEADERS {
                let len = match next {
                    // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
                    0 | 43 | 60 => {
                        let ext: [u8; 2] = ctx.load(offset).ok()?;
                        next = ext[0];
                        (usize::from(ext[1]) + 1) * 8
                    }
                    // Fragment header: 8 bytes.
                    44 => {
                        let ext: [u8; 2] = ctx.load(offset).ok()?;
                        next = ext[0];
                        8
                    }
                    // Authentication header: (len + 2) * 4 bytes.
                    51 => {
                        let ext: [u8; 2] = ctx.load(offset).ok()?;
                        next = ext[0];
                        (usize::from(ext[1]) + 2) * 4
                    }
                    _ => return Some((peer, next, offset)),
                };
                offset += len;
            }
            None
        }
        _ => None,
    }
}

/// Ingress verdict for a packet delivered to a socket of an enforced cgroup.
#[inline(always)]
pub(crate) fn ingress(ctx: &SkBuffContext) -> i32 {
    // SAFETY: the context is the program's __sk_buff; the helper reads the cgroup of the
    // receiving socket (set while cgroup_skb ingress programs run).
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let Some(owner) = owner_of(cgroup) else {
        return PASS;
    };
    if owner.flags & owner_flags::INGRESS_ISOLATED == 0 {
        return PASS;
    }
    let Ok(first) = ctx.load::<u8>(0) else {
        return PASS;
    };
    let Some((peer, protocol, l4)) = transport(ctx, first) else {
        // An isolated endpoint does not take what cannot be classified.
        count(pol_stats::INGRESS_DENIED);
        return DROP;
    };
    let port = match protocol {
        proto::TCP => {
            // Ports (4 bytes), sequence and ack numbers (8), offset (1), flags (1).
            let Ok(tcp) = ctx.load::<[u8; 14]>(l4) else {
                count(pol_stats::INGRESS_DENIED);
                return DROP;
            };
            let flags = tcp[13];
            let (syn, ack) = (flags & 0x02 != 0, flags & 0x10 != 0);
            if !syn {
                return PASS;
            }
            if ack {
                count(pol_stats::REPLY_PASSED);
                return PASS;
            }
            u16::from_be_bytes([tcp[2], tcp[3]])
        }
        proto::UDP => {
            let Ok(udp) = ctx.load::<[u8; 4]>(l4) else {
                count(pol_stats::INGRESS_DENIED);
                return DROP;
            };
            // SAFETY: the skb's socket is the receiving socket while the program runs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let key = UdpPeerKey {
                cookie,
                addr: peer.addr,
                port: u16::from_ne_bytes([udp[0], udp[1]]),
                family: peer.family,
                pad: 0,
                pad2: 0,
            };
            // SAFETY: LRU entries are written whole; a racing eviction makes us miss and
            // check the datagram by policy instead.
            if unsafe { POL_UDP.get(&key) }.is_some() {
                count(pol_stats::REPLY_PASSED);
                return PASS;
            }
            u16::from_be_bytes([udp[2], udp[3]])
        }
        _ => return PASS,
    };
    let entry = ipcache(&peer);
    if entry.flags & ipcache_flags::SYNCING != 0 {
        count(pol_stats::SYNCING_PASSED);
        return PASS;
    }
    if allowed(&owner, direction::INGRESS, entry.identity, protocol, port) {
        count(pol_stats::INGRESS_ALLOWED);
        PASS
    } else {
        count(pol_stats::INGRESS_DENIED);
        report_denied(
            &owner,
            direction::INGRESS,
            &peer,
            entry.identity,
            protocol,
            port,
        );
        DROP
    }
}
