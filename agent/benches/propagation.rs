//! End-to-end agent benchmark (issue "Agent control plane", Benchmarks): propagation
//! latency and initial sync of a large remote cluster, through real raft stores, real
//! mesh API servers and real mTLS gRPC on 127.0.0.1.
//!
//! Setup: cluster `west` (remote) holds `SERVICES` global services with `BACKENDS`
//! ready backends each (10k × 10 = 100k endpoints by default); cluster `east` (local)
//! holds the same services with a frontend and no backends (a service is only programmed
//! where it exists locally), so every backend the agent programs comes from `west`.
//! Both run as in-process API servers on embedded single-replica raft stores.
//!
//! 1. Initial sync: from `Agent::start` until the datapath has received all of `west`'s
//!    backends (both clusters synced, merged, Maglev tables built, handed over). The
//!    process RSS is read before the agent starts (stores + API servers loaded) and
//!    after; the difference is the agent's share plus whatever the servers allocate
//!    while streaming to it.
//! 2. Propagation: `UPDATES` writes to `west`'s store, one every 15 ms, each flipping one
//!    backend of a different service to not-ready; time from the start of the store write
//!    until the datapath receives that service's new entry; p50/p99.
//!
//! The datapath is a lean timestamping one (keeps per-service arrival times and backend
//! counts only): `RecordingDatapath` keeps a copy of every batch, which would inflate the
//! RSS figure with test bookkeeping.
//!
//! 3. The agent binary alone as a child process (`--datapath record`) against the same
//!    servers: its own VmRSS/VmHWM, without the in-process servers' share.
//!
//! Not a criterion benchmark (tail latencies of asynchronous deliveries). Run:
//! `cargo bench -p clustermesh-agent --bench propagation` (env `PROP_SERVICES`,
//! `PROP_BACKENDS`, `PROP_UPDATES` override the defaults).
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark harness: fail loudly

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustermesh_agent::runtime::{Agent, AgentOptions};
use clustermesh_agent_core::datapath::{ApplyReport, Datapath, DesiredChanges, DesiredService};
use clustermesh_api::keys::{service_key, synced_key, Kind};
use clustermesh_api::model::ServicePortId;
use clustermesh_api::v1;
use clustermesh_store::raft::LocalCluster;
use clustermesh_store::Store;
use prost::Message;
use tokio_util::sync::CancellationToken;

use clustermesh_test_support::mesh;
use mesh::{MeshServer, ServerSpec};

const TD: &str = "bench.local";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (VmRSS, VmHWM) of this process in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Debug, Default)]
struct Arrivals {
    /// Per service: number of upserts received and the time of the last one.
    upserts: HashMap<ServicePortId, (u64, Instant)>,
    /// Per service: backends from `west` in the last entry received.
    west: HashMap<ServicePortId, usize>,
    west_total: usize,
}

/// Timestamps what it is handed; accepts everything.
#[derive(Debug, Default)]
struct Timestamping {
    inner: Mutex<Arrivals>,
}

impl Timestamping {
    fn west_total(&self) -> usize {
        self.inner.lock().unwrap().west_total
    }

    fn upserts_of(&self, id: &ServicePortId) -> Option<(u64, Instant)> {
        self.inner.lock().unwrap().upserts.get(id).copied()
    }
}

impl Datapath for Timestamping {
    fn reconcile(&self, desired: &[DesiredService]) -> ApplyReport {
        let removals: Vec<ServicePortId> = {
            let a = self.inner.lock().unwrap();
            let keep: std::collections::HashSet<&ServicePortId> =
                desired.iter().map(|s| &s.id).collect();
            a.west
                .keys()
                .filter(|id| !keep.contains(id))
                .cloned()
                .collect()
        };
        self.record(desired, &removals)
    }

    fn apply(&self, changes: &DesiredChanges) -> ApplyReport {
        self.record(&changes.upserts, &changes.removals)
    }
}

impl Timestamping {
    fn record(&self, upserts: &[DesiredService], removals: &[ServicePortId]) -> ApplyReport {
        let now = Instant::now();
        let mut a = self.inner.lock().unwrap();
        for id in removals {
            if let Some(n) = a.west.remove(id) {
                a.west_total -= n;
            }
        }
        for svc in upserts {
            let n = svc.backends.iter().filter(|b| b.cluster == "west").count();
            let old = a.west.insert(svc.id.clone(), n).unwrap_or(0);
            a.west_total = a.west_total + n - old;
            let entry = a.upserts.entry(svc.id.clone()).or_insert((0, now));
            entry.0 += 1;
            entry.1 = now;
        }
        ApplyReport {
            applied: upserts.len() + removals.len(),
            ..ApplyReport::default()
        }
    }
}

