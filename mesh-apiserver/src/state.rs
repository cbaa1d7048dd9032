//! The cluster's Kubernetes objects as last reported by the source, and the records they
//! translate to.
//!
//! Source events land here; [`ClusterObjects::take_changes`] returns only the records
//! whose inputs changed since the last call (a service is re-translated when the service
//! or one of its EndpointSlices changes, or when a pod behind one of its backends changes
//! its `service.clustermesh.io/weight`; an endpoint when its pod, or the labels of its
//! pod's namespace, change; a policy when it changes), so a large cluster is not
//! re-exported on every event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use clustermesh_api::keys::{Kind, PolicySource};
use clustermesh_api::v1;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::source::{K8sObject, ObjectKind, ObjectRef, PolicyObject, SourceEvent};
use crate::translate::{self, EndpointSpec, InputWarning, Labels};

/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

type NsName = (String, String);

/// A policy: its API, namespace and name.
type PolicyId = (PolicySource, String, String);

/// One changed record.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordChange {
    /// Service `namespace/name` now translates to this (or to nothing).
    Service {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// New record; `None` when the service is gone or has nothing to export.
        record: Option<v1::Service>,
    },
    /// Node `name` now translates to this (or is gone).
    Node {
        /// Node name.
        name: String,
        /// New record.
        record: Option<v1::Node>,
    },
    /// The endpoint for `ip` is now this pod (or no pod).
    Endpoint {
        /// Pod IP.
        ip: IpAddr,
        /// New owner.
        spec: Option<EndpointSpec>,
    },
    /// Policy `namespace/name` of API `source` now translates to this (or is gone).
    Policy {
        /// Which policy API.
        source: PolicySource,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// New record.
        record: Option<v1::Policy>,
    },
}

/// The source's objects plus what changed since the last [`ClusterObjects::take_changes`].
#[derive(Debug)]
pub struct ClusterObjects {
    cluster: String,
    services: BTreeMap<NsName, Service>,
    slices: BTreeMap<NsName, EndpointSlice>,
    slices_by_service: HashMap<NsName, BTreeSet<String>>,
    nodes: BTreeMap<String, Node>,
    pods: BTreeMap<NsName, Pod>,
    /// Identity labels each Namespace gives its pods (see
    /// [`translate::namespace_identity_labels`]); a pod whose Namespace object is not
    /// known gets none rather than waiting for it.
    namespace_labels: BTreeMap<String, Labels>,
    policies: BTreeMap<PolicyId, PolicyObject>,
    /// Endpoints currently derived from each pod.
    pod_endpoints: HashMap<NsName, Vec<EndpointSpec>>,
    /// Which pod an endpoint IP belongs to.
    ip_owner: HashMap<IpAddr, NsName>,
    /// Valid `service.clustermesh.io/weight` of each pod that sets one.
    pod_weights: HashMap<NsName, u32>,
    synced: BTreeSet<ObjectKind>,
    dirty_services: BTreeSet<NsName>,
    dirty_nodes: BTreeSet<String>,
    dirty_pods: BTreeSet<NsName>,
    dirty_policies: BTreeSet<PolicyId>,
}

impl ClusterObjects {
    /// Empty state for cluster `cluster`.
    #[must_use]
    pub fn new(cluster: impl Into<String>) -> Self {
        ClusterObjects {
            cluster: cluster.into(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_by_service: HashMap::new(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            namespace_labels: BTreeMap::new(),
            policies: BTreeMap::new(),
            pod_endpoints: HashMap::new(),
            ip_owner: HashMap::new(),
            pod_weights: HashMap::new(),
            synced: BTreeSet::new(),
            dirty_services: BTreeSet::new(),
            dirty_nodes: BTreeSet::new(),
            dirty_pods: BTreeSet::new(),
            dirty_policies: BTreeSet::new(),
        }
    }

    /// Applies one source event.
    pub fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Apply(object) => self.upsert(object),
            SourceEvent::Delete(r) => self.remove(&r),
            SourceEvent::Synced(kind) => {
                self.synced.insert(kind);
            }
            SourceEvent::Replace { kind, objects } => {
                let keep: BTreeSet<ObjectRef> = objects.iter().map(K8sObject::object_ref).collect();
                for r in self.refs_of(kind) {
                    if !keep.contains(&r) {
                        self.remove(&r);
                    }
                }
                for object in objects {
                    self.upsert(object);
                }
                self.synced.insert(kind);
            }
        }
    }

    /// Whether the initial sync of the inputs of record kind `kind` is complete.
    #[must_use]
    pub fn is_synced(&self, kind: Kind) -> bool {
        let needs: &[ObjectKind] = match kind {
            Kind::ClusterConfig => &[],
            Kind::Node => &[ObjectKind::Node],
            Kind::Service => &[ObjectKind::Service, ObjectKind::EndpointSlice],
            // Identity labels include the labels of the pod's namespace.
            Kind::Endpoint | Kind::Identity => &[ObjectKind::Pod, ObjectKind::Namespace],
            Kind::Policy => &[ObjectKind::NetworkPolicy, ObjectKind::CiliumNetworkPolicy],
        };
        needs.iter().all(|k| self.synced.contains(k))
    }

