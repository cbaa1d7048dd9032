//! The network policy model the agent enforces: label selectors with Kubernetes semantics
//! and the cluster scoping of policy peers.

mod selector;

pub use selector::{
    LabelSelector, Labels, PeerClusters, Requirement, SelectorError, WireLabelSelector,
    WireRequirement, CLUSTER_LABEL,
};
