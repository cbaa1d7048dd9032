//! Starting and stopping a [`Replica`]: the raft core over the durable log and state
//! machine, the RPC server on the raft port, the proposers and the ticker; and what the
//! replica reports about itself (id, address, leader).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{Raft, ServerState};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::proposer::{proposer_loop, Pending, BATCH_QUEUE};
use super::service::RpcHandler;
use super::ticker::ticker_loop;
use super::{unavailable, Replica};
use crate::raft::config::{NodeId, RaftConfig};
use crate::raft::dir_lock::DirLock;
use crate::raft::keyspace::HistoryLimits;
use crate::raft::leases::LeaseDeadlines;
use crate::raft::log_store::LogStore;
use crate::raft::network::{Network, NetworkFaults, Peers};
use crate::raft::rpc::RaftService;
use crate::raft::state_machine::{SharedState, StateMachine};
use crate::raft::TypeConfig;
use crate::StoreError;

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
        let service = RaftService::serving(Arc::new(RpcHandler(Arc::downgrade(&replica))));
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
        let ticker_task = tokio::spawn(ticker_loop(Arc::downgrade(&replica)));
        let batch_rx = Arc::new(tokio::sync::Mutex::new(batch_rx));
        {
            let mut tasks = replica.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.push(server_task);
            tasks.push(ticker_task);
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

        replica.bootstrap_if_first().await?;
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

    pub(super) fn check_running(&self) -> Result<(), StoreError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(unavailable(format!("raft replica {} is stopped", self.id)));
        }
        Ok(())
    }

    pub(super) fn leader_addr(&self, leader: NodeId) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// Stops the replica without waiting (for `Drop`): the RPC server and ticker are
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

    /// Stops the replica: raft, RPC server, ticker; open watches end with
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
