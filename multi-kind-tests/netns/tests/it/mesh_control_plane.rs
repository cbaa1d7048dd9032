//! The clustermesh control plane in the namespace topology, with the real binaries:
//! `clustermesh enable` for two clusters, a real `clustermesh-apiserver` per cluster
//! (raft store, `dir:` source with the topology's manifests) in its first node's
//! namespace, `clustermesh connect` run from inside a node, `status` from both sides, a
//! peer apiserver killed (status reports it, connect refuses), restarted (status
//! recovers), and `disconnect`.
//!
//! No agents run here (their sockets are listed, so `status` exits non-zero for them and
//! the checks read its JSON); `failover.rs` runs the whole mesh with agents.
//!
//! Needs root, iproute2 and cgroup2; skips otherwise unless
//! `CLUSTERMESH_REQUIRE_PRIVILEGED=1`.

// Helpers outside #[test] fns: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use clustermesh_netns_harness::mesh::{Binaries, Mesh};
use clustermesh_netns_harness::{privileges_missing, Harness, TopologySpec};
use clustermesh_test_support::prerequisites;

fn privileged(test: &str) -> bool {
    clustermesh_test_support::prerequisites::may_run(test, privileges_missing())
}

fn status_json(mesh: &Mesh, h: &Harness, c: usize) -> (bool, serde_json::Value, String) {
    let dir = mesh.state_dir(c).display().to_string();
    let r = mesh
        .cli_on_node(
            h,
            c,
            0,
            &[
                "--state-dir",
                &dir,
                "-o",
                "json",
                "status",
                "--timeout",
                "2s",
            ],
        )
        .unwrap();
    (
        r.ok,
        serde_json::from_str(&r.stdout).unwrap_or_default(),
        r.stderr,
    )
}

#[test]
fn enable_connect_status_and_peer_outage_with_real_apiservers() {
    if !privileged("enable_connect_status_and_peer_outage_with_real_apiservers") {
        return;
    }
    let _heavy = prerequisites::exclusive();
    let helper = PathBuf::from(env!("CARGO_BIN_EXE_clustermesh-netns"));
    let cargo = std::env::var_os("CARGO").map(PathBuf::from);
    let bins = Binaries::beside(&helper, cargo.as_deref()).unwrap();
    let mut h = Harness::build(TopologySpec::uniform(2, 2, 1), &helper).unwrap();
    let mut mesh = Mesh::new(&h, bins).unwrap();

    for c in 0..2 {
        let r = mesh.enable(&h, c).unwrap();
        assert!(r.ok, "enable cluster{}: {}", c + 1, r.stderr);
        mesh.start_apiserver(&mut h, c).unwrap();
    }
    let (a, b) = (
        mesh.state_dir(0).display().to_string(),
        mesh.state_dir(1).display().to_string(),
    );

    // The apiservers export the manifests: 1 global service, 2 endpoints, 2 nodes each
    // (once the directory source has seen the just-written files settle).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (st, err) = loop {
        let (_, st, err) = status_json(&mesh, &h, 0);
        if st["apiserver"]["records"]["services"] == 1 || std::time::Instant::now() > deadline {
            break (st, err);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(st["apiserver"]["reachable"], true, "{st} {err}");
    assert!(err.contains("0/2 agents answering"), "{err}");
    let records = &st["apiserver"]["records"];
    assert_eq!(records["services"], 1, "{st}");
    assert_eq!(records["endpoints"], 2, "{st}");
    assert_eq!(records["nodes"], 2, "{st}");

    // connect from inside cluster1/node1: both apiservers are reached over the fabric.
    let r = mesh
        .cli_on_node(
            &h,
            0,
            0,
            &["--state-dir", &a, "connect", "--destination-state-dir", &b],
        )
        .unwrap();
    assert!(r.ok, "connect: {}", r.stderr);
    for c in 0..2 {
        let (_, st, err) = status_json(&mesh, &h, c);
        assert_eq!(st["apiserver"]["reachable"], true, "{st} {err}");
        assert_eq!(st["configured"].as_array().unwrap().len(), 2, "{st}");
    }

    // cluster2's apiserver goes down: its status says so in one line and fails; a
    // connect attempt that needs it is refused and changes nothing.
    mesh.kill_apiserver(&mut h, 1);
    let (ok, st, err) = status_json(&mesh, &h, 1);
    assert!(!ok);
    assert_eq!(st["apiserver"]["reachable"], false);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("mesh API server unreachable"), "{err}");
    let before = std::fs::read(mesh.state_dir(0).join("agent.yaml")).unwrap();
    let r = mesh
        .cli_on_node(
            &h,
            0,
            0,
            &[
                "--state-dir",
                &a,
                "connect",
                "--destination-state-dir",
                &b,
                "--timeout",
                "1s",
            ],
        )
        .unwrap();
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("mesh API of cluster cluster2 is not reachable"),
        "{}",
        r.stderr
    );
    assert_eq!(
        before,
        std::fs::read(mesh.state_dir(0).join("agent.yaml")).unwrap()
    );

    // Restarted from its raft data, it answers again.
    mesh.start_apiserver(&mut h, 1).unwrap();
    let (_, st, err) = status_json(&mesh, &h, 1);
    assert_eq!(st["apiserver"]["reachable"], true, "{st} {err}");

    // disconnect works on the state directories alone.
    let r = mesh
        .cli(&[
            "--state-dir",
            &b,
            "disconnect",
            "--destination-state-dir",
            &a,
        ])
        .unwrap();
    assert!(r.ok, "{}", r.stderr);
    let (_, st, _) = status_json(&mesh, &h, 0);
    assert_eq!(st["configured"].as_array().unwrap().len(), 1, "{st}");

    let run = h.run_id().to_string();
    assert!(h.teardown().is_empty());
    assert!(!clustermesh_netns_harness::cleanup::state_dir(&run).exists());
}
