//! clustermesh socket-level load balancer (cgroup `sock_addr` programs).
//!
//! Every process in the attached cgroup that connects (TCP, connected UDP) or sends
//! (unconnected UDP) to a service frontend has the destination rewritten to a backend
//! picked from the service's Maglev table, before any packet exists. The reverse hooks
//! (`recvmsg`, `getpeername`) translate the backend back to the frontend so applications
//! only ever see the service address. Map layouts live in `clustermesh-ebpf-common`.
//!
//! A service without a usable backend fails the call with `ECONNREFUSED`: the program sets
//! the syscall's return value with `bpf_set_retval` (Linux ≥ 5.18 for sock_addr hooks) and
//! rejects. Returning 0 alone would surface as `EPERM`, which is exactly what a policy
//! denial returns (see `policy`): egress policy is decided in the same hooks, on the
//! destination after translation, and ingress policy in a `cgroup_skb/ingress` program.
#![no_std]
#![no_main]

mod policy;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_skb, cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext},
    EbpfContext as _,
};
use clustermesh_ebpf_common::{
    capacity, family, flow_with_frontend, maglev_slot, proto, service_flags, stats, BackendValue,
    ClusterName, IpCacheEntry, IpCacheKey4, IpCacheKey6, LayoutMeta, PolicyKey, PolicyOwnerEntry,
    RevNatKey, RevNatValue, ServiceKey, ServiceMeta, ServiceValue, SlabChunk, UdpPeerKey,
    BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, SLAB_CHUNK,
};
use policy::Peer;

#[map(name = "CM_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "CM_BACKENDS")]
static BACKENDS: HashMap<u32, BackendValue> =
    HashMap::pinned(capacity::BACKENDS, BPF_F_NO_PREALLOC);

#[map(name = "CM_SLAB")]
static SLAB: Array<SlabChunk> = Array::pinned(capacity::SLAB_DEFAULT_ELEMENTS, BPF_F_MMAPABLE);

#[map(name = "CM_REVNAT")]
static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(capacity::REVNAT, 0);

// Userspace-only maps: declared here so one object defines (and pins) the whole layout.
#[map(name = "CM_SVC_META")]
static SERVICE_META: HashMap<u32, ServiceMeta> =
    HashMap::pinned(capacity::SERVICE_META, BPF_F_NO_PREALLOC);

#[map(name = "CM_CLUSTERS")]
static CLUSTERS: Array<ClusterName> = Array::pinned(capacity::CLUSTERS, 0);

#[map(name = "CM_LAYOUT")]
static LAYOUT: Array<LayoutMeta> = Array::pinned(1, 0);

#[map(name = "CM_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(capacity::STATS, 0);

// Policy maps (see `policy`). LPM tries are always created with BPF_F_NO_PREALLOC.
#[map(name = "CM_IPCACHE4")]
static IPCACHE4: LpmTrie<IpCacheKey4, IpCacheEntry> = LpmTrie::pinned(capacity::IPCACHE4, 0);

#[map(name = "CM_IPCACHE6")]
static IPCACHE6: LpmTrie<IpCacheKey6, IpCacheEntry> = LpmTrie::pinned(capacity::IPCACHE6, 0);

#[map(name = "CM_POL_CGROUPS")]
static POL_CGROUPS: HashMap<u64, PolicyOwnerEntry> =
    HashMap::pinned(capacity::POL_CGROUPS, BPF_F_NO_PREALLOC);

#[map(name = "CM_POLICY")]
static POLICY: LpmTrie<PolicyKey, u32> = LpmTrie::pinned(capacity::POLICY, 0);

#[map(name = "CM_POL_STATS")]
static POL_STATS: PerCpuArray<u64> = PerCpuArray::pinned(capacity::POL_STATS, 0);

#[map(name = "CM_POL_UDP")]
static POL_UDP: LruHashMap<UdpPeerKey, u8> = LruHashMap::pinned(capacity::POL_UDP, 0);

#[map(name = "CM_POL_EVENTS")]
static POL_EVENTS: RingBuf = RingBuf::pinned(capacity::POL_EVENTS, 0);

/// `sock_addr` verdict: let the syscall proceed (with the possibly rewritten address).
const ALLOW: i32 = 1;
/// `sock_addr` verdict: fail the syscall (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;
/// Linux `ECONNREFUSED`.
const ECONNREFUSED: i32 = 111;

fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it points to
        // this CPU's 8-byte slot, which no other CPU writes; programs are not preempted on
        // the same CPU in a way that interleaves with this read-modify-write.
        unsafe { *counter += 1 };
    }
}

