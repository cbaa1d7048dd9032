//! The agent admin API's policy bodies (part of the [`admin`](crate::admin) contract, same
//! compatibility rules: fields are only added, every body decodes with missing fields
//! defaulted and unknown ones ignored).
//!
//! | request               | response body |
//! |-----------------------|---------------|
//! | `GET /v1/identities`  | list of [`IdentityEntry`] |
//! | `GET /v1/endpoints`   | list of [`EndpointEntry`] |
//! | `GET /v1/policy`      | [`PolicyReport`] |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /v1/identities` element: a security identity of some cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityEntry {
    /// Numeric identity.
    pub id: u32,
    /// Cluster that exported it.
    pub cluster: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// `GET /v1/endpoints` element: one pod address of some cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointEntry {
    /// Pod IP.
    pub ip: String,
    /// Cluster that exported it.
    pub cluster: String,
    /// Security identity.
    pub identity: u32,
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Node.
    pub node: String,
    /// Labels of its identity (empty when the identity is not known).
    pub labels: BTreeMap<String, String>,
    /// Policy is enforced on traffic with this address (its cluster is synced).
    pub enforced: bool,
}

/// `GET /v1/policy`: the policies of the local cluster and what every local endpoint of
/// this node may send and receive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyReport {
    /// Node.
    pub node: String,
    /// What a peer selector without the cluster label selects: `local` or `all`.
    pub peer_clusters: String,
    /// Every policy of the local cluster.
    pub policies: Vec<PolicyState>,
    /// Every local endpoint on this node.
    pub endpoints: Vec<EndpointPolicyStatus>,
    /// Verdict counters of the datapath (all endpoints, since the maps were created).
    pub counters: PolicyVerdicts,
}

/// One policy of the local cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyState {
    /// `NetworkPolicy` or `CiliumNetworkPolicy`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// A valid version is in force.
    pub in_force: bool,
    /// Why the latest version was refused (`null`: it is the one in force).
    pub error: Option<String>,
}

/// One local endpoint's policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EndpointPolicyStatus {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod IP.
    pub ip: String,
    /// Its security identity.
    pub identity: u32,
    /// Policies selecting it, as `Kind namespace/name`.
    pub policies: Vec<String>,
    /// Ingress allow rules; `null`: not isolated for ingress.
    pub ingress: Option<Vec<AllowRule>>,
    /// Egress allow rules; `null`: not isolated for egress.
    pub egress: Option<Vec<AllowRule>>,
    /// The rules are installed in the datapath (its pod cgroup was found).
    pub enforced: bool,
}

/// One allowed (peer, protocol, ports) combination.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AllowRule {
    /// `any`, `identity`, or `cidr`.
    pub peer: String,
    /// The peer identity (for `identity`).
    pub identity: Option<u32>,
    /// Cluster of the peer identity, if known.
    pub cluster: Option<String>,
    /// Labels of the peer identity, if known.
    pub labels: BTreeMap<String, String>,
    /// The block (for `cidr`), e.g. `10.0.0.0/8 except 10.1.0.0/16`.
    pub cidr: Option<String>,
    /// `TCP`, `UDP`, `SCTP` or `any`.
    pub protocol: String,
    /// `8080`, `8080-8090` or `any`.
    pub ports: String,
}

/// Verdict counters of the policy datapath.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyVerdicts {
    /// Connects/sends allowed by egress policy or not isolated.
    pub egress_allowed: u64,
    /// Connects/sends refused with EPERM.
    pub egress_denied: u64,
    /// New inbound connections/flows allowed.
    pub ingress_allowed: u64,
    /// New inbound connections/flows dropped.
    pub ingress_denied: u64,
    /// Passed because the peer's cluster is still syncing.
    pub syncing_passed: u64,
    /// Inbound replies to connections the endpoint opened.
    pub reply_passed: u64,
}
