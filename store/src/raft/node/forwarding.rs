//! The follower-to-leader paths other than writes: ReadIndex confirmation for
//! linearizable reads and lease keep-alives (a lease deadline lives on the leader); and
//! the one-shot calls a status tool or a test makes to a replica's raft port.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use serde::{Deserialize, Serialize};

use super::{unavailable, ForwardError, Replica};
use crate::raft::command::{Command, CommandResponse};
use crate::raft::config::NodeId;
use crate::raft::network::{NetworkFaults, PeerError, Peers};
use crate::raft::rpc::Method;
use crate::raft::tls::ReplicaTls;
use crate::{LeaseId, StoreError};

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

impl Replica {
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

    pub(super) async fn keep_alive_as_leader(
        &self,
        lease: LeaseId,
    ) -> Result<Duration, ForwardError> {
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
}
