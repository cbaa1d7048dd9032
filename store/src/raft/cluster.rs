//! [`LocalCluster`]: N replicas in one process on loopback ephemeral ports, for tests,
//! benchmarks and the demo, with the faults the fault tests inject (stop, restart from
//! disk, partition, heal).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;

use super::config::{NodeId, RaftConfig, RaftConfigBuilder};
use super::network::NetworkFaults;
use super::node::Replica;
use super::store::RaftStore;
use super::tls::ReplicaTls;
use crate::StoreError;

#[derive(Debug)]
struct Slot {
    id: NodeId,
    addr: SocketAddr,
    config: RaftConfig,
    replica: Option<Arc<Replica>>,
}

/// A cluster of in-process replicas on 127.0.0.1. Replica `i` (0-based) has node id
/// `i + 1` and keeps its data in `<base_dir>/replica-<id>`.
#[derive(Debug)]
pub struct LocalCluster {
    base_dir: PathBuf,
    faults: Arc<NetworkFaults>,
    slots: Mutex<Vec<Slot>>,
    tune: fn(RaftConfigBuilder) -> RaftConfigBuilder,
    tls: Option<ReplicaTls>,
}

fn keep(b: RaftConfigBuilder) -> RaftConfigBuilder {
    b
}

impl LocalCluster {
    /// Starts `n` replicas (1, 3 or 5) with default settings, over mTLS with `tls` (or
    /// plaintext gRPC with `None`), and waits for a leader.
    pub async fn start(
        n: usize,
        base_dir: &Path,
        tls: Option<ReplicaTls>,
    ) -> Result<LocalCluster, StoreError> {
        Self::start_with(n, base_dir, tls, keep).await
    }

