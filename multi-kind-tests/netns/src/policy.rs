//! The cross-cluster network policy scenario (issue 14), shared by the CI test and
//! `clustermesh-netns policy-demo`.
//!
//! Two clusters of one node each; every pod runs in its own network namespace and in a
//! `pod<uid>` cgroup below its node's cgroup, so the node's agent finds it and enforces its
//! policy in eBPF (egress at `connect`, ingress on its cgroup). Pods:
//!
//! | cluster1 | labels | cluster2 | labels |
//! |---|---|---|---|
//! | `frontend` | `app=frontend` | `api` (8080 named `http`, 9090) | `app=api` |
//! | `other` | `app=other` | `client` | `app=client` |
//! | `client` | `app=client` | `stranger` | `app=other` |
//! | `late` (exported later) | `app=frontend` | `web` (namespace `open`) | `app=web` |
//!
//! Policies: in cluster2, `api-ingress` admits cluster1's `app=frontend` (a selector that
//! names `io.cilium.k8s.policy.cluster`) and `app=client` (no cluster label: the local
//! cluster only) on the named port `http`; namespace `open` admits everything
//! (`ingress: [{}]`). In cluster1, `other-egress` lets `app=other` reach only cluster2's
//! `app=api` pods in namespace `default` (pod and namespace selector combined) on 9090.
//!
//! Every step returns an error naming the flow, what was expected and what happened.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_api::admin_policy::IdentityEntry;

use crate::harness::{Client, Harness};
use crate::mesh::{self, Mesh};
use crate::scenario::{self, CONVERGE_TIMEOUT};
use crate::topology::{self, ClusterSpec, NodeSpec, PodSpec, TopologySpec};
use crate::{Error, Result};

/// The port `api-ingress` admits at first (named `http` in the pod spec).
pub const HTTP_PORT: u16 = mesh::ECHO_PORT;
/// The api's second port, admitted after the policy change.
pub const ADMIN_PORT: u16 = 9090;
/// The agents' stale TTL in this scenario.
pub const STALE_TTL: Duration = Duration::from_secs(5);
/// Connect timeout of a probe expected to be dropped: a dropped SYN shows as a timeout
/// this long (an admitted connect answers in well under a millisecond here).
const DROP_TIMEOUT: Duration = Duration::from_millis(400);
/// Timeout of a probe expected to be answered: generous, so that a loaded machine does
/// not turn a slow answer into a "dropped".
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of the probes that wait for a change: short, so that a SYN dropped just before
/// the change is not waited out (its retransmission comes after 1 s) and the measured
/// time says when the change happened.
const POLL_TIMEOUT: Duration = Duration::from_millis(150);

/// A pod of the scenario: (cluster, node, pod), 0-based.
pub type PodRef = (usize, usize, usize);
/// cluster1's `frontend`.
pub const FRONTEND: PodRef = (0, 0, 0);
/// cluster1's `other`.
pub const OTHER: PodRef = (0, 0, 1);
/// cluster1's `client` (same labels as cluster2's: the cluster label tells them apart).
pub const REMOTE_CLIENT: PodRef = (0, 0, 2);
/// cluster1's `late`, not exported until [`identity_propagation`].
pub const LATE: PodRef = (0, 0, 3);
/// cluster2's `api`.
pub const API: PodRef = (1, 0, 0);
/// cluster2's `client`.
pub const LOCAL_CLIENT: PodRef = (1, 0, 1);
/// cluster2's `stranger`.
pub const STRANGER: PodRef = (1, 0, 2);
/// cluster2's `web`, in the allow-all namespace `open`.
pub const WEB: PodRef = (1, 0, 3);

/// The two-cluster topology of this scenario.
#[must_use]
pub fn topology() -> TopologySpec {
    let node = |pods: Vec<PodSpec>| NodeSpec {
        name: "node1".into(),
        pods,
    };
    TopologySpec {
        clusters: vec![
            ClusterSpec {
                name: "cluster1".into(),
                nodes: vec![node(vec![
                    PodSpec::new("frontend", "default", &[("app", "frontend")]),
                    PodSpec::new("other", "default", &[("app", "other")]),
                    PodSpec::new("client", "default", &[("app", "client")]),
                    PodSpec::new("late", "default", &[("app", "frontend")]).unexported(),
                ])],
            },
            ClusterSpec {
                name: "cluster2".into(),
                nodes: vec![node(vec![
                    PodSpec::new("api", "default", &[("app", "api")]),
                    PodSpec::new("client", "default", &[("app", "client")]),
                    PodSpec::new("stranger", "default", &[("app", "other")]),
                    PodSpec::new("web", "open", &[("app", "web")]),
                ])],
            },
        ],
    }
}

