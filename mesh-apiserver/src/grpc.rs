//! The gRPC `MeshApi` service: GetClusterInfo, Watch and Status, with authorization by
//! the caller's certificate identity.
//!
//! Every connection arrives through `clustermesh_certs::transport::incoming`, so by the
//! time a request is handled its client certificate has been verified against the mesh
//! CA and its SPIFFE identity is attached to the request. Authorization is then:
//! - `GetClusterInfo` and `Watch`: our agents, connected peers (their mesh API server or,
//!   in direct mode, their agents) and admins; the API has no write calls at all, so
//!   every non-admin caller is read-only by construction;
//! - `Status`: admin identities only. See [`AccessPolicy`].
//!
//! Policy records ([`Kind::Policy`]) never leave the cluster: only this cluster's own
//! agents and admins receive them. A Watch from anyone else that names `KIND_POLICY` is
//! refused with `PERMISSION_DENIED`, and one that asks for every kind (an empty list) gets
//! every exported kind ([`Kind::exported`]) but policies.
//!
//! Of the other kinds, peers get only the records the export rules allow (global and
//! shared services, the pods `--export-pods` selects; see [`crate::peer_view`]); the
//! cluster's own agents and admins get everything. [`AccessPolicy::viewer`] decides which
//! of the two views a Watch is served.
//!
//! Each Watch is served by its own task reading the shared [`Cache`]; see that module for
//! resume and Reset semantics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use clustermesh_api::keys::Kind;
use clustermesh_api::v1;
use clustermesh_api::v1::mesh_api_server::MeshApi;
use clustermesh_certs::transport::{peer_identity, peer_info};
use clustermesh_certs::{IdentityKind, PeerIdentity};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::cache::{Cache, CacheEvent, Subscription, Viewer};
use crate::leader::LeaderStatus;
use crate::metrics::Metrics;
use crate::mirror::MirrorStatus;

/// Who may call what, by the caller's role (ARCHITECTURE.md, "Identity model").
///
/// The TLS layer has already checked that the CA that issued the caller's certificate
/// may issue its identity: a peer's CA only `cluster/<peer>` and `cluster/<peer>/agent`,
/// and only while the peer is connected (its CA labelled in the trust bundle), our own CA
/// every role of our cluster and admins. This policy then maps roles to RPCs:
///
/// | caller                                   | GetClusterInfo, Watch | Status |
/// |------------------------------------------|-----------------------|--------|
/// | `admin/<who>`                            | yes                   | yes    |
/// | `cluster/<own>/agent`                    | yes                   | no     |
/// | `cluster/<peer>`, `cluster/<peer>/agent` | yes (read-only)       | no     |
/// | `cluster/<own>` (our server's own cert)  | no                    | no     |
/// | `cluster/<any>/replica/<n>`              | no                    | no     |
///
/// Watch of `KIND_POLICY` ([`AccessPolicy::watch_kinds`]): admins and
/// `cluster/<own>/agent` only; peers are refused it explicitly and never sent it
/// implicitly.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// This cluster's name.
    pub cluster: String,
    /// Peer clusters allowed to Watch and GetClusterInfo; `None` allows every connected
    /// peer (the trust bundle's CA scopes already limit peers to the connected clusters).
    pub allowed_clusters: Option<BTreeSet<String>>,
}

