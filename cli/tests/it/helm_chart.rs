//! Renders `deploy/helm/clustermesh` for several value sets and validates the manifests.
//!
//! Every document must parse as the typed Kubernetes object its `kind` names
//! (k8s-openapi), and serializing that object back must give the same JSON, so a
//! misspelled or misplaced field (silently dropped by the typed parse) fails the test.
//! Then the scenario-specific fields are checked: workload kind per store mode, service
//! type, raft peers, RBAC verbs, agent mounts and capabilities, remote clusters.

// Helpers outside #[test] fns: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use clustermesh_cli::chart::{Chart, Release, TemplateError};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::{json, Value};

fn chart() -> Chart {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/clustermesh");
    Chart::load(&dir).expect("chart loads")
}

fn release() -> Release {
    Release {
        name: "clustermesh".into(),
        namespace: "kube-system".into(),
    }
}

/// Drops nulls (absent optional fields serialize as absent) so the round trip compares
/// only what the manifest says.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, origin: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{origin}: not a valid {}: {e}\n{doc:#}",
            std::any::type_name::<T>()
        )
    });
    let mut back = serde_json::to_value(&typed).unwrap();
    let mut orig = doc.clone();
    strip_nulls(&mut back);
    strip_nulls(&mut orig);
    if let Some(diff) = first_difference(&orig, &back, String::new()) {
        panic!("{origin}: the typed round trip changed {diff} (misspelled or misplaced field?)");
    }
    typed
}

/// The path of the first difference between two JSON values, with both sides.
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(u), Some(v)) => first_difference(u, v, format!("{path}.{k}")),
                (u, v) => Some(format!("{path}.{k}: manifest {u:?} vs typed {v:?}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: manifest {a} vs typed {b}")),
    }
}

/// All rendered objects, validated, as (kind, name, json).
struct Rendered(Vec<(String, String, Value)>);

impl Rendered {
    fn get(&self, kind: &str, name: &str) -> &Value {
        &self
            .0
            .iter()
            .find(|(k, n, _)| k == kind && n == name)
            .unwrap_or_else(|| panic!("no {kind}/{name} in {:?}", self.kinds()))
            .2
    }
    fn has(&self, kind: &str, name: &str) -> bool {
        self.0.iter().any(|(k, n, _)| k == kind && n == name)
    }
    fn kinds(&self) -> Vec<String> {
        self.0.iter().map(|(k, n, _)| format!("{k}/{n}")).collect()
    }
}

fn render(overrides: Value) -> Result<Rendered, TemplateError> {
    let docs = chart().render_documents(&release(), &overrides)?;
    let mut out = Vec::new();
    for (template, text) in docs {
        let doc: Value = clustermesh_api::yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{template}: rendered YAML does not parse: {e}\n{text}"));
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{template}: no kind"))
            .to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{template}: no name"))
            .to_string();
        assert!(doc["apiVersion"].is_string(), "{template}: no apiVersion");
        let origin = format!("{template} {kind}/{name}");
        match kind.as_str() {
            "Deployment" => {
                let d: Deployment = roundtrip(&doc, &origin);
                let spec = d.spec;
                check_selector(
                    &spec.selector.match_labels,
                    &spec.template.metadata,
                    &origin,
                );
                check_pod(spec.template.spec.as_ref().unwrap(), &origin);
            }
            "StatefulSet" => {
                let s: StatefulSet = roundtrip(&doc, &origin);
                let spec = s.spec;
                check_selector(
                    &spec.selector.match_labels,
                    &spec.template.metadata,
                    &origin,
                );
                let claims: Vec<String> = spec
                    .volume_claim_templates
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.metadata.name)
                    .collect();
                check_pod_with(spec.template.spec.as_ref().unwrap(), &claims, &origin);
            }
            "DaemonSet" => {
                let d: DaemonSet = roundtrip(&doc, &origin);
                let spec = d.spec;
                check_selector(
                    &spec.selector.match_labels,
                    &spec.template.metadata,
                    &origin,
                );
                check_pod(spec.template.spec.as_ref().unwrap(), &origin);
            }
            "Service" => {
                roundtrip::<Service>(&doc, &origin);
            }
            "ServiceAccount" => {
                roundtrip::<ServiceAccount>(&doc, &origin);
            }
            "ConfigMap" => {
                roundtrip::<ConfigMap>(&doc, &origin);
            }
            "ClusterRole" => {
                roundtrip::<ClusterRole>(&doc, &origin);
            }
            "ClusterRoleBinding" => {
                roundtrip::<ClusterRoleBinding>(&doc, &origin);
            }
            other => panic!("{origin}: unexpected kind {other}"),
        }
        out.push((kind, name, doc));
    }
    Ok(Rendered(out))
}

