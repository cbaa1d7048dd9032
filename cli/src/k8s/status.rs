//! `clustermesh --context C status` in Kubernetes mode: the mesh API server workload, its
//! Service and address, the agent DaemonSet and every agent's cluster connections.
//!
//! Each agent is asked for `GET /v1/status` on its HTTP endpoint (`--http-listen`, chart
//! value `agent.httpPort`) through the API server's pod proxy
//! (`/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/v1/status`), so the CLI needs no
//! network path to the nodes. The agents answer only with the token of Secret
//! `clustermesh-agent-admin-token` in the `X-Clustermesh-Token` header (see
//! [`super::agent_token`]). Connections are summarized like cilium-cli does: per agent
//! "N/N configured, N/N connected", and per cluster how many agents have it configured and
//! connected.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::Client;
use serde::Serialize;

use super::endpoints::endpoints_of;
use super::error::KubeModeError;
use super::mesh::read_config;
use super::objects::{
    is_not_found, reason, Objects, AGENT_CONFIG_KEY, AGENT_CONFIG_MAP, APISERVER_SERVICE,
};
use super::KubeTarget;
use crate::admin::AgentStatus;
use crate::status::{cluster_lines, configured_count, connected_count, fully_connected, Readiness};
use clustermesh_api::agent_config::AgentConfig;

/// Name of the mesh API server Deployment or StatefulSet.
pub const APISERVER_WORKLOAD: &str = "clustermesh-apiserver";
/// Name of the agent DaemonSet.
pub const AGENT_DAEMONSET: &str = "clustermesh-agent";
/// Name of the agent container port serving `/v1/status` (chart: `agent.httpPort`).
pub const AGENT_HTTP_PORT_NAME: &str = "http";
/// Agent HTTP port when the DaemonSet does not name one (the chart's default).
pub const DEFAULT_AGENT_HTTP_PORT: u16 = 9963;
/// Agents asked at the same time.
const PARALLEL_AGENT_QUERIES: usize = 16;

/// Everything `status` reports about one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct KubeStatus {
    /// The kubeconfig context.
    pub context: String,
    /// Namespace of the mesh components.
    pub namespace: String,
    /// Cluster name.
    pub cluster: String,
    /// Cluster ID.
    pub cluster_id: u32,
    /// Clusters in the agent configuration (this one first).
    pub configured: Vec<String>,
    /// Why the configured list is only this cluster, when the agent ConfigMap is unusable.
    pub configured_error: Option<String>,
    /// The mesh API server workload.
    pub apiserver: Workload,
    /// The mesh API Service.
    pub service: MeshService,
    /// The agent DaemonSet.
    pub agents: Workload,
    /// Port the agents were asked on.
    pub agent_http_port: u16,
    /// One entry per agent pod, by pod name.
    pub agent_pods: Vec<AgentPod>,
    /// Per configured cluster: how many agents have it configured and connected.
    pub connections: Vec<ClusterConnections>,
    /// Everything is up.
    pub ready: bool,
}

/// A Deployment, StatefulSet or DaemonSet: ready versus desired pods.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Workload {
    /// `Deployment`, `StatefulSet` or `DaemonSet`; None when not found.
    pub kind: Option<String>,
    /// Its name.
    pub name: String,
    /// Desired replicas (DaemonSet: nodes it should run on).
    pub desired: i32,
    /// Ready pods.
    pub ready: i32,
    /// Why it could not be read.
    pub error: Option<String>,
}

impl Workload {
    fn is_ready(&self) -> bool {
        self.kind.is_some()
            && self.error.is_none()
            && self.desired > 0
            && self.ready >= self.desired
    }

    fn summary(&self) -> String {
        match (&self.kind, &self.error) {
            (_, Some(e)) => format!("{} unreadable: {e}", self.name),
            (None, None) => format!("{} not found", self.name),
            (Some(k), None) => format!("{k} {} {}/{} ready", self.name, self.ready, self.desired),
        }
    }
}

