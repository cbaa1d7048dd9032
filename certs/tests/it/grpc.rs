//! A gRPC round trip (the standard health service) over the tonic glue, with the
//! client's identity visible to the server.
// Test helpers outside #[test] fns unwrap too: a failed setup step is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clustermesh_certs::files::{write_cluster_bundle, ClusterBundle};
use clustermesh_certs::transport::{self, incoming, IncomingConfig, MeshEndpoint};
use clustermesh_certs::{PeerIdentity, ReloadingTls, TlsPaths};
use clustermesh_test_support::certs::*;
use tonic::transport::Server;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

type Seen = Arc<Mutex<Vec<PeerIdentity>>>;

/// Serves the health service on a loopback port; an interceptor records every caller's
/// identity, and when `admin_only` rejects non-admins.
async fn serve_health(
    tls: Arc<clustermesh_certs::MeshTls>,
    admin_only: bool,
) -> (std::net::SocketAddr, Seen, tokio::sync::oneshot::Sender<()>) {
    let (listener, addr) = loopback_listener().await;
    let seen: Seen = Arc::default();
    let recorded = seen.clone();
    let interceptor = move |req: tonic::Request<()>| {
        let peer = transport::require_peer(&req)?.clone();
        recorded.lock().unwrap().push(peer);
        if admin_only {
            transport::require_admin(&req)?;
        }
        Ok(req)
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let conns = incoming(listener, tls, IncomingConfig::default());
    tokio::spawn(async move {
        let _reporter = reporter;
        Server::builder()
            .layer(tonic::service::InterceptorLayer::new(interceptor))
            .add_service(health)
            .serve_with_incoming_shutdown(conns, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
    });
    (addr, seen, stop_tx)
}

async fn check(channel: tonic::transport::Channel) -> Result<ServingStatus, tonic::Status> {
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        HealthClient::new(channel).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("health check hung")?;
    Ok(response.into_inner().status())
}

#[tokio::test]
async fn grpc_round_trip_shows_client_identity_to_server() {
    let ca = ca();
    let (addr, seen, stop) = serve_health(server_tls(&ca, "east"), false).await;
    let channel = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west"))
        .unwrap()
        .expect_peer(PeerIdentity::cluster(td(), "east").unwrap())
        .connect()
        .await
        .unwrap();
    assert_eq!(
        check(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(check(channel).await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![PeerIdentity::agent(td(), "west").unwrap(); 2]
    );
    stop.send(()).unwrap();
}

#[tokio::test]
async fn lazy_channel_connects_on_first_call() {
    let ca = ca();
    let (addr, seen, _stop) = serve_health(server_tls(&ca, "east"), false).await;
    let channel = MeshEndpoint::new(
        &format!("localhost:{}", addr.port()),
        client_tls(&ca, "west"),
    )
    .unwrap()
    .connect_lazy()
    .unwrap();
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(check(channel).await.unwrap(), ServingStatus::Serving);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn admin_only_service_tells_cluster_and_admin_apart() {
    let ca = ca();
    let (addr, seen, _stop) = serve_health(server_tls(&ca, "east"), true).await;
    let cluster = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = check(cluster).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");

    let admin_tls = tls(&shared(&ca), &ca.issue_admin("alice", valid()).unwrap());
    let admin = MeshEndpoint::new(&addr.to_string(), admin_tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(check(admin).await.unwrap(), ServingStatus::Serving);
    let names: Vec<_> = seen.lock().unwrap().iter().map(|p| p.to_string()).collect();
    assert_eq!(
        names,
        [
            "spiffe://clustermesh.local/cluster/west/agent",
            "spiffe://clustermesh.local/admin/alice"
        ]
    );
}

#[tokio::test]
async fn connect_to_server_of_another_ca_fails_with_tls_error() {
    let ca = ca();
    let other = clustermesh_certs::MeshCa::generate(td()).unwrap();
    let (addr, seen, _stop) = serve_health(server_tls(&other, "east"), false).await;
    let err = MeshEndpoint::new(&addr.to_string(), client_tls(&ca, "west"))
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" / ");
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("unknown issuer"),
        "{chain}"
    );
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn established_channel_survives_client_rotation_and_new_channels_use_new_cert() {
    let ca = ca();
    let (addr, seen, _stop) = serve_health(server_tls(&ca, "east"), false).await;
    let dir = tempfile::tempdir().unwrap();
    let issue = |cluster| ClusterBundle::issue(&ca, cluster, &loopback_names(), valid()).unwrap();
    write_cluster_bundle(dir.path(), &issue("west")).unwrap();
    std::fs::write(dir.path().join("ca.crt"), shared(&ca)).unwrap();
    let client = ReloadingTls::load(td(), TlsPaths::client(dir.path())).unwrap();
    let endpoint = MeshEndpoint::new(&addr.to_string(), client.clone()).unwrap();
    let established = endpoint.connect().await.unwrap();
    check(established.clone()).await.unwrap();

    // Rotation re-issues the same identity with a new key; a certificate naming another
    // identity is refused (a process keeps the identity it started with).
    let first = std::fs::read(dir.path().join("client.crt")).unwrap();
    write_cluster_bundle(dir.path(), &issue("west-2")).unwrap();
    std::fs::write(dir.path().join("ca.crt"), shared(&ca)).unwrap();
    let err = client.reload().unwrap_err();
    assert!(err.to_string().contains("this process runs as"), "{err}");
    write_cluster_bundle(dir.path(), &issue("west")).unwrap();
    std::fs::write(dir.path().join("ca.crt"), shared(&ca)).unwrap();
    assert_ne!(std::fs::read(dir.path().join("client.crt")).unwrap(), first);
    assert_eq!(
        client.reload().unwrap(),
        clustermesh_certs::reload::ReloadOutcome::Reloaded
    );
    // Same HTTP/2 connection: still the identity it was made with.
    check(established).await.unwrap();
    // A new channel makes a new connection with the rotated certificate.
    check(endpoint.connect().await.unwrap()).await.unwrap();
    let names: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.name().to_owned())
        .collect();
    assert_eq!(names, ["west", "west", "west"]);
    assert_eq!(client.generation(), 1);
}