fn service(cluster: &str, i: usize, backends: usize, unready: Option<usize>) -> Vec<u8> {
    // East's frontends in 10.96.0.0/15, west's in 10.98.0.0/15 (up to 125k services each).
    let octet = (if cluster == "east" { 96 } else { 98 }) + i / 62_500;
    v1::Service {
        namespace: format!("ns{}", i % 100),
        name: format!("svc{i}"),
        cluster: cluster.into(),
        frontends: vec![format!("10.{octet}.{}.{}", i / 250 % 250, i % 250 + 1)],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: v1::Protocol::Tcp.into(),
        }],
        backends: (0..backends)
            .map(|b| {
                let n = i * backends + b;
                let ready = unready != Some(b);
                v1::Backend {
                    ip: format!("10.{}.{}.{}", 1 + n / 62500, n / 250 % 250, n % 250 + 1),
                    ports: vec![v1::BackendPort {
                        name: "http".into(),
                        port: 8080,
                        protocol: v1::Protocol::Tcp.into(),
                    }],
                    ready,
                    serving: ready,
                    node: format!("node{}", n % 100),
                    weight: 1,
                    ..Default::default()
                }
            })
            .collect(),
        global: true,
        shared: true,
        affinity: v1::Affinity::None.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn key(cluster: &str, i: usize) -> String {
    service_key(cluster, &format!("ns{}", i % 100), &format!("svc{i}"))
}

