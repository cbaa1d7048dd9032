//! Translation between etcd's protobuf types and the store contract: key ranges, revisions,
//! key-values and errors.
//!
//! etcd speaks `i64` revisions and lease ids and reports conditions such as "lease not
//! found" or "revision compacted" as gRPC statuses with fixed messages; this module is the
//! one place that knows those details.

use etcd_client::proto::PbKeyValue;
use tonic::Code;

use crate::{KeyValue, LeaseId, Revision, StoreError};

/// Message etcd returns when a lease id is unknown (`rpctypes.ErrLeaseNotFound`).
const LEASE_NOT_FOUND: &str = "requested lease not found";
/// Message etcd returns for a read or compaction below the compaction point
/// (`mvcc.ErrCompacted`).
const COMPACTED: &str = "required revision has been compacted";
/// Message etcd returns for a read at a revision not yet written (`mvcc.ErrFutureRev`).
const FUTURE_REVISION: &str = "required revision is a future revision";
/// Message etcd returns when a request exceeds `--max-request-bytes`.
const TOO_LARGE: &str = "request is too large";

/// The end of etcd's key range covering every key that starts with `prefix`, and the
/// start key to use (etcd rejects an empty key, `\0` means "from the first key").
///
/// The end is the prefix with its last byte below 0xff incremented and the rest cut off;
/// when no such byte exists (empty or all-0xff prefix) it is `\0`, etcd's "to the end".
pub(crate) fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let end = match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    };
    (prefix.to_vec(), end)
}

/// An etcd revision (never negative in practice) as a store revision.
pub(crate) fn revision(raw: i64) -> Revision {
    Revision::try_from(raw).unwrap_or_default()
}

/// A store revision as an etcd revision (saturating; etcd revisions fit in `i64`).
pub(crate) fn etcd_revision(rev: Revision) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

/// A lease id as etcd's `i64`, or [`StoreError::LeaseNotFound`] when it cannot be one.
pub(crate) fn etcd_lease(id: LeaseId) -> Result<i64, StoreError> {
    i64::try_from(id).map_err(|_| StoreError::LeaseNotFound(id))
}

/// An etcd lease field (`0` = none) as an optional lease id.
pub(crate) fn lease(raw: i64) -> Option<LeaseId> {
    LeaseId::try_from(raw).ok().filter(|&id| id != 0)
}

/// An etcd key-value as the store's [`KeyValue`].
pub(crate) fn key_value(kv: PbKeyValue) -> KeyValue {
    KeyValue {
        create_revision: revision(kv.create_revision),
        mod_revision: revision(kv.mod_revision),
        lease: lease(kv.lease),
        key: kv.key,
        value: kv.value,
    }
}

/// What an etcd failure means for the caller.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Condition {
    /// The lease does not exist.
    LeaseNotFound,
    /// The revision read or compacted is below the compaction point.
    Compacted,
    /// The revision read is above the current revision.
    FutureRevision,
    /// The request exceeded etcd's request size limit.
    TooLarge,
    /// Connection or leadership problem; retrying may help.
    Unavailable,
    /// Anything else.
    Other,
}

/// Classifies an etcd client error.
pub(crate) fn condition(err: &etcd_client::Error) -> Condition {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            if message.contains(LEASE_NOT_FOUND) {
                Condition::LeaseNotFound
            } else if message.contains(COMPACTED) {
                Condition::Compacted
            } else if message.contains(FUTURE_REVISION) {
                Condition::FutureRevision
            } else if message.contains(TOO_LARGE) {
                Condition::TooLarge
            } else if matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted
            ) {
                Condition::Unavailable
            } else {
                Condition::Other
            }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            Condition::Unavailable
        }
        etcd_client::Error::LeaseKeepAliveError(message) if message.contains("not found") => {
            Condition::LeaseNotFound
        }
        _ => Condition::Other,
    }
}

/// Maps an etcd failure of operation `op` (e.g. "put") to a [`StoreError`] that says what
/// failed. Conditions with their own variant (lease, compaction) are handled by callers
/// that know the lease id or revision; here they become descriptive backend errors.
pub(crate) fn store_error(op: &str, err: etcd_client::Error) -> StoreError {
    match condition(&err) {
        Condition::Unavailable => StoreError::Unavailable(format!("etcd {op}: {err}")),
        Condition::TooLarge => StoreError::Backend(format!(
            "etcd rejected the {op} as too large ({err}); start etcd with --max-request-bytes \
             of at least 2 MiB so values up to the store limit fit"
        )),
        _ => StoreError::Backend(format!("etcd {op} failed: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_increments_last_byte() {
        assert_eq!(prefix_range(b"a/"), (b"a/".to_vec(), b"a0".to_vec()));
        assert_eq!(prefix_range(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
    }

    #[test]
    fn prefix_range_without_successor_is_open_ended() {
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
        assert_eq!(prefix_range(b"\xff\xff"), (b"\xff\xff".to_vec(), vec![0]));
    }

    #[test]
    fn lease_zero_means_none() {
        assert_eq!(lease(0), None);
        assert_eq!(lease(-3), None);
        assert_eq!(lease(7), Some(7));
    }

    #[test]
    fn lease_not_found_status_is_recognised() {
        let err = etcd_client::Error::GRpcStatus(tonic::Status::not_found(
            "etcdserver: requested lease not found",
        ));
        assert_eq!(condition(&err), Condition::LeaseNotFound);
        let err = etcd_client::Error::GRpcStatus(tonic::Status::out_of_range(
            "etcdserver: mvcc: required revision has been compacted",
        ));
        assert_eq!(condition(&err), Condition::Compacted);
        let err = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader"));
        assert!(matches!(
            store_error("put", err),
            StoreError::Unavailable(message) if message.contains("put")
        ));
    }
}

#[cfg(test)]
mod prefix_properties {
    use proptest::prelude::*;

    use super::prefix_range;

    /// Whether etcd's range `[start, end)` (end `\0` = unbounded) holds `key`.
    fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
        key >= start && (end == [0] || key < end)
    }

    proptest! {
        /// The computed range holds exactly the keys that start with the prefix.
        #[test]
        fn range_holds_exactly_the_prefixed_keys(
            prefix in prop::collection::vec(prop::sample::select(vec![0u8, 1, b'a', 0xfe, 0xff]), 0..4),
            key in prop::collection::vec(prop::sample::select(vec![0u8, 1, b'a', 0xfe, 0xff]), 1..6),
        ) {
            let (start, end) = prefix_range(&prefix);
            prop_assert_eq!(in_range(&key, &start, &end), key.starts_with(&prefix));
        }
    }
}
