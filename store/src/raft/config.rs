//! Configuration of one raft replica, built with [`RaftConfig::builder`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::network::NetworkFaults;
use super::tls::ReplicaTls;

/// Node id of a replica (unique within one store cluster, never reused).
pub type NodeId = u64;

/// Configuration of one replica.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This replica's id.
    pub node_id: NodeId,
    /// Address the replica RPC server listens on.
    pub listen: SocketAddr,
    /// The initial voters (id → address other replicas dial), this replica included.
    /// With `bootstrap`, the lowest id initializes the cluster with exactly these.
    pub members: BTreeMap<NodeId, String>,
    /// Initialize a new cluster from `members` when the data directory is empty. Off for
    /// a replica that joins a running cluster (it is then added with
    /// [`super::Replica::add_voter`]).
    pub bootstrap: bool,
    /// Directory holding the log (`log/`) and the snapshot (`snapshot/`).
    pub data_dir: PathBuf,
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout range (a follower that hears nothing for a random time in this
    /// range starts an election).
    pub election_timeout: (Duration, Duration),
    /// Build a snapshot after this many applied entries since the last one; the log
    /// before it is then purged, keeping disk use bounded.
    pub snapshot_every: u64,
    /// Also build a snapshot once this many command bytes were applied since the last
    /// one (bounds the log by size as well as by entry count).
    pub snapshot_bytes: u64,
    /// Batches a replica may have in flight at once (writes arriving meanwhile are
    /// batched into the next one).
    pub proposers: usize,
    /// Entries kept in the log behind the snapshot (lets a briefly lagging follower
    /// catch up without a snapshot transfer).
    pub keep_after_snapshot: u64,
    /// Size at which the log rolls over to a new segment file.
    pub segment_bytes: u64,
    /// Most events kept in the watch history.
    pub history_max_events: usize,
    /// Most bytes (keys + values) kept in the watch history.
    pub history_max_bytes: usize,
    /// How long a client operation may wait for a leader / quorum before failing with
    /// [`crate::StoreError::Unavailable`].
    pub request_timeout: Duration,
    /// How often the leader checks lease deadlines.
    pub lease_check_interval: Duration,
    /// mTLS for replica traffic; `None` runs plaintext gRPC (only for a single replica
    /// or a trusted loopback setup).
    pub tls: Option<ReplicaTls>,
    /// Fault switch shared with other replicas (tests only; `None` in production).
    pub(crate) faults: Option<Arc<NetworkFaults>>,
}

/// An invalid [`RaftConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The member list does not contain this replica.
    #[error("raft member list does not contain this replica's id {0}; add `{0}=<address>` to the members")]
    NotAMember(NodeId),
    /// Raft needs an odd, small number of voters.
    #[error("raft member list has {0} replicas; use 1, 3 or 5")]
    BadSize(usize),
    /// Timing values that cannot work together.
    #[error("raft timing: {0}")]
    Timing(String),
}

impl RaftConfig {
    /// Starts a builder for replica `node_id` storing its data under `data_dir`.
    #[must_use]
    pub fn builder(node_id: NodeId, data_dir: impl Into<PathBuf>) -> RaftConfigBuilder {
        RaftConfigBuilder {
            config: RaftConfig {
                node_id,
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                members: BTreeMap::new(),
                bootstrap: true,
                data_dir: data_dir.into(),
                heartbeat: Duration::from_millis(100),
                election_timeout: (Duration::from_millis(400), Duration::from_millis(800)),
                snapshot_every: 10_000,
                keep_after_snapshot: 100,
                snapshot_bytes: 128 * 1024 * 1024,
                proposers: 2,
                segment_bytes: 64 * 1024 * 1024,
                history_max_events: 100_000,
                history_max_bytes: 64 * 1024 * 1024,
                request_timeout: Duration::from_secs(10),
                lease_check_interval: Duration::from_millis(100),
                tls: None,
                faults: None,
            },
        }
    }

