//! How every verb's result is shown: a table for people (`-o table`) or JSON for scripts
//! (`-o json`), the same for both targets.
//!
//! Each result type says once how it looks ([`Report`]); [`emit`] picks the format. A
//! result can carry a failure that is reported after its output was printed
//! ([`Checked`]): `status` that is not ready, or agents that gave no answer, still show
//! what was found before the error line.

use std::collections::BTreeMap;

use clustermesh_api::admin_policy::{
    AllowRule, EndpointEntry, EndpointPolicyStatus, IdentityEntry, PolicyReport,
};
use clustermesh_api::policy::CLUSTER_LABEL;
use serde::Serialize;

use crate::admin::{self, BpfDump, BpfLbEntry, ServiceStatus};
use crate::cli::error::CliError;
use crate::cli::flags::Output;
use crate::k8s::agents::AgentAnswers;
use crate::k8s::connect::{ConnectReport as KubeConnected, DisconnectReport as KubeDisconnected};
use crate::k8s::enable::{DisableReport as KubeDisabled, EnableReport as KubeEnabled};
use crate::k8s::status::KubeStatus;
use crate::standalone::ConnectReport as StandaloneConnected;
use crate::state::{ClusterState, StateDir};
use crate::status::MeshStatus;

/// A verb's result as a table and as JSON.
pub trait Report {
    /// The text shown with `-o table` (empty for nothing to show).
    fn table(&self) -> String;
    /// The text shown with `-o json`.
    fn json(&self) -> Result<String, CliError>;
}

/// A result and the failure to report once it is printed (`None`: the verb succeeded).
#[derive(Debug)]
pub struct Checked<R> {
    /// What was found.
    pub report: R,
    /// Why the command fails anyway.
    pub failure: Option<CliError>,
}

impl<R> Checked<R> {
    /// A result without failure.
    pub fn ok(report: R) -> Self {
        Self {
            report,
            failure: None,
        }
    }
}

/// `report` in the `output` format: the text for stdout.
pub fn emit<R: Report>(output: Output, report: &R) -> Result<String, CliError> {
    match output {
        Output::Json => report.json(),
        Output::Table => Ok(report.table()),
    }
}

/// Like [`emit`]; if the result carries a failure, the text is printed here and the
/// failure returned, so the error line follows the output.
pub fn emit_checked<R: Report>(output: Output, checked: Checked<R>) -> Result<String, CliError> {
    let text = emit(output, &checked.report)?;
    match checked.failure {
        None => Ok(text),
        Some(failure) => {
            print!("{text}");
            Err(failure)
        }
    }
}

/// JSON text of `v`, pretty-printed.
pub fn json<T: Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string_pretty(v).map_err(|e| CliError::Encode(e.to_string()))
}

/// Standalone `enable`: the cluster and how to start its processes.
#[derive(Debug)]
pub struct StandaloneEnabled {
    /// The cluster as written to `cluster.yaml`.
    pub state: ClusterState,
    /// Its state directory.
    pub dir: StateDir,
}

impl Report for StandaloneEnabled {
    fn table(&self) -> String {
        let (state, dir) = (&self.state, &self.dir);
        format!(
            "enabled cluster {} (id {}) in {}\n  mesh API server: clustermesh-apiserver --cluster-name {} --cluster-id {} --tls-dir {} --source dir:{}\n  agents:          clustermesh-agent --config {}\n",
            state.name,
            state.id,
            dir.root().display(),
            state.name,
            state.id,
            dir.tls_dir().display(),
            dir.manifests_dir().display(),
            dir.agent_config().display()
        )
    }
    fn json(&self) -> Result<String, CliError> {
        json(&self.state)
    }
}

/// Standalone `disable`: the cluster that was removed.
#[derive(Debug)]
pub struct StandaloneDisabled {
    /// Its name.
    pub name: String,
}

impl Report for StandaloneDisabled {
    fn table(&self) -> String {
        format!("disabled cluster {}\n", self.name)
    }
    fn json(&self) -> Result<String, CliError> {
        json(&serde_json::json!({ "disabled": self.name }))
    }
}

