//! The policy plane of one agent: identities and endpoints of every cluster and the local
//! cluster's policies in, IP cache and per-endpoint rules out to a [`PolicyDatapath`].
//!
//! * Records arrive as the watchers hand them over (a full replacement per cluster once
//!   it is synced, then single changes); bad ones are refused alone and named, and the
//!   last good version stays in force.
//! * Local endpoints are the local cluster's endpoints on this node; a [`CgroupResolver`]
//!   finds the pod's cgroup (by pod UID), which owns its rules in the datapath.
//! * [`PolicyPlane::flush`] writes only what changed: IP cache prefixes touched since the
//!   last flush (recorded as records arrive, so a flush costs the changes, not the size of
//!   the cache) whose entry differs from what was written, and the rules of endpoints whose
//!   computed policy changed. The first flush after start is a full reconcile (pinned
//!   state of a previous agent is adopted, leftovers removed), and it is up to the caller
//!   to hold it until the clusters synced. A failed IP cache write is retried for the
//!   prefixes it carried; a failed reconcile is redone in full.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use clustermesh_api::cidr::Cidr;
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::keys::PolicySource;
use clustermesh_api::policy::{
    Labels, NetworkPolicy, Peer, PeerClusters, WireCiliumPolicySpec, WireNetworkPolicySpec,
};
use clustermesh_api::security_identity::{SecurityIdentity, MIN_LOCAL_IDENTITY};

use super::datapath::{EndpointRules, IpCacheValue, PolicyDatapath, PolicyOwner};
use super::inputs::{EndpointRecord, Input, InputKey, PolicyRecord};
use super::lower::{lower, CidrIdentities};
use super::{EndpointId, EndpointPolicy, LocalEndpoint, PolicyEngine, PolicyKey};
use crate::ipcache::{IpCache, HOST};

/// Settings of the policy plane.
#[derive(Debug, Clone)]
pub struct PlaneConfig {
    /// The agent's cluster (whose policies apply).
    pub local_cluster: String,
    /// The agent's node (whose endpoints it enforces).
    pub node: String,
    /// What a peer selector without the cluster label selects.
    pub peer_clusters: PeerClusters,
    /// How identities split into cluster ID and local part.
    pub mode: ClusterIdMode,
    /// The node's own addresses (the reserved `host` identity).
    pub host_addresses: Vec<IpAddr>,
}

/// Finds the cgroups of a pod on this node.
pub trait CgroupResolver: Send {
    /// The cgroup IDs of pod `uid`: its pod cgroup first, then the cgroups below it.
    /// `None` while it cannot be found (the endpoint is retried on later flushes).
    fn resolve(&mut self, pod_uid: &str) -> Option<Vec<u64>>;
}

/// A change for the plane (what the cluster watchers deliver).
#[derive(Debug, Clone)]
pub enum PlaneUpdate {
    /// A cluster's ID and pod CIDRs (sent when a session opens).
    ClusterInfo {
        /// Cluster.
        cluster: String,
        /// Cluster ID.
        id: u32,
        /// Pod CIDRs.
        pod_cidrs: Vec<String>,
    },
    /// Everything of a synced cluster; `None`: keep the previous record of that key.
    Replace {
        /// Cluster.
        cluster: String,
        /// Its records.
        inputs: BTreeMap<InputKey, Option<Input>>,
    },
    /// One record created or changed.
    Upsert {
        /// Cluster.
        cluster: String,
        /// The record.
        input: Input,
    },
    /// One record removed.
    Remove {
        /// Cluster.
        cluster: String,
        /// Which.
        key: InputKey,
    },
    /// Forget a cluster.
    DropCluster {
        /// Cluster.
        cluster: String,
    },
}

#[derive(Debug, Default)]
struct ClusterRecords {
    id: u32,
    identities: BTreeMap<SecurityIdentity, Labels>,
    endpoints: BTreeMap<IpAddr, EndpointRecord>,
    policies: BTreeMap<PolicyKey, PolicyRecord>,
}

