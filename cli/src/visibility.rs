//! `identity list`, `endpoint list` and `policy get`: what the agents' policy routes
//! (`/v1/identities`, `/v1/endpoints`, `/v1/policy`) answer, put in a stable order and,
//! for `policy get --pod`, cut down to one pod.
//!
//! The bodies are the admin API's own types ([`clustermesh_api::admin_policy`]); the agent
//! lists them in whatever order its maps hold them, so both targets order them here
//! before [`crate::render`] draws them, and a JSON reader sees the same order as the
//! table.

use std::cmp::Ordering;
use std::fmt;
use std::net::IpAddr;

use clustermesh_api::admin_policy::{EndpointEntry, IdentityEntry, PolicyReport};

/// A pod named on the command line as `NAMESPACE/NAME` (`policy get --pod`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
}

/// Why a `--pod` value is not `NAMESPACE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--pod takes NAMESPACE/NAME, e.g. --pod default/web; got {given:?}: {why}")]
pub struct BadPodRef {
    /// The value given.
    pub given: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl PodRef {
    /// Parses `NAMESPACE/NAME`: a namespace (a DNS label) and a pod name (a DNS
    /// subdomain), as Kubernetes names them.
    ///
    /// # Errors
    /// [`BadPodRef`] naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, BadPodRef> {
        let bad = |why| BadPodRef {
            given: text.to_owned(),
            why,
        };
        let (namespace, name) = text.split_once('/').ok_or_else(|| bad("no '/'"))?;
        if name.contains('/') {
            return Err(bad("more than one '/'"));
        }
        if namespace.is_empty() || name.is_empty() {
            return Err(bad("the namespace and the name must not be empty"));
        }
        let lower_alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let edges_ok = |s: &str| s.starts_with(lower_alnum) && s.ends_with(lower_alnum);
        if namespace.len() > 63
            || !edges_ok(namespace)
            || !namespace.chars().all(|c| lower_alnum(c) || c == '-')
        {
            return Err(bad(
                "the namespace must be at most 63 lowercase letters, digits and '-'",
            ));
        }
        if name.len() > 253
            || !edges_ok(name)
            || !name.chars().all(|c| lower_alnum(c) || c == '-' || c == '.')
        {
            return Err(bad(
                "the pod name must be at most 253 lowercase letters, digits, '-' and '.'",
            ));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An agent answer the CLI shows in a fixed order.
pub trait Ordered {
    /// Sorts it in place: identities by number, endpoints by address, policy by pod.
    fn order(&mut self);
}

impl Ordered for Vec<IdentityEntry> {
    fn order(&mut self) {
        self.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.cluster.cmp(&b.cluster)));
    }
}

/// Addresses compare as addresses (10.0.0.9 before 10.0.0.10, IPv4 before IPv6); a text
/// that is not an address sorts after every address, by its text.
fn by_address(a: &str, b: &str) -> Ordering {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

impl Ordered for Vec<EndpointEntry> {
    fn order(&mut self) {
        self.sort_by(|a, b| by_address(&a.ip, &b.ip).then_with(|| a.cluster.cmp(&b.cluster)));
    }
}

impl Ordered for PolicyReport {
    fn order(&mut self) {
        self.endpoints.sort_by(|a, b| {
            (&a.namespace, &a.pod)
                .cmp(&(&b.namespace, &b.pod))
                .then_with(|| by_address(&a.ip, &b.ip))
        });
        self.policies.sort_by(|a, b| {
            (&a.namespace, &a.name, &a.kind).cmp(&(&b.namespace, &b.name, &b.kind))
        });
    }
}

/// `report` cut down to `pod`: its endpoint entries and the policies selecting it (the
/// node and the counters stay). `None` when `pod` is not one of the agent's local
/// endpoints.
#[must_use]
pub fn only_pod(report: &PolicyReport, pod: &PodRef) -> Option<PolicyReport> {
    let endpoints: Vec<_> = report
        .endpoints
        .iter()
        .filter(|e| e.namespace == pod.namespace && e.pod == pod.name)
        .cloned()
        .collect();
    if endpoints.is_empty() {
        return None;
    }
    let selecting: Vec<&String> = endpoints.iter().flat_map(|e| &e.policies).collect();
    let policies = report
        .policies
        .iter()
        .filter(|p| {
            let named = format!("{} {}/{}", p.kind, p.namespace, p.name);
            selecting.iter().any(|s| **s == named)
        })
        .cloned()
        .collect();
    Some(PolicyReport {
        endpoints,
        policies,
        ..report.clone()
    })
}

/// The local pods of `report`, `namespace/name`, sorted and unique (for the message that
/// a pod is not among them).
#[must_use]
pub fn local_pods(report: &PolicyReport) -> Vec<String> {
    let mut pods: Vec<String> = report
        .endpoints
        .iter()
        .map(|e| format!("{}/{}", e.namespace, e.pod))
        .collect();
    pods.sort();
    pods.dedup();
    pods
}

#[cfg(test)]
mod tests {
    use clustermesh_api::admin_policy::{EndpointPolicyStatus, PolicyState};

    use super::*;

    #[test]
    fn pod_refs_are_namespace_slash_name() {
        let p = PodRef::parse("default/web-0").unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("default", "web-0")
        );
        assert_eq!(p.to_string(), "default/web-0");
        assert!(PodRef::parse("kube-system/coredns-5d78c9869d-x2x7q").is_ok());
        for (bad, why) in [
            ("web", "no '/'"),
            ("a/b/c", "more than one '/'"),
            ("/web", "must not be empty"),
            ("default/", "must not be empty"),
            ("Default/web", "the namespace must be"),
            ("default/Web", "the pod name must be"),
            ("default/web-", "the pod name must be"),
            ("default/we b", "the pod name must be"),
        ] {
            let err = PodRef::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("--pod takes NAMESPACE/NAME"), "{err}");
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn endpoints_sort_by_address_not_by_text() {
        let e = |ip: &str| EndpointEntry {
            ip: ip.into(),
            ..EndpointEntry::default()
        };
        let mut v = vec![e("fd00::1"), e("10.0.0.10"), e("junk"), e("10.0.0.9")];
        v.order();
        let ips: Vec<&str> = v.iter().map(|e| e.ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.9", "10.0.0.10", "fd00::1", "junk"]);
    }

    #[test]
    fn only_pod_keeps_its_endpoint_and_the_policies_selecting_it() {
        let ep = |ns: &str, pod: &str, policies: &[&str]| EndpointPolicyStatus {
            namespace: ns.into(),
            pod: pod.into(),
            policies: policies.iter().map(|p| (*p).to_owned()).collect(),
            ..EndpointPolicyStatus::default()
        };
        let pol = |name: &str| PolicyState {
            kind: "NetworkPolicy".into(),
            namespace: "default".into(),
            name: name.into(),
            in_force: true,
            error: None,
        };
        let report = PolicyReport {
            node: "n1".into(),
            endpoints: vec![
                ep("default", "web", &["NetworkPolicy default/a"]),
                ep("default", "db", &["NetworkPolicy default/b"]),
            ],
            policies: vec![pol("a"), pol("b")],
            ..PolicyReport::default()
        };
        let web = PodRef::parse("default/web").unwrap();
        let one = only_pod(&report, &web).unwrap();
        assert_eq!(one.node, "n1");
        assert_eq!(one.endpoints.len(), 1);
        assert_eq!(one.endpoints[0].pod, "web");
        assert_eq!(one.policies, vec![pol("a")]);
        let other = PodRef::parse("other/web").unwrap();
        assert!(only_pod(&report, &other).is_none());
        assert_eq!(local_pods(&report), ["default/db", "default/web"]);
    }
}
