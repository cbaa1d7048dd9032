//! Kubernetes-mode `enable` (install or upgrade) and `disable`.
//!
//! `enable` validates the arguments against what the cluster already runs before it
//! writes anything: a different name, ID, trust domain or cluster-count mode on an
//! enabled cluster is refused. The CA is created once and reused by every later `enable`
//! (leaf certificates are reissued from it, keeping the server names they had, so an
//! upgrade also renews them). Then the Secrets, the rendered chart (server-side apply,
//! field manager `clustermesh`) and last the `clustermesh-config` ConfigMap are written.
//! Every step is idempotent, so a failed `enable` is fixed by running it again.
//!
//! Every rendered object is decoded into its Kubernetes type first ([`super::validate`]),
//! and what a real API server would refuse to change in place (a Secret's type, a
//! StatefulSet's volume claim templates, …) is planned before the first write
//! ([`super::plan`]): recreated where that is safe, refused with the way out otherwise.
//!
//! Chart value overrides (`--values`, `--set`) are checked first, merged over the ones
//! stored by earlier runs and stored with the settings (see [`super::values`]).

use std::collections::BTreeSet;
use std::net::IpAddr;

use clustermesh_api::cluster::{validate_cluster_id, validate_cluster_name, ClusterIdMode};
use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::{MeshCa, ServerNames, TrustDomain, Validity};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::DynamicObject;
use serde::Serialize;

use super::endpoints::{mesh_endpoints, server_names_of};
use super::error::KubeModeError;
use super::mesh::{
    ca_from_secret, chart_values, read_config, release, remote_clusters, RemoteCluster,
};
use super::objects::{
    cli_labels, kind_info, new_secret, replica_cert_key, replica_key_key, secret_text, MeshConfig,
    Objects, ServiceType, ADMIN_SECRET, AGENT_CONFIG_MAP, APISERVER_SERVICE, CA_BUNDLE_KEY,
    CA_BUNDLE_SECRET, CA_SECRET, CLIENT_SECRET, CLUSTER_LABEL, CONFIG_MAP, KINDS, PART_OF_LABEL,
    REPLICA_IDS, REPLICA_SECRET, SERVER_SECRET,
};
use super::{values, KubeTarget};
use crate::standalone::ADMIN_NAME;
use crate::trust::bundle_with;

const TLS_TYPE: &str = "kubernetes.io/tls";

/// Arguments of Kubernetes-mode `enable`.
#[derive(Debug, Clone)]
pub struct EnableOptions {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// Trust domain.
    pub trust_domain: String,
    /// Mesh API Service type (`None`: keep the current one, LoadBalancer on first enable).
    pub service_type: Option<ServiceType>,
    /// The new chart value overrides (`--values` files in order, then `--set`s in order),
    /// as [`values::user_overrides`] returns them, already checked against the chart's
    /// defaults; merged in that order over the stored overrides.
    pub overrides: Vec<serde_json::Value>,
}

/// What `enable` did.
#[derive(Debug, Clone, Serialize)]
pub struct EnableReport {
    /// Cluster name.
    pub cluster: String,
    /// Cluster ID.
    pub id: u32,
    /// The context.
    pub context: String,
    /// The namespace.
    pub namespace: String,
    /// Mesh API Service type.
    pub service_type: ServiceType,
    /// Whether the mesh was already enabled (this was an upgrade).
    pub upgraded: bool,
    /// Whether a new CA was created (false: the existing one was reused).
    pub ca_created: bool,
    /// Connected clusters kept in the agent configuration.
    pub connected: Vec<String>,
    /// Chart objects applied, as `Kind/name`.
    pub applied: Vec<String>,
    /// Objects of an earlier release the chart no longer renders, deleted, as `Kind/name`.
    pub pruned: Vec<String>,
    /// The chart value overrides now stored (`--set`/`--values` of this and earlier runs).
    pub values: serde_json::Value,
    /// Objects recreated because a field the API server will not change in place changed,
    /// as `Kind/name: what`.
    pub recreated: Vec<String>,
}