    fn refs_of(&self, kind: ObjectKind) -> Vec<ObjectRef> {
        let nsn = |(ns, name): &NsName| ObjectRef {
            kind,
            namespace: ns.clone(),
            name: name.clone(),
        };
        let cluster_scoped = |name: &String| ObjectRef {
            kind,
            namespace: String::new(),
            name: name.clone(),
        };
        match kind {
            ObjectKind::Service => self.services.keys().map(nsn).collect(),
            ObjectKind::EndpointSlice => self.slices.keys().map(nsn).collect(),
            ObjectKind::Pod => self.pods.keys().map(nsn).collect(),
            ObjectKind::Node => self.nodes.keys().map(cluster_scoped).collect(),
            ObjectKind::Namespace => self.namespace_labels.keys().map(cluster_scoped).collect(),
            ObjectKind::NetworkPolicy | ObjectKind::CiliumNetworkPolicy => self
                .policies
                .keys()
                .filter(|(source, _, _)| Some(*source) == kind.policy_source())
                .map(|(_, ns, name)| ObjectRef {
                    kind,
                    namespace: ns.clone(),
                    name: name.clone(),
                })
                .collect(),
        }
    }

    fn upsert(&mut self, object: K8sObject) {
        let r = object.object_ref();
        if r.name.is_empty() {
            tracing::warn!(kind = %r.kind, "object without metadata.name ignored");
            return;
        }
        let key = (r.namespace.clone(), r.name.clone());
        match object {
            K8sObject::Service(svc) => {
                if self.services.get(&key) != Some(&svc) {
                    self.services.insert(key.clone(), *svc);
                    self.dirty_services.insert(key);
                }
            }
            K8sObject::EndpointSlice(slice) => {
                if self.slices.get(&key) == Some(&slice) {
                    return;
                }
                self.unlink_slice(&key);
                if let Some(svc) = slice_service(&slice) {
                    let svc_key = (r.namespace.clone(), svc);
                    self.slices_by_service
                        .entry(svc_key.clone())
                        .or_default()
                        .insert(r.name.clone());
                    self.dirty_services.insert(svc_key);
                }
                self.slices.insert(key, *slice);
            }
            K8sObject::Node(node) => {
                if self.nodes.get(&r.name) != Some(&node) {
                    self.nodes.insert(r.name.clone(), *node);
                    self.dirty_nodes.insert(r.name);
                }
            }
            K8sObject::Pod(pod) => {
                if self.pods.get(&key) != Some(&pod) {
                    self.pods.insert(key.clone(), *pod);
                    self.dirty_pods.insert(key);
                }
            }
            K8sObject::Namespace(namespace) => {
                let labels = translate::namespace_identity_labels(&namespace);
                if self.namespace_labels.get(&r.name) != Some(&labels) {
                    self.namespace_labels.insert(r.name.clone(), labels);
                    self.mark_pods_of_namespace(&r.name);
                }
            }
            K8sObject::NetworkPolicy(policy) | K8sObject::CiliumNetworkPolicy(policy) => {
                let Some(source) = r.kind.policy_source() else {
                    return;
                };
                let id = (source, r.namespace, r.name);
                if self.policies.get(&id) != Some(&policy) {
                    self.policies.insert(id.clone(), *policy);
                    self.dirty_policies.insert(id);
                }
            }
        }
    }

    /// Marks every pod of namespace `namespace` dirty (its identity labels changed).
    fn mark_pods_of_namespace(&mut self, namespace: &str) {
        let from = (namespace.to_owned(), String::new());
        for (ns, name) in self.pods.range(from..).map(|(k, _)| k) {
            if ns != namespace {
                break;
            }
            self.dirty_pods.insert((ns.clone(), name.clone()));
        }
    }

    fn remove(&mut self, r: &ObjectRef) {
        let key = (r.namespace.clone(), r.name.clone());
        match r.kind {
            ObjectKind::Service => {
                if self.services.remove(&key).is_some() {
                    self.dirty_services.insert(key);
                }
            }
            ObjectKind::EndpointSlice => {
                self.unlink_slice(&key);
                self.slices.remove(&key);
            }
            ObjectKind::Node => {
                if self.nodes.remove(&r.name).is_some() {
                    self.dirty_nodes.insert(r.name.clone());
                }
            }
            ObjectKind::Pod => {
                if self.pods.remove(&key).is_some() {
                    self.dirty_pods.insert(key);
                }
            }
            ObjectKind::Namespace => {
                if self.namespace_labels.remove(&r.name).is_some() {
                    self.mark_pods_of_namespace(&r.name);
                }
            }
            ObjectKind::NetworkPolicy | ObjectKind::CiliumNetworkPolicy => {
                if let Some(source) = r.kind.policy_source() {
                    let id = (source, key.0, key.1);
                    if self.policies.remove(&id).is_some() {
                        self.dirty_policies.insert(id);
                    }
                }
            }
        }
    }

