//! The policy plane end to end against the in-memory datapath, which answers verdicts as
//! the eBPF programs do: records in, verdicts out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_api::cidr::Cidr;
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::keys::PolicySource;
use clustermesh_api::policy::{Labels, PeerClusters, PolicyProtocol};
use clustermesh_api::security_identity::SecurityIdentity;

use super::datapath::Direction::{Egress, Ingress};
use super::inputs::{EndpointRecord, IdentityRecord, Input, InputKey, PolicyRecord};
use super::memory::{MemPolicyDatapath, Verdict};
use super::plane::{CgroupResolver, PlaneConfig, PlaneUpdate, PolicyPlane};
use super::{IpCacheValue, PolicyDatapath, PolicyDatapathError, PolicyKey};
use proptest::prelude::*;

const TCP: u8 = 6;

/// Pod UID `uid-<n>` lives in cgroup `n`.
struct Resolver;

impl CgroupResolver for Resolver {
    fn resolve(&mut self, pod_uid: &str) -> Option<Vec<u64>> {
        pod_uid.strip_prefix("uid-")?.parse().ok().map(|n| vec![n])
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn id(cluster: u32, local: u32) -> SecurityIdentity {
    SecurityIdentity::compose(cluster, local, ClusterIdMode::Max255).unwrap()
}

fn labels(cluster: &str, ns: &str, app: &str) -> Labels {
    [
        ("app".to_owned(), app.to_owned()),
        ("io.kubernetes.pod.namespace".to_owned(), ns.to_owned()),
        (
            "io.cilium.k8s.policy.cluster".to_owned(),
            cluster.to_owned(),
        ),
    ]
    .into()
}

struct Mesh {
    plane: PolicyPlane,
    dp: MemPolicyDatapath,
}

/// Cluster2 (ID 2) is local, this node is `n1`; cluster1 (ID 1) is remote.
fn mesh(peers: PeerClusters) -> Mesh {
    let plane = PolicyPlane::new(
        PlaneConfig {
            local_cluster: "cluster2".into(),
            node: "n1".into(),
            peer_clusters: peers,
            mode: ClusterIdMode::Max255,
            host_addresses: vec![ip("172.30.0.33")],
        },
        Box::new(Resolver),
    );
    let mut m = Mesh {
        plane,
        dp: MemPolicyDatapath::new(),
    };
    for (name, cid, cidr) in [
        ("cluster1", 1, "10.101.0.0/16"),
        ("cluster2", 2, "10.102.0.0/16"),
    ] {
        m.plane.apply(PlaneUpdate::ClusterInfo {
            cluster: name.into(),
            id: cid,
            pod_cidrs: vec![cidr.into()],
        });
    }
    m
}

fn identity(cid: u32, local: u32, cluster: &str, app: &str) -> Input {
    Input::Identity(IdentityRecord {
        id: id(cid, local),
        labels: labels(cluster, "shop", app),
    })
}

fn endpoint(addr: &str, identity: SecurityIdentity, node: &str, pod: &str, uid: u64) -> Input {
    Input::Endpoint(EndpointRecord {
        ip: ip(addr),
        identity,
        node: node.into(),
        namespace: "shop".into(),
        pod: pod.into(),
        pod_uid: format!("uid-{uid}"),
        named_ports: [((PolicyProtocol::Tcp, "http".to_owned()), 8080)].into(),
    })
}

fn policy(name: &str, spec: &str) -> Input {
    Input::Policy(PolicyRecord {
        key: PolicyKey {
            kind: "NetworkPolicy".into(),
            namespace: "shop".into(),
            name: name.into(),
        },
        source: PolicySource::NetworkPolicy,
        spec_json: spec.into(),
    })
}

fn replace(cluster: &str, inputs: Vec<Input>) -> PlaneUpdate {
    let inputs: BTreeMap<InputKey, Option<Input>> =
        inputs.into_iter().map(|i| (i.key(), Some(i))).collect();
    PlaneUpdate::Replace {
        cluster: cluster.into(),
        inputs,
    }
}

/// Only cluster1's frontend may reach the api pods (cgroup 7) on port 8080.
const FRONTEND_FROM_CLUSTER1: &str = r#"{
  "podSelector": {"matchLabels": {"app": "api"}},
  "policyTypes": ["Ingress"],
  "ingress": [{
    "from": [{"podSelector": {"matchLabels": {"app": "frontend", "io.cilium.k8s.policy.cluster": "cluster1"}}}],
    "ports": [{"protocol": "TCP", "port": 8080}]
  }]
}"#;

/// Local frontends may reach the api on its named port.
const LOCAL_FRONTEND: &str = r#"{
  "podSelector": {"matchLabels": {"app": "api"}},
  "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}], "ports": [{"port": "http"}]}]
}"#;

