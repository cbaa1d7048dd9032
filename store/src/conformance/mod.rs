//! The one behaviour suite every [`Store`](crate::Store) backend must pass.
//!
//! Two backends (embedded raft, external etcd) promise the same etcd-v3 semantics; this
//! suite is where that promise is written down and checked, in the style of openraft's
//! storage suite (`Suite::test_all(builder)`). Each check gets a **fresh, empty** store
//! from the builder and reports by name what it expected and what it saw.
//!
//! # Running it against a backend
//!
//! ```no_run
//! use std::sync::Arc;
//! use clustermesh_store::conformance::{FreshStore, Suite};
//! use clustermesh_store::{EtcdConfig, EtcdStore, Store};
//!
//! # async fn example() {
//! // The builder is any `Fn() -> Future<Output = Result<FreshStore, BuildError>>`.
//! // Keep whatever owns the backend (a server process, a temp dir, a raft cluster)
//! // alive in the `FreshStore` guard; it is dropped when the check ends.
//! let result = Suite::test_all(|| async {
//!     let store = EtcdStore::connect(EtcdConfig::new(["http://127.0.0.1:2379"])).await?;
//!     Ok(FreshStore::new(Arc::new(store) as Arc<dyn Store>))
//! })
//! .await;
//! if let Err(failure) = result {
//!     panic!("{failure}");
//! }
//! # }
//! ```
//!
//! [`Suite::new`] with [`Suite::run`] selects checks ([`Check`]) and tunes sizes and
//! timeouts (e.g. a smaller key count for a slow CI profile).
//!
//! # What is checked
//! Revisions monotonic across put/delete/CAS/delete_prefix/lease expiry; get/list
//! semantics (`create_revision`, `mod_revision`, lease, sort order, list revision); prefix
//! isolation (including `0xff` prefixes); compare-and-swap (absent = 0, stale revision
//! fails and returns the current key, delete by CAS, concurrent increments); delete_prefix
//! in one revision; watches ordered and complete from a past revision, from "now", and
//! under concurrent writers; lease expiry and revoke deleting keys with delete events;
//! keep-alive; compaction (`Compacted` for an old start revision); values up to
//! [`MAX_VALUE_SIZE`](crate::MAX_VALUE_SIZE) and `ValueTooLarge` above; a list of 100k keys;
//! fenced writes (applied while the fence key holds, refused without effect once it was
//! rewritten, deleted or expired).
//!
//! Timing: lease checks use a short TTL and poll with generous deadlines; nothing asserts
//! how fast a backend is (that is the benchmark's job).

mod fence;
mod kv;
mod lease;
mod support;
mod watch;

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Store;

/// Error a builder may return; any error type converts into it with `?`.
pub type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// A fresh, empty store for one check, plus whatever must stay alive while it is used.
pub struct FreshStore {
    store: Arc<dyn Store>,
    guard: Box<dyn Any + Send>,
}

impl std::fmt::Debug for FreshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreshStore").finish_non_exhaustive()
    }
}

impl FreshStore {
    /// A store that needs nothing else kept alive.
    #[must_use]
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            guard: Box::new(()),
        }
    }

    /// A store whose backend lives as long as `guard` (a server process, temp dir, ...).
    #[must_use]
    pub fn with_guard(store: Arc<dyn Store>, guard: impl Any + Send) -> Self {
        Self {
            store,
            guard: Box::new(guard),
        }
    }
}

/// Produces a fresh, empty store for every check.
#[async_trait::async_trait]
pub trait StoreBuilder: Send + Sync {
    /// Builds the store.
    async fn build(&self) -> Result<FreshStore, BuildError>;
}

#[async_trait::async_trait]
impl<F, Fut> StoreBuilder for F
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Result<FreshStore, BuildError>> + Send,
{
    async fn build(&self) -> Result<FreshStore, BuildError> {
        self().await
    }
}

