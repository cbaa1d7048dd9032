//! NetworkPolicy validation and translation against Kubernetes' rules and Cilium's
//! cluster-aware reading of peers.

use proptest::prelude::*;

use super::*;
use crate::policy::{Labels, CLUSTER_LABEL};

fn policy(yaml: &str) -> Result<NetworkPolicy, PolicyError> {
    policy_with(yaml, PeerClusters::Local)
}

fn policy_with(yaml: &str, clusters: PeerClusters) -> Result<NetworkPolicy, PolicyError> {
    let spec: WireNetworkPolicySpec = crate::yaml::from_str(yaml).unwrap();
    NetworkPolicy::from_wire("shop", "api-policy", &spec, "east", clusters)
}

/// Identity labels of a pod as the mesh API server computes them.
fn pod(cluster: &str, namespace: &str, extra: &[(&str, &str)]) -> Labels {
    let mut l: Labels = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    l.insert(CLUSTER_LABEL.into(), cluster.into());
    l.insert(NAMESPACE_LABEL.into(), namespace.into());
    l
}

fn endpoints(peer: &Peer) -> &LabelSelector {
    match peer {
        Peer::Endpoints(s) => s,
        Peer::IpBlock { .. } => panic!("expected an endpoint peer, got {peer:?}"),
    }
}

fn only_peer(rules: &[PolicyRule]) -> &Peer {
    assert_eq!(rules.len(), 1);
    let peers = rules[0].peers.as_ref().expect("peers");
    assert_eq!(peers.len(), 1);
    &peers[0]
}

#[test]
fn policy_types_default_as_kubernetes_defaults_them() {
    // No policyTypes, no egress rules: ingress only.
    let p = policy("podSelector: {}").unwrap();
    assert_eq!(
        p.ingress,
        Some(vec![]),
        "isolated for ingress, nothing allowed"
    );
    assert_eq!(p.egress, None, "egress not isolated");
    // Egress rules present: both.
    let p = policy("egress: [{}]").unwrap();
    assert!(p.ingress.is_some() && p.egress.is_some());
    // An empty list is defaulted too.
    let p = policy("policyTypes: []").unwrap();
    assert!(p.ingress.is_some() && p.egress.is_none());
    // Explicit Egress only: ingress rules have no effect.
    let p = policy("policyTypes: [Egress]\ningress: [{}]").unwrap();
    assert_eq!(p.ingress, None);
    assert_eq!(p.egress, Some(vec![]), "egress deny-all");
    let e = policy("policyTypes: [ingress]").unwrap_err().to_string();
    assert!(
        e.contains("spec.policyTypes") && e.contains("\"ingress\""),
        "{e}"
    );
}

#[test]
fn subjects_are_pods_of_the_policy_namespace() {
    let p = policy("podSelector: {matchLabels: {app: api}}").unwrap();
    assert!(p.subjects.matches(&pod("east", "shop", &[("app", "api")])));
    assert!(!p.subjects.matches(&pod("east", "other", &[("app", "api")])));
    assert!(!p.subjects.matches(&pod("east", "shop", &[("app", "web")])));
}

#[test]
fn a_rule_without_peers_or_ports_admits_everything() {
    let p = policy("ingress: [{}]").unwrap();
    let rules = p.ingress.unwrap();
    assert_eq!(rules[0].peers, None);
    assert!(rules[0].ports.is_empty());
    let p = policy("ingress: [{from: [], ports: []}]").unwrap();
    assert_eq!(p.ingress.unwrap()[0].peers, None);
}

#[test]
fn pod_selector_peer_is_same_namespace_and_local_cluster_by_default() {
    let p = policy("ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}]}]").unwrap();
    let rules = p.ingress.unwrap();
    let s = endpoints(only_peer(&rules));
    assert!(s.matches(&pod("east", "shop", &[("app", "frontend")])));
    assert!(!s.matches(&pod("east", "other", &[("app", "frontend")])));
    assert!(
        !s.matches(&pod("west", "shop", &[("app", "frontend")])),
        "another cluster's pod is not selected without the cluster label"
    );
    let all = policy_with(
        "ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}]}]",
        PeerClusters::All,
    )
    .unwrap();
    let rules = all.ingress.unwrap();
    assert!(endpoints(only_peer(&rules)).matches(&pod("west", "shop", &[("app", "frontend")])));
}

