//! Kubernetes-mode `enable`, `disable`, `connect` and `disconnect`, through the real
//! binary against two (or three) fake API servers, each one "cluster".
//!
//! What a user would notice is asserted on the stored objects: the Secrets hold a CA and
//! leaves that parse and chain, the chart's workloads exist with the right arguments,
//! each agent configuration (parsed with the agent's own `AgentConfig`) lists the peer
//! with its address, ID and CA, and every refused or failed command leaves both
//! clusters' stored objects as they were.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::support;
use clustermesh_api::agent_config::AgentConfig;
use clustermesh_certs::inspect::CertInfo;
use clustermesh_test_support::fake_kube::{kubeconfig, FakeKube};
use serde_json::{json, Value};
use support::{run_cli, CliRun};

const NS: &str = "kube-system";

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

fn cm_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/configmaps/{name}")
}

fn service_path() -> String {
    format!("/api/v1/namespaces/{NS}/services/clustermesh-apiserver")
}

/// Standard base64 (RFC 4648 §4) decoding of Secret data.
fn unbase64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

fn secret_text(fake: &FakeKube, name: &str, key: &str) -> String {
    let s = fake
        .object(&secret_path(name))
        .unwrap_or_else(|| panic!("Secret {name} exists"));
    let b64 = s["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {name} has {key}: {s}"));
    String::from_utf8(unbase64(b64)).unwrap()
}

/// The mesh CA certificate (PEM) of `fake`'s cluster.
fn ca_pem(fake: &FakeKube) -> String {
    secret_text(fake, "clustermesh-ca", "tls.crt")
}

/// The CA bundle (PEM) `fake`'s mesh API server trusts agents with.
fn ca_bundle(fake: &FakeKube) -> String {
    secret_text(fake, "clustermesh-ca-bundle", "ca-bundle.crt")
}

/// The mesh API server's certificate in `fake`'s cluster, parsed.
fn server_cert(fake: &FakeKube) -> CertInfo {
    cert_info(&secret_text(
        fake,
        "clustermesh-apiserver-server",
        "tls.crt",
    ))
}

/// The mesh settings ConfigMap clustermesh-config.
fn settings(fake: &FakeKube) -> Value {
    fake.object(&cm_path("clustermesh-config")).unwrap()
}

/// The mesh API server's Service.
fn apiserver_service(fake: &FakeKube) -> Value {
    fake.object(&service_path()).unwrap()
}

fn cert_info(pem: &str) -> CertInfo {
    let der = clustermesh_certs::pem::parse_certs(pem.as_bytes()).unwrap();
    CertInfo::from_der(der[0].as_ref()).unwrap()
}

fn agent_config(fake: &FakeKube) -> (AgentConfig, Value) {
    let cm = fake.object(&cm_path("clustermesh-agent-config")).unwrap();
    let text = cm["data"]["agent.yaml"].as_str().unwrap();
    (
        AgentConfig::parse(Path::new("agent.yaml"), text).unwrap(),
        cm["data"].clone(),
    )
}

/// Stored objects without the fields every write changes (resourceVersion, managers), so
/// "unchanged" compares what the objects say.
fn content(fake: &FakeKube) -> BTreeMap<String, Value> {
    fake.snapshot()
        .into_iter()
        .map(|(path, mut v)| {
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("resourceVersion");
                m.remove("managedFields");
                m.remove("generation");
            }
            (path, v)
        })
        .collect()
}

/// Asserts that two [`content`] snapshots are equal, naming only the objects that differ.
#[track_caller]
fn assert_unchanged(before: &BTreeMap<String, Value>, after: &BTreeMap<String, Value>) {
    let paths: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let changed: Vec<&String> = paths
        .into_iter()
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    assert!(changed.is_empty(), "objects changed: {changed:?}");
}

struct Mesh {
    _dir: tempfile::TempDir,
    cfg: PathBuf,
    east: FakeKube,
    west: FakeKube,
}

async fn mesh() -> Mesh {
    let east = FakeKube::start().await;
    let west = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(
        dir.path(),
        &[("east", &east), ("west", &west), ("east-again", &east)],
    );
    Mesh {
        _dir: dir,
        cfg,
        east,
        west,
    }
}

impl Mesh {
    async fn cli(&self, args: &[&str]) -> CliRun {
        run_cli(&self.cfg, args).await
    }

    async fn enable(&self, context: &str, name: &str, id: &str, service_type: &str) -> CliRun {
        self.enable_with(context, name, id, &["--service-type", service_type])
            .await
    }

    /// `enable` in `context` for cluster `name`/`id`, with `extra` arguments after it.
    async fn enable_with(&self, context: &str, name: &str, id: &str, extra: &[&str]) -> CliRun {
        self.cli(&enable_args(context, &[], name, id, extra)).await
    }

    /// [`Mesh::enable_with`] with `-o json`.
    async fn enable_json(&self, context: &str, name: &str, id: &str, extra: &[&str]) -> CliRun {
        self.cli(&enable_args(context, &["-o", "json"], name, id, extra))
            .await
    }

    /// Enables east (ID 1, LoadBalancer, with an ingress address) and west (ID 2,
    /// `west_service_type`).
    async fn enable_both(&self, west_service_type: &str) {
        self.enabled("east", "east", "1", "LoadBalancer").await;
        self.enabled("west", "west", "2", west_service_type).await;
        east_load_balancer(&self.east);
    }

    async fn enabled(&self, context: &str, name: &str, id: &str, service_type: &str) {
        let r = self.enable(context, name, id, service_type).await;
        assert!(r.ok, "enable {context}: {}", r.stderr);
    }

    async fn connect(&self, a: &str, b: &str) -> CliRun {
        self.cli(&["--context", a, "--destination-context", b, "connect"])
            .await
    }

    async fn disconnect(&self, a: &str, b: &str) -> CliRun {
        self.cli(&["--context", a, "--destination-context", b, "disconnect"])
            .await
    }

