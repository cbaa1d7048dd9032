//! The policy engine: identities, local endpoints, policies, the selector cache and the
//! computed per-endpoint allow sets.

use std::collections::{BTreeMap, BTreeSet};

use clustermesh_api::cidr::Cidr;
use clustermesh_api::policy::{
    LabelSelector, Labels, NetworkPolicy, Peer, PolicyProtocol, PolicyRule, PortMatch, Requirement,
    NAMESPACE_LABEL,
};
use clustermesh_api::security_identity::SecurityIdentity;

/// A local endpoint: `namespace/pod`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
}

/// A policy: `namespace/name` (NetworkPolicy and CiliumNetworkPolicy share one space per
/// kind; the kind is part of the key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// `NetworkPolicy` or `CiliumNetworkPolicy`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What the engine needs to know of a local endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Its security identity.
    pub identity: SecurityIdentity,
    /// Its identity labels (what policy subjects select on).
    pub labels: Labels,
    /// Container ports by (protocol, name), for named ports.
    pub named_ports: BTreeMap<(PolicyProtocol, String), u16>,
}

/// Who an allow entry admits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllowPeer {
    /// Every peer.
    Any,
    /// Endpoints with this security identity.
    Identity(SecurityIdentity),
    /// Addresses in `cidr` but in none of `except`.
    Cidr {
        /// The block.
        cidr: Cidr,
        /// Holes in it.
        except: Vec<Cidr>,
    },
}

/// Protocol and port range of an allow entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpan {
    /// `None`: every protocol (and then every port).
    pub protocol: Option<PolicyProtocol>,
    /// First port (0 with `last` 65535: every port).
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl PortSpan {
    /// Every protocol and port.
    pub const ALL: PortSpan = PortSpan {
        protocol: None,
        first: 0,
        last: u16::MAX,
    };

    /// Whether `protocol`/`port` falls in the span.
    #[must_use]
    pub fn admits(&self, protocol: PolicyProtocol, port: u16) -> bool {
        self.protocol.is_none_or(|p| p == protocol) && (self.first..=self.last).contains(&port)
    }
}

/// One allowed (peer, protocol/ports) pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowEntry {
    /// Who.
    pub peer: AllowPeer,
    /// Which ports.
    pub ports: PortSpan,
}

/// The computed policy of one endpoint; `None` in a direction: not isolated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// What may connect to the endpoint.
    pub ingress: Option<BTreeSet<AllowEntry>>,
    /// What the endpoint may connect to.
    pub egress: Option<BTreeSet<AllowEntry>>,
}

impl EndpointPolicy {
    /// Whether a peer with `identity` may reach the endpoint on `protocol`/`port`.
    #[must_use]
    pub fn admits_ingress(
        &self,
        identity: SecurityIdentity,
        protocol: PolicyProtocol,
        port: u16,
    ) -> bool {
        admits(self.ingress.as_ref(), identity, protocol, port)
    }

    /// Whether the endpoint may reach a peer with `identity` on `protocol`/`port`.
    #[must_use]
    pub fn admits_egress(
        &self,
        identity: SecurityIdentity,
        protocol: PolicyProtocol,
        port: u16,
    ) -> bool {
        admits(self.egress.as_ref(), identity, protocol, port)
    }
}

fn admits(
    set: Option<&BTreeSet<AllowEntry>>,
    identity: SecurityIdentity,
    protocol: PolicyProtocol,
    port: u16,
) -> bool {
    set.is_none_or(|entries| {
        entries.iter().any(|e| {
            matches!(&e.peer, AllowPeer::Any)
                || matches!(&e.peer, AllowPeer::Identity(i) if *i == identity)
        } && e.ports.admits(protocol, port))
    })
}

/// A cached peer selector: the identities it selects and the policies using it (with how
/// many of each policy's peers name it).
#[derive(Debug, Default)]
struct CachedSelector {
    selected: BTreeSet<SecurityIdentity>,
    users: BTreeMap<PolicyKey, usize>,
}

