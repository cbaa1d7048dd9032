//! The agent's admin API contract: the JSON bodies `clustermesh-agent` serves on its admin
//! unix socket (`--admin-socket`) and on its HTTP endpoint (`--http-listen`), and that the
//! `clustermesh` CLI reads (`status`, `service list`, `bpf lb list`).
//!
//! | request            | response body |
//! |--------------------|---------------|
//! | `GET /v1/status`   | [`AgentStatus`] |
//! | `GET /v1/services` | list of [`ServiceStatus`] (one per service port) |
//! | `GET /v1/bpf/lb`   | [`BpfDump`] (503 on an agent without the eBPF datapath) |
//!
//! Both sides use these types, so the shapes cannot drift apart. Agents and CLIs of
//! different versions still talk to each other: fields are only ever added, never renamed
//! or retyped; every body decodes with missing fields set to their default (`""`, `0`,
//! `false`, empty, `null`) and unknown fields ignored. Enumerated words (a watcher phase,
//! an affinity, a tier, a protocol, a backend state) are the [`model`](crate::model) enums
//! wrapped in [`Reported`]: a newer agent may report a word an older CLI does not know,
//! which is kept as the text it was sent as.
//!
//! Encoding writes every field in declaration order, which is the order agents have always
//! written them in; only [`ServiceDump::table`] is left out when absent.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::{Affinity, BackendState, Phase, Protocol, Tier, Word};

/// An enumerated value as an agent reported it: a word this version knows, or the text of
/// one it does not (from a newer agent), kept so it can still be shown.
///
/// Encoded as the plain JSON string of [`Word`]; missing from an older agent's body, it
/// decodes as the empty text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reported<T> {
    /// A word this version knows.
    Known(T),
    /// Any other text, as sent.
    Unknown(String),
}

impl<T: Word> Reported<T> {
    /// The text on the wire.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            Reported::Known(v) => v.word(),
            Reported::Unknown(text) => text,
        }
    }

    /// The known value, if the word is one this version knows.
    #[must_use]
    pub fn known(&self) -> Option<&T> {
        match self {
            Reported::Known(v) => Some(v),
            Reported::Unknown(_) => None,
        }
    }

    /// The value `text` stands for, or the text itself when it is not a known word.
    #[must_use]
    pub fn from_text(text: &str) -> Self {
        T::from_word(text).map_or_else(|| Reported::Unknown(text.to_owned()), Reported::Known)
    }
}

impl<T> Default for Reported<T> {
    fn default() -> Self {
        Reported::Unknown(String::new())
    }
}

impl<T> From<T> for Reported<T> {
    fn from(v: T) -> Self {
        Reported::Known(v)
    }
}

impl<T: Word> From<&str> for Reported<T> {
    fn from(text: &str) -> Self {
        Self::from_text(text)
    }
}

impl<T: Word> std::fmt::Display for Reported<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl<T: Word> PartialEq<str> for Reported<T> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl<T: Word> PartialEq<&str> for Reported<T> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<T: Word> Serialize for Reported<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de, T: Word> Deserialize<'de> for Reported<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(T::from_word(&text).map_or(Reported::Unknown(text), Reported::Known))
    }
}

/// `GET /v1/status`: the agent and every cluster it is configured for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentStatus {
    /// Node name.
    pub node: String,
    /// The agent's own cluster.
    pub local_cluster: String,
    /// Every configured cluster, the local one included.
    pub clusters: Vec<ClusterStatus>,
    /// Number of load-balanced service ports.
    pub services: usize,
    /// Reconcile rounds completed (desired-state computations); grows as updates arrive.
    pub reconcile_rounds: u64,
}

