//! What one cluster's mesh looks like in its Kubernetes API, and `connect`/`disconnect`.
//!
//! Both verbs read and validate everything on both sides first (settings, CAs, agent
//! configurations, mesh API addresses), then write with resourceVersion-guarded replaces
//! in a fixed order: server certificates, CA bundles (so each mesh API server already
//! trusts the peer's agents), then agent configurations (which make the agents dial).
//! If a write fails, the writes before it are undone in reverse order, so both clusters
//! end as they were; the error line says so, or names what could not be undone.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use clustermesh_certs::inspect::CertInfo;
use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::{MeshCa, ServerNames, TrustDomain, Validity};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::KubeModeError;
use super::objects::{
    remote_ca_key, secret_text, set_secret_text, MeshConfig, Objects, AGENT_CONFIG_KEY,
    AGENT_CONFIG_MAP, APISERVER_SERVICE, CA_BUNDLE_KEY, CA_BUNDLE_SECRET, CA_SECRET, CONFIG_MAP,
    RELEASE_NAME, SERVER_SECRET,
};
use super::KubeTarget;
use crate::chart::Release;
use crate::standalone::{bundle_with, bundle_without, pem_blocks};
use clustermesh_api::agent_config::AgentConfig;

const RECREATE: &str =
    "run `clustermesh disable --force` and `enable` again on that context (peers must reconnect)";

/// A cluster this one's agents watch besides their own, as the chart's
/// `agent.remoteClusters` value holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteCluster {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// Mesh API `host:port` addresses.
    pub endpoints: Vec<String>,
    /// The cluster's CA certificate, PEM.
    #[serde(rename = "caCert")]
    pub ca_cert: String,
}

/// Chart values for a cluster with `remotes` connected: the user's stored overrides
/// (`config.values`), then what the CLI manages itself on top.
#[must_use]
pub fn chart_values(config: &MeshConfig, remotes: &[RemoteCluster]) -> Value {
    let mut values = config.values.clone();
    if !values.is_object() {
        values = json!({});
    }
    crate::chart::merge_values(&mut values, &managed_values(config, remotes));
    values
}

fn managed_values(config: &MeshConfig, remotes: &[RemoteCluster]) -> Value {
    json!({
        "cluster": {
            "name": config.name,
            "id": config.id,
            "maxConnectedClusters": config.max_connected_clusters,
        },
        "trustDomain": config.trust_domain,
        "apiserver": { "service": { "type": config.service_type.as_str() } },
        "agent": { "remoteClusters": remotes },
    })
}

/// The release the chart is rendered as in `namespace`.
#[must_use]
pub fn release(namespace: &str) -> Release {
    Release {
        name: RELEASE_NAME.into(),
        namespace: namespace.into(),
    }
}

/// The `data` of the agent ConfigMap exactly as the chart renders it for these values, so
/// `connect` and a later `enable` (upgrade) write the same thing.
pub fn rendered_agent_data(
    namespace: &str,
    config: &MeshConfig,
    remotes: &[RemoteCluster],
) -> Result<BTreeMap<String, String>, KubeModeError> {
    let chart = super::embedded::chart()?;
    let docs = chart.render_documents(&release(namespace), &chart_values(config, remotes))?;
    for (template, doc) in docs {
        let v: Value = serde_yaml::from_str(&doc).map_err(|e| KubeModeError::BadManifest {
            template: template.clone(),
            reason: e.to_string(),
        })?;
        if v["kind"] != "ConfigMap" || v["metadata"]["name"] != AGENT_CONFIG_MAP {
            continue;
        }
        let data: BTreeMap<String, String> =
            serde_json::from_value(v["data"].clone()).map_err(|e| KubeModeError::BadManifest {
                template: template.clone(),
                reason: format!("data: {e}"),
            })?;
        let text = data
            .get(AGENT_CONFIG_KEY)
            .ok_or_else(|| KubeModeError::BadManifest {
                template: template.clone(),
                reason: format!("no {AGENT_CONFIG_KEY} key"),
            })?;
        AgentConfig::parse(Path::new(AGENT_CONFIG_KEY), text).map_err(|e| {
            KubeModeError::BadManifest {
                template: template.clone(),
                reason: e.to_string(),
            }
        })?;
        return Ok(data);
    }
    Err(KubeModeError::BadManifest {
        template: "agent-config.yaml".into(),
        reason: format!("the chart renders no ConfigMap {AGENT_CONFIG_MAP}"),
    })
}

