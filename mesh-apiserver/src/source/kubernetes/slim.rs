//! The watched kinds, and the fields dropped from them before they reach the exporter.
//!
//! The exporter keeps every object it is sent (it needs them to re-translate a service
//! when one of its slices changes), so whatever the source passes on is held for the
//! life of the process. Pods and Nodes carry a lot nobody here reads: container specs and
//! statuses, node images and conditions, and on every kind `managedFields` and kubectl's
//! last-applied copy of the object. This module drops them, keeping exactly what
//! `crate::translate` reads (the tests below compare translations of full and slimmed
//! objects). A translator that starts reading another Pod or Node field must keep it here
//! too.
//!
//! NetworkPolicies and CiliumNetworkPolicies are read as [`PolicyObject`]s (metadata and
//! the raw spec) through the [`NetworkPolicyObject`] and [`CiliumNetworkPolicyObject`]
//! wrappers, which name their API for kube; no CRD type crate is needed for Cilium's.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeStatus, Pod, PodSpec, PodStatus, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

use crate::source::{K8sObject, ObjectKind, PolicyObject};

/// kubectl's copy of the whole applied object, kept in an annotation.
pub(super) const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A kind the Kubernetes source watches.
pub(super) trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The kind.
    const KIND: ObjectKind;

    /// Drops the fields nothing downstream reads.
    fn slim(&mut self);

    /// Wraps the object for the exporter.
    fn into_object(self) -> K8sObject;
}

fn slim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

impl Watched for Service {
    const KIND: ObjectKind = ObjectKind::Service;

    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        // The status (load-balancer ingress) is not exported.
        self.status = None;
    }

    fn into_object(self) -> K8sObject {
        K8sObject::Service(Box::new(self))
    }
}

impl Watched for EndpointSlice {
    const KIND: ObjectKind = ObjectKind::EndpointSlice;

    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
    }

    fn into_object(self) -> K8sObject {
        K8sObject::EndpointSlice(Box::new(self))
    }
}

impl Watched for Node {
    const KIND: ObjectKind = ObjectKind::Node;

    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        // Only the addresses of the status are read; images, conditions, capacity and
        // node info are most of a Node's size.
        self.status = self.status.take().map(|status| NodeStatus {
            addresses: status.addresses,
            ..NodeStatus::default()
        });
    }

    fn into_object(self) -> K8sObject {
        K8sObject::Node(Box::new(self))
    }
}

impl Watched for Pod {
    const KIND: ObjectKind = ObjectKind::Pod;

    fn slim(&mut self) {
        slim_meta(&mut self.metadata);
        self.spec = self.spec.take().map(|spec| PodSpec {
            host_network: spec.host_network,
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            // Only the named ports of the containers are read.
            containers: spec
                .containers
                .into_iter()
                .filter_map(|c| {
                    let ports: Vec<_> = c
                        .ports
                        .into_iter()
                        .flatten()
                        .filter(|p| p.name.as_ref().is_some_and(|n| !n.is_empty()))
                        .collect();
                    (!ports.is_empty()).then(|| Container {
                        name: c.name,
                        ports: Some(ports),
                        ..Container::default()
                    })
                })
                .collect(),
            ..PodSpec::default()
        });
        self.status = self.status.take().map(|status| PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            host_ips: status.host_ips,
            ..PodStatus::default()
        });
    }

    fn into_object(self) -> K8sObject {
        K8sObject::Pod(Box::new(self))
    }
}

impl Watched for Namespace {
    const KIND: ObjectKind = ObjectKind::Namespace;

    fn slim(&mut self) {
        // Only the name and the labels are read.
        self.metadata = ObjectMeta {
            name: self.metadata.name.take(),
            labels: self.metadata.labels.take(),
            ..ObjectMeta::default()
        };
        self.spec = None;
        self.status = None;
    }

    fn into_object(self) -> K8sObject {
        K8sObject::Namespace(Box::new(self))
    }
}

/// A `networking.k8s.io/v1` NetworkPolicy as the source reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub(super) struct NetworkPolicyObject(pub(super) PolicyObject);

/// A `cilium.io/v2` CiliumNetworkPolicy as the source reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub(super) struct CiliumNetworkPolicyObject(pub(super) PolicyObject);

/// Implements [`kube::Resource`] for a policy wrapper.
macro_rules! policy_resource {
    ($type:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind((): &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }

            fn group((): &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }

            fn version((): &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }

            fn plural((): &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.0.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.0.metadata
            }
        }
    };
}

policy_resource!(
    NetworkPolicyObject,
    "NetworkPolicy",
    "networking.k8s.io",
    "v1",
    "networkpolicies"
);
policy_resource!(
    CiliumNetworkPolicyObject,
    "CiliumNetworkPolicy",
    "cilium.io",
    "v2",
    "ciliumnetworkpolicies"
);

