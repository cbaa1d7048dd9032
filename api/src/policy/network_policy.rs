//! `networking.k8s.io/v1` NetworkPolicy, validated into the form the agent computes with.
//!
//! Every peer that names pods becomes one [`LabelSelector`] over *identity labels*, the
//! way Cilium translates NetworkPolicy (`pkg/k8s/network_policy.go`): the pod selector as
//! written, the namespace as `io.kubernetes.pod.namespace` (the policy's own namespace when
//! there is no `namespaceSelector`), a `namespaceSelector`'s keys under
//! `io.cilium.k8s.namespace.labels.`, and the cluster scoping of
//! [`LabelSelector::scoped_to`]. Resolving a peer is then one selector match per identity.
//!
//! Kubernetes semantics kept as they are:
//! * `policyTypes` absent: `Ingress`, plus `Egress` when the policy has egress rules. A
//!   direction listed with no rules isolates the selected pods in that direction (deny all).
//! * A rule without `from`/`to` (or with an empty list) admits every peer; a rule without
//!   `ports` every port.
//! * A peer is `ipBlock` alone, or `podSelector` and/or `namespaceSelector`; `{}` as a peer
//!   is refused (as the API server refuses it).
//! * A port is a number or a container-port name (an IANA service name); `endPort` needs a
//!   numeric `port` and is not below it; `protocol` defaults to TCP.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::selector::{LabelSelector, PeerClusters, Requirement, SelectorError, WireLabelSelector};
use crate::cidr::{Cidr, CidrError};

/// Identity label holding the pod's namespace (Cilium's name for it).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix under which a namespace's labels appear among its pods' identity labels
/// (Cilium's spelling), so a `namespaceSelector` is a selector on identities too.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// The `spec` of a NetworkPolicy as written. Unknown fields are refused: a misspelt field
/// would otherwise widen or narrow the policy silently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireNetworkPolicySpec {
    /// Pods the policy applies to (in its namespace); `{}` selects all of them.
    #[serde(default)]
    pub pod_selector: WireLabelSelector,
    /// `Ingress` and/or `Egress`.
    #[serde(default)]
    pub policy_types: Option<Vec<String>>,
    /// Ingress rules.
    #[serde(default)]
    pub ingress: Vec<WireIngressRule>,
    /// Egress rules.
    #[serde(default)]
    pub egress: Vec<WireEgressRule>,
}

/// One ingress rule as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireIngressRule {
    /// Sources; absent or empty admits every source.
    #[serde(default)]
    pub from: Vec<WirePeer>,
    /// Destination ports on the selected pod; absent or empty admits every port.
    #[serde(default)]
    pub ports: Vec<WirePort>,
}

/// One egress rule as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireEgressRule {
    /// Destinations; absent or empty admits every destination.
    #[serde(default)]
    pub to: Vec<WirePeer>,
    /// Destination ports; absent or empty admits every port.
    #[serde(default)]
    pub ports: Vec<WirePort>,
}

/// One peer as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WirePeer {
    /// Pods (in the policy's namespace unless `namespaceSelector` is given).
    #[serde(default)]
    pub pod_selector: Option<WireLabelSelector>,
    /// Namespaces whose pods are peers.
    #[serde(default)]
    pub namespace_selector: Option<WireLabelSelector>,
    /// Addresses outside the pod network.
    #[serde(default)]
    pub ip_block: Option<WireIpBlock>,
}

/// An `ipBlock` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireIpBlock {
    /// The network.
    pub cidr: String,
    /// Networks inside it that are not peers.
    #[serde(default)]
    pub except: Vec<String>,
}

/// A port as written: `port` is an integer or a name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WirePort {
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Number or container-port name; absent admits every port of the protocol.
    #[serde(default)]
    pub port: Option<WirePortValue>,
    /// Last port of a range starting at `port`.
    #[serde(default)]
    pub end_port: Option<i64>,
}

/// Kubernetes' `IntOrString` for a port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WirePortValue {
    /// A port number.
    Number(i64),
    /// A container-port name.
    Name(String),
}