impl AccessPolicy {
    /// The policy of cluster `cluster`, allowing every connected peer.
    #[must_use]
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            allowed_clusters: None,
        }
    }

    /// Checks `peer` for `rpc`. `admin_only` RPCs refuse every role but admins.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` without a verified identity, `PERMISSION_DENIED` otherwise.
    pub fn check(
        &self,
        rpc: &str,
        peer: Option<&PeerIdentity>,
        admin_only: bool,
    ) -> Result<(), Refusal> {
        let Some(peer) = peer else {
            return Err(Refusal {
                reason: "no-identity",
                status: Status::unauthenticated(format!(
                    "{rpc}: no verified mesh identity on this connection; connect with a client certificate issued by the mesh CA"
                )),
            });
        };
        if peer.is_admin() {
            return Ok(());
        }
        if admin_only {
            return Err(Refusal {
                reason: "not-admin",
                status: Status::permission_denied(format!(
                    "{rpc} is restricted to admin identities and {peer} is a {} identity; use an admin certificate (spiffe://<trust-domain>/admin/<name>)",
                    peer.kind()
                )),
            });
        }
        let own = peer.cluster_name() == Some(self.cluster.as_str());
        match peer.kind() {
            IdentityKind::Replica => Err(Refusal {
                reason: "replica-identity",
                status: Status::permission_denied(format!(
                    "{rpc}: {peer} is a store replica identity, which may only call the raft port of its cluster"
                )),
            }),
            IdentityKind::Cluster if own => Err(Refusal {
                reason: "own-server-identity",
                status: Status::permission_denied(format!(
                    "{rpc}: {peer} is this cluster's own mesh API server identity; agents must present the agent certificate (spiffe://<trust-domain>/cluster/{}/agent; re-run `clustermesh enable` to issue it)",
                    self.cluster
                )),
            }),
            IdentityKind::Agent if own => Ok(()),
            IdentityKind::Cluster | IdentityKind::Agent => match (&self.allowed_clusters, peer.cluster_name()) {
                (None, Some(_)) => Ok(()),
                (Some(allowed), Some(cluster)) if allowed.contains(cluster) => Ok(()),
                _ => Err(Refusal {
                    reason: "cluster-not-allowed",
                    status: Status::permission_denied(format!(
                        "{rpc}: {peer} is not among the clusters allowed to connect (--allowed-cluster); add it with `clustermesh connect`"
                    )),
                }),
            },
            IdentityKind::Admin => Ok(()),
        }
    }
}

impl AccessPolicy {
    /// Whether `peer` may receive policy records: only this cluster's own agents and
    /// admins (policies are never exported to other clusters).
    #[must_use]
    pub fn may_read_policies(&self, peer: &PeerIdentity) -> bool {
        peer.is_admin()
            || (peer.kind() == IdentityKind::Agent
                && peer.cluster_name() == Some(self.cluster.as_str()))
    }

    /// Which view of the records a Watch by `peer` is served: the full local state for
    /// this cluster's own agents and admins, the exported subset for everyone else.
    #[must_use]
    pub fn viewer(&self, peer: Option<&PeerIdentity>) -> Viewer {
        if peer.is_some_and(|p| self.may_read_policies(p)) {
            Viewer::Own
        } else {
            Viewer::Peer
        }
    }

    /// The kinds a Watch by `peer` for `requested` (empty: every kind) is served.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` when `peer` asks for policies and may not read them.
    pub fn watch_kinds(
        &self,
        peer: Option<&PeerIdentity>,
        requested: BTreeSet<Kind>,
    ) -> Result<BTreeSet<Kind>, Refusal> {
        if peer.is_some_and(|p| self.may_read_policies(p)) {
            return Ok(requested);
        }
        if requested.contains(&Kind::Policy) {
            let who = peer.map_or_else(|| "this caller".to_owned(), ToString::to_string);
            return Err(Refusal {
                reason: "policy-not-exported",
                status: Status::permission_denied(format!(
                    "Watch: {who} may not read policy records: policies are local to cluster {} and served only to its own agents (spiffe://<trust-domain>/cluster/{}/agent) and admins, never to other clusters; leave KIND_POLICY out of the request",
                    self.cluster, self.cluster
                )),
            });
        }
        if requested.is_empty() {
            return Ok(Kind::ALL.into_iter().filter(|k| k.exported()).collect());
        }
        Ok(requested)
    }
}

/// A refused request: the status to return and a metric label.
#[derive(Debug)]
pub struct Refusal {
    /// Metric label.
    pub reason: &'static str,
    /// What the client gets.
    pub status: Status,
}

