//! One running replica: the openraft instance, its storage, the RPC server, the lease
//! timer, and the client paths (write batching and forwarding, read index) the
//! [`super::RaftStore`] handle uses.
//!
//! Write batching: openraft 0.9 appends one client proposal at a time and waits for its
//! fsync before taking the next, so proposing every put on its own caps throughput at
//! one fsync per write. Instead, writes queue per replica and a small number of proposer
//! tasks ([`RaftConfig::proposers`]) each take everything queued into one
//! [`Command::Batch`] entry: under load one append, one fsync and one replication round
//! carry many writes, while a lone write still goes out immediately.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_certs::PeerIdentity;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::Status;

use super::command::{Command, CommandResponse};
use super::config::{NodeId, RaftConfig};
use super::dir_lock::DirLock;
use super::keyspace::HistoryLimits;
use super::leases::LeaseDeadlines;
use super::log_store::LogStore;
use super::network::{Network, NetworkFaults, PeerError, Peers};
use super::record;
use super::rpc::{Frame, Handler, Method, RaftService};
use super::state_machine::{SharedState, StateMachine};
use super::tls::ReplicaTls;
use super::TypeConfig;
use crate::{LeaseId, StoreError};

/// Answer of a forwarded request when the receiving replica cannot serve it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardError {
    /// The receiver is not the leader (it names the leader if it knows one).
    NotLeader,
    /// The receiver is stopping or lost quorum.
    Unavailable(String),
    /// The lease does not exist.
    LeaseNotFound,
}

/// A replica's answer to a status request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The replica's node id.
    pub node_id: NodeId,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Its current raft term.
    pub term: u64,
    /// Index of the last log entry it applied.
    pub applied_index: Option<u64>,
    /// The store revision it has applied.
    pub revision: crate::Revision,
}

/// Asks the replica at `addr` for its status, over mTLS with `tls` (or plaintext with
/// `None`), presenting this process as node `0`. Fails with
/// [`StoreError::Unavailable`] when the peer cannot be reached, refuses the TLS handshake,
/// or refuses our identity.
pub async fn peer_status(
    addr: &str,
    tls: Option<ReplicaTls>,
    timeout: Duration,
) -> Result<PeerStatus, StoreError> {
    let peers = Peers::new(0, tls, Arc::new(NetworkFaults::new()), timeout);
    peers
        .call(u64::MAX, addr, Method::Status, &(), Some(timeout))
        .await
        .map_err(|e| unavailable(e.to_string()))
}

/// Sends `cmd` as a forwarded client write (the raft port's `Write` RPC) to the replica
/// at `addr`, presenting `tls`: what a follower does for its clients, and what an
/// attacker holding some certificate would try. Used by the security tests.
///
/// # Errors
/// [`StoreError::Unavailable`] when the call is refused or fails, naming why.
pub async fn peer_write(
    addr: &str,
    tls: Option<ReplicaTls>,
    cmd: Command,
    timeout: Duration,
) -> Result<CommandResponse, StoreError> {
    let peers = Peers::new(0, tls, Arc::new(NetworkFaults::new()), timeout);
    let answer: Result<CommandResponse, ForwardError> = peers
        .call(u64::MAX, addr, Method::Write, &cmd, Some(timeout))
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    answer.map_err(|e| unavailable(format!("write not applied: {e:?}")))
}

/// A running replica.
pub struct Replica {
    id: NodeId,
    addr: SocketAddr,
    config: RaftConfig,
    raft: Raft<TypeConfig>,
    shared: Arc<SharedState>,
    peers: Arc<Peers>,
    leases: LeaseDeadlines,
    stopped: AtomicBool,
    batch_tx: mpsc::Sender<Pending>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    server_stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Exclusive hold on `config.data_dir`, released once the raft core has stopped.
    dir_lock: Mutex<Option<DirLock>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .field("stopped", &self.stopped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn unavailable(msg: impl Into<String>) -> StoreError {
    StoreError::Unavailable(msg.into())
}

impl Replica {
    /// Starts a replica, binding `config.listen`.
    ///
    /// The replica holds an exclusive lock on `config.data_dir` until it is shut down (or
    /// dropped); if another replica, in this process or another, holds it, this fails at
    /// once with [`StoreError::DataDirInUse`].
    pub async fn start(config: RaftConfig) -> Result<Arc<Replica>, StoreError> {
        // Lock first: a second apiserver on the same directory is told so, rather than
        // about the (probably also taken) raft port.
        let lock = DirLock::acquire(&config.data_dir)?;
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            unavailable(format!(
                "cannot listen for raft peers on {}: {e}; pick a free address",
                config.listen
            ))
        })?;
        Self::start_locked(config, listener, lock).await
    }

