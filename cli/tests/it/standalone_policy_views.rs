//! Standalone `identity list`, `endpoint list` and `policy get` against a stand-in agent
//! admin socket that answers the policy routes with the admin API's own types
//! ([`crate::support::policy`]), as `clustermesh-agent --admin-socket` does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::support::policy::{self, CLIENT_ID, WEB_ID, WEST_DB_ID};

/// A stand-in agent: `GET path` answers the (status, body) given for it, 404 otherwise.
/// Dropping it stops it.
struct FakeAgent {
    _rt: tokio::runtime::Runtime,
}

fn fake_agent(socket: &Path, routes: BTreeMap<&'static str, (u16, String)>) -> FakeAgent {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(socket) })
        .unwrap();
    let routes = std::sync::Arc::new(routes);
    rt.spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let routes = std::sync::Arc::clone(&routes);
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let path = text.split(' ').nth(1).unwrap_or_default();
                let (status, body) = routes
                    .get(path)
                    .cloned()
                    .unwrap_or((404, "Not Found".into()));
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    FakeAgent { _rt: rt }
}

/// An agent with policy on, answering for node n1.
fn policy_agent(socket: &Path) -> FakeAgent {
    fake_agent(
        socket,
        BTreeMap::from([
            ("/v1/identities", (200, policy::identities().to_string())),
            ("/v1/endpoints", (200, policy::endpoints().to_string())),
            ("/v1/policy", (200, policy::policy_n1().to_string())),
        ]),
    )
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn cm(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_clustermesh"))
        .args(args)
        .env_remove("CLUSTERMESH_STATE_DIR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn one_error_line(r: &Run) -> String {
    assert!(!r.ok, "expected a failure, got: {}", r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    r.stderr.trim_end().to_owned()
}

/// The table's rows, split on whitespace, without the `# from agent` line.
fn rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn sock(dir: &Path) -> String {
    dir.join("agent.sock").to_str().unwrap().to_owned()
}

#[test]
fn identity_list_is_sorted_by_number_with_compact_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sock(tmp.path());
    let _agent = policy_agent(Path::new(&s));
    let r = cm(&["identity", "list", "--agent-socket", &s]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        r.stdout.lines().next().unwrap(),
        format!("# from agent {s}")
    );
    assert_eq!(
        rows(&r.stdout),
        [
            vec!["IDENTITY", "CLUSTER", "LABELS"],
            // The cluster label is the CLUSTER column: not repeated.
            vec![
                &CLIENT_ID.to_string(),
                "east",
                "app=client,io.kubernetes.pod.namespace=default"
            ],
            vec![
                &WEB_ID.to_string(),
                "east",
                "app=web,io.kubernetes.pod.namespace=default"
            ],
            vec![
                &WEST_DB_ID.to_string(),
                "west",
                "app=db,io.kubernetes.pod.namespace=default"
            ],
        ]
    );

    let r = cm(&["-o", "json", "identity", "list", "--agent-socket", &s]);
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let ids: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            u64::from(CLIENT_ID),
            u64::from(WEB_ID),
            u64::from(WEST_DB_ID)
        ]
    );
    // JSON keeps every label, the cluster label included.
    assert_eq!(v[2]["labels"]["io.cilium.k8s.policy.cluster"], "west");
    assert_eq!(v[2]["cluster"], "west");
}

#[test]
fn endpoint_list_is_sorted_by_address_with_pod_and_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sock(tmp.path());
    let _agent = policy_agent(Path::new(&s));
    let r = cm(&["endpoint", "list", "--agent-socket", &s]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        rows(&r.stdout),
        [
            vec!["IP", "CLUSTER", "IDENTITY", "POD", "NODE", "LABELS"],
            vec![
                "10.1.0.9",
                "east",
                &CLIENT_ID.to_string(),
                "default/client",
                "n1",
                "app=client,io.kubernetes.pod.namespace=default"
            ],
            vec![
                "10.1.0.10",
                "east",
                &WEB_ID.to_string(),
                "default/web",
                "n1",
                "app=web,io.kubernetes.pod.namespace=default"
            ],
            vec![
                "10.2.0.5",
                "west",
                &WEST_DB_ID.to_string(),
                "default/db",
                "w1",
                "app=db,io.kubernetes.pod.namespace=default"
            ],
        ]
    );
    let r = cm(&["-o", "json", "endpoint", "list", "--agent-socket", &s]);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["ip"], "10.1.0.9");
    assert_eq!(v[0]["pod"], "client");
    assert_eq!(v[2]["cluster"], "west");
    assert_eq!(v[2]["identity"], WEST_DB_ID);
}

