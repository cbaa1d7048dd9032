//! `connect`, `disconnect` and `forget` between two clusters reached through kubeconfig
//! contexts.
//!
//! Each verb reads and validates everything on both sides first (settings, CAs, agent
//! configurations, mesh API addresses), then writes in one [`Txn`] with
//! resourceVersion-guarded replaces in a fixed order: server certificates, CA bundles (so
//! each mesh API server already trusts the peer's agents), then agent configurations
//! (which make the agents dial). If a write fails, the writes before it are undone in
//! reverse order, so both clusters end as they were; the error line says so, or names
//! what could not be undone.

use clustermesh_api::agent_config::{AgentConfig, ClusterClash};
use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::{MeshCa, TrustDomain, Validity};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde::Serialize;

use super::endpoints::{mesh_endpoints, names_covering, server_names_of};
use super::error::KubeModeError;
use super::mesh::{
    ca_from_secret, read_config, remote_clusters, rendered_agent_data, RemoteCluster,
};
use super::objects::{
    secret_text, set_secret_text, MeshConfig, Objects, AGENT_CONFIG_MAP, CA_BUNDLE_KEY,
    CA_BUNDLE_SECRET, CA_SECRET, CONFIG_MAP, SERVER_SECRET,
};
use super::KubeTarget;
use crate::trust::{bundle_with, bundle_without, certificate_blocks};
use crate::txn::{Change, Txn};

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
        if !certificate_blocks(&bundle_pem).contains(&ca_cert) {
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
    fn agent_change(&self, remotes: &[RemoteCluster]) -> Result<Option<Change<'_>>, KubeModeError> {
        let new = self.agent_cm_with(remotes)?;
        Ok(
            (new.data != self.agent_cm.data).then(|| Change::ReplaceConfigMap {
                objs: &self.objs,
                old: self.agent_cm.clone(),
                new,
            }),
        )
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
    fn bundle_change(&self, pem: &str) -> Option<Change<'_>> {
        (pem != self.bundle_pem).then(|| {
            let mut new = self.bundle.clone();
            set_secret_text(&mut new, CA_BUNDLE_KEY, pem);
            Change::ReplaceSecret {
                objs: &self.objs,
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
        match x.agent.clash_with(&y.agent) {
            Some(ClusterClash::NameWithTwoIds { name, id, other_id }) => {
                return Err(KubeModeError::Duplicate(format!(
                    "cluster name {name} is used with ID {id} in {}'s mesh and with ID {other_id} in {}'s mesh",
                    x.name(),
                    y.name()
                )));
            }
            Some(ClusterClash::IdWithTwoNames {
                id,
                name,
                other_name,
            }) => {
                return Err(KubeModeError::Duplicate(format!(
                    "cluster ID {id} is used by {name} (known to {}) and by {other_name} (known to {})",
                    x.name(),
                    y.name()
                )));
            }
            None => {}
        }
        if let Some(pinned) = x.pinned_ca(y.name()) {
            if !certificate_blocks(pinned).contains(&y.ca_cert) {
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
            servers.push(Change::ReplaceSecret {
                objs: &x.objs,
                old: x.server.clone(),
                new,
            });
        }
        let pem = bundle_with(&x.bundle_pem, &y.ca_cert, y.name()).map_err(|e| x.bad_bundle(&e))?;
        bundles.extend(x.bundle_change(&pem));
        let remotes = upserted(
            &x.remotes,
            RemoteCluster {
                name: y.name().to_string(),
                id: y.config.id,
                endpoints: y_endpoints.clone(),
                ca_cert: y.ca_cert.clone(),
            },
        );
        agents.extend(x.agent_change(&remotes)?);
    }
    let txn: Txn = servers.into_iter().chain(bundles).chain(agents).collect();
    let written = txn.commit().await?;
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
        agents.extend(x.agent_change(&remotes)?);
        let mut pem = bundle_without(&x.bundle_pem, &y.ca_cert).map_err(|e| x.bad_bundle(&e))?;
        if let Some(pinned) = x.pinned_ca(y.name()) {
            pem = bundle_without(&pem, pinned).map_err(|e| x.bad_bundle(&e))?;
        }
        // Never drop the cluster's own CA, whatever the peer pinned.
        pem = bundle_with(&pem, &x.ca_cert, x.name()).map_err(|e| x.bad_bundle(&e))?;
        bundles.extend(x.bundle_change(&pem));
    }
    let txn: Txn = agents.into_iter().chain(bundles).collect();
    let written = txn.commit().await?;
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
    let mut txn = Txn::new();
    txn.push(Change::ReplaceConfigMap {
        objs: &a.objs,
        old: a.agent_cm.clone(),
        new: a.agent_cm_with(&remotes)?,
    });
    let pem = bundle_without(&a.bundle_pem, &pinned)
        .and_then(|pem| bundle_with(&pem, &a.ca_cert, a.name()))
        .map_err(|e| a.bad_bundle(&e))?;
    if let Some(change) = a.bundle_change(&pem) {
        txn.push(change);
    }
    let written = txn.commit().await?;
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
