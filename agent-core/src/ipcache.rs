//! The IP cache: which cluster and security identity every known address belongs to, as
//! policy enforcement asks it ("who is this peer?").
//!
//! Fed by the endpoint records of every connected cluster (the local one included) and the
//! node's own addresses. Three rules keep enforcement from hurting while the mesh changes:
//! * **sync gating** — until a cluster's identities and endpoints are synced, its addresses
//!   (known entries, and anything inside its pod CIDRs) resolve to [`Resolved::Syncing`],
//!   which enforcement lets through, so a remote pod is never treated as `world` and
//!   dropped while its cluster is still arriving (the failure of Cilium issue #26462);
//! * **refusal** — a cluster may only claim identities carrying its own cluster ID in the
//!   high bits; an endpoint record with another cluster's identity is refused and named;
//! * **reserved identities** — the node's own addresses are [`HOST`]; an address no
//!   cluster claims is [`WORLD`] (Cilium's numbers for both).
//!
//! The cache also records which datapath prefixes may have changed since the caller last
//! took them ([`IpCache::take_changed`]), so the datapath is written per changed prefix
//! ([`IpCache::datapath_entry`]) instead of being rebuilt and diffed in full: one new pod
//! costs one prefix, not a pass over every address of the mesh.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use clustermesh_api::cidr::Cidr;
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::security_identity::{SecurityIdentity, MIN_LOCAL_IDENTITY};

use crate::policy::IpCacheValue;

/// Reserved identity of the node's own addresses (Cilium's `reserved:host`, 1).
pub const HOST: SecurityIdentity = SecurityIdentity::new(1);
/// Reserved identity of addresses outside every cluster (Cilium's `reserved:world`, 2).
pub const WORLD: SecurityIdentity = SecurityIdentity::new(2);

/// What an address resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// An endpoint of a synced cluster.
    Endpoint {
        /// The cluster's ID.
        cluster_id: u32,
        /// The endpoint's security identity.
        identity: SecurityIdentity,
    },
    /// An address of a cluster whose identities and endpoints are not synced yet: not
    /// enforced.
    Syncing {
        /// The cluster's ID.
        cluster_id: u32,
    },
    /// The node itself ([`HOST`]).
    Host,
    /// Anything else ([`WORLD`]).
    World,
}

impl Resolved {
    /// The identity enforcement matches policy against; `None` while syncing.
    #[must_use]
    pub fn identity(self) -> Option<SecurityIdentity> {
        match self {
            Resolved::Endpoint { identity, .. } => Some(identity),
            Resolved::Syncing { .. } => None,
            Resolved::Host => Some(HOST),
            Resolved::World => Some(WORLD),
        }
    }
}

/// Why an endpoint record was refused (the previous entry for the address is kept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpCacheError {
    /// The record's identity belongs to another cluster's range.
    #[error("cluster {cluster} (ID {cluster_id}) exported endpoint {ip} with identity {identity}, which belongs to cluster ID {owner}; the record is refused — check that cluster's identity allocation and cluster ID")]
    ForeignIdentity {
        /// The exporting cluster.
        cluster: String,
        /// Its ID.
        cluster_id: u32,
        /// The address.
        ip: IpAddr,
        /// The identity it claimed.
        identity: u32,
        /// The cluster ID in the identity's high bits.
        owner: u32,
    },
    /// The record's identity is in the reserved range no allocator hands out.
    #[error("cluster {cluster} exported endpoint {ip} with identity {identity}, whose cluster-local part is reserved (below 256); the record is refused — check that cluster's identity allocation")]
    ReservedIdentity {
        /// The exporting cluster.
        cluster: String,
        /// The address.
        ip: IpAddr,
        /// The identity it claimed.
        identity: u32,
    },
    /// The cluster was never registered ([`IpCache::add_cluster`]).
    #[error("endpoint {ip} from unknown cluster {cluster}; the cluster must be configured before its records are used")]
    UnknownCluster {
        /// The cluster named by the record.
        cluster: String,
        /// The address.
        ip: IpAddr,
    },
}

