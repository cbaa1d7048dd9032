//! Pod → endpoint specs and identity labels.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_api::annotations::read_weight;
use clustermesh_api::policy::NAMESPACE_LABELS_PREFIX;
use clustermesh_api::v1;
use k8s_openapi::api::core::v1::{Namespace, Pod};

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
    /// Named container ports of the pod.
    pub named_ports: Vec<NamedPort>,
    /// The pod's `metadata.uid` ("" if unset).
    pub pod_uid: String,
}

/// A named container port (`containers[].ports[]` with a `name`), for named ports in
/// policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    /// Port name.
    pub name: String,
    /// Container port.
    pub port: u16,
    /// Protocol (TCP when unset).
    pub protocol: v1::Protocol,
}

impl NamedPort {
    /// The record form.
    #[must_use]
    pub fn to_proto(&self) -> v1::NamedPort {
        v1::NamedPort {
            name: self.name.clone(),
            port: u32::from(self.port),
            protocol: self.protocol.into(),
        }
    }
}

/// The identity labels a namespace gives its pods: each of its labels under
/// `io.cilium.k8s.namespace.labels.` (as Cilium does), so a policy's `namespaceSelector`
/// selects identities.
#[must_use]
pub fn namespace_identity_labels(namespace: &Namespace) -> Labels {
    namespace
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone()))
        .collect()
}

/// The identity labels of a pod: its labels without [`IGNORED_LABELS`], plus namespace,
/// service account and cluster, plus `namespace_labels` (from
/// [`namespace_identity_labels`]; empty when the pod's Namespace object is unknown).
#[must_use]
pub fn identity_labels(cluster: &str, pod: &Pod, namespace_labels: &Labels) -> Labels {
    let mut labels: Labels = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !IGNORED_LABELS.contains(&k.as_str()))
        .filter(|(k, _)| !k.starts_with(NAMESPACE_LABELS_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(namespace_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
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

/// The named container ports of a pod, in container order, without repeats. A port
/// entry with a name but an unusable number or protocol is skipped with an
/// [`InputWarning::BadPort`].
#[must_use]
pub fn named_ports(pod: &Pod, warnings: &mut Vec<InputWarning>) -> Vec<NamedPort> {
    let mut out: Vec<NamedPort> = Vec::new();
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let Some(name) = port.name.clone().filter(|n| !n.is_empty()) else {
            continue;
        };
        let bad = |reason: String| InputWarning::BadPort {
            object: object_name("Pod", &pod.metadata),
            port: name.clone(),
            reason,
        };
        let Some(number) = u16::try_from(port.container_port).ok().filter(|p| *p != 0) else {
            warnings.push(bad(format!(
                "containerPort {} is not in 1-65535",
                port.container_port
            )));
            continue;
        };
        let protocol = match port.protocol.as_deref() {
            None | Some("TCP") => v1::Protocol::Tcp,
            Some("UDP") => v1::Protocol::Udp,
            Some("SCTP") => v1::Protocol::Sctp,
            Some(other) => {
                warnings.push(bad(format!("protocol {other:?} is not TCP, UDP or SCTP")));
                continue;
            }
        };
        let named = NamedPort {
            name,
            port: number,
            protocol,
        };
        if !out.contains(&named) {
            out.push(named);
        }
    }
    out
}

/// The endpoints of a pod: one per pod IP (`status.podIPs`, else `status.podIP`), with
/// `namespace_labels` (see [`identity_labels`]) among their identity labels.
/// Host-network pods (they use the node's address, not an endpoint of their own) and
/// pods that have finished (`Succeeded`, `Failed`) have none.
#[must_use]
pub fn pod_endpoints(
    cluster: &str,
    pod: &Pod,
    namespace_labels: &Labels,
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
    let labels = identity_labels(cluster, pod, namespace_labels);
    let named_ports = named_ports(pod, warnings);
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
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
                named_ports: named_ports.clone(),
                pod_uid: pod_uid.clone(),
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
