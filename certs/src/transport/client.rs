//! Client side: dial a mesh server over mTLS and wrap the connection in a tonic Channel.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::config::TlsSource;
use crate::identity::{IdentityError, PeerIdentity};

/// Default time allowed for TCP connect plus TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default HTTP/2 keepalive ping interval, so a dead remote cluster is noticed.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default time to wait for a keepalive ping's answer.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A target address that cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target is not `host:port`.
    #[error("invalid mesh server address {target:?}: {reason}; use host:port, e.g. mesh.example:2379 or [::1]:2379")]
    Address {
        /// The rejected target.
        target: String,
        /// Why.
        reason: &'static str,
    },
    /// The TLS server name is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {name:?}: {reason}")]
    ServerName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: String,
    },
    /// tonic rejected the endpoint URI.
    #[error("invalid endpoint URI for {target:?}: {reason}")]
    Uri {
        /// The target.
        target: String,
        /// Why.
        reason: String,
    },
}

/// Why a connection to a mesh server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("failed to connect to {target}: {source}")]
    Tcp {
        /// Where.
        target: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed (unknown CA, wrong server name, foreign trust domain,
    /// expired certificate, ...).
    #[error("TLS handshake with {target} failed: {}", super::TlsErrorText(source))]
    Tls {
        /// Where.
        target: String,
        /// The error, with the rustls error inside.
        #[source]
        source: io::Error,
    },
    /// The server's identity could not be read.
    #[error("server {target} has no usable mesh identity: {source}")]
    Identity {
        /// Where.
        target: String,
        /// Why.
        #[source]
        source: IdentityError,
    },
    /// The server is a valid mesh peer, but not the one expected.
    #[error("server {target} is {got}, expected {expected}; check which cluster this address belongs to")]
    UnexpectedPeer {
        /// Where.
        target: String,
        /// Who we wanted.
        expected: Box<ExpectedPeer>,
        /// Who answered.
        got: Box<PeerIdentity>,
    },
    /// TCP connect plus handshake took longer than the connect timeout.
    #[error("connecting to {target} timed out after {timeout:?}")]
    Timeout {
        /// Where.
        target: String,
        /// The limit.
        timeout: Duration,
    },
    /// The endpoint itself is invalid.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The whole connection attempt failed via tonic.
    #[error("failed to establish the gRPC channel to {target}: {source}")]
    Channel {
        /// Where.
        target: String,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The identity a TLS handshake error refused as out of its CA's scope, if that is what
/// `error` is.
fn out_of_scope_identity(error: &std::io::Error) -> Option<PeerIdentity> {
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) =
        error.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    let inner: &(dyn std::error::Error + 'static) = &*other.0;
    match inner.downcast_ref::<IdentityError>()? {
        IdentityError::OutOfScope { identity, .. } => Some((**identity).clone()),
        _ => None,
    }
}

/// Who a dialled server must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Exactly this identity (e.g. the mesh API server of the cluster an address is
    /// configured for).
    Exact(PeerIdentity),
    /// Any store replica of this cluster (its identity, as `cluster/<c>`).
    ReplicaOf(PeerIdentity),
}

impl ExpectedPeer {
    /// True if `peer` is who we want.
    pub fn matches(&self, peer: &PeerIdentity) -> bool {
        match self {
            Self::Exact(expected) => expected == peer,
            Self::ReplicaOf(cluster) => {
                peer.kind() == crate::IdentityKind::Replica
                    && peer.trust_domain() == cluster.trust_domain()
                    && peer.cluster_name() == cluster.cluster_name()
            }
        }
    }
}

impl std::fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::ReplicaOf(cluster) => write!(f, "{cluster}/replica/<n>"),
        }
    }
}

/// Where and how to dial a mesh server.
#[derive(Debug, Clone)]
pub struct MeshEndpoint {
    target: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    expected_peer: Option<ExpectedPeer>,
    connect_timeout: Duration,
    tls: Arc<dyn TlsSource>,
}