fn check_selector(
    selector: &Option<std::collections::BTreeMap<String, String>>,
    meta: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    origin: &str,
) {
    let labels = meta
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in selector.clone().unwrap_or_default() {
        assert_eq!(
            labels.get(&k),
            Some(&v),
            "{origin}: selector {k}={v} does not match the pod labels"
        );
    }
}

fn check_pod(pod: &PodSpec, origin: &str) {
    check_pod_with(pod, &[], origin);
}

/// Every volume mount must name a volume of the pod (or a claim template).
fn check_pod_with(pod: &PodSpec, claims: &[String], origin: &str) {
    let mut volumes: Vec<String> = pod
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    volumes.extend(claims.iter().cloned());
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for m in c.volume_mounts.clone().unwrap_or_default() {
            assert!(
                volumes.contains(&m.name),
                "{origin}: mount {} has no volume (have {volumes:?})",
                m.name
            );
        }
        assert!(
            c.image
                .as_deref()
                .is_some_and(|i| i.contains(':') && !i.ends_with(':')),
            "{origin}: image without tag"
        );
    }
}

fn args(obj: &Value) -> Vec<String> {
    obj["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn base() -> Value {
    json!({"cluster": {"name": "cluster1", "id": 1}})
}

fn with(extra: Value) -> Value {
    let mut v = base();
    clustermesh_cli::chart::merge_values(&mut v, &extra);
    v
}

#[test]
fn default_values_render_single_raft_apiserver_behind_a_load_balancer() {
    let r = render(base()).unwrap();
    let dep = r.get("Deployment", "clustermesh-apiserver");
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    let a = args(dep);
    assert!(a.contains(&"--cluster-name=cluster1".to_string()), "{a:?}");
    assert!(a.contains(&"--cluster-id=1".to_string()));
    assert!(a.contains(&"--store=raft".to_string()));
    assert!(a.contains(&"--export-pods=all".to_string()), "{a:?}");
    assert!(!a.iter().any(|x| x.starts_with("--raft-peer=")));
    assert!(!r.has("StatefulSet", "clustermesh-apiserver"));
    assert_eq!(
        r.get("Service", "clustermesh-apiserver")["spec"]["type"],
        "LoadBalancer"
    );
    let sc = &dep["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
}

#[test]
fn three_raft_replicas_render_a_statefulset_with_every_peer() {
    let r = render(with(json!({"apiserver": {"replicas": 3}}))).unwrap();
    assert!(!r.has("Deployment", "clustermesh-apiserver"));
    let sts = r.get("StatefulSet", "clustermesh-apiserver");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["serviceName"], "clustermesh-apiserver-peers");
    let peers: Vec<String> = args(sts)
        .into_iter()
        .filter(|a| a.starts_with("--raft-peer="))
        .collect();
    assert_eq!(
        peers,
        (0..3)
            .map(|i| format!(
                "--raft-peer={i}=clustermesh-apiserver-{i}.clustermesh-apiserver-peers.kube-system.svc:2380"
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    let headless = r.get("Service", "clustermesh-apiserver-peers");
    assert_eq!(headless["spec"]["clusterIP"], "None");
}

#[test]
fn raft_statefulset_without_persistence_uses_an_empty_dir() {
    let r = render(with(json!({"apiserver": {"replicas": 3, "store": {"raft": {"persistence": {"enabled": false}}}}}))).unwrap();
    let sts = r.get("StatefulSet", "clustermesh-apiserver");
    assert!(sts["spec"].get("volumeClaimTemplates").is_none());
    let vols = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(vols
        .iter()
        .any(|v| v["name"] == "data" && v.get("emptyDir").is_some()));
}

#[test]
fn etcd_store_renders_stateless_replicas_with_etcd_tls() {
    let r = render(with(
        json!({"apiserver": {"replicas": 2, "store": {"type": "etcd", "etcd": {
        "endpoints": "https://etcd-0:2379,https://etcd-1:2379", "tlsSecret": "etcd-client"}}}}),
    ))
    .unwrap();
    let dep = r.get("Deployment", "clustermesh-apiserver");
    assert_eq!(dep["spec"]["replicas"], 2);
    assert!(
        dep["spec"].get("strategy").is_none(),
        "rolling updates are fine without raft"
    );
    let a = args(dep);
    assert!(a.contains(&"--store=etcd".to_string()));
    assert!(a.contains(&"--etcd-endpoints=https://etcd-0:2379,https://etcd-1:2379".to_string()));
    assert!(a.contains(&"--etcd-ca=/etc/clustermesh/etcd-tls/ca.crt".to_string()));
    assert!(!a.iter().any(|x| x.starts_with("--raft")));
}

#[test]
fn export_pods_value_reaches_the_apiserver_verbatim() {
    for value in [
        "services",
        "selector=io.kubernetes.pod.namespace=shop,app in (web,api),!canary",
    ] {
        let r = render(with(json!({"apiserver": {"exportPods": value}}))).unwrap();
        let a = args(r.get("Deployment", "clustermesh-apiserver"));
        assert!(a.contains(&format!("--export-pods={value}")), "{a:?}");
        let r = render(with(
            json!({"apiserver": {"replicas": 3, "exportPods": value}}),
        ))
        .unwrap();
        let a = args(r.get("StatefulSet", "clustermesh-apiserver"));
        assert!(a.contains(&format!("--export-pods={value}")), "{a:?}");
    }
}

#[test]
fn node_port_service_carries_the_requested_port() {
    let r = render(with(
        json!({"apiserver": {"service": {"type": "NodePort", "nodePort": 32379}}}),
    ))
    .unwrap();
    let svc = r.get("Service", "clustermesh-apiserver");
    assert_eq!(svc["spec"]["type"], "NodePort");
    assert_eq!(svc["spec"]["ports"][0]["nodePort"], 32379);
    let r = render(with(
        json!({"apiserver": {"service": {"type": "ClusterIP", "nodePort": 32379}}}),
    ))
    .unwrap();
    assert!(
        r.get("Service", "clustermesh-apiserver")["spec"]["ports"][0]
            .get("nodePort")
            .is_none()
    );
}

#[test]
fn rbac_grants_only_list_and_watch_on_the_exported_kinds() {
    let r = render(base()).unwrap();
    let role = r.get("ClusterRole", "clustermesh-apiserver-kube-system");
    let mut granted = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        // The apiserver's Kubernetes source is one watcher per kind (list + watch).
        assert_eq!(rule["verbs"], json!(["list", "watch"]));
        for res in rule["resources"].as_array().unwrap() {
            granted.push(format!(
                "{}/{}",
                rule["apiGroups"][0].as_str().unwrap(),
                res.as_str().unwrap()
            ));
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        vec![
            "/namespaces",
            "/nodes",
            "/pods",
            "/services",
            "cilium.io/ciliumnetworkpolicies",
            "discovery.k8s.io/endpointslices",
            "networking.k8s.io/networkpolicies"
        ]
    );
    let binding = r.get("ClusterRoleBinding", "clustermesh-apiserver-kube-system");
    assert_eq!(binding["subjects"][0]["name"], "clustermesh-apiserver");
    assert_eq!(
        r.get("ServiceAccount", "clustermesh-agent")["automountServiceAccountToken"],
        false
    );
}

#[test]
fn agent_daemonset_mounts_bpffs_and_cgroup_with_only_needed_capabilities() {
    let r = render(base()).unwrap();
    let ds = r.get("DaemonSet", "clustermesh-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        json!(["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"])
    );
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf"));
    assert!(mounts.contains(&"/run/clustermesh/cgroupv2"));
    let vols = pod["volumes"].as_array().unwrap();
    let host =
        |name: &str| vols.iter().find(|v| v["name"] == name).unwrap()["hostPath"]["path"].clone();
    assert_eq!(host("bpffs"), "/sys/fs/bpf");
    assert_eq!(host("cgroup"), "/sys/fs/cgroup");
    let a = args(ds);
    assert!(a.contains(&"--config=/etc/clustermesh/agent/agent.yaml".to_string()));
    assert!(a.contains(&"--cgroup=/run/clustermesh/cgroupv2".to_string()));
}

/// bpffs on nodes where nothing mounted it (kind): a privileged init container of the same
/// image mounts it with Bidirectional propagation (as Cilium does), so the long-running
/// agent needs no CAP_SYS_ADMIN and no Bidirectional mount.
#[test]
fn bpffs_is_mounted_by_a_privileged_init_container_and_the_agent_stays_unprivileged() {
    let r = render(base()).unwrap();
    let ds = r.get("DaemonSet", "clustermesh-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let inits = pod["initContainers"].as_array().expect("init containers");
    assert_eq!(inits.len(), 1, "{inits:?}");
    let init = &inits[0];
    assert_eq!(init["name"], "mount-bpffs");
    assert_eq!(
        init["image"], agent["image"],
        "the agent image runs the init step"
    );
    assert_eq!(init["args"][0], "mount-bpffs", "the agent's subcommand");
    assert!(
        init["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--path=/sys/fs/bpf")),
        "{init}"
    );
    assert_eq!(init["securityContext"]["privileged"], true);
    let mount_of = |c: &Value, name: &str| -> Value {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} mount in {c}"))
    };
    let init_bpffs = mount_of(init, "bpffs");
    assert_eq!(init_bpffs["mountPath"], "/sys/fs/bpf");
    assert_eq!(init_bpffs["mountPropagation"], "Bidirectional");
    // Nothing else of the node is handed to the privileged step.
    assert_eq!(init["volumeMounts"].as_array().unwrap().len(), 1);

    // The long-running agent: the minimal capabilities, sees the host's mount.
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    let added: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        !added.iter().any(|c| c.contains("SYS_ADMIN")),
        "the agent container must not need CAP_SYS_ADMIN: {added:?}"
    );
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    for m in agent["volumeMounts"].as_array().unwrap() {
        assert_ne!(m["mountPropagation"], "Bidirectional", "{m}");
    }
    assert_eq!(
        mount_of(agent, "bpffs")["mountPropagation"],
        "HostToContainer"
    );
}

/// The agents serve their admin routes over TCP only with the token Secret `enable`
/// creates; the chart mounts it (optional: without it they serve /healthz and /metrics).
#[test]
fn the_agents_admin_token_secret_is_mounted_and_passed_to_the_agent() {
    for (overrides, secret) in [
        (base(), "clustermesh-agent-admin-token"),
        (
            with(json!({"tls": {"agentAdminTokenSecret": "my-token"}})),
            "my-token",
        ),
    ] {
        let r = render(overrides).unwrap();
        let ds = r.get("DaemonSet", "clustermesh-agent");
        let pod = &ds["spec"]["template"]["spec"];
        let a = args(ds);
        assert!(
            a.contains(&"--http-token-file=/etc/clustermesh/admin-token/token".to_string()),
            "{a:?}"
        );
        assert!(
            a.contains(&"--http-listen=0.0.0.0:9963".to_string()),
            "{a:?}"
        );
        let vol = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "admin-token")
            .unwrap()
            .clone();
        assert_eq!(vol["secret"]["secretName"], secret);
        assert_eq!(vol["secret"]["optional"], true);
        assert_eq!(vol["secret"]["defaultMode"], 0o400);
        assert_eq!(
            vol["secret"]["items"],
            json!([{"key": "token", "path": "token"}])
        );
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "admin-token")
            .unwrap()
            .clone();
        assert_eq!(mount["mountPath"], "/etc/clustermesh/admin-token");
        assert_eq!(mount["readOnly"], true);
    }
}

