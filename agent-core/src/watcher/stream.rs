//! What an established watch session does with its events: buffer a full sync until the
//! `Synced` marker and hand it over as one replacement, apply live events one by one, and
//! refuse (log and count) records that do not decode or belong to another cluster.

use std::collections::BTreeMap;

use clustermesh_api::keys::{parse_key, Kind, MeshKey};
use clustermesh_api::model::{RecordError, ServiceName, ServiceRecord};
use clustermesh_api::records::Record;
use clustermesh_api::v1;
use tokio::sync::mpsc;

use super::lifecycle::{Progress, SessionEnd};
use super::{Phase, StatusBoard, Update};
use crate::metrics::Metrics;

/// Applies the events of an established watch `stream` of cluster `name` until it ends;
/// `syncing`: the session started from scratch, so records are buffered until the
/// `Synced` marker. Advances `progress` as events are applied.
pub(super) async fn follow(
    mut stream: tonic::Streaming<v1::WatchEvent>,
    name: &str,
    mut syncing: bool,
    updates: &mpsc::Sender<Update>,
    status: &StatusBoard,
    metrics: &Metrics,
    progress: &mut Progress,
) -> SessionEnd {
    // The services of a resync so far; `None`: the value did not decode, keep the previous.
    let mut resync: BTreeMap<ServiceName, Option<ServiceRecord>> = BTreeMap::new();
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
                resync.clear();
                // The server's history starts over: its revision may be lower than ours
                // (a store restored or replaced). Count from the Reset's revision, or a
                // later resume would skip everything between the two.
                pending_revision = r.revision;
                status.update(name, |s| s.phase = Phase::Syncing);
            }
            v1::watch_event::Event::Upsert(u) => {
                pending_revision = pending_revision.max(u.revision);
                match decode_upsert(name, &u, status, metrics) {
                    Ok(rec) if syncing => {
                        resync.insert(rec.name.clone(), Some(rec));
                    }
                    Ok(rec) => update = Some(Update::Upsert(rec)),
                    // Like a bad live update, a bad value in a resync leaves the previous
                    // record of that service (from this sync or from before) in force.
                    Err(Some(svc)) if syncing => {
                        resync.entry(svc).or_insert(None);
                    }
                    Err(_) => {}
                }
            }
            v1::watch_event::Event::Delete(d) => {
                pending_revision = pending_revision.max(d.revision);
                if let Some(svc) = service_key(name, &d.key, status, metrics) {
                    if syncing {
                        resync.remove(&svc);
                    } else {
                        update = Some(Update::Remove {
                            cluster: name.to_owned(),
                            name: svc,
                        });
                    }
                }
            }
            v1::watch_event::Event::Synced(s) => {
                pending_revision = pending_revision.max(s.revision);
                if syncing && s.kind == v1::Kind::Service as i32 {
                    syncing = false;
                    update = Some(Update::Replace {
                        cluster: name.to_owned(),
                        services: std::mem::take(&mut resync),
                    });
                }
            }
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

/// The service name in `key`, if it is a service key of cluster `name`.
fn service_key(
    name: &str,
    key: &str,
    status: &StatusBoard,
    metrics: &Metrics,
) -> Option<ServiceName> {
    match parse_key(key.as_bytes()) {
        Ok(MeshKey::Service {
            cluster,
            namespace,
            name: svc,
        }) if cluster == name => Some(ServiceName {
            namespace,
            name: svc,
        }),
        Ok(other) => {
            tracing::warn!(cluster = %name, key = %key, parsed = %other, "record key is not a service of this cluster; refused");
            metrics.refused_record(name);
            status.update(name, |s| s.refused_records += 1);
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

/// The record in `u`; on failure (counted and logged), the service it was for if the key
/// is a service key of this cluster.
fn decode_upsert(
    name: &str,
    u: &v1::Upsert,
    status: &StatusBoard,
    metrics: &Metrics,
) -> Result<ServiceRecord, Option<ServiceName>> {
    let svc = service_key(name, &u.key, status, metrics).ok_or(None)?;
    let record = match Record::decode(Kind::Service, &u.key, &u.value) {
        Ok(Record::Service(record)) => record,
        Ok(_) => return Err(Some(svc)),
        Err(e) => {
            tracing::warn!(cluster = %name, key = %u.key, error = %e, "undecodable record; ignored");
            metrics.decode_error(name);
            status.update(name, |s| s.decode_errors += 1);
            return Err(Some(svc));
        }
    };
    match ServiceRecord::from_wire(name, &record) {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!(cluster = %name, key = %u.key, error = %e, "record refused");
            match e {
                RecordError::WrongCluster { .. } => {
                    metrics.refused_record(name);
                    status.update(name, |s| s.refused_records += 1);
                }
                _ => {
                    metrics.decode_error(name);
                    status.update(name, |s| s.decode_errors += 1);
                }
            }
            Err(Some(svc))
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
        assert!(service_key(
            "east",
            "mesh/v1/services/east/default/web",
            &status,
            &metrics
        )
        .is_some());
        assert!(service_key(
            "east",
            "mesh/v1/services/west/default/web",
            &status,
            &metrics
        )
        .is_none());
        assert!(service_key("east", "garbage", &status, &metrics).is_none());
        let s = status.get("east").unwrap();
        assert_eq!((s.refused_records, s.decode_errors), (1, 1));
        let bad = v1::Upsert {
            kind: v1::Kind::Service as i32,
            key: "mesh/v1/services/east/default/web".into(),
            value: vec![0xff, 0xff, 0xff].into(),
            revision: 3,
        };
        assert_eq!(
            decode_upsert("east", &bad, &status, &metrics),
            Err(Some(ServiceName {
                namespace: "default".into(),
                name: "web".into()
            }))
        );
        assert_eq!(metrics.decode_errors_of("east"), 2);
    }
}
