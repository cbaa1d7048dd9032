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
    /// The server mirrors its peers (from `Status`).
    #[serde(default)]
    pub mirror_enabled: bool,
    /// Each mirrored peer (from `Status`).
    #[serde(default)]
    pub mirrored: Vec<MirroredPeer>,
    /// The replica that runs the exporter and the mirror (from `Status`).
    #[serde(default)]
    pub leader: Option<Leader>,
    /// Error when unreachable.
    pub error: Option<String>,
}

/// The leader election among the mesh API server's replicas, as the replica that
/// answered sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Leader {
    /// The replica holding the lease (empty: none right now).
    pub holder: String,
    /// The replica that answered is the leader.
    pub answered_by_leader: bool,
    /// Fencing token of the current term.
    pub term: u64,
}

/// One peer the mesh API server mirrors into its store.
#[derive(Debug, Clone, Serialize)]
pub struct MirroredPeer {
    /// The peer cluster.
    pub cluster: String,
    /// connecting | syncing | watching | backoff | refused.
    pub phase: String,
    /// The mirror's watch of the peer is established.
    pub connected: bool,
    /// The peer's full state is in our store.
    pub synced: bool,
    /// Unreachable; its last-known records are kept.
    pub stale: bool,
    /// The peer's revision applied.
    pub revision: u64,
    /// The peer's records in our store.
    pub records: u64,
    /// The peer's address.
    pub endpoint: String,
    /// Why the last session ended, if it did.
    pub last_error: Option<String>,
}

impl MirroredPeer {
    fn from_proto(p: &clustermesh_api::v1::MirrorPeerStatus) -> Self {
        Self {
            cluster: p.cluster.clone(),
            phase: p.phase.clone(),
            connected: p.connected,
            synced: p.synced,
            stale: p.stale,
            revision: p.revision,
            records: p.records,
            endpoint: p.endpoint.clone(),
            last_error: (!p.last_error.is_empty()).then(|| p.last_error.clone()),
        }
    }

    fn line(&self) -> String {
        let state = match (self.connected, self.synced, self.stale) {
            (_, _, true) => "stale (unreachable, last-known records kept)",
            (true, true, _) => "synced",
            (true, false, _) => "syncing",
            (false, true, _) => "synced, reconnecting",
            (false, false, _) => "not synced",
        };
        let mut line = format!(
            "  peer {:<19} {} {state}, {} records, revision {} ({})",
            self.cluster, self.phase, self.records, self.revision, self.endpoint
        );
        if let Some(e) = &self.last_error {
            line.push_str(&format!("; last error: {e}"));
        }
        line.push('\n');
        line
    }
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
    /// Clusters of `agent.yaml` this agent has configured (reports a watcher for); 0 when
    /// it did not answer.
    pub configured_clusters: usize,
    /// Clusters of `agent.yaml` this agent is connected to and synced with.
    pub connected_clusters: usize,
}

impl AgentReport {
    /// The report of the agent at `socket`, counted against the `configured` clusters.
    #[must_use]
    pub fn new(socket: String, answer: Result<AgentStatus, String>, configured: &[String]) -> Self {
        let (configured_clusters, connected_clusters) = answer.as_ref().map_or((0, 0), |st| {
            (
                configured_count(configured, st),
                connected_count(configured, st),
            )
        });
        Self {
            socket,
            configured_clusters,
            connected_clusters,
            error: answer.as_ref().err().cloned(),
            status: answer.ok(),
        }
    }
}

/// Why a status with no agent is not ready.
pub const NO_AGENTS: &str = "no agents listed; pass --agent-socket PATH (repeatable) or list their admin sockets under agent_sockets in cluster.yaml";

