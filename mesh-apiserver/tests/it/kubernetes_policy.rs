//! The Kubernetes source's policies and namespaces against the fake API server of
//! `clustermesh_test_support::fake_kube` (real HTTP, real kube-rs watchers), through the
//! exporter into a real store: NetworkPolicy and CiliumNetworkPolicy records, a cluster
//! without the CiliumNetworkPolicy CRD (404) syncing policies anyway, the CRD appearing
//! later, and namespace labels in identities.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::sync::Arc;
use std::time::Duration;

use clustermesh_api::keys::{self, Kind, PolicySource};
use clustermesh_api::v1;
use clustermesh_apiserver::export::{ExportConfig, Exporter};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::kubernetes::{client, config_from_kubeconfig};
use clustermesh_apiserver::source::{KubernetesSource, Source};
use clustermesh_store::Store;
use clustermesh_test_support::fake_kube::{kubeconfig, FakeKube};
use prost::Message;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::{Backend, Logs, TestStore};

fn namespace(team: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": "shop", "labels": {"team": team}}})
}

fn network_policy() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "db-ingress", "namespace": "shop"},
           "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}],
                                 "ports": [{"port": "sql"}]}]}})
}

fn cilium_policy() -> Value {
    json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
           "metadata": {"name": "api-egress", "namespace": "shop"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "api"}},
                    "egress": [{"toEndpoints": [{"matchLabels": {"app": "db"}}]}]}})
}

fn pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "db-0", "namespace": "shop", "uid": "5e1b7a52-8a0c-4b1f-a8e0-000000000001",
                        "labels": {"app": "db"}},
           "spec": {"nodeName": "node-a",
                    "containers": [{"name": "db", "image": "postgres",
                                    "ports": [{"name": "sql", "containerPort": 5432}]}]},
           "status": {"phase": "Running", "podIP": "10.1.0.5"}})
}

async fn get(store: &Arc<dyn Store>, key: &str) -> Option<Vec<u8>> {
    store.get(key.as_bytes()).await.unwrap().map(|kv| kv.value)
}

/// Polls until `check` holds for the value at `key`.
async fn wait_for(
    store: &Arc<dyn Store>,
    key: &str,
    within: Duration,
    check: impl Fn(Option<&[u8]>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !check(get(store, key).await.as_deref()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} not as expected within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn identity_labels(
    store: &Arc<dyn Store>,
    id: u32,
) -> std::collections::HashMap<String, String> {
    v1::Identity::decode(
        get(store, &keys::identity_key("east", id))
            .await
            .expect("identity exported")
            .as_slice(),
    )
    .unwrap()
    .labels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_policies_sync_without_the_cilium_crd_and_pick_it_up_later() {
    let logs = Logs::global();
    let fake = FakeKube::start().await;
    fake.insert(namespace("a"));
    fake.insert(network_policy());
    fake.insert(pod());
    // The cluster does not run Cilium: its CRD is not installed.
    fake.fail_always("GET", "/apis/cilium.io/v2/ciliumnetworkpolicies", 404);

    let dir = tempfile::tempdir().unwrap();
    let path = kubeconfig(dir.path(), &[("fake", &fake)]);
    let config = config_from_kubeconfig(kube::config::Kubeconfig::read_from(path).unwrap(), None)
        .await
        .unwrap();
    let source = KubernetesSource::new(client(config).unwrap());

    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let exporter = Exporter::start(
        Arc::clone(&store),
        ExportConfig::new("east", 7),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap();
    let mut ready = exporter.ready();
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let source_task = tokio::spawn(Box::new(source).run(tx, shutdown.clone()));
    let exporter_task = tokio::spawn(exporter.run(rx, shutdown.clone()));
    // Every kind syncs, policies included, although CiliumNetworkPolicies are not served.
    tokio::time::timeout(Duration::from_secs(20), ready.wait_for(|r| *r))
        .await
        .expect("exporter ready without the CiliumNetworkPolicy CRD")
        .unwrap();
    assert!(get(&store, &keys::synced_key("east", Kind::Policy))
        .await
        .is_some());
    let text = logs.text();
    let absent: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("does not serve ciliumnetworkpolicies"))
        .collect();
    assert_eq!(absent.len(), 1, "logged once:\n{text}");
    assert!(absent[0].contains("INFO"), "{}", absent[0]);

    let np_key = keys::policy_key("east", "shop", PolicySource::NetworkPolicy, "db-ingress");
    let np = v1::Policy::decode(
        get(&store, &np_key)
            .await
            .expect("NetworkPolicy record")
            .as_slice(),
    )
    .unwrap();
    assert_eq!(np.kind(), v1::PolicyKind::NetworkPolicy);
    assert_eq!(
        serde_json::from_str::<Value>(&np.spec_json).unwrap(),
        network_policy()["spec"]
    );

    // The endpoint: named port, pod UID, namespace labels in its identity.
    let ep_key = keys::endpoint_key("east", "10.1.0.5".parse().unwrap());
    let endpoint = v1::Endpoint::decode(get(&store, &ep_key).await.unwrap().as_slice()).unwrap();
    assert_eq!(endpoint.pod_uid, "5e1b7a52-8a0c-4b1f-a8e0-000000000001");
    assert_eq!(
        endpoint
            .named_ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol()))
            .collect::<Vec<_>>(),
        [("sql", 5432, v1::Protocol::Tcp)]
    );
    let labels = identity_labels(&store, endpoint.identity).await;
    assert_eq!(
        labels
            .get("io.cilium.k8s.namespace.labels.team")
            .map(String::as_str),
        Some("a")
    );

    // The namespace's labels change: its pod gets another identity.
    fake.insert(namespace("b"));
    let old = endpoint.identity;
    wait_for(&store, &ep_key, Duration::from_secs(10), |v| {
        v.is_some_and(|v| v1::Endpoint::decode(v).unwrap().identity != old)
    })
    .await;
    let endpoint = v1::Endpoint::decode(get(&store, &ep_key).await.unwrap().as_slice()).unwrap();
    let labels = identity_labels(&store, endpoint.identity).await;
    assert_eq!(
        labels
            .get("io.cilium.k8s.namespace.labels.team")
            .map(String::as_str),
        Some("b")
    );

    // Cilium gets installed: the retried list finds the CRD and its policies.
    fake.clear_failures();
    fake.insert(cilium_policy());
    let cnp_key = keys::policy_key(
        "east",
        "shop",
        PolicySource::CiliumNetworkPolicy,
        "api-egress",
    );
    wait_for(&store, &cnp_key, Duration::from_secs(40), |v| v.is_some()).await;
    let cnp = v1::Policy::decode(get(&store, &cnp_key).await.unwrap().as_slice()).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&cnp.spec_json).unwrap(),
        cilium_policy()["spec"]
    );
    // And a deleted policy is deleted.
    fake.remove("/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies/db-ingress");
    wait_for(&store, &np_key, Duration::from_secs(10), |v| v.is_none()).await;

    shutdown.cancel();
    source_task.await.unwrap().unwrap();
    exporter_task.await.unwrap();
    ts.shutdown().await;
}
