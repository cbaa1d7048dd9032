//! The policy engine: Kubernetes verdicts on cross-cluster peers, named ports, ipBlocks,
//! and the incremental result equal to a full recompute after any sequence of changes.

use std::collections::BTreeMap;

use clustermesh_api::policy::{
    Labels, NetworkPolicy, PeerClusters, PolicyProtocol, WireNetworkPolicySpec, CLUSTER_LABEL,
    NAMESPACE_LABEL,
};
use clustermesh_api::security_identity::SecurityIdentity;
use proptest::prelude::*;

use super::*;

const TCP: PolicyProtocol = PolicyProtocol::Tcp;

fn labels(cluster: &str, namespace: &str, app: &str) -> Labels {
    Labels::from([
        (CLUSTER_LABEL.to_owned(), cluster.to_owned()),
        (NAMESPACE_LABEL.to_owned(), namespace.to_owned()),
        ("app".to_owned(), app.to_owned()),
    ])
}

fn np(
    namespace: &str,
    name: &str,
    yaml: &str,
    clusters: PeerClusters,
) -> (PolicyKey, NetworkPolicy) {
    let spec: WireNetworkPolicySpec = clustermesh_api::yaml::from_str(yaml).unwrap();
    let policy = NetworkPolicy::from_wire(namespace, name, &spec, "east", clusters).unwrap();
    let key = PolicyKey {
        kind: "NetworkPolicy".into(),
        namespace: namespace.into(),
        name: name.into(),
    };
    (key, policy)
}

fn ep(namespace: &str, pod: &str) -> EndpointId {
    EndpointId {
        namespace: namespace.into(),
        pod: pod.into(),
    }
}

fn local(id: u32, app: &str, ports: &[(&str, u16)]) -> LocalEndpoint {
    LocalEndpoint {
        identity: SecurityIdentity::new(id),
        labels: labels("east", "shop", app),
        named_ports: ports
            .iter()
            .map(|(n, p)| ((TCP, (*n).to_owned()), *p))
            .collect(),
    }
}

/// East (cluster 1) runs `api`; west (cluster 2) runs `frontend` and `other`.
fn mesh() -> PolicyEngine {
    let mut e = PolicyEngine::new();
    e.upsert_identity(
        SecurityIdentity::new(0x1_0100),
        labels("east", "shop", "api"),
    );
    e.upsert_identity(
        SecurityIdentity::new(0x1_0101),
        labels("east", "shop", "frontend"),
    );
    e.upsert_identity(
        SecurityIdentity::new(0x2_0100),
        labels("west", "shop", "frontend"),
    );
    e.upsert_identity(
        SecurityIdentity::new(0x2_0101),
        labels("west", "shop", "other"),
    );
    e.upsert_endpoint(
        ep("shop", "api-0"),
        local(0x1_0100, "api", &[("http", 8080)]),
    );
    e
}

const FROM_WEST_FRONTEND: &str = r"
podSelector: {matchLabels: {app: api}}
ingress:
  - from:
      - podSelector:
          matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: west}
    ports: [{port: http}]
";

#[test]
fn unselected_endpoints_are_not_isolated() {
    let e = mesh();
    let p = e.policy_of(&ep("shop", "api-0")).unwrap();
    assert_eq!(p, &EndpointPolicy::default());
    assert!(p.admits_ingress(SecurityIdentity::new(0x2_0101), TCP, 1));
}

#[test]
fn only_the_named_remote_workload_reaches_the_named_port() {
    let mut e = mesh();
    let (key, policy) = np(
        "shop",
        "allow-west-frontend",
        FROM_WEST_FRONTEND,
        PeerClusters::Local,
    );
    assert_eq!(e.upsert_policy(key, policy), vec![ep("shop", "api-0")]);
    let p = e.policy_of(&ep("shop", "api-0")).unwrap();
    assert!(p.admits_ingress(SecurityIdentity::new(0x2_0100), TCP, 8080));
    assert!(
        !p.admits_ingress(SecurityIdentity::new(0x2_0100), TCP, 9090),
        "wrong port"
    );
    assert!(
        !p.admits_ingress(SecurityIdentity::new(0x2_0101), TCP, 8080),
        "other app"
    );
    assert!(
        !p.admits_ingress(SecurityIdentity::new(0x1_0101), TCP, 8080),
        "east frontend"
    );
    assert!(!p.admits_ingress(SecurityIdentity::new(0x2_0100), PolicyProtocol::Udp, 8080));
    assert_eq!(p.egress, None, "egress not isolated");
}