impl MeshStatus {
    /// Whether everything is up: apiserver reachable, at least one agent, every agent
    /// answering and connected to every configured cluster.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.apiserver.reachable
            && !self.agents.is_empty()
            && self
                .agents
                .iter()
                .all(|a| fully_connected(&self.configured, a.status.as_ref()))
    }

    /// One line on what is still missing (for `--wait` progress and timeouts).
    #[must_use]
    pub fn missing(&self) -> String {
        let mut parts = Vec::new();
        if !self.apiserver.reachable {
            parts.push("mesh API server unreachable".to_string());
        }
        if self.agents.is_empty() {
            parts.push(NO_AGENTS.to_string());
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
                let n = connected_count(&self.configured, s);
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
        if let Some(l) = &api.leader {
            let holder = if l.holder.is_empty() {
                "none (election in progress)"
            } else {
                l.holder.as_str()
            };
            let who = if l.answered_by_leader {
                "this replica"
            } else {
                "another replica"
            };
            out.push_str(&format!("Leader:      {holder} ({who}, term {})\n", l.term));
        }
        if api.mirror_enabled {
            out.push_str(&format!(
                "Mirroring:   {} peers, {} synced\n",
                api.mirrored.len(),
                api.mirrored.iter().filter(|p| p.synced).count()
            ));
            for p in &api.mirrored {
                out.push_str(&p.line());
            }
        }
        let answering = self.agents.iter().filter(|a| a.status.is_some()).count();
        out.push_str(&format!(
            "Agents:      {answering}/{} answering{}\n",
            self.agents.len(),
            if self.agents.is_empty() {
                format!(" ({NO_AGENTS})")
            } else {
                String::new()
            }
        ));
        let n = self.configured.len();
        // Counted per agent from what it reports (an agent that has not reloaded
        // agent.yaml yet shows fewer configured); an unreachable agent counts as 0.
        let least =
            |count: fn(&AgentReport) -> usize| self.agents.iter().map(count).min().unwrap_or(0);
        out.push_str(&format!(
            "Clusters:    {}/{n} configured, {}/{n} connected (least agent)\n",
            least(|a| a.configured_clusters),
            least(|a| a.connected_clusters)
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
                        "  node {:<19} {}/{n} configured, {}/{n} connected\n",
                        s.node, a.configured_clusters, a.connected_clusters
                    ));
                    out.push_str(&cluster_lines(&self.configured, s));
                }
            }
        }
        out
    }
}

