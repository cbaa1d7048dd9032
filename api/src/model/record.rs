//! One cluster's service record, validated into the types the merge works on.
//!
//! The wire records ([`v1::Service`]) carry addresses and enums as strings and integers.
//! They are checked once, by [`ServiceRecord::from_wire`], when they arrive, so the merge
//! never deals with unparseable input and a bad record is refused as a whole (the agent
//! logs and counts it) instead of half-applied.

use std::net::IpAddr;

use super::{Affinity, Protocol, ServiceName};
use crate::v1;

/// A named port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// Port name ("" for a single unnamed port).
    pub name: String,
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// One backend address of a service in one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendRecord {
    /// Pod IP.
    pub ip: IpAddr,
    /// Target ports, matched against the service ports by name and protocol.
    pub ports: Vec<PortSpec>,
    /// Ready for traffic.
    pub ready: bool,
    /// Terminating (drained: existing flows only).
    pub terminating: bool,
    /// Node name ("" if unknown).
    pub node: String,
    /// Zone ("" if unknown).
    pub zone: String,
    /// Relative weight (≥ 1).
    pub weight: u32,
}

impl BackendRecord {
    /// Target port for `port`, if this backend serves it.
    #[must_use]
    pub fn target_port(&self, port: &PortSpec) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
            .map(|p| p.port)
    }
}

/// A service as one cluster exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    /// Cluster that exported the record.
    pub cluster: String,
    /// `namespace/name`.
    pub name: ServiceName,
    /// Cluster IPs in that cluster.
    pub frontends: Vec<IpAddr>,
    /// Service ports.
    pub ports: Vec<PortSpec>,
    /// Backends in that cluster.
    pub backends: Vec<BackendRecord>,
    /// Merged with same-named services of other clusters.
    pub global: bool,
    /// Backends are offered to other clusters.
    pub shared: bool,
    /// Backend preference.
    pub affinity: Affinity,
    /// Node/zone locality tiers apply.
    pub topology_aware: bool,
}

/// Why a wire record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// An address field does not parse.
    #[error("service {service} from cluster {cluster}: {field} {value:?} is not an IP address; fix the exporting cluster's service")]
    BadAddress {
        /// Cluster the record came from.
        cluster: String,
        /// `namespace/name`.
        service: String,
        /// Which field.
        field: &'static str,
        /// The offending value.
        value: String,
    },
    /// A port is 0 or above 65535, or its protocol is not TCP/UDP.
    #[error("service {service} from cluster {cluster}: port {name:?} ({port}, protocol {protocol}) is not a usable TCP/UDP port")]
    BadPort {
        /// Cluster the record came from.
        cluster: String,
        /// `namespace/name`.
        service: String,
        /// Port name.
        name: String,
        /// Port number as sent.
        port: u32,
        /// Protocol number as sent.
        protocol: i32,
    },
    /// The record names a cluster other than the one that sent it.
    #[error("cluster {sender} sent service {service} that claims to belong to cluster {claimed}; refusing it")]
    WrongCluster {
        /// Cluster whose connection delivered the record.
        sender: String,
        /// Cluster named inside the record.
        claimed: String,
        /// `namespace/name`.
        service: String,
    },
}

fn protocol(p: i32) -> Option<Protocol> {
    match v1::Protocol::try_from(p) {
        Ok(v1::Protocol::Tcp) => Some(Protocol::Tcp),
        Ok(v1::Protocol::Udp) => Some(Protocol::Udp),
        _ => None,
    }
}