/// One named behaviour check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// Every write (put, delete, CAS, delete_prefix, lease expiry) gets a higher revision;
    /// failed or no-op writes consume none.
    RevisionMonotonic,
    /// `get` returns value, lease, `create_revision` and `mod_revision` as etcd does.
    GetAndRevisions,
    /// `list` is sorted, limited to the prefix and reports the revision it read at; a
    /// watch from that revision + 1 continues it.
    ListSortedWithRevision,
    /// Prefixes never leak neighbours (`a/` vs `ab`, `0xff` prefixes) in list, watch and
    /// delete_prefix.
    PrefixIsolation,
    /// Compare-and-swap on `mod_revision`, absent = 0, delete by CAS, concurrent increments.
    CompareAndSwap,
    /// `delete_prefix` removes every key under the prefix in one revision.
    DeletePrefixOneRevision,
    /// A watch from a past revision yields exactly the events from there on, then live ones.
    WatchFromPastRevision,
    /// A watch from revision 0 starts at the next write.
    WatchFromNow,
    /// Under concurrent writers a watch sees every write once, in revision order, and a
    /// replay from the first of those revisions sees the same sequence.
    WatchConcurrentWriters,
    /// An expired lease deletes its keys and emits their delete events; keep-alive then
    /// fails with `LeaseNotFound`.
    LeaseExpiry,
    /// Keep-alive keeps a lease (and its keys) alive past its TTL.
    LeaseKeepAlive,
    /// Revoking a lease deletes its keys with delete events.
    LeaseRevoke,
    /// After compaction a watch from an older revision fails with `Compacted`.
    CompactedWatch,
    /// Values up to `MAX_VALUE_SIZE` round-trip; larger ones fail with `ValueTooLarge`.
    ValueSizeLimit,
    /// A list of many keys (100k by default) is complete and sorted.
    ListManyKeys,
    /// Fenced writes (put, delete, delete_prefix, CAS) apply while the fence key is at the
    /// expected `mod_revision` and fail with `Fenced`, without any effect, once it was
    /// rewritten, deleted or removed by its lease's expiry.
    FencedWrite,
}

impl Check {
    /// Every check, in the order [`Suite::test_all`] runs them.
    pub const ALL: [Check; 16] = [
        Check::RevisionMonotonic,
        Check::GetAndRevisions,
        Check::ListSortedWithRevision,
        Check::PrefixIsolation,
        Check::CompareAndSwap,
        Check::DeletePrefixOneRevision,
        Check::WatchFromPastRevision,
        Check::WatchFromNow,
        Check::WatchConcurrentWriters,
        Check::LeaseExpiry,
        Check::LeaseKeepAlive,
        Check::LeaseRevoke,
        Check::CompactedWatch,
        Check::ValueSizeLimit,
        Check::ListManyKeys,
        Check::FencedWrite,
    ];

    /// The check's name in reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Check::RevisionMonotonic => "revision_monotonic",
            Check::GetAndRevisions => "get_and_revisions",
            Check::ListSortedWithRevision => "list_sorted_with_revision",
            Check::PrefixIsolation => "prefix_isolation",
            Check::CompareAndSwap => "compare_and_swap",
            Check::DeletePrefixOneRevision => "delete_prefix_one_revision",
            Check::WatchFromPastRevision => "watch_from_past_revision",
            Check::WatchFromNow => "watch_from_now",
            Check::WatchConcurrentWriters => "watch_concurrent_writers",
            Check::LeaseExpiry => "lease_expiry",
            Check::LeaseKeepAlive => "lease_keep_alive",
            Check::LeaseRevoke => "lease_revoke",
            Check::CompactedWatch => "compacted_watch",
            Check::ValueSizeLimit => "value_size_limit",
            Check::ListManyKeys => "list_many_keys",
            Check::FencedWrite => "fenced_write",
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Sizes and deadlines of a suite run.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// Keys written and listed by [`Check::ListManyKeys`] (default 100 000).
    pub many_keys: usize,
    /// Concurrent writers used to write them (default 64).
    pub many_keys_writers: usize,
    /// TTL of the leases that are left to expire (default 2 s; etcd's minimum is ~1.5 s).
    pub lease_ttl: Duration,
    /// How long to wait for one expected event or state change (default 30 s).
    pub wait: Duration,
    /// Upper bound for one whole check (default 600 s).
    pub check_timeout: Duration,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        Self {
            many_keys: 100_000,
            many_keys_writers: 64,
            lease_ttl: Duration::from_secs(2),
            wait: Duration::from_secs(30),
            check_timeout: Duration::from_secs(600),
        }
    }
}

/// One failed check: its name and what went wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store conformance check `{check}` failed: {reason}")]
pub struct CheckFailure {
    /// The check.
    pub check: Check,
    /// What was expected and what was seen.
    pub reason: String,
}

/// The failed checks of a suite run.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} of {} store conformance checks failed:\n{}", failures.len(), ran, list(failures))]
pub struct SuiteFailure {
    /// Number of checks run.
    pub ran: usize,
    /// Every failure, in run order.
    pub failures: Vec<CheckFailure>,
}

