//! End-to-end identity propagation (issue 14): a new pod in cluster `west` → its identity
//! usable by policy in an agent of cluster `east`, through real raft stores, real mesh API
//! servers and real mTLS gRPC on 127.0.0.1 (the method of `--bench propagation`).
//!
//! Setup: `west` (remote, cluster ID 2) holds `PROP_IDENTITIES` identities and
//! `PROP_ENDPOINTS` endpoints (100k by default: the agent's IP cache holds them all);
//! `east` (local, ID 1) holds 10 `api` pods on this agent's node and one NetworkPolicy
//! admitting `frontend` pods of `west` into them. The agent runs with a policy datapath
//! written for the bench that timestamps what it is handed (IP cache prefixes, and the
//! peer identities of every rule set installed), and a cgroup resolver that maps pod UID
//! `uid-<n>` to cgroup `n`.
//!
//! 1. Initial sync: from `Agent::start` until the policy datapath holds every endpoint.
//! 2. Propagation: `PROP_UPDATES` new pods, one every 15 ms: each is a new identity
//!    (labels `app=frontend` plus a pod-template hash of its own, so a new identity the
//!    policy selects) and its endpoint, written to `west`'s store one after the other.
//!    Measured from the start of the identity write until (a) the pod's /32 is in the
//!    datapath's IP cache and (b) the api pods' rules admitting the identity are installed
//!    — both needed before a connection from the pod is allowed; p50/p99/max of the later
//!    of the two, and of each alone.
//!
//! `cargo bench -p clustermesh-agent --bench policy_propagation` (env `PROP_ENDPOINTS`,
//! `PROP_IDENTITIES`, `PROP_UPDATES`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark harness: fail loudly

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustermesh_agent::runtime::{Agent, AgentOptions};
use clustermesh_agent_core::datapath::{ApplyReport, Datapath, DesiredChanges, DesiredService};
use clustermesh_agent_core::policy::plane::CgroupResolver;
use clustermesh_agent_core::policy::{
    EndpointRules, IpCacheValue, PolicyCounters, PolicyDatapath, PolicyDatapathError, PolicyOwner,
};
use clustermesh_api::cidr::Cidr;
use clustermesh_api::keys::{
    endpoint_key, identity_key, policy_key, synced_key, Kind, PolicySource,
};
use clustermesh_api::policy::{CLUSTER_LABEL, NAMESPACE_LABEL};
use clustermesh_api::v1;
use clustermesh_store::raft::LocalCluster;
use clustermesh_store::Store;
use prost::Message;
use tokio_util::sync::CancellationToken;

use clustermesh_test_support::mesh;
use mesh::{MeshServer, ServerSpec};

const TD: &str = "bench.local";
const LOCAL_PODS: u32 = 10;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Observation points.

#[derive(Debug, Default)]
struct Seen {
    /// When each address first appeared in the IP cache.
    ips: HashMap<IpAddr, Instant>,
    /// When each peer identity first appeared in an installed rule set.
    rule_identities: HashMap<u32, Instant>,
    ipcache_len: usize,
}

/// A policy datapath that timestamps what it is handed and accepts everything.
#[derive(Debug, Clone, Default)]
struct Timestamping(Arc<Mutex<Seen>>);

impl Timestamping {
    fn ipcache_len(&self) -> usize {
        self.0.lock().unwrap().ipcache_len
    }

    fn seen(&self, ip: IpAddr, identity: u32) -> (Option<Instant>, Option<Instant>) {
        let s = self.0.lock().unwrap();
        (
            s.ips.get(&ip).copied(),
            s.rule_identities.get(&identity).copied(),
        )
    }
}

impl PolicyDatapath for Timestamping {
    fn apply_ipcache(
        &mut self,
        changes: &[(Cidr, Option<IpCacheValue>)],
    ) -> Result<(), PolicyDatapathError> {
        let now = Instant::now();
        let mut s = self.0.lock().unwrap();
        for (c, v) in changes {
            if v.is_some() && c.prefix_len() >= 32 && s.ips.insert(c.addr(), now).is_none() {
                s.ipcache_len += 1;
            }
        }
        Ok(())
    }

    fn reconcile_ipcache(
        &mut self,
        entries: &[(Cidr, IpCacheValue)],
    ) -> Result<(), PolicyDatapathError> {
        let now = Instant::now();
        let mut s = self.0.lock().unwrap();
        for (c, _) in entries {
            if c.prefix_len() >= 32 {
                s.ips.entry(c.addr()).or_insert(now);
            }
        }
        s.ipcache_len = s.ips.len();
        Ok(())
    }

