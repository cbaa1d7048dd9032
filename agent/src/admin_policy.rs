//! The admin API's policy bodies (`/v1/identities`, `/v1/endpoints`, `/v1/policy`), built
//! from the policy plane.

use clustermesh_agent_core::policy::plane::PolicyPlane;
use clustermesh_agent_core::policy::{AllowEntry, AllowPeer, PolicyCounters};
use clustermesh_api::admin_policy::{
    AllowRule, EndpointEntry, EndpointPolicyStatus, IdentityEntry, PolicyReport, PolicyState,
    PolicyVerdicts,
};
use clustermesh_api::policy::{PeerClusters, PolicyProtocol};

/// `GET /v1/identities`.
#[must_use]
pub fn identities(plane: &PolicyPlane) -> Vec<IdentityEntry> {
    plane
        .identities()
        .map(|(cluster, id, labels)| IdentityEntry {
            id: id.get(),
            cluster: cluster.to_owned(),
            labels: labels.clone(),
        })
        .collect()
}

/// `GET /v1/endpoints`.
#[must_use]
pub fn endpoints(plane: &PolicyPlane) -> Vec<EndpointEntry> {
    plane
        .endpoints()
        .map(|(cluster, e)| EndpointEntry {
            ip: e.ip.to_string(),
            cluster: cluster.to_owned(),
            identity: e.identity.get(),
            namespace: e.namespace.clone(),
            pod: e.pod.clone(),
            node: e.node.clone(),
            labels: plane.labels_of(e.identity).cloned().unwrap_or_default(),
            enforced: plane.ipcache().is_synced(cluster),
        })
        .collect()
}

fn protocol_word(p: PolicyProtocol) -> &'static str {
    match p {
        PolicyProtocol::Tcp => "TCP",
        PolicyProtocol::Udp => "UDP",
        PolicyProtocol::Sctp => "SCTP",
    }
}

fn rule(plane: &PolicyPlane, e: &AllowEntry) -> AllowRule {
    let (protocol, ports) = match e.ports.protocol {
        None => ("any".to_owned(), "any".to_owned()),
        Some(p) => {
            let ports = if e.ports.first == 0 && e.ports.last == u16::MAX {
                "any".to_owned()
            } else if e.ports.first == e.ports.last {
                e.ports.first.to_string()
            } else {
                format!("{}-{}", e.ports.first, e.ports.last)
            };
            (protocol_word(p).to_owned(), ports)
        }
    };
    let mut r = AllowRule {
        protocol,
        ports,
        ..AllowRule::default()
    };
    match &e.peer {
        AllowPeer::Any => r.peer = "any".into(),
        AllowPeer::Identity(id) => {
            r.peer = "identity".into();
            r.identity = Some(id.get());
            r.cluster = plane.cluster_of(*id).map(str::to_owned);
            r.labels = plane.labels_of(*id).cloned().unwrap_or_default();
        }
        AllowPeer::Cidr { cidr, except } => {
            r.peer = "cidr".into();
            let mut text = cidr.to_string();
            if !except.is_empty() {
                let holes: Vec<String> = except.iter().map(ToString::to_string).collect();
                text = format!("{text} except {}", holes.join(","));
            }
            r.cidr = Some(text);
        }
    }
    r
}

/// `GET /v1/policy`.
#[must_use]
pub fn report(plane: &PolicyPlane, counters: Option<PolicyCounters>) -> PolicyReport {
    let config = plane.config();
    let policies = plane
        .policies()
        .iter()
        .map(|(k, s)| PolicyState {
            kind: k.kind.clone(),
            namespace: k.namespace.clone(),
            name: k.name.clone(),
            in_force: s.in_force.is_some(),
            error: s.error.clone(),
        })
        .collect();
    let endpoints = plane
        .local_endpoints()
        .iter()
        .map(|(id, rec)| {
            let policy = plane.policy_of(id).cloned().unwrap_or_default();
            let rules =
                |set: &Option<std::collections::BTreeSet<AllowEntry>>| -> Option<Vec<AllowRule>> {
                    set.as_ref()
                        .map(|s| s.iter().map(|e| rule(plane, e)).collect())
                };
            EndpointPolicyStatus {
                namespace: id.namespace.clone(),
                pod: id.pod.clone(),
                ip: rec.ip.to_string(),
                identity: rec.identity.get(),
                policies: plane
                    .policies_selecting(id)
                    .into_iter()
                    .map(|(k, _, _)| format!("{} {}/{}", k.kind, k.namespace, k.name))
                    .collect(),
                ingress: rules(&policy.ingress),
                egress: rules(&policy.egress),
                enforced: plane.owner_of(id).is_some(),
            }
        })
        .collect();
    let c = counters.unwrap_or_default();
    PolicyReport {
        node: config.node.clone(),
        peer_clusters: match config.peer_clusters {
            PeerClusters::Local => "local".into(),
            PeerClusters::All => "all".into(),
        },
        policies,
        endpoints,
        counters: PolicyVerdicts {
            egress_allowed: c.egress_allowed,
            egress_denied: c.egress_denied,
            ingress_allowed: c.ingress_allowed,
            ingress_denied: c.ingress_denied,
            syncing_passed: c.syncing_passed,
            reply_passed: c.reply_passed,
        },
    }
}
