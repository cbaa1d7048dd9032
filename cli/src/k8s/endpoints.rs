//! Where other clusters reach a cluster's mesh API, and whether its server certificate
//! covers those addresses.
//!
//! `connect` lists these endpoints in the peer's agent configuration and reissues the
//! server certificate when it does not cover them; `enable` keeps them in the reissued
//! certificate; `status` shows them.

use std::net::IpAddr;

use clustermesh_certs::inspect::CertInfo;
use clustermesh_certs::ServerNames;
use k8s_openapi::api::core::v1::{Node, Service};

use super::error::KubeModeError;
use super::objects::{Objects, APISERVER_SERVICE};

/// Host part of a `host:port` endpoint (IPv6 brackets removed).
#[must_use]
pub fn endpoint_host(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn endpoint(host: &str, port: i32) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// At most this many node addresses are listed for a NodePort mesh API.
pub const MAX_NODE_ENDPOINTS: usize = 3;

/// Where other clusters reach this cluster's mesh API: the LoadBalancer ingress and
/// Service port, or up to [`MAX_NODE_ENDPOINTS`] nodes' InternalIPs (ready nodes first,
/// by name) and the node port.
pub async fn mesh_endpoints(objs: &Objects<'_>) -> Result<Vec<String>, KubeModeError> {
    let svc = objs
        .service(APISERVER_SERVICE)
        .await?
        .ok_or_else(|| objs.not_enabled(format!("Service {APISERVER_SERVICE}")))?;
    endpoints_of(objs, &svc).await
}

/// [`mesh_endpoints`] of an already fetched apiserver Service `svc` (nodes are still
/// listed for a NodePort).
pub async fn endpoints_of(objs: &Objects<'_>, svc: &Service) -> Result<Vec<String>, KubeModeError> {
    let where_ = format!(
        "Service {APISERVER_SERVICE} in namespace {} of context {}",
        objs.namespace(),
        objs.context()
    );
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec.ports.clone().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .or_else(|| ports.first())
        .ok_or_else(|| {
            KubeModeError::NoAddress(format!(
                "{where_} has no ports; run `clustermesh --context {} enable` again to restore it",
                objs.context()
            ))
        })?;
    match spec.type_.as_deref() {
        Some("LoadBalancer") => {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.clone())
                .unwrap_or_default();
            let host = ingress
                .iter()
                .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .ok_or_else(|| {
                    KubeModeError::NoAddress(format!(
                        "{where_} is a LoadBalancer with no external address yet; wait for the load balancer and retry, or run `clustermesh --context {} enable --service-type NodePort` (same name and ID)",
                        objs.context()
                    ))
                })?;
            Ok(vec![endpoint(&host, port.port)])
        }
        Some("NodePort") => {
            let node_port = port.node_port.filter(|p| *p > 0).ok_or_else(|| {
                KubeModeError::NoAddress(format!(
                    "{where_} has no node port assigned yet; retry in a moment"
                ))
            })?;
            let mut nodes: Vec<(bool, String, String)> = objs
                .nodes()
                .await?
                .iter()
                .filter_map(|n| {
                    let ip = internal_ip(n)?;
                    Some((!node_ready(n), n.metadata.name.clone().unwrap_or_default(), ip))
                })
                .collect();
            nodes.sort();
            if nodes.is_empty() {
                return Err(KubeModeError::NoAddress(format!(
                    "{where_} is a NodePort but no node of context {} has an InternalIP; check `kubectl get nodes -o wide`",
                    objs.context()
                )));
            }
            Ok(nodes
                .iter()
                .take(MAX_NODE_ENDPOINTS)
                .map(|(_, _, ip)| endpoint(ip, node_port))
                .collect())
        }
        other => Err(KubeModeError::NoAddress(format!(
            "{where_} has type {}, which other clusters cannot reach; run `clustermesh --context {} enable --service-type LoadBalancer` (or NodePort) with the same name and ID",
            other.unwrap_or("ClusterIP"),
            objs.context()
        ))),
    }
}

/// The SANs of a server certificate PEM (empty if it does not parse).
#[must_use]
pub fn server_names_of(cert_pem: &str) -> (Vec<String>, Vec<IpAddr>) {
    let Ok(der) = clustermesh_certs::pem::parse_certs(cert_pem.as_bytes()) else {
        return (Vec::new(), Vec::new());
    };
    match der.first().map(|d| CertInfo::from_der(d.as_ref())) {
        Some(Ok(info)) => (info.dns_names, info.ips),
        _ => (Vec::new(), Vec::new()),
    }
}

/// `names` plus the hosts of `endpoints`; `None` if they are already all covered.
#[must_use]
pub fn names_covering(dns: &[String], ips: &[IpAddr], endpoints: &[String]) -> Option<ServerNames> {
    let mut dns: Vec<String> = dns.to_vec();
    let mut ips: Vec<IpAddr> = ips.to_vec();
    let mut changed = false;
    for e in endpoints {
        let host = endpoint_host(e);
        match host.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => {
                ips.push(ip);
                changed = true;
            }
            Ok(_) => {}
            Err(_) if !dns.iter().any(|d| d == host) => {
                dns.push(host.to_string());
                changed = true;
            }
            Err(_) => {}
        }
    }
    changed.then(|| ServerNames::new(dns, ips))
}

#[cfg(test)]
mod tests {
    use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
    use clustermesh_certs::{MeshCa, TrustDomain, Validity};

    use super::*;

    #[test]
    fn server_names_grow_only_when_an_endpoint_is_not_covered() {
        let dns = vec!["clustermesh-apiserver.ns.svc".to_string()];
        let ips = vec!["127.0.0.1".parse().unwrap()];
        assert!(names_covering(&dns, &ips, &["127.0.0.1:2379".into()]).is_none());
        let grown = names_covering(
            &dns,
            &ips,
            &["[2001:db8::1]:30000".into(), "mesh.example:443".into()],
        )
        .unwrap();
        assert!(grown.ips.contains(&"2001:db8::1".parse().unwrap()));
        assert!(grown.dns.contains(&"mesh.example".to_string()));
        assert_eq!(endpoint("2001:db8::1", 5), "[2001:db8::1]:5");
        assert_eq!(endpoint("lb.example", 5), "lb.example:5");
    }

    #[test]
    fn issued_server_names_are_read_back() {
        let ca = MeshCa::generate(TrustDomain::new("t.test").unwrap()).unwrap();
        let names = ServerNames::new(
            ["a.example".to_string()],
            ["192.0.2.1".parse::<IpAddr>().unwrap()],
        );
        let leaf = ca
            .issue_server("east", &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        let (dns, ips) = server_names_of(&leaf.cert_pem);
        assert_eq!(dns, vec!["a.example".to_string()]);
        assert_eq!(ips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(server_names_of("garbage"), (vec![], vec![]));
    }
}