/// The mesh API Service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshService {
    /// `LoadBalancer`, `NodePort`, ...; None when not found.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// Where other clusters reach the mesh API (`host:port`).
    pub endpoints: Vec<String>,
    /// Why there is no address.
    pub error: Option<String>,
}

/// One agent pod.
#[derive(Debug, Clone, Serialize)]
pub struct AgentPod {
    /// Pod name.
    pub pod: String,
    /// Node it runs on.
    pub node: Option<String>,
    /// The agent's `/v1/status`, when it answered.
    pub status: Option<AgentStatus>,
    /// Why it did not.
    pub error: Option<String>,
}

/// One configured cluster across the agents.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterConnections {
    /// Cluster name.
    pub cluster: String,
    /// Agents reporting it in their configuration.
    pub configured: usize,
    /// Agents connected to it and synced.
    pub connected: usize,
    /// Agent pods.
    pub agents: usize,
}

impl AgentPod {
    fn label(&self) -> String {
        pod_label(&self.pod, self.node.as_deref())
    }
}

/// How an agent pod is named in reports: `pod (node n)`, or the pod alone before it is
/// scheduled.
pub(crate) fn pod_label(pod: &str, node: Option<&str>) -> String {
    match node {
        Some(n) => format!("{pod} (node {n})"),
        None => pod.to_owned(),
    }
}

impl KubeStatus {
    fn compute_ready(&self) -> bool {
        self.apiserver.is_ready()
            && self.service.error.is_none()
            && self.agents.is_ready()
            && !self.agent_pods.is_empty()
            && self
                .agent_pods
                .iter()
                .all(|p| fully_connected(&self.configured, p.status.as_ref()))
    }

    /// Human-readable report.
    #[must_use]
    pub fn table(&self) -> String {
        let n = self.configured.len();
        let mut out = format!(
            "Cluster:     {} (id {}), context {}, namespace {}\n",
            self.cluster, self.cluster_id, self.context, self.namespace
        );
        let ok = |b: bool| if b { "OK  " } else { "DOWN" };
        out.push_str(&format!(
            "Mesh API:    {} {}\n",
            ok(self.apiserver.is_ready()),
            self.apiserver.summary()
        ));
        out.push_str(&format!(
            "Service:     {} {} {}\n",
            ok(self.service.error.is_none()),
            self.service.type_.as_deref().unwrap_or("-"),
            match &self.service.error {
                Some(e) => e.clone(),
                None => format!("address {}", self.service.endpoints.join(", ")),
            }
        ));
        let answering = self
            .agent_pods
            .iter()
            .filter(|p| p.status.is_some())
            .count();
        out.push_str(&format!(
            "Agents:      {} {}, {answering}/{} answering on port {}\n",
            ok(self.agents.is_ready() && answering == self.agent_pods.len()),
            self.agents.summary(),
            self.agent_pods.len(),
            self.agent_http_port
        ));
        if let Some(e) = &self.configured_error {
            out.push_str(&format!("Config:      {e}\n"));
        }
        out.push_str("Cluster connections:\n");
        for c in &self.connections {
            out.push_str(&format!(
                "  - {}: {}/{} configured, {}/{} connected\n",
                c.cluster, c.configured, c.agents, c.connected, c.agents
            ));
        }
        let fully = self
            .agent_pods
            .iter()
            .filter(|p| fully_connected(&self.configured, p.status.as_ref()))
            .count();
        out.push_str(&format!(
            "Summary:     {fully}/{} agents connected to all {n} clusters\n",
            self.agent_pods.len()
        ));
        out.push_str("Agent pods:\n");
        for p in &self.agent_pods {
            match &p.status {
                None => out.push_str(&format!(
                    "  {} unreachable: {}\n",
                    p.label(),
                    p.error.as_deref().unwrap_or("no answer")
                )),
                Some(s) => {
                    out.push_str(&format!(
                        "  {}: {}/{n} configured, {}/{n} connected\n",
                        p.label(),
                        configured_count(&self.configured, s),
                        connected_count(&self.configured, s)
                    ));
                    out.push_str(&cluster_lines(&self.configured, s));
                }
            }
        }
        out
    }
}