#[test]
fn a_peer_without_the_cluster_label_is_local_unless_switched_to_all() {
    let yaml =
        "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: frontend}}}]}]";
    let mut e = mesh();
    let (key, policy) = np("shop", "frontend", yaml, PeerClusters::Local);
    e.upsert_policy(key, policy);
    let p = e.policy_of(&ep("shop", "api-0")).unwrap().clone();
    assert!(p.admits_ingress(SecurityIdentity::new(0x1_0101), TCP, 80));
    assert!(!p.admits_ingress(SecurityIdentity::new(0x2_0100), TCP, 80));
    let (key, policy) = np("shop", "frontend", yaml, PeerClusters::All);
    e.upsert_policy(key, policy);
    let p = e.policy_of(&ep("shop", "api-0")).unwrap();
    assert!(p.admits_ingress(SecurityIdentity::new(0x2_0100), TCP, 80));
}

#[test]
fn identity_changes_recompute_only_affected_endpoints() {
    let mut e = mesh();
    e.upsert_endpoint(ep("shop", "web-0"), local(0x1_0101, "frontend", &[]));
    let (key, policy) = np(
        "shop",
        "allow-west-frontend",
        FROM_WEST_FRONTEND,
        PeerClusters::Local,
    );
    e.upsert_policy(key, policy);
    // A new west frontend identity: api-0's allow set grows; web-0 is not selected.
    let new = SecurityIdentity::new(0x2_0102);
    let changed = e.upsert_identity(new, labels("west", "shop", "frontend"));
    assert_eq!(changed, vec![ep("shop", "api-0")]);
    assert!(e
        .policy_of(&ep("shop", "api-0"))
        .unwrap()
        .admits_ingress(new, TCP, 8080));
    // An identity no selector cares about changes nothing.
    let changed = e.upsert_identity(SecurityIdentity::new(0x2_0200), labels("west", "x", "db"));
    assert!(changed.is_empty());
    // Removing it again (the cluster went stale): the allow set shrinks.
    assert_eq!(e.remove_identity(new), vec![ep("shop", "api-0")]);
    assert!(!e
        .policy_of(&ep("shop", "api-0"))
        .unwrap()
        .admits_ingress(new, TCP, 8080));
}

#[test]
fn a_policy_type_without_rules_denies_everything_in_that_direction() {
    let mut e = mesh();
    let (key, policy) = np(
        "shop",
        "deny-egress",
        "podSelector: {}\npolicyTypes: [Egress]",
        PeerClusters::Local,
    );
    e.upsert_policy(key.clone(), policy);
    let p = e.policy_of(&ep("shop", "api-0")).unwrap();
    assert_eq!(p.egress, Some(Default::default()));
    assert!(!p.admits_egress(SecurityIdentity::new(0x1_0101), TCP, 53));
    assert_eq!(p.ingress, None);
    assert_eq!(e.remove_policy(&key), vec![ep("shop", "api-0")]);
    assert_eq!(
        e.policy_of(&ep("shop", "api-0")).unwrap(),
        &EndpointPolicy::default()
    );
}

#[test]
fn ip_blocks_and_port_ranges_are_kept_as_entries() {
    let mut e = mesh();
    let (key, policy) = np(
        "shop",
        "egress",
        "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}}], ports: [{port: 8000, endPort: 8100}]}]",
        PeerClusters::Local,
    );
    e.upsert_policy(key, policy);
    let egress = e
        .policy_of(&ep("shop", "api-0"))
        .unwrap()
        .egress
        .clone()
        .unwrap();
    assert_eq!(egress.len(), 1);
    let entry = egress.into_iter().next().unwrap();
    assert!(matches!(entry.peer, AllowPeer::Cidr { ref except, .. } if except.len() == 1));
    assert_eq!(
        entry.ports,
        PortSpan {
            protocol: Some(TCP),
            first: 8000,
            last: 8100
        }
    );
}

#[test]
fn named_egress_ports_resolve_against_the_peers_endpoints() {
    let mut e = mesh();
    let (key, policy) = np(
        "shop",
        "to-api",
        "podSelector: {matchLabels: {app: frontend}}\negress: [{to: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: http}]}]",
        PeerClusters::Local,
    );
    e.upsert_policy(key, policy);
    let web = ep("shop", "web-0");
    e.upsert_endpoint(web.clone(), local(0x1_0101, "frontend", &[]));
    let api = SecurityIdentity::new(0x1_0100);
    assert!(e.policy_of(&web).unwrap().admits_egress(api, TCP, 8080));
    // The api pod leaves: its port name no longer resolves.
    let changed = e.remove_endpoint(&ep("shop", "api-0"));
    assert!(changed.contains(&web), "{changed:?}");
    assert!(!e.policy_of(&web).unwrap().admits_egress(api, TCP, 8080));
}

