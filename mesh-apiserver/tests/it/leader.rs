//! Several API server replicas of one cluster on one store: one writer at a time. The
//! leader is stopped, then another one crashed, mid-export while the source keeps
//! changing; a follower takes over each time, nothing is lost, no record flaps (deleted
//! then recreated, or set back to an older version), the crashed leader's writes are
//! fenced off, and a follower serves Watch with the leader's records.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustermesh_api::keys::{self, Kind, MeshKey};
use clustermesh_api::v1;
use clustermesh_apiserver::cache::CacheConfig;
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::grpc::AccessPolicy;
use clustermesh_apiserver::leader::{leader_key, ElectionConfig, FencedStore, Term};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::peer_view::PodExport;
use clustermesh_apiserver::server::{self, ServerError, ServerOptions, SourceFactory};
use clustermesh_apiserver::source::{DirSource, Source};
use clustermesh_store::raft::{LocalCluster, ReplicaTls};
use clustermesh_store::{
    CasOutcome, CasWrite, Event, EventKind, Fence, FencedOp, FencedOutcome, KeyValue, LeaseId,
    ListResult, Revision, Store, StoreError, WatchStream,
};
use clustermesh_test_support::etcd::EtcdServer;
use futures::StreamExt;
use prost::Message;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_certs::transport::MeshEndpoint;

use crate::support::{self, Pki};

const CLUSTER: &str = "east";
/// Short enough that a crashed leader is replaced quickly, long enough for etcd (whose
/// minimum is about 1.5 s) and a loaded machine.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// Files (one service and one pod each) in the source directory at the start.
const INITIAL_FILES: usize = 12;
/// Generous deadline for anything that should happen "soon".
const WAIT: Duration = Duration::from_secs(60);

/// The source directory, changed continuously: services get new versions (their port is
/// `1000 + generation`, so versions are ordered), new files appear, some files go for
/// good. Names are never reused, so a record that comes back after a delete is a flap.
struct Churn {
    dir: tempfile::TempDir,
    state: Arc<Mutex<ChurnState>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

#[derive(Debug, Default, Clone)]
struct ChurnState {
    /// Live file id → generation of its service.
    live: BTreeMap<usize, u32>,
    /// Ids whose file was removed.
    removed: BTreeSet<usize>,
    next_id: usize,
    /// Changes made so far.
    changes: u64,
}

fn manifest(id: usize, generation: u32) -> String {
    let (hi, lo) = (id / 250, id % 250 + 1);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{id}, namespace: default}}\n\
         spec:\n  clusterIP: 10.96.{hi}.{lo}\n  ports: [{{name: http, port: {port}, protocol: TCP}}]\n\
         ---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: pod-{id}, namespace: default, labels: {{app: app-{app}}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: c, image: c}}]}}\n\
         status: {{phase: Running, podIP: 10.1.{hi}.{lo}}}\n",
        port = 1000 + generation,
        app = id % 3,
    )
}

fn pod_ip(id: usize) -> std::net::IpAddr {
    format!("10.1.{}.{}", id / 250, id % 250 + 1)
        .parse()
        .unwrap()
}

