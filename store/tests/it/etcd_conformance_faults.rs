//! The conformance suite must catch broken backends: each test wraps a real etcd store in
//! a decorator with one deliberate fault and checks that the matching check fails (and
//! names itself), so a passing suite means something.

use std::sync::Arc;
use std::time::Duration;

use clustermesh_store::conformance::{Check, FreshStore, Suite, SuiteOptions};
use clustermesh_store::{
    CasOutcome, CasWrite, EtcdStore, Fence, FencedOp, FencedOutcome, KeyValue, LeaseId, ListResult,
    Result, Revision, Store, WatchStream,
};
use clustermesh_test_support as support;
use futures::StreamExt;
use support::etcd::{etcd_binary, EtcdServer};

/// The fault a [`Faulty`] store injects.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `list` returns keys in reverse order.
    ListUnsorted,
    /// `watch` silently drops every fifth event.
    WatchDropsEvents,
    /// `compare_and_swap` writes without comparing.
    CasIgnoresRevision,
    /// Leases are granted for an hour whatever TTL was asked for.
    LeaseNeverExpires,
    /// `fenced_write` writes without checking the fence.
    FenceIgnored,
}

/// An etcd store with one fault.
#[derive(Debug)]
struct Faulty {
    inner: EtcdStore,
    fault: Fault,
}

#[async_trait::async_trait]
impl Store for Faulty {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &[u8]) -> Result<ListResult> {
        let mut list = self.inner.list(prefix).await?;
        if matches!(self.fault, Fault::ListUnsorted) {
            list.kvs.reverse();
        }
        Ok(list)
    }
    async fn put(&self, key: &[u8], value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &[u8]) -> Result<Option<Revision>> {
        self.inner.delete(key).await
    }
    async fn delete_prefix(&self, prefix: &[u8]) -> Result<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Revision,
        write: CasWrite,
    ) -> Result<CasOutcome> {
        if !matches!(self.fault, Fault::CasIgnoresRevision) {
            return self.inner.compare_and_swap(key, expected, write).await;
        }
        let revision = match write {
            CasWrite::Put { value, lease } => self.inner.put(key, value, lease).await?,
            CasWrite::Delete => self.inner.delete(key).await?.unwrap_or_default(),
        };
        Ok(CasOutcome::Succeeded { revision })
    }
    async fn fenced_write(&self, fence: &Fence, op: FencedOp) -> Result<FencedOutcome> {
        if !matches!(self.fault, Fault::FenceIgnored) {
            return self.inner.fenced_write(fence, op).await;
        }
        Ok(match op {
            FencedOp::Put { key, value, lease } => {
                FencedOutcome::Put(self.inner.put(&key, value, lease).await?)
            }
            FencedOp::Delete { key } => FencedOutcome::Delete(self.inner.delete(&key).await?),
            FencedOp::DeletePrefix { prefix } => {
                FencedOutcome::DeletePrefix(self.inner.delete_prefix(&prefix).await?)
            }
            FencedOp::CompareAndSwap {
                key,
                expected_mod_revision,
                write,
            } => FencedOutcome::CompareAndSwap(
                self.inner
                    .compare_and_swap(&key, expected_mod_revision, write)
                    .await?,
            ),
        })
    }
    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream> {
        let stream = self.inner.watch(prefix, from).await?;
        if !matches!(self.fault, Fault::WatchDropsEvents) {
            return Ok(stream);
        }
        Ok(Box::pin(
            stream
                .enumerate()
                .filter(|(i, _)| futures::future::ready(i % 5 != 3))
                .map(|(_, item)| item),
        ))
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        match self.fault {
            Fault::LeaseNeverExpires => self.inner.grant_lease(Duration::from_secs(3600)).await,
            _ => self.inner.grant_lease(ttl).await,
        }
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke_lease(lease).await
    }
    async fn current_revision(&self) -> Result<Revision> {
        self.inner.current_revision().await
    }
    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await
    }
}

async fn expect_failure(fault: Fault, check: Check) {
    support::init_tracing();
    let Some(binary) = etcd_binary() else {
        let _ = EtcdServer::start_or_skip("etcd_conformance_faults").await;
        return;
    };
    let builder = || {
        let binary = binary.clone();
        async move {
            let server = EtcdServer::start_with(binary).await;
            let inner = server.connect().await;
            let store = Faulty { inner, fault };
            Ok(FreshStore::with_guard(
                Arc::new(store) as Arc<dyn Store>,
                server,
            ))
        }
    };
    // Short waits: the faulty behaviour shows at once, no need for the default 30 s.
    let suite = Suite::new().with_options(SuiteOptions {
        wait: Duration::from_secs(5),
        ..SuiteOptions::default()
    });
    let failure = suite
        .run(&builder, &[check])
        .await
        .expect_err("the suite must reject the faulty store");
    assert_eq!(failure.failures.len(), 1);
    assert_eq!(failure.failures[0].check, check);
    let text = failure.to_string();
    assert!(text.contains(check.name()), "{text}");
    eprintln!("{fault:?} caught: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsorted_list_is_caught() {
    expect_failure(Fault::ListUnsorted, Check::ListSortedWithRevision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_dropping_events_is_caught() {
    expect_failure(Fault::WatchDropsEvents, Check::WatchFromPastRevision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_without_comparison_is_caught() {
    expect_failure(Fault::CasIgnoresRevision, Check::CompareAndSwap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_that_never_expires_is_caught() {
    expect_failure(Fault::LeaseNeverExpires, Check::LeaseExpiry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_ignoring_its_fence_is_caught() {
    expect_failure(Fault::FenceIgnored, Check::FencedWrite).await;
}
