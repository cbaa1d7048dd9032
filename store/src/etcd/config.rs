//! How to reach an etcd cluster: endpoints, optional TLS material and retry deadlines.
//!
//! Kept apart from the client code so a binary can build an [`EtcdConfig`] from flags or a
//! file without touching the connection logic.

use std::path::PathBuf;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Client certificate material for an etcd cluster that serves TLS (`--cert-file`,
/// `--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file with the CA that signed etcd's server certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate and key, when etcd requires client certificates.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// Name to verify in the server certificate, when it differs from the endpoint host.
    pub server_name: Option<String>,
}

impl EtcdTls {
    /// TLS that verifies the server against `ca_file` and presents no client certificate.
    #[must_use]
    pub fn new(ca_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_file: ca_file.into(),
            client_identity: None,
            server_name: None,
        }
    }

    /// Presents the client certificate `cert_file` with private key `key_file` (both PEM).
    #[must_use]
    pub fn with_client_identity(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.client_identity = Some((cert_file.into(), key_file.into()));
        self
    }

    /// Verifies `name` in the server certificate instead of the endpoint's host.
    #[must_use]
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

/// Everything [`crate::EtcdStore::connect`] needs.
///
/// ```
/// use std::time::Duration;
/// use clustermesh_store::EtcdConfig;
///
/// let config = EtcdConfig::new(["http://127.0.0.1:2379"])
///     .with_connect_deadline(Duration::from_secs(30));
/// assert_eq!(config.endpoints.len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`http://host:port`, or `https://host:port` together with [`Self::tls`]).
    pub endpoints: Vec<String>,
    /// TLS settings; `None` for plain-text endpoints.
    pub tls: Option<EtcdTls>,
    /// How long [`crate::EtcdStore::connect`] keeps retrying an unreachable etcd before it
    /// gives up with [`crate::EtcdConnectError::Unreachable`].
    pub connect_deadline: Duration,
    /// First retry delay; doubled after every failed attempt up to [`Self::max_backoff`].
    pub initial_backoff: Duration,
    /// Upper bound of the retry delay.
    pub max_backoff: Duration,
    /// How long a broken watch keeps trying to re-establish itself before its stream ends
    /// with [`crate::StoreError::Unavailable`].
    pub watch_resume_deadline: Duration,
    /// Timeout of one unary request (not of watch streams).
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Defaults: no TLS, 60 s connect deadline, 100 ms .. 5 s backoff, 60 s watch resume
    /// deadline, 30 s request timeout.
    #[must_use]
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            connect_deadline: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            watch_resume_deadline: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
        }
    }

    /// Connects over TLS.
    #[must_use]
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets how long connecting keeps retrying.
    #[must_use]
    pub fn with_connect_deadline(mut self, deadline: Duration) -> Self {
        self.connect_deadline = deadline;
        self
    }

    /// Sets the retry backoff range.
    #[must_use]
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Sets how long a broken watch keeps trying to resume.
    #[must_use]
    pub fn with_watch_resume_deadline(mut self, deadline: Duration) -> Self {
        self.watch_resume_deadline = deadline;
        self
    }

    /// Sets the unary request timeout.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The endpoints joined for log lines and error messages.
    pub(crate) fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }
}

/// The delays between retries of connect and watch resume: `initial` (at least 1 ms),
/// doubled after every attempt, capped at `max`, without end.
pub(crate) fn retry_delays(initial: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(initial.max(Duration::from_millis(1)).min(max))
        .with_max_delay(max)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let delays: Vec<_> = retry_delays(Duration::from_millis(100), Duration::from_millis(500))
            .take(5)
            .map(|delay| delay.as_millis())
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn backoff_max_is_never_below_initial() {
        let config = EtcdConfig::new(["http://127.0.0.1:1"])
            .with_backoff(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(config.max_backoff, Duration::from_secs(2));
    }
}
