//! The `dir:PATH` source against a real directory: changes are picked up, a malformed
//! file is skipped while its last good objects are kept, and an edit written in place is
//! held until it is stable, so a file read half-written never deletes services.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clustermesh_apiserver::metrics::Metrics;
use clustermesh_apiserver::source::{DirSource, ObjectKind, Source, SourceEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Writes `text` over `path` by write-then-rename, the documented way to edit.
fn write_renamed(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Sets `path`'s modification time an hour back, as for a file written long before.
fn backdate(path: &Path) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

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

    // Broken edit: invalid YAML on line 5. Nothing is replaced.
    write_renamed(
        &a,
        &format!("{}---\nkind: Node\nmetadata: [oops\n", node("n1")),
    );
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
    write_renamed(&a, &node("n1"));
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

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n  - port: 80\n    name: http\n  - port: 443\n    name: https\n"
    )
}

fn services(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| service(n))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Waits for the next `Replace` of services and returns their names.
async fn next_services(rx: &mut mpsc::Receiver<SourceEvent>) -> Vec<String> {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no source event within 10s")
            .expect("source ended");
        if let SourceEvent::Replace {
            kind: ObjectKind::Service,
            objects,
        } = event
        {
            return objects.iter().map(|o| o.object_ref().name).collect();
        }
    }
}

/// Asserts that no `Replace` of services arrives for `window`.
async fn no_service_change(rx: &mut mpsc::Receiver<SourceEvent>, window: Duration, why: &str) {
    let end = tokio::time::Instant::now() + window;
    while let Ok(event) = tokio::time::timeout_at(end, rx.recv()).await {
        if let Some(SourceEvent::Replace {
            kind: ObjectKind::Service,
            objects,
        }) = event
        {
            let names: Vec<String> = objects.iter().map(|o| o.object_ref().name).collect();
            panic!("{why}: services replaced by {names:?}");
        }
    }
}

/// A source over `dir` polling every 50 ms with the given settle time.
fn start(
    dir: &Path,
    settle: Duration,
) -> (
    mpsc::Receiver<SourceEvent>,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), clustermesh_apiserver::source::SourceError>>,
) {
    let source = DirSource::new(dir)
        .with_poll_interval(Duration::from_millis(50))
        .with_settle_time(settle);
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Box::new(source).run(tx, shutdown.clone()));
    (rx, shutdown, task)
}

/// A file of services s1..s3 is rewritten in place with `truncated`: the services stay
/// until the file has been unchanged for the settle time, then `expected` applies.
async fn truncated_edit_is_held(truncated: &str, expected: &[&str]) {
    let settle = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    std::fs::write(&a, services(&["s1", "s2", "s3"])).unwrap();
    backdate(&a);
    let (mut rx, shutdown, task) = start(dir.path(), settle);
    assert_eq!(next_services(&mut rx).await, ["s1", "s2", "s3"]);

    // In place: same inode, as a writer that truncates and rewrites it leaves it.
    std::fs::write(&a, truncated).unwrap();
    let written = Instant::now();
    no_service_change(
        &mut rx,
        settle / 2,
        "a file read while written in place was applied",
    )
    .await;
    assert_eq!(next_services(&mut rx).await, expected);
    assert!(
        written.elapsed() >= settle,
        "applied {:?} after the write, before the settle time",
        written.elapsed()
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_file_cut_at_an_object_boundary_is_held_until_stable() {
    truncated_edit_is_held(&services(&["s1"]), &["s1"]).await;
}

#[tokio::test]
async fn a_file_cut_mid_object_is_held_until_stable() {
    // s2 cut after its name: still valid YAML and a valid (port-less) Service.
    let full = services(&["s1", "s2", "s3"]);
    let cut = &full[..full.find("  name: s2\n").unwrap() + "  name: s2\n".len()];
    truncated_edit_is_held(cut, &["s1", "s2"]).await;
}

#[tokio::test]
async fn a_file_shrunk_to_empty_is_held_until_stable() {
    truncated_edit_is_held("", &[]).await;
}

#[tokio::test]
async fn write_then_rename_applies_at_once() {
    // So long that a change written in place never applies during the test.
    let settle = Duration::from_secs(3600);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    std::fs::write(&a, services(&["s1", "s2", "s3"])).unwrap();
    backdate(&a);
    let (mut rx, shutdown, task) = start(dir.path(), settle);
    assert_eq!(next_services(&mut rx).await, ["s1", "s2", "s3"]);

    // Renamed into place: services removed on purpose go at once.
    write_renamed(&a, &services(&["s1", "s2"]));
    assert_eq!(next_services(&mut rx).await, ["s1", "s2"]);

    // Written in place: held, the file's last applied services stay...
    std::fs::write(&a, "").unwrap();
    no_service_change(&mut rx, Duration::from_secs(1), "an in-place write applied").await;
    // ...also when another file changes; a new file applies at once.
    std::fs::write(dir.path().join("b.yaml"), service("s4")).unwrap();
    assert_eq!(next_services(&mut rx).await, ["s1", "s2", "s4"]);

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_file_modified_just_before_start_up_is_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    std::fs::write(&a, services(&["s1"])).unwrap();
    let (mut rx, shutdown, task) = start(dir.path(), Duration::from_secs(3600));
    // It may still be being written: nothing is sent, so nothing the store holds from
    // before the restart is deleted.
    if let Ok(event) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        panic!("sent before the file settled: {event:?}");
    }
    // Renamed into place, it is complete.
    write_renamed(&a, &services(&["s1", "s2"]));
    assert_eq!(next_services(&mut rx).await, ["s1", "s2"]);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
