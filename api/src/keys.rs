//! The store key layout (ARCHITECTURE.md, "Records and key layout").
//!
//! Every component builds keys through these helpers and reads them back through
//! [`parse_key`], so a layout change happens in one place and a malformed key is a
//! typed error rather than a panic or a silently wrong record.
//!
//! ```text
//! mesh/v1/cluster-config/<cluster>
//! mesh/v1/nodes/<cluster>/<node>
//! mesh/v1/identities/<cluster>/<numeric-id>
//! mesh/v1/endpoints/<cluster>/<ip>
//! mesh/v1/services/<cluster>/<namespace>/<name>
//! mesh/v1/policies/<cluster>/<namespace>/<policy-kind>/<name>   (never exported)
//! mesh/v1/synced/<cluster>/<kind>
//! ```

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::v1;

/// Prefix of every clustermesh key.
pub const ROOT: &str = "mesh/v1/";

/// A record kind, named by its key segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `cluster-config`: one [`v1::ClusterConfig`] per cluster.
    ClusterConfig,
    /// `nodes`: [`v1::Node`].
    Node,
    /// `identities`: [`v1::Identity`].
    Identity,
    /// `endpoints`: [`v1::Endpoint`].
    Endpoint,
    /// `services`: [`v1::Service`].
    Service,
    /// `policies`: [`v1::Policy`]; local to its cluster, never served to other clusters.
    Policy,
}

impl Kind {
    /// Every kind, in dependency order (config first, policies last).
    pub const ALL: [Kind; 6] = [
        Kind::ClusterConfig,
        Kind::Node,
        Kind::Identity,
        Kind::Endpoint,
        Kind::Service,
        Kind::Policy,
    ];

    /// Whether records of this kind may be served to other clusters (policies may not).
    #[must_use]
    pub fn exported(self) -> bool {
        self != Kind::Policy
    }

    /// The key segment naming this kind (`services`, `nodes`, ...).
    #[must_use]
    pub fn segment(self) -> &'static str {
        match self {
            Kind::ClusterConfig => "cluster-config",
            Kind::Node => "nodes",
            Kind::Identity => "identities",
            Kind::Endpoint => "endpoints",
            Kind::Service => "services",
            Kind::Policy => "policies",
        }
    }

    /// The kind whose key segment is `segment`.
    #[must_use]
    pub fn from_segment(segment: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.segment() == segment)
    }

    /// The protobuf enum value for this kind.
    #[must_use]
    pub fn to_proto(self) -> v1::Kind {
        match self {
            Kind::ClusterConfig => v1::Kind::ClusterConfig,
            Kind::Node => v1::Kind::Node,
            Kind::Identity => v1::Kind::Identity,
            Kind::Endpoint => v1::Kind::Endpoint,
            Kind::Service => v1::Kind::Service,
            Kind::Policy => v1::Kind::Policy,
        }
    }

    /// The kind for a protobuf enum value (`None` for `KIND_UNSPECIFIED` or an unknown
    /// number sent by a newer peer).
    #[must_use]
    pub fn from_proto(value: i32) -> Option<Kind> {
        match v1::Kind::try_from(value).ok()? {
            v1::Kind::Unspecified => None,
            v1::Kind::ClusterConfig => Some(Kind::ClusterConfig),
            v1::Kind::Node => Some(Kind::Node),
            v1::Kind::Identity => Some(Kind::Identity),
            v1::Kind::Endpoint => Some(Kind::Endpoint),
            v1::Kind::Service => Some(Kind::Service),
            v1::Kind::Policy => Some(Kind::Policy),
        }
    }

    /// `mesh/v1/<kind>/` — the prefix of this kind across clusters.
    #[must_use]
    pub fn prefix(self) -> String {
        format!("{ROOT}{}/", self.segment())
    }

    /// `mesh/v1/<kind>/<cluster>/` (for cluster-config: the exact key).
    #[must_use]
    pub fn cluster_prefix(self, cluster: &str) -> String {
        match self {
            Kind::ClusterConfig => cluster_config_key(cluster),
            _ => format!("{ROOT}{}/{cluster}/", self.segment()),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

/// `mesh/v1/cluster-config/<cluster>`
#[must_use]
pub fn cluster_config_key(cluster: &str) -> String {
    format!("{ROOT}cluster-config/{cluster}")
}

/// `mesh/v1/nodes/<cluster>/<node>`
#[must_use]
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{ROOT}nodes/{cluster}/{node}")
}

/// `mesh/v1/identities/<cluster>/<numeric-id>`
#[must_use]
pub fn identity_key(cluster: &str, id: u32) -> String {
    format!("{ROOT}identities/{cluster}/{id}")
}

/// `mesh/v1/endpoints/<cluster>/<ip>` (IPv6 in its canonical compressed form).
#[must_use]
pub fn endpoint_key(cluster: &str, ip: IpAddr) -> String {
    format!("{ROOT}endpoints/{cluster}/{ip}")
}

/// `mesh/v1/services/<cluster>/<namespace>/<name>`
#[must_use]
pub fn service_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("{ROOT}services/{cluster}/{namespace}/{name}")
}