fn synced_mesh(peers: PeerClusters, policies: Vec<Input>) -> Mesh {
    let mut m = unflushed_mesh(peers, policies);
    let report = m.plane.flush(&mut m.dp);
    assert!(report.failures.is_empty(), "{report:?}");
    m
}

/// Both clusters synced into the plane; nothing written to the datapath yet.
fn unflushed_mesh(peers: PeerClusters, policies: Vec<Input>) -> Mesh {
    let mut m = mesh(peers);
    m.plane.apply(replace(
        "cluster1",
        vec![
            identity(1, 300, "cluster1", "frontend"),
            identity(1, 301, "cluster1", "other"),
            endpoint("10.101.1.11", id(1, 300), "n1", "frontend-1", 101),
            endpoint("10.101.1.12", id(1, 301), "n1", "other-1", 102),
        ],
    ));
    let mut local = vec![
        identity(2, 400, "cluster2", "api"),
        identity(2, 401, "cluster2", "frontend"),
        endpoint("10.102.1.11", id(2, 400), "n1", "api-1", 7),
        endpoint("10.102.1.12", id(2, 401), "n1", "frontend-2", 8),
        // On another node: in the IP cache, not enforced here.
        endpoint("10.102.2.11", id(2, 400), "n2", "api-2", 9),
    ];
    local.extend(policies);
    m.plane.apply(replace("cluster2", local));
    m
}

#[test]
fn a_remote_frontend_reaches_the_api_and_nothing_else_does() {
    let m = synced_mesh(
        PeerClusters::Local,
        vec![policy("from-cluster1", FRONTEND_FROM_CLUSTER1)],
    );
    let v = |from: &str, port: u16| m.dp.verdict(7, Ingress, ip(from), TCP, port);
    assert_eq!(
        v("10.101.1.11", 8080),
        Verdict::Allowed,
        "cluster1 frontend"
    );
    assert_eq!(v("10.101.1.12", 8080), Verdict::Denied, "cluster1 other");
    assert_eq!(v("10.101.1.11", 9090), Verdict::Denied, "wrong port");
    // The local frontend is not cluster1's: denied by this policy.
    assert_eq!(v("10.102.1.12", 8080), Verdict::Denied, "local frontend");
    // An unknown address is world; the node itself is always admitted (allow-localhost).
    assert_eq!(v("192.0.2.7", 8080), Verdict::Denied, "world");
    assert_eq!(v("172.30.0.33", 9090), Verdict::Allowed, "host");
    // The frontend pod itself is not isolated.
    assert_eq!(
        m.dp.verdict(8, Ingress, ip("10.101.1.12"), TCP, 1),
        Verdict::NotEnforced
    );
    // Egress is not isolated by an ingress-only policy.
    assert_eq!(
        m.dp.verdict(7, Egress, ip("192.0.2.7"), TCP, 443),
        Verdict::NotEnforced
    );
}

