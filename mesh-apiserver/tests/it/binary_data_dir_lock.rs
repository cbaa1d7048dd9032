//! Two `clustermesh-apiserver` processes on one `--raft-data-dir`: the second (started
//! with the very same command line, as an operator repeating a command would) exits
//! non-zero at once with a one-line error naming the directory and the first one's pid,
//! the first keeps serving, and after the first stops the directory opens again.
//! Loopback addresses only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: helpers outside #[test] fns

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support;
use support::{free_port, http_get, Pki};

/// The same command line every time: same ports, same data directory.
struct Launch {
    tls_dir: PathBuf,
    manifests: PathBuf,
    raft_dir: PathBuf,
    grpc: u16,
    ops: u16,
    raft: u16,
}

impl Launch {
    fn spawn(&self, stderr: &Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
            .args(["--cluster-name", "east", "--cluster-id", "3"])
            .args(["--store", "raft", "--raft-id", "1"])
            .arg("--raft-data-dir")
            .arg(&self.raft_dir)
            .args(["--raft-listen", &format!("127.0.0.1:{}", self.raft)])
            .arg(format!("--source=dir:{}", self.manifests.display()))
            .args(["--listen", &format!("127.0.0.1:{}", self.grpc)])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", self.ops)])
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .args(["--trust-domain", support::TRUST_DOMAIN])
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap()
    }

    async fn wait_ready(&self, child: &mut Child, stderr: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(self.ops, "/readyz").await.map(|(code, _)| code) != Some(200) {
            assert!(Instant::now() < deadline, "not ready within 60s");
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(stderr).unwrap_or_default();
                panic!("apiserver exited with {status}: {log}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn wait_exit(child: &mut Child, within: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sigterm(child: &Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_apiserver_on_the_same_raft_data_dir_exits_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let launch = Launch {
        tls_dir: dir.path().join("tls"),
        manifests: dir.path().join("manifests"),
        raft_dir: dir.path().join("raft"),
        grpc: free_port(),
        ops: free_port(),
        raft: free_port(),
    };
    pki.write_loopback_bundle("east", &launch.tls_dir);
    std::fs::create_dir(&launch.manifests).unwrap();

    let first_log = dir.path().join("first.log");
    let mut first = launch.spawn(&first_log);
    launch.wait_ready(&mut first, &first_log).await;

    // The same command again: refused on the data directory, before any port.
    let second_log = dir.path().join("second.log");
    let mut second = launch.spawn(&second_log);
    let status = wait_exit(&mut second, Duration::from_secs(30), "second apiserver").await;
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert!(
        !status.success(),
        "second apiserver exited with {status}: {log}"
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("clustermesh-apiserver: "))
        .collect();
    assert_eq!(
        errors,
        [format!(
            "clustermesh-apiserver: cannot start the raft replica: another clustermesh-apiserver \
             (pid {}) is using {}; stop it or use another --raft-data-dir",
            first.id(),
            launch.raft_dir.display()
        )],
        "{log}"
    );

    // The first one never noticed.
    assert_eq!(
        http_get(launch.ops, "/readyz").await.map(|(code, _)| code),
        Some(200)
    );
    assert!(first.try_wait().unwrap().is_none());

    // Once it has stopped, the same command starts fine on the same directory.
    sigterm(&first);
    let status = wait_exit(&mut first, Duration::from_secs(20), "first apiserver").await;
    assert!(
        status.success(),
        "first apiserver exited with {status}: {}",
        std::fs::read_to_string(&first_log).unwrap_or_default()
    );
    let third_log = dir.path().join("third.log");
    let mut third = launch.spawn(&third_log);
    launch.wait_ready(&mut third, &third_log).await;
    sigterm(&third);
    let status = wait_exit(&mut third, Duration::from_secs(20), "third apiserver").await;
    assert!(
        status.success(),
        "third apiserver exited with {status}: {}",
        std::fs::read_to_string(&third_log).unwrap_or_default()
    );
}