/// A validated NetworkPolicy of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Namespace of the policy (and of the pods it applies to).
    pub namespace: String,
    /// Name of the policy.
    pub name: String,
    /// The local endpoints the policy applies to, as a selector on identity labels.
    pub subjects: LabelSelector,
    /// Ingress rules, or `None` when the policy does not isolate ingress.
    pub ingress: Option<Vec<PolicyRule>>,
    /// Egress rules, or `None` when the policy does not isolate egress.
    pub egress: Option<Vec<PolicyRule>>,
}

/// One rule: traffic to or from any of `peers` on any of `ports` is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// `None`: every peer.
    pub peers: Option<Vec<Peer>>,
    /// Empty: every port of every protocol.
    pub ports: Vec<PortRule>,
}

/// A validated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Endpoints whose identity labels match (pod, namespace and cluster folded in).
    Endpoints(LabelSelector),
    /// Addresses in `cidr` but in none of `except`.
    IpBlock {
        /// The network.
        cidr: Cidr,
        /// Networks inside it that are not peers.
        except: Vec<Cidr>,
    },
}

/// A protocol a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyProtocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// Which ports of a protocol a rule admits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port.
    Any,
    /// `first..=last` (one port when equal).
    Range {
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// A container-port name, resolved per pod (the selected pod's for ingress, the peer's
    /// for egress).
    Named(String),
}

/// A validated port entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    /// The protocol.
    pub protocol: PolicyProtocol,
    /// The ports.
    pub ports: PortMatch,
}

/// Why a NetworkPolicy was refused; the policy is refused as a whole, others still apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {place}: {problem}")]
pub struct PolicyError {
    /// Kind and `namespace/name` of the policy, e.g. `NetworkPolicy shop/api`.
    pub policy: String,
    /// Where in the object, e.g. `spec.ingress[0].from[1].podSelector`.
    pub place: String,
    /// What is wrong there.
    pub problem: Box<PolicyProblem>,
}

/// What is wrong at the place a [`PolicyError`] names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    /// A selector is invalid.
    #[error("{0}; fix the selector")]
    Selector(SelectorError),
    /// An `ipBlock` network is invalid.
    #[error(transparent)]
    Cidr(CidrError),
    /// Any other rule of the NetworkPolicy API, with what to write instead.
    #[error("{0}")]
    Invalid(String),
}

/// Which policy is being read: builds its errors and the checks both policy kinds share.
pub(super) struct Origin<'a> {
    /// `NetworkPolicy` or `CiliumNetworkPolicy`.
    pub(super) kind: &'static str,
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
}

/// A port as both kinds write it, before validation.
pub(super) enum PortValue<'a> {
    /// No port (or Cilium's `"0"`): every port.
    Every,
    /// A number.
    Number(i64),
    /// A container-port name.
    Name(&'a str),
}

impl Origin<'_> {
    pub(super) fn error(&self, place: &str, problem: PolicyProblem) -> PolicyError {
        PolicyError {
            policy: format!("{} {}/{}", self.kind, self.namespace, self.name),
            place: place.to_owned(),
            problem: Box::new(problem),
        }
    }

    pub(super) fn invalid(&self, place: &str, reason: impl Into<String>) -> PolicyError {
        self.error(place, PolicyProblem::Invalid(reason.into()))
    }

    /// `port` (and `endPort`) of the port entry at `place`, with Kubernetes' rules: numbers
    /// 1-65535, `endPort` only after a numeric port and not below it, names IANA service
    /// names.
    pub(super) fn port_match(
        &self,
        place: &str,
        port: PortValue<'_>,
        end: Option<i64>,
    ) -> Result<PortMatch, PolicyError> {
        let number = |at: &str, n: i64| {
            u16::try_from(n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| self.invalid(at, format!("{n} is not a port number (1-65535)")))
        };
        match (port, end) {
            (PortValue::Every, None) => Ok(PortMatch::Any),
            (PortValue::Every, Some(_)) => {
                Err(self.invalid(place, "endPort needs a numeric port to start the range"))
            }
            (PortValue::Name(name), Some(_)) => Err(self.invalid(
                place,
                format!("endPort needs a numeric port, not the name {name:?}"),
            )),
            (PortValue::Name(name), None) => {
                check_port_name(name).map_err(|reason| {
                    self.invalid(&format!("{place}.port"), format!("{name:?} {reason}"))
                })?;
                Ok(PortMatch::Named(name.to_owned()))
            }
            (PortValue::Number(n), end) => {
                let first = number(&format!("{place}.port"), n)?;
                let last = match end {
                    None => first,
                    Some(e) => number(&format!("{place}.endPort"), e)?,
                };
                if last < first {
                    return Err(self.invalid(
                        &format!("{place}.endPort"),
                        format!("{last} is below port {first}"),
                    ));
                }
                Ok(PortMatch::Range { first, last })
            }
        }
    }
}