    /// `disconnect` on `context`'s side only, of the peer named `cluster`.
    async fn disconnect_cluster(&self, context: &str, cluster: &str) -> CliRun {
        self.cli(&[
            "--context",
            context,
            "disconnect",
            "--destination-cluster",
            cluster,
        ])
        .await
    }

    /// What east and west store now (see [`content`]).
    fn contents(&self) -> [BTreeMap<String, Value>; 2] {
        [content(&self.east), content(&self.west)]
    }

    /// Asserts that neither east nor west changed since `before` ([`Mesh::contents`]).
    #[track_caller]
    fn assert_both_unchanged(&self, before: &[BTreeMap<String, Value>; 2]) {
        assert_unchanged(&before[0], &content(&self.east));
        assert_unchanged(&before[1], &content(&self.west));
    }
}

/// `--context CONTEXT GLOBAL... enable --cluster-name NAME --cluster-id ID EXTRA...`
fn enable_args<'a>(
    context: &'a str,
    global: &[&'a str],
    name: &'a str,
    id: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["--context", context];
    args.extend_from_slice(global);
    args.extend(["enable", "--cluster-name", name, "--cluster-id", id]);
    args.extend_from_slice(extra);
    args
}

/// Gives east's LoadBalancer Service an ingress address.
fn east_load_balancer(fake: &FakeKube) {
    fake.set_status(
        &service_path(),
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}}),
    );
}

/// Two nodes for west: a ready one and a not-ready one (listed second).
fn west_nodes(fake: &FakeKube) {
    for (name, ip, ready) in [
        ("w-b", "198.51.100.7", "True"),
        ("w-a", "198.51.100.6", "False"),
    ] {
        fake.insert(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {
                "addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": ready}],
            },
        }));
    }
}

fn one_error_line(r: &CliRun) -> &str {
    assert!(!r.ok, "expected a failure, got: {}", r.stdout);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    r.stderr.trim_end()
}

#[tokio::test]
async fn enable_stores_certificates_settings_and_applies_the_chart() {
    let m = mesh().await;
    let r = m
        .enable_json("east", "east", "1", &["--service-type", "LoadBalancer"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["cluster"], "east");
    assert_eq!(report["ca_created"], true);
    assert_eq!(report["upgraded"], false);

    // CA and leaves: parseable, chained, with the cluster's identity.
    let ca = cert_info(&ca_pem(&m.east));
    assert!(ca.is_ca);
    let ca_secret = m.east.object(&secret_path("clustermesh-ca")).unwrap();
    assert_eq!(ca_secret["type"], "kubernetes.io/tls");
    let server = server_cert(&m.east);
    assert_eq!(server.issuer, ca.subject);
    assert_eq!(
        server.identity.unwrap().to_string(),
        "spiffe://clustermesh.local/cluster/east"
    );
    assert!(server
        .dns_names
        .contains(&"clustermesh-apiserver.kube-system.svc".to_string()));
    let client = cert_info(&secret_text(&m.east, "clustermesh-agent-client", "tls.crt"));
    assert_eq!(client.issuer, ca.subject);
    assert_eq!(
        client.identity.clone().unwrap().to_string(),
        "spiffe://clustermesh.local/cluster/east/agent"
    );
    let admin = cert_info(&secret_text(
        &m.east,
        "clustermesh-apiserver-admin",
        "tls.crt",
    ));
    assert_eq!(
        admin.identity.unwrap().to_string(),
        "spiffe://clustermesh.local/admin/clustermesh-cli"
    );
    assert_eq!(
        secret_text(&m.east, "clustermesh-agent-client", "ca.crt"),
        ca_pem(&m.east)
    );
    // The bundle trusts east's own CA, labelled as east's (it may issue east's roles).
    assert_eq!(
        ca_bundle(&m.east).trim(),
        format!("# clustermesh-ca: east\n{}", ca_pem(&m.east).trim())
    );
    let replicas = secret_text(&m.east, "clustermesh-apiserver-replicas", "replica-0.crt");
    let der = clustermesh_certs::pem::parse_certs(replicas.as_bytes()).unwrap();
    assert_eq!(
        clustermesh_certs::PeerIdentity::from_certificate_any_domain(&der[0])
            .unwrap()
            .to_string(),
        "spiffe://clustermesh.local/cluster/east/replica/0"
    );

    // Settings.
    let cfg = settings(&m.east);
    assert_eq!(cfg["data"]["cluster-name"], "east");
    assert_eq!(cfg["data"]["cluster-id"], "1");
    assert_eq!(cfg["data"]["service-type"], "LoadBalancer");

    // The chart, server-side applied by field manager "clustermesh".
    let ds_path = ds_path();
    let ds = m
        .east
        .object(&ds_path)
        .expect("DaemonSet clustermesh-agent");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(agent["image"]
        .as_str()
        .unwrap()
        .starts_with("ghcr.io/clustermesh/clustermesh-agent:"));
    assert!(agent["args"]
        .as_array()
        .unwrap()
        .contains(&json!("--config=/etc/clustermesh/agent/agent.yaml")));
    assert!(m
        .east
        .managers(&ds_path)
        .contains(&("clustermesh".to_string(), "Apply".to_string())));
    let dep = m
        .east
        .object(&deployment_path())
        .expect("Deployment clustermesh-apiserver");
    let args = dep["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(args
        .as_array()
        .unwrap()
        .contains(&json!("--cluster-name=east")));
    assert!(args.as_array().unwrap().contains(&json!("--cluster-id=1")));
    assert_eq!(apiserver_service(&m.east)["spec"]["type"], "LoadBalancer");
    assert!(m
        .east
        .object("/apis/rbac.authorization.k8s.io/v1/clusterroles/clustermesh-apiserver-kube-system")
        .is_some());
    let (agent_cfg, _) = agent_config(&m.east);
    assert_eq!(agent_cfg.local_cluster, "east");
    assert_eq!(agent_cfg.clusters.len(), 1);
    // Nothing was written to the other cluster.
    assert!(m.west.writes().is_empty());
}

#[tokio::test]
async fn enable_again_keeps_the_ca_and_upgrades_in_place() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "LoadBalancer").await;
    let ca = ca_pem(&m.east);
    let key = secret_text(&m.east, "clustermesh-ca", "tls.key");
    let r = m.enable("east", "east", "1", "NodePort").await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("upgraded cluster east (id 1)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("existing CA"), "{}", r.stdout);
    assert_eq!(ca_pem(&m.east), ca);
    assert_eq!(secret_text(&m.east, "clustermesh-ca", "tls.key"), key);
    assert_eq!(server_cert(&m.east).issuer, cert_info(&ca).subject);
    assert_eq!(apiserver_service(&m.east)["spec"]["type"], "NodePort");
    assert_eq!(settings(&m.east)["data"]["service-type"], "NodePort");
}