/// Identities, local endpoints and policies, with every endpoint's computed policy kept
/// current as they change.
#[derive(Debug, Default)]
pub struct PolicyEngine {
    identities: BTreeMap<SecurityIdentity, Labels>,
    endpoints: BTreeMap<EndpointId, LocalEndpoint>,
    policies: BTreeMap<PolicyKey, NetworkPolicy>,
    /// Policies by their namespace: a policy's subjects are pods of its own namespace (both
    /// NetworkPolicy and CiliumNetworkPolicy confine them), so an endpoint is checked only
    /// against the policies of its namespace.
    by_namespace: BTreeMap<String, BTreeSet<PolicyKey>>,
    /// Local endpoints by the namespace in their labels, the other side of `by_namespace`:
    /// a policy's subjects are looked for among its namespace's endpoints only.
    endpoints_by_namespace: BTreeMap<String, BTreeSet<EndpointId>>,
    /// Identities by the namespace in their labels (`None`: no namespace label), so a new
    /// peer selector that names its namespaces scans only their identities.
    identities_by_namespace: BTreeMap<Option<String>, BTreeSet<SecurityIdentity>>,
    /// Policies with a named egress port (their subjects depend on other endpoints' ports).
    named_egress: BTreeSet<PolicyKey>,
    selectors: BTreeMap<LabelSelector, CachedSelector>,
    computed: BTreeMap<EndpointId, EndpointPolicy>,
}

fn namespace_of(labels: &Labels) -> Option<&String> {
    labels.get(NAMESPACE_LABEL)
}

/// The namespaces a selector confines its matches to (`None`: not confined).
fn namespaces_required(selector: &LabelSelector) -> Option<&BTreeSet<String>> {
    selector.requirements().find_map(|r| match r {
        Requirement::In { key, values } if key == NAMESPACE_LABEL => Some(values),
        _ => None,
    })
}

fn has_named_egress(policy: &NetworkPolicy) -> bool {
    policy.egress.iter().flatten().any(|r| {
        r.ports
            .iter()
            .any(|p| matches!(p.ports, PortMatch::Named(_)))
    })
}

fn peer_selectors(policy: &NetworkPolicy) -> impl Iterator<Item = &LabelSelector> {
    let rules = policy.ingress.iter().chain(policy.egress.iter()).flatten();
    rules
        .flat_map(|r| r.peers.iter().flatten())
        .filter_map(|p| match p {
            Peer::Endpoints(s) => Some(s),
            Peer::IpBlock { .. } => None,
        })
}

impl PolicyEngine {
    /// An empty engine.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The computed policy of `endpoint` (not isolated in either direction when unknown).
    #[must_use]
    pub fn policy_of(&self, endpoint: &EndpointId) -> Option<&EndpointPolicy> {
        self.computed.get(endpoint)
    }

    /// Every local endpoint's computed policy (what `clustermesh policy get` lists).
    #[must_use]
    pub fn endpoint_policies(&self) -> &BTreeMap<EndpointId, EndpointPolicy> {
        &self.computed
    }

    /// Number of identities known.
    #[must_use]
    pub fn identity_count(&self) -> usize {
        self.identities.len()
    }

    /// Adds or changes an identity; returns the endpoints whose policy changed.
    pub fn upsert_identity(&mut self, id: SecurityIdentity, labels: Labels) -> Vec<EndpointId> {
        let changed = self.reselect(id, Some(&labels));
        let namespace = namespace_of(&labels).cloned();
        if let Some(old) = self.identities.insert(id, labels) {
            self.unindex_identity(id, &old);
        }
        self.identities_by_namespace
            .entry(namespace)
            .or_default()
            .insert(id);
        self.recompute_for_selectors(&changed)
    }

    /// Removes an identity; returns the endpoints whose policy changed.
    pub fn remove_identity(&mut self, id: SecurityIdentity) -> Vec<EndpointId> {
        let Some(old) = self.identities.remove(&id) else {
            return Vec::new();
        };
        self.unindex_identity(id, &old);
        let changed = self.reselect(id, None);
        self.recompute_for_selectors(&changed)
    }

