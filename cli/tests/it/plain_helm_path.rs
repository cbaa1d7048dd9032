//! The README's plain-Helm install path, followed literally: the commands of its
//! "With plain Helm" block are parsed from README.md and run — the standalone `enable`
//! with the real binary, each `kubectl create secret generic` as the Secret kubectl
//! would create, against the strict test API server, and `helm install` as the chart
//! rendered (the CLI's engine, which `helm_real.rs` compares with real Helm) with those
//! `--set` values and applied to the same server. Then the files the chart's volumes
//! project from those Secrets are written out as the pods would see them, loaded as the
//! mesh API server's and the agent's TLS material, and a real mTLS handshake between them
//! must succeed for the name the agent dials (from the rendered agent configuration).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::support;
use clustermesh_api::agent_config::AgentConfig;
use clustermesh_certs::{PeerIdentity, TlsMaterial, TlsPaths, TrustDomain};
use clustermesh_cli::chart::{Chart, Release};
use clustermesh_test_support::fake_kube::{base64, kubeconfig, plural_of, FakeKube};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{json, Value};
use support::run_cli;

const NS: &str = "kube-system";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shell commands of the README's plain-Helm block (continuation lines joined,
/// comments dropped), each split into words (double quotes respected).
fn readme_commands() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = &readme[readme.find("### With plain Helm").expect("section")..];
    let block = &section[section.find("```sh\n").expect("sh block") + 6..];
    let block = &block[..block.find("```").unwrap()];
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                commands.push(words(&current));
                current.clear();
            }
        }
    }
    commands
}

fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// `kubectl … create secret generic NAME [--type=T] --from-file=K=PATH --from-literal=K=V`
/// as the Secret kubectl sends.
fn kubectl_secret(args: &[String], cwd: &Path) -> Value {
    let at = args
        .iter()
        .position(|a| a == "generic")
        .expect("create secret generic");
    let name = &args[at + 1];
    let mut data = BTreeMap::new();
    let mut kind = "Opaque".to_owned();
    for a in &args[at + 2..] {
        if let Some(t) = a.strip_prefix("--type=") {
            kind = t.to_owned();
        } else if let Some(kv) = a.strip_prefix("--from-file=") {
            let (k, path) = kv.split_once('=').unwrap();
            data.insert(
                k.to_owned(),
                base64(&std::fs::read(cwd.join(path)).unwrap()),
            );
        } else if let Some(kv) = a.strip_prefix("--from-literal=") {
            let (k, v) = kv.split_once('=').unwrap();
            // `$(openssl rand -hex 32)`: any 64 hex digits.
            let v = if v.starts_with("$(") {
                "ab".repeat(32)
            } else {
                v.to_owned()
            };
            data.insert(k.to_owned(), base64(v.as_bytes()));
        } else if !a.starts_with("--") {
            panic!("unexpected kubectl argument {a}");
        }
    }
    json!({"apiVersion": "v1", "kind": "Secret", "type": kind,
           "metadata": {"name": name, "namespace": NS}, "data": data})
}

/// `helm install RELEASE CHART -n NS --set K=V…` as values.
fn helm_values(args: &[String]) -> (String, Value) {
    assert_eq!(args[1], "install");
    let mut values = json!({});
    let mut it = args.iter().skip(4);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--set" => {
                let set = clustermesh_cli::k8s::values::parse_set(it.next().unwrap()).unwrap();
                clustermesh_cli::chart::merge_values(&mut values, &set);
            }
            "-n" => assert_eq!(it.next().unwrap(), NS),
            other => panic!("unexpected helm argument {other}"),
        }
    }
    (args[3].clone(), values)
}

async fn client(fake: &FakeKube, dir: &Path) -> kube::Client {
    let kc = kubeconfig(dir, &[("east", fake)]);
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kc).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

async fn apply(client: &kube::Client, obj: &Value) {
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
    let name = obj["metadata"]["name"].as_str().unwrap();
    let pp = PatchParams::apply("helm").force().validation_strict();
    api.patch(name, &pp, &Patch::Apply(obj))
        .await
        .unwrap_or_else(|e| panic!("{kind} {name}: {e}"));
}

/// The decoded data of a stored Secret or ConfigMap.
fn stored_data(fake: &FakeKube, plural: &str, name: &str) -> BTreeMap<String, Vec<u8>> {
    let obj = fake
        .object(&format!("/api/v1/namespaces/{NS}/{plural}/{name}"))
        .unwrap_or_else(|| panic!("{plural}/{name} is mounted but does not exist"));
    let data = obj["data"].as_object().cloned().unwrap_or_default();
    data.into_iter()
        .map(|(k, v)| {
            let text = v.as_str().unwrap();
            let bytes = if plural == "secrets" {
                unbase64(text)
            } else {
                text.as_bytes().to_vec()
            };
            (k, bytes)
        })
        .collect()
}

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
    let clean: Vec<u8> = text.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Writes the files of one volume as the kubelet projects them: `items` key → path, or
