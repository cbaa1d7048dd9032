//! `clustermesh status`: the mesh API server plus every agent's view of every cluster,
//! summarized like cilium-cli ("2/2 configured, 2/2 connected"), and `--wait` until the
//! whole mesh is up.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::admin::{self, AgentStatus};
use crate::meshapi;
use crate::standalone;
use crate::state::{ClusterState, StateDir};

/// Status of one cluster's control plane.
#[derive(Debug, Clone, Serialize)]
pub struct MeshStatus {
    /// This cluster.
    pub cluster: String,
    /// Its ID.
    pub cluster_id: u32,
    /// Clusters in `agent.yaml` (this one included).
    pub configured: Vec<String>,
    /// The mesh API server.
    pub apiserver: ApiserverStatus,
    /// One entry per agent socket in `cluster.yaml`.
    pub agents: Vec<AgentReport>,
}

/// The local mesh API server.
#[derive(Debug, Clone, Serialize)]
pub struct ApiserverStatus {
    /// Answered `GetClusterInfo`.
    pub reachable: bool,
    /// Endpoint that answered.
    pub endpoint: Option<String>,
    /// Store revision.
    pub revision: Option<u64>,
    /// Number of active watchers (from `Status`).
    pub watchers: Option<usize>,
    /// Exported records per kind (from `Status`), e.g. `services: 1`.
    pub records: std::collections::BTreeMap<String, u64>,
    /// Error when unreachable.
    pub error: Option<String>,
}

/// One agent.
#[derive(Debug, Clone, Serialize)]
pub struct AgentReport {
    /// Admin socket.
    pub socket: String,
    /// Its status, when it answered.
    pub status: Option<AgentStatus>,
    /// Error when it did not.
    pub error: Option<String>,
}

impl MeshStatus {
    /// Configured remote+local clusters that this agent reports connected and synced.
    fn connected_on(&self, agent: &AgentStatus) -> usize {
        connected_count(&self.configured, agent)
    }

    /// Whether everything is up: apiserver reachable, every agent answering and
    /// connected to every configured cluster.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.apiserver.reachable
            && self.agents.iter().all(|a| {
                a.status
                    .as_ref()
                    .is_some_and(|s| self.connected_on(s) == self.configured.len())
            })
    }

    /// One line on what is still missing (for `--wait` progress and timeouts).
    #[must_use]
    pub fn missing(&self) -> String {
        let mut parts = Vec::new();
        if !self.apiserver.reachable {
            parts.push("mesh API server unreachable".to_string());
        }
        let answering = self.agents.iter().filter(|a| a.status.is_some()).count();
        if answering < self.agents.len() {
            parts.push(format!(
                "{answering}/{} agents answering",
                self.agents.len()
            ));
        }
        for a in &self.agents {
            if let Some(s) = &a.status {
                let n = self.connected_on(s);
                if n < self.configured.len() {
                    parts.push(format!(
                        "{}: {n}/{} clusters connected",
                        s.node,
                        self.configured.len()
                    ));
                }
            }
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }

    /// Human-readable report.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::new();
        let ok = |b: bool| if b { "OK" } else { "DOWN" };
        out.push_str(&format!(
            "Cluster:     {} (id {})\n",
            self.cluster, self.cluster_id
        ));
        let api = &self.apiserver;
        out.push_str(&format!(
            "Mesh API:    {} {}{}\n",
            ok(api.reachable),
            api.endpoint.clone().unwrap_or_default(),
            match (&api.error, api.revision, api.watchers) {
                (Some(e), _, _) => format!(" ({e})"),
                (None, Some(r), Some(w)) => format!(" (revision {r}, {w} watchers)"),
                (None, Some(r), None) => format!(" (revision {r})"),
                _ => String::new(),
            }
        ));
        if !api.records.is_empty() {
            let list: Vec<String> = api
                .records
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            out.push_str(&format!("Exported:    {}\n", list.join(", ")));
        }
        let answering = self.agents.iter().filter(|a| a.status.is_some()).count();
        out.push_str(&format!(
            "Agents:      {answering}/{} answering{}\n",
            self.agents.len(),
            if self.agents.is_empty() {
                " (none listed in cluster.yaml; see enable --agent-socket)"
            } else {
                ""
            }
        ));
        let n = self.configured.len();
        let min_connected = self
            .agents
            .iter()
            .filter_map(|a| a.status.as_ref())
            .map(|s| self.connected_on(s))
            .min()
            .unwrap_or(0);
        out.push_str(&format!(
            "Clusters:    {n}/{n} configured, {min_connected}/{n} connected (least-connected agent)\n"
        ));
        for a in &self.agents {
            match &a.status {
                None => out.push_str(&format!(
                    "  {:<24} unreachable: {}\n",
                    a.socket,
                    a.error.clone().unwrap_or_default()
                )),
                Some(s) => {
                    out.push_str(&format!(
                        "  node {:<19} {}/{n} connected\n",
                        s.node,
                        self.connected_on(s)
                    ));
                    out.push_str(&cluster_lines(&self.configured, s));
                }
            }
        }
        out
    }
}

