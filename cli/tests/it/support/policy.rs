//! What agents answer on their policy routes (`/v1/identities`, `/v1/endpoints`,
//! `/v1/policy`) in the policy-view scenarios, built from the admin API's own types and
//! listed out of order on purpose (the CLI orders them).
//!
//! Cluster east (local) has `default/client` and `default/web` on node n1 and
//! `default/db-0` on node n2; cluster west exports `default/db`.

use std::collections::BTreeMap;

use clustermesh_api::admin_policy::{
    AllowRule, EndpointEntry, EndpointPolicyStatus, IdentityEntry, PolicyReport, PolicyState,
    PolicyVerdicts,
};
use serde_json::Value;

/// Identity of `default/client` (east).
pub const CLIENT_ID: u32 = 16_777_217;
/// Identity of `default/web` (east).
pub const WEB_ID: u32 = 16_777_300;
/// Identity of `default/db` (west).
pub const WEST_DB_ID: u32 = 33_554_500;

fn labels(app: &str, cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_owned(), app.to_owned()),
        (
            "io.kubernetes.pod.namespace".to_owned(),
            "default".to_owned(),
        ),
        (
            "io.cilium.k8s.policy.cluster".to_owned(),
            cluster.to_owned(),
        ),
    ])
}

/// `/v1/identities`: web, west's db, client (unordered).
pub fn identities() -> Value {
    let id = |id, app, cluster: &str| IdentityEntry {
        id,
        cluster: cluster.into(),
        labels: labels(app, cluster),
    };
    serde_json::to_value(vec![
        id(WEB_ID, "web", "east"),
        id(WEST_DB_ID, "db", "west"),
        id(CLIENT_ID, "client", "east"),
    ])
    .expect("encode identities")
}

/// `/v1/endpoints`: 10.1.0.10 (web), 10.2.0.5 (west db), 10.1.0.9 (client) — in that
/// order, which is wrong both as text and as addresses.
pub fn endpoints() -> Value {
    let ep = |ip: &str, cluster: &str, identity, pod: &str, node: &str, app| EndpointEntry {
        ip: ip.into(),
        cluster: cluster.into(),
        identity,
        namespace: "default".into(),
        pod: pod.into(),
        node: node.into(),
        labels: labels(app, cluster),
        enforced: true,
    };
    serde_json::to_value(vec![
        ep("10.1.0.10", "east", WEB_ID, "web", "n1", "web"),
        ep("10.2.0.5", "west", WEST_DB_ID, "db", "w1", "db"),
        ep("10.1.0.9", "east", CLIENT_ID, "client", "n1", "client"),
    ])
    .expect("encode endpoints")
}

fn policy_state(kind: &str, name: &str, error: Option<&str>) -> PolicyState {
    PolicyState {
        kind: kind.into(),
        namespace: "default".into(),
        name: name.into(),
        in_force: error.is_none(),
        error: error.map(str::to_owned),
    }
}

fn the_policies() -> Vec<PolicyState> {
    vec![
        policy_state("NetworkPolicy", "web-ingress", None),
        policy_state(
            "CiliumNetworkPolicy",
            "broken",
            Some("spec.ingress[0].toPorts: port 70000 is out of range"),
        ),
        policy_state("NetworkPolicy", "db-egress", None),
    ]
}

/// `/v1/policy` of node n1: web isolated for ingress (client's identity on TCP 8080, a
/// CIDR on any port), client open both ways; web listed first.
pub fn policy_n1() -> Value {
    let web = EndpointPolicyStatus {
        namespace: "default".into(),
        pod: "web".into(),
        ip: "10.1.0.10".into(),
        identity: WEB_ID,
        policies: vec!["NetworkPolicy default/web-ingress".into()],
        ingress: Some(vec![
            AllowRule {
                peer: "identity".into(),
                identity: Some(CLIENT_ID),
                cluster: Some("east".into()),
                labels: labels("client", "east"),
                cidr: None,
                protocol: "TCP".into(),
                ports: "8080".into(),
            },
            AllowRule {
                peer: "cidr".into(),
                cidr: Some("10.0.0.0/8 except 10.1.0.0/16".into()),
                protocol: "any".into(),
                ports: "any".into(),
                ..AllowRule::default()
            },
        ]),
        egress: None,
        enforced: true,
    };
    let client = EndpointPolicyStatus {
        namespace: "default".into(),
        pod: "client".into(),
        ip: "10.1.0.9".into(),
        identity: CLIENT_ID,
        enforced: true,
        ..EndpointPolicyStatus::default()
    };
    serde_json::to_value(PolicyReport {
        node: "n1".into(),
        peer_clusters: "local".into(),
        policies: the_policies(),
        endpoints: vec![web, client],
        counters: PolicyVerdicts {
            egress_allowed: 11,
            egress_denied: 1,
            ingress_allowed: 5,
            ingress_denied: 2,
            syncing_passed: 0,
            reply_passed: 7,
        },
    })
    .expect("encode policy")
}

/// `/v1/policy` of node n2: db-0 isolated for egress with nothing allowed.
pub fn policy_n2() -> Value {
    let db = EndpointPolicyStatus {
        namespace: "default".into(),
        pod: "db-0".into(),
        ip: "10.1.1.4".into(),
        identity: 16_777_400,
        policies: vec!["NetworkPolicy default/db-egress".into()],
        ingress: None,
        egress: Some(Vec::new()),
        enforced: false,
    };
    serde_json::to_value(PolicyReport {
        node: "n2".into(),
        peer_clusters: "all".into(),
        policies: the_policies(),
        endpoints: vec![db],
        counters: PolicyVerdicts::default(),
    })
    .expect("encode policy")
}