impl Report for StandaloneConnected {
    fn table(&self) -> String {
        format!(
            "connected {} <-> {}{}; agents pick up the change without a restart (check with `clustermesh status --wait`)\n",
            self.source,
            self.destination,
            if self.already_connected {
                " (were already connected; configuration refreshed)"
            } else {
                ""
            }
        )
    }
    fn json(&self) -> Result<String, CliError> {
        json(&serde_json::json!({
            "source": self.source, "destination": self.destination, "already_connected": self.already_connected,
        }))
    }
}

/// Standalone `disconnect`: the two clusters.
#[derive(Debug)]
pub struct StandaloneDisconnected {
    /// Source cluster.
    pub source: String,
    /// Destination cluster.
    pub destination: String,
}

impl Report for StandaloneDisconnected {
    fn table(&self) -> String {
        format!("disconnected {} <-> {}\n", self.source, self.destination)
    }
    fn json(&self) -> Result<String, CliError> {
        json(&serde_json::json!({ "source": self.source, "destination": self.destination }))
    }
}

impl Report for KubeEnabled {
    fn table(&self) -> String {
        let r = self;
        let recreated: String = r
            .recreated
            .iter()
            .map(|step| format!("  recreated: {step}\n"))
            .collect();
        let set = crate::k8s::values::flatten(&r.values);
        let details = if set.is_empty() {
            recreated
        } else {
            format!("{recreated}  chart values set: {}\n", set.join(" "))
        };
        format!(
            "{} cluster {} (id {}) in namespace {} of context {}: {} CA, {} chart objects applied{}, mesh API Service type {}{}\n{}  next: `clustermesh --context {} --destination-context <other> connect` once the Service has an address\n",
            if r.upgraded { "upgraded" } else { "enabled" },
            r.cluster,
            r.id,
            r.namespace,
            r.context,
            if r.ca_created { "new" } else { "existing" },
            r.applied.len(),
            if r.pruned.is_empty() {
                String::new()
            } else {
                format!(", removed {} no longer rendered", r.pruned.join(" "))
            },
            r.service_type.as_str(),
            if r.connected.is_empty() {
                String::new()
            } else {
                format!(", still connected to {}", r.connected.join(", "))
            },
            details,
            r.context,
        )
    }
    fn json(&self) -> Result<String, CliError> {
        json(self)
    }
}

impl Report for KubeDisabled {
    fn table(&self) -> String {
        let r = self;
        format!(
            "disabled cluster {} in context {} ({} objects deleted){}\n",
            r.cluster,
            r.context,
            r.deleted.len(),
            if r.peers_left.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} still list it: run `clustermesh --context <peer> disconnect --destination-cluster {}` on each",
                    r.peers_left.join(", "),
                    r.cluster
                )
            }
        )
    }
    fn json(&self) -> Result<String, CliError> {
        json(self)
    }
}

impl Report for KubeConnected {
    fn table(&self) -> String {
        let r = self;
        format!(
            "connected {} ({}) <-> {} ({}){}; agents pick up the change without a restart\n",
            r.source,
            r.source_endpoints.join(","),
            r.destination,
            r.destination_endpoints.join(","),
            if r.already_connected {
                " (were already connected; configuration refreshed)"
            } else {
                ""
            }
        )
    }
    fn json(&self) -> Result<String, CliError> {
        json(self)
    }
}

impl Report for KubeDisconnected {
    fn table(&self) -> String {
        if self.one_sided {
            format!(
                "cluster {} no longer lists {} (this side only)\n",
                self.source, self.destination
            )
        } else {
            format!("disconnected {} <-> {}\n", self.source, self.destination)
        }
    }
    fn json(&self) -> Result<String, CliError> {
        json(self)
    }
}

impl Report for MeshStatus {
    fn table(&self) -> String {
        MeshStatus::table(self)
    }
    fn json(&self) -> Result<String, CliError> {
        json(self)
    }
}

impl Report for KubeStatus {
    fn table(&self) -> String {
        KubeStatus::table(self)
    }
    fn json(&self) -> Result<String, CliError> {
        json(self)
    }
}