/// A policy's state: the record as received and the last version that was valid.
#[derive(Debug, Clone)]
pub struct PolicyStatus {
    /// The last valid version in force (`None`: never valid).
    pub in_force: Option<NetworkPolicy>,
    /// Why the latest version was refused (`None`: it is the one in force).
    pub error: Option<String>,
}

/// What one flush did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// IP cache prefixes written or deleted.
    pub ipcache_changes: usize,
    /// Endpoints whose rules were installed.
    pub installed: usize,
    /// Endpoints whose rules were removed.
    pub removed: usize,
    /// Endpoints waiting for their cgroup.
    pub unresolved: usize,
    /// Datapath operations that failed (retried on the next flush).
    pub failures: Vec<String>,
}

/// Counters of refused input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlaneCounters {
    /// Policies refused (invalid spec, or not from the local cluster).
    pub policies_refused: u64,
    /// Identity and endpoint records refused (outside the cluster's range, ...).
    pub records_refused: u64,
}

/// The policy plane.
pub struct PolicyPlane {
    config: PlaneConfig,
    ipcache: IpCache,
    engine: PolicyEngine,
    clusters: BTreeMap<String, ClusterRecords>,
    policy_status: BTreeMap<PolicyKey, PolicyStatus>,
    local: BTreeMap<EndpointId, EndpointRecord>,
    cidrs: CidrIdentities,
    resolver: Box<dyn CgroupResolver>,
    dirty: BTreeSet<EndpointId>,
    /// IP cache prefixes touched since the last flush, besides those the [`IpCache`]
    /// records itself (the CIDR identities of policy address blocks).
    ipcache_dirty: BTreeSet<Cidr>,
    /// Prefixes of a failed IP cache write: what the datapath holds for them is unknown,
    /// so the next flush writes them whatever `applied_ipcache` says.
    ipcache_unknown: BTreeSet<Cidr>,
    /// A failed IP cache reconcile left the map in an unknown state: reconcile it in full.
    ipcache_resync: bool,
    installed: BTreeMap<EndpointId, (PolicyOwner, EndpointRules)>,
    applied_ipcache: BTreeMap<Cidr, IpCacheValue>,
    reconciled: bool,
    counters: PlaneCounters,
}

impl std::fmt::Debug for PolicyPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyPlane")
            .field("config", &self.config)
            .field("clusters", &self.clusters.len())
            .field("local", &self.local.len())
            .finish_non_exhaustive()
    }
}

/// Parses a policy record's spec for cluster `local`.
///
/// # Errors
/// A message naming the policy and the problem.
pub fn parse_policy(
    record: &PolicyRecord,
    local: &str,
    peers: PeerClusters,
) -> Result<NetworkPolicy, String> {
    let (ns, name) = (&record.key.namespace, &record.key.name);
    let what = format!("{} {ns}/{name}", record.source);
    match record.source {
        PolicySource::NetworkPolicy => {
            let spec: WireNetworkPolicySpec = serde_json::from_str(&record.spec_json)
                .map_err(|e| format!("{what}: spec is not a valid NetworkPolicy spec: {e}"))?;
            NetworkPolicy::from_wire(ns, name, &spec, local, peers).map_err(|e| e.to_string())
        }
        PolicySource::CiliumNetworkPolicy => {
            let spec: WireCiliumPolicySpec = serde_json::from_str(&record.spec_json).map_err(
                |e| format!("{what}: spec is not a supported CiliumNetworkPolicy spec (L3/L4 subset): {e}"),
            )?;
            NetworkPolicy::from_cilium(ns, name, &spec, local, peers).map_err(|e| e.to_string())
        }
    }
}

