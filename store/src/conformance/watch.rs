//! Checks of watches: completeness and order from a past revision, from "now", under
//! concurrent writers, and the compaction error.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::future::try_join_all;

use super::support::{ensure, ensure_eq, k, next_event, v, CheckResult, Context, Seen};
use super::SuiteOptions;
use crate::{EventKind, Store, StoreError};

/// Writes a mixed history under `w/` (puts, overwrites, deletes) with noise under `x/`;
/// returns the events a watch on `w/` must report, in order.
async fn write_history(store: &dyn Store, ops: usize) -> CheckResult<Vec<Seen>> {
    let mut expected = Vec::new();
    for i in 0..ops {
        let key = format!("w/{}", i % 7);
        if i % 5 == 4 {
            if let Some(rev) = store.delete(key.as_bytes()).await.context("delete w/i")? {
                expected.push(Seen {
                    kind: EventKind::Delete,
                    key,
                    value: String::new(),
                    revision: rev,
                });
            }
        } else {
            let value = format!("value {i}");
            let rev = store
                .put(key.as_bytes(), v(&value), None)
                .await
                .context("put w/i")?;
            expected.push(Seen {
                kind: EventKind::Put,
                key,
                value,
                revision: rev,
            });
        }
        if i % 3 == 0 {
            store
                .put(format!("x/{i}").as_bytes(), v("noise"), None)
                .await
                .context("put x/i")?;
        }
    }
    Ok(expected)
}

pub(super) async fn from_past_revision(
    store: Arc<dyn Store>,
    options: &SuiteOptions,
) -> CheckResult {
    let expected = write_history(store.as_ref(), 60).await?;
    ensure!(expected.len() > 30, "history too short: {}", expected.len());

    // From the first revision ever: the whole history.
    let mut watch = store
        .watch(b"w/", 1)
        .await
        .context("watch w/ from revision 1")?;
    for (n, want) in expected.iter().enumerate() {
        let got = Seen::from(&next_event(&mut watch, options.wait, "watch from revision 1").await?);
        ensure_eq!(got, *want, "event {n} of a watch from revision 1");
    }
    drop(watch);

    // From the middle: exactly the events from there on, then live ones.
    let k_rev = expected[20].revision;
    let mut watch = store
        .watch(b"w/", k_rev)
        .await
        .context("watch w/ from a past revision")?;
    for (n, want) in expected[20..].iter().enumerate() {
        let got =
            Seen::from(&next_event(&mut watch, options.wait, "watch from a past revision").await?);
        ensure_eq!(got, *want, "event {n} of a watch from revision {k_rev}");
    }
    let r1 = store
        .put(b"w/live", v("live"), None)
        .await
        .context("put w/live")?;
    store
        .put(b"x/live", v("noise"), None)
        .await
        .context("put x/live")?;
    let r2 = store
        .delete(b"w/live")
        .await
        .context("delete w/live")?
        .ok_or("w/live missing")?;
    let live = [
        Seen {
            kind: EventKind::Put,
            key: "w/live".into(),
            value: "live".into(),
            revision: r1,
        },
        Seen {
            kind: EventKind::Delete,
            key: "w/live".into(),
            value: String::new(),
            revision: r2,
        },
    ];
    for want in live {
        let got =
            Seen::from(&next_event(&mut watch, options.wait, "live event after history").await?);
        ensure_eq!(got, want, "live event after the replayed history");
    }
    Ok(())
}

pub(super) async fn from_now(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    store
        .put(b"n/before", v("1"), None)
        .await
        .context("put n/before")?;
    let mut watch = store.watch(b"n/", 0).await.context("watch n/ from 0")?;
    let rev = store
        .put(b"n/after", v("2"), None)
        .await
        .context("put n/after")?;
    let event = next_event(&mut watch, options.wait, "watch from 0").await?;
    ensure_eq!(
        (event.kind, event.kv.key.clone(), event.revision()),
        (EventKind::Put, k("n/after"), rev),
        "first event of a watch from 0"
    );
    ensure_eq!(
        event.kv.create_revision,
        rev,
        "create_revision in a put event of a new key"
    );
    Ok(())
}

