//! Prometheus metrics of the API server, served on `/metrics`.
//!
//! One [`Metrics`] value is shared by every component; each records through a small
//! method so metric names and labels live in this file only.

use std::time::Duration;

use clustermesh_certs::transport::{HandshakeFailure, HandshakeObserver};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `kind` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// `op` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

/// `rpc` and `reason` labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    rpc: String,
    reason: String,
}

/// `reason` label of handshake failures: always a [`HandshakeFailure::as_str`] value.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabel {
    reason: &'static str,
}

type HistogramFamily = Family<OpLabel, Histogram, fn() -> Histogram>;

/// Why a replica left the leader role (the `reason` label of
/// `clustermesh_apiserver_leader_step_downs_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepDown {
    /// The server is stopping (the lease is then revoked: a graceful handover).
    Shutdown,
    /// The store said the lease expired.
    LeaseExpired,
    /// The lease could not be refreshed for so long that it might expire.
    LostContact,
    /// The leader key was deleted or taken by another replica.
    Deposed,
    /// A write was fenced off: another replica had won.
    Fenced,
    /// The writers stopped by themselves.
    WritersStopped,
}

impl StepDown {
    /// Every reason, exported from the start at 0.
    pub const ALL: [StepDown; 6] = [
        StepDown::Shutdown,
        StepDown::LeaseExpired,
        StepDown::LostContact,
        StepDown::Deposed,
        StepDown::Fenced,
        StepDown::WritersStopped,
    ];

    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            StepDown::Shutdown => "shutdown",
            StepDown::LeaseExpired => "lease_expired",
            StepDown::LostContact => "lost_contact",
            StepDown::Deposed => "deposed",
            StepDown::Fenced => "fenced",
            StepDown::WritersStopped => "writers_stopped",
        }
    }
}

/// `reason` label of step-downs: always a [`StepDown::as_str`] value.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepDownLabel {
    reason: &'static str,
}

/// All metrics of the API server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    records: Family<KindLabel, Gauge>,
    watchers: Gauge,
    events_sent: Counter,
    watch_resets: Family<ReasonLabel, Counter>,
    rejected_inputs: Family<ReasonLabel, Counter>,
    refusals: Family<RefusalLabel, Counter>,
    store_writes: Family<OpLabel, Counter>,
    store_latency: HistogramFamily,
    identities: Gauge,
    handshakes_accepted: Counter,
    handshake_failures: Family<HandshakeLabel, Counter>,
    oversized: Family<KindLabel, Gauge>,
    mirror_records: Family<PeerLabel, Gauge>,
    mirror_synced: Family<PeerLabel, Gauge>,
    mirror_connected: Family<PeerLabel, Gauge>,
    mirror_refused: Family<PeerReasonLabel, Counter>,
    leader: Gauge,
    leader_terms: Counter,
    leader_step_downs: Family<StepDownLabel, Counter>,
    fenced_writes: Counter,
}

