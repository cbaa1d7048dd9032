//! The on-disk layout of a standalone cluster's state directory.
//!
//! In standalone mode (no Kubernetes) one directory holds everything a cluster's mesh API
//! server, its agents and the CLI share. `clustermesh enable` creates it, `connect` and
//! `disconnect` edit it, and the apiserver and agents read it (reloading on change):
//!
//! | path                  | written by        | read by                  | content |
//! |-----------------------|-------------------|--------------------------|---------|
//! | `cluster.yaml`        | enable            | CLI                      | [`ClusterState`]: name, ID, trust domain, mesh API endpoints, agent admin sockets |
//! | `ca/ca.crt`, `ca/ca.key` | enable         | CLI (issuing)            | this cluster's CA; the key never leaves this directory |
//! | `tls/`                | enable, connect   | apiserver, agents        | certs bundle: `ca.crt` (own CA + every connected cluster's CA), `server.crt/key`, `client.crt/key` |
//! | `admin/`              | enable            | CLI                      | `ca.crt` (own CA), `client.crt/key` with identity `admin/clustermesh-cli` |
//! | `remotes/<name>.crt`  | connect           | agents                   | the CA of connected cluster `<name>` (pinned per cluster) |
//! | `agent.yaml`          | enable, connect   | agents (reloaded)        | [`clustermesh_api::agent_config::AgentConfig`] |
//! | `manifests/`          | the user          | apiserver (`dir:` source)| Kubernetes-format YAML of the cluster's services, endpoint slices, nodes, pods |
//!
//! Every file is replaced atomically (temporary file + rename), so a reloading reader
//! never sees half a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the `cluster.yaml` format.
pub const STATE_VERSION: u32 = 1;

/// Errors reading a state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory has no `cluster.yaml`.
    #[error("{0} is not a clustermesh state directory (no cluster.yaml); run `clustermesh enable --state-dir {0} ...` first")]
    NotEnabled(PathBuf),
    /// The directory does not exist or is not a directory.
    #[error("state directory {0} does not exist or is not a directory; check --state-dir")]
    Missing(PathBuf),
    /// `cluster.yaml` cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `cluster.yaml` is malformed.
    #[error("{path} is malformed: {message}; restore it or run `clustermesh disable --force` and enable again")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

/// `cluster.yaml`: the identity of this cluster and where its components listen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    #[serde(default = "default_max_clusters")]
    pub max_connected_clusters: u32,
    /// Trust domain of this cluster's SPIFFE identities.
    pub trust_domain: String,
    /// `host:port` addresses of this cluster's mesh API (what other clusters dial).
    pub mesh_endpoints: Vec<String>,
    /// Unix sockets of this cluster's agents' admin API (for `status`).
    #[serde(default)]
    pub agent_sockets: Vec<PathBuf>,
}

fn default_max_clusters() -> u32 {
    255
}

/// Paths inside a state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Wraps a directory path (no I/O).
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `cluster.yaml`.
    #[must_use]
    pub fn cluster_file(&self) -> PathBuf {
        self.root.join("cluster.yaml")
    }

    /// `ca/` (CA certificate and key).
    #[must_use]
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// `tls/` (the bundle the apiserver and agents use).
    #[must_use]
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    /// `admin/` (the CLI's admin client identity).
    #[must_use]
    pub fn admin_dir(&self) -> PathBuf {
        self.root.join("admin")
    }

    /// `remotes/` (connected clusters' CAs).
    #[must_use]
    pub fn remotes_dir(&self) -> PathBuf {
        self.root.join("remotes")
    }

    /// The pinned CA of connected cluster `name`.
    #[must_use]
    pub fn remote_ca(&self, name: &str) -> PathBuf {
        self.remotes_dir().join(format!("{name}.crt"))
    }

    /// `agent.yaml`.
    #[must_use]
    pub fn agent_config(&self) -> PathBuf {
        self.root.join("agent.yaml")
    }

    /// `manifests/` (the apiserver's `dir:` source).
    #[must_use]
    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// Whether `cluster.yaml` exists.
    #[must_use]
    pub fn is_enabled(&self) -> bool {
        self.cluster_file().is_file()
    }

    /// Reads `cluster.yaml`.
    pub fn load(&self) -> Result<ClusterState, StateError> {
        if !self.root.is_dir() {
            return Err(StateError::Missing(self.root.clone()));
        }
        let path = self.cluster_file();
        if !path.is_file() {
            return Err(StateError::NotEnabled(self.root.clone()));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        let state: ClusterState =
            clustermesh_api::yaml::from_str(&text).map_err(|e| StateError::Malformed {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Malformed {
                path,
                message: format!(
                    "format version {} (this CLI reads {STATE_VERSION})",
                    state.version
                ),
            });
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_state_round_trips_and_rejects_unknown_fields() {
        let s = ClusterState {
            version: 1,
            name: "c1".into(),
            id: 1,
            max_connected_clusters: 255,
            trust_domain: "clustermesh.local".into(),
            mesh_endpoints: vec!["127.0.0.1:2379".into()],
            agent_sockets: vec!["/run/a.sock".into()],
        };
        let text = clustermesh_api::yaml::to_string(&s).unwrap();
        assert_eq!(
            clustermesh_api::yaml::from_str::<ClusterState>(&text).unwrap(),
            s
        );
        assert!(
            clustermesh_api::yaml::from_str::<ClusterState>(&format!("{text}bogus: 1\n")).is_err()
        );
    }

    #[test]
    fn loading_a_plain_directory_says_it_is_not_enabled() {
        let dir = std::env::temp_dir().join(format!("cm-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = StateDir::new(&dir).load().unwrap_err();
        assert!(
            err.to_string()
                .contains("is not a clustermesh state directory"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let err = StateDir::new(&dir).load().unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