/// One open Watch stream, for `Status`.
#[derive(Debug)]
struct WatcherInfo {
    peer: String,
    kinds: Vec<Kind>,
    since_unix_ms: u64,
    revision: AtomicU64,
    events_sent: AtomicU64,
    queued: AtomicU64,
}

#[derive(Debug, Default)]
struct WatcherRegistry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<WatcherInfo>>>,
}

impl WatcherRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<WatcherInfo>>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a watcher from the registry when its task ends.
struct WatcherGuard {
    id: u64,
    registry: Arc<WatcherRegistry>,
    metrics: Arc<Metrics>,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
        self.metrics.watcher_delta(-1);
    }
}

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The cluster's configuration record, returned by GetClusterInfo.
    pub cluster_config: v1::ClusterConfig,
    /// Authorization.
    pub policy: AccessPolicy,
    /// Messages buffered per Watch stream between its task and the connection.
    pub stream_buffer: usize,
}

/// The `MeshApi` implementation.
#[derive(Debug, Clone)]
pub struct MeshApiService {
    cache: Arc<Cache>,
    config: Arc<ServiceConfig>,
    metrics: Arc<Metrics>,
    watchers: Arc<WatcherRegistry>,
    shutdown: CancellationToken,
    mirror: Option<MirrorStatus>,
    leader: Option<LeaderStatus>,
}

impl MeshApiService {
    /// A service serving `cache`.
    #[must_use]
    pub fn new(cache: Arc<Cache>, config: ServiceConfig, metrics: Arc<Metrics>) -> Self {
        MeshApiService {
            cache,
            config: Arc::new(config),
            metrics,
            watchers: Arc::default(),
            shutdown: CancellationToken::new(),
            mirror: None,
            leader: None,
        }
    }

    /// Reports the peer mirror's status in `Status`.
    #[must_use]
    pub fn with_mirror(mut self, status: MirrorStatus) -> Self {
        self.mirror = Some(status);
        self
    }

    /// Reports this replica's part in the leader election in `Status`.
    #[must_use]
    pub fn with_leader_status(mut self, leader: LeaderStatus) -> Self {
        self.leader = Some(leader);
        self
    }

    /// Ends every Watch stream when `shutdown` is cancelled (a graceful server shutdown
    /// waits for open streams, which would otherwise never end).
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The tonic server wrapper, ready for `Server::add_service`.
    #[must_use]
    pub fn into_server(self) -> v1::mesh_api_server::MeshApiServer<Self> {
        v1::mesh_api_server::MeshApiServer::new(self).max_decoding_message_size(64 * 1024)
    }

    fn authorize<T>(
        &self,
        rpc: &str,
        request: &Request<T>,
        admin_only: bool,
    ) -> Result<String, Status> {
        let peer = peer_identity(request);
        match self.config.policy.check(rpc, peer, admin_only) {
            Ok(()) => Ok(peer.map(ToString::to_string).unwrap_or_default()),
            Err(refusal) => Err(self.refuse(rpc, request, refusal)),
        }
    }

    /// Logs and counts a refusal; returns the status for the client.
    fn refuse<T>(&self, rpc: &str, request: &Request<T>, refusal: Refusal) -> Status {
        let remote = peer_info(request)
            .map(|info| info.remote_addr)
            .or_else(|| request.remote_addr())
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let peer = peer_identity(request).map_or_else(|| "none".to_owned(), ToString::to_string);
        tracing::warn!(rpc, %peer, %remote, reason = refusal.reason, "request refused");
        self.metrics.refused(rpc, refusal.reason);
        refusal.status
    }
}