/// Host part of a `host:port` endpoint (IPv6 brackets removed).
#[must_use]
pub fn endpoint_host(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn endpoint(host: &str, port: i32) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// Reads the cluster's mesh settings; `None` if the mesh is not enabled there.
pub async fn read_config(objs: &Objects<'_>) -> Result<Option<MeshConfig>, KubeModeError> {
    let Some(cm) = objs.config_map(CONFIG_MAP).await? else {
        return Ok(None);
    };
    let data = cm.data.unwrap_or_default();
    MeshConfig::from_data(&data).map(Some).map_err(|reason| {
        let fix = if reason.starts_with(&format!("key {}", super::values::VALUES_KEY)) {
            "fix or remove that key (`kubectl edit configmap clustermesh-config`), then run `enable` again with the --set/--values you want"
        } else {
            "run `enable` again with this cluster's --cluster-name and --cluster-id"
        };
        objs.malformed(format!("ConfigMap {CONFIG_MAP}"), reason, fix)
    })
}

/// The cluster's CA certificate (one PEM block) and key from [`CA_SECRET`].
pub fn ca_from_secret(
    objs: &Objects<'_>,
    secret: &Secret,
) -> Result<(String, String), KubeModeError> {
    let bad = |reason: String| objs.malformed(format!("Secret {CA_SECRET}"), reason, RECREATE);
    let cert = secret_text(secret, "tls.crt").ok_or_else(|| bad("no tls.crt".into()))?;
    let key = secret_text(secret, "tls.key").ok_or_else(|| bad("no tls.key".into()))?;
    let blocks = pem_blocks(&cert);
    match blocks.as_slice() {
        [one] => Ok((one.clone(), key)),
        _ => Err(bad(format!(
            "tls.crt holds {} certificates, expected exactly the cluster's CA",
            blocks.len()
        ))),
    }
}

/// The remote clusters listed in the agent ConfigMap, with their pinned CAs.
pub fn remote_clusters(
    objs: &Objects<'_>,
    cm: &ConfigMap,
) -> Result<(AgentConfig, Vec<RemoteCluster>), KubeModeError> {
    let object = format!("ConfigMap {AGENT_CONFIG_MAP}");
    const FIX: &str = "run `enable` again to rewrite it (connected clusters listed in it are kept only if it parses), or restore it";
    let data = cm.data.clone().unwrap_or_default();
    let text = data
        .get(AGENT_CONFIG_KEY)
        .ok_or_else(|| objs.malformed(object.clone(), format!("no {AGENT_CONFIG_KEY} key"), FIX))?;
    let agent = AgentConfig::parse(Path::new(AGENT_CONFIG_KEY), text)
        .map_err(|e| objs.malformed(object.clone(), e.to_string(), FIX))?;
    let mut remotes = Vec::new();
    for c in agent.remotes() {
        let ca = data.get(&remote_ca_key(&c.name)).ok_or_else(|| {
            objs.malformed(
                object.clone(),
                format!(
                    "no {} key for connected cluster {}",
                    remote_ca_key(&c.name),
                    c.name
                ),
                FIX,
            )
        })?;
        remotes.push(RemoteCluster {
            name: c.name.clone(),
            id: c.id,
            endpoints: c.endpoints.clone(),
            ca_cert: ca.clone(),
        });
    }
    Ok((agent, remotes))
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// At most this many node addresses are listed for a NodePort mesh API.
pub const MAX_NODE_ENDPOINTS: usize = 3;

/// Where other clusters reach this cluster's mesh API: the LoadBalancer ingress and
/// Service port, or up to [`MAX_NODE_ENDPOINTS`] nodes' InternalIPs (ready nodes first,
/// by name) and the node port.
pub async fn mesh_endpoints(objs: &Objects<'_>) -> Result<Vec<String>, KubeModeError> {
    let svc = objs
        .service(APISERVER_SERVICE)
        .await?
        .ok_or_else(|| objs.not_enabled(format!("Service {APISERVER_SERVICE}")))?;
    endpoints_of(objs, &svc).await
}

/// [`mesh_endpoints`] of an already fetched apiserver Service `svc` (nodes are still
/// listed for a NodePort).
pub async fn endpoints_of(objs: &Objects<'_>, svc: &Service) -> Result<Vec<String>, KubeModeError> {
    let where_ = format!(
        "Service {APISERVER_SERVICE} in namespace {} of context {}",
        objs.namespace(),
        objs.context()
    );
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec.ports.clone().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .or_else(|| ports.first())
        .ok_or_else(|| {
            KubeModeError::NoAddress(format!(
                "{where_} has no ports; run `clustermesh --context {} enable` again to restore it",
                objs.context()
            ))
        })?;
    match spec.type_.as_deref() {
        Some("LoadBalancer") => {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.clone())
                .unwrap_or_default();
            let host = ingress
                .iter()
                .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .ok_or_else(|| {
                    KubeModeError::NoAddress(format!(
                        "{where_} is a LoadBalancer with no external address yet; wait for the load balancer and retry, or run `clustermesh --context {} enable --service-type NodePort` (same name and ID)",
                        objs.context()
                    ))
                })?;
            Ok(vec![endpoint(&host, port.port)])
        }
        Some("NodePort") => {
            let node_port = port.node_port.filter(|p| *p > 0).ok_or_else(|| {
                KubeModeError::NoAddress(format!(
                    "{where_} has no node port assigned yet; retry in a moment"
                ))
            })?;
            let mut nodes: Vec<(bool, String, String)> = objs
                .nodes()
                .await?
                .iter()
                .filter_map(|n| {
                    let ip = internal_ip(n)?;
                    Some((!node_ready(n), n.metadata.name.clone().unwrap_or_default(), ip))
                })
                .collect();
            nodes.sort();
            if nodes.is_empty() {
                return Err(KubeModeError::NoAddress(format!(
                    "{where_} is a NodePort but no node of context {} has an InternalIP; check `kubectl get nodes -o wide`",
                    objs.context()
                )));
            }
            Ok(nodes
                .iter()
                .take(MAX_NODE_ENDPOINTS)
                .map(|(_, _, ip)| endpoint(ip, node_port))
                .collect())
        }
        other => Err(KubeModeError::NoAddress(format!(
            "{where_} has type {}, which other clusters cannot reach; run `clustermesh --context {} enable --service-type LoadBalancer` (or NodePort) with the same name and ID",
            other.unwrap_or("ClusterIP"),
            objs.context()
        ))),
    }
}

/// The SANs of a server certificate PEM (empty if it does not parse).
#[must_use]
pub fn server_names_of(cert_pem: &str) -> (Vec<String>, Vec<IpAddr>) {
    let Ok(der) = clustermesh_certs::pem::parse_certs(cert_pem.as_bytes()) else {
        return (Vec::new(), Vec::new());
    };
    match der.first().map(|d| CertInfo::from_der(d.as_ref())) {
        Some(Ok(info)) => (info.dns_names, info.ips),
        _ => (Vec::new(), Vec::new()),
    }
}

/// `names` plus the hosts of `endpoints`; `None` if they are already all covered.
#[must_use]
pub fn names_covering(dns: &[String], ips: &[IpAddr], endpoints: &[String]) -> Option<ServerNames> {
    let mut dns: Vec<String> = dns.to_vec();
    let mut ips: Vec<IpAddr> = ips.to_vec();
    let mut changed = false;
    for e in endpoints {
        let host = endpoint_host(e);
        match host.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => {
                ips.push(ip);
                changed = true;
            }
            Ok(_) => {}
            Err(_) if !dns.iter().any(|d| d == host) => {
                dns.push(host.to_string());
                changed = true;
            }
            Err(_) => {}
        }
    }
    changed.then(|| ServerNames::new(dns, ips))
}

