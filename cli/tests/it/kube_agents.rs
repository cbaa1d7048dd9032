//! Kubernetes-mode `service list`, `bpf lb list`, `identity list`, `endpoint list` and
//! `policy get`, through the real binary against a fake API server: every agent pod (or
//! the one on `--node`) is asked through the pod proxy. The fake agents answer with the
//! admin API's own types serialized, the ones the agent serves
//! (`clustermesh_api::admin::ServiceStatus`, `clustermesh_api::admin::BpfDump`, the
//! `clustermesh_api::admin_policy` bodies), and an agent running `--datapath record`
//! answers `/v1/bpf/lb` with the agent's real 503.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::support;
use clustermesh_api::admin::{
    BackendDump, BackendStatus, BpfDump, ServiceDump, ServiceStatus, SlabDump,
};
use clustermesh_test_support::fake_kube::{kubeconfig, FakeKube, ProxyResponse};
use serde_json::{json, Value};
use support::policy::{CLIENT_ID, WEB_ID, WEST_DB_ID};
use support::{run_cli, CliRun};

const NS: &str = "kube-system";
const PORT: u16 = 9963;
const AAAAA: &str = "clustermesh-agent-aaaaa";
const BBBBB: &str = "clustermesh-agent-bbbbb";

struct Mesh {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    east: FakeKube,
}

impl Mesh {
    async fn cli(&self, args: &[&str]) -> CliRun {
        let mut all = vec!["--context", "east"];
        all.extend_from_slice(args);
        run_cli(&self.cfg, &all).await
    }

    /// Paths inside the pods asked through the proxy, as `pod:path`, sorted (the agents
    /// are asked concurrently, so the order they were asked in is not fixed).
    fn proxied(&self) -> Vec<String> {
        let mut asked: Vec<String> = self
            .east
            .requests()
            .into_iter()
            .filter_map(|r| {
                let rest = r
                    .path
                    .strip_prefix(&format!("/api/v1/namespaces/{NS}/pods/"))?;
                let (pod, path) = rest.split_once(&format!(":{PORT}/proxy"))?;
                Some(format!("{pod}:{path}"))
            })
            .collect();
        asked.sort();
        asked
    }
}

/// East enabled with the real `enable` (so the DaemonSet, its selector and the agents'
/// HTTP port come from the chart), with agent pods aaaaa on n1 and bbbbb on n2.
async fn mesh() -> Mesh {
    let east = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(dir.path(), &[("east", &east)]);
    let m = Mesh {
        _dir: dir,
        cfg,
        east,
    };
    let r = m
        .cli(&[
            "enable",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--service-type",
            "NodePort",
        ])
        .await;
    assert!(r.ok, "enable: {}", r.stderr);
    let ds = m
        .east
        .object(&format!(
            "/apis/apps/v1/namespaces/{NS}/daemonsets/clustermesh-agent"
        ))
        .unwrap();
    let labels = ds["spec"]["template"]["metadata"]["labels"].clone();
    for (pod, node) in [(AAAAA, "n1"), (BBBBB, "n2")] {
        m.east.insert(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.11"},
        }));
    }
    m
}

/// The echo service as an agent on `node` reports it: one local and one remote backend.
fn services_body(node_backend: &str) -> Value {
    serde_json::to_value(vec![ServiceStatus {
        namespace: "default".into(),
        name: "echo".into(),
        port_name: "http".into(),
        frontends: vec!["10.96.0.20:80/TCP".into()],
        affinity: "local".into(),
        global: true,
        shared: true,
        active_tier: "cluster".into(),
        table_size: 251,
        backends: vec![
            BackendStatus {
                cluster: "east".into(),
                address: format!("{node_backend}:8080"),
                state: "active".into(),
                tier: "cluster".into(),
                weight: 1,
                slots: 251,
            },
            BackendStatus {
                cluster: "west".into(),
                address: "10.2.0.9:8080".into(),
                state: "active".into(),
                tier: "remote".into(),
                weight: 1,
                slots: 0,
            },
        ],
    }])
    .unwrap()
}

/// What an agent with the eBPF datapath dumps for the echo service.
fn bpf_body() -> Value {
    serde_json::to_value(BpfDump {
        pin_dir: "/sys/fs/bpf/clustermesh".into(),
        cgroup: "/sys/fs/cgroup".into(),
        services: vec![ServiceDump {
            id: 3,
            name: "default/echo/http".into(),
            frontends: vec!["10.96.0.20:80/TCP".into()],
            table_offset: 1024,
            table_size: 251,
            backends: vec![5],
            slots: BTreeMap::from([(5, 251)]),
            table: None,
        }],
        backends: vec![BackendDump {
            id: 5,
            address: "10.1.0.7:8080".into(),
            protocol: "TCP".into(),
            cluster: "east".into(),
            state: "active".into(),
            services: 1,
        }],
        slab: SlabDump {
            capacity: 65536,
            used: 256,
            largest_free: 65280,
        },
        counters: BTreeMap::new(),
    })
    .unwrap()
}

