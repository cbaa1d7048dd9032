//! Client of an agent's admin API (HTTP/1.1 with JSON bodies on a local unix socket).
//!
//! `status`, `service list`, `bpf lb list` and the policy views (`identity list`,
//! `endpoint list`, `policy get`, bodies in [`clustermesh_api::admin_policy`]) read the
//! agent through this. The endpoints
//! and JSON shapes are the contract with `clustermesh-agent --admin-socket`, defined once
//! for both sides in [`clustermesh_api::admin`] (re-exported here); unknown fields are
//! ignored and missing ones default, so either side can grow.
//!
//! | request            | response body |
//! |--------------------|---------------|
//! | `GET /v1/status`   | [`AgentStatus`] |
//! | `GET /v1/services` | list of [`ServiceStatus`] |
//! | `GET /v1/bpf/lb`   | the agent's datapath dump ([`BpfDump`]: services, backends, Maglev slab), shown as [`BpfLbEntry`] rows ([`bpf_lb_entries`]); 503 on an agent without the eBPF datapath |
//! | `GET /v1/identities`, `/v1/endpoints`, `/v1/policy` | the policy views (see [`crate::visibility`]); 503 on an agent with `--policy=false` |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use clustermesh_api::admin::{
    AgentStatus, BackendDump, BackendStatus, BpfDump, ClusterStatus, ServiceDump, ServiceStatus,
    SlabDump,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response accepted (a full service dump of a big cluster fits comfortably).
const MAX_RESPONSE: u64 = 64 << 20;

/// Errors talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Connecting to the socket failed.
    #[error("cannot reach the agent admin socket {path}: {reason}; is clustermesh-agent running with --admin-socket {path}?")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The exchange failed or timed out.
    #[error("agent at {path} did not answer {request}: {reason}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The request path.
        request: String,
        /// Why.
        reason: String,
    },
    /// The agent answered with an error status (e.g. 503 from an agent running without
    /// policy or without the eBPF datapath).
    #[error("agent at {path} refused {request}: {reason}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The request path.
        request: String,
        /// `HTTP <code>: <the agent's text>`.
        reason: String,
    },
    /// The answer was not a valid HTTP response with the expected JSON.
    #[error("agent at {path} sent an invalid answer to {request}: {reason}; is the agent the same version as this CLI?")]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// The request path.
        request: String,
        /// What is wrong.
        reason: String,
    },
}

/// A row of `bpf lb list`: one programmed frontend of a [`BpfDump`] (see
/// [`bpf_lb_entries`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BpfLbEntry {
    /// Frontend, e.g. `10.96.0.10:80/TCP`.
    pub frontend: String,
    /// Service ID in the services map.
    pub service_id: u32,
    /// Offset of its table in the Maglev slab.
    pub table_offset: u32,
    /// Table size M.
    pub table_size: u32,
    /// Programmed backends.
    pub backends: Vec<BpfBackend>,
}

/// A backend in the BPF maps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BpfBackend {
    /// Backend ID.
    pub id: u32,
    /// `ip:port`.
    pub address: String,
    /// Cluster ID.
    pub cluster: String,
    /// State.
    pub state: String,
    /// Maglev slots it owns.
    pub slots: u32,
}

