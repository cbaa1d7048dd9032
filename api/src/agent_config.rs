//! The agent configuration file (`agent.yaml`): the one type both sides of the contract use.
//!
//! `clustermesh enable/connect/disconnect` write it, the Helm chart renders the same format
//! into the `clustermesh-agent-config` ConfigMap, and `clustermesh-agent --config` reads it
//! (and re-reads it when it changes, starting and stopping cluster watchers without a
//! restart):
//!
//! ```yaml
//! local_cluster: cluster1
//! mode: mirror
//! trust_domain: clustermesh.local
//! cert_file: /var/lib/clustermesh/cluster1/tls/client.crt
//! key_file: /var/lib/clustermesh/cluster1/tls/client.key
//! clusters:
//!   - name: cluster1
//!     id: 1
//!     endpoints: ["172.30.0.17:2379"]
//!     ca_file: /var/lib/clustermesh/cluster1/ca/ca.crt
//!   - name: cluster2
//!     id: 2
//!     endpoints: ["172.30.0.33:2379"]
//!     ca_file: /var/lib/clustermesh/cluster1/remotes/cluster2.crt
//! ```
//!
//! Endpoints are `host:port` (TLS is implied); the agent expects the server at an endpoint
//! to present identity `spiffe://<trust_domain>/cluster/<name>`.
//!
//! `mode` says how the agent reaches the other clusters: `mirror` (the default) watches
//! only the local cluster's mesh API server, which mirrors the peers listed here (the
//! server reads this same file, `--mirror-peers`); `direct` watches every listed cluster's
//! server itself.
//!
//! This module parses and validates text only: the agent and the CLI read and write the
//! file themselves, so `api` stays free of I/O.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole `agent.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Name of the cluster this agent's node belongs to.
    pub local_cluster: String,
    /// How the agent reaches the other clusters (default: mirror).
    #[serde(default)]
    pub mode: WatchMode,
    /// Trust domain of every cluster's identities.
    pub trust_domain: String,
    /// Client certificate the agent presents to every mesh API server.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// Clusters to watch, the local one included.
    pub clusters: Vec<ClusterEntry>,
}

/// How agents reach the clusters of the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// Agents watch only their own cluster's mesh API server, which mirrors the peers:
    /// one stream per agent, and remote clusters never see this cluster's nodes.
    #[default]
    Mirror,
    /// Agents watch every cluster's mesh API server themselves.
    Direct,
}

impl WatchMode {
    /// The name used in the configuration (`mirror`, `direct`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WatchMode::Mirror => "mirror",
            WatchMode::Direct => "direct",
        }
    }
}

impl std::fmt::Display for WatchMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WatchMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mirror" => Ok(WatchMode::Mirror),
            "direct" => Ok(WatchMode::Direct),
            other => Err(format!(
                "unknown mode {other:?}; use mirror (agents watch their own cluster's server, which mirrors the peers) or direct (agents watch every cluster)"
            )),
        }
    }
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

/// Errors parsing the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid YAML of the expected shape.
    #[error(
        "agent config {path} is not valid: {error}; see `clustermesh enable --help` for the format"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, which CLI errors carry as text, so not also a source).
        error: Box<crate::yaml::Error>,
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
    /// Parses and validates YAML `text` (`path` is only used in messages).
    ///
    /// # Errors
    /// [`ConfigError`] when the text is not YAML of this shape or is inconsistent.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig =
            crate::yaml::from_str(text).map_err(|error| ConfigError::Parse {
                path: path.to_path_buf(),
                error: Box::new(error),
            })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        crate::cluster::validate_cluster_name(&self.local_cluster)
            .map_err(|e| invalid(format!("local_cluster: {e}")))?;
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for c in &self.clusters {
            crate::cluster::validate_cluster_name(&c.name)
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
        if !names.contains(self.local_cluster.as_str()) {
            return Err(invalid(format!(
                "local_cluster {} has no entry in clusters; add one with its own mesh API endpoint and CA (the agent watches its own cluster like the others)",
                self.local_cluster
            )));
        }
        Ok(())
    }

    /// The entry for cluster `name`.
    #[must_use]
    pub fn cluster(&self, name: &str) -> Option<&ClusterEntry> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// Adds or replaces the entry for `entry.name`, keeping the local cluster first and
    /// the rest sorted by name (so rewrites are stable).
    pub fn upsert(&mut self, entry: ClusterEntry) {
        self.clusters.retain(|c| c.name != entry.name);
        self.clusters.push(entry);
        let local = self.local_cluster.clone();
        self.clusters
            .sort_by(|a, b| (a.name != local, &a.name).cmp(&(b.name != local, &b.name)));
    }

    /// Removes cluster `name`; returns whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.clusters.len();
        self.clusters.retain(|c| c.name != name);
        before != self.clusters.len()
    }

    /// The remote clusters (all but the local one).
    pub fn remotes(&self) -> impl Iterator<Item = &ClusterEntry> {
        self.clusters
            .iter()
            .filter(move |c| c.name != self.local_cluster)
    }

    /// The first cluster this configuration and `other` know under the same name with
    /// different IDs, or under the same ID with different names: joining the two meshes
    /// would make that cluster ambiguous. An ID of 0 (not checked) is compared like any other.
    #[must_use]
    pub fn clash_with(&self, other: &AgentConfig) -> Option<ClusterClash> {
        self.clusters.iter().find_map(|mine| {
            other.clusters.iter().find_map(|theirs| {
                if mine.name == theirs.name && mine.id != theirs.id {
                    Some(ClusterClash::NameWithTwoIds {
                        name: mine.name.clone(),
                        id: mine.id,
                        other_id: theirs.id,
                    })
                } else if mine.id == theirs.id && mine.name != theirs.name {
                    Some(ClusterClash::IdWithTwoNames {
                        id: mine.id,
                        name: mine.name.clone(),
                        other_name: theirs.name.clone(),
                    })
                } else {
                    None
                }
            })
        })
    }
}

