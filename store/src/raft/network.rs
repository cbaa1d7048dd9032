//! Outgoing replica traffic: the openraft network factory, the per-peer gRPC channels,
//! and the fault switch tests use to partition a replica.
//!
//! A vote request to a peer that cannot be reached is answered here as a vote the peer did
//! not grant. For the election that is the same outcome (only granted votes count, and the
//! answer carries the candidate's own vote, so nothing else changes), but openraft logs
//! every failed vote request at ERROR: a replica whose peers are down would log two ERROR
//! lines per election round for as long as it waits. Instead [`Peers`] reports an
//! unreachable peer itself: one WARN when it becomes unreachable, then at most one per
//! [`UNREACHABLE_REPORT_INTERVAL`], and one INFO when it answers again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::{Channel, Endpoint};

use super::record;
use super::rpc::{self, Frame, Method};
use super::tls::ReplicaTls;
use super::TypeConfig;

type NodeId = u64;

/// Least time between two reports of the same unreachable peer.
pub(crate) const UNREACHABLE_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// A switch that drops replica RPCs, for fault tests.
///
/// Replicas built with the same `NetworkFaults` consult it on every RPC they send and
/// receive; an isolated replica's messages are dropped in both directions, as if its
/// network were cut. In production nothing is ever isolated.
// Public only for the fault tests (`testing` feature); replicas always consult one.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct NetworkFaults {
    isolated: RwLock<HashSet<NodeId>>,
}

#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
impl NetworkFaults {
    /// A switch with every replica connected.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops all RPCs to and from `node` until [`NetworkFaults::heal`].
    #[cfg(feature = "testing")]
    pub fn isolate(&self, node: NodeId) {
        self.isolated
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node);
    }

    /// Reconnects `node`.
    #[cfg(feature = "testing")]
    pub fn heal(&self, node: NodeId) {
        self.isolated
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node);
    }

    /// Whether a message between `a` and `b` is dropped.
    #[must_use]
    pub fn blocks(&self, a: NodeId, b: NodeId) -> bool {
        let iso = self.isolated.read().unwrap_or_else(|e| e.into_inner());
        iso.contains(&a) || iso.contains(&b)
    }
}

/// Lazily connected channels to peers, keyed by address.
#[derive(Debug)]
pub(crate) struct Peers {
    me: NodeId,
    tls: Option<ReplicaTls>,
    faults: Arc<NetworkFaults>,
    channels: Mutex<HashMap<String, Channel>>,
    rpc_timeout: Duration,
    /// Peers whose last vote request did not reach them, with when that was last reported.
    unreachable: Mutex<HashMap<NodeId, Instant>>,
}

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    /// The request was never sent (fault switch, bad address, TLS setup).
    #[error("request to raft peer {addr} not sent: {reason}")]
    NotSent {
        /// Peer address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The request failed in transit or on the peer; it may or may not have taken effect.
    #[error("request to raft peer {addr} failed: {status}")]
    Failed {
        /// Peer address.
        addr: String,
        /// gRPC status.
        status: tonic::Status,
    },
    /// The answer could not be decoded.
    #[error("answer from raft peer {addr} does not decode: {detail}")]
    BadAnswer {
        /// Peer address.
        addr: String,
        /// Decoder message.
        detail: String,
    },
}

impl Peers {
    pub(crate) fn new(
        me: NodeId,
        tls: Option<ReplicaTls>,
        faults: Arc<NetworkFaults>,
        rpc_timeout: Duration,
    ) -> Self {
        Peers {
            me,
            tls,
            faults,
            channels: Mutex::new(HashMap::new()),
            rpc_timeout,
            unreachable: Mutex::new(HashMap::new()),
        }
    }

    /// Reports that `target` could not be reached (rate-limited, see the module docs).
    fn note_unreachable(&self, target: NodeId, addr: &str, error: &impl std::fmt::Display) {
        let now = Instant::now();
        let mut map = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
        let due = map
            .get(&target)
            .is_none_or(|last| now.duration_since(*last) >= UNREACHABLE_REPORT_INTERVAL);
        if due {
            map.insert(target, now);
            tracing::warn!(
                node = self.me,
                peer = target,
                %addr,
                %error,
                "raft peer unreachable; no quorum without it (next report in {}s if still down)",
                UNREACHABLE_REPORT_INTERVAL.as_secs()
            );
        }
    }

