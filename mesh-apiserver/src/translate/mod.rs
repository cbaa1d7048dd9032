//! Translation from Kubernetes objects (k8s-openapi types) to clustermesh records.
//!
//! Both sources (the Kubernetes API and a directory of YAML) feed the same objects, so
//! this one set of pure functions decides what a cluster exports. Nothing here does I/O or
//! allocates identities: pods become [`EndpointSpec`]s carrying their identity labels, and
//! the exporter resolves those to numeric identities through the store.
//!
//! Bad input never aborts a translation: the offending part (a port, an address, an
//! annotation value) is dropped or defaulted and an [`InputWarning`] says what and why,
//! for the caller to log and count.

mod node;
mod pod;
mod policy;
mod service;
mod warning;

pub use node::{node_record, LEGACY_ZONE_LABEL, ZONE_LABEL};
pub use pod::{
    identity_labels, named_ports, namespace_identity_labels, pod_endpoints, pod_weight,
    EndpointSpec, Labels, NamedPort, CLUSTER_LABEL, NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL,
};
pub use policy::policy_record;
pub(crate) use service::endpoint_pod;
pub use service::service_record;
pub use warning::InputWarning;

/// `namespace/name` of an object, for messages (`default` when the namespace is unset).
pub(crate) fn object_name(
    kind: &str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> String {
    let name = meta.name.as_deref().unwrap_or("<unnamed>");
    match meta.namespace.as_deref() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}
