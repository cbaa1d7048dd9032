//! What other clusters see of this cluster's records (ARCHITECTURE.md, "Export rules").
//!
//! The store holds the cluster's full local state, because this cluster's own agents
//! watch the same server and need all of it (services that are not global, every pod's
//! identity and endpoint for local policy). Peers (another cluster's mesh API server or,
//! in direct mode, its agents) get only what they need:
//! - a service only if it is global and shared (Cilium's rule); its backends are inside
//!   the service record, so they go with it;
//! - pod identities and endpoints as the [`PodExport`] rule says: all of them (the
//!   default), only the pods backing exported services, or only the pods whose identity
//!   labels match a selector;
//! - nodes and the cluster configuration always; policies never.
//!
//! # Why here, and how transitions reach peers
//! Visibility can change without the record itself being deleted: a service loses its
//! global annotation, a pod stops backing the last exported service, an endpoint's
//! identity changes. A peer that saw the record must then get a Delete, and one that did
//! not must get an Upsert when the record becomes visible. [`PeerView`] is evaluated
//! **once per store change, in the cache**, not per watcher: it keeps the set of keys
//! peers can currently see plus the small indexes the rules need (backend → number of
//! exported services it backs, endpoint → identity, identity → labels match and number
//! of visible endpoints), so each change costs work proportional to the records it can
//! affect. [`PeerView::apply`] returns the record's visibility before and after, and every
//! other record whose visibility changed with it; the cache turns these into events
//! addressed to peers only (see `cache::Audience`), so each of thousands of watchers
//! does one comparison per event and keeps no per-peer state. The same events go into
//! the resume history, so a peer that reconnects with a revision gets the Deletes of
//! records that became invisible while it was away.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use clustermesh_api::keys::{self, Kind, MeshKey};
use clustermesh_api::policy::{parse_selector_text, LabelSelector, SelectorTextError};
use clustermesh_api::v1;
use prost::Message;

/// Which pods' identities and endpoints are served to peers (`--export-pods`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PodExport {
    /// Every pod (`all`, the default): peers can write policy about any pod here.
    #[default]
    All,
    /// Only pods that back an exported (global and shared) service (`services`), and
    /// their identities.
    Services,
    /// Only pods whose identity labels match the selector (`selector=<kubectl -l
    /// syntax>`), and their identities. Identity labels are the pod's labels plus
    /// `io.kubernetes.pod.namespace`, `io.cilium.k8s.namespace.labels.<k>` and
    /// `io.cilium.k8s.policy.cluster`.
    Selector(LabelSelector),
}

/// Why an `--export-pods` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodExportError {
    /// Not one of the forms.
    #[error("{0:?} is not an export rule; use all, services or selector=<label selector>")]
    Unknown(String),
    /// The selector does not parse.
    #[error("invalid export selector")]
    Selector(#[source] SelectorTextError),
}

impl FromStr for PodExport {
    type Err = PodExportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(PodExport::All),
            "services" => Ok(PodExport::Services),
            _ => match s.strip_prefix("selector=") {
                Some(text) => parse_selector_text(text)
                    .map(PodExport::Selector)
                    .map_err(PodExportError::Selector),
                None => Err(PodExportError::Unknown(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for PodExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PodExport::All => f.write_str("all"),
            PodExport::Services => f.write_str("services"),
            PodExport::Selector(selector) => write!(f, "selector ({selector:?})"),
        }
    }
}

/// A record whose peer visibility changed as a consequence of another record's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transition {
    pub(crate) kind: Kind,
    pub(crate) key: Arc<str>,
    /// Visible to peers now (else: it was visible and is not any more).
    pub(crate) visible: bool,
}

/// The result of [`PeerView::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Applied {
    /// The changed record was visible to peers before the change.
    pub(crate) before: bool,
    /// The changed record is visible to peers after the change.
    pub(crate) after: bool,
    /// Other records whose visibility changed, identities after endpoints.
    pub(crate) derived: Vec<Transition>,
}

/// The peer-visible subset of one cluster's records, maintained incrementally.
#[derive(Debug)]
pub(crate) struct PeerView {
    cluster: String,
    rule: PodExport,
    visible: HashSet<Arc<str>>,
    /// Exported services → endpoint keys of their backends (kept only for
    /// [`PodExport::Services`]; empty otherwise).
    services: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// Endpoint key → number of exported services it backs.
    backend_refs: HashMap<Arc<str>, usize>,
    /// Present endpoint records → their identity (`None`: the record does not decode).
    endpoints: HashMap<Arc<str>, Option<u32>>,
    /// Identity → present endpoint records carrying it.
    endpoints_by_identity: HashMap<u32, HashSet<Arc<str>>>,
    /// Visible endpoint → the identity it is counted under in `visible_per_identity`.
    counted: HashMap<Arc<str>, u32>,
    /// Identity → number of visible endpoints carrying it.
    visible_per_identity: HashMap<u32, usize>,
    /// Present identity records → whether their labels match the selector (true for
    /// rules without a selector).
    identities: HashMap<u32, bool>,
}