#[test]
fn a_peer_selector_without_the_cluster_label_is_local_unless_switched_to_all() {
    let m = synced_mesh(PeerClusters::Local, vec![policy("local", LOCAL_FRONTEND)]);
    let v = |m: &Mesh, from: &str| m.dp.verdict(7, Ingress, ip(from), TCP, 8080);
    assert_eq!(v(&m, "10.102.1.12"), Verdict::Allowed, "local frontend");
    assert_eq!(
        v(&m, "10.101.1.11"),
        Verdict::Denied,
        "remote frontend, local-only default"
    );
    // Named port "http" resolved against the api pod's own container port.
    assert_eq!(
        m.dp.verdict(7, Ingress, ip("10.102.1.12"), TCP, 8081),
        Verdict::Denied
    );
    let all = synced_mesh(PeerClusters::All, vec![policy("local", LOCAL_FRONTEND)]);
    assert_eq!(
        v(&all, "10.101.1.11"),
        Verdict::Allowed,
        "remote frontend with all clusters"
    );
    assert_eq!(v(&all, "10.101.1.12"), Verdict::Denied);
}

#[test]
fn nothing_of_an_unsynced_cluster_is_dropped() {
    let mut m = mesh(PeerClusters::Local);
    // Only the local cluster is synced; cluster1 connected but still syncing.
    m.plane.apply(replace(
        "cluster2",
        vec![
            identity(2, 400, "cluster2", "api"),
            endpoint("10.102.1.11", id(2, 400), "n1", "api-1", 7),
            policy("from-cluster1", FRONTEND_FROM_CLUSTER1),
        ],
    ));
    m.plane.flush(&mut m.dp);
    let v = |m: &Mesh, from: &str| m.dp.verdict(7, Ingress, ip(from), TCP, 8080);
    assert_eq!(v(&m, "10.101.1.11"), Verdict::Syncing);
    // A record that arrived live before the sync completes is still not enforced.
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster1".into(),
        input: endpoint("10.101.1.12", id(1, 301), "n1", "other-1", 102),
    });
    m.plane.flush(&mut m.dp);
    assert_eq!(v(&m, "10.101.1.12"), Verdict::Syncing);
    m.plane.apply(replace(
        "cluster1",
        vec![
            identity(1, 300, "cluster1", "frontend"),
            identity(1, 301, "cluster1", "other"),
            endpoint("10.101.1.11", id(1, 300), "n1", "frontend-1", 101),
            endpoint("10.101.1.12", id(1, 301), "n1", "other-1", 102),
        ],
    ));
    m.plane.flush(&mut m.dp);
    assert_eq!(v(&m, "10.101.1.11"), Verdict::Allowed);
    assert_eq!(v(&m, "10.101.1.12"), Verdict::Denied);
    // Dropping the cluster (stale TTL) makes its addresses world.
    m.plane.apply(PlaneUpdate::DropCluster {
        cluster: "cluster1".into(),
    });
    m.plane.flush(&mut m.dp);
    assert_eq!(m.dp.lookup(ip("10.101.1.11")), None);
    assert_eq!(v(&m, "10.101.1.11"), Verdict::Denied);
}

#[test]
fn a_bad_policy_is_refused_alone_and_the_last_good_version_stays() {
    let mut m = synced_mesh(
        PeerClusters::Local,
        vec![policy("from-cluster1", FRONTEND_FROM_CLUSTER1)],
    );
    let v = |m: &Mesh, from: &str| m.dp.verdict(7, Ingress, ip(from), TCP, 8080);
    // An unknown field: refused, the previous version stays in force.
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster2".into(),
        input: policy("from-cluster1", r#"{"podSelector": {}, "ingres": []}"#),
    });
    // A new invalid one (bad selector) is refused alone.
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster2".into(),
        input: policy(
            "broken",
            r#"{"podSelector": {"matchLabels": {"bad key!": "x"}}, "policyTypes": ["Ingress"]}"#,
        ),
    });
    m.plane.flush(&mut m.dp);
    assert_eq!(m.plane.counters().policies_refused, 2);
    assert_eq!(v(&m, "10.101.1.11"), Verdict::Allowed);
    assert_eq!(v(&m, "10.101.1.12"), Verdict::Denied);
    let status = &m.plane.policies()[&PolicyKey {
        kind: "NetworkPolicy".into(),
        namespace: "shop".into(),
        name: "from-cluster1".into(),
    }];
    assert!(status.in_force.is_some());
    assert!(
        status.error.as_deref().unwrap().contains("ingres"),
        "{status:?}"
    );
    // Removing the policy un-isolates the pod.
    m.plane.apply(PlaneUpdate::Remove {
        cluster: "cluster2".into(),
        key: policy("from-cluster1", "").key(),
    });
    m.plane.flush(&mut m.dp);
    assert_eq!(v(&m, "10.101.1.12"), Verdict::NotEnforced);
}