/// How many of the `configured` clusters `agent` reports connected and synced.
#[must_use]
pub fn connected_count(configured: &[String], agent: &AgentStatus) -> usize {
    configured
        .iter()
        .filter(|name| {
            agent
                .clusters
                .iter()
                .any(|c| &c.name == *name && c.connected && c.synced)
        })
        .count()
}

/// One indented line per configured cluster with the agent's view of it
/// (`connected, synced rev 7`, `disconnected rev 3 last error: ...`).
#[must_use]
pub fn cluster_lines(configured: &[String], agent: &AgentStatus) -> String {
    let mut out = String::new();
    for name in configured {
        let line = match agent.clusters.iter().find(|c| &c.name == name) {
            None => "not configured on this agent yet".to_string(),
            Some(c) => {
                let mut st = vec![if c.connected {
                    "connected"
                } else {
                    "disconnected"
                }];
                if c.phase == "refused" {
                    st.push("refused");
                }
                if c.synced {
                    st.push("synced");
                }
                if c.stale {
                    st.push("stale");
                }
                let err = c
                    .last_error
                    .clone()
                    .map(|e| format!(" last error: {e}"))
                    .unwrap_or_default();
                format!("{} rev {}{err}", st.join(", "), c.revision)
            }
        };
        out.push_str(&format!("    {name:<22} {line}\n"));
    }
    out
}

/// `KIND_SERVICE` → `services`.
fn kind_name(kind: i32) -> String {
    match clustermesh_api::v1::Kind::try_from(kind) {
        Ok(k) => {
            let base = k
                .as_str_name()
                .trim_start_matches("KIND_")
                .to_ascii_lowercase();
            match base.as_str() {
                "cluster_config" => base,
                "identity" => "identities".into(),
                _ => format!("{base}s"),
            }
        }
        Err(_) => format!("kind-{kind}"),
    }
}

/// Collects the status once.
pub async fn collect(dir: &StateDir, state: &ClusterState, timeout: Duration) -> MeshStatus {
    let configured = standalone::load_agent_config(dir)
        .map(|a| a.clusters.into_iter().map(|c| c.name).collect())
        .unwrap_or_else(|_| vec![state.name.clone()]);
    let apiserver = match meshapi::probe(dir, state, timeout).await {
        Ok(info) => ApiserverStatus {
            reachable: true,
            endpoint: Some(info.endpoint),
            revision: Some(info.revision),
            watchers: info.status.as_ref().map(|s| s.watchers.len()),
            records: info
                .status
                .map(|s| {
                    s.counts
                        .iter()
                        .map(|k| (kind_name(k.kind), k.count))
                        .collect()
                })
                .unwrap_or_default(),
            error: None,
        },
        Err(e) => ApiserverStatus {
            reachable: false,
            endpoint: None,
            revision: None,
            watchers: None,
            records: std::collections::BTreeMap::new(),
            error: Some(e.to_string()),
        },
    };
    let mut agents = Vec::new();
    for socket in &state.agent_sockets {
        let r = admin::get::<AgentStatus>(socket, "/v1/status", timeout).await;
        agents.push(AgentReport {
            socket: socket.display().to_string(),
            error: r.as_ref().err().map(ToString::to_string),
            status: r.ok(),
        });
    }
    MeshStatus {
        cluster: state.name.clone(),
        cluster_id: state.id,
        configured,
        apiserver,
        agents,
    }
}

/// Something `status --wait` polls: whether it is all up, and what is missing if not.
pub trait Readiness {
    /// Everything is up.
    fn ready(&self) -> bool;
    /// One line on what is still missing.
    fn missing(&self) -> String;
}

impl Readiness for MeshStatus {
    fn ready(&self) -> bool {
        MeshStatus::ready(self)
    }
    fn missing(&self) -> String {
        MeshStatus::missing(self)
    }
}

