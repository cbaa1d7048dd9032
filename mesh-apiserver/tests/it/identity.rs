//! Identity allocation by compare-and-swap against a real store (embedded raft).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::sync::Arc;

use crate::support;
use clustermesh_api::cluster::ClusterIdMode;
use clustermesh_api::security_identity::SecurityIdentity;
use clustermesh_apiserver::identity::IdentityAllocator;
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::translate::Labels;
use support::{Backend, TestStore};

fn labels(app: &str) -> Labels {
    [("app".to_owned(), app.to_owned())].into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_never_share_a_number_and_restarts_keep_numbers() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let load = || {
        IdentityAllocator::load(
            Arc::clone(&ts.store),
            "east",
            9,
            ClusterIdMode::Max511,
            Arc::new(Metrics::new()),
        )
    };
    let mut a = load().await.unwrap();
    let mut b = load().await.unwrap();
    // Both start at the same first number; the compare-and-swap lets only one have it.
    let web = a.acquire(&labels("web")).await.unwrap();
    let db = b.acquire(&labels("db")).await.unwrap();
    assert_ne!(web, db);
    for id in [web, db] {
        let (cluster, local) = SecurityIdentity::new(id).split(ClusterIdMode::Max511);
        assert_eq!(cluster, 9);
        assert!(local >= clustermesh_api::security_identity::MIN_LOCAL_IDENTITY);
    }
    // A second user of the same labels gets the same number without a write.
    let rev = ts.store.current_revision().await.unwrap();
    assert_eq!(a.acquire(&labels("web")).await.unwrap(), web);
    assert_eq!(ts.store.current_revision().await.unwrap(), rev);

    // A restarted allocator finds both numbers.
    let mut c = load().await.unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c.acquire(&labels("web")).await.unwrap(), web);
    assert_eq!(c.acquire(&labels("db")).await.unwrap(), db);
    assert_eq!(
        ts.store.current_revision().await.unwrap(),
        rev,
        "restart allocated again"
    );

    // Released and past the grace period: collected; still used: kept.
    c.release(&labels("db"));
    assert_eq!(
        c.collect_garbage(std::time::Duration::ZERO).await.unwrap(),
        1
    );
    assert_eq!(c.get(&labels("db")), None);
    assert_eq!(c.get(&labels("web")), Some(web));
    let reloaded = load().await.unwrap();
    assert_eq!(reloaded.len(), 1);
    ts.shutdown().await;
}