/// cluster2's policies; `api_port` is what `api-ingress` admits (a number or a port name).
#[must_use]
pub fn cluster2_policies(api_port: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: api-ingress, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: api}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector: {{matchLabels: {{app: frontend, io.cilium.k8s.policy.cluster: cluster1}}}}
    - podSelector: {{matchLabels: {{app: client}}}}
    ports:
    - {{protocol: TCP, port: {api_port}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-all, namespace: open}}
spec:
  podSelector: {{}}
  policyTypes: [Ingress]
  ingress: [{{}}]
"
    )
}

/// cluster1's policy: `app=other` may only reach cluster2's api on 9090.
#[must_use]
pub fn cluster1_policies() -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: other-egress, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: other}}}}
  policyTypes: [Egress]
  egress:
  - to:
    - podSelector: {{matchLabels: {{app: api, io.cilium.k8s.policy.cluster: cluster2}}}}
      namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: default}}}}
    ports:
    - {{protocol: TCP, port: {ADMIN_PORT}}}
"
    )
}

/// What happened to one connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server answered; the answer names it (`<cluster>/<pod>`).
    Answered(String),
    /// `connect` failed with `EPERM`: denied at the client's egress.
    Eperm,
    /// No answer within the probe timeout: the SYN was dropped (ingress).
    Dropped,
    /// Anything else (refused, reset...).
    Failed(String),
}

