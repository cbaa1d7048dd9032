//! Behaviour test: two in-process mesh API servers (real raft stores, real mTLS gRPC on
//! 127.0.0.1) and an agent with the recording datapath.
//!
//! Scenario for global service `default/web` with affinity `local`, seen from cluster
//! `east`: local backends serve; every local backend goes unready → the remote ones take
//! over in one datapath batch; local ones come back → back to local; the remote server is
//! killed → its last-known backends stay in force and the cluster shows as stale; the
//! remote server restarts from a fresh store with the same records → after a full resync
//! nothing is re-sent; a record that does not decode is ignored and counted.
//!
//! Further scenarios, one test each: a cluster removed while busy stays removed; a stale
//! cluster keeps its ID and pod CIDRs; a stale cluster whose watcher is restarted by a
//! config change keeps its stale TTL and its claims, and the new watcher's first sync
//! replaces the records it inherited; impostor clusters (wrong TLS identity, another
//! cluster's ID) are refused; a moved client certificate applies to every watcher; a
//! server that completes TLS and hangs times out and its stale TTL still applies; a
//! resync keeps the last good record of a service whose value does not decode.
//!
//! "Nothing changed" is checked without sleeping: either a later change (a marker service)
//! is seen programmed, so everything queued before it was computed, or the agent's
//! reconcile-round counter moved past the one update in flight.

// Helpers outside #[test] fns are test code too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_agent::runtime::{load_config, Agent, AgentOptions, AgentView};
use clustermesh_agent_core::datapath::Datapath;
use clustermesh_agent_core::recording::RecordingDatapath;
use clustermesh_agent_core::watcher::{ReconnectBackoff, WatcherStatus};
use clustermesh_api::agent_config::AgentConfig;
use clustermesh_api::keys::{service_key, synced_key, Kind};
use clustermesh_api::model::{Phase, ServicePortId};
use clustermesh_api::v1;
use clustermesh_certs::MeshCa;
use clustermesh_store::raft::LocalCluster;
use clustermesh_store::Store;
use prost::Message;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use clustermesh_test_support::mesh;
use mesh::{MeshServer, ServerSpec};

const TD: &str = "mesh.test";

fn service(cluster: &str, backends: &[(&str, bool)], affinity: v1::Affinity) -> v1::Service {
    v1::Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster: cluster.into(),
        frontends: vec![if cluster == "east" {
            "10.96.0.10".into()
        } else {
            "10.97.0.10".into()
        }],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: v1::Protocol::Tcp.into(),
        }],
        backends: backends
            .iter()
            .map(|&(ip, ready)| v1::Backend {
                ip: ip.into(),
                ports: vec![v1::BackendPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: v1::Protocol::Tcp.into(),
                }],
                ready,
                serving: ready,
                terminating: false,
                node: "n2".into(),
                zone: "z1".into(),
                weight: 1,
                pod: String::new(),
            })
            .collect(),
        global: true,
        shared: true,
        affinity: affinity.into(),
        topology_aware: false,
    }
}

/// Writes `svc`; returns the store revision of the write.
async fn put_service(store: &dyn Store, svc: &v1::Service) -> u64 {
    let key = service_key(&svc.cluster, &svc.namespace, &svc.name);
    store
        .put(key.as_bytes(), svc.encode_to_vec(), None)
        .await
        .unwrap()
}

/// Writes the Synced markers of every kind an agent watches, services last, as an
/// exporter does; returns the store revision of the services marker.
async fn mark_synced(store: &dyn Store, cluster: &str) -> u64 {
    let marker = v1::SyncedMarker { revision: 1 }.encode_to_vec();
    for kind in [Kind::Identity, Kind::Endpoint, Kind::Policy] {
        let key = synced_key(cluster, kind);
        store
            .put(key.as_bytes(), marker.clone(), None)
            .await
            .unwrap();
    }
    let key = synced_key(cluster, Kind::Service);
    store.put(key.as_bytes(), marker, None).await.unwrap()
}

/// An east-only service `default/<name>` with one ready backend: a change the test makes
/// to see, once it is programmed, that everything queued before it has been computed.
fn marker_service(name: &str) -> v1::Service {
    let mut svc = service("east", &[("10.1.9.9", true)], v1::Affinity::None);
    svc.name = name.into();
    svc.frontends = vec!["10.96.0.99".into()];
    svc.global = false;
    svc.shared = false;
    svc
}

fn marker_id(name: &str) -> ServicePortId {
    ServicePortId {
        name: name.into(),
        ..web()
    }
}