/// What one agent answered, shown as a table headed by where it came from.
pub trait AgentTable: Serialize {
    /// The table, headed `# from agent <source>`.
    fn agent_table(&self, source: &str) -> String;
}

impl AgentTable for Vec<ServiceStatus> {
    fn agent_table(&self, source: &str) -> String {
        services_table(source, self)
    }
}

impl AgentTable for BpfDump {
    fn agent_table(&self, source: &str) -> String {
        bpf_table(source, &admin::bpf_lb_entries(self))
    }
}

impl AgentTable for Vec<IdentityEntry> {
    fn agent_table(&self, source: &str) -> String {
        identities_table(source, self)
    }
}

impl AgentTable for Vec<EndpointEntry> {
    fn agent_table(&self, source: &str) -> String {
        endpoints_table(source, self)
    }
}

impl AgentTable for PolicyReport {
    fn agent_table(&self, source: &str) -> String {
        policy_table(source, self)
    }
}

/// Standalone `service list` / `bpf lb list`: the answer of one agent.
#[derive(Debug)]
pub struct FromAgent<T> {
    /// The agent's admin socket.
    pub source: String,
    /// Its answer.
    pub answer: T,
}

impl<T: AgentTable> Report for FromAgent<T> {
    fn table(&self) -> String {
        self.answer.agent_table(&self.source)
    }
    fn json(&self) -> Result<String, CliError> {
        json(&self.answer)
    }
}

/// Kubernetes `service list` / `bpf lb list`: one block per agent pod; an agent without
/// an answer is listed with the reason.
impl<T: AgentTable> Report for AgentAnswers<T> {
    fn table(&self) -> String {
        // Nobody answered: the error line says it all.
        if self.agents.iter().all(|a| a.answer.is_none()) {
            return String::new();
        }
        let mut out = String::new();
        for a in &self.agents {
            match (&a.answer, &a.error) {
                (Some(v), _) => out.push_str(&v.agent_table(&format!("pod {}", a.label()))),
                (None, e) => out.push_str(&format!(
                    "# agent pod {}: {}\n",
                    a.label(),
                    e.as_deref().unwrap_or("no answer")
                )),
            }
        }
        out
    }
    fn json(&self) -> Result<String, CliError> {
        json(&self.agents)
    }
}

/// One row per service port: a multi-port service shows one row per port name.
fn services_table(source: &str, services: &[ServiceStatus]) -> String {
    let mut out = format!("# from agent {source}\n");
    out.push_str(&format!(
        "{:<32} {:<10} {:<24} {:<6} {:<6} {:<8} {:<8} BACKENDS\n",
        "SERVICE", "PORT", "FRONTENDS", "GLOBAL", "SHARED", "AFFINITY", "TIER"
    ));
    for s in services {
        let backends: Vec<String> = s
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}/{}({},{},w{})",
                    b.cluster, b.address, b.state, b.tier, b.weight
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<32} {:<10} {:<24} {:<6} {:<6} {:<8} {:<8} {}\n",
            format!("{}/{}", s.namespace, s.name),
            if s.port_name.is_empty() {
                "-"
            } else {
                &s.port_name
            },
            s.frontends.join(","),
            yes_no(s.global),
            yes_no(s.shared),
            s.affinity,
            s.active_tier,
            backends.join(" ")
        ));
    }
    out
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

fn bpf_table(source: &str, entries: &[BpfLbEntry]) -> String {
    let mut out = format!("# from agent {source}\n");
    out.push_str(&format!(
        "{:<26} {:>6} {:>8} {:>7} BACKENDS (id address cluster state slots)\n",
        "FRONTEND", "SVC", "OFFSET", "M"
    ));
    for e in entries {
        let backends: Vec<String> = e
            .backends
            .iter()
            .map(|b| {
                format!(
                    "#{} {} {} {} {}",
                    b.id, b.address, b.cluster, b.state, b.slots
                )
            })
            .collect();
        out.push_str(&format!(
            "{:<26} {:>6} {:>8} {:>7} {}\n",
            e.frontend,
            e.service_id,
            e.table_offset,
            e.table_size,
            backends.join("; ")
        ));
    }
    out
}