/// `enable` without --set/--values has no chart values to report, neither the first time
/// nor when it reads back the empty overrides it stored (it printed `chart values set: ={}`).
#[tokio::test]
async fn enable_without_overrides_lists_no_chart_values() {
    let m = mesh().await;
    for _ in 0..2 {
        let r = m.enable("east", "east", "1", "LoadBalancer").await;
        assert!(r.ok, "{}", r.stderr);
        assert!(!r.stdout.contains("chart values set"), "{}", r.stdout);
        assert!(!r.stdout.contains("={}"), "{}", r.stdout);
    }
}

#[tokio::test]
async fn enable_with_another_id_is_refused_and_changes_nothing() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "LoadBalancer").await;
    let before = m.east.snapshot();
    m.east.clear_requests();
    let r = m.enable("east", "east", "2", "LoadBalancer").await;
    let line = one_error_line(&r);
    assert!(
        line.starts_with("error: context east already runs mesh cluster east (id 1) in namespace kube-system; pass --cluster-name east --cluster-id 1"),
        "{line}"
    );
    assert!(m.east.writes().is_empty(), "{:?}", m.east.writes());
    assert_unchanged(&before, &m.east.snapshot());
    let r = m.enable("east", "other", "1", "LoadBalancer").await;
    assert!(one_error_line(&r).contains("already runs mesh cluster east (id 1)"));
    let r = m
        .enable_with("east", "east", "1", &["--trust-domain", "other.test"])
        .await;
    assert!(
        one_error_line(&r).starts_with("error: context east already runs mesh cluster east (id 1) in namespace kube-system with trust domain clustermesh.local; pass --cluster-name east --cluster-id 1 --trust-domain clustermesh.local to upgrade it"),
        "{}",
        r.stderr
    );
    assert_unchanged(&before, &m.east.snapshot());
}

#[tokio::test]
async fn connect_exchanges_endpoints_ids_and_cas_both_ways_then_disconnect_removes_them() {
    let m = mesh().await;
    m.enable_both("NodePort").await;
    west_nodes(&m.west);
    let node_port = apiserver_service(&m.west)["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("west's Service got a node port");
    let (east_ca, west_ca) = (ca_pem(&m.east), ca_pem(&m.west));

    let r = m.connect("east", "west").await;
    assert!(r.ok, "{}", r.stderr);
    let west_endpoints = vec![
        format!("198.51.100.7:{node_port}"),
        format!("198.51.100.6:{node_port}"),
    ];
    assert_eq!(
        r.stdout.trim_end(),
        format!(
            "connected east (192.0.2.10:2379) <-> west ({}); agents pick up the change without a restart",
            west_endpoints.join(",")
        )
    );

    // east's agents watch west at its node addresses (ready node first) with west's CA.
    let (east_agent, east_data) = agent_config(&m.east);
    let w = east_agent.cluster("west").expect("east lists west");
    assert_eq!(w.id, 2);
    assert_eq!(w.endpoints, west_endpoints);
    assert_eq!(w.ca_file, Path::new("/etc/clustermesh/agent/west-ca.crt"));
    assert_eq!(
        east_data["west-ca.crt"].as_str().unwrap().trim(),
        west_ca.trim()
    );
    // west's agents watch east at its load balancer with east's CA.
    let (west_agent, west_data) = agent_config(&m.west);
    let e = west_agent.cluster("east").expect("west lists east");
    assert_eq!(
        (e.id, e.endpoints.clone()),
        (1, vec!["192.0.2.10:2379".to_string()])
    );
    assert_eq!(
        west_data["east-ca.crt"].as_str().unwrap().trim(),
        east_ca.trim()
    );
    // Each mesh API server trusts the other's agents, and serves a certificate valid for
    // the address the other side dials.
    for (fake, own, peer) in [(&m.east, &east_ca, &west_ca), (&m.west, &west_ca, &east_ca)] {
        let bundle = ca_bundle(fake);
        assert!(bundle.contains(own.trim()) && bundle.contains(peer.trim()));
    }
    let east_server = server_cert(&m.east);
    assert!(east_server.ips.contains(&"192.0.2.10".parse().unwrap()));
    let west_server = server_cert(&m.west);
    assert!(west_server.ips.contains(&"198.51.100.7".parse().unwrap()));

    // Re-enabling (upgrading) east keeps west connected and the server names.
    let r = m.enable("east", "east", "1", "LoadBalancer").await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("still connected to west"), "{}", r.stdout);
    assert_eq!(
        agent_config(&m.east).0.cluster("west").unwrap().endpoints,
        west_endpoints
    );
    let east_server = server_cert(&m.east);
    assert!(east_server.ips.contains(&"192.0.2.10".parse().unwrap()));
    assert!(ca_bundle(&m.east).contains(west_ca.trim()));

    // Connecting again is a refresh, not an error.
    let r = m
        .cli(&[
            "--context",
            "west",
            "--destination-context",
            "east",
            "-o",
            "json",
            "connect",
        ])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["already_connected"], true);

    // disable refuses while connected.
    let before = content(&m.east);
    let line = one_error_line(&m.cli(&["--context", "east", "disable"]).await).to_string();
    assert!(
        line.starts_with("error: cluster east is still connected to west;"),
        "{line}"
    );
    assert_unchanged(&before, &content(&m.east));

    let r = m.disconnect("east", "west").await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "disconnected east <-> west\n");
    for (fake, own, peer) in [(&m.east, &east_ca, &west_ca), (&m.west, &west_ca, &east_ca)] {
        let (agent, data) = agent_config(fake);
        assert_eq!(agent.clusters.len(), 1, "{agent:?}");
        assert_eq!(data.as_object().unwrap().len(), 1, "{data}");
        let bundle = ca_bundle(fake);
        assert!(bundle.contains(own.trim()) && !bundle.contains(peer.trim()));
    }
    let line = one_error_line(&m.disconnect("east", "west").await).to_string();
    assert_eq!(
        line,
        "error: clusters east and west are not connected; nothing to disconnect"
    );
}

