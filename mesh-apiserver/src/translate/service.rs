//! Service + EndpointSlices → [`v1::Service`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_api::annotations::parse_service_annotations;
use clustermesh_api::v1;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{object_name, InputWarning};

/// Builds the record of `svc` with backends from `slices` (the EndpointSlices labelled
/// `kubernetes.io/service-name: <name>` in the same namespace; the caller selects them).
///
/// Returns `None` for services that have nothing to load-balance: ExternalName services
/// and headless services (no cluster IP), or a service without a name. Every port
/// is carried with its name; each backend lists, per service port name, the target port
/// from its EndpointSlice, so a consumer builds one load-balancer entry per service port
/// and picks each backend's target port by name ([`v1::Backend::target_port`]).
///
/// Endpoint conditions follow the EndpointSlice API: `ready` unset means ready, `serving`
/// unset means "same as ready", `terminating` unset means not terminating. Only the first
/// address of an endpoint is used (addresses of one endpoint are fungible; kube-proxy
/// does the same). Backends are sorted by IP and ports by name so that the same input
/// always encodes to the same bytes (the exporter relies on that to skip unchanged writes).
///
/// A backend's Maglev weight is its pod's `service.clustermesh.io/weight`, looked up with
/// `pod_weight(namespace, pod)` through the endpoint's `targetRef` (the caller parses pod
/// annotations once per pod, see [`super::pod_weight`]); for an endpoint without a pod,
/// or whose pod sets no valid weight, it is the service's own weight annotation, else 1.
#[must_use]
pub fn service_record(
    cluster: &str,
    svc: &Service,
    slices: &[&EndpointSlice],
    pod_weight: impl Fn(&str, &str) -> Option<u32>,
    warnings: &mut Vec<InputWarning>,
) -> Option<v1::Service> {
    let object = object_name("Service", &svc.metadata);
    let name = svc.metadata.name.clone()?;
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }

    let mut frontends = Vec::new();
    let ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    for raw in ips {
        if raw.is_empty() || raw == "None" {
            continue;
        }
        match raw.parse::<IpAddr>() {
            Ok(ip) => {
                let ip = ip.to_string();
                if !frontends.contains(&ip) {
                    frontends.push(ip);
                }
            }
            Err(_) => warnings.push(InputWarning::BadFrontend {
                object: object.clone(),
                value: raw.clone(),
            }),
        }
    }
    if frontends.is_empty() {
        return None;
    }

    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        let port_name = port.name.clone().unwrap_or_default();
        let label = if port_name.is_empty() {
            port.port.to_string()
        } else {
            port_name.clone()
        };
        let protocol = match parse_protocol(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(reason) => {
                warnings.push(InputWarning::BadPort {
                    object: object.clone(),
                    port: label,
                    reason,
                });
                continue;
            }
        };
        let Some(number) = valid_port(port.port) else {
            warnings.push(InputWarning::BadPort {
                object: object.clone(),
                port: label,
                reason: format!("port number {} is outside 1..=65535", port.port),
            });
            continue;
        };
        ports.push(v1::ServicePort {
            name: port_name,
            port: number,
            protocol: protocol.into(),
        });
    }

    let parsed = parse_service_annotations(&svc.metadata.annotations.clone().unwrap_or_default());
    warnings.extend(
        parsed
            .warnings
            .into_iter()
            .map(|warning| InputWarning::Annotation {
                object: object.clone(),
                warning,
            }),
    );
    let settings = parsed.settings;

    Some(v1::Service {
        namespace,
        name,
        cluster: cluster.to_owned(),
        frontends,
        ports,
        backends: backends(slices, settings.default_weight, pod_weight, warnings),
        global: settings.global,
        shared: settings.shared,
        affinity: settings.affinity.into(),
        topology_aware: settings.topology_aware,
    })
}

