//! The records policy is computed from, as a watcher hands them over: identities and
//! endpoints of every cluster, policies of the local one. Validated from their wire form
//! here, so nothing downstream sees a malformed record.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_api::keys::{MeshKey, PolicySource};
use clustermesh_api::policy::{Labels, PolicyProtocol};
use clustermesh_api::security_identity::SecurityIdentity;
use clustermesh_api::v1;

use super::PolicyKey;

/// A security identity and its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    /// Numeric identity.
    pub id: SecurityIdentity,
    /// Security-relevant labels.
    pub labels: Labels,
}

/// One pod address and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRecord {
    /// Pod IP.
    pub ip: IpAddr,
    /// Its security identity.
    pub identity: SecurityIdentity,
    /// Node the pod runs on.
    pub node: String,
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID ("" if the exporter did not say).
    pub pod_uid: String,
    /// Named container ports by (protocol, name).
    pub named_ports: BTreeMap<(PolicyProtocol, String), u16>,
}

/// A policy as its source wrote it (parsed by the policy plane, which knows the local
/// cluster and the peer-cluster default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    /// Which policy.
    pub key: PolicyKey,
    /// Which API it comes from.
    pub source: PolicySource,
    /// Its `spec` as JSON.
    pub spec_json: String,
}

/// Which record an [`Input`] is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputKey {
    /// An identity.
    Identity(SecurityIdentity),
    /// An endpoint address.
    Endpoint(IpAddr),
    /// A policy.
    Policy(PolicyKey),
}

/// A validated identity, endpoint or policy record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// [`IdentityRecord`]
    Identity(IdentityRecord),
    /// [`EndpointRecord`]
    Endpoint(EndpointRecord),
    /// [`PolicyRecord`]
    Policy(PolicyRecord),
}

impl Input {
    /// Its key.
    #[must_use]
    pub fn key(&self) -> InputKey {
        match self {
            Input::Identity(r) => InputKey::Identity(r.id),
            Input::Endpoint(r) => InputKey::Endpoint(r.ip),
            Input::Policy(r) => InputKey::Policy(r.key.clone()),
        }
    }
}

/// A record that does not match its key or is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct InputError {
    /// The store key.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl InputKey {
    /// The input key of a parsed store key of `cluster` (`None` for kinds that are no
    /// policy input).
    #[must_use]
    pub fn of(key: &MeshKey) -> Option<InputKey> {
        match key {
            MeshKey::Identity { id, .. } => Some(InputKey::Identity(SecurityIdentity::new(*id))),
            MeshKey::Endpoint { ip, .. } => Some(InputKey::Endpoint(*ip)),
            MeshKey::Policy {
                namespace,
                source,
                name,
                ..
            } => Some(InputKey::Policy(PolicyKey {
                kind: source.kubernetes_kind().to_owned(),
                namespace: namespace.clone(),
                name: name.clone(),
            })),
            _ => None,
        }
    }
}

fn protocol(raw: i32) -> Option<PolicyProtocol> {
    match v1::Protocol::try_from(raw).ok()? {
        v1::Protocol::Tcp | v1::Protocol::Unspecified => Some(PolicyProtocol::Tcp),
        v1::Protocol::Udp => Some(PolicyProtocol::Udp),
        v1::Protocol::Sctp => Some(PolicyProtocol::Sctp),
    }
}

/// Validates the identity record stored at `key` (whose parsed form is `mesh_key`).
///
/// # Errors
/// [`InputError`] when the record's ID differs from its key's.
pub fn identity_from_wire(
    key: &str,
    mesh_key: &MeshKey,
    record: &v1::Identity,
) -> Result<IdentityRecord, InputError> {
    let err = |problem: String| InputError {
        key: key.to_owned(),
        problem,
    };
    let MeshKey::Identity { id, .. } = mesh_key else {
        return Err(err("not an identity key".into()));
    };
    if record.id != *id {
        return Err(err(format!(
            "record says identity {}, key says {id}",
            record.id
        )));
    }
    Ok(IdentityRecord {
        id: SecurityIdentity::new(record.id),
        labels: record.labels.clone().into_iter().collect(),
    })
}

/// Validates the endpoint record stored at `key` of cluster `cluster`.
///
/// # Errors
/// [`InputError`] when the address differs from the key's, the record names another
/// cluster, or a named port is malformed.
pub fn endpoint_from_wire(
    key: &str,
    mesh_key: &MeshKey,
    cluster: &str,
    record: &v1::Endpoint,
) -> Result<EndpointRecord, InputError> {
    let err = |problem: String| InputError {
        key: key.to_owned(),
        problem,
    };
    let MeshKey::Endpoint { ip, .. } = mesh_key else {
        return Err(err("not an endpoint key".into()));
    };
    match record.ip.parse::<IpAddr>() {
        Ok(a) if a == *ip => {}
        _ => {
            return Err(err(format!(
                "record says address {:?}, key says {ip}",
                record.ip
            )))
        }
    }
    if !record.cluster.is_empty() && record.cluster != cluster {
        return Err(err(format!(
            "record names cluster {:?}, exported by {cluster}",
            record.cluster
        )));
    }
    let mut named_ports = BTreeMap::new();
    for p in &record.named_ports {
        let (Some(proto), Ok(port)) = (protocol(p.protocol), u16::try_from(p.port)) else {
            return Err(err(format!("named port {:?} is malformed", p.name)));
        };
        if p.name.is_empty() || port == 0 {
            return Err(err(format!(
                "named port {:?}/{} is malformed",
                p.name, p.port
            )));
        }
        named_ports.insert((proto, p.name.clone()), port);
    }
    Ok(EndpointRecord {
        ip: *ip,
        identity: SecurityIdentity::new(record.identity),
        node: record.node.clone(),
        namespace: record.namespace.clone(),
        pod: record.pod.clone(),
        pod_uid: record.pod_uid.clone(),
        named_ports,
    })
}

/// Validates the policy record stored at `key`.
///
/// # Errors
/// [`InputError`] when the record's kind, namespace or name differ from its key's.
pub fn policy_from_wire(
    key: &str,
    mesh_key: &MeshKey,
    record: &v1::Policy,
) -> Result<PolicyRecord, InputError> {
    let err = |problem: String| InputError {
        key: key.to_owned(),
        problem,
    };
    let MeshKey::Policy {
        namespace,
        source,
        name,
        ..
    } = mesh_key
    else {
        return Err(err("not a policy key".into()));
    };
    if PolicySource::from_proto(record.kind) != Some(*source)
        || &record.namespace != namespace
        || &record.name != name
    {
        return Err(err(format!(
            "record says {}/{} of kind {}, which is not what its key says",
            record.namespace, record.name, record.kind
        )));
    }
    Ok(PolicyRecord {
        key: PolicyKey {
            kind: source.kubernetes_kind().to_owned(),
            namespace: namespace.clone(),
            name: name.clone(),
        },
        source: *source,
        spec_json: record.spec_json.clone(),
    })
}
