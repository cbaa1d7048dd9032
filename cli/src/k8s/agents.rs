//! `service list` and `bpf lb list` in Kubernetes mode: every agent pod (or the one on
//! `--node`) is asked through the API server's pod proxy, on the same HTTP endpoint
//! `status` reads (`clustermesh-agent --http-listen`, chart value `agent.httpPort`), which
//! serves the admin socket's JSON: `GET /v1/services` and `GET /v1/bpf/lb`.
//!
//! Each agent's answer is kept with its pod and node; an agent that cannot be reached, or
//! that refuses (an agent running `--datapath record` has no eBPF maps to dump), is listed
//! with the reason and makes the command fail after printing what the others answered.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::KubeModeError;
use super::mesh::read_config;
use super::objects::{Objects, CONFIG_MAP};
use super::status::{agent_pods, proxy_get, AgentRef};
use super::KubeTarget;
use crate::admin::{BpfBackend, BpfLbEntry, ServiceStatus};

/// `GET /v1/bpf/lb` body of an agent with the eBPF datapath (the agent's
/// `bpf::BpfDump`): what is programmed in the pinned maps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BpfDump {
    /// Pin directory of the maps.
    pub pin_dir: String,
    /// Cgroup the programs are attached to.
    pub cgroup: String,
    /// Programmed services.
    pub services: Vec<BpfService>,
    /// Programmed backends.
    pub backends: Vec<BpfDumpBackend>,
    /// Maglev slab usage.
    pub slab: BpfSlab,
    /// Kernel counters summed over CPUs.
    pub counters: BTreeMap<String, u64>,
}

/// One programmed service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BpfService {
    /// Service ID in the maps.
    pub id: u32,
    /// `namespace/name/port-name`.
    pub name: String,
    /// Frontends, `ip:port/proto`.
    pub frontends: Vec<String>,
    /// Offset of its table in the slab.
    pub table_offset: u32,
    /// Table size M.
    pub table_size: u32,
    /// Backend IDs.
    pub backends: Vec<u32>,
    /// Table slots per backend ID.
    pub slots: BTreeMap<u32, u32>,
}

/// One programmed backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BpfDumpBackend {
    /// Backend ID.
    pub id: u32,
    /// `ip:port`.
    pub address: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// Cluster name.
    pub cluster: String,
    /// `active` or `terminating`.
    pub state: String,
    /// Services referencing it.
    pub services: u32,
}

/// Maglev slab usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BpfSlab {
    /// Capacity in entries.
    pub capacity: u32,
    /// Entries in use.
    pub used: u64,
    /// Largest free block.
    pub largest_free: u32,
}

impl BpfDump {
    /// One row per programmed frontend, with the service's backends and their slots.
    #[must_use]
    pub fn entries(&self) -> Vec<BpfLbEntry> {
        let by_id: BTreeMap<u32, &BpfDumpBackend> =
            self.backends.iter().map(|b| (b.id, b)).collect();
        let mut out = Vec::new();
        for s in &self.services {
            let backends: Vec<BpfBackend> = s
                .backends
                .iter()
                .map(|id| {
                    let b = by_id.get(id);
                    BpfBackend {
                        id: *id,
                        address: b.map_or_else(|| "?".into(), |b| b.address.clone()),
                        cluster: b.map_or_else(String::new, |b| b.cluster.clone()),
                        state: b.map_or_else(|| "unknown".into(), |b| b.state.clone()),
                        slots: s.slots.get(id).copied().unwrap_or(0),
                    }
                })
                .collect();
            for f in &s.frontends {
                out.push(BpfLbEntry {
                    frontend: f.clone(),
                    service_id: s.id,
                    table_offset: s.table_offset,
                    table_size: s.table_size,
                    backends: backends.clone(),
                });
            }
        }
        out
    }
}

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
        match &self.node {
            Some(n) => format!("{} (node {n})", self.pod),
            None => self.pod.clone(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_becomes_one_row_per_frontend_with_slots() {
        let dump = BpfDump {
            services: vec![BpfService {
                id: 7,
                name: "default/dns/tcp".into(),
                frontends: vec!["10.96.0.10:53/TCP".into(), "[fd00::10]:53/TCP".into()],
                table_offset: 4096,
                table_size: 251,
                backends: vec![1, 9],
                slots: BTreeMap::from([(1, 126), (9, 125)]),
            }],
            backends: vec![BpfDumpBackend {
                id: 1,
                address: "10.1.0.5:5353".into(),
                protocol: "TCP".into(),
                cluster: "east".into(),
                state: "active".into(),
                services: 1,
            }],
            ..BpfDump::default()
        };
        let rows = dump.entries();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].frontend, "[fd00::10]:53/TCP");
        assert_eq!(rows[0].service_id, 7);
        assert_eq!(rows[0].table_size, 251);
        assert_eq!(rows[0].backends[0].address, "10.1.0.5:5353");
        assert_eq!(rows[0].backends[0].slots, 126);
        // A backend ID missing from the backends list is shown, not dropped.
        assert_eq!(rows[0].backends[1].address, "?");
        assert_eq!(rows[0].backends[1].slots, 125);
    }
}
