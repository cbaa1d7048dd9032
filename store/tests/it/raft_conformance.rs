//! The shared store conformance suite against the embedded raft backend, with one and
//! with three replicas (a fresh cluster in a fresh temporary directory per check). With
//! three replicas the store handle is on a follower, so every write is forwarded to the
//! leader and every read goes through ReadIndex.

use std::sync::Arc;
use std::time::Duration;

use clustermesh_store::conformance::{FreshStore, Suite};
use clustermesh_store::raft::{LocalCluster, ReplicaTls};
use clustermesh_store::Store;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn run(replicas: usize) {
    init_tracing();
    let result = Suite::test_all(|| async move {
        let dir = tempfile::tempdir()?;
        // Several replicas talk over loopback mTLS, as in production.
        let tls = if replicas > 1 {
            Some(ReplicaTls::ephemeral_loopback("clustermesh.test", "conformance")?.0)
        } else {
            None
        };
        let cluster = LocalCluster::start(replicas, dir.path(), tls).await?;
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
        // Prefer a follower: it exercises forwarding and ReadIndex.
        let pick = (0..cluster.len()).find(|i| *i != leader).unwrap_or(leader);
        let store = cluster.store(pick).expect("replica is running");
        Ok(FreshStore::with_guard(
            Arc::new(store) as Arc<dyn Store>,
            (cluster, dir),
        ))
    })
    .await;
    match result {
        Ok(passed) => eprintln!(
            "{} conformance checks passed on {replicas} raft replica(s)",
            passed.len()
        ),
        Err(failure) => panic!("{failure}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_one_replica_passes_the_store_conformance_suite() {
    run(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_three_replicas_pass_the_store_conformance_suite() {
    run(3).await;
}
