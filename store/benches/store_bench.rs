//! Store throughput and latency through the `Store` trait, etcd vs embedded raft, in one
//! run (a plain bench binary: `cargo bench -p clustermesh-store --bench store_bench`).
//!
//! For every backend and every writer count it runs a closed loop of `W` concurrent
//! writers, each issuing one `put` at a time (128-byte values over 1000 keys per writer)
//! for `STORE_BENCH_SECS` seconds after a short warm-up, and reports puts/s and the p50/p99
//! latency of a put (call to acknowledgement). A watch on the same prefix receives every
//! write during the run; watch delivery latency is the time from the start of a put to
//! the moment its event reaches the watcher.
//!
//! Backends (`STORE_BENCH_BACKENDS`, default `etcd,raft1,raft3`):
//! - `etcd`: Debian's etcd (3.4) as one member started by the bench on loopback, default
//!   durability (fsync on every commit);
//! - `raft1` / `raft3`: the embedded raft store with 1 / 3 replicas in this process,
//!   replica traffic over loopback gRPC with mTLS, fsync before acknowledging; the store
//!   handle is the leader's.
//!
//! All backends are started first; then `STORE_BENCH_ROUNDS` rounds (default 3) each
//! measure every backend once per writer count, rotating the backend order per round, so
//! load from other processes hits all backends alike. The table shows, per backend and
//! writer count, the round with the median puts/s, and the range over the rounds.
//!
//! Environment: `STORE_BENCH_SECS` (default 3), `STORE_BENCH_WRITERS` (default `1,16,64`),
//! `STORE_BENCH_ROUNDS` (default 3), `STORE_BENCH_BACKENDS`, `STORE_BENCH_MARKDOWN` (a
//! file to also write the tables to, as Markdown).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clustermesh_store::raft::{LocalCluster, ReplicaTls};
use clustermesh_store::Store;
use clustermesh_test_support::etcd::{etcd_binary, EtcdServer};
use futures::StreamExt;

const VALUE_SIZE: usize = 128;
const KEYS_PER_WRITER: u64 = 1000;
const WARM_UP: Duration = Duration::from_millis(500);

/// One measured row.
#[derive(Debug, Clone)]
struct Row {
    backend: String,
    writers: usize,
    puts: u64,
    errors: u64,
    elapsed: Duration,
    put_p50: Duration,
    put_p99: Duration,
    watch_p50: Duration,
    watch_p99: Duration,
    watch_samples: usize,
    /// Lowest and highest puts/s over the rounds.
    range: Option<(f64, f64)>,
}

impl Row {
    fn puts_per_sec(&self) -> f64 {
        self.puts as f64 / self.elapsed.as_secs_f64()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `writers` closed-loop writers for `secs` against `store`, with one watcher.
async fn measure(
    store: Arc<dyn Store>,
    backend: &str,
    writers: usize,
    run_for: Duration,
    round: usize,
) -> Result<Row, String> {
    let prefix = format!("bench/{round}/");
    let started_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));

