//! What every privileged or tool-dependent test needs: one rule for skipping versus
//! failing when a prerequisite is missing, and a process-wide lock for scenarios that must
//! not overlap now that a crate's tests share one process.

use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Whether a missing prerequisite (etcd binary, privileges) must fail the test instead of
/// skipping it: CI sets `CLUSTERMESH_REQUIRE_PRIVILEGED=1` (or `CI`).
pub fn prerequisites_required() -> bool {
    std::env::var("CLUSTERMESH_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether `test` may run: `missing` names the prerequisite it lacks, if any. With nothing
/// missing it runs; otherwise it fails (panics) when [`prerequisites_required`], and is
/// skipped with a line on stderr saying why when not.
pub fn may_run(test: &str, missing: Option<String>) -> bool {
    let Some(why) = missing else {
        return true;
    };
    assert!(
        !prerequisites_required(),
        "{test}: a required prerequisite is missing: {why}"
    );
    eprintln!("skipping {test}: {why} (set CLUSTERMESH_REQUIRE_PRIVILEGED=1 to make this fail)");
    false
}

/// The lock behind [`exclusive`] and [`shared`].
static HEAVY: RwLock<()> = RwLock::new(());

/// Serializes heavy scenarios (network-namespace topologies with real processes, timing
/// measurements) within one test process: hold the guard for the whole scenario. No other
/// [`exclusive`] or [`shared`] holder runs meanwhile.
///
/// A scenario that panicked while holding the lock does not poison it for the others;
/// each scenario sets up and tears down its own state.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    HEAVY.write().unwrap_or_else(PoisonError::into_inner)
}

/// For privileged scenarios that may run alongside each other but not alongside an
/// [`exclusive`] one (small topologies that would disturb a timing measurement).
pub fn shared() -> RwLockReadGuard<'static, ()> {
    HEAVY.read().unwrap_or_else(PoisonError::into_inner)
}
