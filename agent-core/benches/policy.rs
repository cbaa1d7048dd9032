//! Policy recompute cost (issue 14's targets): 10k local endpoints, 1k NetworkPolicies,
//! identities of two clusters; one identity change (incremental) versus a full recompute
//! of every endpoint, both on the same engine in the same run.
//!
//! Shape: 100 namespaces with 100 endpoints each (10 apps × 10 pods); 10 policies per
//! namespace, each selecting one app and admitting one app of the same namespace from
//! either cluster on one port; 2,000 identities (100 namespaces × 10 apps × 2 clusters).
//!
//! Two parts, both in one run:
//! 1. criterion: the engine alone (medians).
//! 2. a plain timing loop for the tail (issue 14 asks for a p99): the engine alone and the
//!    whole [`PolicyPlane`] path (the record as a watcher hands it over → engine → lowering
//!    to datapath rules → writes into a [`MemPolicyDatapath`]), with 90k remote endpoints
//!    on top of the 10k local ones so the IP cache holds 100k entries; also one new remote
//!    endpoint (the IP cache path) and a plane built from scratch, split into its steps.
//!    Prints p50/p99/max. `POLICY_BENCH_ITERS` sets the iterations of the one-change rows
//!    (default 2000).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use clustermesh_agent_core::policy::inputs::{
    EndpointRecord, IdentityRecord, Input, InputKey, PolicyRecord,
};
use clustermesh_agent_core::policy::memory::MemPolicyDatapath;
use clustermesh_agent_core::policy::plane::{
    CgroupResolver, PlaneConfig, PlaneUpdate, PolicyPlane,
};
use clustermesh_agent_core::policy::{EndpointId, LocalEndpoint, PolicyEngine, PolicyKey};
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::keys::PolicySource;
use clustermesh_api::policy::{
    Labels, NetworkPolicy, PeerClusters, WireNetworkPolicySpec, CLUSTER_LABEL, NAMESPACE_LABEL,
};
use clustermesh_api::security_identity::SecurityIdentity;
use criterion::{criterion_group, Criterion};

const NAMESPACES: u32 = 100;
const APPS: u32 = 10;
const PODS_PER_APP: u32 = 10;

fn labels(cluster: &str, ns: u32, app: u32) -> Labels {
    Labels::from([
        (CLUSTER_LABEL.to_owned(), cluster.to_owned()),
        (NAMESPACE_LABEL.to_owned(), format!("ns{ns}")),
        ("app".to_owned(), format!("app{app}")),
    ])
}

fn identity(cluster: u32, ns: u32, app: u32) -> SecurityIdentity {
    SecurityIdentity::new((cluster << 16) | (256 + ns * APPS + app))
}

fn engine() -> PolicyEngine {
    let mut e = PolicyEngine::new();
    for (cluster_id, cluster) in [(1, "east"), (2, "west")] {
        for ns in 0..NAMESPACES {
            for app in 0..APPS {
                e.upsert_identity(identity(cluster_id, ns, app), labels(cluster, ns, app));
            }
        }
    }
    for ns in 0..NAMESPACES {
        for app in 0..APPS {
            for pod in 0..PODS_PER_APP {
                e.upsert_endpoint(
                    EndpointId {
                        namespace: format!("ns{ns}"),
                        pod: format!("app{app}-{pod}"),
                    },
                    LocalEndpoint {
                        identity: identity(1, ns, app),
                        labels: labels("east", ns, app),
                        named_ports: Default::default(),
                    },
                );
            }
        }
    }
    for ns in 0..NAMESPACES {
        for app in 0..APPS {
            let peer = (app + 1) % APPS;
            let yaml = format!(
                "podSelector: {{matchLabels: {{app: app{app}}}}}\ningress: [{{from: [{{podSelector: {{matchExpressions: [{{key: app, operator: In, values: [app{peer}]}}, {{key: {CLUSTER_LABEL}, operator: In, values: [east, west]}}]}}}}], ports: [{{port: 8080}}]}}]"
            );
            let spec: WireNetworkPolicySpec = clustermesh_api::yaml::from_str(&yaml).unwrap();
            let name = format!("allow-app{peer}");
            let policy = NetworkPolicy::from_wire(
                &format!("ns{ns}"),
                &name,
                &spec,
                "east",
                PeerClusters::Local,
            )
            .unwrap();
            e.upsert_policy(
                PolicyKey {
                    kind: "NetworkPolicy".into(),
                    namespace: format!("ns{ns}"),
                    name,
                },
                policy,
            );
        }
    }
    e
}

fn bench(c: &mut Criterion) {
    let mut e = engine();
    let mut group = c.benchmark_group("policy");
    group.sample_size(20);
    // A west identity of ns7/app3 flips between two label sets that one policy admits and
    // none admits: the 10 endpoints of ns7/app2 are recomputed each time.
    let id = identity(2, 7, 3);
    let admitted = labels("west", 7, 3);
    let ignored = labels("west", 7, 99);
    let mut flip = false;
    group.bench_function("one_identity_change_10k_endpoints_1k_policies", |b| {
        b.iter(|| {
            flip = !flip;
            let l = if flip {
                ignored.clone()
            } else {
                admitted.clone()
            };
            black_box(e.upsert_identity(id, l).len())
        });
    });
    group.sample_size(10);
    group.bench_function("full_recompute_10k_endpoints_1k_policies", |b| {
        b.iter(|| {
            // Forces every endpoint to be computed from scratch.
            let mut fresh = e.endpoint_policies().len();
            fresh += e.recompute_all().len();
            black_box(fresh)
        });
    });
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    tail();
}

