//! Typed decoding of store values and Watch payloads.
//!
//! A value's message type follows from its key's [`Kind`]; [`Record::decode`] does that
//! dispatch once so callers never decode a service as a node. Decoding is total: any
//! input yields a record or a [`DecodeError`], never a panic (prost skips unknown fields,
//! so records written by a newer version decode fine).

use prost::Message;

use crate::keys::Kind;
use crate::v1;

/// A decoded record of any kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// [`v1::ClusterConfig`]
    ClusterConfig(v1::ClusterConfig),
    /// [`v1::Node`]
    Node(v1::Node),
    /// [`v1::Identity`]
    Identity(v1::Identity),
    /// [`v1::Endpoint`]
    Endpoint(v1::Endpoint),
    /// [`v1::Service`]
    Service(v1::Service),
    /// [`v1::Policy`]
    Policy(v1::Policy),
}

/// A value that is not a valid record of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("value of {kind} record {key:?} is not a valid clustermesh.v1 message ({detail}); the writer may be corrupt or speak another protocol version")]
pub struct DecodeError {
    /// Kind that was expected.
    pub kind: Kind,
    /// Key (or other name) of the value, for the message.
    pub key: String,
    /// prost's description.
    pub detail: String,
}

impl Record {
    /// Decodes `value` as a record of `kind`; `key` is only used in the error message.
    ///
    /// # Errors
    /// [`DecodeError`] when the bytes are not a valid message.
    pub fn decode(kind: Kind, key: &str, value: &[u8]) -> Result<Record, DecodeError> {
        let err = |e: prost::DecodeError| DecodeError {
            kind,
            key: key.to_owned(),
            detail: e.to_string(),
        };
        Ok(match kind {
            Kind::ClusterConfig => {
                Record::ClusterConfig(v1::ClusterConfig::decode(value).map_err(err)?)
            }
            Kind::Node => Record::Node(v1::Node::decode(value).map_err(err)?),
            Kind::Identity => Record::Identity(v1::Identity::decode(value).map_err(err)?),
            Kind::Endpoint => Record::Endpoint(v1::Endpoint::decode(value).map_err(err)?),
            Kind::Service => Record::Service(v1::Service::decode(value).map_err(err)?),
            Kind::Policy => Record::Policy(v1::Policy::decode(value).map_err(err)?),
        })
    }

    /// The record's kind.
    #[must_use]
    pub fn kind(&self) -> Kind {
        match self {
            Record::ClusterConfig(_) => Kind::ClusterConfig,
            Record::Node(_) => Kind::Node,
            Record::Identity(_) => Kind::Identity,
            Record::Endpoint(_) => Kind::Endpoint,
            Record::Service(_) => Kind::Service,
            Record::Policy(_) => Kind::Policy,
        }
    }

    /// Protobuf encoding (the store value).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::ClusterConfig(r) => r.encode_to_vec(),
            Record::Node(r) => r.encode_to_vec(),
            Record::Identity(r) => r.encode_to_vec(),
            Record::Endpoint(r) => r.encode_to_vec(),
            Record::Service(r) => r.encode_to_vec(),
            Record::Policy(r) => r.encode_to_vec(),
        }
    }
}

impl v1::Backend {
    /// The target port this backend serves `port` on: the entry of [`v1::Backend::ports`]
    /// with the same name and protocol. `None` when the backend does not serve that port.
    #[must_use]
    pub fn target_port(&self, port: &v1::ServicePort) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
            .and_then(|p| u16::try_from(p.port).ok())
            .filter(|p| *p != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn service() -> v1::Service {
        v1::Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster: "c1".into(),
            frontends: vec!["10.96.0.10".into(), "fd00:96::10".into()],
            ports: vec![
                v1::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: v1::Protocol::Tcp.into(),
                },
                v1::ServicePort {
                    name: "dns".into(),
                    port: 53,
                    protocol: v1::Protocol::Udp.into(),
                },
            ],
            backends: vec![v1::Backend {
                ip: "10.0.0.5".into(),
                ports: vec![v1::BackendPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: v1::Protocol::Tcp.into(),
                }],
                ready: true,
                serving: true,
                terminating: false,
                node: "n1".into(),
                zone: "z1".into(),
                weight: 1,
                pod: "web-0".into(),
            }],
            global: true,
            shared: true,
            affinity: v1::Affinity::Local.into(),
            topology_aware: false,
        }
    }

    #[test]
    fn service_round_trips() {
        let record = Record::Service(service());
        let bytes = record.encode();
        assert_eq!(Record::decode(Kind::Service, "k", &bytes).unwrap(), record);
    }

    #[test]
    fn backend_target_port_matches_name_and_protocol() {
        let svc = service();
        let b = &svc.backends[0];
        assert_eq!(b.target_port(&svc.ports[0]), Some(8080));
        assert_eq!(b.target_port(&svc.ports[1]), None);
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let mut bytes = Record::Service(service()).encode();
        // Field 99, varint wire type, value 1: as a newer writer would add.
        bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
        let Record::Service(decoded) = Record::decode(Kind::Service, "k", &bytes).unwrap() else {
            panic!("wrong kind");
        };
        assert_eq!(decoded, service());
    }

    #[test]
    fn garbage_is_a_typed_error_naming_the_key() {
        let err = Record::decode(Kind::Node, "mesh/v1/nodes/c/n", &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.to_string().contains("mesh/v1/nodes/c/n"), "{err}");
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), k in 0usize..5) {
            let kind = Kind::ALL[k];
            if let Ok(record) = Record::decode(kind, "k", &bytes) {
                prop_assert_eq!(record.kind(), kind);
            }
        }

        #[test]
        fn key_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = crate::keys::parse_key(&bytes);
        }

        #[test]
        fn key_parsing_of_mesh_like_strings_never_panics(s in "mesh/v1/[a-z-]{0,15}(/[a-z0-9.:-]{0,6}){0,4}") {
            if let Ok(key) = crate::keys::parse_key(s.as_bytes()) {
                prop_assert_eq!(key.to_string(), s);
            }
        }
    }
}
