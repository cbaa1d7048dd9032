//! Policy recompute cost (issue 14's targets): 10k local endpoints, 1k NetworkPolicies,
//! identities of two clusters; one identity change (incremental) versus a full recompute
//! of every endpoint, both on the same engine in the same run.
//!
//! Shape: 100 namespaces with 100 endpoints each (10 apps × 10 pods); 10 policies per
//! namespace, each selecting one app and admitting one app of the same namespace from
//! either cluster on one port; 2,000 identities (100 namespaces × 10 apps × 2 clusters).
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use clustermesh_agent_core::policy::{EndpointId, LocalEndpoint, PolicyEngine, PolicyKey};
use clustermesh_api::policy::{
    Labels, NetworkPolicy, PeerClusters, WireNetworkPolicySpec, CLUSTER_LABEL, NAMESPACE_LABEL,
};
use clustermesh_api::security_identity::SecurityIdentity;
use criterion::{criterion_group, criterion_main, Criterion};

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
criterion_main!(benches);
