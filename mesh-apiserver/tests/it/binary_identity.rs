//! The `clustermesh-apiserver` binary refuses to run as someone its certificates do not
//! name: another cluster's server certificate, or a replica certificate of another replica
//! or cluster. It exits non-zero with one line naming both identities.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use crate::support;
use clustermesh_certs::files::{write_cluster_bundle, ClusterBundle};
use clustermesh_certs::issue::{ServerNames, Validity, DEFAULT_LEAF_VALIDITY};
use support::{free_port, Pki};

/// Runs the binary as `cluster`/`raft_id` on a bundle issued for `bundle_cluster`; returns
/// (exit success, stderr). The process is killed if it is still running after 30 s.
fn run(cluster: &str, raft_id: u64, bundle_cluster: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let names = ServerNames::new(["localhost".to_owned()], ["127.0.0.1".parse().unwrap()]);
    let bundle = ClusterBundle::issue(
        &pki.ca,
        bundle_cluster,
        &names,
        Validity::from_now(DEFAULT_LEAF_VALIDITY),
    )
    .unwrap();
    let tls_dir = dir.path().join("tls");
    write_cluster_bundle(&tls_dir, &bundle).unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clustermesh-apiserver"))
        .args(["--cluster-name", cluster, "--cluster-id", "3"])
        .args(["--store", "raft", "--raft-id", &raft_id.to_string()])
        .arg("--raft-data-dir")
        .arg(dir.path().join("raft"))
        .args(["--raft-listen", &format!("127.0.0.1:{}", free_port())])
        .arg(format!("--source=dir:{}", manifests.display()))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--tls-dir")
        .arg(&tls_dir)
        .args(["--trust-domain", support::TRUST_DOMAIN])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn another_clusters_server_certificate_is_refused_at_start() {
    let (ok, stderr) = run("west", 1, "east");
    assert!(!ok, "started as west with east's certificates: {stderr}");
    assert!(
        stderr.contains("names spiffe://mesh.test/cluster/east")
            && stderr.contains("this is cluster \"west\""),
        "{stderr}"
    );
}

#[test]
fn a_replica_certificate_of_another_replica_is_refused_at_start() {
    // The bundle's replica certificate is replica 1's; run as replica 2.
    let (ok, stderr) = run("east", 2, "east");
    assert!(
        !ok,
        "started as replica 2 with replica 1's certificate: {stderr}"
    );
    assert!(
        stderr.contains("names spiffe://mesh.test/cluster/east/replica/1")
            && stderr.contains("spiffe://mesh.test/cluster/east/replica/2"),
        "{stderr}"
    );
}
