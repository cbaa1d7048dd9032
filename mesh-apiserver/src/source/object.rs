//! The Kubernetes objects a source reports.

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

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
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 4] = [
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::Node,
        ObjectKind::Pod,
    ];

    /// The Kubernetes `kind` string.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
            ObjectKind::Pod => "Pod",
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
        }
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            K8sObject::Service(o) => &o.metadata,
            K8sObject::EndpointSlice(o) => &o.metadata,
            K8sObject::Node(o) => &o.metadata,
            K8sObject::Pod(o) => &o.metadata,
        }
    }

    /// Kind, namespace and name. Namespaced kinds without a namespace are in `default`
    /// (as `kubectl apply` would put them); nodes have no namespace.
    #[must_use]
    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.meta();
        let kind = self.kind();
        let namespace = match kind {
            ObjectKind::Node => String::new(),
            _ => meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
        };
        ObjectRef {
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// Identifies an object: kind, namespace ("" for nodes) and name.
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