#[tokio::test]
async fn connecting_a_cluster_to_itself_is_refused() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "LoadBalancer").await;
    east_load_balancer(&m.east);
    let before = content(&m.east);
    let line = one_error_line(&m.connect("east", "east").await).to_string();
    assert!(
        line.contains("cannot connect a cluster to itself"),
        "{line}"
    );
    // Another context name for the same cluster: detected by the CA.
    let line = one_error_line(&m.connect("east", "east-again").await).to_string();
    assert!(
        line.starts_with("error: contexts east and east-again both reach mesh cluster east ("),
        "{line}"
    );
    assert_unchanged(&before, &content(&m.east));
}

#[tokio::test]
async fn duplicate_ids_are_refused_directly_and_through_existing_peers() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "LoadBalancer").await;
    m.enabled("west", "west", "1", "LoadBalancer").await;
    east_load_balancer(&m.east);
    let before = m.contents();
    let line = one_error_line(&m.connect("east", "west").await).to_string();
    assert!(
        line.starts_with("error: clusters east (context east) and west (context west) both have ID 1; every cluster in a mesh needs a unique name and ID"),
        "{line}"
    );
    m.assert_both_unchanged(&before);

    // A third cluster whose ID is already used by one of east's peers.
    let north = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = kubeconfig(
        dir.path(),
        &[("east", &m.east), ("west", &m.west), ("north", &north)],
    );
    let mut m2 = m;
    m2.cfg = cfg;
    let r = m2.cli(&["--context", "west", "disable"]).await;
    assert!(r.ok, "{}", r.stderr);
    m2.enabled("west", "west", "2", "LoadBalancer").await;
    m2.west.set_status(
        &service_path(),
        json!({"loadBalancer": {"ingress": [{"hostname": "west.lb.example"}]}}),
    );
    let r = m2.connect("east", "west").await;
    assert!(r.ok, "{}", r.stderr);
    m2.enabled("north", "north", "2", "LoadBalancer").await;
    north.set_status(
        &service_path(),
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.30"}]}}),
    );
    let (east_before, north_before) = (content(&m2.east), content(&north));
    let line = one_error_line(&m2.connect("north", "east").await).to_string();
    assert!(
        line.starts_with(
            "error: cluster ID 2 is used by north (known to north) and by west (known to east)"
        ),
        "{line}"
    );
    assert_unchanged(&east_before, &content(&m2.east));
    assert_unchanged(&north_before, &content(&north));
}

#[tokio::test]
async fn connect_to_a_cluster_without_the_mesh_says_to_enable_it_first() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "LoadBalancer").await;
    east_load_balancer(&m.east);
    let before = content(&m.east);
    let line = one_error_line(&m.connect("east", "west").await).to_string();
    assert_eq!(
        line,
        "error: the mesh is not enabled in namespace kube-system of context west (ConfigMap clustermesh-config not found); run `clustermesh --context west --namespace kube-system enable --cluster-name NAME --cluster-id ID` first"
    );
    assert_unchanged(&before, &content(&m.east));
    assert!(m.west.writes().is_empty());

    // Enabled, but the CA Secret is gone.
    m.enabled("west", "west", "2", "LoadBalancer").await;
    m.west.remove(&secret_path("clustermesh-ca"));
    let line = one_error_line(&m.connect("east", "west").await).to_string();
    assert!(
        line.contains("(CA Secret clustermesh-ca not found); run `clustermesh --context west"),
        "{line}"
    );
    assert_unchanged(&before, &content(&m.east));
}

#[tokio::test]
async fn a_load_balancer_without_an_address_is_a_clear_error() {
    let m = mesh().await;
    m.enable_both("LoadBalancer").await;
    let before = m.contents();
    let line = one_error_line(&m.connect("east", "west").await).to_string();
    assert!(
        line.starts_with("error: Service clustermesh-apiserver in namespace kube-system of context west is a LoadBalancer with no external address yet; wait for the load balancer and retry, or run `clustermesh --context west enable --service-type NodePort`"),
        "{line}"
    );
    m.assert_both_unchanged(&before);
}

#[tokio::test]
async fn a_failed_write_on_the_destination_leaves_both_clusters_as_they_were() {
    let m = mesh().await;
    m.enable_both("NodePort").await;
    west_nodes(&m.west);
    let before = m.contents();
    m.west
        .fail_next("PUT", "/configmaps/clustermesh-agent-config", 500);
    let line = one_error_line(&m.connect("east", "west").await).to_string();
    assert!(
        line.starts_with("error: cannot replace ConfigMap clustermesh-agent-config in namespace kube-system of context west: "),
        "{line}"
    );
    assert!(
        line.ends_with("the 5 earlier write(s) were undone, both clusters are as they were"),
        "{line}"
    );
    // east's server Secret, bundle and agent config and west's server Secret and bundle
    // were written, then restored.
    assert!(m.east.writes().iter().any(|w| w.method == "PUT"));
    m.assert_both_unchanged(&before);

    // And the same connect works once the API server accepts the write.
    let r = m.connect("east", "west").await;
    assert!(r.ok, "{}", r.stderr);
    assert!(agent_config(&m.west).0.cluster("east").is_some());
}

