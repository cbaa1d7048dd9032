//! Talks to a cluster's mesh API server as the CLI's admin identity: is it up, and is it
//! the cluster the state directory says it is.
//!
//! `connect` refuses a peer that is down, and `status` reports the server, so both go
//! through here. Every endpoint listed in `cluster.yaml` is tried; the first that answers
//! wins.

use std::sync::Arc;
use std::time::Duration;

use clustermesh_api::v1::mesh_api_client::MeshApiClient;
use clustermesh_api::v1::{GetClusterInfoRequest, StatusRequest, StatusResponse};
use clustermesh_certs::transport::MeshEndpoint;
use clustermesh_certs::{MeshTls, PeerIdentity, TlsPaths, TlsSource, TrustDomain};

use crate::state::{ClusterState, StateDir};

/// Why a mesh API server could not be queried.
#[derive(Debug, thiserror::Error)]
pub enum MeshApiError {
    /// The admin credentials in the state directory are unusable.
    #[error("cannot load the admin credentials in {dir}: {reason}; the state directory may be damaged (re-run enable after disable --force)")]
    Credentials {
        /// The admin directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// No endpoint answered.
    #[error("the mesh API of cluster {cluster} is not reachable at {endpoints} ({reason}); start its clustermesh-apiserver (or fix mesh_endpoints in cluster.yaml) and retry")]
    Unreachable {
        /// Cluster name.
        cluster: String,
        /// Endpoints tried.
        endpoints: String,
        /// The last error.
        reason: String,
    },
    /// The server answered as another cluster.
    #[error("the mesh API at {endpoint} reports cluster {got_name} (id {got_id}) but the state directory says {want_name} (id {want_id}); point mesh_endpoints at the right server")]
    WrongCluster {
        /// Endpoint that answered.
        endpoint: String,
        /// Reported name.
        got_name: String,
        /// Reported ID.
        got_id: u32,
        /// Expected name.
        want_name: String,
        /// Expected ID.
        want_id: u32,
    },
}

/// What a reachable mesh API server reported.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// The endpoint that answered.
    pub endpoint: String,
    /// Cluster name it reports.
    pub name: String,
    /// Cluster ID it reports.
    pub id: u32,
    /// Its store revision.
    pub revision: u64,
    /// `Status` (admin only), when the server answered it.
    pub status: Option<StatusResponse>,
}

fn credentials(
    dir: &StateDir,
    state: &ClusterState,
) -> Result<(Arc<dyn TlsSource>, TrustDomain), MeshApiError> {
    let err = |reason: String| MeshApiError::Credentials {
        dir: dir.admin_dir().display().to_string(),
        reason,
    };
    let td = TrustDomain::new(state.trust_domain.clone()).map_err(|e| err(e.to_string()))?;
    let tls = MeshTls::load(td.clone(), &TlsPaths::client(&dir.admin_dir()))
        .map_err(|e| err(e.to_string()))?;
    Ok((Arc::new(tls), td))
}

/// Asks the cluster's mesh API who it is (and its status), verifying the server
/// certificate carries the cluster's identity and the reported name and ID match.
pub async fn probe(
    dir: &StateDir,
    state: &ClusterState,
    timeout: Duration,
) -> Result<ServerInfo, MeshApiError> {
    let (tls, td) = credentials(dir, state)?;
    let expected =
        PeerIdentity::cluster(td, &state.name).map_err(|e| MeshApiError::Credentials {
            dir: dir.admin_dir().display().to_string(),
            reason: e.to_string(),
        })?;
    let mut last = "no mesh_endpoints configured".to_string();
    for endpoint in &state.mesh_endpoints {
        match probe_one(endpoint, tls.clone(), expected.clone(), timeout).await {
            Ok(info) => {
                if info.name != state.name || info.id != state.id {
                    return Err(MeshApiError::WrongCluster {
                        endpoint: endpoint.clone(),
                        got_name: info.name,
                        got_id: info.id,
                        want_name: state.name.clone(),
                        want_id: state.id,
                    });
                }
                return Ok(info);
            }
            Err(reason) => {
                tracing::debug!(%endpoint, %reason, "mesh API endpoint did not answer");
                last = reason;
            }
        }
    }
    Err(MeshApiError::Unreachable {
        cluster: state.name.clone(),
        endpoints: state.mesh_endpoints.join(", "),
        reason: last,
    })
}

async fn probe_one(
    endpoint: &str,
    tls: Arc<dyn TlsSource>,
    expected: PeerIdentity,
    timeout: Duration,
) -> Result<ServerInfo, String> {
    let channel = MeshEndpoint::new(endpoint, tls)
        .map_err(|e| e.to_string())?
        .expect_peer(expected)
        .connect_timeout(timeout)
        .connect_lazy()
        .map_err(|e| e.to_string())?;
    let mut client = MeshApiClient::new(channel);
    let info = tokio::time::timeout(timeout, client.get_cluster_info(GetClusterInfoRequest {}))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|s| describe_status(&s))?
        .into_inner();
    let config = info.config.unwrap_or_default();
    let status = match tokio::time::timeout(timeout, client.status(StatusRequest {})).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    };
    Ok(ServerInfo {
        endpoint: endpoint.to_string(),
        name: config.name,
        id: config.id,
        revision: info.revision,
        status,
    })
}

/// Turns a gRPC status into one readable phrase. tonic's Display and source chain repeat
/// the same cause several times; the status message already carries it.
fn describe_status(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    }
}
