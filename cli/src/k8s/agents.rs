//! `service list`, `bpf lb list`, `identity list`, `endpoint list` and `policy get` in
//! Kubernetes mode: every agent pod (or the one on `--node`) is asked through the API
//! server's pod proxy, on the same HTTP endpoint `status` reads (`clustermesh-agent
//! --http-listen`, chart value `agent.httpPort`), which serves the admin socket's JSON:
//! `GET /v1/services`, `/v1/bpf/lb`, `/v1/identities`, `/v1/endpoints` and `/v1/policy`.
//!
//! Each agent's answer is kept with its pod and node; an agent that cannot be reached, or
//! that refuses (an agent running `--datapath record` has no eBPF maps to dump), is listed
//! with the reason and makes the command fail after printing what the others answered.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::KubeModeError;
use super::mesh::read_config;
use super::objects::{Objects, CONFIG_MAP};
use super::status::{agent_pods, pod_label, proxy_get, AgentRef};
use super::KubeTarget;
use crate::admin::{BpfDump, ServiceStatus};
use clustermesh_api::admin_policy::{EndpointEntry, IdentityEntry, PolicyReport};

/// What one agent answered.
#[derive(Debug, Clone, Serialize)]
pub struct AgentAnswer<T> {
    /// Pod name.
    pub pod: String,
    /// Node it runs on.
    pub node: Option<String>,
    /// The answer, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<T>,
    /// Why there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl<T> AgentAnswer<T> {
    /// `pod (node n)`.
    #[must_use]
    pub fn label(&self) -> String {
        pod_label(&self.pod, self.node.as_deref())
    }
}

/// Every selected agent's answer, by pod name.
#[derive(Debug, Clone, Serialize)]
pub struct AgentAnswers<T> {
    /// The context.
    pub context: String,
    /// One entry per agent pod.
    pub agents: Vec<AgentAnswer<T>>,
}

impl<T> AgentAnswers<T> {
    /// `Err` naming every agent without an answer (`what`: what was asked for).
    ///
    /// # Errors
    /// [`KubeModeError::AgentsFailed`] when at least one agent gave no answer.
    pub fn check(&self, what: &'static str) -> Result<(), KubeModeError> {
        let failed: Vec<String> = self
            .agents
            .iter()
            .filter_map(|a| a.error.as_ref().map(|e| format!("{}: {e}", a.label())))
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        Err(KubeModeError::AgentsFailed {
            context: self.context.clone(),
            failed: failed.len(),
            total: self.agents.len(),
            what,
            detail: failed.join("; "),
        })
    }
}

/// Asks `path` of every agent pod, or of the one on `node`.
async fn ask<T: DeserializeOwned + Send + 'static>(
    target: &KubeTarget,
    node: Option<&str>,
    path: &'static str,
    timeout: Duration,
) -> Result<AgentAnswers<T>, KubeModeError> {
    let objs = Objects::new(target);
    read_config(&objs)
        .await?
        .ok_or_else(|| objs.not_enabled(format!("ConfigMap {CONFIG_MAP}")))?;
    let (_, port, pods) = agent_pods(target).await?;
    let Some(pods) = pods else {
        return Err(objs.malformed(
            format!("DaemonSet {}", super::status::AGENT_DAEMONSET),
            "it is missing (or has no pod selector) although the mesh is enabled".into(),
            "run enable again to reinstall the agents",
        ));
    };
    if pods.is_empty() {
        return Err(KubeModeError::NoAgents {
            context: target.context.clone(),
            namespace: target.namespace.clone(),
        });
    }
    let selected: Vec<AgentRef> = match node {
        None => pods,
        Some(n) => {
            let on: Vec<AgentRef> = pods
                .iter()
                .filter(|p| p.node.as_deref() == Some(n))
                .cloned()
                .collect();
            if on.is_empty() {
                let mut nodes: Vec<String> = pods.iter().filter_map(|p| p.node.clone()).collect();
                nodes.sort();
                nodes.dedup();
                return Err(KubeModeError::NoAgentOnNode {
                    node: n.to_string(),
                    context: target.context.clone(),
                    namespace: target.namespace.clone(),
                    nodes: if nodes.is_empty() {
                        "none scheduled yet".into()
                    } else {
                        nodes.join(", ")
                    },
                });
            }
            on
        }
    };
    let results = proxy_get::<T>(target, &selected, port, path, timeout).await?;
    let agents = results
        .into_iter()
        .map(|(a, r)| AgentAnswer {
            pod: a.pod,
            node: a.node,
            error: r.as_ref().err().map(ToString::to_string),
            answer: r.ok(),
        })
        .collect();
    Ok(AgentAnswers {
        context: target.context.clone(),
        agents,
    })
}

/// `service list`: each agent's merged services.
///
/// # Errors
/// The mesh is not enabled, no agent (on `node`) exists, or the API cannot be read.
/// Agents that do not answer are reported in the result, not as an error.
pub async fn services(
    target: &KubeTarget,
    node: Option<&str>,
    timeout: Duration,
) -> Result<AgentAnswers<Vec<ServiceStatus>>, KubeModeError> {
    ask(target, node, "/v1/services", timeout).await
}

/// `bpf lb list`: each agent's datapath dump.
///
/// # Errors
/// As [`services`].
pub async fn bpf_lb(
    target: &KubeTarget,
    node: Option<&str>,
    timeout: Duration,
) -> Result<AgentAnswers<BpfDump>, KubeModeError> {
    ask(target, node, "/v1/bpf/lb", timeout).await
}

/// `identity list`: the security identities each agent knows.
///
/// # Errors
/// As [`services`].
pub async fn identities(
    target: &KubeTarget,
    node: Option<&str>,
    timeout: Duration,
) -> Result<AgentAnswers<Vec<IdentityEntry>>, KubeModeError> {
    ask(target, node, "/v1/identities", timeout).await
}

/// `endpoint list`: the pod addresses each agent knows.
///
/// # Errors
/// As [`services`].
pub async fn endpoints(
    target: &KubeTarget,
    node: Option<&str>,
    timeout: Duration,
) -> Result<AgentAnswers<Vec<EndpointEntry>>, KubeModeError> {
    ask(target, node, "/v1/endpoints", timeout).await
}

/// `policy get`: each agent's policy report (the pods of its node).
///
/// # Errors
/// As [`services`].
pub async fn policy(
    target: &KubeTarget,
    node: Option<&str>,
    timeout: Duration,
) -> Result<AgentAnswers<PolicyReport>, KubeModeError> {
    ask(target, node, "/v1/policy", timeout).await
}