/// Agent `pod` answering `/v1/services` with `services`, and `/v1/bpf/lb` with `bpf`
/// (None: an agent running `--datapath record`, which answers what the agent's admin
/// router answers).
fn agent(fake: &FakeKube, pod: &str, services: Value, bpf: Option<Value>) {
    fake.set_pod_proxy(NS, pod, Some(PORT), move |req| match req.path.as_str() {
        "/v1/services" => ProxyResponse::json(&services),
        "/v1/bpf/lb" => match &bpf {
            Some(dump) => ProxyResponse::json(dump),
            None => ProxyResponse::text(503, "this agent runs without the eBPF datapath"),
        },
        _ => ProxyResponse::text(404, "Not Found"),
    });
}

fn both_agents(m: &Mesh) {
    agent(&m.east, AAAAA, services_body("10.1.0.7"), Some(bpf_body()));
    agent(&m.east, BBBBB, services_body("10.1.0.8"), None);
}

fn one_error_line(r: &CliRun) -> &str {
    assert!(!r.ok, "expected a failure, got: {}", r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    r.stderr.trim_end()
}

#[tokio::test]
async fn service_list_asks_every_agent_and_prints_one_block_per_node() {
    let m = mesh().await;
    both_agents(&m);
    m.east.clear_requests();
    let r = m.cli(&["service", "list"]).await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let blocks: Vec<&str> = r.stdout.split("# from agent ").skip(1).collect();
    assert_eq!(blocks.len(), 2, "{}", r.stdout);
    for (block, pod, node, backend) in [
        (
            blocks[0],
            AAAAA,
            "n1",
            "east/10.1.0.7:8080(active,cluster,w1)",
        ),
        (
            blocks[1],
            BBBBB,
            "n2",
            "east/10.1.0.8:8080(active,cluster,w1)",
        ),
    ] {
        let lines: Vec<&str> = block.lines().collect();
        assert_eq!(lines[0], format!("pod {pod} (node {node})"));
        let row: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "default/echo",
                "http",
                "10.96.0.20:80/TCP",
                "yes",
                "yes",
                "local",
                "cluster",
                backend,
                "west/10.2.0.9:8080(active,remote,w1)"
            ]
        );
    }
    assert_eq!(
        m.proxied(),
        [
            format!("{AAAAA}:/v1/services"),
            format!("{BBBBB}:/v1/services")
        ]
    );
    assert!(m.east.writes().is_empty(), "{:?}", m.east.writes());

    let r = m.cli(&["-o", "json", "service", "list"]).await;
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["pod"], AAAAA);
    assert_eq!(v[0]["node"], "n1");
    assert_eq!(v[1]["node"], "n2");
    assert_eq!(v[1]["answer"][0]["backends"][0]["address"], "10.1.0.8:8080");
    assert_eq!(v[1]["answer"][0]["port_name"], "http");
}

#[tokio::test]
async fn node_picks_one_agent_and_an_unknown_node_lists_the_known_ones() {
    let m = mesh().await;
    both_agents(&m);
    m.east.clear_requests();
    let r = m.cli(&["service", "list", "--node", "n2"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with(&format!("# from agent pod {BBBBB} (node n2)\n")),
        "{}",
        r.stdout
    );
    assert_eq!(r.stdout.matches("# from agent").count(), 1, "{}", r.stdout);
    assert_eq!(m.proxied(), [format!("{BBBBB}:/v1/services")]);

    let line = one_error_line(&m.cli(&["bpf", "lb", "list", "--node", "n9"]).await).to_string();
    assert_eq!(
        line,
        "error: no agent pod runs on node n9 in namespace kube-system of context east (agents run on: n1, n2); pass one of those to --node"
    );
    let line = one_error_line(
        &m.cli(&["service", "list", "--agent-socket", "/run/a.sock"])
            .await,
    )
    .to_string();
    assert!(
        line.contains("--agent-socket is for standalone mode"),
        "{line}"
    );
}

#[tokio::test]
async fn an_unreachable_agent_is_listed_with_the_reason_and_fails_the_command() {
    let m = mesh().await;
    both_agents(&m);
    m.east.clear_pod_proxy(NS, BBBBB, Some(PORT));
    let r = m.cli(&["service", "list"]).await;
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    // The answering agent is still shown, the other is listed with the proxy's reason.
    assert!(
        r.stdout
            .starts_with(&format!("# from agent pod {AAAAA} (node n1)\n")),
        "{}",
        r.stdout
    );
    let unreachable = format!(
        "# agent pod {BBBBB} (node n2): unreachable: error trying to reach service: dial tcp 10.0.0.11:9963: connect: connection refused"
    );
    assert!(
        r.stdout.lines().any(|l| l.starts_with(&unreachable)),
        "{}",
        r.stdout
    );
    let line = one_error_line(&r);
    assert!(
        line.starts_with(&format!(
            "error: 1 of 2 agents in context east gave no service list: {BBBBB} (node n2): unreachable: error trying to reach service"
        )),
        "{line}"
    );

    let r = m.cli(&["-o", "json", "service", "list"]).await;
    assert!(!r.ok);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v[1].get("answer").is_none(), "{v}");
    assert!(
        v[1]["error"]
            .as_str()
            .unwrap()
            .contains("connection refused"),
        "{v}"
    );
}

