//! Datapath benchmark: connect() latency through the eBPF socket load balancer versus a
//! direct connect and versus kube-proxy-style iptables DNAT chains, how fast services are
//! programmed, and how much BPF map memory 10k services need with per-service table sizes
//! versus a fixed M=16381 table each. Prints one markdown table per part; every row comes
//! from the same run.
//!
//! Needs root (cgroups, bpf, network namespaces). Without it the bench prints why and
//! exits successfully. Traffic only goes to 127.0.0.0/8, in the host namespace or in
//! network namespaces this bench creates (they have no route but loopback).
//!
//! `cargo bench -p clustermesh-agent --bench connect` (env `CM_BENCH_CONNECTS` sets the
//! connects per latency row, default 20000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use clustermesh_agent::bpf::{cgroup2_mount, BpfConfig, BpfDatapath};
use clustermesh_agent_core::{
    datapath::{Backend, DesiredChanges, DesiredService, Frontend},
    maglev::{Maglev, TableSize},
};
use clustermesh_api::model::{Affinity, BackendState, Protocol, ServicePortId, Tier};
use clustermesh_test_support::sockets::{timed_connect, Sink};

const SERVICES: u32 = 10_000;

fn main() {
    // cargo bench passes `--bench`; a filter argument that does not match skips the bench.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !"connect".contains(filter.as_str()) {
            return;
        }
    }
    if !nix::unistd::geteuid().is_root() {
        println!("connect bench skipped: needs root for cgroups, bpf and network namespaces");
        return;
    }
    let Ok(cg_root) = cgroup2_mount() else {
        println!("connect bench skipped: no cgroup2 mount");
        return;
    };
    let connects: usize = std::env::var("CM_BENCH_CONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let env = BenchEnv::new(&cg_root);
    let mut out = String::new();
    latency(&env, connects, &mut out);
    programming_and_memory(&env, &mut out);
    println!("\n{out}");
}

// ---------------------------------------------------------------------------------------
// Environment.

struct BenchEnv {
    cgroup: PathBuf,
    pin_dir: PathBuf,
}

impl BenchEnv {
    fn new(cg_root: &Path) -> Self {
        let name = format!("cm-bench-{}", std::process::id());
        let cgroup = cg_root.join(&name);
        std::fs::create_dir(&cgroup).expect("create bench cgroup");
        std::fs::write(cgroup.join("cgroup.type"), "threaded").expect("threaded cgroup");
        Self {
            cgroup,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(name),
        }
    }

    fn config(&self, pin_suffix: &str, slab_entries: u32) -> BpfConfig {
        BpfConfig::default()
            .with_pin_dir(self.pin_dir.with_file_name(format!(
                "{}-{pin_suffix}",
                self.pin_dir.file_name().unwrap().to_string_lossy()
            )))
            .with_cgroup(&self.cgroup)
            .with_slab_entries(slab_entries)
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Lat {
    p50: Duration,
    p99: Duration,
}

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("IPv4 expected"),
    }
}

// ---------------------------------------------------------------------------------------
// Desired state.

fn backend(ip: Ipv4Addr, port: u16) -> Backend {
    Backend {
        ip: IpAddr::V4(ip),
        port,
        protocol: Protocol::Tcp,
        cluster: "bench".into(),
        node: String::new(),
        zone: String::new(),
        tier: Tier::Cluster,
        weight: 1,
        state: BackendState::Active,
    }
}

