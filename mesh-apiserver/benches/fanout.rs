//! Mesh API fan-out benchmark (issue "Mesh API server", Benchmark).
//!
//! One API server (cache + gRPC over real mTLS) on an embedded single-replica raft store
//! holding `SERVICES` services and `ENDPOINTS` endpoints; `WATCHERS` in-process gRPC
//! watchers (100 per HTTP/2 connection) resume from the current revision; then `UPDATES`
//! service writes, one every 20 ms. For each write: time from the start of the store
//! write until the *last* watcher has received it; p50 and p99 over the writes. Then one
//! new watcher of every kind from revision 0: time to receive the full state and Synced.
//! CPU (utime + stime) and peak RSS are those of the whole process, which also holds the
//! store and every client, so they over-state the server alone.
//!
//! Not a criterion benchmark: the quantities are tail latencies across many receivers,
//! not the duration of one repeated call. Run:
//! `cargo bench -p clustermesh-apiserver --bench fanout` (env
//! `FANOUT_WATCHERS=100,1000,10000`, `FANOUT_STREAMS_PER_CONN` (100), `FANOUT_SERVICES`,
//! `FANOUT_ENDPOINTS`, `FANOUT_UPDATES` override the defaults). The open-file limit is
//! raised so that one connection per watcher (`FANOUT_STREAMS_PER_CONN=1`) fits too.
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark harness: fail loudly

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustermesh_api::keys::{self, Kind};
use clustermesh_api::v1::{self, mesh_api_client::MeshApiClient, watch_event::Event};
use clustermesh_apiserver::cache::{Cache, CacheConfig};
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::grpc::{AccessPolicy, MeshApiService, ServiceConfig};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::server::serve_grpc;
use clustermesh_certs::issue::{MeshCa, ServerNames, Validity, DEFAULT_LEAF_VALIDITY};
use clustermesh_certs::transport::MeshEndpoint;
use clustermesh_certs::{MeshTls, TlsSource, TrustDomain};
use clustermesh_store::raft::LocalCluster;
use clustermesh_store::Store;
use prost::Message;
use tokio_util::sync::CancellationToken;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_stat() -> (Duration, u64) {
    // utime + stime in clock ticks (fields 14 and 15 of /proc/self/stat; 100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = stat.rsplit_once(") ").unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm_kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (Duration::from_millis(ticks * 10), hwm_kib)
}

fn service(i: usize, generation: u32) -> Vec<u8> {
    v1::Service {
        namespace: format!("ns{}", i % 100),
        name: format!("svc{i}"),
        cluster: "east".into(),
        frontends: vec![format!("10.96.{}.{}", i / 250, i % 250 + 1)],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: v1::Protocol::Tcp.into(),
        }],
        backends: (0..10)
            .map(|b| v1::Backend {
                ip: format!(
                    "10.{}.{}.{}",
                    1 + (i * 10 + b) / 62500,
                    (i * 10 + b) / 250 % 250,
                    (i * 10 + b) % 250 + 1
                ),
                ports: vec![v1::BackendPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: v1::Protocol::Tcp.into(),
                }],
                ready: true,
                serving: true,
                weight: 1 + generation,
                ..Default::default()
            })
            .collect(),
        global: true,
        shared: true,
        ..Default::default()
    }
    .encode_to_vec()
}

fn endpoint(i: usize) -> (String, Vec<u8>) {
    let ip: std::net::IpAddr = format!("10.{}.{}.{}", 1 + i / 62500, i / 250 % 250, i % 250 + 1)
        .parse()
        .unwrap();
    let value = v1::Endpoint {
        ip: ip.to_string(),
        identity: 0x0001_0100 + (i % 1000) as u32,
        node: format!("node{}", i % 100),
        namespace: format!("ns{}", i % 100),
        pod: format!("pod{i}"),
        cluster: "east".into(),
        named_ports: Vec::new(),
        pod_uid: String::new(),
    }
    .encode_to_vec();
    (keys::endpoint_key("east", ip), value)
}