impl ServiceRecord {
    /// Checks and converts a wire record received from cluster `sender`.
    ///
    /// SCTP ports are refused (the datapath balances TCP and UDP only). A backend weight of
    /// 0 means "not set" on the wire and becomes 1.
    ///
    /// # Errors
    /// [`RecordError`] naming the first field that is not usable.
    pub fn from_wire(sender: &str, svc: &v1::Service) -> Result<Self, RecordError> {
        let service = format!("{}/{}", svc.namespace, svc.name);
        if svc.cluster != sender {
            return Err(RecordError::WrongCluster {
                sender: sender.to_owned(),
                claimed: svc.cluster.clone(),
                service,
            });
        }
        let bad_addr = |field: &'static str, value: &str| RecordError::BadAddress {
            cluster: sender.to_owned(),
            service: service.clone(),
            field,
            value: value.to_owned(),
        };
        let port = |name: &str, number: u32, proto: i32| -> Result<PortSpec, RecordError> {
            match (u16::try_from(number), protocol(proto)) {
                (Ok(p), Some(protocol)) if p != 0 => Ok(PortSpec {
                    name: name.to_owned(),
                    port: p,
                    protocol,
                }),
                _ => Err(RecordError::BadPort {
                    cluster: sender.to_owned(),
                    service: service.clone(),
                    name: name.to_owned(),
                    port: number,
                    protocol: proto,
                }),
            }
        };
        let frontends = svc
            .frontends
            .iter()
            .map(|f| f.parse().map_err(|_| bad_addr("frontend", f)))
            .collect::<Result<Vec<IpAddr>, _>>()?;
        let ports = svc
            .ports
            .iter()
            .map(|p| port(&p.name, p.port, p.protocol))
            .collect::<Result<Vec<_>, _>>()?;
        let mut backends = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let ip = b.ip.parse().map_err(|_| bad_addr("backend ip", &b.ip))?;
            let ports = b
                .ports
                .iter()
                .map(|p| port(&p.name, p.port, p.protocol))
                .collect::<Result<Vec<_>, _>>()?;
            backends.push(BackendRecord {
                ip,
                ports,
                ready: b.ready,
                terminating: b.terminating,
                node: b.node.clone(),
                zone: b.zone.clone(),
                weight: b.weight.max(1),
            });
        }
        let affinity = match v1::Affinity::try_from(svc.affinity) {
            Ok(v1::Affinity::Local) => Affinity::Local,
            Ok(v1::Affinity::Remote) => Affinity::Remote,
            // Unknown values from a newer writer fall back to Cilium's default.
            _ => Affinity::None,
        };
        Ok(Self {
            cluster: sender.to_owned(),
            name: ServiceName {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            },
            frontends,
            ports,
            backends,
            global: svc.global,
            shared: svc.global && svc.shared,
            affinity,
            topology_aware: svc.topology_aware,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> v1::Service {
        v1::Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster: "east".into(),
            frontends: vec!["10.96.0.10".into(), "fd00::10".into()],
            ports: vec![v1::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: v1::Protocol::Tcp.into(),
            }],
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
                weight: 0,
                pod: "web-1".into(),
            }],
            global: true,
            shared: true,
            affinity: v1::Affinity::Local.into(),
            topology_aware: false,
        }
    }

    #[test]
    fn converts_a_valid_record() {
        let r = ServiceRecord::from_wire("east", &wire()).unwrap();
        assert_eq!(r.name.to_string(), "default/web");
        assert_eq!(r.frontends.len(), 2);
        assert_eq!(r.affinity, Affinity::Local);
        assert_eq!(r.backends[0].weight, 1, "unset weight means 1");
        assert_eq!(r.backends[0].target_port(&r.ports[0]), Some(8080));
    }

    #[test]
    fn refuses_a_record_for_another_cluster() {
        assert!(matches!(
            ServiceRecord::from_wire("west", &wire()),
            Err(RecordError::WrongCluster { .. })
        ));
    }

    #[test]
    fn refuses_bad_addresses_and_ports() {
        let mut w = wire();
        w.backends[0].ip = "10.0.0".into();
        assert!(matches!(
            ServiceRecord::from_wire("east", &w),
            Err(RecordError::BadAddress { .. })
        ));
        let mut w = wire();
        w.ports[0].port = 70000;
        assert!(matches!(
            ServiceRecord::from_wire("east", &w),
            Err(RecordError::BadPort { .. })
        ));
        let mut w = wire();
        w.ports[0].protocol = v1::Protocol::Sctp.into();
        assert!(ServiceRecord::from_wire("east", &w).is_err());
    }

    #[test]
    fn shared_only_counts_for_global_services() {
        let mut w = wire();
        w.global = false;
        assert!(!ServiceRecord::from_wire("east", &w).unwrap().shared);
    }
}