/// Validation context: which policy, and how peers are scoped.
struct Ctx<'a> {
    origin: Origin<'a>,
    local_cluster: &'a str,
    clusters: PeerClusters,
}

impl Ctx<'_> {
    fn error(&self, place: &str, problem: PolicyProblem) -> PolicyError {
        self.origin.error(place, problem)
    }

    fn invalid(&self, place: &str, reason: impl Into<String>) -> PolicyError {
        self.origin.invalid(place, reason)
    }

    fn selector(
        &self,
        place: &str,
        wire: &WireLabelSelector,
    ) -> Result<LabelSelector, PolicyError> {
        LabelSelector::from_wire(wire).map_err(|e| self.error(place, PolicyProblem::Selector(e)))
    }

    fn cidr(&self, place: &str, text: &str) -> Result<Cidr, PolicyError> {
        match Cidr::parse(text) {
            Ok(cidr) => Ok(cidr),
            // Kubernetes has long accepted host bits here and used the network.
            Err(CidrError::HostBits { canonical, .. }) => Ok(canonical),
            Err(error) => Err(self.error(place, PolicyProblem::Cidr(error))),
        }
    }

    fn in_namespace(&self) -> Requirement {
        Requirement::In {
            key: NAMESPACE_LABEL.to_owned(),
            values: BTreeSet::from([self.origin.namespace.to_owned()]),
        }
    }

    fn peers(&self, place: &str, wire: &[WirePeer]) -> Result<Option<Vec<Peer>>, PolicyError> {
        if wire.is_empty() {
            return Ok(None);
        }
        let mut peers = Vec::with_capacity(wire.len());
        for (i, peer) in wire.iter().enumerate() {
            peers.push(self.peer(&format!("{place}[{i}]"), peer)?);
        }
        Ok(Some(peers))
    }

    fn peer(&self, place: &str, wire: &WirePeer) -> Result<Peer, PolicyError> {
        if let Some(block) = &wire.ip_block {
            if wire.pod_selector.is_some() || wire.namespace_selector.is_some() {
                return Err(self.invalid(
                    place,
                    "ipBlock cannot be combined with podSelector or namespaceSelector in one peer; write them as two peers",
                ));
            }
            let cidr = self.cidr(&format!("{place}.ipBlock.cidr"), &block.cidr)?;
            let mut except = Vec::with_capacity(block.except.len());
            for (i, text) in block.except.iter().enumerate() {
                let at = format!("{place}.ipBlock.except[{i}]");
                let inner = self.cidr(&at, text)?;
                let inside = inner.addr().is_ipv4() == cidr.addr().is_ipv4()
                    && inner.prefix_len() > cidr.prefix_len()
                    && cidr.contains(inner.addr());
                if !inside {
                    return Err(self.invalid(
                        &at,
                        format!("{inner} is not a strict subset of the ipBlock's cidr {cidr}"),
                    ));
                }
                except.push(inner);
            }
            return Ok(Peer::IpBlock { cidr, except });
        }
        let pods = match &wire.pod_selector {
            Some(s) => self.selector(&format!("{place}.podSelector"), s)?,
            None => LabelSelector::everything(),
        };
        let selector = match &wire.namespace_selector {
            None if wire.pod_selector.is_none() => {
                return Err(self.invalid(
                    place,
                    "a peer needs podSelector, namespaceSelector or ipBlock; `{}` is not a peer (write no `from`/`to` to admit everyone)",
                ))
            }
            None => pods.and(self.in_namespace()),
            Some(ns) => {
                let namespaces = self.selector(&format!("{place}.namespaceSelector"), ns)?;
                namespaces
                    .requirements()
                    .map(|r| r.clone().prefixed(NAMESPACE_LABELS_PREFIX))
                    .fold(pods, LabelSelector::and)
                    // Any namespace: still only pods (reserved identities have no namespace).
                    .and(Requirement::Exists {
                        key: NAMESPACE_LABEL.to_owned(),
                    })
            }
        };
        Ok(Peer::Endpoints(
            selector.scoped_to(self.local_cluster, self.clusters),
        ))
    }

    fn ports(&self, place: &str, wire: &[WirePort]) -> Result<Vec<PortRule>, PolicyError> {
        wire.iter()
            .enumerate()
            .map(|(i, p)| self.port(&format!("{place}[{i}]"), p))
            .collect()
    }

    fn port(&self, place: &str, wire: &WirePort) -> Result<PortRule, PolicyError> {
        let protocol = match wire.protocol.as_deref() {
            None | Some("TCP") => PolicyProtocol::Tcp,
            Some("UDP") => PolicyProtocol::Udp,
            Some("SCTP") => PolicyProtocol::Sctp,
            Some(other) => {
                return Err(self.invalid(
                    &format!("{place}.protocol"),
                    format!("{other:?} is not TCP, UDP or SCTP (case-sensitive)"),
                ))
            }
        };
        let port = match &wire.port {
            None => PortValue::Every,
            Some(WirePortValue::Number(n)) => PortValue::Number(*n),
            Some(WirePortValue::Name(name)) => PortValue::Name(name),
        };
        let ports = self.origin.port_match(place, port, wire.end_port)?;
        Ok(PortRule { protocol, ports })
    }
}