#[test]
fn a_cluster_cannot_claim_another_clusters_identities_or_send_policies() {
    let mut m = synced_mesh(
        PeerClusters::Local,
        vec![policy("from-cluster1", FRONTEND_FROM_CLUSTER1)],
    );
    // cluster1 exports an endpoint with cluster2's api identity: refused, stays world.
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster1".into(),
        input: endpoint("10.101.1.50", id(2, 400), "n1", "spoof", 150),
    });
    // ...and an identity in cluster2's range, and a policy.
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster1".into(),
        input: identity(2, 402, "cluster1", "frontend"),
    });
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster1".into(),
        input: policy("allow-all", r#"{"podSelector": {}, "ingress": [{}]}"#),
    });
    m.plane.flush(&mut m.dp);
    assert_eq!(m.plane.counters().records_refused, 2);
    assert_eq!(m.plane.counters().policies_refused, 1);
    assert_eq!(
        m.dp.verdict(7, Ingress, ip("10.101.1.50"), TCP, 8080),
        Verdict::Denied
    );
    assert_eq!(
        m.dp.verdict(7, Ingress, ip("10.101.1.12"), TCP, 8080),
        Verdict::Denied
    );
}

#[test]
fn ip_blocks_with_holes_and_egress_ports() {
    let m = synced_mesh(
        PeerClusters::Local,
        vec![policy(
            "egress",
            r#"{
              "podSelector": {"matchLabels": {"app": "api"}},
              "policyTypes": ["Egress"],
              "egress": [
                {"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}],
                 "ports": [{"protocol": "TCP", "port": 443, "endPort": 444}]},
                {"to": [{"podSelector": {"matchLabels": {"app": "frontend", "io.cilium.k8s.policy.cluster": "cluster1"}}}]}
              ]
            }"#,
        )],
    );
    let v = |to: &str, port: u16| m.dp.verdict(7, Egress, ip(to), TCP, port);
    assert_eq!(v("192.0.2.1", 443), Verdict::Allowed);
    assert_eq!(v("192.0.2.1", 444), Verdict::Allowed);
    assert_eq!(v("192.0.2.1", 445), Verdict::Denied);
    assert_eq!(v("192.0.2.200", 443), Verdict::Denied, "in the hole");
    assert_eq!(v("198.51.100.1", 443), Verdict::Denied, "outside the block");
    assert_eq!(
        v("10.101.1.11", 5432),
        Verdict::Allowed,
        "remote frontend, any port"
    );
    assert_eq!(v("10.101.1.12", 5432), Verdict::Denied);
    // A pod address inside a block is the pod, not the block.
    assert_eq!(v("10.102.1.12", 443), Verdict::Denied);
}