/// `mesh/v1/policies/<cluster>/<namespace>/<policy-kind>/<name>`
#[must_use]
pub fn policy_key(cluster: &str, namespace: &str, kind: PolicySource, name: &str) -> String {
    format!(
        "{ROOT}policies/{cluster}/{namespace}/{}/{name}",
        kind.segment()
    )
}

/// The API a policy record comes from, named by its key segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicySource {
    /// `networkpolicy`: `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
    /// `ciliumnetworkpolicy`: `cilium.io/v2` CiliumNetworkPolicy.
    CiliumNetworkPolicy,
}

impl PolicySource {
    /// Both sources.
    pub const ALL: [PolicySource; 2] = [
        PolicySource::NetworkPolicy,
        PolicySource::CiliumNetworkPolicy,
    ];

    /// The key segment.
    #[must_use]
    pub fn segment(self) -> &'static str {
        match self {
            PolicySource::NetworkPolicy => "networkpolicy",
            PolicySource::CiliumNetworkPolicy => "ciliumnetworkpolicy",
        }
    }

    /// The Kubernetes kind (`NetworkPolicy`, `CiliumNetworkPolicy`).
    #[must_use]
    pub fn kubernetes_kind(self) -> &'static str {
        match self {
            PolicySource::NetworkPolicy => "NetworkPolicy",
            PolicySource::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        }
    }

    /// The protobuf enum value.
    #[must_use]
    pub fn to_proto(self) -> v1::PolicyKind {
        match self {
            PolicySource::NetworkPolicy => v1::PolicyKind::NetworkPolicy,
            PolicySource::CiliumNetworkPolicy => v1::PolicyKind::CiliumNetworkPolicy,
        }
    }

    /// The source for a protobuf enum value (`None` for unspecified or unknown).
    #[must_use]
    pub fn from_proto(value: i32) -> Option<PolicySource> {
        match v1::PolicyKind::try_from(value).ok()? {
            v1::PolicyKind::Unspecified => None,
            v1::PolicyKind::NetworkPolicy => Some(PolicySource::NetworkPolicy),
            v1::PolicyKind::CiliumNetworkPolicy => Some(PolicySource::CiliumNetworkPolicy),
        }
    }
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kubernetes_kind())
    }
}

/// `mesh/v1/synced/<cluster>/<kind>`
#[must_use]
pub fn synced_key(cluster: &str, kind: Kind) -> String {
    format!("{ROOT}synced/{cluster}/{}", kind.segment())
}

/// `mesh/v1/synced/<cluster>/`
#[must_use]
pub fn synced_prefix(cluster: &str) -> String {
    format!("{ROOT}synced/{cluster}/")
}