#[tokio::test]
async fn disable_force_removes_every_mesh_object() {
    let m = mesh().await;
    m.enable_both("LoadBalancer").await;
    m.west.set_status(
        &service_path(),
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.20"}]}}),
    );
    assert!(m.connect("east", "west").await.ok);
    let r = m.cli(&["--context", "east", "disable", "--force"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout
            .starts_with("disabled cluster east in context east ("),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("west still list it"), "{}", r.stdout);
    let left: Vec<String> = m
        .east
        .snapshot()
        .keys()
        .filter(|p| !p.starts_with("/api/v1/namespaces/") || p.matches('/').count() > 4)
        .cloned()
        .collect();
    assert!(left.is_empty(), "objects left after disable: {left:?}");
    let line = one_error_line(&m.cli(&["--context", "east", "disable"]).await).to_string();
    assert!(
        line.starts_with("error: the mesh is not enabled in namespace kube-system of context east"),
        "{line}"
    );
    // west still lists east until it forgets it on its side alone.
    let east_ca = agent_config(&m.west).1["east-ca.crt"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(agent_config(&m.west).0.cluster("east").is_some());
    let line = one_error_line(&m.disconnect_cluster("west", "nope").await).to_string();
    assert_eq!(
        line,
        "error: clusters west and nope are not connected; nothing to disconnect"
    );
    let r = m.disconnect_cluster("west", "east").await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "cluster west no longer lists east (this side only)\n"
    );
    let (west_agent, west_data) = agent_config(&m.west);
    assert_eq!(west_agent.clusters.len(), 1);
    assert!(west_data.get("east-ca.crt").is_none());
    let bundle = ca_bundle(&m.west);
    assert!(!bundle.contains(east_ca.trim()));
    assert!(bundle.contains(ca_pem(&m.west).trim()));
    // enable afterwards starts over with a new CA.
    let r = m.enable("east", "east", "1", "LoadBalancer").await;
    assert!(
        r.ok && r.stdout.contains("new CA"),
        "{} {}",
        r.stdout,
        r.stderr
    );
}

#[tokio::test]
async fn a_destination_whose_api_is_down_is_reported_before_any_write() {
    let m = mesh().await;
    m.enable_both("LoadBalancer").await;
    let before = content(&m.east);
    m.east.clear_requests();
    m.west.stop().await;
    let line = one_error_line(&m.connect("east", "west").await).to_string();
    assert!(
        line.starts_with("error: cannot reach the Kubernetes API of context west: "),
        "{line}"
    );
    assert!(m.east.writes().is_empty(), "{:?}", m.east.writes());
    assert_unchanged(&before, &content(&m.east));
}

#[tokio::test]
async fn another_namespace_holds_everything_and_must_exist() {
    let m = mesh().await;
    let args = enable_args("east", &["--namespace", "mesh"], "east", "9", &[]);
    let before = content(&m.east);
    let line = one_error_line(&m.cli(&args).await).to_string();
    assert_eq!(
        line,
        "error: namespace mesh does not exist in context east; create it (`kubectl --context east create namespace mesh`) or pass another --namespace"
    );
    assert_unchanged(&before, &content(&m.east));

    m.east
        .insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}}));
    let r = m.cli(&args).await;
    assert!(r.ok, "{}", r.stderr);
    let cm = m
        .east
        .object("/api/v1/namespaces/mesh/configmaps/clustermesh-agent-config")
        .unwrap();
    let agent =
        AgentConfig::parse(Path::new("a"), cm["data"]["agent.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(
        agent.cluster("east").unwrap().endpoints,
        vec!["clustermesh-apiserver.mesh.svc:2379".to_string()]
    );
    assert!(m
        .east
        .object("/api/v1/namespaces/mesh/secrets/clustermesh-ca")
        .is_some());
    assert!(m
        .east
        .object("/apis/rbac.authorization.k8s.io/v1/clusterroles/clustermesh-apiserver-mesh")
        .is_some());
    // The default (LoadBalancer) service type was used, and nothing went to kube-system.
    let svc = m
        .east
        .object("/api/v1/namespaces/mesh/services/clustermesh-apiserver")
        .unwrap();
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert!(m
        .east
        .objects(&format!("/api/v1/namespaces/{NS}/secrets"))
        .is_empty());
}

#[tokio::test]
async fn a_peer_re_enabled_with_a_new_ca_must_be_disconnected_before_reconnecting() {
    let m = mesh().await;
    m.enable_both("NodePort").await;
    west_nodes(&m.west);
    assert!(m.connect("east", "west").await.ok);
    let old_west_ca = ca_pem(&m.west);
    // west is replaced: disabled with --force and enabled again, so it has a new CA.
    assert!(m.cli(&["--context", "west", "disable", "--force"]).await.ok);
    m.enabled("west", "west", "2", "NodePort").await;
    let new_west_ca = ca_pem(&m.west);
    assert_ne!(old_west_ca, new_west_ca);

    let before = m.contents();
    let line = one_error_line(&m.connect("east", "west").await).to_string();
    assert_eq!(
        line,
        "error: CA mismatch: east (context east) pinned a different CA for west than west (context west) has now; west was re-enabled since: run `clustermesh --context east --destination-context west disconnect`, then connect again"
    );
    m.assert_both_unchanged(&before);

    let r = m.disconnect("east", "west").await;
    assert!(r.ok, "{}", r.stderr);
    let bundle = ca_bundle(&m.east);
    assert!(!bundle.contains(old_west_ca.trim()));
    assert!(m.connect("east", "west").await.ok);
    let (_, data) = agent_config(&m.east);
    assert_eq!(
        data["west-ca.crt"].as_str().unwrap().trim(),
        new_west_ca.trim()
    );
}

