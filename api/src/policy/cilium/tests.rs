//! The CiliumNetworkPolicy subset read with Cilium's semantics.

use super::*;
use crate::policy::{Labels, PortMatch, CLUSTER_LABEL};

fn cnp(yaml: &str) -> Result<NetworkPolicy, PolicyError> {
    let spec: WireCiliumPolicySpec = crate::yaml::from_str(yaml).unwrap();
    NetworkPolicy::from_cilium("shop", "l4", &spec, "east", PeerClusters::Local)
}

fn pod(cluster: &str, namespace: &str, app: &str) -> Labels {
    Labels::from([
        (CLUSTER_LABEL.to_owned(), cluster.to_owned()),
        (NAMESPACE_LABEL.to_owned(), namespace.to_owned()),
        ("app".to_owned(), app.to_owned()),
    ])
}

fn selector(peer: &Peer) -> &LabelSelector {
    match peer {
        Peer::Endpoints(s) => s,
        Peer::IpBlock { .. } => panic!("a CiliumNetworkPolicy peer is never an ipBlock"),
    }
}

#[test]
fn endpoint_selectors_stay_in_the_policy_namespace_unless_they_name_one() {
    let p = cnp(r"
endpointSelector: {matchLabels: {app: api}}
ingress:
  - fromEndpoints:
      - {}
      - matchLabels: {k8s:io.kubernetes.pod.namespace: tools, any:app: probe}
")
    .unwrap();
    assert!(p.subjects.matches(&pod("east", "shop", "api")));
    assert!(!p.subjects.matches(&pod("east", "tools", "api")));
    let rules = p.ingress.unwrap();
    let peers = rules[0].peers.as_ref().unwrap();
    let every = selector(&peers[0]);
    assert!(every.matches(&pod("east", "shop", "anything")));
    assert!(
        !every.matches(&pod("east", "tools", "anything")),
        "{{}} is this namespace only"
    );
    assert!(
        !every.matches(&pod("west", "shop", "anything")),
        "and this cluster only"
    );
    let probe = selector(&peers[1]);
    assert!(probe.matches(&pod("east", "tools", "probe")));
    assert!(!probe.matches(&pod("east", "shop", "probe")));
}

#[test]
fn sections_isolate_and_rules_allow_only_what_they_name() {
    // No ingress section: not isolated.
    let p = cnp("endpointSelector: {}\negress: [{}]").unwrap();
    assert_eq!(p.ingress, None);
    // `{}` is Cilium's default-deny idiom: isolated, nothing allowed.
    assert_eq!(p.egress, Some(vec![]));
    // Ports without peers: those ports to every peer.
    let p =
        cnp("endpointSelector: {}\negress: [{toPorts: [{ports: [{port: '53', protocol: UDP}]}]}]")
            .unwrap();
    let rules = p.egress.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].peers, None);
    assert_eq!(
        rules[0].ports,
        vec![PortRule {
            protocol: PolicyProtocol::Udp,
            ports: PortMatch::Range {
                first: 53,
                last: 53
            }
        }]
    );
}

#[test]
fn ports_default_to_any_protocol_and_accept_names_and_ranges() {
    let p = cnp(r"
endpointSelector: {}
ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts:
      - ports:
          - {port: '8080'}
          - {port: http, protocol: TCP}
          - {port: '9000', endPort: 9002, protocol: TCP}
          - {port: '0', protocol: UDP}
")
    .unwrap();
    let ports = &p.ingress.unwrap()[0].ports;
    let tcp_8080 = PortMatch::Range {
        first: 8080,
        last: 8080,
    };
    assert_eq!(
        ports,
        &vec![
            PortRule {
                protocol: PolicyProtocol::Tcp,
                ports: tcp_8080.clone()
            },
            PortRule {
                protocol: PolicyProtocol::Udp,
                ports: tcp_8080.clone()
            },
            PortRule {
                protocol: PolicyProtocol::Sctp,
                ports: tcp_8080
            },
            PortRule {
                protocol: PolicyProtocol::Tcp,
                ports: PortMatch::Named("http".into())
            },
            PortRule {
                protocol: PolicyProtocol::Tcp,
                ports: PortMatch::Range {
                    first: 9000,
                    last: 9002
                }
            },
            PortRule {
                protocol: PolicyProtocol::Udp,
                ports: PortMatch::Any
            },
        ]
    );
}

#[test]
fn what_is_outside_the_subset_is_refused_by_name() {
    for (yaml, want) in [
        (
            "endpointSelector: {}\ningress: [{fromCIDR: [10.0.0.0/8]}]",
            "fromCIDR",
        ),
        (
            "endpointSelector: {}\negress: [{toFQDNs: [{matchName: example.com}]}]",
            "toFQDNs",
        ),
        (
            "endpointSelector: {}\ningressDeny: [{}]",
            "ingressDeny",
        ),
        (
            "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: '80'}], rules: {http: []}}]}]",
            "rules",
        ),
    ] {
        let e = crate::yaml::from_str::<WireCiliumPolicySpec>(yaml)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{yaml}: {e}");
    }
    for (yaml, want) in [
        (
            "endpointSelector: {matchLabels: {reserved:host: ''}}",
            "source \"reserved\"",
        ),
        (
            "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: '80', protocol: ICMP}]}]}]",
            "not TCP, UDP, SCTP or ANY",
        ),
        (
            "endpointSelector: {}\ningress: [{toPorts: [{ports: []}]}]",
            "list at least one port",
        ),
        (
            "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: '70000'}]}]}]",
            "not a port number",
        ),
        (
            "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: web, endPort: 90}]}]}]",
            "needs a numeric port",
        ),
    ] {
        let e = cnp(yaml).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.starts_with("CiliumNetworkPolicy shop/l4: "),
            "{yaml}: {e}"
        );
    }
}

#[test]
fn subjects_never_leave_the_policy_namespace() {
    let p =
        cnp("endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: tools}}").unwrap();
    assert!(!p.subjects.matches(&pod("east", "tools", "api")));
    assert!(!p.subjects.matches(&pod("east", "shop", "api")));
}