    let mut watch = store
        .watch(prefix.as_bytes(), 0)
        .await
        .map_err(|e| format!("{backend}: watch: {e}"))?;
    let watcher = {
        let started_at = Arc::clone(&started_at);
        let measuring = Arc::clone(&measuring);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while let Some(Ok(event)) = watch.next().await {
                let received = Instant::now();
                let Some(id) = event.kv.value.get(..8).and_then(|b| b.try_into().ok()) else {
                    continue;
                };
                let id = u64::from_le_bytes(id);
                if id == u64::MAX {
                    break; // end marker
                }
                let start = started_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let (Some(start), true) = (start, measuring.load(Ordering::Relaxed)) {
                    samples.push(received.saturating_duration_since(start));
                }
            }
            samples
        })
    };

    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = Arc::clone(&store);
            let prefix = prefix.clone();
            let started_at = Arc::clone(&started_at);
            let next_id = Arc::clone(&next_id);
            let measuring = Arc::clone(&measuring);
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let mut value = vec![b'x'; VALUE_SIZE];
                    value[..8].copy_from_slice(&id.to_le_bytes());
                    let key = format!("{prefix}{w}/{}", i % KEYS_PER_WRITER);
                    i += 1;
                    let start = Instant::now();
                    started_at
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id, start);
                    let result = store.put(key.as_bytes(), value, None).await;
                    let took = start.elapsed();
                    match result {
                        Ok(_) if measuring.load(Ordering::Relaxed) => latencies.push(took),
                        Ok(_) => {}
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();

    tokio::time::sleep(WARM_UP).await;
    measuring.store(true, Ordering::Relaxed);
    let begin = Instant::now();
    tokio::time::sleep(run_for).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = begin.elapsed();
    stop.store(true, Ordering::Relaxed);

    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task
            .await
            .map_err(|e| format!("{backend}: writer task: {e}"))?;
        latencies.extend(l);
        errors += e;
    }
    // End marker so the watcher stops once it has seen everything before it.
    let mut marker = vec![0u8; 8];
    marker.copy_from_slice(&u64::MAX.to_le_bytes());
    store
        .put(format!("{prefix}end").as_bytes(), marker, None)
        .await
        .map_err(|e| format!("{backend}: end marker: {e}"))?;
    let mut watch_samples = tokio::time::timeout(Duration::from_secs(120), watcher)
        .await
        .map_err(|_| format!("{backend}: watcher did not catch up within 120 s"))?
        .map_err(|e| format!("{backend}: watcher task: {e}"))?;
    // Tidy up so the next round starts from a similar key space size.
    let _ = store.delete_prefix(prefix.as_bytes()).await;

    latencies.sort_unstable();
    watch_samples.sort_unstable();
    Ok(Row {
        backend: backend.to_owned(),
        writers,
        puts: latencies.len() as u64,
        errors,
        elapsed,
        put_p50: percentile(&latencies, 50.0),
        put_p99: percentile(&latencies, 99.0),
        watch_p50: percentile(&watch_samples, 50.0),
        watch_p99: percentile(&watch_samples, 99.0),
        watch_samples: watch_samples.len(),
        range: None,
    })
}

/// A running backend and what keeps it alive.
struct Backend {
    label: String,
    store: Arc<dyn Store>,
    _guard: Box<dyn std::any::Any>,
}

async fn start_backend(name: &str) -> Result<Backend, String> {
    match name {
        "etcd" => {
            let binary = etcd_binary().ok_or("etcd binary not found (install etcd-server)")?;
            let version = std::process::Command::new(&binary)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(|l| l.replace("etcd Version: ", "")))
                .unwrap_or_else(|| "?".into());
            let server = EtcdServer::start_with(binary).await;
            let store = server.connect().await;
            Ok(Backend {
                label: format!("etcd {version} (1 member)"),
                store: Arc::new(store),
                _guard: Box::new(server),
            })
        }
        "raft1" | "raft3" => {
            let n = if name == "raft1" { 1 } else { 3 };
            let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
            let (tls, _ca) = ReplicaTls::ephemeral_loopback("bench.mesh", "bench")
                .map_err(|e| format!("replica certificates: {e}"))?;
            let cluster = LocalCluster::start(n, dir.path(), Some(tls))
                .await
                .map_err(|e| format!("raft cluster: {e}"))?;
            let leader = cluster
                .wait_for_leader(Duration::from_secs(30))
                .await
                .map_err(|e| format!("raft leader: {e}"))?;
            let store = cluster.store(leader).ok_or("leader not running")?;
            Ok(Backend {
                label: format!("raft ({n} replica{}, mTLS)", if n == 1 { "" } else { "s" }),
                store: Arc::new(store),
                _guard: Box::new((cluster, dir)),
            })
        }
        other => Err(format!(
            "unknown backend {other:?} (use etcd, raft1, raft3)"
        )),
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| backend | writers | puts/s (median) | puts/s range | put p50 ms | put p99 ms | watch p50 ms | watch p99 ms | errors |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            r.backend,
            r.writers,
            r.puts_per_sec(),
            r.range
                .map_or_else(String::new, |(lo, hi)| format!("{lo:.0}–{hi:.0}")),
            ms(r.put_p50),
            ms(r.put_p99),
            ms(r.watch_p50),
            ms(r.watch_p99),
            r.errors
        );
    }
    out
}

