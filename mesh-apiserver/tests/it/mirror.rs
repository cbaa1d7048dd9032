//! Peer mirroring over real mTLS: cluster `north`'s mirror watches peer `west`'s mesh API
//! server and keeps west's records in north's store — and refuses what it must (a server
//! that is another cluster, a peer claiming our cluster ID, a peer over the record limit).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_agent_core::watcher::{self, ReconnectBackoff};
use clustermesh_api::keys::{self, Kind};
use clustermesh_api::model::Phase;
use clustermesh_api::v1;
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::mirror::{self, MirrorConfig, MirrorLimits, MirrorStatus};
use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::{MeshCa, ServerNames, TrustDomain, Validity};
use clustermesh_store::Store;
use clustermesh_test_support::mesh::{self as fixture, MeshServer, ServerSpec};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::support::{Backend, TestStore};

const TD: &str = "mesh.test";

fn service(cluster: &str, name: &str) -> v1::Service {
    v1::Service {
        namespace: "default".into(),
        name: name.into(),
        cluster: cluster.into(),
        frontends: vec!["10.97.0.10".into()],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: v1::Protocol::Tcp.into(),
        }],
        backends: vec![v1::Backend {
            ip: "10.1.0.5".into(),
            ports: vec![v1::BackendPort {
                name: "http".into(),
                port: 8080,
                protocol: v1::Protocol::Tcp.into(),
            }],
            ready: true,
            serving: true,
            node: "w1".into(),
            zone: "z1".into(),
            weight: 1,
            ..v1::Backend::default()
        }],
        global: true,
        shared: true,
        ..v1::Service::default()
    }
}

fn endpoint(cluster: &str, ip: &str, identity: u32) -> v1::Endpoint {
    v1::Endpoint {
        ip: ip.into(),
        identity,
        node: "w1".into(),
        namespace: "default".into(),
        pod: format!("pod-{ip}"),
        cluster: cluster.into(),
        ..v1::Endpoint::default()
    }
}

fn identity(id: u32) -> v1::Identity {
    v1::Identity {
        id,
        labels: [
            ("app".to_owned(), "frontend".to_owned()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                "default".to_owned(),
            ),
            ("io.cilium.k8s.policy.cluster".to_owned(), "west".to_owned()),
        ]
        .into_iter()
        .collect(),
    }
}

async fn put(store: &Arc<dyn Store>, key: &str, value: Vec<u8>) {
    store.put(key.as_bytes(), value, None).await.unwrap();
}

/// West's state as an exporter writes it: one service, one identity, two endpoints, then
/// the synced markers.
async fn west_state(store: &Arc<dyn Store>) {
    put(
        store,
        &keys::service_key("west", "default", "web"),
        service("west", "web").encode_to_vec(),
    )
    .await;
    put(
        store,
        &keys::identity_key("west", 65_800),
        identity(65_800).encode_to_vec(),
    )
    .await;
    for ip in ["10.1.0.5", "10.1.0.6"] {
        let addr: IpAddr = ip.parse().unwrap();
        put(
            store,
            &keys::endpoint_key("west", addr),
            endpoint("west", ip, 65_800).encode_to_vec(),
        )
        .await;
    }
    for kind in [Kind::Identity, Kind::Endpoint, Kind::Service, Kind::Node] {
        put(
            store,
            &keys::synced_key("west", kind),
            v1::SyncedMarker { revision: 1 }.encode_to_vec(),
        )
        .await;
    }
}

