//! The L3/L4 subset of `cilium.io/v2` CiliumNetworkPolicy, read into the same
//! [`NetworkPolicy`] as Kubernetes NetworkPolicy so the agent computes one model.
//!
//! Accepted: `spec.endpointSelector`, `ingress[].fromEndpoints`, `egress[].toEndpoints`,
//! `toPorts[].ports[]` (`port`, `endPort`, `protocol`), and `description`. Anything else
//! (CIDR and entity peers, L7 rules, deny sections, `specs`) refuses the policy with the
//! field named, so nothing is enforced differently from what its author wrote.
//!
//! Cilium's semantics, which differ from NetworkPolicy in places users rely on:
//! * a peer selector that does not name `io.kubernetes.pod.namespace` is limited to the
//!   policy's namespace, so `fromEndpoints: [{}]` means "every pod of this namespace", not
//!   every pod; the subjects (`endpointSelector`) are always pods of the policy's namespace;
//! * label keys may carry a source prefix: `k8s:` and `any:` are accepted (and dropped, as
//!   the identities hold Kubernetes labels only); other sources are refused;
//! * an `ingress`/`egress` section isolates the selected endpoints in that direction, and a
//!   rule allows only what it names: `{}` allows nothing (Cilium's "default deny" idiom), a
//!   rule with `toPorts` and no peers allows those ports from/to every peer;
//! * `protocol` defaults to `ANY` (TCP, UDP and SCTP), and port `"0"` or no port means
//!   every port.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::network_policy::{
    NetworkPolicy, Origin, Peer, PolicyError, PolicyProblem, PolicyProtocol, PolicyRule, PortRule,
    PortValue, NAMESPACE_LABEL,
};
use super::selector::{
    LabelSelector, PeerClusters, Requirement, WireLabelSelector, WireRequirement,
};

/// The `spec` of a CiliumNetworkPolicy, L3/L4 subset. Unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireCiliumPolicySpec {
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Endpoints the policy applies to.
    pub endpoint_selector: WireLabelSelector,
    /// Ingress rules; present (even empty) isolates ingress.
    #[serde(default)]
    pub ingress: Option<Vec<WireCiliumIngressRule>>,
    /// Egress rules; present (even empty) isolates egress.
    #[serde(default)]
    pub egress: Option<Vec<WireCiliumEgressRule>>,
}

/// One ingress rule as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireCiliumIngressRule {
    /// Source endpoints.
    #[serde(default)]
    pub from_endpoints: Option<Vec<WireLabelSelector>>,
    /// Destination ports on the selected endpoint.
    #[serde(default)]
    pub to_ports: Option<Vec<WireCiliumPortRule>>,
}

/// One egress rule as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireCiliumEgressRule {
    /// Destination endpoints.
    #[serde(default)]
    pub to_endpoints: Option<Vec<WireLabelSelector>>,
    /// Destination ports.
    #[serde(default)]
    pub to_ports: Option<Vec<WireCiliumPortRule>>,
}

/// A `toPorts` entry (L4 only: `rules` are refused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireCiliumPortRule {
    /// Ports, any of which matches.
    #[serde(default)]
    pub ports: Vec<WireCiliumPort>,
}