/// `peer` label of the mirror's metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// `peer` and `reason` labels of the mirror's refusals.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerReasonLabel {
    peer: String,
    reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clustermesh_apiserver");
        let records = Family::<KindLabel, Gauge>::default();
        registry.register(
            "records",
            "Records this cluster exports, per kind",
            records.clone(),
        );
        let watchers = Gauge::default();
        registry.register("watchers", "Open Watch streams", watchers.clone());
        let events_sent = Counter::default();
        registry.register(
            "watch_events_sent",
            "Watch events sent to clients",
            events_sent.clone(),
        );
        let watch_resets = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "watch_resets",
            "Watch streams restarted with Reset, by reason",
            watch_resets.clone(),
        );
        let rejected_inputs = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "rejected_inputs",
            "Inputs (annotations, ports, addresses, manifest files) rejected or defaulted, by reason",
            rejected_inputs.clone(),
        );
        let refusals = Family::<RefusalLabel, Counter>::default();
        registry.register(
            "auth_refusals",
            "Requests refused by authorization",
            refusals.clone(),
        );
        let store_writes = Family::<OpLabel, Counter>::default();
        registry.register(
            "store_writes",
            "Writes to the store, by operation",
            store_writes.clone(),
        );
        let store_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "store_op_duration_seconds",
            "Latency of store operations, by operation",
            store_latency.clone(),
        );
        let identities = Gauge::default();
        registry.register(
            "identities",
            "Numeric identities allocated by this cluster",
            identities.clone(),
        );
        let handshakes_accepted = Counter::default();
        registry.register(
            "tls_handshakes_accepted",
            "Mesh API connections that completed the mTLS handshake with a verified identity",
            handshakes_accepted.clone(),
        );
        let handshake_failures = Family::<HandshakeLabel, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Mesh API connections dropped before or during the mTLS handshake, by reason",
            handshake_failures.clone(),
        );
        // Every reason is exported from the start (at 0), so alerts on rates see it.
        for reason in HandshakeFailure::ALL {
            drop(handshake_failures.get_or_create(&HandshakeLabel {
                reason: reason.as_str(),
            }));
        }
        let oversized = Family::<KindLabel, Gauge>::default();
        registry.register(
            "oversized_records",
            "Records not written because they exceed the store's value limit, per kind",
            oversized.clone(),
        );
        let mirror_records = Family::<PeerLabel, Gauge>::default();
        registry.register(
            "mirror_records",
            "Records of each mirrored peer held in this cluster's store",
            mirror_records.clone(),
        );
        let mirror_synced = Family::<PeerLabel, Gauge>::default();
        registry.register(
            "mirror_synced",
            "1 once a mirrored peer's full state is in the store, 0 before and after it is dropped",
            mirror_synced.clone(),
        );
        let mirror_connected = Family::<PeerLabel, Gauge>::default();
        registry.register(
            "mirror_connected",
            "1 while the mirror's watch of a peer is established, 0 while it is not (the peer's last-known records are then kept until the stale TTL)",
            mirror_connected.clone(),
        );
        let mirror_refused = Family::<PeerReasonLabel, Counter>::default();
        registry.register(
            "mirror_refused",
            "Peer records or states the mirror refused, by peer and reason",
            mirror_refused.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica leads its cluster: its exporter and mirror run",
            leader.clone(),
        );
        let leader_terms = Counter::default();
        registry.register(
            "leader_terms",
            "Leader elections this replica won",
            leader_terms.clone(),
        );
        let leader_step_downs = Family::<StepDownLabel, Counter>::default();
        registry.register(
            "leader_step_downs",
            "Times this replica left the leader role, by reason",
            leader_step_downs.clone(),
        );
        for reason in StepDown::ALL {
            drop(leader_step_downs.get_or_create(&StepDownLabel {
                reason: reason.as_str(),
            }));
        }
        let fenced_writes = Counter::default();
        registry.register(
            "fenced_writes",
            "Writes the store refused because this replica's leader term had ended",
            fenced_writes.clone(),
        );
        Metrics {
            leader,
            leader_terms,
            leader_step_downs,
            fenced_writes,
            oversized,
            mirror_records,
            mirror_synced,
            mirror_connected,
            mirror_refused,
            registry,
            records,
            watchers,
            events_sent,
            watch_resets,
            rejected_inputs,
            refusals,
            store_writes,
            store_latency,
            identities,
            handshakes_accepted,
            handshake_failures,
        }
    }

    /// Prometheus text exposition of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }

    /// Sets the number of records of mirrored peer `peer` in the store.
    pub fn set_mirror_records(&self, peer: &str, count: usize) {
        self.mirror_records
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Whether mirrored peer `peer`'s full state is in the store.
    pub fn set_mirror_synced(&self, peer: &str, synced: bool) {
        self.mirror_synced
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .set(i64::from(synced));
    }

    /// Whether the mirror's watch of `peer` is established (`None`: the peer is gone).
    pub fn set_mirror_connected(&self, peer: &str, connected: Option<bool>) {
        let label = PeerLabel {
            peer: peer.to_owned(),
        };
        match connected {
            Some(c) => {
                self.mirror_connected
                    .get_or_create(&label)
                    .set(i64::from(c));
            }
            None => {
                self.mirror_connected.remove(&label);
            }
        }
    }

    /// The mirror refused something of `peer` for `reason`.
    pub fn mirror_refused(&self, peer: &str, reason: &'static str) {
        self.mirror_refused
            .get_or_create(&PeerReasonLabel {
                peer: peer.to_owned(),
                reason,
            })
            .inc();
    }

    /// Sets the number of records of `kind`.
    pub fn set_records(&self, kind: &str, count: usize) {
        self.records
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A watch stream opened (+1) or closed (-1).
    pub fn watcher_delta(&self, delta: i64) {
        self.watchers.inc_by(delta);
    }

    /// `n` watch events were sent.
    pub fn events_sent(&self, n: u64) {
        self.events_sent.inc_by(n);
    }

    /// A watch stream started over with Reset.
    pub fn watch_reset(&self, reason: &str) {
        self.watch_resets
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// An input was rejected or defaulted.
    pub fn rejected_input(&self, reason: &str) {
        self.rejected_inputs
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A request was refused.
    pub fn refused(&self, rpc: &str, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabel {
                rpc: rpc.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A store operation finished after `elapsed`.
    pub fn store_op(&self, op: &str, elapsed: Duration) {
        let label = OpLabel { op: op.to_owned() };
        self.store_latency
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        if op != "list" && op != "get" {
            self.store_writes.get_or_create(&label).inc();
        }
    }

    /// Sets the number of records of `kind` that are too large for the store.
    pub fn set_oversized(&self, kind: &str, count: usize) {
        self.oversized
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Whether this replica leads (its writers run).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// This replica won a leader election.
    pub fn leader_term_won(&self) {
        self.leader_terms.inc();
    }

    /// This replica left the leader role for `reason`.
    pub fn leader_step_down(&self, reason: StepDown) {
        self.leader_step_downs
            .get_or_create(&StepDownLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The store refused a write of an ended term.
    pub fn fenced_write(&self) {
        self.fenced_writes.inc();
    }

    /// Sets the number of identities held.
    pub fn set_identities(&self, count: usize) {
        self.identities
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

/// The mesh API's accept loop reports every connection's outcome here.
impl HandshakeObserver for Metrics {
    fn accepted(&self) {
        self.handshakes_accepted.inc();
    }

    fn failed(&self, reason: HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&HandshakeLabel {
                reason: reason.as_str(),
            })
            .inc();
    }
}