#[test]
fn a_policy_change_reinstalls_only_the_affected_endpoint() {
    let mut m = synced_mesh(
        PeerClusters::Local,
        vec![policy("from-cluster1", FRONTEND_FROM_CLUSTER1)],
    );
    let before = m.dp.installs();
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster2".into(),
        input: policy(
            "from-cluster1",
            &FRONTEND_FROM_CLUSTER1.replace("8080", "9090"),
        ),
    });
    let report = m.plane.flush(&mut m.dp);
    assert_eq!(report.installed, 1, "{report:?}");
    assert_eq!(m.dp.installs(), before + 1);
    assert_eq!(
        m.dp.verdict(7, Ingress, ip("10.101.1.11"), TCP, 9090),
        Verdict::Allowed
    );
    assert_eq!(
        m.dp.verdict(7, Ingress, ip("10.101.1.11"), TCP, 8080),
        Verdict::Denied
    );
    // A failed install is retried on the next flush; the old rules stay meanwhile.
    m.dp.fail_installs(1);
    m.plane.apply(PlaneUpdate::Upsert {
        cluster: "cluster2".into(),
        input: policy("from-cluster1", FRONTEND_FROM_CLUSTER1),
    });
    let report = m.plane.flush(&mut m.dp);
    assert_eq!(report.failures.len(), 1);
    assert_eq!(
        m.dp.verdict(7, Ingress, ip("10.101.1.11"), TCP, 9090),
        Verdict::Allowed
    );
    let report = m.plane.flush(&mut m.dp);
    assert!(report.failures.is_empty());
    assert_eq!(
        m.dp.verdict(7, Ingress, ip("10.101.1.11"), TCP, 8080),
        Verdict::Allowed
    );
}

#[test]
fn a_restarted_plane_adopts_and_prunes_pinned_state() {
    let m = synced_mesh(
        PeerClusters::Local,
        vec![policy("from-cluster1", FRONTEND_FROM_CLUSTER1)],
    );
    let mut dp = m.dp.clone();
    // A stale owner left by a previous agent.
    super::PolicyDatapath::install(
        &mut dp,
        &super::PolicyOwner {
            owner: 99,
            cgroups: vec![99],
            identity: 0,
        },
        &super::EndpointRules::default(),
    )
    .unwrap();
    let mut again = unflushed_mesh(
        PeerClusters::Local,
        vec![policy("from-cluster1", FRONTEND_FROM_CLUSTER1)],
    );
    again.plane.flush(&mut dp);
    assert_eq!(dp.owners(), [7].into());
    assert_eq!(
        dp.verdict(7, Ingress, ip("10.101.1.12"), TCP, 8080),
        Verdict::Denied
    );
}

/// What reached the datapath's IP cache, over a [`MemPolicyDatapath`]; the next IP cache
/// write can be made to fail after `n` of its changes (the rest not applied), as a map
/// update failing midway would.
#[derive(Default)]
struct Recording {
    inner: MemPolicyDatapath,
    written: Vec<(Cidr, Option<IpCacheValue>)>,
    reconciles: usize,
    fail_after: Option<usize>,
}

impl Recording {
    fn take(&mut self) -> Vec<(Cidr, Option<IpCacheValue>)> {
        std::mem::take(&mut self.written)
    }

    fn injected(&mut self) -> Option<PolicyDatapathError> {
        self.fail_after.take().map(|n| PolicyDatapathError {
            map: "memory".into(),
            operation: format!("IP cache write after {n} changes"),
            detail: "injected failure".into(),
        })
    }
}

impl PolicyDatapath for Recording {
    fn apply_ipcache(
        &mut self,
        changes: &[(Cidr, Option<IpCacheValue>)],
    ) -> Result<(), PolicyDatapathError> {
        let n = self
            .fail_after
            .map_or(changes.len(), |n| n.min(changes.len()));
        self.written.extend_from_slice(&changes[..n]);
        self.inner.apply_ipcache(&changes[..n])?;
        self.injected().map_or(Ok(()), Err)
    }

    fn reconcile_ipcache(
        &mut self,
        entries: &[(Cidr, IpCacheValue)],
    ) -> Result<(), PolicyDatapathError> {
        self.reconciles += 1;
        match self.fail_after {
            None => self.inner.reconcile_ipcache(entries),
            Some(n) => {
                let partial: Vec<_> = entries
                    .iter()
                    .take(n)
                    .map(|(c, v)| (*c, Some(*v)))
                    .collect();
                self.inner.apply_ipcache(&partial)?;
                self.injected().map_or(Ok(()), Err)
            }
        }
    }

    fn install(
        &mut self,
        owner: &super::PolicyOwner,
        rules: &super::EndpointRules,
    ) -> Result<(), PolicyDatapathError> {
        self.inner.install(owner, rules)
    }

