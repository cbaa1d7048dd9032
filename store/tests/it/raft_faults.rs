//! Fault tests of the embedded raft backend: a 3-replica cluster under concurrent
//! writers while leaders are killed, replicas restarted from disk and partitioned, in a
//! seeded random order; torn and corrupt log tails; a corrupt snapshot; peers with a
//! foreign identity; replicas added and removed at runtime.
//!
//! `CLUSTERMESH_SOAK_CYCLES` sets the number of fault cycles (default 10; the soak runs
//! ≥ 100) and `CLUSTERMESH_FAULT_SEED` replays a printed seed.

// Test code: a failed setup step should abort the test loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_store::raft::{
    peer_status, LocalCluster, RaftConfig, RaftConfigBuilder, RaftStore, Replica, ReplicaTls,
};
use clustermesh_store::{EventKind, Revision, Store, StoreError};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Fast elections and frequent snapshots, so faults also exercise snapshot install and
/// log purge.
fn fast(b: RaftConfigBuilder) -> RaftConfigBuilder {
    b.timing(
        Duration::from_millis(50),
        (Duration::from_millis(300), Duration::from_millis(600)),
    )
    .snapshots(300, 50)
    .segment_bytes(64 * 1024)
    .request_timeout(Duration::from_secs(5))
}