#[derive(Debug)]
struct ClusterEntries {
    id: u32,
    synced: bool,
    pod_cidrs: Vec<Cidr>,
    entries: BTreeMap<IpAddr, SecurityIdentity>,
}

impl ClusterEntries {
    /// Every datapath prefix the cluster may claim: its pod CIDRs and its addresses.
    fn prefixes(&self) -> impl Iterator<Item = Cidr> + '_ {
        self.pod_cidrs
            .iter()
            .copied()
            .chain(self.entries.keys().map(|ip| Cidr::host(*ip)))
    }
}

/// Address → (cluster, identity) for every connected cluster.
#[derive(Debug)]
pub struct IpCache {
    mode: ClusterIdMode,
    host: BTreeSet<IpAddr>,
    clusters: BTreeMap<String, ClusterEntries>,
    /// Datapath prefixes whose entry may differ from what it was when last taken.
    changed: BTreeSet<Cidr>,
}

impl IpCache {
    /// An empty cache for a mesh of `mode` (how identities split into cluster ID and local
    /// part).
    #[must_use]
    pub fn new(mode: ClusterIdMode) -> Self {
        Self {
            mode,
            host: BTreeSet::new(),
            clusters: BTreeMap::new(),
            changed: BTreeSet::new(),
        }
    }

    /// Sets the node's own addresses.
    pub fn set_host_addresses(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        let old = std::mem::replace(&mut self.host, addrs.into_iter().collect());
        self.changed
            .extend(old.iter().chain(self.host.iter()).map(|ip| Cidr::host(*ip)));
    }

    /// The datapath prefixes that may have changed since the last call (every mutation
    /// records the prefixes it touches; [`IpCache::datapath_entry`] says what each one
    /// holds now).
    pub fn take_changed(&mut self) -> BTreeSet<Cidr> {
        std::mem::take(&mut self.changed)
    }

    /// Registers cluster `name` with its ID and pod CIDRs (unsynced until
    /// [`IpCache::mark_synced`]); an existing cluster keeps its entries and sync state.
    pub fn add_cluster(&mut self, name: &str, id: u32, pod_cidrs: Vec<Cidr>) {
        let entry = self
            .clusters
            .entry(name.to_owned())
            .or_insert_with(|| ClusterEntries {
                id,
                synced: false,
                pod_cidrs: Vec::new(),
                entries: BTreeMap::new(),
            });
        if entry.id == id {
            // Only the pod CIDRs can change what the datapath holds.
            self.changed
                .extend(entry.pod_cidrs.iter().chain(pod_cidrs.iter()).copied());
        } else {
            // Every entry carries the cluster ID.
            self.changed.extend(entry.prefixes());
            self.changed.extend(pod_cidrs.iter().copied());
        }
        entry.id = id;
        entry.pod_cidrs = pod_cidrs;
    }

    /// The cluster's identities and endpoints are complete: enforce on its addresses.
    pub fn mark_synced(&mut self, name: &str) {
        if let Some(c) = self.clusters.get_mut(name) {
            if !c.synced {
                self.changed.extend(c.prefixes());
            }
            c.synced = true;
        }
    }

    /// Forgets cluster `name` and every address it claimed (disconnected past its stale
    /// TTL, or removed from the configuration); returns how many entries went.
    pub fn remove_cluster(&mut self, name: &str) -> usize {
        let Some(c) = self.clusters.remove(name) else {
            return 0;
        };
        self.changed.extend(c.prefixes());
        c.entries.len()
    }

    /// Records that `ip` in cluster `cluster` has `identity`.
    ///
    /// # Errors
    /// [`IpCacheError`] when the cluster is unknown or the identity is not in its range;
    /// the address keeps its previous entry.
    pub fn upsert(
        &mut self,
        cluster: &str,
        ip: IpAddr,
        identity: SecurityIdentity,
    ) -> Result<(), IpCacheError> {
        let mode = self.mode;
        let Some(c) = self.clusters.get_mut(cluster) else {
            return Err(IpCacheError::UnknownCluster {
                cluster: cluster.to_owned(),
                ip,
            });
        };
        let (owner, local) = identity.split(mode);
        if local < MIN_LOCAL_IDENTITY && owner == c.id {
            return Err(IpCacheError::ReservedIdentity {
                cluster: cluster.to_owned(),
                ip,
                identity: identity.get(),
            });
        }
        if owner != c.id {
            return Err(IpCacheError::ForeignIdentity {
                cluster: cluster.to_owned(),
                cluster_id: c.id,
                ip,
                identity: identity.get(),
                owner,
            });
        }
        if c.entries.insert(ip, identity) != Some(identity) {
            self.changed.insert(Cidr::host(ip));
        }
        Ok(())
    }