/// `agent.policy` reaches the agent as `--policy` and `--policy-peer-clusters`, and the
/// node's address as `HOST_IPS` from the downward API (the agent's `--host-ip`).
#[test]
fn agent_policy_values_become_the_agents_policy_flags_and_host_ips() {
    for (overrides, policy, peers) in [
        (base(), "--policy=true", "--policy-peer-clusters=local"),
        (
            with(json!({"agent": {"policy": {"enabled": false, "peerClusters": "all"}}})),
            "--policy=false",
            "--policy-peer-clusters=all",
        ),
        (
            with(json!({"agent": {"policy": {"peerClusters": "all"}}})),
            "--policy=true",
            "--policy-peer-clusters=all",
        ),
    ] {
        let r = render(overrides.clone()).unwrap();
        let ds = r.get("DaemonSet", "clustermesh-agent");
        let a = args(ds);
        let policy_args: Vec<&String> = a.iter().filter(|x| x.starts_with("--policy")).collect();
        assert_eq!(policy_args, [policy, peers], "{overrides}: {a:?}");
        let env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap();
        let host_ips: Vec<&Value> = env.iter().filter(|e| e["name"] == "HOST_IPS").collect();
        assert_eq!(
            host_ips,
            [
                &json!({"name": "HOST_IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}})
            ],
            "{overrides}"
        );
    }
}

/// Values printed with `toYaml` keep their type for a YAML 1.1 reader (Kubernetes reads
/// manifests through go-yaml): a node selector value `yes`, `on` or `2024-01-01` stays a
/// quoted string, as Helm prints it, instead of turning into a boolean or a date that the
/// API server would refuse for a map of strings.
#[test]
fn to_yaml_quotes_yaml_1_1_booleans_and_dates_like_helm() {
    let values = with(json!({"agent": {"nodeSelector": {
        "a": "yes", "b": "on", "c": "2024-01-01", "d": "n", "e": "~", "f": "0755", "g": "linux"}}}));
    let docs = chart().render_documents(&release(), &values).unwrap();
    let (_, text) = docs
        .iter()
        .find(|(_, t)| t.contains("kind: DaemonSet"))
        .unwrap();
    for line in [
        "        a: \"yes\"",
        "        b: \"on\"",
        "        c: \"2024-01-01\"",
        "        d: \"n\"",
        "        e: \"~\"",
        "        f: \"0755\"",
        "        g: linux",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
}

/// Mirror mode (the default): the agents' configuration says so, and every apiserver
/// replica mirrors the clusters listed in it (the same ConfigMap, mounted where the CA
/// files it names are). Direct mode: neither.
#[test]
fn mode_mirror_makes_the_apiserver_mirror_the_agent_configs_clusters() {
    for (values, kind) in [
        (base(), "Deployment"),
        (with(json!({"apiserver": {"replicas": 3}})), "StatefulSet"),
        (with(json!({"mode": "direct"})), "Deployment"),
    ] {
        let mirror = values["mode"] != "direct";
        let r = render(values.clone()).unwrap();
        let cm = r.get("ConfigMap", "clustermesh-agent-config");
        let typed: clustermesh_api::agent_config::AgentConfig =
            clustermesh_api::yaml::from_str(cm["data"]["agent.yaml"].as_str().unwrap()).unwrap();
        let want = if mirror {
            clustermesh_api::agent_config::WatchMode::Mirror
        } else {
            clustermesh_api::agent_config::WatchMode::Direct
        };
        assert_eq!(typed.mode, want, "{values}");
        let apiserver = r.get(kind, "clustermesh-apiserver");
        let a = args(apiserver);
        let flag = "--mirror-peers=/etc/clustermesh/agent/agent.yaml".to_string();
        assert_eq!(a.contains(&flag), mirror, "{values}: {a:?}");
        let pod = &apiserver["spec"]["template"]["spec"];
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "mesh-config")
            .cloned();
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "mesh-config")
            .cloned();
        if mirror {
            let mount = mount.unwrap();
            assert_eq!(mount["mountPath"], "/etc/clustermesh/agent");
            assert_eq!(mount["readOnly"], true);
            assert_eq!(
                volume.unwrap()["configMap"]["name"],
                "clustermesh-agent-config"
            );
        } else {
            assert!(mount.is_none() && volume.is_none(), "{values}");
        }
    }
}

#[test]
fn remote_clusters_appear_in_the_agent_config_with_their_ca() {
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
    let r = render(with(json!({"agent": {"remoteClusters": [
        {"name": "cluster2", "id": 2, "endpoints": ["10.0.0.2:2379"], "caCert": pem},
        {"name": "cluster3", "id": 3, "endpoints": ["10.0.0.3:2379", "10.0.0.4:2379"], "caCert": pem},
    ]}})))
    .unwrap();
    let cm = r.get("ConfigMap", "clustermesh-agent-config");
    let text = cm["data"]["agent.yaml"].as_str().unwrap();
    // The chart renders exactly the format the CLI writes and agents read.
    let typed: clustermesh_api::agent_config::AgentConfig =
        clustermesh_api::yaml::from_str(text).unwrap();
    assert_eq!(
        typed.clusters.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let config: Value = clustermesh_api::yaml::from_str(text).unwrap();
    assert_eq!(config["local_cluster"], "cluster1");
    let clusters = config["clusters"].as_array().unwrap();
    let names: Vec<&str> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["cluster1", "cluster2", "cluster3"]);
    assert_eq!(
        clusters[0]["endpoints"],
        json!(["clustermesh-apiserver.kube-system.svc:2379"])
    );
    assert_eq!(
        clusters[2]["endpoints"],
        json!(["10.0.0.3:2379", "10.0.0.4:2379"])
    );
    assert_eq!(
        clusters[1]["ca_file"],
        "/etc/clustermesh/agent/cluster2-ca.crt"
    );
    assert_eq!(cm["data"]["cluster2-ca.crt"].as_str().unwrap().trim(), pem);
}

#[test]
fn invalid_values_are_refused_with_a_message_naming_the_value() {
    let cases = [
        (json!({"cluster": {"id": 1}}), "cluster.name is required"),
        (
            json!({"cluster": {"name": "c", "id": 0}}),
            "cluster.id must be between 1",
        ),
        (
            json!({"cluster": {"name": "c", "id": 256}}),
            "cluster.id must be between 1",
        ),
        (
            with(json!({"apiserver": {"store": {"type": "zookeeper"}}})),
            "apiserver.store.type must be raft or etcd",
        ),
        (
            with(json!({"apiserver": {"store": {"type": "etcd"}}})),
            "apiserver.store.etcd.endpoints is required",
        ),
        (
            with(json!({"apiserver": {"replicas": 2}})),
            "must be 1, 3 or 5",
        ),
        (
            with(json!({"apiserver": {"service": {"type": "External"}}})),
            "apiserver.service.type must be",
        ),
        (
            with(json!({"agent": {"policy": {"peerClusters": "remote"}}})),
            "agent.policy.peerClusters must be local or all",
        ),
        (
            with(json!({"agent": {"policy": {"peerClusters": "Local"}}})),
            "agent.policy.peerClusters must be local or all",
        ),
        (with(json!({"mode": "kvstoremesh"})), "mode must be mirror"),
    ];
    for (values, want) in cases {
        let err = render(values.clone())
            .err()
            .unwrap_or_else(|| panic!("{values} rendered"));
        assert!(matches!(err, TemplateError::Fail(_)), "{err}");
        assert!(
            err.to_string().contains(want),
            "{values}: got '{err}', want '{want}'"
        );
    }
    // 511-cluster mode widens the ID range.
    assert!(
        render(json!({"cluster": {"name": "c", "id": 300, "maxConnectedClusters": 511}})).is_ok()
    );
}
