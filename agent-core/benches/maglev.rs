//! Maglev table build time: the agent's weighted builder next to a direct transcription of
//! the paper's Pseudocode 1 (Eisenbud et al., NSDI 2016, §3.4), same inputs, same run.
//! Prints the reference/fast ratio per case after the criterion output, then (untimed) the
//! share error and the disruption of single removals for both builders.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use clustermesh_agent_core::maglev::{
    auto_table_size, reference, BackendKey, Maglev, TableSize, WeightedKey,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const CASES: [(u32, u32); 4] = [(10, 1021), (100, 16381), (1000, 16381), (1000, 65521)];

fn keys(n: u32, mixed: bool) -> Vec<WeightedKey<'static>> {
    (0..n)
        .map(|i| WeightedKey {
            key: BackendKey {
                ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 3)),
                port: 8080,
                cluster: if i % 2 == 0 { "east" } else { "west" },
            },
            // Mixed: 1..=4, as tiers and per-backend weights produce.
            weight: if mixed { 1 + i % 4 } else { 1 },
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for mixed in [false, true] {
        let label = if mixed { "mixed" } else { "equal" };
        for (n, m) in CASES {
            let input = keys(n, mixed);
            let maglev = Maglev::new(1).with_table_size(TableSize::Fixed(m));
            let id = format!("{label}/n={n}/M={m}");
            group.bench_with_input(BenchmarkId::new("fast", &id), &input, |b, input| {
                b.iter(|| maglev.build_keys(black_box(input)))
            });
            group.bench_with_input(BenchmarkId::new("paper", &id), &input, |b, input| {
                b.iter(|| reference::build(black_box(input), m, 1))
            });
        }
    }
    group.finish();
    print_ratios();
    print_disruption();
}

/// Median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[runs / 2]
}

fn print_ratios() {
    println!(
        "\n{:<28} {:>12} {:>12} {:>8}",
        "case", "fast", "paper", "ratio"
    );
    for mixed in [false, true] {
        for (n, m) in CASES {
            let input = keys(n, mixed);
            let maglev = Maglev::new(1).with_table_size(TableSize::Fixed(m));
            let fast = median(31, || {
                black_box(maglev.build_keys(black_box(&input)).ok());
            });
            let paper = median(7, || {
                black_box(reference::build(black_box(&input), m, 1));
            });
            println!(
                "{:<28} {:>12?} {:>12?} {:>7.1}x",
                format!("{}/n={n}/M={m}", if mixed { "mixed" } else { "equal" }),
                fast,
                paper,
                paper.as_secs_f64() / fast.as_secs_f64()
            );
        }
    }
}

/// xorshift64: a fixed pseudo-random stream, so every run measures the same inputs.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `n` distinct random backends (IPv4, three clusters); weights 1 or uniform in 1..=20.
fn random_keys(n: usize, mixed: bool, s: &mut u64) -> Vec<WeightedKey<'static>> {
    const CLUSTERS: [&str; 3] = ["east", "west", "north"];
    let mut keys: Vec<WeightedKey<'static>> = Vec::with_capacity(n);
    while keys.len() < n {
        let key = BackendKey {
            ip: IpAddr::V4(Ipv4Addr::from(next(s) as u32)),
            port: 8080,
            cluster: CLUSTERS[(next(s) % 3) as usize],
        };
        if keys.iter().any(|k| k.key == key) {
            continue;
        }
        let weight = if mixed { 1 + (next(s) % 20) as u32 } else { 1 };
        keys.push(WeightedKey { key, weight });
    }
    keys
}

/// Largest |slots_i/M − w_i/W| of a table.
fn share_error(keys: &[WeightedKey<'_>], table: &[u32]) -> f64 {
    let total: f64 = keys.iter().map(|k| f64::from(k.weight)).sum();
    let mut counts = vec![0u32; keys.len()];
    for &i in table {
        counts[i as usize] += 1;
    }
    keys.iter()
        .zip(&counts)
        .map(|(k, &c)| (f64::from(c) / table.len() as f64 - f64::from(k.weight) / total).abs())
        .fold(0.0, f64::max)
}

/// Per builder: (mean over removals, worst single removal, largest share error) of
/// `inputs` random inputs with up to `removals` single removals each, M fixed.
fn disruption(
    n: usize,
    m: u32,
    mixed: bool,
    inputs: usize,
    removals: usize,
    build: &dyn Fn(&[WeightedKey<'static>]) -> Vec<u32>,
) -> (f64, f64, f64) {
    let mut s = 0x9e37_79b9_7f4a_7c15 ^ (n as u64) << 32 ^ u64::from(m) ^ u64::from(mixed);
    let (mut sum, mut count, mut worst, mut share) = (0.0, 0usize, 0.0f64, 0.0f64);
    for _ in 0..inputs {
        let keys = random_keys(n, mixed, &mut s);
        let table = build(&keys);
        share = share.max(share_error(&keys, &table));
        let before: Vec<BackendKey<'_>> = table.iter().map(|&i| keys[i as usize].key).collect();
        for v in (0..n).step_by(n.div_ceil(removals)) {
            let mut rest = keys.clone();
            let removed = rest.remove(v).key;
            let after: Vec<BackendKey<'_>> =
                build(&rest).iter().map(|&i| rest[i as usize].key).collect();
            let others = before.iter().filter(|&&k| k != removed).count();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != removed && b != a)
                .count();
            let f = moved as f64 / others as f64;
            sum += f;
            count += 1;
            worst = worst.max(f);
        }
    }
    (sum / count as f64, worst, share)
}

fn print_disruption() {
    println!(
        "\n{:<22} {:>28} {:>28}",
        "", "agent: mean / worst / share", "paper: mean / worst / share"
    );
    for (n, inputs) in [
        (3, 100),
        (5, 100),
        (8, 100),
        (10, 100),
        (11, 100),
        (15, 60),
        (20, 60),
        (30, 40),
        (50, 40),
        (60, 30),
        (100, 10),
    ] {
        let m = auto_table_size(n);
        for mixed in [false, true] {
            let agent = Maglev::new(1).with_table_size(TableSize::Fixed(m));
            let a = disruption(n, m, mixed, inputs, 10, &|k| {
                agent.build_keys(k).unwrap_or_default()
            });
            let p = disruption(n, m, mixed, inputs.min(20), 10, &|k| {
                reference::build(k, m, 1)
            });
            let pct = |x: f64| format!("{:.2}%", 100.0 * x);
            println!(
                "{:<22} {:>28} {:>28}",
                format!("{}/n={n}/M={m}", if mixed { "mixed" } else { "equal" }),
                format!("{} / {} / {}", pct(a.0), pct(a.1), pct(a.2)),
                format!("{} / {} / {}", pct(p.0), pct(p.1), pct(p.2)),
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
