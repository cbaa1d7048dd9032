//! What a replica answers on the raft port: the openraft RPCs from its peers and the
//! requests followers forward to the leader, each after the caller's certificate was
//! checked ([`ReplicaTls::authorize`](crate::raft::ReplicaTls)) and the fault switch
//! consulted.

use std::sync::atomic::Ordering;

use clustermesh_certs::PeerIdentity;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use serde::Serialize;
use tonic::Status;

use super::{ForwardError, PeerStatus, Replica};
use crate::raft::command::{Command, CommandResponse};
use crate::raft::config::NodeId;
use crate::raft::record;
use crate::raft::rpc::{Frame, Handler, Method};
use crate::LeaseId;

/// Serves the replica RPCs.
#[derive(Debug)]
pub(super) struct RpcHandler(pub(super) std::sync::Weak<Replica>);

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
