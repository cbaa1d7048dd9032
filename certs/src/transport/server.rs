//! Server side: accept TCP, run the mTLS handshake, hand verified connections to tonic.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::config::TlsSource;
use crate::identity::{IdentityError, PeerIdentity, TrustDomain};

/// Tuning of the accept loop.
#[derive(Debug, Clone)]
pub struct IncomingConfig {
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in flight at once; further TCP connections wait in the listen backlog.
    pub max_concurrent_handshakes: usize,
    /// Verified connections buffered before the server picks them up.
    pub queue: usize,
}

impl Default for IncomingConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_handshakes: 512,
            queue: 64,
        }
    }
}

impl IncomingConfig {
    /// Sets the handshake timeout.
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets the number of concurrent handshakes (at least 1).
    #[must_use]
    pub fn max_concurrent_handshakes(mut self, n: usize) -> Self {
        self.max_concurrent_handshakes = n.max(1);
        self
    }
}

/// What the server knows about a connection; tonic puts a clone into every request's
/// extensions (read it with [`super::peer_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConnectInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// Our address the client connected to.
    pub local_addr: Option<SocketAddr>,
    /// The client's verified identity.
    pub peer: PeerIdentity,
}

/// A verified server-side mTLS connection.
#[derive(Debug)]
pub struct MeshTlsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: MeshConnectInfo,
}

impl MeshTlsStream {
    /// The connection's peer and addresses.
    pub fn info(&self) -> &MeshConnectInfo {
        &self.info
    }

    /// The client's verified identity.
    pub fn peer(&self) -> &PeerIdentity {
        &self.info.peer
    }
}

impl Connected for MeshTlsStream {
    type ConnectInfo = MeshConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why an incoming connection was dropped.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client did not finish the handshake in time.
    #[error("TLS handshake did not complete within {0:?}")]
    Timeout(Duration),
    /// The handshake failed: no client certificate, unknown CA, expired certificate,
    /// foreign trust domain, protocol error, or the client went away.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The handshake succeeded but the identity could not be read back (should not
    /// happen: the verifier checked it).
    #[error("verified client has no usable identity: {0}")]
    Identity(#[from] IdentityError),
}

impl HandshakeError {
    /// True when the client closed the connection without sending or answering anything
    /// that failed verification, as TCP health checks of load balancers and port probes
    /// do. Such connections are logged at debug level, not as warnings.
    pub fn is_early_close(&self) -> bool {
        match self {
            Self::Tls(e) => {
                matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) && e
                    .get_ref()
                    .is_none_or(|inner| inner.downcast_ref::<rustls::Error>().is_none())
            }
            Self::Timeout(_) | Self::Identity(_) => false,
        }
    }
}

/// Runs the server side of the mTLS handshake on an accepted TCP connection and reads
/// the client's identity. Used by [`incoming`]; public for servers with their own
/// accept loop.
pub async fn accept_mesh_tls(
    tcp: TcpStream,
    remote_addr: SocketAddr,
    config: Arc<ServerConfig>,
    trust_domain: &TrustDomain,
    timeout: Duration,
) -> Result<MeshTlsStream, HandshakeError> {
    let local_addr = tcp.local_addr().ok();
    let inner = tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(tcp))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
        .map_err(HandshakeError::Tls)?;
    let peer = PeerIdentity::from_chain(inner.get_ref().1.peer_certificates(), trust_domain)?;
    Ok(MeshTlsStream {
        inner,
        info: MeshConnectInfo {
            remote_addr,
            local_addr,
            peer,
        },
    })
}

/// Counters of the accept loop, e.g. for metrics.
#[derive(Debug, Default)]
pub struct IncomingStats {
    accepted: AtomicU64,
    handshake_failures: AtomicU64,
    handshake_timeouts: AtomicU64,
    early_closes: AtomicU64,
}

impl IncomingStats {
    /// Connections that completed the handshake with a verified identity.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections dropped because the handshake failed (timeouts and early closes
    /// excluded).
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    /// Connections dropped because the handshake timed out.
    pub fn handshake_timeouts(&self) -> u64 {
        self.handshake_timeouts.load(Ordering::Relaxed)
    }

    /// Connections the client closed before the handshake completed without a TLS
    /// error (TCP health checks, port probes); see [`HandshakeError::is_early_close`].
    pub fn early_closes(&self) -> u64 {
        self.early_closes.load(Ordering::Relaxed)
    }
}

/// The stream of verified connections produced by [`incoming`]. It never yields an
/// error: failed handshakes and accept errors are logged and skipped. Dropping it stops
/// the accept loop and closes the listener.
#[derive(Debug)]
pub struct MeshIncoming {
    rx: mpsc::Receiver<MeshTlsStream>,
    stats: Arc<IncomingStats>,
    local_addr: Option<SocketAddr>,
    task: JoinHandle<()>,
}

impl MeshIncoming {
    /// Counters of this accept loop.
    pub fn stats(&self) -> Arc<IncomingStats> {
        self.stats.clone()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Drop for MeshIncoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for MeshIncoming {
    type Item = Result<MeshTlsStream, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

/// Accepts TCP connections on `listener`, runs mTLS handshakes concurrently (each with
/// the server config current at accept time and a timeout), and yields the verified
/// connections. Use it with `Server::serve_with_incoming[_shutdown]`.
///
/// Must be called inside a tokio runtime.
pub fn incoming<S>(listener: TcpListener, tls: Arc<S>, config: IncomingConfig) -> MeshIncoming
where
    S: TlsSource + ?Sized,
{
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let stats = Arc::new(IncomingStats::default());
    let local_addr = listener.local_addr().ok();
    let task = tokio::spawn(accept_loop(listener, tls, config, tx, stats.clone()));
    MeshIncoming {
        rx,
        stats,
        local_addr,
        task,
    }
}

async fn accept_loop<S>(
    listener: TcpListener,
    tls: Arc<S>,
    config: IncomingConfig,
    tx: mpsc::Sender<MeshTlsStream>,
    stats: Arc<IncomingStats>,
) where
    S: TlsSource + ?Sized,
{
    let permits = Arc::new(Semaphore::new(config.max_concurrent_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            () = tx.closed() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, remote) = tokio::select! {
            () = tx.closed() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE/ENFILE/ECONNABORTED and friends are transient: log, pause
                    // briefly so a full fd table does not spin the loop, and go on.
                    tracing::warn!(error = %e, "accepting a mesh connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(remote = %remote, error = %e, "cannot set TCP_NODELAY");
        }
        let server_config = tls.server_config();
        let trust_domain = tls.trust_domain();
        let timeout = config.handshake_timeout;
        let tx = tx.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match accept_mesh_tls(tcp, remote, server_config, &trust_domain, timeout).await {
                Ok(conn) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(remote = %remote, peer = %conn.peer(), "accepted mesh connection");
                    // A send error means the server stopped; the connection is dropped.
                    let _ = tx.send(conn).await;
                }
                Err(e) if e.is_early_close() => {
                    stats.early_closes.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(remote = %remote, error = %e, "client closed before completing the TLS handshake (health check or probe?)");
                }
                Err(e) => {
                    let counter = match e {
                        HandshakeError::Timeout(_) => &stats.handshake_timeouts,
                        _ => &stats.handshake_failures,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(remote = %remote, error = %e, "mesh mTLS handshake failed; connection dropped");
                }
            }
        });
    }
    tracing::debug!("mesh accept loop stopped");
}