    /// Detaches slice `key` from the service it pointed at (marking that service dirty).
    fn unlink_slice(&mut self, key: &NsName) {
        let Some(old) = self.slices.get(key) else {
            return;
        };
        if let Some(svc) = slice_service(old) {
            let svc_key = (key.0.clone(), svc);
            if let Some(set) = self.slices_by_service.get_mut(&svc_key) {
                set.remove(&key.1);
                if set.is_empty() {
                    self.slices_by_service.remove(&svc_key);
                }
            }
            self.dirty_services.insert(svc_key);
        }
    }

    /// Re-translates everything whose inputs changed and returns the resulting record
    /// changes; translation warnings are appended to `warnings`.
    pub fn take_changes(&mut self, warnings: &mut Vec<InputWarning>) -> Vec<RecordChange> {
        // Pods first: a changed weight makes the services of the pod's slices dirty.
        let endpoint_changes = self.take_pod_changes(warnings);
        let mut out = Vec::new();
        for (namespace, name) in std::mem::take(&mut self.dirty_services) {
            let key = (namespace.clone(), name.clone());
            let record = self.services.get(&key).and_then(|svc| {
                let slices: Vec<&EndpointSlice> = self
                    .slices_by_service
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|slice| self.slices.get(&(namespace.clone(), slice.clone())))
                    .collect();
                let pod_weight = |namespace: &str, pod: &str| {
                    self.pod_weights
                        .get(&(namespace.to_owned(), pod.to_owned()))
                        .copied()
                };
                translate::service_record(&self.cluster, svc, &slices, pod_weight, warnings)
            });
            out.push(RecordChange::Service {
                namespace,
                name,
                record,
            });
        }
        for name in std::mem::take(&mut self.dirty_nodes) {
            let record = self
                .nodes
                .get(&name)
                .and_then(|n| translate::node_record(&self.cluster, n, warnings));
            out.push(RecordChange::Node { name, record });
        }
        out.extend(endpoint_changes);
        for (source, namespace, name) in std::mem::take(&mut self.dirty_policies) {
            let record = self
                .policies
                .get(&(source, namespace.clone(), name.clone()))
                .and_then(|p| translate::policy_record(&self.cluster, source, p, warnings));
            out.push(RecordChange::Policy {
                source,
                namespace,
                name,
                record,
            });
        }
        out
    }

    /// Re-translates the dirty pods: returns their endpoint changes, and marks dirty the
    /// services whose backends' weight changed with a pod's weight annotation.
    fn take_pod_changes(&mut self, warnings: &mut Vec<InputWarning>) -> Vec<RecordChange> {
        let mut out = Vec::new();
        for key in std::mem::take(&mut self.dirty_pods) {
            let pod = self.pods.get(&key);
            let weight = pod.and_then(|p| translate::pod_weight(p, warnings));
            let no_labels = Labels::new();
            let namespace_labels = self.namespace_labels.get(&key.0).unwrap_or(&no_labels);
            let new = pod
                .map(|p| translate::pod_endpoints(&self.cluster, p, namespace_labels, warnings))
                .unwrap_or_default();
            let old_weight = match weight {
                Some(w) => self.pod_weights.insert(key.clone(), w),
                None => self.pod_weights.remove(&key),
            };
            if old_weight != weight {
                self.mark_services_of_pod(&key);
            }
            let old = self.pod_endpoints.remove(&key).unwrap_or_default();
            for spec in &old {
                if !new.iter().any(|n| n.ip == spec.ip) && self.ip_owner.get(&spec.ip) == Some(&key)
                {
                    self.ip_owner.remove(&spec.ip);
                    out.push(RecordChange::Endpoint {
                        ip: spec.ip,
                        spec: None,
                    });
                }
            }
            for spec in &new {
                let unchanged = old.contains(spec) && self.ip_owner.get(&spec.ip) == Some(&key);
                if !unchanged {
                    self.ip_owner.insert(spec.ip, key.clone());
                    out.push(RecordChange::Endpoint {
                        ip: spec.ip,
                        spec: Some(spec.clone()),
                    });
                }
            }
            if !new.is_empty() {
                self.pod_endpoints.insert(key, new);
            }
        }
        out
    }

    /// Marks dirty every service with an EndpointSlice endpoint whose `targetRef` is pod
    /// `key`. Only called when a pod's weight changes, which is rare, so the slices of the
    /// pod's namespace are scanned rather than indexed.
    fn mark_services_of_pod(&mut self, key: &NsName) {
        let (namespace, pod) = key;
        let from = (namespace.clone(), String::new());
        for ((slice_ns, _), slice) in self.slices.range(from..) {
            if slice_ns != namespace {
                break;
            }
            let refers = slice.endpoints.iter().flatten().any(|e| {
                translate::endpoint_pod(slice, e) == Some((namespace.as_str(), pod.as_str()))
            });
            if let Some(svc) = slice_service(slice).filter(|_| refers) {
                self.dirty_services.insert((namespace.clone(), svc));
            }
        }
    }
}

fn slice_service(slice: &EndpointSlice) -> Option<String> {
    slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
}
