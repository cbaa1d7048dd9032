//! The agent's desired state: every cluster's service records in, changed load-balancer
//! entries out.
//!
//! Record updates only mark the affected `namespace/name` dirty. [`DesiredState::compute`]
//! re-merges the dirty names, rebuilds a Maglev table only when a service's backend list
//! (addresses, weights, states) actually changed, runs those builds in parallel on plain
//! threads, and remembers which services the datapath has not yet accepted.
//! [`DesiredState::reconcile`] hands the complete state to a [`Datapath`] once, at start;
//! [`DesiredState::flush`] then hands it exactly the pending services. A service the
//! datapath refuses stays pending and goes out with the next flush, the services it
//! accepted are done. A cluster that resyncs with the same records therefore causes no
//! datapath change at all.
//!
//! `compute` is CPU work: async callers run it on a blocking thread
//! (`tokio::task::spawn_blocking`), never on the runtime's worker threads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use clustermesh_api::model::{ServiceName, ServicePortId, ServiceRecord};

use crate::datapath::{ApplyError, ApplyReport, Backend, Datapath, DesiredChanges, DesiredService};
use crate::maglev::Maglev;
use crate::merge::{merge_service, Locality, MergedService};

/// Below this many table builds in one compute, building on the calling thread is faster
/// than spawning threads.
const PARALLEL_THRESHOLD: usize = 4;

/// Counters of what [`DesiredState::compute`] did (for metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ComputeStats {
    /// Service names re-merged.
    pub merged: usize,
    /// Maglev tables built.
    pub tables_built: usize,
    /// Table builds that failed (the previous state of those services is kept).
    pub build_errors: usize,
    /// Service ports whose desired state changed (upserted or removed).
    pub changed: usize,
}

/// Merged desired state of all services.
#[derive(Debug)]
pub struct DesiredState {
    here: Locality,
    maglev: Maglev,
    records: BTreeMap<ServiceName, BTreeMap<String, Arc<ServiceRecord>>>,
    services: BTreeMap<ServicePortId, DesiredService>,
    /// Service ports of each name currently in `services` (to find removed ports).
    ports_of: BTreeMap<ServiceName, BTreeSet<ServicePortId>>,
    dirty: BTreeSet<ServiceName>,
    unsynced: BTreeSet<ServicePortId>,
}

impl DesiredState {
    /// Empty state for an agent at `here`, building tables with `maglev`.
    #[must_use]
    pub fn new(here: Locality, maglev: Maglev) -> Self {
        Self {
            here,
            maglev,
            records: BTreeMap::new(),
            services: BTreeMap::new(),
            ports_of: BTreeMap::new(),
            dirty: BTreeSet::new(),
            unsynced: BTreeSet::new(),
        }
    }

    /// Where this agent runs.
    #[must_use]
    pub fn locality(&self) -> &Locality {
        &self.here
    }

    /// Adds or replaces one cluster's record of a service.
    pub fn upsert(&mut self, record: ServiceRecord) {
        let per_cluster = self.records.entry(record.name.clone()).or_default();
        if per_cluster.get(&record.cluster).map(|r| r.as_ref()) == Some(&record) {
            return;
        }
        self.dirty.insert(record.name.clone());
        per_cluster.insert(record.cluster.clone(), Arc::new(record));
    }

    /// Removes one cluster's record of a service.
    pub fn remove(&mut self, cluster: &str, name: &ServiceName) {
        if let Some(per_cluster) = self.records.get_mut(name) {
            if per_cluster.remove(cluster).is_some() {
                self.dirty.insert(name.clone());
            }
            if per_cluster.is_empty() {
                self.records.remove(name);
            }
        }
    }

    /// Replaces everything known about `cluster` with `records` (after a full resync).
    /// Only services whose record actually changed are marked dirty.
    pub fn replace_cluster(&mut self, cluster: &str, records: Vec<ServiceRecord>) {
        let services = records
            .into_iter()
            .map(|r| (r.name.clone(), Some(r)))
            .collect();
        self.replace_cluster_keeping(cluster, services);
    }

    /// Like [`Self::replace_cluster`], with the services keyed by name: a `None` value (a
    /// service whose new value did not decode) keeps the cluster's previous record of that
    /// service, if it had one.
    pub fn replace_cluster_keeping(
        &mut self,
        cluster: &str,
        services: BTreeMap<ServiceName, Option<ServiceRecord>>,
    ) {
        let gone: Vec<ServiceName> = self
            .records
            .iter()
            .filter(|(name, per)| per.contains_key(cluster) && !services.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.remove(cluster, &name);
        }
        for r in services.into_values().flatten() {
            if r.cluster == cluster {
                self.upsert(r);
            }
        }
    }