pub(super) async fn concurrent_writers(
    store: Arc<dyn Store>,
    options: &SuiteOptions,
) -> CheckResult {
    const WRITERS: usize = 8;
    const PUTS: usize = 50;
    let mut watch = store.watch(b"c/", 0).await.context("watch c/")?;
    let tasks = (0..WRITERS).map(|w| {
        let store = Arc::clone(&store);
        async move {
            let mut written = Vec::with_capacity(PUTS);
            for i in 0..PUTS {
                let key = format!("c/{w}/{i}");
                let rev = store
                    .put(key.as_bytes(), v("x"), None)
                    .await
                    .context("put c/w/i")?;
                written.push((rev, key));
            }
            Ok::<_, String>(written)
        }
    });
    let written: BTreeSet<(u64, String)> =
        try_join_all(tasks).await?.into_iter().flatten().collect();
    ensure_eq!(
        written.len(),
        WRITERS * PUTS,
        "distinct (revision, key) pairs written"
    );
    let mut last = 0;
    let mut seen = BTreeSet::new();
    for n in 0..WRITERS * PUTS {
        let event = next_event(&mut watch, options.wait, "watch under concurrent writers").await?;
        ensure!(
            event.revision() > last,
            "event {n} has revision {} after {last}",
            event.revision()
        );
        last = event.revision();
        seen.insert((last, String::from_utf8_lossy(&event.kv.key).into_owned()));
    }
    ensure!(
        seen == written,
        "watched events differ from the writes: missing {:?}, unexpected {:?}",
        written.difference(&seen).take(5).collect::<Vec<_>>(),
        seen.difference(&written).take(5).collect::<Vec<_>>()
    );

    // A second watcher replaying the same history from its first revision sees the same
    // sequence.
    let first = seen.iter().next().map_or(0, |(rev, _)| *rev);
    let mut replay = store.watch(b"c/", first).await.context("replay watch c/")?;
    for (n, want) in seen.iter().enumerate() {
        let event = next_event(&mut replay, options.wait, "replaying concurrent writes").await?;
        let got = (
            event.revision(),
            String::from_utf8_lossy(&event.kv.key).into_owned(),
        );
        ensure_eq!(got, *want, "event {n} of a replay of the concurrent writes");
    }
    Ok(())
}

pub(super) async fn compacted(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(
            store
                .put(format!("cp/{i}").as_bytes(), v("x"), None)
                .await
                .context("put cp/i")?,
        );
    }
    store.compact(revs[4]).await.context("compact")?;
    match store.watch(b"cp/", revs[1]).await {
        Err(StoreError::Compacted {
            requested,
            compacted,
        }) => {
            ensure_eq!(requested, revs[1], "requested revision in Compacted");
            ensure!(
                compacted > requested && compacted <= revs[4],
                "compaction point {compacted} in Compacted not in {}..={}",
                requested + 1,
                revs[4]
            );
        }
        Err(other) => {
            return Err(format!(
                "watch from a compacted revision: expected Compacted, got {other}"
            ))
        }
        Ok(_) => return Err("watch from a compacted revision succeeded".into()),
    }
    let mut watch = store
        .watch(b"cp/", revs[4])
        .await
        .context("watch from the compaction point")?;
    for (i, rev) in revs.iter().enumerate().skip(4) {
        let event = next_event(&mut watch, options.wait, "watch from the compaction point").await?;
        ensure_eq!(
            (event.kv.key.clone(), event.revision()),
            (k(&format!("cp/{i}")), *rev),
            "event of a watch from the compaction point"
        );
    }
    let listed = store.list(b"cp/").await.context("list after compaction")?;
    ensure_eq!(listed.kvs.len(), 10, "keys listed after compaction");
    Ok(())
}
