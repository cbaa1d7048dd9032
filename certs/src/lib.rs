//! clustermesh PKI and mTLS.
//!
//! Every connection between clustermesh components (store replicas, mesh API servers,
//! agents, the CLI) is mutually authenticated TLS with certificates from a mesh CA. A
//! certificate names its holder and role in a SPIFFE URI SAN —
//! `spiffe://<td>/cluster/<name>` (mesh API server), `.../cluster/<name>/agent`,
//! `.../cluster/<name>/replica/<n>` or `spiffe://<td>/admin/<name>` — and servers learn
//! *who* is calling from that, not just that the caller is trusted. Each trusted CA is
//! bound to the identities it may issue (a connected peer's CA only to that peer's).
//!
//! * [`identity`]: [`PeerIdentity`], [`TrustDomain`], cluster-name validation.
//! * [`issue`]: the mesh CA ([`MeshCa`]) and leaf issuance with rcgen.
//! * [`layout`]: the bundle directory layout (file names, [`TlsPaths`]); [`pem`] and
//!   [`files`]: PEM decoding, atomic file writes (keys created 0600), writing cluster and
//!   admin bundles.
//! * [`trust_bundle`]: the set of trusted CAs, each labelled with the cluster it may issue
//!   identities of, merged by `connect`, pruned by `disconnect`; [`scope`]: what each CA
//!   may issue; [`inspect`]: identity, SANs and expiry of a certificate.
//! * [`config`]: validated [`TlsMaterial`] and the rustls server/client configs
//!   ([`MeshTls`]) with our verifiers.
//! * [`reload`]: [`ReloadingTls`], configs that follow file rotations without dropping
//!   established connections.
//! * [`transport`]: tonic glue — the verified incoming stream for a gRPC server, the peer
//!   identity of a request, and a mTLS `Channel` for clients.
//!
//! # Example
//!
//! ```
//! use clustermesh_certs::{
//!     files::{write_cluster_bundle, ClusterBundle},
//!     issue::{MeshCa, ServerNames, Validity, DEFAULT_LEAF_VALIDITY},
//!     reload::{ReloadingTls, DEFAULT_POLL_INTERVAL},
//!     transport::{self, IncomingConfig, MeshEndpoint},
//!     TlsPaths, TrustDomain,
//! };
//! use tokio_stream::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let td = TrustDomain::new("clustermesh.local")?;
//! // Once, e.g. in `clustermesh enable`: a CA and the bundle of cluster "east"
//! // (ca.crt, server.crt/key, client.crt/key).
//! let ca = MeshCa::generate(td.clone())?;
//! let names = ServerNames::new(["localhost".to_owned()], ["127.0.0.1".parse()?]);
//! let bundle = ClusterBundle::issue(&ca, "east", &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))?;
//! let dir = tempfile::tempdir()?;
//! write_cluster_bundle(dir.path(), &bundle)?;
//!
//! // Server: verified connections for tonic, following file rotations.
//! let server_tls = ReloadingTls::load(td.clone(), TlsPaths::server(dir.path()))?;
//! let _watcher = server_tls.spawn_watcher(DEFAULT_POLL_INTERVAL);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let mut incoming = transport::incoming(listener, server_tls, IncomingConfig::default());
//! // Normally: Server::builder().add_service(svc).serve_with_incoming(incoming), and in a
//! // handler `let peer = transport::require_peer(&request)?;`.
//!
//! // Client: presents client.crt, verifies the server against ca.crt and 127.0.0.1.
//! let client_tls = ReloadingTls::load(td, TlsPaths::client(dir.path()))?;
//! let endpoint = MeshEndpoint::new(&addr.to_string(), client_tls)?;
//! let (_stream, server_identity) = endpoint.dial().await?;
//! assert_eq!(server_identity.to_string(), "spiffe://clustermesh.local/cluster/east");
//!
//! let conn = incoming.next().await.expect("accept loop running")?;
//! assert_eq!(conn.peer().cluster_name(), Some("east"));
//! // For gRPC: `endpoint.connect().await?` or `endpoint.connect_lazy()?` gives a Channel.
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod files;
pub mod identity;
pub mod inspect;
pub mod issue;
pub mod layout;
pub mod pem;
pub mod reload;
pub mod scope;
pub mod transport;
pub mod trust_bundle;
mod verify;

pub use config::{MeshTls, TlsError, TlsMaterial, TlsSource};
pub use identity::{IdentityError, IdentityKind, PeerIdentity, TrustDomain};
pub use issue::{IssueError, IssuedCert, MeshCa, ServerNames, Validity};
pub use layout::TlsPaths;
pub use reload::ReloadingTls;
pub use scope::CaScope;
pub use trust_bundle::TrustBundle;
