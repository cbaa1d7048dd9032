//! The fake Kubernetes API server (`test-support/src/fake_kube/`) behaves like the real one
//! for what kube-rs does: typed and dynamic get/list/create/replace/apply/delete, conflicts,
//! injected failures, the pod proxy and a stopped server.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use crate::support;
use clustermesh_test_support::fake_kube::{kubeconfig, FakeKube, ProxyResponse};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::ByteString;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;

const NS: &str = "kube-system";

async fn client(fake: &FakeKube, context: &str) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let path = kubeconfig(dir.path(), &[(context, fake)]);
    let kc = Kubeconfig::read_from(&path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(
        kc,
        &KubeConfigOptions {
            context: Some(context.into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // kube-rs retries 429/503/504 with backoff (up to 15 times) by default; these tests
    // want to see the first answer.
    let mut cfg = cfg;
    cfg.default_retry = false;
    Client::try_from(cfg).unwrap()
}

fn api_err(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app".into(), name.into())])),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[tokio::test]
async fn typed_configmap_create_get_list_replace_delete() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&fake, "east").await, NS);

    let created = api
        .create(&PostParams::default(), &cm("a", &[("k", "1")]))
        .await
        .unwrap();
    let rv1 = created.metadata.resource_version.clone().unwrap();
    assert!(created.metadata.uid.is_some());
    api.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();

    let (code, reason, msg) = api_err(
        api.create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(msg, "configmaps \"a\" already exists");

    let got = api.get("a").await.unwrap();
    assert_eq!(got.data.unwrap()["k"], "1");
    assert!(api.get_opt("missing").await.unwrap().is_none());
    let (code, reason, msg) = api_err(api.get("missing").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    assert_eq!(msg, "configmaps \"missing\" not found");

    let all = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(all.items.len(), 2);
    let only_b = api
        .list(&ListParams::default().labels("app=b"))
        .await
        .unwrap();
    let names: Vec<_> = only_b
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["b"]);
    let not_b = api
        .list(&ListParams::default().labels("app!=b"))
        .await
        .unwrap();
    assert_eq!(not_b.items.len(), 1);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=a"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);

    // Replace with the current resourceVersion succeeds and bumps it...
    let mut next = created.clone();
    next.data = Some(BTreeMap::from([("k".into(), "2".into())]));
    let replaced = api
        .replace("a", &PostParams::default(), &next)
        .await
        .unwrap();
    let rv2 = replaced.metadata.resource_version.clone().unwrap();
    assert!(rv2.parse::<u64>().unwrap() > rv1.parse::<u64>().unwrap());
    // ...and a stale one is a conflict that changes nothing.
    let mut stale = created;
    stale.data = Some(BTreeMap::from([("k".into(), "3".into())]));
    let (code, reason, msg) = api_err(
        api.replace("a", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(msg.contains("the object has been modified"), "{msg}");
    assert_eq!(api.get("a").await.unwrap().data.unwrap()["k"], "2");

    let deleted = api.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_right(), "immediate deletion returns a Status");
    let (code, _, _) = api_err(api.delete("a", &DeleteParams::default()).await.unwrap_err());
    assert_eq!(code, 404);
    assert!(fake
        .object("/api/v1/namespaces/kube-system/configmaps/a")
        .is_none());
}

#[tokio::test]
async fn creating_in_a_missing_namespace_is_not_found() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&fake, "east").await, "nowhere");
    let (code, _, msg) = api_err(
        api.create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    assert_eq!(msg, "namespaces \"nowhere\" not found");
}

#[tokio::test]
async fn server_side_apply_creates_merges_records_managers_and_detects_conflicts() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&fake, "east").await, NS);
    let path = "/api/v1/namespaces/kube-system/configmaps/cfg";
    let apply = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": data});

    // Create through apply.
    let first = api
        .patch(
            "cfg",
            &PatchParams::apply("cli"),
            &Patch::Apply(apply(json!({"a": "1"}))),
        )
        .await
        .unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    assert_eq!(
        fake.managers(path),
        [("cli".to_owned(), "Apply".to_owned())]
    );

    // Re-applying the same content is a no-op (same resourceVersion).
    let same = api
        .patch(
            "cfg",
            &PatchParams::apply("cli"),
            &Patch::Apply(apply(json!({"a": "1"}))),
        )
        .await
        .unwrap();
    assert_eq!(same.metadata.resource_version.unwrap(), rv);

    // Another manager adding its own field merges.
    api.patch(
        "cfg",
        &PatchParams::apply("other"),
        &Patch::Apply(apply(json!({"b": "2"}))),
    )
    .await
    .unwrap();
    let data = api.get("cfg").await.unwrap().data.unwrap();
    assert_eq!((data["a"].as_str(), data["b"].as_str()), ("1", "2"));

    // Changing a field "cli" owns is a conflict for "other"...
    let (code, reason, msg) = api_err(
        api.patch(
            "cfg",
            &PatchParams::apply("other"),
            &Patch::Apply(apply(json!({"a": "9"}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        msg,
        "Apply failed with 1 conflict: conflict with \"cli\": .data.a"
    );
    assert_eq!(api.get("cfg").await.unwrap().data.unwrap()["a"], "1");
    // ...unless forced, which moves ownership: now "cli" conflicts.
    api.patch(
        "cfg",
        &PatchParams::apply("other").force(),
        &Patch::Apply(apply(json!({"a": "9"}))),
    )
    .await
    .unwrap();
    assert_eq!(api.get("cfg").await.unwrap().data.unwrap()["a"], "9");
    let (code, _, _) = api_err(
        api.patch(
            "cfg",
            &PatchParams::apply("cli"),
            &Patch::Apply(apply(json!({"a": "1"}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 409);

    // fieldManager is required.
    let (code, _, msg) = api_err(
        api.patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Apply(apply(json!({}))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(msg.contains("fieldManager"), "{msg}");
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.query.contains("fieldManager=cli")
            && r.content_type == "application/apply-patch+yaml"));

    // Merge patch.
    let merged = api
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"b": null, "c": "3"}})),
        )
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(merged.keys().collect::<Vec<_>>(), ["a", "c"]);
}

#[tokio::test]
async fn secrets_fold_string_data_into_base64_data() {
    let fake = FakeKube::start().await;
    let api: Api<Secret> = Api::namespaced(client(&fake, "east").await, NS);
    let s: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ca"},
        "stringData": {"ca.crt": "foobar"}, "data": {"x": "Zg=="}
    }))
    .unwrap();
    api.create(&PostParams::default(), &s).await.unwrap();
    let got = api.get("ca").await.unwrap();
    let data = got.data.unwrap();
    assert_eq!(data["ca.crt"], ByteString(b"foobar".to_vec()));
    assert_eq!(data["x"], ByteString(b"f".to_vec()));
    assert!(got.string_data.is_none());
}