    fn install(
        &mut self,
        _owner: &PolicyOwner,
        rules: &EndpointRules,
    ) -> Result<(), PolicyDatapathError> {
        let now = Instant::now();
        let mut s = self.0.lock().unwrap();
        for r in rules.ingress.iter().chain(rules.egress.iter()).flatten() {
            s.rule_identities.entry(r.identity).or_insert(now);
        }
        Ok(())
    }

    fn remove(&mut self, _owner: &PolicyOwner) -> Result<(), PolicyDatapathError> {
        Ok(())
    }

    fn reconcile_owners(&mut self, _live: &[PolicyOwner]) -> Result<(), PolicyDatapathError> {
        Ok(())
    }

    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError> {
        Ok(PolicyCounters::default())
    }
}

/// Pod UID `uid-<n>` lives in cgroup `n`.
struct Resolver;

impl CgroupResolver for Resolver {
    fn resolve(&mut self, pod_uid: &str) -> Option<Vec<u64>> {
        pod_uid.strip_prefix("uid-")?.parse().ok().map(|n| vec![n])
    }
}

/// The service datapath: accepts everything (no services in this bench).
#[derive(Debug)]
struct NoServices;

impl Datapath for NoServices {
    fn reconcile(&self, desired: &[DesiredService]) -> ApplyReport {
        ApplyReport {
            applied: desired.len(),
            ..ApplyReport::default()
        }
    }

    fn apply(&self, changes: &DesiredChanges) -> ApplyReport {
        ApplyReport {
            applied: changes.upserts.len() + changes.removals.len(),
            ..ApplyReport::default()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Records.

/// Identity `local` of cluster `cluster` (`ClusterIdMode::Max255`).
fn identity(cluster: u32, local: u32) -> u32 {
    (cluster << 16) | local
}

fn identity_record(id: u32, cluster: &str, ns: &str, app: &str, hash: Option<u32>) -> Vec<u8> {
    let mut labels: HashMap<String, String> = [
        ("app".to_owned(), app.to_owned()),
        (NAMESPACE_LABEL.to_owned(), ns.to_owned()),
        (CLUSTER_LABEL.to_owned(), cluster.to_owned()),
    ]
    .into();
    if let Some(h) = hash {
        labels.insert("pod-template-hash".into(), format!("h{h}"));
    }
    v1::Identity { id, labels }.encode_to_vec()
}

fn endpoint_record(
    ip: IpAddr,
    id: u32,
    cluster: &str,
    node: &str,
    ns: &str,
    pod: &str,
    uid: &str,
) -> Vec<u8> {
    v1::Endpoint {
        ip: ip.to_string(),
        identity: id,
        node: node.into(),
        namespace: ns.into(),
        pod: pod.into(),
        cluster: cluster.into(),
        named_ports: vec![],
        pod_uid: uid.into(),
    }
    .encode_to_vec()
}

fn remote_ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + n))
}

fn new_pod_ip(u: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a50_0000 + u))
}

/// Only `frontend` pods of `west` may reach the `api` pods (port 8080).
const POLICY: &str = r#"{"podSelector":{"matchLabels":{"app":"api"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"frontend","io.cilium.k8s.policy.cluster":"west"}}}],"ports":[{"protocol":"TCP","port":8080}]}]}"#;

