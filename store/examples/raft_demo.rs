//! A narrated tour of the embedded raft store: start three replicas that talk over
//! loopback mTLS, write through a follower, kill the leader, and read everything back
//! from the survivors; then restart the old leader from its disk and watch it catch up.
//!
//! Run: `cargo run -p clustermesh-store --example raft_demo`
//! (`RUST_LOG=info` shows the replicas' own logs.)

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clustermesh_store::raft::{LocalCluster, ReplicaTls};
use clustermesh_store::Store;
use futures::StreamExt;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(step: &str) {
    println!("==> {step}");
}

async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary data directory")?;
    say("creating a throwaway mesh CA and a certificate for cluster \"demo\" (trust domain clustermesh.demo)");
    let (tls, _ca) = ReplicaTls::ephemeral_loopback("clustermesh.demo", "demo")?;

    say(&format!(
        "starting 3 raft replicas on 127.0.0.1, data under {}",
        dir.path().display()
    ));
    let started = Instant::now();
    let cluster = LocalCluster::start(3, dir.path(), Some(tls)).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    for i in 0..cluster.len() {
        let r = cluster.replica(i).context("replica stopped")?;
        println!(
            "    replica {} listening on {} {}",
            r.id(),
            r.addr(),
            if i == leader {
                "(leader)"
            } else {
                "(follower)"
            }
        );
    }
    println!(
        "    cluster up, leader elected, after {:?}",
        started.elapsed()
    );

    let follower = (0..cluster.len())
        .find(|i| *i != leader)
        .context("no follower")?;
    let store = cluster.store(follower).context("follower stopped")?;
    say(&format!(
        "writing 5 service records through follower replica {} (forwarded to the leader, fsynced on a majority)",
        follower + 1
    ));
    let mut watch = store.watch(b"mesh/v1/services/", 1).await?;
    for name in ["frontend", "checkout", "cart", "payments", "search"] {
        let key = format!("mesh/v1/services/demo/default/{name}");
        let rev = store
            .put(
                key.as_bytes(),
                format!("{{\"name\":\"{name}\"}}").into_bytes(),
                None,
            )
            .await?;
        println!("    put {key} -> revision {rev}");
    }
    for _ in 0..5 {
        if let Some(ev) = watch.next().await {
            let ev = ev?;
            println!(
                "    watch saw {:?} {} at revision {}",
                ev.kind,
                String::from_utf8_lossy(&ev.kv.key),
                ev.revision()
            );
        }
    }

    say(&format!("killing the leader, replica {}", leader + 1));
    cluster.kill(leader).await;
    let started = Instant::now();
    let new_leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    println!(
        "    replica {} took over after {:?}",
        new_leader + 1,
        started.elapsed()
    );

    for i in cluster.running() {
        let s = cluster.store(i).context("replica stopped")?;
        let listed = s.list(b"mesh/v1/services/").await?;
        println!(
            "    replica {} reads {} records at revision {} (linearizable)",
            i + 1,
            listed.kvs.len(),
            listed.revision
        );
        anyhow::ensure!(listed.kvs.len() == 5, "replica {} lost records", i + 1);
    }
    let rev = store
        .put(
            b"mesh/v1/services/demo/default/after-failover",
            b"{}".to_vec(),
            None,
        )
        .await?;
    println!("    a write after the failover got revision {rev}");

    say(&format!(
        "restarting replica {} from its data directory",
        leader + 1
    ));
    cluster.restart(leader).await?;
    let old = cluster.store(leader).context("restarted replica stopped")?;
    let listed = old.list(b"mesh/v1/services/").await?;
    println!(
        "    replica {} is back and reads {} records at revision {}",
        leader + 1,
        listed.kvs.len(),
        listed.revision
    );
    anyhow::ensure!(listed.kvs.len() == 6, "restarted replica did not catch up");

    say("done: no acknowledged write was lost");
    cluster.shutdown().await;
    Ok(())
}