#[tokio::test]
async fn services_get_node_ports_and_status_survives_main_resource_writes() {
    let fake = FakeKube::start().await;
    let api: Api<Service> = Api::namespaced(client(&fake, "east").await, NS);
    let svc = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "mesh"},
        "spec": {"type": "NodePort", "ports": [{"port": 2379}]}
    });
    let created = api
        .patch(
            "mesh",
            &PatchParams::apply("cli"),
            &Patch::Apply(svc.clone()),
        )
        .await
        .unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.ports.unwrap()[0].node_port, Some(30000));
    assert!(spec.cluster_ip.is_some());

    let path = "/api/v1/namespaces/kube-system/services/mesh";
    fake.set_status(
        path,
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}),
    );
    let mut again = svc;
    again["metadata"]["labels"] = json!({"x": "y"});
    again["status"] = json!({});
    let after = api
        .patch("mesh", &PatchParams::apply("cli"), &Patch::Apply(again))
        .await
        .unwrap();
    let ingress = after
        .status
        .unwrap()
        .load_balancer
        .unwrap()
        .ingress
        .unwrap();
    assert_eq!(ingress[0].ip.as_deref(), Some("192.0.2.7"));
}

#[tokio::test]
async fn typed_daemonset_and_dynamic_objects() {
    let fake = FakeKube::start().await;
    let client = client(&fake, "east").await;
    let ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "a", "image": "x"}]}}
        }
    }))
    .unwrap();
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    api.patch("agent", &PatchParams::apply("cli"), &Patch::Apply(&ds))
        .await
        .unwrap();
    fake.set_status(
        "/apis/apps/v1/namespaces/kube-system/daemonsets/agent",
        json!({"desiredNumberScheduled": 2, "numberReady": 1, "currentNumberScheduled": 2, "numberMisscheduled": 0}),
    );
    let got = api.get("agent").await.unwrap();
    assert_eq!(got.metadata.generation, Some(1));
    assert_eq!(got.status.unwrap().number_ready, 1);

    // The same object through DynamicObject with an explicit ApiResource.
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "DaemonSet"));
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
    let list = dynamic.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let mut obj = dynamic.get("agent").await.unwrap();
    obj.data["spec"]["template"]["metadata"]["labels"]["extra"] = json!("1");
    let replaced = dynamic
        .replace("agent", &PostParams::default(), &obj)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2), "spec changed");
    dynamic
        .delete("agent", &DeleteParams::default())
        .await
        .unwrap();
    assert!(api.get_opt("agent").await.unwrap().is_none());

    // A body sent to the wrong resource is refused.
    let cm_ar = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"));
    let cms: Api<DynamicObject> = Api::namespaced_with(client, NS, &cm_ar);
    let mut wrong = DynamicObject::new("x", &ar);
    wrong.data = json!({});
    let (code, _, msg) = api_err(
        cms.create(&PostParams::default(), &wrong)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(
        msg.contains("apiVersion \"apps/v1\" kind \"DaemonSet\""),
        "{msg}"
    );
}