fn ratios(rows: &[Row]) -> String {
    let mut out = String::new();
    let etcd: Vec<&Row> = rows
        .iter()
        .filter(|r| r.backend.starts_with("etcd"))
        .collect();
    for raft in rows.iter().filter(|r| r.backend.starts_with("raft")) {
        let Some(base) = etcd.iter().find(|e| e.writers == raft.writers) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} vs etcd | {} | {:.2}x | {:.2}x | {:.2}x |",
            raft.backend,
            raft.writers,
            raft.puts_per_sec() / base.puts_per_sec(),
            ms(raft.put_p99) / ms(base.put_p99).max(f64::MIN_POSITIVE),
            ms(raft.watch_p99) / ms(base.watch_p99).max(f64::MIN_POSITIVE),
        );
    }
    if out.is_empty() {
        return out;
    }
    format!(
        "| ratio raft/etcd | writers | puts/s | put p99 | watch p99 |\n|---|---:|---:|---:|---:|\n{out}"
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful here.
    let secs: f64 = std::env::var("STORE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let run_for = Duration::from_secs_f64(secs.max(0.1));
    let writers: Vec<usize> = env_list("STORE_BENCH_WRITERS", "1,16,64")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let backends = env_list("STORE_BENCH_BACKENDS", "etcd,raft1,raft3");

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("store_bench: cannot start a tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let rounds: usize = std::env::var("STORE_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let rows = runtime.block_on(async {
        // All backends run for the whole benchmark; every round measures each of them once
        // per writer count, in a rotating order, so load from other processes on the
        // machine hits all backends alike.
        let mut started = Vec::new();
        for name in &backends {
            match start_backend(name).await {
                Ok(backend) => started.push(backend),
                Err(e) => eprintln!("store_bench: skipping {name}: {e}"),
            }
        }
        let mut samples: Vec<Vec<Row>> = vec![Vec::new(); started.len() * writers.len()];
        let mut slot = 0;
        for round in 0..rounds {
            for (w, &n) in writers.iter().enumerate() {
                for k in 0..started.len() {
                    let b = (k + round) % started.len();
                    let backend = &started[b];
                    slot += 1;
                    match measure(Arc::clone(&backend.store), &backend.label, n, run_for, slot)
                        .await
                    {
                        Ok(row) => {
                            eprintln!(
                                "round {round}: {:<26} writers={:<3} {:>8.0} puts/s  p50 {:>7.2} ms  p99 {:>7.2} ms  watch p50 {:>7.2} ms p99 {:>7.2} ms ({} watch samples)",
                                row.backend, row.writers, row.puts_per_sec(), ms(row.put_p50),
                                ms(row.put_p99), ms(row.watch_p50), ms(row.watch_p99), row.watch_samples
                            );
                            samples[b * writers.len() + w].push(row);
                        }
                        Err(e) => eprintln!("store_bench: {} with {n} writers failed: {e}", backend.label),
                    }
                }
            }
        }
        // Report, per backend and writer count, the round with the median puts/s.
        samples
            .into_iter()
            .filter_map(|mut runs| {
                runs.sort_by(|a, b| a.puts_per_sec().total_cmp(&b.puts_per_sec()));
                let (low, high) = (runs.first()?.puts_per_sec(), runs.last()?.puts_per_sec());
                let mut median = runs.get(runs.len() / 2)?.clone();
                median.range = Some((low, high));
                Some(median)
            })
            .collect::<Vec<_>>()
    });

    let report = format!("{}\n{}", table(&rows), ratios(&rows));
    println!("\n{report}");
    if let Ok(path) = std::env::var("STORE_BENCH_MARKDOWN") {
        if let Err(e) = std::fs::write(&path, &report) {
            eprintln!("store_bench: cannot write {path}: {e}");
        }
    }
}
