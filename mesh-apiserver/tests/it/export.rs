//! The exporter against a real store (embedded raft): minimal writes, synced markers,
//! identities stable across restarts and collected when unused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::sync::Arc;
use std::time::Duration;

use crate::support;
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::keys::{self, Kind};
use clustermesh_api::security_identity::SecurityIdentity;
use clustermesh_api::v1;
use clustermesh_apiserver::export::{ExportConfig, Exporter};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{parse_manifests, K8sObject, ObjectKind, SourceEvent};
use clustermesh_store::Store;
use prost::Message;
use support::{Backend, TestStore};

fn fixture_objects(files: &[&str]) -> Vec<K8sObject> {
    let mut out = Vec::new();
    for f in files {
        let path = format!(
            "{}/tests/fixtures/translate/{f}",
            env!("CARGO_MANIFEST_DIR")
        );
        out.extend(parse_manifests(&path, &std::fs::read_to_string(&path).unwrap()).unwrap());
    }
    out
}

fn config() -> ExportConfig {
    let mut c = ExportConfig::new("east", 7);
    c.pod_cidrs = vec!["10.0.0.0/16".parse().unwrap()];
    c.identity_gc_grace = Duration::ZERO;
    c
}

async fn export_all(exporter: &mut Exporter, objects: &[K8sObject]) {
    for kind in ObjectKind::ALL {
        let of_kind = objects
            .iter()
            .filter(|o| o.kind() == kind)
            .cloned()
            .collect();
        exporter
            .apply(SourceEvent::Replace {
                kind,
                objects: of_kind,
            })
            .await;
    }
}

async fn keys_under(store: &Arc<dyn Store>, prefix: &str) -> Vec<String> {
    store
        .list(prefix.as_bytes())
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).unwrap())
        .collect()
}