#[tokio::test]
async fn injected_failures_fail_matching_requests_and_change_nothing() {
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&fake, "east").await, NS);
    fake.fail_next("POST", "/configmaps", 500);
    let (code, reason, _) = api_err(
        api.create(&PostParams::default(), &cm("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (500, "InternalError"));
    assert!(fake
        .object("/api/v1/namespaces/kube-system/configmaps/a")
        .is_none());
    // One-shot: the retry works.
    api.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();

    fake.fail_always("PATCH", "configmaps/a", 403);
    for _ in 0..2 {
        let (code, _, _) = api_err(
            api.patch(
                "a",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"x": "1"}})),
            )
            .await
            .unwrap_err(),
        );
        assert_eq!(code, 403);
    }
    // Reads are not affected.
    api.get("a").await.unwrap();
    fake.clear_failures();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "1"}})),
    )
    .await
    .unwrap();
    let writes: Vec<String> = fake.writes().iter().map(|r| r.method.clone()).collect();
    assert_eq!(writes, ["POST", "POST", "PATCH", "PATCH", "PATCH"]);
}

#[tokio::test]
async fn pod_proxy_reaches_the_registered_handler() {
    let fake = FakeKube::start().await;
    let client = client(&fake, "east").await;
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "agent-1", "namespace": NS},
        "status": {"podIP": "10.1.2.3"}
    }));
    fake.set_pod_proxy(NS, "agent-1", Some(9963), |req| {
        if req.path == "/v1/status" {
            ProxyResponse::json(&json!({"node": "n1", "path": req.path}))
        } else {
            ProxyResponse::text(404, "404 page not found")
        }
    });
    let get = |path: &str| http::Request::get(path).body(Vec::new()).unwrap();
    let text = client
        .request_text(get(
            "/api/v1/namespaces/kube-system/pods/agent-1:9963/proxy/v1/status",
        ))
        .await
        .unwrap();
    assert_eq!(text, r#"{"node":"n1","path":"/v1/status"}"#);
    let (code, _, msg) = api_err(
        client
            .request_text(get(
                "/api/v1/namespaces/kube-system/pods/agent-1:9963/proxy/nope",
            ))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, msg.as_str()), (404, "404 page not found"));
    // Another port: nothing listens.
    let (code, _, msg) = api_err(
        client
            .request_text(get(
                "/api/v1/namespaces/kube-system/pods/agent-1:1/proxy/v1/status",
            ))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 503);
    assert!(
        msg.contains("dial tcp 10.1.2.3:1: connect: connection refused"),
        "{msg}"
    );
    // No such pod.
    let (code, _, _) = api_err(
        client
            .request_text(get(
                "/api/v1/namespaces/kube-system/pods/agent-2:9963/proxy/v1/status",
            ))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
}