impl Verdict {
    fn of(result: Result<String>) -> Self {
        match result {
            Ok(answer) => Self::Answered(answer.split(' ').next().unwrap_or("").to_string()),
            Err(e) => {
                let text = e.to_string();
                if text.contains("(os error 1)") {
                    Self::Eperm
                } else if text.contains("timed out")
                    || text.contains("(os error 110)")
                    || text.contains("(os error 11)")
                {
                    Self::Dropped
                } else {
                    Self::Failed(text)
                }
            }
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Answered(by) => write!(f, "answered by {by}"),
            Self::Eperm => f.write_str("refused with EPERM at connect"),
            Self::Dropped => f.write_str("dropped (no answer)"),
            Self::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// One flow and the verdict it must get.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Who connects.
    pub from: PodRef,
    /// To which pod.
    pub to: PodRef,
    /// On which port.
    pub port: u16,
    /// The verdict it must get.
    pub verdict: Verdict,
}

fn pod_name(h: &Harness, (c, n, p): PodRef) -> String {
    format!(
        "{}/{}",
        h.spec().clusters[c].name,
        h.spec().clusters[c].nodes[n].pods[p].name
    )
}

fn addr((c, n, p): PodRef, port: u16) -> SocketAddr {
    SocketAddr::new(topology::pod_ip(c, n, p).into(), port)
}

fn client(h: &Harness, (c, n, p): PodRef) -> Client {
    h.pod_client(c, n, p)
}

fn answered(h: &Harness, pod: PodRef) -> Verdict {
    Verdict::Answered(pod_name(h, pod))
}

fn expect(from: PodRef, to: PodRef, port: u16, verdict: Verdict) -> Expect {
    Expect {
        from,
        to,
        port,
        verdict,
    }
}

impl Expect {
    /// How long a probe of this flow waits for an answer.
    fn timeout(&self) -> Duration {
        match self.verdict {
            Verdict::Answered(_) => ANSWER_TIMEOUT,
            _ => DROP_TIMEOUT,
        }
    }

    /// Tries the flow from `client`, which must be the pod `self.from`.
    fn probe_from(&self, client: &Client, timeout: Duration) -> Verdict {
        Verdict::of(client.request(addr(self.to, self.port), timeout))
    }
}

fn describe(h: &Harness, e: &Expect) -> String {
    format!(
        "{} -> {}:{}",
        pod_name(h, e.from),
        pod_name(h, e.to),
        e.port
    )
}

/// Checks every flow once (with `timeout`, else the flow's own); returns the mismatches.
fn mismatches(h: &Harness, flows: &[Expect], timeout: Option<Duration>) -> Vec<String> {
    flows
        .iter()
        .filter_map(|e| {
            let got = e.probe_from(&client(h, e.from), timeout.unwrap_or(e.timeout()));
            (got != e.verdict)
                .then(|| format!("{}: expected {}, got {got}", describe(h, e), e.verdict))
        })
        .collect()
}

/// Waits until every flow gets its verdict, polling with short probes, then checks them
/// again with the full timeouts; fails naming the flows that do not get theirs. Returns
/// when the short probes first saw every verdict.
pub fn until_verdicts(h: &Harness, what: &str, flows: &[Expect]) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let wrong = mismatches(h, flows, Some(POLL_TIMEOUT));
        if wrong.is_empty() {
            let took = start.elapsed();
            let again = mismatches(h, flows, None);
            if again.is_empty() {
                return Ok(took);
            }
            return Err(Error::Topology(format!(
                "{what}: verdicts changed right after they held: {}",
                again.join("; ")
            )));
        }
        if start.elapsed() > CONVERGE_TIMEOUT {
            return Err(Error::Topology(format!(
                "{what}: not in force after {CONVERGE_TIMEOUT:?}: {}",
                wrong.join("; ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Times measured by the scenario.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// From writing the first policies to every verdict in force.
    pub initial: Duration,
    /// From exporting `late` to its identity admitted by `api-ingress` in cluster2.
    pub identity_propagation: Duration,
    /// From rewriting `api-ingress` (8080 → 9090) to the first answer on 9090.
    pub policy_change: Duration,
    /// Probes sent while the agents were restarted, all with unchanged verdicts.
    pub probes_during_restart: usize,
    /// From killing cluster1's mesh API server to cluster1's identities gone from
    /// cluster2's agent.
    pub stale_removal: Duration,
}

/// Brings the mesh up with the scenario's pods and agents (stale TTL [`STALE_TTL`]), the
/// api's second port, and both clusters' policies.
pub fn bring_up(h: &mut Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<()> {
    let ttl = STALE_TTL.as_secs();
    m.set_agent_args(&[&format!("--stale-ttl={ttl}s")]);
    // Mirror mode: the agents' own server keeps cluster1's records as long.
    m.set_apiserver_args(&[&format!("--mirror-stale-ttl={ttl}s")]);
    scenario::bring_up(h, m, say)?;
    let (c, n, p) = API;
    h.start_echo(c, n, p, ADMIN_PORT)?;
    say("policies: cluster2 api-ingress (cluster1 frontend + local client on port `http`), namespace open allows all; cluster1 other-egress (only cluster2 api:9090)");
    m.set_extra_manifests(h, 0, &cluster1_policies())?;
    m.set_extra_manifests(h, 1, &cluster2_policies("http"))?;
    Ok(())
}

/// The verdicts of the first policies.
pub fn initial_flows(h: &Harness) -> Vec<Expect> {
    vec![
        expect(FRONTEND, API, HTTP_PORT, answered(h, API)),
        expect(FRONTEND, API, ADMIN_PORT, Verdict::Dropped),
        expect(OTHER, API, HTTP_PORT, Verdict::Eperm),
        expect(OTHER, API, ADMIN_PORT, Verdict::Dropped),
        expect(REMOTE_CLIENT, API, HTTP_PORT, Verdict::Dropped),
        expect(LOCAL_CLIENT, API, HTTP_PORT, answered(h, API)),
        expect(LOCAL_CLIENT, API, ADMIN_PORT, Verdict::Dropped),
        expect(STRANGER, API, HTTP_PORT, Verdict::Dropped),
        expect(LATE, WEB, HTTP_PORT, answered(h, WEB)),
        expect(LATE, API, HTTP_PORT, Verdict::Dropped),
        expect(FRONTEND, WEB, HTTP_PORT, answered(h, WEB)),
    ]
}

/// Cluster2's agent's identities of `cluster`.
pub fn identities_of(m: &Mesh, cluster: &str) -> Result<Vec<IdentityEntry>> {
    let body = m.agent_get(1, 0, "/v1/identities")?;
    let all: Vec<IdentityEntry> = serde_json::from_str(&body).map_err(|e| {
        Error::Topology(format!(
            "cluster2's agent /v1/identities is not JSON: {e}: {body}"
        ))
    })?;
    Ok(all.into_iter().filter(|i| i.cluster == cluster).collect())
}

/// Step 1: the first policies are enforced on cross-cluster and local traffic, and
/// cluster2's agent knows cluster1's pods by identity.
pub fn initial_verdicts(h: &Harness, m: &Mesh, say: &dyn Fn(&str)) -> Result<Duration> {
    let took = until_verdicts(h, "the first policies", &initial_flows(h))?;
    say(&format!(
        "in force after {took:.0?}: cluster1 frontend -> cluster2 api:8080 answered, :9090 dropped; \
         cluster1 other refused with EPERM by its egress policy; cluster1 client dropped \
         (selector without cluster label = local cluster); cluster2 client answered, stranger dropped; \
         unexported cluster1 pod answered by the allow-all namespace, dropped by api"
    ));
    let remote = identities_of(m, "cluster1")?;
    let frontend = remote.iter().find(|i| {
        i.labels.get("app").map(String::as_str) == Some("frontend")
            && i.labels
                .get("io.cilium.k8s.policy.cluster")
                .map(String::as_str)
                == Some("cluster1")
    });
    if frontend.is_none() {
        return Err(Error::Topology(format!(
            "cluster2's agent lists no cluster1 identity with app=frontend: {remote:?}"
        )));
    }
    let entries = m.agent_metric_with(
        1,
        0,
        "clustermesh_agent_ipcache_entries",
        &[("cluster", "cluster1")],
    )?;
    if entries < 3.0 {
        return Err(Error::Topology(format!(
            "cluster2's agent reports {entries} IP cache entries for cluster1, expected one per exported pod (3)"
        )));
    }
    let denied = m.agent_metric_with(
        1,
        0,
        "clustermesh_agent_policy_verdicts_total",
        &[("direction", "ingress"), ("verdict", "denied")],
    )?;
    if denied < 1.0 {
        return Err(Error::Topology(format!(
            "cluster2's agent counted {denied} denied ingress verdicts after dropping several SYNs"
        )));
    }
    Ok(took)
}

/// Step 2: `late` is exported by cluster1; cluster2 admits it as a frontend.
pub fn identity_propagation(h: &Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<Duration> {
    let (c, n, p) = LATE;
    m.export_pod(h, c, n, p)?;
    let flows = [expect(LATE, API, HTTP_PORT, answered(h, API))];
    let took = until_verdicts(h, "cluster1's new frontend pod", &flows)?;
    say(&format!(
        "cluster1 exports pod late (app=frontend): cluster2 admits it after {took:.0?}"
    ));
    Ok(took)
}

/// Step 3: `api-ingress` moves from `http` (8080) to 9090.
pub fn policy_change(h: &Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<Duration> {
    m.set_extra_manifests(h, 1, &cluster2_policies(&ADMIN_PORT.to_string()))?;
    let first = [expect(FRONTEND, API, ADMIN_PORT, answered(h, API))];
    let took = until_verdicts(h, "api-ingress on 9090", &first)?;
    until_verdicts(h, "api-ingress on 9090", &changed_flows(h))?;
    say(&format!(
        "api-ingress changed to port 9090: new verdict after {took:.0?}"
    ));
    Ok(took)
}

/// The verdicts after the policy change.
pub fn changed_flows(h: &Harness) -> Vec<Expect> {
    vec![
        expect(FRONTEND, API, ADMIN_PORT, answered(h, API)),
        expect(FRONTEND, API, HTTP_PORT, Verdict::Dropped),
        expect(OTHER, API, HTTP_PORT, Verdict::Eperm),
        expect(LOCAL_CLIENT, API, ADMIN_PORT, answered(h, API)),
        expect(STRANGER, API, ADMIN_PORT, Verdict::Dropped),
    ]
}

/// Step 4: both agents are killed and restarted while probes run; no verdict changes.
pub fn agent_restart(h: &mut Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<usize> {
    let flows: Vec<(Client, Expect, String)> = changed_flows(h)
        .into_iter()
        .map(|e| (client(h, e.from), e.clone(), describe(h, &e)))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut probes = 0usize;
            let mut wrong: BTreeMap<String, String> = BTreeMap::new();
            while !stop.load(Ordering::Relaxed) {
                for (client, e, what) in &flows {
                    let got = e.probe_from(client, e.timeout());
                    probes += 1;
                    if got != e.verdict {
                        wrong
                            .entry(what.clone())
                            .or_insert_with(|| format!("expected {}, got {got}", e.verdict));
                    }
                }
            }
            (probes, wrong)
        })
    };
    say("restarting both agents while probes run");
    let result = (|| {
        std::thread::sleep(Duration::from_millis(500));
        m.kill_agent(h, 0, 0);
        m.kill_agent(h, 1, 0);
        std::thread::sleep(Duration::from_secs(1));
        m.start_agent(h, 0, 0)?;
        m.start_agent(h, 1, 0)?;
        for c in 0..2 {
            wait_status(h, m, c)?;
        }
        // The restarted agents program policy once every cluster has synced: keep probing
        // past that point.
        std::thread::sleep(Duration::from_secs(2));
        Ok::<_, Error>(())
    })();
    stop.store(true, Ordering::Relaxed);
    let (probes, wrong) = prober
        .join()
        .map_err(|_| Error::Topology("the probe thread panicked".into()))?;
    result?;
    if !wrong.is_empty() {
        let list: Vec<String> = wrong.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        return Err(Error::Topology(format!(
            "verdicts changed across the agent restart: {}",
            list.join("; ")
        )));
    }
    say(&format!(
        "{probes} probes across the restart, every verdict unchanged"
    ));
    Ok(probes)
}

fn wait_status(h: &Harness, m: &Mesh, c: usize) -> Result<()> {
    let dir = m.state_dir(c).display().to_string();
    let r = m.cli_on_node(
        h,
        c,
        0,
        &[
            "--state-dir",
            &dir,
            "status",
            "--wait",
            "--wait-duration",
            "60s",
        ],
    )?;
    if r.ok {
        Ok(())
    } else {
        Err(Error::Topology(format!(
            "status --wait of cluster{} after the agent restart: {}{}",
            c + 1,
            r.stdout,
            r.stderr.trim()
        )))
    }
}

/// Step 5: cluster1's mesh API server goes away: cluster2 keeps its identities until the
/// stale TTL, then forgets them and cluster1's frontend is `world` to it.
pub fn stale_identities(h: &mut Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<Duration> {
    m.kill_apiserver(h, 0);
    let start = Instant::now();
    say(&format!(
        "cluster1's mesh API server killed: cluster2 keeps its identities for the stale TTL ({STALE_TTL:?})"
    ));
    let still = expect(FRONTEND, API, ADMIN_PORT, answered(h, API));
    let got = still.probe_from(&client(h, FRONTEND), ANSWER_TIMEOUT);
    if got != still.verdict && start.elapsed() < STALE_TTL {
        return Err(Error::Topology(format!(
            "cluster1 frontend -> cluster2 api:9090 right after cluster1's outage: expected {}, got {got}",
            answered(h, API)
        )));
    }
    loop {
        let left = identities_of(m, "cluster1")?;
        let entries = m.agent_metric_with(
            1,
            0,
            "clustermesh_agent_ipcache_entries",
            &[("cluster", "cluster1")],
        )?;
        if left.is_empty() && entries == 0.0 {
            break;
        }
        if start.elapsed() > STALE_TTL + CONVERGE_TIMEOUT {
            return Err(Error::Topology(format!(
                "cluster1's identities still in cluster2's agent {:?} after cluster1 went away ({} left, {entries} IP cache entries)",
                start.elapsed(),
                left.len()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = start.elapsed();
    if took < STALE_TTL {
        return Err(Error::Topology(format!(
            "cluster1's identities left cluster2's agent after {took:?}, before the stale TTL ({STALE_TTL:?})"
        )));
    }
    let flows = [expect(FRONTEND, API, ADMIN_PORT, Verdict::Dropped)];
    until_verdicts(h, "cluster1 frontend after its identities left", &flows)?;
    say(&format!(
        "cluster1's identities left cluster2's agent after {took:.1?}; its frontend is now dropped"
    ));
    Ok(took)
}

/// Every step in order.
pub fn run(h: &mut Harness, m: &mut Mesh, say: &dyn Fn(&str)) -> Result<Report> {
    bring_up(h, m, say)?;
    let initial = initial_verdicts(h, m, say)?;
    let identity_propagation = identity_propagation(h, m, say)?;
    let policy_change = policy_change(h, m, say)?;
    let probes_during_restart = agent_restart(h, m, say)?;
    let stale_removal = stale_identities(h, m, say)?;
    Ok(Report {
        initial,
        identity_propagation,
        policy_change,
        probes_during_restart,
        stale_removal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_errors_are_classified_by_cause() {
        let err = |reason: &str| {
            Err(Error::Request {
                from: "a".into(),
                to: "b".into(),
                reason: reason.into(),
            })
        };
        assert_eq!(
            Verdict::of(err(
                "error: request to 10.0.0.1:80: Operation not permitted (os error 1)"
            )),
            Verdict::Eperm
        );
        assert_eq!(
            Verdict::of(err("error: request to 10.0.0.1:80: connection timed out")),
            Verdict::Dropped
        );
        assert!(matches!(
            Verdict::of(err("Connection refused (os error 111)")),
            Verdict::Failed(_)
        ));
        assert_eq!(
            Verdict::of(Ok("cluster2/api hello".into())),
            Verdict::Answered("cluster2/api".into())
        );
    }

    #[test]
    fn the_topology_fits_the_address_plan_and_holds_one_unexported_pod() {
        let t = topology();
        t.validate().unwrap();
        let unexported: Vec<&str> = t
            .clusters
            .iter()
            .flat_map(|c| c.nodes.iter().flat_map(|n| n.pods.iter()))
            .filter(|p| !p.exported)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(unexported, ["late"]);
    }
}