fn tls() -> ReplicaTls {
    ReplicaTls::ephemeral_loopback("clustermesh.test", "faults")
        .expect("loopback PKI")
        .0
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A running store handle on some replica, preferring `hint`.
fn pick_store(cluster: &LocalCluster, rng: &mut StdRng) -> Option<RaftStore> {
    let running = cluster.running();
    if running.is_empty() {
        return None;
    }
    cluster.store(running[rng.gen_range(0..running.len())])
}

/// One watch event: revision, key, value.
type Seen = (Revision, Vec<u8>, Vec<u8>);

#[derive(Debug, Default)]
struct Ledger {
    /// key → (value, revision) of every acknowledged put.
    acked: BTreeMap<Vec<u8>, (Vec<u8>, Revision)>,
    failures: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_and_watch_survive_kills_restarts_and_partitions() {
    init_tracing();
    let seed = env_u64("CLUSTERMESH_FAULT_SEED").unwrap_or_else(rand::random);
    let cycles = env_u64("CLUSTERMESH_SOAK_CYCLES").unwrap_or(10);
    eprintln!(
        "raft fault test: seed {seed} (replay with CLUSTERMESH_FAULT_SEED={seed}), {cycles} cycles"
    );
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(
        LocalCluster::start_with(3, dir.path(), Some(tls()), fast)
            .await
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    // Writers: unique keys, so every acknowledged put must be readable at the end.
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let cluster = cluster.clone();
        let stop = stop.clone();
        let ledger = ledger.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (w + 1));
            let mut last_rev = 0;
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let Some(store) = pick_store(&cluster, &mut rng) else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                seq += 1;
                let key = format!("w/{w}/{seq:08}").into_bytes();
                let value = format!("{w}:{seq}").into_bytes();
                match store.put(&key, value.clone(), None).await {
                    Ok(rev) => {
                        assert!(
                            rev > last_rev,
                            "writer {w}: revision went backwards ({rev} after {last_rev})"
                        );
                        last_rev = rev;
                        ledger.lock().unwrap().acked.insert(key, (value, rev));
                    }
                    Err(_) => ledger.lock().unwrap().failures += 1,
                }
            }
        }));
    }

    // A reader: linearizable reads of the current revision never go backwards.
    let reader = {
        let cluster = cluster.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ 0xfeed);
            let mut last = 0;
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Some(store) = pick_store(&cluster, &mut rng) {
                    if let Ok(rev) = store.current_revision().await {
                        assert!(
                            rev >= last,
                            "read revision went backwards: {rev} after {last}"
                        );
                        last = rev;
                        reads += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        })
    };

    // A watcher kept across the whole run, resuming after every error.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let watcher = {
        let cluster = cluster.clone();
        let seen = seen.clone();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let handle = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ 0xbeef);
            let mut next = 1;
            let mut resumes = 0u64;
            while !done2.load(Ordering::SeqCst) {
                let Some(store) = pick_store(&cluster, &mut rng) else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut stream = match store.watch(b"w/", next).await {
                    Ok(s) => s,
                    Err(StoreError::Compacted { .. }) => {
                        panic!("watch from {next} compacted: the history bound is too small for this test")
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                resumes += 1;
                loop {
                    let item = tokio::select! {
                        item = stream.next() => item,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {
                            if done2.load(Ordering::SeqCst) { break } else { continue }
                        }
                    };
                    match item {
                        Some(Ok(ev)) => {
                            assert_eq!(ev.kind, EventKind::Put);
                            assert!(
                                ev.revision() >= next,
                                "watch went backwards: {} before {next}",
                                ev.revision()
                            );
                            next = ev.revision() + 1;
                            seen.lock()
                                .unwrap()
                                .push((ev.revision(), ev.kv.key, ev.kv.value));
                        }
                        Some(Err(StoreError::Compacted { .. })) => {
                            panic!("watch compacted at {next}: the history bound is too small for this test")
                        }
                        Some(Err(_)) | None => break,
                    }
                }
            }
            resumes
        });
        (handle, done)
    };

    // The faults, in seeded random order; at most one replica is down or cut at a time,
    // so the cluster keeps a majority.
    let mut rng = StdRng::seed_from_u64(seed);
    for cycle in 0..cycles {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..400))).await;
        let action = rng.gen_range(0..3);
        match action {
            0 => {
                let leader = cluster
                    .wait_for_leader(Duration::from_secs(30))
                    .await
                    .unwrap();
                eprintln!("cycle {cycle}: kill leader replica {leader}, restart it from disk");
                cluster.kill(leader).await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1000))).await;
                cluster.restart(leader).await.unwrap();
            }
            1 => {
                let i = rng.gen_range(0..3);
                eprintln!("cycle {cycle}: restart replica {i} from disk");
                cluster.kill(i).await;
                tokio::time::sleep(Duration::from_millis(rng.gen_range(50..500))).await;
                cluster.restart(i).await.unwrap();
            }
            _ => {
                let i = rng.gen_range(0..3);
                eprintln!("cycle {cycle}: partition replica {i}");
                cluster.partition(i);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))).await;
                cluster.heal(i);
            }
        }
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let reads = reader.await.unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let store = cluster.store(leader).unwrap();
    let final_rev = store.current_revision().await.unwrap();

    // The watcher catches up to the final revision.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let last = seen.lock().unwrap().last().map(|e| e.0).unwrap_or(0);
        if last >= final_rev {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch stuck at revision {last}, store is at {final_rev}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.1.store(true, Ordering::SeqCst);
    let resumes = watcher.0.await.unwrap();

    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let listed = store.list(b"w/").await.unwrap();
    let present: BTreeMap<Vec<u8>, (Vec<u8>, Revision, Revision)> = listed
        .kvs
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.create_revision, kv.mod_revision)))
        .collect();
    for (key, (value, rev)) in &ledger.acked {
        let Some((v, create, modr)) = present.get(key) else {
            panic!(
                "acknowledged write {} (revision {rev}) is missing",
                String::from_utf8_lossy(key)
            );
        };
        assert_eq!(
            v,
            value,
            "acknowledged write {} has another value",
            String::from_utf8_lossy(key)
        );
        assert!(
            *create <= *rev && *modr >= *rev,
            "revisions of {} do not match its acknowledgement",
            String::from_utf8_lossy(key)
        );
    }

    // Every revision 1..=final seen exactly once, in order (only puts under w/ happen).
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let revs: Vec<Revision> = seen.iter().map(|e| e.0).collect();
    let expected: Vec<Revision> = (1..=final_rev).collect();
    if revs != expected {
        let dup = revs.windows(2).find(|w| w[1] <= w[0]);
        let gap = revs.windows(2).find(|w| w[1] > w[0] + 1);
        panic!(
            "watch saw {} events for {final_rev} revisions (first duplicate {dup:?}, first gap {gap:?}, first {:?})",
            revs.len(),
            revs.first()
        );
    }
    // The watch's view replays to exactly the listed state.
    let mut replayed: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for (_, k, v) in seen.iter() {
        replayed.insert(k.clone(), v.clone());
    }
    let listed_values: BTreeMap<Vec<u8>, Vec<u8>> = present
        .iter()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    assert_eq!(
        replayed, listed_values,
        "watch replay differs from the listed state"
    );

    // Every replica converges to the same state.
    for i in cluster.running() {
        let s = cluster.store(i).unwrap();
        let l = s.list(b"w/").await.unwrap();
        assert_eq!(l.kvs.len(), present.len(), "replica {i} differs");
    }
    eprintln!(
        "raft fault test: {} acknowledged writes, {} failed attempts, {final_rev} revisions, {reads} linearizable reads, watch resumed {resumes} times; all present, no gap, no duplicate",
        ledger.acked.len(),
        ledger.failures
    );
    assert!(
        ledger.acked.len() > 50,
        "too few writes were acknowledged to mean anything"
    );
    cluster.shutdown().await;
}