/// Outcome of a frontend lookup.
enum Choice {
    /// Not a service address: leave the call alone.
    NotAService,
    /// A service without a usable backend.
    Refuse,
    /// Rewrite to this backend.
    Backend(BackendValue),
}

fn choose(key: &ServiceKey, flow: u64) -> Choice {
    // SAFETY: values in the services map are only replaced whole by userspace (one
    // update per frontend), never mutated in place, so the copy we read is consistent.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return Choice::NotAService;
    };
    if svc.table_size == 0 || svc.flags & service_flags::REFUSE != 0 {
        return Choice::Refuse;
    }
    let slot = maglev_slot(flow, svc.table_size);
    let Some(index) = svc.table_offset.checked_add(slot) else {
        return Choice::Refuse;
    };
    let Some(chunk) = SLAB.get(index / SLAB_CHUNK as u32) else {
        return Choice::Refuse;
    };
    let backend_id = chunk[(index % SLAB_CHUNK as u32) as usize];
    // The table only ever references backends that take new connections, so the backend's
    // state is not checked here: a backend turning terminating is dropped from the next
    // table, and checking the state would refuse connections in between.
    // SAFETY: as above, backend entries are replaced whole by userspace.
    match unsafe { BACKENDS.get(backend_id) } {
        Some(b) => Choice::Backend(*b),
        None => {
            count(stats::BACKEND_MISSING);
            Choice::Refuse
        }
    }
}

fn refuse(counter: u32) -> i32 {
    count(counter);
    // SAFETY: bpf_set_retval only stores the errno the syscall will return; it is allowed
    // for connect/sendmsg sock_addr hooks (the only callers).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

fn protocol_of(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        6 => Some(proto::TCP),
        17 => Some(proto::UDP),
        _ => None,
    }
}

/// The socket's protocol number as one byte (IANA numbers fit; anything else is 0).
fn raw_protocol(sa: &bpf_sock_addr) -> u8 {
    u8::try_from(sa.protocol).unwrap_or(0)
}

/// Records which frontend a socket asked for, keyed by the backend it now talks to.
/// `seen` is the backend address exactly as the socket sees it (v4-mapped for a v6 socket).
fn remember(cookie: u64, seen: [u32; 4], port: u16, sock_family: u8, frontend: &RevNatValue) {
    let key = RevNatKey {
        cookie,
        addr: seen,
        port,
        family: sock_family,
        pad: 0,
        pad2: 0,
    };
    if REVNAT.insert(key, frontend, 0).is_err() {
        count(stats::REVNAT_UPDATE_FAILED);
    }
}

/// IPv4 forward translation (connect4 / sendmsg4).
fn xlate4(ctx: &SockAddrContext, connected: bool) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: socket cookies are available to every sock_addr program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(protocol) = protocol_of(sa) else {
        let peer = Peer {
            family: family::V4,
            addr: [sa.user_ip4, 0, 0, 0],
        };
        return policy::egress(cookie, raw_protocol(sa), &peer, sa.user_port as u16);
    };
    let key = ServiceKey {
        addr: [sa.user_ip4, 0, 0, 0],
        // The port is in network order in the low 16 bits.
        port: sa.user_port as u16,
        proto: protocol,
        family: family::V4,
    };
    let flow = if connected {
        cookie
    } else {
        flow_with_frontend(cookie, &key)
    };
    match choose(&key, flow) {
        Choice::NotAService => {
            let peer = Peer {
                family: family::V4,
                addr: key.addr,
            };
            policy::egress(cookie, protocol, &peer, key.port)
        }
        Choice::Refuse => refuse(if connected {
            stats::CONNECT_REFUSED
        } else {
            stats::SENDMSG_REFUSED
        }),
        Choice::Backend(b) if b.family == family::V4 => {
            sa.user_ip4 = b.addr[0];
            sa.user_port = u32::from(b.port);
            let frontend = RevNatValue {
                addr: key.addr,
                port: key.port,
                family: family::V4,
                pad: 0,
            };
            remember(cookie, b.addr, b.port, family::V4, &frontend);
            count(if connected {
                stats::CONNECT_LB
            } else {
                stats::SENDMSG_LB
            });
            let peer = Peer {
                family: family::V4,
                addr: b.addr,
            };
            policy::egress(cookie, protocol, &peer, b.port)
        }
        Choice::Backend(_) => refuse(stats::BACKEND_MISSING),
    }
}

/// `::ffff:0:0/96` prefix word in network byte order (`0x0000ffff` big-endian).
const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

