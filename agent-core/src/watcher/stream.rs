//! What an established watch session does with its events: buffer a full sync until the
//! `Synced` marker and hand it over as one replacement, apply live events one by one, and
//! refuse (log and count) records that do not decode or belong to another cluster.

use std::collections::{BTreeMap, BTreeSet};

use clustermesh_api::keys::{parse_key, Kind, MeshKey};
use clustermesh_api::model::{RecordError, ServiceName, ServiceRecord};
use clustermesh_api::records::Record;
use clustermesh_api::v1;
use tokio::sync::mpsc;

use super::lifecycle::{Progress, SessionEnd};
use super::{Phase, StatusBoard, Update};
use crate::metrics::Metrics;
use crate::policy::inputs::{self, Input, InputKey};

/// What one record key is, once known to be a key of this cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Slot {
    Service(ServiceName),
    Input(InputKey),
}

/// A decoded record.
#[derive(Debug)]
pub(super) enum Decoded {
    Service(ServiceRecord),
    Input(Input),
}

/// A full sync in progress: what arrived so far; `None`: the value did not decode, keep
/// the previous record.
#[derive(Debug, Default)]
pub(super) struct Resync {
    pub(super) services: BTreeMap<ServiceName, Option<ServiceRecord>>,
    pub(super) inputs: BTreeMap<InputKey, Option<Input>>,
    /// Raw mode: the validated wire values by key instead.
    raw: BTreeMap<String, Option<bytes::Bytes>>,
    pub(super) synced: BTreeSet<Kind>,
}

impl Resync {
    pub(super) fn len(&self) -> usize {
        self.services.len() + self.inputs.len() + self.raw.len()
    }

    /// Raw mode: `value` is the validated wire value of `key` (`None`: it did not
    /// validate; `keep_existing`: the previous value stays, else the record is gone).
    fn put_raw(&mut self, key: &str, value: Option<bytes::Bytes>, keep_existing: bool) {
        match value {
            Some(v) => {
                self.raw.insert(key.to_owned(), Some(v));
            }
            None if keep_existing => {
                self.raw.entry(key.to_owned()).or_insert(None);
            }
            None => {
                self.raw.remove(key);
            }
        }
    }

    pub(super) fn put(&mut self, slot: Slot, decoded: Option<Decoded>, keep_existing: bool) {
        match (slot, decoded) {
            (_, Some(Decoded::Service(r))) => {
                self.services.insert(r.name.clone(), Some(r));
            }
            (_, Some(Decoded::Input(i))) => {
                self.inputs.insert(i.key(), Some(i));
            }
            (Slot::Service(name), None) if keep_existing => {
                self.services.entry(name).or_insert(None);
            }
            (Slot::Input(key), None) if keep_existing => {
                self.inputs.entry(key).or_insert(None);
            }
            (Slot::Service(name), None) => {
                self.services.remove(&name);
            }
            (Slot::Input(key), None) => {
                self.inputs.remove(&key);
            }
        }
    }
}