/// A cluster two meshes know differently ([`AgentConfig::clash_with`]); "this" side is the
/// configuration the method was called on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterClash {
    /// Both know cluster `name`, this side with `id`, the other with `other_id`.
    NameWithTwoIds {
        /// The cluster name.
        name: String,
        /// Its ID on this side.
        id: u32,
        /// Its ID on the other side.
        other_id: u32,
    },
    /// Both know cluster ID `id`, this side as `name`, the other as `other_name`.
    IdWithTwoNames {
        /// The cluster ID.
        id: u32,
        /// Its name on this side.
        name: String,
        /// Its name on the other side.
        other_name: String,
    },
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
        assert_eq!(c.mode, WatchMode::Mirror, "mirror mode is the default");
    }

    #[test]
    fn mode_is_mirror_or_direct() {
        let direct = GOOD.replace("local_cluster: east", "local_cluster: east\nmode: direct");
        let c = AgentConfig::parse(Path::new("agent.yaml"), &direct).unwrap();
        assert_eq!(c.mode, WatchMode::Direct);
        let bad = GOOD.replace("local_cluster: east", "local_cluster: east\nmode: both");
        let e = AgentConfig::parse(Path::new("agent.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent.yaml") && e.contains("mirror, direct"),
            "{e}"
        );
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

    #[test]
    fn rejects_a_local_cluster_without_an_entry() {
        let text = GOOD.replace("local_cluster: east", "local_cluster: north");
        let e = AgentConfig::parse(Path::new("agent.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("local_cluster north has no entry in clusters"),
            "{e}"
        );
    }

    fn entry(name: &str, id: u32) -> ClusterEntry {
        ClusterEntry {
            name: name.into(),
            id,
            endpoints: vec![format!("{name}:2379")],
            ca_file: format!("/ca/{name}.crt").into(),
        }
    }

    #[test]
    fn upsert_keeps_local_first_and_remotes_sorted() {
        let mut c = AgentConfig {
            local_cluster: "m".into(),
            mode: WatchMode::Mirror,
            trust_domain: "td".into(),
            cert_file: "/c".into(),
            key_file: "/k".into(),
            clusters: vec![entry("m", 5)],
        };
        c.upsert(entry("z", 3));
        c.upsert(entry("a", 1));
        c.upsert(entry("z", 4));
        let names: Vec<_> = c.clusters.iter().map(|e| (e.name.as_str(), e.id)).collect();
        assert_eq!(names, vec![("m", 5), ("a", 1), ("z", 4)]);
        assert!(c.remove("a"));
        assert!(!c.remove("a"));
        assert_eq!(c.remotes().count(), 1);
    }

    #[test]
    fn clash_names_the_cluster_two_meshes_know_differently() {
        let mesh = |clusters: Vec<ClusterEntry>| AgentConfig {
            local_cluster: clusters[0].name.clone(),
            mode: WatchMode::Mirror,
            trust_domain: "td".into(),
            cert_file: "/c".into(),
            key_file: "/k".into(),
            clusters,
        };
        let east = mesh(vec![entry("east", 1), entry("north", 3)]);
        assert_eq!(east.clash_with(&mesh(vec![entry("west", 2)])), None);
        // The same cluster known the same way on both sides is no clash.
        assert_eq!(
            east.clash_with(&mesh(vec![entry("west", 2), entry("north", 3)])),
            None
        );
        assert_eq!(
            east.clash_with(&mesh(vec![entry("west", 2), entry("north", 4)])),
            Some(ClusterClash::NameWithTwoIds {
                name: "north".into(),
                id: 3,
                other_id: 4
            })
        );
        assert_eq!(
            east.clash_with(&mesh(vec![entry("west", 3)])),
            Some(ClusterClash::IdWithTwoNames {
                id: 3,
                name: "north".into(),
                other_name: "west".into()
            })
        );
    }
}
