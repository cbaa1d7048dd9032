//! Mirror mode: one all-clusters watch of the agent's own cluster's mesh API server, which
//! mirrors the connected peers into its store (ARCHITECTURE.md, "Mirroring"), split into
//! one state per cluster so that every cluster is gated, replaced and dropped on its own,
//! exactly as a direct-mode watcher of that cluster would do it:
//!
//! * A cluster's records are buffered until its cluster config has arrived (and its ID and
//!   pod CIDRs are claimed without conflict) and the `Synced` marker of every kind the
//!   agent reads has arrived for that cluster; then they replace the cluster's state in
//!   one [`Update::Replace`]. Until then a previous state stays in force, so a peer the
//!   server is still mirroring is never programmed half-synced.
//! * After that, its events are applied as they come.
//! * A full state (a watch from scratch, or after a `Reset`) ends with `StateComplete`: a
//!   cluster in force that had no cluster config in it is gone and is dropped; so is a
//!   cluster whose cluster config is deleted live (the server stopped mirroring it).
//! * Buffers outlive a broken session: a resumed watch continues exactly after the last
//!   event received, so a cluster that was mid-sync completes from where it was. A full
//!   state cut off before `StateComplete` is started over from scratch.
//!
//! Keys that are not mesh record keys, records that do not decode, policies of another
//! cluster and cluster configs whose name is not their key's are refused, logged with the
//! cluster and counted, as in direct mode.

use std::collections::{BTreeMap, BTreeSet};

use clustermesh_api::keys::{parse_key, Kind};
use clustermesh_api::records::Record;
use clustermesh_api::v1;
use tokio::sync::mpsc;

use super::lifecycle::{Progress, SessionEnd};
use super::stream::{self, Resync};
use super::{ClusterRegistry, StatusBoard, Update};
use crate::metrics::Metrics;
use clustermesh_api::model::Phase;

/// A cluster's ID and pod CIDRs from its cluster config record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Info {
    id: u32,
    pod_cidrs: Vec<String>,
}

/// What the agent holds of one cluster seen through the mirror.
#[derive(Debug, Default)]
struct Held {
    /// Its cluster config, claimed in the registry (`None`: not seen yet, or refused).
    info: Option<Info>,
    /// Its records are in force in the desired state.
    in_force: bool,
    /// Its records are buffered in `resync` until it is complete.
    syncing: bool,
    resync: Resync,
}

/// The per-cluster state of a mirror-mode watcher; outlives its sessions.
#[derive(Debug, Default)]
pub struct MeshClusters {
    clusters: BTreeMap<String, Held>,
    /// A full state is being received: the clusters whose config it held so far.
    full_state: Option<BTreeSet<String>>,
}

impl MeshClusters {
    /// The state a new watcher starts from when the previous one left `clusters` in force:
    /// they stay in force until the first full state replaces (or drops) them.
    #[must_use]
    pub fn inherit(clusters: &[String]) -> Self {
        Self {
            clusters: clusters
                .iter()
                .map(|c| {
                    let held = Held {
                        in_force: true,
                        syncing: true,
                        ..Held::default()
                    };
                    (c.clone(), held)
                })
                .collect(),
            full_state: None,
        }
    }