/// Services named in the datapath batches after the first `from`.
fn batched_services(dp: &RecordingDatapath, from: usize) -> BTreeSet<String> {
    dp.batches()
        .iter()
        .skip(from)
        .flat_map(|b| {
            b.upserts
                .iter()
                .map(|s| s.id.name.clone())
                .chain(b.removals.iter().map(|id| id.name.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn web() -> ServicePortId {
    ServicePortId {
        namespace: "default".into(),
        name: "web".into(),
        port_name: "http".into(),
    }
}

/// Clusters whose backends appear in the programmed Maglev table of `default/web`.
fn table_clusters(dp: &RecordingDatapath) -> BTreeSet<String> {
    dp.service(&web())
        .map(|s| {
            s.table
                .iter()
                .map(|&i| s.backends[i as usize].cluster.clone())
                .collect()
        })
        .unwrap_or_default()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    eprintln!("waiting for: {what}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The name, cluster ID and pod CIDR a cluster's server reports.
#[derive(Debug, Clone, Copy)]
struct Member {
    name: &'static str,
    id: u32,
    pod_cidr: &'static str,
}

const EAST: Member = Member {
    name: "east",
    id: 1,
    pod_cidr: "10.1.0.0/16",
};

const WEST: Member = Member {
    name: "west",
    id: 2,
    pod_cidr: "10.2.0.0/16",
};

/// Starts an in-process mesh API server serving `store` as `member` (see `support/mesh.rs`).
async fn start_server(
    store: &Arc<dyn Store>,
    ca: &MeshCa,
    member: Member,
    listener: TcpListener,
) -> MeshServer {
    let spec = ServerSpec {
        trust_domain: TD,
        cluster: member.name,
        id: member.id,
        pod_cidrs: &[member.pod_cidr],
        stream_buffer: 64,
    };
    MeshServer::start(Arc::clone(store), ca, &spec, listener).await
}

/// A fresh single-node raft store in `dir/<name>`.
async fn open_store(dir: &Path, name: &str) -> (LocalCluster, Arc<dyn Store>) {
    let raft = LocalCluster::start(1, &dir.join(name), None).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(raft.store(0).unwrap());
    (raft, store)
}

/// A cluster under test: its store and the mesh API server in front of it.
struct Cluster {
    raft: LocalCluster,
    store: Arc<dyn Store>,
    server: MeshServer,
    addr: SocketAddr,
}

impl Cluster {
    /// Opens the store `<name>-store` in `dir`, writes `services` (in order) and the
    /// services Synced marker, and serves it as `member` on a free 127.0.0.1 port.
    async fn start(dir: &Path, ca: &MeshCa, member: Member, services: &[v1::Service]) -> Cluster {
        let (raft, store) = open_store(dir, &format!("{}-store", member.name)).await;
        for svc in services {
            put_service(store.as_ref(), svc).await;
        }
        mark_synced(store.as_ref(), member.name).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = start_server(&store, ca, member, listener).await;
        Cluster {
            raft,
            store,
            server,
            addr,
        }
    }
}

/// Servers for east (ID 1, 10.1.0.0/16) and west (ID 2, 10.2.0.0/16) on fresh stores.
struct TwoClusters {
    east: Cluster,
    west: Cluster,
}

impl TwoClusters {
    /// Each cluster exports a global `default/web` with one ready backend and is synced.
    async fn start(dir: &Path, ca: &MeshCa) -> TwoClusters {
        TwoClusters::start_with(
            dir,
            ca,
            &[service("east", &[("10.1.0.5", true)], v1::Affinity::None)],
            &[service("west", &[("10.2.0.5", true)], v1::Affinity::None)],
        )
        .await
    }

    /// Each cluster's store gets its `services` written in order, then its Synced marker.
    async fn start_with(
        dir: &Path,
        ca: &MeshCa,
        east_services: &[v1::Service],
        west_services: &[v1::Service],
    ) -> TwoClusters {
        TwoClusters {
            east: Cluster::start(dir, ca, EAST, east_services).await,
            west: Cluster::start(dir, ca, WEST, west_services).await,
        }
    }
}

/// A third cluster `south`: a server on a fresh store exporting `default/web` with backend
/// 10.3.0.5, reporting ID `id` and pod CIDR `cidr` (which a test may make collide).
async fn start_south(dir: &Path, ca: &MeshCa, id: u32, cidr: &'static str) -> Cluster {
    let south = Member {
        name: "south",
        id,
        pod_cidr: cidr,
    };
    let web = service("south", &[("10.3.0.5", true)], v1::Affinity::None);
    Cluster::start(dir, ca, south, &[web]).await
}

/// Stops `servers`, then shuts `stores` down.
async fn stop_all(servers: Vec<MeshServer>, stores: Vec<LocalCluster>) {
    for server in servers {
        server.stop().await;
    }
    for raft in stores {
        raft.shutdown().await;
    }
}

/// An agent running with the recording datapath.
struct AgentUnderTest {
    dp: Arc<RecordingDatapath>,
    view: AgentView,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AgentUnderTest {
    fn start(options: AgentOptions) -> AgentUnderTest {
        let dp = Arc::new(RecordingDatapath::new());
        let cancel = CancellationToken::new();
        let datapath = Arc::clone(&dp) as Arc<dyn Datapath>;
        let agent = Agent::start(options, datapath, None, cancel.clone()).unwrap();
        AgentUnderTest {
            dp,
            view: agent.view,
            cancel,
            task: agent.task,
        }
    }

    /// Cancels the agent and waits for it to end.
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Agent options for the tests: quick retries and config polling.
fn quick_options(config: &Path) -> AgentOptions {
    let mut options = AgentOptions::new(config, "n1");
    options.backoff = ReconnectBackoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    options.config_poll = Duration::from_millis(50);
    options
}

/// Writes the agent config `dir/agent.yaml` for local cluster `east`, plus `west` when
/// given; returns its path.
fn write_config(dir: &Path, east: SocketAddr, west: Option<SocketAddr>) -> PathBuf {
    let mut clusters = vec![("east", 1, east.port())];
    if let Some(w) = west {
        clusters.push(("west", 2, w.port()));
    }
    write_clusters(dir, &clusters)
}

/// Writes the agent config `dir/agent.yaml` for local cluster `east` watching every
/// `(name, id, port)` in `clusters`; returns its path.
fn write_clusters(dir: &Path, clusters: &[(&str, u32, u16)]) -> PathBuf {
    mesh::write_agent_config(&dir.join("agent.yaml"), dir, TD, "east", clusters)
}

/// Writes `config` to `path` (write-then-rename, so the agent never reads half a file).
fn save_config(path: &Path, config: &AgentConfig) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, clustermesh_api::yaml::to_string(config).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A 127.0.0.1 port where nothing listens (bound once, then released).
fn spare_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// PKI files (ca.crt, client.crt/key for cluster east) in `dir`; returns the CA.
fn pki(dir: &Path) -> MeshCa {
    mesh::pki(dir, TD, "east")
}

fn cluster_status(view: &AgentView, name: &str) -> WatcherStatus {
    view.clusters.get(name).unwrap()
}

fn cluster_set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Writes marker service `name` to east's store and waits until the agent has programmed
/// it: everything queued before it has been computed too.
async fn settle_with_marker(east_store: &dyn Store, view: &AgentView, name: &str) {
    put_service(east_store, &marker_service(name)).await;
    eventually(&format!("east {name} programmed"), || {
        view.services().contains_key(&marker_id(name))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_remote_and_back_and_remote_loss_keeps_last_known_state() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());

    let east_web = |ready: bool| {
        service(
            "east",
            &[("10.1.0.5", ready), ("10.1.0.6", ready)],
            v1::Affinity::Local,
        )
    };
    // West's store has history (several writes of the same record), so its revision is
    // well above that of a fresh store holding the same records.
    let west_history = vec![service("west", &[("10.2.0.5", true)], v1::Affinity::None); 6];
    let TwoClusters { east, west } =
        TwoClusters::start_with(dir.path(), &ca, &[east_web(true)], &west_history).await;

    let config = write_config(dir.path(), east.addr, Some(west.addr));
    let mut options = quick_options(&config);
    options.backoff.max = Duration::from_millis(300);
    options.config_poll = Duration::from_millis(100);
    let agent = AgentUnderTest::start(options);
    let AgentUnderTest { dp, view, .. } = &agent;

    // Both clusters synced; affinity local → only east's backends take connections.
    eventually("both clusters synced", || {
        view.clusters.snapshot().iter().filter(|s| s.synced).count() == 2
    })
    .await;
    eventually("local backends programmed", || {
        table_clusters(dp) == BTreeSet::from(["east".to_owned()])
    })
    .await;
    // Every local backend becomes unready: one datapath batch moves traffic to west.
    let before = dp.batch_count();
    put_service(east.store.as_ref(), &east_web(false)).await;
    eventually("failover to west", || {
        table_clusters(dp) == BTreeSet::from(["west".to_owned()])
    })
    .await;
    assert_eq!(
        dp.batch_count(),
        before + 1,
        "failover took exactly one batch"
    );

    // Local backends come back.
    let before = dp.batch_count();
    put_service(east.store.as_ref(), &east_web(true)).await;
    eventually("back to east", || {
        table_clusters(dp) == BTreeSet::from(["east".to_owned()])
    })
    .await;
    assert_eq!(dp.batch_count(), before + 1);

    // Fail over again, then lose west entirely: its last-known backends stay in force.
    put_service(east.store.as_ref(), &east_web(false)).await;
    eventually("failover to west again", || {
        table_clusters(dp) == BTreeSet::from(["west".to_owned()])
    })
    .await;
    let programmed = dp.service(&web()).unwrap();
    let batches = dp.batch_count();
    let old_revision = cluster_status(view, "west").revision;
    west.server.stop().await;
    eventually("west shown stale", || {
        let s = cluster_status(view, "west");
        !s.connected && s.stale && s.last_error.is_some()
    })
    .await;
    // A change to east queued after west was seen stale: once it is programmed, anything
    // west's disconnect queued before it has been computed too.
    settle_with_marker(east.store.as_ref(), view, "marker-1").await;
    assert_eq!(
        dp.service(&web()).unwrap(),
        programmed,
        "last-known state kept"
    );
    assert_eq!(
        batched_services(dp, batches),
        BTreeSet::from(["marker-1".to_owned()]),
        "no datapath change for web while west is down"
    );

    // West comes back on the same address but from a fresh store holding the same records
    // (at a lower revision than the agent has seen): the agent cannot resume, resyncs in
    // full, and since nothing changed nothing is sent to the datapath.
    let (west2_raft, west2_store) = open_store(dir.path(), "west-store-2").await;
    put_service(
        west2_store.as_ref(),
        &service("west", &[("10.2.0.5", true)], v1::Affinity::None),
    )
    .await;
    let fresh_revision = mark_synced(west2_store.as_ref(), "west").await;
    assert!(fresh_revision < old_revision, "the fresh store is behind");
    let batches = dp.batch_count();
    let rounds = view.reconcile_rounds();
    let mut west2 = start_server(&west2_store, &ca, WEST, mesh::rebind(west.addr).await).await;
    eventually("west reconnected and resynced", || {
        let s = cluster_status(view, "west");
        s.connected && s.synced && !s.stale
    })
    .await;
    // The resync's Replace is the only update since `rounds` was read.
    eventually("the resync computed", || view.reconcile_rounds() > rounds).await;
    assert_eq!(
        dp.batch_count(),
        batches,
        "resync of unchanged records changes nothing"
    );
    assert_eq!(dp.service(&web()).unwrap(), programmed);
    // The agent now stands at the fresh store's revision, not at the old one.
    eventually("west at the fresh store's revision", || {
        cluster_status(view, "west").revision == fresh_revision
    })
    .await;

    // A record that does not decode is ignored and counted; the service is unaffected.
    // (It decoded once, as a global service: west's server exports only services it knows
    // to be global and shared, and keeps serving one that stops decoding.)
    let mut broken = service("west", &[("10.2.0.8", true)], v1::Affinity::None);
    broken.name = "broken".into();
    put_service(west2_store.as_ref(), &broken).await;
    west2_store
        .put(
            service_key("west", "default", "broken").as_bytes(),
            vec![0xff, 0xff, 0xff, 0xff],
            None,
        )
        .await
        .unwrap();
    eventually("decode error counted", || {
        cluster_status(view, "west").decode_errors >= 1
    })
    .await;
    assert_eq!(dp.service(&web()).unwrap(), programmed);

    // West's server drops its agents but keeps its history. While the agent is away, west
    // gains a backend and then enough other writes to pass the revision the agent had seen
    // on the old store: resuming from the right revision delivers the new backend.
    west2.stop_serving().await;
    eventually("west disconnected", || {
        !cluster_status(view, "west").connected
    })
    .await;
    put_service(
        west2_store.as_ref(),
        &service(
            "west",
            &[("10.2.0.5", true), ("10.2.0.6", true)],
            v1::Affinity::None,
        ),
    )
    .await;
    let mut last = 0;
    while last <= old_revision {
        let mut pad = service("west", &[("10.2.0.7", true)], v1::Affinity::None);
        pad.name = "pad".into();
        last = put_service(west2_store.as_ref(), &pad).await;
    }
    west2.serve_again(mesh::rebind(west.addr).await);
    eventually("west caught up", || {
        let s = cluster_status(view, "west");
        s.connected && s.revision == last
    })
    .await;
    settle_with_marker(east.store.as_ref(), view, "marker-2").await;
    let backends: BTreeSet<String> = dp
        .service(&web())
        .unwrap()
        .backends
        .iter()
        .map(|b| b.ip.to_string())
        .collect();
    assert!(
        backends.contains("10.2.0.6"),
        "the backend west gained while the agent was away is programmed: {backends:?}"
    );

    // The admin API renders what the CLI reads.
    let status = clustermesh_agent::admin::status(view);
    assert_eq!(status.local_cluster, "east");
    assert_eq!(status.clusters.len(), 2);
    let services = clustermesh_agent::admin::services(view);
    let web_body = services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web_body.active_tier, "remote");
    assert_eq!(
        (web_body.port_name.as_str(), web_body.affinity.as_str()),
        ("http", "local")
    );
    assert!(web_body
        .backends
        .iter()
        .any(|b| b.cluster == "west" && b.slots > 0));

    agent.stop().await;
    stop_all(
        vec![west2, east.server],
        vec![east.raft, west.raft, west2_raft],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_follow_the_config_file_and_stale_clusters_expire() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, west } = TwoClusters::start(dir.path(), &ca).await;

    // Start with only the local cluster configured.
    let config = write_config(dir.path(), east.addr, None);
    let mut options = quick_options(&config);
    options.config_poll = Duration::from_millis(100);
    options.stale_ttl = Some(Duration::from_millis(700));
    let agent = AgentUnderTest::start(options);
    let AgentUnderTest { dp, view, .. } = &agent;
    let east_only = BTreeSet::from(["east".to_owned()]);
    let both = BTreeSet::from(["east".to_owned(), "west".to_owned()]);
    eventually("east only", || table_clusters(dp) == east_only).await;

    // `clustermesh connect` adds west to the file: picked up without a restart.
    write_config(dir.path(), east.addr, Some(west.addr));
    eventually("west added at runtime", || table_clusters(dp) == both).await;

    // West goes away: kept while stale, dropped once the stale TTL has passed.
    west.server.stop().await;
    eventually("west stale", || {
        view.clusters.get("west").is_some_and(|s| s.stale)
    })
    .await;
    eventually("west dropped after the stale TTL", || {
        table_clusters(dp) == east_only
    })
    .await;

    // West returns: resynced and merged again.
    let west_again = start_server(&west.store, &ca, WEST, mesh::rebind(west.addr).await).await;
    eventually("west back", || table_clusters(dp) == both).await;

    // `clustermesh disconnect` removes west from the file: its records and status go.
    write_config(dir.path(), east.addr, None);
    eventually("west removed at runtime", || {
        table_clusters(dp) == east_only && view.clusters.get("west").is_none()
    })
    .await;

    agent.stop().await;
    stop_all(vec![west_again, east.server], vec![east.raft, west.raft]).await;
}

/// A cluster removed from the configuration while its watcher is busy applying events must
/// stay removed: no late update or status change of the stopped watcher may bring it back.
/// A single-threaded runtime makes the watcher and the supervisor interleave only at await
/// points, so a watcher that was cancelled with an event already buffered gets to handle
/// it on about every other removal (before the fix, that revived the cluster).
#[tokio::test(flavor = "current_thread")]
async fn removing_a_busy_cluster_never_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, west } = TwoClusters::start(dir.path(), &ca).await;

    // West keeps rewriting its record, so its watcher always has events to handle.
    let writing = CancellationToken::new();
    let writer = tokio::spawn({
        let (store, writing) = (Arc::clone(&west.store), writing.clone());
        async move {
            let svc = service("west", &[("10.2.0.5", true)], v1::Affinity::None);
            while !writing.is_cancelled() {
                put_service(store.as_ref(), &svc).await;
            }
        }
    });

    let config = write_config(dir.path(), east.addr, None);
    let mut options = AgentOptions::new(&config, "n1");
    options.config_poll = Duration::from_millis(20);
    let agent = AgentUnderTest::start(options);
    let AgentUnderTest { dp, view, .. } = &agent;
    let east_only = BTreeSet::from(["east".to_owned()]);
    let both = BTreeSet::from(["east".to_owned(), "west".to_owned()]);
    eventually("east only", || table_clusters(dp) == east_only).await;

    for round in 0..10 {
        write_config(dir.path(), east.addr, Some(west.addr));
        eventually(&format!("west added ({round})"), || {
            table_clusters(dp) == both
                && view
                    .clusters
                    .get("west")
                    .is_some_and(|s| s.synced && s.connected)
        })
        .await;
        write_config(dir.path(), east.addr, None);
        eventually(&format!("west removed ({round})"), || {
            table_clusters(dp) == east_only && view.clusters.get("west").is_none()
        })
        .await;
        // A change queued after the removal: once it is programmed, whatever the stopped
        // watcher might still have queued has been computed too.
        settle_with_marker(east.store.as_ref(), view, &format!("marker-{round}")).await;
        assert_eq!(
            table_clusters(dp),
            east_only,
            "west stays removed ({round})"
        );
        assert!(
            view.clusters.get("west").is_none(),
            "west's status stays removed ({round})"
        );
    }

    writing.cancel();
    writer.await.unwrap();
    agent.stop().await;
    stop_all(vec![west.server, east.server], vec![east.raft, west.raft]).await;
}

/// A cluster that is only unreachable keeps its records in force, so it also keeps its
/// cluster ID and pod CIDRs: a newly configured cluster claiming them is refused, until
/// the stale cluster's records are really dropped (here: removed from the configuration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cluster_keeps_its_id_and_pod_cidrs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, west } = TwoClusters::start(dir.path(), &ca).await;
    // South reports west's ID and a pod CIDR inside west's.
    let south = start_south(dir.path(), &ca, 2, "10.2.128.0/17").await;
    let clusters = |with_west: bool, with_south: bool| {
        let mut c = vec![("east", 1, east.addr.port())];
        if with_west {
            c.push(("west", 2, west.addr.port()));
        }
        if with_south {
            // ID 0: not pinned in the configuration, so only the registry can object.
            c.push(("south", 0, south.addr.port()));
        }
        c
    };
    let config = write_clusters(dir.path(), &clusters(true, false));
    let agent = AgentUnderTest::start(quick_options(&config));
    let AgentUnderTest { dp, view, .. } = &agent;
    eventually("east and west merged", || {
        table_clusters(dp) == cluster_set(&["east", "west"])
    })
    .await;

    // West becomes unreachable: stale, its records kept.
    west.server.stop().await;
    eventually("west stale", || cluster_status(view, "west").stale).await;

    // South is added while west is stale: refused, nothing of it merged.
    write_clusters(dir.path(), &clusters(true, true));
    eventually("south refused", || {
        view.clusters.get("south").is_some_and(|s| {
            s.phase == Phase::Refused && s.last_error.as_deref().is_some_and(|e| e.contains("west"))
        })
    })
    .await;
    settle_with_marker(east.store.as_ref(), view, "marker-1").await;
    assert_eq!(
        table_clusters(dp),
        cluster_set(&["east", "west"]),
        "south not merged"
    );

    // West is removed from the configuration: its records go, and so do its claims.
    write_clusters(dir.path(), &clusters(false, true));
    eventually("south accepted in west's place", || {
        table_clusters(dp) == cluster_set(&["east", "south"])
    })
    .await;

    agent.stop().await;
    stop_all(
        vec![south.server, east.server],
        vec![south.raft, east.raft, west.raft],
    )
    .await;
}

/// A cluster whose watcher is restarted (its configuration entry changed) while it is
/// unreachable keeps what it had: its records stay in force, stale, and so does its claim
/// on its cluster ID, until the stale TTL (counted from when it became unreachable, not
/// from the restart) drops them. Before that, a new cluster reporting its ID is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_watcher_keeps_the_stale_ttl_and_the_claim_of_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, west } = TwoClusters::start(dir.path(), &ca).await;
    // South reports west's ID (its pod CIDR is its own).
    let south = start_south(dir.path(), &ca, 2, "10.3.0.0/16").await;
    let config = write_config(dir.path(), east.addr, Some(west.addr));
    let mut options = quick_options(&config);
    options.stale_ttl = Some(Duration::from_secs(3));
    let agent = AgentUnderTest::start(options);
    let AgentUnderTest { dp, view, .. } = &agent;
    eventually("east and west merged", || {
        table_clusters(dp) == cluster_set(&["east", "west"])
    })
    .await;

    // West becomes unreachable.
    west.server.stop().await;
    eventually("west stale", || cluster_status(view, "west").stale).await;

    // West's entry gains a second endpoint, where nothing listens either (so its watcher
    // is restarted), and south is configured (ID 0: only the registry can object).
    let spare = spare_port();
    let mut cfg = load_config(&config).unwrap();
    let west_entry = cfg.clusters.iter_mut().find(|c| c.name == "west").unwrap();
    west_entry.endpoints.push(format!("localhost:{spare}"));
    let mut south_entry = west_entry.clone();
    south_entry.name = "south".into();
    south_entry.id = 0;
    south_entry.endpoints = vec![format!("localhost:{}", south.addr.port())];
    cfg.clusters.push(south_entry);
    save_config(&config, &cfg);

    // The restarted watcher (the only one that knows the new endpoint) still counts west
    // as stale with records in force, and south is refused: west's ID is still claimed.
    eventually("west stale after its restart", || {
        let s = cluster_status(view, "west");
        s.stale
            && s.synced
            && !s.connected
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains(&format!(":{spare}")))
    })
    .await;
    eventually("south refused: west's ID", || {
        view.clusters.get("south").is_some_and(|s| {
            s.phase == Phase::Refused
                && !s.synced
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("cluster ID 2") && e.contains("west"))
        })
    })
    .await;
    assert!(
        table_clusters(dp).contains("west"),
        "west's records stay in force across the restart"
    );

    // The stale TTL drops west's records and releases its ID: south is accepted.
    eventually("west dropped after the stale TTL", || {
        let s = cluster_status(view, "west");
        !s.synced && !s.stale && !table_clusters(dp).contains("west")
    })
    .await;
    eventually("south accepted in west's place", || {
        table_clusters(dp) == cluster_set(&["east", "south"])
    })
    .await;

    agent.stop().await;
    stop_all(
        vec![south.server, east.server],
        vec![south.raft, east.raft, west.raft],
    )
    .await;
}

/// A restarted watcher's first sync replaces the records it inherited: the backends of a
/// service the cluster deleted while it was unreachable go, the others stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_watcher_replaces_the_records_it_inherited() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, mut west } = TwoClusters::start(dir.path(), &ca).await;
    // A second global service, `extra`, in both clusters.
    for (store, cluster, ip, frontend) in [
        (&east.store, "east", "10.1.0.8", "10.96.0.11"),
        (&west.store, "west", "10.2.0.8", "10.97.0.11"),
    ] {
        let mut extra = service(cluster, &[(ip, true)], v1::Affinity::None);
        extra.name = "extra".into();
        extra.frontends = vec![frontend.into()];
        put_service(store.as_ref(), &extra).await;
    }
    let extra_clusters = |dp: &RecordingDatapath| -> BTreeSet<String> {
        dp.service(&marker_id("extra"))
            .map(|s| {
                s.table
                    .iter()
                    .map(|&i| s.backends[i as usize].cluster.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    let config = write_config(dir.path(), east.addr, Some(west.addr));
    let agent = AgentUnderTest::start(quick_options(&config));
    let AgentUnderTest { dp, view, .. } = &agent;
    let both = BTreeSet::from(["east".to_owned(), "west".to_owned()]);
    eventually("east and west merged, in both services", || {
        table_clusters(dp) == both && extra_clusters(dp) == both
    })
    .await;
    let programmed = dp.service(&web()).unwrap();

    // West drops its agents and, while they are away, deletes `extra`.
    west.server.stop_serving().await;
    eventually("west stale", || cluster_status(view, "west").stale).await;
    west.store
        .delete(service_key("west", "default", "extra").as_bytes())
        .await
        .unwrap();

    // West's entry changes (its watcher restarts) while west is still unreachable.
    let spare = spare_port();
    let mut cfg = load_config(&config).unwrap();
    let west_entry = cfg.clusters.iter_mut().find(|c| c.name == "west").unwrap();
    west_entry.endpoints.push(format!("localhost:{spare}"));
    save_config(&config, &cfg);
    eventually("west stale after its restart", || {
        let s = cluster_status(view, "west");
        s.stale
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains(&format!(":{spare}")))
    })
    .await;
    assert_eq!(
        extra_clusters(dp),
        both,
        "west's records kept while it is unreachable"
    );

    // West serves again: the new watcher's sync replaces what the old one left.
    west.server.serve_again(mesh::rebind(west.addr).await);
    eventually("west resynced", || {
        let s = cluster_status(view, "west");
        s.connected && s.synced && !s.stale
    })
    .await;
    eventually("west's deleted service gone from extra", || {
        extra_clusters(dp) == BTreeSet::from(["east".to_owned()])
    })
    .await;
    settle_with_marker(east.store.as_ref(), view, "marker-1").await;
    assert_eq!(dp.service(&web()).unwrap(), programmed, "web unchanged");
    assert_eq!(table_clusters(dp), both);

    agent.stop().await;
    stop_all(vec![west.server, east.server], vec![east.raft, west.raft]).await;
}

/// Clusters that are not who the configuration says are refused, with a status that says
/// why, and none of their records are merged: an endpoint that answers with another
/// cluster's certificate (refused at the TLS level), and a server that reports another
/// connected cluster's ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostor_clusters_are_refused_with_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, west } = TwoClusters::start(dir.path(), &ca).await;
    // South reports west's ID (its certificate and name are south's own).
    let south = start_south(dir.path(), &ca, 2, "10.3.0.0/16").await;
    let write = |south_port: Option<u16>| {
        let mut c = vec![("east", 1, east.addr.port()), ("west", 2, west.addr.port())];
        if let Some(port) = south_port {
            c.push(("south", 0, port));
        }
        write_clusters(dir.path(), &c)
    };
    let config = write(None);
    let agent = AgentUnderTest::start(quick_options(&config));
    let AgentUnderTest { dp, view, .. } = &agent;
    let east_west = BTreeSet::from(["east".to_owned(), "west".to_owned()]);
    eventually("east and west merged", || table_clusters(dp) == east_west).await;

    let refused_for = |needle: &'static str| {
        let view = view.clone();
        move || {
            view.clusters.get("south").is_some_and(|s| {
                s.phase == Phase::Refused
                    && !s.connected
                    && !s.synced
                    && s.last_error.as_deref().is_some_and(|e| e.contains(needle))
            })
        }
    };

    // South's address actually serves west: the TLS identity is west's.
    write(Some(west.addr.port()));
    eventually(
        "south refused: the endpoint is west",
        refused_for("cluster/west"),
    )
    .await;
    let error = cluster_status(view, "south").last_error.unwrap();
    assert!(error.contains("fix the endpoint"), "{error}");

    // South's real server, reporting west's cluster ID.
    write(Some(south.addr.port()));
    eventually("south refused: west's ID", refused_for("cluster ID 2")).await;
    let error = cluster_status(view, "south").last_error.unwrap();
    assert!(error.contains("west"), "{error}");

    settle_with_marker(east.store.as_ref(), view, "marker-1").await;
    assert_eq!(table_clusters(dp), east_west, "nothing of south merged");

    agent.stop().await;
    stop_all(
        vec![south.server, west.server, east.server],
        vec![south.raft, east.raft, west.raft],
    )
    .await;
}

/// The client certificate moves to new paths (the old files are deleted) and the config
/// file is updated: every watcher picks up the new paths, so a later reconnect works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_certificate_path_applies_to_every_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { mut east, mut west } = TwoClusters::start(dir.path(), &ca).await;
    let config = write_config(dir.path(), east.addr, Some(west.addr));
    let agent = AgentUnderTest::start(quick_options(&config));
    let AgentUnderTest { dp, view, .. } = &agent;
    let both = BTreeSet::from(["east".to_owned(), "west".to_owned()]);
    eventually("east and west merged", || table_clusters(dp) == both).await;

    // Move the client certificate and key; point the config at the new files.
    let moved = dir.path().join("rotated");
    std::fs::create_dir(&moved).unwrap();
    let mut cfg = load_config(&config).unwrap();
    for old in [&mut cfg.cert_file, &mut cfg.key_file] {
        let new = moved.join(old.file_name().unwrap());
        std::fs::copy(&*old, &new).unwrap();
        std::fs::remove_file(&*old).unwrap();
        *old = new;
    }
    save_config(&config, &cfg);

    // Both servers drop their connections; the agent must reconnect with the new files.
    east.server.stop_serving().await;
    west.server.stop_serving().await;
    eventually("both disconnected", || {
        view.clusters.snapshot().iter().all(|s| !s.connected)
    })
    .await;
    east.server.serve_again(mesh::rebind(east.addr).await);
    west.server.serve_again(mesh::rebind(west.addr).await);
    eventually("both reconnected with the moved certificate", || {
        let all = view.clusters.snapshot();
        all.len() == 2 && all.iter().all(|s| s.connected && s.synced)
    })
    .await;
    assert_eq!(table_clusters(dp), both);

    agent.stop().await;
    stop_all(vec![west.server, east.server], vec![east.raft, west.raft]).await;
}

/// A server that completes the TLS handshake and then never answers: the agent gives up on
/// each attempt after the request timeout, says so in the cluster's status, and the stale
/// TTL still drops the cluster's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_and_the_stale_ttl_still_applies() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, mut west } = TwoClusters::start(dir.path(), &ca).await;
    let config = write_config(dir.path(), east.addr, Some(west.addr));
    let mut options = quick_options(&config);
    options.request_timeout = Duration::from_millis(300);
    options.stale_ttl = Some(Duration::from_secs(3));
    let agent = AgentUnderTest::start(options);
    let AgentUnderTest { dp, view, .. } = &agent;
    let both = BTreeSet::from(["east".to_owned(), "west".to_owned()]);
    eventually("east and west merged", || table_clusters(dp) == both).await;

    // West's address now answers the TLS handshake (as west) and nothing else.
    west.server.stop_serving().await;
    let mute = mesh::MuteServer::start(&ca, TD, "west", mesh::rebind(west.addr).await);
    eventually("west's status names the unanswered request", || {
        let s = cluster_status(view, "west");
        !s.connected
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("GetClusterInfo") && e.contains("did not answer"))
    })
    .await;
    eventually("west dropped after the stale TTL", || {
        table_clusters(dp) == BTreeSet::from(["east".to_owned()])
    })
    .await;
    assert!(!cluster_status(view, "west").synced);

    agent.stop().await;
    mute.stop().await;
    stop_all(vec![west.server, east.server], vec![east.raft, west.raft]).await;
}