async fn load(store: &Arc<dyn Store>, cluster: &str, services: usize, backends: usize) {
    let mut writes: Vec<(String, Vec<u8>)> = (0..services)
        .map(|i| (key(cluster, i), service(cluster, i, backends, None)))
        .collect();
    for kind in Kind::ALL {
        writes.push((
            synced_key(cluster, kind),
            v1::SyncedMarker { revision: 0 }.encode_to_vec(),
        ));
    }
    for chunk in writes.chunks(512) {
        let mut set = tokio::task::JoinSet::new();
        for (k, v) in chunk.iter().cloned() {
            let store = Arc::clone(store);
            set.spawn(async move { store.put(k.as_bytes(), v, None).await.unwrap() });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    // Cargo runs benches with `--bench`; ignore arguments.
    let services = env_usize("PROP_SERVICES", 10_000);
    let backends = env_usize("PROP_BACKENDS", 10);
    let updates = env_usize("PROP_UPDATES", 200);
    scenario(services, backends, updates).await;
    // Issue 15: a new agent's initial sync of 1,000,000 remote endpoints (100k services ×
    // 10 backends by default), in a fresh pair of stores and servers.
    let big_services = env_usize("PROP_BIG_SERVICES", 100_000);
    if big_services > 0 {
        println!();
        let big_backends = env_usize("PROP_BIG_BACKENDS", 10);
        let big_updates = env_usize("PROP_BIG_UPDATES", 50);
        scenario(big_services, big_backends, big_updates).await;
    }
}

/// One run: stores and servers for `services` × `backends`, initial sync, `updates`
/// propagation writes, then the agent binary alone; prints its table.
#[allow(clippy::too_many_lines)]
async fn scenario(services: usize, backends: usize, updates: usize) {
    let dir = tempfile::tempdir().unwrap();
    let ca = mesh::pki(dir.path(), TD, "east");

    let east_raft = LocalCluster::start(1, &dir.path().join("east"), None)
        .await
        .unwrap();
    let west_raft = LocalCluster::start(1, &dir.path().join("west"), None)
        .await
        .unwrap();
    let east_store: Arc<dyn Store> = Arc::new(east_raft.store(0).unwrap());
    let west_store: Arc<dyn Store> = Arc::new(west_raft.store(0).unwrap());
    let t = Instant::now();
    load(&east_store, "east", services, 0).await;
    load(&west_store, "west", services, backends).await;
    eprintln!(
        "loaded east ({services} services, no backends) and west ({services} services x {backends} backends) in {:.1?}",
        t.elapsed()
    );

    let east_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let west_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let east_port = east_listener.local_addr().unwrap().port();
    let west_port = west_listener.local_addr().unwrap().port();
    let spec = |cluster, id| ServerSpec {
        trust_domain: TD,
        cluster,
        id,
        pod_cidrs: &[],
        stream_buffer: 1024,
    };
    let east_server = MeshServer::start(
        Arc::clone(&east_store),
        &ca,
        &spec("east", 1),
        east_listener,
    )
    .await;
    let west_server = MeshServer::start(
        Arc::clone(&west_store),
        &ca,
        &spec("west", 2),
        west_listener,
    )
    .await;
    let config = mesh::write_agent_config(
        &dir.path().join("agent.yaml"),
        dir.path(),
        TD,
        "east",
        &[("east", 1, east_port), ("west", 2, west_port)],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Initial sync.
    let (rss0, hwm0) = rss_kib();
    let dp = Arc::new(Timestamping::default());
    let cancel = CancellationToken::new();
    let mut options = AgentOptions::new(&config, "node0");
    options.initial_sync_timeout = Duration::from_secs(60);
    let started = Instant::now();
    let agent = Agent::start(
        options,
        Arc::clone(&dp) as Arc<dyn Datapath>,
        None,
        cancel.clone(),
    )
    .unwrap();
    let expected = services * backends;
    let deadline = started + Duration::from_secs(120);
    while dp.west_total() < expected {
        assert!(
            Instant::now() < deadline,
            "initial sync incomplete after 120 s: {} of {expected} west backends programmed",
            dp.west_total()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sync_time = started.elapsed();
    let (rss1, hwm1) = rss_kib();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss2, _) = rss_kib();

    // 2. Propagation.
    let mut latencies = Vec::with_capacity(updates);
    for u in 0..updates {
        let i = (u * 97) % services;
        let id = ServicePortId {
            namespace: format!("ns{}", i % 100),
            name: format!("svc{i}"),
            port_name: "http".into(),
        };
        let before = dp.upserts_of(&id).map_or(0, |(n, _)| n);
        let value = service("west", i, backends, Some(u % backends));
        let write_started = Instant::now();
        west_store
            .put(key("west", i).as_bytes(), value, None)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((n, at)) = dp.upserts_of(&id) {
                if n > before {
                    latencies.push(at - write_started);
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "update of {i} not programmed in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    latencies.sort();
    let (rss3, hwm3) = rss_kib();

    println!("| measure | value | target |");
    println!("|---|---:|---:|");
    println!(
        "| initial sync: agent start → {expected} west backends ({services} services) handed to the datapath | {:.2} s | < 3 s |",
        sync_time.as_secs_f64()
    );
    println!(
        "| process VmRSS before agent start (stores + API servers loaded) | {} MiB | |",
        rss0 / 1024
    );
    println!(
        "| process VmRSS increase at sync done / +2 s / after updates | {} / {} / {} MiB | < 300 MB |",
        (rss1.saturating_sub(rss0)) / 1024,
        (rss2.saturating_sub(rss0)) / 1024,
        (rss3.saturating_sub(rss0)) / 1024
    );
    println!(
        "| process VmHWM before agent / after sync / end | {} / {} / {} MiB | |",
        hwm0 / 1024,
        hwm1 / 1024,
        hwm3 / 1024
    );
    if !latencies.is_empty() {
        println!(
            "| propagation, {} single-service updates (store write → datapath) p50 | {:.1} ms | |",
            latencies.len(),
            ms(percentile(&latencies, 0.5))
        );
        println!(
            "| propagation p99 / max | {:.1} / {:.1} ms | p99 < 50 ms |",
            ms(percentile(&latencies, 0.99)),
            ms(*latencies.last().unwrap())
        );
    }

    cancel.cancel();
    let _ = agent.task.await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. The agent alone: the agent binary as a child process (`--datapath record`), RSS
    //    read from /proc/<pid>/status, so the servers' allocations are not counted.
    //    RecordingDatapath keeps a copy of every batch, so this over-states the agent.
    let socket = dir.path().join("admin.sock");
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clustermesh-agent"))
        .arg("--config")
        .arg(&config)
        .args(["--node-name", "node1", "--datapath", "record"])
        .arg("--admin-socket")
        .arg(&socket)
        .env("RUST_LOG", "info")
        // tracing_subscriber's fmt layer writes to stdout.
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (synced_tx, synced_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("initial sync done") {
                let _ = synced_tx.send(Instant::now());
            }
        }
    });
    let gate_open =
        tokio::task::spawn_blocking(move || synced_rx.recv_timeout(Duration::from_secs(60)).ok())
            .await
            .unwrap();
    let child_status = |pid: u32| -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    };
    // The table build and hand-over follow the gate: wait until the RSS has settled
    // (unchanged for 2 s, at least 3 s, at most 60 s).
    let settle_started = Instant::now();
    let mut last = (0, Instant::now());
    let (child_rss, child_hwm) = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (rss, hwm) = child_status(pid);
        if rss.abs_diff(last.0) > 1024 {
            last = (rss, Instant::now());
        }
        let waited = settle_started.elapsed();
        if (waited >= Duration::from_secs(3) && last.1.elapsed() >= Duration::from_secs(2))
            || waited >= Duration::from_secs(60)
        {
            break (rss, hwm);
        }
    };
    child.kill().unwrap();
    let _ = child.wait();
    match gate_open {
        Some(at) => println!(
            "| agent binary alone (`--datapath record`): start → initial-sync gate open | {:.2} s | |",
            (at - started).as_secs_f64()
        ),
        None => println!("| agent binary alone: no \"initial sync done\" log line within 60 s | – | |"),
    }
    println!(
        "| agent binary alone: VmRSS / VmHWM once settled after the gate opened | {} / {} MiB | < 300 MB (1M: < 1 GB) |",
        child_rss / 1024,
        child_hwm / 1024
    );
    east_server.stop().await;
    west_server.stop().await;
    east_raft.shutdown().await;
    west_raft.shutdown().await;
}
