//! Maglev table build time: the agent's weighted builder next to a direct transcription of
//! the paper's Pseudocode 1 (Eisenbud et al., NSDI 2016, §3.4), same inputs, same run.
//! Prints the reference/fast ratio per case after the criterion output.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use clustermesh_agent::maglev::{reference, BackendKey, Maglev, TableSize, WeightedKey};
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

criterion_group!(benches, bench);
criterion_main!(benches);
