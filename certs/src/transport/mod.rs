//! tonic glue: mTLS with our verifiers and peer identities on both ends of a gRPC
//! connection.
//!
//! tonic's built-in TLS cannot use custom verifiers or expose a SPIFFE identity, so every
//! gRPC user of the mesh (store replicas, mesh API server, agents, CLI) goes through this
//! module instead:
//!
//! * [`incoming`] turns a `TcpListener` into the stream of verified TLS connections that
//!   `tonic::transport::Server::serve_with_incoming` takes; each connection carries a
//!   [`MeshConnectInfo`] that tonic copies into every request's extensions.
//! * [`peer_identity`], [`require_peer`] and [`require_admin`] read it back from a
//!   `tonic::Request`.
//! * [`MeshEndpoint`] dials `host:port` with our client config and builds a
//!   `tonic::transport::Channel`.

mod client;
mod request;
mod server;

pub use client::{
    ConnectError, ExpectedPeer, MeshConnector, MeshEndpoint, TargetError, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
};
pub use request::{peer_identity, peer_info, require_admin, require_peer};
pub use server::{
    accept_mesh_tls, incoming, HandshakeError, IncomingConfig, IncomingStats, MeshConnectInfo,
    MeshIncoming, MeshTlsStream,
};
