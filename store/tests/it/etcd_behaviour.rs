//! Behaviour of the etcd backend beyond the shared suite: connecting while etcd is down,
//! giving up with a clear error, resuming watches across an etcd restart, and TLS with
//! client certificates.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clustermesh_store::{EtcdConfig, EtcdConnectError, EtcdStore, EtcdTls, EventKind, Store};
use clustermesh_test_support as support;
use futures::StreamExt;
use support::etcd::{etcd_binary, free_ports, EtcdServer, ServerTls};

/// Log lines written through `tracing` while a test runs (current-thread runtime only).
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn connect_retries_with_a_log_line_until_etcd_starts() {
    let Some(binary) = etcd_binary() else {
        let _ =
            EtcdServer::start_or_skip("connect_retries_with_a_log_line_until_etcd_starts").await;
        return;
    };
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let (client_port, peer_port) = free_ports();
    let mut server = EtcdServer::prepared(binary, client_port, peer_port);
    let config = EtcdConfig::new([server.client_url()])
        .with_connect_deadline(Duration::from_secs(60))
        .with_backoff(Duration::from_millis(100), Duration::from_millis(400));

    let (store, launched) = tokio::join!(EtcdStore::connect(config), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.launch().await
    });
    launched.expect("etcd starts");
    let store = store.expect("connect succeeds once etcd is up");
    store
        .put(b"k", b"v".to_vec(), None)
        .await
        .expect("put after connect");

    let text = logs.text();
    let expected = format!("etcd at {} not reachable, retrying in", server.client_url());
    assert!(
        text.contains(&expected),
        "no retry log line {expected:?} in:\n{text}"
    );
    assert!(
        text.contains("connected to etcd"),
        "no connected log line in:\n{text}"
    );
}

#[tokio::test]
async fn connect_gives_up_after_the_deadline_with_a_clear_error() {
    let (port, _) = free_ports();
    let endpoint = format!("http://127.0.0.1:{port}");
    let config = EtcdConfig::new([endpoint.clone()])
        .with_connect_deadline(Duration::from_secs(1))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(200));
    let err = EtcdStore::connect(config)
        .await
        .expect_err("nothing listens there");
    match &err {
        EtcdConnectError::Unreachable {
            endpoints,
            attempts,
            ..
        } => {
            assert_eq!(endpoints, &endpoint);
            assert!(
                *attempts >= 2,
                "only {attempts} attempt(s) within the deadline"
            );
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&endpoint) && message.contains("not reachable"),
        "{message}"
    );
}