fn backends(
    slices: &[&EndpointSlice],
    default_weight: u32,
    pod_weight: impl Fn(&str, &str) -> Option<u32>,
    warnings: &mut Vec<InputWarning>,
) -> Vec<v1::Backend> {
    let mut sorted: Vec<&EndpointSlice> = slices.to_vec();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut by_ip: BTreeMap<IpAddr, v1::Backend> = BTreeMap::new();
    for slice in sorted {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            // FQDN slices carry no IPs to load-balance to.
            continue;
        }
        let object = object_name("EndpointSlice", &slice.metadata);
        let mut slice_ports = Vec::new();
        for port in slice.ports.iter().flatten() {
            let name = port.name.clone().unwrap_or_default();
            let label = if name.is_empty() {
                "<unnamed>".to_owned()
            } else {
                name.clone()
            };
            let protocol = match parse_protocol(port.protocol.as_deref()) {
                Ok(p) => p,
                Err(reason) => {
                    warnings.push(InputWarning::BadPort {
                        object: object.clone(),
                        port: label,
                        reason,
                    });
                    continue;
                }
            };
            let Some(number) = port.port.and_then(valid_port) else {
                warnings.push(InputWarning::BadPort {
                    object: object.clone(),
                    port: label,
                    reason: "port number is missing or outside 1..=65535".to_owned(),
                });
                continue;
            };
            slice_ports.push(v1::BackendPort {
                name,
                port: number,
                protocol: protocol.into(),
            });
        }
        for endpoint in slice.endpoints.iter().flatten() {
            let Some(raw) = endpoint.addresses.first() else {
                continue;
            };
            let Ok(ip) = raw.parse::<IpAddr>() else {
                warnings.push(InputWarning::BadAddress {
                    object: object.clone(),
                    value: raw.clone(),
                });
                continue;
            };
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            let pod = endpoint_pod(slice, endpoint);
            let backend = by_ip.entry(ip).or_insert_with(|| v1::Backend {
                ip: ip.to_string(),
                ports: Vec::new(),
                ready,
                serving: conditions.serving.unwrap_or(ready),
                terminating: conditions.terminating.unwrap_or(false),
                node: endpoint.node_name.clone().unwrap_or_default(),
                zone: endpoint.zone.clone().unwrap_or_default(),
                weight: pod
                    .as_ref()
                    .and_then(|(namespace, name)| pod_weight(namespace, name))
                    .unwrap_or(default_weight),
                pod: pod.map(|(_, name)| name.to_owned()).unwrap_or_default(),
            });
            for port in &slice_ports {
                if !backend
                    .ports
                    .iter()
                    .any(|p| p.name == port.name && p.protocol == port.protocol)
                {
                    backend.ports.push(port.clone());
                }
            }
        }
    }
    by_ip
        .into_values()
        .map(|mut b| {
            b.ports
                .sort_by(|x, y| (&x.name, x.protocol).cmp(&(&y.name, y.protocol)));
            b
        })
        .collect()
}

fn parse_protocol(raw: Option<&str>) -> Result<v1::Protocol, String> {
    match raw.unwrap_or("TCP") {
        "TCP" => Ok(v1::Protocol::Tcp),
        "UDP" => Ok(v1::Protocol::Udp),
        "SCTP" => Ok(v1::Protocol::Sctp),
        other => Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    }
}

fn valid_port(port: i32) -> Option<u32> {
    u16::try_from(port).ok().filter(|p| *p != 0).map(u32::from)
}