#[tokio::test]
async fn bpf_lb_list_shows_the_programmed_tables_and_a_record_datapath_says_so() {
    let m = mesh().await;
    both_agents(&m);
    let r = m.cli(&["bpf", "lb", "list", "--node", "n1"]).await;
    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], format!("# from agent pod {AAAAA} (node n1)"));
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        row,
        [
            "10.96.0.20:80/TCP",
            "3",
            "1024",
            "251",
            "#5",
            "10.1.0.7:8080",
            "east",
            "active",
            "251"
        ]
    );

    // The agent on n2 runs --datapath record: its own answer is the one line.
    let r = m.cli(&["bpf", "lb", "list", "--node", "n2"]).await;
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert_eq!(
        one_error_line(&r),
        format!("error: 1 of 1 agents in context east gave no datapath dump: {BBBBB} (node n2): the agent answered HTTP 503: this agent runs without the eBPF datapath")
    );

    // Every agent: n1's table, n2 listed, non-zero exit.
    let r = m.cli(&["bpf", "lb", "list"]).await;
    assert!(!r.ok);
    assert!(r.stdout.contains("10.96.0.20:80/TCP"), "{}", r.stdout);
    assert!(
        r.stdout.lines().any(|l| l
            == format!("# agent pod {BBBBB} (node n2): the agent answered HTTP 503: this agent runs without the eBPF datapath")),
        "{}",
        r.stdout
    );

    let r = m
        .cli(&["-o", "json", "bpf", "lb", "list", "--node", "n1"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["answer"], bpf_body());
}

#[tokio::test]
async fn without_the_mesh_the_verbs_say_to_enable_it() {
    let east = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(dir.path(), &[("east", &east)]);
    let r = run_cli(&cfg, &["--context", "east", "service", "list"]).await;
    let line = one_error_line(&r);
    assert!(
        line.starts_with("error: the mesh is not enabled in namespace kube-system of context east"),
        "{line}"
    );
}

/// Agent `pod` answering the policy routes: the shared identities and endpoints, and its
/// node's policy report.
fn policy_agent(fake: &FakeKube, pod: &str, report: Value) {
    let (identities, endpoints) = (support::policy::identities(), support::policy::endpoints());
    fake.set_pod_proxy(NS, pod, Some(PORT), move |req| match req.path.as_str() {
        "/v1/identities" => ProxyResponse::json(&identities),
        "/v1/endpoints" => ProxyResponse::json(&endpoints),
        "/v1/policy" => ProxyResponse::json(&report),
        _ => ProxyResponse::text(404, "Not Found"),
    });
}

fn both_policy_agents(m: &Mesh) {
    policy_agent(&m.east, AAAAA, support::policy::policy_n1());
    policy_agent(&m.east, BBBBB, support::policy::policy_n2());
}

fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test]
async fn identity_and_endpoint_list_print_one_sorted_table_per_agent() {
    let m = mesh().await;
    both_policy_agents(&m);
    m.east.clear_requests();
    let r = m.cli(&["identity", "list"]).await;
    assert!(r.ok, "{}\n{}", r.stdout, r.stderr);
    let blocks: Vec<&str> = r.stdout.split("# from agent ").skip(1).collect();
    assert_eq!(blocks.len(), 2, "{}", r.stdout);
    for (block, pod, node) in [(blocks[0], AAAAA, "n1"), (blocks[1], BBBBB, "n2")] {
        let lines: Vec<&str> = block.lines().collect();
        assert_eq!(lines[0], format!("pod {pod} (node {node})"));
        assert_eq!(words(lines[1]), ["IDENTITY", "CLUSTER", "LABELS"]);
        let ids: Vec<String> = lines[2..].iter().map(|l| words(l)[0].clone()).collect();
        assert_eq!(
            ids,
            [CLIENT_ID, WEB_ID, WEST_DB_ID].map(|i| i.to_string()),
            "{block}"
        );
        assert_eq!(
            words(lines[4]),
            [
                WEST_DB_ID.to_string().as_str(),
                "west",
                "app=db,io.kubernetes.pod.namespace=default"
            ]
        );
    }
    assert_eq!(
        m.proxied(),
        [
            format!("{AAAAA}:/v1/identities"),
            format!("{BBBBB}:/v1/identities")
        ]
    );

    let r = m.cli(&["endpoint", "list", "--node", "n2"]).await;
    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], format!("# from agent pod {BBBBB} (node n2)"));
    let ips: Vec<String> = lines[2..].iter().map(|l| words(l)[0].clone()).collect();
    assert_eq!(ips, ["10.1.0.9", "10.1.0.10", "10.2.0.5"]);
    assert_eq!(words(lines[2])[3], "default/client");

    let r = m.cli(&["-o", "json", "endpoint", "list"]).await;
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["pod"], AAAAA);
    assert_eq!(v[0]["answer"][0]["ip"], "10.1.0.9");
    assert_eq!(v[1]["answer"][2]["cluster"], "west");
}

#[tokio::test]
async fn policy_get_pod_shows_only_the_agent_that_runs_it() {
    let m = mesh().await;
    both_policy_agents(&m);
    let r = m.cli(&["policy", "get"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout.matches("# from agent").count(), 2, "{}", r.stdout);
    assert!(
        r.stdout.contains("node n2; a peer selector without io.cilium.k8s.policy.cluster selects every connected cluster\n"),
        "{}",
        r.stdout
    );

    let r = m.cli(&["policy", "get", "--pod", "default/db-0"]).await;
    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], format!("# from agent pod {BBBBB} (node n2)"));
    assert_eq!(
        words(lines[3]),
        [
            "default/db-0",
            "10.1.1.4",
            "16777400",
            "open",
            "isolated/0",
            "no",
            "NetworkPolicy",
            "default/db-egress"
        ]
    );
    assert_eq!(lines[4], "  egress  allow nothing");
    assert!(!r.stdout.contains(AAAAA), "{}", r.stdout);

    let r = m
        .cli(&["-o", "json", "policy", "get", "--pod", "default/web"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["pod"], AAAAA);
    assert_eq!(v[0]["answer"]["endpoints"][0]["pod"], "web");
    assert_eq!(
        v[0]["answer"]["endpoints"][0]["ingress"][0]["cluster"],
        "east"
    );

    // Found on n1 while n2's agent is down: the pod runs on one node, so that is success.
    m.east.clear_pod_proxy(NS, BBBBB, Some(PORT));
    let r = m.cli(&["policy", "get", "--pod", "default/web"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r
        .stdout
        .starts_with(&format!("# from agent pod {AAAAA} (node n1)\n")));
}

#[tokio::test]
async fn policy_get_for_an_unknown_pod_names_the_nodes_asked_and_the_silent_agents() {
    let m = mesh().await;
    both_policy_agents(&m);
    let r = m.cli(&["policy", "get", "--pod", "default/ghost"]).await;
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        one_error_line(&r).starts_with(
            "error: pod default/ghost is not a local endpoint of any of the 2 agents of context east (answering on: n1, n2); an agent lists only"
        ),
        "{}",
        r.stderr
    );
    m.east.clear_pod_proxy(NS, BBBBB, Some(PORT));
    let r = m.cli(&["policy", "get", "--pod", "default/db-0"]).await;
    let line = one_error_line(&r);
    assert!(
        line.starts_with(&format!(
            "error: pod default/db-0 is not a local endpoint of any of the 2 agents of context east (answering on: n1); without an answer: {BBBBB} (node n2): unreachable"
        )),
        "{line}"
    );

    // A malformed --pod is refused before the API server is asked anything.
    m.east.clear_requests();
    let line = one_error_line(&m.cli(&["policy", "get", "--pod", "ghost"]).await).to_string();
    assert_eq!(
        line,
        "error: --pod takes NAMESPACE/NAME, e.g. --pod default/web; got \"ghost\": no '/'"
    );
    assert!(m.east.requests().is_empty(), "{:?}", m.east.requests());
    let line = one_error_line(
        &m.cli(&["identity", "list", "--agent-socket", "/run/a.sock"])
            .await,
    )
    .to_string();
    assert!(
        line.contains("--agent-socket is for standalone mode"),
        "{line}"
    );
}