/// A full resync in which a service's value does not decode keeps that service's previous
/// record in force, as a bad live update does, instead of dropping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_keeps_the_last_good_record_of_an_undecodable_service() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let TwoClusters { east, west } = TwoClusters::start(dir.path(), &ca).await;
    let config = write_config(dir.path(), east.addr, Some(west.addr));
    let agent = AgentUnderTest::start(quick_options(&config));
    let AgentUnderTest { dp, view, .. } = &agent;
    let both = BTreeSet::from(["east".to_owned(), "west".to_owned()]);
    eventually("east and west merged", || table_clusters(dp) == both).await;
    let programmed = dp.service(&web()).unwrap();

    // West comes back from another store whose `web` stops decoding. That store has more
    // history than the agent's revision, so the agent cannot resume: it resyncs in full.
    // (The server saw `web` decode first: a service it never saw decode would not be
    // exported to peers at all, since it cannot tell whether the service is global.)
    west.server.stop().await;
    let (west2_raft, west2_store) = open_store(dir.path(), "west-store-2").await;
    // Written often enough that the server loads past the agent's revision.
    for _ in 0..8 {
        put_service(
            west2_store.as_ref(),
            &service("west", &[("10.2.0.5", true)], v1::Affinity::None),
        )
        .await;
    }
    let west2 = start_server(&west2_store, &ca, WEST, mesh::rebind(west.addr).await).await;
    west2_store
        .put(
            service_key("west", "default", "web").as_bytes(),
            vec![0xff, 0xff, 0xff, 0xff],
            None,
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let mut other = service("west", &[("10.2.0.9", true)], v1::Affinity::None);
        other.name = "other".into();
        put_service(west2_store.as_ref(), &other).await;
    }
    let synced_at = mark_synced(west2_store.as_ref(), "west").await;
    eventually("west resynced from the other store", || {
        let s = cluster_status(view, "west");
        s.connected && s.revision == synced_at && s.decode_errors >= 1
    })
    .await;
    settle_with_marker(east.store.as_ref(), view, "marker-1").await;
    assert_eq!(
        dp.service(&web()).unwrap(),
        programmed,
        "west's last good web record stays in force"
    );

    agent.stop().await;
    stop_all(
        vec![west2, east.server],
        vec![east.raft, west.raft, west2_raft],
    )
    .await;
}
