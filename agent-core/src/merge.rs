//! Merging one service's records from every cluster into load-balancer entries.
//!
//! This is where Cilium's global-service semantics live, plus clustermesh's locality
//! tiers. For a service `namespace/name`, given the record of every connected cluster
//! that has it:
//!
//! * Only a service that exists in the **local** cluster is programmed (its cluster IPs
//!   are the frontends); a service that exists only remotely has no local frontend.
//! * A **non-global** local service uses only its own backends.
//! * A **global** local service also uses the backends of every remote cluster whose
//!   same-named service is global and **shared**. A local service with `shared=false`
//!   still uses its own backends (and remote ones); it just isn't offered to others.
//! * **Affinity** (from the local service), as Cilium's `SelectBackends`
//!   (`pkg/clustermesh/selectbackends.go`): `local` uses the local ready backends if there
//!   is any, else the remote ones; `remote` uses the remote ready backends, and the local
//!   ones only when the remote clusters have no backend at all that is ready or
//!   terminating (remote backends that are all draining leave no new-connection backend
//!   rather than pulling traffic back home); `none` uses all ready backends.
//! * **Topology tiers** (opt-in, `service.clustermesh.io/topology-aware: "true"`): among the
//!   backends affinity allows, only the closest non-empty tier takes new connections:
//!   same node > same zone (in this cluster) > this cluster > remote clusters.
//! * **Terminating** backends of contributing clusters are kept with weight 0 and state
//!   [`BackendState::Terminating`]: no new connections, existing flows continue.
//! * Backends that are neither ready nor terminating are left out.
//!
//! One [`MergedService`] is produced per service port; backends are matched to the port by
//! port name and protocol, like Kubernetes endpoints.

use std::collections::BTreeSet;

use clustermesh_api::model::{Affinity, BackendState, ServicePortId, ServiceRecord, Tier};

use crate::datapath::{Backend, Frontend};

/// Where this agent runs: the reference point for affinity and tiers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Locality {
    /// Local cluster name.
    pub cluster: String,
    /// This node's name.
    pub node: String,
    /// This node's zone ("" if unknown).
    pub zone: String,
}

impl Locality {
    /// Tier of a backend in `cluster` on `node` in `zone`, seen from here.
    #[must_use]
    pub fn tier_of(&self, cluster: &str, node: &str, zone: &str) -> Tier {
        if cluster != self.cluster {
            Tier::Remote
        } else if !node.is_empty() && node == self.node {
            Tier::Node
        } else if !zone.is_empty() && zone == self.zone {
            Tier::Zone
        } else {
            Tier::Cluster
        }
    }
}

/// The merged state of one service port, before its Maglev table is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedService {
    /// Which service port.
    pub id: ServicePortId,
    /// Local cluster IPs with this port.
    pub frontends: Vec<Frontend>,
    /// Active backends (weight > 0) and draining ones (weight 0), sorted by tier, cluster,
    /// address and port.
    pub backends: Vec<Backend>,
    /// The farthest tier that takes new connections; `None` when no backend is usable.
    pub active_tier: Option<Tier>,
    /// The affinity that selected the backends (the local service's).
    pub affinity: Affinity,
    /// The local service is global.
    pub global: bool,
    /// The local service is shared with other clusters.
    pub shared: bool,
}

