//! `?watch=true` on a collection (or on one object, which clients send as a collection
//! watch with `fieldSelector=metadata.name=…`): a streamed answer of newline-separated
//! `{"type": "ADDED"|"MODIFIED"|"DELETED", "object": …}` events, as the real server sends
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes>).
//!
//! Without `resourceVersion` (or with `0`) the watch starts with an ADDED event per
//! matching object; with one it replays every later change from the store's event log.
//! `timeoutSeconds` ends the stream; so does the client going away. Objects are Tables
//! when the client asked for server-side printing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::{json, Value};

use super::store::{fields_match, labels_match, parse_label_selector};
use super::{discovery, status_error, Collection, Reply, State, Target};

/// The body of a watch answer.
pub(super) type Frames = tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>;

/// Starts a watch of `target`; Err is an answer to send instead (bad parameters).
pub(super) fn start(
    state: &Arc<Mutex<State>>,
    target: &Target,
    params: &HashMap<String, String>,
    table: bool,
) -> Result<Frames, Reply> {
    let (collection, name) = match target {
        Target::Collection(c) => (c.clone(), None),
        Target::Object(k) => (k.collection(), Some(k.name.clone())),
        _ => {
            return Err(status_error(
                405,
                "watch is served on resource collections",
                None,
            ))
        }
    };
    let labels = params.get("labelSelector").cloned().unwrap_or_default();
    let mut fields = params.get("fieldSelector").cloned().unwrap_or_default();
    if let Some(n) = name {
        if !fields.is_empty() {
            fields.push(',');
        }
        fields.push_str(&format!("metadata.name={n}"));
    }
    parse_label_selector(&labels).map_err(|e| status_error(400, e, None))?;
    fields_match(&json!({}), &fields).map_err(|e| status_error(400, e, None))?;
    let since = match params.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| status_error(400, format!("invalid resourceVersion {rv:?}"), None))?,
        ),
    };
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let include = params
        .get("includeObject")
        .cloned()
        .unwrap_or_else(|| "Metadata".to_owned());
    let filter = Filter {
        collection,
        labels,
        fields,
        table,
        include,
    };

    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (initial, mut last, mut revisions) = {
        let st = state
            .lock()
            .map_err(|_| status_error(500, "state poisoned", None))?;
        let initial: Vec<String> = match since {
            Some(_) => Vec::new(),
            None => st
                .objects
                .iter()
                .filter(|(k, o)| filter.collection.contains(k) && filter.matches(o))
                .map(|(_, o)| filter.line("ADDED", o))
                .collect(),
        };
        (
            initial,
            since.unwrap_or(st.revision),
            st.revision_tx.subscribe(),
        )
    };
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        for line in initial {
            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return;
            }
        }
        loop {
            let lines: Vec<String> = {
                let Ok(st) = state.lock() else { return };
                let lines = st
                    .events
                    .iter()
                    .filter(|e| e.revision > last)
                    .filter(|e| filter.collection.contains(&e.key) && filter.matches(&e.object))
                    .map(|e| filter.line(e.kind, &e.object))
                    .collect();
                last = st.events.last().map_or(last, |e| e.revision.max(last));
                lines
            };
            for line in lines {
                if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                    return;
                }
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = revisions.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
                () = sleep => return,
            }
        }
    });
    Ok(rx)
}

/// What one watch selects and how it prints.
struct Filter {
    collection: Collection,
    labels: String,
    fields: String,
    table: bool,
    include: String,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        let labels = parse_label_selector(&self.labels).unwrap_or_default();
        labels_match(obj, &labels) && fields_match(obj, &self.fields).unwrap_or(false)
    }

    fn line(&self, kind: &str, obj: &Value) -> String {
        let object = if self.table {
            discovery::table(
                vec![discovery::table_row(obj, &self.include)],
                &obj["metadata"]["resourceVersion"],
            )
        } else {
            obj.clone()
        };
        format!("{}\n", json!({"type": kind, "object": object}))
    }
}