fn validate(opts: &EnableOptions) -> Result<TrustDomain, KubeModeError> {
    validate_cluster_name(&opts.name).map_err(|e| KubeModeError::Invalid(e.to_string()))?;
    let mode = ClusterIdMode::from_max_clusters(opts.max_connected_clusters).map_err(|e| {
        KubeModeError::Invalid(format!("{e}; use --max-connected-clusters 255 or 511"))
    })?;
    validate_cluster_id(opts.id, mode).map_err(|e| KubeModeError::Invalid(e.to_string()))?;
    TrustDomain::new(opts.trust_domain.clone())
        .map_err(|e| KubeModeError::Invalid(format!("{e}; pass a valid --trust-domain")))
}

/// DNS names of the mesh API Service inside the cluster (also what standalone
/// `enable --kubernetes-namespace` adds for the plain-Helm path).
pub(crate) fn service_dns_names(namespace: &str) -> Vec<String> {
    vec![
        "localhost".to_string(),
        APISERVER_SERVICE.to_string(),
        format!("{APISERVER_SERVICE}.{namespace}"),
        format!("{APISERVER_SERVICE}.{namespace}.svc"),
        format!("{APISERVER_SERVICE}.{namespace}.svc.cluster.local"),
    ]
}

/// A rendered chart document as an object to apply.
fn to_object(
    template: &str,
    doc: &str,
) -> Result<(&'static super::objects::KindInfo, DynamicObject), KubeModeError> {
    let bad = |reason: String| KubeModeError::BadManifest {
        template: template.to_string(),
        reason,
    };
    let obj: DynamicObject =
        clustermesh_api::yaml::from_str(doc).map_err(|e| bad(e.to_string()))?;
    let types = obj
        .types
        .clone()
        .ok_or_else(|| bad("no apiVersion/kind".into()))?;
    let kind = kind_info(&types.api_version, &types.kind).ok_or_else(|| {
        bad(format!(
            "kind {} {} is not one this CLI knows how to apply",
            types.api_version, types.kind
        ))
    })?;
    if obj.metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err(bad(format!("{} without metadata.name", types.kind)));
    }
    Ok((kind, obj))
}

