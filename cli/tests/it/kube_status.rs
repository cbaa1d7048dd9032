//! Kubernetes-mode `status`, through the real binary against fake API servers: the
//! apiserver workload, its Service address, the agent DaemonSet and each agent's cluster
//! connections read through the API server's pod proxy (the agents are proxy handlers
//! answering `/v1/status` like `clustermesh-agent --http-listen` does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support;
use clustermesh_test_support::fake_kube::{kubeconfig, FakeKube, ProxyResponse};
use serde_json::{json, Value};
use support::{run_cli, CliRun};

const NS: &str = "kube-system";

/// The body of an agent's `GET /v1/status` (agent/src/admin.rs `StatusBody`): `clusters`
/// is `(name, connected, last_error)`; connected clusters are synced.
fn agent_body(node: &str, local: &str, clusters: &[(&str, bool, Option<&str>)]) -> Value {
    json!({
        "node": node,
        "local_cluster": local,
        "services": 3,
        "clusters": clusters.iter().enumerate().map(|(i, (name, connected, err))| json!({
            "name": name,
            "phase": if *connected { "Synced" } else { "Backoff" },
            "connected": connected,
            "synced": connected,
            "stale": !connected,
            "revision": 10 + i,
            "last_error": err,
            "endpoint": "192.0.2.10:2379",
            "decode_errors": 0,
            "refused_records": 0,
        })).collect::<Vec<_>>(),
    })
}

struct Mesh {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    east: FakeKube,
    west: FakeKube,
}

impl Mesh {
    async fn cli(&self, args: &[&str]) -> CliRun {
        run_cli(&self.cfg, args).await
    }

    async fn status(&self, extra: &[&str]) -> CliRun {
        let mut args = vec!["--context", "east", "status"];
        args.extend_from_slice(extra);
        self.cli(&args).await
    }
}

/// Two clusters enabled and connected with the real `enable` and `connect` (so the
/// DaemonSet, its selector and the agents' HTTP port come from the chart), the east
/// workloads reporting ready, and two east agent pods on nodes n1 and n2.
async fn connected_mesh() -> Mesh {
    let east = FakeKube::start().await;
    let west = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(dir.path(), &[("east", &east), ("west", &west)]);
    let m = Mesh {
        _dir: dir,
        cfg,
        east,
        west,
    };
    for (ctx, id, typ) in [("east", "1", "LoadBalancer"), ("west", "2", "NodePort")] {
        let r = m
            .cli(&[
                "--context",
                ctx,
                "enable",
                "--cluster-name",
                ctx,
                "--cluster-id",
                id,
                "--service-type",
                typ,
            ])
            .await;
        assert!(r.ok, "enable {ctx}: {}", r.stderr);
    }
    m.east.set_status(
        &format!("/api/v1/namespaces/{NS}/services/clustermesh-apiserver"),
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}),
    );
    m.west.insert(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "w1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "198.51.100.7"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }));
    let r = m
        .cli(&[
            "--context",
            "east",
            "--destination-context",
            "west",
            "connect",
        ])
        .await;
    assert!(r.ok, "connect: {}", r.stderr);

    m.east.set_status(
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/clustermesh-apiserver"),
        json!({"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}),
    );
    m.east.set_status(
        &format!("/apis/apps/v1/namespaces/{NS}/daemonsets/clustermesh-agent"),
        json!({"desiredNumberScheduled": 2, "numberReady": 2, "currentNumberScheduled": 2, "numberMisscheduled": 0}),
    );
    let ds = m
        .east
        .object(&format!(
            "/apis/apps/v1/namespaces/{NS}/daemonsets/clustermesh-agent"
        ))
        .unwrap();
    let labels = ds["spec"]["template"]["metadata"]["labels"].clone();
    for (pod, node, ip) in [
        ("clustermesh-agent-aaaaa", "n1", "10.0.0.11"),
        ("clustermesh-agent-bbbbb", "n2", "10.0.0.12"),
    ] {
        m.east.insert(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip},
        }));
    }
    // A pod of something else in the namespace is not an agent.
    m.east.insert(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "coredns-1", "namespace": NS, "labels": {"k8s-app": "kube-dns"}},
        "spec": {"containers": [{"name": "dns", "image": "x"}]},
    }));
    m
}

/// The agents' admin token `enable` stored in Secret `clustermesh-agent-admin-token`, as
/// stored (base64).
fn agent_token(fake: &FakeKube) -> String {
    let secret = fake
        .object(&format!(
            "/api/v1/namespaces/{NS}/secrets/clustermesh-agent-admin-token"
        ))
        .expect("enable creates the agents' token Secret");
    secret["data"]["token"].as_str().unwrap().to_owned()
}

