//! tonic glue: mTLS with our verifiers and peer identities on both ends of a gRPC
//! connection.
//!
//! tonic's built-in TLS cannot use custom verifiers or expose a SPIFFE identity, so every
//! gRPC user of the mesh (store replicas, mesh API server, agents, CLI) goes through this
//! module instead:
//!
//! * [`incoming`] turns a `TcpListener` into the stream of verified TLS connections that
//!   `tonic::transport::Server::serve_with_incoming` takes; each connection carries a
//!   [`MeshConnectInfo`] that tonic copies into every request's extensions. It caps
//!   handshakes in flight per source address and in total, and reports failures to a
//!   [`HandshakeObserver`] and a rate-limited log.
//! * [`peer_identity`], [`require_peer`] and [`require_admin`] read it back from a
//!   `tonic::Request`.
//! * [`TlsErrorText`] prints a handshake error in plain words (rustls prints some in
//!   their Debug form).
//! * [`MeshEndpoint`] dials `host:port` with our client config and builds a
//!   `tonic::transport::Channel`.

mod admission;
mod client;
mod failure_log;
mod plain_error;
mod request;
mod server;

pub use client::{
    ConnectError, ExpectedPeer, MeshConnector, MeshEndpoint, TargetError, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
};
pub use plain_error::TlsErrorText;
pub use request::{peer_identity, peer_info, require_admin, require_peer};
pub use server::{
    accept_mesh_tls, incoming, HandshakeError, HandshakeFailure, HandshakeObserver, IncomingConfig,
    IncomingStats, MeshConnectInfo, MeshIncoming, MeshTlsStream, DEFAULT_FAILURE_LOG_INTERVAL,
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONCURRENT_HANDSHAKES,
    DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
};
