//! Prometheus metrics of the agent control plane.
//!
//! One registry for the whole agent, served as text on the admin socket (`GET /metrics`).
//! Per-cluster counters carry a `cluster` label so a misbehaving remote is visible.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type ClusterLabel = Vec<(String, String)>;

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    decode_errors: Family<ClusterLabel, Counter>,
    refused_records: Family<ClusterLabel, Counter>,
    reconnects: Family<ClusterLabel, Counter>,
    events: Family<ClusterLabel, Counter>,
    tables_built: Counter,
    table_build_errors: Counter,
    datapath_errors: Counter,
    datapath_batches: Counter,
    services: Gauge,
    policy_verdicts: Family<Vec<(String, String)>, Counter>,
    ipcache_entries: Family<ClusterLabel, Gauge>,
    policies_refused: Counter,
    policy_records_refused: Counter,
    policy_datapath_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn label(cluster: &str) -> ClusterLabel {
    vec![("cluster".to_owned(), cluster.to_owned())]
}

impl Metrics {
    /// A fresh registry with every metric registered.
    #[must_use]
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("clustermesh_agent")),
            decode_errors: Family::default(),
            refused_records: Family::default(),
            reconnects: Family::default(),
            events: Family::default(),
            tables_built: Counter::default(),
            table_build_errors: Counter::default(),
            datapath_errors: Counter::default(),
            datapath_batches: Counter::default(),
            services: Gauge::default(),
            policy_verdicts: Family::default(),
            ipcache_entries: Family::default(),
            policies_refused: Counter::default(),
            policy_records_refused: Counter::default(),
            policy_datapath_errors: Counter::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register(
                "record_decode_errors",
                "Records from a cluster that could not be decoded (ignored)",
                m.decode_errors.clone(),
            );
            r.register(
                "records_refused",
                "Records refused because they name another cluster or have an unexpected key",
                m.refused_records.clone(),
            );
            r.register(
                "watch_reconnects",
                "Watch sessions that ended and were retried",
                m.reconnects.clone(),
            );
            r.register("watch_events", "Watch events received", m.events.clone());
            r.register(
                "maglev_tables_built",
                "Maglev tables built",
                m.tables_built.clone(),
            );
            r.register(
                "maglev_table_build_errors",
                "Maglev table builds that failed",
                m.table_build_errors.clone(),
            );
            r.register(
                "datapath_apply_errors",
                "Change batches the datapath refused (retried)",
                m.datapath_errors.clone(),
            );
            r.register(
                "datapath_batches",
                "Change batches applied to the datapath",
                m.datapath_batches.clone(),
            );
            r.register(
                "services",
                "Load-balanced service ports in the desired state",
                m.services.clone(),
            );
            r.register(
                "policy_verdicts",
                "Policy verdicts of the datapath by direction (ingress, egress) and verdict (allowed, denied, syncing, reply)",
                m.policy_verdicts.clone(),
            );
            r.register(
                "ipcache_entries",
                "IP cache entries (endpoint addresses) per cluster",
                m.ipcache_entries.clone(),
            );
            r.register(
                "policies_refused",
                "Policies refused (invalid spec, or sent by a remote cluster); the last good version stays",
                m.policies_refused.clone(),
            );
            r.register(
                "policy_records_refused",
                "Identity and endpoint records refused (outside the exporting cluster's identity range)",
                m.policy_records_refused.clone(),
            );
            r.register(
                "policy_datapath_errors",
                "Policy datapath writes that failed (retried)",
                m.policy_datapath_errors.clone(),
            );
        }
        m
    }

    /// Adds `n` verdicts of `direction` (`ingress`, `egress`) and `verdict`.
    pub fn policy_verdicts(&self, direction: &str, verdict: &str, n: u64) {
        if n > 0 {
            self.policy_verdicts
                .get_or_create(&vec![
                    ("direction".to_owned(), direction.to_owned()),
                    ("verdict".to_owned(), verdict.to_owned()),
                ])
                .inc_by(n);
        }
    }

    /// Sets the IP cache size of `cluster`.
    pub fn ipcache_entries(&self, cluster: &str, n: usize) {
        self.ipcache_entries
            .get_or_create(&label(cluster))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the refusal counters of the policy plane to their running totals.
    pub fn policy_refusals(&self, policies: u64, records: u64) {
        let p = policies.saturating_sub(self.policies_refused.get());
        self.policies_refused.inc_by(p);
        let r = records.saturating_sub(self.policy_records_refused.get());
        self.policy_records_refused.inc_by(r);
    }

    /// Adds `n` failed policy datapath writes.
    pub fn policy_datapath_errors(&self, n: usize) {
        self.policy_datapath_errors.inc_by(n as u64);
    }

    /// A record from `cluster` did not decode.
    pub fn decode_error(&self, cluster: &str) {
        self.decode_errors.get_or_create(&label(cluster)).inc();
    }

    /// A record from `cluster` was refused.
    pub fn refused_record(&self, cluster: &str) {
        self.refused_records.get_or_create(&label(cluster)).inc();
    }

    /// The watch of `cluster` is being retried.
    pub fn reconnect(&self, cluster: &str) {
        self.reconnects.get_or_create(&label(cluster)).inc();
    }

    /// A watch event arrived from `cluster`.
    pub fn event(&self, cluster: &str) {
        self.events.get_or_create(&label(cluster)).inc();
    }

    /// Records one compute round.
    pub fn computed(&self, tables_built: usize, build_errors: usize, services: usize) {
        self.tables_built.inc_by(tables_built as u64);
        self.table_build_errors.inc_by(build_errors as u64);
        self.services
            .set(i64::try_from(services).unwrap_or(i64::MAX));
    }

    /// Records one datapath apply.
    pub fn datapath_result(&self, ok: bool) {
        if ok {
            self.datapath_batches.inc();
        } else {
            self.datapath_errors.inc();
        }
    }

    /// Decode errors counted for `cluster` so far.
    #[must_use]
    pub fn decode_errors_of(&self, cluster: &str) -> u64 {
        self.decode_errors.get_or_create(&label(cluster)).get()
    }

    /// Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = encode(&mut out, &r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_cluster_labels() {
        let m = Metrics::new();
        m.decode_error("west");
        m.decode_error("west");
        m.computed(3, 0, 7);
        let text = m.render();
        assert!(text.contains("clustermesh_agent_record_decode_errors_total{cluster=\"west\"} 2"));
        assert!(text.contains("clustermesh_agent_services 7"));
        assert_eq!(m.decode_errors_of("west"), 2);
    }
}