fn vip_for(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 100, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn service(i: u32, backends: Vec<Backend>, maglev: &Maglev) -> DesiredService {
    let table = maglev.build(&backends).unwrap();
    DesiredService {
        id: ServicePortId {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            port_name: String::new(),
        },
        frontends: vec![Frontend {
            ip: IpAddr::V4(vip_for(i)),
            port: 80,
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

/// Backends of the measured service: the two real sinks. Other services point at
/// addresses nobody connects to.
fn services_with(n: u32, measured: u32, real: &[SocketAddr]) -> Vec<DesiredService> {
    let maglev = Maglev::default();
    (0..n)
        .map(|i| {
            let backends = if i == measured {
                real.iter()
                    .map(|a| backend(*v4(*a).ip(), a.port()))
                    .collect()
            } else {
                vec![
                    backend(
                        Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8),
                        8080,
                    ),
                    backend(
                        Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250 + 1) as u8),
                        8080,
                    ),
                ]
            };
            service(i, backends, &maglev)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Part 1: connect() latency.
//
// Every path gets a long-lived worker thread placed where that path applies (host, a cgroup
// with programs attached, a network namespace with iptables rules). The rows are measured
// in interleaved rounds, so load from other processes on this shared machine hits all rows
// alike instead of whichever row happened to run during a busy moment.

/// Where a worker thread lives.
enum Place {
    /// Host namespace, no programs.
    Host,
    /// Inside a cgroup with the datapath programs attached.
    Cgroup(PathBuf),
    /// In a fresh network namespace with kube-proxy-style rules loaded by this tool.
    Iptables(&'static str),
}

/// A worker: send (address, count), receive that many connect() durations.
struct Worker {
    tx: std::sync::mpsc::Sender<Option<(SocketAddrV4, usize)>>,
    rx: std::sync::mpsc::Receiver<Vec<Duration>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a worker; for `Place::Iptables` also returns the rule load time.
    fn start(place: Place) -> Result<(Self, Option<Duration>), String> {
        let (tx, work_rx) = std::sync::mpsc::channel::<Option<(SocketAddrV4, usize)>>();
        let (done_tx, rx) = std::sync::mpsc::channel::<Vec<Duration>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Option<Duration>, String>>();
        let handle = std::thread::spawn(move || {
            // Sinks of a namespace worker must live as long as the worker.
            let mut _sinks = Vec::new();
            let ready = match place {
                Place::Host => Ok(None),
                Place::Cgroup(cg) => {
                    std::fs::write(cg.join("cgroup.threads"), nix::unistd::gettid().to_string())
                        .map(|()| None)
                        .map_err(|e| format!("join cgroup: {e}"))
                }
                Place::Iptables(tool) => iptables_namespace(tool).map(|(sinks, load)| {
                    _sinks = sinks;
                    Some(load)
                }),
            };
            let ok = ready.is_ok();
            let _ = ready_tx.send(ready);
            if !ok {
                return;
            }
            while let Ok(Some((to, n))) = work_rx.recv() {
                let v = (0..n)
                    .map(|_| timed_connect(to).expect("connect"))
                    .collect();
                if done_tx.send(v).is_err() {
                    return;
                }
            }
        });
        let load = ready_rx
            .recv()
            .map_err(|_| "worker died during setup".to_string())??;
        Ok((
            Self {
                tx,
                rx,
                handle: Some(handle),
            },
            load,
        ))
    }

    fn run(&self, to: SocketAddrV4, n: usize) -> Vec<Duration> {
        self.tx.send(Some((to, n))).expect("worker alive");
        self.rx.recv().expect("worker result")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.tx.send(None);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn percentiles(mut v: Vec<Duration>) -> Lat {
    v.sort_unstable();
    Lat {
        p50: v[v.len() / 2],
        p99: v[v.len() * 99 / 100],
    }
}

/// A second threaded cgroup for the 100-service datapath.
fn sibling_cgroup(env: &BenchEnv, suffix: &str) -> PathBuf {
    let cg = env.cgroup.with_file_name(format!(
        "{}-{suffix}",
        env.cgroup.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir(&cg).expect("create cgroup");
    std::fs::write(cg.join("cgroup.type"), "threaded").expect("threaded cgroup");
    cg
}

fn latency(env: &BenchEnv, n: usize, out: &mut String) {
    let sinks = [
        Sink::start(SocketAddrV4::new(Ipv4Addr::new(127, 0, 50, 2), 0)),
        Sink::start(SocketAddrV4::new(Ipv4Addr::new(127, 0, 50, 3), 0)),
    ];
    let real: Vec<SocketAddr> = sinks.iter().map(|s| SocketAddr::V4(s.addr())).collect();
    let backend0 = v4(real[0]);
    let measured = SERVICES / 2;

    // Datapath with 10k services on the main bench cgroup, 100 services on a sibling.
    let dp_10k = BpfDatapath::open(env.config("lat10k", 1 << 24)).expect("open datapath");
    dp_10k
        .reconcile(&services_with(SERVICES, measured, &real))
        .unwrap();
    let cg_100 = sibling_cgroup(env, "100");
    let dp_100 = BpfDatapath::open(env.config("lat100", 1 << 20).with_cgroup(&cg_100))
        .expect("open datapath");
    dp_100.reconcile(&services_with(100, 50, &real)).unwrap();

    let mut rows: Vec<(String, Worker, SocketAddrV4)> = Vec::new();
    let host = Worker::start(Place::Host).unwrap().0;
    rows.push(("direct to backend, no programs".into(), host, backend0));
    let miss = Worker::start(Place::Cgroup(env.cgroup.clone())).unwrap().0;
    rows.push((
        "direct to backend, programs attached (lookup miss)".into(),
        miss,
        backend0,
    ));
    let w100 = Worker::start(Place::Cgroup(cg_100.clone())).unwrap().0;
    rows.push((
        "eBPF VIP, 100 services".into(),
        w100,
        SocketAddrV4::new(vip_for(50), 80),
    ));
    let w10k = Worker::start(Place::Cgroup(env.cgroup.clone())).unwrap().0;
    rows.push((
        "eBPF VIP, 10k services".into(),
        w10k,
        SocketAddrV4::new(vip_for(measured), 80),
    ));
    for (tool, label) in [
        ("iptables-legacy", "iptables-legacy DNAT, 10k services"),
        ("iptables-nft", "iptables-nft DNAT, 10k services"),
    ] {
        eprintln!("loading {label}");
        match Worker::start(Place::Iptables(tool)) {
            Ok((w, load)) => {
                let load = load.unwrap_or_default();
                rows.push((
                    format!("{label} (rules loaded in {load:.1?})"),
                    w,
                    SocketAddrV4::new(vip_for(measured), 80),
                ));
                let (w_last, _) = Worker::start(Place::Iptables(tool)).expect("second namespace");
                rows.push((
                    format!("{label}, VIP last in the chain"),
                    w_last,
                    SocketAddrV4::new(vip_for(SERVICES - 1), 80),
                ));
            }
            Err(e) => {
                let _ = writeln!(out, "{label}: not measured: {e}\n");
            }
        }
    }

    // Warm-up round, then interleaved measured rounds.
    let rounds = 20usize;
    let per_round = (n / rounds).max(1);
    for (_, w, to) in &rows {
        w.run(*to, per_round / 2 + 1);
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); rows.len()];
    for round in 0..rounds {
        eprintln!("latency round {}/{rounds}", round + 1);
        for (k, (_, w, to)) in rows.iter().enumerate() {
            samples[k].extend(w.run(*to, per_round));
        }
    }
    let lats: Vec<(String, Lat)> = rows
        .iter()
        .zip(samples)
        .map(|((label, _, _), v)| (label.clone(), percentiles(v)))
        .collect();
    drop(rows);
    dp_100.cleanup().unwrap();
    dp_10k.cleanup().unwrap();
    drop(sinks);
    let _ = std::fs::remove_dir(&cg_100);

    let direct = lats[0].1;
    let _ = writeln!(
        out,
        "connect() latency, {} connects per row in {rounds} interleaved rounds (SO_LINGER 0), \
         VIP in the middle of the service list unless noted\n",
        per_round * rounds
    );
    let _ = writeln!(out, "| path | p50 | p99 | p50 / direct | p99 / direct |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for (label, l) in &lats {
        let _ = writeln!(
            out,
            "| {label} | {:.1} µs | {:.1} µs | {:.2}× | {:.2}× |",
            l.p50.as_secs_f64() * 1e6,
            l.p99.as_secs_f64() * 1e6,
            l.p50.as_secs_f64() / direct.p50.as_secs_f64(),
            l.p99.as_secs_f64() / direct.p99.as_secs_f64(),
        );
    }
    let find = |prefix: &str| {
        lats.iter()
            .find(|(l, _)| l.starts_with(prefix))
            .map(|r| r.1)
    };
    for (name, prefix) in [
        ("iptables-legacy", "iptables-legacy DNAT, 10k services ("),
        ("iptables-nft", "iptables-nft DNAT, 10k services ("),
    ] {
        if let (Some(ebpf), Some(ipt)) = (find("eBPF VIP, 10k"), find(prefix)) {
            let _ = writeln!(
                out,
                "\n{name} / eBPF at 10k services (VIP mid-chain): p50 {:.2}×, p99 {:.2}×",
                ipt.p50.as_secs_f64() / ebpf.p50.as_secs_f64(),
                ipt.p99.as_secs_f64() / ebpf.p99.as_secs_f64()
            );
        }
    }
    let _ = writeln!(out);
}

/// kube-proxy's iptables layout: OUTPUT → KUBE-SERVICES (one rule per service) →
/// KUBE-SVC-n (random split) → KUBE-SEP-n-k (DNAT), in a fresh network namespace of the
/// calling thread, with two sinks inside it. Returns the sinks and the rule load time.
fn iptables_namespace(tool: &'static str) -> Result<(Vec<Sink>, Duration), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("ip: {e}"))?;
    if !st.success() {
        return Err("ip link set lo up failed".into());
    }
    let sinks = vec![
        Sink::start(SocketAddrV4::new(Ipv4Addr::new(127, 0, 50, 2), 0)),
        Sink::start(SocketAddrV4::new(Ipv4Addr::new(127, 0, 50, 3), 0)),
    ];
    let mut rules = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..SERVICES {
        let _ = writeln!(
            rules,
            ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i}-0 - [0:0]\n:KUBE-SEP-{i}-1 - [0:0]"
        );
    }
    rules.push_str("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 0..SERVICES {
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}",
            vip_for(i)
        );
    }
    for i in 0..SERVICES {
        let _ = writeln!(
            rules,
            "-A KUBE-SVC-{i} -m statistic --mode random --probability 0.5 -j KUBE-SEP-{i}-0\n-A KUBE-SVC-{i} -j KUBE-SEP-{i}-1"
        );
        for (k, s) in sinks.iter().enumerate() {
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{i}-{k} -p tcp -m tcp -j DNAT --to-destination {}",
                s.addr()
            );
        }
    }
    rules.push_str("COMMIT\n");
    let t = Instant::now();
    let mut child = Command::new(format!("{tool}-restore"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{tool}-restore: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(rules.as_bytes())
        .map_err(|e| format!("{tool}-restore stdin: {e}"))?;
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "{tool}-restore failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok((sinks, t.elapsed()))
}

// ---------------------------------------------------------------------------------------
// Part 2: programming rate and map memory.

/// Deterministic 2..=50 backend counts (xorshift, fixed seed).
fn backend_counts(n: u32) -> Vec<u32> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            2 + (x % 49) as u32
        })
        .collect()
}

fn mixed_services(
    counts: &[u32],
    maglev: &Maglev,
    range: std::ops::Range<u32>,
) -> Vec<DesiredService> {
    range
        .map(|i| {
            let backends = (0..counts[i as usize])
                .map(|k| {
                    backend(
                        Ipv4Addr::new(127, 3 + (k as u8), (i / 250) as u8, (i % 250 + 1) as u8),
                        8080,
                    )
                })
                .collect();
            service(i, backends, maglev)
        })
        .collect()
}

fn memlock_of(pin: &Path) -> Option<u64> {
    // The kernel's own accounting of a map's memory, from fdinfo of a fresh fd.
    let f = aya::maps::MapData::from_pin(pin).ok()?;
    let fd = f.fd();
    let info = std::fs::read_to_string(format!(
        "/proc/self/fdinfo/{}",
        std::os::fd::AsFd::as_fd(fd).as_raw_fd()
    ))
    .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

fn map_memory(pin_dir: &Path) -> u64 {
    ["CM_SERVICES", "CM_BACKENDS", "CM_SLAB", "CM_SVC_META"]
        .iter()
        .filter_map(|m| memlock_of(&pin_dir.join(m)))
        .sum()
}

fn programming_and_memory(env: &BenchEnv, out: &mut String) {
    let counts = backend_counts(SERVICES);
    let mut rows = Vec::new();
    for (label, size) in [
        (
            "per-service M (smallest prime ≥ 100×backends)",
            TableSize::Auto,
        ),
        ("fixed M = 16381", TableSize::Fixed(16_381)),
    ] {
        eprintln!("programming: {label}");
        let maglev = Maglev::default().with_table_size(size);
        // Size the slab to what this layout needs (tables plus backend lists), as an operator
        // would.
        let entries: u64 = counts
            .iter()
            .map(|&c| u64::from(maglev.table_size_for(c as usize)) + u64::from(c))
            .sum();
        // 10 % headroom: replacing a table needs free space next to the old one until
        // the flip, and holes left by smaller tables fragment the slab.
        let slab_entries = u32::try_from(entries + entries / 10 + 65_536).unwrap_or(u32::MAX);
        let cfg = env.config(
            if matches!(size, TableSize::Auto) {
                "auto"
            } else {
                "fixed"
            },
            slab_entries,
        );
        let dp = match BpfDatapath::open(cfg.clone()) {
            Ok(dp) => dp,
            Err(e) => {
                let _ = writeln!(out, "{label}: datapath not opened: {e}");
                continue;
            }
        };
        // Build and program in batches of 1000 so the fixed-M tables never all sit in memory.
        let (mut build, mut program) = (Duration::ZERO, Duration::ZERO);
        let mut installed = 0u32;
        for start in (0..SERVICES).step_by(1000) {
            let t = Instant::now();
            let batch = mixed_services(&counts, &maglev, start..(start + 1000).min(SERVICES));
            build += t.elapsed();
            let t = Instant::now();
            let changes = DesiredChanges {
                upserts: batch,
                removals: vec![],
            };
            match dp.apply_changes(&changes) {
                Ok(n) => installed += n as u32,
                Err(e) => {
                    let _ = writeln!(out, "{label}: programming failed: {e}");
                    break;
                }
            }
            program += t.elapsed();
        }
        let dump = dp.dump(false).unwrap();
        // Incremental update rate: 1000 services each losing one backend.
        let updates: Vec<DesiredService> = mixed_services(&counts, &maglev, 0..1000)
            .into_iter()
            .map(|mut s| {
                s.backends.pop();
                s.table = maglev.build(&s.backends).unwrap().into();
                s
            })
            .collect();
        let t = Instant::now();
        dp.apply_changes(&DesiredChanges {
            upserts: updates,
            removals: vec![],
        })
        .unwrap();
        let update = t.elapsed();
        let mem = map_memory(cfg.pin_dir());
        rows.push((
            label,
            installed,
            dump.slab.used,
            mem,
            program,
            build,
            update,
        ));
        dp.cleanup().unwrap();
    }
    let _ = writeln!(
        out,
        "10k services, 2–50 backends each (same deterministic counts in both rows), programmed in batches of 1000\n"
    );
    let _ = writeln!(
        out,
        "| tables | services | slab entries used | table bytes | BPF map memory (memlock) | programming | services/s | Maglev build | 1000 updates |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (label, installed, used, mem, program, build, update) in &rows {
        let _ = writeln!(
            out,
            "| {label} | {installed} | {used} | {:.1} MiB | {:.1} MiB | {:.2} s | {:.0} | {:.2} s | {:.1} ms |",
            (*used as f64) * 4.0 / 1048576.0,
            (*mem as f64) / 1048576.0,
            program.as_secs_f64(),
            f64::from(*installed) / program.as_secs_f64(),
            build.as_secs_f64(),
            update.as_secs_f64() * 1e3,
        );
    }
    if rows.len() == 2 {
        let _ = writeln!(
            out,
            "\nmemory ratio per-service / fixed: slab {:.3}, all maps {:.3}",
            rows[0].2 as f64 / rows[1].2 as f64,
            rows[0].3 as f64 / rows[1].3 as f64
        );
    }
}
