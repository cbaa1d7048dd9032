//! The two-cluster failover scenario (issue "CLI, deployment, ... demo", step 4), shared
//! by the CI test and `clustermesh-netns demo`:
//!
//! 1. `enable` ×2, a mesh API server per cluster, an agent per node attached to the node's
//!    cgroup, then `connect` (the running agents reload their configuration), and
//!    `status --wait` until every node is connected to both clusters;
//! 2. requests to the global service VIP from cluster1 land on cluster1 (affinity local);
//! 3. cluster1's backends become not ready and are killed → new requests are answered by
//!    cluster2 (time measured per repeat); restored → local again;
//! 4. cluster2's apiserver is killed → cluster1 still serves; restarted → status recovers;
//! 5. `disconnect` → cluster2's backends are gone from cluster1's agents.
//!
//! Every step returns an error describing what was expected and what happened instead.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::Harness;
use crate::mesh::{self, Mesh};
use crate::{Error, Result};

/// How long a convergence step may take before the scenario fails.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Measured failover and failback times.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Time from "local backends not ready + killed" to the first answer from cluster2.
    pub failover: Vec<Duration>,
    /// Time from "local backends back" to the first answer from cluster1.
    pub failback: Vec<Duration>,
}

/// The `q`-quantile (0..=1) of `samples` (nearest rank).
#[must_use]
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn vip() -> SocketAddr {
    SocketAddr::new(
        mesh::ECHO_VIP
            .parse()
            .unwrap_or(std::net::Ipv4Addr::new(10, 96, 0, 10).into()),
        mesh::ECHO_PORT,
    )
}

fn step(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Topology(format!("{what}: {detail}"))
}