#[test]
fn the_cluster_label_in_a_peer_selects_that_cluster() {
    let p = policy(
        r"
ingress:
  - from:
      - podSelector:
          matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: west}
",
    )
    .unwrap();
    let rules = p.ingress.unwrap();
    let s = endpoints(only_peer(&rules));
    assert!(s.matches(&pod("west", "shop", &[("app", "frontend")])));
    assert!(!s.matches(&pod("east", "shop", &[("app", "frontend")])));
}

#[test]
fn namespace_selector_matches_namespace_labels_and_combines_with_pods() {
    let ns = |name: &str, team: &str| {
        pod(
            "east",
            name,
            &[
                ("app", "frontend"),
                ("io.cilium.k8s.namespace.labels.team", team),
            ],
        )
    };
    // namespaceSelector alone: every pod of matching namespaces.
    let p = policy("ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]").unwrap();
    let rules = p.ingress.unwrap();
    let s = endpoints(only_peer(&rules));
    assert!(s.matches(&ns("n1", "a")));
    assert!(!s.matches(&ns("n2", "b")));
    // Both in one peer: pods matching podSelector in namespaces matching namespaceSelector.
    let p = policy(
        "ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {app: web}}}]}]",
    )
    .unwrap();
    let rules = p.ingress.unwrap();
    let s = endpoints(only_peer(&rules));
    assert!(!s.matches(&ns("n1", "a")), "app=frontend is not app=web");
    let mut web = ns("n1", "a");
    web.insert("app".into(), "web".into());
    assert!(s.matches(&web));
    // namespaceSelector {} : every namespace, pods only (not reserved identities).
    let p = policy("ingress: [{from: [{namespaceSelector: {}}]}]").unwrap();
    let rules = p.ingress.unwrap();
    let s = endpoints(only_peer(&rules));
    assert!(s.matches(&ns("anything", "z")));
    assert!(!s.matches(&Labels::from([(
        CLUSTER_LABEL.to_owned(),
        "east".to_owned()
    )])));
}

#[test]
fn ip_block_with_except() {
    let p = policy(
        "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.3.4/32]}}]}]",
    )
    .unwrap();
    let rules = p.egress.unwrap();
    let Peer::IpBlock { cidr, except } = only_peer(&rules) else {
        panic!("expected an ipBlock");
    };
    assert_eq!(cidr.to_string(), "10.0.0.0/8");
    assert_eq!(except.len(), 2);
    // Host bits are accepted and masked, as Kubernetes always did.
    let p = policy("egress: [{to: [{ipBlock: {cidr: 192.168.1.7/24}}]}]").unwrap();
    let rules = p.egress.unwrap();
    let Peer::IpBlock { cidr, .. } = only_peer(&rules) else {
        panic!("expected an ipBlock");
    };
    assert_eq!(cidr.to_string(), "192.168.1.0/24");
    for (yaml, want) in [
        (
            "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]",
            "not a strict subset",
        ),
        (
            "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]",
            "not a strict subset",
        ),
        (
            "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]}]",
            "not a strict subset",
        ),
        (
            "egress: [{to: [{ipBlock: {cidr: 10.0.0/8}}]}]",
            "spec.egress[0].to[0].ipBlock.cidr",
        ),
        (
            "egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
            "cannot be combined",
        ),
    ] {
        let e = policy(yaml).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains("shop/api-policy"),
            "{yaml}: {e}"
        );
    }
}

