//! Rate-limited log lines about failed and refused handshakes.
//!
//! Every failure is counted (see [`super::HandshakeObserver`] and
//! [`super::IncomingStats`]), but a flood of idle or hostile connections must not write
//! one WARN line each (issue 11: 600 idle connections, 600 lines). Per interval, the
//! first failure of each [`HandshakeFailure`] kind is logged in full — with the remote
//! address and the error in plain words, so a misconfigured peer is still diagnosable
//! from one line — and the rest at debug level only; at the end of the interval one
//! summary line gives the counts that were not logged at WARN.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::server::HandshakeFailure;

#[derive(Debug, Default)]
struct Window {
    /// A failure of this kind was logged in full in the current interval.
    logged: [bool; HandshakeFailure::ALL.len()],
    /// Failures of this kind logged at debug level only in the current interval.
    suppressed: [u64; HandshakeFailure::ALL.len()],
}

/// The log side of the accept loop's failure reporting.
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    window: Mutex<Window>,
}

impl FailureLog {
    /// Logs one failure: in full at WARN when it is the first of its kind in this
    /// interval, at debug level otherwise. Early closes (health checks, port probes) are
    /// always debug only.
    pub(crate) fn record(
        &self,
        reason: HandshakeFailure,
        remote: SocketAddr,
        error: &dyn fmt::Display,
    ) {
        let first = reason != HandshakeFailure::EarlyClose && {
            let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            let i = reason.index();
            if window.logged[i] {
                window.suppressed[i] += 1;
                false
            } else {
                window.logged[i] = true;
                true
            }
        };
        let refused = matches!(
            reason,
            HandshakeFailure::SourceLimit | HandshakeFailure::TotalLimit
        );
        let reason = reason.as_str();
        match (first, refused) {
            (true, true) => tracing::warn!(
                %remote, reason, %error,
                "mesh connection refused: too many TLS handshakes in flight (further refusals this interval are counted, not logged)"
            ),
            (true, _) => tracing::warn!(
                %remote, reason, %error,
                "mesh TLS handshake failed; connection dropped (further failures of this kind this interval are counted, not logged)"
            ),
            (false, _) => tracing::debug!(
                %remote, reason, %error,
                "mesh TLS handshake failed or refused; connection dropped"
            ),
        }
    }

    /// Ends the interval: logs one summary line of the failures that were not logged at
    /// WARN, if any, and lets the next failure of each kind be logged in full again.
    pub(crate) fn end_interval(&self, interval: Duration) {
        let window =
            std::mem::take(&mut *self.window.lock().unwrap_or_else(PoisonError::into_inner));
        let count: u64 = window.suppressed.iter().sum();
        if count == 0 {
            return;
        }
        let mut by_reason = String::new();
        for reason in HandshakeFailure::ALL {
            let n = window.suppressed[reason.index()];
            if n > 0 {
                if !by_reason.is_empty() {
                    by_reason.push_str(", ");
                }
                let _ = write!(by_reason, "{}={n}", reason.as_str());
            }
        }
        tracing::warn!(
            count,
            by_reason = %by_reason,
            interval = %humanize(interval),
            "more mesh TLS handshakes failed or were refused than were logged; see the handshake failure metric"
        );
    }
}

fn humanize(interval: Duration) -> String {
    if interval.subsec_millis() == 0 {
        format!("{}s", interval.as_secs())
    } else {
        format!("{}ms", interval.as_millis())
    }
}
