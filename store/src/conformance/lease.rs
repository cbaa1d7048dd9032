//! Checks of leases: expiry, keep-alive and revoke, each with the delete events a watcher
//! must see.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::support::{ensure, ensure_eq, eventually, keys_of, next_event, v, CheckResult, Context};
use super::SuiteOptions;
use crate::{EventKind, Store, StoreError};

/// Reads `n` events and checks they delete exactly `keys`.
async fn expect_deletes(
    watch: &mut crate::WatchStream,
    keys: &[&str],
    options: &SuiteOptions,
    what: &str,
) -> CheckResult {
    let mut seen = BTreeSet::new();
    for _ in keys {
        let event = next_event(watch, options.wait + options.lease_ttl, what).await?;
        ensure_eq!(
            event.kind,
            EventKind::Delete,
            "{what}: kind of event for {:?}",
            String::from_utf8_lossy(&event.kv.key)
        );
        seen.insert(String::from_utf8_lossy(&event.kv.key).into_owned());
    }
    let want: BTreeSet<String> = keys.iter().map(|s| (*s).to_owned()).collect();
    ensure_eq!(seen, want, "{what}: deleted keys");
    Ok(())
}

pub(super) async fn expiry(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    let lease = store
        .grant_lease(options.lease_ttl)
        .await
        .context("grant")?;
    let keys = ["l/1", "l/2", "l/3"];
    for key in keys {
        store
            .put(key.as_bytes(), v("x"), Some(lease))
            .await
            .context(key)?;
    }
    store
        .put(b"l/keep", v("x"), None)
        .await
        .context("put l/keep")?;
    let r0 = store.current_revision().await.context("current_revision")?;
    let mut watch = store.watch(b"l/", r0 + 1).await.context("watch l/")?;

    eventually(
        options.wait + options.lease_ttl,
        "leased keys deleted on expiry",
        || async {
            let listed = store.list(b"l/").await.context("list l/")?;
            Ok((keys_of(&listed.kvs) == ["l/keep"]).then_some(()))
        },
    )
    .await?;
    expect_deletes(
        &mut watch,
        &keys,
        options,
        "delete events of an expired lease",
    )
    .await?;
    ensure!(
        store.current_revision().await.context("rev")? > r0,
        "lease expiry consumed no revision"
    );

    match store.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(id)) => ensure_eq!(id, lease, "lease id in LeaseNotFound"),
        other => {
            return Err(format!(
                "keep_alive of an expired lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    match store.put(b"l/late", v("x"), Some(lease)).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => {
            return Err(format!(
                "put with an expired lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    ensure_eq!(
        store.get(b"l/late").await.context("get l/late")?,
        None,
        "key put with an expired lease"
    );
    Ok(())
}

pub(super) async fn keep_alive(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    let ttl = options.lease_ttl + Duration::from_secs(1);
    let lease = store.grant_lease(ttl).await.context("grant")?;
    store
        .put(b"ka/1", v("x"), Some(lease))
        .await
        .context("put ka/1")?;
    let started = tokio::time::Instant::now();
    // Refresh every quarter TTL for twice the TTL: the key must outlive its first TTL.
    while started.elapsed() < ttl * 2 {
        tokio::time::sleep(ttl / 4).await;
        let left = store.keep_alive(lease).await.context("keep_alive")?;
        ensure!(left > Duration::ZERO, "keep_alive returned a zero TTL");
    }
    ensure!(
        store.get(b"ka/1").await.context("get ka/1")?.is_some(),
        "key of a kept-alive lease vanished after {:?}",
        started.elapsed()
    );
    store.revoke_lease(lease).await.context("revoke")?;
    ensure_eq!(
        store.get(b"ka/1").await.context("get ka/1")?,
        None,
        "key after revoke"
    );
    Ok(())
}

pub(super) async fn revoke(store: Arc<dyn Store>, options: &SuiteOptions) -> CheckResult {
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .context("grant")?;
    let keys = ["r/1", "r/2"];
    for key in keys {
        store
            .put(key.as_bytes(), v("x"), Some(lease))
            .await
            .context(key)?;
    }
    store
        .put(b"r/keep", v("x"), None)
        .await
        .context("put r/keep")?;
    let r0 = store.current_revision().await.context("current_revision")?;
    let mut watch = store.watch(b"r/", r0 + 1).await.context("watch r/")?;
    store.revoke_lease(lease).await.context("revoke")?;
    for key in keys {
        ensure_eq!(
            store.get(key.as_bytes()).await.context(key)?,
            None,
            "{key} right after revoke"
        );
    }
    ensure!(
        store.get(b"r/keep").await.context("get r/keep")?.is_some(),
        "revoke deleted an unleased key"
    );
    expect_deletes(
        &mut watch,
        &keys,
        options,
        "delete events of a revoked lease",
    )
    .await?;
    match store.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => {
            return Err(format!(
                "keep_alive of a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    match store.revoke_lease(lease).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => {
            return Err(format!(
                "revoking a revoked lease: expected LeaseNotFound, got {other:?}"
            ))
        }
    }
    Ok(())
}
