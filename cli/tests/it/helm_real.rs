//! The chart against real Helm and the real Kubernetes schemas.
//!
//! For the default values and every documented override, `deploy/helm/clustermesh` is
//! rendered twice — by the real Helm v4 engine (PyPI `helm-python-sdk`, through
//! `tests/it/support/helm_render.py`) and by the engine the CLI compiles in
//! (`clustermesh_cli::chart`) — and the two must produce the same objects. Every object
//! Helm renders must pass `kubernetes-validate` (strict) for the oldest and newest
//! supported Kubernetes versions, and every object the CLI renders must be accepted by
//! the strict fake API server (server-side apply, `fieldValidation=Strict`).
//!
//! The Python tools live in the virtualenv `scripts/setup` creates
//! (`$CLUSTERMESH_VENV`, default `/var/tmp/clustermesh-venv`). Without them these tests
//! skip with a message, or fail when `CLUSTERMESH_REQUIRE_PRIVILEGED=1` (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::support;
use clustermesh_cli::chart::{Chart, Release};
use clustermesh_test_support::fake_kube::{kubeconfig, plural_of, FakeKube};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{json, Value};

/// Oldest supported Kubernetes version (the raft StatefulSet needs the pod-index label).
const OLDEST: &str = "1.28";
/// Newest Kubernetes version kubernetes-validate knows (README's Kubernetes section).
const NEWEST: &str = "1.37";

const RELEASE: &str = "clustermesh";
const NAMESPACE: &str = "kube-system";

fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/clustermesh")
}

/// Objects keyed by `Kind namespace/name`.
type Objects = BTreeMap<String, Value>;

fn key(obj: &Value) -> String {
    format!(
        "{} {}/{}",
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Real Helm: the objects and the schema errors for [OLDEST, NEWEST].
fn helm_render(python: &PathBuf, values: &Value) -> (Objects, Vec<String>) {
    helm_try_render(python, values).unwrap_or_else(|e| panic!("real Helm failed for {values}: {e}"))
}

/// Real Helm: the objects and the schema errors, or Helm's message when the chart refuses
/// to render.
fn helm_try_render(python: &PathBuf, values: &Value) -> Result<(Objects, Vec<String>), String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/helm_render.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let req = json!({
        "chart": chart_dir(), "name": RELEASE, "namespace": NAMESPACE,
        "values": values, "versions": [OLDEST, NEWEST],
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let objects = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (key(&o["object"]), o["object"].clone()))
        .collect();
    let errors = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    Ok((objects, errors))
}

/// The CLI's own rendering (the engine `helm_chart.rs` tests too).
fn cli_render(values: &Value) -> Objects {
    let chart = Chart::load(&chart_dir()).unwrap();
    let release = Release {
        name: RELEASE.into(),
        namespace: NAMESPACE.into(),
    };
    chart
        .render_documents(&release, values)
        .unwrap_or_else(|e| panic!("the CLI's chart engine failed for {values}: {e}"))
        .into_iter()
        .filter_map(|(template, text)| {
            let doc: Value = clustermesh_api::yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{template}: does not parse: {e}"));
            (!doc.is_null()).then(|| (key(&doc), doc))
        })
        .collect()
}

/// The first place two values differ, as a path.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                let (l, r) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                if let Some(d) = first_difference(l, r, &format!("{path}.{k}")) {
                    return Some(d);
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (l, r))| first_difference(l, r, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: Helm {a}, CLI {b}")),
    }
}

const REMOTE_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