    /// Clusters whose records are in force.
    #[must_use]
    pub fn in_force(&self) -> Vec<String> {
        self.clusters
            .iter()
            .filter(|(_, h)| h.in_force)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Some cluster's records are in force.
    #[must_use]
    pub fn any_in_force(&self) -> bool {
        self.clusters.values().any(|h| h.in_force)
    }

    /// A full state starts: every cluster resyncs (its current state kept until then).
    fn start_full_state(&mut self) {
        for held in self.clusters.values_mut() {
            held.syncing = true;
            held.resync = Resync::default();
        }
        self.full_state = Some(BTreeSet::new());
    }

    /// The session ended: the status of every mirrored cluster says so (`home` is the
    /// lifecycle's own to report).
    pub fn session_ended(&self, home: &str, status: &StatusBoard, reason: &str) {
        for (name, held) in self.clusters.iter().filter(|(n, _)| *n != home) {
            status.update(name, |s| {
                s.connected = false;
                s.stale = held.in_force;
                s.phase = Phase::Backoff;
                s.last_error = Some(format!("via cluster {home}: {reason}"));
            });
        }
    }

    /// Drops every cluster (the home server was unreachable for longer than the stale
    /// TTL). Returns false when the receiver is gone.
    pub async fn drop_all(
        &mut self,
        home: &str,
        updates: &mpsc::Sender<Update>,
        registry: &ClusterRegistry,
        status: &StatusBoard,
    ) -> bool {
        for (name, held) in std::mem::take(&mut self.clusters) {
            if held.in_force
                && updates
                    .send(Update::DropCluster {
                        cluster: name.clone(),
                    })
                    .await
                    .is_err()
            {
                return false;
            }
            registry.release(&name);
            if name != home {
                status.update(&name, |s| {
                    s.stale = false;
                    s.synced = false;
                });
            }
        }
        self.full_state = None;
        true
    }
}

/// The kinds an agent reads of a cluster: policies of its own (`local`) cluster only.
#[must_use]
pub fn agent_kinds(local: bool) -> BTreeSet<Kind> {
    let mut kinds: BTreeSet<Kind> = [Kind::Identity, Kind::Endpoint, Kind::Service].into();
    if local {
        kinds.insert(Kind::Policy);
    }
    kinds
}

/// The kinds the agent reads of `cluster`, whose own cluster is `home`.
fn kinds_of(cluster: &str, home: &str) -> BTreeSet<Kind> {
    agent_kinds(cluster == home)
}

/// The kinds an all-clusters watch asks for.
#[must_use]
pub fn watch_kinds() -> BTreeSet<Kind> {
    let mut kinds = agent_kinds(true);
    kinds.insert(Kind::ClusterConfig);
    kinds
}

/// One session's context.
struct Session<'a> {
    home: &'a str,
    endpoint: &'a str,
    updates: &'a mpsc::Sender<Update>,
    status: &'a StatusBoard,
    registry: &'a ClusterRegistry,
    metrics: &'a Metrics,
}

/// Applies the events of an established all-clusters watch `stream` of the home
/// cluster's server until it ends; `from_scratch`: the watch started without a revision,
/// so a full state comes first.
#[allow(clippy::too_many_arguments)]
pub(super) async fn follow(
    mut stream: tonic::Streaming<v1::WatchEvent>,
    home: &str,
    endpoint: &str,
    from_scratch: bool,
    updates: &mpsc::Sender<Update>,
    status: &StatusBoard,
    registry: &ClusterRegistry,
    metrics: &Metrics,
    progress: &mut Progress,
) -> SessionEnd {
    let session = Session {
        home,
        endpoint,
        updates,
        status,
        registry,
        metrics,
    };
    if from_scratch {
        progress.mesh.start_full_state();
        progress.revision = 0;
    }
    loop {
        let event = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return SessionEnd::Retry("server closed the watch".into()),
            Err(e) => return SessionEnd::Retry(format!("watch stream: {}", e.message())),
        };
        let Some(event) = event.event else {
            continue;
        };
        let (revision, sent) = match event {
            v1::watch_event::Event::Reset(r) => {
                tracing::info!(cluster = %home, reason = %r.reason, "server reset the all-clusters watch; resyncing every cluster (current state kept until synced)");
                progress.mesh.start_full_state();
                progress.revision = 0;
                for name in progress.mesh.clusters.keys() {
                    status.update(name, |s| s.phase = Phase::Syncing);
                }
                (0, true)
            }
            v1::watch_event::Event::Upsert(u) => {
                let sent = session.upsert(&mut progress.mesh, &u).await;
                (u.revision, sent)
            }
            v1::watch_event::Event::Delete(d) => {
                let sent = session.delete(&mut progress.mesh, &d).await;
                (d.revision, sent)
            }
            v1::watch_event::Event::Synced(s) => {
                let cluster = if s.cluster.is_empty() {
                    home.to_owned()
                } else {
                    s.cluster.clone()
                };
                metrics.event(&cluster);
                let sent = match Kind::from_proto(s.kind) {
                    Some(kind) => {
                        let held = progress.mesh.clusters.entry(cluster.clone()).or_default();
                        held.resync.synced.insert(kind);
                        session
                            .complete_if_ready(&mut progress.mesh, &cluster)
                            .await
                    }
                    None => true,
                };
                (s.revision, sent)
            }
            v1::watch_event::Event::Complete(c) => {
                let sent = session.full_state_done(&mut progress.mesh).await;
                progress.revision = c.revision;
                (c.revision, sent)
            }
        };
        if !sent {
            return SessionEnd::Cancelled;
        }
        // Inside a full state the revisions are not in order and a cut-off full state
        // starts over; elsewhere events come in revision order and everything up to the
        // last one is applied or buffered.
        if progress.mesh.full_state.is_none() {
            progress.revision = progress.revision.max(revision);
            progress.have_state = progress.mesh.any_in_force();
            let rev = progress.revision;
            status.update(home, |s| s.revision = rev);
        }
    }
}