/// One side of `connect`/`disconnect`, fully read.
struct Side<'a> {
    objs: Objects<'a>,
    config: MeshConfig,
    ca_cert: String,
    ca_key: String,
    bundle: Secret,
    bundle_pem: String,
    server: Secret,
    agent_cm: ConfigMap,
    agent: AgentConfig,
    remotes: Vec<RemoteCluster>,
}

impl<'a> Side<'a> {
    async fn load(target: &'a KubeTarget) -> Result<Self, KubeModeError> {
        let objs = Objects::new(target);
        let config = read_config(&objs)
            .await?
            .ok_or_else(|| objs.not_enabled(format!("ConfigMap {CONFIG_MAP}")))?;
        let ca = objs
            .secret(CA_SECRET)
            .await?
            .ok_or_else(|| objs.not_enabled(format!("CA Secret {CA_SECRET}")))?;
        let (ca_cert, ca_key) = ca_from_secret(&objs, &ca)?;
        let bundle = objs
            .secret(CA_BUNDLE_SECRET)
            .await?
            .ok_or_else(|| objs.not_enabled(format!("Secret {CA_BUNDLE_SECRET}")))?;
        let bundle_pem = secret_text(&bundle, CA_BUNDLE_KEY).unwrap_or_default();
        if !pem_blocks(&bundle_pem).contains(&ca_cert) {
            return Err(objs.malformed(
                format!("Secret {CA_BUNDLE_SECRET}"),
                format!("{CA_BUNDLE_KEY} does not contain the cluster's own CA"),
                "run `enable` again on that context to restore it",
            ));
        }
        let server = objs
            .secret(SERVER_SECRET)
            .await?
            .ok_or_else(|| objs.not_enabled(format!("Secret {SERVER_SECRET}")))?;
        let agent_cm = objs
            .config_map(AGENT_CONFIG_MAP)
            .await?
            .ok_or_else(|| objs.not_enabled(format!("ConfigMap {AGENT_CONFIG_MAP}")))?;
        let (agent, remotes) = remote_clusters(&objs, &agent_cm)?;
        if agent.local_cluster != config.name {
            return Err(objs.malformed(
                format!("ConfigMap {AGENT_CONFIG_MAP}"),
                format!(
                    "it is for cluster {} but ConfigMap {CONFIG_MAP} says {}",
                    agent.local_cluster, config.name
                ),
                "run `enable` again on that context to rewrite it",
            ));
        }
        Ok(Self {
            objs,
            config,
            ca_cert,
            ca_key,
            bundle,
            bundle_pem,
            server,
            agent_cm,
            agent,
            remotes,
        })
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn context(&self) -> &str {
        self.objs.context()
    }

    /// Names and IDs of every cluster this side knows (itself and its peers).
    fn known(&self) -> Vec<(String, u32)> {
        self.agent
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.id))
            .collect()
    }

    fn pinned_ca(&self, peer: &str) -> Option<&str> {
        self.remotes
            .iter()
            .find(|r| r.name == peer)
            .map(|r| r.ca_cert.as_str())
    }

    /// The agent ConfigMap with `remotes` as its remote clusters.
    fn agent_cm_with(&self, remotes: &[RemoteCluster]) -> Result<ConfigMap, KubeModeError> {
        let data = rendered_agent_data(self.objs.namespace(), &self.config, remotes)?;
        let mut cm = self.agent_cm.clone();
        cm.data = Some(data);
        cm.binary_data = None;
        Ok(cm)
    }

    /// The agent ConfigMap change that makes `remotes` its remote clusters, if that
    /// changes its data.
    fn agent_change(&self, remotes: &[RemoteCluster]) -> Result<Option<Change>, KubeModeError> {
        let new = self.agent_cm_with(remotes)?;
        Ok((new.data != self.agent_cm.data).then(|| Change::ConfigMap {
            old: self.agent_cm.clone(),
            new,
        }))
    }

    /// This side's remote clusters without `peer`.
    fn remotes_without(&self, peer: &str) -> Vec<RemoteCluster> {
        self.remotes
            .iter()
            .filter(|r| r.name != peer)
            .cloned()
            .collect()
    }

    fn bad_bundle(&self, e: &clustermesh_certs::trust_bundle::BundleError) -> KubeModeError {
        KubeModeError::CaMismatch(format!(
            "the trust bundle of cluster {} (Secret {CA_BUNDLE_SECRET}, key {CA_BUNDLE_KEY}) is unreadable: {e}; fix it or run `clustermesh enable` again",
            self.name()
        ))
    }

    /// The CA bundle Secret change that makes `pem` its bundle, if that differs.
    fn bundle_change(&self, pem: &str) -> Option<Change> {
        (pem != self.bundle_pem).then(|| {
            let mut new = self.bundle.clone();
            set_secret_text(&mut new, CA_BUNDLE_KEY, pem);
            Change::Secret {
                old: self.bundle.clone(),
                new,
            }
        })
    }

    /// The server Secret reissued so it also covers `endpoints`, if it does not yet.
    fn server_covering(&self, endpoints: &[String]) -> Result<Option<Secret>, KubeModeError> {
        let cert = secret_text(&self.server, "tls.crt").unwrap_or_default();
        let (dns, ips) = server_names_of(&cert);
        let Some(names) = names_covering(&dns, &ips, endpoints) else {
            return Ok(None);
        };
        let issue = |e: clustermesh_certs::IssueError| KubeModeError::Issue(e.to_string());
        let td = TrustDomain::new(self.config.trust_domain.clone())
            .map_err(|e| KubeModeError::Issue(e.to_string()))?;
        let ca = MeshCa::from_pem(td, &self.ca_cert, &self.ca_key).map_err(issue)?;
        let leaf = ca
            .issue_server(
                &self.config.name,
                &names,
                Validity::from_now(DEFAULT_LEAF_VALIDITY),
            )
            .map_err(issue)?;
        let mut s = self.server.clone();
        set_secret_text(&mut s, "tls.crt", &leaf.cert_pem);
        set_secret_text(&mut s, "tls.key", &leaf.key_pem);
        set_secret_text(&mut s, "ca.crt", &self.ca_cert);
        Ok(Some(s))
    }
}

