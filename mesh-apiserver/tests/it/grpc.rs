//! The mesh API end to end: real store (raft and etcd), real mTLS, real gRPC clients.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::support;
use clustermesh_api::keys::{self, Kind};
use clustermesh_api::v1::watch_event::Event;
use clustermesh_api::v1::{self, WatchRequest};
use clustermesh_apiserver::cache::CacheConfig;
use clustermesh_apiserver::grpc::AccessPolicy;
use clustermesh_certs::issue::{MeshCa, Validity};
use clustermesh_store::Store;
use prost::Message;
use support::{next_event, td, Backend, Pki, ServerSetup, TestServer, TestStore};

fn node(name: &str) -> Vec<u8> {
    v1::Node {
        name: name.to_owned(),
        cluster: "east".to_owned(),
        zone: "z1".to_owned(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn service(name: &str, backends: usize) -> Vec<u8> {
    v1::Service {
        namespace: "default".to_owned(),
        name: name.to_owned(),
        cluster: "east".to_owned(),
        frontends: vec!["10.96.0.1".to_owned()],
        backends: (0..backends)
            .map(|i| v1::Backend {
                ip: format!("10.0.{}.{}", i / 250, i % 250 + 1),
                ready: true,
                serving: true,
                weight: 1,
                ..Default::default()
            })
            .collect(),
        global: true,
        shared: true,
        ..Default::default()
    }
    .encode_to_vec()
}

async fn put(store: &Arc<dyn Store>, key: &str, value: Vec<u8>) -> u64 {
    store.put(key.as_bytes(), value, None).await.unwrap()
}

async fn mark_synced(store: &Arc<dyn Store>, kind: Kind) -> u64 {
    put(
        store,
        &keys::synced_key("east", kind),
        v1::SyncedMarker { revision: 0 }.encode_to_vec(),
    )
    .await
}

fn all_kinds() -> WatchRequest {
    WatchRequest {
        kinds: vec![],
        from_revision: 0,
        all_clusters: false,
    }
}

async fn state_then_live_changes(backend: Backend) {
    let Some(ts) = TestStore::start(backend).await else {
        return;
    };
    let store = Arc::clone(&ts.store);
    put(&store, &keys::node_key("east", "n1"), node("n1")).await;
    put(
        &store,
        &keys::service_key("east", "default", "web"),
        service("web", 2),
    )
    .await;
    // Another cluster's key in the same store is never exported.
    put(&store, &keys::node_key("other", "x"), node("x")).await;
    mark_synced(&store, Kind::Node).await;

    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&store), &pki, ServerSetup::new("east")).await;
    let mut client = server.client(pki.cluster_client("west")).await;

    let info = client
        .get_cluster_info(v1::GetClusterInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let config = info.config.unwrap();
    assert_eq!((config.name.as_str(), config.id), ("east", 1));
    assert_eq!(config.pod_cidrs, ["10.1.0.0/16"]);
    assert_eq!(config.capabilities.unwrap().max_connected_clusters, 255);

    let mut stream = client.watch(all_kinds()).await.unwrap().into_inner();
    // Full state in dependency order (nodes before services), then Synced for nodes only.
    let Event::Upsert(n) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(
        (n.kind(), n.key.as_str()),
        (v1::Kind::Node, "mesh/v1/nodes/east/n1")
    );
    assert_eq!(v1::Node::decode(n.value).unwrap().name, "n1");
    let Event::Upsert(s) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(s.key, "mesh/v1/services/east/default/web");
    assert_eq!(v1::Service::decode(s.value).unwrap().backends.len(), 2);
    let Event::Synced(synced) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(synced.kind(), v1::Kind::Node);

    // Live: an update, a delete, the services marker.
    let rev = put(
        &store,
        &keys::service_key("east", "default", "web"),
        service("web", 3),
    )
    .await;
    let Event::Upsert(s) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(
        (
            s.revision,
            v1::Service::decode(s.value).unwrap().backends.len()
        ),
        (rev, 3)
    );
    let rev = store
        .delete(keys::node_key("east", "n1").as_bytes())
        .await
        .unwrap()
        .unwrap();
    let Event::Delete(d) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(
        (d.kind(), d.key.as_str(), d.revision),
        (v1::Kind::Node, "mesh/v1/nodes/east/n1", rev)
    );
    put(&store, &keys::node_key("other", "y"), node("y")).await;
    mark_synced(&store, Kind::Service).await;
    let Event::Synced(synced) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(synced.kind(), v1::Kind::Service);

    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_state_then_live_changes_on_raft() {
    state_then_live_changes(Backend::Raft).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_state_then_live_changes_on_etcd() {
    state_then_live_changes(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_filters_by_kind() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    put(&store, &keys::node_key("east", "n1"), node("n1")).await;
    put(
        &store,
        &keys::service_key("east", "default", "web"),
        service("web", 1),
    )
    .await;
    mark_synced(&store, Kind::Node).await;
    mark_synced(&store, Kind::Service).await;
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&store), &pki, ServerSetup::new("east")).await;
    let mut client = server.client(pki.cluster_client("west")).await;
    let request = WatchRequest {
        kinds: vec![v1::Kind::Service.into()],
        from_revision: 0,
        all_clusters: false,
    };
    let mut stream = client.watch(request).await.unwrap().into_inner();
    let Event::Upsert(s) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(s.kind(), v1::Kind::Service);
    let Event::Synced(synced) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(synced.kind(), v1::Kind::Service);
    put(&store, &keys::node_key("east", "n2"), node("n2")).await;
    let rev = put(
        &store,
        &keys::service_key("east", "default", "api"),
        service("api", 1),
    )
    .await;
    let Event::Upsert(s) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(
        (s.key.as_str(), s.revision),
        ("mesh/v1/services/east/default/api", rev)
    );

    let bad = WatchRequest {
        kinds: vec![42],
        from_revision: 0,
        all_clusters: false,
    };
    let err = client.watch(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_revision_sends_only_missed_events() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    put(&store, &keys::node_key("east", "n1"), node("n1")).await;
    mark_synced(&store, Kind::Node).await;
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&store), &pki, ServerSetup::new("east")).await;
    let mut client = server.client(pki.cluster_client("west")).await;

    let mut stream = client.watch(all_kinds()).await.unwrap().into_inner();
    let Event::Upsert(_) = next_event(&mut stream).await else {
        panic!()
    };
    let Event::Synced(_) = next_event(&mut stream).await else {
        panic!()
    };
    let seen = put(&store, &keys::node_key("east", "n2"), node("n2")).await;
    let Event::Upsert(u) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(u.revision, seen);
    drop(stream);

    // While disconnected: one update, one delete.
    let r1 = put(&store, &keys::node_key("east", "n3"), node("n3")).await;
    let r2 = store
        .delete(keys::node_key("east", "n1").as_bytes())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut stream = client
        .watch(WatchRequest {
            kinds: vec![],
            from_revision: seen,
            all_clusters: false,
        })
        .await
        .unwrap()
        .into_inner();
    let Event::Upsert(u) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!((u.key.as_str(), u.revision), ("mesh/v1/nodes/east/n3", r1));
    let Event::Delete(d) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!((d.key.as_str(), d.revision), ("mesh/v1/nodes/east/n1", r2));
    // Then live, with no Reset and no replay of the full state.
    let r3 = put(&store, &keys::node_key("east", "n4"), node("n4")).await;
    let Event::Upsert(u) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(u.revision, r3);
    server.stop().await;
    ts.shutdown().await;
}

/// Collects a Reset, the full state and the Synced events that follow it.
async fn expect_reset_then_state(
    stream: &mut tonic::Streaming<v1::WatchEvent>,
    reason: &str,
) -> BTreeSet<String> {
    let Event::Reset(reset) = next_event(stream).await else {
        panic!("expected Reset")
    };
    assert_eq!(reset.reason, reason);
    let mut keys = BTreeSet::new();
    loop {
        match next_event(stream).await {
            Event::Upsert(u) => {
                keys.insert(u.key);
            }
            Event::Synced(s) if s.kind() == v1::Kind::Node => return keys,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_store_compaction_gets_reset_then_full_state() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let old = put(&store, &keys::node_key("east", "n1"), node("n1")).await;
    for i in 2..6 {
        put(&store, &keys::node_key("east", &format!("n{i}")), node("x")).await;
    }
    store
        .delete(keys::node_key("east", "n1").as_bytes())
        .await
        .unwrap();
    mark_synced(&store, Kind::Node).await;
    let now = store.current_revision().await.unwrap();
    store.compact(now).await.unwrap();

    // A server (re)started after the compaction only knows history from its list on.
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&store), &pki, ServerSetup::new("east")).await;
    let mut client = server.client(pki.cluster_client("west")).await;
    let mut stream = client
        .watch(WatchRequest {
            kinds: vec![],
            from_revision: old,
            all_clusters: false,
        })
        .await
        .unwrap()
        .into_inner();
    let keys = expect_reset_then_state(&mut stream, "compacted").await;
    assert_eq!(keys.len(), 4);
    assert!(!keys.contains("mesh/v1/nodes/east/n1"));
    assert!(server
        .metrics
        .encode()
        .contains("watch_resets_total{reason=\"compacted\"} 1"));

    // A revision from the future (another store) is reset too.
    let mut stream = client
        .watch(WatchRequest {
            kinds: vec![],
            from_revision: now + 1000,
            all_clusters: false,
        })
        .await
        .unwrap()
        .into_inner();
    let keys = expect_reset_then_state(&mut stream, "future-revision").await;
    assert_eq!(keys.len(), 4);
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_beyond_the_history_bound_gets_reset() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    mark_synced(&store, Kind::Node).await;
    let pki = Pki::new();
    let mut setup = ServerSetup::new("east");
    setup.cache = CacheConfig {
        history: 4,
        ..CacheConfig::default()
    };
    let server = TestServer::start(Arc::clone(&store), &pki, setup).await;
    let first = put(&store, &keys::node_key("east", "n0"), node("n0")).await;
    let mut last = first;
    for i in 1..10 {
        last = put(&store, &keys::node_key("east", &format!("n{i}")), node("x")).await;
    }
    // Wait for the cache to see the last write.
    for _ in 0..100 {
        if server.cache.snapshot_stats().revision >= last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = server.client(pki.cluster_client("west")).await;
    // Within the history: no reset.
    let mut stream = client
        .watch(WatchRequest {
            kinds: vec![],
            from_revision: last - 2,
            all_clusters: false,
        })
        .await
        .unwrap()
        .into_inner();
    let Event::Upsert(u) = next_event(&mut stream).await else {
        panic!()
    };
    assert_eq!(u.revision, last - 1);
    // Beyond it: Reset, full state.
    let mut stream = client
        .watch(WatchRequest {
            kinds: vec![],
            from_revision: first,
            all_clusters: false,
        })
        .await
        .unwrap()
        .into_inner();
    let keys = expect_reset_then_state(&mut stream, "compacted").await;
    assert_eq!(keys.len(), 10);
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watcher_is_reset_instead_of_buffering() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    mark_synced(&store, Kind::Node).await;
    let pki = Pki::new();
    let mut setup = ServerSetup::new("east");
    setup.cache = CacheConfig {
        watcher_lag: 8,
        ..CacheConfig::default()
    };
    setup.stream_buffer = 1;
    let server = TestServer::start(Arc::clone(&store), &pki, setup).await;
    let mut client = server.client(pki.cluster_client("west")).await;
    let mut stream = client.watch(all_kinds()).await.unwrap().into_inner();
    let Event::Synced(_) = next_event(&mut stream).await else {
        panic!()
    };

    // The client stops reading while 400 large records are written: far more than the
    // HTTP/2 windows, the stream buffer and the 8-event lag bound hold.
    let big = |i: usize| {
        v1::Node {
            name: format!("n{i}"),
            zone: "z".repeat(8 * 1024),
            ..Default::default()
        }
        .encode_to_vec()
    };
    for chunk in (0..400).collect::<Vec<_>>().chunks(40) {
        let writes = chunk.iter().map(|i| {
            let store = Arc::clone(&store);
            let value = big(*i);
            async move {
                store
                    .put(
                        keys::node_key("east", &format!("n{i}")).as_bytes(),
                        value,
                        None,
                    )
                    .await
                    .unwrap()
            }
        });
        futures::future::join_all(writes).await;
    }
    // Reading again: some live events, then a Reset (possibly several while the writes
    // continue), the full state of that moment, and live events up to all 400 records.
    let mut saw_reset = false;
    let mut after_reset = BTreeSet::new();
    while after_reset.len() < 400 {
        match next_event(&mut stream).await {
            Event::Reset(r) => {
                assert_eq!(r.reason, "slow-watcher");
                saw_reset = true;
                after_reset.clear();
            }
            Event::Upsert(u) if saw_reset => {
                after_reset.insert(u.key);
            }
            _ => {}
        }
    }
    assert!(saw_reset);
    assert!(server
        .metrics
        .encode()
        .contains("watch_resets_total{reason=\"slow-watcher\"}"));
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_admin_only_and_reports_watchers() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    put(
        &store,
        &keys::service_key("east", "default", "web"),
        service("web", 1),
    )
    .await;
    mark_synced(&store, Kind::Service).await;
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&store), &pki, ServerSetup::new("east")).await;

    let mut cluster = server.client(pki.cluster_client("west")).await;
    let err = cluster.status(v1::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("admin"), "{}", err.message());

    let mut stream = cluster.watch(all_kinds()).await.unwrap().into_inner();
    let Event::Upsert(_) = next_event(&mut stream).await else {
        panic!()
    };
    let Event::Synced(_) = next_event(&mut stream).await else {
        panic!()
    };

    let mut admin = server.client(pki.admin("ops")).await;
    let status = admin
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.cluster.as_str(), status.cluster_id), ("east", 1));
    let services = status
        .counts
        .iter()
        .find(|c| c.kind() == v1::Kind::Service)
        .unwrap();
    assert_eq!((services.count, services.synced), (1, true));
    assert_eq!(status.watchers.len(), 1);
    assert_eq!(
        status.watchers[0].peer,
        "spiffe://mesh.test/cluster/west/agent"
    );
    assert_eq!(status.watchers[0].events_sent, 2);
    // Admins may watch too.
    let mut stream = admin.watch(all_kinds()).await.unwrap().into_inner();
    let Event::Upsert(_) = next_event(&mut stream).await else {
        panic!()
    };

    assert!(server
        .metrics
        .encode()
        .contains("auth_refusals_total{rpc=\"Status\",reason=\"not-admin\"} 1"));
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_outside_the_allow_list_are_refused() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let pki = Pki::new();
    let mut setup = ServerSetup::new("east");
    setup.policy = AccessPolicy {
        cluster: "east".to_owned(),
        allowed_clusters: Some(["west".to_owned()].into_iter().collect()),
    };
    let server = TestServer::start(Arc::clone(&ts.store), &pki, setup).await;

    let mut north = server.client(pki.cluster_client("north")).await;
    let err = north
        .get_cluster_info(v1::GetClusterInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = north.watch(all_kinds()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("north"), "{}", err.message());

    let mut west = server.client(pki.cluster_client("west")).await;
    west.get_cluster_info(v1::GetClusterInfoRequest {})
        .await
        .unwrap();
    assert!(server
        .metrics
        .encode()
        .contains("auth_refusals_total{rpc=\"Watch\",reason=\"cluster-not-allowed\"} 1"));
    server.stop().await;
    ts.shutdown().await;
}