async fn put_all(store: &Arc<dyn Store>, writes: Vec<(String, Vec<u8>)>) {
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

fn synced(cluster: &str) -> Vec<(String, Vec<u8>)> {
    Kind::ALL
        .iter()
        .map(|k| {
            (
                synced_key(cluster, *k),
                v1::SyncedMarker { revision: 0 }.encode_to_vec(),
            )
        })
        .collect()
}

async fn load_west(store: &Arc<dyn Store>, identities: u32, endpoints: u32) {
    let mut writes = Vec::new();
    for k in 0..identities {
        let id = identity(2, 256 + k);
        writes.push((
            identity_key("west", id),
            identity_record(
                id,
                "west",
                &format!("ns{}", k % 100),
                &format!("bg{k}"),
                None,
            ),
        ));
    }
    for n in 0..endpoints {
        let id = identity(2, 256 + n % identities);
        let ip = remote_ip(n);
        writes.push((
            endpoint_key("west", ip),
            endpoint_record(
                ip,
                id,
                "west",
                &format!("w{}", n % 100),
                &format!("ns{}", n % identities % 100),
                &format!("bg-{n}"),
                &format!("west-uid-{n}"),
            ),
        ));
    }
    writes.extend(synced("west"));
    put_all(store, writes).await;
}

async fn load_east(store: &Arc<dyn Store>) {
    let api = identity(1, 300);
    let mut writes = vec![(
        identity_key("east", api),
        identity_record(api, "east", "shop", "api", None),
    )];
    for p in 0..LOCAL_PODS {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 10 + p as u8));
        writes.push((
            endpoint_key("east", ip),
            endpoint_record(
                ip,
                api,
                "east",
                "node0",
                "shop",
                &format!("api-{p}"),
                &format!("uid-{}", 100 + p),
            ),
        ));
    }
    writes.push((
        policy_key(
            "east",
            "shop",
            PolicySource::NetworkPolicy,
            "frontend-from-west",
        ),
        v1::Policy {
            cluster: "east".into(),
            namespace: "shop".into(),
            name: "frontend-from-west".into(),
            kind: PolicySource::NetworkPolicy.to_proto().into(),
            spec_json: POLICY.into(),
        }
        .encode_to_vec(),
    ));
    writes.extend(synced("east"));
    put_all(store, writes).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "{:.1} ms | {:.1} ms | {:.1} ms",
        ms(percentile(v, 0.5)),
        ms(percentile(v, 0.99)),
        ms(v[v.len() - 1])
    )
}

#[tokio::main]
async fn main() {
    let endpoints = u32::try_from(env_usize("PROP_ENDPOINTS", 100_000)).unwrap();
    let identities = u32::try_from(env_usize("PROP_IDENTITIES", 1_000)).unwrap();
    let updates = u32::try_from(env_usize("PROP_UPDATES", 200)).unwrap();
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
    load_east(&east_store).await;
    load_west(&west_store, identities, endpoints).await;
    eprintln!(
        "loaded east ({LOCAL_PODS} local pods, 1 policy) and west ({identities} identities, {endpoints} endpoints) in {:.1?}",
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
    let dp = Timestamping::default();
    let cancel = CancellationToken::new();
    let mut options = AgentOptions::new(&config, "node0");
    options.initial_sync_timeout = Duration::from_secs(60);
    let started = Instant::now();
    let agent = Agent::start(
        options,
        Arc::new(NoServices),
        Some((Box::new(dp.clone()), Box::new(Resolver))),
        cancel.clone(),
    )
    .unwrap();
    let expected = endpoints as usize + LOCAL_PODS as usize;
    let deadline = started + Duration::from_secs(120);
    while dp.ipcache_len() < expected {
        assert!(
            Instant::now() < deadline,
            "initial sync incomplete after 120 s: {} of {expected} endpoints in the IP cache",
            dp.ipcache_len()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let sync_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. New pods.
    let (mut both, mut ipc, mut rules) = (Vec::new(), Vec::new(), Vec::new());
    for u in 0..updates {
        let id = identity(2, 20_000 + u);
        let ip = new_pod_ip(u);
        let id_value = identity_record(id, "west", "shop", "frontend", Some(u));
        let ep_value = endpoint_record(
            ip,
            id,
            "west",
            &format!("w{}", u % 100),
            "shop",
            &format!("frontend-{u}"),
            &format!("west-new-{u}"),
        );
        let write_started = Instant::now();
        west_store
            .put(identity_key("west", id).as_bytes(), id_value, None)
            .await
            .unwrap();
        west_store
            .put(endpoint_key("west", ip).as_bytes(), ep_value, None)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let (Some(a), Some(b)) = dp.seen(ip, id) {
                ipc.push(a - write_started);
                rules.push(b - write_started);
                both.push(a.max(b) - write_started);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pod {u} not usable by policy after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }

    println!("| measure | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    println!(
        "| new pod in west (identity + endpoint written) → usable by policy in east's agent (IP cache entry and rules admitting it both written), {} pods | {} |",
        both.len(),
        summary(&mut both)
    );
    println!(
        "| … → its /32 in the agent's IP cache | {} |",
        summary(&mut ipc)
    );
    println!(
        "| … → the api pods' rules admitting its identity installed | {} |",
        summary(&mut rules)
    );
    println!(
        "\ninitial sync: agent start → {expected} endpoints ({endpoints} remote) in the policy datapath's IP cache: {:.2} s",
        sync_time.as_secs_f64()
    );

    cancel.cancel();
    let _ = agent.task.await;
    east_server.stop().await;
    west_server.stop().await;
    east_raft.shutdown().await;
    west_raft.shutdown().await;
}
