//! `enable` against the strict test API server where a real server refuses a change in
//! place: immutable fields (a StatefulSet's volume claim templates, a Secret's type, a
//! workload's selector, a Deployment's strategy switch) and wrongly typed chart values.
//! Each upgrade either succeeds (the object is recreated, as documented) or is refused
//! with one line before any write — never a 422 half-way through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use crate::support;
use clustermesh_test_support::fake_kube::{kubeconfig, FakeKube};
use serde_json::{json, Value};
use support::{run_cli, CliRun};

const NS: &str = "kube-system";

fn sts_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/clustermesh-apiserver")
}

fn deployment_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/clustermesh-apiserver")
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

struct Cluster {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    fake: FakeKube,
}

async fn cluster() -> Cluster {
    let fake = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(dir.path(), &[("east", &fake)]);
    Cluster {
        _dir: dir,
        cfg,
        fake,
    }
}

impl Cluster {
    async fn enable(&self, extra: &[&str]) -> CliRun {
        let mut args = vec![
            "--context",
            "east",
            "enable",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--service-type",
            "NodePort",
        ];
        args.extend_from_slice(extra);
        run_cli(&self.cfg, &args).await
    }

    async fn enabled(&self, extra: &[&str]) -> CliRun {
        let r = self.enable(extra).await;
        assert!(r.ok, "enable {extra:?}: {}", r.stderr);
        r
    }

    /// Asserts `r` failed with one line containing every one of `needles`, and that no
    /// write reached the API server.
    fn refused_before_any_write(&self, r: &CliRun, needles: &[&str]) {
        assert!(!r.ok, "expected a refusal, got: {}", r.stdout);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
        for n in needles {
            assert!(r.stderr.contains(n), "{n:?} not in: {}", r.stderr);
        }
        let writes = self.fake.writes();
        assert!(writes.is_empty(), "writes before the refusal: {writes:?}");
    }
}

fn storage(sts: &Value) -> &Value {
    &sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
}

#[tokio::test]
async fn a_new_raft_volume_size_recreates_the_statefulset_instead_of_failing_half_way() {
    let c = cluster().await;
    c.enabled(&["--set", "apiserver.replicas=3"]).await;
    let before = c.fake.object(&sts_path()).unwrap();
    assert_eq!(storage(&before), "1Gi");

    let r = c
        .enabled(&["--set", "apiserver.store.raft.persistence.size=2Gi"])
        .await;
    let after = c.fake.object(&sts_path()).unwrap();
    assert_eq!(storage(&after), "2Gi");
    assert_eq!(after["spec"]["replicas"], 3, "{after}");
    assert_ne!(
        before["metadata"]["uid"], after["metadata"]["uid"],
        "a new StatefulSet"
    );
    assert!(
        r.stdout
            .contains("recreated: StatefulSet/clustermesh-apiserver"),
        "{}",
        r.stdout
    );
    // The same values again: nothing to recreate.
    let again = c.enabled(&[]).await;
    assert!(!again.stdout.contains("recreated"), "{}", again.stdout);
    assert_eq!(
        c.fake.object(&sts_path()).unwrap()["metadata"]["uid"],
        after["metadata"]["uid"]
    );
}

#[tokio::test]
async fn turning_raft_persistence_off_on_three_replicas_recreates_the_statefulset() {
    let c = cluster().await;
    c.enabled(&["--set", "apiserver.replicas=3"]).await;
    c.enabled(&["--set", "apiserver.store.raft.persistence.enabled=false"])
        .await;
    let sts = c.fake.object(&sts_path()).unwrap();
    assert!(sts["spec"]["volumeClaimTemplates"].is_null(), "{sts}");
}

#[tokio::test]
async fn opaque_leaf_secrets_from_the_plain_helm_path_are_recreated_as_tls() {
    let c = cluster().await;
    for name in ["clustermesh-apiserver-server", "clustermesh-agent-client"] {
        c.fake.insert(json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": NS},
            "stringData": {"tls.crt": "old", "tls.key": "old"},
        }));
    }
    let r = c.enabled(&[]).await;
    for name in ["clustermesh-apiserver-server", "clustermesh-agent-client"] {
        let s = c.fake.object(&secret_path(name)).unwrap();
        assert_eq!(s["type"], "kubernetes.io/tls", "{s}");
        assert!(
            r.stdout.contains(&format!("recreated: Secret/{name}")),
            "{}",
            r.stdout
        );
    }
}

#[tokio::test]
async fn an_opaque_ca_secret_is_refused_before_any_write() {
    // A readable CA, stored as Opaque.
    let c = cluster().await;
    let other = cluster().await;
    other.enabled(&[]).await;
    let real = other.fake.object(&secret_path("clustermesh-ca")).unwrap();
    let mut opaque = real.clone();
    opaque["type"] = json!("Opaque");
    opaque["metadata"] = json!({"name": "clustermesh-ca", "namespace": NS});
    c.fake.insert(opaque);
    c.fake.clear_requests();
    let r = c.enable(&[]).await;
    c.refused_before_any_write(
        &r,
        &[
            "Secret clustermesh-ca",
            "type",
            "Opaque",
            "kubernetes.io/tls",
            "ca-backup.yaml",
        ],
    );
}

#[tokio::test]
async fn a_deployment_of_another_release_is_refused_naming_the_selector() {
    let c = cluster().await;
    c.fake.insert(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "clustermesh-apiserver", "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/instance": "mesh", "app.kubernetes.io/name": "clustermesh-apiserver"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/instance": "mesh", "app.kubernetes.io/name": "clustermesh-apiserver"}},
                "spec": {"containers": [{"name": "apiserver", "image": "x"}]},
            },
        },
    }));
    c.fake.clear_requests();
    let r = c.enable(&[]).await;
    c.refused_before_any_write(
        &r,
        &[
            "Deployment clustermesh-apiserver",
            "spec.selector",
            "kubectl --context east -n kube-system delete deployment clustermesh-apiserver",
        ],
    );
}

#[tokio::test]
async fn switching_the_store_from_etcd_to_raft_resets_the_rolling_update_strategy() {
    let c = cluster().await;
    c.enabled(&[
        "--set",
        "apiserver.store.type=etcd",
        "--set",
        "apiserver.store.etcd.endpoints=https://etcd.example:2379",
    ])
    .await;
    let d = c.fake.object(&deployment_path()).unwrap();
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate", "{d}");
    c.enabled(&[
        "--set",
        "apiserver.store.type=raft",
        "--set",
        "apiserver.store.etcd.endpoints=null",
    ])
    .await;
    let d = c.fake.object(&deployment_path()).unwrap();
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate", "{d}");
    assert!(d["spec"]["strategy"]["rollingUpdate"].is_null(), "{d}");
}

#[tokio::test]
async fn a_wrongly_typed_value_is_refused_before_any_write_naming_the_field() {
    let c = cluster().await;
    let r = c.enable(&["--set", "agent.nodeSelector.x=true"]).await;
    c.refused_before_any_write(
        &r,
        &[
            "DaemonSet clustermesh-agent",
            "spec.template.spec.nodeSelector.x",
            "boolean `true`",
        ],
    );
    // Quoted, it is a string and installs.
    c.enabled(&["--set", "agent.nodeSelector.x=\"true\""]).await;
}
