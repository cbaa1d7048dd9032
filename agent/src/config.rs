//! The agent configuration file (`agent.yaml`): which clusters to watch and how.
//!
//! The format is the contract with `clustermesh enable/connect/disconnect`, which write it,
//! and with the Helm chart, which renders it into a ConfigMap:
//!
//! ```yaml
//! local_cluster: cluster1
//! trust_domain: clustermesh.local
//! cert_file: /var/lib/clustermesh/cluster1/tls/client.crt
//! key_file: /var/lib/clustermesh/cluster1/tls/client.key
//! clusters:
//!   - name: cluster1
//!     id: 1
//!     endpoints: ["172.30.0.17:2379"]
//!     ca_file: /var/lib/clustermesh/cluster1/ca/ca.crt
//! ```
//!
//! The file is re-read when it changes; the agent then starts and stops cluster watchers
//! without a restart (see `agent::runtime`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Name of the cluster this agent's node belongs to.
    pub local_cluster: String,
    /// Trust domain of every cluster's identities.
    pub trust_domain: String,
    /// Client certificate the agent presents to every mesh API server.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// Clusters to watch, the local one included.
    pub clusters: Vec<ClusterEntry>,
}

/// One cluster to watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEntry {
    /// Cluster name (must match the identity in its server certificate).
    pub name: String,
    /// Cluster ID the cluster must report (0: not checked).
    #[serde(default)]
    pub id: u32,
    /// Mesh API `host:port` addresses, tried in order.
    pub endpoints: Vec<String>,
    /// CA that signed this cluster's server certificate.
    pub ca_file: PathBuf,
}

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read agent config {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid YAML of the expected shape.
    #[error(
        "agent config {path} is not valid: {error}; see `clustermesh enable --help` for the format"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        error: serde_yaml::Error,
    },
    /// The content is inconsistent.
    #[error("agent config {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

impl AgentConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates YAML `text` (`path` is only used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig =
            serde_yaml::from_str(text).map_err(|error| ConfigError::Parse {
                path: path.to_path_buf(),
                error,
            })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        clustermesh_api::cluster::validate_cluster_name(&self.local_cluster)
            .map_err(|e| invalid(format!("local_cluster: {e}")))?;
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for c in &self.clusters {
            clustermesh_api::cluster::validate_cluster_name(&c.name)
                .map_err(|e| invalid(format!("cluster entry: {e}")))?;
            if !names.insert(c.name.as_str()) {
                return Err(invalid(format!(
                    "cluster {} is listed twice; keep one entry per cluster",
                    c.name
                )));
            }
            if c.id != 0 && !ids.insert(c.id) {
                return Err(invalid(format!(
                    "cluster ID {} is used by two entries; every cluster needs its own ID",
                    c.id
                )));
            }
            if c.endpoints.is_empty() {
                return Err(invalid(format!(
                    "cluster {} has no endpoints; add its mesh API host:port",
                    c.name
                )));
            }
        }
        Ok(())
    }

    /// The entry for cluster `name`.
    #[must_use]
    pub fn cluster(&self, name: &str) -> Option<&ClusterEntry> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
local_cluster: east
trust_domain: mesh.test
cert_file: /tls/client.crt
key_file: /tls/client.key
clusters:
  - name: east
    id: 1
    endpoints: ["127.0.0.1:2379"]
    ca_file: /ca/east.crt
  - name: west
    id: 2
    endpoints: ["127.0.0.2:2379", "127.0.0.3:2379"]
    ca_file: /ca/west.crt
"#;

    #[test]
    fn parses_the_cli_format() {
        let c = AgentConfig::parse(Path::new("agent.yaml"), GOOD).unwrap();
        assert_eq!(c.local_cluster, "east");
        assert_eq!(c.cluster("west").unwrap().endpoints.len(), 2);
    }

    #[test]
    fn rejects_duplicates_and_bad_names() {
        let dup = GOOD.replace("name: west", "name: east");
        assert!(AgentConfig::parse(Path::new("a"), &dup).is_err());
        let dup_id = GOOD.replace("id: 2", "id: 1");
        assert!(AgentConfig::parse(Path::new("a"), &dup_id).is_err());
        let bad = GOOD.replace("name: west", "name: West_1");
        assert!(AgentConfig::parse(Path::new("a"), &bad).is_err());
        assert!(AgentConfig::parse(Path::new("a"), "clusters: 3").is_err());
    }
}