/// `(namespace, name)` of the pod that `endpoint` of `slice` names in its `targetRef`, or
/// `None` when the target is not a pod or has no name. An unset target namespace is the
/// slice's own (`default` when that is unset too).
pub(crate) fn endpoint_pod<'a>(
    slice: &'a EndpointSlice,
    endpoint: &'a Endpoint,
) -> Option<(&'a str, &'a str)> {
    let target = endpoint
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))?;
    let name = target.name.as_deref()?;
    let namespace = target
        .namespace
        .as_deref()
        .or(slice.metadata.namespace.as_deref())
        .unwrap_or("default");
    Some((namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ObjectReference, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proptest::prelude::*;

    fn protocol() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("TCP".to_owned())),
            Just(Some("UDP".to_owned())),
            ".{0,5}".prop_map(Some)
        ]
    }

    fn weighted_service(annotations: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Endpoints `(ip, pod)`; `pod` `None` means no targetRef.
    fn slice_of(endpoints: &[(&str, Option<&str>)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                ..Default::default()
            }]),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(ip, pod)| Endpoint {
                        addresses: vec![(*ip).to_owned()],
                        target_ref: pod.map(|name| ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some(name.to_owned()),
                            namespace: Some("shop".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn weights(svc: &Service, slice: &EndpointSlice) -> Vec<(String, u32)> {
        let mut warnings = Vec::new();
        let pods = |namespace: &str, pod: &str| match (namespace, pod) {
            ("shop", "heavy") => Some(5),
            ("shop", "max") => Some(256),
            _ => None,
        };
        let record = service_record("c", svc, &[slice], pods, &mut warnings).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        record
            .backends
            .into_iter()
            .map(|b| (b.ip, b.weight))
            .collect()
    }

    #[test]
    fn backend_weight_comes_from_its_pod_else_one() {
        let slice = slice_of(&[
            ("10.0.0.1", Some("heavy")),
            ("10.0.0.2", Some("plain")),
            ("10.0.0.3", None),
            ("10.0.0.4", Some("max")),
        ]);
        assert_eq!(
            weights(&weighted_service(&[]), &slice),
            [
                ("10.0.0.1".to_owned(), 5),
                ("10.0.0.2".to_owned(), 1),
                ("10.0.0.3".to_owned(), 1),
                ("10.0.0.4".to_owned(), 256),
            ]
        );
    }

    #[test]
    fn service_weight_is_the_default_and_pods_override_it() {
        let slice = slice_of(&[
            ("10.0.0.1", Some("heavy")),
            ("10.0.0.2", Some("plain")),
            ("10.0.0.3", None),
        ]);
        let svc = weighted_service(&[(clustermesh_api::annotations::WEIGHT, "3")]);
        assert_eq!(
            weights(&svc, &slice),
            [
                ("10.0.0.1".to_owned(), 5),
                ("10.0.0.2".to_owned(), 3),
                ("10.0.0.3".to_owned(), 3),
            ]
        );
    }

    #[test]
    fn invalid_service_weight_defaults_to_one_with_a_warning() {
        let slice = slice_of(&[("10.0.0.2", Some("plain"))]);
        let svc = weighted_service(&[(clustermesh_api::annotations::WEIGHT, "0")]);
        let mut warnings = Vec::new();
        let record = service_record("c", &svc, &[&slice], |_, _| None, &mut warnings).unwrap();
        assert_eq!(record.backends[0].weight, 1);
        assert_eq!(warnings.len(), 1);
        let msg = warnings[0].to_string();
        assert!(
            msg.starts_with("Service shop/web: ") && msg.contains("weight=\"0\""),
            "{msg}"
        );
    }

    proptest! {
        /// Whatever the object holds, translation does not panic, and what it exports
        /// is well-formed: parseable IPs, ports in 1..=65535.
        #[test]
        fn arbitrary_services_translate_to_well_formed_records(
            ips in proptest::collection::vec(prop_oneof![".{0,12}", "10\\.[0-9]{1,3}\\.0\\.1", Just("fd00::1".to_owned())], 0..3),
            ports in proptest::collection::vec((proptest::option::of("[a-z]{0,4}"), any::<i32>(), protocol()), 0..4),
            slice_ports in proptest::collection::vec((proptest::option::of("[a-z]{0,4}"), proptest::option::of(any::<i32>()), protocol()), 0..3),
            addresses in proptest::collection::vec(".{0,10}|10\\.0\\.0\\.[0-9]", 0..4),
            ready in proptest::option::of(any::<bool>()),
            affinity in ".{0,8}",
        ) {
            let svc = Service {
                metadata: ObjectMeta {
                    name: Some("s".into()),
                    namespace: Some("n".into()),
                    annotations: Some([(clustermesh_api::annotations::AFFINITY.to_owned(), affinity)].into_iter().collect()),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    cluster_ips: Some(ips),
                    ports: Some(ports.into_iter().map(|(name, port, protocol)| ServicePort { name, port, protocol, ..Default::default() }).collect()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let slice = EndpointSlice {
                metadata: ObjectMeta { name: Some("s-1".into()), namespace: Some("n".into()), ..Default::default() },
                address_type: "IPv4".into(),
                ports: Some(slice_ports.into_iter().map(|(name, port, protocol)| EndpointPort { name, port, protocol, ..Default::default() }).collect()),
                endpoints: Some(addresses.into_iter().map(|a| Endpoint {
                    addresses: vec![a],
                    conditions: Some(EndpointConditions { ready, ..Default::default() }),
                    ..Default::default()
                }).collect()),
            };
            let mut warnings = Vec::new();
            if let Some(record) = service_record("c", &svc, &[&slice], |_, _| None, &mut warnings) {
                prop_assert!(!record.frontends.is_empty());
                for f in &record.frontends {
                    prop_assert!(f.parse::<IpAddr>().is_ok());
                }
                for p in &record.ports {
                    prop_assert!((1..=65535).contains(&p.port));
                }
                for b in &record.backends {
                    prop_assert!(b.ip.parse::<IpAddr>().is_ok());
                    prop_assert!(b.ports.iter().all(|p| (1..=65535).contains(&p.port)));
                }
            }
        }
    }
}