#[test]
fn ports_numbers_names_ranges_and_protocols() {
    let p = policy(
        r"
ingress:
  - ports:
      - {port: 8080}
      - {protocol: UDP, port: dns}
      - {port: 9000, endPort: 9010}
      - {protocol: SCTP}
",
    )
    .unwrap();
    let ports = &p.ingress.unwrap()[0].ports;
    assert_eq!(
        ports,
        &vec![
            PortRule {
                protocol: PolicyProtocol::Tcp,
                ports: PortMatch::Range {
                    first: 8080,
                    last: 8080
                }
            },
            PortRule {
                protocol: PolicyProtocol::Udp,
                ports: PortMatch::Named("dns".into())
            },
            PortRule {
                protocol: PolicyProtocol::Tcp,
                ports: PortMatch::Range {
                    first: 9000,
                    last: 9010
                }
            },
            PortRule {
                protocol: PolicyProtocol::Sctp,
                ports: PortMatch::Any
            },
        ]
    );
    for (yaml, want) in [
        ("ingress: [{ports: [{port: 0}]}]", "not a port number"),
        ("ingress: [{ports: [{port: 65536}]}]", "not a port number"),
        (
            "ingress: [{ports: [{port: 90, endPort: 80}]}]",
            "below port 90",
        ),
        (
            "ingress: [{ports: [{port: http, endPort: 90}]}]",
            "needs a numeric port",
        ),
        (
            "ingress: [{ports: [{endPort: 90}]}]",
            "needs a numeric port",
        ),
        (
            "ingress: [{ports: [{protocol: tcp, port: 80}]}]",
            "not TCP, UDP or SCTP",
        ),
        ("ingress: [{ports: [{port: Http}]}]", "only lowercase"),
        (
            "ingress: [{ports: [{port: '8080'}]}]",
            "at least one letter",
        ),
        ("ingress: [{ports: [{port: a--b}]}]", "no '--'"),
        (
            "ingress: [{ports: [{port: averyveryverylongname}]}]",
            "1-15 characters",
        ),
    ] {
        let e = policy(yaml).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains("spec.ingress[0].ports[0]"),
            "{yaml}: {e}"
        );
    }
}

#[test]
fn malformed_peers_and_fields_are_refused_with_their_place() {
    let e = policy("ingress: [{from: [{}]}]").unwrap_err().to_string();
    assert!(
        e.contains("spec.ingress[0].from[0]") && e.contains("is not a peer"),
        "{e}"
    );
    let e = policy("ingress: [{from: [{podSelector: {matchLabels: {'a b': x}}}]}]")
        .unwrap_err()
        .to_string();
    assert!(e.contains("spec.ingress[0].from[0].podSelector"), "{e}");
    // A misspelt field is an error, not a wider policy.
    for yaml in [
        "ingres: [{}]",
        "ingress: [{form: []}]",
        "egress: [{to: [{ipblock: {cidr: 10.0.0.0/8}}]}]",
    ] {
        assert!(
            crate::yaml::from_str::<WireNetworkPolicySpec>(yaml).is_err(),
            "{yaml} must not parse"
        );
    }
}

proptest! {
    /// Whatever the peer's pod labels, a peer without the cluster label never selects a
    /// pod of another cluster when scoped to the local one, and selects local pods exactly
    /// as the "all clusters" reading does.
    #[test]
    fn local_scoping_never_reaches_another_cluster(
        app in prop::sample::select(vec!["a", "b"]),
        pod_app in prop::sample::select(vec!["a", "b"]),
        cluster in prop::sample::select(vec!["east", "west"]),
        namespace in prop::sample::select(vec!["shop", "other"]),
    ) {
        let yaml = format!("ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {app}}}}}}}]}}]");
        let local = policy_with(&yaml, PeerClusters::Local).unwrap().ingress.unwrap();
        let all = policy_with(&yaml, PeerClusters::All).unwrap().ingress.unwrap();
        let labels = pod(cluster, namespace, &[("app", pod_app)]);
        let by_local = endpoints(only_peer(&local)).matches(&labels);
        let by_all = endpoints(only_peer(&all)).matches(&labels);
        prop_assert_eq!(by_all, app == pod_app && namespace == "shop");
        prop_assert_eq!(by_local, by_all && cluster == "east");
    }
}
