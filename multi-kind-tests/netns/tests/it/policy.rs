//! Cross-cluster network policy enforced in eBPF on real traffic (issue 14), with the real
//! binaries: two clusters, pods in their own namespaces and `pod<uid>` cgroups, a
//! NetworkPolicy in cluster2 admitting cluster1's frontends on one port, an egress policy
//! in cluster1, an allow-all namespace; then a new pod's identity, a policy change, both
//! agents restarted under traffic, and cluster1's identities leaving after the stale TTL
//! (steps in `clustermesh_netns_harness::policy`).
//!
//! The measured times (policy change to new verdict, new pod to admitted) are reported in
//! `$CARGO_TARGET_TMPDIR/clustermesh-policy-report.txt`, printed by `scripts/test`, not
//! asserted: the machine is shared.
//!
//! Needs root, iproute2, cgroup2 and bpffs; skips otherwise unless
//! `CLUSTERMESH_REQUIRE_PRIVILEGED=1`.

// Helpers outside #[test] fns: a failed unwrap there is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use clustermesh_netns_harness::mesh::{Binaries, Mesh};
use clustermesh_netns_harness::{cleanup, policy, privileges_missing, Harness};
use clustermesh_test_support::prerequisites;

fn privileged(test: &str) -> bool {
    prerequisites::may_run(test, privileges_missing())
}

fn report_table(r: &policy::Report) -> String {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    format!(
        "cross-cluster policy (netns harness, one run)\n\
         {:<52} {:>9}\n\
         {:<52} {:>9.1}\n\
         {:<52} {:>9.1}\n\
         {:<52} {:>9.1}\n\
         {:<52} {:>9.1}\n\
         {:<52} {:>9}\n",
        "step",
        "ms",
        "first policies in force (from bring-up)",
        ms(r.initial),
        "new cluster1 pod admitted by cluster2 (target < 1000)",
        ms(r.identity_propagation),
        "policy change to new verdict (target < 1000)",
        ms(r.policy_change),
        "cluster1 identities gone after outage (stale TTL 5 s)",
        ms(r.stale_removal),
        "probes across both agents' restart, all unchanged",
        r.probes_during_restart,
    )
}

#[test]
fn network_policy_is_enforced_on_cross_cluster_traffic() {
    if !privileged("network_policy_is_enforced_on_cross_cluster_traffic") {
        return;
    }
    let _heavy = prerequisites::exclusive();
    let helper = PathBuf::from(env!("CARGO_BIN_EXE_clustermesh-netns"));
    let cargo = std::env::var_os("CARGO").map(PathBuf::from);
    let bins = Binaries::beside(&helper, cargo.as_deref()).unwrap();
    let mut h = Harness::build(policy::topology(), &helper).unwrap();
    let mut m = Mesh::new(&h, bins).unwrap();
    let say = |s: &str| eprintln!("[policy] {s}");
    let logs = |m: &Mesh| format!("logs under {}", m.state_dir(0).parent().unwrap().display());

    let report = policy::run(&mut h, &mut m, &say).unwrap_or_else(|e| panic!("{e} ({})", logs(&m)));
    let table = report_table(&report);
    eprint!("{table}");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clustermesh-policy-report.txt");
    if let Err(e) = std::fs::write(&path, &table) {
        eprintln!("[policy] could not write {}: {e}", path.display());
    }
    assert!(report.probes_during_restart > 0);

    let run = h.run_id().to_string();
    assert!(h.teardown().is_empty());
    assert!(!cleanup::state_dir(&run).exists());
}