/// Applies the events of an established watch `stream` of cluster `name` until it ends;
/// `syncing`: the session started from scratch, so records are buffered until the
/// `Synced` marker of every kind in `kinds` has arrived; `raw`: hand records over as
/// validated wire values ([`Update::RawReplace`] etc.); `max_records`: a full state
/// growing past it ends the session as refused. Advances `progress` as events are
/// applied.
#[allow(clippy::too_many_arguments)]
pub(super) async fn follow(
    mut stream: tonic::Streaming<v1::WatchEvent>,
    name: &str,
    kinds: &BTreeSet<Kind>,
    mut syncing: bool,
    raw: bool,
    max_records: Option<usize>,
    updates: &mpsc::Sender<Update>,
    status: &StatusBoard,
    metrics: &Metrics,
    progress: &mut Progress,
) -> SessionEnd {
    let mut resync = Resync::default();
    let mut pending_revision = progress.revision;
    loop {
        let event = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return SessionEnd::Retry("server closed the watch".into()),
            Err(e) => return SessionEnd::Retry(format!("watch stream: {}", e.message())),
        };
        metrics.event(name);
        let Some(event) = event.event else {
            continue;
        };
        let mut update = None;
        match event {
            v1::watch_event::Event::Reset(r) => {
                tracing::info!(cluster = %name, reason = %r.reason, "server reset the watch; resyncing (current state kept until synced)");
                syncing = true;
                resync = Resync::default();
                // The server's history starts over: its revision may be lower than ours
                // (a store restored or replaced). Count from the Reset's revision, or a
                // later resume would skip everything between the two.
                pending_revision = r.revision;
                status.update(name, |s| s.phase = Phase::Syncing);
            }
            v1::watch_event::Event::Upsert(u) => {
                pending_revision = pending_revision.max(u.revision);
                if let Some((slot, mesh_key)) = classify(name, &u.key, kinds, status, metrics) {
                    let decoded = decode(name, &mesh_key, &u, status, metrics);
                    if raw {
                        let valid = decoded.is_some().then(|| u.value.clone());
                        if syncing {
                            resync.put_raw(&u.key, valid, true);
                        } else {
                            update = valid.map(|value| Update::RawUpsert {
                                cluster: name.to_owned(),
                                key: u.key.clone(),
                                value,
                            });
                        }
                    } else if syncing {
                        // Like a bad live update, a bad value in a resync leaves the
                        // previous record (from this sync or from before) in force.
                        resync.put(slot, decoded, true);
                    } else {
                        update = live_upsert(name, decoded);
                    }
                }
            }
            v1::watch_event::Event::Delete(d) => {
                pending_revision = pending_revision.max(d.revision);
                if let Some((slot, _)) = classify(name, &d.key, kinds, status, metrics) {
                    if raw {
                        if syncing {
                            resync.put_raw(&d.key, None, false);
                        } else {
                            update = Some(Update::RawRemove {
                                cluster: name.to_owned(),
                                key: d.key.clone(),
                            });
                        }
                    } else if syncing {
                        resync.put(slot, None, false);
                    } else {
                        update = Some(live_remove(name, slot));
                    }
                }
            }
            // Sent only to all_clusters watches, which this session does not open.
            v1::watch_event::Event::Complete(_) => {}
            v1::watch_event::Event::Synced(s) => {
                pending_revision = pending_revision.max(s.revision);
                if syncing {
                    if let Some(kind) = Kind::from_proto(s.kind) {
                        resync.synced.insert(kind);
                    }
                    if kinds.iter().all(|k| resync.synced.contains(k)) {
                        syncing = false;
                        let done = std::mem::take(&mut resync);
                        update = Some(if raw {
                            Update::RawReplace {
                                cluster: name.to_owned(),
                                records: done.raw,
                            }
                        } else {
                            Update::Replace {
                                cluster: name.to_owned(),
                                services: done.services,
                                inputs: done.inputs,
                            }
                        });
                    }
                }
            }
        }
        if let Some(max) = max_records.filter(|max| syncing && resync.len() > *max) {
            tracing::error!(cluster = %name, limit = max, "full state exceeds the record limit; session cut off");
            metrics.refused_record(name);
            status.update(name, |s| s.refused_records += 1);
            return SessionEnd::Refused(format!(
                "cluster {name} sent more than {max} records in its full state; cut off (raise the limit if the cluster is legitimately this large)"
            ));
        }
        if let Some(u) = update {
            if updates.send(u).await.is_err() {
                return SessionEnd::Cancelled;
            }
        }
        if !syncing {
            progress.revision = pending_revision;
            progress.have_state = true;
            let rev = progress.revision;
            status.update(name, |s| {
                s.phase = Phase::Watching;
                s.synced = true;
                s.revision = rev;
            });
        }
    }
}

/// The update for a live upsert of a decoded record of cluster `name` (`None`: it did
/// not decode; the previous record stays).
pub(super) fn live_upsert(name: &str, decoded: Option<Decoded>) -> Option<Update> {
    match decoded? {
        Decoded::Service(r) => Some(Update::Upsert(r)),
        Decoded::Input(input) => Some(Update::UpsertInput {
            cluster: name.to_owned(),
            input,
        }),
    }
}

/// The update for a live removal of the record in `slot` of cluster `name`.
pub(super) fn live_remove(name: &str, slot: Slot) -> Update {
    match slot {
        Slot::Service(svc) => Update::Remove {
            cluster: name.to_owned(),
            name: svc,
        },
        Slot::Input(key) => Update::RemoveInput {
            cluster: name.to_owned(),
            key,
        },
    }
}

/// What `key` holds, if it is a record key of cluster `name` of one of `kinds`.
pub(super) fn classify(
    name: &str,
    key: &str,
    kinds: &BTreeSet<Kind>,
    status: &StatusBoard,
    metrics: &Metrics,
) -> Option<(Slot, MeshKey)> {
    let refused = |parsed: &dyn std::fmt::Display| {
        tracing::warn!(cluster = %name, key = %key, parsed = %parsed, "record key is not a watched record of this cluster; refused");
        metrics.refused_record(name);
        status.update(name, |s| s.refused_records += 1);
    };
    match parse_key(key.as_bytes()) {
        Ok(parsed)
            if parsed.cluster() == name && parsed.kind().is_some_and(|k| kinds.contains(&k)) =>
        {
            let slot = match &parsed {
                MeshKey::Service {
                    namespace,
                    name: svc,
                    ..
                } => Slot::Service(ServiceName {
                    namespace: namespace.clone(),
                    name: svc.clone(),
                }),
                other => match InputKey::of(other) {
                    Some(k) => Slot::Input(k),
                    None => {
                        refused(&parsed);
                        return None;
                    }
                },
            };
            Some((slot, parsed))
        }
        Ok(other) => {
            refused(&other);
            None
        }
        Err(e) => {
            tracing::warn!(cluster = %name, key = %key, error = %e, "undecodable record key; ignored");
            metrics.decode_error(name);
            status.update(name, |s| s.decode_errors += 1);
            None
        }
    }
}

