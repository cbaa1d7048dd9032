//! Checks of the key-value half of the contract: revisions, get, list, prefixes,
//! compare-and-swap, delete_prefix, value sizes and large lists.

use std::sync::Arc;

use futures::future::try_join_all;

use super::support::{
    ensure, ensure_eq, eventually, k, keys_of, next_event, v, CheckResult, Context,
};
use super::SuiteOptions;
use crate::{CasOutcome, CasWrite, EventKind, Store, StoreError, MAX_VALUE_SIZE};

pub(super) async fn revision_monotonic(
    store: Arc<dyn Store>,
    options: &SuiteOptions,
) -> CheckResult {
    let mut revisions = vec![store.current_revision().await.context("current_revision")?];
    let record = |what: &str, rev: u64, revisions: &mut Vec<u64>| -> CheckResult {
        let last = *revisions.last().unwrap_or(&0);
        ensure!(
            rev > last,
            "{what} returned revision {rev}, not above the previous {last}"
        );
        revisions.push(rev);
        Ok(())
    };

    let rev = store.put(b"rm/a", v("1"), None).await.context("put rm/a")?;
    record("put rm/a", rev, &mut revisions)?;
    ensure_eq!(
        store.current_revision().await.context("current_revision")?,
        rev,
        "current_revision right after a put"
    );
    let rev = store
        .put(b"rm/a", v("2"), None)
        .await
        .context("overwrite rm/a")?;
    record("overwrite rm/a", rev, &mut revisions)?;
    let rev = store.put(b"rm/b", v("1"), None).await.context("put rm/b")?;
    record("put rm/b", rev, &mut revisions)?;
    let b_rev = rev;

    let Some(rev) = store.delete(b"rm/a").await.context("delete rm/a")? else {
        return Err("delete of existing rm/a returned None".into());
    };
    record("delete rm/a", rev, &mut revisions)?;
    ensure_eq!(
        store.delete(b"rm/a").await.context("delete missing rm/a")?,
        None,
        "delete of a missing key"
    );
    ensure_eq!(
        store.current_revision().await.context("current_revision")?,
        rev,
        "current_revision after deleting a missing key (must not consume a revision)"
    );

    match store
        .compare_and_swap(
            b"rm/b",
            b_rev,
            CasWrite::Put {
                value: v("2"),
                lease: None,
            },
        )
        .await
        .context("CAS rm/b")?
    {
        CasOutcome::Succeeded { revision } => record("CAS rm/b", revision, &mut revisions)?,
        CasOutcome::Failed { current } => {
            return Err(format!(
                "CAS with the right mod_revision failed; current {current:?}"
            ))
        }
    }
    let before = *revisions.last().unwrap_or(&0);
    let failed = store
        .compare_and_swap(
            b"rm/b",
            b_rev,
            CasWrite::Put {
                value: v("3"),
                lease: None,
            },
        )
        .await
        .context("stale CAS rm/b")?;
    ensure!(
        matches!(failed, CasOutcome::Failed { .. }),
        "stale CAS succeeded: {failed:?}"
    );
    ensure_eq!(
        store.current_revision().await.context("current_revision")?,
        before,
        "current_revision after a failed CAS (must not consume a revision)"
    );

    let deleted = store
        .delete_prefix(b"rm/")
        .await
        .context("delete_prefix rm/")?;
    ensure_eq!(deleted, 1, "keys deleted by delete_prefix rm/");
    let rev = store.current_revision().await.context("current_revision")?;
    record("delete_prefix rm/", rev, &mut revisions)?;

    let lease = store
        .grant_lease(options.lease_ttl)
        .await
        .context("grant lease")?;
    let rev = store
        .put(b"rm/l", v("x"), Some(lease))
        .await
        .context("put rm/l with lease")?;
    record("put rm/l with lease", rev, &mut revisions)?;
    let wait = options.wait + options.lease_ttl;
    eventually(wait, "rm/l deleted by lease expiry", || async {
        Ok(store
            .get(b"rm/l")
            .await
            .context("get rm/l")?
            .is_none()
            .then_some(()))
    })
    .await?;
    let rev = store.current_revision().await.context("current_revision")?;
    record("lease expiry", rev, &mut revisions)?;
    Ok(())
}

