//! The replica-to-replica gRPC service (`clustermesh.raft.v1.Raft`).
//!
//! Every method is unary and carries one [`Frame`]: the sender's node id plus a bincode
//! payload holding an openraft message (AppendEntries, Vote, InstallSnapshot) or one of
//! our forwarding requests (a write, a read index, a lease keep-alive sent from a
//! follower to the leader). Keeping the raft messages as bincode inside a protobuf
//! envelope avoids mirroring openraft's types in `.proto` while still being a normal gRPC
//! service that runs over the mTLS transport of the `certs` crate.
//!
//! The service is written out by hand (it is what `tonic-build` would generate for six
//! unary methods) so the store crate needs no build script or `protoc`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use clustermesh_certs::PeerIdentity;
use tonic::body::Body;
use tonic::codegen::{http, Body as HttpBody, Service, StdError};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The service name.
pub(crate) const SERVICE: &str = "clustermesh.raft.v1.Raft";

/// Envelope of every request and response.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Frame {
    /// Node id of the sender.
    #[prost(uint64, tag = "1")]
    pub(crate) from: u64,
    /// Bincode-encoded message.
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) payload: Vec<u8>,
}

/// The RPC methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// openraft AppendEntries.
    AppendEntries,
    /// openraft Vote.
    Vote,
    /// openraft InstallSnapshot (one chunk).
    InstallSnapshot,
    /// A client write forwarded to the leader.
    Write,
    /// A read index request: the leader confirms leadership and returns its commit index.
    ReadIndex,
    /// A lease keep-alive forwarded to the leader.
    KeepAlive,
    /// The replica's view of the cluster (for status tools and peer checks).
    Status,
}

impl Method {
    const ALL: [Method; 7] = [
        Method::AppendEntries,
        Method::Vote,
        Method::InstallSnapshot,
        Method::Write,
        Method::ReadIndex,
        Method::KeepAlive,
        Method::Status,
    ];

    fn path(self) -> &'static str {
        match self {
            Method::AppendEntries => "/clustermesh.raft.v1.Raft/AppendEntries",
            Method::Vote => "/clustermesh.raft.v1.Raft/Vote",
            Method::InstallSnapshot => "/clustermesh.raft.v1.Raft/InstallSnapshot",
            Method::Write => "/clustermesh.raft.v1.Raft/Write",
            Method::ReadIndex => "/clustermesh.raft.v1.Raft/ReadIndex",
            Method::KeepAlive => "/clustermesh.raft.v1.Raft/KeepAlive",
            Method::Status => "/clustermesh.raft.v1.Raft/Status",
        }
    }

    fn from_path(path: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.path() == path)
    }
}

/// What the server side does with a request.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(
        &self,
        method: Method,
        frame: Frame,
        peer: Option<PeerIdentity>,
    ) -> impl Future<Output = Result<Frame, Status>> + Send;
}

/// The tonic service wrapping a [`Handler`].
#[derive(Debug)]
pub(crate) struct RaftService<H> {
    handler: Arc<H>,
}

impl<H> Clone for RaftService<H> {
    fn clone(&self) -> Self {
        RaftService {
            handler: self.handler.clone(),
        }
    }
}

impl<H: Handler> RaftService<H> {
    /// Wraps `handler`.
    pub(crate) fn new(handler: Arc<H>) -> Self {
        RaftService { handler }
    }
}

struct Unary<H> {
    handler: Arc<H>,
    method: Method,
}

impl<H: Handler> tonic::server::UnaryService<Frame> for Unary<H> {
    type Response = Frame;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Frame>, Status>> + Send>>;

    fn call(&mut self, request: Request<Frame>) -> Self::Future {
        let handler = self.handler.clone();
        let method = self.method;
        Box::pin(async move {
            let peer = clustermesh_certs::transport::peer_identity(&request).cloned();
            let frame = request.into_inner();
            handler.handle(method, frame, peer).await.map(Response::new)
        })
    }
}

impl<H, B> Service<http::Request<B>> for RaftService<H>
where
    H: Handler,
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(method) = Method::from_path(req.uri().path()) else {
            return Box::pin(async move {
                Ok(Status::unimplemented("unknown raft method").into_http())
            });
        };
        let handler = self.handler.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Frame, Frame>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE));
            Ok(grpc.unary(Unary { handler, method }, req).await)
        })
    }
}

impl<H> tonic::server::NamedService for RaftService<H> {
    const NAME: &'static str = SERVICE;
}

/// Largest message accepted or sent (values are ≤ 1.5 MiB; append batches hold several).
pub(crate) const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Sends one request over `channel`.
pub(crate) async fn call(channel: Channel, method: Method, frame: Frame) -> Result<Frame, Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("raft peer not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<Frame, Frame>::default();
    let path = http::uri::PathAndQuery::from_static(method.path());
    grpc.unary(Request::new(frame), path, codec)
        .await
        .map(Response::into_inner)
}