impl PolicyPlane {
    /// An empty plane.
    #[must_use]
    pub fn new(config: PlaneConfig, resolver: Box<dyn CgroupResolver>) -> Self {
        let mut ipcache = IpCache::new(config.mode);
        ipcache.set_host_addresses(config.host_addresses.iter().copied());
        Self {
            config,
            ipcache,
            engine: PolicyEngine::new(),
            clusters: BTreeMap::new(),
            policy_status: BTreeMap::new(),
            local: BTreeMap::new(),
            cidrs: CidrIdentities::default(),
            resolver,
            dirty: BTreeSet::new(),
            ipcache_dirty: BTreeSet::new(),
            ipcache_unknown: BTreeSet::new(),
            ipcache_resync: false,
            installed: BTreeMap::new(),
            applied_ipcache: BTreeMap::new(),
            reconciled: false,
            counters: PlaneCounters::default(),
        }
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &PlaneConfig {
        &self.config
    }

    /// Refusal counters.
    #[must_use]
    pub fn counters(&self) -> PlaneCounters {
        self.counters
    }

    /// The IP cache.
    #[must_use]
    pub fn ipcache(&self) -> &IpCache {
        &self.ipcache
    }

    /// Identities per cluster.
    pub fn identities(&self) -> impl Iterator<Item = (&str, SecurityIdentity, &Labels)> {
        self.clusters.iter().flat_map(|(name, c)| {
            c.identities
                .iter()
                .map(move |(id, labels)| (name.as_str(), *id, labels))
        })
    }

    /// Endpoints per cluster.
    pub fn endpoints(&self) -> impl Iterator<Item = (&str, &EndpointRecord)> {
        self.clusters
            .iter()
            .flat_map(|(name, c)| c.endpoints.values().map(move |e| (name.as_str(), e)))
    }

    /// The cluster that exported identity `id`, if known.
    #[must_use]
    pub fn cluster_of(&self, id: SecurityIdentity) -> Option<&str> {
        self.clusters
            .iter()
            .find(|(_, c)| c.identities.contains_key(&id))
            .map(|(name, _)| name.as_str())
    }

    /// The labels of identity `id`, if known.
    #[must_use]
    pub fn labels_of(&self, id: SecurityIdentity) -> Option<&Labels> {
        self.clusters.values().find_map(|c| c.identities.get(&id))
    }

    /// The local endpoints with their records.
    #[must_use]
    pub fn local_endpoints(&self) -> &BTreeMap<EndpointId, EndpointRecord> {
        &self.local
    }

    /// The computed policy of a local endpoint.
    #[must_use]
    pub fn policy_of(&self, id: &EndpointId) -> Option<&EndpointPolicy> {
        self.engine.policy_of(id)
    }

    /// The owner (cgroups) installed for a local endpoint.
    #[must_use]
    pub fn owner_of(&self, id: &EndpointId) -> Option<&PolicyOwner> {
        self.installed.get(id).map(|(o, _)| o)
    }

    /// Every policy of the local cluster with its state.
    #[must_use]
    pub fn policies(&self) -> &BTreeMap<PolicyKey, PolicyStatus> {
        &self.policy_status
    }

    /// Names of the policies in force that select local endpoint `id` as a subject.
    #[must_use]
    pub fn policies_selecting(&self, id: &EndpointId) -> Vec<(PolicyKey, bool, bool)> {
        let Some(record) = self.local.get(id) else {
            return Vec::new();
        };
        let Some(labels) = self.labels_of(record.identity) else {
            return Vec::new();
        };
        self.policy_status
            .iter()
            .filter_map(|(k, s)| {
                let p = s.in_force.as_ref()?;
                (p.namespace == id.namespace && p.subjects.matches(labels))
                    .then(|| (k.clone(), p.ingress.is_some(), p.egress.is_some()))
            })
            .collect()
    }

    /// Applies one update.
    pub fn apply(&mut self, update: PlaneUpdate) {
        match update {
            PlaneUpdate::ClusterInfo {
                cluster,
                id,
                pod_cidrs,
            } => {
                let cidrs = pod_cidrs
                    .iter()
                    .filter_map(|c| match Cidr::parse(c) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::warn!(%cluster, cidr = %c, error = %e, "cluster reports an invalid pod CIDR; ignored");
                            None
                        }
                    })
                    .collect();
                self.ipcache.add_cluster(&cluster, id, cidrs);
                self.clusters.entry(cluster).or_default().id = id;
            }
            PlaneUpdate::Replace { cluster, inputs } => {
                let existing: Vec<InputKey> = self.keys_of(&cluster);
                for key in existing {
                    if !inputs.contains_key(&key) {
                        self.remove(&cluster, &key);
                    }
                }
                // Identities before endpoints before policies (the order of `InputKey`),
                // so local endpoints find their labels.
                for input in inputs.into_values().flatten() {
                    self.upsert(&cluster, input);
                }
                self.ipcache.mark_synced(&cluster);
            }
            PlaneUpdate::Upsert { cluster, input } => self.upsert(&cluster, input),
            PlaneUpdate::Remove { cluster, key } => self.remove(&cluster, &key),
            PlaneUpdate::DropCluster { cluster } => {
                for key in self.keys_of(&cluster) {
                    self.remove(&cluster, &key);
                }
                self.ipcache.remove_cluster(&cluster);
                self.clusters.remove(&cluster);
            }
        }
    }

    fn keys_of(&self, cluster: &str) -> Vec<InputKey> {
        let Some(c) = self.clusters.get(cluster) else {
            return Vec::new();
        };
        c.identities
            .keys()
            .map(|id| InputKey::Identity(*id))
            .chain(c.endpoints.keys().map(|ip| InputKey::Endpoint(*ip)))
            .chain(c.policies.keys().map(|k| InputKey::Policy(k.clone())))
            .collect()
    }

    fn upsert(&mut self, cluster: &str, input: Input) {
        match input {
            Input::Identity(rec) => {
                let id = self.clusters.get(cluster).map_or(0, |c| c.id);
                let (owner, local) = rec.id.split(self.config.mode);
                if owner != id || local < MIN_LOCAL_IDENTITY {
                    tracing::warn!(%cluster, cluster_id = id, identity = rec.id.get(), owner, "cluster exported an identity outside its range; refused (check that cluster's identity allocation and cluster ID)");
                    self.counters.records_refused += 1;
                    return;
                }
                let c = self.clusters.entry(cluster.to_owned()).or_default();
                if c.identities.get(&rec.id) == Some(&rec.labels) {
                    return;
                }
                c.identities.insert(rec.id, rec.labels.clone());
                let changed = self.engine.upsert_identity(rec.id, rec.labels);
                self.dirty.extend(changed);
                self.sync_local_with(rec.id);
            }
            Input::Endpoint(rec) => {
                if let Err(e) = self.ipcache.upsert(cluster, rec.ip, rec.identity) {
                    tracing::warn!(error = %e, "endpoint record refused; the address keeps its previous entry");
                    self.counters.records_refused += 1;
                    return;
                }
                let c = self.clusters.entry(cluster.to_owned()).or_default();
                let old = c.endpoints.insert(rec.ip, rec.clone());
                if let Some(old) = old {
                    self.forget_local(cluster, &old);
                }
                if cluster == self.config.local_cluster && rec.node == self.config.node {
                    let id = EndpointId {
                        namespace: rec.namespace.clone(),
                        pod: rec.pod.clone(),
                    };
                    self.local.insert(id.clone(), rec);
                    self.sync_local(&id);
                }
            }
            Input::Policy(rec) => {
                if cluster != self.config.local_cluster {
                    tracing::warn!(%cluster, policy = %format!("{}/{}", rec.key.namespace, rec.key.name), "a remote cluster sent a policy; only the local cluster's policies apply — refused");
                    self.counters.policies_refused += 1;
                    return;
                }
                let key = rec.key.clone();
                let parsed =
                    parse_policy(&rec, &self.config.local_cluster, self.config.peer_clusters);
                self.clusters
                    .entry(cluster.to_owned())
                    .or_default()
                    .policies
                    .insert(key.clone(), rec);
                match parsed {
                    Ok(policy) => {
                        let status =
                            self.policy_status
                                .entry(key.clone())
                                .or_insert(PolicyStatus {
                                    in_force: None,
                                    error: None,
                                });
                        status.error = None;
                        if status.in_force.as_ref() == Some(&policy) {
                            return;
                        }
                        let blocks = has_ip_blocks(&policy)
                            || status.in_force.as_ref().is_some_and(has_ip_blocks);
                        status.in_force = Some(policy.clone());
                        let changed = self.engine.upsert_policy(key, policy);
                        self.dirty.extend(changed);
                        if blocks {
                            self.sync_cidrs();
                        }
                    }
                    Err(error) => {
                        let kept = self
                            .policy_status
                            .get(&key)
                            .is_some_and(|s| s.in_force.is_some());
                        tracing::warn!(%error, kept_previous = kept, "policy refused; other policies still apply");
                        self.counters.policies_refused += 1;
                        self.policy_status
                            .entry(key)
                            .or_insert(PolicyStatus {
                                in_force: None,
                                error: None,
                            })
                            .error = Some(error);
                    }
                }
            }
        }
    }

    fn remove(&mut self, cluster: &str, key: &InputKey) {
        match key {
            InputKey::Identity(id) => {
                let Some(c) = self.clusters.get_mut(cluster) else {
                    return;
                };
                if c.identities.remove(id).is_none() {
                    return;
                }
                let changed = self.engine.remove_identity(*id);
                self.dirty.extend(changed);
                self.sync_local_with(*id);
            }
            InputKey::Endpoint(ip) => {
                let Some(old) = self
                    .clusters
                    .get_mut(cluster)
                    .and_then(|c| c.endpoints.remove(ip))
                else {
                    return;
                };
                self.ipcache.remove(cluster, *ip);
                self.forget_local(cluster, &old);
            }
            InputKey::Policy(key) => {
                if let Some(c) = self.clusters.get_mut(cluster) {
                    c.policies.remove(key);
                }
                if let Some(status) = self.policy_status.remove(key) {
                    let changed = self.engine.remove_policy(key);
                    self.dirty.extend(changed);
                    if status.in_force.as_ref().is_some_and(has_ip_blocks) {
                        self.sync_cidrs();
                    }
                }
            }
        }
    }

    /// Forgets local endpoint `old` (of `cluster`) if it was one.
    fn forget_local(&mut self, cluster: &str, old: &EndpointRecord) {
        if cluster != self.config.local_cluster {
            return;
        }
        let id = EndpointId {
            namespace: old.namespace.clone(),
            pod: old.pod.clone(),
        };
        if self.local.get(&id).is_some_and(|e| e.ip == old.ip) {
            self.local.remove(&id);
            let changed = self.engine.remove_endpoint(&id);
            self.dirty.extend(changed);
            self.dirty.insert(id);
        }
    }

    /// Re-hands every local endpoint with identity `id` to the engine (they carry its
    /// labels, which just changed or went).
    fn sync_local_with(&mut self, id: SecurityIdentity) {
        let with: Vec<EndpointId> = self
            .local
            .iter()
            .filter(|(_, e)| e.identity == id)
            .map(|(k, _)| k.clone())
            .collect();
        for ep in with {
            self.sync_local(&ep);
        }
    }

    /// Hands local endpoint `id` to the engine (once its identity's labels are known).
    fn sync_local(&mut self, id: &EndpointId) {
        let Some(rec) = self.local.get(id) else {
            return;
        };
        let labels = self
            .clusters
            .get(&self.config.local_cluster)
            .and_then(|c| c.identities.get(&rec.identity))
            .cloned();
        let changed = match labels {
            Some(labels) => self.engine.upsert_endpoint(
                id.clone(),
                LocalEndpoint {
                    identity: rec.identity,
                    labels,
                    named_ports: rec.named_ports.clone(),
                },
            ),
            // Without its labels no policy can select it yet.
            None => self.engine.remove_endpoint(id),
        };
        self.dirty.extend(changed);
        self.dirty.insert(id.clone());
    }

    /// Keeps the CIDR identities in step with the address blocks of the policies in
    /// force; a change re-lowers every endpoint.
    fn sync_cidrs(&mut self) {
        let blocks: Vec<(Cidr, Vec<Cidr>)> = self
            .policy_status
            .values()
            .filter_map(|s| s.in_force.as_ref())
            .flat_map(|p| p.ingress.iter().chain(p.egress.iter()).flatten())
            .flat_map(|r| r.peers.iter().flatten())
            .filter_map(|peer| match peer {
                Peer::IpBlock { cidr, except } => Some((*cidr, except.clone())),
                Peer::Endpoints(_) => None,
            })
            .collect();
        let before = self.cidrs.prefixes().clone();
        if self
            .cidrs
            .sync(blocks.iter().map(|(c, e)| (c, e.as_slice())))
        {
            let after = self.cidrs.prefixes();
            self.ipcache_dirty.extend(
                before
                    .iter()
                    .chain(after.iter())
                    .filter(|(c, _)| before.get(c) != after.get(c))
                    .map(|(c, _)| *c),
            );
            self.dirty.extend(self.local.keys().cloned());
        }
    }

    /// What the datapath's IP cache should hold for `prefix` (its entry in
    /// [`PolicyPlane::desired_ipcache`], computed alone).
    fn desired_entry(&self, prefix: &Cidr) -> Option<IpCacheValue> {
        self.ipcache.datapath_entry(prefix).or_else(|| {
            self.cidrs.prefixes().get(prefix).map(|id| IpCacheValue {
                identity: *id,
                cluster_id: 0,
                syncing: false,
            })
        })
    }

    /// The IP cache the datapath should hold.
    #[must_use]
    pub fn desired_ipcache(&self) -> BTreeMap<Cidr, IpCacheValue> {
        let mut out: BTreeMap<Cidr, IpCacheValue> = self
            .cidrs
            .prefixes()
            .iter()
            .map(|(c, id)| {
                (
                    *c,
                    IpCacheValue {
                        identity: *id,
                        cluster_id: 0,
                        syncing: false,
                    },
                )
            })
            .collect();
        out.extend(self.ipcache.datapath_entries());
        out
    }

    /// Writes what changed to `dp`. The first call reconciles everything (adopting and
    /// pruning what a previous agent left pinned).
    pub fn flush(&mut self, dp: &mut dyn PolicyDatapath) -> FlushReport {
        let mut report = FlushReport::default();
        let full = !self.reconciled;
        self.flush_ipcache(dp, full, &mut report);
        let candidates: BTreeSet<EndpointId> = if full {
            self.local
                .keys()
                .chain(self.installed.keys())
                .cloned()
                .collect()
        } else {
            std::mem::take(&mut self.dirty)
        };
        let mut retry = BTreeSet::new();
        for id in candidates {
            self.flush_endpoint(dp, &id, &mut report, &mut retry);
        }
        if full {
            self.dirty.clear();
            let live: Vec<PolicyOwner> = self.installed.values().map(|(o, _)| o.clone()).collect();
            match dp.reconcile_owners(&live) {
                Ok(()) => self.reconciled = true,
                Err(e) => report.failures.push(e.to_string()),
            }
        }
        report.unresolved = retry
            .iter()
            .filter(|id| !self.installed.contains_key(*id))
            .count();
        self.dirty.extend(retry);
        report
    }

    /// Writes the IP cache: in full (a reconcile) on the first flush and after a failed
    /// reconcile, else only the touched prefixes whose entry differs from what was written.
    fn flush_ipcache(&mut self, dp: &mut dyn PolicyDatapath, full: bool, report: &mut FlushReport) {
        let mut touched = self.ipcache.take_changed();
        touched.append(&mut self.ipcache_dirty);
        if full || self.ipcache_resync {
            let desired = self.desired_ipcache();
            let entries: Vec<(Cidr, IpCacheValue)> =
                desired.iter().map(|(c, v)| (*c, *v)).collect();
            report.ipcache_changes = entries.len();
            match dp.reconcile_ipcache(&entries) {
                Ok(()) => {
                    self.applied_ipcache = desired;
                    self.ipcache_unknown.clear();
                    self.ipcache_resync = false;
                }
                Err(e) => {
                    // What was applied is unknown: the next flush reconciles the cache.
                    report.failures.push(e.to_string());
                    self.ipcache_resync = true;
                }
            }
            return;
        }
        touched.extend(self.ipcache_unknown.iter().copied());
        // Deletes first, then writes (the order of a reconcile).
        let (mut changes, writes): (Vec<_>, Vec<_>) = touched
            .iter()
            .filter_map(|c| {
                let want = self.desired_entry(c);
                (self.ipcache_unknown.contains(c) || self.applied_ipcache.get(c) != want.as_ref())
                    .then_some((*c, want))
            })
            .partition(|(_, want)| want.is_none());
        changes.extend(writes);
        if changes.is_empty() {
            return;
        }
        report.ipcache_changes = changes.len();
        match dp.apply_ipcache(&changes) {
            Ok(()) => {
                for (c, want) in changes {
                    self.ipcache_unknown.remove(&c);
                    match want {
                        Some(v) => self.applied_ipcache.insert(c, v),
                        None => self.applied_ipcache.remove(&c),
                    };
                }
            }
            Err(e) => {
                // Some of the changes may be written: the next flush writes them all again.
                report.failures.push(e.to_string());
                self.ipcache_unknown
                    .extend(changes.into_iter().map(|(c, _)| c));
            }
        }
    }

    fn flush_endpoint(
        &mut self,
        dp: &mut dyn PolicyDatapath,
        id: &EndpointId,
        report: &mut FlushReport,
        retry: &mut BTreeSet<EndpointId>,
    ) {
        let Some(rec) = self.local.get(id) else {
            if let Some((owner, _)) = self.installed.remove(id) {
                match dp.remove(&owner) {
                    Ok(()) => report.removed += 1,
                    Err(e) => {
                        report.failures.push(e.to_string());
                        self.installed
                            .insert(id.clone(), (owner, EndpointRules::default()));
                        retry.insert(id.clone());
                    }
                }
            }
            return;
        };
        let policy = self.engine.policy_of(id).cloned().unwrap_or_default();
        let rules = lower(&policy, &self.cidrs, &[HOST.get()]);
        let cgroups = if rec.pod_uid.is_empty() {
            None
        } else {
            self.resolver.resolve(&rec.pod_uid)
        };
        let Some(cgroups) = cgroups.filter(|c| !c.is_empty()) else {
            if rules != EndpointRules::default() {
                tracing::debug!(endpoint = %format!("{}/{}", id.namespace, id.pod), uid = %rec.pod_uid, "pod cgroup not found yet; its policy waits");
                retry.insert(id.clone());
            }
            return;
        };
        let owner = PolicyOwner {
            owner: cgroups[0],
            cgroups,
            identity: rec.identity.get(),
        };
        if let Some((old_owner, old_rules)) = self.installed.get(id) {
            if *old_owner == owner && *old_rules == rules {
                return;
            }
            if old_owner.owner != owner.owner {
                let old = old_owner.clone();
                if let Err(e) = dp.remove(&old) {
                    report.failures.push(e.to_string());
                }
            }
        } else if rules == EndpointRules::default() {
            // Not isolated and nothing installed: nothing to enforce.
            return;
        }
        match dp.install(&owner, &rules) {
            Ok(()) => {
                report.installed += 1;
                self.installed.insert(id.clone(), (owner, rules));
            }
            Err(e) => {
                report.failures.push(e.to_string());
                retry.insert(id.clone());
            }
        }
    }
}

/// Whether `policy` names an address block (which needs CIDR identities).
fn has_ip_blocks(policy: &NetworkPolicy) -> bool {
    policy
        .ingress
        .iter()
        .chain(policy.egress.iter())
        .flatten()
        .flat_map(|r| r.peers.iter().flatten())
        .any(|p| matches!(p, Peer::IpBlock { .. }))
}
