//! Selector validation and matching against Kubernetes' rules, and the cluster scoping of
//! policy peers; property tests for the operators and the scoping switch.

use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn parse(yaml: &str) -> Result<LabelSelector, SelectorError> {
    let wire: WireLabelSelector = crate::yaml::from_str(yaml).unwrap();
    LabelSelector::from_wire(&wire)
}

#[test]
fn empty_selector_matches_everything() {
    let s = parse("{}").unwrap();
    assert!(s.is_everything());
    assert!(s.matches(&Labels::new()));
    assert!(s.matches(&labels(&[("app", "web")])));
}

#[test]
fn match_labels_and_expressions_must_all_hold() {
    let s = parse(
        r"
matchLabels: {app: api}
matchExpressions:
  - {key: tier, operator: In, values: [backend, db]}
  - {key: canary, operator: DoesNotExist}
",
    )
    .unwrap();
    assert!(s.matches(&labels(&[("app", "api"), ("tier", "db")])));
    assert!(!s.matches(&labels(&[("app", "api"), ("tier", "front")])));
    assert!(!s.matches(&labels(&[("app", "api")])), "In needs the key");
    assert!(!s.matches(&labels(&[("app", "api"), ("tier", "db"), ("canary", "")])));
    assert!(!s.matches(&labels(&[("app", "web"), ("tier", "db")])));
}

#[test]
fn not_in_matches_an_absent_key() {
    let s = parse("matchExpressions: [{key: env, operator: NotIn, values: [prod]}]").unwrap();
    assert!(s.matches(&Labels::new()));
    assert!(s.matches(&labels(&[("env", "dev")])));
    assert!(!s.matches(&labels(&[("env", "prod")])));
}

#[test]
fn refuses_what_the_api_server_refuses() {
    let cases = [
        (
            "matchExpressions: [{key: a, operator: in, values: [x]}]",
            "operator \"in\"",
        ),
        (
            "matchExpressions: [{key: a, operator: In}]",
            "needs at least one value",
        ),
        (
            "matchExpressions: [{key: a, operator: NotIn, values: []}]",
            "needs at least one value",
        ),
        (
            "matchExpressions: [{key: a, operator: Exists, values: [x]}]",
            "takes no values",
        ),
        ("matchLabels: {'-a': x}", "label key \"-a\""),
        ("matchLabels: {'a/': x}", "name part is empty"),
        ("matchLabels: {'/a': x}", "prefix before '/' is empty"),
        ("matchLabels: {'Example.com/a': x}", "DNS subdomain"),
        ("matchLabels: {a: 'x y'}", "label value \"x y\""),
        ("matchLabels: {a: '-x'}", "label value \"-x\""),
    ];
    for (yaml, want) in cases {
        let err = parse(yaml).unwrap_err().to_string();
        assert!(err.contains(want), "{yaml}: {err}");
    }
    let long = "a".repeat(64);
    assert!(parse(&format!("matchLabels: {{{long}: x}}")).is_err());
    assert!(parse(&format!("matchLabels: {{a: {long}}}")).is_err());
    // Unknown fields are refused, never ignored into a wider selector.
    assert!(
        crate::yaml::from_str::<WireLabelSelector>("matchLabel: {app: web}").is_err(),
        "a typo must not parse"
    );
}

#[test]
fn accepts_what_the_api_server_accepts() {
    let s = parse(
        r"
matchLabels:
  app.kubernetes.io/name: web
  io.cilium.k8s.policy.cluster: east
  empty: ''
  A_b.c-1: Z_9.x-y
",
    )
    .unwrap();
    assert!(s.names_key(CLUSTER_LABEL));
    assert_eq!(s.requirements().count(), 4);
}

#[test]
fn peer_without_cluster_label_selects_the_local_cluster_only() {
    let s = parse("matchLabels: {app: frontend}").unwrap();
    let local = s.clone().scoped_to("east", PeerClusters::Local);
    let all = s.clone().scoped_to("east", PeerClusters::All);
    let east = labels(&[("app", "frontend"), (CLUSTER_LABEL, "east")]);
    let west = labels(&[("app", "frontend"), (CLUSTER_LABEL, "west")]);
    assert!(local.matches(&east));
    assert!(!local.matches(&west));
    assert!(all.matches(&east) && all.matches(&west));
    // An empty peer selector ("every pod") is scoped too.
    let every = LabelSelector::everything().scoped_to("east", PeerClusters::Local);
    assert!(every.matches(&east) && !every.matches(&west));
}

