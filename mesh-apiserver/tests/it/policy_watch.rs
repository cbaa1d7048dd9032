//! Policy records never leave their cluster: over real mTLS, with certificates minted the
//! way an attacker (or a misconfigured peer) would hold them, only this cluster's own
//! agents and admins ever receive `Kind::Policy` records.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::sync::Arc;
use std::time::Duration;

use clustermesh_api::keys::{self, Kind, PolicySource};
use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_api::v1::watch_event::Event;
use clustermesh_api::v1::{self, WatchRequest};
use clustermesh_certs::issue::{Validity, DEFAULT_LEAF_VALIDITY};
use clustermesh_certs::transport::MeshEndpoint;
use clustermesh_certs::TlsSource;
use clustermesh_store::Store;
use prost::Message;
use tonic::Code;

use crate::support::{next_event, Backend, Pki, ServerSetup, TestServer, TestStore};

fn node(name: &str) -> Vec<u8> {
    v1::Node {
        name: name.to_owned(),
        cluster: "east".to_owned(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn policy(name: &str) -> Vec<u8> {
    v1::Policy {
        cluster: "east".to_owned(),
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        kind: v1::PolicyKind::NetworkPolicy.into(),
        spec_json: "{}".to_owned(),
    }
    .encode_to_vec()
}

fn policy_key(name: &str) -> String {
    keys::policy_key("east", "shop", PolicySource::NetworkPolicy, name)
}

async fn put(store: &Arc<dyn Store>, key: &str, value: Vec<u8>) -> u64 {
    store.put(key.as_bytes(), value, None).await.unwrap()
}

async fn mark_synced(store: &Arc<dyn Store>, kind: Kind) {
    put(
        store,
        &keys::synced_key("east", kind),
        v1::SyncedMarker { revision: 0 }.encode_to_vec(),
    )
    .await;
}

fn request(kinds: &[v1::Kind]) -> WatchRequest {
    WatchRequest {
        kinds: kinds.iter().map(|k| (*k).into()).collect(),
        from_revision: 0,
        all_clusters: false,
    }
}

/// A store holding one node and one policy of cluster `east`, both synced.
async fn store_with_a_policy() -> TestStore {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    put(&ts.store, &keys::node_key("east", "n1"), node("n1")).await;
    put(&ts.store, &policy_key("allow-db"), policy("allow-db")).await;
    mark_synced(&ts.store, Kind::Node).await;
    mark_synced(&ts.store, Kind::Policy).await;
    ts
}

/// Every event of the initial state, up to and including the last Synced (`synced`
/// Synced events expected).
async fn initial(stream: &mut tonic::Streaming<v1::WatchEvent>, synced: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut seen = 0;
    while seen < synced {
        let event = next_event(stream).await;
        if matches!(event, Event::Synced(_)) {
            seen += 1;
        }
        events.push(event);
    }
    events
}

fn kinds_of(events: &[Event]) -> Vec<(String, v1::Kind)> {
    events
        .iter()
        .map(|e| match e {
            Event::Upsert(u) => ("upsert".to_owned(), u.kind()),
            Event::Delete(d) => ("delete".to_owned(), d.kind()),
            Event::Synced(s) => ("synced".to_owned(), s.kind()),
            Event::Reset(_) => ("reset".to_owned(), v1::Kind::Unspecified),
            Event::Complete(_) => ("complete".to_owned(), v1::Kind::Unspecified),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_agents_and_admins_receive_policies() {
    let ts = store_with_a_policy().await;
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&ts.store), &pki, ServerSetup::new("east")).await;
    for tls in [pki.cluster_client("east"), pki.admin("ops")] {
        let mut client = server.client(tls).await;
        // All kinds: the policy is among them.
        let mut stream = client.watch(request(&[])).await.unwrap().into_inner();
        let events = initial(&mut stream, 2).await;
        assert!(
            kinds_of(&events).contains(&("upsert".to_owned(), v1::Kind::Policy)),
            "{events:?}"
        );
        assert!(kinds_of(&events).contains(&("synced".to_owned(), v1::Kind::Policy)));
        // Policies only, explicitly.
        let mut stream = client
            .watch(request(&[v1::Kind::Policy]))
            .await
            .unwrap()
            .into_inner();
        let Event::Upsert(upsert) = next_event(&mut stream).await else {
            panic!("expected the policy");
        };
        assert_eq!(upsert.key, policy_key("allow-db"));
        assert_eq!(v1::Policy::decode(upsert.value).unwrap().name, "allow-db");
    }
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_asking_for_policies_are_refused_with_the_reason() {
    let ts = store_with_a_policy().await;
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&ts.store), &pki, ServerSetup::new("east")).await;
    // A connected peer's mesh API server (mirroring) and its agents (direct mode).
    let peers: [(&str, Arc<dyn TlsSource>); 2] = [
        ("west server", pki.peer_server("west")),
        ("west agent", pki.cluster_client("west")),
    ];
    for (who, tls) in peers {
        let mut client = server.client(tls).await;
        for kinds in [
            vec![v1::Kind::Policy],
            vec![v1::Kind::Node, v1::Kind::Policy],
        ] {
            let err = client.watch(request(&kinds)).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
            assert!(
                err.message().contains("policies are local to cluster east")
                    && err.message().contains("never to other clusters"),
                "{who}: {}",
                err.message()
            );
        }
    }
    assert!(
        server
            .metrics
            .encode()
            .contains("auth_refusals_total{rpc=\"Watch\",reason=\"policy-not-exported\"} 4"),
        "{}",
        server.metrics.encode()
    );
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_asking_for_every_kind_get_everything_but_policies() {
    let ts = store_with_a_policy().await;
    let store = Arc::clone(&ts.store);
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&store), &pki, ServerSetup::new("east")).await;
    let peers: [(&str, Arc<dyn TlsSource>); 2] = [
        ("west server", pki.peer_server("west")),
        ("west agent", pki.cluster_client("west")),
    ];
    for (who, tls) in peers {
        let mut client = server.client(tls).await;
        let mut stream = client.watch(request(&[])).await.unwrap().into_inner();
        // Initial state: the node and its Synced, no policy and no policy Synced.
        let events = initial(&mut stream, 1).await;
        assert_eq!(
            kinds_of(&events),
            [
                ("upsert".to_owned(), v1::Kind::Node),
                ("synced".to_owned(), v1::Kind::Node)
            ],
            "{who}"
        );
        // Live: a new and a deleted policy are not sent; the node after them is next.
        put(&store, &policy_key("allow-web"), policy("allow-web")).await;
        store
            .delete(policy_key("allow-db").as_bytes())
            .await
            .unwrap();
        put(&store, &keys::node_key("east", "n2"), node("n2")).await;
        let Event::Upsert(next) = next_event(&mut stream).await else {
            panic!("{who}: expected the node upsert");
        };
        assert_eq!(next.key, keys::node_key("east", "n2"), "{who}");
        // Restore for the next peer.
        put(&store, &policy_key("allow-db"), policy("allow-db")).await;
        store
            .delete(policy_key("allow-web").as_bytes())
            .await
            .unwrap();
        store
            .delete(keys::node_key("east", "n2").as_bytes())
            .await
            .unwrap();
    }
    server.stop().await;
    ts.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_ca_minting_our_agent_identity_gets_no_policies() {
    let ts = store_with_a_policy().await;
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&ts.store), &pki, ServerSetup::new("east")).await;
    // West's CA signs `cluster/east/agent`: the identity that may read policies.
    let forged = pki
        .ca_of("west")
        .issue_agent("east", Validity::from_now(DEFAULT_LEAF_VALIDITY))
        .unwrap();
    let endpoint = MeshEndpoint::new(
        &format!("localhost:{}", server.addr.port()),
        pki.tls(&forged),
    )
    .unwrap()
    .connect_timeout(Duration::from_secs(5));
    if let Ok(channel) = endpoint.connect().await {
        let mut client = MeshApiClient::new(channel);
        let result = client.watch(request(&[v1::Kind::Policy])).await;
        assert!(
            result.is_err(),
            "a forged agent certificate was served policies"
        );
    }
    server.stop().await;
    ts.shutdown().await;
}
