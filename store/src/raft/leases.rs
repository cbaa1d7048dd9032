//! Lease deadlines, kept by the leader only.
//!
//! Lease grants and expiries go through the log; the deadlines do not (they are wall
//! clock, which replicas do not share). The leader keeps a deadline per lease, moves it
//! on keep-alive, and proposes `ExpireLease` when it passes. A replica that becomes
//! leader starts every deadline afresh at now + TTL, as etcd does, so a lease never
//! expires early because of a leader change — at worst it lives up to one TTL longer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::LeaseId;

#[derive(Debug, Default)]
struct State {
    /// Term in which the deadlines were (re)started; `None` when not leader.
    term: Option<u64>,
    deadlines: HashMap<LeaseId, Instant>,
}

/// The leader's lease deadlines.
#[derive(Debug, Default)]
pub(crate) struct LeaseDeadlines {
    state: Mutex<State>,
}

impl LeaseDeadlines {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets everything (this replica is not the leader).
    pub(crate) fn clear(&self) {
        let mut s = self.lock();
        s.term = None;
        s.deadlines.clear();
    }

    /// Brings the deadlines in line with the leases that exist in `term` and returns the
    /// leases whose deadline passed. `leases` lists every lease with its TTL.
    pub(crate) fn sync(&self, term: u64, leases: &[(LeaseId, u64)], now: Instant) -> Vec<LeaseId> {
        let mut s = self.lock();
        if s.term != Some(term) {
            s.term = Some(term);
            s.deadlines.clear();
        }
        let mut fresh = HashMap::with_capacity(leases.len());
        let mut expired = Vec::new();
        for &(id, ttl_ms) in leases {
            let deadline = s
                .deadlines
                .get(&id)
                .copied()
                .unwrap_or_else(|| now + Duration::from_millis(ttl_ms));
            if deadline <= now {
                expired.push(id);
            }
            fresh.insert(id, deadline);
        }
        s.deadlines = fresh;
        expired
    }

    /// Moves a lease's deadline to now + TTL (keep-alive on the leader).
    pub(crate) fn refresh(&self, lease: LeaseId, ttl: Duration) {
        let mut s = self.lock();
        s.deadlines.insert(lease, Instant::now() + ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_term_restarts_every_deadline() {
        let d = LeaseDeadlines::default();
        let t0 = Instant::now();
        assert!(d.sync(1, &[(7, 100)], t0).is_empty());
        let later = t0 + Duration::from_millis(150);
        assert_eq!(d.sync(1, &[(7, 100)], later), vec![7]);
        // A new leader term starts the deadline again at now + ttl.
        assert!(d.sync(2, &[(7, 100)], later).is_empty());
        assert_eq!(
            d.sync(2, &[(7, 100)], later + Duration::from_millis(100)),
            vec![7]
        );
    }

    #[test]
    fn removed_leases_are_forgotten() {
        let d = LeaseDeadlines::default();
        let t0 = Instant::now();
        d.sync(1, &[(1, 10), (2, 10)], t0);
        assert_eq!(
            d.sync(1, &[(2, 10)], t0 + Duration::from_millis(20)),
            vec![2]
        );
        assert_eq!(d.lock().deadlines.len(), 1);
    }
}
