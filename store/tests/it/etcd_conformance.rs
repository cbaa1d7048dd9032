//! The shared store conformance suite against a real etcd (one fresh etcd process per
//! check, so every check starts from an empty store at revision 1).

use std::sync::Arc;

use clustermesh_store::conformance::{FreshStore, Suite};
use clustermesh_store::Store;
use clustermesh_test_support as support;
use support::etcd::{etcd_binary, EtcdServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_passes_the_store_conformance_suite() {
    support::init_tracing();
    let Some(binary) = etcd_binary() else {
        // Fails under CI, skips with a message otherwise.
        let _ = EtcdServer::start_or_skip("etcd_passes_the_store_conformance_suite").await;
        return;
    };
    let result = Suite::test_all(|| {
        let binary = binary.clone();
        async move {
            let server = EtcdServer::start_with(binary).await;
            let store = server.connect().await;
            Ok(FreshStore::with_guard(
                Arc::new(store) as Arc<dyn Store>,
                server,
            ))
        }
    })
    .await;
    match result {
        Ok(passed) => eprintln!("{} conformance checks passed", passed.len()),
        Err(failure) => panic!("{failure}"),
    }
}