    /// Forgets every record of `cluster` (cluster removed from the configuration, or its
    /// stale TTL expired).
    pub fn remove_cluster(&mut self, cluster: &str) {
        self.replace_cluster(cluster, Vec::new());
    }

    /// Clusters that have records here, with their record counts.
    #[must_use]
    pub fn clusters(&self) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for per in self.records.values() {
            for c in per.keys() {
                *out.entry(c.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Current desired state of every service port.
    #[must_use]
    pub fn services(&self) -> &BTreeMap<ServicePortId, DesiredService> {
        &self.services
    }

    /// Re-merges dirty services and rebuilds the tables that need it. Returns what it did.
    pub fn compute(&mut self) -> ComputeStats {
        let mut stats = ComputeStats::default();
        let dirty = std::mem::take(&mut self.dirty);
        let mut jobs: Vec<MergedService> = Vec::new();
        let mut unchanged_tables: Vec<(MergedService, Arc<[u32]>)> = Vec::new();
        for name in &dirty {
            stats.merged += 1;
            let merged = match self.records.get(name) {
                Some(per) => merge_service(&self.here, per.values().map(AsRef::as_ref)),
                None => Vec::new(),
            };
            let new_ids: BTreeSet<ServicePortId> = merged.iter().map(|m| m.id.clone()).collect();
            for old in self.ports_of.remove(name).unwrap_or_default() {
                if !new_ids.contains(&old) && self.services.remove(&old).is_some() {
                    self.unsynced.insert(old);
                    stats.changed += 1;
                }
            }
            if !new_ids.is_empty() {
                self.ports_of.insert(name.clone(), new_ids);
            }
            for m in merged {
                match self.services.get_mut(&m.id) {
                    Some(cur) if same_backends(&cur.backends, &m.backends) => {
                        if cur.frontends != m.frontends || cur.active_tier != m.active_tier {
                            let table = Arc::clone(&cur.table);
                            unchanged_tables.push((m, table));
                        } else if cur.affinity != m.affinity {
                            // Same backends and frontends: nothing for the datapath.
                            cur.affinity = m.affinity;
                        }
                    }
                    _ => jobs.push(m),
                }
            }
        }
        for (m, table) in unchanged_tables {
            self.store(m, table);
            stats.changed += 1;
        }
        let built = build_tables(&self.maglev, &jobs);
        for (m, result) in jobs.into_iter().zip(built) {
            match result {
                Ok(table) => {
                    stats.tables_built += 1;
                    stats.changed += 1;
                    self.store(m, table);
                }
                Err(e) => {
                    stats.build_errors += 1;
                    tracing::error!(service = %m.id.name, namespace = %m.id.namespace, port = %m.id.port_name, error = %e, "maglev table build failed; keeping the previous state of this service");
                }
            }
        }
        stats
    }

    fn store(&mut self, m: MergedService, table: Arc<[u32]>) {
        let state = DesiredService {
            id: m.id.clone(),
            frontends: m.frontends,
            backends: m.backends,
            table,
            active_tier: m.active_tier,
            affinity: m.affinity,
            global: m.global,
            shared: m.shared,
        };
        self.unsynced.insert(m.id.clone());
        self.services.insert(m.id, state);
    }

    /// True when some change has not been accepted by the datapath yet.
    #[must_use]
    pub fn has_pending(&self) -> bool {
        !self.unsynced.is_empty()
    }

    /// The changes the datapath has not accepted yet.
    #[must_use]
    pub fn pending(&self) -> DesiredChanges {
        let mut changes = DesiredChanges::default();
        for id in &self.unsynced {
            match self.services.get(id) {
                Some(s) => changes.upserts.push(s.clone()),
                None => changes.removals.push(id.clone()),
            }
        }
        changes
    }

    /// Hands pending changes to `datapath`. Services it applied are done; services it
    /// reports as failed stay pending for the next flush. Returns the number of services
    /// sent.
    ///
    /// # Errors
    /// When some services failed (named in the error, with the number applied).
    pub fn flush(&mut self, datapath: &dyn Datapath) -> Result<usize, ApplyError> {
        if self.unsynced.is_empty() {
            return Ok(0);
        }
        let changes = self.pending();
        let sent = self.unsynced.len();
        let report = datapath.apply(&changes);
        self.unsynced.retain(|id| report.failed.contains_key(id));
        report.into_result().map(|_| sent)
    }

    /// Hands the complete desired state to `datapath` ([`Datapath::reconcile`]): what it
    /// programmed before and is not desired any more is removed. Called once, when the
    /// first full view is ready; afterwards only services that failed stay pending (a
    /// failed removal as a pending removal). Returns the number of services sent.
    ///
    /// # Errors
    /// When some services failed (named in the error, with the number applied).
    pub fn reconcile(&mut self, datapath: &dyn Datapath) -> Result<usize, ApplyError> {
        // The services are moved into one slice and back rather than cloned: at 10k
        // services a copy of the whole state is tens of MiB the allocator keeps afterwards.
        let desired: Vec<DesiredService> =
            std::mem::take(&mut self.services).into_values().collect();
        let report: ApplyReport = datapath.reconcile(&desired);
        let sent = desired.len();
        self.services = desired.into_iter().map(|s| (s.id.clone(), s)).collect();
        self.unsynced = report.failed.keys().cloned().collect();
        report.into_result().map(|_| sent)
    }
}

/// Same backends in the same order with the same weights and states: the old table is
/// still correct (it indexes this list).
fn same_backends(a: &[Backend], b: &[Backend]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.ip == y.ip
                && x.port == y.port
                && x.cluster == y.cluster
                && x.weight == y.weight
                && x.state == y.state
                && x.tier == y.tier
                && x.node == y.node
                && x.zone == y.zone
                && x.protocol == y.protocol
        })
}

/// Builds the tables of `jobs`, in parallel chunks on scoped threads when there are many.
fn build_tables(
    maglev: &Maglev,
    jobs: &[MergedService],
) -> Vec<Result<Arc<[u32]>, crate::maglev::MaglevError>> {
    let build = |m: &MergedService| maglev.build(&m.backends).map(Arc::from);
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if jobs.len() < PARALLEL_THRESHOLD || threads < 2 {
        return jobs.iter().map(build).collect();
    }
    let chunk = jobs.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(build).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .zip(jobs.chunks(chunk))
            .flat_map(|(h, part)| {
                // A panicking build thread would be a bug in the builder; rebuild that
                // chunk here so the result is still complete.
                h.join()
                    .unwrap_or_else(|_| part.iter().map(build).collect::<Vec<_>>())
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::RecordingDatapath;
    use clustermesh_api::model::{Affinity, BackendRecord, BackendState, PortSpec, Protocol};

    fn here() -> Locality {
        Locality {
            cluster: "east".into(),
            node: "n1".into(),
            zone: "z1".into(),
        }
    }

    fn name(n: &str) -> ServiceName {
        ServiceName {
            namespace: "default".into(),
            name: n.into(),
        }
    }

    fn rec(cluster: &str, svc: &str, ips: &[(&str, bool)], affinity: Affinity) -> ServiceRecord {
        let http = PortSpec {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        ServiceRecord {
            cluster: cluster.into(),
            name: name(svc),
            frontends: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![http.clone()],
            backends: ips
                .iter()
                .map(|&(ip, ready)| BackendRecord {
                    ip: ip.parse().unwrap(),
                    ports: vec![PortSpec {
                        port: 8080,
                        ..http.clone()
                    }],
                    ready,
                    terminating: false,
                    node: "n2".into(),
                    zone: "z2".into(),
                    weight: 1,
                })
                .collect(),
            global: true,
            shared: true,
            affinity,
            topology_aware: false,
        }
    }

    fn id(n: &str) -> ServicePortId {
        ServicePortId {
            namespace: "default".into(),
            name: n.into(),
            port_name: "http".into(),
        }
    }

    fn active_clusters(dp: &RecordingDatapath, n: &str) -> Vec<String> {
        let svc = dp.service(&id(n)).unwrap();
        let mut used: Vec<String> = svc
            .table
            .iter()
            .map(|&i| svc.backends[i as usize].cluster.clone())
            .collect();
        used.sort();
        used.dedup();
        used
    }

    #[test]
    fn failover_to_remote_and_back() {
        let mut st = DesiredState::new(here(), Maglev::default());
        let dp = RecordingDatapath::new();
        st.upsert(rec("east", "web", &[("10.0.0.1", true)], Affinity::Local));
        st.upsert(rec("west", "web", &[("10.1.0.1", true)], Affinity::None));
        st.compute();
        st.flush(&dp).unwrap();
        assert_eq!(active_clusters(&dp, "web"), ["east"]);

        st.upsert(rec("east", "web", &[("10.0.0.1", false)], Affinity::Local));
        st.compute();
        st.flush(&dp).unwrap();
        assert_eq!(active_clusters(&dp, "web"), ["west"]);

        st.upsert(rec("east", "web", &[("10.0.0.1", true)], Affinity::Local));
        st.compute();
        st.flush(&dp).unwrap();
        assert_eq!(active_clusters(&dp, "web"), ["east"]);
        assert_eq!(dp.batch_count(), 3);
    }

    #[test]
    fn unchanged_services_are_neither_rebuilt_nor_resent() {
        let mut st = DesiredState::new(here(), Maglev::default());
        let dp = RecordingDatapath::new();
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.upsert(rec("east", "b", &[("10.0.0.2", true)], Affinity::None));
        st.upsert(rec("west", "a", &[("10.1.0.1", true)], Affinity::None));
        assert_eq!(st.compute().tables_built, 2);
        st.flush(&dp).unwrap();

        // West resyncs with the same records: nothing to do.
        st.replace_cluster(
            "west",
            vec![rec("west", "a", &[("10.1.0.1", true)], Affinity::None)],
        );
        assert_eq!(st.compute(), ComputeStats::default());
        assert_eq!(st.flush(&dp).unwrap(), 0);
        assert_eq!(dp.batch_count(), 1);

        // West changes `a` only: only `a` is rebuilt and sent.
        st.replace_cluster(
            "west",
            vec![rec(
                "west",
                "a",
                &[("10.1.0.1", true), ("10.1.0.2", true)],
                Affinity::None,
            )],
        );
        let stats = st.compute();
        assert_eq!((stats.merged, stats.tables_built), (1, 1));
        st.flush(&dp).unwrap();
        let last = dp.batches().pop().unwrap();
        assert_eq!(last.upserts.len(), 1);
        assert_eq!(last.upserts[0].id, id("a"));
    }

    #[test]
    fn frontend_change_reuses_the_table() {
        let mut st = DesiredState::new(here(), Maglev::default());
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.compute();
        let before = Arc::clone(&st.services()[&id("a")].table);
        let mut r = rec("east", "a", &[("10.0.0.1", true)], Affinity::None);
        r.frontends.push("10.96.0.11".parse().unwrap());
        st.upsert(r);
        let stats = st.compute();
        assert_eq!((stats.tables_built, stats.changed), (0, 1));
        assert!(Arc::ptr_eq(&before, &st.services()[&id("a")].table));
    }

    #[test]
    fn removed_cluster_and_service_are_removed_from_the_datapath() {
        let mut st = DesiredState::new(here(), Maglev::default());
        let dp = RecordingDatapath::new();
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.upsert(rec("west", "a", &[("10.1.0.1", true)], Affinity::None));
        st.compute();
        st.flush(&dp).unwrap();
        st.remove_cluster("west");
        st.compute();
        st.flush(&dp).unwrap();
        assert_eq!(active_clusters(&dp, "a"), ["east"]);
        st.remove("east", &name("a"));
        st.compute();
        st.flush(&dp).unwrap();
        assert!(dp.programmed().is_empty());
        assert_eq!(dp.batches().last().unwrap().removals, vec![id("a")]);
    }

    #[test]
    fn refused_batches_are_retried() {
        let mut st = DesiredState::new(here(), Maglev::default());
        let dp = RecordingDatapath::new();
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.compute();
        dp.fail_next(1);
        assert!(st.flush(&dp).is_err());
        assert!(st.has_pending());
        assert_eq!(st.flush(&dp).unwrap(), 1);
        assert!(dp.service(&id("a")).is_some());
    }

    #[test]
    fn only_the_service_the_datapath_refused_is_retried() {
        let mut st = DesiredState::new(here(), Maglev::default());
        let dp = RecordingDatapath::new();
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.upsert(rec("east", "b", &[("10.0.0.2", true)], Affinity::None));
        st.upsert(rec("east", "c", &[("10.0.0.3", true)], Affinity::None));
        st.compute();
        dp.fail_service(&id("b"), 1);
        let err = st.flush(&dp).unwrap_err();
        assert_eq!(err.applied, 2);
        assert_eq!(err.failed.keys().collect::<Vec<_>>(), [&id("b")]);
        assert!(dp.service(&id("a")).is_some() && dp.service(&id("c")).is_some());
        assert!(
            dp.service(&id("b")).is_none(),
            "b keeps its previous (absent) state"
        );

        // Only b is pending and re-sent; a and c are not sent again.
        let pending = st.pending();
        assert_eq!(pending.upserts.len(), 1);
        assert_eq!(pending.upserts[0].id, id("b"));
        assert_eq!(st.flush(&dp).unwrap(), 1);
        let retry = dp.batches().pop().unwrap();
        assert_eq!(
            retry
                .upserts
                .iter()
                .map(|s| s.id.clone())
                .collect::<Vec<_>>(),
            [id("b")]
        );
        assert!(dp.service(&id("b")).is_some());
        assert!(!st.has_pending());
        assert_eq!(st.flush(&dp).unwrap(), 0);
    }

    #[test]
    fn reconcile_sends_the_full_state_and_removes_what_is_not_desired() {
        let mut st = DesiredState::new(here(), Maglev::default());
        let dp = RecordingDatapath::new();
        // A previous run left `old` programmed.
        let mut other = DesiredState::new(here(), Maglev::default());
        other.upsert(rec("east", "old", &[("10.0.0.9", true)], Affinity::None));
        other.compute();
        other.flush(&dp).unwrap();

        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.upsert(rec("east", "b", &[("10.0.0.2", true)], Affinity::None));
        st.compute();
        dp.fail_service(&id("b"), 1);
        let err = st.reconcile(&dp).unwrap_err();
        assert_eq!(err.failed.keys().collect::<Vec<_>>(), [&id("b")]);
        assert!(dp.service(&id("old")).is_none(), "not desired: removed");
        assert!(dp.service(&id("a")).is_some());
        // The failed service is retried incrementally, alone.
        assert_eq!(st.flush(&dp).unwrap(), 1);
        assert_eq!(dp.programmed().len(), 2);
        assert!(!st.has_pending());
    }

    #[test]
    fn an_affinity_change_that_selects_the_same_backends_only_updates_the_view() {
        let mut st = DesiredState::new(here(), Maglev::default());
        let dp = RecordingDatapath::new();
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.compute();
        st.flush(&dp).unwrap();
        // Only local backends exist: `local` selects exactly what `none` did.
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::Local));
        st.compute();
        assert_eq!(st.flush(&dp).unwrap(), 0, "nothing for the datapath");
        assert_eq!(st.services()[&id("a")].affinity, Affinity::Local);
    }

    #[test]
    fn a_resync_keeps_the_previous_record_of_a_service_that_did_not_decode() {
        let mut st = DesiredState::new(here(), Maglev::default());
        st.upsert(rec("east", "a", &[("10.0.0.1", true)], Affinity::None));
        st.upsert(rec("west", "a", &[("10.1.0.1", true)], Affinity::None));
        st.upsert(rec("west", "b", &[("10.1.0.2", true)], Affinity::None));
        st.compute();
        // West resyncs: `a` did not decode (kept), `b` is gone.
        st.replace_cluster_keeping("west", BTreeMap::from([(name("a"), None)]));
        assert_eq!(st.clusters().get("west"), Some(&1));
        assert_eq!(st.compute().changed, 0, "a kept; b was never programmed");
        assert_eq!(st.services()[&id("a")].backends.len(), 2);
    }

    #[test]
    fn many_services_build_in_parallel_with_the_same_result() {
        let mut st = DesiredState::new(here(), Maglev::default());
        for i in 0..40 {
            let ips: Vec<String> = (0..20).map(|j| format!("10.{i}.0.{j}")).collect();
            let ips: Vec<(&str, bool)> = ips.iter().map(|s| (s.as_str(), true)).collect();
            st.upsert(rec("east", &format!("s{i}"), &ips, Affinity::None));
        }
        let stats = st.compute();
        assert_eq!(stats.tables_built, 40);
        let maglev = Maglev::default();
        for s in st.services().values() {
            assert_eq!(*s.table, *maglev.build(&s.backends).unwrap());
            assert!(s.backends.iter().all(|b| b.state == BackendState::Active));
        }
    }
}
