//! Agent-side cost of propagation and initial sync: the desired state with 10k services
//! and 100k backends (two clusters, 5 backends each per service).
//!
//! * `update_one_service`: one remote record changes (a backend flips readiness) →
//!   re-merge, Maglev rebuild of that service, diff, hand to the datapath.
//! * `initial_sync_10k`: a remote cluster's full state arrives at once → merge and build
//!   all 10k tables (in parallel), hand everything to the datapath.
//!
//! The network and store legs of propagation are not included here.

use std::hint::black_box;
use std::time::Duration;

use clustermesh_agent_core::datapath::{ApplyReport, Datapath, DesiredChanges, DesiredService};
use clustermesh_agent_core::desired::DesiredState;
use clustermesh_agent_core::maglev::Maglev;
use clustermesh_agent_core::merge::Locality;
use clustermesh_api::model::{
    Affinity, BackendRecord, PortSpec, Protocol, ServiceName, ServiceRecord,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const SERVICES: u32 = 10_000;
const BACKENDS_PER_CLUSTER: u32 = 5;

/// Accepts everything (the bench measures the control plane, not a datapath).
#[derive(Debug)]
struct Discard;

impl Datapath for Discard {
    fn apply(&self, changes: &DesiredChanges) -> ApplyReport {
        ApplyReport {
            applied: black_box(changes.upserts.len() + changes.removals.len()),
            ..ApplyReport::default()
        }
    }

    fn reconcile(&self, desired: &[DesiredService]) -> ApplyReport {
        ApplyReport {
            applied: black_box(desired.len()),
            ..ApplyReport::default()
        }
    }
}

fn record(cluster: &str, octet: u8, i: u32, ready_first: bool) -> ServiceRecord {
    let http = PortSpec {
        name: "http".into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    ServiceRecord {
        cluster: cluster.into(),
        name: ServiceName {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
        },
        frontends: vec![format!("10.96.{}.{}", i / 256, i % 256)
            .parse()
            .expect("valid ip")],
        ports: vec![http.clone()],
        backends: (0..BACKENDS_PER_CLUSTER)
            .map(|j| BackendRecord {
                ip: format!(
                    "10.{octet}.{}.{}",
                    (i * BACKENDS_PER_CLUSTER + j) / 256 % 256,
                    (i * BACKENDS_PER_CLUSTER + j) % 256
                )
                .parse()
                .expect("valid ip"),
                ports: vec![PortSpec {
                    port: 8080,
                    ..http.clone()
                }],
                ready: j != 0 || ready_first,
                terminating: false,
                node: format!("node-{j}"),
                zone: "z1".into(),
                weight: 1,
            })
            .collect(),
        global: true,
        shared: true,
        affinity: Affinity::None,
        topology_aware: false,
    }
}

fn here() -> Locality {
    Locality {
        cluster: "east".into(),
        node: "node-0".into(),
        zone: "z1".into(),
    }
}

fn bench(c: &mut Criterion) {
    let east: Vec<ServiceRecord> = (0..SERVICES).map(|i| record("east", 1, i, true)).collect();
    let west: Vec<ServiceRecord> = (0..SERVICES).map(|i| record("west", 2, i, true)).collect();
    let mut group = c.benchmark_group("desired");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));

    let mut state = DesiredState::new(here(), Maglev::default());
    state.replace_cluster("east", east.clone());
    state.replace_cluster("west", west.clone());
    state.compute();
    state.flush(&Discard).expect("discard accepts");
    let mut flip = false;
    group.bench_function("update_one_service", |b| {
        b.iter(|| {
            flip = !flip;
            state.upsert(record("west", 2, 4242, flip));
            state.compute();
            state.flush(&Discard).expect("discard accepts")
        })
    });

    group.bench_function("initial_sync_10k", |b| {
        b.iter_batched(
            || {
                let mut s = DesiredState::new(here(), Maglev::default());
                s.replace_cluster("east", east.clone());
                s.compute();
                s.flush(&Discard).expect("discard accepts");
                (s, west.clone())
            },
            |(mut s, west)| {
                s.replace_cluster("west", west);
                s.compute();
                s.flush(&Discard).expect("discard accepts")
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
