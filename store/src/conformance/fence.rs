//! Checks of fenced writes ([`Store::fenced_write`]): the write of a leader-elected writer
//! applies while its fence key is as it was when it won, and is refused without any
//! effect once the key was rewritten, deleted, or removed with its expired lease.

use std::sync::Arc;

use super::support::{ensure, ensure_eq, eventually, k, keys_of, v, CheckResult, Context};
use super::SuiteOptions;
use crate::{
    CasOutcome, CasWrite, Fence, FencedOp, FencedOutcome, ListResult, Revision, Store, StoreError,
};

const GUARD: &[u8] = b"fence/leader";
const DATA: &[u8] = b"fence/data/";

fn put(key: &str, value: &str) -> FencedOp {
    FencedOp::Put {
        key: k(key),
        value: v(value),
        lease: None,
    }
}

/// One of each fenced write, all aimed at keys under [`DATA`].
fn every_op() -> Vec<(&'static str, FencedOp)> {
    vec![
        ("put", put("fence/data/new", "late")),
        (
            "delete",
            FencedOp::Delete {
                key: k("fence/data/a"),
            },
        ),
        (
            "delete_prefix",
            FencedOp::DeletePrefix {
                prefix: k("fence/"),
            },
        ),
        (
            "compare_and_swap",
            FencedOp::CompareAndSwap {
                key: k("fence/data/cas"),
                expected_mod_revision: 0,
                write: CasWrite::Put {
                    value: v("late"),
                    lease: None,
                },
            },
        ),
    ]
}

/// Every fenced write with `fence` fails with [`StoreError::Fenced`] naming `current`, and
/// neither the keys nor the revision change.
async fn all_refused(
    store: &Arc<dyn Store>,
    fence: &Fence,
    current: Revision,
    why: &str,
) -> CheckResult {
    let before: ListResult = store.list(b"fence/").await.context("list before")?;
    for (name, op) in every_op() {
        match store.fenced_write(fence, op).await {
            Err(StoreError::Fenced {
                key,
                expected,
                current: seen,
            }) => {
                ensure_eq!(
                    (key.as_str(), expected, seen),
                    ("fence/leader", fence.mod_revision, current),
                    "{why}: (key, expected, current) of the refused fenced {name}"
                );
            }
            other => {
                return Err(format!(
                    "{why}: a fenced {name} must fail with Fenced, got {other:?}"
                ))
            }
        }
    }
    let after = store.list(b"fence/").await.context("list after")?;
    ensure_eq!(
        after.kvs,
        before.kvs,
        "{why}: keys after the refused fenced writes"
    );
    ensure_eq!(
        store.current_revision().await.context("current_revision")?,
        before.revision,
        "{why}: revision after the refused fenced writes (a refused write consumes none)"
    );
    Ok(())
}