async fn load(store: &Arc<dyn Store>, services: usize, endpoints: usize) {
    let mut writes: Vec<(String, Vec<u8>)> = (0..services)
        .map(|i| {
            (
                keys::service_key("east", &format!("ns{}", i % 100), &format!("svc{i}")),
                service(i, 0),
            )
        })
        .collect();
    writes.extend((0..endpoints).map(endpoint));
    for kind in Kind::ALL {
        writes.push((
            keys::synced_key("east", kind),
            v1::SyncedMarker { revision: 0 }.encode_to_vec(),
        ));
    }
    for chunk in writes.chunks(512) {
        let puts = chunk.iter().map(|(k, v)| {
            let store = Arc::clone(store);
            let (k, v) = (k.clone(), v.clone());
            async move { store.put(k.as_bytes(), v, None).await.unwrap() }
        });
        futures::future::join_all(puts).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let services = env_usize("FANOUT_SERVICES", 10_000);
    let endpoints = env_usize("FANOUT_ENDPOINTS", 100_000);
    let updates = env_usize("FANOUT_UPDATES", 100);
    let watcher_counts: Vec<usize> = std::env::var("FANOUT_WATCHERS")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let per_conn = env_usize("FANOUT_STREAMS_PER_CONN", 100).max(1);
    // Both ends of every connection live in this process.
    clustermesh_test_support::limits::raise_nofile(1 << 20);
    // Cargo runs benches with `--bench`; ignore arguments.
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path(), None).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(cluster.store(0).unwrap());
    let t = Instant::now();
    load(&store, services, endpoints).await;
    eprintln!(
        "loaded {services} services + {endpoints} endpoints in {:.1?}",
        t.elapsed()
    );

    let td = TrustDomain::new("bench.local").unwrap();
    let ca = MeshCa::generate(td.clone()).unwrap();
    // The CA as a trust bundle labelled with both clusters: a bare CA is taken as the
    // holder's own cluster's only, and would not vouch for the other side.
    let bundle = clustermesh_test_support::certs::shared(&ca);
    let tls = |leaf: clustermesh_certs::IssuedCert| -> Arc<dyn TlsSource> {
        Arc::new(
            MeshTls::from_pem(
                td.clone(),
                bundle.as_bytes(),
                leaf.cert_pem.as_bytes(),
                leaf.key_pem.as_bytes(),
            )
            .unwrap(),
        )
    };
    let names = ServerNames::new(["localhost".to_owned()], []);
    let server_tls = tls(ca
        .issue_server("east", &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap());
    let client_tls = tls(ca
        .issue_agent("west", Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap());

    let metrics = Arc::new(Metrics::new());
    let cache = Arc::new(Cache::new(
        "east",
        CacheConfig::default(),
        Arc::clone(&metrics),
    ));
    let shutdown = CancellationToken::new();
    tokio::spawn(Arc::clone(&cache).run(Arc::clone(&store), shutdown.clone()));
    let t = Instant::now();
    cache.wait_loaded().await;
    eprintln!("cache loaded in {:.1?}", t.elapsed());
    let mesh_api = MeshApiService::new(
        Arc::clone(&cache),
        ServiceConfig {
            cluster_config: ExportConfig::new("east", 1).cluster_config(),
            policy: AccessPolicy::new("east"),
            stream_buffer: 1024,
        },
        Arc::clone(&metrics),
    )
    .with_shutdown(shutdown.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve_grpc(mesh_api, listener, server_tls, shutdown.clone()));
    let endpoint = MeshEndpoint::new(&format!("localhost:{port}"), client_tls).unwrap();

    println!("| watchers | services | endpoints | update p50 | update p99 | CPU (process) | peak RSS (process) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut generation = 0u32;
    for &watchers in &watcher_counts {
        let (cpu0, _) = proc_stat();
        let start_rev = cache.snapshot_stats().revision;
        // received[revision] = (count, last arrival)
        let received: Arc<Mutex<HashMap<u64, (usize, Instant)>>> = Arc::default();
        let mut channels = Vec::new();
        for _ in 0..watchers.div_ceil(per_conn) {
            channels.push(endpoint.connect().await.unwrap());
        }
        let watch_stop = CancellationToken::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers);
        for w in 0..watchers {
            let mut client = MeshApiClient::new(channels[w / per_conn].clone());
            let received = Arc::clone(&received);
            let ready_tx = ready_tx.clone();
            let stop = watch_stop.clone();
            tokio::spawn(async move {
                let request = v1::WatchRequest {
                    kinds: vec![],
                    from_revision: start_rev,
                    all_clusters: false,
                };
                let mut stream = client.watch(request).await.unwrap().into_inner();
                ready_tx.send(()).await.unwrap();
                loop {
                    let msg = tokio::select! {
                        () = stop.cancelled() => return,
                        msg = stream.message() => msg,
                    };
                    let Ok(Some(event)) = msg else { return };
                    if let Some(Event::Upsert(u)) = event.event {
                        let now = Instant::now();
                        let mut map = received.lock().unwrap();
                        let entry = map.entry(u.revision).or_insert((0, now));
                        entry.0 += 1;
                        entry.1 = now;
                    }
                }
            });
        }
        for _ in 0..watchers {
            ready_rx.recv().await.unwrap();
        }
        let mut latencies = Vec::new();
        for u in 0..updates {
            generation += 1;
            let i = (u * 97) % services;
            let key = keys::service_key("east", &format!("ns{}", i % 100), &format!("svc{i}"));
            let value = service(i, generation);
            let started = Instant::now();
            let rev = store.put(key.as_bytes(), value, None).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some((count, last)) = received.lock().unwrap().get(&rev) {
                    if *count == watchers {
                        latencies.push(*last - started);
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "update {rev} not delivered to all watchers in 30s"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.sort();
        let (cpu1, hwm) = proc_stat();
        println!(
            "| {watchers} | {services} | {endpoints} | {:.1} ms | {:.1} ms | {:.1} s | {} MiB |",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            (cpu1 - cpu0).as_secs_f64(),
            hwm / 1024
        );
        watch_stop.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // One new watcher, full state of every kind.
    let mut client = MeshApiClient::new(endpoint.connect().await.unwrap());
    let started = Instant::now();
    let mut stream = client
        .watch(v1::WatchRequest {
            kinds: vec![],
            from_revision: 0,
            all_clusters: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut records = 0usize;
    let mut synced = 0usize;
    // A peer is served the exported kinds (never policies): one Synced each.
    let kinds = Kind::ALL.iter().filter(|k| k.exported()).count();
    while synced < kinds {
        match stream.message().await.unwrap().unwrap().event {
            Some(Event::Upsert(_)) => records += 1,
            Some(Event::Synced(_)) => synced += 1,
            _ => {}
        }
    }
    println!();
    println!(
        "new watcher, full state: {records} records + {synced} Synced in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    shutdown.cancel();
    cluster.shutdown().await;
}