impl MeshEndpoint {
    /// An endpoint for `target` (`host:port` or `[ipv6]:port`). The TLS server name
    /// defaults to the host, so the server certificate must carry it as a DNS or IP SAN.
    pub fn new(target: &str, tls: Arc<dyn TlsSource>) -> Result<Self, TargetError> {
        let (host, port) = split_host_port(target)?;
        let server_name = server_name(&host)?;
        Ok(Self {
            target: target.to_owned(),
            host,
            port,
            server_name,
            expected_peer: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls,
        })
    }

    /// Verifies the server certificate against `name` instead of the dialled host (dial an
    /// IP, verify a DNS name).
    pub fn with_server_name(mut self, name: &str) -> Result<Self, TargetError> {
        self.server_name = server_name(name)?;
        Ok(self)
    }

    /// Requires the server to present exactly this identity (e.g. the cluster the
    /// address is configured for).
    #[must_use]
    pub fn expect_peer(mut self, peer: PeerIdentity) -> Self {
        self.expected_peer = Some(ExpectedPeer::Exact(peer));
        self
    }

    /// Requires the server to be a store replica of the cluster `cluster` names.
    #[must_use]
    pub fn expect_replica_of(mut self, cluster: PeerIdentity) -> Self {
        self.expected_peer = Some(ExpectedPeer::ReplicaOf(cluster));
        self
    }

    /// Sets the time allowed for TCP connect plus TLS handshake.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The `host:port` dialled.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The connector tonic calls for every (re)connection. It asks the TLS source for the
    /// current client config each time, so reconnections pick up rotated certificates.
    pub fn connector(&self) -> MeshConnector {
        MeshConnector {
            endpoint: Arc::new(self.clone()),
        }
    }

    /// A tonic endpoint with our defaults (connect timeout, HTTP/2 keepalive). The URI
    /// scheme is `http` because TLS is done by [`MeshConnector`], not by tonic. Adjust it
    /// and pass it to [`Self::connect_with`] / [`Self::connect_lazy_with`].
    pub fn tonic_endpoint(&self) -> Result<Endpoint, TargetError> {
        let uri = format!("http://{}", self.target);
        let endpoint = Endpoint::from_shared(uri).map_err(|e| TargetError::Uri {
            target: self.target.clone(),
            reason: e.to_string(),
        })?;
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(DEFAULT_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(DEFAULT_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true))
    }

    /// A channel that connects on first use and reconnects as needed.
    pub fn connect_lazy(&self) -> Result<Channel, TargetError> {
        Ok(self.connect_lazy_with(self.tonic_endpoint()?))
    }

    /// Like [`Self::connect_lazy`] with a customised tonic endpoint.
    pub fn connect_lazy_with(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.connector())
    }

    /// Connects now; fails if the server cannot be reached or verified.
    pub async fn connect(&self) -> Result<Channel, ConnectError> {
        let endpoint = self.tonic_endpoint()?;
        self.connect_with(endpoint).await
    }

    /// Like [`Self::connect`] with a customised tonic endpoint.
    pub async fn connect_with(&self, endpoint: Endpoint) -> Result<Channel, ConnectError> {
        endpoint
            .connect_with_connector(self.connector())
            .await
            .map_err(|source| ConnectError::Channel {
                target: self.target.clone(),
                source,
            })
    }

    /// Dials the server and completes the mTLS handshake within the connect timeout,
    /// returning the stream and the server's verified identity (what [`MeshConnector`]
    /// does per connection).
    pub async fn dial(&self) -> Result<(TlsStream<TcpStream>, PeerIdentity), ConnectError> {
        tokio::time::timeout(self.connect_timeout, self.dial_inner())
            .await
            .map_err(|_| ConnectError::Timeout {
                target: self.target.clone(),
                timeout: self.connect_timeout,
            })?
    }

    async fn dial_inner(&self) -> Result<(TlsStream<TcpStream>, PeerIdentity), ConnectError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ConnectError::Tcp {
                target: self.target.clone(),
                source,
            })?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(target = %self.target, error = %e, "cannot set TCP_NODELAY");
        }
        let connector = TlsConnector::from(self.tls.client_config());
        let stream = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| {
                // The server's certificate is valid but its CA may not vouch for it
                // (e.g. our CA file for cluster `south` and a server of `west`): when we
                // expected someone else, that is the clearer report.
                match (&self.expected_peer, out_of_scope_identity(&source)) {
                    (Some(expected), Some(got)) if !expected.matches(&got) => {
                        ConnectError::UnexpectedPeer {
                            target: self.target.clone(),
                            expected: Box::new(expected.clone()),
                            got: Box::new(got),
                        }
                    }
                    _ => ConnectError::Tls {
                        target: self.target.clone(),
                        source,
                    },
                }
            })?;
        let trust_domain = self.tls.trust_domain();
        let peer = PeerIdentity::from_chain(stream.get_ref().1.peer_certificates(), &trust_domain)
            .map_err(|source| ConnectError::Identity {
                target: self.target.clone(),
                source,
            })?;
        if let Some(expected) = &self.expected_peer {
            if !expected.matches(&peer) {
                return Err(ConnectError::UnexpectedPeer {
                    target: self.target.clone(),
                    expected: Box::new(expected.clone()),
                    got: Box::new(peer),
                });
            }
        }
        tracing::debug!(target = %self.target, peer = %peer, "connected to mesh server");
        Ok((stream, peer))
    }
}

