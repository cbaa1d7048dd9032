//! Translation of Kubernetes YAML fixtures into records, through the same path the
//! sources use (manifest parsing → `ClusterObjects` → record changes).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::collections::BTreeMap;

use clustermesh_api::v1::{self, Affinity, Protocol};
use clustermesh_apiserver::source::{parse_manifests, K8sObject, ObjectKind, SourceEvent};
use clustermesh_apiserver::state::{ClusterObjects, RecordChange};
use clustermesh_apiserver::translate::{
    InputWarning, CLUSTER_LABEL, NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL,
};

struct Translated {
    services: BTreeMap<String, v1::Service>,
    absent_services: Vec<String>,
    nodes: BTreeMap<String, v1::Node>,
    endpoints: BTreeMap<String, clustermesh_apiserver::translate::EndpointSpec>,
    warnings: Vec<InputWarning>,
}

fn translate(fixture: &str) -> Translated {
    let path = format!(
        "{}/tests/fixtures/translate/{fixture}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let objects = parse_manifests(&path, &text).unwrap();
    let mut state = ClusterObjects::new("east");
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
    let mut warnings = Vec::new();
    let mut out = Translated {
        services: BTreeMap::new(),
        absent_services: Vec::new(),
        nodes: BTreeMap::new(),
        endpoints: BTreeMap::new(),
        warnings: Vec::new(),
    };
    for change in state.take_changes(&mut warnings) {
        match change {
            RecordChange::Service {
                namespace,
                name,
                record: Some(r),
            } => {
                out.services.insert(format!("{namespace}/{name}"), r);
            }
            RecordChange::Service {
                namespace,
                name,
                record: None,
            } => {
                out.absent_services.push(format!("{namespace}/{name}"));
            }
            RecordChange::Node {
                name,
                record: Some(r),
            } => {
                out.nodes.insert(name, r);
            }
            RecordChange::Node { .. } => {}
            RecordChange::Endpoint { ip, spec: Some(s) } => {
                out.endpoints.insert(ip.to_string(), s);
            }
            RecordChange::Endpoint { .. } | RecordChange::Policy { .. } => {}
        }
    }
    out.warnings = warnings;
    out
}

#[test]
fn every_annotation_combination() {
    let t = translate("annotations.yaml");
    let s = |name: &str| {
        let svc = &t.services[&format!("ann/{name}")];
        (svc.global, svc.shared, svc.affinity(), svc.topology_aware)
    };
    assert_eq!(s("plain"), (false, false, Affinity::None, false));
    assert_eq!(s("global"), (true, true, Affinity::None, false));
    assert_eq!(s("global-not-shared"), (true, false, Affinity::None, false));
    assert_eq!(s("affinity-local"), (true, true, Affinity::Local, false));
    assert_eq!(s("affinity-remote"), (true, true, Affinity::Remote, false));
    assert_eq!(s("affinity-none"), (true, true, Affinity::None, false));
    assert_eq!(s("legacy"), (true, false, Affinity::Local, false));
    assert_eq!(s("new-wins"), (true, true, Affinity::Remote, false));
    assert_eq!(s("bad-affinity"), (true, true, Affinity::None, false));
    assert_eq!(s("bad-global"), (false, false, Affinity::None, false));
    assert_eq!(s("topology"), (true, true, Affinity::None, true));
    assert_eq!(
        s("shared-without-global"),
        (false, false, Affinity::None, false)
    );

    // Exactly the two invalid values are reported, each naming object, annotation and value.
    let messages: Vec<String> = t.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert!(messages.iter().any(|m| m.contains("ann/bad-affinity")
        && m.contains("service.cilium.io/affinity")
        && m.contains("sideways")
        && m.contains("local|remote|none")));
    assert!(messages.iter().any(|m| m.contains("ann/bad-global")
        && m.contains("\"yes\"")
        && m.contains("true|false")));
    assert!(t.warnings.iter().all(|w| w.reason() == "annotation"));
}

#[test]
fn dual_stack_named_ports_and_endpoint_conditions() {
    let t = translate("dualstack.yaml");
    let web = &t.services["shop/web"];
    assert_eq!(web.cluster, "east");
    assert_eq!(web.frontends, ["10.96.0.10", "fd00:96::a"]);
    let ports: Vec<(&str, u32, Protocol)> = web
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.protocol()))
        .collect();
    assert_eq!(
        ports,
        [
            ("http", 80, Protocol::Tcp),
            ("metrics", 9090, Protocol::Tcp),
            ("dns", 53, Protocol::Udp)
        ]
    );

    let by_ip: BTreeMap<&str, &v1::Backend> =
        web.backends.iter().map(|b| (b.ip.as_str(), b)).collect();
    assert_eq!(
        by_ip.keys().copied().collect::<Vec<_>>(),
        ["10.0.1.5", "10.0.2.7", "10.0.2.8", "10.0.3.9", "fd00:1::5"]
    );

    let http = &web.ports[0];
    let metrics = &web.ports[1];
    let dns = &web.ports[2];
    // Target ports come from each backend's own slice, by port name.
    assert_eq!(by_ip["10.0.1.5"].target_port(http), Some(8080));
    assert_eq!(by_ip["10.0.1.5"].target_port(metrics), Some(9100));
    assert_eq!(by_ip["10.0.1.5"].target_port(dns), None);
    assert_eq!(by_ip["10.0.3.9"].target_port(http), Some(8081));
    assert_eq!(by_ip["10.0.3.9"].target_port(metrics), None);
    assert_eq!(by_ip["fd00:1::5"].target_port(http), Some(8080));

    let ready = by_ip["10.0.1.5"];
    assert!(ready.ready && ready.serving && !ready.terminating);
    assert_eq!(
        (ready.node.as_str(), ready.zone.as_str(), ready.pod.as_str()),
        ("node-a", "zone-1", "web-0")
    );
    assert_eq!(ready.weight, 1);
    let terminating = by_ip["10.0.2.7"];
    assert!(!terminating.ready && terminating.serving && terminating.terminating);
    let unready = by_ip["10.0.2.8"];
    assert!(!unready.ready && !unready.serving && !unready.terminating);
    // Unset conditions mean ready and serving.
    let v6 = by_ip["fd00:1::5"];
    assert!(v6.ready && v6.serving && !v6.terminating);

    // Nothing from the other service's slice.
    assert!(!by_ip.contains_key("10.0.9.9"));
    // Headless and ExternalName services export nothing.
    assert!(t.absent_services.contains(&"shop/headless".to_owned()));
    assert!(t.absent_services.contains(&"shop/external".to_owned()));
    // The unknown protocol drops only that port, with a warning.
    let bad = &t.services["shop/bad-port"];
    assert_eq!(bad.ports.len(), 1);
    assert_eq!(bad.ports[0].name, "ok");
    assert!(t
        .warnings
        .iter()
        .any(|w| w.reason() == "port" && w.to_string().contains("QUIC")));
}