/// Refuses a pair that is one cluster seen twice: the same context and namespace, or the
/// same CA (the error names which).
fn self_connect(a: &Side<'_>, b: &Side<'_>) -> Result<(), KubeModeError> {
    let same_place = a.context() == b.context() && a.objs.namespace() == b.objs.namespace();
    let why = if same_place {
        Some("same context and namespace")
    } else if a.ca_cert == b.ca_cert {
        Some("same CA")
    } else {
        None
    };
    if let Some(why) = why {
        return Err(KubeModeError::SelfConnect {
            name: a.name().to_string(),
            source_context: a.context().to_string(),
            destination_context: b.context().to_string(),
            why,
        });
    }
    Ok(())
}

fn check_pair(a: &Side<'_>, b: &Side<'_>) -> Result<(), KubeModeError> {
    self_connect(a, b)?;
    if a.name() == b.name() {
        return Err(KubeModeError::Duplicate(format!(
            "the clusters of contexts {} and {} are both named {}",
            a.context(),
            b.context(),
            a.name()
        )));
    }
    if a.config.id == b.config.id {
        return Err(KubeModeError::Duplicate(format!(
            "clusters {} (context {}) and {} (context {}) both have ID {}",
            a.name(),
            a.context(),
            b.name(),
            b.context(),
            a.config.id
        )));
    }
    if a.config.trust_domain != b.config.trust_domain {
        return Err(KubeModeError::CaMismatch(format!(
            "cluster {} uses trust domain {} but {} uses {}; enable both with the same --trust-domain",
            a.name(),
            a.config.trust_domain,
            b.name(),
            b.config.trust_domain
        )));
    }
    if a.config.max_connected_clusters != b.config.max_connected_clusters {
        return Err(KubeModeError::Invalid(format!(
            "cluster {} is enabled for {} clusters but {} for {}; enable both with the same --max-connected-clusters",
            a.name(),
            a.config.max_connected_clusters,
            b.name(),
            b.config.max_connected_clusters
        )));
    }
    for (x, y) in [(a, b), (b, a)] {
        for (name, id) in x.known() {
            for (other_name, other_id) in y.known() {
                if name == other_name && id != other_id {
                    return Err(KubeModeError::Duplicate(format!(
                        "cluster name {name} is used with ID {id} in {}'s mesh and with ID {other_id} in {}'s mesh",
                        x.name(),
                        y.name()
                    )));
                }
                if id == other_id && name != other_name {
                    return Err(KubeModeError::Duplicate(format!(
                        "cluster ID {id} is used by {name} (known to {}) and by {other_name} (known to {})",
                        x.name(),
                        y.name()
                    )));
                }
            }
        }
        if let Some(pinned) = x.pinned_ca(y.name()) {
            if !pem_blocks(pinned).contains(&y.ca_cert) {
                return Err(KubeModeError::CaMismatch(format!(
                    "{} (context {}) pinned a different CA for {} than {} (context {}) has now; {} was re-enabled since: run `clustermesh --context {} --destination-context {} disconnect`, then connect again",
                    x.name(),
                    x.context(),
                    y.name(),
                    y.name(),
                    y.context(),
                    y.name(),
                    x.context(),
                    y.context()
                )));
            }
        }
    }
    Ok(())
}