#[test]
fn peer_naming_the_cluster_label_is_kept_as_written() {
    for yaml in [
        "matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: west}",
        "matchExpressions: [{key: io.cilium.k8s.policy.cluster, operator: In, values: [west]}]",
    ] {
        let s = parse(yaml).unwrap();
        let scoped = s.clone().scoped_to("east", PeerClusters::Local);
        assert_eq!(scoped, s, "{yaml}");
        assert!(scoped.matches(&labels(&[("app", "frontend"), (CLUSTER_LABEL, "west")])));
    }
    let any = parse("matchExpressions: [{key: io.cilium.k8s.policy.cluster, operator: Exists}]")
        .unwrap()
        .scoped_to("east", PeerClusters::Local);
    assert!(any.matches(&labels(&[(CLUSTER_LABEL, "west")])));
}

#[test]
fn peer_clusters_reads_as_the_config_spells_it() {
    assert_eq!(
        crate::yaml::from_str::<PeerClusters>("local").unwrap(),
        PeerClusters::Local
    );
    assert_eq!(
        crate::yaml::from_str::<PeerClusters>("all").unwrap(),
        PeerClusters::All
    );
    assert!(crate::yaml::from_str::<PeerClusters>("everything").is_err());
    assert_eq!(PeerClusters::default(), PeerClusters::Local);
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["app", "tier", "env", "team"]).prop_map(str::to_owned)
}

fn value() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_owned)
}

fn label_set() -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(key(), value(), 0..4)
}

proptest! {
    /// `NotIn` is exactly "not `In`" (an absent key is in neither `In`'s set nor refused
    /// by `NotIn`); `Exists` and `DoesNotExist` are complements.
    #[test]
    fn operators_are_complements(
        k in key(),
        values in prop::collection::btree_set(value(), 1..3),
        l in label_set(),
    ) {
        let is_in = Requirement::In { key: k.clone(), values: values.clone() };
        let not_in = Requirement::NotIn { key: k.clone(), values };
        prop_assert_eq!(is_in.matches(&l), !not_in.matches(&l));
        let exists = Requirement::Exists { key: k.clone() };
        let absent = Requirement::DoesNotExist { key: k };
        prop_assert_eq!(exists.matches(&l), !absent.matches(&l));
    }

    /// `matchLabels` selects exactly the label sets that contain all of its pairs.
    #[test]
    fn match_labels_selects_supersets(want in label_set(), l in label_set()) {
        let s = LabelSelector::from_wire(&WireLabelSelector {
            match_labels: want.clone(),
            match_expressions: Vec::new(),
        })
        .unwrap();
        let superset = want.iter().all(|(k, v)| l.get(k) == Some(v));
        prop_assert_eq!(s.matches(&l), superset);
    }

    /// Scoping to the local cluster keeps the selector's verdict on local endpoints and
    /// refuses every endpoint of another cluster (or without the label); "all clusters"
    /// changes nothing.
    #[test]
    fn scoping_only_narrows_to_the_local_cluster(
        want in label_set(),
        l in label_set(),
        cluster in prop::sample::select(vec!["east", "west"]),
    ) {
        let s = LabelSelector::from_wire(&WireLabelSelector {
            match_labels: want,
            match_expressions: Vec::new(),
        })
        .unwrap();
        let mut endpoint = l;
        endpoint.insert(CLUSTER_LABEL.to_owned(), cluster.to_owned());
        let local = s.clone().scoped_to("east", PeerClusters::Local);
        prop_assert_eq!(local.matches(&endpoint), cluster == "east" && s.matches(&endpoint));
        prop_assert_eq!(s.clone().scoped_to("east", PeerClusters::All).matches(&endpoint), s.matches(&endpoint));
    }
}