/// The tower service tonic uses to open connections to one [`MeshEndpoint`]; the URI
/// tonic passes is ignored in favour of the endpoint's address.
#[derive(Clone)]
pub struct MeshConnector {
    endpoint: Arc<MeshEndpoint>,
}

impl fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConnector")
            .field("target", &self.endpoint.target)
            .finish()
    }
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<TokioIo<TlsStream<TcpStream>>, ConnectError>> + Send>>;

impl tower::Service<Uri> for MeshConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            match endpoint.dial().await {
                Ok((stream, _peer)) => Ok(TokioIo::new(stream)),
                Err(e) => {
                    tracing::warn!(error = %e, "mesh connection attempt failed");
                    Err(e)
                }
            }
        })
    }
}

fn split_host_port(target: &str) -> Result<(String, u16), TargetError> {
    let err = |reason| TargetError::Address {
        target: target.to_owned(),
        reason,
    };
    let (host, port) = if let Some(rest) = target.strip_prefix('[') {
        let (host, rest) = rest.split_once(']').ok_or_else(|| err("missing ']'"))?;
        let port = rest.strip_prefix(':').ok_or_else(|| err("missing :port"))?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| err("the bracketed host is not an IPv6 address"))?;
        (host, port)
    } else {
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| err("missing :port"))?;
        if host.contains(':') {
            return Err(err("IPv6 addresses must be written in brackets"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(err("empty host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| err("the port is not a number 0-65535"))?;
    if port == 0 {
        return Err(err("port 0 cannot be dialled"));
    }
    Ok((host.to_owned(), port))
}

fn server_name(name: &str) -> Result<ServerName<'static>, TargetError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).map_err(|e| TargetError::ServerName {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("mesh.example:443").unwrap(),
            ("mesh.example".into(), 443)
        );
        assert_eq!(
            split_host_port("127.0.0.1:1").unwrap(),
            ("127.0.0.1".into(), 1)
        );
        assert_eq!(split_host_port("[::1]:2379").unwrap(), ("::1".into(), 2379));
        for bad in [
            "",
            "host",
            ":80",
            "host:",
            "host:0",
            "host:70000",
            "::1:80",
            "[::1]80",
            "[x]:1",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn server_names_accept_ips_and_dns() {
        assert!(matches!(
            server_name("10.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("::1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("mesh.example").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name").is_err());
    }

    proptest! {
        #[test]
        fn split_host_port_never_panics(s in "\\PC{0,40}") {
            if let Ok((host, port)) = split_host_port(&s) {
                prop_assert!(!host.is_empty());
                prop_assert!(port > 0);
            }
        }
    }
}
