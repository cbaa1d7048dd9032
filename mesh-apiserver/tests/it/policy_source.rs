//! Policies and namespaces from the `dir:PATH` source through the exporter into a real
//! store: policy records at their keys with the spec as JSON, invalid policies warned
//! about by name and counted but still written, deletions, the policy synced marker, and
//! namespace labels in identities (a namespace label change re-exports its pods).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_api::keys::{self, Kind, PolicySource};
use clustermesh_api::policy::{WireCiliumPolicySpec, WireNetworkPolicySpec};
use clustermesh_api::v1;
use clustermesh_apiserver::export::{ExportConfig, Exporter};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{parse_manifests, DirSource, ObjectKind, Source, SourceEvent};
use clustermesh_apiserver::state::ClusterObjects;
use clustermesh_store::Store;
use prost::Message;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::{Backend, Logs, TestStore};

const NAMESPACE: &str = "apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    team: a
    kubernetes.io/metadata.name: shop
";

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  uid: 0b5c7f1e-2d7a-4c59-9a43-9d8f2f6c1a11
  labels:
    app: db
spec:
  nodeName: node-a
  containers:
  - name: db
    ports:
    - name: sql
      containerPort: 5432
    - name: stats
      containerPort: 9125
      protocol: UDP
    - containerPort: 8080
status:
  phase: Running
  podIP: 10.1.0.5
";

const NETWORK_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-from-api
  namespace: shop
spec:
  podSelector:
    matchLabels:
      app: db
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          team: a
      podSelector:
        matchLabels:
          app: api
    ports:
    - port: sql
";

const CILIUM_POLICY: &str = "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-egress
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      app: api
  egress:
  - toEndpoints:
    - matchLabels:
        app: db
    toPorts:
    - ports:
      - port: \"5432\"
        protocol: TCP
";

/// A NetworkPolicy with a misspelt field, and a CiliumNetworkPolicy with an invalid
/// selector (a label key with a space).
const INVALID_POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: typo
  namespace: shop
spec:
  podSelecter: {}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bad-selector
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      \"not a key\": x
";