    /// Adds or changes a local endpoint; returns the endpoints whose policy changed.
    pub fn upsert_endpoint(&mut self, id: EndpointId, endpoint: LocalEndpoint) -> Vec<EndpointId> {
        let mut identities = vec![endpoint.identity];
        let namespace = namespace_of(&endpoint.labels).cloned();
        if let Some(old) = self.endpoints.insert(id.clone(), endpoint) {
            identities.push(old.identity);
            self.unindex_endpoint(&id, &old);
        }
        if let Some(ns) = namespace {
            self.endpoints_by_namespace
                .entry(ns)
                .or_default()
                .insert(id.clone());
        }
        // Its named ports may resolve egress port names other endpoints use towards it.
        let mut affected = self.resolving_names_towards(&identities);
        affected.insert(id);
        self.recompute(affected)
    }

    /// Removes a local endpoint; returns the endpoints whose policy changed (itself
    /// included: its policy is gone).
    pub fn remove_endpoint(&mut self, id: &EndpointId) -> Vec<EndpointId> {
        let Some(old) = self.endpoints.remove(id) else {
            return Vec::new();
        };
        self.unindex_endpoint(id, &old);
        let mut changed = Vec::new();
        if self.computed.remove(id).is_some() {
            changed.push(id.clone());
        }
        changed.extend(self.recompute(self.resolving_names_towards(&[old.identity])));
        changed
    }

    /// Adds or replaces a policy; returns the endpoints whose policy changed.
    pub fn upsert_policy(&mut self, key: PolicyKey, policy: NetworkPolicy) -> Vec<EndpointId> {
        let mut affected = self.subjects_of(&policy);
        // The new policy's selectors are taken before the old one's are released, so a
        // selector both use stays cached.
        for s in peer_selectors(&policy) {
            self.use_selector(s, &key);
        }
        let namespace = policy.namespace.clone();
        let named = has_named_egress(&policy);
        if let Some(old) = self.policies.insert(key.clone(), policy) {
            affected.extend(self.retire(&key, &old));
        }
        if named {
            self.named_egress.insert(key.clone());
        }
        self.by_namespace.entry(namespace).or_default().insert(key);
        self.recompute(affected)
    }

    /// Removes a policy; returns the endpoints whose policy changed.
    pub fn remove_policy(&mut self, key: &PolicyKey) -> Vec<EndpointId> {
        let Some(old) = self.policies.remove(key) else {
            return Vec::new();
        };
        let affected = self.retire(key, &old);
        self.recompute(affected)
    }