/// A parsed clustermesh key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MeshKey {
    /// `mesh/v1/cluster-config/<cluster>`
    ClusterConfig {
        /// Cluster name.
        cluster: String,
    },
    /// `mesh/v1/nodes/<cluster>/<node>`
    Node {
        /// Cluster name.
        cluster: String,
        /// Node name.
        name: String,
    },
    /// `mesh/v1/identities/<cluster>/<numeric-id>`
    Identity {
        /// Cluster name.
        cluster: String,
        /// Numeric identity.
        id: u32,
    },
    /// `mesh/v1/endpoints/<cluster>/<ip>`
    Endpoint {
        /// Cluster name.
        cluster: String,
        /// Endpoint IP.
        ip: IpAddr,
    },
    /// `mesh/v1/services/<cluster>/<namespace>/<name>`
    Service {
        /// Cluster name.
        cluster: String,
        /// Kubernetes namespace.
        namespace: String,
        /// Service name.
        name: String,
    },
    /// `mesh/v1/policies/<cluster>/<namespace>/<policy-kind>/<name>`
    Policy {
        /// Cluster name.
        cluster: String,
        /// Kubernetes namespace.
        namespace: String,
        /// Which policy API.
        source: PolicySource,
        /// Policy name.
        name: String,
    },
    /// `mesh/v1/synced/<cluster>/<kind>`
    Synced {
        /// Cluster name.
        cluster: String,
        /// Kind whose initial sync is complete.
        kind: Kind,
    },
}

impl MeshKey {
    /// The record kind this key holds (`None` for a synced marker).
    #[must_use]
    pub fn kind(&self) -> Option<Kind> {
        match self {
            MeshKey::ClusterConfig { .. } => Some(Kind::ClusterConfig),
            MeshKey::Node { .. } => Some(Kind::Node),
            MeshKey::Identity { .. } => Some(Kind::Identity),
            MeshKey::Endpoint { .. } => Some(Kind::Endpoint),
            MeshKey::Service { .. } => Some(Kind::Service),
            MeshKey::Policy { .. } => Some(Kind::Policy),
            MeshKey::Synced { .. } => None,
        }
    }

    /// The cluster the key belongs to.
    #[must_use]
    pub fn cluster(&self) -> &str {
        match self {
            MeshKey::ClusterConfig { cluster }
            | MeshKey::Node { cluster, .. }
            | MeshKey::Identity { cluster, .. }
            | MeshKey::Endpoint { cluster, .. }
            | MeshKey::Service { cluster, .. }
            | MeshKey::Policy { cluster, .. }
            | MeshKey::Synced { cluster, .. } => cluster,
        }
    }
}

impl fmt::Display for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match self {
            MeshKey::ClusterConfig { cluster } => cluster_config_key(cluster),
            MeshKey::Node { cluster, name } => node_key(cluster, name),
            MeshKey::Identity { cluster, id } => identity_key(cluster, *id),
            MeshKey::Endpoint { cluster, ip } => endpoint_key(cluster, *ip),
            MeshKey::Service {
                cluster,
                namespace,
                name,
            } => service_key(cluster, namespace, name),
            MeshKey::Policy {
                cluster,
                namespace,
                source,
                name,
            } => policy_key(cluster, namespace, *source, name),
            MeshKey::Synced { cluster, kind } => synced_key(cluster, *kind),
        };
        f.write_str(&key)
    }
}

/// Why a key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is not UTF-8.
    #[error("key {key:?} is not valid UTF-8; clustermesh keys are ASCII paths under {ROOT}")]
    NotUtf8 {
        /// The key, lossily decoded.
        key: String,
    },
    /// The key does not start with `mesh/v1/`.
    #[error("key {key:?} is not under {ROOT}; it does not belong to clustermesh v1")]
    WrongRoot {
        /// The key.
        key: String,
    },
    /// The segment after `mesh/v1/` names no known kind.
    #[error("key {key:?} has unknown kind segment {segment:?}; expected one of cluster-config, nodes, identities, endpoints, services, policies, synced")]
    UnknownKind {
        /// The key.
        key: String,
        /// The unknown segment.
        segment: String,
    },
    /// Wrong number of path segments for the kind, or an empty segment.
    #[error("key {key:?} does not match the layout {expected}")]
    Shape {
        /// The key.
        key: String,
        /// The expected layout.
        expected: &'static str,
    },
    /// The identity segment is not a decimal u32.
    #[error(
        "key {key:?} has identity {segment:?}, which is not a decimal number up to 4294967295"
    )]
    BadIdentity {
        /// The key.
        key: String,
        /// The bad segment.
        segment: String,
    },
    /// The endpoint segment is not an IP address.
    #[error("key {key:?} has endpoint {segment:?}, which is not an IPv4 or IPv6 address")]
    BadIp {
        /// The key.
        key: String,
        /// The bad segment.
        segment: String,
    },
}