impl Readiness for KubeStatus {
    fn ready(&self) -> bool {
        self.ready
    }

    fn missing(&self) -> String {
        let mut parts = Vec::new();
        if !self.apiserver.is_ready() {
            parts.push(format!("mesh API server {}", self.apiserver.summary()));
        }
        if let Some(e) = &self.service.error {
            parts.push(format!("mesh API Service: {e}"));
        }
        if !self.agents.is_ready() {
            parts.push(format!("agents {}", self.agents.summary()));
        }
        if self.agent_pods.is_empty() {
            parts.push("no agent pods found".into());
        }
        for p in &self.agent_pods {
            match &p.status {
                None => parts.push(format!(
                    "agent {} unreachable: {}",
                    p.label(),
                    p.error.as_deref().unwrap_or("no answer")
                )),
                Some(s) => {
                    let n = connected_count(&self.configured, s);
                    if n < self.configured.len() {
                        let down: Vec<String> = self
                            .configured
                            .iter()
                            .map(|name| (name, s.clusters.iter().find(|c| &c.name == name)))
                            .filter(|(_, c)| !c.is_some_and(|c| c.connected && c.synced))
                            .map(|(name, c)| match c {
                                None => format!("{name} not configured yet"),
                                Some(c) if !c.connected => format!(
                                    "{name} disconnected{}",
                                    c.last_error
                                        .as_ref()
                                        .map(|e| format!(" ({e})"))
                                        .unwrap_or_default()
                                ),
                                Some(_) => format!("{name} not synced yet"),
                            })
                            .collect();
                        parts.push(format!(
                            "agent {}: {n}/{} clusters connected ({})",
                            p.label(),
                            self.configured.len(),
                            down.join("; ")
                        ));
                    }
                }
            }
        }
        if parts.is_empty() {
            "nothing".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The apiserver Deployment, or its StatefulSet (raft with several replicas).
async fn apiserver_workload(target: &KubeTarget) -> Workload {
    let mut w = Workload {
        name: APISERVER_WORKLOAD.into(),
        ..Workload::default()
    };
    let deployments: Api<Deployment> = Api::namespaced(target.client.clone(), &target.namespace);
    match deployments.get(APISERVER_WORKLOAD).await {
        Ok(d) => {
            w.kind = Some("Deployment".into());
            w.desired = d.spec.replicas.unwrap_or(1);
            w.ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            return w;
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => {
            w.error = Some(format!("Deployment: {}", reason(&e)));
            return w;
        }
    }
    let sets: Api<StatefulSet> = Api::namespaced(target.client.clone(), &target.namespace);
    match sets.get(APISERVER_WORKLOAD).await {
        Ok(s) => {
            w.kind = Some("StatefulSet".into());
            w.desired = s.spec.replicas.unwrap_or(1);
            w.ready = s.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        }
        Err(e) if is_not_found(&e) => {}
        Err(e) => w.error = Some(format!("StatefulSet: {}", reason(&e))),
    }
    w
}

/// The agent DaemonSet, its pod label selector and the agents' HTTP port.
async fn agent_daemonset(target: &KubeTarget) -> (Workload, Option<String>, u16) {
    let mut w = Workload {
        name: AGENT_DAEMONSET.into(),
        ..Workload::default()
    };
    let api: Api<DaemonSet> = Api::namespaced(target.client.clone(), &target.namespace);
    let ds = match api.get(AGENT_DAEMONSET).await {
        Ok(ds) => ds,
        Err(e) => {
            if !is_not_found(&e) {
                w.error = Some(reason(&e));
            }
            return (w, None, DEFAULT_AGENT_HTTP_PORT);
        }
    };
    w.kind = Some("DaemonSet".into());
    if let Some(s) = &ds.status {
        w.desired = s.desired_number_scheduled;
        w.ready = s.number_ready;
    }
    let spec = ds.spec;
    let selector = spec
        .selector
        .match_labels
        .filter(|m| !m.is_empty())
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        });
    let port = spec
        .template
        .spec
        .iter()
        .flat_map(|p| p.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(AGENT_HTTP_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_AGENT_HTTP_PORT);
    (w, selector, port)
}

/// Why an agent pod gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgentFailure {
    /// The request did not reach the agent, or no answer came back.
    Unreachable(String),
    /// The agent answered with an error (its own words), or with something unreadable.
    Refused(String),
}

impl AgentFailure {
    /// The reason alone.
    pub(crate) fn reason(&self) -> &str {
        match self {
            Self::Unreachable(r) | Self::Refused(r) => r,
        }
    }
}

impl std::fmt::Display for AgentFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(r) => write!(f, "unreachable: {r}"),
            Self::Refused(r) => f.write_str(r),
        }
    }
}