fn write_renamed(dir: &Path, id: usize, generation: u32) {
    let path = dir.join(format!("svc-{id}.yaml"));
    let tmp = dir.join(format!(".svc-{id}.yaml.tmp"));
    std::fs::write(&tmp, manifest(id, generation)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

impl Churn {
    fn start() -> Churn {
        let dir = tempfile::tempdir().unwrap();
        let mut state = ChurnState::default();
        for id in 0..INITIAL_FILES {
            write_renamed(dir.path(), id, 0);
            state.live.insert(id, 0);
        }
        state.next_id = INITIAL_FILES;
        let state = Arc::new(Mutex::new(state));
        let stop = CancellationToken::new();
        let task = tokio::spawn(churn(
            dir.path().to_owned(),
            Arc::clone(&state),
            stop.clone(),
        ));
        Churn {
            dir,
            state,
            stop,
            task,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn snapshot(&self) -> ChurnState {
        self.state.lock().unwrap().clone()
    }

    async fn stop(&mut self) -> ChurnState {
        self.stop.cancel();
        (&mut self.task).await.unwrap();
        self.snapshot()
    }
}

async fn churn(dir: PathBuf, state: Arc<Mutex<ChurnState>>, stop: CancellationToken) {
    let mut tick = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(30)) => {}
        }
        tick += 1;
        let mut s = state.lock().unwrap();
        if tick.is_multiple_of(10) {
            let id = s.next_id;
            s.next_id += 1;
            write_renamed(&dir, id, 0);
            s.live.insert(id, 0);
        } else if tick.is_multiple_of(25) && s.live.len() > INITIAL_FILES / 2 {
            // The oldest file goes, for good.
            let id = *s.live.keys().next().unwrap();
            std::fs::remove_file(dir.join(format!("svc-{id}.yaml"))).unwrap();
            s.live.remove(&id);
            s.removed.insert(id);
        } else {
            let ids: Vec<usize> = s.live.keys().copied().collect();
            let id = ids[usize::try_from(tick * 7).unwrap() % ids.len()];
            let generation = s.live[&id] + 1;
            write_renamed(&dir, id, generation);
            s.live.insert(id, generation);
        }
        s.changes += 1;
    }
}

fn source_factory(dir: PathBuf) -> SourceFactory {
    Arc::new(move || {
        Box::new(
            DirSource::new(&dir)
                .with_poll_interval(Duration::from_millis(50))
                .with_settle_time(Duration::from_millis(300)),
        ) as Box<dyn Source>
    })
}

/// One API server replica running in this process.
struct Replica {
    name: String,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    ops: SocketAddr,
    shutdown: CancellationToken,
    /// False once stopped or crashed (its gauges are no longer sampled).
    alive: Arc<AtomicBool>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Replica {
    async fn start(name: &str, store: Arc<dyn Store>, pki: &Pki, source: &Path) -> Replica {
        Replica::start_with_ttl(name, store, pki, source, LEASE_TTL).await
    }

    async fn start_with_ttl(
        name: &str,
        store: Arc<dyn Store>,
        pki: &Pki,
        source: &Path,
        ttl: Duration,
    ) -> Replica {
        let metrics = Arc::new(Metrics::new());
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, ops_addr) = (grpc.local_addr().unwrap(), ops.local_addr().unwrap());
        let mut export = ExportConfig::new(CLUSTER, 7);
        export.pod_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
        let options = ServerOptions {
            export,
            cache: CacheConfig::default(),
            export_pods: PodExport::All,
            policy: AccessPolicy::new(CLUSTER),
            grpc_listener: grpc,
            tls: pki.server(CLUSTER),
            ops_listener: Some(ops),
            stream_buffer: 1024,
            metrics: Arc::clone(&metrics),
            mirror: None,
            election: ElectionConfig::new(CLUSTER, name).with_lease_ttl(ttl),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(
            store,
            source_factory(source.to_owned()),
            options,
            shutdown.clone(),
        ));
        Replica {
            name: name.to_owned(),
            metrics,
            addr,
            ops: ops_addr,
            shutdown,
            alive: Arc::new(AtomicBool::new(true)),
            task: Some(task),
        }
    }

    fn leads(&self) -> bool {
        gauge(&self.metrics, "clustermesh_apiserver_leader") == 1
    }

    /// Graceful stop (SIGTERM): writers stop, the lease is revoked.
    async fn stop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// A crash: every task is dropped where it is; nothing is revoked.
    async fn crash(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        }
    }
}

/// The value of an unlabelled metric in `metrics`' exposition.
fn gauge(metrics: &Metrics, name: &str) -> i64 {
    metrics
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(-1)
}

/// Who holds the leader key, and its token.
async fn holder(store: &Arc<dyn Store>) -> Option<(String, Revision)> {
    let kv = store.get(leader_key(CLUSTER).as_bytes()).await.ok()??;
    Some((String::from_utf8(kv.value).unwrap(), kv.mod_revision))
}

/// Polls `probe` every 50 ms until it returns `Some`, failing after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event under the record prefix, with the moment it was seen.
struct Recorder {
    events: Arc<Mutex<Vec<(Instant, Event)>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    async fn start(store: &Arc<dyn Store>) -> Recorder {
        let from = store.current_revision().await.unwrap() + 1;
        let mut watch = store.watch(keys::ROOT.as_bytes(), from).await.unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        let task = tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                sink.lock()
                    .unwrap()
                    .push((Instant::now(), event.expect("the recording watch failed")));
            }
        });
        Recorder { events, task }
    }

    /// When the first record write at a revision above `token` was seen.
    async fn first_write_after(&self, token: Revision) -> Instant {
        eventually("a record write of the new leader", || async {
            self.events
                .lock()
                .unwrap()
                .iter()
                .find(|(_, e)| e.kind == EventKind::Put && e.revision() > token)
                .map(|(at, _)| *at)
        })
        .await
    }

    fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// Generation of a service record (its port is `1000 + generation`).