/// `rows` as columns separated by two spaces, every column but the last padded to its
/// widest cell; one line per row.
fn aligned(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                match widths.get_mut(i) {
                    Some(w) => *w = (*w).max(cell.chars().count()),
                    None => widths.push(cell.chars().count()),
                }
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                let pad = widths.get(i).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<pad$}  "));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Labels as `k=v,k=v` (sorted by key), `-` for none. The cluster label is left out when
/// it names `cluster`, which has its own column.
fn compact_labels(labels: &BTreeMap<String, String>, cluster: &str) -> String {
    let shown: Vec<String> = labels
        .iter()
        .filter(|(k, v)| !(k.as_str() == CLUSTER_LABEL && v.as_str() == cluster))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(",")
    }
}

fn dash_if_empty(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn identities_table(source: &str, identities: &[IdentityEntry]) -> String {
    let mut rows = vec![vec!["IDENTITY".into(), "CLUSTER".into(), "LABELS".into()]];
    rows.extend(identities.iter().map(|i| {
        vec![
            i.id.to_string(),
            dash_if_empty(&i.cluster),
            compact_labels(&i.labels, &i.cluster),
        ]
    }));
    format!("# from agent {source}\n{}", aligned(&rows))
}

fn endpoints_table(source: &str, endpoints: &[EndpointEntry]) -> String {
    let mut rows = vec![vec![
        "IP".into(),
        "CLUSTER".into(),
        "IDENTITY".into(),
        "POD".into(),
        "NODE".into(),
        "LABELS".into(),
    ]];
    rows.extend(endpoints.iter().map(|e| {
        let pod = if e.pod.is_empty() {
            "-".into()
        } else {
            format!("{}/{}", e.namespace, e.pod)
        };
        vec![
            e.ip.clone(),
            dash_if_empty(&e.cluster),
            e.identity.to_string(),
            pod,
            dash_if_empty(&e.node),
            compact_labels(&e.labels, &e.cluster),
        ]
    }));
    format!("# from agent {source}\n{}", aligned(&rows))
}

/// A direction's column: `open` (not isolated) or `isolated/N` (N allow rules).
fn isolation(rules: Option<&Vec<AllowRule>>) -> String {
    match rules {
        None => "open".into(),
        Some(r) => format!("isolated/{}", r.len()),
    }
}

/// The peer of an allow rule: `any`, `identity N cluster C labels`, `cidr BLOCK`.
fn peer_text(r: &AllowRule) -> String {
    match (r.peer.as_str(), r.identity, r.cidr.as_deref()) {
        ("identity", Some(id), _) => {
            let cluster = r.cluster.as_deref().unwrap_or("");
            format!(
                "identity {id} cluster {} labels {}",
                dash_if_empty(cluster),
                compact_labels(&r.labels, cluster)
            )
        }
        ("cidr", _, Some(block)) => format!("cidr {block}"),
        (other, _, _) => dash_if_empty(other),
    }
}

/// The lines under one endpoint: one per allow rule of an isolated direction, or that
/// nothing is allowed.
fn rule_lines(direction: &str, rules: Option<&Vec<AllowRule>>, out: &mut Vec<String>) {
    let Some(rules) = rules else {
        return;
    };
    let (verb, from) = if direction == "ingress" {
        ("ingress", "from")
    } else {
        ("egress", "to")
    };
    if rules.is_empty() {
        out.push(format!("  {verb:<7} allow nothing"));
    }
    for r in rules {
        let ports = if r.protocol == "any" && r.ports == "any" {
            "any port".to_owned()
        } else {
            format!("{}/{}", r.protocol, r.ports)
        };
        out.push(format!(
            "  {verb:<7} allow {from} {} on {ports}",
            peer_text(r)
        ));
    }
}

fn endpoint_row(e: &EndpointPolicyStatus) -> Vec<String> {
    vec![
        format!("{}/{}", e.namespace, e.pod),
        dash_if_empty(&e.ip),
        e.identity.to_string(),
        isolation(e.ingress.as_ref()),
        isolation(e.egress.as_ref()),
        if e.enforced { "yes" } else { "no" }.into(),
        if e.policies.is_empty() {
            "-".into()
        } else {
            e.policies.join(", ")
        },
    ]
}

/// One row per local pod (its allow rules under it), then the policies, then the node's
/// verdict counters.
fn policy_table(source: &str, report: &PolicyReport) -> String {
    let mut out = format!("# from agent {source}\n");
    out.push_str(&format!(
        "node {}; a peer selector without {CLUSTER_LABEL} selects {}\n",
        dash_if_empty(&report.node),
        match report.peer_clusters.as_str() {
            "local" => "the local cluster only",
            "all" => "every connected cluster",
            other => other,
        }
    ));
    let header = [
        "POD", "IP", "IDENTITY", "INGRESS", "EGRESS", "ENFORCED", "POLICIES",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = vec![header];
    rows.extend(report.endpoints.iter().map(endpoint_row));
    // Align the endpoint rows together, then put each one's rules under it.
    let aligned_rows = aligned(&rows);
    let mut lines = aligned_rows.lines();
    if let Some(h) = lines.next() {
        out.push_str(h);
        out.push('\n');
    }
    for (e, line) in report.endpoints.iter().zip(lines) {
        out.push_str(line);
        out.push('\n');
        let mut rules = Vec::new();
        rule_lines("ingress", e.ingress.as_ref(), &mut rules);
        rule_lines("egress", e.egress.as_ref(), &mut rules);
        for r in rules {
            out.push_str(&r);
            out.push('\n');
        }
    }
    if !report.policies.is_empty() {
        let mut rows = vec![["POLICY", "IN FORCE", "ERROR"].map(String::from).to_vec()];
        rows.extend(report.policies.iter().map(|p| {
            vec![
                format!("{} {}/{}", p.kind, p.namespace, p.name),
                if p.in_force { "yes" } else { "no" }.into(),
                p.error.clone().unwrap_or_else(|| "-".into()),
            ]
        }));
        out.push_str(&aligned(&rows));
    }
    let c = &report.counters;
    out.push_str(&format!(
        "verdicts (node {}, all pods): egress allowed {} denied {}, ingress allowed {} denied {}, passed while syncing {}, replies passed {}\n",
        dash_if_empty(&report.node),
        c.egress_allowed,
        c.egress_denied,
        c.ingress_allowed,
        c.ingress_denied,
        c.syncing_passed,
        c.reply_passed
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{BackendStatus, ServiceStatus};

    #[test]
    fn service_list_shows_port_and_affinity_per_row() {
        let row = |port: &str, frontend: &str| ServiceStatus {
            namespace: "default".into(),
            name: "dns".into(),
            port_name: port.into(),
            frontends: vec![frontend.into()],
            affinity: "remote".into(),
            global: true,
            shared: port == "tcp",
            active_tier: "remote".into(),
            backends: vec![BackendStatus {
                cluster: "west".into(),
                address: "10.2.0.5:5353".into(),
                state: "active".into(),
                tier: "remote".into(),
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let table = services_table(
            "/run/agent.sock",
            &[
                row("tcp", "10.96.0.10:53/TCP"),
                row("udp", "10.96.0.10:53/UDP"),
            ],
        );
        let lines: Vec<Vec<&str>> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0][..7],
            [
                "SERVICE",
                "PORT",
                "FRONTENDS",
                "GLOBAL",
                "SHARED",
                "AFFINITY",
                "TIER"
            ]
        );
        assert_eq!(
            lines[1][..7],
            [
                "default/dns",
                "tcp",
                "10.96.0.10:53/TCP",
                "yes",
                "yes",
                "remote",
                "remote"
            ]
        );
        assert_eq!(
            lines[2][..7],
            [
                "default/dns",
                "udp",
                "10.96.0.10:53/UDP",
                "yes",
                "no",
                "remote",
                "remote"
            ]
        );
        let json: serde_json::Value =
            serde_json::to_value(row("tcp", "10.96.0.10:53/TCP")).unwrap();
        assert_eq!(json["global"], true);
        assert_eq!(json["shared"], true);
    }
}