/// Registers agent `pod` on port 9963 (the chart's `agent.httpPort`) answering `body` to a
/// request with the token of Secret `clustermesh-agent-admin-token` in header
/// `X-Clustermesh-Token`, and 401 otherwise, like `clustermesh-agent --http-token-file`.
fn agent(fake: &FakeKube, pod: &str, body: Value) {
    let token = agent_token(fake);
    fake.set_pod_proxy(NS, pod, Some(9963), move |req| {
        match req.header("x-clustermesh-token") {
            None => return ProxyResponse::text(401, "missing X-Clustermesh-Token header"),
            Some(t) if clustermesh_test_support::fake_kube::base64(t.as_bytes()) != token => {
                return ProxyResponse::text(401, "wrong X-Clustermesh-Token")
            }
            Some(_) => {}
        }
        if req.method == "GET" && req.path == "/v1/status" {
            ProxyResponse::json(&body)
        } else {
            ProxyResponse::text(404, "404 page not found")
        }
    });
}

fn healthy(m: &Mesh) {
    agent(
        &m.east,
        "clustermesh-agent-aaaaa",
        agent_body("n1", "east", &[("east", true, None), ("west", true, None)]),
    );
    agent(
        &m.east,
        "clustermesh-agent-bbbbb",
        agent_body("n2", "east", &[("east", true, None), ("west", true, None)]),
    );
}

#[tokio::test]
async fn two_agents_connected_to_two_clusters_report_2_of_2() {
    let m = connected_mesh().await;
    healthy(&m);
    m.east.clear_requests();
    m.west.clear_requests();
    let r = m.status(&[]).await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let out = &r.stdout;
    for line in [
        "Cluster:     east (id 1), context east, namespace kube-system",
        "Mesh API:    OK   Deployment clustermesh-apiserver 1/1 ready",
        "Service:     OK   LoadBalancer address 192.0.2.10:2379",
        "Agents:      OK   DaemonSet clustermesh-agent 2/2 ready, 2/2 answering on port 9963",
        "  - east: 2/2 configured, 2/2 connected",
        "  - west: 2/2 configured, 2/2 connected",
        "Summary:     2/2 agents connected to all 2 clusters",
        "  clustermesh-agent-aaaaa (node n1): 2/2 configured, 2/2 connected",
        "  clustermesh-agent-bbbbb (node n2): 2/2 configured, 2/2 connected",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "no line {line:?} in:\n{out}"
        );
    }
    assert!(!out.contains("coredns"), "{out}");
    // Agents were asked through the pod proxy on the chart's port, nothing was written.
    let asked: Vec<String> = m
        .east
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/proxy/"))
        .map(|r| r.path)
        .collect();
    assert_eq!(asked.len(), 2, "one /v1/status per agent pod: {asked:?}");
    assert!(asked.contains(
        &"/api/v1/namespaces/kube-system/pods/clustermesh-agent-aaaaa:9963/proxy/v1/status"
            .to_string()
    ));
    assert!(m.east.writes().is_empty());
    assert!(
        m.west.requests().is_empty(),
        "status reads only its own context"
    );
}

/// Agents answer only with the token `enable` stored; without that Secret the refusal says
/// which Secret is missing and how to get it back.
#[tokio::test]
async fn agents_are_asked_with_the_token_and_a_missing_token_secret_is_named() {
    let m = connected_mesh().await;
    healthy(&m);
    let token = agent_token(&m.east);
    // 32 random bytes, hex: 64 characters, 88 in base64.
    assert_eq!(token.len(), 88, "{token}");
    assert!(m.status(&[]).await.ok);

    m.east
        .remove(&format!(
            "/api/v1/namespaces/{NS}/secrets/clustermesh-agent-admin-token"
        ))
        .unwrap();
    let r = m.status(&[]).await;
    assert!(!r.ok, "{}", r.stdout);
    assert!(
        r.stdout.lines().any(|l| l
            == "  clustermesh-agent-aaaaa (node n1) unreachable: the agent answered HTTP 401: missing \
                X-Clustermesh-Token header (Secret clustermesh-agent-admin-token does not \
                exist; run `clustermesh enable` again to create it)"),
        "{}",
        r.stdout
    );

    // enable creates a new one; a later enable keeps it.
    let enable = [
        "--context",
        "east",
        "enable",
        "--cluster-name",
        "east",
        "--cluster-id",
        "1",
    ];
    assert!(m.cli(&enable).await.ok);
    let renewed = agent_token(&m.east);
    assert_ne!(renewed, token);
    assert!(m.cli(&enable).await.ok);
    assert_eq!(agent_token(&m.east), renewed);
    healthy(&m);
    assert!(m.status(&[]).await.ok);
}

