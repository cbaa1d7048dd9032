//! The Kubernetes objects a source reports.

use clustermesh_api::keys::PolicySource;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The kinds of Kubernetes object the API server reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// `v1/Service`
    Service,
    /// `discovery.k8s.io/v1/EndpointSlice`
    EndpointSlice,
    /// `v1/Node`
    Node,
    /// `v1/Pod`
    Pod,
    /// `v1/Namespace` (its labels become identity labels of its pods)
    Namespace,
    /// `networking.k8s.io/v1/NetworkPolicy`
    NetworkPolicy,
    /// `cilium.io/v2/CiliumNetworkPolicy`
    CiliumNetworkPolicy,
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 7] = [
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::Node,
        ObjectKind::Pod,
        ObjectKind::Namespace,
        ObjectKind::NetworkPolicy,
        ObjectKind::CiliumNetworkPolicy,
    ];

    /// The Kubernetes `kind` string.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
            ObjectKind::Pod => "Pod",
            ObjectKind::Namespace => "Namespace",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        }
    }

    /// Whether objects of this kind live outside namespaces (Nodes, Namespaces).
    #[must_use]
    pub fn cluster_scoped(self) -> bool {
        matches!(self, ObjectKind::Node | ObjectKind::Namespace)
    }

    /// The policy API of a policy kind (`None` for the other kinds).
    #[must_use]
    pub fn policy_source(self) -> Option<PolicySource> {
        match self {
            ObjectKind::NetworkPolicy => Some(PolicySource::NetworkPolicy),
            ObjectKind::CiliumNetworkPolicy => Some(PolicySource::CiliumNetworkPolicy),
            _ => None,
        }
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Kubernetes object of one of the [`ObjectKind`]s.
#[derive(Debug, Clone, PartialEq)]
pub enum K8sObject {
    /// A Service.
    Service(Box<Service>),
    /// An EndpointSlice.
    EndpointSlice(Box<EndpointSlice>),
    /// A Node.
    Node(Box<Node>),
    /// A Pod.
    Pod(Box<Pod>),
    /// A Namespace.
    Namespace(Box<Namespace>),
    /// A NetworkPolicy, its spec unparsed.
    NetworkPolicy(Box<PolicyObject>),
    /// A CiliumNetworkPolicy, its spec unparsed.
    CiliumNetworkPolicy(Box<PolicyObject>),
}

/// A NetworkPolicy or CiliumNetworkPolicy as read: its metadata and its spec as raw JSON.
///
/// The spec is not parsed here: its record carries exactly what the author wrote (a
/// misspelt field included) for the agents to parse, and a spec that does not validate
/// is reported by name ([`crate::translate::policy_record`]) without making the whole
/// manifest file or API response unreadable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyObject {
    /// Metadata (name and namespace are what is read).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Value>,
    /// `specs` (CiliumNetworkPolicy only: several rules in one object), as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub specs: Option<serde_json::Value>,
}

impl K8sObject {
    /// The object's kind.
    #[must_use]
    pub fn kind(&self) -> ObjectKind {
        match self {
            K8sObject::Service(_) => ObjectKind::Service,
            K8sObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
            K8sObject::Node(_) => ObjectKind::Node,
            K8sObject::Pod(_) => ObjectKind::Pod,
            K8sObject::Namespace(_) => ObjectKind::Namespace,
            K8sObject::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
            K8sObject::CiliumNetworkPolicy(_) => ObjectKind::CiliumNetworkPolicy,
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            K8sObject::Service(o) => &o.metadata,
            K8sObject::EndpointSlice(o) => &o.metadata,
            K8sObject::Node(o) => &o.metadata,
            K8sObject::Pod(o) => &o.metadata,
            K8sObject::Namespace(o) => &o.metadata,
            K8sObject::NetworkPolicy(o) | K8sObject::CiliumNetworkPolicy(o) => &o.metadata,
        }
    }

    /// Kind, namespace and name. Namespaced kinds without a namespace are in `default`
    /// (as `kubectl apply` would put them); nodes and namespaces have no namespace.
    #[must_use]
    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.meta();
        let kind = self.kind();
        let namespace = if kind.cluster_scoped() {
            String::new()
        } else {
            meta.namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned())
        };
        ObjectRef {
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Identifies an object: kind, namespace ("" for nodes and namespaces) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Kind.
    pub kind: ObjectKind,
    /// Namespace ("" for cluster-scoped kinds).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}
