//! Privileged behaviour tests of policy enforcement on the real kernel.
//!
//! Each test creates its own threaded cgroup (the programs are attached there) with
//! threaded child cgroups as "pods", and its own pin directory. Pods are threads moved
//! into a child cgroup; their sockets are enforced by the owner entry of that cgroup.
//! Peers are real TCP/UDP servers and clients on distinct 127.0.0.0/8 addresses whose IP
//! cache entries (/32) give them security identities, so nothing leaves the machine.
//!
//! Without root, cgroup2 or bpf these tests skip with a message, unless
//! `CLUSTERMESH_REQUIRE_PRIVILEGED=1`, in which case they fail.
// Test helpers panic on setup failures like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use clustermesh_agent::bpf::{cgroup2_mount, BpfConfig, BpfDatapath, BpfError, BpfPolicy};
use clustermesh_agent_core::{
    datapath::{Backend, DesiredService, Frontend},
    maglev::Maglev,
    policy::datapath::{
        Direction, EndpointRules, IpCacheValue, PolicyDatapath, PolicyOwner, RuleKey,
    },
};
use clustermesh_api::{
    cidr::Cidr,
    model::{Affinity, BackendState, Protocol, ServicePortId, Tier},
};
use clustermesh_test_support::prerequisites::may_run;

// ---------------------------------------------------------------------------------------
// Environment: per-test cgroup with pod cgroups, and pin directory.

/// Linux `EPERM`: what a policy denial returns from connect/sendmsg.
const EPERM: i32 = 1;

struct Sandbox {
    name: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    pods: Vec<PathBuf>,
}

/// A pod: a threaded child cgroup of the sandbox.
#[derive(Clone)]
struct Pod {
    cgroup: PathBuf,
    id: u64,
}

impl Sandbox {
    fn new(test: &str) -> Option<Self> {
        let test_name = format!("bpf_policy::{test}");
        if !nix::unistd::geteuid().is_root() {
            may_run(&test_name, Some("not running as root".into()));
            return None;
        }
        let root = match cgroup2_mount() {
            Ok(root) => root,
            Err(e) => {
                may_run(&test_name, Some(format!("no cgroup2 filesystem: {e}")));
                return None;
            }
        };
        let name = format!("cm-pol-{}-{test}", std::process::id());
        let cgroup = root.join(&name);
        let _ = std::fs::remove_dir(&cgroup);
        if let Err(e) = std::fs::create_dir(&cgroup)
            .and_then(|()| std::fs::write(cgroup.join("cgroup.type"), "threaded"))
        {
            let _ = std::fs::remove_dir(&cgroup);
            may_run(
                &test_name,
                Some(format!(
                    "cannot create threaded cgroup {}: {e}",
                    cgroup.display()
                )),
            );
            return None;
        }
        Some(Self {
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            name,
            cgroup,
            pods: Vec::new(),
        })
    }

    fn config(&self) -> BpfConfig {
        BpfConfig::default()
            .with_pin_dir(&self.pin_dir)
            .with_cgroup(&self.cgroup)
            .with_slab_entries(1 << 16)
    }

    /// Opens the datapath and its policy half; `None` (skip) without privileges.
    fn open(&self) -> Option<(BpfDatapath, BpfPolicy)> {
        match BpfDatapath::open(self.config()) {
            Ok(dp) => {
                let policy = dp.policy().expect("open the policy maps");
                Some((dp, policy))
            }
            Err(e @ (BpfError::MissingPrivileges { .. } | BpfError::BpffsNotMounted { .. })) => {
                may_run(&self.name, Some(e.to_string()));
                None
            }
            Err(e) => panic!("opening the datapath failed: {e}"),
        }
    }