/// One watched cluster as an agent sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterStatus {
    /// Cluster name.
    pub name: String,
    /// The agent's watcher phase: `connecting`, `syncing`, `watching`, `backoff`, or
    /// `refused` (the cluster is not who the configuration says, or is misconfigured;
    /// `last_error` says why). Empty from agents that do not report it.
    pub phase: Reported<Phase>,
    /// The watch stream is established.
    pub connected: bool,
    /// The cluster's records are in force (initial sync done at least once).
    pub synced: bool,
    /// Disconnected, serving last-known records.
    pub stale: bool,
    /// Last revision applied.
    pub revision: u64,
    /// Last error, if any (`null` when none).
    pub last_error: Option<String>,
    /// Endpoint of the current or last session.
    pub endpoint: String,
    /// Records ignored because they did not decode.
    pub decode_errors: u64,
    /// Records refused (wrong cluster, unexpected key).
    pub refused_records: u64,
}

/// `GET /v1/services` element: one port of a merged global or local service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceStatus {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service port name (one element per service port; `""` for a single unnamed port).
    pub port_name: String,
    /// Frontends, e.g. `10.96.0.10:80/TCP`, `[fd00::10]:80/TCP`.
    pub frontends: Vec<String>,
    /// Affinity of the service: `local`, `remote` or `none`.
    pub affinity: Reported<Affinity>,
    /// Tier currently serving (`node`, `zone`, `cluster`, `remote`, or `none`).
    pub active_tier: Reported<Option<Tier>>,
    /// Maglev table size (0: no usable backend).
    pub table_size: usize,
    /// Backends from every cluster.
    pub backends: Vec<BackendStatus>,
    /// The local service is global (`service.cilium.io/global`); `false` from agents that
    /// predate the field. Added after `backends`, so earlier fields keep their order.
    pub global: bool,
    /// The local service's backends are offered to other clusters
    /// (`service.cilium.io/shared`; only ever true for a global service).
    pub shared: bool,
}

/// A backend of a merged service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackendStatus {
    /// Cluster it belongs to.
    pub cluster: String,
    /// `ip:port` (`[v6]:port`).
    pub address: String,
    /// `active` or `terminating`.
    pub state: Reported<BackendState>,
    /// Locality tier (`node`, `zone`, `cluster`, `remote`).
    pub tier: Reported<Tier>,
    /// Maglev weight.
    pub weight: u32,
    /// Table slots it owns.
    pub slots: u32,
}

/// `GET /v1/bpf/lb`: everything the eBPF datapath has programmed in its pinned maps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BpfDump {
    /// Pin directory the maps live in.
    pub pin_dir: String,
    /// Cgroup the programs are attached to.
    pub cgroup: String,
    /// Services sorted by name.
    pub services: Vec<ServiceDump>,
    /// Backends sorted by id.
    pub backends: Vec<BackendDump>,
    /// Maglev slab usage.
    pub slab: SlabDump,
    /// Kernel counters summed over CPUs.
    pub counters: BTreeMap<String, u64>,
}

/// One service as programmed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceDump {
    /// Service id in the maps.
    pub id: u32,
    /// `namespace/name/port-name`.
    pub name: String,
    /// Frontends as `ip:port/proto` (`[v6]:port/proto`).
    pub frontends: Vec<String>,
    /// Table offset in the slab.
    pub table_offset: u32,
    /// Table size M (0: connections are refused).
    pub table_size: u32,
    /// Backend ids of the service (active and terminating).
    pub backends: Vec<u32>,
    /// Table slots owned by each backend id.
    pub slots: BTreeMap<u32, u32>,
    /// The table itself (backend ids), when requested; absent from the JSON otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<Vec<u32>>,
}

/// One programmed backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackendDump {
    /// Backend id.
    pub id: u32,
    /// `ip:port` (`[v6]:port`).
    pub address: String,
    /// `TCP` or `UDP` (or the protocol number the maps hold, if it is neither).
    pub protocol: Reported<Protocol>,
    /// Cluster name.
    pub cluster: String,
    /// `active` or `terminating`.
    pub state: Reported<BackendState>,
    /// Number of services referencing it.
    pub services: u32,
}