/// Merges the records of one service (any order, at most one per cluster; the local
/// cluster's record included if it exists) into one entry per service port.
pub fn merge_service<'a, I>(here: &Locality, records: I) -> Vec<MergedService>
where
    I: IntoIterator<Item = &'a ServiceRecord>,
{
    let records: Vec<&ServiceRecord> = records.into_iter().collect();
    let Some(local) = records.iter().find(|r| r.cluster == here.cluster) else {
        return Vec::new();
    };
    if local.frontends.is_empty() {
        // Headless: nothing to load-balance.
        return Vec::new();
    }
    let mut contributors: Vec<&ServiceRecord> = vec![local];
    if local.global {
        contributors.extend(
            records.iter().filter(|r| {
                r.cluster != here.cluster && r.global && r.shared && r.name == local.name
            }),
        );
    }
    let mut seen_ports = BTreeSet::new();
    let mut out = Vec::with_capacity(local.ports.len());
    for port in &local.ports {
        if !seen_ports.insert(port.name.as_str()) {
            tracing::warn!(service = %local.name, port = %port.name, "duplicate service port name; using the first");
            continue;
        }
        let id = ServicePortId {
            namespace: local.name.namespace.clone(),
            name: local.name.name.clone(),
            port_name: port.name.clone(),
        };
        let frontends = local
            .frontends
            .iter()
            .map(|&ip| Frontend {
                ip,
                port: port.port,
                protocol: port.protocol,
            })
            .collect();
        // Candidates: every ready or terminating backend serving this port.
        let mut ready = Vec::new();
        let mut draining = Vec::new();
        let mut keys = BTreeSet::new();
        for rec in &contributors {
            for b in &rec.backends {
                let Some(target) = b.target_port(port) else {
                    continue;
                };
                if !(b.ready || b.terminating) || !keys.insert((b.ip, target, rec.cluster.as_str()))
                {
                    continue;
                }
                let backend = Backend {
                    ip: b.ip,
                    port: target,
                    protocol: port.protocol,
                    cluster: rec.cluster.clone(),
                    node: b.node.clone(),
                    zone: b.zone.clone(),
                    tier: here.tier_of(&rec.cluster, &b.node, &b.zone),
                    weight: b.weight,
                    state: BackendState::Active,
                };
                if b.terminating {
                    draining.push(Backend {
                        weight: 0,
                        state: BackendState::Terminating,
                        ..backend
                    });
                } else {
                    ready.push(backend);
                }
            }
        }
        let remote_draining = draining.iter().any(|b| b.tier == Tier::Remote);
        let mut active = select(local.affinity, local.topology_aware, ready, remote_draining);
        let active_tier = active.iter().map(|b| b.tier).max();
        active.extend(draining);
        active.sort_by(|a, b| {
            (a.tier, &a.cluster, a.ip, a.port).cmp(&(b.tier, &b.cluster, b.ip, b.port))
        });
        out.push(MergedService {
            id,
            frontends,
            backends: active,
            active_tier,
            affinity: local.affinity,
            global: local.global,
            shared: local.shared,
        });
    }
    out
}

/// Applies affinity, then (if enabled) the closest-tier rule, to the ready backends.
/// `remote_draining`: some remote backend is terminating (it counts as a remote backend
/// for `remote` affinity, as in Cilium).
fn select(
    affinity: Affinity,
    topology_aware: bool,
    ready: Vec<Backend>,
    remote_draining: bool,
) -> Vec<Backend> {
    let (local, remote): (Vec<Backend>, Vec<Backend>) =
        ready.into_iter().partition(|b| b.tier != Tier::Remote);
    let mut pool = match affinity {
        Affinity::Local if !local.is_empty() => local,
        Affinity::Local => remote,
        Affinity::Remote if !remote.is_empty() || remote_draining => remote,
        Affinity::Remote => local,
        Affinity::None => {
            let mut all = local;
            all.extend(remote);
            all
        }
    };
    if topology_aware {
        if let Some(closest) = pool.iter().map(|b| b.tier).min() {
            pool.retain(|b| b.tier == closest);
        }
    }
    pool
}

#[cfg(test)]
mod tests {
    //! Table tests: each row is a scenario written the way one would describe it.

    use super::*;
    use clustermesh_api::model::{BackendRecord, PortSpec, Protocol, ServiceName};