/// Installs or upgrades the mesh on `target`'s cluster.
pub async fn enable(
    target: &KubeTarget,
    opts: &EnableOptions,
) -> Result<EnableReport, KubeModeError> {
    let td = validate(opts)?;
    let chart = super::embedded::chart()?;
    let objs = Objects::new(target);
    let ns = target.namespace.as_str();

    // Read and check everything before the first write.
    if !objs.namespace_exists().await? {
        return Err(KubeModeError::Invalid(format!(
            "namespace {ns} does not exist in context {ctx}; create it (`kubectl --context {ctx} create namespace {ns}`) or pass another --namespace",
            ctx = target.context
        )));
    }
    let existing = read_config(&objs).await?;
    if let Some(cur) = &existing {
        let mut diffs = Vec::new();
        let mut flags = String::new();
        if cur.trust_domain != opts.trust_domain {
            diffs.push(format!("trust domain {}", cur.trust_domain));
            flags.push_str(&format!(" --trust-domain {}", cur.trust_domain));
        }
        if cur.max_connected_clusters != opts.max_connected_clusters {
            diffs.push(format!("room for {} clusters", cur.max_connected_clusters));
            flags.push_str(&format!(
                " --max-connected-clusters {}",
                cur.max_connected_clusters
            ));
        }
        if cur.name != opts.name || cur.id != opts.id || !diffs.is_empty() {
            return Err(KubeModeError::AlreadyEnabled {
                context: target.context.clone(),
                namespace: ns.to_string(),
                name: cur.name.clone(),
                id: cur.id,
                detail: if diffs.is_empty() {
                    String::new()
                } else {
                    format!(" with {}", diffs.join(" and "))
                },
                flags,
            });
        }
    }
    let mut overrides = existing
        .as_ref()
        .map_or_else(|| serde_json::json!({}), |c| c.values.clone());
    for layer in &opts.overrides {
        values::merge_overrides(&mut overrides, layer);
    }
    // Anything wrong now comes from the stored overrides (the new ones were checked).
    values::check(
        &format!("ConfigMap {CONFIG_MAP} key {}", values::VALUES_KEY),
        &overrides,
        chart.default_values(),
        " (stored by an earlier enable; remove it with --set KEY=null)",
    )?;
    let config = MeshConfig {
        name: opts.name.clone(),
        id: opts.id,
        max_connected_clusters: opts.max_connected_clusters,
        trust_domain: opts.trust_domain.clone(),
        service_type: opts
            .service_type
            .or(existing.as_ref().map(|c| c.service_type))
            .unwrap_or(ServiceType::LoadBalancer),
        values: overrides,
    };
    let issue = |e: clustermesh_certs::IssueError| KubeModeError::Issue(e.to_string());
    let (ca, ca_created) = match objs.secret(CA_SECRET).await? {
        Some(secret) => {
            let (cert, key) = ca_from_secret(&objs, &secret)?;
            let ca = MeshCa::from_pem(td, &cert, &key).map_err(|e| {
                objs.malformed(
                    format!("Secret {CA_SECRET}"),
                    e.to_string(),
                    "restore it from a backup, or `disable --force` and enable again (peers must reconnect)",
                )
            })?;
            (ca, false)
        }
        None if existing.is_some() => {
            return Err(objs.malformed(
                format!("Secret {CA_SECRET}"),
                "it is missing although the mesh is enabled; connected clusters trust the lost CA".into(),
                "restore it from a backup, or run `disable --force`, enable again and reconnect the peers",
            ));
        }
        None => (MeshCa::generate(td).map_err(issue)?, true),
    };
    // Keep every name the server certificate had (connect may have added external
    // addresses), plus the in-cluster names and any external address known now.
    let mut dns: BTreeSet<String> = service_dns_names(ns).into_iter().collect();
    let mut ips: BTreeSet<IpAddr> = BTreeSet::from([IpAddr::from([127, 0, 0, 1])]);
    if let Some(server) = objs.secret(SERVER_SECRET).await? {
        let (d, i) = server_names_of(&secret_text(&server, "tls.crt").unwrap_or_default());
        dns.extend(d);
        ips.extend(i);
    }
    if existing.is_some() {
        if let Ok(endpoints) = mesh_endpoints(&objs).await {
            for e in endpoints {
                let host = super::endpoints::endpoint_host(&e).to_string();
                match host.parse::<IpAddr>() {
                    Ok(ip) => {
                        ips.insert(ip);
                    }
                    Err(_) => {
                        dns.insert(host);
                    }
                }
            }
        }
    }
    let remotes: Vec<RemoteCluster> = match objs.config_map(AGENT_CONFIG_MAP).await? {
        Some(cm) => remote_clusters(&objs, &cm)?.1,
        None => Vec::new(),
    };
    // The trust bundle: our own CA labelled with our name, every connected peer's CA
    // labelled with the peer's (bundles written before labels existed get them here, so
    // re-running `enable` upgrades a connected cluster in place).
    let existing_bundle = match objs.secret(CA_BUNDLE_SECRET).await? {
        Some(s) => secret_text(&s, CA_BUNDLE_KEY).unwrap_or_default(),
        None => String::new(),
    };
    let bad_bundle = |e: clustermesh_certs::trust_bundle::BundleError| {
        KubeModeError::CaMismatch(format!(
            "the trust bundle (Secret {CA_BUNDLE_SECRET}, key {CA_BUNDLE_KEY}) is unreadable: {e}; delete that Secret and run `clustermesh connect` again for each peer"
        ))
    };
    let mut bundle =
        bundle_with(&existing_bundle, ca.cert_pem(), &opts.name).map_err(bad_bundle)?;
    for remote in &remotes {
        bundle = bundle_with(&bundle, &remote.ca_cert, &remote.name).map_err(bad_bundle)?;
    }
    let docs = chart.render_documents(&release(ns), &chart_values(&config, &remotes))?;
    let mut objects = Vec::new();
    for (template, doc) in &docs {
        let (kind, obj) = to_object(template, doc)?;
        // A wrongly typed value is refused here, before anything is written.
        super::validate::check(template, kind, &obj)?;
        objects.push((kind, obj));
    }
    // Apply in dependency order (KINDS order), keeping the chart's order within a kind.
    objects.sort_by_key(|(kind, _)| KINDS.iter().position(|k| k == *kind));

    let validity = Validity::from_now(DEFAULT_LEAF_VALIDITY);
    let names = ServerNames::new(dns, ips);
    let server = ca
        .issue_server(&opts.name, &names, validity)
        .map_err(issue)?;
    let client = ca.issue_agent(&opts.name, validity).map_err(issue)?;
    let admin = ca.issue_admin(ADMIN_NAME, validity).map_err(issue)?;
    // One replica certificate per raft ID, each for the name its peers dial
    // (`clustermesh-apiserver-<n>.clustermesh-apiserver-peers.<ns>.svc`). All replicas
    // mount the one Secret; they are one trust boundary (the cluster's store).
    let mut replica_files: Vec<(String, String)> = Vec::new();
    for n in REPLICA_IDS {
        let peer = format!("clustermesh-apiserver-{n}.clustermesh-apiserver-peers.{ns}.svc");
        let replica_names = ServerNames::new(
            [
                format!("{peer}.cluster.local"),
                peer,
                "localhost".to_owned(),
            ],
            [IpAddr::from([127, 0, 0, 1])],
        );
        let leaf = ca
            .issue_replica(&opts.name, n, &replica_names, validity)
            .map_err(issue)?;
        replica_files.push((replica_cert_key(n), leaf.cert_pem));
        replica_files.push((replica_key_key(n), leaf.key_pem));
    }
    let replica_data: Vec<(&str, &str)> = replica_files
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();

    // Writes: the CA first (a re-run after any later failure reuses it).
    let ca_key = ca.key_pem();
    let cert = ca.cert_pem();
    let secrets = [
        new_secret(
            CA_SECRET,
            ns,
            &opts.name,
            TLS_TYPE,
            &[("tls.crt", cert), ("tls.key", &ca_key), ("ca.crt", cert)],
        ),
        new_secret(
            SERVER_SECRET,
            ns,
            &opts.name,
            TLS_TYPE,
            &[
                ("tls.crt", &server.cert_pem),
                ("tls.key", &server.key_pem),
                ("ca.crt", cert),
            ],
        ),
        new_secret(
            CLIENT_SECRET,
            ns,
            &opts.name,
            TLS_TYPE,
            &[
                ("tls.crt", &client.cert_pem),
                ("tls.key", &client.key_pem),
                ("ca.crt", cert),
            ],
        ),
        new_secret(
            ADMIN_SECRET,
            ns,
            &opts.name,
            TLS_TYPE,
            &[
                ("tls.crt", &admin.cert_pem),
                ("tls.key", &admin.key_pem),
                ("ca.crt", cert),
            ],
        ),
        new_secret(REPLICA_SECRET, ns, &opts.name, "Opaque", &replica_data),
        new_secret(
            CA_BUNDLE_SECRET,
            ns,
            &opts.name,
            "Opaque",
            &[(CA_BUNDLE_KEY, &bundle)],
        ),
    ];
    // Fields a real API server will not change in place: recreate or refuse, before the
    // first write (see [`super::plan`]).
    let plan = super::plan::make(&objs, target, &secrets, &objects).await?;
    for s in &secrets {
        let name = s.metadata.name.as_deref().unwrap_or_default();
        if plan.recreate_secrets.iter().any(|r| r == name) {
            super::plan::delete_secret(&objs, name).await?;
        }
        objs.apply::<Secret>("Secret", s).await?;
    }
    super::agent_token::ensure(&objs, &opts.name).await?;
    let mut applied = Vec::new();
    for (kind, obj) in &objects {
        let name = obj.metadata.name.as_deref().unwrap_or_default();
        if kind.kind == "StatefulSet" && plan.orphan_statefulsets.iter().any(|r| r == name) {
            super::plan::orphan_statefulset(&objs, target, name).await?;
        }
        if kind.kind == "Deployment" && plan.strategy_resets.iter().any(|r| r == name) {
            super::plan::reset_strategy(&objs, target, name).await?;
        }
        objs.apply_dynamic(kind, obj).await?;
        applied.push(format!(
            "{}/{}",
            kind.kind,
            obj.metadata.name.clone().unwrap_or_default()
        ));
    }
    let pruned = prune(&objs, &opts.name, &objects).await?;
    // Last: its presence means "enabled".
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.to_string()),
            namespace: Some(ns.to_string()),
            labels: Some(cli_labels(&opts.name)),
            ..ObjectMeta::default()
        },
        data: Some(config.to_data()),
        ..ConfigMap::default()
    };
    objs.apply::<ConfigMap>("ConfigMap", &cm).await?;
    tracing::info!(cluster = %opts.name, id = opts.id, context = %target.context, namespace = ns, ca_created, "mesh enabled");
    Ok(EnableReport {
        cluster: config.name,
        id: config.id,
        context: target.context.clone(),
        namespace: ns.to_string(),
        service_type: config.service_type,
        upgraded: existing.is_some(),
        ca_created,
        connected: remotes.into_iter().map(|r| r.name).collect(),
        applied,
        pruned,
        values: config.values,
        recreated: plan.steps(),
    })
}