    /// Drops what policy `old` (stored under `key`) held: its index entry and its
    /// selectors. Returns the endpoints it selected.
    fn retire(&mut self, key: &PolicyKey, old: &NetworkPolicy) -> BTreeSet<EndpointId> {
        if let Some(keys) = self.by_namespace.get_mut(&old.namespace) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_namespace.remove(&old.namespace);
            }
        }
        for s in peer_selectors(old) {
            self.release_selector(s, key);
        }
        self.named_egress.remove(key);
        self.subjects_of(old)
    }

    fn unindex_identity(&mut self, id: SecurityIdentity, labels: &Labels) {
        let namespace = namespace_of(labels).cloned();
        if let Some(ids) = self.identities_by_namespace.get_mut(&namespace) {
            ids.remove(&id);
            if ids.is_empty() {
                self.identities_by_namespace.remove(&namespace);
            }
        }
    }

    fn unindex_endpoint(&mut self, id: &EndpointId, old: &LocalEndpoint) {
        let Some(ns) = namespace_of(&old.labels) else {
            return;
        };
        if let Some(ids) = self.endpoints_by_namespace.get_mut(ns) {
            ids.remove(id);
            if ids.is_empty() {
                self.endpoints_by_namespace.remove(ns);
            }
        }
    }

    /// Recomputes every endpoint (after a restart, or to check the incremental result);
    /// returns the endpoints whose policy changed.
    pub fn recompute_all(&mut self) -> Vec<EndpointId> {
        let all = self.endpoints.keys().cloned().collect();
        self.recompute(all)
    }

    fn use_selector(&mut self, selector: &LabelSelector, policy: &PolicyKey) {
        if let Some(cached) = self.selectors.get_mut(selector) {
            *cached.users.entry(policy.clone()).or_default() += 1;
            return;
        }
        let matching = |id: &SecurityIdentity| {
            self.identities
                .get(id)
                .is_some_and(|labels| selector.matches(labels))
        };
        // A selector naming its namespaces (every pod selector of a NetworkPolicy does)
        // can only match identities of those namespaces.
        let selected = match namespaces_required(selector) {
            Some(namespaces) => namespaces
                .iter()
                .filter_map(|ns| self.identities_by_namespace.get(&Some(ns.clone())))
                .flatten()
                .copied()
                .filter(|id| matching(id))
                .collect(),
            None => self
                .identities
                .iter()
                .filter(|(_, labels)| selector.matches(labels))
                .map(|(id, _)| *id)
                .collect(),
        };
        self.selectors.insert(
            selector.clone(),
            CachedSelector {
                selected,
                users: BTreeMap::from([(policy.clone(), 1)]),
            },
        );
    }

    fn release_selector(&mut self, selector: &LabelSelector, policy: &PolicyKey) {
        let Some(cached) = self.selectors.get_mut(selector) else {
            return;
        };
        if let Some(n) = cached.users.get_mut(policy) {
            *n -= 1;
            if *n == 0 {
                cached.users.remove(policy);
            }
        }
        if cached.users.is_empty() {
            self.selectors.remove(selector);
        }
    }

    /// Updates every cached selector for identity `id` now having `labels` (`None`: gone);
    /// returns the selectors whose membership changed.
    fn reselect(&mut self, id: SecurityIdentity, labels: Option<&Labels>) -> Vec<LabelSelector> {
        let mut changed = Vec::new();
        for (selector, cached) in &mut self.selectors {
            let now = labels.is_some_and(|l| selector.matches(l));
            let was = if now {
                !cached.selected.insert(id)
            } else {
                cached.selected.remove(&id)
            };
            if was != now {
                changed.push(selector.clone());
            }
        }
        changed
    }

    /// Recomputes the endpoints selected by policies that use one of `selectors`.
    fn recompute_for_selectors(&mut self, selectors: &[LabelSelector]) -> Vec<EndpointId> {
        if selectors.is_empty() {
            return Vec::new();
        }
        let users: BTreeSet<&PolicyKey> = selectors
            .iter()
            .filter_map(|s| self.selectors.get(s))
            .flat_map(|c| c.users.keys())
            .collect();
        let mut affected = BTreeSet::new();
        for policy in users.into_iter().filter_map(|k| self.policies.get(k)) {
            affected.extend(self.subjects_of(policy));
        }
        self.recompute(affected)
    }

    /// The local endpoints `policy` selects as subjects: only endpoints of its namespace
    /// are candidates (the same confinement `compute` relies on).
    fn subjects_of(&self, policy: &NetworkPolicy) -> BTreeSet<EndpointId> {
        let Some(candidates) = self.endpoints_by_namespace.get(&policy.namespace) else {
            return BTreeSet::new();
        };
        candidates
            .iter()
            .filter(|id| {
                self.endpoints
                    .get(*id)
                    .is_some_and(|ep| policy.subjects.matches(&ep.labels))
            })
            .cloned()
            .collect()
    }

    /// Endpoints selected by a policy with a named egress port towards a peer that may
    /// have one of `identities` (their resolution depends on that peer's ports).
    fn resolving_names_towards(&self, identities: &[SecurityIdentity]) -> BTreeSet<EndpointId> {
        let mut out = BTreeSet::new();
        for policy in self
            .named_egress
            .iter()
            .filter_map(|k| self.policies.get(k))
        {
            let named = policy.egress.iter().flatten().any(|r| {
                r.ports
                    .iter()
                    .any(|p| matches!(p.ports, PortMatch::Named(_)))
                    && r.peers.as_ref().is_none_or(|peers| {
                        peers.iter().any(|p| match p {
                            Peer::Endpoints(s) => self
                                .selectors
                                .get(s)
                                .is_some_and(|c| identities.iter().any(|i| c.selected.contains(i))),
                            Peer::IpBlock { .. } => false,
                        })
                    })
            });
            if named {
                out.extend(self.subjects_of(policy));
            }
        }
        out
    }

    fn recompute(&mut self, endpoints: BTreeSet<EndpointId>) -> Vec<EndpointId> {
        let mut changed = Vec::new();
        for id in endpoints {
            let Some(ep) = self.endpoints.get(&id) else {
                continue;
            };
            let policy = self.compute(ep);
            if self.computed.get(&id) != Some(&policy) {
                self.computed.insert(id.clone(), policy);
                changed.push(id);
            }
        }
        changed
    }

    fn compute(&self, ep: &LocalEndpoint) -> EndpointPolicy {
        let mut out = EndpointPolicy::default();
        let Some(keys) = ep
            .labels
            .get(NAMESPACE_LABEL)
            .and_then(|ns| self.by_namespace.get(ns))
        else {
            return out;
        };
        for policy in keys.iter().filter_map(|k| self.policies.get(k)) {
            if !policy.subjects.matches(&ep.labels) {
                continue;
            }
            if let Some(rules) = &policy.ingress {
                let set = out.ingress.get_or_insert_with(BTreeSet::new);
                for rule in rules {
                    self.allow(rule, Some(ep), set);
                }
            }
            if let Some(rules) = &policy.egress {
                let set = out.egress.get_or_insert_with(BTreeSet::new);
                for rule in rules {
                    self.allow(rule, None, set);
                }
            }
        }
        out
    }

    /// Adds the entries of `rule` to `set`. `subject` is the selected endpoint on ingress
    /// (named ports resolve against it); on egress names resolve against the peer.
    fn allow(
        &self,
        rule: &PolicyRule,
        subject: Option<&LocalEndpoint>,
        set: &mut BTreeSet<AllowEntry>,
    ) {
        let peers: Vec<AllowPeer> = match &rule.peers {
            None => vec![AllowPeer::Any],
            Some(peers) => peers
                .iter()
                .flat_map(|p| match p {
                    Peer::Endpoints(s) => self
                        .selectors
                        .get(s)
                        .map(|c| c.selected.iter().map(|i| AllowPeer::Identity(*i)).collect())
                        .unwrap_or_default(),
                    Peer::IpBlock { cidr, except } => vec![AllowPeer::Cidr {
                        cidr: *cidr,
                        except: except.clone(),
                    }],
                })
                .collect(),
        };
        if rule.ports.is_empty() {
            set.extend(peers.into_iter().map(|peer| AllowEntry {
                peer,
                ports: PortSpan::ALL,
            }));
            return;
        }
        for peer in peers {
            for port in &rule.ports {
                let spans: Vec<PortSpan> = match &port.ports {
                    PortMatch::Any => vec![PortSpan {
                        protocol: Some(port.protocol),
                        first: 0,
                        last: u16::MAX,
                    }],
                    PortMatch::Range { first, last } => vec![PortSpan {
                        protocol: Some(port.protocol),
                        first: *first,
                        last: *last,
                    }],
                    PortMatch::Named(name) => self
                        .resolve_named(subject, &peer, port.protocol, name)
                        .into_iter()
                        .map(|n| PortSpan {
                            protocol: Some(port.protocol),
                            first: n,
                            last: n,
                        })
                        .collect(),
                };
                set.extend(spans.into_iter().map(|ports| AllowEntry {
                    peer: peer.clone(),
                    ports,
                }));
            }
        }
    }

    fn resolve_named(
        &self,
        subject: Option<&LocalEndpoint>,
        peer: &AllowPeer,
        protocol: PolicyProtocol,
        name: &str,
    ) -> BTreeSet<u16> {
        let key = (protocol, name.to_owned());
        match subject {
            Some(ep) => ep.named_ports.get(&key).copied().into_iter().collect(),
            None => self
                .endpoints
                .values()
                .filter(|ep| match peer {
                    AllowPeer::Any => true,
                    AllowPeer::Identity(i) => ep.identity == *i,
                    AllowPeer::Cidr { .. } => false,
                })
                .filter_map(|ep| ep.named_ports.get(&key).copied())
                .collect(),
        }
    }
}