#[test]
fn nodes_and_pods() {
    let t = translate("nodes-pods.yaml");
    let a = &t.nodes["node-a"];
    assert_eq!(a.zone, "zone-1");
    assert_eq!(a.pod_cidrs, ["10.0.1.0/24", "fd00:1::/64"]);
    assert_eq!(a.addresses.len(), 3);
    assert_eq!(a.addresses[1].address, "fd00:c0::10");
    assert_eq!(a.addresses[1].r#type, "InternalIP");
    let b = &t.nodes["node-b"];
    assert_eq!(b.zone, "zone-2", "legacy zone label is read");
    // 10.0.2.1/24 has host bits: skipped with a warning, the valid one kept.
    assert_eq!(b.pod_cidrs, ["10.0.2.0/24"]);
    assert!(t.warnings.iter().any(|w| w.reason() == "pod_cidr"));

    // Dual-stack pod: two endpoints; host-network and finished pods: none.
    assert_eq!(
        t.endpoints.keys().map(String::as_str).collect::<Vec<_>>(),
        ["10.0.1.5", "10.0.2.7", "fd00:1::5"]
    );
    let e = &t.endpoints["10.0.1.5"];
    assert_eq!(
        (e.node.as_str(), e.namespace.as_str(), e.pod.as_str()),
        ("node-a", "shop", "web-0")
    );
    assert_eq!(e.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        e.labels.get(NAMESPACE_LABEL).map(String::as_str),
        Some("shop")
    );
    assert_eq!(
        e.labels.get(SERVICE_ACCOUNT_LABEL).map(String::as_str),
        Some("web")
    );
    assert_eq!(
        e.labels.get(CLUSTER_LABEL).map(String::as_str),
        Some("east")
    );
    assert!(!e.labels.contains_key("pod-template-hash"));
    // Two replicas differing only in pod-template-hash share one label set (one identity).
    assert_eq!(t.endpoints["10.0.2.7"].labels, e.labels);
}

#[test]
fn changing_one_slice_retranslates_only_its_service() {
    let path = format!(
        "{}/tests/fixtures/translate/dualstack.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let objects = parse_manifests(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut state = ClusterObjects::new("east");
    for object in objects.clone() {
        state.apply(SourceEvent::Apply(object));
    }
    let mut warnings = Vec::new();
    let _ = state.take_changes(&mut warnings);
    // Re-applying identical objects changes nothing.
    for object in objects.clone() {
        state.apply(SourceEvent::Apply(object));
    }
    assert!(state.take_changes(&mut warnings).is_empty());
    // Deleting one slice re-translates only `web`, now without its v6 backend.
    let v6 = objects
        .iter()
        .find(|o| o.object_ref().name == "web-v6")
        .unwrap()
        .object_ref();
    state.apply(SourceEvent::Delete(v6));
    let changes = state.take_changes(&mut warnings);
    assert_eq!(changes.len(), 1);
    let RecordChange::Service {
        name,
        record: Some(web),
        ..
    } = &changes[0]
    else {
        panic!("{changes:?}");
    };
    assert_eq!(name, "web");
    assert!(web.backends.iter().all(|b| b.ip != "fd00:1::5"));
}
