//! Privileged behaviour tests of the eBPF datapath on the real kernel.
//!
//! Each test creates its own threaded cgroup under the cgroup2 mount and its own pin
//! directory under /sys/fs/bpf, attaches the programs to that cgroup only, and runs its
//! clients on fresh threads moved into the cgroup (so nothing else on the host, including
//! other tests running in parallel, is load-balanced). Backends are real TCP/UDP servers on
//! distinct 127.0.0.0/8 addresses; frontends (VIPs) are 127.x addresses too, so even a
//! broken datapath never sends a packet off the machine.
//!
//! Without root, cgroup2 or bpf these tests skip with a message, unless
//! `CLUSTERMESH_REQUIRE_PRIVILEGED=1`, in which case they fail.
// Test helpers (servers, fixtures) panic on setup failures like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use clustermesh_agent::bpf::{cgroup2_mount, links_present, BpfConfig, BpfDatapath, BpfError};
use clustermesh_agent_core::{
    datapath::{Backend, Datapath, DesiredChanges, DesiredService, Frontend},
    maglev::Maglev,
};
use clustermesh_api::model::{Affinity, BackendState, Protocol, ServicePortId, Tier};

// ---------------------------------------------------------------------------------------
// Environment: privilege gate, per-test cgroup and pin directory.

fn require_privileged() -> bool {
    std::env::var("CLUSTERMESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1")
}

/// Skips (or fails under CLUSTERMESH_REQUIRE_PRIVILEGED=1) with a reason.
fn unavailable(test: &str, reason: &str) {
    assert!(
        !require_privileged(),
        "{test}: privileged eBPF test cannot run: {reason}"
    );
    eprintln!("skipping {test}: {reason} (set CLUSTERMESH_REQUIRE_PRIVILEGED=1 to fail instead)");
}

/// A fresh threaded cgroup and pin directory for one test; removed on drop.
struct Sandbox {
    name: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
}

impl Sandbox {
    fn new(test: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            unavailable(test, "not running as root");
            return None;
        }
        let Ok(root) = cgroup2_mount() else {
            unavailable(test, "no cgroup2 filesystem is mounted");
            return None;
        };
        let name = format!("cm-test-{}-{test}", std::process::id());
        let cgroup = root.join(&name);
        let _ = std::fs::remove_dir(&cgroup);
        if let Err(e) = std::fs::create_dir(&cgroup) {
            unavailable(
                test,
                &format!("cannot create cgroup {}: {e}", cgroup.display()),
            );
            return None;
        }
        if let Err(e) = std::fs::write(cgroup.join("cgroup.type"), "threaded") {
            let _ = std::fs::remove_dir(&cgroup);
            unavailable(
                test,
                &format!("cannot make {} threaded: {e}", cgroup.display()),
            );
            return None;
        }
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&name);
        Some(Self {
            name,
            cgroup,
            pin_dir,
        })
    }

    fn config(&self) -> BpfConfig {
        BpfConfig::default()
            .with_pin_dir(&self.pin_dir)
            .with_cgroup(&self.cgroup)
            .with_slab_entries(1 << 22)
    }

    /// Opens the datapath; `None` (skip) when the kernel refuses for lack of privileges.
    fn open(&self, config: BpfConfig) -> Option<BpfDatapath> {
        match BpfDatapath::open(config) {
            Ok(dp) => Some(dp),
            Err(e @ (BpfError::MissingPrivileges { .. } | BpfError::BpffsNotMounted { .. })) => {
                unavailable(&self.name, &e.to_string());
                None
            }
            Err(e) => panic!("opening the datapath failed: {e}"),
        }
    }

    /// Runs `f` on a fresh thread that lives in this test's cgroup.
    fn run_in_cgroup<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in_cgroup(f)
            .join()
            .expect("client thread panicked")
    }

    fn spawn_in_cgroup<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let threads = self.cgroup.join("cgroup.threads");
        std::thread::spawn(move || {
            let tid = nix::unistd::gettid();
            std::fs::write(&threads, tid.to_string()).expect("move client thread into cgroup");
            f()
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = BpfDatapath::cleanup_pins(&BpfConfig::default().with_pin_dir(&self.pin_dir));
        for _ in 0..100 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.cgroup.display());
    }
}

