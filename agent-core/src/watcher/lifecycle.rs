//! A watcher's connection lifecycle: dial the cluster's mesh API server, check that it is
//! the configured cluster, open the watch, and when the session ends keep the cluster's
//! last-known records in force, back off and resume from the last applied revision,
//! until the stale TTL (if any) drops them.

use std::sync::Arc;

use clustermesh_api::keys::Kind;
use clustermesh_api::v1;
use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_certs::transport::{ConnectError, MeshEndpoint};
use clustermesh_certs::{MeshTls, PeerIdentity, TlsMaterial, TlsPaths, TlsSource};
use rand::rngs::StdRng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::ReconnectDelays;
use super::mesh::MeshClusters;
use super::{
    mesh, stream, ClusterRegistry, Phase, RecordsInForce, StatusBoard, Update, WatcherConfig,
};
use crate::metrics::Metrics;

/// Why a session ended.
#[derive(Debug)]
pub(super) enum SessionEnd {
    /// Retry with backoff.
    Retry(String),
    /// Identity checks failed; retry slowly.
    Refused(String),
    /// Cancelled.
    Cancelled,
}

/// State carried across sessions.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Revision up to which this cluster's state is applied (0: nothing applied).
    pub(super) revision: u64,
    /// The cluster's records are in force in the desired state.
    pub(super) have_state: bool,
    /// Delays of the current run of failed sessions; an established session starts a
    /// new run.
    delays: Option<ReconnectDelays<StdRng>>,
    /// Endpoint index to try next.
    endpoint: usize,
    /// The last session got as far as an established watch stream.
    established: bool,
    /// Mirror mode ([`WatcherConfig::all_clusters`]): what is held of each cluster.
    pub(super) mesh: MeshClusters,
}