/// One object to write: what was read, and what to store instead.
#[derive(Debug)]
enum Change {
    Secret { old: Secret, new: Secret },
    ConfigMap { old: ConfigMap, new: ConfigMap },
}

impl Change {
    fn label(&self) -> String {
        match self {
            Self::Secret { old, .. } => {
                format!("Secret {}", old.metadata.name.clone().unwrap_or_default())
            }
            Self::ConfigMap { old, .. } => {
                format!(
                    "ConfigMap {}",
                    old.metadata.name.clone().unwrap_or_default()
                )
            }
        }
    }
}

/// Writes `changes` in order; on failure undoes the ones written before, in reverse order.
async fn commit(changes: Vec<(&Objects<'_>, Change)>) -> Result<usize, KubeModeError> {
    // resourceVersion of each object as stored by our write, for guarded undo.
    let mut written: Vec<(usize, Option<String>)> = Vec::new();
    let mut failure = None;
    for (i, (objs, change)) in changes.iter().enumerate() {
        let result = match change {
            Change::Secret { new, .. } => objs
                .replace("Secret", new)
                .await
                .map(|s| s.metadata.resource_version),
            Change::ConfigMap { new, .. } => objs
                .replace("ConfigMap", new)
                .await
                .map(|c| c.metadata.resource_version),
        };
        match result {
            Ok(rv) => {
                tracing::debug!(context = objs.context(), object = %change.label(), "written");
                written.push((i, rv));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let Some(failure) = failure else {
        return Ok(changes.len());
    };
    let mut undo_errors = Vec::new();
    for (i, rv) in written.iter().rev() {
        let (objs, change) = &changes[*i];
        let result = match change {
            Change::Secret { old, .. } => {
                let mut o = old.clone();
                o.metadata.resource_version.clone_from(rv);
                o.metadata.managed_fields = None;
                objs.replace("Secret", &o).await.map(|_| ())
            }
            Change::ConfigMap { old, .. } => {
                let mut o = old.clone();
                o.metadata.resource_version.clone_from(rv);
                o.metadata.managed_fields = None;
                objs.replace("ConfigMap", &o).await.map(|_| ())
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "undo failed");
            undo_errors.push(format!("{} in context {}", change.label(), objs.context()));
        }
    }
    let rollback = if undo_errors.is_empty() {
        if written.is_empty() {
            "nothing was changed on either cluster".to_string()
        } else {
            format!(
                "the {} earlier write(s) were undone, both clusters are as they were",
                written.len()
            )
        }
    } else {
        format!(
            "undoing the earlier writes failed for {}: run the same command again once the API servers answer, or `disconnect`",
            undo_errors.join(", ")
        )
    };
    Err(KubeModeError::Partial {
        failure: Box::new(failure),
        rollback,
    })
}

/// What `connect` did.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// Source cluster.
    pub source: String,
    /// Destination cluster.
    pub destination: String,
    /// Where the destination's agents reach the source.
    pub source_endpoints: Vec<String>,
    /// Where the source's agents reach the destination.
    pub destination_endpoints: Vec<String>,
    /// Whether they were already connected (configuration refreshed).
    pub already_connected: bool,
    /// Objects written.
    pub objects_written: usize,
}

fn upserted(remotes: &[RemoteCluster], add: RemoteCluster) -> Vec<RemoteCluster> {
    let mut out: Vec<RemoteCluster> = remotes
        .iter()
        .filter(|r| r.name != add.name)
        .cloned()
        .collect();
    out.push(add);
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Connects the clusters of two contexts in both directions: each mesh API server trusts
/// the other's CA, each cluster's agents list the other (endpoint, ID, pinned CA), and
/// each server certificate covers the address the other side dials.
pub async fn connect(src: &KubeTarget, dst: &KubeTarget) -> Result<ConnectReport, KubeModeError> {
    let a = Side::load(src).await?;
    let b = Side::load(dst).await?;
    check_pair(&a, &b)?;
    let a_endpoints = mesh_endpoints(&a.objs).await?;
    let b_endpoints = mesh_endpoints(&b.objs).await?;
    let already = a.pinned_ca(b.name()).is_some() && b.pinned_ca(a.name()).is_some();

    let mut servers = Vec::new();
    let mut bundles = Vec::new();
    let mut agents = Vec::new();
    for (x, y, x_endpoints, y_endpoints) in [
        (&a, &b, &a_endpoints, &b_endpoints),
        (&b, &a, &b_endpoints, &a_endpoints),
    ] {
        if let Some(new) = x.server_covering(x_endpoints)? {
            servers.push((
                &x.objs,
                Change::Secret {
                    old: x.server.clone(),
                    new,
                },
            ));
        }
        let pem = bundle_with(&x.bundle_pem, &y.ca_cert, y.name()).map_err(|e| x.bad_bundle(&e))?;
        bundles.extend(x.bundle_change(&pem).map(|c| (&x.objs, c)));
        let remotes = upserted(
            &x.remotes,
            RemoteCluster {
                name: y.name().to_string(),
                id: y.config.id,
                endpoints: y_endpoints.clone(),
                ca_cert: y.ca_cert.clone(),
            },
        );
        agents.extend(x.agent_change(&remotes)?.map(|c| (&x.objs, c)));
    }
    let changes: Vec<_> = servers.into_iter().chain(bundles).chain(agents).collect();
    let written = commit(changes).await?;
    tracing::info!(
        source = a.name(),
        destination = b.name(),
        written,
        "clusters connected"
    );
    Ok(ConnectReport {
        source: a.name().to_string(),
        destination: b.name().to_string(),
        source_endpoints: a_endpoints,
        destination_endpoints: b_endpoints,
        already_connected: already,
        objects_written: written,
    })
}

/// What `disconnect` did.
#[derive(Debug, Clone, Serialize)]
pub struct DisconnectReport {
    /// Source cluster.
    pub source: String,
    /// Destination cluster.
    pub destination: String,
    /// Objects written.
    pub objects_written: usize,
    /// Only the source side was changed ([`forget`]).
    pub one_sided: bool,
}

/// Undoes [`connect`] on both sides: each cluster's agents drop the other, and each mesh
/// API server stops trusting the other's CA (agents first, so they stop dialing before
/// the trust goes).
pub async fn disconnect(
    src: &KubeTarget,
    dst: &KubeTarget,
) -> Result<DisconnectReport, KubeModeError> {
    let a = Side::load(src).await?;
    let b = Side::load(dst).await?;
    self_connect(&a, &b)?;
    if a.pinned_ca(b.name()).is_none() && b.pinned_ca(a.name()).is_none() {
        return Err(KubeModeError::NotConnected(
            a.name().to_string(),
            b.name().to_string(),
        ));
    }
    let mut agents = Vec::new();
    let mut bundles = Vec::new();
    for (x, y) in [(&a, &b), (&b, &a)] {
        let remotes = x.remotes_without(y.name());
        agents.extend(x.agent_change(&remotes)?.map(|c| (&x.objs, c)));
        let mut pem = bundle_without(&x.bundle_pem, &y.ca_cert).map_err(|e| x.bad_bundle(&e))?;
        if let Some(pinned) = x.pinned_ca(y.name()) {
            pem = bundle_without(&pem, pinned).map_err(|e| x.bad_bundle(&e))?;
        }
        // Never drop the cluster's own CA, whatever the peer pinned.
        pem = bundle_with(&pem, &x.ca_cert, x.name()).map_err(|e| x.bad_bundle(&e))?;
        bundles.extend(x.bundle_change(&pem).map(|c| (&x.objs, c)));
    }
    let changes: Vec<_> = agents.into_iter().chain(bundles).collect();
    let written = commit(changes).await?;
    tracing::info!(
        source = a.name(),
        destination = b.name(),
        written,
        "clusters disconnected"
    );
    Ok(DisconnectReport {
        source: a.name().to_string(),
        destination: b.name().to_string(),
        objects_written: written,
        one_sided: false,
    })
}

/// Removes connected cluster `peer` from `src`'s side only: its agents stop watching it
/// and its mesh API server stops trusting the CA pinned for it. For a peer that was
/// disabled (`disable --force`) or can no longer be reached.
pub async fn forget(src: &KubeTarget, peer: &str) -> Result<DisconnectReport, KubeModeError> {
    let a = Side::load(src).await?;
    let Some(pinned) = a.pinned_ca(peer).map(str::to_string) else {
        return Err(KubeModeError::NotConnected(
            a.name().to_string(),
            peer.to_string(),
        ));
    };
    let remotes = a.remotes_without(peer);
    // The ConfigMap is always written (and counted), even when its data is unchanged.
    let mut changes = vec![(
        &a.objs,
        Change::ConfigMap {
            old: a.agent_cm.clone(),
            new: a.agent_cm_with(&remotes)?,
        },
    )];
    let pem = bundle_without(&a.bundle_pem, &pinned)
        .and_then(|pem| bundle_with(&pem, &a.ca_cert, a.name()))
        .map_err(|e| a.bad_bundle(&e))?;
    changes.extend(a.bundle_change(&pem).map(|c| (&a.objs, c)));
    let written = commit(changes).await?;
    tracing::info!(
        source = a.name(),
        peer,
        written,
        "peer forgotten on this side"
    );
    Ok(DisconnectReport {
        source: a.name().to_string(),
        destination: peer.to_string(),
        objects_written: written,
        one_sided: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::objects::ServiceType;

    fn config(name: &str, id: u32) -> MeshConfig {
        MeshConfig {
            name: name.into(),
            id,
            max_connected_clusters: 255,
            trust_domain: "mesh.test".into(),
            service_type: ServiceType::LoadBalancer,
            values: json!({"agent": {"staleTTL": "90s"}, "image": {"tag": "dev"}}),
        }
    }

    #[test]
    fn rendered_agent_config_lists_remotes_with_their_pinned_cas() {
        let ca = MeshCa::generate(TrustDomain::new("mesh.test").unwrap()).unwrap();
        let remotes = vec![RemoteCluster {
            name: "west".into(),
            id: 2,
            endpoints: vec!["192.0.2.10:2379".into()],
            ca_cert: ca.cert_pem().to_string(),
        }];
        let data = rendered_agent_data("mesh", &config("east", 1), &remotes).unwrap();
        let agent = AgentConfig::parse(Path::new("a"), &data[AGENT_CONFIG_KEY]).unwrap();
        assert_eq!(agent.local_cluster, "east");
        assert_eq!(
            agent.cluster("east").unwrap().endpoints,
            vec!["clustermesh-apiserver.mesh.svc:2379".to_string()]
        );
        let west = agent.cluster("west").unwrap();
        assert_eq!(
            (west.id, west.endpoints.clone()),
            (2, vec!["192.0.2.10:2379".to_string()])
        );
        assert_eq!(
            west.ca_file,
            Path::new("/etc/clustermesh/agent/west-ca.crt")
        );
        assert_eq!(pem_blocks(&data["west-ca.crt"]), pem_blocks(ca.cert_pem()));
    }

    #[test]
    fn stored_overrides_reach_the_values_but_never_the_managed_keys() {
        let mut c = config("east", 1);
        c.values = json!({"image": {"tag": "dev"}, "cluster": {"name": "other", "id": 9}});
        let v = chart_values(&c, &[]);
        assert_eq!(v["image"]["tag"], "dev");
        assert_eq!(v["cluster"]["name"], "east");
        assert_eq!(v["cluster"]["id"], 1);
        assert_eq!(v["agent"]["staleTTL"], Value::Null);
    }

    #[test]
    fn server_names_grow_only_when_an_endpoint_is_not_covered() {
        let dns = vec!["clustermesh-apiserver.ns.svc".to_string()];
        let ips = vec!["127.0.0.1".parse().unwrap()];
        assert!(names_covering(&dns, &ips, &["127.0.0.1:2379".into()]).is_none());
        let grown = names_covering(
            &dns,
            &ips,
            &["[2001:db8::1]:30000".into(), "mesh.example:443".into()],
        )
        .unwrap();
        assert!(grown.ips.contains(&"2001:db8::1".parse().unwrap()));
        assert!(grown.dns.contains(&"mesh.example".to_string()));
        assert_eq!(endpoint("2001:db8::1", 5), "[2001:db8::1]:5");
        assert_eq!(endpoint("lb.example", 5), "lb.example:5");
    }

    #[test]
    fn issued_server_names_are_read_back() {
        let ca = MeshCa::generate(TrustDomain::new("t.test").unwrap()).unwrap();
        let names = ServerNames::new(
            ["a.example".to_string()],
            ["192.0.2.1".parse::<IpAddr>().unwrap()],
        );
        let leaf = ca
            .issue_server("east", &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        let (dns, ips) = server_names_of(&leaf.cert_pem);
        assert_eq!(dns, vec!["a.example".to_string()]);
        assert_eq!(ips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(server_names_of("garbage"), (vec![], vec![]));
    }
}
