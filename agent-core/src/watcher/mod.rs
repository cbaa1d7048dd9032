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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clustermesh_api::cidr::Cidr;
use clustermesh_api::keys::{parse_key, Kind, MeshKey};
use clustermesh_api::records::Record;
use clustermesh_api::v1;
use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_certs::transport::{ConnectError, MeshEndpoint};
use clustermesh_certs::{MeshTls, PeerIdentity, TlsMaterial, TlsPaths, TlsSource, TrustDomain};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterEntry;
use crate::metrics::Metrics;
use crate::records::{ServiceName, ServiceRecord};

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
}

/// Where a watcher is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Dialling the server and checking the cluster's identity.
    Connecting,
    /// Receiving the full state; nothing applied until the Synced marker.
    Syncing,
    /// Applying live events.
    Watching,
    /// Disconnected, waiting to retry; the last-known state is kept (until the stale TTL).
    Backoff,
    /// The configuration or identity checks refuse this cluster; retrying slowly.
    Refused,
}

/// One cluster's watcher status, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// Cluster name.
    pub name: String,
    /// Current phase.
    pub phase: Phase,
    /// The watch stream is established.
    pub connected: bool,
    /// The cluster's records are in force (initial sync done at least once).
    pub synced: bool,
    /// Disconnected, serving last-known records.
    pub stale: bool,
    /// Last revision applied.
    pub revision: u64,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Endpoint of the current or last session.
    pub endpoint: String,
    /// Records ignored because they did not decode.
    pub decode_errors: u64,
    /// Records refused (wrong cluster, unexpected key).
    pub refused_records: u64,
}

impl ClusterStatus {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            phase: Phase::Connecting,
            connected: false,
            synced: false,
            stale: false,
            revision: 0,
            last_error: None,
            endpoint: String::new(),
            decode_errors: 0,
            refused_records: 0,
        }
    }
}

/// Statuses of every watcher, shared with the admin API.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    inner: Arc<Mutex<BTreeMap<String, ClusterStatus>>>,
}

impl StatusBoard {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ClusterStatus>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of every status.
    #[must_use]
    pub fn snapshot(&self) -> Vec<ClusterStatus> {
        self.lock().values().cloned().collect()
    }

    /// The status of one cluster.
    #[must_use]
    pub fn get(&self, cluster: &str) -> Option<ClusterStatus> {
        self.lock().get(cluster).cloned()
    }

    pub(crate) fn update(&self, cluster: &str, f: impl FnOnce(&mut ClusterStatus)) {
        let mut all = self.lock();
        f(all
            .entry(cluster.to_owned())
            .or_insert_with(|| ClusterStatus::new(cluster)));
    }

    /// Adds `cluster` (not connected, not synced) unless it is already listed.
    pub(crate) fn register(&self, cluster: &str) {
        self.update(cluster, |_| {});
    }

    /// Forgets a cluster (removed from the configuration).
    pub fn remove(&self, cluster: &str) {
        self.lock().remove(cluster);
    }
}

/// What connected clusters claim to be: their IDs and pod CIDRs, so that a cluster
/// reporting another's ID or an overlapping pod CIDR is refused.
#[derive(Debug, Default)]
pub struct ClusterRegistry {
    claims: Mutex<HashMap<String, (u32, Vec<Cidr>)>>,
}

