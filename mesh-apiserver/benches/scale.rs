//! Mesh scale benchmark (issue 15, part 4): N clusters × M agents, mirror mode and direct
//! mode side by side in the same run.
//!
//! Every cluster's mesh API server is a **separate process** (this binary re-executed with
//! `SCALE_ROLE=server`), so its CPU time and peak RSS are its own (`/proc/<pid>/stat`
//! utime + stime, `/proc/<pid>/status` VmHWM). Each server process runs the real server
//! wiring (`server::run`: exporter → embedded single-replica raft store → cache → gRPC over
//! real mTLS, operations endpoint, and in mirror mode the peer mirror) with a bench source
//! in place of Kubernetes: `SERVICES` global services, each with an EndpointSlice of
//! `BACKENDS` ready endpoints, given to the exporter as Kubernetes objects (the same
//! translation the directory and Kubernetes sources feed). A propagation write is one
//! EndpointSlice change (one endpoint turns not-ready) handed to the source through the
//! process's stdin.
//!
//! Agents are lightweight watch clients in this (the orchestrating) process: one tokio task
//! per Watch stream, each agent its own TCP + TLS connection per server it dials (as a real
//! agent's per-cluster watcher does), with its cluster's agent certificate
//! (`spiffe://<td>/cluster/<name>/agent`).
//!
//! - **direct** mode: every agent dials every cluster's server and watches that cluster's
//!   records (`all_clusters: false`): N streams per agent.
//! - **mirror** mode: every server mirrors its N − 1 peers into its own store
//!   (`--mirror-peers`); every agent dials only its own server and watches every cluster
//!   it holds (`all_clusters: true`): one stream per agent.
//!
//! Phases, per mode: start the N servers (and wait, in mirror mode, until every server holds
//! every peer's full state: `clustermesh_apiserver_mirror_synced` = 1 for each peer); connect
//! the fleet of N × M agents (by default resuming from the server's current revision, as
//! agents that were already running; `SCALE_FLEET_SYNC=full` makes every agent receive the
//! full state from revision 0); `UPDATES` writes, one every `UPDATE_INTERVAL_MS`, in
//! clusters 0, 1, 2, … in turn, each timed from the write (the command to the source) until
//! every agent of every *other* cluster has received the changed service record; then one
//! new agent (of cluster 1) from scratch: time until it has every cluster's full state.
//! Streams per server: the server's `clustermesh_apiserver_watchers` gauge (`/metrics`).
//!
//! Not a criterion benchmark (tail latencies over many receivers, resource use of other
//! processes). Run: `cargo bench -p clustermesh-apiserver --bench scale`; env
//! `SCALE_SHAPES` (default `8x500,32x100`: clusters × agents per cluster),
//! `SCALE_MODES` (`mirror,direct`), `SCALE_SERVICES` (1000 per cluster),
//! `SCALE_BACKENDS` (2 per service), `SCALE_UPDATES` (64), `SCALE_UPDATE_INTERVAL_MS`
//! (100), `SCALE_FLEET_SYNC` (`resume` | `full`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark harness: fail loudly

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustermesh_agent_core::watcher::ReconnectBackoff;
use clustermesh_api::agent_config::{AgentConfig, ClusterEntry, WatchMode};
use clustermesh_api::keys;
use clustermesh_api::v1::{self, mesh_api_client::MeshApiClient, watch_event::Event};
use clustermesh_apiserver::cache::CacheConfig;
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::grpc::AccessPolicy;
use clustermesh_apiserver::leader::ElectionConfig;
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::mirror::{MirrorConfig, MirrorLimits};
use clustermesh_apiserver::peer_view::PodExport;
use clustermesh_apiserver::server::{self, ServerOptions, SourceFactory};
use clustermesh_apiserver::source::{
    parse_manifests, K8sObject, ObjectKind, Source, SourceError, SourceEvent,
};
use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::transport::MeshEndpoint;
use clustermesh_certs::{
    MeshCa, MeshTls, ServerNames, TlsSource, TrustBundle, TrustDomain, Validity,
};
use clustermesh_store::raft::LocalCluster;
use clustermesh_store::Store;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

const TD: &str = "scale.bench";
/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn cluster_name(c: usize) -> String {
    format!("c{c:02}")
}

// ---------------------------------------------------------------------------------------
// Server process
// ---------------------------------------------------------------------------------------

/// Kubernetes manifests of service `i` of cluster index `c`: a global Service and its
/// EndpointSlice; endpoint `unready` (if any) not ready.
fn manifests(c: usize, i: usize, backends: usize, unready: Option<usize>) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc{i}\n  namespace: ns{ns}\n  annotations:\n    service.cilium.io/global: \"true\"\nspec:\n  type: ClusterIP\n  clusterIP: 10.96.{a}.{b}\n  clusterIPs: [10.96.{a}.{b}]\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n---\n",
        ns = i % 10,
        a = i / 250,
        b = i % 250 + 1
    );
    y.push_str(&slice(c, i, backends, unready));
    y
}