/// The newest log segment of a replica.
fn last_segment(data_dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(data_dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.pop().expect("a log segment")
}

async fn put_many(store: &RaftStore, prefix: &str, n: usize) {
    for i in 0..n {
        store
            .put(format!("{prefix}/{i:04}").as_bytes(), vec![b'x'; 100], None)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torn_log_tail_is_truncated_and_no_acknowledged_entry_is_lost() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path(), Some(tls()))
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    put_many(&cluster.store(leader).unwrap(), "t", 50).await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    // Let the follower apply everything, then stop it.
    let rev = cluster
        .store(follower)
        .unwrap()
        .current_revision()
        .await
        .unwrap();
    assert_eq!(rev, 50);
    cluster.kill(follower).await;

    // Cut the last record short, as a write interrupted before its fsync leaves it.
    let seg = last_segment(&cluster.data_dir(follower).unwrap());
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 7).unwrap();
    drop(f);

    cluster.restart(follower).await.unwrap();
    let after = std::fs::metadata(&seg).unwrap().len();
    assert!(
        after < len - 7,
        "the torn record was not cut off ({after} bytes)"
    );

    // The leader dies; the repaired follower and the third replica form the majority
    // and still hold every acknowledged write.
    cluster.kill(leader).await;
    let new_leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(new_leader, leader);
    let store = cluster.store(follower).unwrap();
    let listed = store.list(b"t/").await.unwrap();
    assert_eq!(listed.kvs.len(), 50);
    assert!(listed.revision >= 50);
    store.put(b"t/after", b"ok".to_vec(), None).await.unwrap();
    cluster.shutdown().await;
}

async fn single_replica(dir: &Path, snapshot_every: u64) -> Arc<Replica> {
    let config = RaftConfig::builder(1, dir)
        .member(1, "127.0.0.1:0")
        .snapshots(snapshot_every, 5)
        .build()
        .unwrap();
    let replica = Replica::start(config).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !replica.is_leader() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "single replica never became leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replica
}