impl ClusterRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (u32, Vec<Cidr>)>> {
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `name`'s ID and pod CIDRs, unless they collide with another cluster's.
    pub fn claim(&self, name: &str, id: u32, pod_cidrs: &[String]) -> Result<(), String> {
        let cidrs = pod_cidrs
            .iter()
            .map(|c| Cidr::parse(c).map_err(|e| format!("pod CIDR {c:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut claims = self.lock();
        for (other, (other_id, other_cidrs)) in claims.iter() {
            if other == name {
                continue;
            }
            if *other_id == id && id != 0 {
                return Err(format!(
                    "reports cluster ID {id}, which cluster {other} already uses; give every cluster its own ID"
                ));
            }
            for a in &cidrs {
                if let Some(b) = other_cidrs.iter().find(|b| a.overlaps(b)) {
                    return Err(format!(
                        "pod CIDR {a} overlaps cluster {other}'s {b}; clusters in a mesh need disjoint pod CIDRs"
                    ));
                }
            }
        }
        claims.insert(name.to_owned(), (id, cidrs));
        Ok(())
    }

    /// Forgets `name`'s claim.
    pub fn release(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// Reconnect delays: exponential from `initial`, capped at `max`, then scaled by a random
/// factor in [0.5, 1) ("equal jitter", M. Brooker, "Exponential Backoff And Jitter", AWS
/// Architecture Blog, 2015). Jitter is applied after the cap, so agents that have all
/// reached the cap still spread their retries over [max/2, max) instead of retrying in
/// step at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay (before jitter).
    pub initial: Duration,
    /// Largest delay (before jitter).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (1-based).
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut rand::thread_rng())
    }

    /// [`Self::delay`] with the given random source.
    pub fn delay_with(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        jitter(exp.min(self.max), rng)
    }

    /// Delay before retrying a refused cluster: the cap, jittered like any other delay,
    /// with the given random source.
    #[must_use]
    pub fn refused_delay(&self, rng: &mut impl Rng) -> Duration {
        jitter(self.max, rng)
    }
}

/// `base` scaled by a uniform factor in [0.5, 1).
fn jitter(base: Duration, rng: &mut impl Rng) -> Duration {
    base.mul_f64(rng.gen_range(0.5..1.0))
}

/// Everything a watcher needs.
#[derive(Debug, Clone)]
pub struct WatcherConfig {
    /// The cluster to watch.
    pub entry: ClusterEntry,
    /// Trust domain of the server identity.
    pub trust_domain: TrustDomain,
    /// Our client certificate and key (the CA comes from `entry.ca_file`).
    pub cert_file: std::path::PathBuf,
    /// Private key of `cert_file`.
    pub key_file: std::path::PathBuf,
    /// Reconnect policy.
    pub backoff: Backoff,
    /// Drop a disconnected cluster's records after this long (`None`: keep).
    pub stale_ttl: Option<Duration>,
    /// Time allowed to connect and complete the TLS handshake.
    pub connect_timeout: Duration,
    /// Time a connected server has to answer `GetClusterInfo` and to open the watch.
    pub request_timeout: Duration,
}

/// A cluster's records left in force (and its ID and pod CIDRs left claimed) by a watcher
/// that ended: what [`run`] returns, and what the watcher that replaces it takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordsInForce {
    /// Since when they have not been kept up to date: the end of the cluster's last
    /// session, or the end of the watcher if it was watching then.
    pub stale_since: Instant,
}

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Retry with backoff.
    Retry(String),
    /// Identity checks failed; retry slowly.
    Refused(String),
    /// Cancelled.
    Cancelled,
}

/// State carried across sessions.
#[derive(Debug, Default)]
struct Progress {
    /// Revision up to which this cluster's state is applied (0: nothing applied).
    revision: u64,
    /// The cluster's records are in force in the desired state.
    have_state: bool,
    /// Successful sessions end the backoff sequence.
    attempt: u32,
    /// Endpoint index to try next.
    endpoint: usize,
    /// The last session got as far as an established watch stream.
    established: bool,
}