/// Runs the watcher of one cluster until `cancel`.
///
/// `inherited`: the records a previous watcher of this cluster left in force. They stay
/// in force (stale since then, so the stale TTL applies) and the cluster's claim stays
/// held until the first full sync replaces them or the TTL drops them.
///
/// Returns the records this watcher leaves in force, if any; their claim in `registry`
/// is then left held, for the caller to hand over to the next watcher or release.
pub async fn run(
    config: WatcherConfig,
    inherited: Option<RecordsInForce>,
    updates: mpsc::Sender<Update>,
    status: StatusBoard,
    registry: Arc<ClusterRegistry>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Option<RecordsInForce> {
    let name = config.entry.name.clone();
    status.update(&name, |s| {
        // A restarted watcher inherits the status of the one before; it has no session.
        s.phase = Phase::Connecting;
        s.connected = false;
    });
    // Inherited records are in force at no known revision: the first session syncs in
    // full, and its `Replace` takes their place.
    let mut progress = Progress {
        have_state: inherited.is_some(),
        mesh: MeshClusters::inherit(inherited.as_ref().map_or(&[][..], |r| &r.clusters[..])),
        ..Progress::default()
    };
    let mut disconnected_since = inherited.map(|r| r.stale_since);
    loop {
        let end = tokio::select! {
            () = cancel.cancelled() => SessionEnd::Cancelled,
            end = session(&config, &updates, &status, &registry, &metrics, &mut progress) => end,
        };
        let (phase, reason) = match end {
            SessionEnd::Cancelled => break,
            SessionEnd::Retry(r) => (Phase::Backoff, r),
            SessionEnd::Refused(r) => (Phase::Refused, r),
        };
        // The cluster's ID and pod CIDRs stay claimed as long as its records are in force
        // (until the stale TTL drops them, or the watcher ends), so another cluster
        // cannot take them over while this one is merely unreachable.
        if !progress.have_state {
            registry.release(&name);
        }
        metrics.reconnect(&name);
        tracing::warn!(cluster = %name, reason = %reason, "cluster watch ended; keeping last-known state and retrying");
        if std::mem::take(&mut progress.established) {
            disconnected_since = None;
        }
        let since = *disconnected_since.get_or_insert_with(Instant::now);
        if config.all_clusters {
            progress.mesh.session_ended(&name, &status, &reason);
        }
        status.update(&name, |s| {
            s.phase = phase;
            s.connected = false;
            s.stale = progress.have_state;
            s.last_error = Some(reason);
        });
        // A refused session counts as an attempt too: the next retry waits as long as it
        // would have after any other failure.
        let next = progress
            .delays
            .get_or_insert_with(|| config.backoff.delays())
            .next()
            .unwrap_or(config.backoff.max);
        let delay = match phase {
            Phase::Refused => config.backoff.refused_delay(&mut rand::thread_rng()),
            _ => next,
        };
        let ttl_deadline = config
            .stale_ttl
            .filter(|_| progress.have_state)
            .map(|ttl| since + ttl);
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
            () = sleep_until_opt(ttl_deadline) => {
                tracing::warn!(cluster = %name, "cluster unreachable for longer than the stale TTL; dropping its records");
                progress.have_state = false;
                progress.revision = 0;
                status.update(&name, |s| { s.stale = false; s.synced = false; });
                if config.all_clusters {
                    if !progress.mesh.drop_all(&name, &updates, &registry, &status).await {
                        break;
                    }
                } else if updates.send(Update::DropCluster { cluster: name.clone() }).await.is_err() {
                    break;
                }
                registry.release(&name);
            }
        }
    }
    if !progress.have_state {
        registry.release(&name);
        return None;
    }
    // Cancelled during a session that got its watch established: up to date until now.
    let stale_since = match disconnected_since {
        Some(since) if !progress.established => since,
        _ => Instant::now(),
    };
    let clusters = if config.all_clusters {
        progress.mesh.in_force()
    } else {
        vec![name]
    };
    Some(RecordsInForce {
        stale_since,
        clusters,
    })
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One connection: dial, check identity, open the watch, then hand the stream to
/// [`stream::follow`] until it ends.
async fn session(
    config: &WatcherConfig,
    updates: &mpsc::Sender<Update>,
    status: &StatusBoard,
    registry: &ClusterRegistry,
    metrics: &Metrics,
    progress: &mut Progress,
) -> SessionEnd {
    let name = config.entry.name.as_str();
    let endpoints = &config.entry.endpoints;
    if endpoints.is_empty() {
        return SessionEnd::Refused("no endpoints configured".into());
    }
    let target = endpoints[progress.endpoint % endpoints.len()].clone();
    progress.endpoint = progress.endpoint.wrapping_add(1);
    status.update(name, |s| {
        s.phase = Phase::Connecting;
        s.endpoint.clone_from(&target);
    });
    let tls_paths = TlsPaths {
        ca: config.entry.ca_file.clone(),
        cert: config.cert_file.clone(),
        key: config.key_file.clone(),
    };
    // Loaded per session so rotated files are picked up on reconnect. The CA file
    // configured for cluster `name` may vouch for that cluster only (unlabelled CAs in it
    // are scoped to it), so a CA file of one cluster can never authenticate another.
    let tls: Arc<dyn TlsSource> = match TlsMaterial::load(config.trust_domain.clone(), &tls_paths)
        .and_then(|m| {
            let m = m.with_unlabelled_ca_cluster(name);
            MeshTls::new(&m).map_err(|source| clustermesh_certs::TlsError::Material {
                origin: format!("the TLS files of cluster {name}"),
                source,
            })
        }) {
        Ok(t) => Arc::new(t),
        Err(e) => return SessionEnd::Refused(format!("TLS material: {e}")),
    };
    let expected = match PeerIdentity::cluster(config.trust_domain.clone(), name) {
        Ok(p) => p,
        Err(e) => return SessionEnd::Refused(format!("cluster name: {e}")),
    };
    let endpoint = match MeshEndpoint::new(&target, tls) {
        Ok(e) => e
            .expect_peer(expected)
            .connect_timeout(config.connect_timeout),
        Err(e) => return SessionEnd::Refused(format!("endpoint {target}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            // A verified mesh server that is another cluster: the address is wrong, not
            // the network; retrying fast would not help.
            if let Some(ConnectError::UnexpectedPeer { got, expected, .. }) = unexpected_peer(&e) {
                return SessionEnd::Refused(format!(
                    "server at {target} is {got}, but cluster {name} must be {expected}; the address belongs to another cluster, fix the endpoint in the agent config"
                ));
            }
            return SessionEnd::Retry(format!("connect {target}: {e}"));
        }
    };
    let mut client = MeshApiClient::new(channel);
    let deadline = config.request_timeout;
    let no_answer = |what: &str| {
        SessionEnd::Retry(format!(
            "{what}: server at {target} accepted the connection but did not answer within {deadline:?}"
        ))
    };
    let info = match tokio::time::timeout(
        deadline,
        client.get_cluster_info(v1::GetClusterInfoRequest {}),
    )
    .await
    {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => return SessionEnd::Retry(format!("GetClusterInfo: {}", e.message())),
        Err(_) => return no_answer("GetClusterInfo"),
    };
    let Some(cc) = info.config else {
        return SessionEnd::Retry("GetClusterInfo returned no cluster config".into());
    };
    if cc.name != name {
        return SessionEnd::Refused(format!(
            "server at {target} reports cluster name {:?}, configured as {name}; fix the endpoint",
            cc.name
        ));
    }
    if config.entry.id != 0 && cc.id != config.entry.id {
        return SessionEnd::Refused(format!(
            "cluster reports ID {}, configured as {}; fix the configuration or the cluster",
            cc.id, config.entry.id
        ));
    }
    if let Err(reason) = registry.claim(name, cc.id, &cc.pod_cidrs) {
        return SessionEnd::Refused(reason.to_string());
    }
    let from_revision = if progress.have_state {
        progress.revision
    } else {
        0
    };
    let kinds: std::collections::BTreeSet<Kind> = if config.all_clusters {
        mesh::watch_kinds()
    } else {
        mesh::agent_kinds(config.local)
    };
    let request = v1::WatchRequest {
        kinds: kinds.iter().map(|k| k.to_proto() as i32).collect(),
        from_revision,
        all_clusters: config.all_clusters,
    };
    let stream = match tokio::time::timeout(deadline, client.watch(request)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(e)) => return SessionEnd::Retry(format!("Watch: {}", e.message())),
        Err(_) => return no_answer("Watch"),
    };
    tracing::info!(cluster = %name, endpoint = %target, from_revision, "cluster watch established");
    progress.delays = None;
    progress.established = true;
    let syncing = from_revision == 0;
    status.update(name, |s| {
        s.connected = true;
        s.stale = false;
        s.last_error = None;
        s.phase = if syncing {
            Phase::Syncing
        } else {
            Phase::Watching
        };
    });
    if config.all_clusters {
        // Every cluster's config, this one's included, comes in the stream.
        return mesh::follow(
            stream, name, &target, syncing, updates, status, registry, metrics, progress,
        )
        .await;
    }
    if updates
        .send(Update::ClusterInfo {
            cluster: name.to_owned(),
            id: cc.id,
            pod_cidrs: cc.pod_cidrs.clone(),
        })
        .await
        .is_err()
    {
        return SessionEnd::Cancelled;
    }
    stream::follow(
        stream,
        name,
        &kinds,
        syncing,
        config.raw,
        config.max_records,
        updates,
        status,
        metrics,
        progress,
    )
    .await
}

/// The `UnexpectedPeer` error in `e` or its sources (tonic wraps what the connector
/// returned).
fn unexpected_peer(e: &ConnectError) -> Option<&ConnectError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(found @ ConnectError::UnexpectedPeer { .. }) = err.downcast_ref() {
            return Some(found);
        }
        current = err.source();
    }
    None
}