    /// Starts `n` replicas, letting `tune` adjust each replica's configuration (timing,
    /// snapshot interval, history size), and waits for a leader.
    pub async fn start_with(
        n: usize,
        base_dir: &Path,
        tls: Option<ReplicaTls>,
        tune: fn(RaftConfigBuilder) -> RaftConfigBuilder,
    ) -> Result<LocalCluster, StoreError> {
        let faults = Arc::new(NetworkFaults::new());
        let mut listeners = Vec::with_capacity(n);
        for _ in 0..n {
            listeners.push(TcpListener::bind(("127.0.0.1", 0)).await?);
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(TcpListener::local_addr)
            .collect::<Result<_, _>>()?;
        let mut slots = Vec::with_capacity(n);
        for (i, listener) in listeners.into_iter().enumerate() {
            let id = i as NodeId + 1;
            let mut b = RaftConfig::builder(id, base_dir.join(format!("replica-{id}")))
                .listen(addrs[i])
                .faults(faults.clone());
            if let Some(tls) = &tls {
                b = b.tls(tls.clone());
            }
            for (j, a) in addrs.iter().enumerate() {
                b = b.member(j as NodeId + 1, a.to_string());
            }
            let config = tune(b)
                .build()
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let replica = Replica::start_with_listener(config.clone(), listener).await?;
            slots.push(Slot {
                id,
                addr: addrs[i],
                config,
                replica: Some(replica),
            });
        }
        let cluster = LocalCluster {
            base_dir: base_dir.to_path_buf(),
            faults,
            slots: Mutex::new(slots),
            tune,
            tls,
        };
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of replica slots (running or stopped).
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    /// Whether the cluster has no replicas.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Node id of replica `i`.
    #[must_use]
    pub fn node_id(&self, i: usize) -> Option<NodeId> {
        self.slots().get(i).map(|s| s.id)
    }

    /// Data directory of replica `i`.
    #[must_use]
    pub fn data_dir(&self, i: usize) -> Option<PathBuf> {
        self.slots().get(i).map(|s| s.config.data_dir.clone())
    }

    /// The running replica `i`.
    #[must_use]
    pub fn replica(&self, i: usize) -> Option<Arc<Replica>> {
        self.slots().get(i).and_then(|s| s.replica.clone())
    }

    /// A [`RaftStore`] on the running replica `i`.
    #[must_use]
    pub fn store(&self, i: usize) -> Option<RaftStore> {
        self.replica(i).map(RaftStore::new)
    }

    /// Indexes of the running replicas.
    #[must_use]
    pub fn running(&self) -> Vec<usize> {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.replica.is_some())
            .map(|(i, _)| i)
            .collect()
    }

    /// The replica that leads right now and is not partitioned away, if any.
    #[must_use]
    pub fn leader(&self) -> Option<usize> {
        let slots = self.slots();
        let mut best: Option<(u64, usize)> = None;
        for (i, s) in slots.iter().enumerate() {
            let Some(r) = &s.replica else { continue };
            if self.faults.blocks(s.id, s.id) || !r.is_leader() {
                continue;
            }
            let term = r.raft().metrics().borrow().current_term;
            if best.is_none_or(|(t, _)| term > t) {
                best = Some((term, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Waits until a leader exists.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<usize, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader() {
                return Ok(i);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "no raft leader elected within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops replica `i` (its data stays on disk).
    pub async fn kill(&self, i: usize) {
        let replica = self.slots().get_mut(i).and_then(|s| s.replica.take());
        if let Some(r) = replica {
            r.shutdown().await;
        }
    }

    /// Starts the stopped replica `i` again from its data directory, on the same address.
    pub async fn restart(&self, i: usize) -> Result<(), StoreError> {
        let (config, addr) = {
            let slots = self.slots();
            let s = slots
                .get(i)
                .ok_or_else(|| StoreError::Backend(format!("no replica slot {i}")))?;
            if s.replica.is_some() {
                return Ok(());
            }
            (s.config.clone(), s.addr)
        };
        let listener = bind_retry(addr).await?;
        let replica = Replica::start_with_listener(config, listener).await?;
        if let Some(s) = self.slots().get_mut(i) {
            s.replica = Some(replica);
        }
        Ok(())
    }

    /// Drops every RPC to and from replica `i` until [`LocalCluster::heal`].
    pub fn partition(&self, i: usize) {
        if let Some(id) = self.node_id(i) {
            self.faults.isolate(id);
        }
    }

    /// Reconnects replica `i`.
    pub fn heal(&self, i: usize) {
        if let Some(id) = self.node_id(i) {
            self.faults.heal(id);
        }
    }

    /// Starts a new replica and adds it to the cluster (learner, then voter); returns its
    /// index.
    pub async fn add_replica(&self) -> Result<usize, StoreError> {
        let leader = self.wait_for_leader(Duration::from_secs(10)).await?;
        let leader = self
            .replica(leader)
            .ok_or_else(|| StoreError::Unavailable("leader stopped".into()))?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (i, id) = {
            let slots = self.slots();
            (
                slots.len(),
                slots.iter().map(|s| s.id).max().unwrap_or(0) + 1,
            )
        };
        let mut b = RaftConfig::builder(id, self.base_dir.join(format!("replica-{id}")))
            .listen(addr)
            .bootstrap(false)
            .faults(self.faults.clone());
        if let Some(tls) = &self.tls {
            b = b.tls(tls.clone());
        }
        let config = (self.tune)(b)
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let replica = Replica::start_with_listener(config.clone(), listener).await?;
        self.slots().push(Slot {
            id,
            addr,
            config,
            replica: Some(replica),
        });
        leader.add_voter(id, addr.to_string()).await?;
        Ok(i)
    }

    /// Removes replica `i` from the voters and stops it.
    pub async fn remove_replica(&self, i: usize) -> Result<(), StoreError> {
        let id = self
            .node_id(i)
            .ok_or_else(|| StoreError::Backend(format!("no replica slot {i}")))?;
        let leader = self.wait_for_leader(Duration::from_secs(10)).await?;
        let leader = self
            .replica(leader)
            .ok_or_else(|| StoreError::Unavailable("leader stopped".into()))?;
        leader.remove_voter(id).await?;
        self.kill(i).await;
        Ok(())
    }

    /// Stops every replica.
    pub async fn shutdown(&self) {
        for i in 0..self.len() {
            self.kill(i).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for s in self.slots().iter_mut() {
            if let Some(r) = s.replica.take() {
                r.stop_now();
            }
        }
    }
}

async fn bind_retry(addr: SocketAddr) -> Result<TcpListener, StoreError> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(StoreError::Unavailable(format!(
        "cannot listen on {addr} again after a restart: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    )))
}