/// Objects the CLI writes itself; never pruned, whatever labels they carry.
const CLI_OWNED: &[&str] = &[
    CA_SECRET,
    SERVER_SECRET,
    CLIENT_SECRET,
    ADMIN_SECRET,
    REPLICA_SECRET,
    CA_BUNDLE_SECRET,
    super::agent_token::AGENT_TOKEN_SECRET,
    CONFIG_MAP,
];

/// Labels that select this cluster's chart objects: the chart's own labels (the CLI's
/// objects carry no `app.kubernetes.io/instance`).
fn chart_labels(cluster: &str) -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([
        (PART_OF_LABEL.to_string(), "clustermesh".to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            super::objects::RELEASE_NAME.to_string(),
        ),
        (CLUSTER_LABEL.to_string(), cluster.to_string()),
    ])
}

/// After an upgrade: deletes this release's objects that the chart no longer renders
/// (e.g. the Deployment once `apiserver.replicas` > 1 renders a StatefulSet, or the
/// StatefulSet and its peers Service when going back to one replica), so two workloads
/// never sit behind one Service. Workloads go first (reverse apply order). Objects the
/// CLI writes itself are kept. Returns what was deleted, as `Kind/name`.
async fn prune(
    objs: &Objects<'_>,
    cluster: &str,
    applied: &[(&'static super::objects::KindInfo, DynamicObject)],
) -> Result<Vec<String>, KubeModeError> {
    let labels = chart_labels(cluster);
    // Cluster-scoped objects of the chart end in `-<namespace>`; one in another namespace's
    // install (same cluster name) is not ours.
    let ns_suffix = format!("-{}", objs.namespace());
    let mut pruned = Vec::new();
    for kind in KINDS.iter().rev() {
        let mut keep: Vec<&str> = CLI_OWNED.to_vec();
        keep.extend(
            applied
                .iter()
                .filter(|(k, _)| *k == kind)
                .filter_map(|(_, o)| o.metadata.name.as_deref()),
        );
        let ours = |name: &str| kind.namespaced || name.ends_with(&ns_suffix);
        for name in objs
            .delete_labelled_if(kind, &labels, |name| !keep.contains(&name) && ours(name))
            .await?
        {
            tracing::info!(kind = kind.kind, %name, "pruned an object the chart no longer renders");
            pruned.push(format!("{}/{name}", kind.kind));
        }
    }
    Ok(pruned)
}

/// What `disable` did.
#[derive(Debug, Clone, Serialize)]
pub struct DisableReport {
    /// Cluster name.
    pub cluster: String,
    /// The context.
    pub context: String,
    /// Connected clusters that still list this one (only with `--force`).
    pub peers_left: Vec<String>,
    /// Objects deleted, as `Kind/name`.
    pub deleted: Vec<String>,
}

/// Removes the mesh from `target`'s cluster: every object of the chart and the CLI that
/// carries this cluster's labels, then the CLI's Secrets and, last, `clustermesh-config`
/// (so a failed `disable` can be run again). Refuses while connected to other clusters
/// unless `force`; with `force` the peers keep listing this cluster until they are
/// reconnected to something else or disabled.
pub async fn disable(target: &KubeTarget, force: bool) -> Result<DisableReport, KubeModeError> {
    let objs = Objects::new(target);
    let config = read_config(&objs)
        .await?
        .ok_or_else(|| objs.not_enabled(format!("ConfigMap {CONFIG_MAP}")))?;
    let peers: Vec<String> = match objs.config_map(AGENT_CONFIG_MAP).await? {
        Some(cm) => match remote_clusters(&objs, &cm) {
            Ok((_, remotes)) => remotes.into_iter().map(|r| r.name).collect(),
            Err(e) if force => {
                tracing::warn!(error = %e, "agent configuration unreadable; disabling anyway");
                Vec::new()
            }
            Err(e) => return Err(e),
        },
        None => Vec::new(),
    };
    if !peers.is_empty() && !force {
        return Err(KubeModeError::StillConnected {
            name: config.name,
            context: target.context.clone(),
            peers: peers.join(", "),
        });
    }
    let labels = std::collections::BTreeMap::from([
        (PART_OF_LABEL.to_string(), "clustermesh".to_string()),
        (CLUSTER_LABEL.to_string(), config.name.clone()),
    ]);
    let mut deleted = Vec::new();
    // Workloads first (reverse apply order), so nothing runs with half its objects gone;
    // the CA and the settings last (see below).
    for kind in KINDS.iter().rev() {
        for name in objs
            .delete_labelled(kind, &labels, &[CA_SECRET, CONFIG_MAP])
            .await?
        {
            deleted.push(format!("{}/{name}", kind.kind));
        }
    }
    // Objects whose labels were edited away are still removed by name.
    for (kind, name) in [
        ("DaemonSet", "clustermesh-agent"),
        ("Deployment", APISERVER_SERVICE),
        ("StatefulSet", APISERVER_SERVICE),
        ("Service", APISERVER_SERVICE),
        ("ConfigMap", AGENT_CONFIG_MAP),
        ("ServiceAccount", "clustermesh-agent"),
        ("ServiceAccount", APISERVER_SERVICE),
    ] {
        let gone = match kind {
            "DaemonSet" => objs.delete::<DaemonSet>(kind, name).await?,
            "Deployment" => objs.delete::<Deployment>(kind, name).await?,
            "StatefulSet" => objs.delete::<StatefulSet>(kind, name).await?,
            "Service" => objs.delete::<Service>(kind, name).await?,
            "ServiceAccount" => objs.delete::<ServiceAccount>(kind, name).await?,
            _ => objs.delete::<ConfigMap>(kind, name).await?,
        };
        if gone {
            deleted.push(format!("{kind}/{name}"));
        }
    }
    for name in [
        SERVER_SECRET,
        CLIENT_SECRET,
        ADMIN_SECRET,
        REPLICA_SECRET,
        CA_BUNDLE_SECRET,
        super::agent_token::AGENT_TOKEN_SECRET,
        CA_SECRET,
    ] {
        if objs.delete::<Secret>("Secret", name).await? {
            deleted.push(format!("Secret/{name}"));
        }
    }
    if objs.delete::<ConfigMap>("ConfigMap", CONFIG_MAP).await? {
        deleted.push(format!("ConfigMap/{CONFIG_MAP}"));
    }
    tracing::info!(cluster = %config.name, context = %target.context, "mesh disabled");
    Ok(DisableReport {
        cluster: config.name,
        context: target.context.clone(),
        peers_left: peers,
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_chart_becomes_applicable_objects() {
        let chart = super::super::embedded::chart().unwrap();
        let config = MeshConfig {
            name: "east".into(),
            id: 1,
            max_connected_clusters: 255,
            trust_domain: "mesh.test".into(),
            service_type: ServiceType::NodePort,
            values: serde_json::json!({"image": {"tag": "dev"}}),
        };
        let docs = chart
            .render_documents(&release("mesh"), &chart_values(&config, &[]))
            .unwrap();
        let objects: Vec<_> = docs.iter().map(|(t, d)| to_object(t, d).unwrap()).collect();
        let svc = objects
            .iter()
            .find(|(k, o)| {
                k.kind == "Service" && o.metadata.name.as_deref() == Some(APISERVER_SERVICE)
            })
            .unwrap();
        assert_eq!(svc.1.data["spec"]["type"], "NodePort");
        assert!(
            objects
                .iter()
                .any(|(k, o)| k.kind == "DaemonSet"
                    && o.metadata.namespace.as_deref() == Some("mesh"))
        );
        assert!(objects.iter().any(|(k, _)| !k.namespaced));
        let ds = objects.iter().find(|(k, _)| k.kind == "DaemonSet").unwrap();
        assert_eq!(
            ds.1.data["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/clustermesh/clustermesh-agent:dev"
        );
    }

    #[test]
    fn invalid_arguments_are_refused_before_any_request() {
        let opts = EnableOptions {
            name: "East".into(),
            id: 1,
            max_connected_clusters: 255,
            trust_domain: "mesh.test".into(),
            service_type: None,
            overrides: Vec::new(),
        };
        assert!(validate(&opts).is_err());
        let opts = EnableOptions {
            name: "east".into(),
            id: 300,
            ..opts
        };
        assert!(validate(&opts).is_err());
    }
}