fn ds_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/daemonsets/clustermesh-agent")
}

fn deployment_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/deployments/clustermesh-apiserver")
}

/// Images of the agent DaemonSet and the apiserver Deployment.
fn images(fake: &FakeKube) -> (String, String) {
    let image = |path: &str| {
        fake.object(path).unwrap_or_else(|| panic!("{path} exists"))["spec"]["template"]["spec"]
            ["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    (image(&ds_path()), image(&deployment_path()))
}

fn node_port(fake: &FakeKube) -> Value {
    apiserver_service(fake)["spec"]["ports"][0]["nodePort"].clone()
}

fn cgroup_host_path(fake: &FakeKube) -> Value {
    let ds = fake.object(&ds_path()).unwrap();
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "cgroup")
        .expect("cgroup volume")["hostPath"]["path"]
        .clone()
}

/// The overrides stored in clustermesh-config, parsed.
fn stored_values(fake: &FakeKube) -> Value {
    let cfg = settings(fake);
    clustermesh_api::yaml::from_str(cfg["data"]["values.yaml"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn set_values_reach_the_workloads_and_survive_upgrades_connect_and_disconnect() {
    let m = mesh().await;
    let r = m
        .enable_with(
            "west",
            "west",
            "2",
            &[
                "--service-type",
                "NodePort",
                "--set",
                "image.tag=dev",
                "--set",
                "apiserver.service.nodePort=32379",
                "--set",
                "agent.cgroupRoot=/sys/fs/cgroup/unified",
                "--set",
                "apiserver.service.port=443",
            ],
        )
        .await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("chart values set: agent.cgroupRoot=/sys/fs/cgroup/unified apiserver.service.nodePort=32379 apiserver.service.port=443 image.tag=dev\n"),
        "{}",
        r.stdout
    );
    let dev = (
        "ghcr.io/clustermesh/clustermesh-agent:dev".to_string(),
        "ghcr.io/clustermesh/clustermesh-apiserver:dev".to_string(),
    );
    assert_eq!(images(&m.west), dev);
    assert_eq!(node_port(&m.west), json!(32379));
    assert_eq!(cgroup_host_path(&m.west), "/sys/fs/cgroup/unified");
    let own_endpoint = vec!["clustermesh-apiserver.kube-system.svc:443".to_string()];
    assert_eq!(
        agent_config(&m.west).0.cluster("west").unwrap().endpoints,
        own_endpoint
    );
    assert_eq!(
        stored_values(&m.west),
        json!({
            "image": {"tag": "dev"},
            "apiserver": {"service": {"nodePort": 32379, "port": 443}},
            "agent": {"cgroupRoot": "/sys/fs/cgroup/unified"},
        })
    );

    // An upgrade without flags keeps every override.
    m.enabled("west", "west", "2", "NodePort").await;
    assert_eq!(images(&m.west), dev);
    assert_eq!(node_port(&m.west), json!(32379));
    assert_eq!(cgroup_host_path(&m.west), "/sys/fs/cgroup/unified");

    // connect re-renders the agent configuration from the chart: still port 443.
    m.enabled("east", "east", "1", "LoadBalancer").await;
    east_load_balancer(&m.east);
    west_nodes(&m.west);
    let r = m.connect("east", "west").await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("198.51.100.7:32379"), "{}", r.stdout);
    let (west_agent, _) = agent_config(&m.west);
    assert_eq!(west_agent.cluster("west").unwrap().endpoints, own_endpoint);
    assert!(west_agent.cluster("east").is_some());
    // east's agents dial west's node port.
    assert_eq!(
        agent_config(&m.east).0.cluster("west").unwrap().endpoints[0],
        "198.51.100.7:32379"
    );
    assert_eq!(images(&m.west), dev);

    // A later --set merges over the stored overrides; null restores a default.
    let r = m
        .enable_with(
            "west",
            "west",
            "2",
            &["--set", "image.tag=v2", "--set", "agent.cgroupRoot=null"],
        )
        .await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("still connected to east"), "{}", r.stdout);
    assert_eq!(
        images(&m.west).0,
        "ghcr.io/clustermesh/clustermesh-agent:v2"
    );
    assert_eq!(node_port(&m.west), json!(32379));
    assert_eq!(cgroup_host_path(&m.west), "/sys/fs/cgroup");
    assert_eq!(
        stored_values(&m.west),
        json!({
            "image": {"tag": "v2"},
            "apiserver": {"service": {"nodePort": 32379, "port": 443}},
        })
    );

    // disconnect re-renders it too.
    let r = m.disconnect("west", "east").await;
    assert!(r.ok, "{}", r.stderr);
    let (west_agent, _) = agent_config(&m.west);
    assert_eq!(west_agent.clusters.len(), 1);
    assert_eq!(west_agent.cluster("west").unwrap().endpoints, own_endpoint);
    assert_eq!(stored_values(&m.west)["image"]["tag"], "v2");
}

#[tokio::test]
async fn values_files_merge_over_defaults_and_set_wins() {
    let m = mesh().await;
    let file = m._dir.path().join("values.yaml");
    std::fs::write(
        &file,
        "image:\n  prefix: registry.local:5000/mesh\n  tag: from-file\nagent:\n  tolerations: []\n  nodeSelector:\n    disk: ssd\n",
    )
    .unwrap();
    let r = m
        .enable_with(
            "east",
            "east",
            "1",
            &[
                "--values",
                file.to_str().unwrap(),
                "--set",
                "image.tag=from-set",
            ],
        )
        .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        images(&m.east),
        (
            "registry.local:5000/mesh/clustermesh-agent:from-set".to_string(),
            "registry.local:5000/mesh/clustermesh-apiserver:from-set".to_string()
        )
    );
    let pod = m.east.object(&ds_path()).unwrap()["spec"]["template"]["spec"].clone();
    assert_eq!(pod["nodeSelector"]["disk"], "ssd");
    assert_eq!(pod["tolerations"], json!([]));
    // Restoring the default tag: the chart's appVersion.
    let r = m
        .enable_with("east", "east", "1", &["--set", "image.tag=null"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        images(&m.east).0,
        "registry.local:5000/mesh/clustermesh-agent:0.1.0"
    );
}

#[tokio::test]
async fn bad_chart_values_are_one_line_and_write_nothing() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "LoadBalancer").await;
    let before = content(&m.east);
    let missing = m._dir.path().join("nope.yaml");
    let not_a_map = m._dir.path().join("list.yaml");
    std::fs::write(&not_a_map, "- image\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--set".into(), "imgae.tag=dev".into()],
            "error: --set imgae.tag=dev: unknown chart value imgae; the chart's top-level values are ",
        ),
        (
            vec!["--set".into(), "apiserver.service=NodePort".into()],
            "error: --set apiserver.service=NodePort: chart value apiserver.service is a map but the override is a single value; set its keys instead",
        ),
        (
            vec!["--set".into(), "cluster.name=other".into()],
            "error: --set cluster.name=other: chart value cluster.name cannot be overridden, it is set by --cluster-name",
        ),
        (
            vec!["--set".into(), "cluster.id=7".into()],
            "error: --set cluster.id=7: chart value cluster.id cannot be overridden, it is set by --cluster-id",
        ),
        (
            vec!["--set".into(), "agent.remoteClusters=[]".into()],
            "error: --set \"agent.remoteClusters=[]\": the value is a YAML list or map",
        ),
        (
            vec!["--set".into(), "agent.remoteClusters=none".into()],
            "error: --set agent.remoteClusters=none: chart value agent.remoteClusters cannot be overridden, it is set by `clustermesh connect` and `disconnect`",
        ),
        (
            vec!["--set".into(), "image.tag".into()],
            "error: --set \"image.tag\": no '='",
        ),
        (
            vec!["--values".into(), missing.display().to_string()],
            "error: cannot read --values file ",
        ),
        (
            vec!["--values".into(), not_a_map.display().to_string()],
            "is not a YAML map of chart values",
        ),
        (
            // Valid as a key, refused by the chart's own validation when rendering.
            vec!["--set".into(), "apiserver.store.type=zookeeper".into()],
            "apiserver.store.type must be raft or etcd",
        ),
    ];
    for (extra, want) in cases {
        m.east.clear_requests();
        let extra_args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let r = m.enable_with("east", "east", "1", &extra_args).await;
        let line = one_error_line(&r);
        assert!(line.contains(want), "{extra:?}: {line}");
        assert!(m.east.writes().is_empty(), "{extra:?} wrote something");
        assert_unchanged(&before, &content(&m.east));
    }
    // A first enable with a bad key creates nothing at all.
    let r = m
        .enable_with("west", "west", "2", &["--set", "trustDomain=x.test"])
        .await;
    assert!(
        one_error_line(&r).contains("it is set by --trust-domain"),
        "{}",
        r.stderr
    );
    assert!(m.west.writes().is_empty());
}