fn list(failures: &[CheckFailure]) -> String {
    failures
        .iter()
        .map(|f| format!("  - {f}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Names of the checks that passed, in run order.
pub type Passed = Vec<Check>;

/// The conformance suite.
#[derive(Debug, Clone, Default)]
pub struct Suite {
    options: SuiteOptions,
}

impl Suite {
    /// Runs every check with default options; the entry point for backends.
    pub async fn test_all<B: StoreBuilder>(builder: B) -> Result<Passed, SuiteFailure> {
        Suite::new().run(&builder, &Check::ALL).await
    }

    /// A suite with default options.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the options.
    #[must_use]
    pub fn with_options(mut self, options: SuiteOptions) -> Self {
        self.options = options;
        self
    }

    /// The options in effect.
    #[must_use]
    pub fn options(&self) -> &SuiteOptions {
        &self.options
    }

    /// Runs `checks` in order (every one, even after a failure) and reports all failures.
    pub async fn run<B: StoreBuilder + ?Sized>(
        &self,
        builder: &B,
        checks: &[Check],
    ) -> Result<Passed, SuiteFailure> {
        let mut passed = Vec::new();
        let mut failures = Vec::new();
        for &check in checks {
            match self.run_check(builder, check).await {
                Ok(()) => passed.push(check),
                Err(failure) => failures.push(failure),
            }
        }
        if failures.is_empty() {
            Ok(passed)
        } else {
            Err(SuiteFailure {
                ran: checks.len(),
                failures,
            })
        }
    }

    /// Runs one check on a fresh store from `builder`.
    pub async fn run_check<B: StoreBuilder + ?Sized>(
        &self,
        builder: &B,
        check: Check,
    ) -> Result<(), CheckFailure> {
        let fail = |reason: String| CheckFailure { check, reason };
        let started = Instant::now();
        let fresh = builder
            .build()
            .await
            .map_err(|e| fail(format!("the builder could not create a fresh store: {e}")))?;
        let store = Arc::clone(&fresh.store);
        let outcome = tokio::time::timeout(
            self.options.check_timeout,
            dispatch(check, store, &self.options),
        )
        .await;
        drop(fresh.guard);
        match outcome {
            Ok(Ok(())) => {
                tracing::info!(check = check.name(), elapsed = ?started.elapsed(), "store conformance check passed");
                Ok(())
            }
            Ok(Err(reason)) => {
                tracing::error!(check = check.name(), %reason, "store conformance check failed");
                Err(fail(reason))
            }
            Err(_) => Err(fail(format!(
                "did not finish within {:?}",
                self.options.check_timeout
            ))),
        }
    }
}

async fn dispatch(
    check: Check,
    store: Arc<dyn Store>,
    options: &SuiteOptions,
) -> support::CheckResult {
    match check {
        Check::RevisionMonotonic => kv::revision_monotonic(store, options).await,
        Check::GetAndRevisions => kv::get_and_revisions(store).await,
        Check::ListSortedWithRevision => kv::list_sorted_with_revision(store, options).await,
        Check::PrefixIsolation => kv::prefix_isolation(store, options).await,
        Check::CompareAndSwap => kv::compare_and_swap(store).await,
        Check::DeletePrefixOneRevision => kv::delete_prefix_one_revision(store, options).await,
        Check::WatchFromPastRevision => watch::from_past_revision(store, options).await,
        Check::WatchFromNow => watch::from_now(store, options).await,
        Check::WatchConcurrentWriters => watch::concurrent_writers(store, options).await,
        Check::LeaseExpiry => lease::expiry(store, options).await,
        Check::LeaseKeepAlive => lease::keep_alive(store, options).await,
        Check::LeaseRevoke => lease::revoke(store, options).await,
        Check::CompactedWatch => watch::compacted(store, options).await,
        Check::ValueSizeLimit => kv::value_size_limit(store, options).await,
        Check::ListManyKeys => kv::list_many_keys(store, options).await,
        Check::FencedWrite => fence::fenced_writes(store, options).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_are_unique() {
        let mut names: Vec<_> = Check::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Check::ALL.len());
    }

    #[test]
    fn suite_failure_lists_every_failed_check() {
        let failure = SuiteFailure {
            ran: 3,
            failures: vec![
                CheckFailure {
                    check: Check::LeaseExpiry,
                    reason: "keys still present".into(),
                },
                CheckFailure {
                    check: Check::CompactedWatch,
                    reason: "no error".into(),
                },
            ],
        };
        let text = failure.to_string();
        assert!(text.starts_with("2 of 3"));
        assert!(text.contains("`lease_expiry` failed: keys still present"));
        assert!(text.contains("`compacted_watch` failed: no error"));
    }
}