impl PeerView {
    /// An empty view of `cluster`'s records under `rule`.
    pub(crate) fn new(cluster: &str, rule: PodExport) -> Self {
        PeerView {
            cluster: cluster.to_owned(),
            rule,
            visible: HashSet::new(),
            services: HashMap::new(),
            backend_refs: HashMap::new(),
            endpoints: HashMap::new(),
            endpoints_by_identity: HashMap::new(),
            counted: HashMap::new(),
            visible_per_identity: HashMap::new(),
            identities: HashMap::new(),
        }
    }

    /// The rule in force.
    pub(crate) fn rule(&self) -> &PodExport {
        &self.rule
    }

    /// Whether peers may see the record at `key` now.
    pub(crate) fn is_visible(&self, key: &str) -> bool {
        self.visible.contains(key)
    }

    /// Applies a write (`Some(value)`) or removal (`None`) of the record at `key` (one of
    /// this cluster's record keys, in canonical form).
    pub(crate) fn apply(&mut self, key: &Arc<str>, value: Option<&[u8]>) -> Applied {
        let before = self.visible.contains(key);
        let mut dirty_endpoints: Vec<Arc<str>> = Vec::new();
        let mut dirty_identities: Vec<u32> = Vec::new();
        match keys::parse_key(key.as_bytes()) {
            Ok(MeshKey::Service { .. }) => {
                let decoded = value.map(v1::Service::decode);
                if let Some(Err(_)) = decoded {
                    // Cannot be classified: keep what peers were shown (a service never
                    // seen decoded stays home; an exported one keeps being served, so
                    // peers apply their own "keep the last good record" rule).
                    return Applied {
                        before,
                        after: before,
                        derived: Vec::new(),
                    };
                }
                if let Some(old) = self.services.remove(key) {
                    for endpoint in old {
                        if let Some(n) = self.backend_refs.get_mut(&endpoint) {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                self.backend_refs.remove(&endpoint);
                            }
                        }
                        dirty_endpoints.push(endpoint);
                    }
                }
                let exported = decoded
                    .and_then(Result::ok)
                    .filter(|s| s.global && s.shared);
                if let Some(service) = &exported {
                    let backends = if self.rule == PodExport::Services {
                        self.backend_endpoints(service)
                    } else {
                        Vec::new()
                    };
                    for endpoint in &backends {
                        *self.backend_refs.entry(Arc::clone(endpoint)).or_default() += 1;
                        dirty_endpoints.push(Arc::clone(endpoint));
                    }
                    self.services.insert(Arc::clone(key), backends);
                }
                self.set(key, exported.is_some());
            }
            Ok(MeshKey::Endpoint { .. }) => {
                if let Some(Some(old)) = self.endpoints.remove(key) {
                    if let Some(set) = self.endpoints_by_identity.get_mut(&old) {
                        set.remove(key);
                        if set.is_empty() {
                            self.endpoints_by_identity.remove(&old);
                        }
                    }
                }
                if let Some(value) = value {
                    let identity = v1::Endpoint::decode(value).ok().map(|e| e.identity);
                    if let Some(id) = identity {
                        self.endpoints_by_identity
                            .entry(id)
                            .or_default()
                            .insert(Arc::clone(key));
                    }
                    self.endpoints.insert(Arc::clone(key), identity);
                }
                dirty_endpoints.push(Arc::clone(key));
            }
            Ok(MeshKey::Identity { id, .. }) => {
                match value {
                    Some(value) => {
                        let matches = match &self.rule {
                            PodExport::Selector(selector) => {
                                v1::Identity::decode(value).is_ok_and(|identity| {
                                    selector.matches(&identity.labels.into_iter().collect())
                                })
                            }
                            PodExport::All | PodExport::Services => true,
                        };
                        self.identities.insert(id, matches);
                    }
                    None => {
                        self.identities.remove(&id);
                    }
                }
                if matches!(self.rule, PodExport::Selector(_)) {
                    if let Some(set) = self.endpoints_by_identity.get(&id) {
                        dirty_endpoints.extend(set.iter().cloned());
                    }
                }
                dirty_identities.push(id);
            }
            Ok(MeshKey::Policy { .. }) => {
                self.set(key, false);
            }
            Ok(MeshKey::ClusterConfig { .. } | MeshKey::Node { .. }) => {
                self.set(key, value.is_some());
            }
            Ok(MeshKey::Synced { .. }) | Err(_) => {}
        }
        let mut derived = Vec::new();
        for endpoint in dirty_endpoints {
            self.refresh_endpoint(&endpoint, &mut derived, &mut dirty_identities);
        }
        for id in dirty_identities {
            self.refresh_identity(id, &mut derived);
        }
        derived.retain(|t| t.key != *key);
        Applied {
            before,
            after: self.visible.contains(key),
            derived,
        }
    }

    /// Endpoint keys of a service's backends (an address that does not parse names no
    /// endpoint).
    fn backend_endpoints(&self, service: &v1::Service) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = service
            .backends
            .iter()
            .filter_map(|b| b.ip.parse::<IpAddr>().ok())
            .map(|ip| Arc::from(keys::endpoint_key(&self.cluster, ip)))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    fn set(&mut self, key: &Arc<str>, visible: bool) -> bool {
        if visible {
            self.visible.insert(Arc::clone(key))
        } else {
            self.visible.remove(key)
        }
    }

    fn refresh_endpoint(
        &mut self,
        key: &Arc<str>,
        derived: &mut Vec<Transition>,
        dirty_identities: &mut Vec<u32>,
    ) {
        let identity = self.endpoints.get(key).copied();
        let visible = match identity {
            None => false,
            Some(identity) => match &self.rule {
                PodExport::All => true,
                PodExport::Services => self.backend_refs.get(key).is_some_and(|n| *n > 0),
                PodExport::Selector(_) => identity
                    .and_then(|id| self.identities.get(&id).copied())
                    .unwrap_or(false),
            },
        };
        let counted_now = if visible { identity.flatten() } else { None };
        let counted_before = self.counted.get(key).copied();
        if counted_before != counted_now {
            if let Some(id) = counted_before {
                if let Some(n) = self.visible_per_identity.get_mut(&id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.visible_per_identity.remove(&id);
                    }
                }
                dirty_identities.push(id);
            }
            match counted_now {
                Some(id) => {
                    *self.visible_per_identity.entry(id).or_default() += 1;
                    self.counted.insert(Arc::clone(key), id);
                    dirty_identities.push(id);
                }
                None => {
                    self.counted.remove(key);
                }
            }
        }
        if self.set(key, visible) {
            derived.push(Transition {
                kind: Kind::Endpoint,
                key: Arc::clone(key),
                visible,
            });
        }
    }

    fn refresh_identity(&mut self, id: u32, derived: &mut Vec<Transition>) {
        let visible = match self.identities.get(&id) {
            None => false,
            Some(matches) => match self.rule {
                PodExport::All => true,
                PodExport::Selector(_) => *matches,
                PodExport::Services => self.visible_per_identity.get(&id).is_some_and(|n| *n > 0),
            },
        };
        let key: Arc<str> = Arc::from(keys::identity_key(&self.cluster, id));
        if self.set(&key, visible) {
            derived.push(Transition {
                kind: Kind::Identity,
                key,
                visible,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const C: &str = "east";

    fn service(name: &str, global: bool, shared: bool, backends: &[&str]) -> (Arc<str>, Vec<u8>) {
        let value = v1::Service {
            namespace: "shop".into(),
            name: name.into(),
            cluster: C.into(),
            global,
            shared,
            backends: backends
                .iter()
                .map(|ip| v1::Backend {
                    ip: (*ip).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        (
            Arc::from(keys::service_key(C, "shop", name)),
            value.encode_to_vec(),
        )
    }

    fn endpoint(ip: &str, identity: u32) -> (Arc<str>, Vec<u8>) {
        let value = v1::Endpoint {
            ip: ip.into(),
            identity,
            cluster: C.into(),
            ..Default::default()
        };
        (
            Arc::from(keys::endpoint_key(C, ip.parse().unwrap())),
            value.encode_to_vec(),
        )
    }

    fn identity(id: u32, app: &str) -> (Arc<str>, Vec<u8>) {
        let value = v1::Identity {
            id,
            labels: [("app".to_owned(), app.to_owned())].into_iter().collect(),
        };
        (Arc::from(keys::identity_key(C, id)), value.encode_to_vec())
    }

    fn put(view: &mut PeerView, (key, value): &(Arc<str>, Vec<u8>)) -> Applied {
        view.apply(key, Some(value))
    }

    fn keys_of(applied: &Applied) -> Vec<(&str, bool)> {
        applied
            .derived
            .iter()
            .map(|t| (t.key.as_ref(), t.visible))
            .collect()
    }

    #[test]
    fn services_are_visible_only_when_global_and_shared() {
        let mut view = PeerView::new(C, PodExport::All);
        let local = service("local", false, false, &[]);
        let unshared = service("unshared", true, false, &[]);
        let exported = service("exported", true, true, &[]);
        assert!(!put(&mut view, &local).after);
        assert!(!put(&mut view, &unshared).after);
        assert!(put(&mut view, &exported).after);
        let hidden = put(&mut view, &service("exported", false, true, &[]));
        assert!(hidden.before && !hidden.after);
        let garbage = view.apply(&exported.0, Some(b"\xff\xff"));
        assert!(
            !garbage.before && !garbage.after,
            "an undecodable service stays home"
        );
    }

    #[test]
    fn all_pods_are_visible_by_default() {
        let mut view = PeerView::new(C, PodExport::All);
        assert!(put(&mut view, &identity(7, "web")).after);
        assert!(put(&mut view, &endpoint("10.1.0.5", 7)).after);
        let gone = view.apply(&endpoint("10.1.0.5", 7).0, None);
        assert!(gone.before && !gone.after);
    }

    #[test]
    fn services_rule_follows_the_exported_services() {
        let mut view = PeerView::new(C, PodExport::Services);
        let id = identity(7, "web");
        let ep = endpoint("10.1.0.5", 7);
        assert!(!put(&mut view, &id).after);
        assert!(!put(&mut view, &ep).after);
        // A local service does not export its backends.
        let applied = put(&mut view, &service("local", false, false, &["10.1.0.5"]));
        assert!(applied.derived.is_empty());
        // An exported one does: the endpoint, then its identity.
        let applied = put(&mut view, &service("web", true, true, &["10.1.0.5"]));
        assert!(applied.after);
        assert_eq!(keys_of(&applied), [(&*ep.0, true), (&*id.0, true)]);
        // A second exported service on the same pod changes nothing.
        let applied = put(&mut view, &service("web2", true, true, &["10.1.0.5"]));
        assert!(applied.derived.is_empty());
        let applied = put(&mut view, &service("web2", true, false, &["10.1.0.5"]));
        assert!(applied.before && !applied.after && applied.derived.is_empty());
        // The last one turns non-global: both leave.
        let applied = put(&mut view, &service("web", false, false, &["10.1.0.5"]));
        assert_eq!(keys_of(&applied), [(&*ep.0, false), (&*id.0, false)]);
        // An endpoint that appears after its service is visible at once.
        put(&mut view, &service("web", true, true, &["10.1.0.6"]));
        let applied = put(&mut view, &endpoint("10.1.0.6", 7));
        assert!(applied.after);
        assert_eq!(keys_of(&applied), [(&*id.0, true)]);
        // The endpoint moving to another identity moves the identity's visibility.
        put(&mut view, &identity(8, "web"));
        let applied = put(&mut view, &endpoint("10.1.0.6", 8));
        assert!(applied.before && applied.after);
        let mut got = keys_of(&applied);
        got.sort_unstable();
        let id8 = identity(8, "web").0;
        let mut want = vec![(&*id.0, false), (&*id8, true)];
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn selector_rule_follows_identity_labels() {
        let rule: PodExport = "selector=app=web".parse().unwrap();
        let mut view = PeerView::new(C, rule);
        let ep = endpoint("10.1.0.5", 7);
        // Endpoint before its identity: hidden until the identity says it matches.
        assert!(!put(&mut view, &ep).after);
        let id = identity(7, "web");
        let applied = put(&mut view, &id);
        assert!(applied.after);
        assert_eq!(keys_of(&applied), [(&*ep.0, true)]);
        assert!(!put(&mut view, &identity(9, "db")).after);
        assert!(!put(&mut view, &endpoint("10.1.0.9", 9)).after);
        let gone = view.apply(&id.0, None);
        assert!(gone.before && !gone.after);
        assert_eq!(keys_of(&gone), [(&*ep.0, false)]);
    }

    #[test]
    fn policies_are_never_visible_and_nodes_always() {
        let mut view = PeerView::new(C, PodExport::All);
        let policy: Arc<str> = Arc::from(keys::policy_key(
            C,
            "shop",
            keys::PolicySource::NetworkPolicy,
            "p",
        ));
        assert!(!view.apply(&policy, Some(b"")).after);
        let node: Arc<str> = Arc::from(keys::node_key(C, "n1"));
        assert!(view.apply(&node, Some(b"")).after);
        assert!(!view.apply(&node, None).after);
    }

    #[test]
    fn export_rule_flag_values() {
        assert_eq!("all".parse::<PodExport>().unwrap(), PodExport::All);
        assert_eq!(
            "services".parse::<PodExport>().unwrap(),
            PodExport::Services
        );
        assert!(matches!(
            "selector=app in (web,api)".parse::<PodExport>().unwrap(),
            PodExport::Selector(_)
        ));
        assert!(matches!(
            "some".parse::<PodExport>(),
            Err(PodExportError::Unknown(_))
        ));
        assert!(matches!(
            "selector=app in (web".parse::<PodExport>(),
            Err(PodExportError::Selector(_))
        ));
    }
}