/// Requests from cluster1/node1 to the VIP until an answer comes from `cluster`; returns
/// how long that took.
pub fn until_answered_by(h: &Harness, cluster: &str, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let prefix = format!("{cluster}/");
    let mut last = String::new();
    while start.elapsed() < timeout {
        match h.request_from_node(0, 0, vip(), Duration::from_millis(500)) {
            Ok(a) if a.starts_with(&prefix) => return Ok(start.elapsed()),
            Ok(a) => last = a,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(step(
        &format!("no answer from {cluster} within {timeout:?}"),
        format!("last: {last}"),
    ))
}

/// Sends `n` requests and checks every answer comes from `cluster`.
pub fn all_answered_by(h: &Harness, cluster: &str, n: usize) -> Result<()> {
    for i in 0..n {
        let a = h
            .request_from_node(0, 0, vip(), Duration::from_secs(2))
            .map_err(|e| step(&format!("request {i} to the VIP"), e))?;
        if !a.starts_with(&format!("{cluster}/")) {
            return Err(step(
                &format!("request {i} expected an answer from {cluster}"),
                a,
            ));
        }
    }
    Ok(())
}

/// Brings up the whole mesh (step 1). `say` narrates.
pub fn bring_up(h: &mut Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<()> {
    let n_clusters = h.spec().clusters.len();
    for c in 0..n_clusters {
        say(&format!(
            "clustermesh enable {} (id {})",
            h.spec().clusters[c].name,
            c + 1
        ));
        let r = m.enable(h, c)?;
        if !r.ok {
            return Err(step("enable", r.stderr.trim()));
        }
        say(&format!(
            "clustermesh-apiserver of {} on {}",
            h.spec().clusters[c].name,
            Mesh::mesh_endpoint(c)
        ));
        m.start_apiserver(h, c)?;
    }
    h.start_all_echo(mesh::ECHO_PORT)?;
    let (a, b) = (
        m.state_dir(0).display().to_string(),
        m.state_dir(1).display().to_string(),
    );
    // The agents start before `connect`: each knows only its own cluster until `connect`
    // rewrites its agent.yaml, so the `status --wait` below proves that running agents
    // pick the new peer up without a restart.
    for c in 0..n_clusters {
        say(&format!(
            "clustermesh-agent on every node of {} (knows only its own cluster)",
            h.spec().clusters[c].name
        ));
        for n in 0..h.spec().clusters[c].nodes.len() {
            m.start_agent(h, c, n)?;
        }
    }
    say("clustermesh connect cluster1 <-> cluster2 (running agents reload their config)");
    let r = m.cli_on_node(
        h,
        0,
        0,
        &["--state-dir", &a, "connect", "--destination-state-dir", &b],
    )?;
    if !r.ok {
        return Err(step("connect", r.stderr.trim()));
    }
    say("clustermesh status --wait (every node connected to both clusters)");
    for (c, dir) in [(0, &a), (1, &b)] {
        let r = m.cli_on_node(
            h,
            c,
            0,
            &[
                "--state-dir",
                dir,
                "status",
                "--wait",
                "--wait-duration",
                "60s",
            ],
        )?;
        if !r.ok {
            return Err(step(
                "status --wait",
                format!("{}{}", r.stdout, r.stderr.trim()),
            ));
        }
        for line in r.stdout.lines() {
            say(&format!("  {line}"));
        }
    }
    streams_per_server(h, m, say)
}

/// Checks how many Watch streams each mesh API server holds: its own cluster's agents,
/// plus in mirror mode one per peer server, in direct mode one per peer agent.
fn streams_per_server(h: &Harness, m: &Mesh, say: &dyn Fn(&str)) -> Result<()> {
    let nodes: Vec<usize> = h.spec().clusters.iter().map(|c| c.nodes.len()).collect();
    let total: usize = nodes.iter().sum();
    for (c, own) in nodes.iter().enumerate() {
        let expected = match m.mode() {
            mesh::WatchMode::Mirror => own + nodes.len() - 1,
            mesh::WatchMode::Direct => total,
        };
        let dir = m.state_dir(c).display().to_string();
        let start = Instant::now();
        loop {
            let r = m.cli_on_node(h, c, 0, &["--state-dir", &dir, "-o", "json", "status"])?;
            let watchers = serde_json::from_str::<serde_json::Value>(&r.stdout)
                .ok()
                .and_then(|v| v["apiserver"]["watchers"].as_u64());
            if watchers == Some(expected as u64) {
                say(&format!(
                    "  {}'s mesh API server holds {expected} streams ({} mode: {own} own agents + {})",
                    h.spec().clusters[c].name,
                    m.mode(),
                    expected - own
                ));
                break;
            }
            // A stream the server has not yet noticed closing can linger for a moment.
            if start.elapsed() > Duration::from_secs(10) {
                return Err(step(
                    "streams per mesh API server",
                    format!(
                        "{} holds {watchers:?} watch streams, expected {expected} in {} mode",
                        h.spec().clusters[c].name,
                        m.mode()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Steps 2 and 3: local affinity, then `repeats` failovers and failbacks.
pub fn failover(
    h: &mut Harness,
    m: &mut Mesh,
    repeats: usize,
    say: &dyn Fn(&str),
) -> Result<Report> {
    say("requests to the VIP from cluster1/node1 land on cluster1 (affinity local)");
    until_answered_by(h, "cluster1", CONVERGE_TIMEOUT)?;
    all_answered_by(h, "cluster1", 20)?;
    let mut report = Report::default();
    let nodes = h.spec().clusters[0].nodes.len();
    for i in 0..repeats {
        m.set_ready(h, 0, false)?;
        for n in 0..nodes {
            for p in 0..h.spec().clusters[0].nodes[n].pods.len() {
                h.kill_pod(0, n, p);
            }
        }
        let t = until_answered_by(h, "cluster2", CONVERGE_TIMEOUT)?;
        all_answered_by(h, "cluster2", 5)?;
        report.failover.push(t);
        for n in 0..nodes {
            for p in 0..h.spec().clusters[0].nodes[n].pods.len() {
                h.start_echo(0, n, p, mesh::ECHO_PORT)?;
            }
        }
        m.set_ready(h, 0, true)?;
        let back = until_answered_by(h, "cluster1", CONVERGE_TIMEOUT)?;
        all_answered_by(h, "cluster1", 5)?;
        report.failback.push(back);
        say(&format!(
            "repeat {}/{repeats}: failover to cluster2 in {:.0?}, back to cluster1 in {:.0?}",
            i + 1,
            t,
            back
        ));
    }
    Ok(report)
}

/// Maglev tables built and datapath batches applied so far by every agent.
fn churn(h: &Harness, m: &Mesh) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for (c, cluster) in h.spec().clusters.iter().enumerate() {
        for n in 0..cluster.nodes.len() {
            out.push((
                m.agent_metric(c, n, "clustermesh_agent_maglev_tables_built_total")?,
                m.agent_metric(c, n, "clustermesh_agent_datapath_batches_total")?,
            ));
        }
    }
    Ok(out)
}

/// Step 4: the remote apiserver goes down and comes back; local service is unaffected,
/// and the resync after the restart changes nothing in any agent's datapath.
pub fn remote_outage(h: &mut Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<()> {
    // Let the last failback settle, then take the churn baseline.
    std::thread::sleep(Duration::from_secs(1));
    let before = churn(h, m)?;
    say("killing cluster2's apiserver: cluster1 keeps serving");
    m.kill_apiserver(h, 1);
    all_answered_by(h, "cluster1", 20)?;
    say("restarting cluster2's apiserver: agents resync");
    m.start_apiserver(h, 1)?;
    let a = m.state_dir(0).display().to_string();
    let r = m.cli_on_node(
        h,
        0,
        0,
        &[
            "--state-dir",
            &a,
            "status",
            "--wait",
            "--wait-duration",
            "60s",
        ],
    )?;
    if !r.ok {
        return Err(step("status --wait after the restart", r.stderr.trim()));
    }
    all_answered_by(h, "cluster1", 20)?;
    let after = churn(h, m)?;
    if before != after {
        return Err(step(
            "the resync after cluster2's apiserver restart changed the datapath (tables built, batches per agent)",
            format!("before {before:?}, after {after:?}"),
        ));
    }
    say("resync caused no datapath change on any agent");
    Ok(())
}

/// Step 5: `disconnect` removes cluster2's backends from cluster1's agents; with the local
/// backends not ready, the VIP then has nothing to fail over to.
pub fn disconnect(h: &mut Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<()> {
    let (a, b) = (
        m.state_dir(0).display().to_string(),
        m.state_dir(1).display().to_string(),
    );
    say("clustermesh disconnect: cluster2's backends disappear from cluster1");
    let r = m.cli(&[
        "--state-dir",
        &a,
        "disconnect",
        "--destination-state-dir",
        &b,
    ])?;
    if !r.ok {
        return Err(step("disconnect", r.stderr.trim()));
    }
    let socket = m.agent_socket(0, 0).display().to_string();
    let start = Instant::now();
    loop {
        let r = m.cli(&["-o", "json", "service", "list", "--agent-socket", &socket])?;
        if r.ok
            && !r.stdout.contains("\"cluster\": \"cluster2\"")
            && r.stdout.contains("\"cluster\": \"cluster1\"")
        {
            break;
        }
        if start.elapsed() > CONVERGE_TIMEOUT {
            return Err(step(
                "cluster2's backends still listed after disconnect",
                r.stdout,
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The service list shows only the backends in use (cluster1's, with affinity local),
    // so it cannot tell whether the agent has dropped cluster2 yet: wait until the agent
    // itself no longer reports cluster2 before taking the local backends away (else a
    // slow config reload lets the next request fail over to cluster2 legitimately).
    let start = Instant::now();
    loop {
        let r = m.cli(&[
            "--state-dir",
            &a,
            "-o",
            "json",
            "status",
            "--agent-socket",
            &socket,
        ])?;
        if r.stdout.contains("\"cluster1\"") && !r.stdout.contains("\"cluster2\"") {
            break;
        }
        if start.elapsed() > CONVERGE_TIMEOUT {
            return Err(step(
                "the agent still watches cluster2 after disconnect",
                r.stdout,
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    m.set_ready(h, 0, false)?;
    let start = Instant::now();
    loop {
        match h.request_from_node(0, 0, vip(), Duration::from_millis(500)) {
            Err(_) => return Ok(()),
            Ok(a) if a.starts_with("cluster2/") => {
                return Err(step("after disconnect a request still reached cluster2", a))
            }
            Ok(_) if start.elapsed() > CONVERGE_TIMEOUT => {
                return Err(step(
                    "local backends still used after being marked not ready",
                    "",
                ))
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let s: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(quantile(&s, 0.5), Duration::from_millis(10));
        assert_eq!(quantile(&s, 0.99), Duration::from_millis(20));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
