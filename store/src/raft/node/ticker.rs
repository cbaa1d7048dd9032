//! The replica's periodic duties, on one timer ([`RaftConfig::lease_check_interval`]):
//! on the leader, proposing the expiry of leases whose deadline passed; on every replica,
//! a snapshot once enough bytes were applied since the last one.
//!
//! [`RaftConfig::lease_check_interval`]: crate::raft::RaftConfig::lease_check_interval

use std::sync::atomic::Ordering;

use openraft::ServerState;

use super::Replica;
use crate::raft::command::Command;
use crate::LeaseId;

/// Runs the periodic duties of the module docs until the replica is dropped or stopped.
pub(super) async fn ticker_loop(replica: std::sync::Weak<Replica>) {
    let interval = match replica.upgrade() {
        Some(r) => r.config.lease_check_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = replica.upgrade() else { return };
        if r.stopped.load(Ordering::SeqCst) {
            return;
        }
        if r.shared.bytes_since_snapshot() >= r.config.snapshot_bytes {
            // Bounds log size by bytes too (the entry-count policy alone cannot, since a
            // batch entry may carry megabytes).
            let _ = r.raft.trigger().snapshot().await;
        }
        let m = r.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_leader != Some(r.id) {
            r.leases.clear();
            continue;
        }
        let leases: Vec<(LeaseId, u64)> = r.shared.read().ks.leases().collect();
        let expired = r
            .leases
            .sync(m.current_term, &leases, tokio::time::Instant::now());
        for lease in expired {
            tracing::debug!(
                node = r.id,
                lease,
                "lease deadline passed; proposing expiry"
            );
            match r.raft.client_write(Command::ExpireLease { lease }).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(node = r.id, lease, error = %e, "lease expiry not committed; will retry");
                    break;
                }
            }
        }
    }
}