fn write_renamed(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The `spec` of the single document `yaml`, as JSON.
fn spec_of(yaml: &str) -> Value {
    let value: Value = clustermesh_api::yaml::from_str(yaml).unwrap();
    value["spec"].clone()
}

async fn get(store: &Arc<dyn Store>, key: &str) -> Option<Vec<u8>> {
    store.get(key.as_bytes()).await.unwrap().map(|kv| kv.value)
}

/// Polls until `check` holds for the value at `key` (10 s at most).
async fn wait_for(
    store: &Arc<dyn Store>,
    key: &str,
    what: &str,
    check: impl Fn(Option<&[u8]>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if check(get(store, key).await.as_deref()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key}: {what} within 10s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn policy_key(source: PolicySource, name: &str) -> String {
    keys::policy_key("east", "shop", source, name)
}

async fn identity_labels(store: &Arc<dyn Store>, ip: &str) -> (u32, Vec<(String, String)>) {
    let endpoint = v1::Endpoint::decode(
        get(store, &keys::endpoint_key("east", ip.parse().unwrap()))
            .await
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let identity = v1::Identity::decode(
        get(store, &keys::identity_key("east", endpoint.identity))
            .await
            .expect("identity exported")
            .as_slice(),
    )
    .unwrap();
    let mut labels: Vec<(String, String)> = identity.labels.into_iter().collect();
    labels.sort();
    (endpoint.identity, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_policies_and_namespaces_become_records() {
    let logs = Logs::global();
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("namespace.yaml"), NAMESPACE).unwrap();
    std::fs::write(dir.path().join("pod.yaml"), POD).unwrap();
    std::fs::write(dir.path().join("np.yaml"), NETWORK_POLICY).unwrap();
    std::fs::write(dir.path().join("cnp.yaml"), CILIUM_POLICY).unwrap();
    std::fs::write(dir.path().join("invalid.yaml"), INVALID_POLICIES).unwrap();

    let metrics = Arc::new(Metrics::new());
    let exporter = Exporter::start(
        Arc::clone(&store),
        ExportConfig::new("east", 7),
        Arc::clone(&metrics),
    )
    .await
    .unwrap();
    let mut ready = exporter.ready();
    let source = DirSource::new(dir.path())
        .with_poll_interval(Duration::from_millis(50))
        .with_settle_time(Duration::from_millis(100))
        .with_metrics(Arc::clone(&metrics));
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let source_task = tokio::spawn(Box::new(source).run(tx, shutdown.clone()));
    let exporter_task = tokio::spawn(exporter.run(rx, shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
        .await
        .expect("exporter ready within 10s")
        .unwrap();

    // Valid policies: records at their keys, the spec as JSON.
    let np = v1::Policy::decode(
        get(
            &store,
            &policy_key(PolicySource::NetworkPolicy, "db-from-api"),
        )
        .await
        .expect("NetworkPolicy record")
        .as_slice(),
    )
    .unwrap();
    assert_eq!(
        (np.cluster.as_str(), np.namespace.as_str(), np.name.as_str()),
        ("east", "shop", "db-from-api")
    );
    assert_eq!(np.kind(), v1::PolicyKind::NetworkPolicy);
    let np_spec: Value = serde_json::from_str(&np.spec_json).unwrap();
    assert_eq!(np_spec, spec_of(NETWORK_POLICY));
    // What the agents do with it: it parses.
    serde_json::from_str::<WireNetworkPolicySpec>(&np.spec_json).unwrap();
    let cnp = v1::Policy::decode(
        get(
            &store,
            &policy_key(PolicySource::CiliumNetworkPolicy, "api-egress"),
        )
        .await
        .expect("CiliumNetworkPolicy record")
        .as_slice(),
    )
    .unwrap();
    assert_eq!(cnp.kind(), v1::PolicyKind::CiliumNetworkPolicy);
    assert_eq!(
        serde_json::from_str::<Value>(&cnp.spec_json).unwrap(),
        spec_of(CILIUM_POLICY)
    );
    serde_json::from_str::<WireCiliumPolicySpec>(&cnp.spec_json).unwrap();

    // Invalid policies: written as they are, warned about by name, counted.
    let typo = v1::Policy::decode(
        get(&store, &policy_key(PolicySource::NetworkPolicy, "typo"))
            .await
            .expect("the invalid policy is written too")
            .as_slice(),
    )
    .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&typo.spec_json).unwrap(),
        json!({"podSelecter": {}})
    );
    assert!(get(
        &store,
        &policy_key(PolicySource::CiliumNetworkPolicy, "bad-selector")
    )
    .await
    .is_some());
    assert!(
        metrics
            .encode()
            .contains("rejected_inputs_total{reason=\"policy\"} 2"),
        "{}",
        metrics.encode()
    );
    let text = logs.text();
    for (name, problem) in [
        ("NetworkPolicy shop/typo", "podSelecter"),
        (
            "CiliumNetworkPolicy shop/bad-selector",
            "spec.endpointSelector",
        ),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no warning naming {name}:\n{text}"));
        assert!(line.contains("WARN") && line.contains(problem), "{line}");
    }
    assert!(get(&store, &keys::synced_key("east", Kind::Policy))
        .await
        .is_some());

    // Endpoint: named ports and the pod UID; identity: the namespace's labels.
    let endpoint = v1::Endpoint::decode(
        get(
            &store,
            &keys::endpoint_key("east", "10.1.0.5".parse().unwrap()),
        )
        .await
        .unwrap()
        .as_slice(),
    )
    .unwrap();
    assert_eq!(endpoint.pod_uid, "0b5c7f1e-2d7a-4c59-9a43-9d8f2f6c1a11");
    let ports: Vec<(String, u32, v1::Protocol)> = endpoint
        .named_ports
        .iter()
        .map(|p| (p.name.clone(), p.port, p.protocol()))
        .collect();
    assert_eq!(
        ports,
        [
            ("sql".to_owned(), 5432, v1::Protocol::Tcp),
            ("stats".to_owned(), 9125, v1::Protocol::Udp)
        ]
    );
    let (first_identity, labels) = identity_labels(&store, "10.1.0.5").await;
    let label = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    for expected in [
        label("app", "db"),
        label("io.cilium.k8s.namespace.labels.team", "a"),
        label(
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
            "shop",
        ),
        label("io.kubernetes.pod.namespace", "shop"),
        label("io.cilium.k8s.policy.cluster", "east"),
    ] {
        assert!(labels.contains(&expected), "{expected:?} not in {labels:?}");
    }

    // A namespace label change gives its pods a new identity.
    write_renamed(
        &dir.path().join("namespace.yaml"),
        &NAMESPACE.replace("team: a", "team: b"),
    );
    let ip_key = keys::endpoint_key("east", "10.1.0.5".parse().unwrap());
    wait_for(&store, &ip_key, "a new identity", |v| {
        v.is_some_and(|v| v1::Endpoint::decode(v).unwrap().identity != first_identity)
    })
    .await;
    let (_, labels) = identity_labels(&store, "10.1.0.5").await;
    assert!(labels.contains(&label("io.cilium.k8s.namespace.labels.team", "b")));
    assert!(!labels.contains(&label("io.cilium.k8s.namespace.labels.team", "a")));

    // Deleting a file removes its policy record; the others stay.
    std::fs::remove_file(dir.path().join("cnp.yaml")).unwrap();
    let cnp_key = policy_key(PolicySource::CiliumNetworkPolicy, "api-egress");
    wait_for(&store, &cnp_key, "the record deleted", |v| v.is_none()).await;
    assert!(get(
        &store,
        &policy_key(PolicySource::NetworkPolicy, "db-from-api")
    )
    .await
    .is_some());

    shutdown.cancel();
    source_task.await.unwrap().unwrap();
    exporter_task.await.unwrap();
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_synced_only_once_both_kinds_are_read() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let mut exporter = Exporter::start(
        Arc::clone(&store),
        ExportConfig::new("east", 7),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let objects = parse_manifests("np.yaml", NETWORK_POLICY).unwrap();
    let marker = keys::synced_key("east", Kind::Policy);
    let np_key = policy_key(PolicySource::NetworkPolicy, "db-from-api");
    exporter
        .apply(SourceEvent::Replace {
            kind: ObjectKind::NetworkPolicy,
            objects,
        })
        .await;
    // NetworkPolicies alone: nothing written, no marker (a partial view writes nothing).
    assert!(get(&store, &marker).await.is_none());
    assert!(get(&store, &np_key).await.is_none());
    exporter
        .apply(SourceEvent::Synced(ObjectKind::CiliumNetworkPolicy))
        .await;
    assert!(get(&store, &marker).await.is_some());
    assert!(get(&store, &np_key).await.is_some());
    ts.shutdown().await;
}

#[test]
fn endpoints_wait_for_namespaces_and_a_missing_namespace_adds_no_labels() {
    let mut objects = ClusterObjects::new("east");
    objects.apply(SourceEvent::Replace {
        kind: ObjectKind::Pod,
        objects: parse_manifests("pod.yaml", POD).unwrap(),
    });
    assert!(!objects.is_synced(Kind::Endpoint));
    assert!(!objects.is_synced(Kind::Identity));
    objects.apply(SourceEvent::Replace {
        kind: ObjectKind::Namespace,
        objects: Vec::new(),
    });
    assert!(objects.is_synced(Kind::Endpoint));
    let mut warnings = Vec::new();
    let changes = objects.take_changes(&mut warnings);
    let labels = changes
        .iter()
        .find_map(|c| match c {
            clustermesh_apiserver::state::RecordChange::Endpoint {
                spec: Some(spec), ..
            } => Some(spec.labels.clone()),
            _ => None,
        })
        .expect("the pod's endpoint");
    assert!(
        !labels
            .keys()
            .any(|k| k.starts_with("io.cilium.k8s.namespace.labels.")),
        "{labels:?}"
    );
    assert_eq!(
        labels
            .get("io.kubernetes.pod.namespace")
            .map(String::as_str),
        Some("shop")
    );
}

#[test]
fn a_pod_label_cannot_pose_as_a_namespace_label() {
    let mut objects = ClusterObjects::new("east");
    let pod = POD.replace(
        "    app: db\n",
        "    app: db\n    io.cilium.k8s.namespace.labels.team: admin\n",
    );
    for (kind, text) in [
        (ObjectKind::Pod, pod.as_str()),
        (ObjectKind::Namespace, NAMESPACE),
    ] {
        objects.apply(SourceEvent::Replace {
            kind,
            objects: parse_manifests("f.yaml", text).unwrap(),
        });
    }
    let mut warnings = Vec::new();
    let labels = objects
        .take_changes(&mut warnings)
        .into_iter()
        .find_map(|c| match c {
            clustermesh_apiserver::state::RecordChange::Endpoint {
                spec: Some(spec), ..
            } => Some(spec.labels),
            _ => None,
        })
        .expect("the pod's endpoint");
    assert_eq!(
        labels
            .get("io.cilium.k8s.namespace.labels.team")
            .map(String::as_str),
        Some("a")
    );
}