#[tokio::test]
async fn requests_need_the_token_and_a_stopped_server_refuses_connections() {
    let fake = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(
        &bad,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\nusers:\n- name: u\n  user:\n    token: wrong\ncurrent-context: x\n",
            fake.url
        ),
    )
    .unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&bad).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let wrong_token: Api<ConfigMap> = Api::namespaced(Client::try_from(cfg).unwrap(), NS);
    let (code, _, _) = api_err(wrong_token.get("x").await.unwrap_err());
    assert_eq!(code, 401);

    let c = client(&fake, "east").await;
    assert_eq!(c.apiserver_version().await.unwrap().git_version, "v1.34.0");
    fake.stop().await;
    let err = c.apiserver_version().await.unwrap_err();
    assert!(
        !matches!(err, kube::Error::Api(_)),
        "a stopped server does not answer: {err:?}"
    );
    assert!(std::net::TcpStream::connect(fake.addr).is_err());
}

#[tokio::test]
async fn cli_binary_reaches_the_fake_through_the_written_kubeconfig() {
    let east = FakeKube::start().await;
    let west = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(dir.path(), &[("east", &east), ("west", &west)]);
    // Any verb resolves the context first; the fake for "west" must see GET /version.
    let _ = support::run_cli(&cfg, &["--context", "west", "disable"]).await;
    assert!(west.requests().iter().any(|r| r.path == "/version"));
    assert!(east.requests().is_empty());
}

// --- Strictness: the fake refuses what a real API server refuses -----------------------

async fn dynamic(
    fake: &FakeKube,
    gv: (&str, &str),
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(gv.0, gv.1, kind), plural);
    Api::namespaced_with(client(fake, "east").await, NS, &ar)
}

fn dyn_obj(v: serde_json::Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

fn deployment(strategy: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": strategy,
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
        }
    })
}

#[tokio::test]
async fn unknown_fields_are_refused_under_strict_and_dropped_with_a_warning_otherwise() {
    let fake = FakeKube::start().await;
    let api = dynamic(&fake, ("", "v1"), "ConfigMap", "configmaps").await;
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "a", "namespace": NS}, "data": {"k": "v"}, "dta": {"x": "y"}});
    // kube-rs's PostParams has no fieldValidation; send the request by hand.
    let strict =
        http::Request::post("/api/v1/namespaces/kube-system/configmaps?fieldValidation=Strict")
            .header("content-type", "application/json")
            .body(body.to_string().into_bytes())
            .unwrap();
    let (code, reason, message) = api_err(
        client(&fake, "east")
            .await
            .request::<ConfigMap>(strict)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (400, "BadRequest"));
    assert_eq!(message, "strict decoding error: unknown field \"dta\"");
    let pp = PatchParams::apply("t").validation_strict();
    let (code, _, message) = api_err(api.patch("a", &pp, &Patch::Apply(&body)).await.unwrap_err());
    assert_eq!(code, 400);
    assert!(
        message.ends_with(".dta: field not declared in schema"),
        "{message}"
    );
    assert!(fake
        .object("/api/v1/namespaces/kube-system/configmaps/a")
        .is_none());

    // The server's default (Warn): stored without the field, with a warning.
    api.create(&PostParams::default(), &dyn_obj(body))
        .await
        .unwrap();
    let stored = fake
        .object("/api/v1/namespaces/kube-system/configmaps/a")
        .unwrap();
    assert!(stored.get("dta").is_none());
    assert_eq!(stored["data"]["k"], "v");
    assert_eq!(fake.warnings(), vec!["unknown field \"dta\"".to_owned()]);
}