#[tokio::test]
async fn connect_rejects_a_config_it_cannot_use() {
    let err = EtcdStore::connect(EtcdConfig::new(Vec::<String>::new()))
        .await
        .expect_err("no endpoints");
    assert!(matches!(err, EtcdConnectError::NoEndpoints), "{err:?}");

    let missing = std::env::temp_dir().join("clustermesh-no-such-ca.pem");
    let config = EtcdConfig::new(["https://127.0.0.1:1"]).with_tls(EtcdTls::new(&missing));
    let err = EtcdStore::connect(config)
        .await
        .expect_err("missing CA file");
    assert!(matches!(err, EtcdConnectError::TlsFile { .. }), "{err:?}");
    assert!(
        err.to_string().contains("clustermesh-no-such-ca.pem"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_an_etcd_restart_without_gap_or_duplicate() {
    support::init_tracing();
    let Some(mut server) =
        EtcdServer::start_or_skip("watch_resumes_across_an_etcd_restart_without_gap_or_duplicate")
            .await
    else {
        return;
    };
    let store = EtcdStore::connect(
        server
            .config()
            .with_backoff(Duration::from_millis(100), Duration::from_millis(500)),
    )
    .await
    .expect("connect");
    let r1 = store.put(b"res/a", b"1".to_vec(), None).await.unwrap();
    let mut watch = store.watch(b"res/", r1).await.unwrap();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(
        (first.kv.key.as_slice(), first.revision()),
        (&b"res/a"[..], r1)
    );

    // A reader blocked on the stream while etcd dies and comes back.
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let event = tokio::time::timeout(Duration::from_secs(60), watch.next())
                .await
                .expect("an event within 60 s")
                .expect("stream open")
                .expect("no error");
            seen.push((event.kind, event.kv.key.clone(), event.revision()));
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server
        .launch()
        .await
        .expect("etcd restarts on its data dir");

    let mut written = Vec::new();
    for (key, value) in [("res/b", "2"), ("other/x", "n"), ("res/c", "3")] {
        let rev = loop {
            match store
                .put(key.as_bytes(), value.as_bytes().to_vec(), None)
                .await
            {
                Ok(rev) => break rev,
                Err(e) => {
                    eprintln!("put {key} after restart: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        if key.starts_with("res/") {
            written.push((EventKind::Put, key.as_bytes().to_vec(), rev));
        }
    }
    let rev = store.delete(b"res/a").await.unwrap().unwrap();
    written.push((EventKind::Delete, b"res/a".to_vec(), rev));

    let seen = reader.await.unwrap();
    assert_eq!(seen, written, "events after the restart");
    assert!(seen[0].2 > r1, "revisions continue after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_round_trips() {
    use clustermesh_certs::{MeshCa, TrustDomain, Validity};

    support::init_tracing();
    let Some(binary) = etcd_binary() else {
        let _ = EtcdServer::start_or_skip("tls_with_client_certificates_round_trips").await;
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = MeshCa::generate(TrustDomain::new("test.mesh").unwrap()).unwrap();
    let tls = ServerTls::issue(&ca, dir.path());
    let ca_file = tls.ca_file.clone();
    let client_cert = ca
        .issue_agent("east", Validity::from_now(Duration::from_secs(3600)))
        .unwrap();
    let (client_pem, client_key) = support::certs::write_leaf(dir.path(), "client", &client_cert);

    let (client_port, peer_port) = free_ports();
    let mut server = EtcdServer::prepared(binary, client_port, peer_port).with_tls(tls);
    server.launch().await.expect("etcd with TLS starts");

    let config = EtcdConfig::new([server.client_url()])
        .with_connect_deadline(Duration::from_secs(30))
        .with_tls(EtcdTls::new(&ca_file).with_client_identity(&client_pem, &client_key));
    let store = EtcdStore::connect(config).await.expect("mTLS connect");
    let rev = store.put(b"tls/k", b"v".to_vec(), None).await.unwrap();
    let kv = store.get(b"tls/k").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"v"[..], rev));

    // Without a client certificate etcd refuses the handshake: connect gives up at once,
    // with etcd's alert.
    let config = EtcdConfig::new([server.client_url()]).with_tls(EtcdTls::new(&ca_file));
    let err = EtcdStore::connect(config)
        .await
        .expect_err("no client certificate");
    assert!(
        matches!(&err, EtcdConnectError::TlsRefused { reason, .. }
            if reason.starts_with("received fatal alert")),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_idle_watch_outlives_the_request_timeout() {
    let Some(server) =
        EtcdServer::start_or_skip("an_idle_watch_outlives_the_request_timeout").await
    else {
        return;
    };
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let store = EtcdStore::connect(server.config().with_request_timeout(Duration::from_secs(1)))
        .await
        .expect("connect");
    let mut watch = store.watch(b"idle/", 0).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rev = store.put(b"idle/k", b"v".to_vec(), None).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("event arrives")
        .expect("stream open")
        .expect("no error");
    assert_eq!(event.revision(), rev);
    let text = logs.text();
    assert!(
        !text.contains("resuming"),
        "the watch broke although only the request timeout passed:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resuming_into_compacted_history_ends_with_compacted() {
    support::init_tracing();
    let Some(mut server) =
        EtcdServer::start_or_skip("a_watch_resuming_into_compacted_history_ends_with_compacted")
            .await
    else {
        return;
    };
    // A long first retry delay leaves time to write and compact while the watch is away.
    let store = EtcdStore::connect(
        server
            .config()
            .with_backoff(Duration::from_secs(10), Duration::from_secs(10)),
    )
    .await
    .expect("connect");
    let r1 = store.put(b"gone/a", b"1".to_vec(), None).await.unwrap();
    let mut watch = store.watch(b"gone/", r1).await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap().revision(), r1);

    let reader = tokio::spawn(async move {
        let first = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("an item within 60 s");
        let after = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the stream ends");
        (first, after.is_none())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop();
    server.launch().await.expect("etcd restarts");
    let r2 = loop {
        match store.put(b"gone/b", b"2".to_vec(), None).await {
            Ok(rev) => break rev,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    store.put(b"gone/c", b"3".to_vec(), None).await.unwrap();
    let r3 = store.put(b"gone/d", b"4".to_vec(), None).await.unwrap();
    store.compact(r3).await.unwrap();

    let (first, ended) = reader.await.unwrap();
    match first {
        Some(Err(clustermesh_store::StoreError::Compacted {
            requested,
            compacted,
        })) => {
            assert_eq!(
                requested, r2,
                "the watch wanted the first event it had not seen"
            );
            assert_eq!(compacted, r3);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(ended, "the stream ends after Compacted");
}