    /// Starts a replica serving peers on an already bound listener; the data directory is
    /// locked as in [`Replica::start`].
    pub async fn start_with_listener(
        config: RaftConfig,
        listener: TcpListener,
    ) -> Result<Arc<Replica>, StoreError> {
        let lock = DirLock::acquire(&config.data_dir)?;
        Self::start_locked(config, listener, lock).await
    }

    async fn start_locked(
        config: RaftConfig,
        listener: TcpListener,
        lock: DirLock,
    ) -> Result<Arc<Replica>, StoreError> {
        let addr = listener.local_addr()?;
        let raft_config = config
            .openraft_config()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let limits = HistoryLimits {
            max_events: config.history_max_events,
            max_bytes: config.history_max_bytes,
        };
        let log = LogStore::open(&config.data_dir.join("log"), config.segment_bytes)?;
        let sm = StateMachine::open(&config.data_dir.join("snapshot"), limits)?;
        let shared = sm.shared();
        let faults = config
            .faults
            .clone()
            .unwrap_or_else(|| Arc::new(NetworkFaults::new()));
        let peers = Arc::new(Peers::new(
            config.node_id,
            config.tls.clone(),
            faults,
            Duration::from_secs(5),
        ));
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            Network::new(peers.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| {
            StoreError::Backend(format!(
                "raft replica {} failed to start: {e}",
                config.node_id
            ))
        })?;

        let (batch_tx, batch_rx) = mpsc::channel::<Pending>(BATCH_QUEUE);
        let replica = Arc::new(Replica {
            id: config.node_id,
            addr,
            config: config.clone(),
            raft,
            shared,
            peers,
            leases: LeaseDeadlines::default(),
            stopped: AtomicBool::new(false),
            batch_tx,
            tasks: Mutex::new(Vec::new()),
            server_stop: Mutex::new(None),
            dir_lock: Mutex::new(Some(lock)),
        });

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let service = RaftService::new(Arc::new(RpcHandler(Arc::downgrade(&replica))));
        let id = replica.id;
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(service);
        let stop = async {
            let _ = stop_rx.await;
        };
        let server_task = match &config.tls {
            Some(tls) => {
                let incoming = clustermesh_certs::transport::incoming(
                    listener,
                    tls.source().clone(),
                    clustermesh_certs::transport::IncomingConfig::default(),
                );
                let server = router.serve_with_incoming_shutdown(incoming, stop);
                tokio::spawn(async move {
                    if let Err(e) = server.await {
                        tracing::error!(node = id, error = %e, "raft RPC server failed");
                    }
                })
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let server = router.serve_with_incoming_shutdown(incoming, stop);
                tokio::spawn(async move {
                    if let Err(e) = server.await {
                        tracing::error!(node = id, error = %e, "raft RPC server failed");
                    }
                })
            }
        };
        let lease_task = tokio::spawn(lease_loop(Arc::downgrade(&replica)));
        let batch_rx = Arc::new(tokio::sync::Mutex::new(batch_rx));
        {
            let mut tasks = replica.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.push(server_task);
            tasks.push(lease_task);
            for _ in 0..config.proposers.max(1) {
                tasks.push(tokio::spawn(proposer_loop(
                    Arc::downgrade(&replica),
                    batch_rx.clone(),
                )));
            }
        }
        *replica
            .server_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(stop_tx);

        if config.bootstrap && config.members.keys().next() == Some(&config.node_id) {
            let initialized = replica
                .raft
                .is_initialized()
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            if !initialized {
                let members: BTreeMap<NodeId, BasicNode> = config
                    .members
                    .iter()
                    .map(|(id, a)| (*id, BasicNode::new(a.clone())))
                    .collect();
                tracing::info!(node = id, members = ?config.members, "initializing a new raft cluster");
                if let Err(e) = replica.raft.initialize(members).await {
                    tracing::warn!(node = id, error = %e, "raft initialize refused (already initialized elsewhere?)");
                }
            }
        }
        tracing::info!(node = id, %addr, "raft replica started");
        Ok(replica)
    }