/// One row per programmed frontend of `dump`, with the service's backends and the table
/// slots each owns. A backend id the dump does not list is shown as address `?`, state
/// `unknown`, not dropped.
#[must_use]
pub fn bpf_lb_entries(dump: &BpfDump) -> Vec<BpfLbEntry> {
    let by_id: BTreeMap<u32, &BackendDump> = dump.backends.iter().map(|b| (b.id, b)).collect();
    let mut out = Vec::new();
    for s in &dump.services {
        let backends: Vec<BpfBackend> = s
            .backends
            .iter()
            .map(|id| {
                let b = by_id.get(id);
                BpfBackend {
                    id: *id,
                    address: b.map_or_else(|| "?".into(), |b| b.address.clone()),
                    cluster: b.map_or_else(String::new, |b| b.cluster.clone()),
                    state: b.map_or_else(|| "unknown".into(), |b| b.state.to_string()),
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

/// Sends `GET <request>` to the agent at `socket` and decodes the JSON body.
pub async fn get<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &str,
    timeout: Duration,
) -> Result<T, AdminError> {
    let io = |reason: String| AdminError::Io {
        path: socket.to_path_buf(),
        request: request.to_string(),
        reason,
    };
    let bad = |reason: String| AdminError::BadResponse {
        path: socket.to_path_buf(),
        request: request.to_string(),
        reason,
    };
    let exchange = async {
        let mut stream =
            tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| AdminError::Connect {
                    path: socket.to_path_buf(),
                    reason: e.to_string(),
                })?;
        let req = format!("GET {request} HTTP/1.1\r\nHost: agent\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| io(e.to_string()))?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| io(e.to_string()))?;
        Ok::<_, AdminError>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io(format!("no answer within {timeout:?}")))??;
    let (code, body) = parse_http_status_and_body(&raw).map_err(bad)?;
    if !(200..300).contains(&code) {
        return Err(AdminError::Refused {
            path: socket.to_path_buf(),
            request: request.to_string(),
            reason: refusal_text(code, &body),
        });
    }
    serde_json::from_slice(&body).map_err(|e| bad(format!("JSON: {e}")))
}

/// Extracts the body of a complete HTTP/1.1 response; non-2xx statuses are errors
/// carrying the body text.
pub fn parse_http_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let (code, body) = parse_http_status_and_body(raw)?;
    if !(200..300).contains(&code) {
        return Err(refusal_text(code, &body));
    }
    Ok(body)
}

/// `HTTP <code>: <body text>`.
fn refusal_text(code: u16, body: &[u8]) -> String {
    format!("HTTP {code}: {}", String::from_utf8_lossy(body).trim())
}

/// The status code and body of a complete HTTP/1.1 response, whatever the status.
pub fn parse_http_status_and_body(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let code: u16 = code
        .parse()
        .map_err(|_| format!("bad status code in {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("bad content-length {v:?}"))?,
            );
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or("body shorter than content-length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((code, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn content_length_and_chunked_bodies_decode() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_http_response(r).unwrap(), b"{}");
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_http_response(r).unwrap(), b"[1,2]");
    }

    #[test]
    fn error_statuses_carry_the_body() {
        let r = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n\r\nstarting";
        assert_eq!(parse_http_response(r).unwrap_err(), "HTTP 503: starting");
    }

    #[test]
    fn agent_status_tolerates_missing_and_unknown_fields() {
        let s: AgentStatus = serde_json::from_str(
            r#"{"node":"n1","clusters":[{"name":"c2","connected":true,"future":1}]}"#,
        )
        .unwrap();
        assert_eq!(s.clusters[0].name, "c2");
        assert!(!s.clusters[0].synced);
        assert_eq!(s.clusters[0].phase, "");
    }

    /// The agent's bodies (shapes of `clustermesh-agent`'s admin `StatusBody` and
    /// `ServiceBody`) decode with the fields `status` and `service list` print.
    #[test]
    fn agent_bodies_decode_phase_port_name_and_affinity() {
        let s: AgentStatus = serde_json::from_str(
            r#"{"node":"n1","local_cluster":"east","services":2,"reconcile_rounds":7,
                "clusters":[{"name":"south","phase":"refused","connected":false,"synced":false,
                "stale":false,"revision":0,"last_error":"reports cluster ID 2, which cluster west already uses",
                "endpoint":"localhost:1","decode_errors":0,"refused_records":0}]}"#,
        )
        .unwrap();
        assert_eq!(s.clusters[0].phase, "refused");
        let v: Vec<ServiceStatus> = serde_json::from_str(
            r#"[{"namespace":"default","name":"dns","port_name":"udp","frontends":["10.96.0.10:53/UDP"],
                "affinity":"remote","active_tier":"remote","table_size":251,"backends":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            (v[0].port_name.as_str(), v[0].affinity.as_str()),
            ("udp", "remote")
        );
    }

    #[test]
    fn a_dump_becomes_one_row_per_frontend_with_slots() {
        let dump = BpfDump {
            services: vec![ServiceDump {
                id: 7,
                name: "default/dns/tcp".into(),
                frontends: vec!["10.96.0.10:53/TCP".into(), "[fd00::10]:53/TCP".into()],
                table_offset: 4096,
                table_size: 251,
                backends: vec![1, 9],
                slots: BTreeMap::from([(1, 126), (9, 125)]),
                table: None,
            }],
            backends: vec![BackendDump {
                id: 1,
                address: "10.1.0.5:5353".into(),
                protocol: "TCP".into(),
                cluster: "east".into(),
                state: "active".into(),
                services: 1,
            }],
            ..BpfDump::default()
        };
        let rows = bpf_lb_entries(&dump);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].frontend, "[fd00::10]:53/TCP");
        assert_eq!(rows[0].service_id, 7);
        assert_eq!(rows[0].table_size, 251);
        assert_eq!(rows[0].backends[0].address, "10.1.0.5:5353");
        assert_eq!(rows[0].backends[0].slots, 126);
        // A backend ID missing from the backends list is shown, not dropped.
        assert_eq!(rows[0].backends[1].address, "?");
        assert_eq!(rows[0].backends[1].state, "unknown");
        assert_eq!(rows[0].backends[1].slots, 125);
    }

    proptest! {
        /// Arbitrary bytes from a misbehaving agent never panic the decoder.
        #[test]
        fn decoder_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_http_response(&raw);
        }

        /// Any body survives chunked encoding with arbitrary chunk sizes.
        #[test]
        fn chunked_round_trip(body in proptest::collection::vec(any::<u8>(), 0..200), size in 1usize..17) {
            let mut enc = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for c in body.chunks(size) {
                enc.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                enc.extend_from_slice(c);
                enc.extend_from_slice(b"\r\n");
            }
            enc.extend_from_slice(b"0\r\n\r\n");
            prop_assert_eq!(parse_http_response(&enc).unwrap(), body);
        }
    }
}