/// One change to the engine, for the property test.
#[derive(Debug, Clone)]
enum Op {
    Identity(u32, &'static str, &'static str, &'static str),
    RemoveIdentity(u32),
    Endpoint(&'static str, &'static str, u32, &'static str, u16),
    RemoveEndpoint(&'static str, &'static str),
    Policy(&'static str, &'static str, usize),
    RemovePolicy(&'static str, &'static str),
}

const POLICIES: [&str; 4] = [
    FROM_WEST_FRONTEND,
    "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: frontend}}}]}]",
    "podSelector: {matchLabels: {app: frontend}}\negress: [{to: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: http}]}]",
    "podSelector: {matchLabels: {app: api}}\npolicyTypes: [Ingress, Egress]\negress: [{to: [{namespaceSelector: {}}]}]",
];

fn op() -> impl Strategy<Value = Op> {
    let cluster = prop::sample::select(vec!["east", "west"]);
    let app = prop::sample::select(vec!["api", "frontend", "other"]);
    let pod = prop::sample::select(vec!["p0", "p1", "p2"]);
    let name = prop::sample::select(vec!["a", "b"]);
    // Two namespaces: subjects stay in their policy's namespace, peers may not.
    let ns = prop::sample::select(vec!["shop", "tools"]);
    prop_oneof![
        (0u32..6, cluster, ns.clone(), app.clone())
            .prop_map(|(i, c, n, a)| Op::Identity(i, c, n, a)),
        (0u32..6).prop_map(Op::RemoveIdentity),
        (ns.clone(), pod.clone(), 0u32..6, app, 8079u16..8082)
            .prop_map(|(n, p, i, a, port)| Op::Endpoint(n, p, i, a, port)),
        (ns.clone(), pod).prop_map(|(n, p)| Op::RemoveEndpoint(n, p)),
        (ns.clone(), name.clone(), 0..POLICIES.len()).prop_map(|(s, n, i)| Op::Policy(s, n, i)),
        (ns, name).prop_map(|(s, n)| Op::RemovePolicy(s, n)),
    ]
}

proptest! {
    /// After any sequence of changes, the incrementally maintained result equals a full
    /// recompute from scratch, and every mutation reported exactly the endpoints whose
    /// policy changed.
    #[test]
    fn incremental_equals_full_recompute(ops in prop::collection::vec(op(), 1..40)) {
        let mut e = PolicyEngine::new();
        for op in ops {
            let before: BTreeMap<EndpointId, EndpointPolicy> = e.endpoint_policies().clone();
            let mut reported = match op {
                Op::Identity(i, c, ns, a) => e.upsert_identity(SecurityIdentity::new(i), labels(c, ns, a)),
                Op::RemoveIdentity(i) => e.remove_identity(SecurityIdentity::new(i)),
                Op::Endpoint(ns, p, i, a, port) => {
                    let mut endpoint = local(i, a, &[("http", port)]);
                    endpoint.labels = labels("east", ns, a);
                    e.upsert_endpoint(ep(ns, p), endpoint)
                }
                Op::RemoveEndpoint(ns, p) => e.remove_endpoint(&ep(ns, p)),
                Op::Policy(ns, n, i) => {
                    let (key, policy) = np(ns, n, POLICIES[i], PeerClusters::Local);
                    e.upsert_policy(key, policy)
                }
                Op::RemovePolicy(ns, n) => e.remove_policy(&PolicyKey {
                    kind: "NetworkPolicy".into(),
                    namespace: ns.into(),
                    name: n.into(),
                }),
            };
            reported.sort();
            reported.dedup();
            let mut actual: Vec<EndpointId> = before
                .keys()
                .chain(e.endpoint_policies().keys())
                .filter(|id| before.get(*id) != e.endpoint_policies().get(*id))
                .cloned()
                .collect();
            actual.sort();
            actual.dedup();
            prop_assert_eq!(&reported, &actual);
            let incremental = e.endpoint_policies().clone();
            prop_assert!(e.recompute_all().is_empty(), "a full recompute changed something");
            prop_assert_eq!(incremental, e.endpoint_policies().clone());
        }
    }
}