// ---------------------------------------------------------------------------------------
// Part 2: tail latencies, engine alone and the whole plane.

/// Remote (west) endpoints added to the plane so that the IP cache holds 100k entries.
const REMOTE_ENDPOINTS: u32 = 90_000;

/// Pod UID `uid-<n>` lives in cgroup `n`.
struct Resolver;

impl CgroupResolver for Resolver {
    fn resolve(&mut self, pod_uid: &str) -> Option<Vec<u64>> {
        pod_uid.strip_prefix("uid-")?.parse().ok().map(|n| vec![n])
    }
}

fn policy_json(app: u32) -> String {
    let peer = (app + 1) % APPS;
    format!(
        r#"{{"podSelector":{{"matchLabels":{{"app":"app{app}"}}}},"ingress":[{{"from":[{{"podSelector":{{"matchExpressions":[{{"key":"app","operator":"In","values":["app{peer}"]}},{{"key":"{CLUSTER_LABEL}","operator":"In","values":["east","west"]}}]}}}}],"ports":[{{"port":8080}}]}}]}}"#
    )
}

/// The inputs of both clusters, as the watchers hand them over once synced.
fn plane_inputs() -> (Vec<Input>, Vec<Input>) {
    let mut east = Vec::new();
    let mut west = Vec::new();
    for ns in 0..NAMESPACES {
        for app in 0..APPS {
            east.push(Input::Identity(IdentityRecord {
                id: identity(1, ns, app),
                labels: labels("east", ns, app),
            }));
            west.push(Input::Identity(IdentityRecord {
                id: identity(2, ns, app),
                labels: labels("west", ns, app),
            }));
            for pod in 0..PODS_PER_APP {
                let n = (ns * APPS + app) * PODS_PER_APP + pod;
                east.push(Input::Endpoint(EndpointRecord {
                    ip: IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + n)),
                    identity: identity(1, ns, app),
                    node: "n1".into(),
                    namespace: format!("ns{ns}"),
                    pod: format!("app{app}-{pod}"),
                    pod_uid: format!("uid-{}", 1000 + n),
                    named_ports: BTreeMap::new(),
                }));
            }
            let name = format!("allow-app{}", (app + 1) % APPS);
            east.push(Input::Policy(PolicyRecord {
                key: PolicyKey {
                    kind: "NetworkPolicy".into(),
                    namespace: format!("ns{ns}"),
                    name,
                },
                source: PolicySource::NetworkPolicy,
                spec_json: policy_json(app),
            }));
        }
    }
    for n in 0..REMOTE_ENDPOINTS {
        let (ns, app) = ((n / 10) % NAMESPACES, n % APPS);
        west.push(Input::Endpoint(EndpointRecord {
            ip: IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + n)),
            identity: identity(2, ns, app),
            node: format!("w{}", n % 100),
            namespace: format!("ns{ns}"),
            pod: format!("w{n}"),
            pod_uid: String::new(),
            named_ports: BTreeMap::new(),
        }));
    }
    (east, west)
}

fn replace(cluster: &str, inputs: Vec<Input>) -> PlaneUpdate {
    let inputs: BTreeMap<InputKey, Option<Input>> =
        inputs.into_iter().map(|i| (i.key(), Some(i))).collect();
    PlaneUpdate::Replace {
        cluster: cluster.into(),
        inputs,
    }
}

/// A plane with both clusters synced and everything written to `dp`; returns the plane
/// and the times of: applying `west`, applying `east`, the first flush.
fn synced_plane(dp: &mut MemPolicyDatapath) -> (PolicyPlane, [Duration; 3]) {
    let (east, west) = plane_inputs();
    let (east, west) = (replace("east", east), replace("west", west));
    let started = Instant::now();
    let mut plane = PolicyPlane::new(
        PlaneConfig {
            local_cluster: "east".into(),
            node: "n1".into(),
            peer_clusters: PeerClusters::Local,
            mode: ClusterIdMode::Max255,
            host_addresses: vec![IpAddr::V4(Ipv4Addr::new(172, 30, 0, 1))],
        },
        Box::new(Resolver),
    );
    for (cluster, id, cidr) in [("east", 1, "10.1.0.0/16"), ("west", 2, "10.64.0.0/14")] {
        plane.apply(PlaneUpdate::ClusterInfo {
            cluster: cluster.into(),
            id,
            pod_cidrs: vec![cidr.into()],
        });
    }
    plane.apply(west);
    let west_done = Instant::now();
    plane.apply(east);
    let east_done = Instant::now();
    let report = plane.flush(dp);
    let flushed = Instant::now();
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(report.installed, 10_000, "{report:?}");
    (
        plane,
        [
            west_done - started,
            east_done - west_done,
            flushed - east_done,
        ],
    )
}