fn generation(value: &[u8]) -> u32 {
    v1::Service::decode(value).unwrap().ports[0].port - 1000
}

/// Fails on any flap in `events`: a record put again after its delete, a service set back
/// to an older generation, an endpoint or identity rewritten with another value, or a
/// delete of anything the source never removed.
fn assert_no_flap(events: &[Event], removed: &BTreeSet<usize>) {
    let removed_services: BTreeSet<String> = removed
        .iter()
        .map(|id| keys::service_key(CLUSTER, "default", &format!("svc-{id}")))
        .collect();
    let removed_endpoints: BTreeSet<String> = removed
        .iter()
        .map(|id| keys::endpoint_key(CLUSTER, pod_ip(*id)))
        .collect();
    let mut deleted: BTreeSet<String> = BTreeSet::new();
    let mut generations: BTreeMap<String, u32> = BTreeMap::new();
    let mut values: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for event in events {
        let key = String::from_utf8(event.kv.key.clone()).unwrap();
        let parsed = keys::parse_key(key.as_bytes()).unwrap();
        assert!(
            !deleted.contains(&key),
            "{key} came back after its delete (rev {})",
            event.revision()
        );
        match event.kind {
            EventKind::Delete => {
                let expected = removed_services.contains(&key) || removed_endpoints.contains(&key);
                assert!(
                    expected,
                    "{key} deleted at rev {} though the source never removed it",
                    event.revision()
                );
                deleted.insert(key);
            }
            EventKind::Put => match parsed {
                MeshKey::Service { .. } => {
                    let seen = generation(&event.kv.value);
                    if let Some(before) = generations.insert(key.clone(), seen) {
                        assert!(
                            seen >= before,
                            "{key} went back from generation {before} to {seen} at rev {}",
                            event.revision()
                        );
                    }
                }
                _ => {
                    if let Some(before) = values.insert(key.clone(), event.kv.value.clone()) {
                        assert_eq!(
                            before,
                            event.kv.value,
                            "{key} rewritten with another value at rev {}",
                            event.revision()
                        );
                    }
                }
            },
        }
    }
}