    /// Creates a pod cgroup below the sandbox.
    fn pod(&mut self, name: &str) -> Pod {
        let cgroup = self.cgroup.join(name);
        std::fs::create_dir(&cgroup).unwrap();
        std::fs::write(cgroup.join("cgroup.type"), "threaded").unwrap();
        self.pods.push(cgroup.clone());
        // The kernel's cgroup id is the cgroup directory's inode number.
        let id = std::fs::metadata(&cgroup).unwrap().ino();
        Pod { cgroup, id }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = BpfDatapath::cleanup_pins(&BpfConfig::default().with_pin_dir(&self.pin_dir));
        for dir in self.pods.iter().rev().chain(std::iter::once(&self.cgroup)) {
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Pod {
    /// Runs `f` on a fresh thread that lives in this pod's cgroup.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("pod thread panicked")
    }

    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let threads = self.cgroup.join("cgroup.threads");
        std::thread::spawn(move || {
            let tid = nix::unistd::gettid();
            std::fs::write(&threads, tid.to_string()).expect("move the thread into the pod");
            f()
        })
    }

    fn owner(&self, identity: u32) -> PolicyOwner {
        PolicyOwner {
            owner: self.id,
            cgroups: vec![self.id],
            identity,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Peers.

/// A TCP server that greets every connection with one byte, then echoes.
struct TcpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl TcpServer {
    fn start(ip: &str) -> Self {
        Self::serve(TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).unwrap())
    }

    /// Serves a listener created elsewhere (e.g. in a pod, so that its sockets belong to
    /// the pod's cgroup).
    fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = stream else { continue };
                std::thread::spawn(move || {
                    if s.write_all(b"G").is_err() {
                        return;
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop. Policy may drop the wake-up SYN (an isolated pod's
        // listener): then the thread is left blocked in accept rather than joined.
        if TcpStream::connect_timeout(&self.addr, Duration::from_millis(300)).is_ok() {
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// A UDP server answering every datagram with its payload.
struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpEcho {
    fn start(ip: &str) -> Self {
        let sock = UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Connects and reads the greeting.
fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = [0u8; 1];
    s.read_exact(&mut greeting)?;
    Ok(s)
}

/// Connects from source address `from` (a client outside every pod) within `timeout`.
fn connect_from(from: &str, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&local.into())?;
    sock.connect_timeout(&to.into(), timeout)?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut greeting = [0u8; 1];
    s.read_exact(&mut greeting)?;
    Ok(s)
}

fn assert_eperm<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    let err = r.expect_err(&format!("{what}: must be denied"));
    assert_eq!(err.raw_os_error(), Some(EPERM), "{what}: {err}");
}

// ---------------------------------------------------------------------------------------
// Desired-state helpers.

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).unwrap()
}

fn identity(identity: u32) -> Option<IpCacheValue> {
    Some(IpCacheValue {
        identity,
        cluster_id: 1,
        syncing: false,
    })
}

fn syncing() -> Option<IpCacheValue> {
    Some(IpCacheValue {
        identity: 0,
        cluster_id: 2,
        syncing: true,
    })
}

fn port_rule(identity: u32, protocol: u8, port: u16) -> RuleKey {
    RuleKey {
        identity,
        protocol,
        port,
        port_bits: 16,
    }
}

fn any_port(identity: u32, protocol: u8) -> RuleKey {
    RuleKey {
        identity,
        protocol,
        port: 0,
        port_bits: 0,
    }
}

fn egress_only(rules: &[RuleKey]) -> EndpointRules {
    EndpointRules {
        ingress: None,
        egress: Some(rules.iter().copied().collect()),
    }
}

fn ingress_only(rules: &[RuleKey]) -> EndpointRules {
    EndpointRules {
        ingress: Some(rules.iter().copied().collect()),
        egress: None,
    }
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const WEB: u32 = 1001;
const DB: u32 = 1002;
const WORLD: u32 = 2;

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn egress_is_decided_by_peer_identity_protocol_and_port() {
    let Some(mut sb) = Sandbox::new("egress") else {
        return;
    };
    let Some((_dp, mut policy)) = sb.open() else {
        return;
    };
    let pod = sb.pod("client");
    let web = TcpServer::start("127.0.60.2");
    let web_other_port = TcpServer::start("127.0.60.2");
    let db = TcpServer::start("127.0.60.3");
    let world = TcpServer::start("127.0.60.4");
    let syncing_peer = TcpServer::start("127.0.61.5");
    let web6 = TcpServer::start("::1");
    let db_udp = UdpEcho::start("127.0.60.3");
    policy
        .apply_ipcache(&[
            (cidr("127.0.60.2/32"), identity(WEB)),
            (cidr("127.0.60.3/32"), identity(DB)),
            (cidr("127.0.61.0/24"), syncing()),
            (cidr("::1/128"), identity(WEB)),
        ])
        .unwrap();
    policy
        .install(
            &pod.owner(5000),
            &egress_only(&[
                port_rule(WEB, TCP, web.addr.port()),
                port_rule(WEB, TCP, web6.addr.port()),
            ]),
        )
        .unwrap();

    let (web_a, web_b, db_a, world_a, sync_a, web6_a) = (
        web.addr,
        web_other_port.addr,
        db.addr,
        world.addr,
        syncing_peer.addr,
        web6.addr,
    );
    pod.run(move || {
        connect(web_a).expect("allowed identity and port");
        connect(web6_a).expect("allowed identity and port over IPv6");
        assert_eperm("allowed identity, other port", connect(web_b));
        assert_eperm("identity without a rule", connect(db_a));
        assert_eperm("world", connect(world_a));
        connect(sync_a).expect("a syncing prefix is not enforced");
        // A v4-mapped destination of an IPv6 socket is looked up as IPv4.
        let mapped: SocketAddr = format!("[::ffff:{}]:{}", db_a.ip(), db_a.port())
            .parse()
            .unwrap();
        assert_eperm("v4-mapped identity without a rule", connect(mapped));
    });
    // Threads of the sandbox outside every pod are not enforced.
    let outside = sb.pod("not-a-policy-owner");
    outside.run(move || {
        connect(db_a).expect("a cgroup without owner entry is not enforced");
    });
    let counters = policy.counters().unwrap();
    assert_eq!(counters.egress_allowed, 2, "{counters:?}");
    assert_eq!(counters.egress_denied, 4, "{counters:?}");
    assert_eq!(counters.syncing_passed, 1, "{counters:?}");

    let denied = policy.drain_denied_flows(100);
    assert_eq!(denied.len(), 4, "{denied:?}");
    assert!(denied.iter().all(|f| f.direction == Direction::Egress
        && f.owner_identity == 5000
        && f.owner == pod.id));
    let peers: BTreeSet<u32> = denied.iter().map(|f| f.peer_identity).collect();
    assert_eq!(peers, BTreeSet::from([WEB, DB, WORLD]));
    assert!(denied
        .iter()
        .any(|f| f.peer == db_a.ip() && f.port == db_a.port() && f.protocol == TCP));

    // Rules replaced by install take effect: now DB on any TCP port, and nothing else.
    policy
        .install(&pod.owner(5000), &egress_only(&[any_port(DB, TCP)]))
        .unwrap();
    let udp_to = db_udp.addr;
    pod.run(move || {
        connect(db_a).expect("newly allowed identity");
        assert_eperm("no longer allowed", connect(web_a));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eperm("UDP has no rule", sock.send_to(b"x", udp_to));
    });
}

#[test]
fn egress_is_decided_on_the_translated_backend() {
    let Some(mut sb) = Sandbox::new("xlate") else {
        return;
    };
    let Some((dp, mut policy)) = sb.open() else {
        return;
    };
    let pod = sb.pod("client");
    let allowed = TcpServer::start("127.0.62.2");
    let denied = TcpServer::start("127.0.62.3");
    let to_allowed: SocketAddr = "127.77.62.1:80".parse().unwrap();
    let to_denied: SocketAddr = "127.77.62.2:80".parse().unwrap();
    let to_nothing: SocketAddr = "127.77.62.3:80".parse().unwrap();
    dp.reconcile(&[
        service("allowed", to_allowed, &[allowed.addr]),
        service("denied", to_denied, &[denied.addr]),
        service("empty", to_nothing, &[]),
    ])
    .unwrap();
    policy
        .apply_ipcache(&[
            (cidr("127.0.62.2/32"), identity(WEB)),
            (cidr("127.0.62.3/32"), identity(DB)),
        ])
        .unwrap();
    // The VIPs themselves are "world": only the backend's identity can allow.
    policy
        .install(
            &pod.owner(5000),
            &egress_only(&[port_rule(WEB, TCP, allowed.addr.port())]),
        )
        .unwrap();
    pod.run(move || {
        for _ in 0..3 {
            connect(to_allowed).expect("the VIP's backend is allowed");
            assert_eperm("the VIP's backend is denied", connect(to_denied));
            // A refusal (no backend) stays ECONNREFUSED and does not leak into the next
            // verdict.
            let err = TcpStream::connect_timeout(&to_nothing, Duration::from_secs(2)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        }
    });
    let counters = policy.counters().unwrap();
    assert_eq!((counters.egress_allowed, counters.egress_denied), (3, 3));
    let flows = policy.drain_denied_flows(10);
    assert!(flows
        .iter()
        .all(|f| f.peer == denied.addr.ip() && f.port == denied.addr.port()));
}

#[test]
fn ingress_isolation_admits_only_allowed_sources_and_replies() {
    let Some(mut sb) = Sandbox::new("ingress") else {
        return;
    };
    let Some((_dp, mut policy)) = sb.open() else {
        return;
    };
    let pod = sb.pod("server");
    // The pod's listener and UDP socket are created in the pod: they are its sockets.
    let (listener, udp) = pod.run(|| {
        let l = TcpListener::bind("127.0.63.10:0").unwrap();
        let u = UdpSocket::bind("127.0.63.10:0").unwrap();
        (l, u)
    });
    let server = TcpServer::serve(listener);
    let pod_udp = udp.local_addr().unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let remote_db = TcpServer::start("127.0.63.3");
    let remote_db_udp = UdpEcho::start("127.0.63.3");
    policy
        .apply_ipcache(&[
            (cidr("127.0.63.2/32"), identity(WEB)),
            (cidr("127.0.63.3/32"), identity(DB)),
            (cidr("127.0.64.0/24"), syncing()),
        ])
        .unwrap();
    policy
        .install(
            &pod.owner(6000),
            &ingress_only(&[
                port_rule(WEB, TCP, server.addr.port()),
                port_rule(WEB, UDP, pod_udp.port()),
            ]),
        )
        .unwrap();

    let short = Duration::from_millis(700);
    connect_from("127.0.63.2", server.addr, short).expect("allowed source");
    let err = connect_from("127.0.63.3", server.addr, short).expect_err("denied source");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "the SYN is dropped: {err}");
    connect_from("127.0.63.4", server.addr, short).expect_err("world is denied");
    connect_from("127.0.64.5", server.addr, short).expect("a syncing source passes");

    // Datagrams: only the allowed identity gets through.
    let mut buf = [0u8; 16];
    UdpSocket::bind("127.0.63.3:0")
        .unwrap()
        .send_to(b"db", pod_udp)
        .unwrap();
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "a datagram from DB is dropped"
    );
    UdpSocket::bind("127.0.63.2:0")
        .unwrap()
        .send_to(b"web", pod_udp)
        .unwrap();
    let (n, _) = udp.recv_from(&mut buf).expect("a datagram from WEB passes");
    assert_eq!(&buf[..n], b"web");

    // What the pod opens itself gets its replies, though the peer may not connect in.
    let (db_tcp, db_udp) = (remote_db.addr, remote_db_udp.addr);
    pod.run(move || {
        let mut s = connect(db_tcp).expect("the SYN-ACK of an outgoing connection passes");
        s.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).expect("established traffic passes");
        let sock = UdpSocket::bind("127.0.63.10:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.send_to(b"q", db_udp).unwrap();
        let mut buf = [0u8; 4];
        let (n, from) = sock.recv_from(&mut buf).expect("a UDP reply passes");
        assert_eq!((&buf[..n], from), (&b"q"[..], db_udp));
    });

    let c = policy.counters().unwrap();
    // One SYN and one datagram allowed; SYNs are retransmitted, so at least two denied
    // SYNs plus the datagram.
    assert_eq!(c.ingress_allowed, 2, "{c:?}");
    assert!(c.ingress_denied >= 3, "{c:?}");
    assert_eq!(c.syncing_passed, 1, "{c:?}");
    assert_eq!(c.reply_passed, 2, "{c:?}");
    let denied = policy.drain_denied_flows(100);
    assert!(denied
        .iter()
        .all(|f| f.direction == Direction::Ingress && f.owner_identity == 6000));
    assert!(denied
        .iter()
        .any(|f| f.peer_identity == DB && f.port == server.addr.port() && f.protocol == TCP));
    assert!(denied
        .iter()
        .any(|f| f.peer_identity == WORLD && f.peer == "127.0.63.4".parse::<IpAddr>().unwrap()));
    assert!(denied
        .iter()
        .any(|f| f.peer_identity == DB && f.port == pod_udp.port() && f.protocol == UDP));
}

#[test]
fn ingress_over_ipv6_follows_ip_cache_updates() {
    let Some(mut sb) = Sandbox::new("ingress6") else {
        return;
    };
    let Some((_dp, mut policy)) = sb.open() else {
        return;
    };
    let pod = sb.pod("server");
    let server = TcpServer::serve(pod.run(|| TcpListener::bind("[::1]:0").unwrap()));
    // Clients connect from ::1 as well: its IP cache entry is the source's identity.
    policy
        .apply_ipcache(&[(cidr("::1/128"), identity(WEB))])
        .unwrap();
    policy
        .install(
            &pod.owner(6001),
            &ingress_only(&[port_rule(WEB, TCP, server.addr.port())]),
        )
        .unwrap();
    let short = Duration::from_millis(700);
    TcpStream::connect_timeout(&server.addr, short).expect("allowed IPv6 source");
    policy
        .apply_ipcache(&[(cidr("::1/128"), identity(DB))])
        .unwrap();
    let err = TcpStream::connect_timeout(&server.addr, short).expect_err("denied IPv6 source");
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    let c = policy.counters().unwrap();
    assert_eq!((c.ingress_allowed, c.ingress_denied), (1, 1), "{c:?}");
    let denied = policy.drain_denied_flows(10);
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].peer, "::1".parse::<IpAddr>().unwrap());
    assert_eq!(denied[0].peer_identity, DB);
}

#[test]
fn verdicts_survive_an_agent_restart_and_the_next_agent_takes_over() {
    let Some(mut sb) = Sandbox::new("restart") else {
        return;
    };
    let Some((dp, mut policy)) = sb.open() else {
        return;
    };
    let pod = sb.pod("client");
    let web = TcpServer::start("127.0.65.2");
    let db = TcpServer::start("127.0.65.3");
    policy
        .apply_ipcache(&[
            (cidr("127.0.65.2/32"), identity(WEB)),
            (cidr("127.0.65.3/32"), identity(DB)),
        ])
        .unwrap();
    let owner = pod.owner(7000);
    policy
        .install(&owner, &egress_only(&[any_port(WEB, TCP)]))
        .unwrap();
    policy
        .install(
            &owner,
            &egress_only(&[port_rule(WEB, TCP, web.addr.port())]),
        )
        .unwrap();
    let (web_a, db_a) = (web.addr, db.addr);
    let check = move |pod: &Pod| {
        pod.run(move || {
            connect(web_a).expect("allowed");
            assert_eperm("denied", connect(db_a));
        });
    };
    check(&pod);

    // The agent goes away: pinned programs and maps keep enforcing.
    drop(policy);
    drop(dp);
    check(&pod);

    // A new agent opens the pins: same verdicts, then it replaces the rules.
    let (_dp, mut policy) = sb.open().unwrap();
    check(&pod);
    policy
        .install(&owner, &egress_only(&[any_port(DB, TCP)]))
        .unwrap();
    pod.run(move || {
        connect(db_a).expect("allowed by the new agent's rules");
        assert_eperm("the previous rules are gone", connect(web_a));
    });
    // The complete IP cache after a resync: 127.0.65.2 is DB now, 127.0.65.3 is gone
    // (world).
    policy
        .reconcile_ipcache(&[(
            cidr("127.0.65.2/32"),
            IpCacheValue {
                identity: DB,
                cluster_id: 1,
                syncing: false,
            },
        )])
        .unwrap();
    pod.run(move || {
        connect(web_a).expect("127.0.65.2 has the allowed identity now");
        assert_eperm("127.0.65.3 left the IP cache: world", connect(db_a));
    });

    // The owner is gone from the live set: not enforced any more.
    policy.reconcile_owners(&[]).unwrap();
    pod.run(move || {
        connect(web_a).expect("no owner entry, no enforcement");
        connect(db_a).expect("no owner entry, no enforcement");
    });
}

// ---------------------------------------------------------------------------------------
// Services for the translation test.

fn service(name: &str, vip: SocketAddr, backends: &[SocketAddr]) -> DesiredService {
    let backends: Vec<Backend> = backends
        .iter()
        .map(|b| Backend {
            ip: b.ip(),
            port: b.port(),
            protocol: Protocol::Tcp,
            cluster: "cluster-a".into(),
            node: String::new(),
            zone: String::new(),
            tier: Tier::Cluster,
            weight: 1,
            state: BackendState::Active,
        })
        .collect();
    let table = if backends.is_empty() {
        Vec::new()
    } else {
        Maglev::default().build(&backends).expect("maglev table")
    };
    DesiredService {
        id: ServicePortId {
            namespace: "test".into(),
            name: name.into(),
            port_name: String::new(),
        },
        frontends: vec![Frontend {
            ip: vip.ip(),
            port: vip.port(),
            protocol: Protocol::Tcp,
        }],
        backends,
        table: table.into(),
        active_tier: None,
        affinity: Affinity::None,
        global: false,
        shared: false,
    }
}
