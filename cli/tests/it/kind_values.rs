//! The steps `multi-kind-tests/kind/run.sh` takes on two real kind clusters, run here
//! against the strict test API server: `enable` with exactly the values the script passes
//! (`values-cluster1.yaml`: 3 raft replicas, `values-cluster2.yaml`: a single replica,
//! plus its `--set`s), an upgrade by running it again, and `connect` over node ports.
//! The chart values `enable` rendered are then rendered by real Helm (the PyPI
//! `helm-python-sdk`, as in `helm_real.rs`), compared with the CLI's rendering and
//! validated against the oldest and newest supported Kubernetes schemas.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::support;
use clustermesh_api::agent_config::AgentConfig;
use clustermesh_cli::k8s::mesh::{chart_values, release};
use clustermesh_cli::k8s::objects::MeshConfig;
use clustermesh_test_support::fake_kube::{kubeconfig, FakeKube};
use serde_json::{json, Value};
use support::run_cli;

const NS: &str = "kube-system";

fn kind_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../multi-kind-tests/kind")
}

/// `enable` of cluster `c` exactly as run.sh runs it (`TAG=dev`, cgroup v2 at the chart
/// default).
fn enable_args(c: u32) -> Vec<String> {
    let values = kind_dir().join(format!("values-cluster{c}.yaml"));
    [
        "--context".to_owned(),
        format!("kind-clustermesh-{c}"),
        "--namespace".to_owned(),
        NS.to_owned(),
        "enable".to_owned(),
        "--cluster-name".to_owned(),
        format!("cluster{c}"),
        "--cluster-id".to_owned(),
        c.to_string(),
        "--service-type".to_owned(),
        "NodePort".to_owned(),
        "--values".to_owned(),
        values.display().to_string(),
        "--set".to_owned(),
        "image.tag=dev".to_owned(),
        "--set".to_owned(),
        "agent.cgroupRoot=/sys/fs/cgroup".to_owned(),
    ]
    .to_vec()
}

#[test]
fn run_sh_passes_the_values_files_this_test_uses() {
    let script = std::fs::read_to_string(kind_dir().join("run.sh")).unwrap();
    assert!(
        script.contains(r#"--values "$HERE/values-cluster$c.yaml""#),
        "run.sh no longer installs with values-cluster<N>.yaml; keep this test in step"
    );
    for flag in [
        "--service-type NodePort",
        r#"--set image.tag="$TAG""#,
        r#"--set agent.cgroupRoot="$root""#,
    ] {
        assert!(script.contains(flag), "run.sh lost {flag}");
    }
    assert!(script.contains("statefulset/clustermesh-apiserver"));
}

fn node(fake: &FakeKube, ip: &str) {
    fake.insert(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "control-plane"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }));
}

fn stored_config(fake: &FakeKube) -> MeshConfig {
    let cm = fake
        .object(&format!(
            "/api/v1/namespaces/{NS}/configmaps/clustermesh-config"
        ))
        .unwrap();
    let data: BTreeMap<String, String> = serde_json::from_value(cm["data"].clone()).unwrap();
    MeshConfig::from_data(&data).unwrap()
}

#[tokio::test]
async fn the_kind_script_installs_three_replicas_and_one_and_connects_them() {
    let one = FakeKube::start().await;
    let two = FakeKube::start().await;
    node(&one, "172.18.0.2");
    node(&two, "172.18.0.3");
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(
        dir.path(),
        &[("kind-clustermesh-1", &one), ("kind-clustermesh-2", &two)],
    );
    for _ in 0..2 {
        // run.sh's `up` may run again: an upgrade in place, nothing to recreate.
        for c in [1, 2] {
            let args = enable_args(c);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = run_cli(&cfg, &args).await;
            assert!(r.ok, "enable cluster{c}: {}", r.stderr);
            assert!(!r.stdout.contains("recreated"), "{}", r.stdout);
        }
    }
    let sts = one
        .object(&format!(
            "/apis/apps/v1/namespaces/{NS}/statefulsets/clustermesh-apiserver"
        ))
        .expect("cluster 1 runs a StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 3);
    let deployment = two
        .object(&format!(
            "/apis/apps/v1/namespaces/{NS}/deployments/clustermesh-apiserver"
        ))
        .expect("cluster 2 runs a Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    for fake in [&one, &two] {
        let svc = fake
            .object(&format!(
                "/api/v1/namespaces/{NS}/services/clustermesh-apiserver"
            ))
            .unwrap();
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 32379, "{svc}");
    }

    let r = run_cli(
        &cfg,
        &[
            "--context",
            "kind-clustermesh-1",
            "--destination-context",
            "kind-clustermesh-2",
            "--namespace",
            NS,
            "connect",
        ],
    )
    .await;
    assert!(r.ok, "connect: {}", r.stderr);
    let agent_cm = one
        .object(&format!(
            "/api/v1/namespaces/{NS}/configmaps/clustermesh-agent-config"
        ))
        .unwrap();
    let agent: AgentConfig =
        clustermesh_api::yaml::from_str(agent_cm["data"]["agent.yaml"].as_str().unwrap()).unwrap();
    let peer = agent
        .clusters
        .iter()
        .find(|c| c.name == "cluster2")
        .unwrap();
    assert_eq!(peer.endpoints, vec!["172.18.0.3:32379".to_owned()]);
}

fn key(obj: &Value) -> String {
    format!(
        "{} {}",
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["name"].as_str().unwrap_or("?")
    )
}

#[tokio::test]
async fn real_helm_renders_the_kind_values_like_the_cli_and_the_schemas_accept_them() {
    let Some(python) = support::helm_python() else {
        return;
    };
    let chart_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/clustermesh");
    let chart = clustermesh_cli::chart::Chart::load(&chart_dir).unwrap();
    let mut failures = Vec::new();
    for c in [1, 2] {
        // The values exactly as `enable` rendered them: run it, read what it stored.
        let fake = FakeKube::start().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = kubeconfig(dir.path(), &[(&format!("kind-clustermesh-{c}"), &fake)]);
        let args = enable_args(c);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run_cli(&cfg, &args).await;
        assert!(r.ok, "{}", r.stderr);
        let values = chart_values(&stored_config(&fake), &[]);
        let rel = release(NS);

        let mut child = Command::new(&python)
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/helm_render.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let req = json!({"chart": chart_dir, "name": rel.name, "namespace": NS,
                         "values": values, "versions": ["1.28", "1.37"]});
        child
            .stdin
            .take()
            .unwrap()
            .write_all(req.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "real Helm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        for e in v["errors"].as_array().unwrap() {
            failures.push(format!("cluster{c}: schema: {e}"));
        }
        let helm: BTreeMap<String, Value> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (key(&o["object"]), o["object"].clone()))
            .collect();
        let cli: BTreeMap<String, Value> = chart
            .render_documents(&rel, &values)
            .unwrap()
            .into_iter()
            .filter_map(|(_, text)| {
                let doc: Value = clustermesh_api::yaml::from_str(&text).unwrap();
                (!doc.is_null()).then(|| (key(&doc), doc))
            })
            .collect();
        if helm != cli {
            let differing: Vec<&String> = helm
                .keys()
                .chain(cli.keys())
                .filter(|k| helm.get(*k) != cli.get(*k))
                .collect();
            failures.push(format!(
                "cluster{c}: Helm and the CLI differ in {differing:?}"
            ));
        }
        let expected = if c == 1 {
            "StatefulSet clustermesh-apiserver"
        } else {
            "Deployment clustermesh-apiserver"
        };
        assert!(helm.contains_key(expected), "cluster{c}: {:?}", helm.keys());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