#[test]
fn policy_get_shows_each_pod_its_isolation_rules_policies_and_counters() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sock(tmp.path());
    let _agent = policy_agent(Path::new(&s));
    let r = cm(&["policy", "get", "--agent-socket", &s]);
    assert!(r.ok, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let want_head = [
        format!("# from agent {s}"),
        "node n1; a peer selector without io.cilium.k8s.policy.cluster selects the local cluster only".to_owned(),
    ];
    assert_eq!(lines[..2], want_head);
    let words = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        words(lines[2]),
        ["POD", "IP", "IDENTITY", "INGRESS", "EGRESS", "ENFORCED", "POLICIES"]
    );
    // Sorted by pod: client (open both ways) before web.
    assert_eq!(
        words(lines[3]),
        [
            "default/client",
            "10.1.0.9",
            &CLIENT_ID.to_string(),
            "open",
            "open",
            "yes",
            "-"
        ]
    );
    assert_eq!(
        words(lines[4]),
        [
            "default/web",
            "10.1.0.10",
            &WEB_ID.to_string(),
            "isolated/2",
            "open",
            "yes",
            "NetworkPolicy",
            "default/web-ingress"
        ]
    );
    assert_eq!(
        lines[5],
        format!("  ingress allow from identity {CLIENT_ID} cluster east labels app=client,io.kubernetes.pod.namespace=default on TCP/8080")
    );
    assert_eq!(
        lines[6],
        "  ingress allow from cidr 10.0.0.0/8 except 10.1.0.0/16 on any port"
    );
    // Every policy of the cluster, sorted by name, a refused one with its reason.
    assert_eq!(words(lines[7]), ["POLICY", "IN", "FORCE", "ERROR"]);
    assert!(
        lines[8].starts_with("CiliumNetworkPolicy default/broken")
            && lines[8].contains(" no ")
            && lines[8].ends_with("spec.ingress[0].toPorts: port 70000 is out of range"),
        "{}",
        lines[8]
    );
    assert!(
        lines[9].starts_with("NetworkPolicy default/db-egress"),
        "{}",
        lines[9]
    );
    assert!(
        lines[10].starts_with("NetworkPolicy default/web-ingress"),
        "{}",
        lines[10]
    );
    assert_eq!(
        lines[11],
        "verdicts (node n1, all pods): egress allowed 11 denied 1, ingress allowed 5 denied 2, passed while syncing 0, replies passed 7"
    );
    assert_eq!(lines.len(), 12, "{}", r.stdout);
}

#[test]
fn policy_get_pod_narrows_to_one_pod_and_its_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sock(tmp.path());
    let _agent = policy_agent(Path::new(&s));
    let r = cm(&[
        "policy",
        "get",
        "--agent-socket",
        &s,
        "--pod",
        "default/web",
    ]);
    assert!(r.ok, "{}", r.stderr);
    assert!(!r.stdout.contains("default/client"), "{}", r.stdout);
    assert!(r.stdout.contains("\ndefault/web "), "{}", r.stdout);
    assert!(!r.stdout.contains("default/broken"), "{}", r.stdout);
    assert!(
        r.stdout.contains("NetworkPolicy default/web-ingress  yes"),
        "{}",
        r.stdout
    );

    let r = cm(&[
        "-o",
        "json",
        "policy",
        "get",
        "--agent-socket",
        &s,
        "--pod",
        "default/web",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["node"], "n1");
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 1);
    let web = &v["endpoints"][0];
    assert_eq!(web["pod"], "web");
    assert!(web["egress"].is_null(), "{web}");
    assert_eq!(web["ingress"][0]["identity"], CLIENT_ID);
    assert_eq!(web["ingress"][0]["protocol"], "TCP");
    assert_eq!(web["ingress"][0]["ports"], "8080");
    assert_eq!(web["ingress"][1]["cidr"], "10.0.0.0/8 except 10.1.0.0/16");
    assert_eq!(v["policies"].as_array().unwrap().len(), 1);
    assert_eq!(v["counters"]["ingress_denied"], 2);
}

#[test]
fn policy_get_for_a_pod_the_agent_does_not_have_says_so_and_names_its_pods() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sock(tmp.path());
    let _agent = policy_agent(Path::new(&s));
    let r = cm(&[
        "policy",
        "get",
        "--agent-socket",
        &s,
        "--pod",
        "default/ghost",
    ]);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert_eq!(
        one_error_line(&r),
        format!("error: pod default/ghost is not a local endpoint of the agent at {s} (node n1; its local pods: default/client, default/web); an agent lists only its own cluster's pods on its own node that have an address (`clustermesh endpoint list` shows every pod address it knows)")
    );
}

#[test]
fn a_malformed_pod_is_one_line_naming_the_flag_before_any_agent_is_asked() {
    // No state directory and no agent: the value is refused first.
    for (bad, why) in [
        ("web", "no '/'"),
        ("default/web/x", "more than one '/'"),
        ("Default/web", "the namespace must be"),
    ] {
        let r = cm(&["policy", "get", "--pod", bad]);
        let line = one_error_line(&r);
        assert!(
            line.starts_with(&format!(
                "error: --pod takes NAMESPACE/NAME, e.g. --pod default/web; got {bad:?}: "
            )),
            "{line}"
        );
        assert!(line.contains(why), "{line}");
    }
}

#[test]
fn an_agent_without_policy_and_the_other_modes_flag_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let s = sock(tmp.path());
    let _agent = fake_agent(
        Path::new(&s),
        BTreeMap::from([(
            "/v1/identities",
            (
                503,
                "this agent does not enforce policy (--policy=false)".to_owned(),
            ),
        )]),
    );
    let line = one_error_line(&cm(&["identity", "list", "--agent-socket", &s]));
    assert_eq!(
        line,
        format!("error: agent at {s} refused /v1/identities: HTTP 503: this agent does not enforce policy (--policy=false)")
    );
    for verb in [
        &["identity", "list"][..],
        &["endpoint", "list"],
        &["policy", "get"],
    ] {
        let mut args = verb.to_vec();
        args.extend(["--agent-socket", &s, "--node", "n1"]);
        let line = one_error_line(&cm(&args));
        assert!(
            line.starts_with("error: --node picks an agent pod in Kubernetes mode"),
            "{verb:?}: {line}"
        );
    }
}
