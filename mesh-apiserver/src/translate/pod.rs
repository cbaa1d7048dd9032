//! Pod → endpoint specs and identity labels.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_api::annotations::read_weight;
use k8s_openapi::api::core::v1::Pod;

use super::{object_name, InputWarning};

/// A security-relevant label set (sorted, so equal sets compare and hash equal).
pub type Labels = BTreeMap<String, String>;

/// Label carrying the pod's namespace in an identity (Cilium's name for it).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Label carrying the pod's service account in an identity (Cilium's name for it).
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Label carrying the cluster name in an identity (Cilium's name for it); policy peers
/// are scoped by it (`clustermesh_api::policy`).
pub use clustermesh_api::policy::CLUSTER_LABEL;

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

/// The backend weight a pod asks for with `service.clustermesh.io/weight`
/// ([`clustermesh_api::annotations::WEIGHT`]), applied to every backend address of the
/// pod. `None` when the pod sets no weight or an invalid one; an invalid value adds an
/// [`InputWarning::Annotation`] naming the pod and the value, and the pod's backends
/// then get the service's weight (1 unless the service sets one).
#[must_use]
pub fn pod_weight(pod: &Pod, warnings: &mut Vec<InputWarning>) -> Option<u32> {
    let annotations = pod.metadata.annotations.as_ref()?;
    match read_weight(annotations, "the service's weight") {
        Ok(weight) => weight,
        Err(warning) => {
            warnings.push(InputWarning::Annotation {
                object: object_name("Pod", &pod.metadata),
                warning,
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_api::annotations::WEIGHT;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("shop".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn weight_annotation_is_read() {
        let mut warnings = Vec::new();
        assert_eq!(pod_weight(&pod(&[(WEIGHT, "7")]), &mut warnings), Some(7));
        assert_eq!(pod_weight(&pod(&[]), &mut warnings), None);
        assert_eq!(pod_weight(&Pod::default(), &mut warnings), None);
        assert!(warnings.is_empty());
    }

    #[test]
    fn invalid_weight_is_ignored_with_a_warning_naming_the_pod() {
        for bad in ["0", "-2", "1000", "heavy"] {
            let mut warnings = Vec::new();
            assert_eq!(pod_weight(&pod(&[(WEIGHT, bad)]), &mut warnings), None);
            assert_eq!(warnings.len(), 1, "{bad}");
            assert_eq!(warnings[0].reason(), "annotation");
            let msg = warnings[0].to_string();
            assert!(msg.starts_with("Pod shop/web-0: "), "{msg}");
            assert!(msg.contains(&format!("{WEIGHT}={bad:?}")), "{msg}");
        }
    }
}