/// One port as written: `port` is a string holding a number or a name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WireCiliumPort {
    /// Number or named port; `"0"` or absent: every port.
    #[serde(default)]
    pub port: Option<String>,
    /// Last port of a range starting at `port`.
    #[serde(default)]
    pub end_port: Option<i64>,
    /// `TCP`, `UDP`, `SCTP` or `ANY` (default).
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Label sources accepted in selector keys and dropped (`k8s:app` is `app`).
const ACCEPTED_SOURCES: [&str; 2] = ["k8s", "any"];

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

    /// Drops an accepted source prefix from `key`.
    fn key(&self, place: &str, key: &str) -> Result<String, PolicyError> {
        match key.split_once(':') {
            None => Ok(key.to_owned()),
            Some((source, rest)) if ACCEPTED_SOURCES.contains(&source) => Ok(rest.to_owned()),
            Some((source, _)) => Err(self.invalid(
                place,
                format!(
                    "label {key:?} has source {source:?}; only Kubernetes labels (no prefix, `k8s:` or `any:`) are supported"
                ),
            )),
        }
    }

    /// An endpoint selector: sources dropped, validated, limited to the policy's namespace
    /// unless it names the namespace label.
    fn selector(
        &self,
        place: &str,
        wire: &WireLabelSelector,
    ) -> Result<LabelSelector, PolicyError> {
        let mut plain = WireLabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: Vec::with_capacity(wire.match_expressions.len()),
        };
        for (k, v) in &wire.match_labels {
            plain.match_labels.insert(self.key(place, k)?, v.clone());
        }
        for r in &wire.match_expressions {
            plain.match_expressions.push(WireRequirement {
                key: self.key(place, &r.key)?,
                ..r.clone()
            });
        }
        let selector = LabelSelector::from_wire(&plain)
            .map_err(|e| self.error(place, PolicyProblem::Selector(e)))?;
        if selector.names_key(NAMESPACE_LABEL) {
            return Ok(selector);
        }
        Ok(selector.and(Requirement::In {
            key: NAMESPACE_LABEL.to_owned(),
            values: BTreeSet::from([self.origin.namespace.to_owned()]),
        }))
    }

    fn rule(
        &self,
        place: &str,
        peers_field: &str,
        peers: Option<&[WireLabelSelector]>,
        to_ports: Option<&[WireCiliumPortRule]>,
    ) -> Result<Option<PolicyRule>, PolicyError> {
        let peers = match peers {
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(i, s)| {
                        self.selector(&format!("{place}.{peers_field}[{i}]"), s)
                            .map(|s| {
                                Peer::Endpoints(s.scoped_to(self.local_cluster, self.clusters))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let mut ports = Vec::new();
        for (i, entry) in to_ports.unwrap_or_default().iter().enumerate() {
            if entry.ports.is_empty() {
                return Err(self.invalid(
                    &format!("{place}.toPorts[{i}].ports"),
                    "is empty; list at least one port (omit toPorts to allow every port)",
                ));
            }
            for (j, port) in entry.ports.iter().enumerate() {
                ports.extend(self.port(&format!("{place}.toPorts[{i}].ports[{j}]"), port)?);
            }
        }
        match (peers, to_ports.is_some()) {
            // `{}`: a rule that allows nothing (it still isolates the direction).
            (None, false) => Ok(None),
            // Peers listed but none: nothing either.
            (Some(p), _) if p.is_empty() => Ok(None),
            (peers, _) => Ok(Some(PolicyRule { peers, ports })),
        }
    }

    fn port(&self, place: &str, wire: &WireCiliumPort) -> Result<Vec<PortRule>, PolicyError> {
        let protocols: &[PolicyProtocol] = match wire.protocol.as_deref() {
            None | Some("ANY") => &[
                PolicyProtocol::Tcp,
                PolicyProtocol::Udp,
                PolicyProtocol::Sctp,
            ],
            Some("TCP") => &[PolicyProtocol::Tcp],
            Some("UDP") => &[PolicyProtocol::Udp],
            Some("SCTP") => &[PolicyProtocol::Sctp],
            Some(other) => {
                return Err(self.invalid(
                    &format!("{place}.protocol"),
                    format!("{other:?} is not TCP, UDP, SCTP or ANY"),
                ))
            }
        };
        let port = match wire.port.as_deref() {
            None | Some("0") => PortValue::Every,
            Some(text) => text
                .parse::<i64>()
                .map_or(PortValue::Name(text), PortValue::Number),
        };
        let ports = self.origin.port_match(place, port, wire.end_port)?;
        Ok(protocols
            .iter()
            .map(|&protocol| PortRule {
                protocol,
                ports: ports.clone(),
            })
            .collect())
    }
}

impl NetworkPolicy {
    /// Reads the L3/L4 subset of CiliumNetworkPolicy `namespace/name` of cluster
    /// `local_cluster`; peers that do not name the cluster label select per `clusters`.
    ///
    /// # Errors
    /// [`PolicyError`] naming the policy, the place and the rule broken.
    pub fn from_cilium(
        namespace: &str,
        name: &str,
        spec: &WireCiliumPolicySpec,
        local_cluster: &str,
        clusters: PeerClusters,
    ) -> Result<Self, PolicyError> {
        let ctx = Ctx {
            origin: Origin {
                kind: "CiliumNetworkPolicy",
                namespace,
                name,
            },
            local_cluster,
            clusters,
        };
        // The subjects are always pods of the policy's own namespace, even when the
        // selector names a namespace (then it selects nothing elsewhere).
        let subjects = ctx
            .selector("spec.endpointSelector", &spec.endpoint_selector)?
            .and(Requirement::In {
                key: NAMESPACE_LABEL.to_owned(),
                values: BTreeSet::from([namespace.to_owned()]),
            })
            .scoped_to(local_cluster, PeerClusters::Local);
        let ingress = match &spec.ingress {
            None => None,
            Some(rules) => {
                let mut out = Vec::new();
                for (i, r) in rules.iter().enumerate() {
                    out.extend(ctx.rule(
                        &format!("spec.ingress[{i}]"),
                        "fromEndpoints",
                        r.from_endpoints.as_deref(),
                        r.to_ports.as_deref(),
                    )?);
                }
                Some(out)
            }
        };
        let egress = match &spec.egress {
            None => None,
            Some(rules) => {
                let mut out = Vec::new();
                for (i, r) in rules.iter().enumerate() {
                    out.extend(ctx.rule(
                        &format!("spec.egress[{i}]"),
                        "toEndpoints",
                        r.to_endpoints.as_deref(),
                        r.to_ports.as_deref(),
                    )?);
                }
                Some(out)
            }
        };
        Ok(NetworkPolicy {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            subjects,
            ingress,
            egress,
        })
    }
}

#[cfg(test)]
mod tests;