#[tokio::test]
async fn standalone_enable_refuses_chart_values() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("east");
    let r = run_cli(
        &dir.path().join("no-kubeconfig"),
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "enable",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
            "--mesh-endpoint",
            "127.0.0.1:2379",
            "--set",
            "image.tag=dev",
        ],
    )
    .await;
    assert_eq!(
        one_error_line(&r),
        "error: --set and --values are chart values for Kubernetes mode (--context); a standalone cluster (--state-dir) has no chart, configure its processes with their own flags"
    );
    assert!(!state.exists());
}

/// Replaces the stored overrides text of east's clustermesh-config, as a hand edit would.
fn edit_stored_values(fake: &FakeKube, text: &str) {
    let mut cfg = settings(fake);
    cfg["data"]["values.yaml"] = json!(text);
    fake.insert(cfg);
}

#[tokio::test]
async fn stored_overrides_that_are_refused_now_say_how_to_remove_them() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "LoadBalancer").await;
    edit_stored_values(&m.east, "imgae:\n  tag: dev\nimage:\n  tag: kept\n");
    let before = content(&m.east);
    let r = m.enable("east", "east", "1", "LoadBalancer").await;
    assert_eq!(
        one_error_line(&r),
        "error: ConfigMap clustermesh-config key values.yaml: unknown chart value imgae; the chart's top-level values are agent, apiserver, cluster, image, mode, tls, trustDomain (stored by an earlier enable; remove it with --set KEY=null)"
    );
    assert_unchanged(&before, &content(&m.east));
    let r = m
        .enable_with("east", "east", "1", &["--set", "imgae=null"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(stored_values(&m.east), json!({"image": {"tag": "kept"}}));
    assert!(images(&m.east).0.ends_with(":kept"));

    // Stored text that is not YAML: every verb names the key and how to repair it.
    edit_stored_values(&m.east, "image: [");
    let before = content(&m.east);
    for args in [
        enable_args("east", &[], "east", "1", &[]),
        vec![
            "--context",
            "east",
            "--destination-context",
            "west",
            "connect",
        ],
    ] {
        let r = m.cli(&args).await;
        let line = one_error_line(&r);
        assert!(
            line.starts_with("error: ConfigMap clustermesh-config in namespace kube-system of context east is malformed: key values.yaml is not a YAML map of chart values: "),
            "{line}"
        );
        assert!(
            line.ends_with("fix or remove that key (`kubectl edit configmap clustermesh-config`), then run `enable` again with the --set/--values you want"),
            "{line}"
        );
        assert_unchanged(&before, &content(&m.east));
    }
}

fn statefulset_path() -> String {
    format!("/apis/apps/v1/namespaces/{NS}/statefulsets/clustermesh-apiserver")
}

fn peers_service_path() -> String {
    format!("/api/v1/namespaces/{NS}/services/clustermesh-apiserver-peers")
}

/// Paths of every stored object.
fn paths(fake: &FakeKube) -> std::collections::BTreeSet<String> {
    fake.snapshot().into_keys().collect()
}

/// Paths of the DELETE requests received since the last `clear_requests`.
fn deletes(fake: &FakeKube) -> Vec<String> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.path)
        .collect()
}