#[tokio::test]
async fn json_output_parses_and_carries_the_counts() {
    let m = connected_mesh().await;
    healthy(&m);
    let r = m.status(&["-o", "json"]).await;
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["cluster"], "east");
    assert_eq!(v["configured"], json!(["east", "west"]));
    assert_eq!(v["apiserver"]["kind"], "Deployment");
    assert_eq!(
        (
            v["apiserver"]["ready"].as_i64(),
            v["apiserver"]["desired"].as_i64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(v["service"]["type"], "LoadBalancer");
    assert_eq!(v["service"]["endpoints"], json!(["192.0.2.10:2379"]));
    assert_eq!(v["agent_http_port"], 9963);
    let pods = v["agent_pods"].as_array().unwrap();
    assert_eq!(pods.len(), 2);
    assert_eq!(pods[0]["node"], "n1");
    assert_eq!(pods[0]["status"]["clusters"][1]["name"], "west");
    assert_eq!(
        v["connections"],
        json!([
            {"cluster": "east", "configured": 2, "connected": 2, "agents": 2},
            {"cluster": "west", "configured": 2, "connected": 2, "agents": 2},
        ])
    );
}

#[tokio::test]
async fn a_disconnected_remote_is_shown_and_wait_fails_with_the_reason() {
    let m = connected_mesh().await;
    healthy(&m);
    agent(
        &m.east,
        "clustermesh-agent-bbbbb",
        agent_body(
            "n2",
            "east",
            &[
                ("east", true, None),
                (
                    "west",
                    false,
                    Some("connection refused by 198.51.100.7:30000"),
                ),
            ],
        ),
    );
    let r = m.status(&[]).await;
    assert!(!r.ok);
    let out = &r.stdout;
    for line in [
        "  - west: 2/2 configured, 1/2 connected",
        "Summary:     1/2 agents connected to all 2 clusters",
        "  clustermesh-agent-bbbbb (node n2): 2/2 configured, 1/2 connected",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "no line {line:?} in:\n{out}"
        );
    }
    assert!(
        out.contains("west                   disconnected, stale rev 11 last error: connection refused by 198.51.100.7:30000"),
        "{out}"
    );
    let expected_reason = "agent clustermesh-agent-bbbbb (node n2): 1/2 clusters connected (west disconnected (connection refused by 198.51.100.7:30000))";
    assert_eq!(
        r.stderr.trim_end(),
        format!("error: the mesh is not fully up: {expected_reason}")
    );

    let r = m.status(&["--wait", "--wait-duration", "2s"]).await;
    assert!(!r.ok);
    let last = r.stderr.lines().last().unwrap();
    assert_eq!(
        last,
        format!("error: the mesh was not ready after 2s: {expected_reason}; check the agents' and apiservers' logs")
    );
    // The progress line (stderr is not a terminal here) says what it waits for.
    let first = r.stderr.lines().next().unwrap();
    assert!(
        first.starts_with("waiting for the mesh (")
            && first.ends_with(&format!("/2s): {expected_reason}")),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.contains("1/2 connected"),
        "the last report is printed"
    );
}

#[tokio::test]
async fn wait_returns_once_the_agents_connect() {
    let m = connected_mesh().await;
    healthy(&m);
    // Agent b reports west disconnected on its first two answers, connected afterwards.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    m.east
        .set_pod_proxy(NS, "clustermesh-agent-bbbbb", Some(9963), move |_| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let west_up = n >= 2;
            ProxyResponse::json(&agent_body(
                "n2",
                "east",
                &[("east", true, None), ("west", west_up, None)],
            ))
        });
    let r = m.status(&["--wait", "--wait-duration", "2m"]).await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("  - west: 2/2 configured, 2/2 connected"),
        "{}",
        r.stdout
    );
    assert!(calls.load(Ordering::SeqCst) >= 3, "polled until connected");
    assert!(
        r.stderr.starts_with("waiting for the mesh ("),
        "progress was shown: {}",
        r.stderr
    );
}