/// The default values and every override values.yaml and the README document, as
/// (name, overrides).
fn cases() -> Vec<(&'static str, Value)> {
    let c = |extra: Value| {
        let mut v = json!({"cluster": {"name": "cluster1", "id": 1}});
        clustermesh_cli::chart::merge_values(&mut v, &extra);
        v
    };
    vec![
        ("defaults", c(json!({}))),
        (
            "readme plain helm install",
            c(
                json!({"cluster": {"name": "east", "id": 1}, "apiserver": {"service": {"type": "LoadBalancer"}}, "image": {"prefix": "registry.example/clustermesh"}}),
            ),
        ),
        (
            "image tag and pull policy",
            c(json!({"image": {"tag": "v1.2.3", "pullPolicy": "Always"}})),
        ),
        (
            "trust domain and max clusters",
            c(
                json!({"trustDomain": "mesh.example", "cluster": {"maxConnectedClusters": 511, "id": 300}}),
            ),
        ),
        (
            "tls secret names",
            c(
                json!({"tls": {"serverSecret": "s1", "adminSecret": "a1", "clientSecret": "c1", "caBundleSecret": "b1"}}),
            ),
        ),
        (
            "three raft replicas",
            c(json!({"apiserver": {"replicas": 3}})),
        ),
        (
            "raft persistence size and class",
            c(
                json!({"apiserver": {"replicas": 3, "store": {"raft": {"persistence": {"size": "2Gi", "storageClassName": "fast"}}}}}),
            ),
        ),
        (
            "raft without persistence",
            c(
                json!({"apiserver": {"replicas": 3, "store": {"raft": {"persistence": {"enabled": false}}}}}),
            ),
        ),
        (
            "etcd store with tls",
            c(
                json!({"apiserver": {"replicas": 2, "store": {"type": "etcd", "etcd": {"endpoints": "https://etcd-0.etcd:2379,https://etcd-1.etcd:2379", "tlsSecret": "etcd-client"}}}}),
            ),
        ),
        (
            "etcd store without tls",
            c(
                json!({"apiserver": {"store": {"type": "etcd", "etcd": {"endpoints": "http://etcd:2379"}}}}),
            ),
        ),
        (
            "node port service",
            c(json!({"apiserver": {"service": {"type": "NodePort", "nodePort": 32379}}})),
        ),
        (
            "node port picked by kubernetes",
            c(json!({"apiserver": {"service": {"type": "NodePort"}}})),
        ),
        (
            "cluster ip service with annotations",
            c(
                json!({"apiserver": {"service": {"type": "ClusterIP", "port": 12379, "annotations": {"example.com/lb": "internal"}}}}),
            ),
        ),
        (
            "ports and log format",
            c(
                json!({"apiserver": {"grpcPort": 12379, "raftPort": 12380, "metricsPort": 19962, "logFormat": "text"}, "agent": {"httpPort": 19963, "logFormat": "text"}}),
            ),
        ),
        (
            "scheduling",
            c(
                json!({"apiserver": {"nodeSelector": {"kubernetes.io/os": "linux"}, "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}]}, "agent": {"nodeSelector": {"kubernetes.io/os": "linux"}, "tolerations": []}}),
            ),
        ),
        (
            "resources",
            c(
                json!({"apiserver": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}, "agent": {"resources": {"limits": {"cpu": "500m"}}}}),
            ),
        ),
        (
            "agent paths and stale ttl",
            c(
                json!({"agent": {"bpfPinDir": "/sys/fs/bpf/cm", "cgroupRoot": "/sys/fs/cgroup/unified", "adminSocketDir": "/run/cm", "staleTTL": "10m"}}),
            ),
        ),
        (
            "agent policy off",
            c(json!({"agent": {"policy": {"enabled": false}}})),
        ),
        (
            "agent policy peers in every cluster",
            c(json!({"agent": {"policy": {"peerClusters": "all"}}})),
        ),
        (
            "remote clusters",
            c(json!({"agent": {"remoteClusters": [
                {"name": "west", "id": 2, "endpoints": ["10.0.0.2:2379"], "caCert": REMOTE_CA},
                {"name": "north", "id": 3, "endpoints": ["n1.example:2379", "n2.example:2379"], "caCert": REMOTE_CA},
            ]}})),
        ),
    ]
}

#[test]
fn real_helm_renders_what_the_cli_renders_and_the_schemas_accept_it() {
    let Some(python) = support::helm_python() else {
        return;
    };
    let mut failures = Vec::new();
    for (name, values) in cases() {
        let (helm, errors) = helm_render(&python, &values);
        let cli = cli_render(&values);
        for e in errors {
            failures.push(format!("{name}: schema: {e}"));
        }
        let helm_keys: Vec<&String> = helm.keys().collect();
        let cli_keys: Vec<&String> = cli.keys().collect();
        if helm_keys != cli_keys {
            failures.push(format!(
                "{name}: Helm renders {helm_keys:?}, the CLI {cli_keys:?}"
            ));
            continue;
        }
        for (k, h) in &helm {
            if let Some(d) = first_difference(h, &cli[k], "") {
                failures.push(format!("{name}: {k} differs at {d}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn real_helm_passes_the_policy_values_and_refuses_a_bad_peer_clusters() {
    let Some(python) = support::helm_python() else {
        return;
    };
    let values = json!({"cluster": {"name": "c", "id": 1}, "agent": {"policy": {"enabled": false, "peerClusters": "all"}}});
    let (objects, errors) = helm_render(&python, &values);
    assert!(errors.is_empty(), "{errors:?}");
    let agent = &objects[&format!("DaemonSet {NAMESPACE}/clustermesh-agent")]["spec"]["template"]
        ["spec"]["containers"][0];
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|a| a.starts_with("--policy"))
        .collect();
    assert_eq!(args, ["--policy=false", "--policy-peer-clusters=all"]);
    assert!(
        agent["env"].as_array().unwrap().contains(
            &json!({"name": "HOST_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}})
        ),
        "{agent}"
    );

    let bad =
        json!({"cluster": {"name": "c", "id": 1}, "agent": {"policy": {"peerClusters": "remote"}}});
    let err = helm_try_render(&python, &bad).expect_err("Helm rendered peerClusters=remote");
    assert!(
        err.contains("agent.policy.peerClusters must be local or all"),
        "{err}"
    );
}

#[test]
fn the_schemas_refuse_a_wrongly_typed_override() {
    // Proves the schema check is live: `--set agent.nodeSelector.x=true` renders a bool.
    let Some(python) = support::helm_python() else {
        return;
    };
    let values = json!({"cluster": {"name": "c", "id": 1}, "agent": {"nodeSelector": {"x": true}}});
    let (_, errors) = helm_render(&python, &values);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("DaemonSet/clustermesh-agent") && e.contains("nodeSelector/x")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strict_fake_api_server_accepts_every_rendered_case() {
    // Runs without the Python tools: the CLI's rendering through the strict fake, a
    // fresh server (a fresh install) per case.
    let mut failures = Vec::new();
    for (name, values) in cases() {
        let fake = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kc = kubeconfig(dir.path(), &[("east", &fake)]);
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kc).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        for (k, obj) in cli_render(&values) {
            let api_version = obj["apiVersion"].as_str().unwrap();
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            let kind = obj["kind"].as_str().unwrap();
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(group, version, kind),
                &plural_of(kind),
            );
            let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            let pp = PatchParams::apply("helm-real-test")
                .force()
                .validation_strict();
            let name_of = obj["metadata"]["name"].as_str().unwrap();
            if let Err(e) = api.patch(name_of, &pp, &Patch::Apply(&obj)).await {
                failures.push(format!("{name}: {k}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