#[tokio::test]
async fn upgrades_between_one_and_three_apiserver_replicas_remove_the_other_workload() {
    let m = mesh().await;
    m.enabled("east", "east", "1", "NodePort").await;
    // Objects that look like the mesh's but are not this release's: a user's ConfigMap
    // with two of the chart's labels, and another namespace's install's ClusterRole.
    m.east.insert(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "user-notes", "namespace": NS, "labels": {
            "app.kubernetes.io/part-of": "clustermesh", "clustermesh.io/cluster": "east"}},
        "data": {"k": "v"},
    }));
    m.east.insert(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "clustermesh-apiserver-other-ns", "labels": {
            "app.kubernetes.io/part-of": "clustermesh", "app.kubernetes.io/instance": "clustermesh",
            "clustermesh.io/cluster": "east"}},
        "rules": [],
    }));
    let one = paths(&m.east);
    assert!(one.contains(&deployment_path()), "{one:?}");
    assert!(!one.contains(&statefulset_path()), "{one:?}");

    m.east.clear_requests();
    let r = m
        .enable_with("east", "east", "1", &["--set", "apiserver.replicas=3"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("removed Deployment/clustermesh-apiserver no longer rendered"),
        "{}",
        r.stdout
    );
    assert_eq!(deletes(&m.east), vec![deployment_path()]);
    let three = paths(&m.east);
    let mut expected = one.clone();
    expected.remove(&deployment_path());
    expected.insert(statefulset_path());
    expected.insert(peers_service_path());
    assert_eq!(three, expected);
    let svc = apiserver_service(&m.east);
    let sts = m.east.object(&statefulset_path()).unwrap();
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/name"],
        sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    );

    m.east.clear_requests();
    let r = m
        .enable_json("east", "east", "1", &["--set", "apiserver.replicas=1"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let report: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        report["pruned"],
        json!([
            "StatefulSet/clustermesh-apiserver",
            "Service/clustermesh-apiserver-peers"
        ])
    );
    let mut gone = deletes(&m.east);
    gone.sort();
    assert_eq!(gone, vec![peers_service_path(), statefulset_path()]);
    assert_eq!(paths(&m.east), one);

    // A plain re-run deletes nothing.
    m.east.clear_requests();
    m.enabled("east", "east", "1", "NodePort").await;
    assert!(deletes(&m.east).is_empty(), "{:?}", deletes(&m.east));
}

#[tokio::test]
async fn raft_replicas_accept_each_other_by_their_statefulset_peer_names() {
    use clustermesh_certs::transport::{incoming, IncomingConfig, MeshEndpoint};
    use clustermesh_certs::{MeshTls, PeerIdentity, TrustDomain};
    use tokio_stream::StreamExt;

    let m = mesh().await;
    let r = m
        .enable_json("east", "east", "1", &["--set", "apiserver.replicas=3"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let td = TrustDomain::new("clustermesh.local").unwrap();
    let bundle = ca_bundle(&m.east);
    let replica = |n: u64| {
        std::sync::Arc::new(
            MeshTls::from_pem(
                td.clone(),
                bundle.as_bytes(),
                secret_text(
                    &m.east,
                    "clustermesh-apiserver-replicas",
                    &format!("replica-{n}.crt"),
                )
                .as_bytes(),
                secret_text(
                    &m.east,
                    "clustermesh-apiserver-replicas",
                    &format!("replica-{n}.key"),
                )
                .as_bytes(),
            )
            .unwrap(),
        )
    };
    // Replica 1 serves; replica 0 dials it by the name the chart's --raft-peer flags use.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut conns = incoming(listener, replica(1), IncomingConfig::default());
    let east = PeerIdentity::cluster(td.clone(), "east").unwrap();
    let (_stream, server) = MeshEndpoint::new(&addr.to_string(), replica(0))
        .unwrap()
        .with_server_name("clustermesh-apiserver-1.clustermesh-apiserver-peers.kube-system.svc")
        .unwrap()
        .expect_replica_of(east)
        .dial()
        .await
        .unwrap();
    assert_eq!(
        server.to_string(),
        "spiffe://clustermesh.local/cluster/east/replica/1"
    );
    let conn = conns.next().await.unwrap().unwrap();
    assert_eq!(
        conn.peer().to_string(),
        "spiffe://clustermesh.local/cluster/east/replica/0"
    );
    // The mesh API server certificate does not carry the peer names (the bug this fixes:
    // replicas used it and never formed a quorum).
    let server_tls = std::sync::Arc::new(
        MeshTls::from_pem(
            td.clone(),
            bundle.as_bytes(),
            secret_text(&m.east, "clustermesh-apiserver-server", "tls.crt").as_bytes(),
            secret_text(&m.east, "clustermesh-apiserver-server", "tls.key").as_bytes(),
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _conns = incoming(listener, server_tls, IncomingConfig::default());
    let err = MeshEndpoint::new(&addr.to_string(), replica(0))
        .unwrap()
        .with_server_name("clustermesh-apiserver-1.clustermesh-apiserver-peers.kube-system.svc")
        .unwrap()
        .dial()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}