/// Proto form of a cache event.
#[must_use]
pub fn to_proto(event: &CacheEvent) -> v1::WatchEvent {
    use v1::watch_event::Event;
    let event = match event {
        CacheEvent::Upsert {
            kind,
            key,
            value,
            revision,
        } => Event::Upsert(v1::Upsert {
            kind: kind.to_proto().into(),
            key: key.to_string(),
            value: value.clone(),
            revision: *revision,
        }),
        CacheEvent::Delete {
            kind,
            key,
            revision,
        } => Event::Delete(v1::Delete {
            kind: kind.to_proto().into(),
            key: key.to_string(),
            revision: *revision,
        }),
        CacheEvent::Synced {
            cluster,
            kind,
            revision,
        } => Event::Synced(v1::Synced {
            kind: kind.to_proto().into(),
            revision: *revision,
            cluster: cluster.to_string(),
        }),
    };
    v1::WatchEvent { event: Some(event) }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[tonic::async_trait]
impl MeshApi for MeshApiService {
    async fn get_cluster_info(
        &self,
        request: Request<v1::GetClusterInfoRequest>,
    ) -> Result<Response<v1::GetClusterInfoResponse>, Status> {
        self.authorize("GetClusterInfo", &request, false)?;
        Ok(Response::new(v1::GetClusterInfoResponse {
            config: Some(self.config.cluster_config.clone()),
            revision: self.cache.snapshot_stats().revision,
        }))
    }

    type WatchStream = ReceiverStream<Result<v1::WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = self.authorize("Watch", &request, false)?;
        let mut requested = BTreeSet::new();
        for raw in &request.get_ref().kinds {
            match Kind::from_proto(*raw) {
                Some(k) => {
                    requested.insert(k);
                }
                None => {
                    return Err(Status::invalid_argument(format!(
                        "Watch: unknown kind {raw}; use KIND_CLUSTER_CONFIG..KIND_POLICY or leave kinds empty for all"
                    )))
                }
            }
        }
        let kinds = self
            .config
            .policy
            .watch_kinds(peer_identity(&request), requested)
            .map_err(|refusal| self.refuse("Watch", &request, refusal))?;
        let mut viewer = self.config.policy.viewer(peer_identity(&request));
        if request.get_ref().all_clusters {
            if viewer != Viewer::Own {
                let refusal = Refusal {
                    reason: "all-clusters-not-own",
                    status: Status::permission_denied(format!(
                        "Watch: all_clusters serves the clusters this server mirrors and is only for cluster {}'s own agents and admins; {peer} must watch without it",
                        self.config.cluster_config.name
                    )),
                };
                return Err(self.refuse("Watch", &request, refusal));
            }
            viewer = Viewer::Mesh;
        }
        let req = request.into_inner();
        let id = self.watchers.next.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(WatcherInfo {
            peer: peer.clone(),
            kinds: kinds.iter().copied().collect(),
            since_unix_ms: unix_ms(),
            revision: AtomicU64::new(req.from_revision),
            events_sent: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        });
        self.watchers.lock().insert(id, Arc::clone(&info));
        self.metrics.watcher_delta(1);
        let guard = WatcherGuard {
            id,
            registry: Arc::clone(&self.watchers),
            metrics: Arc::clone(&self.metrics),
        };
        let subscription = self.cache.subscribe(&kinds, req.from_revision, viewer);
        tracing::info!(%peer, ?viewer, from_revision = req.from_revision, kinds = ?kinds, reset = ?subscription.reset.map(|r| r.0), "watch started");
        let (tx, rx) = mpsc::channel(self.config.stream_buffer.max(1));
        let task = WatchTask {
            cache: Arc::clone(&self.cache),
            kinds,
            viewer,
            tx,
            info,
            metrics: Arc::clone(&self.metrics),
            shutdown: self.shutdown.clone(),
            _guard: guard,
        };
        tokio::spawn(task.run(subscription));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        self.authorize("Status", &request, true)?;
        let stats = self.cache.snapshot_stats();
        let counts = stats
            .counts
            .iter()
            .map(|(kind, count)| v1::KindCount {
                kind: kind.to_proto().into(),
                count: *count as u64,
                synced: stats.synced.contains(kind),
            })
            .collect();
        let watchers = self
            .watchers
            .lock()
            .values()
            .map(|w| v1::WatcherStatus {
                peer: w.peer.clone(),
                kinds: w.kinds.iter().map(|k| k.to_proto().into()).collect(),
                revision: w.revision.load(Ordering::Relaxed),
                events_sent: w.events_sent.load(Ordering::Relaxed),
                queued: w.queued.load(Ordering::Relaxed),
                since_unix_ms: w.since_unix_ms,
            })
            .collect();
        Ok(Response::new(v1::StatusResponse {
            cluster: self.config.cluster_config.name.clone(),
            cluster_id: self.config.cluster_config.id,
            revision: stats.revision,
            counts,
            watchers,
            mirror_peers: self
                .mirror
                .as_ref()
                .map(MirrorStatus::to_proto)
                .unwrap_or_default(),
            mirror_enabled: self.mirror.is_some(),
            leader: self.leader.as_ref().map(|l| {
                let state = l.current();
                v1::LeaderStatus {
                    enabled: true,
                    is_leader: state.is_leader,
                    holder: state.holder.unwrap_or_default(),
                    term: state.token,
                }
            }),
        }))
    }
}