/// Waits until the store holds exactly the source's final state.
async fn assert_store_matches(store: &Arc<dyn Store>, state: &ChurnState) {
    let want_services: BTreeMap<String, u32> = state
        .live
        .iter()
        .map(|(id, g)| {
            (
                keys::service_key(CLUSTER, "default", &format!("svc-{id}")),
                *g,
            )
        })
        .collect();
    let want_endpoints: BTreeSet<String> = state
        .live
        .keys()
        .map(|id| keys::endpoint_key(CLUSTER, pod_ip(*id)))
        .collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let services: BTreeMap<String, u32> = store
            .list(Kind::Service.cluster_prefix(CLUSTER).as_bytes())
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8(kv.key).unwrap(), generation(&kv.value)))
            .collect();
        let endpoints: BTreeSet<String> = store
            .list(Kind::Endpoint.cluster_prefix(CLUSTER).as_bytes())
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect();
        if services == want_services && endpoints == want_endpoints {
            return;
        }
        let last = format!(
            "services {services:?}\nwanted {want_services:?}\nendpoints {endpoints:?}\nwanted {want_endpoints:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the store does not hold the source's final state after {WAIT:?}:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples which live replicas lead, every 10 ms, and remembers any pair seen leading
/// together in two samples in a row (one sample alone could straddle a handover).
struct LeaderSampler {
    overlap: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LeaderSampler {
    fn start(replicas: Vec<(String, Arc<Metrics>, Arc<AtomicBool>)>) -> LeaderSampler {
        let overlap = Arc::new(Mutex::new(None));
        let stop = CancellationToken::new();
        let (found, token) = (Arc::clone(&overlap), stop.clone());
        let task = tokio::spawn(async move {
            let mut previous: BTreeSet<String> = BTreeSet::new();
            while !token.is_cancelled() {
                let leading: BTreeSet<String> = replicas
                    .iter()
                    .filter(|(_, metrics, alive)| {
                        alive.load(Ordering::SeqCst)
                            && gauge(metrics, "clustermesh_apiserver_leader") == 1
                    })
                    .map(|(name, _, _)| name.clone())
                    .collect();
                if leading.len() > 1 && previous.len() > 1 {
                    let both: Vec<&String> = leading.intersection(&previous).collect();
                    if both.len() > 1 {
                        found
                            .lock()
                            .unwrap()
                            .get_or_insert(format!("{both:?} led at the same time"));
                    }
                }
                previous = leading;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        LeaderSampler {
            overlap,
            stop,
            task,
        }
    }

    async fn finish(self) -> Option<String> {
        self.stop.cancel();
        self.task.await.unwrap();
        self.overlap.lock().unwrap().take()
    }
}

/// The one live replica that leads (by its metric), once the leader key names it too.
async fn wait_for_leader<'a>(
    replicas: &'a [Replica],
    store: &Arc<dyn Store>,
    not: Option<&str>,
) -> (&'a Replica, Revision) {
    eventually("exactly one live replica leads", || async {
        let leading: Vec<&Replica> = replicas
            .iter()
            .filter(|r| r.alive.load(Ordering::SeqCst) && r.leads())
            .collect();
        let [leader] = leading.as_slice() else {
            return None;
        };
        if Some(leader.name.as_str()) == not {
            return None;
        }
        let (name, token) = holder(store).await?;
        (name == leader.name).then_some((*leader, token))
    })
    .await
}

/// The full state a Watch on `replica` serves to one of the cluster's agents: service
/// keys with their generation, once every kind is synced.
async fn watched_services(replica: &Replica, pki: &Pki) -> BTreeMap<String, u32> {
    let channel = MeshEndpoint::new(
        &format!("localhost:{}", replica.addr.port()),
        pki.cluster_client(CLUSTER),
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut client = MeshApiClient::new(channel);
    let mut stream = client
        .watch(v1::WatchRequest {
            kinds: vec![],
            from_revision: 0,
            all_clusters: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut services = BTreeMap::new();
    let mut synced = BTreeSet::new();
    while synced.len() < Kind::ALL.len() {
        match support::next_event(&mut stream).await {
            v1::watch_event::Event::Upsert(upsert)
                if upsert
                    .key
                    .starts_with(&Kind::Service.cluster_prefix(CLUSTER)) =>
            {
                services.insert(upsert.key.clone(), generation(&upsert.value));
            }
            v1::watch_event::Event::Synced(s) => {
                synced.insert(s.kind);
            }
            _ => {}
        }
    }
    services
}

/// The leader election as `replica`'s Status reports it (to an admin).
async fn leader_status(replica: &Replica, pki: &Pki) -> v1::LeaderStatus {
    let channel = MeshEndpoint::new(
        &format!("localhost:{}", replica.addr.port()),
        pki.admin("ops"),
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    MeshApiClient::new(channel)
        .status(v1::StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leader
        .expect("Status reports the election")
}

/// Three replicas share one store; the leader is stopped, then the next one crashed,
/// both mid-export under churn.
async fn handover_under_churn(stores: [Arc<dyn Store>; 4], backend: &str) {
    let [observer, s1, s2, s3] = stores;
    let pki = Pki::new();
    let mut churn = Churn::start();
    let recorder = Recorder::start(&observer).await;
    let mut replicas = vec![
        Replica::start("r1", s1, &pki, &churn.path()).await,
        Replica::start("r2", s2, &pki, &churn.path()).await,
        Replica::start("r3", s3, &pki, &churn.path()).await,
    ];
    let sampler = LeaderSampler::start(
        replicas
            .iter()
            .map(|r| (r.name.clone(), Arc::clone(&r.metrics), Arc::clone(&r.alive)))
            .collect(),
    );

    let (first, _) = wait_for_leader(&replicas, &observer, None).await;
    let first = first.name.clone();
    // Every replica is ready: the leader once it has exported, followers once their
    // caches have loaded.
    for r in &replicas {
        eventually(&format!("{} ready", r.name), || async {
            let (code, _) = support::http_get(r.ops.port(), "/readyz").await?;
            (code == 200).then_some(())
        })
        .await;
    }
    let followers = replicas.iter().filter(|r| !r.leads()).count();
    assert_eq!(followers, 2, "two followers beside the leader");
    // Every replica's Status names the leader and its term.
    let (_, first_token) = holder(&observer).await.unwrap();
    for r in &replicas {
        let status = eventually(&format!("{} reports the leader", r.name), || async {
            let status = leader_status(r, &pki).await;
            (status.holder == first).then_some(status)
        })
        .await;
        assert_eq!(
            (status.enabled, status.is_leader, status.term),
            (true, r.name == first, first_token),
            "{}'s Status",
            r.name
        );
    }

    // 1. The leader stops (graceful: its lease is revoked) while it exports.
    let changes = churn.snapshot().changes;
    eventually("the source changes while the leader exports", || async {
        (churn.snapshot().changes > changes + 20).then_some(())
    })
    .await;
    let index = replicas.iter().position(|r| r.name == first).unwrap();
    let stopped_at = Instant::now();
    replicas[index].stop().await;
    let (second, token) = wait_for_leader(&replicas, &observer, Some(&first)).await;
    let second = second.name.clone();
    let graceful = recorder.first_write_after(token).await - stopped_at;

    // 2. The new leader crashes (no revocation: its lease has to expire) mid-export.
    let changes = churn.snapshot().changes;
    eventually(
        "the source changes while the second leader exports",
        || async { (churn.snapshot().changes > changes + 20).then_some(()) },
    )
    .await;
    let index = replicas.iter().position(|r| r.name == second).unwrap();
    let crashed_at = Instant::now();
    replicas[index].crash().await;
    let (third, third_token) = wait_for_leader(&replicas, &observer, Some(&second)).await;
    let third = third.name.clone();
    let crash = recorder.first_write_after(third_token).await - crashed_at;
    eprintln!(
        "{backend}: handover after a stop {graceful:?}, after a crash {crash:?} (lease TTL {LEASE_TTL:?})"
    );

    // The crashed leader's writes are fenced: a late put and a late delete with its
    // token change nothing.
    let ghost_metrics = Arc::new(Metrics::new());
    let ghost = FencedStore::new(
        Arc::clone(&observer),
        Term::new(leader_key(CLUSTER), token),
        Arc::clone(&ghost_metrics),
    );
    let ghost_key = keys::service_key(CLUSTER, "default", "ghost");
    let late_put = ghost
        .put(ghost_key.as_bytes(), b"late".to_vec(), None)
        .await;
    assert!(
        matches!(late_put, Err(StoreError::Fenced { expected, .. }) if expected == token),
        "a deposed leader's put: {late_put:?}"
    );
    let victim = keys::endpoint_key(CLUSTER, pod_ip(INITIAL_FILES - 1));
    let before = observer.get(victim.as_bytes()).await.unwrap();
    assert!(before.is_some(), "{victim} exported");
    let late_delete = ghost.delete(victim.as_bytes()).await;
    assert!(
        matches!(late_delete, Err(StoreError::Fenced { .. })),
        "a deposed leader's delete: {late_delete:?}"
    );
    assert_eq!(observer.get(victim.as_bytes()).await.unwrap(), before);
    assert_eq!(observer.get(ghost_key.as_bytes()).await.unwrap(), None);
    assert_eq!(
        gauge(&ghost_metrics, "clustermesh_apiserver_fenced_writes_total"),
        2
    );

    // Nothing lost: once the source stops changing, the store holds exactly its state.
    let state = churn.stop().await;
    assert_store_matches(&observer, &state).await;

    // The first leader comes back as a follower and serves the leader's records.
    let index = replicas.iter().position(|r| r.name == first).unwrap();
    let rejoined = Replica::start(&first, Arc::clone(&observer), &pki, &churn.path()).await;
    replicas[index] = rejoined;
    let want: BTreeMap<String, u32> = state
        .live
        .iter()
        .map(|(id, g)| {
            (
                keys::service_key(CLUSTER, "default", &format!("svc-{id}")),
                *g,
            )
        })
        .collect();
    eventually(&format!("{first} follows {third}"), || async {
        let r = &replicas[index];
        let (code, _) = support::http_get(r.ops.port(), "/readyz").await?;
        (code == 200 && !r.leads()).then_some(())
    })
    .await;
    assert_eq!(watched_services(&replicas[index], &pki).await, want);

    if let Some(overlap) = sampler.finish().await {
        panic!("two replicas led at once: {overlap}");
    }
    let events = recorder.events();
    assert_no_flap(&events, &state.removed);
    // Each of the three terms wrote records (so each leader was stopped mid-export).
    let puts_between = |low: Revision, high: Revision| {
        events
            .iter()
            .filter(|e| e.kind == EventKind::Put && e.revision() > low && e.revision() < high)
            .count()
    };
    let terms = [
        ("first", 0, token),
        ("second", token, third_token),
        ("third", third_token, Revision::MAX),
    ];
    for (term, low, high) in terms {
        let puts = puts_between(low, high);
        eprintln!("{backend}: {term} term wrote {puts} records");
        assert!(puts > 0, "the {term} leader wrote nothing");
    }
    eprintln!(
        "{backend}: {} source changes, {} store events",
        state.changes,
        events.len()
    );
    for r in &mut replicas {
        if r.alive.load(Ordering::SeqCst) {
            r.stop().await;
        }
    }
    recorder.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_leader_stopped_or_crashed_mid_export_hands_over_without_loss_or_flap() {
    let Some(etcd) = EtcdServer::start_or_skip("leader election").await else {
        return;
    };
    let stores: [Arc<dyn Store>; 4] = [
        Arc::new(etcd.connect().await),
        Arc::new(etcd.connect().await),
        Arc::new(etcd.connect().await),
        Arc::new(etcd.connect().await),
    ];
    handover_under_churn(stores, "etcd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_leader_stopped_or_crashed_mid_export_hands_over_without_loss_or_flap() {
    // Three raft replicas, one API server on each (as deployed); the observer reads
    // through the first.
    let dir = tempfile::tempdir().unwrap();
    let tls = ReplicaTls::ephemeral_loopback("mesh.test", CLUSTER)
        .unwrap()
        .0;
    let cluster = LocalCluster::start(3, dir.path(), Some(tls)).await.unwrap();
    cluster.wait_for_leader(WAIT).await.unwrap();
    let store = |i: usize| -> Arc<dyn Store> { Arc::new(cluster.store(i).unwrap()) };
    handover_under_churn([store(0), store(0), store(1), store(2)], "raft").await;
    cluster.shutdown().await;
}

/// A store reached over a link that can be cut. While it is cut every call waits; a call
/// made meanwhile is delivered when the link comes back, whether its caller still waits
/// or not (a request already on the wire), and the outcome of every such late write is
/// kept. Watch streams stall while the link is cut.
struct Link {
    inner: Arc<dyn Store>,
    cut: tokio::sync::watch::Sender<bool>,
    late_writes: Arc<Mutex<Vec<Result<FencedOutcome, StoreError>>>>,
}

impl Link {
    fn new(inner: Arc<dyn Store>) -> Arc<Link> {
        Arc::new(Link {
            inner,
            cut: tokio::sync::watch::channel(false).0,
            late_writes: Arc::default(),
        })
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// Runs `call` once the link is up, in its own task.
    async fn deliver<T, F>(&self, call: F) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        let mut cut = self.cut.subscribe();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = cut.wait_for(|c| !c).await;
            let _ = tx.send(call.await);
        });
        rx.await.expect("the delivery task ended")
    }
}

#[async_trait::async_trait]
impl Store for Link {
    async fn get(&self, key: &[u8]) -> clustermesh_store::Result<Option<KeyValue>> {
        let (inner, key) = (Arc::clone(&self.inner), key.to_vec());
        self.deliver(async move { inner.get(&key).await }).await
    }
    async fn list(&self, prefix: &[u8]) -> clustermesh_store::Result<ListResult> {
        let (inner, prefix) = (Arc::clone(&self.inner), prefix.to_vec());
        self.deliver(async move { inner.list(&prefix).await }).await
    }
    async fn put(
        &self,
        key: &[u8],
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> clustermesh_store::Result<Revision> {
        let (inner, key) = (Arc::clone(&self.inner), key.to_vec());
        self.deliver(async move { inner.put(&key, value, lease).await })
            .await
    }
    async fn delete(&self, key: &[u8]) -> clustermesh_store::Result<Option<Revision>> {
        let (inner, key) = (Arc::clone(&self.inner), key.to_vec());
        self.deliver(async move { inner.delete(&key).await }).await
    }
    async fn delete_prefix(&self, prefix: &[u8]) -> clustermesh_store::Result<u64> {
        let (inner, prefix) = (Arc::clone(&self.inner), prefix.to_vec());
        self.deliver(async move { inner.delete_prefix(&prefix).await })
            .await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Revision,
        write: CasWrite,
    ) -> clustermesh_store::Result<CasOutcome> {
        let (inner, key) = (Arc::clone(&self.inner), key.to_vec());
        self.deliver(async move { inner.compare_and_swap(&key, expected, write).await })
            .await
    }
    async fn fenced_write(
        &self,
        fence: &Fence,
        op: FencedOp,
    ) -> clustermesh_store::Result<FencedOutcome> {
        let (inner, fence) = (Arc::clone(&self.inner), fence.clone());
        let late = (*self.cut.borrow()).then(|| Arc::clone(&self.late_writes));
        self.deliver(async move {
            let result = inner.fenced_write(&fence, op).await;
            if let Some(late) = late {
                let kept = match &result {
                    Ok(outcome) => Ok(outcome.clone()),
                    Err(StoreError::Fenced {
                        key,
                        expected,
                        current,
                    }) => Err(StoreError::Fenced {
                        key: key.clone(),
                        expected: *expected,
                        current: *current,
                    }),
                    Err(other) => Err(StoreError::Backend(other.to_string())),
                };
                late.lock().unwrap().push(kept);
            }
            result
        })
        .await
    }
    async fn watch(&self, prefix: &[u8], from: Revision) -> clustermesh_store::Result<WatchStream> {
        let (inner, prefix) = (Arc::clone(&self.inner), prefix.to_vec());
        let stream = self
            .deliver(async move { inner.watch(&prefix, from).await })
            .await?;
        let cut = self.cut.subscribe();
        Ok(Box::pin(stream.then(move |item| {
            let mut cut = cut.clone();
            async move {
                let _ = cut.wait_for(|c| !c).await;
                item
            }
        })))
    }
    async fn grant_lease(&self, ttl: Duration) -> clustermesh_store::Result<LeaseId> {
        let inner = Arc::clone(&self.inner);
        self.deliver(async move { inner.grant_lease(ttl).await })
            .await
    }
    async fn keep_alive(&self, lease: LeaseId) -> clustermesh_store::Result<Duration> {
        let inner = Arc::clone(&self.inner);
        self.deliver(async move { inner.keep_alive(lease).await })
            .await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> clustermesh_store::Result<()> {
        let inner = Arc::clone(&self.inner);
        self.deliver(async move { inner.revoke_lease(lease).await })
            .await
    }
    async fn current_revision(&self) -> clustermesh_store::Result<Revision> {
        let inner = Arc::clone(&self.inner);
        self.deliver(async move { inner.current_revision().await })
            .await
    }
    async fn compact(&self, revision: Revision) -> clustermesh_store::Result<()> {
        let inner = Arc::clone(&self.inner);
        self.deliver(async move { inner.compact(revision).await })
            .await
    }
}

/// The leader loses its store (a network partition) while it exports: it steps down on
/// its own before its lease can expire, the follower takes over once it has, and when
/// the link comes back the old leader's writes that were on their way all fail as
/// fenced; it then follows. Nothing is lost or flaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_partitioned_leader_steps_down_and_its_late_writes_are_fenced() {
    let Some(etcd) = EtcdServer::start_or_skip("leader partition").await else {
        return;
    };
    let observer: Arc<dyn Store> = Arc::new(etcd.connect().await);
    let link = Link::new(Arc::new(etcd.connect().await));
    let pki = Pki::new();
    let mut churn = Churn::start();
    let recorder = Recorder::start(&observer).await;
    let mut replicas = vec![
        Replica::start(
            "a",
            Arc::clone(&link) as Arc<dyn Store>,
            &pki,
            &churn.path(),
        )
        .await,
    ];
    let (a, a_token) = wait_for_leader(&replicas, &observer, None).await;
    assert_eq!(a.name, "a");
    eventually("a ready", || async {
        let (code, _) = support::http_get(replicas[0].ops.port(), "/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    replicas.push(Replica::start("b", Arc::new(etcd.connect().await), &pki, &churn.path()).await);
    let sampler = LeaderSampler::start(
        replicas
            .iter()
            .map(|r| (r.name.clone(), Arc::clone(&r.metrics), Arc::clone(&r.alive)))
            .collect(),
    );
    eventually("b ready as a follower", || async {
        let (code, _) = support::http_get(replicas[1].ops.port(), "/readyz").await?;
        (code == 200 && !replicas[1].leads()).then_some(())
    })
    .await;

    let changes = churn.snapshot().changes;
    eventually("the source changes while a exports", || async {
        (churn.snapshot().changes > changes + 20).then_some(())
    })
    .await;
    link.set_cut(true);
    let (b, b_token) = wait_for_leader(&replicas, &observer, Some("a")).await;
    assert_eq!(b.name, "b");
    assert!(b_token > a_token);
    assert!(!replicas[0].leads(), "a must have stepped down");
    // b writes for a while, then the link comes back with a's writes in flight.
    let changes = churn.snapshot().changes;
    eventually("the source changes while b exports", || async {
        (churn.snapshot().changes > changes + 20).then_some(())
    })
    .await;
    link.set_cut(false);
    let late = eventually("a's late writes delivered", || async {
        let late = link.late_writes.lock().unwrap();
        (!late.is_empty()).then(|| late.len())
    })
    .await;
    eventually("a follows b", || async {
        let a = &replicas[0];
        let (code, body) = support::http_get(a.ops.port(), "/readyz").await?;
        (code == 200 && !a.leads() && holder(&observer).await?.0 == "b").then_some(body)
    })
    .await;
    let state = churn.stop().await;
    assert_store_matches(&observer, &state).await;
    {
        let late_writes = link.late_writes.lock().unwrap();
        for result in late_writes.iter() {
            assert!(
                matches!(result, Err(StoreError::Fenced { expected, .. }) if *expected == a_token),
                "a write a sent as leader arrived after b won and was not fenced: {result:?}"
            );
        }
        eprintln!("{late} of a's writes arrived late, all fenced");
    }
    if let Some(overlap) = sampler.finish().await {
        panic!("two replicas led at once: {overlap}");
    }
    assert_no_flap(&recorder.events(), &state.removed);
    assert_eq!(
        gauge(
            &replicas[0].metrics,
            "clustermesh_apiserver_leader_terms_total"
        ),
        1
    );
    for r in &mut replicas {
        r.stop().await;
    }
    recorder.task.abort();
}

/// A lone replica restarted after a crash leads again at once: it takes its own key back
/// from its previous process instead of waiting for that process's lease (here ten
/// minutes) to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_after_a_crash_takes_its_own_key_back() {
    let Some(etcd) = EtcdServer::start_or_skip("leader restart").await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(etcd.connect().await);
    let pki = Pki::new();
    let mut churn = Churn::start();
    churn.stop().await;
    let long = Duration::from_secs(600);
    let mut first =
        vec![Replica::start_with_ttl("solo", Arc::clone(&store), &pki, &churn.path(), long).await];
    let (_, token) = wait_for_leader(&first, &store, None).await;
    first[0].crash().await;
    let old = store
        .get(leader_key(CLUSTER).as_bytes())
        .await
        .unwrap()
        .expect("the crashed leader's key outlives it");
    let mut second =
        vec![Replica::start_with_ttl("solo", Arc::clone(&store), &pki, &churn.path(), long).await];
    let (_, new_token) = wait_for_leader(&second, &store, None).await;
    assert!(new_token > token);
    let now = store
        .get(leader_key(CLUSTER).as_bytes())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        now.lease, old.lease,
        "the key is bound to the new process's lease"
    );
    assert_store_matches(&store, &churn.snapshot()).await;
    second[0].stop().await;
    // A stopped leader resigns: its key is gone at once.
    assert_eq!(holder(&store).await, None);
}

/// Two replicas given the same name: the second takes the key over once (it cannot tell
/// its twin from its own crashed process), then the first follows instead of taking it
/// back, so leadership does not bounce between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_a_name_do_not_take_the_key_from_each_other_forever() {
    let Some(etcd) = EtcdServer::start_or_skip("leader duplicate names").await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(etcd.connect().await);
    let pki = Pki::new();
    let mut churn = Churn::start();
    churn.stop().await;
    let mut replicas = vec![Replica::start("twin", Arc::clone(&store), &pki, &churn.path()).await];
    wait_for_leader(&replicas, &store, None).await;
    replicas.push(Replica::start("twin", Arc::clone(&store), &pki, &churn.path()).await);
    let terms = |replicas: &[Replica]| -> i64 {
        replicas
            .iter()
            .map(|r| gauge(&r.metrics, "clustermesh_apiserver_leader_terms_total"))
            .sum()
    };
    eventually("the second twin takes the key once", || async {
        (terms(&replicas) == 2 && replicas[1].leads() && !replicas[0].leads()).then_some(())
    })
    .await;
    // Several lease periods later nothing has moved.
    tokio::time::sleep(LEASE_TTL * 3).await;
    assert_eq!(terms(&replicas), 2, "leadership bounced between the twins");
    assert!(replicas[1].leads() && !replicas[0].leads());
    for r in &mut replicas {
        r.stop().await;
    }
}
