//! What one cluster's mesh looks like in its Kubernetes API: its settings, its CA, the
//! clusters its agents watch, and the chart values and agent configuration that follow
//! from them.
//!
//! `enable` (install/upgrade), `connect`/`disconnect` ([`super::connect`]) and `status`
//! all read a cluster through these helpers, so they agree on what an enabled cluster is
//! and render the agent ConfigMap the same way.

use std::collections::BTreeMap;
use std::path::Path;

use clustermesh_api::agent_config::AgentConfig;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use serde::Serialize;
use serde_json::{json, Value};

use super::error::KubeModeError;
use super::objects::{
    remote_ca_key, secret_text, MeshConfig, Objects, AGENT_CONFIG_KEY, AGENT_CONFIG_MAP, CA_SECRET,
    CONFIG_MAP, RELEASE_NAME,
};
use crate::chart::Release;
use crate::trust::certificate_blocks;

/// What to do about a damaged CA Secret.
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
        let v: Value =
            clustermesh_api::yaml::from_str(&doc).map_err(|e| KubeModeError::BadManifest {
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
    let blocks = certificate_blocks(&cert);
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

#[cfg(test)]
mod tests {
    use clustermesh_certs::{MeshCa, TrustDomain};

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
        assert_eq!(
            certificate_blocks(&data["west-ca.crt"]),
            certificate_blocks(ca.cert_pem())
        );
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
}
