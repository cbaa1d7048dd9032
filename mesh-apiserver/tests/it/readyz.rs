//! What `/readyz` tells an operator: why the server is not ready, in words that do not
//! repeat themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::sync::Arc;

use crate::support;
use clustermesh_apiserver::export::ExportProblems;
use clustermesh_apiserver::http::{self, OpsState, Readiness};
use clustermesh_apiserver::metrics::Metrics;
use support::{Backend, TestStore};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `GET path` on the ops listener at `addr` (loopback); it answers at once.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    support::http_get(addr.port(), path).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_store_problem_once() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let (readiness_tx, readiness) = watch::channel(Readiness::WaitingForStore(None));
    let state = OpsState {
        metrics: Arc::new(Metrics::new()),
        store: Arc::clone(&ts.store),
        readiness,
        problems: ExportProblems::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(http::serve(listener, state, shutdown.clone()));

    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "waiting for the store to answer\n")
    );
    readiness_tx.send_replace(Readiness::WaitingForStore(Some(
        "store unavailable: no raft leader confirmed a read within 10s".to_owned(),
    )));
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert_eq!(
        body,
        "waiting for the store: store unavailable: no raft leader confirmed a read within 10s\n"
    );
    readiness_tx.send_replace(Readiness::Synced);
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(
        get(addr, "/statusz").await,
        (200, "no export problems\n".to_owned())
    );

    // The store goes away: the reason is said once, not "store unavailable: store
    // unavailable: …".
    let store = Arc::clone(&ts.store);
    ts.shutdown().await;
    let error = store.current_revision().await.unwrap_err().to_string();
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert_eq!(body, format!("{error}\n"));
    assert_eq!(
        body.matches("unavailable").count(),
        1,
        "the reason repeats itself: {body:?}"
    );
    drop(store);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