    /// Forgets `ip` in `cluster`; returns whether it was there.
    pub fn remove(&mut self, cluster: &str, ip: IpAddr) -> bool {
        let removed = self
            .clusters
            .get_mut(cluster)
            .is_some_and(|c| c.entries.remove(&ip).is_some());
        if removed {
            self.changed.insert(Cidr::host(ip));
        }
        removed
    }

    /// Who `ip` is.
    #[must_use]
    pub fn resolve(&self, ip: IpAddr) -> Resolved {
        if self.host.contains(&ip) {
            return Resolved::Host;
        }
        for c in self.clusters.values() {
            if let Some(identity) = c.entries.get(&ip) {
                return if c.synced {
                    Resolved::Endpoint {
                        cluster_id: c.id,
                        identity: *identity,
                    }
                } else {
                    Resolved::Syncing { cluster_id: c.id }
                };
            }
        }
        self.clusters
            .values()
            .find(|c| !c.synced && c.pod_cidrs.iter().any(|cidr| cidr.contains(ip)))
            .map_or(Resolved::World, |c| Resolved::Syncing { cluster_id: c.id })
    }

    /// What the datapath's longest-prefix IP cache holds for these addresses: each
    /// endpoint address (`syncing` while its cluster is), the pod CIDRs of clusters still
    /// syncing, and the node's addresses as [`HOST`]. A prefix claimed twice keeps the
    /// later claim in that order, so the node's addresses always win.
    #[must_use]
    pub fn datapath_entries(&self) -> BTreeMap<Cidr, IpCacheValue> {
        let mut out = BTreeMap::new();
        for c in self.clusters.values() {
            let cluster_id = u16::try_from(c.id).unwrap_or(u16::MAX);
            if !c.synced {
                for cidr in &c.pod_cidrs {
                    out.insert(
                        *cidr,
                        IpCacheValue {
                            identity: WORLD.get(),
                            cluster_id,
                            syncing: true,
                        },
                    );
                }
            }
            for (ip, identity) in &c.entries {
                out.insert(
                    Cidr::host(*ip),
                    IpCacheValue {
                        identity: identity.get(),
                        cluster_id,
                        syncing: !c.synced,
                    },
                );
            }
        }
        for ip in &self.host {
            out.insert(
                Cidr::host(*ip),
                IpCacheValue {
                    identity: HOST.get(),
                    cluster_id: 0,
                    syncing: false,
                },
            );
        }
        out
    }

    /// What the datapath's IP cache holds for `prefix` alone: the entry
    /// [`IpCache::datapath_entries`] has for it (the same precedence), without building
    /// the others.
    #[must_use]
    pub fn datapath_entry(&self, prefix: &Cidr) -> Option<IpCacheValue> {
        let host =
            (prefix.prefix_len() == Cidr::host(prefix.addr()).prefix_len()).then(|| prefix.addr());
        if host.is_some_and(|ip| self.host.contains(&ip)) {
            return Some(IpCacheValue {
                identity: HOST.get(),
                cluster_id: 0,
                syncing: false,
            });
        }
        // The later cluster's claim wins, and within a cluster an address wins over a pod
        // CIDR: the order `datapath_entries` writes them in.
        self.clusters.values().rev().find_map(|c| {
            let cluster_id = u16::try_from(c.id).unwrap_or(u16::MAX);
            if let Some(identity) = host.and_then(|ip| c.entries.get(&ip)) {
                return Some(IpCacheValue {
                    identity: identity.get(),
                    cluster_id,
                    syncing: !c.synced,
                });
            }
            (!c.synced && c.pod_cidrs.contains(prefix)).then_some(IpCacheValue {
                identity: WORLD.get(),
                cluster_id,
                syncing: true,
            })
        })
    }