fn slice(c: usize, i: usize, backends: usize, unready: Option<usize>) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc{i}-1\n  namespace: ns{ns}\n  labels: {{kubernetes.io/service-name: svc{i}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n",
        ns = i % 10
    );
    for b in 0..backends {
        let n = i * backends + b;
        let ready = unready != Some(b);
        let _ = write!(
            y,
            "- addresses: [10.{}.{}.{}]\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n  nodeName: node{}\n",
            64 + c * 4 + n / 62500,
            n / 250 % 250,
            n % 250 + 1,
            n % 100
        );
    }
    y.push_str("---\n");
    y
}

/// The bench's source: the whole state once, then one EndpointSlice per command read from
/// stdin (`<service> <unready endpoint>`).
#[derive(Debug)]
struct BenchSource {
    cluster: usize,
    services: usize,
    backends: usize,
    /// Shared by every source the server makes (a new one each time it becomes leader).
    commands: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(usize, usize)>>>,
}

#[async_trait::async_trait]
impl Source for BenchSource {
    async fn run(
        self: Box<Self>,
        events: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut text = String::new();
        for i in 0..self.services {
            text.push_str(&manifests(self.cluster, i, self.backends, None));
        }
        let objects = parse_manifests("bench.yaml", &text).unwrap();
        let (services, slices): (Vec<K8sObject>, Vec<K8sObject>) = objects
            .into_iter()
            .partition(|o| o.kind() == ObjectKind::Service);
        let mut initial = vec![
            SourceEvent::Replace {
                kind: ObjectKind::Service,
                objects: services,
            },
            SourceEvent::Replace {
                kind: ObjectKind::EndpointSlice,
                objects: slices,
            },
        ];
        for kind in ObjectKind::ALL {
            if !matches!(kind, ObjectKind::Service | ObjectKind::EndpointSlice) {
                initial.push(SourceEvent::Replace {
                    kind,
                    objects: Vec::new(),
                });
            }
        }
        for event in initial {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
        let mut commands = self.commands.lock().await;
        loop {
            let command = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                c = commands.recv() => c,
            };
            let Some((i, unready)) = command else {
                return Ok(());
            };
            let text = slice(self.cluster, i, self.backends, Some(unready));
            let object = parse_manifests("update.yaml", &text).unwrap().remove(0);
            if events.send(SourceEvent::Apply(object)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// What the orchestrator tells a server process (environment variables).
struct ServerArgs {
    index: usize,
    clusters: usize,
    services: usize,
    backends: usize,
    listen: SocketAddr,
    ops: SocketAddr,
    dir: PathBuf,
    mirror: bool,
}

async fn server_main() {
    let var = |n: &str| std::env::var(n).unwrap();
    let args = ServerArgs {
        index: var("SCALE_INDEX").parse().unwrap(),
        clusters: var("SCALE_CLUSTERS").parse().unwrap(),
        services: var("SCALE_SERVICES").parse().unwrap(),
        backends: var("SCALE_BACKENDS").parse().unwrap(),
        listen: var("SCALE_LISTEN").parse().unwrap(),
        ops: var("SCALE_OPS").parse().unwrap(),
        dir: var("SCALE_DIR").into(),
        mirror: var("SCALE_MIRROR") == "1",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cluster = cluster_name(args.index);
    let td = TrustDomain::new(TD).unwrap();
    let raft = LocalCluster::start(1, &args.dir.join("raft"), None)
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(raft.store(0).unwrap());
    let read = |f: &str| std::fs::read(args.dir.join(f)).unwrap();
    let tls: Arc<dyn TlsSource> = Arc::new(
        MeshTls::from_pem(
            td.clone(),
            &read("bundle.pem"),
            &read("server.crt"),
            &read("server.key"),
        )
        .unwrap(),
    );
    let (tx, commands) = mpsc::unbounded_channel();
    let commands = Arc::new(tokio::sync::Mutex::new(commands));
    let (index, services, backends) = (args.index, args.services, args.backends);
    let source: SourceFactory = Arc::new(move || -> Box<dyn Source> {
        Box::new(BenchSource {
            cluster: index,
            services,
            backends,
            commands: Arc::clone(&commands),
        })
    });
    let shutdown = CancellationToken::new();
    // Commands from the orchestrator; end of stdin (the orchestrator is gone) ends the
    // process.
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            let mut it = line.split_whitespace().map(|v| v.parse::<usize>().unwrap());
            let (Some(i), Some(u)) = (it.next(), it.next()) else {
                continue;
            };
            if tx.send((i, u)).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    let mirror = args.mirror.then(|| MirrorConfig {
        cluster: cluster.clone(),
        cluster_id: u32::try_from(args.index + 1).unwrap(),
        pod_cidrs: Vec::new(),
        trust_domain: td.clone(),
        peers_file: args.dir.join("peers.yaml"),
        poll: Duration::from_secs(1),
        cert_file: args.dir.join("server.crt"),
        key_file: args.dir.join("server.key"),
        backoff: ReconnectBackoff::default(),
        stale_ttl: None,
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        limits: MirrorLimits::default(),
    });
    let options = ServerOptions {
        export: ExportConfig::new(cluster.clone(), u32::try_from(args.index + 1).unwrap()),
        cache: CacheConfig::default(),
        export_pods: PodExport::All,
        policy: AccessPolicy::new(cluster.clone()),
        grpc_listener: tokio::net::TcpListener::bind(args.listen).await.unwrap(),
        tls,
        ops_listener: Some(tokio::net::TcpListener::bind(args.ops).await.unwrap()),
        stream_buffer: 1024,
        metrics: Arc::new(Metrics::new()),
        mirror,
        election: ElectionConfig::new(cluster.clone(), "1"),
    };
    let _ = args.clusters;
    server::run(store, source, options, shutdown).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Orchestrator: processes, metrics
// ---------------------------------------------------------------------------------------

struct ServerProc {
    name: String,
    child: Child,
    stdin: ChildStdin,
    grpc: SocketAddr,
    ops: SocketAddr,
}

/// (CPU seconds, VmHWM MiB, VmRSS MiB) of a process.
fn proc_usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cpu = stat.rsplit_once(") ").map_or(0.0, |(_, after)| {
        let f: Vec<&str> = after.split_whitespace().collect();
        (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / TICKS
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            / 1024
    };
    (cpu, field("VmHWM:"), field("VmRSS:"))
}

/// GET `path` on a plain HTTP port: (status 200, body).
async fn http_get(addr: SocketAddr, path: &str) -> Option<(bool, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.starts_with("HTTP/1.1 200"), body.to_owned()))
}

/// Sum of every sample of metric `name` (any labels).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Per-server figures at one point in time.
#[derive(Clone, Default)]
struct Sample {
    cpu: Vec<f64>,
    hwm: Vec<u64>,
    rss: Vec<u64>,
}

fn sample(servers: &[ServerProc]) -> Sample {
    let mut s = Sample::default();
    for p in servers {
        let (cpu, hwm, rss) = proc_usage(p.child.id());
        s.cpu.push(cpu);
        s.hwm.push(hwm);
        s.rss.push(rss);
    }
    s
}

fn mean_max(v: &[f64]) -> (f64, f64) {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, v.iter().copied().fold(0.0, f64::max))
}

// ---------------------------------------------------------------------------------------
// Orchestrator: agents
// ---------------------------------------------------------------------------------------

/// Wall-clock time in ns: comparable across this machine's processes (the agent hosts
/// and the orchestrator).
fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// In an agent host: arrival times of the records being propagated, keyed by record key.
#[derive(Default)]
struct Arrivals {
    pending: Mutex<HashMap<String, Vec<u128>>>,
    /// Whether `pending` holds a key (skips the lock during a full fleet sync).
    active: std::sync::atomic::AtomicBool,
    /// Agents in this host: a key is reported once this many have it.
    agents: usize,
    done: Option<mpsc::UnboundedSender<String>>,
}

impl Arrivals {
    fn record(&self, key: &str) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let now = now_ns();
        if let Some(v) = self.pending.lock().unwrap().get_mut(key) {
            v.push(now);
            if v.len() == self.agents {
                if let Some(done) = &self.done {
                    let _ = done.send(key.to_owned());
                }
            }
        }
    }
}

/// One Watch stream of one agent: reports arrivals until the stream ends.
async fn watch_stream(
    mut stream: tonic::Streaming<v1::WatchEvent>,
    arrivals: Arc<Arrivals>,
    broken: Arc<AtomicUsize>,
) {
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                if let Some(Event::Upsert(u)) = event.event {
                    arrivals.record(&u.key);
                }
            }
            _ => {
                broken.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// An agent host process (`SCALE_ROLE=agents`): the `SCALE_AGENTS` agents of cluster
/// `SCALE_INDEX`, each with one stream per server in `SCALE_TARGETS`
/// (`addr=revision,...`). Prints `ready <broken streams>` once every stream is open; then,
/// per stdin line `expect <key>`, prints `ok`, and `done <key> <ns>...` once every agent
/// has the record (or on `flush <key>`, with what arrived).
async fn agents_main() {
    clustermesh_test_support::limits::raise_nofile(1 << 20);
    let var = |n: &str| std::env::var(n).unwrap();
    let agents: usize = var("SCALE_AGENTS").parse().unwrap();
    let all = var("SCALE_MIRROR") == "1";
    let dir = PathBuf::from(var("SCALE_DIR"));
    let targets: Vec<(SocketAddr, u64)> = var("SCALE_TARGETS")
        .split(',')
        .map(|t| {
            let (a, r) = t.split_once('=').unwrap();
            (a.parse().unwrap(), r.parse().unwrap())
        })
        .collect();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let tls: Arc<dyn TlsSource> = Arc::new(
        MeshTls::from_pem(
            TrustDomain::new(TD).unwrap(),
            &read("bundle.pem"),
            &read("agent.crt"),
            &read("agent.key"),
        )
        .unwrap(),
    );
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let arrivals = Arc::new(Arrivals {
        agents,
        done: Some(done_tx),
        ..Arrivals::default()
    });
    let broken = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(16));
    let mut joins = tokio::task::JoinSet::new();
    for _ in 0..agents {
        for &(addr, rev) in &targets {
            let (tls, gate, arrivals, broken) = (
                Arc::clone(&tls),
                Arc::clone(&gate),
                Arc::clone(&arrivals),
                Arc::clone(&broken),
            );
            joins.spawn(async move {
                let channel = connect(addr, &tls, &gate).await;
                let stream = open_watch(
                    &channel,
                    v1::WatchRequest {
                        kinds: vec![],
                        from_revision: rev,
                        all_clusters: all,
                    },
                )
                .await;
                tokio::spawn(async move {
                    let _channel = channel;
                    watch_stream(stream, arrivals, broken).await;
                });
            });
        }
    }
    while let Some(r) = joins.join_next().await {
        r.unwrap();
    }
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let say = move |line: String| {
        let mut o = out.lock().unwrap();
        writeln!(o, "{line}").unwrap();
        o.flush().unwrap();
    };
    say(format!("ready {}", broken.load(Ordering::Relaxed)));
    let report = |arrivals: &Arrivals, key: &str| -> Option<String> {
        let times = arrivals.pending.lock().unwrap().remove(key)?;
        let mut line = format!("done {key}");
        for t in times {
            let _ = write!(line, " {t}");
        }
        Some(line)
    };
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if cmd_tx.send(line).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    loop {
        tokio::select! {
            Some(key) = done_rx.recv() => {
                if let Some(line) = report(&arrivals, &key) {
                    say(line);
                }
            }
            Some(cmd) = cmd_rx.recv() => {
                let (verb, key) = cmd.split_once(' ').unwrap_or((cmd.as_str(), ""));
                match verb {
                    "expect" => {
                        arrivals.pending.lock().unwrap().insert(key.to_owned(), Vec::new());
                        arrivals.active.store(true, Ordering::Release);
                        say("ok".to_owned());
                    }
                    "flush" => {
                        let line = report(&arrivals, key).unwrap_or_else(|| format!("done {key}"));
                        say(line);
                    }
                    "broken" => say(format!("broken {}", broken.load(Ordering::Relaxed))),
                    _ => {}
                }
            }
        }
    }
}

/// The servers' trust bundle and every cluster's agent TLS.
struct Pki {
    bundle: String,
    agents: Vec<Arc<dyn TlsSource>>,
}

fn trust_bundle(ca: &MeshCa, clusters: usize) -> String {
    let one = TrustBundle::from_pem(ca.cert_pem().as_bytes()).unwrap();
    let mut bundle = TrustBundle::new();
    for c in 0..clusters {
        bundle.merge_as(&one, &cluster_name(c));
    }
    bundle.to_pem()
}

async fn connect(
    addr: SocketAddr,
    tls: &Arc<dyn TlsSource>,
    gate: &Semaphore,
) -> tonic::transport::Channel {
    let endpoint = MeshEndpoint::new(&addr.to_string(), Arc::clone(tls))
        .unwrap()
        .connect_timeout(Duration::from_secs(30));
    let mut attempt = 0;
    loop {
        let permit = gate.acquire().await.unwrap();
        let result = endpoint.connect().await;
        drop(permit);
        match result {
            Ok(channel) => return channel,
            Err(e) => {
                attempt += 1;
                assert!(attempt < 20, "cannot connect to {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
        }
    }
}

/// Opens a Watch; retries a refused call (a server still busy) a few times.
async fn open_watch(
    channel: &tonic::transport::Channel,
    request: v1::WatchRequest,
) -> tonic::Streaming<v1::WatchEvent> {
    let mut attempt = 0;
    loop {
        let mut client = MeshApiClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        match client.watch(request.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(e) => {
                attempt += 1;
                assert!(attempt < 20, "watch refused: {e}");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
        }
    }
}

/// A new agent's full state: until every cluster's services are synced. Returns (time,
/// service records received, clusters whose services were reported synced).
async fn full_sync(
    targets: &[(SocketAddr, bool)],
    tls: &Arc<dyn TlsSource>,
    clusters: usize,
    timeout: Duration,
) -> (Duration, usize, usize) {
    let gate = Arc::new(Semaphore::new(64));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for &(addr, all) in targets {
        let (tls, gate) = (Arc::clone(tls), Arc::clone(&gate));
        tasks.spawn(async move {
            let channel = connect(addr, &tls, &gate).await;
            let stream = open_watch(
                &channel,
                v1::WatchRequest {
                    kinds: vec![],
                    from_revision: 0,
                    all_clusters: all,
                },
            )
            .await;
            let (services, synced, _) = read_full_state(stream, all, clusters).await;
            (services, synced)
        });
    }
    let mut services = 0;
    let mut synced = 0;
    let collect = async {
        while let Some(r) = tasks.join_next().await {
            let (s, n) = r.unwrap();
            services += s;
            synced += n;
        }
    };
    let finished = tokio::time::timeout(timeout, collect).await.is_ok();
    let took = started.elapsed();
    if !finished {
        eprintln!("  new agent: full state incomplete after {timeout:?}");
    }
    (took, services, synced)
}

/// Reads a watch from revision 0 until its full state is complete: `StateComplete`, or
/// the Synced of services of every cluster expected (one without `all_clusters`). A
/// server that serves fewer clusters than asked (no `all_clusters` support) is given up on
/// after 3 s without an event once its first services Synced arrived. Returns (service
/// records, clusters whose services were synced, highest revision seen).
async fn read_full_state(
    mut stream: tonic::Streaming<v1::WatchEvent>,
    all: bool,
    clusters: usize,
) -> (usize, usize, u64) {
    let mut services = 0usize;
    let mut synced: BTreeSet<String> = BTreeSet::new();
    let mut max = 0;
    let want = if all { clusters } else { 1 };
    loop {
        let idle = if synced.is_empty() { 120 } else { 3 };
        let next = tokio::time::timeout(Duration::from_secs(idle), stream.message()).await;
        let Ok(Ok(Some(event))) = next else { break };
        match event.event {
            Some(Event::Upsert(u)) => {
                max = max.max(u.revision);
                if u.kind == v1::Kind::Service as i32 {
                    services += 1;
                }
            }
            Some(Event::Synced(s)) => {
                max = max.max(s.revision);
                if s.kind == v1::Kind::Service as i32 {
                    synced.insert(s.cluster);
                    if synced.len() >= want {
                        break;
                    }
                }
            }
            Some(Event::Complete(c)) => {
                max = max.max(c.revision);
                break;
            }
            _ => {}
        }
    }
    (services, synced.len(), max)
}

/// The revision a resuming watcher of `addr` starts from: that of a full state just read.
async fn current_revision(
    addr: SocketAddr,
    tls: &Arc<dyn TlsSource>,
    all: bool,
    clusters: usize,
) -> u64 {
    let gate = Semaphore::new(1);
    let channel = connect(addr, tls, &gate).await;
    let stream = open_watch(
        &channel,
        v1::WatchRequest {
            kinds: vec![],
            from_revision: 0,
            all_clusters: all,
        },
    )
    .await;
    read_full_state(stream, all, clusters).await.2
}

// ---------------------------------------------------------------------------------------
// One run: one shape, one mode
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Mirror,
    Direct,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Mirror => "mirror",
            Mode::Direct => "direct",
        }
    }
}

struct Config {
    clusters: usize,
    agents: usize,
    services: usize,
    backends: usize,
    updates: usize,
    interval: Duration,
    full_fleet_sync: bool,
}

#[derive(Default)]
struct Report {
    start: Sample,
    mirrored_in: Duration,
    fleet: Sample,
    fleet_in: Duration,
    streams: Vec<f64>,
    updates: Sample,
    end: Sample,
    remote: Vec<Duration>,
    last_remote: Vec<Duration>,
    local: Vec<Duration>,
    missing: usize,
    /// Streams that failed to open (host ready) / ended by the end of the run.
    broken: usize,
    broken_end: usize,
    new_agent: (Duration, usize, usize),
    agents_cpu: f64,
    agents_rss: u64,
}

/// An agent host process and its stdout lines.
struct AgentHost {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
}

impl AgentHost {
    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    async fn next_line_or_none(&mut self, wait: Duration) -> Option<String> {
        tokio::time::timeout(wait, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    async fn next_line(&mut self, wait: Duration) -> String {
        self.next_line_or_none(wait)
            .await
            .expect("agent host: no answer (see agents.log)")
    }
}

#[allow(clippy::too_many_lines)]
async fn run(cfg: &Config, mode: Mode, net: u8, ca: &MeshCa, root: &Path) -> Report {
    let td = TrustDomain::new(TD).unwrap();
    let n = cfg.clusters;
    let dir = root.join(format!("{}-{n}x{}", mode.name(), cfg.agents));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki {
        bundle: trust_bundle(ca, n),
        agents: (0..n)
            .map(|c| -> Arc<dyn TlsSource> {
                let leaf = ca
                    .issue_agent(&cluster_name(c), Validity::from_now(DEFAULT_LEAF_VALIDITY))
                    .unwrap();
                Arc::new(
                    MeshTls::from_pem(
                        td.clone(),
                        trust_bundle(ca, n).as_bytes(),
                        leaf.cert_pem.as_bytes(),
                        leaf.key_pem.as_bytes(),
                    )
                    .unwrap(),
                )
            })
            .collect(),
    };
    let addr = |c: usize, port: u16| -> SocketAddr {
        SocketAddr::from(([127, net, (c / 200) as u8, (c % 200 + 1) as u8], port))
    };
    // Peers file (agent-config format) naming every cluster; each server skips itself.
    let peers = AgentConfig {
        local_cluster: cluster_name(0),
        mode: WatchMode::Mirror,
        trust_domain: TD.to_owned(),
        cert_file: dir.join("unused.crt"),
        key_file: dir.join("unused.key"),
        clusters: (0..n)
            .map(|c| ClusterEntry {
                name: cluster_name(c),
                id: u32::try_from(c + 1).unwrap(),
                endpoints: vec![addr(c, 7000).to_string()],
                ca_file: dir.join("ca.crt"),
            })
            .collect(),
    };
    std::fs::write(dir.join("ca.crt"), ca.cert_pem()).unwrap();
    let mut servers = Vec::new();
    for c in 0..n {
        let sdir = dir.join(cluster_name(c));
        std::fs::create_dir_all(&sdir).unwrap();
        let ip = addr(c, 0).ip();
        let leaf = ca
            .issue_server(
                &cluster_name(c),
                &ServerNames::new(["localhost".to_owned()], [ip]),
                Validity::from_now(DEFAULT_LEAF_VALIDITY),
            )
            .unwrap();
        std::fs::write(sdir.join("server.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(sdir.join("server.key"), &leaf.key_pem).unwrap();
        std::fs::write(sdir.join("bundle.pem"), &pki.bundle).unwrap();
        let mut p = peers.clone();
        p.local_cluster = cluster_name(c);
        std::fs::write(
            sdir.join("peers.yaml"),
            clustermesh_api::yaml::to_string(&p).unwrap(),
        )
        .unwrap();
        let log = std::fs::File::create(sdir.join("server.log")).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("SCALE_ROLE", "server")
            .env("SCALE_INDEX", c.to_string())
            .env("SCALE_CLUSTERS", n.to_string())
            .env("SCALE_SERVICES", cfg.services.to_string())
            .env("SCALE_BACKENDS", cfg.backends.to_string())
            .env("SCALE_LISTEN", addr(c, 7000).to_string())
            .env("SCALE_OPS", addr(c, 7001).to_string())
            .env("SCALE_DIR", &sdir)
            .env("SCALE_MIRROR", if mode == Mode::Mirror { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        servers.push(ServerProc {
            name: cluster_name(c),
            child,
            stdin,
            grpc: addr(c, 7000),
            ops: addr(c, 7001),
        });
    }
    let started = Instant::now();
    // Ready: every server synced its own state (and, mirroring, every peer's).
    for s in &servers {
        loop {
            let ready = http_get(s.ops, "/readyz").await.is_some_and(|(ok, _)| ok);
            let body = http_get(s.ops, "/metrics").await.unwrap_or_default().1;
            let own = metric_sum(&body, "clustermesh_apiserver_records");
            let mirrored = metric_sum(&body, "clustermesh_apiserver_mirror_synced");
            let done = ready
                && own >= cfg.services as f64
                && (mode == Mode::Direct || mirrored >= (n - 1) as f64);
            if done {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "{} not ready after 600 s (records {own}, peers mirrored {mirrored})",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut report = Report {
        mirrored_in: started.elapsed(),
        ..Report::default()
    };
    // Let the last mirrored writes reach the caches.
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.start = sample(&servers);

    // The fleet.
    let all = mode == Mode::Mirror;
    let revisions: Vec<u64> = if cfg.full_fleet_sync {
        vec![0; n]
    } else {
        futures::future::join_all(
            servers
                .iter()
                .enumerate()
                .map(|(c, s)| current_revision(s.grpc, &pki.agents[c], all, n)),
        )
        .await
    };
    // One agent host process per cluster.
    let fleet_started = Instant::now();
    let mut hosts: Vec<AgentHost> = Vec::new();
    for c in 0..n {
        let hdir = dir.join(format!("agents-{}", cluster_name(c)));
        std::fs::create_dir_all(&hdir).unwrap();
        let leaf = ca
            .issue_agent(&cluster_name(c), Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        std::fs::write(hdir.join("agent.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(hdir.join("agent.key"), &leaf.key_pem).unwrap();
        std::fs::write(hdir.join("bundle.pem"), &pki.bundle).unwrap();
        let targets: Vec<String> = if all {
            vec![format!("{}={}", servers[c].grpc, revisions[c])]
        } else {
            servers
                .iter()
                .zip(&revisions)
                .map(|(s, r)| format!("{}={r}", s.grpc))
                .collect()
        };
        let log = std::fs::File::create(hdir.join("agents.log")).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("SCALE_ROLE", "agents")
            .env("SCALE_AGENTS", cfg.agents.to_string())
            .env("SCALE_MIRROR", if all { "1" } else { "0" })
            .env("SCALE_DIR", &hdir)
            .env("SCALE_TARGETS", targets.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        hosts.push(AgentHost {
            child,
            stdin,
            lines,
        });
    }
    for h in &mut hosts {
        let line = h.next_line(Duration::from_secs(900)).await;
        let broken: usize = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("agent host: {line}"))
            .parse()
            .unwrap();
        report.broken += broken;
    }
    report.fleet_in = fleet_started.elapsed();
    // Full fleet sync: wait until the servers have sent it (their CPU stops moving).
    if cfg.full_fleet_sync {
        let mut last = sample(&servers).cpu.iter().sum::<f64>();
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = sample(&servers).cpu.iter().sum::<f64>();
            if now - last < 0.2 {
                break;
            }
            last = now;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    report.fleet = sample(&servers);
    for s in &servers {
        let body = http_get(s.ops, "/metrics").await.unwrap_or_default().1;
        report
            .streams
            .push(metric_sum(&body, "clustermesh_apiserver_watchers"));
    }
    let hosts_usage0: Vec<f64> = hosts.iter().map(|h| proc_usage(h.child.id()).0).collect();

    // Propagation.
    for u in 0..cfg.updates {
        let a = u % n;
        let i = (u / n * 97 + 13) % cfg.services;
        // The record key the exporter writes for service i of cluster a.
        let key = keys::service_key(
            &cluster_name(a),
            &format!("ns{}", i % 10),
            &format!("svc{i}"),
        );
        for h in &mut hosts {
            h.send(&format!("expect {key}"));
        }
        for h in &mut hosts {
            // Skip a late report of an earlier key.
            while h.next_line(Duration::from_secs(30)).await != "ok" {}
        }
        let t0 = now_ns();
        writeln!(servers[a].stdin, "{i} {}", u % cfg.backends).unwrap();
        servers[a].stdin.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = Duration::ZERO;
        let mut remote = 0;
        for (c, h) in hosts.iter_mut().enumerate() {
            let prefix = format!("done {key}");
            let mut flushed = false;
            let mut until = deadline;
            let line = loop {
                let wait = until.saturating_duration_since(Instant::now());
                match h
                    .next_line_or_none(wait.max(Duration::from_millis(1)))
                    .await
                {
                    Some(line) if line.split_whitespace().nth(1) == Some(key.as_str()) => {
                        break line;
                    }
                    Some(_) => {}
                    None if !flushed => {
                        h.send(&format!("flush {key}"));
                        flushed = true;
                        until = Instant::now() + Duration::from_secs(10);
                    }
                    None => break prefix.clone(),
                }
            };
            let mut fields = line.split_whitespace().skip(2);
            for t in fields.by_ref() {
                let t: u128 = t.parse().unwrap();
                let d = Duration::from_nanos(u64::try_from(t.saturating_sub(t0)).unwrap());
                if c == a {
                    report.local.push(d);
                } else {
                    remote += 1;
                    last = last.max(d);
                    report.remote.push(d);
                }
            }
        }
        report.missing += ((n - 1) * cfg.agents).saturating_sub(remote);
        report.last_remote.push(last);
        tokio::time::sleep(cfg.interval).await;
    }
    report.updates = sample(&servers);

    // A new agent of cluster 1 (or 0 with one cluster), from scratch.
    let c = 1 % n;
    let targets: Vec<(SocketAddr, bool)> = if all {
        vec![(servers[c].grpc, true)]
    } else {
        servers.iter().map(|s| (s.grpc, false)).collect()
    };
    report.new_agent = full_sync(&targets, &pki.agents[c], n, Duration::from_secs(60)).await;
    report.end = sample(&servers);
    for (h, cpu0) in hosts.iter_mut().zip(hosts_usage0) {
        let (cpu, _, rss) = proc_usage(h.child.id());
        report.agents_cpu += cpu - cpu0;
        report.agents_rss += rss;
        h.send("broken");
        if let Some(b) = h.next_line_or_none(Duration::from_secs(10)).await {
            report.broken_end += b
                .strip_prefix("broken ")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    for mut h in hosts {
        let _ = h.child.kill();
        let _ = h.child.wait();
    }
    for mut s in servers {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    report
}

fn print_reports(cfg: &Config, reports: &[(Mode, Report)]) {
    let n = cfg.clusters;
    println!(
        "\n### {n} clusters × {} agents, {} services × {} backends per cluster{}\n",
        cfg.agents,
        cfg.services,
        cfg.backends,
        if cfg.full_fleet_sync {
            ", fleet from revision 0"
        } else {
            ", fleet resuming"
        }
    );
    let mut header = String::from("| measure |");
    let mut rule = String::from("|---|");
    for (mode, _) in reports {
        let _ = write!(header, " {} |", mode.name());
        rule.push_str("---:|");
    }
    if reports.len() == 2 {
        header.push_str(" mirror/direct |");
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");
    let row = |label: &str, f: &dyn Fn(&Report) -> (String, f64)| {
        let mut line = format!("| {label} |");
        let mut values = Vec::new();
        for (_, r) in reports {
            let (text, v) = f(r);
            let _ = write!(line, " {text} |");
            values.push(v);
        }
        if values.len() == 2 {
            if values[1] > 0.0 {
                let _ = write!(line, " {:.2} |", values[0] / values[1]);
            } else {
                line.push_str(" – |");
            }
        }
        println!("{line}");
    };
    let delta = |a: &Sample, b: &Sample| -> Vec<f64> {
        a.cpu.iter().zip(&b.cpu).map(|(x, y)| y - x).collect()
    };
    row(
        "servers up (own state; mirror: every peer mirrored)",
        &|r| {
            (
                format!("{:.1} s", r.mirrored_in.as_secs_f64()),
                r.mirrored_in.as_secs_f64(),
            )
        },
    );
    row("CPU per server, start-up (+ mirroring), mean / max", &|r| {
        let (m, x) = mean_max(&r.start.cpu);
        (format!("{m:.2} / {x:.2} s"), m)
    });
    row("fleet connected (all streams open)", &|r| {
        (
            format!("{:.1} s", r.fleet_in.as_secs_f64()),
            r.fleet_in.as_secs_f64(),
        )
    });
    row("CPU per server, fleet connect, mean / max", &|r| {
        let (m, x) = mean_max(&delta(&r.start, &r.fleet));
        (format!("{m:.2} / {x:.2} s"), m)
    });
    row("streams per server (watchers gauge), mean / max", &|r| {
        let (m, x) = mean_max(&r.streams);
        (format!("{m:.0} / {x:.0}"), m)
    });
    row(
        &format!("CPU per server, {} updates, mean / max", cfg.updates),
        &|r| {
            let (m, x) = mean_max(&delta(&r.fleet, &r.updates));
            (format!("{m:.2} / {x:.2} s"), m)
        },
    );
    row("CPU per server, whole run, mean / max", &|r| {
        let (m, x) = mean_max(&r.end.cpu);
        (format!("{m:.1} / {x:.1} s"), m)
    });
    row("peak RSS per server (VmHWM), mean / max", &|r| {
        let v: Vec<f64> = r.end.hwm.iter().map(|&h| h as f64).collect();
        let (m, x) = mean_max(&v);
        (format!("{m:.0} / {x:.0} MiB"), m)
    });
    row("RSS per server after the fleet connected, mean", &|r| {
        let v: Vec<f64> = r.fleet.rss.iter().map(|&h| h as f64).collect();
        let (m, _) = mean_max(&v);
        (format!("{m:.0} MiB"), m)
    });
    row(
        &format!(
            "propagation to every agent of the other {} clusters: p50 / p99 / max",
            n - 1
        ),
        &|r| {
            let mut v = r.remote.clone();
            v.sort();
            let p99 = percentile(&v, 0.99);
            (
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    ms(percentile(&v, 0.5)),
                    ms(p99),
                    ms(v.last().copied().unwrap_or_default())
                ),
                ms(p99),
            )
        },
    );
    row(
        "  per write, until the last remote agent: p50 / p99",
        &|r| {
            let mut v = r.last_remote.clone();
            v.sort();
            let p99 = percentile(&v, 0.99);
            (
                format!("{:.1} / {:.1} ms", ms(percentile(&v, 0.5)), ms(p99)),
                ms(p99),
            )
        },
    );
    row("  same-cluster agents: p50 / p99", &|r| {
        let mut v = r.local.clone();
        v.sort();
        let p99 = percentile(&v, 0.99);
        (
            format!("{:.1} / {:.1} ms", ms(percentile(&v, 0.5)), ms(p99)),
            ms(p99),
        )
    });
    row(
        "  remote deliveries missing after 30 s / streams ended (at fleet ready, at end)",
        &|r| {
            (
                format!("{} / {}, {}", r.missing, r.broken, r.broken_end),
                r.missing as f64,
            )
        },
    );
    row("new agent: every cluster's full state", &|r| {
        let (t, services, synced) = r.new_agent;
        (
            format!(
                "{:.2} s ({services} services, {synced}/{n} clusters synced)",
                t.as_secs_f64()
            ),
            t.as_secs_f64(),
        )
    });
    row(
        "agent hosts (all N processes): CPU during updates + new agent / RSS",
        &|r| {
            (
                format!("{:.1} s / {} MiB", r.agents_cpu, r.agents_rss),
                r.agents_cpu,
            )
        },
    );
}

#[tokio::main]
async fn main() {
    match std::env::var("SCALE_ROLE").as_deref() {
        Ok("server") => return server_main().await,
        Ok("agents") => return agents_main().await,
        _ => {}
    }
    // Cargo runs benches with `--bench`; ignore arguments.
    let nofile = clustermesh_test_support::limits::raise_nofile(1 << 20);
    let shapes: Vec<(usize, usize)> = env_str("SCALE_SHAPES", "8x500,32x100")
        .split(',')
        .filter_map(|s| {
            let (c, a) = s.trim().split_once('x')?;
            Some((c.parse().ok()?, a.parse().ok()?))
        })
        .collect();
    let modes: Vec<Mode> = env_str("SCALE_MODES", "mirror,direct")
        .split(',')
        .filter_map(|m| match m.trim() {
            "mirror" => Some(Mode::Mirror),
            "direct" => Some(Mode::Direct),
            _ => None,
        })
        .collect();
    let root = tempfile::tempdir().unwrap();
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    eprintln!(
        "open-file limit {nofile}; work dir {}",
        root.path().display()
    );
    let mut net = 10u8;
    for (clusters, agents) in shapes {
        let cfg = Config {
            clusters,
            agents,
            services: env_usize("SCALE_SERVICES", 1000),
            backends: env_usize("SCALE_BACKENDS", 2),
            updates: env_usize("SCALE_UPDATES", 64),
            interval: Duration::from_millis(env_usize("SCALE_UPDATE_INTERVAL_MS", 100) as u64),
            full_fleet_sync: env_str("SCALE_FLEET_SYNC", "resume") == "full",
        };
        let mut reports = Vec::new();
        for &mode in &modes {
            eprintln!("== {clusters}x{agents} {}", mode.name());
            let t = Instant::now();
            let r = run(&cfg, mode, net, &ca, root.path()).await;
            net += 1;
            eprintln!("   done in {:.0?}", t.elapsed());
            reports.push((mode, r));
        }
        print_reports(&cfg, &reports);
    }
}