/// every key.
fn project(fake: &FakeKube, plural: &str, source: &Value, dir: &Path) {
    let name = source["name"]
        .as_str()
        .or_else(|| source["secretName"].as_str())
        .unwrap();
    let data = stored_data(fake, plural, name);
    let items: Vec<(String, String)> = match source["items"].as_array() {
        Some(items) => items
            .iter()
            .map(|i| {
                (
                    i["key"].as_str().unwrap().to_owned(),
                    i["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    std::fs::create_dir_all(dir).unwrap();
    for (key, path) in items {
        let bytes = data
            .get(&key)
            .unwrap_or_else(|| panic!("{plural}/{name} has no key {key} the chart mounts"));
        std::fs::write(dir.join(path), bytes).unwrap();
    }
}

/// A container's filesystem as far as Secret/ConfigMap volumes go: mount path → local
/// directory holding the projected files.
struct Mounts(Vec<(String, PathBuf)>);

impl Mounts {
    fn of(fake: &FakeKube, pod: &Value, container: &str, root: &Path) -> Self {
        let c = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == container)
            .unwrap();
        let mut mounts = Vec::new();
        for m in c["volumeMounts"].as_array().unwrap() {
            let name = m["name"].as_str().unwrap();
            let v = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .unwrap();
            let dir = root.join(container).join(name);
            if v["secret"].is_object() {
                if v["secret"]["optional"] == true
                    && fake
                        .object(&format!(
                            "/api/v1/namespaces/{NS}/secrets/{}",
                            v["secret"]["secretName"].as_str().unwrap()
                        ))
                        .is_none()
                {
                    continue;
                }
                project(fake, "secrets", &v["secret"], &dir);
            } else if v["configMap"].is_object() {
                project(fake, "configmaps", &v["configMap"], &dir);
            } else if let Some(sources) = v["projected"]["sources"].as_array() {
                for s in sources {
                    if s["secret"].is_object() {
                        project(fake, "secrets", &s["secret"], &dir);
                    } else if s["configMap"].is_object() {
                        project(fake, "configmaps", &s["configMap"], &dir);
                    }
                }
            } else {
                continue;
            }
            mounts.push((m["mountPath"].as_str().unwrap().to_owned(), dir));
        }
        Self(mounts)
    }

    /// The local file for a path inside the container.
    fn local(&self, path: &str) -> PathBuf {
        let (mount, dir) = self
            .0
            .iter()
            .filter(|(m, _)| path.starts_with(&format!("{m}/")))
            .max_by_key(|(m, _)| m.len())
            .unwrap_or_else(|| panic!("{path} is on no Secret/ConfigMap mount: {:?}", self.0));
        dir.join(&path[mount.len() + 1..])
    }
}

fn arg<'a>(args: &'a [Value], flag: &str) -> &'a str {
    args.iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_plain_helm_path_gives_agents_a_server_certificate_they_accept() {
    let commands = readme_commands();
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let fake = FakeKube::start().await;
    let client = client(&fake, cwd).await;
    let mut rendered: Vec<Value> = Vec::new();
    let mut ran = Vec::new();
    for cmd in &commands {
        match cmd[0].as_str() {
            "clustermesh" => {
                let args: Vec<String> = cmd[1..]
                    .iter()
                    .map(|a| a.replace("ADDRESS", "192.0.2.1"))
                    .collect();
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_clustermesh"))
                    .args(&args)
                    .current_dir(cwd)
                    .env_remove("CLUSTERMESH_STATE_DIR")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            "kubectl" => {
                let secret = kubectl_secret(cmd, cwd);
                let api: Api<k8s_openapi::api::core::v1::Secret> =
                    Api::namespaced(client.clone(), NS);
                let typed = serde_json::from_value(secret).unwrap();
                api.create(&Default::default(), &typed)
                    .await
                    .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            }
            "helm" => {
                let (chart, values) = helm_values(cmd);
                let chart = Chart::load(&repo().join(chart)).unwrap();
                let release = Release {
                    name: cmd[2].clone(),
                    namespace: NS.into(),
                };
                for (_, text) in chart.render_documents(&release, &values).unwrap() {
                    let doc: Value = clustermesh_api::yaml::from_str(&text).unwrap();
                    if !doc.is_null() {
                        apply(&client, &doc).await;
                        rendered.push(doc);
                    }
                }
            }
            other => panic!("unexpected command {other} in the README block"),
        }
        ran.push(cmd[0].clone());
    }
    assert!(
        ran.iter().filter(|c| *c == "kubectl").count() >= 4,
        "{ran:?}"
    );
    assert_eq!(ran.last().map(String::as_str), Some("helm"));

    let find = |kind: &str, name: &str| {
        rendered
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
            .clone()
    };
    let td = TrustDomain::new("clustermesh.local").unwrap();

    // The mesh API server's pod, as the chart mounts it.
    let deployment = find("Deployment", "clustermesh-apiserver");
    let pod = &deployment["spec"]["template"]["spec"];
    let server_mounts = Mounts::of(&fake, pod, "apiserver", cwd);
    let args = pod["containers"][0]["args"].as_array().unwrap();
    let tls_dir = server_mounts.local(&format!("{}/x", arg(args, "--tls-dir")));
    let tls_dir = tls_dir.parent().unwrap();
    let server = TlsMaterial::load(td.clone(), &TlsPaths::server(tls_dir))
        .expect("the mounted server TLS files load");
    assert_eq!(
        server.identity().to_string(),
        "spiffe://clustermesh.local/cluster/east"
    );
    let replica = TlsMaterial::load(
        td.clone(),
        &TlsPaths {
            ca: tls_dir.join("ca.crt"),
            cert: server_mounts.local(arg(args, "--replica-cert")),
            key: server_mounts.local(arg(args, "--replica-key")),
        },
    )
    .expect("the mounted replica files load");
    assert_eq!(
        replica.identity().to_string(),
        "spiffe://clustermesh.local/cluster/east/replica/1"
    );

    // The agent's pod and configuration.
    let ds = find("DaemonSet", "clustermesh-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let agent_mounts = Mounts::of(&fake, pod, "agent", cwd);
    let config_path = arg(pod["containers"][0]["args"].as_array().unwrap(), "--config");
    let config: AgentConfig = clustermesh_api::yaml::from_str(
        &std::fs::read_to_string(agent_mounts.local(config_path)).unwrap(),
    )
    .unwrap();
    let own = &config.clusters[0];
    assert_eq!(own.name, "east");
    let dialed = own.endpoints[0].rsplit_once(':').unwrap().0.to_owned();
    assert_eq!(dialed, format!("clustermesh-apiserver.{NS}.svc"));
    let agent = TlsMaterial::load(
        td,
        &TlsPaths {
            ca: agent_mounts.local(own.ca_file.to_str().unwrap()),
            cert: agent_mounts.local(config.cert_file.to_str().unwrap()),
            key: agent_mounts.local(config.key_file.to_str().unwrap()),
        },
    )
    .expect("the mounted agent TLS files load")
    .with_unlabelled_ca_cluster("east");
    assert_eq!(
        agent.identity().to_string(),
        "spiffe://clustermesh.local/cluster/east/agent"
    );
    let token = agent_mounts.local("/etc/clustermesh/admin-token/token");
    assert_eq!(
        std::fs::read(token).unwrap().len(),
        64,
        "the admin token is mounted"
    );

    // A real mTLS handshake on loopback, the agent verifying the name it dials.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.server_config().unwrap()));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await?;
        let chain = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
        Ok::<_, std::io::Error>(chain)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(agent.client_config().unwrap()));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(dialed.clone()).unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("the agent refuses the server certificate for {dialed}: {e}"));
    let server_chain = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    let td = TrustDomain::new("clustermesh.local").unwrap();
    assert_eq!(
        PeerIdentity::from_chain(Some(server_chain.as_slice()), &td)
            .unwrap()
            .to_string(),
        "spiffe://clustermesh.local/cluster/east"
    );
    let client_chain = accept
        .await
        .unwrap()
        .expect("the server accepts the agent")
        .unwrap();
    assert_eq!(
        PeerIdentity::from_chain(Some(client_chain.as_slice()), &td)
            .unwrap()
            .to_string(),
        "spiffe://clustermesh.local/cluster/east/agent"
    );
}

#[tokio::test]
async fn a_plain_helm_install_can_be_taken_over_by_clustermesh_enable() {
    // The README's Secrets have the types enable writes, so the move from the plain
    // Helm path to `clustermesh enable` is not refused with a Secret type change.
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path();
    let fake = FakeKube::start().await;
    let client = client(&fake, cwd).await;
    for cmd in readme_commands() {
        match cmd[0].as_str() {
            "clustermesh" => {
                let args: Vec<String> = cmd[1..]
                    .iter()
                    .map(|a| a.replace("ADDRESS", "192.0.2.1"))
                    .collect();
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_clustermesh"))
                    .args(&args)
                    .current_dir(cwd)
                    .output()
                    .unwrap();
                assert!(out.status.success());
            }
            "kubectl" => {
                let api: Api<k8s_openapi::api::core::v1::Secret> =
                    Api::namespaced(client.clone(), NS);
                let typed = serde_json::from_value(kubectl_secret(&cmd, cwd)).unwrap();
                api.create(&Default::default(), &typed).await.unwrap();
            }
            _ => {}
        }
    }
    let kc = kubeconfig(cwd, &[("east", &fake)]);
    let r = run_cli(
        &kc,
        &[
            "--context",
            "east",
            "enable",
            "--cluster-name",
            "east",
            "--cluster-id",
            "1",
        ],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert!(!r.stdout.contains("recreated"), "{}", r.stdout);
}