/// Parses a store key into a [`MeshKey`].
///
/// # Errors
/// A [`KeyError`] naming the key and what is wrong with it.
pub fn parse_key(key: &[u8]) -> Result<MeshKey, KeyError> {
    let text = std::str::from_utf8(key).map_err(|_| KeyError::NotUtf8 {
        key: String::from_utf8_lossy(key).into_owned(),
    })?;
    let rest = text.strip_prefix(ROOT).ok_or_else(|| KeyError::WrongRoot {
        key: text.to_owned(),
    })?;
    let (segment, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let parts: Vec<&str> = rest.split('/').collect();
    let shape = |expected: &'static str| KeyError::Shape {
        key: text.to_owned(),
        expected,
    };
    let well_formed = |n: usize| parts.len() == n && parts.iter().all(|p| !p.is_empty());
    let owned = |i: usize| parts[i].to_owned();
    match segment {
        "cluster-config" => {
            if !well_formed(1) {
                return Err(shape("mesh/v1/cluster-config/<cluster>"));
            }
            Ok(MeshKey::ClusterConfig { cluster: owned(0) })
        }
        "nodes" => {
            if !well_formed(2) {
                return Err(shape("mesh/v1/nodes/<cluster>/<node>"));
            }
            Ok(MeshKey::Node {
                cluster: owned(0),
                name: owned(1),
            })
        }
        "identities" => {
            if !well_formed(2) {
                return Err(shape("mesh/v1/identities/<cluster>/<numeric-id>"));
            }
            let id = parse_decimal_u32(parts[1]).ok_or_else(|| KeyError::BadIdentity {
                key: text.to_owned(),
                segment: owned(1),
            })?;
            Ok(MeshKey::Identity {
                cluster: owned(0),
                id,
            })
        }
        "endpoints" => {
            if !well_formed(2) {
                return Err(shape("mesh/v1/endpoints/<cluster>/<ip>"));
            }
            let ip = IpAddr::from_str(parts[1]).map_err(|_| KeyError::BadIp {
                key: text.to_owned(),
                segment: owned(1),
            })?;
            Ok(MeshKey::Endpoint {
                cluster: owned(0),
                ip,
            })
        }
        "services" => {
            if !well_formed(3) {
                return Err(shape("mesh/v1/services/<cluster>/<namespace>/<name>"));
            }
            Ok(MeshKey::Service {
                cluster: owned(0),
                namespace: owned(1),
                name: owned(2),
            })
        }
        "policies" => {
            if !well_formed(4) {
                return Err(shape(
                    "mesh/v1/policies/<cluster>/<namespace>/<networkpolicy|ciliumnetworkpolicy>/<name>",
                ));
            }
            let source = PolicySource::ALL
                .into_iter()
                .find(|s| s.segment() == parts[2])
                .ok_or_else(|| {
                    shape("mesh/v1/policies/<cluster>/<namespace>/<networkpolicy|ciliumnetworkpolicy>/<name>")
                })?;
            Ok(MeshKey::Policy {
                cluster: owned(0),
                namespace: owned(1),
                source,
                name: owned(3),
            })
        }
        "synced" => {
            if !well_formed(2) {
                return Err(shape("mesh/v1/synced/<cluster>/<kind>"));
            }
            let kind = Kind::from_segment(parts[1]).ok_or_else(|| KeyError::UnknownKind {
                key: text.to_owned(),
                segment: owned(1),
            })?;
            Ok(MeshKey::Synced {
                cluster: owned(0),
                kind,
            })
        }
        other => Err(KeyError::UnknownKind {
            key: text.to_owned(),
            segment: other.to_owned(),
        }),
    }
}