    /// This replica's id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Address the RPC server listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration it was started with.
    #[must_use]
    pub fn config(&self) -> &RaftConfig {
        &self.config
    }

    /// The openraft handle (metrics, membership).
    #[must_use]
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    pub(crate) fn shared(&self) -> &Arc<SharedState> {
        &self.shared
    }

    /// The leader this replica currently knows of.
    #[must_use]
    pub fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Whether this replica is the leader right now (by its own view).
    #[must_use]
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    fn check_running(&self) -> Result<(), StoreError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(unavailable(format!("raft replica {} is stopped", self.id)));
        }
        Ok(())
    }

    fn leader_addr(&self, leader: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// Writes `cmd` through the log: it joins the next batch this replica proposes.
    pub(crate) async fn write(&self, cmd: Command) -> Result<CommandResponse, StoreError> {
        self.check_running()?;
        let (tx, rx) = oneshot::channel();
        self.batch_tx
            .send((cmd, tx))
            .await
            .map_err(|_| unavailable(format!("raft replica {} is stopped", self.id)))?;
        rx.await.map_err(|_| {
            unavailable(format!(
                "raft replica {} stopped before answering; the write may or may not have been applied",
                self.id
            ))
        })?
    }

    /// Proposes `cmd` as one log entry, forwarding to the leader if this replica is a
    /// follower.
    async fn propose(&self, cmd: Command) -> Result<CommandResponse, StoreError> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let retry_on_transport = cmd.retry_safe();
        loop {
            self.check_running()?;
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(format!(
                    "no raft leader accepted the write within {:?}; retry later",
                    self.config.request_timeout
                )));
            }
            // Bounded: a leader cut off from its quorum keeps a proposal pending until it
            // learns of a newer term, which must not block the caller past its deadline.
            let Ok(written) =
                tokio::time::timeout_at(deadline, self.raft.client_write(cmd.clone())).await
            else {
                return Err(unavailable(format!(
                    "raft replica {} did not commit the write within {:?}; it may or may not be applied, check before retrying",
                    self.id, self.config.request_timeout
                )));
            };
            match written {
                Ok(resp) => return Ok(resp.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    let Some(leader) = f.leader_id.filter(|l| *l != self.id) else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let Some(addr) = f
                        .leader_node
                        .map(|n| n.addr)
                        .or_else(|| self.leader_addr(leader))
                    else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let answer: Result<Result<CommandResponse, ForwardError>, PeerError> = self
                        .peers
                        .call(
                            leader,
                            &addr,
                            Method::Write,
                            &cmd,
                            Some(self.config.request_timeout),
                        )
                        .await;
                    match answer {
                        Ok(Ok(resp)) => return Ok(resp),
                        Ok(Err(ForwardError::NotLeader)) | Err(PeerError::NotSent { .. }) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(Err(ForwardError::Unavailable(msg))) => return Err(unavailable(msg)),
                        Ok(Err(ForwardError::LeaseNotFound)) => {
                            return Err(StoreError::Backend("unexpected lease answer to a write".into()))
                        }
                        Err(e) if retry_on_transport => {
                            tracing::debug!(error = %e, "forwarded write failed; retrying");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => {
                            return Err(unavailable(format!(
                                "{e}; the write may or may not have been applied, check before retrying"
                            )))
                        }
                    }
                }
                Err(RaftError::APIError(e)) => return Err(StoreError::Backend(e.to_string())),
                Err(RaftError::Fatal(e)) => {
                    return Err(unavailable(format!(
                        "raft replica {} stopped: {e}",
                        self.id
                    )))
                }
            }
        }
    }

    /// Waits until this replica has applied everything committed when the call began,
    /// confirming with the leader (ReadIndex): after it returns, local reads are
    /// linearizable.
    pub(crate) async fn read_barrier(&self) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        loop {
            self.check_running()?;
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(format!(
                    "no raft leader confirmed a read within {:?}; retry later",
                    self.config.request_timeout
                )));
            }
            match self.raft.ensure_linearizable().await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    let target = f.leader_id.filter(|l| *l != self.id).and_then(|l| {
                        f.leader_node
                            .map(|n| n.addr)
                            .or_else(|| self.leader_addr(l))
                            .map(|a| (l, a))
                    });
                    let Some((leader, addr)) = target else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    let answer: Result<Result<u64, ForwardError>, PeerError> = self
                        .peers
                        .call(
                            leader,
                            &addr,
                            Method::ReadIndex,
                            &(),
                            Some(self.config.request_timeout),
                        )
                        .await;
                    match answer {
                        Ok(Ok(index)) => {
                            let remaining =
                                deadline.saturating_duration_since(tokio::time::Instant::now());
                            return self
                                .raft
                                .wait(Some(remaining))
                                .applied_index_at_least(Some(index), "read index")
                                .await
                                .map(|_| ())
                                .map_err(|e| unavailable(format!("replica {} did not catch up with the leader for a read: {e}", self.id)));
                        }
                        Ok(Err(ForwardError::Unavailable(msg))) => return Err(unavailable(msg)),
                        Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(RaftError::Fatal(e)) => {
                    return Err(unavailable(format!(
                        "raft replica {} stopped: {e}",
                        self.id
                    )))
                }
            }
        }
    }

    /// Refreshes a lease on the leader; returns its TTL.
    pub(crate) async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        loop {
            self.check_running()?;
            if self.is_leader() {
                match self.keep_alive_as_leader(lease).await {
                    Err(ForwardError::NotLeader) => {}
                    Ok(ttl) => return Ok(ttl),
                    Err(ForwardError::LeaseNotFound) => {
                        return Err(StoreError::LeaseNotFound(lease))
                    }
                    Err(ForwardError::Unavailable(m)) => return Err(unavailable(m)),
                }
            } else if let Some(leader) = self.current_leader().filter(|l| *l != self.id) {
                if let Some(addr) = self.leader_addr(leader) {
                    let answer: Result<Result<u64, ForwardError>, PeerError> = self
                        .peers
                        .call(
                            leader,
                            &addr,
                            Method::KeepAlive,
                            &lease,
                            Some(self.config.request_timeout),
                        )
                        .await;
                    match answer {
                        Ok(Ok(ms)) => return Ok(Duration::from_millis(ms)),
                        Ok(Err(ForwardError::LeaseNotFound)) => {
                            return Err(StoreError::LeaseNotFound(lease))
                        }
                        Ok(Err(ForwardError::Unavailable(m))) => return Err(unavailable(m)),
                        Ok(Err(ForwardError::NotLeader)) | Err(_) => {}
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(unavailable(format!(
                    "no raft leader answered the lease keep-alive within {:?}",
                    self.config.request_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn keep_alive_as_leader(&self, lease: LeaseId) -> Result<Duration, ForwardError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => {}
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                return Err(ForwardError::NotLeader)
            }
            Err(e) => return Err(ForwardError::Unavailable(e.to_string())),
        }
        let ttl = self.shared.read().ks.lease_ttl(lease);
        match ttl {
            Some(ms) => {
                let ttl = Duration::from_millis(ms);
                self.leases.refresh(lease, ttl);
                Ok(ttl)
            }
            None => Err(ForwardError::LeaseNotFound),
        }
    }

    /// Adds a replica at runtime: first as a learner that catches up, then as a voter.
    /// Must be called on the leader.
    pub async fn add_voter(&self, id: NodeId, addr: impl Into<String>) -> Result<(), StoreError> {
        self.check_running()?;
        let node = BasicNode::new(addr.into());
        self.raft.add_learner(id, node, true).await.map_err(|e| {
            StoreError::Backend(format!("adding replica {id} as a learner failed: {e}"))
        })?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| {
                StoreError::Backend(format!("promoting replica {id} to voter failed: {e}"))
            })?;
        tracing::info!(node = self.id, added = id, "replica added as a voter");
        Ok(())
    }

    /// Removes a replica from the voters (and the cluster) at runtime. Must be called on
    /// the leader.
    pub async fn remove_voter(&self, id: NodeId) -> Result<(), StoreError> {
        self.check_running()?;
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| StoreError::Backend(format!("removing replica {id} failed: {e}")))?;
        tracing::info!(
            node = self.id,
            removed = id,
            "replica removed from the voters"
        );
        Ok(())
    }

    /// Stops the replica without waiting (for `Drop`): the RPC server and lease timer are
    /// told to stop and the raft core shuts down in the background; the data directory's
    /// lock is released once it has.
    pub fn stop_now(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(tx) = self
            .server_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = tx.send(());
        }
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.shared.close();
        let lock = self.take_dir_lock();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let raft = self.raft.clone();
            handle.spawn(async move {
                let _ = raft.shutdown().await;
                // Only now has the raft core stopped writing the data directory.
                drop(lock);
            });
        }
    }

    fn take_dir_lock(&self) -> Option<DirLock> {
        self.dir_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Stops the replica: raft, RPC server, lease timer; open watches end with
    /// [`StoreError::Unavailable`]. Its data directory can be opened again afterwards.
    pub async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(node = self.id, error = %e, "raft core ended with an error");
        }
        if let Some(tx) = self
            .server_stop
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = tx.send(());
        }
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for mut t in tasks {
            if tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
        self.shared.close();
        drop(self.take_dir_lock());
        tracing::info!(node = self.id, "raft replica stopped");
    }
}

