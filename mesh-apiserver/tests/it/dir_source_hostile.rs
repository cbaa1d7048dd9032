//! Hostile manifests in a `dir:` source do not stall the mesh API server: deeply nested
//! YAML is refused before the parser sees it (naming the file and the limit, counted in
//! `rejected_inputs{reason="manifest_limit"}`), the file's last good objects stay, and
//! `GetClusterInfo` and `Watch` keep being answered meanwhile.
//!
//! The runtime is single-threaded on purpose: the source, the exporter and the gRPC
//! server share one thread, as a parse on the runtime would stall all of them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support;
use clustermesh_api::keys;
use clustermesh_api::v1::{self, WatchRequest};
use clustermesh_apiserver::export::{ExportConfig, Exporter};
use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{DirSource, Source};
use clustermesh_store::Store;
use support::{Backend, Pki, ServerSetup, TestServer, TestStore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Far longer than answering a request takes on a loaded machine, far shorter than the
/// minutes the parser spent on these files without the limits.
const ANSWER_BOUND: Duration = Duration::from_secs(5);

fn global_service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations:\n    service.cilium.io/global: \"true\"\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n    protocol: TCP\n"
    )
}

/// Writes `text` to `dir/name` by write-then-rename.
fn write_manifest(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn service_exists(store: &Arc<dyn Store>, name: &str) -> bool {
    let key = keys::service_key("east", "default", name);
    store.get(key.as_bytes()).await.unwrap().is_some()
}

#[tokio::test]
async fn nested_yaml_is_refused_while_the_server_keeps_answering() {
    let ts = TestStore::start(Backend::Raft).await.unwrap();
    let store = Arc::clone(&ts.store);
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), "web.yaml", &global_service("web"));
    write_manifest(dir.path(), "api.yaml", &global_service("api"));

    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let exporter = Exporter::start(
        Arc::clone(&store),
        ExportConfig::new("east", 1),
        Arc::clone(&metrics),
    )
    .await
    .unwrap();
    let source = DirSource::new(dir.path())
        .with_poll_interval(Duration::from_millis(50))
        .with_metrics(Arc::clone(&metrics));
    let (tx, rx) = mpsc::channel(64);
    let source_task = tokio::spawn(Box::new(source).run(tx, shutdown.clone()));
    let exporter_task = tokio::spawn(exporter.run(rx, shutdown.clone()));
    let pki = Pki::new();
    let server = TestServer::start(Arc::clone(&store), &pki, ServerSetup::new("east")).await;
    let mut client = server.client(pki.cluster_client("west")).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !(service_exists(&store, "web").await && service_exists(&store, "api").await) {
        assert!(Instant::now() < deadline, "services never exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 100,000 nested lists (the 200 KB file that froze the server for 83 s), a deep flow
    // mapping, and a deep block mapping in place of api.yaml's good content.
    let lists = format!("{}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let maps = format!("{}1{}\n", "{a: ".repeat(100_000), "}".repeat(100_000));
    let mut block = global_service("api");
    block.push_str("---\n");
    for level in 0..2_000 {
        block.push_str(&" ".repeat(level));
        block.push_str("a:\n");
    }
    let started = Instant::now();
    write_manifest(dir.path(), "lists.yaml", &lists);
    write_manifest(dir.path(), "maps.yaml", &maps);
    write_manifest(dir.path(), "api.yaml", &block);

    // Served meanwhile: each answer within the bound, until all three files are refused.
    let refused = "rejected_inputs_total{reason=\"manifest_limit\"} 3";
    loop {
        let asked = Instant::now();
        let info = tokio::time::timeout(
            ANSWER_BOUND,
            client.get_cluster_info(v1::GetClusterInfoRequest {}),
        )
        .await
        .expect("GetClusterInfo not answered while hostile manifests were handled")
        .unwrap()
        .into_inner();
        assert_eq!(info.config.unwrap().name, "east");
        assert!(asked.elapsed() < ANSWER_BOUND);
        if metrics.encode().contains(refused) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the hostile files were not refused within 30s: {}",
            metrics.encode()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A new watch is answered, and api's last good objects were kept.
    let mut stream = tokio::time::timeout(
        ANSWER_BOUND,
        client.watch(WatchRequest {
            kinds: vec![],
            from_revision: 0,
            all_clusters: false,
        }),
    )
    .await
    .expect("Watch not answered")
    .unwrap()
    .into_inner();
    let first = support::next_event(&mut stream).await;
    assert!(
        matches!(
            first,
            v1::watch_event::Event::Upsert(_) | v1::watch_event::Event::Synced(_)
        ),
        "{first:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(service_exists(&store, "api").await, "api was deleted");
    assert!(service_exists(&store, "web").await, "web was deleted");

    shutdown.cancel();
    source_task.await.unwrap().unwrap();
    exporter_task.await.unwrap();
    server.stop().await;
}