/// Keys of `cluster` in `store` (records, markers and cluster config).
async fn keys_of(store: &Arc<dyn Store>, cluster: &str) -> BTreeSet<String> {
    let all = store.list(b"mesh/v1/").await.unwrap();
    all.kvs
        .into_iter()
        .filter_map(|kv| String::from_utf8(kv.key).ok())
        .filter(|k| keys::parse_key(k.as_bytes()).is_ok_and(|p| p.cluster() == cluster))
        .collect()
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// North's mirror: its server certificate (`cluster/north`, from the mesh's test CA) and
/// a peer list naming `peers` as (name, id, port).
struct North {
    store: Arc<dyn Store>,
    _ts: TestStore,
    dir: tempfile::TempDir,
    status: MirrorStatus,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn write_peers(dir: &Path, peers: &[(&str, u32, u16)]) {
    fixture::write_agent_config(&dir.join("peers.yaml"), dir, TD, "north", peers);
}

async fn north(ca: &MeshCa, peers: &[(&str, u32, u16)], limits: MirrorLimits) -> North {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    north_on(ts, ca, peers, limits).await
}

/// North's mirror over an existing store.
async fn north_on(
    ts: TestStore,
    ca: &MeshCa,
    peers: &[(&str, u32, u16)],
    limits: MirrorLimits,
) -> North {
    let store = Arc::clone(&ts.store);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    let leaf = ca
        .issue_server(
            "north",
            &ServerNames::default(),
            Validity::from_now(DEFAULT_LEAF_VALIDITY),
        )
        .unwrap();
    std::fs::write(dir.path().join("server.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), &leaf.key_pem).unwrap();
    // The peer list's own cert/key (an agent's) are not used by the mirror.
    std::fs::write(dir.path().join("client.crt"), "").unwrap();
    std::fs::write(dir.path().join("client.key"), "").unwrap();
    write_peers(dir.path(), peers);
    let config = MirrorConfig {
        cluster: "north".into(),
        cluster_id: 2,
        pod_cidrs: vec!["10.2.0.0/16".into()],
        trust_domain: TrustDomain::new(TD).unwrap(),
        peers_file: dir.path().join("peers.yaml"),
        poll: Duration::from_millis(100),
        cert_file: dir.path().join("server.crt"),
        key_file: dir.path().join("server.key"),
        backoff: ReconnectBackoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(300),
        },
        stale_ttl: Some(Duration::from_secs(1)),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        limits,
    };
    let status = MirrorStatus::default();
    let metrics = Arc::new(Metrics::new());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(mirror::run(
        Arc::clone(&store),
        config,
        Arc::clone(&metrics),
        status.clone(),
        cancel.clone(),
    ));
    North {
        store,
        _ts: ts,
        dir,
        status,
        metrics,
        cancel,
        task,
    }
}

impl North {
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn west_server(ca: &MeshCa, cluster: &str, id: u32) -> (MeshServer, TestStore, u16) {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    west_state(&ts.store).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = serve_west(ca, cluster, id, &ts.store, listener).await;
    (server, ts, port)
}

/// A mesh API server for cluster `cluster` (pod CIDR 10.1.0.0/16) over `store`.
async fn serve_west(
    ca: &MeshCa,
    cluster: &str,
    id: u32,
    store: &Arc<dyn Store>,
    listener: tokio::net::TcpListener,
) -> MeshServer {
    MeshServer::start(
        Arc::clone(store),
        ca,
        &ServerSpec {
            trust_domain: TD,
            cluster,
            id,
            pod_cidrs: &["10.1.0.0/16"],
            stream_buffer: 64,
        },
        listener,
    )
    .await
}

fn expected_west_keys() -> BTreeSet<String> {
    let mut k: BTreeSet<String> = [
        keys::service_key("west", "default", "web"),
        keys::identity_key("west", 65_800),
        keys::endpoint_key("west", "10.1.0.5".parse().unwrap()),
        keys::endpoint_key("west", "10.1.0.6".parse().unwrap()),
        keys::cluster_config_key("west"),
    ]
    .into();
    for kind in mirror::MIRRORED_KINDS {
        k.insert(keys::synced_key("west", kind));
    }
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_records_are_mirrored_kept_live_and_dropped_after_the_stale_ttl() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let (server, west, port) = west_server(&ca, "west", 1).await;
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, port)],
        MirrorLimits::default(),
    )
    .await;

    until("west's full state is in north's store", async || {
        keys_of(&n.store, "west").await == expected_west_keys()
    })
    .await;
    // Stored as exported: the same bytes.
    let svc_key = keys::service_key("west", "default", "web");
    let stored = n.store.get(svc_key.as_bytes()).await.unwrap().unwrap();
    assert_eq!(stored.value, service("west", "web").encode_to_vec());
    let config = n
        .store
        .get(keys::cluster_config_key("west").as_bytes())
        .await
        .unwrap()
        .unwrap();
    let config = v1::ClusterConfig::decode(config.value.as_slice()).unwrap();
    assert_eq!((config.name.as_str(), config.id), ("west", 1));
    assert_eq!(config.pod_cidrs, ["10.1.0.0/16"]);
    // Nodes are not mirrored, nor is anything of ours touched.
    assert!(keys_of(&n.store, "north").await.is_empty());
    let peer = n.status.peer("west").unwrap();
    assert!(peer.connected && peer.synced, "{peer:?}");
    assert!(n
        .metrics
        .encode()
        .contains("clustermesh_apiserver_mirror_records{peer=\"west\"} 4"));

    until("the metrics say west is connected", async || {
        n.metrics
            .encode()
            .contains("clustermesh_apiserver_mirror_connected{peer=\"west\"} 1")
    })
    .await;

    // Live changes follow.
    let new_ep = keys::endpoint_key("west", "10.1.0.7".parse().unwrap());
    put(
        &west.store,
        &new_ep,
        endpoint("west", "10.1.0.7", 65_800).encode_to_vec(),
    )
    .await;
    until("a new west endpoint is mirrored", async || {
        keys_of(&n.store, "west").await.contains(&new_ep)
    })
    .await;
    west.store.delete(new_ep.as_bytes()).await.unwrap();
    until("a removed west endpoint leaves north", async || {
        !keys_of(&n.store, "west").await.contains(&new_ep)
    })
    .await;

    // West goes away: its state stays for the stale TTL (1 s), then is dropped.
    server.stop().await;
    until("north notices west is gone", async || {
        n.status.peer("west").is_some_and(|s| !s.connected)
    })
    .await;
    until("the metrics say west is not connected", async || {
        n.metrics
            .encode()
            .contains("clustermesh_apiserver_mirror_connected{peer=\"west\"} 0")
    })
    .await;
    assert_eq!(keys_of(&n.store, "west").await, expected_west_keys());
    until("west's records leave after the stale TTL", async || {
        keys_of(&n.store, "west").await.is_empty()
    })
    .await;
    n.stop().await;
    west.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_removed_from_the_list_is_dropped() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let (server, west, port) = west_server(&ca, "west", 1).await;
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, port)],
        MirrorLimits::default(),
    )
    .await;
    until("west is mirrored", async || {
        keys_of(&n.store, "west").await == expected_west_keys()
    })
    .await;
    // `clustermesh disconnect` rewrites the list without west.
    write_peers(n.dir.path(), &[("north", 2, 1)]);
    until("west is dropped", async || {
        keys_of(&n.store, "west").await.is_empty()
    })
    .await;
    assert!(n
        .metrics
        .encode()
        .contains("clustermesh_apiserver_mirror_synced{peer=\"west\"} 0"));
    server.stop().await;
    n.stop().await;
    west.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_left_in_the_store_by_an_earlier_run_and_no_longer_listed_is_dropped() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    // North's store as a previous run left it: west mirrored (records, markers, config).
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    west_state(&ts.store).await;
    put(
        &ts.store,
        &keys::cluster_config_key("west"),
        v1::ClusterConfig {
            name: "west".into(),
            id: 1,
            ..v1::ClusterConfig::default()
        }
        .encode_to_vec(),
    )
    .await;
    // And north's own records, which the mirror must never touch.
    let own = keys::service_key("north", "default", "api");
    put(&ts.store, &own, service("north", "api").encode_to_vec()).await;
    // West was disconnected while north's server was down.
    let n = north_on(ts, &ca, &[("north", 2, 1)], MirrorLimits::default()).await;
    until("west's leftovers are dropped", async || {
        keys_of(&n.store, "west").await.is_empty()
    })
    .await;
    assert!(keys_of(&n.store, "north").await.contains(&own));
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_another_cluster_is_refused_and_named() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    // The address configured for west serves south.
    let (server, south, port) = west_server(&ca, "south", 3).await;
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, port)],
        MirrorLimits::default(),
    )
    .await;
    until("the mirror refuses the impostor", async || {
        n.status
            .peer("west")
            .is_some_and(|s| s.phase == Phase::Refused)
    })
    .await;
    let why = n.status.peer("west").unwrap().last_error.unwrap();
    assert!(why.contains("south") && why.contains("west"), "{why}");
    assert!(keys_of(&n.store, "west").await.is_empty());
    assert!(keys_of(&n.store, "south").await.is_empty());
    server.stop().await;
    n.stop().await;
    south.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_our_cluster_id_is_refused() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    // West reports ID 2, which is north's.
    let (server, west, port) = west_server(&ca, "west", 2).await;
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 0, port)],
        MirrorLimits::default(),
    )
    .await;
    until("the mirror refuses west", async || {
        n.status
            .peer("west")
            .is_some_and(|s| s.phase == Phase::Refused)
    })
    .await;
    let why = n.status.peer("west").unwrap().last_error.unwrap();
    assert!(
        why.contains("north"),
        "names the cluster holding the ID: {why}"
    );
    assert!(keys_of(&n.store, "west").await.is_empty());
    server.stop().await;
    n.stop().await;
    west.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_full_state_exceeds_the_limit_is_cut_off_and_named() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let (server, west, port) = west_server(&ca, "west", 1).await;
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, port)],
        MirrorLimits {
            max_records_per_peer: 3,
            ..MirrorLimits::default()
        },
    )
    .await;
    until("the oversized state is cut off", async || {
        n.status
            .peer("west")
            .is_some_and(|s| s.phase == Phase::Refused)
    })
    .await;
    let why = n.status.peer("west").unwrap().last_error.unwrap();
    assert!(why.contains("more than 3 records"), "{why}");
    let stored = keys_of(&n.store, "west").await;
    assert!(
        stored
            .iter()
            .all(|k| k == &keys::cluster_config_key("west")),
        "only the cluster config may be written: {stored:?}"
    );
    server.stop().await;
    n.stop().await;
    west.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_refuses_states_and_live_records_past_the_limit() {
    use clustermesh_agent_core::watcher::Update;
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut writer = mirror::Mirror::new(
        Arc::clone(&ts.store),
        "north".into(),
        MirrorLimits {
            max_records_per_peer: 2,
            ..MirrorLimits::default()
        },
        Arc::clone(&metrics),
    );
    let ep = |ip: &str| {
        (
            keys::endpoint_key("west", ip.parse().unwrap()),
            bytes::Bytes::from(endpoint("west", ip, 65_800).encode_to_vec()),
        )
    };
    let three: std::collections::BTreeMap<_, _> = ["10.1.0.5", "10.1.0.6", "10.1.0.7"]
        .into_iter()
        .map(|ip| {
            let (k, v) = ep(ip);
            (k, Some(v))
        })
        .collect();
    writer
        .apply(&Update::RawReplace {
            cluster: "west".into(),
            records: three,
        })
        .await
        .unwrap();
    assert!(keys_of(&ts.store, "west").await.is_empty(), "refused whole");
    let two: std::collections::BTreeMap<_, _> = ["10.1.0.5", "10.1.0.6"]
        .into_iter()
        .map(|ip| {
            let (k, v) = ep(ip);
            (k, Some(v))
        })
        .collect();
    writer
        .apply(&Update::RawReplace {
            cluster: "west".into(),
            records: two,
        })
        .await
        .unwrap();
    assert_eq!(
        keys_of(&ts.store, "west").await.len(),
        2 + 3,
        "2 records + 3 markers"
    );
    let (key, value) = ep("10.1.0.7");
    writer
        .apply(&Update::RawUpsert {
            cluster: "west".into(),
            key: key.clone(),
            value,
        })
        .await
        .unwrap();
    assert!(!keys_of(&ts.store, "west").await.contains(&key));
    // A change of a record already held is not "one more".
    let (key, value) = ep("10.1.0.5");
    writer
        .apply(&Update::RawUpsert {
            cluster: "west".into(),
            key,
            value,
        })
        .await
        .unwrap();
    let text = metrics.encode();
    assert!(
        text.contains(
            "clustermesh_apiserver_mirror_refused_total{peer=\"west\",reason=\"limit\"} 2"
        ),
        "{text}"
    );
    // Updates naming our own cluster are never written.
    let (key, value) = (
        keys::service_key("north", "default", "api"),
        bytes::Bytes::from(service("north", "api").encode_to_vec()),
    );
    writer
        .apply(&Update::RawUpsert {
            cluster: "north".into(),
            key,
            value,
        })
        .await
        .unwrap();
    assert!(keys_of(&ts.store, "north").await.is_empty());
    ts.shutdown().await;
}