/// kube-rs' reason for an error body that is not a Kubernetes `Status`: through the pod
/// proxy that is the pod's own (plain-text) answer.
const NOT_A_STATUS: &str = "Failed to parse error data";

/// `GET {path}` of one agent pod through the API server's pod proxy, with the agents'
/// admin token (or, when there is none, why: said next to the agent's refusal).
async fn get_one<T: serde::de::DeserializeOwned>(
    client: Client,
    namespace: String,
    pod: String,
    port: u16,
    path: &str,
    token: Arc<Result<String, String>>,
    timeout: Duration,
) -> Result<T, AgentFailure> {
    let url = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}");
    let mut request = http::Request::get(&url).header("Accept", "application/json");
    if let Ok(token) = token.as_ref() {
        request = request.header(super::agent_token::TOKEN_HEADER, token.as_str());
    }
    let request = request
        .body(Vec::new())
        .map_err(|e| AgentFailure::Unreachable(format!("cannot build the request {url}: {e}")))?;
    let text = match tokio::time::timeout(timeout, client.request_text(request)).await {
        Err(_) => {
            return Err(AgentFailure::Unreachable(format!(
                "no answer within {} through the pod proxy",
                humantime::format_duration(timeout)
            )))
        }
        Ok(Err(kube::Error::Api(status))) if status.reason == NOT_A_STATUS => {
            let msg = status.message.trim();
            let hint = match token.as_ref() {
                Err(why) if matches!(status.code, 401 | 403) => format!(" ({why})"),
                _ => String::new(),
            };
            return Err(AgentFailure::Refused(format!(
                "the agent answered HTTP {}: {}{hint}",
                status.code,
                if msg.is_empty() { "no message" } else { msg }
            )));
        }
        Ok(Err(e)) => return Err(AgentFailure::Unreachable(reason(&e))),
        Ok(Ok(text)) => text,
    };
    serde_json::from_str(&text).map_err(|e| {
        AgentFailure::Refused(format!(
            "invalid {path} answer ({e}); is the agent the same version as this CLI?"
        ))
    })
}

/// An agent pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentRef {
    /// Pod name.
    pub(crate) pod: String,
    /// Node it runs on.
    pub(crate) node: Option<String>,
}

/// The agent DaemonSet, the agents' HTTP port and the agent pods by name (None: no
/// DaemonSet, or one without a pod selector).
pub(crate) async fn agent_pods(
    target: &KubeTarget,
) -> Result<(Workload, u16, Option<Vec<AgentRef>>), KubeModeError> {
    let (workload, selector, port) = agent_daemonset(target).await;
    let Some(selector) = selector else {
        return Ok((workload, port, None));
    };
    let pods: Api<Pod> = Api::namespaced(target.client.clone(), &target.namespace);
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| Objects::new(target).api_error("list", format!("Pods {selector}"), &e))?;
    let mut refs: Vec<AgentRef> = list
        .items
        .into_iter()
        .map(|p| AgentRef {
            pod: p.metadata.name.unwrap_or_default(),
            node: p.spec.and_then(|s| s.node_name),
        })
        .collect();
    refs.sort_by(|a, b| a.pod.cmp(&b.pod));
    Ok((workload, port, Some(refs)))
}