pub(super) async fn get_and_revisions(store: Arc<dyn Store>) -> CheckResult {
    ensure_eq!(
        store.get(b"g/k").await.context("get missing")?,
        None,
        "get of a missing key"
    );
    let r1 = store.put(b"g/k", v("v1"), None).await.context("put v1")?;
    let kv = store
        .get(b"g/k")
        .await
        .context("get")?
        .ok_or("g/k missing after put")?;
    ensure_eq!(kv.key, k("g/k"), "key");
    ensure_eq!(kv.value, v("v1"), "value");
    ensure_eq!(
        (kv.create_revision, kv.mod_revision),
        (r1, r1),
        "(create, mod) after create"
    );
    ensure_eq!(kv.lease, None, "lease of a key put without lease");

    let r2 = store.put(b"g/k", v("v2"), None).await.context("put v2")?;
    let kv = store
        .get(b"g/k")
        .await
        .context("get")?
        .ok_or("g/k missing")?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision),
        (r1, r2),
        "(create, mod) after update"
    );
    ensure_eq!(kv.value, v("v2"), "value after update");

    let lease = store
        .grant_lease(std::time::Duration::from_secs(60))
        .await
        .context("grant")?;
    let r3 = store
        .put(b"g/k", v("v3"), Some(lease))
        .await
        .context("put with lease")?;
    let kv = store
        .get(b"g/k")
        .await
        .context("get")?
        .ok_or("g/k missing")?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision),
        (r1, r3),
        "(create, mod) after leased put"
    );
    ensure_eq!(kv.lease, Some(lease), "lease of a key put with a lease");

    let r4 = store
        .delete(b"g/k")
        .await
        .context("delete")?
        .ok_or("delete returned None")?;
    ensure!(r4 > r3, "delete revision {r4} not above {r3}");
    ensure_eq!(
        store.get(b"g/k").await.context("get deleted")?,
        None,
        "get after delete"
    );
    let r5 = store
        .put(b"g/k", v("v4"), None)
        .await
        .context("re-create")?;
    let kv = store
        .get(b"g/k")
        .await
        .context("get")?
        .ok_or("g/k missing")?;
    ensure_eq!(
        (kv.create_revision, kv.mod_revision),
        (r5, r5),
        "(create, mod) after re-creating a deleted key"
    );
    store
        .revoke_lease(lease)
        .await
        .context("revoke the unused lease")?;
    ensure!(
        store.get(b"g/k").await.context("get")?.is_some(),
        "revoking a lease deleted a key no longer bound to it"
    );
    Ok(())
}

pub(super) async fn list_sorted_with_revision(
    store: Arc<dyn Store>,
    options: &SuiteOptions,
) -> CheckResult {
    let empty = store
        .list(b"")
        .await
        .context("list everything in a fresh store")?;
    ensure!(
        empty.kvs.is_empty(),
        "the builder's store is not empty: {:?}",
        keys_of(&empty.kvs)
    );

    let mut last = 0;
    for key in ["list/c", "list/a", "lisu", "list/b/x", "lis", "list/b"] {
        last = store
            .put(key.as_bytes(), v(&format!("value of {key}")), None)
            .await
            .context(key)?;
    }
    let listed = store.list(b"list/").await.context("list list/")?;
    ensure_eq!(
        keys_of(&listed.kvs),
        vec!["list/a", "list/b", "list/b/x", "list/c"],
        "keys of list(list/)"
    );
    for kv in &listed.kvs {
        let key = String::from_utf8_lossy(&kv.key);
        ensure_eq!(kv.value, v(&format!("value of {key}")), "value of {key}");
        ensure!(
            kv.mod_revision > 0 && kv.mod_revision <= last,
            "mod_revision {} of {key} outside 1..={last}",
            kv.mod_revision
        );
    }
    let current = store.current_revision().await.context("current_revision")?;
    ensure_eq!(
        listed.revision,
        current,
        "list revision with no writes since"
    );
    ensure!(
        listed.revision >= last,
        "list revision {} below the last write {last}",
        listed.revision
    );

    let all = store.list(b"").await.context("list everything")?;
    ensure_eq!(
        keys_of(&all.kvs),
        vec!["lis", "list/a", "list/b", "list/b/x", "list/c", "lisu"],
        "keys of list(\"\")"
    );
    let none = store
        .list(b"nothing/")
        .await
        .context("list of an empty prefix")?;
    ensure!(
        none.kvs.is_empty(),
        "list(nothing/) returned {:?}",
        keys_of(&none.kvs)
    );
    ensure_eq!(none.revision, current, "revision of an empty list");

    let mut watch = store
        .watch(b"list/", listed.revision + 1)
        .await
        .context("watch after list")?;
    let rev = store
        .put(b"list/d", v("d"), None)
        .await
        .context("put list/d")?;
    let event = next_event(&mut watch, options.wait, "watch continuing a list").await?;
    ensure_eq!(
        (event.kind, event.kv.key.clone(), event.revision()),
        (EventKind::Put, k("list/d"), rev),
        "first event after the list"
    );
    Ok(())
}

