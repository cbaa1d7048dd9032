//! A raft data directory has one owner at a time: a second replica opening it (here in
//! the same process; the apiserver binary test covers a second process) is refused at
//! once with an error naming the directory, the first keeps serving, and once the first
//! stops the directory can be opened again.

// Test code: a failed setup step should abort the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_store::raft::{LocalCluster, RaftConfig, RaftStore, Replica};
use clustermesh_store::{Store, StoreError};

fn single_config(dir: &Path) -> RaftConfig {
    RaftConfig::builder(1, dir)
        .member(1, "127.0.0.1:0")
        .build()
        .unwrap()
}

async fn wait_leader(replica: &Replica) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !replica.is_leader() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "single replica never became leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_in_use(err: &StoreError, dir: &Path) {
    match err {
        StoreError::DataDirInUse { dir: d, pid } => {
            assert_eq!(Path::new(d), dir);
            assert_eq!(*pid, Some(std::process::id()));
        }
        other => panic!("expected DataDirInUse, got {other}"),
    }
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("(pid {})", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("--raft-data-dir"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_replica_on_a_data_dir_is_refused_until_the_first_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("raft");
    let first = Replica::start(single_config(&dir)).await.unwrap();
    wait_leader(&first).await;
    let store = RaftStore::new(Arc::clone(&first));
    let rev = store.put(b"k/a", b"1".to_vec(), None).await.unwrap();
    assert!(dir.join("LOCK").exists());

    // Both entry points are refused, before anything is written.
    let err = Replica::start(single_config(&dir)).await.unwrap_err();
    assert_in_use(&err, &dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = Replica::start_with_listener(single_config(&dir), listener)
        .await
        .unwrap_err();
    assert_in_use(&err, &dir);
    eprintln!("refused as expected: {err}");

    // The holder is untouched by the refused attempts.
    assert!(first.is_leader());
    assert_eq!(
        store.put(b"k/b", b"2".to_vec(), None).await.unwrap(),
        rev + 1
    );
    assert_eq!(store.list(b"k/").await.unwrap().kvs.len(), 2);

    // Shutting the holder down hands the directory over, data intact.
    first.shutdown().await;
    let second = Replica::start(single_config(&dir)).await.unwrap();
    wait_leader(&second).await;
    let store = RaftStore::new(Arc::clone(&second));
    let listed = store.list(b"k/").await.unwrap();
    assert_eq!(listed.kvs.len(), 2);
    assert_eq!(listed.revision, rev + 1);
    second.shutdown().await;
    // The old handle is still alive here: the lock went with shutdown, not with the drop.
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_replica_dirs_are_locked_and_kill_then_restart_reopens_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, tmp.path(), None).await.unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let victim = (leader + 1) % 3;
    let dir = cluster.data_dir(victim).unwrap();

    let stray = RaftConfig::builder(99, &dir)
        .member(99, "127.0.0.1:0")
        .build()
        .unwrap();
    let err = Replica::start(stray.clone()).await.unwrap_err();
    assert_in_use(&err, &dir);

    cluster.kill(victim).await;
    cluster.restart(victim).await.unwrap();
    // The restarted replica holds the lock again.
    let err = Replica::start(stray).await.unwrap_err();
    assert_in_use(&err, &dir);

    let store = cluster.store(victim).unwrap();
    store
        .put(b"after/restart", b"x".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(store.list(b"after/").await.unwrap().kvs.len(), 1);
    cluster.shutdown().await;
}