impl Session<'_> {
    /// One record written (false: the receiver is gone).
    async fn upsert(&self, mesh: &mut MeshClusters, u: &v1::Upsert) -> bool {
        let Some(cluster) = self.cluster_of(&u.key) else {
            return true;
        };
        self.metrics.event(&cluster);
        if Kind::from_proto(u.kind) == Some(Kind::ClusterConfig)
            || u.key == clustermesh_api::keys::cluster_config_key(&cluster)
        {
            return self.cluster_config(mesh, &cluster, u).await;
        }
        let kinds = kinds_of(&cluster, self.home);
        let Some((slot, mesh_key)) =
            stream::classify(&cluster, &u.key, &kinds, self.status, self.metrics)
        else {
            return true;
        };
        let decoded = stream::decode(&cluster, &mesh_key, u, self.status, self.metrics);
        let held = mesh
            .clusters
            .entry(cluster.clone())
            .or_insert_with(|| Held {
                syncing: true,
                ..Held::default()
            });
        if held.syncing {
            held.resync.put(slot, decoded, true);
            return true;
        }
        match stream::live_upsert(&cluster, decoded) {
            Some(update) => self.updates.send(update).await.is_ok(),
            None => true,
        }
    }

    /// One record removed (false: the receiver is gone).
    async fn delete(&self, mesh: &mut MeshClusters, d: &v1::Delete) -> bool {
        let Some(cluster) = self.cluster_of(&d.key) else {
            return true;
        };
        self.metrics.event(&cluster);
        if d.key == clustermesh_api::keys::cluster_config_key(&cluster) {
            tracing::info!(cluster = %cluster, home = %self.home, "cluster no longer mirrored by our cluster's server; dropping its records");
            return self.drop_cluster(mesh, &cluster).await;
        }
        let kinds = kinds_of(&cluster, self.home);
        let Some((slot, _)) = stream::classify(&cluster, &d.key, &kinds, self.status, self.metrics)
        else {
            return true;
        };
        let Some(held) = mesh.clusters.get_mut(&cluster) else {
            return true;
        };
        if held.syncing {
            held.resync.put(slot, None, false);
            return true;
        }
        self.updates
            .send(stream::live_remove(&cluster, slot))
            .await
            .is_ok()
    }

    /// How a mirrored cluster is reached, for its status: through our own server.
    fn via(&self) -> String {
        format!("via {} ({})", self.home, self.endpoint)
    }

    /// The cluster a record key belongs to; `None` (logged, counted against the home
    /// cluster) for a key that is not a mesh key.
    fn cluster_of(&self, key: &str) -> Option<String> {
        match parse_key(key.as_bytes()) {
            Ok(parsed) => Some(parsed.cluster().to_owned()),
            Err(e) => {
                tracing::warn!(cluster = %self.home, key = %key, error = %e, "undecodable record key in the all-clusters watch; ignored");
                self.metrics.decode_error(self.home);
                self.status.update(self.home, |s| s.decode_errors += 1);
                None
            }
        }
    }

    /// A cluster config record: the cluster's ID and pod CIDRs, claimed against every
    /// other cluster's.
    async fn cluster_config(&self, mesh: &mut MeshClusters, cluster: &str, u: &v1::Upsert) -> bool {
        if let Some(seen) = mesh.full_state.as_mut() {
            seen.insert(cluster.to_owned());
        }
        let held = mesh
            .clusters
            .entry(cluster.to_owned())
            .or_insert_with(|| Held {
                syncing: true,
                ..Held::default()
            });
        let config = match Record::decode(Kind::ClusterConfig, &u.key, &u.value) {
            Ok(Record::ClusterConfig(c)) if c.name == cluster => c,
            Ok(_) => {
                tracing::warn!(cluster = %cluster, key = %u.key, "cluster config names another cluster; refused");
                self.metrics.refused_record(cluster);
                self.status.update(cluster, |s| s.refused_records += 1);
                return true;
            }
            Err(e) => {
                tracing::warn!(cluster = %cluster, key = %u.key, error = %e, "undecodable cluster config; ignored");
                self.metrics.decode_error(cluster);
                self.status.update(cluster, |s| s.decode_errors += 1);
                return true;
            }
        };
        let info = Info {
            id: config.id,
            pod_cidrs: config.pod_cidrs.clone(),
        };
        if held.info.as_ref() == Some(&info) {
            return true;
        }
        if let Err(e) = self.registry.claim(cluster, info.id, &info.pod_cidrs) {
            let reason = format!("cluster {cluster} {e}");
            tracing::error!(cluster = %cluster, error = %e, "cluster refused: its ID or pod CIDRs collide with another cluster's; its records are not used");
            self.metrics.refused_record(cluster);
            let was_in_force = held.in_force;
            held.info = None;
            held.in_force = false;
            held.syncing = true;
            self.status.update(cluster, |s| {
                s.phase = Phase::Refused;
                s.synced = false;
                s.stale = false;
                s.last_error = Some(reason);
            });
            return !was_in_force || self.send_drop(cluster).await;
        }
        held.info = Some(info.clone());
        let endpoint = self.via();
        self.status.update(cluster, |s| {
            s.connected = true;
            s.endpoint = endpoint;
            if s.phase == Phase::Refused {
                s.phase = Phase::Syncing;
                s.last_error = None;
            }
        });
        if self
            .updates
            .send(Update::ClusterInfo {
                cluster: cluster.to_owned(),
                id: info.id,
                pod_cidrs: info.pod_cidrs,
            })
            .await
            .is_err()
        {
            return false;
        }
        self.complete_if_ready(mesh, cluster).await
    }

    /// Hands a syncing cluster's buffered records over once its config is claimed and
    /// every kind the agent reads of it is synced.
    async fn complete_if_ready(&self, mesh: &mut MeshClusters, cluster: &str) -> bool {
        let Some(held) = mesh.clusters.get_mut(cluster) else {
            return true;
        };
        let kinds = kinds_of(cluster, self.home);
        let ready = held.syncing
            && held.info.is_some()
            && kinds.iter().all(|k| held.resync.synced.contains(k));
        if !ready {
            return true;
        }
        let done = std::mem::take(&mut held.resync);
        held.syncing = false;
        held.in_force = true;
        tracing::info!(cluster = %cluster, services = done.services.len(), inputs = done.inputs.len(), "cluster synced through our cluster's server");
        let endpoint = self.via();
        let home = cluster == self.home;
        self.status.update(cluster, |s| {
            s.phase = Phase::Watching;
            s.synced = true;
            s.stale = false;
            s.connected = true;
            if !home {
                s.endpoint = endpoint;
                s.last_error = None;
            }
        });
        self.updates
            .send(Update::Replace {
                cluster: cluster.to_owned(),
                services: done.services,
                inputs: done.inputs,
            })
            .await
            .is_ok()
    }

    /// The full state has been sent: clusters in force that were not in it are gone.
    async fn full_state_done(&self, mesh: &mut MeshClusters) -> bool {
        let Some(seen) = mesh.full_state.take() else {
            return true;
        };
        let gone: Vec<String> = mesh
            .clusters
            .keys()
            .filter(|c| !seen.contains(*c))
            .cloned()
            .collect();
        for cluster in gone {
            tracing::info!(cluster = %cluster, home = %self.home, "cluster not in our cluster's server's full state; dropping its records");
            if !self.drop_cluster(mesh, &cluster).await {
                return false;
            }
        }
        true
    }

    /// Forgets a cluster: its records, its claim, its status.
    async fn drop_cluster(&self, mesh: &mut MeshClusters, cluster: &str) -> bool {
        let Some(held) = mesh.clusters.remove(cluster) else {
            return true;
        };
        self.registry.release(cluster);
        if cluster == self.home {
            self.status.update(cluster, |s| {
                s.synced = false;
                s.phase = Phase::Syncing;
            });
        } else {
            // A configured cluster is listed again (not synced) by the supervisor.
            self.status.remove(cluster);
        }
        !held.in_force || self.send_drop(cluster).await
    }

    /// Tells the desired state to forget `cluster` (false: the receiver is gone).
    async fn send_drop(&self, cluster: &str) -> bool {
        self.updates
            .send(Update::DropCluster {
                cluster: cluster.to_owned(),
            })
            .await
            .is_ok()
    }
}