/// A client write waiting for its batch.
type Pending = (
    Command,
    oneshot::Sender<Result<CommandResponse, StoreError>>,
);

/// Writes queued per replica before `write` waits for room.
const BATCH_QUEUE: usize = 8192;
/// Most commands in one batch entry.
const MAX_BATCH: usize = 512;
/// Batch size (approximate bytes) after which no more commands are added.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The same error for every waiter of a failed batch.
fn copy_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::LeaseNotFound(l) => StoreError::LeaseNotFound(*l),
        StoreError::Backend(s) => StoreError::Backend(s.clone()),
        other => StoreError::Backend(other.to_string()),
    }
}

/// Takes every queued write (up to the batch limits) and proposes them as one entry.
/// Several proposers run per replica, so a new batch can be appended while earlier ones
/// are still replicating.
async fn proposer_loop(
    replica: std::sync::Weak<Replica>,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>,
) {
    loop {
        let batch = {
            let mut rx = queue.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut size = first.0.size();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && size < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(next) => {
                        size += next.0.size();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let Some(r) = replica.upgrade() else { return };
        let (cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        if cmds.len() == 1 {
            for (cmd, reply) in cmds.into_iter().zip(replies) {
                let _ = reply.send(r.propose(cmd).await);
            }
            continue;
        }
        let n = cmds.len();
        match r.propose(Command::Batch(cmds)).await {
            Ok(CommandResponse::Batch(answers)) if answers.len() == n => {
                for (answer, reply) in answers.into_iter().zip(replies) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Ok(other) => {
                let e = StoreError::Backend(format!(
                    "raft state machine answered a batch of {n} with {other:?}"
                ));
                for reply in replies {
                    let _ = reply.send(Err(copy_error(&e)));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(copy_error(&e)));
                }
            }
        }
    }
}

/// Proposes `ExpireLease` for leases whose deadline passed, while this replica leads.
async fn lease_loop(replica: std::sync::Weak<Replica>) {
    let interval = match replica.upgrade() {
        Some(r) => r.config.lease_check_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = replica.upgrade() else { return };
        if r.stopped.load(Ordering::SeqCst) {
            return;
        }
        if r.shared.bytes_since_snapshot() >= r.config.snapshot_bytes {
            // Bounds log size by bytes too (the entry-count policy alone cannot, since a
            // batch entry may carry megabytes).
            let _ = r.raft.trigger().snapshot().await;
        }
        let m = r.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_leader != Some(r.id) {
            r.leases.clear();
            continue;
        }
        let leases: Vec<(LeaseId, u64)> = r.shared.read().ks.leases().collect();
        let expired = r
            .leases
            .sync(m.current_term, &leases, tokio::time::Instant::now());
        for lease in expired {
            tracing::debug!(
                node = r.id,
                lease,
                "lease deadline passed; proposing expiry"
            );
            match r.raft.client_write(Command::ExpireLease { lease }).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(node = r.id, lease, error = %e, "lease expiry not committed; will retry");
                    break;
                }
            }
        }
    }
}

/// Serves the replica RPCs.
#[derive(Debug)]
struct RpcHandler(std::sync::Weak<Replica>);

fn answer<T: Serialize>(me: NodeId, value: &T) -> Result<Frame, Status> {
    let payload = record::encode(value)
        .map_err(|e| Status::internal(format!("cannot encode answer: {e}")))?;
    Ok(Frame { from: me, payload })
}

fn request<T: serde::de::DeserializeOwned>(frame: &Frame) -> Result<T, Status> {
    record::decode(&frame.payload)
        .map_err(|e| Status::invalid_argument(format!("request does not decode: {e}")))
}

impl Handler for RpcHandler {
    async fn handle(
        &self,
        method: Method,
        frame: Frame,
        peer: Option<PeerIdentity>,
    ) -> Result<Frame, Status> {
        let Some(r) = self.0.upgrade() else {
            return Err(Status::unavailable("raft replica stopped"));
        };
        if r.stopped.load(Ordering::SeqCst) {
            return Err(Status::unavailable("raft replica stopped"));
        }
        if let Some(tls) = &r.config.tls {
            tls.authorize(peer.as_ref())?;
        }
        if r.peers.faults().blocks(frame.from, r.id) {
            return Err(Status::unavailable("network partitioned (fault injection)"));
        }
        let me = r.id;
        match method {
            Method::AppendEntries => {
                let req = request(&frame)?;
                answer(me, &r.raft.append_entries(req).await)
            }
            Method::Vote => {
                let req = request(&frame)?;
                answer(me, &r.raft.vote(req).await)
            }
            Method::InstallSnapshot => {
                let req = request(&frame)?;
                answer(me, &r.raft.install_snapshot(req).await)
            }
            Method::Write => {
                let cmd: Command = request(&frame)?;
                let res: Result<CommandResponse, ForwardError> =
                    match r.raft.client_write(cmd).await {
                        Ok(resp) => Ok(resp.data),
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                            Err(ForwardError::NotLeader)
                        }
                        Err(e) => Err(ForwardError::Unavailable(e.to_string())),
                    };
                answer(me, &res)
            }
            Method::ReadIndex => {
                let res: Result<u64, ForwardError> = match r.raft.ensure_linearizable().await {
                    Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                        Err(ForwardError::NotLeader)
                    }
                    Err(e) => Err(ForwardError::Unavailable(e.to_string())),
                };
                answer(me, &res)
            }
            Method::Status => {
                let m = r.raft.metrics().borrow().clone();
                let status = PeerStatus {
                    node_id: me,
                    leader: m.current_leader,
                    term: m.current_term,
                    applied_index: m.last_applied.map(|l| l.index),
                    revision: r.shared.read().ks.revision(),
                };
                answer(me, &status)
            }
            Method::KeepAlive => {
                let lease: LeaseId = request(&frame)?;
                let res = r
                    .keep_alive_as_leader(lease)
                    .await
                    .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                answer(me, &res)
            }
        }
    }
}
