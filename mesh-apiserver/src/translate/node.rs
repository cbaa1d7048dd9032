//! Node → [`v1::Node`].

use clustermesh_api::cidr::Cidr;
use clustermesh_api::v1;
use k8s_openapi::api::core::v1::Node;

use super::{object_name, InputWarning};

/// Label holding a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Deprecated zone label, read when [`ZONE_LABEL`] is absent.
pub const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";

/// Builds the record of `node`: its addresses, pod CIDRs (`spec.podCIDRs`, falling back to
/// `spec.podCIDR`; invalid ones are skipped with a warning) and zone. `None` for a node
/// without a name.
#[must_use]
pub fn node_record(
    cluster: &str,
    node: &Node,
    warnings: &mut Vec<InputWarning>,
) -> Option<v1::Node> {
    let name = node.metadata.name.clone()?;
    let object = object_name("Node", &node.metadata);
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let zone = labels
        .get(ZONE_LABEL)
        .or_else(|| labels.get(LEGACY_ZONE_LABEL))
        .cloned()
        .unwrap_or_default();
    let spec = node.spec.clone().unwrap_or_default();
    let raw_cidrs = match spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs,
        _ => spec.pod_cidr.into_iter().collect(),
    };
    let mut pod_cidrs = Vec::new();
    for raw in raw_cidrs {
        match Cidr::parse(&raw) {
            Ok(cidr) => pod_cidrs.push(cidr.to_string()),
            Err(error) => warnings.push(InputWarning::BadPodCidr {
                object: object.clone(),
                error,
            }),
        }
    }
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|a| v1::NodeAddress {
            r#type: a.type_,
            address: a.address,
        })
        .collect();
    Some(v1::Node {
        name,
        addresses,
        pod_cidrs,
        zone,
        cluster: cluster.to_owned(),
    })
}