/// The record in `u` (whose key is `mesh_key`, of cluster `name`); `None` (counted and
/// logged) when it does not decode or is refused.
pub(super) fn decode(
    name: &str,
    mesh_key: &MeshKey,
    u: &v1::Upsert,
    status: &StatusBoard,
    metrics: &Metrics,
) -> Option<Decoded> {
    let kind = mesh_key.kind()?;
    let record = match Record::decode(kind, &u.key, &u.value) {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(cluster = %name, key = %u.key, error = %e, "undecodable record; ignored");
            metrics.decode_error(name);
            status.update(name, |s| s.decode_errors += 1);
            return None;
        }
    };
    let (decoded, wrong_cluster) = match &record {
        Record::Service(svc) => match ServiceRecord::from_wire(name, svc) {
            Ok(r) => (Ok(Decoded::Service(r)), false),
            Err(e) => {
                let wrong = matches!(e, RecordError::WrongCluster { .. });
                (Err(e.to_string()), wrong)
            }
        },
        Record::Identity(r) => (
            inputs::identity_from_wire(&u.key, mesh_key, r)
                .map(|r| Decoded::Input(Input::Identity(r)))
                .map_err(|e| e.to_string()),
            false,
        ),
        Record::Endpoint(r) => {
            let wrong = !r.cluster.is_empty() && r.cluster != name;
            (
                inputs::endpoint_from_wire(&u.key, mesh_key, name, r)
                    .map(|r| Decoded::Input(Input::Endpoint(r)))
                    .map_err(|e| e.to_string()),
                wrong,
            )
        }
        Record::Policy(r) => {
            let wrong = !r.cluster.is_empty() && r.cluster != name;
            (
                inputs::policy_from_wire(&u.key, mesh_key, r)
                    .map(|r| Decoded::Input(Input::Policy(r)))
                    .map_err(|e| e.to_string()),
                wrong,
            )
        }
        Record::ClusterConfig(_) | Record::Node(_) => return None,
    };
    match decoded {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(cluster = %name, key = %u.key, error = %e, "record refused");
            if wrong_cluster {
                metrics.refused_record(name);
                status.update(name, |s| s.refused_records += 1);
            } else {
                metrics.decode_error(name);
                status.update(name, |s| s.decode_errors += 1);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_and_bad_keys_are_counted() {
        let status = StatusBoard::default();
        let metrics = Metrics::new();
        let kinds: BTreeSet<Kind> = [Kind::Service, Kind::Identity, Kind::Endpoint].into();
        let web = "mesh/v1/services/east/default/web";
        assert!(classify("east", web, &kinds, &status, &metrics).is_some());
        assert!(classify(
            "east",
            "mesh/v1/services/west/default/web",
            &kinds,
            &status,
            &metrics
        )
        .is_none());
        assert!(classify("east", "garbage", &kinds, &status, &metrics).is_none());
        let s = status.get("east").unwrap();
        assert_eq!((s.refused_records, s.decode_errors), (1, 1));
        let bad = v1::Upsert {
            kind: v1::Kind::Service as i32,
            key: "mesh/v1/services/east/default/web".into(),
            value: vec![0xff, 0xff, 0xff].into(),
            revision: 3,
        };
        let (slot, key) = classify("east", web, &kinds, &status, &metrics).unwrap();
        assert_eq!(
            slot,
            Slot::Service(ServiceName {
                namespace: "default".into(),
                name: "web".into()
            })
        );
        assert!(decode("east", &key, &bad, &status, &metrics).is_none());
        assert_eq!(metrics.decode_errors_of("east"), 2);
        // A policy key is refused unless policies are watched (only the local cluster's).
        assert!(classify(
            "east",
            "mesh/v1/policies/east/default/networkpolicy/p",
            &kinds,
            &status,
            &metrics
        )
        .is_none());
        assert_eq!(status.get("east").unwrap().refused_records, 2);
        // An endpoint record naming another address than its key is refused alone.
        let ep = "mesh/v1/endpoints/east/10.0.0.5";
        let (_, key) = classify("east", ep, &kinds, &status, &metrics).unwrap();
        let lying = v1::Upsert {
            kind: v1::Kind::Endpoint as i32,
            key: ep.into(),
            value: Record::Endpoint(v1::Endpoint {
                ip: "10.0.0.6".into(),
                identity: 65_800,
                cluster: "east".into(),
                ..v1::Endpoint::default()
            })
            .encode()
            .into(),
            revision: 4,
        };
        assert!(decode("east", &key, &lying, &status, &metrics).is_none());
        assert_eq!(metrics.decode_errors_of("east"), 3);
    }
}