#[tokio::test]
async fn an_agent_that_does_not_answer_is_listed_as_unreachable_with_the_reason() {
    let m = connected_mesh().await;
    healthy(&m);
    m.east
        .clear_pod_proxy(NS, "clustermesh-agent-bbbbb", Some(9963));
    let r = m.status(&[]).await;
    assert!(!r.ok);
    let reason = "error trying to reach service: dial tcp 10.0.0.12:9963: connect: connection refused (ServiceUnavailable, HTTP 503)";
    assert!(
        r.stdout
            .lines()
            .any(|l| l == format!("  clustermesh-agent-bbbbb (node n2) unreachable: {reason}")),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("2/2 ready, 1/2 answering"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("  - west: 1/2 configured, 1/2 connected"),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stderr.trim_end(),
        format!("error: the mesh is not fully up: agent clustermesh-agent-bbbbb (node n2) unreachable: {reason}")
    );
}

#[tokio::test]
async fn workloads_not_ready_and_a_pending_load_balancer_are_reported() {
    let m = connected_mesh().await;
    healthy(&m);
    m.east.set_status(
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/clustermesh-apiserver"),
        json!({"replicas": 1}),
    );
    m.east.set_status(
        &format!("/api/v1/namespaces/{NS}/services/clustermesh-apiserver"),
        json!({}),
    );
    m.east.set_status(
        &format!("/apis/apps/v1/namespaces/{NS}/daemonsets/clustermesh-agent"),
        json!({"desiredNumberScheduled": 2, "numberReady": 1, "currentNumberScheduled": 2, "numberMisscheduled": 0}),
    );
    let r = m.status(&[]).await;
    assert!(!r.ok);
    assert!(
        r.stdout
            .lines()
            .any(|l| l == "Mesh API:    DOWN Deployment clustermesh-apiserver 0/1 ready"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("Service:     DOWN LoadBalancer Service clustermesh-apiserver in namespace kube-system of context east is a LoadBalancer with no external address yet"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("Agents:      DOWN DaemonSet clustermesh-agent 1/2 ready"),
        "{}",
        r.stdout
    );
    let err = r.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: the mesh is not fully up: mesh API server Deployment clustermesh-apiserver 0/1 ready, mesh API Service: Service clustermesh-apiserver in namespace kube-system of context east is a LoadBalancer with no external address yet"),
        "{err}"
    );
    assert!(
        err.ends_with(", agents DaemonSet clustermesh-agent 1/2 ready"),
        "{err}"
    );
}

#[tokio::test]
async fn a_namespace_without_the_mesh_is_one_clear_line() {
    let east = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(dir.path(), &[("east", &east)]);
    let r = run_cli(
        &cfg,
        &["--context", "east", "--namespace", "mesh", "status"],
    )
    .await;
    assert!(!r.ok);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert_eq!(
        r.stderr.trim_end(),
        "error: the mesh is not enabled in namespace mesh of context east (ConfigMap clustermesh-config not found); run `clustermesh --context east --namespace mesh enable --cluster-name NAME --cluster-id ID` first"
    );
    // --wait does not wait for a mesh that is not there.
    let r = run_cli(
        &cfg,
        &[
            "--context",
            "east",
            "status",
            "--wait",
            "--wait-duration",
            "10m",
        ],
    )
    .await;
    assert!(!r.ok);
    assert!(
        r.stderr
            .trim_end()
            .starts_with("error: the mesh is not enabled in namespace kube-system of context east"),
        "{}",
        r.stderr
    );
    assert!(east.writes().is_empty());
}

#[tokio::test]
async fn a_statefulset_apiserver_and_an_agent_answering_garbage_are_reported() {
    let m = connected_mesh().await;
    healthy(&m);
    // Raft with three replicas runs as a StatefulSet.
    m.east.remove(&format!(
        "/apis/apps/v1/namespaces/{NS}/deployments/clustermesh-apiserver"
    ));
    m.east.insert(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "clustermesh-apiserver", "namespace": NS},
        "spec": {"replicas": 3, "serviceName": "clustermesh-apiserver-peers",
                 "selector": {"matchLabels": {"app": "x"}},
                 "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "a", "image": "x"}]}}},
        "status": {"replicas": 3, "readyReplicas": 2},
    }));
    // An agent answering something that is not its status (e.g. an older agent).
    m.east
        .set_pod_proxy(NS, "clustermesh-agent-aaaaa", Some(9963), |_| {
            ProxyResponse::text(200, "hello")
        });
    let r = m.status(&["-o", "json"]).await;
    assert!(!r.ok);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["apiserver"]["kind"], "StatefulSet");
    assert_eq!(
        (
            v["apiserver"]["ready"].as_i64(),
            v["apiserver"]["desired"].as_i64()
        ),
        (Some(2), Some(3))
    );
    let a = &v["agent_pods"][0];
    assert_eq!(a["pod"], "clustermesh-agent-aaaaa");
    assert!(a["status"].is_null());
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid /v1/status answer ("),
        "{a}"
    );
    let err = r.stderr.trim_end();
    assert!(
        err.starts_with(
            "error: the mesh is not fully up: mesh API server StatefulSet clustermesh-apiserver 2/3 ready, agent clustermesh-agent-aaaaa (node n1) unreachable: invalid /v1/status answer ("
        ),
        "{err}"
    );
}