/// North's own state as its exporter writes it: its cluster config, one service, the
/// synced markers of every kind.
async fn north_own_state(store: &Arc<dyn Store>) {
    put(
        store,
        &keys::cluster_config_key("north"),
        v1::ClusterConfig {
            name: "north".into(),
            id: 2,
            pod_cidrs: vec!["10.2.0.0/16".into()],
            ..v1::ClusterConfig::default()
        }
        .encode_to_vec(),
    )
    .await;
    put(
        store,
        &keys::service_key("north", "default", "api"),
        service("north", "api").encode_to_vec(),
    )
    .await;
    for kind in Kind::ALL {
        put(
            store,
            &keys::synced_key("north", kind),
            v1::SyncedMarker { revision: 1 }.encode_to_vec(),
        )
        .await;
    }
}

/// North's mesh API server over north's (mirroring) store.
async fn north_server(ca: &MeshCa, store: &Arc<dyn Store>) -> (MeshServer, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = MeshServer::start(
        Arc::clone(store),
        ca,
        &ServerSpec {
            trust_domain: TD,
            cluster: "north",
            id: 2,
            pod_cidrs: &["10.2.0.0/16"],
            stream_buffer: 64,
        },
        listener,
    )
    .await;
    (server, port)
}

/// A raw mesh API client of the server at `port` presenting `leaf`.
async fn raw_client(
    ca: &MeshCa,
    leaf: &clustermesh_certs::IssuedCert,
    port: u16,
) -> v1::mesh_api_client::MeshApiClient<tonic::transport::Channel> {
    let tls: Arc<dyn clustermesh_certs::TlsSource> = Arc::new(
        clustermesh_certs::MeshTls::from_pem(
            TrustDomain::new(TD).unwrap(),
            clustermesh_test_support::certs::shared(ca).as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .unwrap(),
    );
    let channel =
        clustermesh_certs::transport::MeshEndpoint::new(&format!("localhost:{port}"), tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
    v1::mesh_api_client::MeshApiClient::new(channel)
}

/// The next update `pick` accepts (others skipped), within a generous deadline.
async fn next_update<T>(
    rx: &mut tokio::sync::mpsc::Receiver<watcher::Update>,
    what: &str,
    mut pick: impl FnMut(&watcher::Update) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("watcher ended");
        if let Some(found) = pick(&update) {
            return found;
        }
    }
}

/// Mirror mode end to end: north's agent holds one stream, to north's server, and gets
/// west's records through north's mirror, each cluster gated by its own synced markers;
/// live changes of west follow; west dropped by the mirror is dropped by the agent. A
/// peer never gets mirrored records, and may not ask for every cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_get_every_cluster_through_their_own_server() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let (west_srv, west, west_port) = west_server(&ca, "west", 1).await;
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, west_port)],
        MirrorLimits::default(),
    )
    .await;
    north_own_state(&n.store).await;
    let (north_srv, north_port) = north_server(&ca, &n.store).await;

    // North's agent, in mirror mode.
    let agent_dir = tempfile::tempdir().unwrap();
    let agent_cert = ca
        .issue_agent("north", Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap();
    std::fs::write(agent_dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(agent_dir.path().join("agent.crt"), &agent_cert.cert_pem).unwrap();
    std::fs::write(agent_dir.path().join("agent.key"), &agent_cert.key_pem).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let board = watcher::StatusBoard::default();
    let cancel = CancellationToken::new();
    let config = watcher::WatcherConfig {
        entry: clustermesh_api::agent_config::ClusterEntry {
            name: "north".into(),
            id: 2,
            endpoints: vec![format!("localhost:{north_port}")],
            ca_file: agent_dir.path().join("ca.crt"),
        },
        local: true,
        trust_domain: TrustDomain::new(TD).unwrap(),
        cert_file: agent_dir.path().join("agent.crt"),
        key_file: agent_dir.path().join("agent.key"),
        backoff: ReconnectBackoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(300),
        },
        stale_ttl: None,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        raw: false,
        max_records: None,
        all_clusters: true,
    };
    let agent = tokio::spawn(watcher::run(
        config,
        None,
        tx,
        board.clone(),
        Arc::new(watcher::ClusterRegistry::default()),
        Arc::new(clustermesh_agent_core::metrics::Metrics::new()),
        cancel.clone(),
    ));

    // West arrives whole: its cluster info, then one replacement with its service and
    // its identity and endpoints. North's own records arrive too.
    let west_id = next_update(&mut rx, "west's cluster info", |u| match u {
        watcher::Update::ClusterInfo { cluster, id, .. } if cluster == "west" => Some(*id),
        _ => None,
    })
    .await;
    assert_eq!(west_id, 1);
    let (services, inputs) = next_update(&mut rx, "west's full state", |u| match u {
        watcher::Update::Replace {
            cluster,
            services,
            inputs,
        } if cluster == "west" => Some((services.len(), inputs.len())),
        _ => None,
    })
    .await;
    assert_eq!(
        (services, inputs),
        (1, 3),
        "west's service, identity, 2 endpoints"
    );
    until(
        "north and west are synced on the agent's board",
        async || {
            ["north", "west"]
                .iter()
                .all(|c| board.get(c).is_some_and(|s| s.synced))
        },
    )
    .await;
    let west_status = board.get("west").unwrap();
    assert!(
        west_status.endpoint.contains("via north"),
        "{west_status:?}"
    );

    // A live change of west reaches north's agent through the mirror.
    put(
        &west.store,
        &keys::endpoint_key("west", "10.1.0.9".parse().unwrap()),
        endpoint("west", "10.1.0.9", 65_800).encode_to_vec(),
    )
    .await;
    next_update(&mut rx, "west's new endpoint", |u| match u {
        watcher::Update::UpsertInput { cluster, input } if cluster == "west" => {
            format!("{input:?}").contains("10.1.0.9").then_some(())
        }
        _ => None,
    })
    .await;

    // A peer (east's agent, east allowed by default) never gets mirrored records and may
    // not ask for every cluster.
    let east_agent = ca
        .issue_agent("east", Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap();
    let mut peer = raw_client(&ca, &east_agent, north_port).await;
    let refused = peer
        .watch(v1::WatchRequest {
            kinds: vec![],
            from_revision: 0,
            all_clusters: true,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("all_clusters"), "{refused:?}");
    let mut own_view = raw_client(&ca, &agent_cert, north_port).await;
    for (who, client) in [
        ("peer", &mut peer),
        ("own direct-mode agent", &mut own_view),
    ] {
        let mut stream = client
            .watch(v1::WatchRequest {
                kinds: vec![],
                from_revision: 0,
                all_clusters: false,
            })
            .await
            .unwrap()
            .into_inner();
        let mut synced = 0;
        let mut seen = Vec::new();
        while synced < 3 {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .event
                .unwrap();
            match event {
                v1::watch_event::Event::Upsert(u) => seen.push(u.key),
                v1::watch_event::Event::Synced(s) => {
                    assert_eq!(s.cluster, "north", "{who}: {s:?}");
                    synced += 1;
                }
                other => panic!("{who}: unexpected {other:?}"),
            }
        }
        assert!(
            seen.iter()
                .all(|k| keys::parse_key(k.as_bytes()).unwrap().cluster() == "north"),
            "{who} got another cluster's records: {seen:?}"
        );
        assert!(
            seen.contains(&keys::service_key("north", "default", "api")),
            "{who}: {seen:?}"
        );
    }

    // West disconnected: north's mirror drops it, and so does north's agent.
    write_peers(n.dir.path(), &[("north", 2, 1)]);
    next_update(&mut rx, "west dropped", |u| match u {
        watcher::Update::DropCluster { cluster } if cluster == "west" => Some(()),
        _ => None,
    })
    .await;
    until("west leaves the agent's board", async || {
        board.get("west").is_none()
    })
    .await;
    assert!(board.get("north").unwrap().synced);

    cancel.cancel();
    let _ = agent.await;
    north_srv.stop().await;
    west_srv.stop().await;
    n.stop().await;
    west.shutdown().await;
}

/// A peer whose store was restored from an older backup comes back at a lower revision:
/// the mirror resyncs it in full (the server answers the resume with a Reset) and then
/// follows its live writes, whose revisions are below anything seen before, without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_back_at_a_lower_revision_resyncs_without_a_gap() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let (server, west, port) = west_server(&ca, "west", 1).await;
    // Push west's revision well past what the restored store will have.
    for i in 0..40 {
        put(
            &west.store,
            &keys::node_key("west", &format!("n{i}")),
            v1::Node::default().encode_to_vec(),
        )
        .await;
    }
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, port)],
        MirrorLimits::default(),
    )
    .await;
    until("west is mirrored", async || {
        keys_of(&n.store, "west").await == expected_west_keys()
    })
    .await;
    let before = n.status.peer("west").unwrap().revision;

    // West is restored: a new store (revision counting from 1) holding an older state,
    // without endpoint 10.1.0.6 and with 10.1.0.8, served at the same address.
    server.stop().await;
    west.shutdown().await;
    let restored = TestStore::start(Backend::Raft).await.unwrap();
    west_state(&restored.store).await;
    let gone = keys::endpoint_key("west", "10.1.0.6".parse().unwrap());
    restored.store.delete(gone.as_bytes()).await.unwrap();
    let added = keys::endpoint_key("west", "10.1.0.8".parse().unwrap());
    put(
        &restored.store,
        &added,
        endpoint("west", "10.1.0.8", 65_800).encode_to_vec(),
    )
    .await;
    let now = restored.store.current_revision().await.unwrap();
    assert!(
        now < before,
        "the restored store is behind ({now} < {before})"
    );
    let listener = fixture::rebind(([127, 0, 0, 1], port).into()).await;
    let server = serve_west(&ca, "west", 1, &restored.store, listener).await;
    let mut expected = expected_west_keys();
    expected.remove(&gone);
    expected.insert(added.clone());
    until("north holds the restored state", async || {
        keys_of(&n.store, "west").await == expected
    })
    .await;
    // Live writes at revisions below the old ones still arrive.
    let live = keys::endpoint_key("west", "10.1.0.9".parse().unwrap());
    put(
        &restored.store,
        &live,
        endpoint("west", "10.1.0.9", 65_800).encode_to_vec(),
    )
    .await;
    until(
        "a live write of the restored west is mirrored",
        async || keys_of(&n.store, "west").await.contains(&live),
    )
    .await;
    server.stop().await;
    n.stop().await;
    restored.shutdown().await;
}

