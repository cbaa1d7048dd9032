//! Server side: accept TCP, run the mTLS handshake, hand verified connections to tonic.
//!
//! The accept loop is the server's front door, so it must stay open under abuse: it
//! never waits for a handshake slot ([`super::admission`] caps handshakes in flight per
//! source address and in total and refuses the excess at once), cuts handshakes at a
//! short timeout, and reports failures through counters, an observer and a rate-limited
//! log ([`super::failure_log`]) instead of one WARN line per connection.

use std::convert::Infallible;
use std::fmt;
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
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use super::admission::{Admission, Refusal};
use super::failure_log::FailureLog;
use super::plain_error::{rustls_error, TlsErrorText};
use crate::config::TlsSource;
use crate::identity::{IdentityError, PeerIdentity, TrustDomain};

/// How long a client may take for the TLS handshake by default.
///
/// A TLS 1.3 handshake is one round trip plus a signature on each side: milliseconds
/// between our components, well under a second across continents. Five seconds leave
/// room for a loaded server and two lost packets (TCP retransmits after 1 s, then 2 s),
/// while a connection that never speaks TLS holds its handshake slot for at most that
/// long.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes in flight at once from one source address (IPv4 address or IPv6 /64) by
/// default. Real clients finish in milliseconds, so even hundreds of agents behind one
/// NAT address rarely have more than a few in flight; one host with idle connections
/// cannot take more than this many slots.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 32;

/// Handshakes in flight at once in total by default.
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 512;

/// How often the accept loop summarises the handshake failures it did not log one by
/// one, by default.
pub const DEFAULT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Tuning of the accept loop.
///
/// The loop never waits for a handshake slot: a connection beyond
/// [`max_handshakes_per_source`](Self::max_handshakes_per_source) or
/// [`max_concurrent_handshakes`](Self::max_concurrent_handshakes) is closed at once
/// (clients retry with backoff), so a flood of idle connections from one address
/// neither delays other clients' handshakes nor the streams already established.
#[derive(Clone)]
pub struct IncomingConfig {
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in flight at once; further connections are refused.
    pub max_concurrent_handshakes: usize,
    /// Handshakes in flight at once from one source address (IPv4 address or IPv6 /64);
    /// further connections from it are refused.
    pub max_handshakes_per_source: usize,
    /// Verified connections buffered before the server picks them up.
    pub queue: usize,
    /// Failures beyond the first of each kind are logged at WARN only as one summary
    /// line per interval (all of them at debug level).
    pub failure_log_interval: Duration,
    /// Told about every connection's outcome, e.g. to count it in metrics.
    pub observer: Option<Arc<dyn HandshakeObserver>>,
}

impl fmt::Debug for IncomingConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingConfig")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_concurrent_handshakes", &self.max_concurrent_handshakes)
            .field("max_handshakes_per_source", &self.max_handshakes_per_source)
            .field("queue", &self.queue)
            .field("failure_log_interval", &self.failure_log_interval)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl Default for IncomingConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_concurrent_handshakes: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            queue: 64,
            failure_log_interval: DEFAULT_FAILURE_LOG_INTERVAL,
            observer: None,
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

    /// Sets the number of concurrent handshakes from one source address (at least 1).
    #[must_use]
    pub fn max_handshakes_per_source(mut self, n: usize) -> Self {
        self.max_handshakes_per_source = n.max(1);
        self
    }

    /// Sets the interval of the failure summary log line (at least 1 ms).
    #[must_use]
    pub fn failure_log_interval(mut self, interval: Duration) -> Self {
        self.failure_log_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Reports every connection's outcome to `observer`.
    #[must_use]
    pub fn observer(mut self, observer: Arc<dyn HandshakeObserver>) -> Self {
        self.observer = Some(observer);
        self
    }
}

/// Why a connection did not become a verified mesh connection. A small closed set, fit
/// for a metric label ([`as_str`](Self::as_str)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The client closed before completing the handshake without a TLS error (TCP health
    /// checks of load balancers, port probes).
    EarlyClose,
    /// The client did not complete the handshake within the timeout.
    Timeout,
    /// Refused before the handshake: its source address was at its cap of handshakes in
    /// flight.
    SourceLimit,
    /// Refused before the handshake: the server was at its cap of handshakes in flight.
    TotalLimit,
    /// The client presented no certificate.
    NoCertificate,
    /// The client's certificate was refused (unknown CA, expired, wrong identity, …).
    CertificateRefused,
    /// The client aborted with a TLS alert (often: it does not trust our certificate).
    PeerAlert,
    /// Any other TLS protocol error (old TLS version, no common cipher suite, garbage).
    Protocol,
    /// An I/O error other than an early close.
    Io,
    /// The handshake succeeded but the client's identity could not be read back.
    Identity,
}

impl HandshakeFailure {
    /// Every kind, e.g. to pre-register metric label values.
    pub const ALL: [HandshakeFailure; 10] = [
        Self::EarlyClose,
        Self::Timeout,
        Self::SourceLimit,
        Self::TotalLimit,
        Self::NoCertificate,
        Self::CertificateRefused,
        Self::PeerAlert,
        Self::Protocol,
        Self::Io,
        Self::Identity,
    ];

    /// The kind's snake_case name, e.g. for a `reason` metric label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EarlyClose => "early_close",
            Self::Timeout => "timeout",
            Self::SourceLimit => "source_limit",
            Self::TotalLimit => "total_limit",
            Self::NoCertificate => "no_certificate",
            Self::CertificateRefused => "certificate_refused",
            Self::PeerAlert => "peer_alert",
            Self::Protocol => "protocol",
            Self::Io => "io",
            Self::Identity => "identity",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Receives the outcome of every connection the accept loop takes, e.g. to count it in
/// Prometheus metrics (the certs crate has no metrics dependency). Called from the
/// connection's task or the accept loop: must be quick and must not block.
pub trait HandshakeObserver: Send + Sync {
    /// A connection completed the handshake with a verified identity.
    fn accepted(&self) {}