    /// Notes that `target` answered; reports it if it was unreachable before.
    fn note_reachable(&self, target: NodeId, addr: &str) {
        let was = self
            .unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&target)
            .is_some();
        if was {
            tracing::info!(node = self.me, peer = target, %addr, "raft peer reachable again");
        }
    }

    pub(crate) fn faults(&self) -> &Arc<NetworkFaults> {
        &self.faults
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("invalid peer address {addr:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = match &self.tls {
            Some(tls) => tls.channel(addr, endpoint)?,
            None => endpoint.connect_lazy(),
        };
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// Sends `req` to the peer `target` at `addr` and decodes the answer.
    pub(crate) async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: NodeId,
        addr: &str,
        method: Method,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, PeerError> {
        if self.faults.blocks(self.me, target) {
            return Err(PeerError::NotSent {
                addr: addr.to_string(),
                reason: "network partitioned (fault injection)".into(),
            });
        }
        let payload = record::encode(req).map_err(|e| PeerError::NotSent {
            addr: addr.to_string(),
            reason: format!("cannot encode request: {e}"),
        })?;
        let channel = self.channel(addr).map_err(|reason| PeerError::NotSent {
            addr: addr.to_string(),
            reason,
        })?;
        let frame = Frame {
            from: self.me,
            payload,
        };
        let timeout = timeout.unwrap_or(self.rpc_timeout);
        let answer = match tokio::time::timeout(timeout, rpc::call(channel, method, frame)).await {
            Ok(Ok(f)) => f,
            Ok(Err(status)) => {
                return Err(PeerError::Failed {
                    addr: addr.to_string(),
                    status,
                })
            }
            Err(_) => {
                return Err(PeerError::Failed {
                    addr: addr.to_string(),
                    status: tonic::Status::deadline_exceeded(format!(
                        "no answer within {timeout:?}"
                    )),
                })
            }
        };
        if self.faults.blocks(self.me, target) {
            return Err(PeerError::Failed {
                addr: addr.to_string(),
                status: tonic::Status::unavailable("network partitioned (fault injection)"),
            });
        }
        record::decode(&answer.payload).map_err(|detail| PeerError::BadAnswer {
            addr: addr.to_string(),
            detail,
        })
    }
}

/// The openraft network factory of one replica.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    peers: Arc<Peers>,
}

impl Network {
    pub(crate) fn new(peers: Arc<Peers>) -> Self {
        Network { peers }
    }
}

/// The openraft client for one peer.
#[derive(Debug)]
pub(crate) struct PeerClient {
    peers: Arc<Peers>,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            peers: self.peers.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

impl PeerClient {
    async fn send<Req, Resp, E>(
        &self,
        method: Method,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        // openraft's TTL is derived from the heartbeat interval, too short for an append
        // batch carrying megabyte values; votes keep it (a slow vote is a lost vote).
        let ttl = match method {
            Method::Vote => option.hard_ttl(),
            _ => option.hard_ttl().max(Duration::from_secs(5)),
        };
        let answer: Result<Resp, RaftError<NodeId, E>> = self
            .peers
            .call(self.target, &self.addr, method, req, Some(ttl))
            .await
            .map_err(|e| match e {
                PeerError::BadAnswer { .. } => RPCError::Network(NetworkError::new(&e)),
                _ => RPCError::Unreachable(Unreachable::new(&e)),
            })?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// The answer of a peer that did not grant `request`'s vote and knows no newer one: what
/// an unreachable peer amounts to for the election (see the module docs).
fn not_granted(request: VoteRequest<NodeId>) -> VoteResponse<NodeId> {
    VoteResponse {
        vote: request.vote,
        vote_granted: false,
        last_log_id: None,
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(Method::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(Method::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(Method::Vote, &rpc, &option).await {
            Err(RPCError::Unreachable(error)) => {
                self.peers.note_unreachable(self.target, &self.addr, &error);
                Ok(not_granted(rpc))
            }
            answer => {
                if answer.is_ok() {
                    self.peers.note_reachable(self.target, &self.addr);
                }
                answer
            }
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
