//! The network policy model the agent enforces: label selectors with Kubernetes semantics,
//! the cluster scoping of policy peers, and NetworkPolicy (and the L3/L4 subset of
//! CiliumNetworkPolicy) validated into selectors over identity labels.

mod cilium;
mod network_policy;
mod selector;

pub use cilium::{
    WireCiliumEgressRule, WireCiliumIngressRule, WireCiliumPolicySpec, WireCiliumPort,
    WireCiliumPortRule,
};
pub use network_policy::{
    NetworkPolicy, Peer, PolicyError, PolicyProblem, PolicyProtocol, PolicyRule, PortMatch,
    PortRule, WireEgressRule, WireIngressRule, WireIpBlock, WireNetworkPolicySpec, WirePeer,
    WirePort, WirePortValue, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
};
pub use selector::{
    parse_selector_text, LabelSelector, Labels, PeerClusters, Requirement, SelectorError,
    SelectorTextError, WireLabelSelector, WireRequirement, CLUSTER_LABEL,
};
