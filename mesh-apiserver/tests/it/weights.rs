//! Backend weights from the `service.clustermesh.io/weight` annotation: pods set the
//! weight of their backends, a service sets the default for the rest, invalid values fall
//! back with a warning and a metric. Through `ClusterObjects` (as both sources feed it),
//! and end to end from a `dir:` source to the store.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::support;
use clustermesh_api::annotations::WEIGHT;
use clustermesh_api::keys;
use clustermesh_api::v1;
use clustermesh_apiserver::export::{ExportConfig, Exporter};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{
    parse_manifests, DirSource, K8sObject, ObjectKind, Source, SourceEvent,
};
use clustermesh_apiserver::state::{ClusterObjects, RecordChange};
use clustermesh_apiserver::translate::InputWarning;
use clustermesh_store::Store;
use k8s_openapi::api::core::v1::Pod;
use prost::Message;
use support::{Backend, TestStore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn fixture_path(name: &str) -> String {
    format!(
        "{}/tests/fixtures/translate/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn fixture(name: &str) -> Vec<K8sObject> {
    let path = fixture_path(name);
    parse_manifests(&path, &std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn replace_all(state: &mut ClusterObjects, objects: &[K8sObject]) {
    for kind in ObjectKind::ALL {
        let of_kind: Vec<K8sObject> = objects
            .iter()
            .filter(|o| o.kind() == kind)
            .cloned()
            .collect();
        state.apply(SourceEvent::Replace {
            kind,
            objects: of_kind,
        });
    }
}

/// The service records among `changes`, as `namespace/name → [(backend ip, weight)]`.
fn service_weights(changes: &[RecordChange]) -> BTreeMap<String, Vec<(String, u32)>> {
    changes
        .iter()
        .filter_map(|c| match c {
            RecordChange::Service {
                namespace,
                name,
                record: Some(r),
            } => Some((
                format!("{namespace}/{name}"),
                r.backends
                    .iter()
                    .map(|b| (b.ip.clone(), b.weight))
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

fn weights(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(ip, w)| ((*ip).to_owned(), *w)).collect()
}

fn pod(objects: &[K8sObject], name: &str) -> Pod {
    objects
        .iter()
        .find_map(|o| match o {
            K8sObject::Pod(p) if p.metadata.name.as_deref() == Some(name) => Some((**p).clone()),
            _ => None,
        })
        .unwrap()
}

#[test]
fn pods_and_services_set_backend_weights_invalid_values_fall_back_with_warnings() {
    let mut objects = fixture("weights.yaml");
    objects.extend(fixture("weights-pods.yaml"));
    let mut state = ClusterObjects::new("east");
    replace_all(&mut state, &objects);
    let mut warnings = Vec::new();
    let got = service_weights(&state.take_changes(&mut warnings));

    // web: weight 4 from the pod; no annotation, "0" and "lots" all mean 1.
    assert_eq!(
        got["shop/web"],
        weights(&[
            ("10.0.1.1", 4),
            ("10.0.1.2", 1),
            ("10.0.1.3", 1),
            ("10.0.1.4", 1)
        ])
    );
    // api: the pod's 10 wins over the service's 3; the others get the service's 3.
    assert_eq!(
        got["shop/api"],
        weights(&[("10.0.2.1", 10), ("10.0.2.2", 3), ("10.0.2.3", 3)])
    );

    // Exactly the two invalid pod annotations are reported, naming pod and value.
    let messages: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert!(warnings.iter().all(|w| w.reason() == "annotation"));
    assert!(messages.iter().any(|m| m.contains("Pod shop/web-zero")
        && m.contains(&format!("{WEIGHT}=\"0\""))
        && m.contains("drain")));
    assert!(messages
        .iter()
        .any(|m| m.contains("Pod shop/web-junk") && m.contains("\"lots\"")));
    assert!(warnings
        .iter()
        .all(|w| matches!(w, InputWarning::Annotation { .. })));
}

#[test]
fn a_pod_weight_change_re_exports_only_the_services_it_backs() {
    let pods = fixture("weights-pods.yaml");
    let mut state = ClusterObjects::new("east");
    // Services and slices first, pods later (as a watch may deliver them): the weights
    // arrive with the pods.
    replace_all(&mut state, &fixture("weights.yaml"));
    let mut warnings = Vec::new();
    let before = service_weights(&state.take_changes(&mut warnings));
    assert_eq!(before["shop/web"][0], ("10.0.1.1".to_owned(), 1));
    state.apply(SourceEvent::Replace {
        kind: ObjectKind::Pod,
        objects: pods.clone(),
    });
    let after = service_weights(&state.take_changes(&mut warnings));
    assert_eq!(after["shop/web"][0], ("10.0.1.1".to_owned(), 4));
    assert_eq!(after["shop/api"][0], ("10.0.2.1".to_owned(), 10));

    // web-plain asks for 2: web is re-exported, api is not.
    let mut plain = pod(&pods, "web-plain");
    plain
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(WEIGHT.to_owned(), "2".to_owned());
    state.apply(SourceEvent::Apply(K8sObject::Pod(Box::new(plain.clone()))));
    let changed = service_weights(&state.take_changes(&mut warnings));
    assert_eq!(changed.keys().collect::<Vec<_>>(), ["shop/web"]);
    assert_eq!(changed["shop/web"][1], ("10.0.1.2".to_owned(), 2));

    // Another change of the pod that leaves its weight alone re-exports no service.
    plain
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("version".to_owned(), "v2".to_owned());
    state.apply(SourceEvent::Apply(K8sObject::Pod(Box::new(plain.clone()))));
    assert!(service_weights(&state.take_changes(&mut warnings)).is_empty());

    // Removing the annotation brings the backend back to 1.
    plain.metadata.annotations = None;
    state.apply(SourceEvent::Apply(K8sObject::Pod(Box::new(plain))));
    let reverted = service_weights(&state.take_changes(&mut warnings));
    assert_eq!(reverted["shop/web"][1], ("10.0.1.2".to_owned(), 1));
}

/// Writes `text` to `dir/name` atomically (the dir source never sees half a file).
fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Polls the store until service `shop/name` holds `expected` weights (by backend IP);
/// panics with what it last saw after 20 s.
async fn wait_for_weights(store: &Arc<dyn Store>, name: &str, expected: &[(String, u32)]) {
    let key = keys::service_key("east", "shop", name);
    let mut last = None;
    for _ in 0..400 {
        if let Some(kv) = store.get(key.as_bytes()).await.unwrap() {
            let svc = v1::Service::decode(kv.value.as_slice()).unwrap();
            let got: Vec<(String, u32)> = svc
                .backends
                .iter()
                .map(|b| (b.ip.clone(), b.weight))
                .collect();
            if got == expected {
                return;
            }
            last = Some(got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("service shop/{name} never had weights {expected:?}; last seen {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_flow_from_a_manifest_directory_to_the_store() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let dir = tempfile::tempdir().unwrap();
    let services = std::fs::read_to_string(fixture_path("weights.yaml")).unwrap();
    let pods = std::fs::read_to_string(fixture_path("weights-pods.yaml")).unwrap();
    write_manifest(dir.path(), "services.yaml", &services);
    write_manifest(dir.path(), "pods.yaml", &pods);

    let metrics = Arc::new(Metrics::new());
    let mut config = ExportConfig::new("east", 7);
    config.pod_cidrs = vec!["10.0.0.0/16".parse().unwrap()];
    let exporter = Exporter::start(Arc::clone(&store), config, Arc::clone(&metrics))
        .await
        .unwrap();
    let source = DirSource::new(dir.path()).with_poll_interval(Duration::from_millis(50));
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let source_task = tokio::spawn(Box::new(source).run(tx, shutdown.clone()));
    let exporter_task = tokio::spawn(exporter.run(rx, shutdown.clone()));

    wait_for_weights(
        &store,
        "web",
        &weights(&[
            ("10.0.1.1", 4),
            ("10.0.1.2", 1),
            ("10.0.1.3", 1),
            ("10.0.1.4", 1),
        ]),
    )
    .await;
    wait_for_weights(
        &store,
        "api",
        &weights(&[("10.0.2.1", 10), ("10.0.2.2", 3), ("10.0.2.3", 3)]),
    )
    .await;
    let text = metrics.encode();
    assert!(
        text.contains("rejected_inputs_total{reason=\"annotation\"} 2"),
        "the two invalid pod weights are counted: {text}"
    );

    // The operator fixes web-zero and re-weights web-heavy; only the pod file changes.
    let edited = pods
        .replace(
            "service.clustermesh.io/weight: \"0\"",
            "service.clustermesh.io/weight: \"2\"",
        )
        .replace(
            "service.clustermesh.io/weight: \"4\"",
            "service.clustermesh.io/weight: \"8\"",
        );
    assert_ne!(edited, pods);
    write_manifest(dir.path(), "pods.yaml", &edited);
    wait_for_weights(
        &store,
        "web",
        &weights(&[
            ("10.0.1.1", 8),
            ("10.0.1.2", 1),
            ("10.0.1.3", 2),
            ("10.0.1.4", 1),
        ]),
    )
    .await;

    shutdown.cancel();
    source_task.await.unwrap().unwrap();
    exporter_task.await.unwrap();
}
