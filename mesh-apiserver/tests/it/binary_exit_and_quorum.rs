//! The `clustermesh-apiserver` binary under a supervisor's eyes: fatal errors end the
//! process with a non-zero status and one clear line (so systemd's `Restart=on-failure`
//! restarts it), and a raft replica whose peers are down waits for them, not ready, instead
//! of exiting. Loopback addresses only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support;
use clustermesh_certs::issue::{Validity, DEFAULT_LEAF_VALIDITY};
use support::{free_port, http_get, Pki};

/// A TLS directory for cluster `east` under `dir`, with `replica-<n>.crt`/`.key` for
/// replicas 1..=3 next to the bundle's own `replica.crt` (replica 1).
fn tls_dir(dir: &Path) -> PathBuf {
    let pki = Pki::new();
    let names = support::loopback_names();
    let tls = dir.join("tls");
    pki.write_loopback_bundle("east", &tls);
    for n in 1..=3 {
        let leaf = pki
            .ca
            .issue_replica("east", n, &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        std::fs::write(tls.join(format!("replica-{n}.crt")), leaf.cert_pem).unwrap();
        clustermesh_certs::files::write_private_key(
            &tls.join(format!("replica-{n}.key")),
            &leaf.key_pem,
        )
        .unwrap();
    }
    tls
}

/// The binary with the flags every test here shares, logging to `log`.
fn apiserver(tls: &Path, log: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"));
    command
        .args(["--cluster-name", "east", "--cluster-id", "3"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--tls-dir")
        .arg(tls)
        .args(["--trust-domain", support::TRUST_DOMAIN])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    command
}

/// Waits up to `limit` for `child` to exit.
async fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Kills the child on drop, so a failed assertion leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the binary until it exits (at most 60 s) and returns its status and the last line
/// of its standard error.
async fn run_to_exit(mut command: Command, log: &Path) -> (ExitStatus, String) {
    let mut child = Running(command.spawn().unwrap());
    let status = exit_within(&mut child.0, Duration::from_secs(60)).await;
    let text = std::fs::read_to_string(log).unwrap();
    let status = status.unwrap_or_else(|| panic!("still running after 60s:\n{text}"));
    let last = text.lines().last().unwrap_or_default().to_owned();
    (status, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_source_directory_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_dir(dir.path());
    let log = dir.path().join("apiserver.log");
    let mut command = apiserver(&tls, &log);
    command
        .args(["--store", "raft", "--raft-id", "1"])
        .arg("--raft-data-dir")
        .arg(dir.path().join("raft"))
        .args(["--raft-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--source=dir:/nonexistent/clustermesh-manifests");
    let (status, last) = run_to_exit(command, &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "exit status {status}:\n{text}");
    assert!(
        last.starts_with("clustermesh-apiserver: ") && last.contains("/nonexistent"),
        "last line does not name the error: {last:?}\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_client_certificate_without_its_key_or_ca_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_dir(dir.path());
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let cert = tls.join("server.crt");
    let key = tls.join("server.key");
    let ca = tls.join("ca.crt");
    let cases: [(&[(&str, &Path)], &str); 3] = [
        (&[("--etcd-ca", &ca), ("--etcd-cert", &cert)], "--etcd-key"),
        (&[("--etcd-ca", &ca), ("--etcd-key", &key)], "--etcd-cert"),
        (&[("--etcd-cert", &cert), ("--etcd-key", &key)], "--etcd-ca"),
    ];
    for (flags, named) in cases {
        let log = dir.path().join("apiserver.log");
        let mut command = apiserver(&tls, &log);
        command
            .args(["--store", "etcd"])
            // Nothing listens there: a configuration that got this far would retry.
            .args([
                "--etcd-endpoints",
                &format!("https://127.0.0.1:{}", free_port()),
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .arg(format!("--source=dir:{}", manifests.display()));
        for (flag, path) in flags {
            command.arg(flag).arg(path);
        }
        let started = Instant::now();
        let (status, last) = run_to_exit(command, &log).await;
        assert!(!status.success(), "{flags:?}: exit status {status}");
        assert!(
            last.starts_with("clustermesh-apiserver: ") && last.contains(named),
            "{flags:?}: the error does not name {named}: {last:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{flags:?}: refused only after {:?}",
            started.elapsed()
        );
    }
}

/// Replica `id` of a three-replica cluster east, with its own data directory under `dir`.
fn replica(dir: &Path, tls: &Path, id: u64, raft: &[u16; 3], ops: u16) -> Command {
    let log = dir.join(format!("replica-{id}.log"));
    let manifests = dir.join("manifests");
    let mut command = apiserver(tls, &log);
    command
        .args(["--store", "raft", "--raft-id", &id.to_string()])
        .arg("--replica-cert")
        .arg(tls.join(format!("replica-{id}.crt")))
        .arg("--replica-key")
        .arg(tls.join(format!("replica-{id}.key")))
        .arg("--raft-data-dir")
        .arg(dir.join(format!("raft-{id}")))
        .args([
            "--raft-listen",
            &format!("127.0.0.1:{}", raft[usize::try_from(id - 1).unwrap()]),
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{ops}")])
        .arg(format!("--source=dir:{}", manifests.display()))
        .args(["--dir-poll-interval", "200ms"])
        .env("RUST_LOG", "info");
    for (i, port) in raft.iter().enumerate() {
        command.args(["--raft-peer", &format!("{}=127.0.0.1:{port}", i + 1)]);
    }
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_quorum_waits_not_ready_then_serves() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_dir(dir.path());
    std::fs::create_dir(dir.path().join("manifests")).unwrap();
    let raft = [free_port(), free_port(), free_port()];
    let ops = [free_port(), free_port(), free_port()];
    let log = |id: u64| {
        std::fs::read_to_string(dir.path().join(format!("replica-{id}.log"))).unwrap_or_default()
    };

    let mut first = Running(replica(dir.path(), &tls, 1, &raft, ops[0]).spawn().unwrap());
    // Before, the replica gave up after about 15 s ("no raft leader confirmed a read
    // within 10s"); 20 s alone must leave it running and reporting why it is not ready.
    let alone_until = Instant::now() + Duration::from_secs(20);
    let mut reason = None;
    while Instant::now() < alone_until {
        if let Some(status) = first.0.try_wait().unwrap() {
            panic!(
                "replica 1 exited with {status} while waiting for its peers:\n{}",
                log(1)
            );
        }
        if let Some((code, body)) = http_get(ops[0], "/readyz").await {
            assert_eq!(code, 503, "ready without a quorum: {body}");
            reason = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reason = reason.expect("/readyz never answered while waiting");
    assert!(
        reason.contains("waiting for the store"),
        "/readyz does not say why: {reason:?}"
    );

    // No ERROR lines while waiting (openraft logged one per peer and election round, a
    // few a second, from the failed vote requests).
    let errors: Vec<String> = log(1)
        .lines()
        .filter(|l| l.contains("ERROR"))
        .map(str::to_owned)
        .collect();
    assert!(
        errors.is_empty(),
        "{} ERROR lines in 20s alone:\n{}",
        errors.len(),
        errors.join("\n")
    );

    let _second = Running(replica(dir.path(), &tls, 2, &raft, ops[1]).spawn().unwrap());
    let _third = Running(replica(dir.path(), &tls, 3, &raft, ops[2]).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((200, _)) = http_get(ops[0], "/readyz").await {
            break;
        }
        if let Some(status) = first.0.try_wait().unwrap() {
            panic!("replica 1 exited with {status}:\n{}", log(1));
        }
        assert!(
            Instant::now() < deadline,
            "replica 1 not ready within 90s of its peers starting:\n{}",
            log(1)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