pub(super) async fn fenced_writes(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    // While the guard holds, every fenced write behaves like the plain one.
    let g1 = store
        .put(GUARD, v("replica-1"), None)
        .await
        .context("put guard")?;
    let fence = Fence {
        key: GUARD.to_vec(),
        mod_revision: g1,
    };
    let FencedOutcome::Put(ra) = store
        .fenced_write(&fence, put("fence/data/a", "1"))
        .await
        .context("fenced put a")?
    else {
        return Err("a fenced put did not answer with Put".into());
    };
    ensure!(
        ra > g1,
        "fenced put revision {ra} not above the guard's {g1}"
    );
    let kv = store
        .get(b"fence/data/a")
        .await
        .context("get a")?
        .ok_or("fence/data/a missing after a fenced put")?;
    ensure_eq!(
        (kv.value, kv.mod_revision),
        (v("1"), ra),
        "(value, mod_revision) after a fenced put"
    );
    store
        .fenced_write(&fence, put("fence/data/b", "1"))
        .await
        .context("fenced put b")?;
    let rb = store.current_revision().await.context("current_revision")?;
    ensure_eq!(
        store
            .fenced_write(
                &fence,
                FencedOp::Delete {
                    key: k("fence/data/missing")
                }
            )
            .await
            .context("fenced delete of a missing key")?,
        FencedOutcome::Delete(None),
        "a fenced delete of a missing key"
    );
    ensure_eq!(
        store.current_revision().await.context("current_revision")?,
        rb,
        "revision after a fenced delete of a missing key"
    );
    let cas = store
        .fenced_write(
            &fence,
            FencedOp::CompareAndSwap {
                key: k("fence/data/a"),
                expected_mod_revision: g1,
                write: CasWrite::Delete,
            },
        )
        .await
        .context("fenced CAS with a stale revision")?;
    match cas {
        FencedOutcome::CompareAndSwap(CasOutcome::Failed { current: Some(kv) }) => {
            ensure_eq!(
                kv.mod_revision,
                ra,
                "mod_revision returned by a failed fenced CAS"
            );
        }
        other => {
            return Err(format!(
                "a fenced CAS whose fence holds but whose comparison fails must answer \
                 CompareAndSwap(Failed) with the key, got {other:?}"
            ))
        }
    }
    let FencedOutcome::CompareAndSwap(CasOutcome::Succeeded { revision: rc }) = store
        .fenced_write(
            &fence,
            FencedOp::CompareAndSwap {
                key: k("fence/data/c"),
                expected_mod_revision: 0,
                write: CasWrite::Put {
                    value: v("1"),
                    lease: None,
                },
            },
        )
        .await
        .context("fenced CAS create")?
    else {
        return Err("a fenced CAS create on an absent key failed".into());
    };
    let FencedOutcome::Delete(Some(rd)) = store
        .fenced_write(
            &fence,
            FencedOp::Delete {
                key: k("fence/data/c"),
            },
        )
        .await
        .context("fenced delete")?
    else {
        return Err("a fenced delete of a present key reported no revision".into());
    };
    ensure!(rd > rc, "fenced delete revision {rd} not above {rc}");
    ensure!(
        store.get(b"fence/data/c").await.context("get c")?.is_none(),
        "fence/data/c still present after a fenced delete"
    );

    // The guard is rewritten (a new leader's term): the old token is refused.
    let g2 = store
        .put(GUARD, v("replica-2"), None)
        .await
        .context("rewrite guard")?;
    all_refused(&store, &fence, g2, "guard rewritten").await?;

    // The new token works, a prefix delete included (in one revision).
    let fence2 = Fence {
        key: GUARD.to_vec(),
        mod_revision: g2,
    };
    let before = store.current_revision().await.context("current_revision")?;
    ensure_eq!(
        store
            .fenced_write(
                &fence2,
                FencedOp::DeletePrefix {
                    prefix: DATA.to_vec()
                }
            )
            .await
            .context("fenced delete_prefix")?,
        FencedOutcome::DeletePrefix(2),
        "a fenced delete_prefix of a and b"
    );
    ensure_eq!(
        store.current_revision().await.context("current_revision")?,
        before + 1,
        "revision after a fenced delete_prefix"
    );
    store
        .fenced_write(&fence2, put("fence/data/a", "2"))
        .await
        .context("fenced put with the new token")?;

    // The guard is deleted (a resignation): every token is refused, the last one too.
    store.delete(GUARD).await.context("delete guard")?;
    all_refused(&store, &fence2, 0, "guard deleted").await?;

    // A fence on "absent" holds while the key is absent.
    let absent = Fence {
        key: GUARD.to_vec(),
        mod_revision: 0,
    };
    store
        .fenced_write(&absent, put("fence/data/a", "3"))
        .await
        .context("fenced put while the guard must be absent")?;

    // The guard is bound to a lease that expires: the holder's token is refused after.
    let lease = store
        .grant_lease(options.lease_ttl)
        .await
        .context("grant")?;
    let g3 = store
        .put(GUARD, v("replica-3"), Some(lease))
        .await
        .context("put leased guard")?;
    let fence3 = Fence {
        key: GUARD.to_vec(),
        mod_revision: g3,
    };
    store
        .fenced_write(&fence3, put("fence/data/a", "4"))
        .await
        .context("fenced put while the leased guard lives")?;
    eventually(
        options.wait + options.lease_ttl,
        "leased guard deleted on expiry",
        || async {
            let listed = store.list(GUARD).await.context("list guard")?;
            Ok(keys_of(&listed.kvs).is_empty().then_some(()))
        },
    )
    .await?;
    all_refused(&store, &fence3, 0, "guard's lease expired").await?;
    let a = store
        .get(b"fence/data/a")
        .await
        .context("get a")?
        .ok_or("fence/data/a missing at the end")?;
    ensure_eq!(
        a.value,
        v("4"),
        "fence/data/a holds the last write whose fence held"
    );
    Ok(())
}