pub(super) async fn prefix_isolation(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    let keys: [&[u8]; 13] = [
        b"a",
        b"a/",
        b"a/x",
        b"a/y",
        b"ab",
        b"a0",
        b"b",
        b"p\xff",
        b"p\xff\x01",
        b"q",
        b"\xff\xfe",
        b"\xff\xff",
        b"\xff\xff\x01",
    ];
    for key in keys {
        store.put(key, v("x"), None).await.context("put")?;
    }
    let raw = |kvs: &[crate::KeyValue]| kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
    ensure_eq!(
        raw(&store.list(b"a/").await.context("list a/")?.kvs),
        vec![k("a/"), k("a/x"), k("a/y")],
        "list(a/)"
    );
    ensure_eq!(
        raw(&store.list(b"a").await.context("list a")?.kvs),
        vec![k("a"), k("a/"), k("a/x"), k("a/y"), k("a0"), k("ab")],
        "list(a)"
    );
    ensure_eq!(
        raw(&store.list(b"p\xff").await.context("list p\\xff")?.kvs),
        vec![b"p\xff".to_vec(), b"p\xff\x01".to_vec()],
        "list(p\\xff)"
    );
    ensure_eq!(
        raw(&store
            .list(b"\xff\xff")
            .await
            .context("list \\xff\\xff")?
            .kvs),
        vec![b"\xff\xff".to_vec(), b"\xff\xff\x01".to_vec()],
        "list(\\xff\\xff)"
    );

    let mut watch = store.watch(b"a/", 0).await.context("watch a/")?;
    for key in ["ab", "a0", "b", "a"] {
        store.put(key.as_bytes(), v("y"), None).await.context(key)?;
    }
    store.put(b"a/z", v("z"), None).await.context("put a/z")?;
    let event = next_event(&mut watch, options.wait, "watch a/").await?;
    ensure_eq!(
        event.kv.key,
        k("a/z"),
        "first event of watch(a/) after writes to neighbours"
    );

    let deleted = store
        .delete_prefix(b"a/")
        .await
        .context("delete_prefix a/")?;
    ensure_eq!(deleted, 4, "keys deleted by delete_prefix(a/)");
    for key in ["a", "ab", "a0", "b"] {
        ensure!(
            store.get(key.as_bytes()).await.context(key)?.is_some(),
            "delete_prefix(a/) removed the neighbour {key}"
        );
    }
    let deleted = store
        .delete_prefix(b"\xff\xff")
        .await
        .context("delete_prefix \\xff\\xff")?;
    ensure_eq!(deleted, 2, "keys deleted by delete_prefix(\\xff\\xff)");
    ensure!(
        store.get(b"\xff\xfe").await.context("get")?.is_some(),
        "delete_prefix(\\xff\\xff) removed \\xff\\xfe"
    );
    Ok(())
}

