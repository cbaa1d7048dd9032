//! The `dir:PATH` source against a real directory: changes are picked up, a malformed
//! file is skipped while its last good objects are kept.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{DirSource, ObjectKind, Source, SourceEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn node(name: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n")
}

/// Waits for the next scan's Replace of nodes and returns the node names in it.
async fn next_nodes(rx: &mut mpsc::Receiver<SourceEvent>) -> Vec<String> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no source event within 10s")
            .expect("source ended");
        if let SourceEvent::Replace {
            kind: ObjectKind::Node,
            objects,
        } = event
        {
            return objects.iter().map(|o| o.object_ref().name).collect();
        }
    }
}

#[tokio::test]
async fn malformed_file_keeps_its_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    std::fs::write(&a, format!("{}---\n{}", node("n1"), node("n2"))).unwrap();
    // Hidden files and other extensions are ignored.
    std::fs::write(dir.path().join(".hidden.yaml"), node("hidden")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), node("txt")).unwrap();

    let metrics = Arc::new(Metrics::new());
    let source = DirSource::new(dir.path())
        .with_poll_interval(Duration::from_millis(50))
        .with_metrics(Arc::clone(&metrics));
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Box::new(source).run(tx, shutdown.clone()));

    assert_eq!(next_nodes(&mut rx).await, ["n1", "n2"]);
    // The rest of the first scan (Replace for pods), then silence while nothing changes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while rx.try_recv().is_ok() {}
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rx.try_recv().is_err(),
        "an unchanged directory must not produce events"
    );

    // Half-written edit: invalid YAML on line 5. Nothing is replaced.
    std::fs::write(
        &a,
        format!("{}---\nkind: Node\nmetadata: [oops\n", node("n1")),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        rx.try_recv().is_err(),
        "a malformed file must not change the objects"
    );
    assert!(metrics
        .encode()
        .contains("rejected_inputs_total{reason=\"manifest\"} 1"));

    // Another file changes: the bad file still contributes its last good objects.
    std::fs::write(dir.path().join("b.yaml"), node("n3")).unwrap();
    assert_eq!(next_nodes(&mut rx).await, ["n1", "n2", "n3"]);

    // The fix is picked up: n2 is gone now.
    std::fs::write(&a, node("n1")).unwrap();
    assert_eq!(next_nodes(&mut rx).await, ["n1", "n3"]);

    // A removed file removes its objects.
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    assert_eq!(next_nodes(&mut rx).await, ["n1"]);

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn missing_directory_is_an_error_naming_it() {
    let (tx, _rx) = mpsc::channel(1);
    let err = Box::new(DirSource::new("/nonexistent/clustermesh-test"))
        .run(tx, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/clustermesh-test"),
        "{err}"
    );
}
