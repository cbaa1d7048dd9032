//! Small helpers the checks share: error context, assertions that explain themselves,
//! and waiting for watch events or state with a deadline (never a timing assertion).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;

use crate::{Event, EventKind, StoreError, WatchStream};

/// Outcome of one check: `Err` says what was expected and what was seen.
pub(super) type CheckResult<T = ()> = Result<T, String>;

/// Adds "while doing X" to store errors.
pub(super) trait Context<T> {
    fn context(self, what: &str) -> CheckResult<T>;
}

impl<T> Context<T> for Result<T, StoreError> {
    fn context(self, what: &str) -> CheckResult<T> {
        self.map_err(|e| format!("{what}: unexpected error: {e}"))
    }
}

/// Fails the check with a formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}
pub(super) use ensure;

/// Fails the check unless `left == right`, showing both.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{}: expected {:?}, got {:?}", format!($($arg)+), right, left));
        }
    }};
}
pub(super) use ensure_eq;

/// The next event of `stream`, failing if none arrives within `wait`.
pub(super) async fn next_event(
    stream: &mut WatchStream,
    wait: Duration,
    what: &str,
) -> CheckResult<Event> {
    match tokio::time::timeout(wait, stream.next()).await {
        Ok(Some(Ok(event))) => Ok(event),
        Ok(Some(Err(e))) => Err(format!("{what}: the watch failed: {e}")),
        Ok(None) => Err(format!("{what}: the watch stream ended")),
        Err(_) => Err(format!("{what}: no watch event within {wait:?}")),
    }
}

/// Polls `probe` until it returns `Some`, failing after `wait`.
pub(super) async fn eventually<T, F, Fut>(
    wait: Duration,
    what: &str,
    mut probe: F,
) -> CheckResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = CheckResult<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{what}: still not the case after {wait:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A compact description of an event for comparisons and messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) kind: EventKind,
    pub(super) key: String,
    pub(super) value: String,
    pub(super) revision: u64,
}

impl From<&Event> for Seen {
    fn from(event: &Event) -> Self {
        Self {
            kind: event.kind,
            key: String::from_utf8_lossy(&event.kv.key).into_owned(),
            value: String::from_utf8_lossy(&event.kv.value).into_owned(),
            revision: event.revision(),
        }
    }
}

/// Shorthand for a byte key from text.
pub(super) fn k(key: &str) -> Vec<u8> {
    key.as_bytes().to_vec()
}

/// Shorthand for a byte value from text.
pub(super) fn v(value: &str) -> Vec<u8> {
    value.as_bytes().to_vec()
}

/// Lossy text of a key list, for messages.
pub(super) fn keys_of(kvs: &[crate::KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}
