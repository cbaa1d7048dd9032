//! Names of services and of their load-balanced ports.

/// `namespace/name` of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One load-balanced service port: `namespace/name` plus the service port name (empty for
/// an unnamed single port). The datapath programs one entry per service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortId {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Service port name ("" if unnamed).
    pub port_name: String,
}