    pub(crate) fn openraft_config(&self) -> Result<openraft::Config, ConfigError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let cfg = openraft::Config {
            cluster_name: "clustermesh-store".into(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_timeout.0),
            election_timeout_max: ms(self.election_timeout.1),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            install_snapshot_timeout: 10_000,
            snapshot_max_chunk_size: 4 * 1024 * 1024,
            max_payload_entries: 1024,
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| ConfigError::Timing(e.to_string()))
    }
}

/// Builder for [`RaftConfig`].
#[derive(Debug, Clone)]
pub struct RaftConfigBuilder {
    config: RaftConfig,
}

impl RaftConfigBuilder {
    /// Address the replica RPC server listens on (default `127.0.0.1:0`).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }

    /// Adds an initial voter.
    #[must_use]
    pub fn member(mut self, id: NodeId, addr: impl Into<String>) -> Self {
        self.config.members.insert(id, addr.into());
        self
    }

    /// Whether to initialize a new cluster from the members (default true).
    #[must_use]
    pub fn bootstrap(mut self, bootstrap: bool) -> Self {
        self.config.bootstrap = bootstrap;
        self
    }

    /// Heartbeat interval and election timeout range.
    #[must_use]
    pub fn timing(mut self, heartbeat: Duration, election: (Duration, Duration)) -> Self {
        self.config.heartbeat = heartbeat;
        self.config.election_timeout = election;
        self
    }

    /// Snapshot interval in applied entries and entries kept after a snapshot.
    #[must_use]
    pub fn snapshots(mut self, every: u64, keep_after: u64) -> Self {
        self.config.snapshot_every = every;
        self.config.keep_after_snapshot = keep_after;
        self
    }

    /// Snapshot after this many applied command bytes, too.
    #[must_use]
    pub fn snapshot_bytes(mut self, bytes: u64) -> Self {
        self.config.snapshot_bytes = bytes;
        self
    }

    /// Batches in flight at once per replica.
    #[must_use]
    pub fn proposers(mut self, n: usize) -> Self {
        self.config.proposers = n;
        self
    }

    /// Log segment size.
    #[must_use]
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.config.segment_bytes = bytes;
        self
    }

    /// Watch history bounds.
    #[must_use]
    pub fn history(mut self, max_events: usize, max_bytes: usize) -> Self {
        self.config.history_max_events = max_events;
        self.config.history_max_bytes = max_bytes;
        self
    }

    /// Client operation timeout.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Lease deadline check interval.
    #[must_use]
    pub fn lease_check_interval(mut self, interval: Duration) -> Self {
        self.config.lease_check_interval = interval;
        self
    }

    /// Serves and dials peers over mTLS with this identity.
    #[must_use]
    pub fn tls(mut self, tls: ReplicaTls) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Shares a fault switch with other replicas (tests).
    #[cfg(feature = "testing")]
    #[must_use]
    pub fn faults(mut self, faults: Arc<NetworkFaults>) -> Self {
        self.config.faults = Some(faults);
        self
    }

    /// Validates and returns the configuration.
    ///
    /// ```
    /// use clustermesh_store::raft::RaftConfig;
    /// let cfg = RaftConfig::builder(1, "/var/lib/clustermesh/store")
    ///     .member(1, "10.0.0.1:7400")
    ///     .member(2, "10.0.0.2:7400")
    ///     .member(3, "10.0.0.3:7400")
    ///     .build()
    ///     .expect("valid config");
    /// assert_eq!(cfg.members.len(), 3);
    /// ```
    pub fn build(self) -> Result<RaftConfig, ConfigError> {
        let c = self.config;
        if c.bootstrap {
            if !c.members.contains_key(&c.node_id) {
                return Err(ConfigError::NotAMember(c.node_id));
            }
            if !matches!(c.members.len(), 1 | 3 | 5) {
                return Err(ConfigError::BadSize(c.members.len()));
            }
        }
        if c.snapshot_every == 0 {
            return Err(ConfigError::Timing(
                "snapshot interval must be at least 1 entry".into(),
            ));
        }
        c.openraft_config()?;
        Ok(c)
    }
}