pub(super) async fn compare_and_swap(store: Arc<dyn Store>) -> CheckResult {
    let put = |value: &str| CasWrite::Put {
        value: v(value),
        lease: None,
    };
    let r0 = store.current_revision().await.context("current_revision")?;
    let outcome = store
        .compare_and_swap(b"cas/k", 5, put("x"))
        .await
        .context("CAS absent@5")?;
    ensure_eq!(
        outcome,
        CasOutcome::Failed { current: None },
        "CAS on an absent key expecting 5"
    );
    ensure_eq!(
        store.current_revision().await.context("rev")?,
        r0,
        "revision after failed CAS"
    );

    let CasOutcome::Succeeded { revision: r1 } = store
        .compare_and_swap(b"cas/k", 0, put("v1"))
        .await
        .context("CAS create")?
    else {
        return Err("CAS expecting 0 on an absent key failed".into());
    };
    let kv = store
        .get(b"cas/k")
        .await
        .context("get")?
        .ok_or("cas/k missing after CAS create")?;
    ensure_eq!(
        (kv.value.clone(), kv.create_revision, kv.mod_revision),
        (v("v1"), r1, r1),
        "(value, create, mod) after CAS create"
    );

    match store
        .compare_and_swap(b"cas/k", 0, put("v2"))
        .await
        .context("CAS create again")?
    {
        CasOutcome::Failed {
            current: Some(current),
        } => {
            ensure_eq!(current, kv, "current key returned by a failed CAS");
        }
        other => return Err(format!("CAS expecting 0 on a present key: {other:?}")),
    }

    let r2 = store.put(b"cas/k", v("v2"), None).await.context("put v2")?;
    match store
        .compare_and_swap(b"cas/k", r1, put("v3"))
        .await
        .context("stale CAS")?
    {
        CasOutcome::Failed {
            current: Some(current),
        } => {
            ensure_eq!(
                (current.value, current.mod_revision),
                (v("v2"), r2),
                "(value, mod) returned by a stale CAS"
            );
        }
        other => return Err(format!("CAS with stale revision {r1}: {other:?}")),
    }
    ensure_eq!(
        store.current_revision().await.context("rev")?,
        r2,
        "revision after stale CAS"
    );

    let CasOutcome::Succeeded { revision: r3 } = store
        .compare_and_swap(b"cas/k", r2, put("v3"))
        .await
        .context("CAS update")?
    else {
        return Err("CAS with the current mod_revision failed".into());
    };
    ensure!(r3 > r2, "CAS revision {r3} not above {r2}");
    let kv = store
        .get(b"cas/k")
        .await
        .context("get")?
        .ok_or("cas/k missing")?;
    ensure_eq!(
        (kv.value.clone(), kv.create_revision, kv.mod_revision),
        (v("v3"), r1, r3),
        "(value, create, mod) after CAS update"
    );

    let outcome = store
        .compare_and_swap(b"cas/k", r2, CasWrite::Delete)
        .await
        .context("stale CAS delete")?;
    ensure!(
        matches!(outcome, CasOutcome::Failed { current: Some(_) }),
        "stale CAS delete: {outcome:?}"
    );
    ensure!(
        store.get(b"cas/k").await.context("get")?.is_some(),
        "stale CAS delete removed the key"
    );
    let CasOutcome::Succeeded { revision: r4 } = store
        .compare_and_swap(b"cas/k", r3, CasWrite::Delete)
        .await
        .context("CAS delete")?
    else {
        return Err("CAS delete with the current mod_revision failed".into());
    };
    ensure!(r4 > r3, "CAS delete revision {r4} not above {r3}");
    ensure_eq!(
        store.get(b"cas/k").await.context("get")?,
        None,
        "key after CAS delete"
    );

    let lease = store
        .grant_lease(std::time::Duration::from_secs(60))
        .await
        .context("grant")?;
    let outcome = store
        .compare_and_swap(
            b"cas/leased",
            0,
            CasWrite::Put {
                value: v("l"),
                lease: Some(lease),
            },
        )
        .await
        .context("CAS with lease")?;
    ensure!(
        matches!(outcome, CasOutcome::Succeeded { .. }),
        "CAS create with lease: {outcome:?}"
    );
    let kv = store
        .get(b"cas/leased")
        .await
        .context("get")?
        .ok_or("cas/leased missing")?;
    ensure_eq!(kv.lease, Some(lease), "lease set by CAS");
    store.revoke_lease(lease).await.context("revoke")?;

    // Concurrent read-modify-write increments: CAS must serialise them.
    const TASKS: u64 = 8;
    const INCREMENTS: u64 = 10;
    store
        .put(b"cas/counter", v("0"), None)
        .await
        .context("put counter")?;
    let tasks = (0..TASKS).map(|_| {
        let store = Arc::clone(&store);
        async move {
            let mut done = 0;
            let mut attempts = 0;
            while done < INCREMENTS {
                attempts += 1;
                ensure!(attempts < 10_000, "CAS increments made no progress");
                let kv = store
                    .get(b"cas/counter")
                    .await
                    .context("get counter")?
                    .ok_or("counter missing")?;
                let n: u64 = String::from_utf8_lossy(&kv.value)
                    .parse()
                    .map_err(|e| format!("counter value: {e}"))?;
                let write = CasWrite::Put {
                    value: (n + 1).to_string().into_bytes(),
                    lease: None,
                };
                if let CasOutcome::Succeeded { .. } = store
                    .compare_and_swap(b"cas/counter", kv.mod_revision, write)
                    .await
                    .context("CAS increment")?
                {
                    done += 1;
                }
            }
            Ok::<_, String>(())
        }
    });
    try_join_all(tasks).await?;
    let kv = store
        .get(b"cas/counter")
        .await
        .context("get counter")?
        .ok_or("counter missing")?;
    ensure_eq!(
        kv.value,
        (TASKS * INCREMENTS).to_string().into_bytes(),
        "counter after {TASKS}x{INCREMENTS} concurrent CAS increments"
    );
    Ok(())
}