/// How many of the `configured` clusters `agent` reports having configured (a watcher
/// for each, whatever its state): what "N/N configured" counts, in both modes.
#[must_use]
pub fn configured_count(configured: &[String], agent: &AgentStatus) -> usize {
    configured
        .iter()
        .filter(|name| agent.clusters.iter().any(|c| &c.name == *name))
        .count()
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

/// Whether `agent` answered and reports every one of the `configured` clusters connected
/// and synced: what a ready mesh needs of each agent, in both modes.
#[must_use]
pub fn fully_connected(configured: &[String], agent: Option<&AgentStatus>) -> bool {
    agent.is_some_and(|a| connected_count(configured, a) == configured.len())
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
                "policy" => "policies".into(),
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
            mirror_enabled: info.status.as_ref().is_some_and(|s| s.mirror_enabled),
            leader: info
                .status
                .as_ref()
                .and_then(|s| s.leader.as_ref())
                .filter(|l| l.enabled)
                .map(|l| Leader {
                    holder: l.holder.clone(),
                    answered_by_leader: l.is_leader,
                    term: l.term,
                }),
            mirrored: info
                .status
                .as_ref()
                .map(|s| {
                    s.mirror_peers
                        .iter()
                        .map(MirroredPeer::from_proto)
                        .collect()
                })
                .unwrap_or_default(),
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
            mirror_enabled: false,
            mirrored: Vec::new(),
            leader: None,
            error: Some(e.to_string()),
        },
    };
    let mut agents = Vec::new();
    for socket in &state.agent_sockets {
        let r = admin::get::<AgentStatus>(socket, "/v1/status", timeout)
            .await
            .map_err(|e| e.to_string());
        agents.push(AgentReport::new(
            socket.display().to_string(),
            r,
            &configured,
        ));
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

/// An agent's `/v1/status` for tests: node `node` of cluster `local`, reporting
/// `clusters` as `(name, connected, synced)`.
#[cfg(test)]
pub(crate) fn test_agent_status(
    node: &str,
    local: &str,
    clusters: &[(&str, bool, bool)],
) -> AgentStatus {
    AgentStatus {
        node: node.into(),
        local_cluster: local.into(),
        clusters: clusters
            .iter()
            .map(|(n, connected, synced)| admin::ClusterStatus {
                name: (*n).into(),
                connected: *connected,
                synced: *synced,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ClusterStatus;

    #[test]
    fn record_kinds_are_named_in_plural() {
        use clustermesh_api::v1::Kind;
        assert_eq!(kind_name(Kind::Policy as i32), "policies");
        assert_eq!(kind_name(Kind::Identity as i32), "identities");
        assert_eq!(kind_name(Kind::Service as i32), "services");
        assert_eq!(kind_name(Kind::ClusterConfig as i32), "cluster_config");
        assert_eq!(kind_name(999), "kind-999");
    }

    fn agent(node: &str, clusters: &[(&str, bool, bool)]) -> AgentReport {
        AgentReport::new(
            format!("/run/{node}.sock"),
            Ok(test_agent_status(node, "c1", clusters)),
            &["c1".to_owned(), "c2".to_owned()],
        )
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
                mirror_enabled: false,
                mirrored: Vec::new(),
                leader: None,
                error: None,
            },
            agents,
        }
    }

    #[test]
    fn mirrored_peers_are_listed_with_their_state() {
        let mut s = status(vec![agent("n1", &[("c1", true, true), ("c2", true, true)])]);
        assert!(!s.table().contains("Mirroring"), "{}", s.table());
        s.apiserver.mirror_enabled = true;
        s.apiserver.mirrored = vec![
            MirroredPeer::from_proto(&clustermesh_api::v1::MirrorPeerStatus {
                cluster: "c2".into(),
                phase: "watching".into(),
                connected: true,
                synced: true,
                revision: 41,
                records: 12,
                endpoint: "10.0.0.2:2379".into(),
                ..Default::default()
            }),
            MirroredPeer::from_proto(&clustermesh_api::v1::MirrorPeerStatus {
                cluster: "c3".into(),
                phase: "backoff".into(),
                stale: true,
                synced: true,
                records: 7,
                last_error: "connect 10.0.0.3:2379: refused".into(),
                ..Default::default()
            }),
        ];
        s.apiserver.leader = Some(Leader {
            holder: "replica-1".into(),
            answered_by_leader: false,
            term: 17,
        });
        let table = s.table();
        assert!(
            table.contains("Leader:      replica-1 (another replica, term 17)"),
            "{table}"
        );
        assert!(table.contains("Mirroring:   2 peers, 2 synced"), "{table}");
        assert!(
            table.contains("peer c2                  watching synced, 12 records, revision 41"),
            "{table}"
        );
        assert!(
            table.contains("stale (unreachable, last-known records kept), 7 records")
                && table.contains("last error: connect 10.0.0.3:2379: refused"),
            "{table}"
        );
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
            ..Default::default()
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

        let mut down = status(vec![AgentReport::new(
            "/run/n3.sock".into(),
            Err("refused".into()),
            &[],
        )]);
        down.apiserver.reachable = false;
        assert!(!down.ready());
        assert_eq!(
            down.missing(),
            "mesh API server unreachable, 0/1 agents answering"
        );
    }

    #[test]
    fn no_agents_is_not_ready_and_says_how_to_list_them() {
        let none = status(Vec::new());
        assert!(!none.ready());
        assert_eq!(none.missing(), NO_AGENTS);
        assert!(none
            .table()
            .contains("Agents:      0/0 answering (no agents listed; pass --agent-socket"));
    }

    #[test]
    fn configured_counts_what_each_agent_reports_not_agent_yaml() {
        // n2 has not picked up c2 yet: it reports only its own cluster.
        let st = status(vec![
            agent("n1", &[("c1", true, true), ("c2", false, false)]),
            agent("n2", &[("c1", true, true)]),
        ]);
        let table = st.table();
        assert!(
            table.contains("Clusters:    1/2 configured, 1/2 connected (least agent)"),
            "{table}"
        );
        assert!(
            table.contains("node n1                  2/2 configured, 1/2 connected"),
            "{table}"
        );
        assert!(
            table.contains("node n2                  1/2 configured, 1/2 connected"),
            "{table}"
        );
        assert!(
            table.contains("c2                     not configured on this agent yet"),
            "{table}"
        );
    }
}
