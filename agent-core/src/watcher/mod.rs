//! One watcher per cluster: a resumable mTLS watch of the cluster's service records.
//!
//! A watcher is an explicit state machine ([`Phase`]). It dials the cluster's mesh API
//! server (mTLS, the server must present `spiffe://<trust-domain>/cluster/<name>`; a server
//! presenting another identity is refused), checks the cluster's reported name, ID and pod
//! CIDRs against the configuration and the other clusters ([`ClusterRegistry`]), then
//! watches services:
//!
//! * From scratch (or after a `Reset`), records are buffered and only handed to the merge,
//!   as one replacement of everything this cluster had, when the `Synced` marker for
//!   services arrives. Until then the previous state stays in force, so a fresh or resumed
//!   connection never blackholes a service. A `Reset` also restarts the revision count at
//!   the server's revision, which may be lower than ours (a replaced store).
//! * After that, each event is applied as it comes.
//! * On disconnect the watcher reconnects with exponential backoff and jitter and resumes
//!   from the last revision it fully applied. The cluster's last-known records stay in
//!   force, and so does its claim on its ID and pod CIDRs; after `stale_ttl` (if
//!   configured) both are dropped. `GetClusterInfo` and opening the watch are bounded by
//!   a request timeout, so a server that accepts connections and then hangs is retried
//!   like an unreachable one.
//! * A watcher that ends while its cluster's records are in force says so
//!   ([`RecordsInForce`]); the watcher that replaces it (its settings changed) takes them
//!   over: the claim stays held, the stale TTL keeps counting from when the cluster became
//!   unreachable, and its first sync replaces them.
//!
//! Records that do not decode, or that belong to another cluster, are ignored, logged with
//! the cluster and key, and counted; the service's previous record stays in force, in a
//! full resync as well as live.
//!
//! The watcher is split by job: [`lifecycle`] owns the connection (dial, identity checks,
//! reconnect with backoff, resume, stale TTL), [`stream`] what one established session
//! does with the events it receives, [`status`] what the admin API shows about each
//! watcher, [`registry`] the ID and pod-CIDR claims connected clusters make, and
//! [`backoff`] the reconnect delays.

use std::collections::BTreeMap;
use std::time::Duration;

use clustermesh_api::agent_config::ClusterEntry;
use clustermesh_api::model::{Phase, ServiceName, ServiceRecord};
use clustermesh_certs::TrustDomain;
use tokio::time::Instant;

use crate::policy::inputs::{Input, InputKey};

pub mod backoff;
pub mod lifecycle;
pub mod mesh;
pub mod registry;
pub mod status;
pub mod stream;

pub use backoff::ReconnectBackoff;
pub use lifecycle::run;
pub use registry::{ClaimError, ClusterRegistry};
pub use status::{StatusBoard, WatcherStatus};

/// A change a watcher hands to the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The cluster's complete set of services (after an initial sync or a reset).
    Replace {
        /// Cluster.
        cluster: String,
        /// All its services: `Some` with the new record, or `None` for a service whose
        /// current value did not decode, whose previous record, if any, stays in force (as
        /// an undecodable live update leaves the previous one).
        services: BTreeMap<ServiceName, Option<ServiceRecord>>,
        /// All its identities, endpoints (and, for the local cluster, policies), with the
        /// same `None` rule.
        inputs: BTreeMap<InputKey, Option<Input>>,
    },
    /// The cluster's ID and pod CIDRs, as its server reported them when a session opened.
    ClusterInfo {
        /// Cluster.
        cluster: String,
        /// Cluster ID.
        id: u32,
        /// Pod CIDRs (canonical `addr/len`).
        pod_cidrs: Vec<String>,
    },
    /// One identity, endpoint or policy created or changed.
    UpsertInput {
        /// Cluster.
        cluster: String,
        /// The record.
        input: Input,
    },
    /// One identity, endpoint or policy removed.
    RemoveInput {
        /// Cluster.
        cluster: String,
        /// Which.
        key: InputKey,
    },
    /// One service created or changed.
    Upsert(ServiceRecord),
    /// One service removed.
    Remove {
        /// Cluster.
        cluster: String,
        /// Service.
        name: ServiceName,
    },
    /// Forget the cluster (removed from the configuration, or stale for too long).
    DropCluster {
        /// Cluster.
        cluster: String,
    },
    /// [`WatcherConfig::raw`] only: the cluster's complete set of records after an initial
    /// sync or a reset, as validated wire values by store key (`None`: the current value
    /// did not validate; the previous one, if any, stays).
    RawReplace {
        /// Cluster.
        cluster: String,
        /// Every record of the watched kinds.
        records: BTreeMap<String, Option<bytes::Bytes>>,
    },
    /// [`WatcherConfig::raw`] only: one record created or changed (validated).
    RawUpsert {
        /// Cluster.
        cluster: String,
        /// Store key.
        key: String,
        /// Wire value.
        value: bytes::Bytes,
    },
    /// [`WatcherConfig::raw`] only: one record removed.
    RawRemove {
        /// Cluster.
        cluster: String,
        /// Store key.
        key: String,
    },
}

/// Everything a watcher needs.
#[derive(Debug, Clone)]
pub struct WatcherConfig {
    /// The cluster to watch.
    pub entry: ClusterEntry,
    /// It is the agent's own cluster: its policies are watched too (a server serves them
    /// to its own cluster's agents only).
    pub local: bool,
    /// Trust domain of the server identity.
    pub trust_domain: TrustDomain,
    /// Our client certificate and key (the CA comes from `entry.ca_file`).
    pub cert_file: std::path::PathBuf,
    /// Private key of `cert_file`.
    pub key_file: std::path::PathBuf,
    /// Reconnect policy.
    pub backoff: ReconnectBackoff,
    /// Drop a disconnected cluster's records after this long (`None`: keep).
    pub stale_ttl: Option<Duration>,
    /// Time allowed to connect and complete the TLS handshake.
    pub connect_timeout: Duration,
    /// Time a connected server has to answer `GetClusterInfo` and to open the watch.
    pub request_timeout: Duration,
    /// Hand records over as their validated wire values (`Update::Raw*`) instead of
    /// decoded: the mesh API server's peer mirror, which stores them as they came. The
    /// same checks apply (key of this cluster and a watched kind, value decodes and
    /// belongs to this cluster).
    pub raw: bool,
    /// Most records a full state may hold before the session is cut off (refused, retried
    /// slowly): bounds what a flooding server can make the watcher buffer. `None`: no bound.
    pub max_records: Option<usize>,
    /// Mirror mode: `entry` is the agent's own cluster, whose server mirrors the peers;
    /// one all-clusters watch of it brings every cluster's records ([`mesh`]).
    pub all_clusters: bool,
}

/// A cluster's records left in force (and its ID and pod CIDRs left claimed) by a watcher
/// that ended: what [`run`] returns, and what the watcher that replaces it takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordsInForce {
    /// Since when they have not been kept up to date: the end of the cluster's last
    /// session, or the end of the watcher if it was watching then.
    pub stale_since: Instant,
    /// The clusters whose records are in force: the watched cluster, or in mirror mode
    /// every cluster received through it.
    pub clusters: Vec<String>,
}