/// Strict decimal: digits only (no sign, no whitespace), canonical (no leading zeros), so
/// one identity has exactly one key.
fn parse_decimal_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builder_round_trips_through_the_parser() {
        let keys = [
            MeshKey::ClusterConfig {
                cluster: "c1".into(),
            },
            MeshKey::Node {
                cluster: "c1".into(),
                name: "node-a".into(),
            },
            MeshKey::Identity {
                cluster: "c1".into(),
                id: 65_793,
            },
            MeshKey::Policy {
                cluster: "c1".into(),
                namespace: "prod".into(),
                source: PolicySource::CiliumNetworkPolicy,
                name: "api-allow".into(),
            },
            MeshKey::Endpoint {
                cluster: "c1".into(),
                ip: "fd00::1".parse().unwrap(),
            },
            MeshKey::Endpoint {
                cluster: "c1".into(),
                ip: "10.0.0.7".parse().unwrap(),
            },
            MeshKey::Service {
                cluster: "c1".into(),
                namespace: "default".into(),
                name: "web".into(),
            },
            MeshKey::Synced {
                cluster: "c1".into(),
                kind: Kind::Service,
            },
        ];
        for key in keys {
            let text = key.to_string();
            assert_eq!(parse_key(text.as_bytes()).unwrap(), key, "{text}");
        }
    }

    #[test]
    fn layout_matches_the_architecture_document() {
        assert_eq!(
            service_key("c1", "default", "web"),
            "mesh/v1/services/c1/default/web"
        );
        assert_eq!(cluster_config_key("c1"), "mesh/v1/cluster-config/c1");
        assert_eq!(identity_key("c1", 7), "mesh/v1/identities/c1/7");
        assert_eq!(synced_key("c1", Kind::Node), "mesh/v1/synced/c1/nodes");
        assert_eq!(Kind::Endpoint.cluster_prefix("c1"), "mesh/v1/endpoints/c1/");
    }

    #[test]
    fn malformed_keys_are_typed_errors() {
        type Check = fn(&KeyError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"\xff\xfe", |e| matches!(e, KeyError::NotUtf8 { .. })),
            (b"other/v1/nodes/c/n", |e| {
                matches!(e, KeyError::WrongRoot { .. })
            }),
            (b"mesh/v1/pods/c/n", |e| {
                matches!(e, KeyError::UnknownKind { .. })
            }),
            (b"mesh/v1/nodes/c", |e| matches!(e, KeyError::Shape { .. })),
            (b"mesh/v1/nodes/c//", |e| {
                matches!(e, KeyError::Shape { .. })
            }),
            (b"mesh/v1/services/c/ns", |e| {
                matches!(e, KeyError::Shape { .. })
            }),
            (b"mesh/v1/services/c/ns/n/extra", |e| {
                matches!(e, KeyError::Shape { .. })
            }),
            (b"mesh/v1/identities/c/-1", |e| {
                matches!(e, KeyError::BadIdentity { .. })
            }),
            (b"mesh/v1/identities/c/007", |e| {
                matches!(e, KeyError::BadIdentity { .. })
            }),
            (b"mesh/v1/identities/c/4294967296", |e| {
                matches!(e, KeyError::BadIdentity { .. })
            }),
            (b"mesh/v1/endpoints/c/10.0.0", |e| {
                matches!(e, KeyError::BadIp { .. })
            }),
            (b"mesh/v1/synced/c/pods", |e| {
                matches!(e, KeyError::UnknownKind { .. })
            }),
            (b"mesh/v1/", |e| matches!(e, KeyError::UnknownKind { .. })),
        ];
        for (key, check) in cases {
            let err = parse_key(key).unwrap_err();
            assert!(
                check(&err),
                "{:?} gave {err:?}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn kind_proto_mapping_is_a_bijection() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_proto(kind.to_proto() as i32), Some(kind));
            assert_eq!(Kind::from_segment(kind.segment()), Some(kind));
        }
        assert_eq!(Kind::from_proto(0), None);
        assert_eq!(Kind::from_proto(99), None);
    }
}