/// IPv6 forward translation (connect6 / sendmsg6), including v4-mapped destinations of
/// dual-stack sockets, which are looked up as IPv4 frontends.
fn xlate6(ctx: &SockAddrContext, connected: bool) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: socket cookies are available to every sock_addr program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let ip = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD;
    // The policy peer of the untranslated destination (v4-mapped: the IPv4 address).
    let dest = if mapped {
        Peer {
            family: family::V4,
            addr: [ip[3], 0, 0, 0],
        }
    } else {
        Peer {
            family: family::V6,
            addr: ip,
        }
    };
    let Some(protocol) = protocol_of(sa) else {
        return policy::egress(cookie, raw_protocol(sa), &dest, sa.user_port as u16);
    };
    let key = ServiceKey {
        addr: if mapped { [ip[3], 0, 0, 0] } else { ip },
        port: sa.user_port as u16,
        proto: protocol,
        family: if mapped { family::V4 } else { family::V6 },
    };
    let flow = if connected {
        cookie
    } else {
        flow_with_frontend(cookie, &key)
    };
    let b = match choose(&key, flow) {
        Choice::NotAService => return policy::egress(cookie, protocol, &dest, key.port),
        Choice::Refuse => {
            return refuse(if connected {
                stats::CONNECT_REFUSED
            } else {
                stats::SENDMSG_REFUSED
            })
        }
        Choice::Backend(b) => b,
    };
    let new_ip = match (mapped, b.family) {
        (false, family::V6) => b.addr,
        (true, family::V4) => [0, 0, V4_MAPPED_WORD, b.addr[0]],
        _ => return refuse(stats::BACKEND_MISSING),
    };
    sa.user_ip6[0] = new_ip[0];
    sa.user_ip6[1] = new_ip[1];
    sa.user_ip6[2] = new_ip[2];
    sa.user_ip6[3] = new_ip[3];
    sa.user_port = u32::from(b.port);
    let frontend = RevNatValue {
        addr: ip,
        port: key.port,
        family: family::V6,
        pad: 0,
    };
    remember(cookie, new_ip, b.port, family::V6, &frontend);
    count(if connected {
        stats::CONNECT_LB
    } else {
        stats::SENDMSG_LB
    });
    let peer = Peer {
        family: b.family,
        addr: b.addr,
    };
    policy::egress(cookie, protocol, &peer, b.port)
}

/// Reverse translation (recvmsg / getpeername): backend address → frontend address.
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: socket cookies are available to every sock_addr program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = RevNatKey {
        cookie,
        addr: if v6 {
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ]
        } else {
            [sa.user_ip4, 0, 0, 0]
        },
        port: sa.user_port as u16,
        family: if v6 { family::V6 } else { family::V4 },
        pad: 0,
        pad2: 0,
    };
    // SAFETY: LRU entries are written whole by the forward path; a racing eviction can at
    // worst make us miss, which leaves the backend address visible.
    let Some(orig) = (unsafe { REVNAT.get(key) }).copied() else {
        return ALLOW;
    };
    if v6 {
        sa.user_ip6[0] = orig.addr[0];
        sa.user_ip6[1] = orig.addr[1];
        sa.user_ip6[2] = orig.addr[2];
        sa.user_ip6[3] = orig.addr[3];
    } else {
        sa.user_ip4 = orig.addr[0];
    }
    sa.user_port = u32::from(orig.port);
    count(stats::REVNAT_HIT);
    ALLOW
}

/// TCP and connected UDP over IPv4.
#[cgroup_sock_addr(connect4)]
fn cm_connect4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx, true)
}

/// TCP and connected UDP over IPv6 (and v4-mapped destinations).
#[cgroup_sock_addr(connect6)]
fn cm_connect6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx, true)
}

/// Unconnected UDP over IPv4.
#[cgroup_sock_addr(sendmsg4)]
fn cm_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx, false)
}

/// Unconnected UDP over IPv6.
#[cgroup_sock_addr(sendmsg6)]
fn cm_sendmsg6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx, false)
}

/// UDP replies over IPv4: the source becomes the frontend.
#[cgroup_sock_addr(recvmsg4)]
fn cm_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

/// UDP replies over IPv6: the source becomes the frontend.
#[cgroup_sock_addr(recvmsg6)]
fn cm_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

/// `getpeername` on IPv4 sockets reports the frontend.
#[cgroup_sock_addr(getpeername4)]
fn cm_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

/// `getpeername` on IPv6 sockets reports the frontend.
#[cgroup_sock_addr(getpeername6)]
fn cm_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

/// Ingress policy for every socket created in the attached cgroup (see `policy`).
#[cgroup_skb(ingress)]
fn cm_ingress(ctx: SkBuffContext) -> i32 {
    policy::ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // BPF programs cannot unwind or abort; the verifier rejects any reachable loop-free
    // panic path, so this is never executed.
    loop {}
}

/// GPL-compatible licence: needed for `bpf_get_socket_cookie` and friends.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