// ---------------------------------------------------------------------------------------
// Backends: real servers on loopback addresses.

/// A TCP server that greets every connection with its tag byte, then echoes.
struct TcpBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl TcpBackend {
    fn start(ip: &str, tag: u8) -> Self {
        let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let handle = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = stream else { continue };
                accepted2.fetch_add(1, Ordering::Relaxed);
                std::thread::spawn(move || {
                    if s.write_all(&[tag]).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 256];
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
            accepted,
            handle: Some(handle),
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A UDP server that answers every datagram with its tag byte followed by the payload.
struct UdpBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpBackend {
    fn start(ip: &str, tag: u8) -> Self {
        let sock = UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf[1..]) {
                    buf[0] = tag;
                    let _ = sock.send_to(&buf[..=n], from);
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

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Desired-state helpers.

fn service_id(name: &str) -> ServicePortId {
    ServicePortId {
        namespace: "test".into(),
        name: name.into(),
        port_name: String::new(),
    }
}

fn backend(addr: SocketAddr, protocol: Protocol, weight: u32) -> Backend {
    Backend {
        ip: addr.ip(),
        port: addr.port(),
        protocol,
        cluster: "cluster-a".into(),
        node: String::new(),
        zone: String::new(),
        tier: Tier::Cluster,
        weight,
        state: if weight > 0 {
            BackendState::Active
        } else {
            BackendState::Terminating
        },
    }
}

/// A weighted table of prime size `m`: every backend with weight gets slots in proportion
/// to its weight (largest remainder), scattered by a stride permutation. Used where a test
/// needs a table of an exact size (the slab-capacity test); elsewhere the agent's weighted
/// Maglev builds the tables.
fn weighted_table(backends: &[Backend], m: u32) -> Vec<u32> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut quotas: Vec<(u64, u64, u32)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let exact = u64::from(b.weight) * u64::from(m);
            (exact / total, exact % total, i as u32)
        })
        .collect();
    let mut left = u64::from(m) - quotas.iter().map(|q| q.0).sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..quotas.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(quotas[i].1));
    for i in by_remainder {
        if left == 0 {
            break;
        }
        quotas[i].0 += 1;
        left -= 1;
    }
    let flat: Vec<u32> = quotas
        .iter()
        .flat_map(|&(n, _, i)| std::iter::repeat_n(i, n as usize))
        .collect();
    let mut table = vec![0u32; m as usize];
    for (k, &b) in flat.iter().enumerate() {
        table[(k * 97) % m as usize] = b;
    }
    table
}

/// A service whose table is built by the agent's weighted Maglev.
fn service(
    name: &str,
    vips: &[SocketAddr],
    protocol: Protocol,
    backends: Vec<Backend>,
) -> DesiredService {
    let table = Maglev::default().build(&backends).expect("maglev table");
    service_with_table(name, vips, protocol, backends, table)
}

/// A service with a weighted table of exactly 251 entries.
fn service_251(
    name: &str,
    vips: &[SocketAddr],
    protocol: Protocol,
    backends: Vec<Backend>,
) -> DesiredService {
    let table = weighted_table(&backends, 251);
    service_with_table(name, vips, protocol, backends, table)
}

fn service_with_table(
    name: &str,
    vips: &[SocketAddr],
    protocol: Protocol,
    backends: Vec<Backend>,
    table: Vec<u32>,
) -> DesiredService {
    DesiredService {
        id: service_id(name),
        frontends: vips
            .iter()
            .map(|v| Frontend {
                ip: v.ip(),
                port: v.port(),
                protocol,
            })
            .collect(),
        backends,
        table: table.into(),
        active_tier: None,
        affinity: Affinity::None,
        global: false,
        shared: false,
    }
}

fn vip(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Connects through the VIP and returns the greeting tag of the backend reached.
fn connect_tag(to: SocketAddr) -> std::io::Result<(u8, TcpStream)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag)?;
    Ok((tag[0], s))
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn tcp_connects_spread_as_maglev_weights_say_and_peer_is_the_vip() {
    let Some(sb) = Sandbox::new("spread") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let backends: Vec<TcpBackend> = (0..3u8)
        .map(|i| TcpBackend::start(&format!("127.0.1.{}", i + 2), i))
        .collect();
    let weights = [1u32, 2, 3];
    let front = vip("127.77.1.1:8080");
    let svc = service(
        "spread",
        &[front],
        Protocol::Tcp,
        backends
            .iter()
            .zip(weights)
            .map(|(b, w)| backend(b.addr, Protocol::Tcp, w))
            .collect(),
    );
    dp.reconcile(std::slice::from_ref(&svc)).unwrap();

    let n = 10_000u32;
    let (counts, peers_ok) = sb.run_in_cgroup(move || {
        let mut counts = [0u32; 3];
        let mut peers_ok = 0u32;
        for _ in 0..n {
            let (tag, s) = connect_tag(front).expect("connect through the VIP");
            counts[tag as usize] += 1;
            if s.peer_addr().unwrap() == front {
                peers_ok += 1;
            }
        }
        (counts, peers_ok)
    });
    assert_eq!(
        peers_ok, n,
        "getpeername must report the VIP for every connection"
    );
    let mut slots = [0u32; 3];
    for &b in svc.table.iter() {
        slots[b as usize] += 1;
    }
    let m = svc.table.len() as f64;
    let total_weight: u32 = weights.iter().sum();
    for i in 0..3 {
        let got = f64::from(counts[i]) / f64::from(n);
        let table_share = f64::from(slots[i]) / m;
        assert!(
            (got - table_share).abs() <= 0.02,
            "backend {i}: share {got:.4}, table share {table_share:.4} (counts {counts:?})"
        );
    }
    for i in 0..3 {
        let got = f64::from(counts[i]) / f64::from(n);
        let want = f64::from(weights[i]) / f64::from(total_weight);
        assert!(
            (got - want).abs() <= 0.02,
            "backend {i}: share {got:.4}, weight share {want:.4} (counts {counts:?})"
        );
    }
    let dump = dp.dump(false).unwrap();
    assert_eq!(dump.counters["connect_lb"], u64::from(n));
    assert_eq!(dump.counters["revnat_hit"], u64::from(n));
}

#[test]
fn udp_through_the_vip_gets_replies_from_the_vip() {
    let Some(sb) = Sandbox::new("udp") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let servers: Vec<UdpBackend> = (0..2u8)
        .map(|i| UdpBackend::start(&format!("127.0.2.{}", i + 2), i))
        .collect();
    let front = vip("127.77.2.1:5353");
    let svc = service(
        "udp",
        &[front],
        Protocol::Udp,
        servers
            .iter()
            .map(|s| backend(s.addr, Protocol::Udp, 1))
            .collect(),
    );
    dp.reconcile(&[svc]).unwrap();
    sb.run_in_cgroup(move || {
        // Unconnected: sendmsg4 translates, recvmsg4 translates the reply back.
        for i in 0..20u8 {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sock.send_to(&[i], front).unwrap();
            let mut buf = [0u8; 16];
            let (len, from) = sock.recv_from(&mut buf).expect("UDP reply");
            assert_eq!(from, front, "the reply must appear to come from the VIP");
            assert_eq!(&buf[1..len], &[i]);
        }
        // Connected: connect4 translates, the socket's peer is still the VIP.
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.connect(front).unwrap();
        assert_eq!(sock.peer_addr().unwrap(), front);
        sock.send(b"x").unwrap();
        let mut buf = [0u8; 16];
        let len = sock.recv(&mut buf).expect("connected UDP reply");
        assert_eq!(&buf[1..len], b"x");
    });
}

#[test]
fn removed_backend_gets_no_new_connections_and_open_ones_keep_working() {
    let Some(sb) = Sandbox::new("remove") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let backends: Vec<TcpBackend> = (0..3u8)
        .map(|i| TcpBackend::start(&format!("127.0.3.{}", i + 2), i))
        .collect();
    let front = vip("127.77.3.1:80");
    let all: Vec<Backend> = backends
        .iter()
        .map(|b| backend(b.addr, Protocol::Tcp, 1))
        .collect();
    dp.reconcile(&[service("remove", &[front], Protocol::Tcp, all.clone())])
        .unwrap();

    // Open connections until one lands on backend 2 and keep it.
    let kept = sb.run_in_cgroup(move || {
        for _ in 0..1000 {
            let (tag, s) = connect_tag(front).unwrap();
            if tag == 2 {
                return s;
            }
        }
        panic!("backend 2 never chosen in 1000 connects");
    });

    // Remove backend 2 from the service.
    let remaining: Vec<Backend> = all[..2].to_vec();
    let changes = DesiredChanges {
        upserts: vec![service("remove", &[front], Protocol::Tcp, remaining)],
        removals: vec![],
    };
    dp.apply(&changes).into_result().unwrap();

    let counts = sb.run_in_cgroup(move || {
        let mut counts = [0u32; 3];
        for _ in 0..500 {
            let (tag, _s) = connect_tag(front).unwrap();
            counts[tag as usize] += 1;
        }
        counts
    });
    assert_eq!(counts[2], 0, "removed backend still chosen: {counts:?}");
    assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");

    // The connection opened before the removal still works and still shows the VIP.
    let mut kept = kept;
    kept.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    kept.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(kept.peer_addr().unwrap(), front);
    // The removed backend is gone from the backends map.
    let dump = dp.dump(false).unwrap();
    assert_eq!(dump.backends.len(), 2);
}

#[test]
fn service_without_backends_refuses_connections_at_once() {
    let Some(sb) = Sandbox::new("refuse") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let front = vip("127.77.4.1:443");
    let front6 = vip("[::1]:14443");
    let svc = DesiredService {
        id: service_id("empty"),
        frontends: [front, front6]
            .iter()
            .map(|v| Frontend {
                ip: v.ip(),
                port: v.port(),
                protocol: Protocol::Tcp,
            })
            .collect(),
        backends: vec![],
        table: Vec::new().into(),
        active_tier: None,
        affinity: Affinity::None,
        global: false,
        shared: false,
    };
    dp.reconcile(&[svc]).unwrap();
    sb.run_in_cgroup(move || {
        for to in [front, front6] {
            let err = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{to}: {err}");
        }
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        // A UDP frontend was not configured: plain UDP to the address is not refused by us.
        assert!(sock.send_to(b"x", "127.77.4.1:53").is_ok());
    });
    assert_eq!(dp.dump(false).unwrap().counters["connect_refused"], 2);
}

#[test]
fn ipv6_and_v4_mapped_frontends_are_balanced() {
    let Some(sb) = Sandbox::new("ipv6") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let b6 = TcpBackend::start("::1", 6);
    let b4 = TcpBackend::start("127.0.5.2", 4);
    let front6 = vip("[::1]:18080");
    let front4 = vip("127.77.5.1:8080");
    dp.reconcile(&[
        service(
            "v6",
            &[front6],
            Protocol::Tcp,
            vec![backend(b6.addr, Protocol::Tcp, 1)],
        ),
        service(
            "v4",
            &[front4],
            Protocol::Tcp,
            vec![backend(b4.addr, Protocol::Tcp, 1)],
        ),
    ])
    .unwrap();
    sb.run_in_cgroup(move || {
        let (tag, s) = connect_tag(front6).unwrap();
        assert_eq!(tag, 6);
        assert_eq!(s.peer_addr().unwrap(), front6);
        // A v6 socket reaching the v4 service through a v4-mapped address (dual stack).
        let mapped: SocketAddr = "[::ffff:127.77.5.1]:8080".parse().unwrap();
        let (tag, s) = connect_tag(mapped).unwrap();
        assert_eq!(tag, 4);
        assert_eq!(s.peer_addr().unwrap(), mapped);
    });
}

#[test]
fn restart_while_a_client_loops_loses_no_connect() {
    let Some(sb) = Sandbox::new("restart") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let backends: Vec<TcpBackend> = (0..2u8)
        .map(|i| TcpBackend::start(&format!("127.0.6.{}", i + 2), i))
        .collect();
    let front = vip("127.77.6.1:80");
    let desired = vec![service(
        "restart",
        &[front],
        Protocol::Tcp,
        backends
            .iter()
            .map(|b| backend(b.addr, Protocol::Tcp, 1))
            .collect(),
    )];
    dp.reconcile(&desired).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let client = sb.spawn_in_cgroup(move || {
        let (mut ok, mut failed) = (0u64, 0u64);
        while !stop2.load(Ordering::SeqCst) {
            match connect_tag(front) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    });
    std::thread::sleep(Duration::from_millis(200));
    // The agent stops (drops its handles; pins stay) and starts again from the pins.
    drop(dp);
    std::thread::sleep(Duration::from_millis(100));
    let dp = sb.open(sb.config()).expect("reopen");
    assert!(dp.reused_pinned_maps());
    assert_eq!(dp.service_count(), 1, "state rebuilt from the pinned maps");
    let report = dp.reconcile(&desired).unwrap();
    assert_eq!(
        report.unchanged, 1,
        "an unchanged service is not rewritten: {report:?}"
    );
    assert_eq!(report.programmed, 0);
    // A second restart while the client keeps going.
    drop(dp);
    let dp = sb.open(sb.config()).expect("reopen again");
    dp.reconcile(&desired).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = client.join().unwrap();
    assert!(ok > 100, "client made only {ok} connects");
    assert_eq!(
        failed, 0,
        "{failed} connects failed across restarts ({ok} succeeded)"
    );
    assert!(links_present(&sb.config().links_dir()));
}

#[test]
fn ten_thousand_services_install_at_once() {
    let Some(sb) = Sandbox::new("tenk") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let b1 = TcpBackend::start("127.0.7.2", 1);
    let b2 = TcpBackend::start("127.0.7.3", 2);
    let services: Vec<DesiredService> = (0..10_000u32)
        .map(|i| {
            let front = SocketAddr::new(
                IpAddr::V4(std::net::Ipv4Addr::new(
                    127,
                    78,
                    (i / 250) as u8,
                    (i % 250 + 1) as u8,
                )),
                8000 + (i % 7) as u16,
            );
            service(
                &format!("svc-{i}"),
                &[front],
                Protocol::Tcp,
                vec![
                    backend(b1.addr, Protocol::Tcp, 1),
                    backend(b2.addr, Protocol::Tcp, 1),
                ],
            )
        })
        .collect();
    let report = dp.reconcile(&services).unwrap();
    assert_eq!(report.programmed, 10_000);
    assert_eq!(dp.service_count(), 10_000);
    let dump = dp.dump(false).unwrap();
    assert_eq!(dump.services.len(), 10_000);
    assert_eq!(
        dump.backends.len(),
        2,
        "backends are shared between services"
    );
    assert_eq!(dump.backends[0].services, 10_000);
    // Spot-check that several of them route.
    let fronts: Vec<SocketAddr> = [0usize, 4_999, 9_999]
        .iter()
        .map(|&i| {
            let f = &services[i].frontends[0];
            SocketAddr::new(f.ip, f.port)
        })
        .collect();
    sb.run_in_cgroup(move || {
        for f in fronts {
            let (tag, s) = connect_tag(f).unwrap();
            assert!(tag == 1 || tag == 2);
            assert_eq!(s.peer_addr().unwrap(), f);
        }
    });
    // Removing them all frees the slab.
    let report = dp.reconcile(&[]).unwrap();
    assert_eq!(report.removed, 10_000);
    assert!(dp.dump(false).unwrap().backends.is_empty());
}

#[test]
fn full_slab_is_a_clear_error_and_the_old_table_stays() {
    let Some(sb) = Sandbox::new("slabfull") else {
        return;
    };
    // 251 + 2 entries fit, a second table does not.
    let Some(dp) = sb.open(sb.config().with_slab_entries(400)) else {
        return;
    };
    let b1 = TcpBackend::start("127.0.8.2", 1);
    let b2 = TcpBackend::start("127.0.8.3", 2);
    let front = vip("127.77.8.1:80");
    let first = service_251(
        "full",
        &[front],
        Protocol::Tcp,
        vec![backend(b1.addr, Protocol::Tcp, 1)],
    );
    dp.reconcile(std::slice::from_ref(&first)).unwrap();
    let second = service_251(
        "full",
        &[front],
        Protocol::Tcp,
        vec![backend(b2.addr, Protocol::Tcp, 1)],
    );
    let err = dp
        .apply_changes(&DesiredChanges {
            upserts: vec![second],
            removals: vec![],
        })
        .unwrap_err();
    assert!(matches!(err, BpfError::SlabFull { .. }), "{err}");
    assert!(err.to_string().contains("test/full/"), "{err}");
    // The old table is still in force.
    let tag = sb.run_in_cgroup(move || connect_tag(front).unwrap().0);
    assert_eq!(tag, 1);
    let dump = dp.dump(false).unwrap();
    assert_eq!(
        dump.backends.len(),
        1,
        "the failed update left no backend behind"
    );
}

#[test]
fn incompatible_pinned_map_is_refused_with_the_fix() {
    let Some(sb) = Sandbox::new("compat") else {
        return;
    };
    std::fs::create_dir_all(&sb.pin_dir).unwrap();
    // A backends map as an older layout might have left it: 16-byte values.
    let old: aya::maps::HashMap<aya::maps::MapData, u32, [u8; 16]> =
        match aya::maps::HashMap::create(16, 0) {
            Ok(m) => m,
            Err(e) => {
                unavailable("compat", &format!("cannot create a BPF map: {e}"));
                return;
            }
        };
    old.pin(sb.pin_dir.join("CM_BACKENDS")).unwrap();
    let err = BpfDatapath::open(sb.config()).unwrap_err();
    assert!(
        matches!(err, BpfError::IncompatiblePinnedMap { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("CM_BACKENDS") && msg.contains("--cleanup"),
        "{msg}"
    );
    // cleanup_pins works even on incompatible pins, and then the datapath opens.
    BpfDatapath::cleanup_pins(&sb.config()).unwrap();
    assert!(!sb.pin_dir.join("CM_BACKENDS").exists());
    BpfDatapath::open(sb.config()).unwrap();
}

#[test]
fn missing_cgroup_is_a_clear_error() {
    let Some(sb) = Sandbox::new("nocgroup") else {
        return;
    };
    let cfg = sb.config().with_cgroup(sb.cgroup.join("does-not-exist"));
    let err = BpfDatapath::open(cfg).unwrap_err();
    assert!(matches!(err, BpfError::CgroupMissing { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist"));
}

#[test]
fn cleanup_detaches_programs_and_unpins_maps() {
    let Some(sb) = Sandbox::new("cleanup") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let b = TcpBackend::start("127.0.9.2", 9);
    let front = vip("127.77.9.1:80");
    dp.reconcile(&[service(
        "c",
        &[front],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    )])
    .unwrap();
    assert_eq!(sb.run_in_cgroup(move || connect_tag(front).unwrap().0), 9);
    let links = sb.config().links_dir();
    dp.cleanup().unwrap();
    assert!(!links_present(&links));
    assert!(!sb.pin_dir.exists(), "pin directory removed");
    // Without the programs the VIP is just an address nobody listens on.
    let err = sb.run_in_cgroup(move || connect_tag(front).unwrap_err());
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert_eq!(b.accepted.load(Ordering::Relaxed), 1);
}

#[test]
fn dump_serializes_services_backends_and_tables() {
    let Some(sb) = Sandbox::new("dump") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let b = TcpBackend::start("127.0.10.2", 1);
    let front = vip("127.77.10.1:80");
    dp.reconcile(&[service(
        "d",
        &[front],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    )])
    .unwrap();
    let dump = dp.dump(true).unwrap();
    let json = serde_json::to_value(&dump).unwrap();
    assert_eq!(json["services"][0]["name"], "test/d/");
    assert_eq!(json["services"][0]["frontends"][0], "127.77.10.1:80/TCP");
    assert_eq!(json["services"][0]["table_size"], 251);
    assert_eq!(json["backends"][0]["address"], b.addr.to_string());
    assert_eq!(json["backends"][0]["cluster"], "cluster-a");
    let table = dump.services[0].table.as_ref().unwrap();
    assert!(table.iter().all(|&id| id == dump.backends[0].id));
    assert!(dump.counters.contains_key("connect_lb"));
    assert_eq!(Path::new(&dump.pin_dir), sb.pin_dir.as_path());
}

#[test]
fn pin_dir_off_bpffs_and_missing_bpffs_are_clear_errors() {
    let Some(sb) = Sandbox::new("bpffs") else {
        return;
    };
    let tmp = std::env::temp_dir().join(format!("cm-test-{}-bpffs", std::process::id()));
    // A pin directory on a non-bpf filesystem, outside the bpffs mount point.
    let err = BpfDatapath::open(sb.config().with_pin_dir(tmp.join("pins"))).unwrap_err();
    assert!(matches!(err, BpfError::PinDirNotBpffs { .. }), "{err}");
    assert!(err.to_string().contains("bpffs"), "{err}");
    // bpffs expected at a mount point where it is not mounted: the agent does not mount it.
    let mount = tmp.join("no-such-mount");
    let err = BpfDatapath::open(
        sb.config()
            .with_bpffs_mount(&mount)
            .with_pin_dir(mount.join("clustermesh")),
    )
    .unwrap_err();
    assert!(matches!(err, BpfError::BpffsNotMounted { .. }), "{err}");
    assert!(err.to_string().contains("bpffs is not mounted"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn restart_reconciles_changed_and_removed_services() {
    let Some(sb) = Sandbox::new("reconcile") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let old = TcpBackend::start("127.0.12.2", 1);
    let new = TcpBackend::start("127.0.12.3", 2);
    let (fa, fb) = (vip("127.77.12.1:80"), vip("127.77.12.2:80"));
    dp.reconcile(&[
        service(
            "a",
            &[fa],
            Protocol::Tcp,
            vec![backend(old.addr, Protocol::Tcp, 1)],
        ),
        service(
            "b",
            &[fb],
            Protocol::Tcp,
            vec![backend(old.addr, Protocol::Tcp, 1)],
        ),
    ])
    .unwrap();
    drop(dp);
    // While the agent was down, service a moved to another backend and b was deleted.
    let dp = sb.open(sb.config()).expect("reopen");
    assert_eq!(dp.service_count(), 2);
    let report = dp
        .reconcile(&[service(
            "a",
            &[fa],
            Protocol::Tcp,
            vec![backend(new.addr, Protocol::Tcp, 1)],
        )])
        .unwrap();
    assert_eq!((report.programmed, report.removed), (1, 1), "{report:?}");
    let (tag_a, err_b) = sb.run_in_cgroup(move || {
        (
            connect_tag(fa).unwrap().0,
            TcpStream::connect_timeout(&fb, Duration::from_secs(2)).unwrap_err(),
        )
    });
    assert_eq!(tag_a, 2);
    // b is no longer a service: its VIP is just an address nobody listens on.
    assert_eq!(err_b.kind(), ErrorKind::ConnectionRefused);
    let dump = dp.dump(false).unwrap();
    assert_eq!(
        dump.backends.len(),
        1,
        "the old backend was garbage collected"
    );
    assert_eq!(dump.backends[0].address, new.addr.to_string());
}

#[test]
fn udp_over_ipv6_is_translated_both_ways() {
    let Some(sb) = Sandbox::new("udp6") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let server = UdpBackend::start("::1", 7);
    let front = vip("[::1]:15353");
    dp.reconcile(&[service(
        "udp6",
        &[front],
        Protocol::Udp,
        vec![backend(server.addr, Protocol::Udp, 1)],
    )])
    .unwrap();
    sb.run_in_cgroup(move || {
        let sock = UdpSocket::bind("[::1]:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.send_to(b"q", front).unwrap();
        let mut buf = [0u8; 8];
        let (len, from) = sock.recv_from(&mut buf).expect("UDP reply over IPv6");
        assert_eq!(from, front);
        assert_eq!(&buf[..len], &[7, b'q']);
    });
}

#[test]
fn reconcile_after_restart_prunes_services_left_by_the_previous_run() {
    let Some(sb) = Sandbox::new("firstapply") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let b = TcpBackend::start("127.0.13.2", 1);
    let (fa, fb) = (vip("127.77.13.1:80"), vip("127.77.13.2:80"));
    let a = service(
        "a",
        &[fa],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    );
    let bsvc = service(
        "b",
        &[fb],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    );
    Datapath::reconcile(&dp, &[a.clone(), bsvc])
        .into_result()
        .unwrap();
    drop(dp);
    let dp = sb.open(sb.config()).expect("reopen");
    // The control plane hands over its full view after a restart: only a.
    Datapath::reconcile(&dp, std::slice::from_ref(&a))
        .into_result()
        .unwrap();
    assert_eq!(dp.service_count(), 1);
    // Later batches are incremental: an upsert of b alone does not remove a.
    let b2 = service(
        "b",
        &[fb],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    );
    dp.apply(&DesiredChanges {
        upserts: vec![b2],
        removals: vec![],
    })
    .into_result()
    .unwrap();
    assert_eq!(dp.service_count(), 2);
}

#[test]
fn a_failing_service_is_reported_alone_and_the_rest_of_the_batch_applies() {
    let Some(sb) = Sandbox::new("partial") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let b = TcpBackend::start("127.0.15.2", 3);
    let fa = vip("127.77.15.1:80");
    let good = service(
        "good",
        &[fa],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    );
    // No frontend: cannot be programmed.
    let bad = service(
        "bad",
        &[],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    );
    let report = Datapath::reconcile(&dp, &[good.clone(), bad.clone()]);
    assert_eq!(report.applied, 1);
    assert_eq!(
        report.failed.keys().collect::<Vec<_>>(),
        [&service_id("bad")]
    );
    let report = dp.apply(&DesiredChanges {
        upserts: vec![bad, good],
        removals: vec![],
    });
    assert_eq!(report.applied, 1, "the unchanged service counts as applied");
    assert_eq!(report.failed.len(), 1);
    assert_eq!(sb.run_in_cgroup(move || connect_tag(fa).unwrap().0), 3);
}

#[test]
fn leftovers_of_an_interrupted_run_keep_routing_until_reconcile_cleans_them() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use clustermesh_agent::bpf::service_key;
    use clustermesh_ebpf_common::{ServiceKey, ServiceMeta, ServiceValue};

    let Some(sb) = Sandbox::new("orphans") else {
        return;
    };
    let Some(dp) = sb.open(sb.config()) else {
        return;
    };
    let b = TcpBackend::start("127.0.14.2", 5);
    let fa = vip("127.77.14.1:80");
    let a = service(
        "a",
        &[fa],
        Protocol::Tcp,
        vec![backend(b.addr, Protocol::Tcp, 1)],
    );
    dp.reconcile(std::slice::from_ref(&a)).unwrap();
    let table = dp.dump(false).unwrap().services[0].clone();
    drop(dp);

    // What a crash could leave: a frontend whose service record is gone, and a service
    // record that cannot be parsed.
    let orphan = vip("127.77.14.9:80");
    let mut services: BpfHashMap<MapData, ServiceKey, ServiceValue> = BpfHashMap::try_from(
        Map::HashMap(MapData::from_pin(sb.pin_dir.join("CM_SERVICES")).unwrap()),
    )
    .unwrap();
    let orphan_key = service_key(&Frontend {
        ip: orphan.ip(),
        port: orphan.port(),
        protocol: Protocol::Tcp,
    });
    let value = ServiceValue {
        service_id: 4242,
        table_offset: table.table_offset,
        table_size: table.table_size,
        flags: 0,
    };
    services.insert(orphan_key, value, 0).unwrap();
    let mut meta: BpfHashMap<MapData, u32, ServiceMeta> = BpfHashMap::try_from(Map::HashMap(
        MapData::from_pin(sb.pin_dir.join("CM_SVC_META")).unwrap(),
    ))
    .unwrap();
    let mut garbage = ServiceMeta {
        name_len: 7,
        ..ServiceMeta::default()
    };
    garbage.name[..7].copy_from_slice(b"garbage");
    meta.insert(4243, garbage, 0).unwrap();

    let dp = sb.open(sb.config()).expect("reopen with leftovers");
    assert_eq!(dp.service_count(), 1);
    // Until reconcile, the leftover frontend keeps working (its table is kept alive).
    assert_eq!(sb.run_in_cgroup(move || connect_tag(orphan).unwrap().0), 5);
    dp.reconcile(&[a]).unwrap();
    let err = sb.run_in_cgroup(move || connect_tag(orphan).unwrap_err());
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(
        services.get(&orphan_key, 0).is_err(),
        "orphan frontend removed"
    );
    assert!(
        meta.get(&4243, 0).is_err(),
        "unparsable service record removed"
    );
    assert_eq!(sb.run_in_cgroup(move || connect_tag(fa).unwrap().0), 5);
}
