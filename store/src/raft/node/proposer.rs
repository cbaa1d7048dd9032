//! The write path. Writes queue per replica and a small number of proposer tasks
//! ([`RaftConfig::proposers`](crate::raft::RaftConfig::proposers)) each take everything
//! queued into one [`Command::Batch`] entry.
//!
//! Why batch: openraft 0.9 appends one client proposal at a time and waits for its fsync
//! before taking the next, so proposing every put on its own caps throughput at one fsync
//! per write. Batched, under load one append, one fsync and one replication round carry
//! many writes, while a lone write still goes out immediately. A follower forwards its
//! batches to the leader over the raft port's `Write` RPC.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};

use super::{unavailable, ForwardError, Replica};
use crate::raft::command::{Command, CommandResponse};
use crate::raft::network::PeerError;
use crate::raft::rpc::Method;
use crate::StoreError;

impl Replica {
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
    pub(super) async fn propose(&self, cmd: Command) -> Result<CommandResponse, StoreError> {
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
}

/// A client write waiting for its batch.
pub(super) type Pending = (
    Command,
    oneshot::Sender<Result<CommandResponse, StoreError>>,
);

/// Writes queued per replica before `write` waits for room.
pub(super) const BATCH_QUEUE: usize = 8192;
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
pub(super) async fn proposer_loop(
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