fn single_config(dir: &Path, snapshot_every: u64) -> RaftConfig {
    RaftConfig::builder(1, dir)
        .member(1, "127.0.0.1:0")
        .snapshots(snapshot_every, 5)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_record_refuses_to_start_naming_the_file() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let replica = single_replica(dir.path(), 10_000).await;
    put_many(&RaftStore::new(replica.clone()), "c", 20).await;
    replica.shutdown().await;
    drop(replica);

    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();

    let err = Replica::start(single_config(dir.path(), 10_000))
        .await
        .unwrap_err();
    match &err {
        StoreError::Corrupt { path, detail } => {
            assert_eq!(Path::new(path), seg);
            assert!(detail.contains("checksum"), "{detail}");
        }
        other => panic!("expected a corruption error, got {other}"),
    }
    eprintln!("refused as expected: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshot_is_a_clear_error() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let replica = single_replica(dir.path(), 20).await;
    put_many(&RaftStore::new(replica.clone()), "s", 60).await;
    let snap = dir.path().join("snapshot").join("snapshot.bin");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !snap.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot was built"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replica.shutdown().await;
    drop(replica);

    // Restarting from the intact snapshot + log works and keeps every key.
    let replica = single_replica(dir.path(), 20).await;
    let store = RaftStore::new(replica.clone());
    assert_eq!(store.list(b"s/").await.unwrap().kvs.len(), 60);
    replica.shutdown().await;
    drop(replica);

    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&snap, &bytes).unwrap();
    let err = Replica::start(single_config(dir.path(), 20))
        .await
        .unwrap_err();
    match &err {
        StoreError::Corrupt { path, .. } => assert_eq!(Path::new(path), snap),
        other => panic!("expected a corruption error, got {other}"),
    }
    eprintln!("refused as expected: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_is_purged_after_snapshots_and_restart_rebuilds_state() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let config = RaftConfig::builder(1, dir.path())
        .member(1, "127.0.0.1:0")
        .snapshots(100, 10)
        .segment_bytes(8 * 1024)
        .build()
        .unwrap();
    let replica = Replica::start(config.clone()).await.unwrap();
    let store = RaftStore::new(replica.clone());
    put_many(&store, "p", 1000).await;
    let log_bytes = |dir: &Path| -> u64 {
        std::fs::read_dir(dir.join("log"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    // ~1000 entries × ~150 bytes were written; after purges only a tail remains.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while log_bytes(dir.path()) > 64 * 1024 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "log not purged: {} bytes on disk",
            log_bytes(dir.path())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rev = store.current_revision().await.unwrap();
    replica.shutdown().await;
    drop((store, replica));

    let replica = Replica::start(config).await.unwrap();
    let store = RaftStore::new(replica.clone());
    assert_eq!(store.list(b"p/").await.unwrap().kvs.len(), 1000);
    assert_eq!(store.current_revision().await.unwrap(), rev);
    assert_eq!(store.put(b"p/next", vec![1], None).await.unwrap(), rev + 1);
    replica.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_with_another_trust_domain_or_cluster_are_refused() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (ours, ca) = ReplicaTls::ephemeral_loopback("clustermesh.test", "east").unwrap();
    let cluster = LocalCluster::start(3, dir.path(), Some(ours.clone()))
        .await
        .unwrap();
    let addr = cluster.replica(0).unwrap().addr().to_string();

    // Our own identity is accepted.
    let status = peer_status(&addr, Some(ours.clone()), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status.node_id, 1);

    // Another trust domain: the TLS handshake fails.
    let (foreign, _) = ReplicaTls::ephemeral_loopback("other.test", "east").unwrap();
    let err = peer_status(&addr, Some(foreign), Duration::from_secs(5))
        .await
        .unwrap_err();
    eprintln!("foreign trust domain refused: {err}");
    assert!(matches!(err, StoreError::Unavailable(_)));

    // Same CA, a node's agent certificate: the TLS handshake succeeds, the replica
    // refuses the RPC (only replicas may call the raft port; see raft_security.rs for
    // every other certificate an attacker could hold).
    let leaf = ca
        .issue_agent(
            "east",
            clustermesh_certs::Validity::from_now(clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY),
        )
        .unwrap();
    let agent = clustermesh_certs::MeshTls::from_pem(
        clustermesh_certs::TrustDomain::new("clustermesh.test").unwrap(),
        ca.cert_pem().as_bytes(),
        leaf.cert_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
    )
    .unwrap();
    let agent_tls = ReplicaTls::new(Arc::new(agent), "east");
    let err = peer_status(&addr, Some(agent_tls), Duration::from_secs(5))
        .await
        .unwrap_err();
    eprintln!("agent certificate refused: {err}");
    let msg = err.to_string();
    assert!(msg.contains("not a replica of cluster east"), "{msg}");

    // Plaintext to an mTLS replica fails too.
    assert!(peer_status(&addr, None, Duration::from_secs(5))
        .await
        .is_err());

    // The cluster is unaffected.
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    cluster
        .store(leader)
        .unwrap()
        .put(b"k", b"v".to_vec(), None)
        .await
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_added_at_runtime_catches_up_and_votes() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_with(3, dir.path(), Some(tls()), fast)
        .await
        .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    put_many(&cluster.store(leader).unwrap(), "m", 400).await;

    let added = cluster.add_replica().await.unwrap();
    let new_id = cluster.node_id(added).unwrap();
    let store = cluster.store(added).unwrap();
    assert_eq!(store.list(b"m/").await.unwrap().kvs.len(), 400);
    let voters: Vec<u64> = cluster
        .replica(added)
        .unwrap()
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert!(voters.contains(&new_id), "voters {voters:?}");

    // Remove one of the original replicas; the remaining three keep serving.
    let victim = (0..3).find(|i| *i != leader).unwrap();
    cluster.remove_replica(victim).await.unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    cluster
        .store(leader)
        .unwrap()
        .put(b"m/after", vec![1], None)
        .await
        .unwrap();
    assert_eq!(store.list(b"m/").await.unwrap().kvs.len(), 401);
    cluster.shutdown().await;
}