impl NetworkPolicy {
    /// Validates the spec of policy `namespace/name` of cluster `local_cluster`; peers that
    /// do not name the cluster label select per `clusters`.
    ///
    /// # Errors
    /// [`PolicyError`] naming the policy, the place in the spec and the rule broken.
    pub fn from_wire(
        namespace: &str,
        name: &str,
        spec: &WireNetworkPolicySpec,
        local_cluster: &str,
        clusters: PeerClusters,
    ) -> Result<Self, PolicyError> {
        let ctx = Ctx {
            origin: Origin {
                kind: "NetworkPolicy",
                namespace,
                name,
            },
            local_cluster,
            clusters,
        };
        let (mut isolates_ingress, mut isolates_egress) = (true, !spec.egress.is_empty());
        // An empty list is defaulted like an absent one (as the API server does).
        if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
            isolates_ingress = false;
            isolates_egress = false;
            for t in types {
                match t.as_str() {
                    "Ingress" => isolates_ingress = true,
                    "Egress" => isolates_egress = true,
                    other => {
                        return Err(ctx.invalid(
                            "spec.policyTypes",
                            format!("{other:?} is not Ingress or Egress (case-sensitive)"),
                        ))
                    }
                }
            }
        }
        let subjects = ctx
            .selector("spec.podSelector", &spec.pod_selector)?
            .and(ctx.in_namespace())
            .scoped_to(local_cluster, PeerClusters::Local);
        let mut ingress = Vec::with_capacity(spec.ingress.len());
        for (i, rule) in spec.ingress.iter().enumerate() {
            let at = format!("spec.ingress[{i}]");
            ingress.push(PolicyRule {
                peers: ctx.peers(&format!("{at}.from"), &rule.from)?,
                ports: ctx.ports(&format!("{at}.ports"), &rule.ports)?,
            });
        }
        let mut egress = Vec::with_capacity(spec.egress.len());
        for (i, rule) in spec.egress.iter().enumerate() {
            let at = format!("spec.egress[{i}]");
            egress.push(PolicyRule {
                peers: ctx.peers(&format!("{at}.to"), &rule.to)?,
                ports: ctx.ports(&format!("{at}.ports"), &rule.ports)?,
            });
        }
        // Rules of a direction the policy does not isolate have no effect (Kubernetes).
        Ok(NetworkPolicy {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            subjects,
            ingress: isolates_ingress.then_some(ingress),
            egress: isolates_egress.then_some(egress),
        })
    }
}

/// An IANA service name as Kubernetes checks a named port (`IsValidPortName`): 1–15
/// characters of lowercase letters, digits and `-`, at least one letter, no `-` at either
/// end and no `--`.
pub(super) fn check_port_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("is not a port name: it must be 1-15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("is not a port name: only lowercase letters, digits and '-'");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("is not a port name: it needs at least one letter");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("is not a port name: no '-' at either end and no '--'");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
