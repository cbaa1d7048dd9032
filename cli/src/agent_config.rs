//! The agent configuration file (`agent.yaml`) the CLI writes and agents reload.
//!
//! This is the contract between `clustermesh enable/connect/disconnect` and
//! `clustermesh-agent --config`: the local cluster plus every cluster to watch, each with
//! its mesh API endpoints and the CA that must have signed its server certificate. The
//! Helm chart renders the same format into the `clustermesh-agent-config` ConfigMap.
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
//!   - name: cluster2
//!     id: 2
//!     endpoints: ["172.30.0.33:2379"]
//!     ca_file: /var/lib/clustermesh/cluster1/remotes/cluster2.crt
//! ```
//!
//! Endpoints are `host:port` (TLS is implied); the agent expects the server at an
//! endpoint to present identity `spiffe://<trust_domain>/cluster/<name>`.

use std::path::PathBuf;

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
    /// Clusters to watch, the local one first.
    pub clusters: Vec<ClusterEntry>,
}

/// One cluster to watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterEntry {
    /// Cluster name (must match the identity in its server certificate).
    pub name: String,
    /// Cluster ID (the agent refuses a cluster that reports another).
    pub id: u32,
    /// Mesh API `host:port` addresses.
    pub endpoints: Vec<String>,
    /// CA that signed this cluster's server certificate.
    pub ca_file: PathBuf,
}

impl AgentConfig {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