/// `GET {path}` of each of `pods` (at most [`PARALLEL_AGENT_QUERIES`] at a time), in the
/// order given.
pub(crate) async fn proxy_get<T: serde::de::DeserializeOwned + Send + 'static>(
    target: &KubeTarget,
    pods: &[AgentRef],
    port: u16,
    path: &'static str,
    timeout: Duration,
) -> Result<Vec<(AgentRef, Result<T, AgentFailure>)>, KubeModeError> {
    let client = target.proxy.clone();
    let token = Arc::new(if pods.is_empty() {
        Err(String::new())
    } else {
        super::agent_token::read(&Objects::new(target)).await
    });
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL_AGENT_QUERIES));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, p) in pods.iter().enumerate() {
        let (client, ns, limit, pod, token) = (
            client.clone(),
            target.namespace.clone(),
            Arc::clone(&limit),
            p.pod.clone(),
            Arc::clone(&token),
        );
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            (
                i,
                get_one::<T>(client, ns, pod, port, path, token, timeout).await,
            )
        });
    }
    let mut answers: Vec<Option<Result<T, AgentFailure>>> = pods.iter().map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((i, answer)) => {
                if let Some(slot) = answers.get_mut(i) {
                    *slot = Some(answer);
                }
            }
            Err(e) => tracing::warn!(error = %e, "agent query task failed"),
        }
    }
    Ok(pods
        .iter()
        .cloned()
        .zip(answers)
        .map(|(p, a)| {
            let a =
                a.unwrap_or_else(|| Err(AgentFailure::Unreachable("the query task failed".into())));
            (p, a)
        })
        .collect())
}

/// Reads everything once.
///
/// # Errors
/// [`KubeModeError::NotEnabled`] when the mesh is not enabled in the namespace, or an
/// API error reading its settings.
pub async fn collect(target: &KubeTarget, timeout: Duration) -> Result<KubeStatus, KubeModeError> {
    let objs = Objects::new(target);
    let config = read_config(&objs)
        .await?
        .ok_or_else(|| objs.not_enabled(format!("ConfigMap {}", super::objects::CONFIG_MAP)))?;

    let (configured, configured_error) = match objs.config_map(AGENT_CONFIG_MAP).await {
        Ok(Some(cm)) => match cm.data.unwrap_or_default().get(AGENT_CONFIG_KEY) {
            Some(text) => match AgentConfig::parse(std::path::Path::new(AGENT_CONFIG_KEY), text) {
                Ok(a) => (a.clusters.into_iter().map(|c| c.name).collect(), None),
                Err(e) => (
                    vec![config.name.clone()],
                    Some(format!("ConfigMap {AGENT_CONFIG_MAP}: {e}")),
                ),
            },
            None => (
                vec![config.name.clone()],
                Some(format!(
                    "ConfigMap {AGENT_CONFIG_MAP} has no {AGENT_CONFIG_KEY}; run enable again"
                )),
            ),
        },
        Ok(None) => (
            vec![config.name.clone()],
            Some(format!(
                "ConfigMap {AGENT_CONFIG_MAP} not found; run enable again"
            )),
        ),
        Err(e) => (vec![config.name.clone()], Some(e.to_string())),
    };

    let apiserver = apiserver_workload(target).await;
    let service = {
        // One GET of the Service gives both its type and (with the nodes for a NodePort)
        // its endpoints.
        let (type_, endpoints) = match objs.service(APISERVER_SERVICE).await {
            Ok(Some(svc)) => (
                svc.spec.as_ref().and_then(|s| s.type_.clone()),
                endpoints_of(&objs, &svc).await,
            ),
            Ok(None) => (
                None,
                Err(objs.not_enabled(format!("Service {APISERVER_SERVICE}"))),
            ),
            Err(e) => (None, Err(e)),
        };
        match endpoints {
            Ok(endpoints) => MeshService {
                type_,
                endpoints,
                error: None,
            },
            Err(e) => MeshService {
                type_,
                endpoints: Vec::new(),
                error: Some(e.to_string()),
            },
        }
    };

    let (agents, port, pods) = agent_pods(target).await?;
    let mut agent_pods = Vec::new();
    if let Some(pods) = pods {
        for (p, r) in proxy_get::<AgentStatus>(target, &pods, port, "/v1/status", timeout).await? {
            agent_pods.push(AgentPod {
                pod: p.pod,
                node: p.node,
                error: r.as_ref().err().map(|e| e.reason().to_string()),
                status: r.ok(),
            });
        }
    }

    let connections = configured
        .iter()
        .map(|name| {
            let answering = agent_pods.iter().filter_map(|p| p.status.as_ref());
            let on: Vec<_> = answering
                .filter_map(|s| s.clusters.iter().find(|c| &c.name == name))
                .collect();
            ClusterConnections {
                cluster: name.clone(),
                configured: on.len(),
                connected: on.iter().filter(|c| c.connected && c.synced).count(),
                agents: agent_pods.len(),
            }
        })
        .collect();

    let mut st = KubeStatus {
        context: target.context.clone(),
        namespace: target.namespace.clone(),
        cluster: config.name,
        cluster_id: config.id,
        configured,
        configured_error,
        apiserver,
        service,
        agents,
        agent_http_port: port,
        agent_pods,
        connections,
        ready: false,
    };
    st.ready = st.compute_ready();
    Ok(st)
}

