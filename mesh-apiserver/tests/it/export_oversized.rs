//! A service too large for the store (tens of thousands of endpoints, over the 1.5 MiB
//! value limit) is reported once per change (metric, `/statusz` entry) and not retried;
//! other records are exported normally, and once the service fits again it is written.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::sync::Arc;

use crate::support;
use clustermesh_api::keys;
use clustermesh_apiserver::export::{ExportConfig, Exporter};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{K8sObject, ObjectKind, SourceEvent};
use clustermesh_store::MAX_VALUE_SIZE;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use support::{Backend, TestStore};

/// Global service `shop/<name>` with two ports.
fn service(name: &str, cluster_ip: &str) -> K8sObject {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "shop",
            "annotations": {"service.cilium.io/global": "true"}
        },
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip,
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "grpc", "port": 9090, "protocol": "TCP"}
            ]
        }
    }))
    .unwrap();
    K8sObject::Service(Box::new(svc))
}

/// `endpoints` ready endpoints of `shop/<name>`, 1000 per slice.
fn slices(name: &str, endpoints: u32) -> Vec<K8sObject> {
    (0..endpoints.div_ceil(1000))
        .map(|s| {
            let list: Vec<_> = (s * 1000..((s + 1) * 1000).min(endpoints))
                .map(|i| {
                    json!({
                        "addresses": [format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256)],
                        "conditions": {"ready": true},
                        "nodeName": format!("node-{:05}", i / 100),
                        "zone": format!("zone-{}", i % 3),
                    })
                })
                .collect();
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {
                    "name": format!("{name}-{s}"), "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": name}
                },
                "addressType": "IPv4",
                "ports": [
                    {"name": "http", "port": 8080, "protocol": "TCP"},
                    {"name": "grpc", "port": 9090, "protocol": "TCP"}
                ],
                "endpoints": list,
            }))
            .unwrap();
            K8sObject::EndpointSlice(Box::new(slice))
        })
        .collect()
}

fn metric(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_owned)
}

async fn replace(exporter: &mut Exporter, kind: ObjectKind, objects: Vec<K8sObject>) {
    exporter.apply(SourceEvent::Replace { kind, objects }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_service_is_reported_once_and_not_retried() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let metrics = Arc::new(Metrics::new());
    let config = ExportConfig::new("east", 7);
    let problems = config.problems.clone();
    let mut exporter = Exporter::start(Arc::clone(&store), config, Arc::clone(&metrics))
        .await
        .unwrap();
    let big = keys::service_key("east", "shop", "big");
    let small = keys::service_key("east", "shop", "small");

    let mut all_slices = slices("big", 60_000);
    all_slices.extend(slices("small", 3));
    replace(
        &mut exporter,
        ObjectKind::Service,
        vec![service("big", "10.96.0.10"), service("small", "10.96.0.11")],
    )
    .await;
    for kind in [ObjectKind::Node, ObjectKind::Pod] {
        replace(&mut exporter, kind, Vec::new()).await;
    }
    replace(&mut exporter, ObjectKind::EndpointSlice, all_slices).await;

    // The small service is exported, the big one is not, and it is reported.
    assert!(store.get(small.as_bytes()).await.unwrap().is_some());
    assert!(store.get(big.as_bytes()).await.unwrap().is_none());
    let oversized = problems.oversized();
    let record = oversized.get(&big).expect("the big service is listed");
    assert!(record.size > MAX_VALUE_SIZE, "{record:?}");
    assert_eq!(record.limit, MAX_VALUE_SIZE);
    let lines = problems.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&big), "{lines:?}");
    let text = metrics.encode();
    assert_eq!(
        metric(
            &text,
            "clustermesh_apiserver_oversized_records{kind=\"services\"}"
        )
        .as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "clustermesh_apiserver_rejected_inputs_total{reason=\"oversized\"}"
        )
        .as_deref(),
        Some("1"),
        "{text}"
    );

    // Maintenance (every 5 s in a running server) does not try it again.
    let puts = |text: &str| metric(text, "clustermesh_apiserver_store_writes_total{op=\"put\"}");
    let before = puts(&metrics.encode());
    for _ in 0..3 {
        exporter.maintain().await;
    }
    let text = metrics.encode();
    assert_eq!(puts(&text), before, "the oversized record was retried");
    assert_eq!(
        metric(
            &text,
            "clustermesh_apiserver_rejected_inputs_total{reason=\"oversized\"}"
        )
        .as_deref(),
        Some("1"),
        "reported again without a change: {text}"
    );

    // Scaled down to fit: written, and no longer reported.
    let mut fewer = slices("big", 1_000);
    fewer.extend(slices("small", 3));
    replace(&mut exporter, ObjectKind::EndpointSlice, fewer).await;
    assert!(store.get(big.as_bytes()).await.unwrap().is_some());
    assert!(problems.oversized().is_empty());
    assert_eq!(
        metric(
            &metrics.encode(),
            "clustermesh_apiserver_oversized_records{kind=\"services\"}"
        )
        .as_deref(),
        Some("0")
    );
    ts.shutdown().await;
}