/// Runs the watcher of one cluster until `cancel`.
///
/// `inherited`: the records a previous watcher of this cluster left in force. They stay
/// in force (stale since then, so the stale TTL applies) and the cluster's claim stays
/// held until the first full sync replaces them or the TTL drops them.
///
/// Returns the records this watcher leaves in force, if any; their claim in `registry`
/// is then left held, for the caller to hand over to the next watcher or release.
pub async fn run(
    config: WatcherConfig,
    inherited: Option<RecordsInForce>,
    updates: mpsc::Sender<Update>,
    status: StatusBoard,
    registry: Arc<ClusterRegistry>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Option<RecordsInForce> {
    let name = config.entry.name.clone();
    status.update(&name, |s| {
        // A restarted watcher inherits the status of the one before; it has no session.
        s.phase = Phase::Connecting;
        s.connected = false;
    });
    // Inherited records are in force at no known revision: the first session syncs in
    // full, and its `Replace` takes their place.
    let mut progress = Progress {
        have_state: inherited.is_some(),
        ..Progress::default()
    };
    let mut disconnected_since = inherited.map(|r| r.stale_since);
    loop {
        let end = tokio::select! {
            () = cancel.cancelled() => SessionEnd::Cancelled,
            end = session(&config, &updates, &status, &registry, &metrics, &mut progress) => end,
        };
        let (phase, reason) = match end {
            SessionEnd::Cancelled => break,
            SessionEnd::Retry(r) => (Phase::Backoff, r),
            SessionEnd::Refused(r) => (Phase::Refused, r),
        };
        // The cluster's ID and pod CIDRs stay claimed as long as its records are in force
        // (until the stale TTL drops them, or the watcher ends), so another cluster
        // cannot take them over while this one is merely unreachable.
        if !progress.have_state {
            registry.release(&name);
        }
        metrics.reconnect(&name);
        tracing::warn!(cluster = %name, reason = %reason, "cluster watch ended; keeping last-known state and retrying");
        if std::mem::take(&mut progress.established) {
            disconnected_since = None;
        }
        let since = *disconnected_since.get_or_insert_with(Instant::now);
        status.update(&name, |s| {
            s.phase = phase;
            s.connected = false;
            s.stale = progress.have_state;
            s.last_error = Some(reason);
        });
        progress.attempt += 1;
        let delay = match phase {
            Phase::Refused => config.backoff.refused_delay(&mut rand::thread_rng()),
            _ => config.backoff.delay(progress.attempt),
        };
        let ttl_deadline = config
            .stale_ttl
            .filter(|_| progress.have_state)
            .map(|ttl| since + ttl);
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
            () = sleep_until_opt(ttl_deadline) => {
                tracing::warn!(cluster = %name, "cluster unreachable for longer than the stale TTL; dropping its records");
                progress.have_state = false;
                progress.revision = 0;
                status.update(&name, |s| { s.stale = false; s.synced = false; });
                if updates.send(Update::DropCluster { cluster: name.clone() }).await.is_err() {
                    break;
                }
                registry.release(&name);
            }
        }
    }
    if !progress.have_state {
        registry.release(&name);
        return None;
    }
    // Cancelled during a session that got its watch established: up to date until now.
    let stale_since = match disconnected_since {
        Some(since) if !progress.established => since,
        _ => Instant::now(),
    };
    Some(RecordsInForce { stale_since })
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One connection: dial, check identity, watch until the stream ends.
async fn session(
    config: &WatcherConfig,
    updates: &mpsc::Sender<Update>,
    status: &StatusBoard,
    registry: &ClusterRegistry,
    metrics: &Metrics,
    progress: &mut Progress,
) -> SessionEnd {
    let name = config.entry.name.as_str();
    let endpoints = &config.entry.endpoints;
    if endpoints.is_empty() {
        return SessionEnd::Refused("no endpoints configured".into());
    }
    let target = endpoints[progress.endpoint % endpoints.len()].clone();
    progress.endpoint = progress.endpoint.wrapping_add(1);
    status.update(name, |s| {
        s.phase = Phase::Connecting;
        s.endpoint.clone_from(&target);
    });
    let tls_paths = TlsPaths {
        ca: config.entry.ca_file.clone(),
        cert: config.cert_file.clone(),
        key: config.key_file.clone(),
    };
    // Loaded per session so rotated files are picked up on reconnect. The CA file
    // configured for cluster `name` may vouch for that cluster only (unlabelled CAs in it
    // are scoped to it), so a CA file of one cluster can never authenticate another.
    let tls: Arc<dyn TlsSource> = match TlsMaterial::load(config.trust_domain.clone(), &tls_paths)
        .and_then(|m| {
            let m = m.with_unlabelled_ca_cluster(name);
            MeshTls::new(&m).map_err(|source| clustermesh_certs::TlsError::Material {
                origin: format!("the TLS files of cluster {name}"),
                source,
            })
        }) {
        Ok(t) => Arc::new(t),
        Err(e) => return SessionEnd::Refused(format!("TLS material: {e}")),
    };
    let expected = match PeerIdentity::cluster(config.trust_domain.clone(), name) {
        Ok(p) => p,
        Err(e) => return SessionEnd::Refused(format!("cluster name: {e}")),
    };
    let endpoint = match MeshEndpoint::new(&target, tls) {
        Ok(e) => e
            .expect_peer(expected)
            .connect_timeout(config.connect_timeout),
        Err(e) => return SessionEnd::Refused(format!("endpoint {target}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            // A verified mesh server that is another cluster: the address is wrong, not
            // the network; retrying fast would not help.
            if let Some(ConnectError::UnexpectedPeer { got, expected, .. }) = unexpected_peer(&e) {
                return SessionEnd::Refused(format!(
                    "server at {target} is {got}, but cluster {name} must be {expected}; the address belongs to another cluster, fix the endpoint in the agent config"
                ));
            }
            return SessionEnd::Retry(format!("connect {target}: {e}"));
        }
    };
    let mut client = MeshApiClient::new(channel);
    let deadline = config.request_timeout;
    let no_answer = |what: &str| {
        SessionEnd::Retry(format!(
            "{what}: server at {target} accepted the connection but did not answer within {deadline:?}"
        ))
    };
    let info = match tokio::time::timeout(
        deadline,
        client.get_cluster_info(v1::GetClusterInfoRequest {}),
    )
    .await
    {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => return SessionEnd::Retry(format!("GetClusterInfo: {}", e.message())),
        Err(_) => return no_answer("GetClusterInfo"),
    };
    let Some(cc) = info.config else {
        return SessionEnd::Retry("GetClusterInfo returned no cluster config".into());
    };
    if cc.name != name {
        return SessionEnd::Refused(format!(
            "server at {target} reports cluster name {:?}, configured as {name}; fix the endpoint",
            cc.name
        ));
    }
    if config.entry.id != 0 && cc.id != config.entry.id {
        return SessionEnd::Refused(format!(
            "cluster reports ID {}, configured as {}; fix the configuration or the cluster",
            cc.id, config.entry.id
        ));
    }
    if let Err(reason) = registry.claim(name, cc.id, &cc.pod_cidrs) {
        return SessionEnd::Refused(reason);
    }
    let from_revision = if progress.have_state {
        progress.revision
    } else {
        0
    };
    let request = v1::WatchRequest {
        kinds: vec![v1::Kind::Service as i32],
        from_revision,
    };
    let mut stream = match tokio::time::timeout(deadline, client.watch(request)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => return SessionEnd::Retry(format!("Watch: {}", e.message())),
        Err(_) => return no_answer("Watch"),
    };
    tracing::info!(cluster = %name, endpoint = %target, from_revision, "cluster watch established");
    progress.attempt = 0;
    progress.established = true;
    let mut syncing = from_revision == 0;
    status.update(name, |s| {
        s.connected = true;
        s.stale = false;
        s.last_error = None;
        s.phase = if syncing {
            Phase::Syncing
        } else {
            Phase::Watching
        };
    });
    // The services of a resync so far; `None`: the value did not decode, keep the previous.
    let mut resync: BTreeMap<ServiceName, Option<ServiceRecord>> = BTreeMap::new();
    let mut pending_revision = progress.revision;
    loop {
        let event = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return SessionEnd::Retry("server closed the watch".into()),
            Err(e) => return SessionEnd::Retry(format!("watch stream: {}", e.message())),
        };
        metrics.event(name);
        let Some(event) = event.event else {
            continue;
        };
        let mut update = None;
        match event {
            v1::watch_event::Event::Reset(r) => {
                tracing::info!(cluster = %name, reason = %r.reason, "server reset the watch; resyncing (current state kept until synced)");
                syncing = true;
                resync.clear();
                // The server's history starts over: its revision may be lower than ours
                // (a store restored or replaced). Count from the Reset's revision, or a
                // later resume would skip everything between the two.
                pending_revision = r.revision;
                status.update(name, |s| s.phase = Phase::Syncing);
            }
            v1::watch_event::Event::Upsert(u) => {
                pending_revision = pending_revision.max(u.revision);
                match decode_upsert(name, &u, status, metrics) {
                    Ok(rec) if syncing => {
                        resync.insert(rec.name.clone(), Some(rec));
                    }
                    Ok(rec) => update = Some(Update::Upsert(rec)),
                    // Like a bad live update, a bad value in a resync leaves the previous
                    // record of that service (from this sync or from before) in force.
                    Err(Some(svc)) if syncing => {
                        resync.entry(svc).or_insert(None);
                    }
                    Err(_) => {}
                }
            }
            v1::watch_event::Event::Delete(d) => {
                pending_revision = pending_revision.max(d.revision);
                if let Some(svc) = service_key(name, &d.key, status, metrics) {
                    if syncing {
                        resync.remove(&svc);
                    } else {
                        update = Some(Update::Remove {
                            cluster: name.to_owned(),
                            name: svc,
                        });
                    }
                }
            }
            v1::watch_event::Event::Synced(s) => {
                pending_revision = pending_revision.max(s.revision);
                if syncing && s.kind == v1::Kind::Service as i32 {
                    syncing = false;
                    update = Some(Update::Replace {
                        cluster: name.to_owned(),
                        services: std::mem::take(&mut resync),
                    });
                }
            }
        }
        if let Some(u) = update {
            if updates.send(u).await.is_err() {
                return SessionEnd::Cancelled;
            }
        }
        if !syncing {
            progress.revision = pending_revision;
            progress.have_state = true;
            let rev = progress.revision;
            status.update(name, |s| {
                s.phase = Phase::Watching;
                s.synced = true;
                s.revision = rev;
            });
        }
    }
}

/// The `UnexpectedPeer` error in `e` or its sources (tonic wraps what the connector
/// returned).
fn unexpected_peer(e: &ConnectError) -> Option<&ConnectError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(found @ ConnectError::UnexpectedPeer { .. }) = err.downcast_ref() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// The service name in `key`, if it is a service key of cluster `name`.
fn service_key(
    name: &str,
    key: &str,
    status: &StatusBoard,
    metrics: &Metrics,
) -> Option<ServiceName> {
    match parse_key(key.as_bytes()) {
        Ok(MeshKey::Service {
            cluster,
            namespace,
            name: svc,
        }) if cluster == name => Some(ServiceName {
            namespace,
            name: svc,
        }),
        Ok(other) => {
            tracing::warn!(cluster = %name, key = %key, parsed = %other, "record key is not a service of this cluster; refused");
            metrics.refused_record(name);
            status.update(name, |s| s.refused_records += 1);
            None
        }
        Err(e) => {
            tracing::warn!(cluster = %name, key = %key, error = %e, "undecodable record key; ignored");
            metrics.decode_error(name);
            status.update(name, |s| s.decode_errors += 1);
            None
        }
    }
}

/// The record in `u`; on failure (counted and logged), the service it was for if the key
/// is a service key of this cluster.
fn decode_upsert(
    name: &str,
    u: &v1::Upsert,
    status: &StatusBoard,
    metrics: &Metrics,
) -> Result<ServiceRecord, Option<ServiceName>> {
    let svc = service_key(name, &u.key, status, metrics).ok_or(None)?;
    let record = match Record::decode(Kind::Service, &u.key, &u.value) {
        Ok(Record::Service(record)) => record,
        Ok(_) => return Err(Some(svc)),
        Err(e) => {
            tracing::warn!(cluster = %name, key = %u.key, error = %e, "undecodable record; ignored");
            metrics.decode_error(name);
            status.update(name, |s| s.decode_errors += 1);
            return Err(Some(svc));
        }
    };
    match ServiceRecord::from_wire(name, &record) {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!(cluster = %name, key = %u.key, error = %e, "record refused");
            match e {
                crate::records::RecordError::WrongCluster { .. } => {
                    metrics.refused_record(name);
                    status.update(name, |s| s.refused_records += 1);
                }
                _ => {
                    metrics.decode_error(name);
                    status.update(name, |s| s.decode_errors += 1);
                }
            }
            Err(Some(svc))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let d1 = b.delay_with(1, &mut rng);
            assert!(d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(100));
            let d4 = b.delay_with(4, &mut rng);
            assert!(d4 >= Duration::from_millis(400) && d4 < Duration::from_millis(800));
        }
    }

    /// At the cap (and for refused clusters) delays still spread over [max/2, max): agents
    /// that lost the same server retry at different times, not in step at `max`.
    #[test]
    fn capped_and_refused_delays_stay_spread() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for delays in [
            (0..1000)
                .map(|_| b.delay_with(40, &mut rng))
                .collect::<Vec<_>>(),
            (0..1000)
                .map(|_| b.refused_delay(&mut rng))
                .collect::<Vec<_>>(),
        ] {
            assert!(delays
                .iter()
                .all(|d| *d >= Duration::from_secs(1) && *d < Duration::from_secs(2)));
            let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
            assert!(distinct.len() > 990, "{} distinct delays", distinct.len());
            // Each quarter of [1 s, 2 s) gets roughly a quarter of the delays.
            for q in 0..4u32 {
                let lo = Duration::from_millis(1000 + 250 * u64::from(q));
                let hi = lo + Duration::from_millis(250);
                let n = delays.iter().filter(|d| **d >= lo && **d < hi).count();
                assert!((200..300).contains(&n), "quarter {q}: {n} of 1000");
            }
        }
    }

    #[test]
    fn registry_refuses_duplicate_ids_and_overlapping_cidrs() {
        let r = ClusterRegistry::default();
        r.claim("east", 1, &["10.1.0.0/16".into()]).unwrap();
        assert!(r.claim("west", 1, &["10.2.0.0/16".into()]).is_err());
        let e = r.claim("west", 2, &["10.1.128.0/17".into()]).unwrap_err();
        assert!(e.contains("overlaps cluster east"), "{e}");
        assert!(r.claim("west", 2, &["not a cidr".into()]).is_err());
        r.claim("west", 2, &["10.2.0.0/16".into()]).unwrap();
        // Re-claiming one's own entry is fine.
        r.claim("west", 2, &["10.2.0.0/16".into()]).unwrap();
        r.release("east");
        r.claim("north", 1, &["10.1.0.0/16".into()]).unwrap();
    }

    #[test]
    fn foreign_and_bad_keys_are_counted() {
        let status = StatusBoard::default();
        let metrics = Metrics::new();
        assert!(service_key(
            "east",
            "mesh/v1/services/east/default/web",
            &status,
            &metrics
        )
        .is_some());
        assert!(service_key(
            "east",
            "mesh/v1/services/west/default/web",
            &status,
            &metrics
        )
        .is_none());
        assert!(service_key("east", "garbage", &status, &metrics).is_none());
        let s = status.get("east").unwrap();
        assert_eq!((s.refused_records, s.decode_errors), (1, 1));
        let bad = v1::Upsert {
            kind: v1::Kind::Service as i32,
            key: "mesh/v1/services/east/default/web".into(),
            value: vec![0xff, 0xff, 0xff].into(),
            revision: 3,
        };
        assert_eq!(
            decode_upsert("east", &bad, &status, &metrics),
            Err(Some(ServiceName {
                namespace: "default".into(),
                name: "web".into()
            }))
        );
        assert_eq!(metrics.decode_errors_of("east"), 2);
    }
}