pub(super) async fn delete_prefix_one_revision(
    store: Arc<dyn Store>,
    options: &SuiteOptions,
) -> CheckResult {
    for i in 0..10 {
        store
            .put(format!("dp/{i}").as_bytes(), v("x"), None)
            .await
            .context("put dp/i")?;
    }
    store
        .put(b"dp", v("outside"), None)
        .await
        .context("put dp")?;
    store
        .put(b"dq/0", v("outside"), None)
        .await
        .context("put dq/0")?;
    let r0 = store.current_revision().await.context("current_revision")?;
    let mut watch = store.watch(b"dp/", r0 + 1).await.context("watch dp/")?;
    let deleted = store
        .delete_prefix(b"dp/")
        .await
        .context("delete_prefix dp/")?;
    ensure_eq!(deleted, 10, "keys deleted");
    let r1 = store.current_revision().await.context("current_revision")?;
    ensure!(r1 > r0, "revision {r1} after delete_prefix not above {r0}");
    let mut keys = Vec::new();
    for _ in 0..10 {
        let event = next_event(&mut watch, options.wait, "delete events of delete_prefix").await?;
        ensure_eq!(
            event.kind,
            EventKind::Delete,
            "kind of event for {:?}",
            event.kv.key
        );
        ensure_eq!(
            event.revision(),
            r1,
            "revision of every delete event of one delete_prefix"
        );
        keys.push(String::from_utf8_lossy(&event.kv.key).into_owned());
    }
    keys.sort();
    let expected: Vec<String> = (0..10).map(|i| format!("dp/{i}")).collect();
    ensure_eq!(keys, expected, "keys in the delete events");
    ensure!(
        store.list(b"dp/").await.context("list")?.kvs.is_empty(),
        "keys left under dp/"
    );
    ensure!(
        store.get(b"dp").await.context("get dp")?.is_some(),
        "delete_prefix(dp/) removed dp"
    );
    ensure!(
        store.get(b"dq/0").await.context("get dq/0")?.is_some(),
        "delete_prefix(dp/) removed dq/0"
    );
    ensure_eq!(
        store
            .delete_prefix(b"dp/")
            .await
            .context("delete_prefix again")?,
        0,
        "second delete_prefix"
    );
    ensure_eq!(
        store.current_revision().await.context("rev")?,
        r1,
        "revision after deleting an empty prefix (must not consume a revision)"
    );
    Ok(())
}