    fn remove(&mut self, owner: &super::PolicyOwner) -> Result<(), PolicyDatapathError> {
        self.inner.remove(owner)
    }

    fn reconcile_owners(&mut self, live: &[super::PolicyOwner]) -> Result<(), PolicyDatapathError> {
        self.inner.reconcile_owners(live)
    }

    fn counters(&self) -> Result<super::PolicyCounters, PolicyDatapathError> {
        self.inner.counters()
    }
}

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).unwrap()
}

fn value(identity: u32, cluster_id: u16, syncing: bool) -> Option<IpCacheValue> {
    Some(IpCacheValue {
        identity,
        cluster_id,
        syncing,
    })
}

/// Egress to `cidr` minus `except` from the api pods.
fn block_policy(cidr: &str, except: &[&str]) -> Input {
    policy(
        "blocks",
        &format!(
            r#"{{"podSelector": {{"matchLabels": {{"app": "api"}}}}, "policyTypes": ["Egress"],
                "egress": [{{"to": [{{"ipBlock": {{"cidr": "{cidr}", "except": {}}}}}]}}]}}"#,
            serde_json::to_string(except).unwrap()
        ),
    )
}

#[test]
fn an_incremental_flush_writes_only_the_changed_prefixes() {
    let mut m = unflushed_mesh(
        PeerClusters::Local,
        vec![policy("from-cluster1", FRONTEND_FROM_CLUSTER1)],
    );
    let mut dp = Recording::default();
    let report = m.plane.flush(&mut dp);
    assert_eq!(
        (dp.reconciles, report.ipcache_changes),
        (1, 6),
        "{report:?}"
    );
    let step = |m: &mut Mesh, dp: &mut Recording, update: Option<PlaneUpdate>| {
        if let Some(u) = update {
            m.plane.apply(u);
        }
        let report = m.plane.flush(dp);
        assert!(report.failures.is_empty(), "{report:?}");
        assert_eq!(dp.reconciles, 1, "no full reconcile after the first flush");
        let written = dp.take();
        assert_eq!(report.ipcache_changes, written.len());
        written
    };
    let upsert = |cluster: &str, input: Input| {
        Some(PlaneUpdate::Upsert {
            cluster: cluster.into(),
            input,
        })
    };
    let new_pod = || endpoint("10.101.1.13", id(1, 300), "n9", "frontend-3", 0);
    // One new pod: its /32 alone.
    assert_eq!(
        step(&mut m, &mut dp, upsert("cluster1", new_pod())),
        vec![(cidr("10.101.1.13/32"), value(id(1, 300).get(), 1, false))]
    );
    // Nothing new, or the same record again: nothing.
    assert_eq!(step(&mut m, &mut dp, None), vec![]);
    assert_eq!(step(&mut m, &mut dp, upsert("cluster1", new_pod())), vec![]);
    // Its identity changes: that prefix again.
    assert_eq!(
        step(
            &mut m,
            &mut dp,
            upsert(
                "cluster1",
                endpoint("10.101.1.13", id(1, 301), "n9", "frontend-3", 0)
            )
        ),
        vec![(cidr("10.101.1.13/32"), value(id(1, 301).get(), 1, false))]
    );
    // Gone: one delete.
    let remove = PlaneUpdate::Remove {
        cluster: "cluster1".into(),
        key: InputKey::Endpoint(ip("10.101.1.13")),
    };
    assert_eq!(
        step(&mut m, &mut dp, Some(remove)),
        vec![(cidr("10.101.1.13/32"), None)]
    );
    // An address block: its CIDR identities only.
    let written = step(
        &mut m,
        &mut dp,
        upsert(
            "cluster2",
            block_policy("192.0.2.0/24", &["192.0.2.128/25"]),
        ),
    );
    let prefixes: Vec<Cidr> = written.iter().map(|(c, _)| *c).collect();
    assert_eq!(prefixes, vec![cidr("192.0.2.0/24"), cidr("192.0.2.128/25")]);
    assert!(written
        .iter()
        .all(|(_, v)| v.is_some_and(|v| v.identity >= super::lower::FIRST_CIDR_IDENTITY)));
    // A new cluster while it syncs: its pod CIDR; once synced: the CIDR goes, its pod
    // comes; dropped: the pod goes.
    let info = PlaneUpdate::ClusterInfo {
        cluster: "cluster3".into(),
        id: 3,
        pod_cidrs: vec!["10.103.0.0/16".into()],
    };
    assert_eq!(
        step(&mut m, &mut dp, Some(info)),
        vec![(cidr("10.103.0.0/16"), value(2, 3, true))]
    );
    let synced = replace(
        "cluster3",
        vec![endpoint("10.103.1.1", id(3, 300), "n9", "x", 0)],
    );
    assert_eq!(
        step(&mut m, &mut dp, Some(synced)),
        vec![
            (cidr("10.103.0.0/16"), None),
            (cidr("10.103.1.1/32"), value(id(3, 300).get(), 3, false))
        ]
    );
    let drop = PlaneUpdate::DropCluster {
        cluster: "cluster3".into(),
    };
    assert_eq!(
        step(&mut m, &mut dp, Some(drop)),
        vec![(cidr("10.103.1.1/32"), None)]
    );
    // A failed write is retried for its prefixes alone, without a full reconcile.
    dp.fail_after = Some(0);
    m.plane.apply(upsert("cluster1", new_pod()).unwrap());
    let report = m.plane.flush(&mut dp);
    assert_eq!(report.failures.len(), 1, "{report:?}");
    assert_eq!(
        step(&mut m, &mut dp, None),
        vec![(cidr("10.101.1.13/32"), value(id(1, 300).get(), 1, false))]
    );
    assert_eq!(dp.inner.ipcache(), m.plane.desired_ipcache());
}