/// The task behind one Watch stream.
struct WatchTask {
    cache: Arc<Cache>,
    kinds: BTreeSet<Kind>,
    viewer: Viewer,
    tx: mpsc::Sender<Result<v1::WatchEvent, Status>>,
    info: Arc<WatcherInfo>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    _guard: WatcherGuard,
}

impl WatchTask {
    async fn run(self, mut subscription: Subscription) {
        loop {
            if let Some((reason, revision)) = subscription.reset {
                self.metrics.watch_reset(reason.as_str());
                tracing::info!(peer = %self.info.peer, reason = reason.as_str(), "watch reset");
                let reset = v1::WatchEvent {
                    event: Some(v1::watch_event::Event::Reset(v1::Reset {
                        revision,
                        reason: reason.as_str().to_owned(),
                    })),
                };
                if !self.send(reset, revision).await {
                    return;
                }
            }
            for event in &subscription.initial {
                if !self.send(to_proto(event), event.revision()).await {
                    return;
                }
            }
            if subscription.complete {
                let complete = v1::WatchEvent {
                    event: Some(v1::watch_event::Event::Complete(v1::StateComplete {
                        revision: subscription.revision,
                    })),
                };
                if !self.send(complete, subscription.revision).await {
                    return;
                }
            }
            self.info
                .revision
                .fetch_max(subscription.revision, Ordering::Relaxed);
            loop {
                let received = tokio::select! {
                    received = subscription.live.recv() => received,
                    () = self.tx.closed() => return,
                    () = self.shutdown.cancelled() => return,
                };
                match received {
                    Ok(fanout) => {
                        let event = fanout.event;
                        if !fanout.audience.includes(self.viewer)
                            || (!self.kinds.is_empty() && !self.kinds.contains(&event.kind()))
                        {
                            continue;
                        }
                        self.info
                            .queued
                            .store(subscription.live.len() as u64, Ordering::Relaxed);
                        if !self.send(to_proto(&event), event.revision()).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(peer = %self.info.peer, missed, "watcher fell behind the lag bound; resetting it");
                        subscription = self.cache.resubscribe_after_lag(&self.kinds, self.viewer);
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }

    /// Sends one event; false when the client is gone.
    async fn send(&self, event: v1::WatchEvent, revision: u64) -> bool {
        let sent = tokio::select! {
            sent = self.tx.send(Ok(event)) => sent.is_ok(),
            () = self.shutdown.cancelled() => false,
        };
        if !sent {
            tracing::debug!(peer = %self.info.peer, "watch stream ended (client gone or shutdown)");
            return false;
        }
        self.info.events_sent.fetch_add(1, Ordering::Relaxed);
        self.info.revision.fetch_max(revision, Ordering::Relaxed);
        self.metrics.events_sent(1);
        true
    }
}
