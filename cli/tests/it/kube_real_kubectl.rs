//! Real `kubectl` against the fake API server (`test-support/src/fake_kube/`): the fake is
//! faithful where kubectl looks — discovery, OpenAPI v3 (kubectl then validates on the
//! server with `fieldValidation=Strict`), server-side printing, server-side apply, watch,
//! HTTPS with a client certificate or a token — and refuses what a real server refuses.
//!
//! kubectl is `$CLUSTERMESH_KUBECTL`, else `kubectl` on PATH, else the one `scripts/setup`
//! installs into `/var/tmp/clustermesh-venv/bin`. Without one these tests skip with a
//! message, or fail when `CLUSTERMESH_REQUIRE_PRIVILEGED=1` (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clustermesh_test_support::fake_kube::{kubeconfig, kubeconfig_client_cert, FakeKube};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The kubectl to run, or None (after failing in CI) when there is none.
fn kubectl() -> Option<PathBuf> {
    let candidates = std::env::var_os("CLUSTERMESH_KUBECTL")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kubectl"))
                .collect::<Vec<_>>()
        }))
        .chain([PathBuf::from("/var/tmp/clustermesh-venv/bin/kubectl")]);
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    let msg = "no kubectl found (CLUSTERMESH_KUBECTL, PATH, /var/tmp/clustermesh-venv/bin); run scripts/setup";
    if std::env::var("CLUSTERMESH_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(kubectl: &Path, kubeconfig: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(kubectl)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run kubectl");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - {name: http, containerPort: 80}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: default
data:
  mode: blue
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_gets_applies_server_side_and_is_refused_like_a_real_server() {
    let Some(kubectl) = kubectl() else { return };
    let fake = FakeKube::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig_client_cert(dir.path(), &[("east", &fake)]);

    let ns = run(&kubectl, &kc, &["get", "namespaces"]).await;
    assert!(ns.ok, "kubectl get namespaces failed: {}", ns.stderr);
    assert!(ns.stdout.contains("NAME"), "{}", ns.stdout);
    assert!(ns.stdout.contains("kube-system"), "{}", ns.stdout);

    let manifest = write(dir.path(), "web.yaml", DEPLOYMENT);
    let applied = run(&kubectl, &kc, &["apply", "--server-side", "-f", &manifest]).await;
    assert!(applied.ok, "apply failed: {}", applied.stderr);
    assert!(
        applied
            .stdout
            .contains("deployment.apps/web serverside-applied"),
        "{}",
        applied.stdout
    );
    assert!(
        applied
            .stdout
            .contains("configmap/web-config serverside-applied"),
        "{}",
        applied.stdout
    );
    // kubectl found the fieldValidation parameter in the OpenAPI v3 document and asked
    // the server to validate strictly.
    assert!(fake.requests().iter().any(|r| r.method == "PATCH"
        && r.query.contains("fieldValidation=Strict")
        && r.query.contains("fieldManager=kubectl")));

    let got = run(
        &kubectl,
        &kc,
        &["get", "deploy", "web", "-n", "default", "-o", "json"],
    )
    .await;
    assert!(got.ok, "{}", got.stderr);
    let obj: Value = serde_json::from_str(&got.stdout).unwrap();
    assert_eq!(obj["spec"]["replicas"], 2);
    // Defaulted by the server, as a real one does.
    assert_eq!(obj["spec"]["strategy"]["type"], "RollingUpdate");

    let listed = run(&kubectl, &kc, &["get", "cm", "-n", "default"]).await;
    assert!(listed.ok, "{}", listed.stderr);
    assert!(listed.stdout.contains("web-config"), "{}", listed.stdout);

    // An unknown field: kubectl's strict validation is refused by the server.
    let unknown = write(
        dir.path(),
        "unknown.yaml",
        &DEPLOYMENT.replace("  replicas: 2\n", "  replicas: 2\n  replicaz: 3\n"),
    );
    let refused = run(&kubectl, &kc, &["apply", "--server-side", "-f", &unknown]).await;
    assert!(
        !refused.ok,
        "an unknown field was accepted: {}",
        refused.stdout
    );
    assert!(
        refused
            .stderr
            .contains(".spec.replicaz: field not declared in schema"),
        "{}",
        refused.stderr
    );

    // A wrong type.
    let typed = write(
        dir.path(),
        "typed.yaml",
        &DEPLOYMENT.replace("  replicas: 2\n", "  replicas: \"two\"\n"),
    );
    let refused = run(&kubectl, &kc, &["apply", "--server-side", "-f", &typed]).await;
    assert!(!refused.ok, "a string replica count was accepted");
    assert!(
        refused.stderr.contains("spec.replicas"),
        "{}",
        refused.stderr
    );

    // An immutable field: the selector of a Deployment.
    let moved = write(
        dir.path(),
        "moved.yaml",
        &DEPLOYMENT.replace("{app: web}", "{app: web2}"),
    );
    let refused = run(&kubectl, &kc, &["apply", "--server-side", "-f", &moved]).await;
    assert!(!refused.ok, "a selector change was accepted");
    assert!(
        refused
            .stderr
            .contains("The Deployment \"web\" is invalid: spec.selector: Invalid value")
            && refused.stderr.contains("field is immutable"),
        "{}",
        refused.stderr
    );
    let still = fake
        .object("/apis/apps/v1/namespaces/default/deployments/web")
        .unwrap();
    assert_eq!(still["spec"]["selector"]["matchLabels"]["app"], "web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_watch_prints_objects_created_after_it_started() {
    let Some(kubectl) = kubectl() else { return };
    let fake = FakeKube::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    // The token user this time.
    let kc = kubeconfig(dir.path(), &[("east", &fake)]);

    let mut child = tokio::process::Command::new(&kubectl)
        .args(["get", "configmaps", "-n", "default", "-w", "-o", "name"])
        .env("KUBECONFIG", &kc)
        .env("HOME", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // Wait until kubectl's watch request has arrived, then create objects.
    tokio::time::timeout(Duration::from_secs(60), async {
        while !fake
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/configmaps") && r.query.contains("watch=true"))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("kubectl did not start watching within 60 s");
    let manifest = write(
        dir.path(),
        "late.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: late\n  namespace: default\ndata:\n  a: \"1\"\n",
    );
    let applied = run(&kubectl, &kc, &["apply", "--server-side", "-f", &manifest]).await;
    assert!(applied.ok, "{}", applied.stderr);

    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.trim() == "configmap/late" {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    assert_eq!(
        seen,
        Ok(true),
        "kubectl get -w did not print configmap/late"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_without_credentials_is_unauthorized() {
    let Some(kubectl) = kubectl() else { return };
    let fake = FakeKube::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &[("east", &fake)]);
    let text = std::fs::read_to_string(&kc)
        .unwrap()
        .replace(clustermesh_test_support::fake_kube::TOKEN, "wrong-token");
    std::fs::write(&kc, text).unwrap();
    let denied = run(&kubectl, &kc, &["get", "namespaces"]).await;
    assert!(!denied.ok);
    assert!(
        denied.stderr.contains("Unauthorized") || denied.stderr.contains("must be logged in"),
        "{}",
        denied.stderr
    );
}