/// Collects until everything is up or `wait` passes, with the same progress line as the
/// standalone `status --wait`. Returns the last status and whether it became ready.
///
/// # Errors
/// As [`collect`].
pub async fn wait_ready(
    target: &KubeTarget,
    wait: Duration,
    poll: Duration,
    timeout: Duration,
) -> Result<(KubeStatus, bool), KubeModeError> {
    crate::status::poll_until_ready(wait, poll, || collect(target, timeout)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::test_agent_status;

    fn pod(name: &str, clusters: &[(&str, bool, bool)]) -> AgentPod {
        AgentPod {
            pod: name.into(),
            node: None,
            status: Some(test_agent_status(name, "east", clusters)),
            error: None,
        }
    }

    fn status(pods: Vec<AgentPod>) -> KubeStatus {
        let ready = |kind: &str, name: &str| Workload {
            kind: Some(kind.into()),
            name: name.into(),
            desired: 1,
            ready: 1,
            error: None,
        };
        let mut st = KubeStatus {
            context: "east".into(),
            namespace: "kube-system".into(),
            cluster: "east".into(),
            cluster_id: 1,
            configured: vec!["east".into(), "west".into(), "north".into()],
            configured_error: None,
            apiserver: ready("Deployment", APISERVER_WORKLOAD),
            service: MeshService {
                type_: Some("NodePort".into()),
                endpoints: vec!["10.0.0.1:32379".into()],
                error: None,
            },
            agents: ready("DaemonSet", AGENT_DAEMONSET),
            agent_http_port: DEFAULT_AGENT_HTTP_PORT,
            agent_pods: pods,
            connections: Vec::new(),
            ready: false,
        };
        st.ready = st.compute_ready();
        st
    }

    #[test]
    fn missing_names_each_cluster_that_is_not_up_and_why() {
        let st = status(vec![pod(
            "a",
            &[("east", true, true), ("west", true, false)],
        )]);
        assert!(!st.ready);
        assert_eq!(
            st.missing(),
            "agent a: 1/3 clusters connected (west not synced yet; north not configured yet)"
        );
        let table = st.table();
        assert!(
            table.contains("  a: 2/3 configured, 1/3 connected\n"),
            "{table}"
        );
        assert!(
            table.contains("north                  not configured on this agent yet"),
            "{table}"
        );
    }

    #[test]
    fn ready_needs_agent_pods_and_every_one_fully_connected() {
        assert!(!status(Vec::new()).ready);
        assert_eq!(status(Vec::new()).missing(), "no agent pods found");
        let all = [
            ("east", true, true),
            ("west", true, true),
            ("north", true, true),
        ];
        let st = status(vec![pod("a", &all), pod("b", &all)]);
        assert!(st.ready);
        assert_eq!(st.missing(), "nothing");
        let mut missing_ds = status(vec![pod("a", &all)]);
        missing_ds.agents.kind = None;
        assert!(!missing_ds.compute_ready());
        assert_eq!(missing_ds.missing(), "agents clustermesh-agent not found");
    }
}
