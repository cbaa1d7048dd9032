//! Pod → endpoint specs and identity labels.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use super::{object_name, InputWarning};

/// A security-relevant label set (sorted, so equal sets compare and hash equal).
pub type Labels = BTreeMap<String, String>;

/// Label carrying the pod's namespace in an identity (Cilium's name for it).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Label carrying the pod's service account in an identity (Cilium's name for it).
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Label carrying the cluster name in an identity (Cilium's name for it).
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// Pod labels that change per rollout or per replica and carry no security meaning; they
/// would split one workload into many identities. A subset of Cilium's default label
/// filter (`pkg/labelsfilter/filter.go`, `defaultLabelPrefixCfg`).
const IGNORED_LABELS: &[&str] = &[
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
];

/// One pod IP to export as an endpoint; the exporter turns `labels` into a numeric
/// identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Pod IP.
    pub ip: IpAddr,
    /// Identity labels of the pod.
    pub labels: Labels,
    /// Node the pod runs on ("" if not scheduled).
    pub node: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
}

/// The identity labels of a pod: its labels without [`IGNORED_LABELS`], plus namespace,
/// service account and cluster.
#[must_use]
pub fn identity_labels(cluster: &str, pod: &Pod) -> Labels {
    let mut labels: Labels = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !IGNORED_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(
        NAMESPACE_LABEL.to_owned(),
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
    );
    labels.insert(
        SERVICE_ACCOUNT_LABEL.to_owned(),
        pod.spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
    );
    labels.insert(CLUSTER_LABEL.to_owned(), cluster.to_owned());
    labels
}

/// The endpoints of a pod: one per pod IP (`status.podIPs`, else `status.podIP`).
/// Host-network pods (they use the node's address, not an endpoint of their own) and
/// pods that have finished (`Succeeded`, `Failed`) have none.
#[must_use]
pub fn pod_endpoints(
    cluster: &str,
    pod: &Pod,
    warnings: &mut Vec<InputWarning>,
) -> Vec<EndpointSpec> {
    let Some(name) = pod.metadata.name.clone() else {
        return Vec::new();
    };
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Vec::new();
    }
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Vec::new();
    }
    let raw_ips: Vec<String> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.clone()).collect(),
        _ => status.pod_ip.iter().cloned().collect(),
    };
    let labels = identity_labels(cluster, pod);
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
    let mut out: Vec<EndpointSpec> = Vec::new();
    for raw in raw_ips {
        match raw.parse::<IpAddr>() {
            Ok(ip) if !out.iter().any(|e| e.ip == ip) => out.push(EndpointSpec {
                ip,
                labels: labels.clone(),
                node: node.clone(),
                namespace: namespace.clone(),
                pod: name.clone(),
            }),
            Ok(_) => {}
            Err(_) => warnings.push(InputWarning::BadAddress {
                object: object_name("Pod", &pod.metadata),
                value: raw,
            }),
        }
    }
    out
}