    /// A connection was dropped before or during the handshake.
    fn failed(&self, reason: HandshakeFailure);
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
    /// foreign trust domain, protocol error, or the client went away. Displayed in plain
    /// words ([`TlsErrorText`]), not in rustls' Debug form.
    #[error("TLS handshake failed: {}", TlsErrorText(.0))]
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
                ) && rustls_error(e).is_none()
            }
            Self::Timeout(_) | Self::Identity(_) => false,
        }
    }

    /// The kind of failure, e.g. for a metric label.
    #[must_use]
    pub fn reason(&self) -> HandshakeFailure {
        match self {
            Self::Timeout(_) => HandshakeFailure::Timeout,
            Self::Identity(_) => HandshakeFailure::Identity,
            Self::Tls(_) if self.is_early_close() => HandshakeFailure::EarlyClose,
            Self::Tls(e) => match rustls_error(e) {
                None => HandshakeFailure::Io,
                Some(rustls::Error::NoCertificatesPresented) => HandshakeFailure::NoCertificate,
                Some(rustls::Error::InvalidCertificate(_)) => HandshakeFailure::CertificateRefused,
                Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::PeerAlert,
                Some(_) => HandshakeFailure::Protocol,
            },
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
    refused: AtomicU64,
    in_flight: AtomicU64,
}

impl IncomingStats {
    /// Connections that completed the handshake with a verified identity.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections dropped because the handshake failed (timeouts, early closes and
    /// refusals excluded).
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

    /// Connections closed before the handshake because their source address or the
    /// server was at its cap of handshakes in flight.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Handshakes in flight now.
    pub fn handshakes_in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Where the accept loop reports outcomes: counters, the observer, the log.
struct Outcomes {
    stats: Arc<IncomingStats>,
    observer: Option<Arc<dyn HandshakeObserver>>,
    log: FailureLog,
}

impl Outcomes {
    fn accepted(&self, conn: &MeshTlsStream) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer.accepted();
        }
        tracing::debug!(remote = %conn.info.remote_addr, peer = %conn.peer(), "accepted mesh connection");
    }

    fn failed(&self, remote: SocketAddr, reason: HandshakeFailure, error: &dyn fmt::Display) {
        let counter = match reason {
            HandshakeFailure::EarlyClose => &self.stats.early_closes,
            HandshakeFailure::Timeout => &self.stats.handshake_timeouts,
            HandshakeFailure::SourceLimit | HandshakeFailure::TotalLimit => &self.stats.refused,
            _ => &self.stats.handshake_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer.failed(reason);
        }
        self.log.record(reason, remote, error);
    }
}

/// The stream of verified connections produced by [`incoming`]. It never yields an
/// error: failed handshakes and accept errors are counted, logged and skipped. Dropping it stops
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
/// Connections beyond the caps of [`IncomingConfig`] (per source address and in total)
/// are closed at once, so accepting never waits for a handshake. Every outcome is
/// counted in [`MeshIncoming::stats`] and reported to the config's observer; failures
/// are logged with the remote address, the first of each [`HandshakeFailure`] kind per
/// interval at WARN and the rest in one summary line.
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
    let admission = Admission::new(
        config.max_concurrent_handshakes,
        config.max_handshakes_per_source,
    );
    let outcomes = Arc::new(Outcomes {
        stats,
        observer: config.observer.clone(),
        log: FailureLog::default(),
    });
    let log_interval = config.failure_log_interval.max(Duration::from_millis(1));
    let mut summary =
        tokio::time::interval_at(tokio::time::Instant::now() + log_interval, log_interval);
    summary.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Never waits for a handshake to finish: connections over a cap are closed at
        // once, so the listen backlog never fills up behind slow clients.
        let (tcp, remote) = tokio::select! {
            () = tx.closed() => break,
            _ = summary.tick() => {
                outcomes.log.end_interval(log_interval);
                continue;
            }
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
        let slot = match admission.try_admit(remote.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                drop(tcp);
                let reason = match refusal {
                    Refusal::Source { .. } => HandshakeFailure::SourceLimit,
                    Refusal::Total { .. } => HandshakeFailure::TotalLimit,
                };
                outcomes.failed(remote, reason, &refusal);
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(remote = %remote, error = %e, "cannot set TCP_NODELAY");
        }
        let server_config = tls.server_config();
        let trust_domain = tls.trust_domain();
        let timeout = config.handshake_timeout;
        let tx = tx.clone();
        let outcomes = Arc::clone(&outcomes);
        outcomes.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let result = accept_mesh_tls(tcp, remote, server_config, &trust_domain, timeout).await;
            drop(slot);
            outcomes.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(conn) => {
                    outcomes.accepted(&conn);
                    // A send error means the server stopped; the connection is dropped.
                    let _ = tx.send(conn).await;
                }
                Err(e) => outcomes.failed(remote, e.reason(), &e),
            }
        });
    }
    outcomes.log.end_interval(log_interval);
    tracing::debug!("mesh accept loop stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_kind_has_its_own_index_and_name() {
        for (i, reason) in HandshakeFailure::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason}");
        }
        let names: std::collections::HashSet<_> =
            HandshakeFailure::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), HandshakeFailure::ALL.len());
    }
}