/// Maglev slab usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlabDump {
    /// Capacity in entries.
    pub capacity: u32,
    /// Entries in use (tables, backend lists, and regions waiting to be reused).
    pub used: u64,
    /// Largest free block.
    pub largest_free: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies as `clustermesh-agent` served them before these types moved here (captured
    // from the agent's own serializers: `admin::status`, `admin::services` and
    // `bpf::BpfDump`), for a node of cluster east that merges a global UDP service with a
    // terminating backend in west, while west is in backoff.
    const STATUS: &str = r#"{"node":"node-a","local_cluster":"east","clusters":[{"name":"east","phase":"watching","connected":true,"synced":true,"stale":false,"revision":42,"last_error":null,"endpoint":"127.0.0.1:2379","decode_errors":0,"refused_records":0},{"name":"west","phase":"backoff","connected":false,"synced":true,"stale":true,"revision":17,"last_error":"transport error: connection refused","endpoint":"10.0.2.1:32379","decode_errors":1,"refused_records":2}],"services":1,"reconcile_rounds":0}"#;
    const SERVICES: &str = r#"[{"namespace":"default","name":"dns","port_name":"dns","frontends":["10.96.0.10:53/UDP","[fd00::10]:53/UDP"],"affinity":"none","active_tier":"node","table_size":251,"backends":[{"cluster":"east","address":"10.1.0.5:5353","state":"active","tier":"node","weight":1,"slots":251},{"cluster":"west","address":"10.2.0.9:5353","state":"terminating","tier":"remote","weight":0,"slots":0}],"global":true,"shared":true}]"#;
    const BPF: &str = r#"{"pin_dir":"/sys/fs/bpf/clustermesh","cgroup":"/sys/fs/cgroup","services":[{"id":3,"name":"default/dns/dns","frontends":["10.96.0.10:53/UDP","[fd00::10]:53/UDP"],"table_offset":1024,"table_size":251,"backends":[5,6],"slots":{"5":251,"6":0}}],"backends":[{"id":5,"address":"10.1.0.5:5353","protocol":"UDP","cluster":"east","state":"active","services":1},{"id":6,"address":"10.2.0.9:5353","protocol":"UDP","cluster":"west","state":"terminating","services":1}],"slab":{"capacity":65536,"used":256,"largest_free":65280},"counters":{"lb_no_backend":2,"lb_selected":1234}}"#;
    const BPF_SERVICE_WITH_TABLE: &str = r#"{"id":3,"name":"default/dns/dns","frontends":["10.96.0.10:53/UDP","[fd00::10]:53/UDP"],"table_offset":1024,"table_size":251,"backends":[5,6],"slots":{"5":251,"6":0},"table":[5,5,5]}"#;

    fn round_trip<T: serde::de::DeserializeOwned + Serialize>(json: &str) -> (T, String) {
        let value: T = serde_json::from_str(json).unwrap();
        let again = serde_json::to_string(&value).unwrap();
        (value, again)
    }

    #[test]
    fn what_agents_served_decodes_and_encodes_to_the_same_json() {
        let (status, again) = round_trip::<AgentStatus>(STATUS);
        assert_eq!(again, STATUS);
        assert_eq!(status.clusters[1].phase, "backoff");
        assert_eq!(
            status.clusters[1].last_error.as_deref(),
            Some("transport error: connection refused")
        );

        let (services, again) = round_trip::<Vec<ServiceStatus>>(SERVICES);
        assert_eq!(again, SERVICES);
        assert_eq!(services[0].backends[1].state, "terminating");
        assert_eq!(
            services[0].backends[1].state,
            Reported::Known(BackendState::Terminating)
        );
        assert_eq!(services[0].active_tier, Reported::Known(Some(Tier::Node)));
        assert!(services[0].global && services[0].shared);

        let (dump, again) = round_trip::<BpfDump>(BPF);
        assert_eq!(again, BPF);
        assert_eq!(dump.services[0].table, None);
        assert_eq!(dump.slab.largest_free, 65280);
        assert_eq!(dump.backends[0].protocol, Reported::Known(Protocol::Udp));

        let (service, again) = round_trip::<ServiceDump>(BPF_SERVICE_WITH_TABLE);
        assert_eq!(again, BPF_SERVICE_WITH_TABLE);
        assert_eq!(service.table, Some(vec![5, 5, 5]));
    }

    /// An older agent (no `phase`, no counters) and a newer one (fields this version does
    /// not know) are both readable.
    #[test]
    fn missing_fields_default_and_unknown_fields_are_ignored() {
        let s: AgentStatus = serde_json::from_str(
            r#"{"node":"n1","clusters":[{"name":"c2","connected":true,"future":1}],"later":{"x":[]}}"#,
        )
        .unwrap();
        assert_eq!(s.node, "n1");
        assert_eq!(s.local_cluster, "");
        assert_eq!((s.services, s.reconcile_rounds), (0, 0));
        let c = &s.clusters[0];
        assert_eq!((c.name.as_str(), c.phase.as_str()), ("c2", ""));
        assert!(c.connected && !c.synced && !c.stale);
        assert_eq!(c.last_error, None);

        let v: Vec<ServiceStatus> = serde_json::from_str(
            r#"[{"name":"dns","backends":[{"address":"10.1.0.5:53","zone":"a"}]}]"#,
        )
        .unwrap();
        assert_eq!(v[0].table_size, 0);
        assert_eq!(v[0].backends[0].address, "10.1.0.5:53");
        assert_eq!((v[0].backends[0].weight, v[0].backends[0].slots), (0, 0));

        let d: BpfDump =
            serde_json::from_str(r#"{"services":[{"id":3,"maglev":"v2"}],"backends":[]}"#).unwrap();
        assert_eq!(d.services[0].id, 3);
        assert_eq!(d.slab, SlabDump::default());
        assert_eq!(
            d,
            BpfDump {
                services: vec![ServiceDump {
                    id: 3,
                    ..ServiceDump::default()
                }],
                ..BpfDump::default()
            }
        );
    }

    /// A phase this version does not know (a newer agent's) is kept as it was sent.
    #[test]
    fn an_unknown_phase_is_kept_verbatim() {
        let c: ClusterStatus = serde_json::from_str(r#"{"name":"c3","phase":"draining"}"#).unwrap();
        assert_eq!(c.phase, "draining");
    }

    /// Every enumerated field keeps a word this version does not know, and writes it back
    /// unchanged; known words decode to their values.
    #[test]
    fn unknown_words_decode_and_round_trip() {
        const NEWER: &str = r#"{"namespace":"default","name":"web","port_name":"","frontends":[],"affinity":"nearest","active_tier":"region","table_size":0,"backends":[{"cluster":"c1","address":"10.0.0.1:80","state":"warming","tier":"rack","weight":1,"slots":0}],"global":false,"shared":false}"#;
        let (s, again) = round_trip::<ServiceStatus>(NEWER);
        assert_eq!(again, NEWER);
        assert_eq!(s.affinity, Reported::Unknown("nearest".into()));
        assert_eq!(s.active_tier.to_string(), "region");
        assert_eq!(s.backends[0].state.known(), None);
        assert_eq!(s.backends[0].tier, "rack");
        let b: BackendDump =
            serde_json::from_str(r#"{"id":1,"protocol":"132","state":"active"}"#).unwrap();
        assert_eq!(b.protocol, Reported::Unknown("132".into()));
        assert_eq!(b.state, Reported::Known(BackendState::Active));
        let c: ClusterStatus = serde_json::from_str(r#"{"phase":"refused"}"#).unwrap();
        assert_eq!(c.phase.known(), Some(&Phase::Refused));
        assert_eq!(ClusterStatus::default().phase, "");
    }
}
