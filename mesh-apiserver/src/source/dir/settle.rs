//! When a changed manifest file is applied: the rule that keeps a half-written edit from
//! making services disappear.
//!
//! A poll can read a file while it is being written in place: a prefix that still parses
//! (cut at a document boundary, or mid-object at a line that happens to be valid YAML)
//! would delete every object after the cut. A poller cannot see the writer, so it judges
//! by what the file system shows:
//!
//! - a file *renamed into place* (a different inode at the same path, as `write to a
//!   temporary file, then rename` gives, and as a ConfigMap volume's symlink swap gives)
//!   was complete when it appeared: applied at once;
//! - a *new* file can only add objects: applied at once (except at start-up, see below);
//! - any other change was written in place and is *held*, keeping the file's last
//!   applied objects, until it has settled: its content unchanged for the settle time as
//!   seen by the source's own polls, or its modification time older than the settle time
//!   and no object of the file lost (a file that shrank by whole objects is always waited
//!   for: a timestamp is not trusted to prove that a deletion was meant).
//!
//! At start-up the objects the files held before are in the store, not in memory, so
//! every file counts as written in place: one modified within the settle time is waited
//! for before the first full set of objects is sent.

use std::time::{Duration, Instant};

use super::parse::ManifestError;
use crate::source::{K8sObject, ObjectRef};

/// Default settle time: far longer than writing any manifest takes, short enough that
/// an in-place edit shows within a few seconds.
pub const DEFAULT_SETTLE_TIME: Duration = Duration::from_secs(2);

/// How a file came to have new content since the previous poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// First seen after start-up.
    New,
    /// A different inode at the same path.
    Renamed,
    /// The same inode, or any file at start-up.
    InPlace,
}

/// What to do with a changed file now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Parse and apply it.
    Apply,
    /// Apply it if it loses no object of the file; otherwise hold it.
    ApplyUnlessObjectsLost,
    /// Keep the last applied objects and look again at the next poll.
    Hold,
}

/// The rule of the module docs. `stable_for` is how long the source has seen this
/// content unchanged; `modified_age` how old the file's modification time is (`None`
/// when unknown or in the future).
pub(super) fn verdict(
    change: Change,
    stable_for: Duration,
    modified_age: Option<Duration>,
    settle: Duration,
) -> Verdict {
    match change {
        Change::New | Change::Renamed => Verdict::Apply,
        Change::InPlace if stable_for >= settle => Verdict::Apply,
        Change::InPlace if modified_age.is_some_and(|age| age >= settle) => {
            Verdict::ApplyUnlessObjectsLost
        }
        Change::InPlace => Verdict::Hold,
    }
}

/// Whether `new` lacks an object that `old` has.
pub(super) fn loses_objects(old: &[K8sObject], new: &[K8sObject]) -> bool {
    let kept: std::collections::BTreeSet<ObjectRef> =
        new.iter().map(K8sObject::object_ref).collect();
    old.iter().any(|o| !kept.contains(&o.object_ref()))
}

/// A change being held: the content and since when the source has seen it.
#[derive(Debug)]
pub(super) struct Pending {
    /// The content read.
    pub(super) content: Vec<u8>,
    /// When a poll first read exactly this content.
    pub(super) first_seen: Instant,
    /// Its parse, once one was needed.
    pub(super) parsed: Option<Result<Vec<K8sObject>, ManifestError>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_secs(2);
    const YOUNG: Option<Duration> = Some(Duration::from_millis(10));
    const OLD: Option<Duration> = Some(Duration::from_secs(60));

    #[test]
    fn renamed_and_new_files_apply_at_once() {
        for change in [Change::New, Change::Renamed] {
            assert_eq!(
                verdict(change, Duration::ZERO, YOUNG, SETTLE),
                Verdict::Apply
            );
        }
    }

    #[test]
    fn in_place_writes_wait_until_settled() {
        assert_eq!(
            verdict(Change::InPlace, Duration::ZERO, YOUNG, SETTLE),
            Verdict::Hold
        );
        assert_eq!(
            verdict(Change::InPlace, Duration::ZERO, None, SETTLE),
            Verdict::Hold
        );
        assert_eq!(
            verdict(Change::InPlace, Duration::from_secs(1), YOUNG, SETTLE),
            Verdict::Hold
        );
        assert_eq!(
            verdict(Change::InPlace, SETTLE, YOUNG, SETTLE),
            Verdict::Apply
        );
        assert_eq!(
            verdict(Change::InPlace, Duration::ZERO, OLD, SETTLE),
            Verdict::ApplyUnlessObjectsLost
        );
    }

    #[test]
    fn lost_objects_are_found() {
        let objects = crate::source::parse_manifests(
            "f.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
        )
        .unwrap();
        assert!(loses_objects(&objects, &objects[..1]));
        assert!(!loses_objects(&objects[..1], &objects));
        assert!(!loses_objects(&[], &objects));
    }
}
