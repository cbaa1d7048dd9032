//! Privileged behaviour tests of the namespace harness itself: it builds the two-cluster
//! topology, traffic crosses from one cluster to the other over the veths and the fabric,
//! nothing has a default route, and every resource is removed afterwards, also when the
//! scenario panics or its process died.
//!
//! Needs root, iproute2 and cgroup2. Skips otherwise, unless
//! `CLUSTERMESH_REQUIRE_PRIVILEGED=1`, where a missing privilege fails the test.

// Helpers outside #[test] fns: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use clustermesh_netns_harness::{cgroup, cleanup, privileges_missing, Harness, TopologySpec};
use clustermesh_test_support::prerequisites;

const TIMEOUT: Duration = Duration::from_secs(3);

fn helper() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clustermesh-netns"))
}

fn privileged(test: &str) -> bool {
    clustermesh_test_support::prerequisites::may_run(test, privileges_missing())
}

fn gone(run: &str) -> Vec<String> {
    let mut left = cleanup::namespaces_with_prefix(&cleanup::netns_prefix(run));
    if cleanup::cgroup_dir(run).unwrap().exists() {
        left.push("cgroup dir".into());
    }
    if cleanup::bpf_dir(run).exists() {
        left.push("bpf pin dir".into());
    }
    if Path::new(cleanup::MARKER_DIR).join(run).exists() {
        left.push("marker".into());
    }
    left
}

fn process_alive(pid: u32) -> bool {
    // A killed and reaped child has no /proc entry; a zombie would show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn echo_reply_crosses_from_one_cluster_to_the_other() {
    if !privileged("echo_reply_crosses_from_one_cluster_to_the_other") {
        return;
    }
    let _heavy = prerequisites::shared();
    let mut h = Harness::build(TopologySpec::uniform(2, 2, 1), &helper()).unwrap();
    assert_eq!(h.namespaces().len(), 1 + 4 + 4, "fabric + 4 nodes + 4 pods");
    assert!(
        h.namespaces_with_default_route().unwrap().is_empty(),
        "a namespace has a default route"
    );
    let backends = h.start_all_echo(8080).unwrap();
    assert_eq!(backends.len(), 4);

    // cluster1/node1 -> pod on cluster2/node1: node route -> fabric veth -> remote node
    // -> its bridge -> pod veth, and the answer back the same way.
    let before = h.fabric_port_rx_packets(1, 0).unwrap();
    let remote = backends[2];
    let answer = h.request_from_node(0, 0, remote, TIMEOUT).unwrap();
    assert_eq!(answer, "cluster2/cluster2-node1-echo1 hello");
    let after = h.fabric_port_rx_packets(1, 0).unwrap();
    assert!(
        after >= before + 3,
        "cluster2/node1's fabric veth carried the answer ({before} -> {after} packets)"
    );

    // And the other way, plus a local answer for contrast.
    let answer = h.request_from_node(1, 1, backends[1], TIMEOUT).unwrap();
    assert_eq!(answer, "cluster1/cluster1-node2-echo1 hello");
    let answer = h.request_from_node(0, 1, backends[1], TIMEOUT).unwrap();
    assert!(answer.starts_with("cluster1/"), "{answer}");

    // A killed backend refuses new connections (what the failover scenarios rely on).
    h.kill_pod(1, 0, 0);
    let err = h.request_from_node(0, 0, remote, TIMEOUT).unwrap_err();
    assert!(err.to_string().contains("request to"), "{err}");

    let run = h.run_id().to_string();
    assert!(h.teardown().is_empty());
    assert!(gone(&run).is_empty(), "left behind: {:?}", gone(&run));
}

#[test]
fn node_processes_run_in_the_node_cgroup_and_die_at_teardown() {
    if !privileged("node_processes_run_in_the_node_cgroup_and_die_at_teardown") {
        return;
    }
    let _heavy = prerequisites::shared();
    let mut h = Harness::build(TopologySpec::uniform(1, 2, 0), &helper()).unwrap();
    let pid = h
        .spawn_in_node(0, 1, "sleeper", Path::new("/bin/sleep"), &["60"])
        .unwrap();
    let cg = h.node_cgroup(0, 1);
    let mut found = false;
    for _ in 0..100 {
        if cgroup::pids(&cg).contains(&(pid as i32)) {
            found = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(found, "pid {pid} not in {}", cg.display());
    assert!(
        cgroup::pids(&h.node_cgroup(0, 0)).is_empty(),
        "node1's cgroup must stay empty"
    );

    // Pin a real map where the node's agent would pin its maps (bpffs holds only
    // directories and pinned objects).
    let pins = h.node_bpf_pin_dir(0, 1);
    std::fs::create_dir_all(pins.join("sub")).unwrap();
    let map = pins.join("services");
    let status = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&map)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "8", "name", "cmh_test",
        ])
        .status()
        .expect("bpftool is installed by scripts/setup");
    assert!(
        status.success() && map.exists(),
        "bpftool could not pin a map at {}",
        map.display()
    );

    let run = h.run_id().to_string();
    assert!(h.teardown().is_empty());
    assert!(!process_alive(pid), "process {pid} survived teardown");
    assert!(gone(&run).is_empty(), "left behind: {:?}", gone(&run));
}

#[test]
fn a_failing_scenario_still_removes_everything() {
    if !privileged("a_failing_scenario_still_removes_everything") {
        return;
    }
    let _heavy = prerequisites::shared();
    let run = Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut h = Harness::build(TopologySpec::uniform(2, 1, 1), &helper()).unwrap();
        *run.lock().unwrap() = h.run_id().to_string();
        h.start_all_echo(9000).unwrap();
        panic!("scenario step failed");
    });
    assert!(result.is_err());
    let run = run.into_inner().unwrap();
    assert!(!run.is_empty());
    assert!(gone(&run).is_empty(), "left behind: {:?}", gone(&run));
}

#[test]
fn resources_of_a_dead_run_are_swept() {
    if !privileged("resources_of_a_dead_run_are_swept") {
        return;
    }
    let _heavy = prerequisites::shared();
    // Simulate a run whose process was SIGKILLed: a marker naming a dead process, plus a
    // namespace, a cgroup and a pin directory carrying its run id.
    let run = format!("dead{:x}", std::process::id());
    std::fs::create_dir_all(cleanup::MARKER_DIR).unwrap();
    std::fs::write(Path::new(cleanup::MARKER_DIR).join(&run), "999999999 1").unwrap();
    let ns = format!("{}c1n1", cleanup::netns_prefix(&run));
    assert!(std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    cgroup::create(&cleanup::cgroup_dir(&run).unwrap().join("c1n1")).unwrap();
    std::fs::create_dir_all(cleanup::bpf_dir(&run).join("c1n1")).unwrap();

    let swept = cleanup::sweep_stale();
    assert!(swept.contains(&run), "{swept:?}");
    assert!(gone(&run).is_empty(), "left behind: {:?}", gone(&run));
}