    /// A backend written as `"ip node zone state"`, state `R` ready, `T` terminating,
    /// `N` not ready; weight defaults to 1 (`"ip node zone R*3"` for weight 3).
    fn backend(spec: &str) -> BackendRecord {
        let parts: Vec<&str> = spec.split_whitespace().collect();
        let (state, weight) = match parts[3].split_once('*') {
            Some((s, w)) => (s, w.parse().unwrap()),
            None => (parts[3], 1),
        };
        BackendRecord {
            ip: parts[0].parse().unwrap(),
            ports: vec![PortSpec {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            ready: state == "R",
            terminating: state == "T",
            node: parts[1].replace('-', ""),
            zone: parts[2].replace('-', ""),
            weight,
        }
    }

    /// A service record: `flags` is a string of `g` (global), `s` (shared), `t`
    /// (topology-aware), and one of `L`/`R` for affinity local/remote (none otherwise).
    fn svc(cluster: &str, flags: &str, backends: &[&str]) -> ServiceRecord {
        ServiceRecord {
            cluster: cluster.into(),
            name: ServiceName {
                namespace: "default".into(),
                name: "web".into(),
            },
            frontends: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![PortSpec {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            backends: backends.iter().map(|b| backend(b)).collect(),
            global: flags.contains('g'),
            shared: flags.contains('g') && flags.contains('s'),
            affinity: if flags.contains('L') {
                Affinity::Local
            } else if flags.contains('R') {
                Affinity::Remote
            } else {
                Affinity::None
            },
            topology_aware: flags.contains('t'),
        }
    }

    fn here() -> Locality {
        Locality {
            cluster: "east".into(),
            node: "n1".into(),
            zone: "z1".into(),
        }
    }

    /// Renders the result as `"cluster/ip:weight"` for active and `"cluster/ip:drain"` for
    /// terminating backends, in the merge's order.
    fn render(records: &[ServiceRecord]) -> (Vec<String>, Option<Tier>) {
        let merged = merge_service(&here(), records);
        let Some(m) = merged.first() else {
            return (vec!["<no service>".into()], None);
        };
        let list = m
            .backends
            .iter()
            .map(|b| match b.state {
                BackendState::Active => format!("{}/{}:{}", b.cluster, b.ip, b.weight),
                BackendState::Terminating => format!("{}/{}:drain", b.cluster, b.ip),
            })
            .collect();
        (list, m.active_tier)
    }

    #[test]
    fn merge_affinity_and_failover_table() {
        use Tier::{Cluster, Node, Remote, Zone};
        type Row<'a> = (&'a str, Vec<ServiceRecord>, &'a [&'a str], Option<Tier>);
        let rows: Vec<Row<'_>> = vec![
            (
                "non-global service uses only local backends",
                vec![
                    svc("east", "", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 R"]),
                ],
                &["east/10.0.0.1:1"],
                Some(Cluster),
            ),
            (
                "global services merge across clusters (affinity none)",
                vec![
                    svc("east", "gs", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 R", "10.1.0.2 m2 z9 R*2"]),
                ],
                &["east/10.0.0.1:1", "west/10.1.0.1:1", "west/10.1.0.2:2"],
                Some(Remote),
            ),
            (
                "remote cluster with shared=false is not used",
                vec![
                    svc("east", "gs", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "g", &["10.1.0.1 m1 z9 R"]),
                ],
                &["east/10.0.0.1:1"],
                Some(Cluster),
            ),
            (
                "local shared=false still uses its own and remote backends",
                vec![
                    svc("east", "g", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 R"]),
                ],
                &["east/10.0.0.1:1", "west/10.1.0.1:1"],
                Some(Remote),
            ),
            (
                "remote service that is not global is not merged",
                vec![
                    svc("east", "gs", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "s", &["10.1.0.1 m1 z9 R"]),
                ],
                &["east/10.0.0.1:1"],
                Some(Cluster),
            ),
            (
                "service only in a remote cluster has no local frontend",
                vec![svc("west", "gs", &["10.1.0.1 m1 z9 R"])],
                &["<no service>"],
                None,
            ),
            (
                "affinity local prefers local ready backends",
                vec![
                    svc("east", "gsL", &["10.0.0.1 n2 z2 R", "10.0.0.2 n3 z2 N"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 R"]),
                ],
                &["east/10.0.0.1:1"],
                Some(Cluster),
            ),
            (
                "affinity local fails over to remote when no local backend is ready",
                vec![
                    svc("east", "gsL", &["10.0.0.2 n3 z2 N"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 R"]),
                ],
                &["west/10.1.0.1:1"],
                Some(Remote),
            ),
            (
                "affinity local failover keeps terminating local backends draining",
                vec![
                    svc("east", "gsL", &["10.0.0.3 n2 z2 T"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 R"]),
                ],
                &["east/10.0.0.3:drain", "west/10.1.0.1:1"],
                Some(Remote),
            ),
            (
                "affinity remote prefers remote backends",
                vec![
                    svc("east", "gsR", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 R"]),
                ],
                &["west/10.1.0.1:1"],
                Some(Remote),
            ),
            (
                "affinity remote falls back to local when no remote backend is ready or terminating",
                vec![
                    svc("east", "gsR", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 N"]),
                ],
                &["east/10.0.0.1:1"],
                Some(Cluster),
            ),
            (
                "affinity remote with no remote service at all uses local",
                vec![svc("east", "gsR", &["10.0.0.1 n2 z2 R"])],
                &["east/10.0.0.1:1"],
                Some(Cluster),
            ),
            (
                "affinity remote: terminating remote backends count, no fallback to local (Cilium)",
                vec![
                    svc("east", "gsR", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 T", "10.1.0.2 m1 z9 N"]),
                ],
                &["west/10.1.0.1:drain"],
                None,
            ),
            (
                "affinity remote: one ready remote backend among terminating ones serves alone",
                vec![
                    svc("east", "gsR", &["10.0.0.1 n2 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 T", "10.1.0.2 m1 z9 R"]),
                    svc("north", "gs", &["10.2.0.1 k1 z8 T"]),
                ],
                &["north/10.2.0.1:drain", "west/10.1.0.1:drain", "west/10.1.0.2:1"],
                Some(Remote),
            ),
            (
                "no ready backend anywhere gives an empty active set",
                vec![
                    svc("east", "gsL", &["10.0.0.1 n2 z2 N"]),
                    svc("west", "gs", &["10.1.0.1 m1 z9 N"]),
                ],
                &[],
                None,
            ),
            (
                "topology-aware uses the same node first",
                vec![
                    svc(
                        "east",
                        "gst",
                        &["10.0.0.1 n1 z1 R", "10.0.0.2 n2 z1 R", "10.0.0.3 n3 z2 R"],
                    ),
                    svc("west", "gs", &["10.1.0.1 m1 z1 R"]),
                ],
                &["east/10.0.0.1:1"],
                Some(Node),
            ),
            (
                "topology-aware falls back to the same zone",
                vec![
                    svc(
                        "east",
                        "gst",
                        &["10.0.0.2 n2 z1 R", "10.0.0.3 n3 z2 R", "10.0.0.1 n1 z1 N"],
                    ),
                    svc("west", "gs", &["10.1.0.1 m1 z1 R"]),
                ],
                &["east/10.0.0.2:1"],
                Some(Zone),
            ),
            (
                "topology-aware falls back to the cluster, then remote",
                vec![
                    svc("east", "gst", &["10.0.0.3 n3 z2 R"]),
                    svc("west", "gs", &["10.1.0.1 m1 z1 R"]),
                ],
                &["east/10.0.0.3:1"],
                Some(Cluster),
            ),
            (
                "topology-aware with nothing local uses remote backends",
                vec![
                    svc("east", "gst", &["10.0.0.3 n3 z2 N"]),
                    svc("west", "gs", &["10.1.0.1 m1 z1 R*4"]),
                ],
                &["west/10.1.0.1:4"],
                Some(Remote),
            ),
            (
                "without topology-aware the node and zone do not matter",
                vec![svc("east", "gs", &["10.0.0.1 n1 z1 R", "10.0.0.3 n3 z2 R"])],
                &["east/10.0.0.1:1", "east/10.0.0.3:1"],
                Some(Cluster),
            ),
        ];
        for (name, records, want, tier) in rows {
            let (got, got_tier) = render(&records);
            assert_eq!(got, want, "{name}");
            assert_eq!(got_tier, tier, "{name}: active tier");
        }
    }

    #[test]
    fn record_order_does_not_matter() {
        let a = svc("east", "gs", &["10.0.0.1 n2 z2 R", "10.0.0.9 n2 z2 T"]);
        let b = svc("west", "gs", &["10.1.0.1 m1 z9 R"]);
        let c = svc("north", "gs", &["10.2.0.1 k1 z8 R"]);
        let one = merge_service(&here(), [&a, &b, &c]);
        let two = merge_service(&here(), [&c, &a, &b]);
        assert_eq!(one, two);
    }

    #[test]
    fn one_entry_per_port_matched_by_name_and_protocol() {
        let mut rec = svc("east", "", &["10.0.0.1 n2 z2 R"]);
        rec.ports.push(PortSpec {
            name: "dns".into(),
            port: 53,
            protocol: Protocol::Udp,
        });
        rec.backends[0].ports.push(PortSpec {
            name: "dns".into(),
            port: 5353,
            protocol: Protocol::Udp,
        });
        rec.backends.push(backend("10.0.0.2 n2 z2 R"));
        let merged = merge_service(&here(), [&rec]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].id.port_name, "http");
        assert_eq!(merged[0].backends.len(), 2);
        assert_eq!(merged[1].id.port_name, "dns");
        assert_eq!(merged[1].frontends[0].port, 53);
        assert_eq!(merged[1].backends.len(), 1, "only 10.0.0.1 serves dns");
        assert_eq!(merged[1].backends[0].port, 5353);
    }

    #[test]
    fn headless_local_service_is_not_programmed() {
        let mut rec = svc("east", "", &["10.0.0.1 n2 z2 R"]);
        rec.frontends.clear();
        assert!(merge_service(&here(), [&rec]).is_empty());
    }

    #[test]
    fn tiers_are_relative_to_this_node() {
        let h = here();
        assert_eq!(h.tier_of("east", "n1", "z1"), Tier::Node);
        assert_eq!(h.tier_of("east", "n2", "z1"), Tier::Zone);
        assert_eq!(h.tier_of("east", "n2", ""), Tier::Cluster);
        assert_eq!(h.tier_of("west", "n1", "z1"), Tier::Remote);
    }
}
