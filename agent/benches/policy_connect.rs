//! Policy datapath benchmark (issue 14): what egress policy adds to a connect() through
//! the eBPF socket load balancer, and how much kernel memory the IP cache and the policy
//! maps take for 100k remote endpoints.
//!
//! One datapath (programs attached to one threaded cgroup) with 1,000 services; below it
//! one threaded child cgroup per row ("pods"), each with its own long-lived worker thread
//! connecting to the same VIP. The baseline pod is no policy owner (the programs look up
//! its cgroup, miss and allow). The policy pods are owners isolated for egress with 1,000
//! rules each, and the IP cache holds 100,000 /32 entries of remote endpoints in four
//! clusters plus the VIP's backends; the connect is allowed, so the whole lookup path runs
//! (owner → IP cache LPM → rule LPM). Rows are measured in interleaved rounds so that load
//! from other processes hits every row alike; the ratio is to the baseline of the same run.
//!
//! Needs root (cgroups, bpf). Without it the bench prints why and exits successfully.
//! Traffic only goes to 127.0.0.0/8 in the host namespace.
//!
//! `cargo bench -p clustermesh-agent --bench policy_connect` (env `CM_BENCH_CONNECTS` sets
//! the connects per row, default 20000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::{
        fd::{AsFd as _, AsRawFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use clustermesh_agent::bpf::{cgroup2_mount, BpfConfig, BpfDatapath};
use clustermesh_agent_core::{
    datapath::{Backend, DesiredService, Frontend},
    maglev::Maglev,
    policy::datapath::{EndpointRules, IpCacheValue, PolicyDatapath, PolicyOwner, RuleKey},
};
use clustermesh_api::{
    cidr::Cidr,
    model::{Affinity, BackendState, Protocol, ServicePortId, Tier},
};
use clustermesh_ebpf_common::map_names;
use clustermesh_test_support::sockets::{timed_connect, Sink};

const SERVICES: u32 = 1_000;
/// Remote endpoints in the IP cache (/32 each), spread over `REMOTE_CLUSTERS` clusters.
const REMOTE_ENDPOINTS: u32 = 100_000;
const REMOTE_CLUSTERS: u32 = 4;
/// Rules per policy owner (egress, one peer identity each, TCP, one port).
const RULES: u32 = 1_000;
/// Port every backend sink listens on (so one rule admits both backends).
const BACKEND_PORT: u16 = 18_080;
const TCP: u8 = 6;

/// Identity of `local` in cluster `cluster` (cluster ID in the high 16 bits, as in
/// `ClusterIdMode::Max255`).
fn identity(cluster: u32, local: u32) -> u32 {
    (cluster << 16) | local
}

/// The identity of the measured VIP's backends when it is in the middle of the rule set
/// and when it sorts after every other rule.
const BACKEND_MID: u32 = (3 << 16) | 756;
const BACKEND_LAST: u32 = (9 << 16) | 256;
/// A cluster-2 identity the sanity check connects to without a rule.
const UNRULED: u32 = (2 << 16) | 9_999;

fn main() {
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !"policy_connect".contains(filter.as_str()) {
            return;
        }
    }
    if !nix::unistd::geteuid().is_root() {
        println!("policy_connect bench skipped: needs root for cgroups and bpf");
        return;
    }
    let Ok(cg_root) = cgroup2_mount() else {
        println!("policy_connect bench skipped: no cgroup2 mount");
        return;
    };
    let connects: usize = std::env::var("CM_BENCH_CONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut sb = Sandbox::new(&cg_root);
    let mut out = String::new();
    run(&mut sb, connects, &mut out);
    println!("\n{out}");
}

// ---------------------------------------------------------------------------------------
// Environment.

struct Sandbox {
    cgroup: PathBuf,
    pin_dir: PathBuf,
    pods: Vec<PathBuf>,
}

impl Sandbox {
    fn new(cg_root: &Path) -> Self {
        let name = format!("cm-polbench-{}", std::process::id());
        let cgroup = cg_root.join(&name);
        std::fs::create_dir(&cgroup).expect("create bench cgroup");
        std::fs::write(cgroup.join("cgroup.type"), "threaded").expect("threaded cgroup");
        Self {
            cgroup,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(name),
            pods: Vec::new(),
        }
    }

    fn config(&self) -> BpfConfig {
        BpfConfig::default()
            .with_pin_dir(&self.pin_dir)
            .with_cgroup(&self.cgroup)
            .with_slab_entries(1 << 20)
    }

    /// A threaded child cgroup; returns its path and cgroup ID (the directory's inode).
    fn pod(&mut self, name: &str) -> (PathBuf, u64) {
        let cg = self.cgroup.join(name);
        std::fs::create_dir(&cg).expect("create pod cgroup");
        std::fs::write(cg.join("cgroup.type"), "threaded").expect("threaded pod cgroup");
        self.pods.push(cg.clone());
        let id = std::fs::metadata(&cg).unwrap().ino();
        (cg, id)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = BpfDatapath::cleanup_pins(&self.config());
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

/// A long-lived thread in a pod cgroup: send (address, count), receive that many
/// connect() durations (an error ends the batch early and is returned instead).
struct Worker {
    tx: mpsc::Sender<Option<(SocketAddrV4, usize)>>,
    rx: mpsc::Receiver<Result<Vec<Duration>, nix::Error>>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(cgroup: &Path) -> Self {
        let (tx, work_rx) = mpsc::channel::<Option<(SocketAddrV4, usize)>>();
        let (done_tx, rx) = mpsc::channel();
        let threads = cgroup.join("cgroup.threads");
        let handle = std::thread::spawn(move || {
            std::fs::write(&threads, nix::unistd::gettid().to_string())
                .expect("move the worker into its pod cgroup");
            while let Ok(Some((to, n))) = work_rx.recv() {
                let v = (0..n).map(|_| timed_connect(to)).collect();
                if done_tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self {
            tx,
            rx,
            handle: Some(handle),
        }
    }

    fn run(&self, to: SocketAddrV4, n: usize) -> Result<Vec<Duration>, nix::Error> {
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
    Ipv4Addr::new(127, 110, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// `SERVICES` services with two backends each; `real` maps service index → its backends
/// (the sinks); the others point at addresses nobody connects to.
fn services(real: &[(u32, [Ipv4Addr; 2])]) -> Vec<DesiredService> {
    let maglev = Maglev::default();
    (0..SERVICES)
        .map(|i| {
            let ips = real.iter().find(|(k, _)| *k == i).map_or_else(
                || {
                    [
                        Ipv4Addr::new(127, 111, (i / 250) as u8, (i % 250 + 1) as u8),
                        Ipv4Addr::new(127, 112, (i / 250) as u8, (i % 250 + 1) as u8),
                    ]
                },
                |(_, ips)| *ips,
            );
            let backends: Vec<Backend> = ips.iter().map(|ip| backend(*ip, BACKEND_PORT)).collect();
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
        })
        .collect()
}

fn host(ip: Ipv4Addr, identity: u32) -> (Cidr, Option<IpCacheValue>) {
    (
        Cidr::host(IpAddr::V4(ip)),
        Some(IpCacheValue {
            identity,
            cluster_id: u16::try_from(identity >> 16).unwrap(),
            syncing: false,
        }),
    )
}

/// 100k remote endpoints: cluster c (2..=5) holds 10.c.x.y, 25k each, 1,000 identities
/// per cluster.
fn remote_endpoints() -> Vec<(Cidr, Option<IpCacheValue>)> {
    (0..REMOTE_ENDPOINTS)
        .map(|n| {
            let cluster = 2 + n % REMOTE_CLUSTERS;
            let k = n / REMOTE_CLUSTERS;
            let ip = Ipv4Addr::new(10, cluster as u8, (k / 250) as u8, (k % 250 + 1) as u8);
            host(ip, identity(cluster, 256 + k % 1000))
        })
        .collect()
}

/// `RULES` egress rules: `RULES - 1` for remote identities (port 8080) plus `extra`.
fn rules_with(extra: RuleKey) -> EndpointRules {
    let mut egress: std::collections::BTreeSet<RuleKey> = (0..RULES - 1)
        .map(|n| RuleKey {
            identity: identity(2 + n % REMOTE_CLUSTERS, 256 + n / REMOTE_CLUSTERS),
            protocol: TCP,
            port: 8080,
            port_bits: 16,
        })
        .collect();
    egress.insert(extra);
    assert_eq!(egress.len(), RULES as usize);
    EndpointRules {
        ingress: None,
        egress: Some(egress),
    }
}

fn admit(identity: u32) -> RuleKey {
    RuleKey {
        identity,
        protocol: TCP,
        port: BACKEND_PORT,
        port_bits: 16,
    }
}

// ---------------------------------------------------------------------------------------
// Map memory.

/// The kernel's own accounting of a pinned map's memory (`memlock:` in the fdinfo of a
/// fresh descriptor; for LPM tries and non-preallocated hashes it follows the entries).
fn memlock_of(pin: &Path) -> Option<u64> {
    let map = aya::maps::MapData::from_pin(pin).ok()?;
    let info = std::fs::read_to_string(format!(
        "/proc/self/fdinfo/{}",
        map.fd().as_fd().as_raw_fd()
    ))
    .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

const POLICY_MAPS: [&str; 7] = [
    map_names::IPCACHE4,
    map_names::IPCACHE6,
    map_names::POL_CGROUPS,
    map_names::POLICY,
    map_names::POL_STATS,
    map_names::POL_UDP,
    map_names::POL_EVENTS,
];

fn policy_memory(pin_dir: &Path) -> Vec<u64> {
    POLICY_MAPS
        .iter()
        .map(|m| memlock_of(&pin_dir.join(m)).unwrap_or(0))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The run.

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[allow(clippy::too_many_lines)]
fn run(sb: &mut Sandbox, n: usize, out: &mut String) {
    let mid_ips = [Ipv4Addr::new(127, 0, 70, 2), Ipv4Addr::new(127, 0, 70, 3)];
    let last_ips = [Ipv4Addr::new(127, 0, 70, 4), Ipv4Addr::new(127, 0, 70, 5)];
    let unruled_ip = Ipv4Addr::new(127, 0, 70, 6);
    let sinks: Vec<Sink> = mid_ips
        .iter()
        .chain(&last_ips)
        .chain(std::iter::once(&unruled_ip))
        .map(|ip| Sink::start(SocketAddrV4::new(*ip, BACKEND_PORT)))
        .collect();
    let (vip_mid, vip_last) = (SERVICES / 2, SERVICES - 1);

    let dp = BpfDatapath::open(sb.config()).expect("open datapath");
    dp.reconcile(&services(&[(vip_mid, mid_ips), (vip_last, last_ips)]))
        .unwrap();
    let mut policy = dp.policy().expect("open the policy maps");
    let mem_empty = policy_memory(sb.config().pin_dir());

    // IP cache: 100k remote endpoints plus the sinks.
    let mut entries = remote_endpoints();
    entries.extend(mid_ips.iter().map(|ip| host(*ip, BACKEND_MID)));
    entries.extend(last_ips.iter().map(|ip| host(*ip, BACKEND_LAST)));
    entries.push(host(unruled_ip, UNRULED));
    let t = Instant::now();
    policy.apply_ipcache(&entries).unwrap();
    let ipcache_write = t.elapsed();
    let mem_ipcache = policy_memory(sb.config().pin_dir());

    // Pods: a baseline that is no owner, and one owner per policy row.
    let (cg_none, _) = sb.pod("no-policy");
    let (cg_mid, id_mid) = sb.pod("policy-mid");
    let (cg_last, id_last) = sb.pod("policy-last");
    let (cg_any, id_any) = sb.pod("policy-any");
    let owner = |id: u64| PolicyOwner {
        owner: id,
        cgroups: vec![id],
        identity: identity(1, 300),
    };
    let t = Instant::now();
    policy
        .install(&owner(id_mid), &rules_with(admit(BACKEND_MID)))
        .unwrap();
    let install_one = t.elapsed();
    let mem_one_owner = policy_memory(sb.config().pin_dir());
    policy
        .install(&owner(id_last), &rules_with(admit(BACKEND_LAST)))
        .unwrap();
    // Allowed only by an any-peer rule: the exact-identity lookup misses first.
    policy
        .install(&owner(id_any), &rules_with(admit(0)))
        .unwrap();
    let mem_all = policy_memory(sb.config().pin_dir());

    let to_mid = SocketAddrV4::new(vip_for(vip_mid), 80);
    let to_last = SocketAddrV4::new(vip_for(vip_last), 80);
    let rows: Vec<(&str, Worker, SocketAddrV4)> = vec![
        (
            "VIP, no policy for the client (cgroup is no policy owner)",
            Worker::start(&cg_none),
            to_mid,
        ),
        (
            "VIP, egress policy: 100k IP cache entries, 1,000 rules, backend's identity mid-set",
            Worker::start(&cg_mid),
            to_mid,
        ),
        (
            "VIP, egress policy, backend's identity last in the rule set",
            Worker::start(&cg_last),
            to_last,
        ),
        (
            "VIP, egress policy, allowed by an any-peer rule (exact-identity lookup misses first)",
            Worker::start(&cg_any),
            to_mid,
        ),
    ];

    // Sanity: enforcement is on (a peer without a rule is refused with EPERM) and every
    // measured connect is allowed.
    let denied = rows[1]
        .1
        .run(SocketAddrV4::new(unruled_ip, BACKEND_PORT), 1)
        .expect_err("a backend without a rule must be denied");
    assert_eq!(denied, nix::Error::EPERM);
    let before = policy.counters().unwrap();

    let rounds = 20usize;
    let per_round = (n / rounds).max(1);
    for (label, w, to) in &rows {
        w.run(*to, per_round / 2 + 1)
            .unwrap_or_else(|e| panic!("{label}: warm-up connect failed: {e}"));
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); rows.len()];
    for round in 0..rounds {
        eprintln!("latency round {}/{rounds}", round + 1);
        for (k, (label, w, to)) in rows.iter().enumerate() {
            samples[k].extend(
                w.run(*to, per_round)
                    .unwrap_or_else(|e| panic!("{label}: connect failed: {e}")),
            );
        }
    }
    let after = policy.counters().unwrap();
    let allowed = after.egress_allowed - before.egress_allowed;
    let denied_count = after.egress_denied - before.egress_denied;
    let lats: Vec<(Duration, Duration)> = samples.into_iter().map(percentiles).collect();
    let labels: Vec<&str> = rows.iter().map(|r| r.0).collect();
    drop(rows);
    drop(policy);
    dp.cleanup().unwrap();
    drop(sinks);

    let base = lats[0];
    let _ = writeln!(
        out,
        "connect() to a VIP with 2 backends among {SERVICES} services, {} connects per row in \
         {rounds} interleaved rounds (SO_LINGER 0); egress verdicts counted during the \
         rounds: {allowed} allowed, {denied_count} denied\n",
        per_round * rounds
    );
    let _ = writeln!(
        out,
        "| path | p50 | p99 | p50 / no policy | p99 / no policy |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for (label, (p50, p99)) in labels.iter().zip(&lats) {
        let _ = writeln!(
            out,
            "| {label} | {:.1} µs | {:.1} µs | {:.3}× | {:.3}× |",
            us(*p50),
            us(*p99),
            p50.as_secs_f64() / base.0.as_secs_f64(),
            p99.as_secs_f64() / base.1.as_secs_f64(),
        );
    }

    let _ = writeln!(
        out,
        "\nwrites: {} IP cache entries in {:.0} ms; one owner's {RULES} rules installed in {:.1} ms\n",
        entries.len(),
        ipcache_write.as_secs_f64() * 1e3,
        install_one.as_secs_f64() * 1e3,
    );
    let _ = writeln!(
        out,
        "| map (memlock, bytes) | empty | + {} IP cache entries | + 1 owner, {RULES} rules | + 3 owners, {} rules |",
        entries.len(),
        3 * RULES
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let mut totals = [0u64; 4];
    for (k, name) in POLICY_MAPS.iter().enumerate() {
        let cols = [mem_empty[k], mem_ipcache[k], mem_one_owner[k], mem_all[k]];
        for (t, c) in totals.iter_mut().zip(cols) {
            *t += c;
        }
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            cols[0], cols[1], cols[2], cols[3]
        );
    }
    let _ = writeln!(
        out,
        "| total | {} | {} | {} | {} |",
        totals[0], totals[1], totals[2], totals[3]
    );
    let grow = |k: usize, col: &[u64]| col[k].saturating_sub(mem_empty[k]);
    let _ = writeln!(
        out,
        "\nIP cache growth for {} entries: {} bytes ({:.1} bytes/entry); rule map growth for one owner's {RULES} rules: {} bytes ({:.1} bytes/rule)",
        entries.len(),
        grow(0, &mem_ipcache),
        grow(0, &mem_ipcache) as f64 / entries.len() as f64,
        grow(3, &mem_one_owner).saturating_sub(grow(3, &mem_ipcache)),
        grow(3, &mem_one_owner).saturating_sub(grow(3, &mem_ipcache)) as f64 / f64::from(RULES),
    );
}