    /// Whether cluster `name` is known and synced.
    #[must_use]
    pub fn is_synced(&self, name: &str) -> bool {
        self.clusters.get(name).is_some_and(|c| c.synced)
    }

    /// Entries per cluster (for the IP-cache size metric).
    #[must_use]
    pub fn sizes(&self) -> BTreeMap<&str, usize> {
        self.clusters
            .iter()
            .map(|(name, c)| (name.as_str(), c.entries.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn id(cluster: u32, local: u32) -> SecurityIdentity {
        SecurityIdentity::compose(cluster, local, ClusterIdMode::Max255).unwrap()
    }

    fn cache() -> IpCache {
        let mut c = IpCache::new(ClusterIdMode::Max255);
        c.set_host_addresses([ip("10.1.0.1")]);
        c.add_cluster("east", 1, vec![Cidr::parse("10.1.0.0/16").unwrap()]);
        c.add_cluster("west", 2, vec![Cidr::parse("10.2.0.0/16").unwrap()]);
        c
    }

    #[test]
    fn nothing_of_a_cluster_is_enforced_before_it_is_synced() {
        let mut c = cache();
        c.upsert("west", ip("10.2.0.5"), id(2, 300)).unwrap();
        assert_eq!(
            c.resolve(ip("10.2.0.5")),
            Resolved::Syncing { cluster_id: 2 }
        );
        // An address of its pod CIDR not seen yet is not world while it syncs.
        assert_eq!(
            c.resolve(ip("10.2.9.9")),
            Resolved::Syncing { cluster_id: 2 }
        );
        assert_eq!(c.resolve(ip("10.2.9.9")).identity(), None);
        c.mark_synced("west");
        assert_eq!(
            c.resolve(ip("10.2.0.5")),
            Resolved::Endpoint {
                cluster_id: 2,
                identity: id(2, 300)
            }
        );
        assert_eq!(c.resolve(ip("10.2.9.9")), Resolved::World);
    }

    #[test]
    fn host_and_world_are_reserved() {
        let mut c = cache();
        c.mark_synced("east");
        c.mark_synced("west");
        assert_eq!(c.resolve(ip("10.1.0.1")).identity(), Some(HOST));
        assert_eq!(c.resolve(ip("192.0.2.1")).identity(), Some(WORLD));
        assert_eq!(c.resolve(ip("fd00::1")).identity(), Some(WORLD));
    }

    #[test]
    fn a_cluster_cannot_claim_another_clusters_identity() {
        let mut c = cache();
        c.mark_synced("west");
        c.upsert("west", ip("10.2.0.5"), id(2, 300)).unwrap();
        let e = c
            .upsert("west", ip("10.2.0.5"), id(1, 300))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cluster west (ID 2)") && e.contains("cluster ID 1"),
            "{e}"
        );
        // The last good entry stays.
        assert_eq!(c.resolve(ip("10.2.0.5")).identity(), Some(id(2, 300)));
        assert!(c.upsert("north", ip("10.3.0.1"), id(3, 300)).is_err());
        let reserved = SecurityIdentity::new((2 << 16) | 5);
        let e = c
            .upsert("west", ip("10.2.0.6"), reserved)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reserved"), "{e}");
    }

    #[test]
    fn removing_a_cluster_forgets_its_addresses() {
        let mut c = cache();
        c.mark_synced("west");
        c.upsert("west", ip("10.2.0.5"), id(2, 300)).unwrap();
        c.upsert("west", ip("fd00:2::5"), id(2, 301)).unwrap();
        assert_eq!(c.sizes().get("west"), Some(&2));
        assert_eq!(c.remove_cluster("west"), 2);
        assert_eq!(c.resolve(ip("10.2.0.5")), Resolved::World);
        assert!(!c.remove("west", ip("10.2.0.5")));
    }
}