const CLUSTERS: [(&str, u32); 3] = [("cluster1", 1), ("cluster2", 2), ("cluster3", 3)];
/// Addresses any cluster may claim: pods, the node's own address, one inside a block, v6.
const ADDRS: [&str; 7] = [
    "10.101.0.1",
    "10.101.0.2",
    "10.102.0.1",
    "10.0.0.1",
    "172.30.0.33",
    "192.0.2.5",
    "fd00::1",
];
/// Pod CIDRs, a /32 that is also a pod address among them.
const POD_CIDRS: [&str; 4] = ["10.101.0.0/16", "10.0.0.0/8", "10.101.0.1/32", "fd00::/64"];
/// Address blocks (and holes) of the `blocks` policy.
const BLOCKS: [(&str, &[&str]); 4] = [
    ("10.0.0.0/8", &["10.101.0.0/16"]),
    ("192.0.2.0/24", &[]),
    ("10.101.0.1/32", &[]),
    ("0.0.0.0/0", &["172.30.0.33/32", "10.101.0.0/16"]),
];

#[derive(Debug, Clone)]
enum Op {
    Info {
        cluster: usize,
        moved: bool,
        cidrs: Vec<usize>,
    },
    Upsert {
        cluster: usize,
        addr: usize,
        local: u32,
    },
    Remove {
        cluster: usize,
        addr: usize,
    },
    Replace {
        cluster: usize,
        addrs: Vec<(usize, u32)>,
    },
    Drop {
        cluster: usize,
    },
    Blocks(usize),
    Unblock,
    Flush {
        fail_after: Option<usize>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let cluster = 0..CLUSTERS.len();
    let addr = 0..ADDRS.len();
    prop_oneof![
        1 => (
            cluster.clone(),
            prop::bool::weighted(0.1),
            prop::collection::vec(0..POD_CIDRS.len(), 0..3)
        )
            .prop_map(|(cluster, moved, cidrs)| Op::Info {
                cluster,
                moved,
                cidrs
            }),
        4 => (cluster.clone(), addr.clone(), 300..303u32)
            .prop_map(|(cluster, addr, local)| Op::Upsert { cluster, addr, local }),
        2 => (cluster.clone(), addr.clone()).prop_map(|(cluster, addr)| Op::Remove { cluster, addr }),
        1 => (
            cluster.clone(),
            prop::collection::vec((addr, 300..303u32), 0..4)
        )
            .prop_map(|(cluster, addrs)| Op::Replace { cluster, addrs }),
        1 => cluster.prop_map(|cluster| Op::Drop { cluster }),
        1 => (0..BLOCKS.len()).prop_map(Op::Blocks),
        1 => Just(Op::Unblock),
        3 => prop::option::weighted(0.2, 0..4usize).prop_map(|fail_after| Op::Flush { fail_after }),
    ]
}

fn update_of(op: &Op) -> Option<PlaneUpdate> {
    let name = |c: usize| CLUSTERS[c].0.to_owned();
    let pod = |c: usize, a: usize, local: u32| {
        endpoint(
            ADDRS[a],
            id(CLUSTERS[c].1, local),
            "n9",
            &format!("p{a}"),
            0,
        )
    };
    Some(match op {
        Op::Info {
            cluster,
            moved,
            cidrs,
        } => PlaneUpdate::ClusterInfo {
            cluster: name(*cluster),
            id: CLUSTERS[*cluster].1 + if *moved { 10 } else { 0 },
            pod_cidrs: cidrs.iter().map(|i| POD_CIDRS[*i].to_owned()).collect(),
        },
        Op::Upsert {
            cluster,
            addr,
            local,
        } => PlaneUpdate::Upsert {
            cluster: name(*cluster),
            input: pod(*cluster, *addr, *local),
        },
        Op::Remove { cluster, addr } => PlaneUpdate::Remove {
            cluster: name(*cluster),
            key: InputKey::Endpoint(ip(ADDRS[*addr])),
        },
        Op::Replace { cluster, addrs } => replace(
            &name(*cluster),
            addrs.iter().map(|(a, l)| pod(*cluster, *a, *l)).collect(),
        ),
        Op::Drop { cluster } => PlaneUpdate::DropCluster {
            cluster: name(*cluster),
        },
        Op::Blocks(i) => PlaneUpdate::Upsert {
            cluster: "cluster2".into(),
            input: block_policy(BLOCKS[*i].0, BLOCKS[*i].1),
        },
        Op::Unblock => PlaneUpdate::Remove {
            cluster: "cluster2".into(),
            key: policy("blocks", "{}").key(),
        },
        Op::Flush { .. } => return None,
    })
}

proptest! {
    /// Flushing incrementally along the way (with failed writes) leaves the datapath's IP
    /// cache exactly where one full reconcile of the final state puts it.
    #[test]
    fn incremental_ipcache_flushes_end_where_a_full_reconcile_does(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        let mut incremental = mesh(PeerClusters::Local);
        let mut scratch = mesh(PeerClusters::Local);
        let mut dp = Recording::default();
        for op in &ops {
            match update_of(op) {
                Some(u) => {
                    incremental.plane.apply(u.clone());
                    scratch.plane.apply(u);
                }
                None => {
                    let Op::Flush { fail_after } = op else { unreachable!() };
                    dp.fail_after = *fail_after;
                    incremental.plane.flush(&mut dp);
                    dp.fail_after = None;
                }
            }
        }
        let report = incremental.plane.flush(&mut dp);
        prop_assert!(report.failures.is_empty(), "{:?}", report);
        let report = scratch.plane.flush(&mut scratch.dp);
        prop_assert!(report.failures.is_empty(), "{:?}", report);
        let want = scratch.dp.ipcache();
        prop_assert_eq!(&want, &scratch.plane.desired_ipcache());
        prop_assert_eq!(dp.inner.ipcache(), want);
        // Each prefix's entry computed alone agrees with the whole cache built at once.
        let cache = incremental.plane.ipcache();
        let whole = cache.datapath_entries();
        for p in ADDRS.iter().map(|a| Cidr::host(ip(a))).chain(POD_CIDRS.iter().map(|c| cidr(c))) {
            prop_assert_eq!(cache.datapath_entry(&p), whole.get(&p).copied(), "{}", p);
        }
    }
}
