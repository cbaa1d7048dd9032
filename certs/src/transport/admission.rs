//! Admission to the TLS handshake: caps on handshakes in flight, in total and per
//! source address.
//!
//! A TCP connection that never speaks TLS holds its handshake slot until the handshake
//! timeout. With one global cap only, a few hundred idle connections from one host take
//! every slot and real clients wait behind them (issue 11: 600 idle connections made a
//! `GetClusterInfo` take 8.5 s). The accept loop therefore asks [`Admission`] for a
//! [`Slot`] per connection and refuses at once — it never waits — when the source or the
//! whole server is at its cap.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};

/// The unit the per-source cap counts: an IPv4 address, or an IPv6 /64 prefix (one host
/// or one customer usually owns a whole /64, so counting single IPv6 addresses would let
/// it open any number of handshakes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourceKey::V4(v4),
            IpAddr::V6(v6) => SourceKey::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Why a connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its source already has `limit` handshakes in flight.
    Source { limit: usize },
    /// The server already has `limit` handshakes in flight.
    Total { limit: usize },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Source { limit } => write!(
                f,
                "refused before the TLS handshake: this source address is at its cap of {limit} handshakes in flight"
            ),
            Refusal::Total { limit } => write!(
                f,
                "refused before the TLS handshake: the server is at its cap of {limit} handshakes in flight"
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_source: HashMap<SourceKey, usize>,
}

/// Counts handshakes in flight and hands out [`Slot`]s up to the caps.
#[derive(Debug)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_source: usize,
    counts: Mutex<Counts>,
}

impl Admission {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            counts: Mutex::new(Counts::default()),
        })
    }

    /// A slot for one handshake from `ip`, held until the [`Slot`] is dropped, or why
    /// there is none. Never waits.
    pub(crate) fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let source = SourceKey::from(ip);
        // The counts stay consistent even if a holder panicked: every update is a
        // single arithmetic step.
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let from_source = counts.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.max_per_source {
            return Err(Refusal::Source {
                limit: self.max_per_source,
            });
        }
        if counts.total >= self.max_total {
            return Err(Refusal::Total {
                limit: self.max_total,
            });
        }
        counts.total += 1;
        counts.per_source.insert(source, from_source + 1);
        Ok(Slot {
            admission: Arc::clone(self),
            source,
        })
    }
}

/// One admitted handshake; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    source: SourceKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self
            .admission
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Bounded memory: only sources with a handshake in flight are kept.
                counts.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_cap_refuses_the_excess_of_one_address_only() {
        let admission = Admission::new(10, 2);
        let a1 = admission.try_admit(ip("127.0.0.1")).unwrap();
        let _a2 = admission.try_admit(ip("127.0.0.1")).unwrap();
        assert_eq!(
            admission.try_admit(ip("127.0.0.1")).unwrap_err(),
            Refusal::Source { limit: 2 }
        );
        let _b = admission.try_admit(ip("127.0.0.2")).unwrap();
        drop(a1);
        let _a3 = admission.try_admit(ip("127.0.0.1")).unwrap();
        assert_eq!(admission.counts.lock().unwrap().total, 3);
    }

    #[test]
    fn total_cap_refuses_when_full_and_frees_on_drop() {
        let admission = Admission::new(2, 5);
        let a = admission.try_admit(ip("10.0.0.1")).unwrap();
        let _b = admission.try_admit(ip("10.0.0.2")).unwrap();
        assert_eq!(
            admission.try_admit(ip("10.0.0.3")).unwrap_err(),
            Refusal::Total { limit: 2 }
        );
        drop(a);
        admission.try_admit(ip("10.0.0.3")).unwrap();
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_a_cap_and_mapped_v4_is_v4() {
        let admission = Admission::new(10, 1);
        let _a = admission.try_admit(ip("2001:db8:0:1::1")).unwrap();
        assert!(admission.try_admit(ip("2001:db8:0:1::ffff")).is_err());
        let _b = admission.try_admit(ip("2001:db8:0:2::1")).unwrap();
        let _c = admission.try_admit(ip("192.0.2.1")).unwrap();
        assert!(admission.try_admit(ip("::ffff:192.0.2.1")).is_err());
    }

    #[test]
    fn released_sources_are_forgotten() {
        let admission = Admission::new(10, 1);
        for i in 0..5u8 {
            drop(admission.try_admit(IpAddr::from([10, 0, 0, i])).unwrap());
        }
        let counts = admission.counts.lock().unwrap();
        assert_eq!(counts.total, 0);
        assert!(counts.per_source.is_empty());
    }
}