pub(super) async fn value_size_limit(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    let big: Vec<u8> = (0..MAX_VALUE_SIZE).map(|i| (i % 251) as u8).collect();
    let r0 = store.current_revision().await.context("current_revision")?;
    let mut watch = store.watch(b"big/", r0 + 1).await.context("watch big/")?;
    let rev = store
        .put(b"big/max", big.clone(), None)
        .await
        .context("put a MAX_VALUE_SIZE value")?;
    let kv = store
        .get(b"big/max")
        .await
        .context("get big/max")?
        .ok_or("big/max missing")?;
    ensure!(
        kv.value == big,
        "value of {} bytes read back as {} different bytes",
        big.len(),
        kv.value.len()
    );
    let listed = store.list(b"big/").await.context("list big/")?;
    ensure!(
        listed.kvs.len() == 1 && listed.kvs[0].value == big,
        "list(big/) did not return the big value intact"
    );
    let event = next_event(&mut watch, options.wait, "watch big/").await?;
    ensure!(
        event.revision() == rev && event.kv.value == big,
        "watch event of the big value not intact"
    );

    let over = vec![7u8; MAX_VALUE_SIZE + 1];
    match store.put(b"big/over", over.clone(), None).await {
        Err(StoreError::ValueTooLarge { size, max, .. }) => {
            ensure_eq!(
                (size, max),
                (MAX_VALUE_SIZE + 1, MAX_VALUE_SIZE),
                "(size, max) in ValueTooLarge"
            );
        }
        other => {
            return Err(format!(
                "put of MAX_VALUE_SIZE + 1 bytes: expected ValueTooLarge, got {:?}",
                other.map(|_| ())
            ))
        }
    }
    let write = CasWrite::Put {
        value: over,
        lease: None,
    };
    match store.compare_and_swap(b"big/over", 0, write).await {
        Err(StoreError::ValueTooLarge { .. }) => {}
        other => {
            return Err(format!(
                "CAS of MAX_VALUE_SIZE + 1 bytes: expected ValueTooLarge, got {:?}",
                other.map(|_| ())
            ))
        }
    }
    ensure_eq!(
        store.get(b"big/over").await.context("get big/over")?,
        None,
        "rejected key"
    );
    ensure_eq!(
        store.current_revision().await.context("rev")?,
        rev,
        "revision after rejected writes"
    );
    Ok(())
}

pub(super) async fn list_many_keys(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    let n = options.many_keys;
    let writers = options.many_keys_writers.max(1);
    let key = |i: usize| format!("many/{i:07}");
    let tasks = (0..writers).map(|w| {
        let store = Arc::clone(&store);
        async move {
            for i in (w..n).step_by(writers) {
                store
                    .put(key(i).as_bytes(), v(&i.to_string()), None)
                    .await
                    .context("put many/i")?;
            }
            Ok::<_, String>(())
        }
    });
    try_join_all(tasks).await?;
    store
        .put(b"manz", v("outside"), None)
        .await
        .context("put manz")?;
    let listed = store.list(b"many/").await.context("list many/")?;
    ensure_eq!(listed.kvs.len(), n, "number of keys listed");
    for (i, kv) in listed.kvs.iter().enumerate() {
        ensure!(
            kv.key == key(i).into_bytes() && kv.value == v(&i.to_string()),
            "entry {i} of the list is {:?}={:?}, expected {}={i}",
            String::from_utf8_lossy(&kv.key),
            String::from_utf8_lossy(&kv.value),
            key(i)
        );
    }
    ensure_eq!(
        listed.revision,
        store.current_revision().await.context("rev")?,
        "list revision"
    );
    Ok(())
}