/// A peer serving a record that belongs to another cluster (here a service whose record
/// names south, under west's key) has that record refused, logged and counted; the rest
/// of its state is mirrored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_record_of_another_cluster_is_refused_and_counted() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let (server, west, port) = west_server(&ca, "west", 1).await;
    let liar = keys::service_key("west", "default", "liar");
    put(&west.store, &liar, service("south", "liar").encode_to_vec()).await;
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, port)],
        MirrorLimits::default(),
    )
    .await;
    until("west's own records are mirrored", async || {
        keys_of(&n.store, "west").await == expected_west_keys()
    })
    .await;
    assert!(!keys_of(&n.store, "west").await.contains(&liar));
    let peer = n.status.peer("west").unwrap();
    assert!(peer.refused_records >= 1, "{peer:?}");
    server.stop().await;
    n.stop().await;
    west.shutdown().await;
}

/// A peer record larger than the value size limit is refused (logged, counted) instead of
/// stalling the writer on a store that would refuse it; the previous value stays, and the
/// rest of the peer is mirrored, in a full state and live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_record_over_the_value_size_limit_is_refused_and_the_rest_mirrored() {
    let ca = MeshCa::generate(TrustDomain::new(TD).unwrap()).unwrap();
    let (server, west, port) = west_server(&ca, "west", 1).await;
    let mut big = service("west", "big");
    let one = big.backends[0].clone();
    big.backends = (0..100)
        .map(|i| v1::Backend {
            ip: format!("10.1.1.{i}"),
            ..one.clone()
        })
        .collect();
    let big_key = keys::service_key("west", "default", "big");
    put(&west.store, &big_key, big.encode_to_vec()).await;
    assert!(big.encode_to_vec().len() > 2_000);
    let n = north(
        &ca,
        &[("north", 2, 1), ("west", 1, port)],
        MirrorLimits {
            max_value_bytes: 2_000,
            ..MirrorLimits::default()
        },
    )
    .await;
    until("west's other records are mirrored", async || {
        keys_of(&n.store, "west").await == expected_west_keys()
    })
    .await;
    assert!(!keys_of(&n.store, "west").await.contains(&big_key));
    // Live: an oversized write is refused too, and the mirror keeps going.
    let big2 = keys::service_key("west", "default", "big2");
    put(&west.store, &big2, big.encode_to_vec()).await;
    let ok = keys::endpoint_key("west", "10.1.0.20".parse().unwrap());
    put(
        &west.store,
        &ok,
        endpoint("west", "10.1.0.20", 65_800).encode_to_vec(),
    )
    .await;
    until("a later record of west still arrives", async || {
        keys_of(&n.store, "west").await.contains(&ok)
    })
    .await;
    assert!(!keys_of(&n.store, "west").await.contains(&big2));
    let text = n.metrics.encode();
    let refused = text
        .lines()
        .find(|l| l.contains("mirror_refused_total") && l.contains("value-size"))
        .unwrap_or_else(|| panic!("no value-size refusal counted:\n{text}"));
    assert!(refused.ends_with(" 2"), "{refused}");
    server.stop().await;
    n.stop().await;
    west.shutdown().await;
}