async fn endpoint(store: &Arc<dyn Store>, ip: &str) -> v1::Endpoint {
    let kv = store
        .get(keys::endpoint_key("east", ip.parse().unwrap()).as_bytes())
        .await
        .unwrap()
        .expect("endpoint exported");
    v1::Endpoint::decode(kv.value.as_slice()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_restart_and_identity_lifecycle() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let objects = fixture_objects(&["dualstack.yaml", "nodes-pods.yaml", "annotations.yaml"]);
    let metrics = Arc::new(Metrics::new());

    // First run: everything is written, then one marker per kind, then ready.
    let mut exporter = Exporter::start(Arc::clone(&store), config(), Arc::clone(&metrics))
        .await
        .unwrap();
    let ready = exporter.ready();
    assert!(!*ready.borrow());
    export_all(&mut exporter, &objects).await;
    assert!(*ready.borrow(), "all kinds synced and exported");

    let config_kv = store
        .get(keys::cluster_config_key("east").as_bytes())
        .await
        .unwrap()
        .unwrap();
    let cc = v1::ClusterConfig::decode(config_kv.value.as_slice()).unwrap();
    assert_eq!(
        (cc.name.as_str(), cc.id, cc.pod_cidrs.clone()),
        ("east", 7, vec!["10.0.0.0/16".to_owned()])
    );
    let markers = keys_under(&store, &keys::synced_prefix("east")).await;
    // One per kind (policies too: the fixtures have none, an empty synced set).
    assert_eq!(markers.len(), Kind::ALL.len(), "{markers:?}");
    assert_eq!(
        keys_under(&store, &Kind::Node.cluster_prefix("east"))
            .await
            .len(),
        2
    );
    // web + bad-port + the 12 annotation services (headless and ExternalName skipped).
    assert_eq!(
        keys_under(&store, &Kind::Service.cluster_prefix("east"))
            .await
            .len(),
        14
    );
    assert_eq!(
        keys_under(&store, &Kind::Endpoint.cluster_prefix("east")).await,
        [
            "mesh/v1/endpoints/east/10.0.1.5",
            "mesh/v1/endpoints/east/10.0.2.7",
            "mesh/v1/endpoints/east/fd00:1::5"
        ]
    );
    // Both web pods share one label set, hence one identity, in cluster 7's range.
    let identities = keys_under(&store, &Kind::Identity.cluster_prefix("east")).await;
    assert_eq!(identities.len(), 1, "{identities:?}");
    let id = endpoint(&store, "10.0.1.5").await.identity;
    assert_eq!(endpoint(&store, "10.0.2.7").await.identity, id);
    assert_eq!(SecurityIdentity::new(id).split(ClusterIdMode::Max255).0, 7);
    let text = metrics.encode();
    assert!(
        text.contains("rejected_inputs_total{reason=\"annotation\"} 2"),
        "{text}"
    );

    // Restart with unchanged sources: not a single write.
    drop(exporter);
    let before = store.current_revision().await.unwrap();
    let mut exporter = Exporter::start(Arc::clone(&store), config(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    export_all(&mut exporter, &objects).await;
    exporter.maintain().await;
    assert_eq!(
        store.current_revision().await.unwrap(),
        before,
        "restart with unchanged sources wrote"
    );
    assert_eq!(
        endpoint(&store, "10.0.1.5").await.identity,
        id,
        "identity stable across restart"
    );
    drop(exporter);

    // Restart after web-1 went away while we were down: its endpoint is deleted at the
    // initial sync, the identity (still used by web-0) stays.
    let without_web1: Vec<K8sObject> = objects
        .iter()
        .filter(|o| o.object_ref().name != "web-1")
        .cloned()
        .collect();
    let mut exporter = Exporter::start(Arc::clone(&store), config(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    export_all(&mut exporter, &without_web1).await;
    exporter.maintain().await;
    assert_eq!(
        keys_under(&store, &Kind::Endpoint.cluster_prefix("east"))
            .await
            .len(),
        2
    );
    assert_eq!(
        keys_under(&store, &Kind::Identity.cluster_prefix("east"))
            .await
            .len(),
        1
    );

    // A new label set gets a new identity; when its last pod goes, it is collected.
    let mut pod = without_web1
        .iter()
        .find(|o| o.object_ref().name == "web-0")
        .cloned()
        .unwrap();
    if let K8sObject::Pod(p) = &mut pod {
        p.metadata.name = Some("canary".to_owned());
        p.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("track".to_owned(), "canary".to_owned());
        let status = p.status.as_mut().unwrap();
        status.pod_ip = Some("10.0.1.77".to_owned());
        status.pod_ips = None;
    }
    exporter.apply(SourceEvent::Apply(pod.clone())).await;
    let canary = endpoint(&store, "10.0.1.77").await.identity;
    assert_ne!(canary, id);
    assert_eq!(
        keys_under(&store, &Kind::Identity.cluster_prefix("east"))
            .await
            .len(),
        2
    );
    exporter.apply(SourceEvent::Delete(pod.object_ref())).await;
    exporter.maintain().await;
    let identities = keys_under(&store, &Kind::Identity.cluster_prefix("east")).await;
    assert_eq!(identities, [keys::identity_key("east", id)]);

    // Deleting a service removes its record, nothing else.
    let web = objects
        .iter()
        .find(|o| o.object_ref().name == "web" && o.kind() == ObjectKind::Service)
        .unwrap();
    let rev = store.current_revision().await.unwrap();
    exporter.apply(SourceEvent::Delete(web.object_ref())).await;
    assert!(store
        .get(keys::service_key("east", "shop", "web").as_bytes())
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.current_revision().await.unwrap(),
        rev + 1,
        "exactly one write"
    );
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_deleted_before_the_initial_sync() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let objects = fixture_objects(&["nodes-pods.yaml"]);
    let mut exporter = Exporter::start(Arc::clone(&store), config(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    export_all(&mut exporter, &objects).await;
    drop(exporter);
    assert_eq!(
        keys_under(&store, &Kind::Node.cluster_prefix("east"))
            .await
            .len(),
        2
    );

    // After a restart the source reports one node, but nodes are not synced yet: the other
    // node stays until the Synced event, then goes.
    let mut exporter = Exporter::start(Arc::clone(&store), config(), Arc::new(Metrics::new()))
        .await
        .unwrap();
    let node_a = objects
        .iter()
        .find(|o| o.object_ref().name == "node-a")
        .cloned()
        .unwrap();
    exporter.apply(SourceEvent::Apply(node_a)).await;
    assert_eq!(
        keys_under(&store, &Kind::Node.cluster_prefix("east"))
            .await
            .len(),
        2
    );
    exporter.apply(SourceEvent::Synced(ObjectKind::Node)).await;
    assert_eq!(
        keys_under(&store, &Kind::Node.cluster_prefix("east")).await,
        ["mesh/v1/nodes/east/node-a"]
    );
    ts.shutdown().await;
}