/// Handshakes with a plain rustls client (trusting our CA, presenting `leaf` or nothing)
/// and tries an HTTP/2 round trip; returns whether the server answered.
async fn raw_round_trip(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    leaf: Option<&clustermesh_certs::IssuedCert>,
) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in clustermesh_certs::pem::parse_certs(ca_pem.as_bytes()).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match leaf {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                clustermesh_certs::pem::parse_certs(leaf.cert_pem.as_bytes()).unwrap(),
                clustermesh_certs::pem::parse_private_key(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let Ok(mut tls) = connector.connect(name, tcp).await else {
        return false;
    };
    // HTTP/2 preface + empty SETTINGS; a live server answers with its SETTINGS frame.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    if tls.write_all(&hello).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 9];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_mesh_certificate_are_refused() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&ts.store), &pki, ServerSetup::new("east")).await;
    let ca_pem = pki.bundle_pem();

    // Control: a valid agent certificate completes the round trip.
    let good = pki
        .ca
        .issue_agent("east", Validity::from_now(Duration::from_secs(3600)))
        .unwrap();
    assert!(
        raw_round_trip(server.addr, &ca_pem, Some(&good)).await,
        "valid client refused"
    );

    assert!(
        !raw_round_trip(server.addr, &ca_pem, None).await,
        "client without certificate served"
    );

    let other_ca = MeshCa::generate(td()).unwrap();
    let foreign = other_ca
        .issue_agent("west", Validity::from_now(Duration::from_secs(3600)))
        .unwrap();
    assert!(
        !raw_round_trip(server.addr, &ca_pem, Some(&foreign)).await,
        "certificate of another CA served"
    );

    let now = SystemTime::now();
    let expired = pki
        .ca
        .issue_agent(
            "east",
            Validity::between(
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            ),
        )
        .unwrap();
    assert!(
        !raw_round_trip(server.addr, &ca_pem, Some(&expired)).await,
        "expired certificate served"
    );

    // The server is unaffected for good clients.
    let mut client = server.client(pki.cluster_client("west")).await;
    client
        .get_cluster_info(v1::GetClusterInfoRequest {})
        .await
        .unwrap();
    server.stop().await;
    ts.shutdown().await;
}