/// Polls until [`MeshStatus::ready`] or `wait` elapses, drawing a progress line on
/// stderr. Returns the last status and whether it became ready.
pub async fn wait_ready(
    dir: &StateDir,
    state: &ClusterState,
    wait: Duration,
    poll: Duration,
) -> (MeshStatus, bool) {
    let timeout = poll.max(Duration::from_secs(1));
    let result = poll_until_ready(wait, poll, || async {
        Ok::<_, std::convert::Infallible>(collect(dir, state, timeout).await)
    })
    .await;
    match result {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// Calls `collect` every `poll` until the result is ready or `wait` elapses, drawing a
/// spinner line on stderr when it is a terminal (otherwise a line whenever what is missing
/// changes). Returns the last result and whether it became ready; an error from `collect`
/// ends the wait at once.
pub async fn poll_until_ready<T, E, F, Fut>(
    wait: Duration,
    poll: Duration,
    mut collect: F,
) -> Result<(T, bool), E>
where
    T: Readiness,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    use std::io::IsTerminal;
    const SPINNER: [char; 4] = ['|', '/', '-', '\\'];
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut tick = 0usize;
    let mut last_report = String::new();
    loop {
        let st = match collect().await {
            Ok(st) => st,
            Err(e) => {
                if tty {
                    eprint!("\r\x1b[2K");
                }
                return Err(e);
            }
        };
        let done = st.ready() || start.elapsed() >= wait;
        if done {
            if tty {
                eprint!("\r\x1b[2K");
            }
            let ready = st.ready();
            return Ok((st, ready));
        }
        let missing = st.missing();
        if tty {
            // One redrawn line with a spinner.
            eprint!(
                "\r\x1b[2K{} waiting for the mesh ({}s/{}s): {missing}",
                SPINNER[tick % SPINNER.len()],
                start.elapsed().as_secs(),
                wait.as_secs()
            );
        } else if missing != last_report {
            // Logs and pipes get a line only when what is missing changes.
            eprintln!(
                "waiting for the mesh ({}s/{}s): {missing}",
                start.elapsed().as_secs(),
                wait.as_secs()
            );
            last_report = missing;
        }
        let _ = std::io::stderr().flush();
        tick += 1;
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ClusterStatus;

    fn agent(node: &str, clusters: &[(&str, bool, bool)]) -> AgentReport {
        AgentReport {
            socket: format!("/run/{node}.sock"),
            status: Some(AgentStatus {
                node: node.into(),
                local_cluster: "c1".into(),
                clusters: clusters
                    .iter()
                    .map(|(n, connected, synced)| ClusterStatus {
                        name: (*n).into(),
                        connected: *connected,
                        synced: *synced,
                        ..Default::default()
                    })
                    .collect(),
            }),
            error: None,
        }
    }

    fn status(agents: Vec<AgentReport>) -> MeshStatus {
        MeshStatus {
            cluster: "c1".into(),
            cluster_id: 1,
            configured: vec!["c1".into(), "c2".into()],
            apiserver: ApiserverStatus {
                reachable: true,
                endpoint: Some("127.0.0.1:2379".into()),
                revision: Some(3),
                watchers: Some(2),
                records: Default::default(),
                error: None,
            },
            agents,
        }
    }

    #[test]
    fn a_refused_cluster_shows_as_refused_with_the_reason() {
        let agent = AgentStatus {
            node: "n1".into(),
            local_cluster: "c1".into(),
            clusters: vec![ClusterStatus {
                name: "c3".into(),
                phase: "refused".into(),
                last_error: Some("reports cluster ID 2, which cluster c2 already uses".into()),
                ..Default::default()
            }],
        };
        let lines = cluster_lines(&["c3".to_owned()], &agent);
        assert!(
            lines.contains("disconnected, refused rev 0 last error: reports cluster ID 2"),
            "{lines}"
        );
    }

    #[test]
    fn ready_only_when_every_agent_is_connected_and_synced_to_every_cluster() {
        let all = status(vec![
            agent("n1", &[("c1", true, true), ("c2", true, true)]),
            agent("n2", &[("c1", true, true), ("c2", true, true)]),
        ]);
        assert!(all.ready());
        assert!(all.table().contains("2/2 configured, 2/2 connected"));

        let unsynced = status(vec![
            agent("n1", &[("c1", true, true), ("c2", true, false)]),
            agent("n2", &[("c1", true, true), ("c2", true, true)]),
        ]);
        assert!(!unsynced.ready());
        assert_eq!(unsynced.missing(), "n1: 1/2 clusters connected");
        assert!(unsynced.table().contains("2/2 configured, 1/2 connected"));

        let mut down = status(vec![AgentReport {
            socket: "/run/n3.sock".into(),
            status: None,
            error: Some("refused".into()),
        }]);
        down.apiserver.reachable = false;
        assert!(!down.ready());
        assert_eq!(
            down.missing(),
            "mesh API server unreachable, 0/1 agents answering"
        );
    }
}