impl Watched for NetworkPolicyObject {
    const KIND: ObjectKind = ObjectKind::NetworkPolicy;

    fn slim(&mut self) {
        slim_meta(&mut self.0.metadata);
        // A NetworkPolicy has no `specs`.
        self.0.specs = None;
    }

    fn into_object(self) -> K8sObject {
        K8sObject::NetworkPolicy(Box::new(self.0))
    }
}

impl Watched for CiliumNetworkPolicyObject {
    const KIND: ObjectKind = ObjectKind::CiliumNetworkPolicy;

    fn slim(&mut self) {
        slim_meta(&mut self.0.metadata);
    }

    fn into_object(self) -> K8sObject {
        K8sObject::CiliumNetworkPolicy(Box::new(self.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{
        ContainerPort, ContainerStatus, NodeAddress, NodeCondition, NodeSpec, PodCondition, PodIP,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    use proptest::prelude::*;

    use super::*;
    use crate::translate::{node_record, pod_endpoints, pod_weight};

    fn managed() -> Option<Vec<ManagedFieldsEntry>> {
        Some(vec![ManagedFieldsEntry {
            manager: Some("kubectl".to_owned()),
            ..ManagedFieldsEntry::default()
        }])
    }

    prop_compose! {
        fn arb_pod()(
            name in proptest::option::of("[a-z]{1,8}"),
            namespace in proptest::option::of("[a-z]{1,8}"),
            labels in proptest::collection::btree_map("[a-z]{1,6}", "[a-z0-9]{0,6}", 0..4),
            host_network in proptest::option::of(any::<bool>()),
            node_name in proptest::option::of("[a-z]{1,8}"),
            service_account in proptest::option::of("[a-z]{1,8}"),
            phase in proptest::option::of(prop::sample::select(vec!["Pending", "Running", "Succeeded", "Failed", "Unknown"])),
            ips in proptest::collection::vec(prop::sample::select(vec!["10.0.0.1", "10.0.0.2", "fd00::1", "not-an-ip", "10.0.0.1"]), 0..3),
            pod_ip in proptest::option::of(prop::sample::select(vec!["10.1.0.1", "bad"])),
            has_spec in any::<bool>(),
            has_status in any::<bool>(),
            weight in proptest::option::of(prop::sample::select(vec!["3", "0", "x"])),
            uid in proptest::option::of("[a-f0-9-]{8}"),
            named_ports in proptest::collection::vec((
                proptest::option::of(prop::sample::select(vec!["http".to_owned(), "metrics".to_owned(), String::new()])),
                prop::sample::select(vec![80, 8080, 0, 70000]),
                proptest::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP"])),
            ), 0..4),
        ) -> Pod {
            let mut annotations = BTreeMap::from([(LAST_APPLIED_ANNOTATION.to_owned(), "{}".to_owned())]);
            if let Some(w) = weight {
                annotations.insert(clustermesh_api::annotations::WEIGHT.to_owned(), w.to_owned());
            }
            Pod {
                metadata: ObjectMeta {
                    name,
                    namespace,
                    labels: Some(labels.into_iter().collect()),
                    annotations: Some(annotations),
                    managed_fields: managed(),
                    uid,
                    ..ObjectMeta::default()
                },
                spec: has_spec.then(|| PodSpec {
                    host_network,
                    node_name,
                    service_account_name: service_account,
                    containers: vec![
                        Container { name: "app".to_owned(), image: Some("img".to_owned()), ..Container::default() },
                        Container {
                            name: "web".to_owned(),
                            image: Some("img".to_owned()),
                            ports: Some(named_ports.into_iter().map(|(name, port, protocol)| ContainerPort {
                                name,
                                container_port: port,
                                protocol: protocol.map(str::to_owned),
                                ..ContainerPort::default()
                            }).collect()),
                            ..Container::default()
                        },
                    ],
                    ..PodSpec::default()
                }),
                status: has_status.then(|| PodStatus {
                    phase: phase.map(str::to_owned),
                    pod_ip: pod_ip.map(str::to_owned),
                    pod_ips: Some(ips.into_iter().map(|ip| PodIP { ip: ip.to_owned() }).collect()),
                    conditions: Some(vec![PodCondition { type_: "Ready".to_owned(), status: "True".to_owned(), ..PodCondition::default() }]),
                    container_statuses: Some(vec![ContainerStatus { name: "app".to_owned(), ..ContainerStatus::default() }]),
                    ..PodStatus::default()
                }),
            }
        }
    }

    proptest! {
        #[test]
        fn slimmed_pods_translate_the_same(pod in arb_pod()) {
            let mut slim = pod.clone();
            slim.slim();
            let (mut w1, mut w2) = (Vec::new(), Vec::new());
            let ns = crate::translate::Labels::from([("io.cilium.k8s.namespace.labels.team".to_owned(), "a".to_owned())]);
            prop_assert_eq!(pod_endpoints("c1", &pod, &ns, &mut w1), pod_endpoints("c1", &slim, &ns, &mut w2));
            // The weight annotation survives slimming.
            prop_assert_eq!(pod_weight(&pod, &mut w1), pod_weight(&slim, &mut w2));
            prop_assert_eq!(w1, w2);
            prop_assert!(slim.metadata.managed_fields.is_none());
        }

        #[test]
        fn slimmed_nodes_translate_the_same(
            name in proptest::option::of("[a-z]{1,8}"),
            zone in proptest::option::of("[a-z]-[0-9]"),
            cidrs in proptest::collection::vec(prop::sample::select(vec!["10.0.0.0/24", "fd00::/64", "bogus"]), 0..3),
            cidr in proptest::option::of(prop::sample::select(vec!["10.9.0.0/24", "x"])),
            addresses in proptest::collection::vec(("InternalIP|ExternalIP|Hostname", "[0-9.]{1,15}"), 0..3),
        ) {
            let node = Node {
                metadata: ObjectMeta {
                    name,
                    labels: zone.map(|z| BTreeMap::from([(crate::translate::ZONE_LABEL.to_owned(), z)])),
                    managed_fields: managed(),
                    ..ObjectMeta::default()
                },
                spec: Some(NodeSpec { pod_cidrs: Some(cidrs.into_iter().map(str::to_owned).collect()), pod_cidr: cidr.map(str::to_owned), ..NodeSpec::default() }),
                status: Some(NodeStatus {
                    addresses: Some(addresses.into_iter().map(|(type_, address)| NodeAddress { type_, address }).collect()),
                    conditions: Some(vec![NodeCondition { type_: "Ready".to_owned(), status: "True".to_owned(), ..NodeCondition::default() }]),
                    ..NodeStatus::default()
                }),
            };
            let mut slim = node.clone();
            slim.slim();
            let (mut w1, mut w2) = (Vec::new(), Vec::new());
            prop_assert_eq!(node_record("c1", &node, &mut w1), node_record("c1", &slim, &mut w2));
            prop_assert_eq!(w1, w2);
            prop_assert!(slim.status.as_ref().is_some_and(|s| s.conditions.is_none()));
        }
    }

    #[test]
    fn service_annotations_survive_but_last_applied_does_not() {
        let mut svc = Service {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([
                    ("service.cilium.io/global".to_owned(), "true".to_owned()),
                    (LAST_APPLIED_ANNOTATION.to_owned(), "{\"big\":1}".to_owned()),
                ])),
                managed_fields: managed(),
                ..ObjectMeta::default()
            },
            ..Service::default()
        };
        svc.slim();
        let annotations = svc.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.len(), 1);
        assert_eq!(
            annotations
                .get("service.cilium.io/global")
                .map(String::as_str),
            Some("true")
        );
        assert!(svc.metadata.managed_fields.is_none());
    }

    #[test]
    fn pod_containers_are_dropped_but_their_named_ports() {
        let port = |name: Option<&str>| ContainerPort {
            name: name.map(str::to_owned),
            container_port: 8080,
            ..ContainerPort::default()
        };
        let mut pod = Pod {
            spec: Some(PodSpec {
                containers: vec![
                    Container::default(),
                    Container {
                        name: "app".to_owned(),
                        image: Some("img".to_owned()),
                        ports: Some(vec![port(Some("http")), port(None)]),
                        ..Container::default()
                    },
                ],
                node_name: Some("n1".to_owned()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        pod.slim();
        let spec = pod.spec.unwrap_or_default();
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(spec.containers[0].image, None);
        assert_eq!(spec.containers[0].ports, Some(vec![port(Some("http"))]));
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
    }

    #[test]
    fn namespaces_keep_only_name_and_labels() {
        let mut ns = Namespace {
            metadata: ObjectMeta {
                name: Some("shop".to_owned()),
                labels: Some(BTreeMap::from([("team".to_owned(), "a".to_owned())])),
                annotations: Some(BTreeMap::from([(
                    LAST_APPLIED_ANNOTATION.to_owned(),
                    "{}".to_owned(),
                )])),
                managed_fields: managed(),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let before = crate::translate::namespace_identity_labels(&ns);
        ns.slim();
        assert_eq!(crate::translate::namespace_identity_labels(&ns), before);
        assert!(ns.metadata.annotations.is_none() && ns.metadata.managed_fields.is_none());
    }
}
