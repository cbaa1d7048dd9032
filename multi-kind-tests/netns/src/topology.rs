//! The shape of a test topology and its address plan.
//!
//! Address plan (all inside namespaces that have no default route):
//! - fabric (underlay) `172.30.0.0/24`: node `n` (1-based) of cluster `c` is
//!   `172.30.0.(16·c + n)`; the fabric namespace's bridge holds `172.30.0.1`.
//! - cluster `c`'s pod CIDR is `10.(100+c).0.0/16`; node `n` owns `10.(100+c).n.0/24`
//!   with its bridge at `.1` and pod `p` (1-based) at `.(10+p)`.

use std::net::Ipv4Addr;

use crate::{Error, Result};

/// A whole topology: clusters, their nodes and pods.
#[derive(Debug, Clone)]
pub struct TopologySpec {
    /// The clusters (at most 14, so that node addresses fit the fabric plan).
    pub clusters: Vec<ClusterSpec>,
}

/// One cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Cluster name (as used by the mesh; also printed by its echo servers).
    pub name: String,
    /// The nodes (at most 15).
    pub nodes: Vec<NodeSpec>,
}

/// One node with its pods.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// The pods (at most 200).
    pub pods: Vec<PodSpec>,
}

/// One pod: what its manifest says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Pod name (also printed by its echo servers).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod labels.
    pub labels: Vec<(String, String)>,
    /// Listed in the cluster's manifests from the start; a pod that is not only exists in
    /// the topology (its namespace, cgroup and processes) until [`crate::mesh::Mesh`]
    /// exports it, like a pod the cluster has not synced yet.
    pub exported: bool,
}

impl PodSpec {
    /// A backend of the global `echo` service: namespace `default`, label `app=echo`.
    #[must_use]
    pub fn echo(name: impl Into<String>) -> Self {
        Self::new(name, "default", &[("app", "echo")])
    }

    /// An exported pod with these labels.
    #[must_use]
    pub fn new(name: impl Into<String>, namespace: &str, labels: &[(&str, &str)]) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            exported: true,
        }
    }

    /// The same pod, left out of the manifests until exported.
    #[must_use]
    pub fn unexported(mut self) -> Self {
        self.exported = false;
        self
    }

    /// Whether the pod carries `key=value`.
    #[must_use]
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.iter().any(|(k, v)| k == key && v == value)
    }
}

impl TopologySpec {
    /// `clusters` clusters named `cluster1..`, each with `nodes` nodes `node1..` holding
    /// `pods` pods `<cluster>-<node>-echo<k>`.
    #[must_use]
    pub fn uniform(clusters: usize, nodes: usize, pods: usize) -> Self {
        Self {
            clusters: (1..=clusters)
                .map(|c| ClusterSpec {
                    name: format!("cluster{c}"),
                    nodes: (1..=nodes)
                        .map(|n| NodeSpec {
                            name: format!("node{n}"),
                            pods: (1..=pods)
                                .map(|p| PodSpec::echo(format!("cluster{c}-node{n}-echo{p}")))
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Checks the sizes against the address plan.
    pub fn validate(&self) -> Result<()> {
        if self.clusters.is_empty() || self.clusters.len() > 14 {
            return Err(Error::Topology(format!(
                "need 1..=14 clusters, got {}",
                self.clusters.len()
            )));
        }
        for c in &self.clusters {
            if c.nodes.is_empty() || c.nodes.len() > 15 {
                return Err(Error::Topology(format!(
                    "cluster {} needs 1..=15 nodes",
                    c.name
                )));
            }
            for n in &c.nodes {
                if n.pods.len() > 200 {
                    return Err(Error::Topology(format!(
                        "node {}/{} has more than 200 pods",
                        c.name, n.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Fabric prefix length.
pub const FABRIC_PREFIX: u8 = 24;
/// The fabric bridge's own address.
pub const FABRIC_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);

/// Fabric address of node `n` (0-based) of cluster `c` (0-based).
#[must_use]
pub fn node_ip(c: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, (16 * (c + 1) + n + 1) as u8)
}

/// Pod CIDR of cluster `c` (0-based) as (network, prefix length).
#[must_use]
pub fn cluster_pod_cidr(c: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(10, (101 + c) as u8, 0, 0), 16)
}

/// Pod subnet of node `n` of cluster `c` (0-based) as (network, prefix length).
#[must_use]
pub fn node_pod_subnet(c: usize, n: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(10, (101 + c) as u8, (n + 1) as u8, 0), 24)
}

/// The node bridge's address (the pods' gateway).
#[must_use]
pub fn node_gateway(c: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (101 + c) as u8, (n + 1) as u8, 1)
}

/// Address of pod `p` of node `n` of cluster `c` (all 0-based).
#[must_use]
pub fn pod_ip(c: usize, n: usize, p: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (101 + c) as u8, (n + 1) as u8, (11 + p) as u8)
}

/// `metadata.uid` of pod `p` of node `n` of cluster `c` (all 0-based): unique within a
/// run; the pod's cgroup is named after it the way the kubelet names pod cgroups
/// (`pod<uid>`), which is how the node's agent finds the pod's processes.
#[must_use]
pub fn pod_uid(c: usize, n: usize, p: usize) -> String {
    format!(
        "0000c1a5-7e57-4000-8000-{:04x}{:04x}{:04x}",
        c + 1,
        n + 1,
        p + 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn address_plan_never_collides_at_maximum_size() {
        let mut seen = HashSet::new();
        assert!(seen.insert(FABRIC_GATEWAY));
        for c in 0..14 {
            for n in 0..15 {
                assert!(seen.insert(node_ip(c, n)), "node {c}/{n}");
                assert!(seen.insert(node_gateway(c, n)));
                for p in 0..200 {
                    assert!(seen.insert(pod_ip(c, n, p)), "pod {c}/{n}/{p}");
                }
            }
        }
    }

    #[test]
    fn pods_sit_inside_their_node_subnet_and_cluster_cidr() {
        let ip = pod_ip(1, 0, 2);
        let (subnet, _) = node_pod_subnet(1, 0);
        let (cidr, _) = cluster_pod_cidr(1);
        assert_eq!(ip.octets()[..3], subnet.octets()[..3]);
        assert_eq!(ip.octets()[..2], cidr.octets()[..2]);
    }

    #[test]
    fn oversized_topologies_are_refused() {
        assert!(TopologySpec::uniform(15, 1, 1).validate().is_err());
        assert!(TopologySpec::uniform(2, 16, 1).validate().is_err());
        assert!(TopologySpec::uniform(2, 2, 201).validate().is_err());
        assert!(TopologySpec::uniform(2, 2, 2).validate().is_ok());
    }
}