#[tokio::test]
async fn wrong_types_and_missing_required_fields_are_refused() {
    let fake = FakeKube::start().await;
    let api = dynamic(&fake, ("apps", "v1"), "DaemonSet", "daemonsets").await;
    let mut ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "a"}},
                 "template": {"metadata": {"labels": {"app": "a"}},
                              "spec": {"nodeSelector": {"x": true},
                                       "containers": [{"name": "a", "image": "i"}]}}}
    });
    let (code, _, message) = api_err(
        api.create(&PostParams::default(), &dyn_obj(ds.clone()))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(message.starts_with("DaemonSet in version \"v1\" cannot be handled as a DaemonSet: spec.template.spec.nodeSelector.x: invalid type: boolean `true`, expected a string"), "{message}");
    // Server-side apply refuses type errors whatever fieldValidation says.
    let (code, _, message) = api_err(
        api.patch("agent", &PatchParams::apply("t"), &Patch::Apply(&ds))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(message.starts_with("failed to create typed patch object (apps/v1, Kind=DaemonSet): .spec.template.spec.nodeSelector.x"), "{message}");

    ds["spec"]["template"]["spec"]["nodeSelector"]["x"] = json!("true");
    ds["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("name");
    let (code, reason, message) = api_err(
        api.create(&PostParams::default(), &dyn_obj(ds.clone()))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(message, "DaemonSet.apps \"agent\" is invalid: spec.template.spec.containers[0].name: Required value");

    ds["spec"]["template"]["spec"]["containers"][0]["name"] = json!("a");
    ds["spec"]["template"]["metadata"]["labels"]["app"] = json!("b");
    let (code, _, message) = api_err(
        api.create(&PostParams::default(), &dyn_obj(ds))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("spec.template.metadata.labels: Invalid value")
            && message.contains("`selector` does not match template `labels`"),
        "{message}"
    );
}

#[tokio::test]
async fn immutable_fields_are_refused_with_the_field_path() {
    let fake = FakeKube::start().await;
    let pp = PatchParams::apply("cli").force();

    // A Secret's type (defaulted to Opaque).
    let secrets = dynamic(&fake, ("", "v1"), "Secret", "secrets").await;
    let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tls", "namespace": NS},
                   "stringData": {"tls.crt": "x"}});
    secrets.patch("tls", &pp, &Patch::Apply(&s)).await.unwrap();
    let mut tls = s.clone();
    tls["type"] = json!("kubernetes.io/tls");
    let (code, _, message) = api_err(
        secrets
            .patch("tls", &pp, &Patch::Apply(&tls))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert_eq!(
        message,
        "Secret \"tls\" is invalid: type: Invalid value: \"kubernetes.io/tls\": field is immutable"
    );

    // An immutable ConfigMap.
    let cms = dynamic(&fake, ("", "v1"), "ConfigMap", "configmaps").await;
    let mut c = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": NS},
                       "immutable": true, "data": {"a": "1"}});
    cms.patch("c", &pp, &Patch::Apply(&c)).await.unwrap();
    c["data"]["a"] = json!("2");
    let (code, _, message) = api_err(cms.patch("c", &pp, &Patch::Apply(&c)).await.unwrap_err());
    assert_eq!(code, 422);
    assert_eq!(
        message,
        "ConfigMap \"c\" is invalid: data: Forbidden: field is immutable when `immutable` is set"
    );

    // A StatefulSet's volumeClaimTemplates.
    let sts = dynamic(&fake, ("apps", "v1"), "StatefulSet", "statefulsets").await;
    let mut st = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": NS},
        "spec": {"serviceName": "db", "replicas": 3, "selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db"}},
                              "spec": {"containers": [{"name": "db", "image": "i"}]}},
                 "volumeClaimTemplates": [{"metadata": {"name": "data"},
                     "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}
    });
    sts.patch("db", &pp, &Patch::Apply(&st)).await.unwrap();
    st["spec"]["replicas"] = json!(5);
    sts.patch("db", &pp, &Patch::Apply(&st)).await.unwrap();
    st["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] =
        json!("2Gi");
    let (code, _, message) = api_err(sts.patch("db", &pp, &Patch::Apply(&st)).await.unwrap_err());
    assert_eq!(code, 422);
    assert!(message.starts_with("StatefulSet.apps \"db\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas'"), "{message}");

    // A Deployment switched to Recreate keeps the defaulted rollingUpdate: refused.
    let deploys = dynamic(&fake, ("apps", "v1"), "Deployment", "deployments").await;
    let mut d = deployment(json!({}));
    d["spec"].as_object_mut().unwrap().remove("strategy");
    deploys.patch("web", &pp, &Patch::Apply(&d)).await.unwrap();
    let stored = fake
        .object("/apis/apps/v1/namespaces/kube-system/deployments/web")
        .unwrap();
    assert_eq!(
        stored["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    );
    let (code, _, message) = api_err(
        deploys
            .patch(
                "web",
                &pp,
                &Patch::Apply(&deployment(json!({"type": "Recreate"}))),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert_eq!(message, "Deployment.apps \"web\" is invalid: spec.strategy.rollingUpdate: Forbidden: may not be specified when strategy `type` is 'Recreate'");
    // Removing it in the same write works.
    deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"strategy": {"type": "Recreate", "rollingUpdate": null}}}),
            ),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn apply_removes_fields_its_manager_stopped_applying() {
    let fake = FakeKube::start().await;
    let cms = dynamic(&fake, ("", "v1"), "ConfigMap", "configmaps").await;
    let path = "/api/v1/namespaces/kube-system/configmaps/c";
    let applied = |labels: serde_json::Value, data: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "c", "namespace": NS, "labels": labels}, "data": data})
    };
    let cli = PatchParams::apply("cli");
    cms.patch(
        "c",
        &cli,
        &Patch::Apply(&applied(
            json!({"a": "1", "b": "2"}),
            json!({"x": "1", "y": "2"}),
        )),
    )
    .await
    .unwrap();
    // Another manager's field survives the first manager dropping it.
    cms.patch("c", &PatchParams::apply("other"), &Patch::Apply(&json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": NS}, "data": {"z": "3"}})))
        .await
        .unwrap();
    cms.patch(
        "c",
        &cli,
        &Patch::Apply(&applied(json!({"a": "1"}), json!({"x": "1"}))),
    )
    .await
    .unwrap();
    let stored = fake.object(path).unwrap();
    assert_eq!(stored["metadata"]["labels"], json!({"a": "1"}));
    assert_eq!(stored["data"], json!({"x": "1", "z": "3"}));
}

#[tokio::test]
async fn services_keep_their_cluster_ip_and_refuse_changing_it() {
    let fake = FakeKube::start().await;
    let api: Api<Service> = Api::namespaced(client(&fake, "east").await, NS);
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &svc).await.unwrap();
    let ip = created.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    let pp = PatchParams::apply("cli").force();
    let mut applied = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                             "spec": {"ports": [{"port": 81}]}});
    let kept = api.patch("s", &pp, &Patch::Apply(&applied)).await.unwrap();
    assert_eq!(kept.spec.unwrap().cluster_ip.unwrap(), ip);
    applied["spec"]["clusterIP"] = json!("10.96.99.99");
    let (code, _, message) = api_err(
        api.patch("s", &pp, &Patch::Apply(&applied))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        message.starts_with("Service \"s\" is invalid: spec.clusterIPs[0]: Invalid value"),
        "{message}"
    );
}

