//! Export filtering, checked on the peer's side over real mTLS: a service that is not
//! global, a global service that is not shared, their backends' pods and pods the
//! `--export-pods` rule does not select never reach another cluster (its mesh API server
//! or its agents), across changes and resumed watches, while this cluster's own agents
//! keep seeing everything.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_api::keys::{self, Kind};
use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_api::v1::watch_event::Event;
use clustermesh_api::v1::{self, WatchRequest};
use clustermesh_apiserver::peer_view::PodExport;
use clustermesh_certs::TlsSource;
use clustermesh_store::Store;
use prost::Message;
use tonic::transport::Channel;

use crate::support::{next_event, Backend, Pki, ServerSetup, TestServer, TestStore};

const C: &str = "east";

async fn put(store: &Arc<dyn Store>, key: &str, value: Vec<u8>) -> u64 {
    store.put(key.as_bytes(), value, None).await.unwrap()
}

fn service(name: &str, global: bool, shared: bool, backend: &str) -> Vec<u8> {
    v1::Service {
        namespace: "shop".into(),
        name: name.into(),
        cluster: C.into(),
        frontends: vec!["10.96.0.10".into()],
        global,
        shared,
        backends: vec![v1::Backend {
            ip: backend.into(),
            ready: true,
            serving: true,
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

fn service_key(name: &str) -> String {
    keys::service_key(C, "shop", name)
}

fn endpoint_key(ip: &str) -> String {
    keys::endpoint_key(C, ip.parse().unwrap())
}

fn identity_key(id: u32) -> String {
    keys::identity_key(C, id)
}

/// One pod: its identity (labels `app=<app>`) and its endpoint.
async fn pod(store: &Arc<dyn Store>, ip: &str, id: u32, app: &str) {
    let identity = v1::Identity {
        id,
        labels: [
            ("app".to_owned(), app.to_owned()),
            ("io.kubernetes.pod.namespace".to_owned(), "shop".to_owned()),
        ]
        .into_iter()
        .collect(),
    };
    put(store, &identity_key(id), identity.encode_to_vec()).await;
    let endpoint = v1::Endpoint {
        ip: ip.into(),
        identity: id,
        cluster: C.into(),
        namespace: "shop".into(),
        pod: format!("{app}-0"),
        ..Default::default()
    };
    put(store, &endpoint_key(ip), endpoint.encode_to_vec()).await;
}

/// Three services with one pod each, plus a pod that backs nothing:
/// `local` (not global, 10.1.0.1, id 101), `unshared` (global, not shared, 10.1.0.2,
/// id 102), `web` (global and shared, 10.1.0.3, id 103), `lonely` (10.1.0.4, id 104).
async fn cluster_state() -> TestStore {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = &ts.store;
    pod(store, "10.1.0.1", 101, "local").await;
    pod(store, "10.1.0.2", 102, "unshared").await;
    pod(store, "10.1.0.3", 103, "web").await;
    pod(store, "10.1.0.4", 104, "lonely").await;
    put(
        store,
        &service_key("local"),
        service("local", false, false, "10.1.0.1"),
    )
    .await;
    put(
        store,
        &service_key("unshared"),
        service("unshared", true, false, "10.1.0.2"),
    )
    .await;
    put(
        store,
        &service_key("web"),
        service("web", true, true, "10.1.0.3"),
    )
    .await;
    for kind in [Kind::Identity, Kind::Endpoint, Kind::Service] {
        put(
            store,
            &keys::synced_key(C, kind),
            v1::SyncedMarker { revision: 0 }.encode_to_vec(),
        )
        .await;
    }
    ts
}

fn watch_all(from_revision: u64) -> WatchRequest {
    WatchRequest {
        kinds: [
            v1::Kind::Identity,
            v1::Kind::Endpoint,
            v1::Kind::Service,
            v1::Kind::Node,
        ]
        .into_iter()
        .map(Into::into)
        .collect(),
        from_revision,
        all_clusters: false,
    }
}

/// What a watcher holds: keys it was sent (upserts add, deletes remove; nodes, used as
/// barriers, are left out), and the highest revision seen.
#[derive(Debug, Default)]
struct View {
    keys: BTreeSet<String>,
    revision: u64,
    log: Vec<String>,
}

impl View {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::Upsert(u) => {
                if !u.key.starts_with(&Kind::Node.prefix()) {
                    self.keys.insert(u.key.clone());
                }
                self.revision = self.revision.max(u.revision);
                self.log.push(format!("upsert {}", u.key));
            }
            Event::Delete(d) => {
                self.keys.remove(&d.key);
                self.revision = self.revision.max(d.revision);
                self.log.push(format!("delete {}", d.key));
            }
            Event::Synced(s) => {
                self.revision = self.revision.max(s.revision);
            }
            Event::Reset(r) => {
                self.keys.clear();
                self.log.push(format!("reset {}", r.reason));
            }
            Event::Complete(c) => panic!("StateComplete sent to a peer watch: {c:?}"),
        }
    }
}

/// Reads the initial state (up to the third Synced).
async fn initial(stream: &mut tonic::Streaming<v1::WatchEvent>, view: &mut View) {
    let mut synced = 0;
    while synced < 3 {
        let event = next_event(stream).await;
        synced += usize::from(matches!(event, Event::Synced(_)));
        view.apply(&event);
    }
}

/// Writes a node (visible to everyone) as a barrier and reads until it arrives, so every
/// event caused by earlier writes has been received.
async fn until_barrier(
    store: &Arc<dyn Store>,
    stream: &mut tonic::Streaming<v1::WatchEvent>,
    view: &mut View,
    name: &str,
) {
    let key = keys::node_key(C, name);
    put(
        store,
        &key,
        v1::Node {
            name: name.into(),
            cluster: C.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;
    loop {
        let event = next_event(stream).await;
        view.apply(&event);
        if matches!(&event, Event::Upsert(u) if u.key == key) {
            return;
        }
    }
}

fn set(keys: &[String]) -> BTreeSet<String> {
    keys.iter().cloned().collect()
}

fn everything() -> BTreeSet<String> {
    let mut all = set(&[
        service_key("local"),
        service_key("unshared"),
        service_key("web"),
    ]);
    for (ip, id) in [
        ("10.1.0.1", 101),
        ("10.1.0.2", 102),
        ("10.1.0.3", 103),
        ("10.1.0.4", 104),
    ] {
        all.insert(endpoint_key(ip));
        all.insert(identity_key(id));
    }
    all
}

fn peers(pki: &Pki) -> [(&'static str, Arc<dyn TlsSource>); 2] {
    [
        ("west server", pki.peer_server("west")),
        ("west agent", pki.cluster_client("west")),
    ]
}

async fn start(pods: PodExport) -> (TestStore, Pki, TestServer) {
    let ts = cluster_state().await;
    let pki = Pki::new();
    let mut setup = ServerSetup::new(C);
    setup.export_pods = pods;
    let server = TestServer::start(Arc::clone(&ts.store), &pki, setup).await;
    (ts, pki, server)
}

async fn open(
    client: &mut MeshApiClient<Channel>,
    from_revision: u64,
) -> tonic::Streaming<v1::WatchEvent> {
    client
        .watch(watch_all(from_revision))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_get_only_exported_services_and_the_pods_backing_them() {
    let (ts, pki, server) = start(PodExport::Services).await;
    let exported = set(&[
        service_key("web"),
        endpoint_key("10.1.0.3"),
        identity_key(103),
    ]);

    let mut own = server.client(pki.cluster_client(C)).await;
    let mut own_stream = open(&mut own, 0).await;
    let mut own_view = View::default();
    initial(&mut own_stream, &mut own_view).await;
    assert_eq!(
        own_view.keys,
        everything(),
        "own agents get the full local state"
    );

    let mut watchers = Vec::new();
    for (who, tls) in peers(&pki) {
        let mut client = server.client(tls).await;
        let mut stream = open(&mut client, 0).await;
        let mut view = View::default();
        initial(&mut stream, &mut view).await;
        assert_eq!(view.keys, exported, "{who}: {:?}", view.log);
        watchers.push((who, client, stream, view));
    }

    // web turns non-global: peers get deletes of the service, its pod's endpoint and
    // identity; own agents get the update.
    put(
        &ts.store,
        &service_key("web"),
        service("web", false, true, "10.1.0.3"),
    )
    .await;
    for (who, _, stream, view) in &mut watchers {
        until_barrier(
            &ts.store,
            stream,
            view,
            &format!("b1-{who}").replace(' ', "-"),
        )
        .await;
        assert!(view.keys.is_empty(), "{who}: {:?}", view.log);
        for key in &exported {
            assert!(
                view.log.contains(&format!("delete {key}")),
                "{who}: {:?}",
                view.log
            );
        }
    }
    // ... and back: they come back.
    put(
        &ts.store,
        &service_key("web"),
        service("web", true, true, "10.1.0.3"),
    )
    .await;
    for (who, _, stream, view) in &mut watchers {
        until_barrier(
            &ts.store,
            stream,
            view,
            &format!("b2-{who}").replace(' ', "-"),
        )
        .await;
        assert_eq!(view.keys, exported, "{who}: {:?}", view.log);
    }
    // The unshared service gains the pod of web as a backend: nothing changes for peers
    // (its own pod still does not leave); the local service changing is invisible.
    put(
        &ts.store,
        &service_key("unshared"),
        service("unshared", true, false, "10.1.0.3"),
    )
    .await;
    put(
        &ts.store,
        &service_key("local"),
        service("local", false, false, "10.1.0.2"),
    )
    .await;
    for (who, _, stream, view) in &mut watchers {
        let before = view.log.len();
        until_barrier(
            &ts.store,
            stream,
            view,
            &format!("b3-{who}").replace(' ', "-"),
        )
        .await;
        assert_eq!(view.keys, exported, "{who}: {:?}", view.log);
        let nodes = Kind::Node.prefix();
        let sent: Vec<_> = view.log[before..]
            .iter()
            .filter(|l| !l.contains(&nodes))
            .collect();
        assert!(sent.is_empty(), "{who}: only barriers: {sent:?}");
    }
    // A pod no service selects stays home, whatever happens to it.
    pod(&ts.store, "10.1.0.4", 104, "lonelier").await;
    for (who, _, stream, view) in &mut watchers {
        until_barrier(
            &ts.store,
            stream,
            view,
            &format!("b4-{who}").replace(' ', "-"),
        )
        .await;
        assert_eq!(view.keys, exported, "{who}: {:?}", view.log);
    }

    // Own agents saw every change, the non-global services included.
    until_barrier(&ts.store, &mut own_stream, &mut own_view, "b-own").await;
    assert!(own_view
        .log
        .contains(&format!("upsert {}", service_key("local"))));
    assert_eq!(own_view.keys, everything());

    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resuming_peer_learns_what_became_invisible_while_it_was_away() {
    let (ts, pki, server) = start(PodExport::Services).await;
    // Something happens after the server loaded, so peers can resume.
    until_barrier_free(&ts.store, "after-load").await;
    let mut client = server.client(pki.peer_server("west")).await;
    let mut stream = open(&mut client, 0).await;
    let mut view = View::default();
    initial(&mut stream, &mut view).await;
    until_barrier(&ts.store, &mut stream, &mut view, "seen").await;
    let resume_from = view.revision;
    drop(stream);

    // While the peer is away, web stops being shared, and the unshared service becomes
    // shared.
    put(
        &ts.store,
        &service_key("web"),
        service("web", true, false, "10.1.0.3"),
    )
    .await;
    put(
        &ts.store,
        &service_key("unshared"),
        service("unshared", true, true, "10.1.0.2"),
    )
    .await;

    let mut stream = open(&mut client, resume_from).await;
    until_barrier(&ts.store, &mut stream, &mut view, "resumed").await;
    assert!(
        !view.log.iter().any(|l| l.starts_with("reset")),
        "a resume within the history is not a reset: {:?}",
        view.log
    );
    assert_eq!(
        view.keys,
        set(&[
            service_key("unshared"),
            endpoint_key("10.1.0.2"),
            identity_key(102)
        ]),
        "{:?}",
        view.log
    );
    for key in [
        service_key("web"),
        endpoint_key("10.1.0.3"),
        identity_key(103),
    ] {
        assert!(
            view.log.contains(&format!("delete {key}")),
            "{:?}",
            view.log
        );
    }

    // The own agent resuming from the same revision gets the updates, not deletes.
    let mut own = server.client(pki.cluster_client(C)).await;
    let mut own_stream = open(&mut own, resume_from).await;
    let mut own_view = View::default();
    until_barrier(&ts.store, &mut own_stream, &mut own_view, "own-resumed").await;
    assert!(
        own_view
            .log
            .contains(&format!("upsert {}", service_key("web"))),
        "{:?}",
        own_view.log
    );
    assert!(
        !own_view.log.iter().any(|l| l.starts_with("delete")),
        "{:?}",
        own_view.log
    );

    server.stop().await;
    ts.shutdown().await;
}

/// Writes a node nobody reads yet.
async fn until_barrier_free(store: &Arc<dyn Store>, name: &str) {
    put(
        store,
        &keys::node_key(C, name),
        v1::Node {
            name: name.into(),
            cluster: C.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_resuming_from_before_this_process_starts_over() {
    let (ts, pki, server) = start(PodExport::Services).await;
    // The peer was served by an earlier process (perhaps with another export rule) up
    // to the current revision: it cannot resume here, and gets a Reset and the exported
    // state only.
    let revision = server.cache.snapshot_stats().revision;
    let mut client = server.client(pki.peer_server("west")).await;
    let mut stream = open(&mut client, revision).await;
    let Event::Reset(reset) = next_event(&mut stream).await else {
        panic!("expected a reset");
    };
    assert_eq!(reset.reason, "peer-view-unknown");
    let mut view = View::default();
    initial(&mut stream, &mut view).await;
    assert_eq!(
        view.keys,
        set(&[
            service_key("web"),
            endpoint_key("10.1.0.3"),
            identity_key(103)
        ])
    );
    // The cluster's own agents resume as before.
    let mut own = server.client(pki.cluster_client(C)).await;
    let mut own_stream = open(&mut own, revision).await;
    let mut own_view = View::default();
    until_barrier(&ts.store, &mut own_stream, &mut own_view, "own").await;
    assert!(own_view.log.is_empty() || !own_view.log[0].starts_with("reset"));

    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_every_pod_but_only_exported_services_leave() {
    let (ts, pki, server) = start(PodExport::All).await;
    let mut want = everything();
    want.remove(&service_key("local"));
    want.remove(&service_key("unshared"));
    for (who, tls) in peers(&pki) {
        let mut client = server.client(tls).await;
        let mut stream = open(&mut client, 0).await;
        let mut view = View::default();
        initial(&mut stream, &mut view).await;
        assert_eq!(view.keys, want, "{who}");
    }
    // Admins see everything.
    let mut admin = server.client(pki.admin("ops")).await;
    let mut stream = open(&mut admin, 0).await;
    let mut view = View::default();
    initial(&mut stream, &mut view).await;
    assert_eq!(view.keys, everything());
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_exports_only_the_pods_it_selects() {
    let (ts, pki, server) = start("selector=app in (web,lonely)".parse().unwrap()).await;
    let mut client = server.client(pki.peer_server("west")).await;
    let mut stream = open(&mut client, 0).await;
    let mut view = View::default();
    initial(&mut stream, &mut view).await;
    assert_eq!(
        view.keys,
        set(&[
            service_key("web"),
            endpoint_key("10.1.0.3"),
            identity_key(103),
            endpoint_key("10.1.0.4"),
            identity_key(104),
        ]),
        "{:?}",
        view.log
    );
    // The lonely pod changes labels (a new identity) and leaves the selection.
    pod(&ts.store, "10.1.0.4", 105, "other").await;
    until_barrier(&ts.store, &mut stream, &mut view, "relabelled").await;
    assert!(
        !view.keys.contains(&endpoint_key("10.1.0.4")),
        "{:?}",
        view.log
    );
    assert!(!view.keys.contains(&identity_key(105)), "{:?}", view.log);
    server.stop().await;
    ts.shutdown().await;
}