struct Tail {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn tail_of(mut v: Vec<Duration>) -> Tail {
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    Tail {
        n: v.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

fn row(out: &mut String, what: &str, t: &Tail) {
    use std::fmt::Write as _;
    // Milliseconds, or microseconds below one (the incremental IP cache row).
    let fmt = |d: Duration| {
        if d < Duration::from_millis(1) {
            format!("{:.1} µs", d.as_secs_f64() * 1e6)
        } else {
            format!("{:.2} ms", d.as_secs_f64() * 1e3)
        }
    };
    let _ = writeln!(
        out,
        "| {what} | {} | {} | {} | {} |",
        t.n,
        fmt(t.p50),
        fmt(t.p99),
        fmt(t.max)
    );
}

fn tail() {
    let iters: usize = std::env::var("POLICY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut out =
        String::from("| case | iterations | p50 | p99 | max |\n|---|---:|---:|---:|---:|\n");
    let id = identity(2, 7, 3);
    let admitted = labels("west", 7, 3);
    let ignored = labels("west", 7, 99);

    // Engine alone, same shape as the criterion rows.
    let mut e = engine();
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters + 20 {
        let l = if i % 2 == 0 { &ignored } else { &admitted };
        let t = Instant::now();
        let changed = e.upsert_identity(id, l.clone());
        let d = t.elapsed();
        assert_eq!(changed.len(), 10);
        if i >= 20 {
            v.push(d);
        }
    }
    row(&mut out, "engine: one identity change", &tail_of(v));
    let mut v = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        black_box(e.recompute_all().len());
        v.push(t.elapsed());
    }
    row(
        &mut out,
        "engine: full recompute (`recompute_all`)",
        &tail_of(v),
    );
    drop(e);

    // The whole plane into the in-memory datapath.
    let mut cold: [Vec<Duration>; 4] = Default::default();
    let mut record = |parts: [Duration; 3]| {
        for (k, d) in parts.iter().enumerate() {
            cold[k].push(*d);
        }
        cold[3].push(parts.iter().sum());
    };
    for _ in 0..5 {
        let mut dp = MemPolicyDatapath::new();
        let (plane, parts) = synced_plane(&mut dp);
        record(parts);
        drop(plane);
    }
    let mut dp = MemPolicyDatapath::new();
    let (mut plane, parts) = synced_plane(&mut dp);
    record(parts);
    // 100k endpoints plus the node's own address.
    assert_eq!(plane.ipcache().datapath_entries().len(), 100_001);
    let mut v = Vec::with_capacity(iters);
    for i in 0..iters + 20 {
        let l = if i % 2 == 0 { &ignored } else { &admitted };
        let installs = dp.installs();
        let t = Instant::now();
        plane.apply(PlaneUpdate::Upsert {
            cluster: "west".into(),
            input: Input::Identity(IdentityRecord {
                id,
                labels: l.clone(),
            }),
        });
        let report = plane.flush(&mut dp);
        let d = t.elapsed();
        assert_eq!(report.installed, 10, "{report:?}");
        assert_eq!(dp.installs() - installs, 10);
        if i >= 20 {
            v.push(d);
        }
    }
    row(
        &mut out,
        "plane: one identity change → engine → lowering → 10 endpoints' rules written",
        &tail_of(v),
    );
    // One new remote endpoint (a pod of an identity already known): the IP cache path.
    let mut v = Vec::with_capacity(iters);
    for i in 0..(iters + 20) as u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i));
        let t = Instant::now();
        plane.apply(PlaneUpdate::Upsert {
            cluster: "west".into(),
            input: Input::Endpoint(EndpointRecord {
                ip,
                identity: identity(2, 7, 3),
                node: "w0".into(),
                namespace: "ns7".into(),
                pod: format!("new-{i}"),
                pod_uid: String::new(),
                named_ports: BTreeMap::new(),
            }),
        });
        let report = plane.flush(&mut dp);
        let d = t.elapsed();
        assert_eq!(report.ipcache_changes, 1, "{report:?}");
        if i >= 20 {
            v.push(d);
        }
    }
    row(
        &mut out,
        "plane: one new remote endpoint → its IP cache entry written",
        &tail_of(v),
    );
    let [west, east, flush, total] = cold;
    row(
        &mut out,
        "plane: everything from scratch (both clusters' records applied + first flush: 10k endpoints lowered and written, 100k IP cache entries)",
        &tail_of(total),
    );
    row(
        &mut out,
        "… of which: `west` applied (1k identities, 90k endpoints)",
        &tail_of(west),
    );
    row(
        &mut out,
        "… of which: `east` applied (1k identities, 10k local endpoints, 1k policies parsed)",
        &tail_of(east),
    );
    row(
        &mut out,
        "… of which: first flush (IP cache reconcile, 10k endpoints lowered and installed)",
        &tail_of(flush),
    );
    println!("\ntail latencies (10k local endpoints, 1k policies, 2k identities; plane rows with 100k IP cache entries)\n\n{out}");
}