#[tokio::test]
async fn watches_stream_changes_after_the_listed_version() {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};
    let fake = FakeKube::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&fake, "east").await, NS);
    api.create(&PostParams::default(), &cm("before", &[]))
        .await
        .unwrap();
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &cm("after", &[("k", "1")]))
        .await
        .unwrap();
    api.delete("before", &DeleteParams::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(o) => seen.push(format!("ADDED {}", o.metadata.name.unwrap())),
            WatchEvent::Deleted(o) => seen.push(format!("DELETED {}", o.metadata.name.unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["ADDED after", "DELETED before"]);
}

#[tokio::test]
async fn https_with_a_client_certificate_or_the_token() {
    let fake = FakeKube::start_tls().await;
    assert!(fake.url.starts_with("https://127.0.0.1:"));
    for cert in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let path = if cert {
            clustermesh_test_support::fake_kube::kubeconfig_client_cert(
                dir.path(),
                &[("east", &fake)],
            )
        } else {
            kubeconfig(dir.path(), &[("east", &fake)])
        };
        let cfg = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&path).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let api: Api<ConfigMap> = Api::namespaced(Client::try_from(cfg).unwrap(), NS);
        api.create(
            &PostParams::default(),
            &cm(if cert { "c" } else { "t" }, &[]),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        fake.objects("/api/v1/namespaces/kube-system/configmaps")
            .len(),
        2
    );
}
