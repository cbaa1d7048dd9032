//! `enable`, `disable`, `connect` and `disconnect` on standalone state directories.
//!
//! Each operation validates everything first (names, IDs, trust, reachability), then
//! writes all files of both sides in one [`Txn`], so an error leaves both state
//! directories exactly as they were.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clustermesh_api::agent_config::{AgentConfig, ClusterClash, ClusterEntry};
use clustermesh_api::cluster::{validate_cluster_id, validate_cluster_name, ClusterIdMode};
use clustermesh_certs::files::{self, ClusterBundle};
use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::layout;
use clustermesh_certs::trust_bundle::BundleError;
use clustermesh_certs::{IssuedCert, MeshCa, ServerNames, TrustDomain, Validity};

use crate::meshapi::{self, MeshApiError};
use crate::state::{ClusterState, StateDir, StateError, STATE_VERSION};
use crate::trust::{bundle_with, bundle_without, certificate_blocks};
use crate::txn::{Txn, TxnError};

/// Identity name of the CLI's admin certificate.
pub const ADMIN_NAME: &str = "clustermesh-cli";

/// Errors of the standalone operations. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// Reading a state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Invalid `enable` arguments.
    #[error("{0}")]
    Invalid(String),
    /// `enable` on a directory that already holds a cluster.
    #[error("{dir} already holds cluster {name} (id {id}); run `clustermesh disable --state-dir {dir}` first to replace it")]
    AlreadyEnabled {
        /// The directory.
        dir: String,
        /// Cluster there.
        name: String,
        /// Its ID.
        id: u32,
    },
    /// Connecting a cluster to itself.
    #[error("cannot connect cluster {0} to itself; pass the other cluster's directory as --destination-state-dir")]
    SelfConnect(String),
    /// Name or ID already used in the mesh.
    #[error("{0}; every cluster in a mesh needs a unique name and ID (re-enable one of them with another --cluster-name/--cluster-id)")]
    Duplicate(String),
    /// The CAs don't fit together.
    #[error("CA mismatch: {0}")]
    CaMismatch(String),
    /// A mesh API server is down or wrong.
    #[error(transparent)]
    MeshApi(#[from] MeshApiError),
    /// The two clusters are not connected.
    #[error("clusters {0} and {1} are not connected; nothing to disconnect")]
    NotConnected(String, String),
    /// `disable` while still connected.
    #[error("cluster {name} is still connected to {peers}; run `clustermesh disconnect` for each first, or `disable --force`")]
    StillConnected {
        /// This cluster.
        name: String,
        /// Its peers.
        peers: String,
    },
    /// Certificate generation failed.
    #[error("cannot issue certificates: {0}")]
    Issue(String),
    /// A file of the state directory is unreadable or malformed.
    #[error("cannot read {path}: {reason}; the state directory may be damaged")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Writing failed (and was rolled back where possible).
    #[error(transparent)]
    Txn(#[from] TxnError),
}

type Result<T, E = StandaloneError> = std::result::Result<T, E>;

/// Arguments of `enable`.
#[derive(Debug, Clone)]
pub struct EnableOptions {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// Trust domain.
    pub trust_domain: String,
    /// `host:port` addresses other clusters dial.
    pub mesh_endpoints: Vec<String>,
    /// Agent admin sockets.
    pub agent_sockets: Vec<PathBuf>,
    /// Kubernetes namespace the certificates will be used in with the plain Helm chart:
    /// adds the in-cluster Service names agents dial and the single replica's peer name.
    pub kubernetes_namespace: Option<String>,
    /// How the cluster's agents reach the other clusters.
    pub agent_mode: clustermesh_api::agent_config::WatchMode,
}

/// Whether `ns` is a valid Kubernetes namespace name (an RFC 1123 label).
fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-')
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| StandaloneError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads `agent.yaml`.
pub fn load_agent_config(dir: &StateDir) -> Result<AgentConfig> {
    let path = dir.agent_config();
    clustermesh_api::yaml::from_str(&read_text(&path)?).map_err(|e| StandaloneError::File {
        path,
        reason: e.to_string(),
    })
}

fn yaml<T: serde::Serialize>(v: &T) -> Result<String> {
    clustermesh_api::yaml::to_string(v)
        .map_err(|e| StandaloneError::Invalid(format!("cannot encode YAML: {e}")))
}

/// Splits the host of a `host:port` endpoint.
fn endpoint_host(endpoint: &str) -> Result<String> {
    let bad = || {
        StandaloneError::Invalid(format!(
            "mesh endpoint {endpoint:?} is not host:port; pass e.g. --mesh-endpoint 10.0.0.1:2379"
        ))
    };
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host.to_string())
}

/// Creates the cluster's CA, certificates, agent config and `cluster.yaml`.
pub async fn enable(dir: &StateDir, opts: &EnableOptions) -> Result<ClusterState> {
    validate_cluster_name(&opts.name).map_err(|e| StandaloneError::Invalid(e.to_string()))?;
    let mode = ClusterIdMode::from_max_clusters(opts.max_connected_clusters).map_err(|e| {
        StandaloneError::Invalid(format!("{e}; use --max-connected-clusters 255 or 511"))
    })?;
    validate_cluster_id(opts.id, mode).map_err(|e| StandaloneError::Invalid(e.to_string()))?;
    let td = TrustDomain::new(opts.trust_domain.clone())
        .map_err(|e| StandaloneError::Invalid(format!("{e}; pass a valid --trust-domain")))?;
    if opts.mesh_endpoints.is_empty() {
        return Err(StandaloneError::Invalid(
            "at least one --mesh-endpoint host:port is needed (where other clusters reach this cluster's mesh API)".into(),
        ));
    }
    let mut dns = BTreeSet::from(["localhost".to_string()]);
    let mut ips = BTreeSet::from([IpAddr::from([127, 0, 0, 1])]);
    add_endpoint_names(&opts.mesh_endpoints, &mut dns, &mut ips)?;
    if let Some(ns) = &opts.kubernetes_namespace {
        if !valid_namespace(ns) {
            return Err(StandaloneError::Invalid(format!(
                "--kubernetes-namespace {ns:?} is not a Kubernetes namespace name (lowercase letters, digits and '-', at most 63)"
            )));
        }
        // What the chart's agents dial (`clustermesh-apiserver.<ns>.svc`), the same names
        // Kubernetes-mode `enable` issues, and the peer name of replica 1 (the chart's
        // single replica; the server certificate's names also go into the replica's).
        dns.extend(crate::k8s::enable::service_dns_names(ns));
        let peer = format!(
            "clustermesh-apiserver-{}.clustermesh-apiserver-peers.{ns}.svc",
            layout::BUNDLE_REPLICA_ID
        );
        dns.insert(format!("{peer}.cluster.local"));
        dns.insert(peer);
    }
    if dir.root().exists() && !dir.root().is_dir() {
        return Err(StandaloneError::Invalid(format!(
            "{} exists and is not a directory; pass a directory as --state-dir",
            dir.root().display()
        )));
    }
    if dir.is_enabled() {
        let existing = dir.load()?;
        if existing.name == opts.name
            && existing.id == opts.id
            && existing.trust_domain == opts.trust_domain
        {
            add_endpoint_names(&existing.mesh_endpoints, &mut dns, &mut ips)?;
            return upgrade(dir, existing, &td, &ServerNames::new(dns, ips)).await;
        }
        return Err(StandaloneError::AlreadyEnabled {
            dir: dir.root().display().to_string(),
            name: existing.name,
            id: existing.id,
        });
    }

    let issue = |e: clustermesh_certs::IssueError| StandaloneError::Issue(e.to_string());
    let ca = MeshCa::generate(td).map_err(issue)?;
    let validity = Validity::from_now(DEFAULT_LEAF_VALIDITY);
    let names = ServerNames::new(dns, ips);
    let bundle = ClusterBundle::issue(&ca, &opts.name, &names, validity).map_err(issue)?;
    let admin = ca.issue_admin(ADMIN_NAME, validity).map_err(issue)?;

    let state = ClusterState {
        version: STATE_VERSION,
        name: opts.name.clone(),
        id: opts.id,
        max_connected_clusters: opts.max_connected_clusters,
        trust_domain: opts.trust_domain.clone(),
        mesh_endpoints: opts.mesh_endpoints.clone(),
        agent_sockets: opts.agent_sockets.clone(),
    };
    let root = absolute(dir.root());
    let abs = StateDir::new(&root);
    let agent = AgentConfig {
        local_cluster: opts.name.clone(),
        mode: opts.agent_mode,
        trust_domain: opts.trust_domain.clone(),
        cert_file: abs.tls_dir().join(layout::CLIENT_CERT_FILE),
        key_file: abs.tls_dir().join(layout::CLIENT_KEY_FILE),
        clusters: vec![ClusterEntry {
            name: opts.name.clone(),
            id: opts.id,
            endpoints: opts.mesh_endpoints.clone(),
            ca_file: abs.ca_dir().join(layout::CA_CERT_FILE),
        }],
    };

    let mut t = Txn::new();
    t.write(dir.ca_dir().join(layout::CA_CERT_FILE), ca.cert_pem());
    t.write_secret(dir.ca_dir().join(layout::CA_KEY_FILE), ca.key_pem());
    let tls = dir.tls_dir();
    t.write(tls.join(layout::CA_CERT_FILE), bundle.ca_pem.clone());
    write_leaves(&mut t, dir, &bundle, &admin);
    t.write(dir.admin_dir().join(layout::CA_CERT_FILE), ca.cert_pem());
    t.write(dir.agent_config(), yaml(&agent)?);
    // cluster.yaml last: its presence means "enabled".
    t.write(dir.cluster_file(), yaml(&state)?);
    t.commit().await?;
    std::fs::create_dir_all(dir.manifests_dir()).map_err(|e| StandaloneError::File {
        path: dir.manifests_dir(),
        reason: e.to_string(),
    })?;
    tracing::info!(cluster = %state.name, id = state.id, dir = %dir.root().display(), "cluster enabled");
    Ok(state)
}

/// `enable` again on an enabled directory with the same name, ID and trust domain:
/// re-issues every leaf from the existing CA with the current identity model (server
/// `cluster/<c>`, agent `cluster/<c>/agent`, replica `cluster/<c>/replica/1`, admin) and
/// labels the trust bundle (own CA, and each connected peer's pinned CA with its name).
/// Connections and `cluster.yaml` are kept; running processes pick the files up by hot
/// reload.
async fn upgrade(
    dir: &StateDir,
    state: ClusterState,
    td: &TrustDomain,
    names: &ServerNames,
) -> Result<ClusterState> {
    let issue = |e: clustermesh_certs::IssueError| StandaloneError::Issue(e.to_string());
    let ca = files::load_ca(&dir.ca_dir(), td.clone()).map_err(|e| StandaloneError::File {
        path: dir.ca_dir(),
        reason: e.to_string(),
    })?;
    let validity = Validity::from_now(DEFAULT_LEAF_VALIDITY);
    let bundle = ClusterBundle::issue(&ca, &state.name, names, validity).map_err(issue)?;
    let admin = ca.issue_admin(ADMIN_NAME, validity).map_err(issue)?;
    let side = Side::load(dir)?;
    let mut trust =
        bundle_with(&side.bundle, ca.cert_pem(), &state.name).map_err(|e| side.bad_bundle(&e))?;
    for peer in side.agent.remotes() {
        let pinned = dir.remote_ca(&peer.name);
        if pinned.exists() {
            trust = bundle_with(&trust, &read_text(&pinned)?, &peer.name)
                .map_err(|e| side.bad_bundle(&e))?;
        }
    }
    let mut t = Txn::new();
    t.write(dir.tls_dir().join(layout::CA_CERT_FILE), trust);
    write_leaves(&mut t, dir, &bundle, &admin);
    t.commit().await?;
    tracing::info!(cluster = %state.name, dir = %dir.root().display(), "certificates re-issued and trust bundle labelled");
    Ok(state)
}

/// Adds the host of every `host:port` endpoint to the server certificate's DNS names or
/// IP addresses.
fn add_endpoint_names(
    endpoints: &[String],
    dns: &mut BTreeSet<String>,
    ips: &mut BTreeSet<IpAddr>,
) -> Result<()> {
    for e in endpoints {
        let host = endpoint_host(e)?;
        match host.parse::<IpAddr>() {
            Ok(ip) => ips.insert(ip),
            Err(_) => dns.insert(host),
        };
    }
    Ok(())
}

/// Writes the server, agent and replica leaves into `tls/` and the admin leaf into
/// `admin/` (keys mode 0600), as `enable` and its upgrade both do.
fn write_leaves(t: &mut Txn<'_>, dir: &StateDir, bundle: &ClusterBundle, admin: &IssuedCert) {
    let tls = dir.tls_dir();
    for (key, cert, leaf) in [
        (
            layout::SERVER_KEY_FILE,
            layout::SERVER_CERT_FILE,
            &bundle.server,
        ),
        (
            layout::CLIENT_KEY_FILE,
            layout::CLIENT_CERT_FILE,
            &bundle.client,
        ),
        (
            layout::REPLICA_KEY_FILE,
            layout::REPLICA_CERT_FILE,
            &bundle.replica,
        ),
    ] {
        t.write_secret(tls.join(key), leaf.key_pem.clone());
        t.write(tls.join(cert), leaf.cert_pem.clone());
    }
    let adm = dir.admin_dir();
    t.write_secret(adm.join(layout::CLIENT_KEY_FILE), admin.key_pem.clone());
    t.write(adm.join(layout::CLIENT_CERT_FILE), admin.cert_pem.clone());
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::env::current_dir().map(|d| d.join(p)))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// Removes the cluster's mesh state (keeps `manifests/`).
pub async fn disable(dir: &StateDir, force: bool) -> Result<String> {
    let state = dir.load()?;
    if !force {
        if let Ok(agent) = load_agent_config(dir) {
            let peers: Vec<String> = agent.remotes().map(|c| c.name.clone()).collect();
            if !peers.is_empty() {
                return Err(StandaloneError::StillConnected {
                    name: state.name,
                    peers: peers.join(", "),
                });
            }
        }
    }
    // cluster.yaml first: once it is gone the directory no longer counts as enabled.
    let mut t = Txn::new();
    t.remove(dir.cluster_file());
    t.remove(dir.agent_config());
    for d in [dir.tls_dir(), dir.admin_dir(), dir.ca_dir()] {
        for f in [
            layout::CA_CERT_FILE,
            layout::CA_KEY_FILE,
            layout::SERVER_CERT_FILE,
            layout::SERVER_KEY_FILE,
            layout::CLIENT_CERT_FILE,
            layout::CLIENT_KEY_FILE,
            layout::REPLICA_CERT_FILE,
            layout::REPLICA_KEY_FILE,
        ] {
            t.remove(d.join(f));
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir.remotes_dir()) {
        for e in entries.filter_map(|e| e.ok()) {
            t.remove(e.path());
        }
    }
    t.commit().await?;
    for d in [
        dir.tls_dir(),
        dir.admin_dir(),
        dir.ca_dir(),
        dir.remotes_dir(),
    ] {
        let _ = std::fs::remove_dir(d);
    }
    tracing::info!(cluster = %state.name, "cluster disabled");
    Ok(state.name)
}

/// One side of a connection, fully loaded.
struct Side {
    dir: StateDir,
    abs: StateDir,
    state: ClusterState,
    agent: AgentConfig,
    own_ca: String,
    bundle: String,
}

impl Side {
    fn load(dir: &StateDir) -> Result<Self> {
        let state = dir.load()?;
        let agent = load_agent_config(dir)?;
        let own_ca = read_text(&dir.ca_dir().join(layout::CA_CERT_FILE))?;
        let bundle = read_text(&dir.tls_dir().join(layout::CA_CERT_FILE))?;
        let own_blocks = certificate_blocks(&own_ca);
        if own_blocks.len() != 1 {
            return Err(StandaloneError::CaMismatch(format!(
                "{} holds {} certificates, expected exactly this cluster's CA",
                dir.ca_dir().join(layout::CA_CERT_FILE).display(),
                own_blocks.len()
            )));
        }
        if !certificate_blocks(&bundle).contains(&own_blocks[0]) {
            return Err(StandaloneError::CaMismatch(format!(
                "{}'s trust bundle {} does not contain its own CA {}; the directory was modified by hand — disable --force and enable again",
                state.name,
                dir.tls_dir().join(layout::CA_CERT_FILE).display(),
                dir.ca_dir().join(layout::CA_CERT_FILE).display()
            )));
        }
        Ok(Self {
            abs: StateDir::new(absolute(dir.root())),
            dir: dir.clone(),
            state,
            agent,
            own_ca: own_blocks[0].clone(),
            bundle,
        })
    }

    fn bad_bundle(&self, e: &BundleError) -> StandaloneError {
        StandaloneError::CaMismatch(format!(
            "{}'s trust bundle {} is unreadable: {e}; the directory was modified by hand — fix the file or disable --force and enable again",
            self.state.name,
            self.dir.tls_dir().join(layout::CA_CERT_FILE).display()
        ))
    }
}

fn check_pair(a: &Side, b: &Side) -> Result<()> {
    if a.abs.root() == b.abs.root() || (a.state.name == b.state.name && a.own_ca == b.own_ca) {
        return Err(StandaloneError::SelfConnect(a.state.name.clone()));
    }
    if a.state.name == b.state.name {
        return Err(StandaloneError::Duplicate(format!(
            "both clusters are named {}",
            a.state.name
        )));
    }
    if a.state.id == b.state.id {
        return Err(StandaloneError::Duplicate(format!(
            "clusters {} and {} both have ID {}",
            a.state.name, b.state.name, a.state.id
        )));
    }
    if a.state.trust_domain != b.state.trust_domain {
        return Err(StandaloneError::CaMismatch(format!(
            "cluster {} uses trust domain {} but {} uses {}; enable both with the same --trust-domain",
            a.state.name, a.state.trust_domain, b.state.name, b.state.trust_domain
        )));
    }
    if a.state.max_connected_clusters != b.state.max_connected_clusters {
        return Err(StandaloneError::Invalid(format!(
            "cluster {} is configured for {} clusters but {} for {}; enable both with the same --max-connected-clusters",
            a.state.name, a.state.max_connected_clusters, b.state.name, b.state.max_connected_clusters
        )));
    }
    // Every cluster either side already knows must stay unique across the joined mesh.
    for (x, y) in [(a, b), (b, a)] {
        match x.agent.clash_with(&y.agent) {
            Some(ClusterClash::NameWithTwoIds { name, id, other_id }) => {
                return Err(StandaloneError::Duplicate(format!(
                    "cluster name {name} is used with ID {id} by {}'s mesh and with ID {other_id} by {}'s mesh",
                    x.state.name, y.state.name
                )));
            }
            Some(ClusterClash::IdWithTwoNames {
                id,
                name,
                other_name,
            }) => {
                return Err(StandaloneError::Duplicate(format!(
                    "cluster ID {id} is used by {name} (known to {}) and by {other_name} (known to {})",
                    x.state.name, y.state.name
                )));
            }
            None => {}
        }
        // A peer pinned before must still have the same CA.
        let pinned = x.dir.remote_ca(&y.state.name);
        if pinned.exists() {
            let old = read_text(&pinned)?;
            if !certificate_blocks(&old).contains(&y.own_ca) {
                return Err(StandaloneError::CaMismatch(format!(
                    "{} pinned a different CA for {} ({}) than {} has now; it was re-enabled since — run `clustermesh disconnect` first, then connect again",
                    x.state.name,
                    y.state.name,
                    pinned.display(),
                    y.state.name
                )));
            }
        }
    }
    Ok(())
}

/// What `connect` did.
#[derive(Debug, Clone)]
pub struct ConnectReport {
    /// Source cluster.
    pub source: String,
    /// Destination cluster.
    pub destination: String,
    /// Whether they were already connected (files rewritten anyway).
    pub already_connected: bool,
}

/// Connects two clusters in both directions: each trusts the other's CA, pins it, and
/// lists the other in its agent configuration. Both mesh API servers must be up and be
/// who their state directories say.
pub async fn connect(src: &StateDir, dst: &StateDir, timeout: Duration) -> Result<ConnectReport> {
    let a = Side::load(src)?;
    let b = Side::load(dst)?;
    check_pair(&a, &b)?;
    for side in [&a, &b] {
        meshapi::probe(&side.dir, &side.state, timeout).await?;
    }
    let already =
        a.agent.cluster(&b.state.name).is_some() && b.agent.cluster(&a.state.name).is_some();
    let mut t = Txn::new();
    for (x, y) in [(&a, &b), (&b, &a)] {
        let mut agent = x.agent.clone();
        agent.upsert(ClusterEntry {
            name: y.state.name.clone(),
            id: y.state.id,
            endpoints: y.state.mesh_endpoints.clone(),
            ca_file: x.abs.remote_ca(&y.state.name),
        });
        t.write(x.dir.remote_ca(&y.state.name), y.own_ca.clone());
        t.write(
            x.dir.tls_dir().join(layout::CA_CERT_FILE),
            bundle_with(&x.bundle, &y.own_ca, &y.state.name).map_err(|e| x.bad_bundle(&e))?,
        );
        t.write(x.dir.agent_config(), yaml(&agent)?);
    }
    t.commit().await?;
    tracing::info!(source = %a.state.name, destination = %b.state.name, "clusters connected");
    Ok(ConnectReport {
        source: a.state.name,
        destination: b.state.name,
        already_connected: already,
    })
}

/// Undoes [`connect`] on both sides. The peer does not need to be up.
pub async fn disconnect(src: &StateDir, dst: &StateDir) -> Result<(String, String)> {
    let a = Side::load(src)?;
    let b = Side::load(dst)?;
    if a.abs.root() == b.abs.root() {
        return Err(StandaloneError::SelfConnect(a.state.name));
    }
    if a.agent.cluster(&b.state.name).is_none() && b.agent.cluster(&a.state.name).is_none() {
        return Err(StandaloneError::NotConnected(a.state.name, b.state.name));
    }
    let mut t = Txn::new();
    for (x, y) in [(&a, &b), (&b, &a)] {
        let mut agent = x.agent.clone();
        agent.remove(&y.state.name);
        t.remove(x.dir.remote_ca(&y.state.name));
        let pem = bundle_without(&x.bundle, &y.own_ca)
            .and_then(|pem| bundle_with(&pem, &x.own_ca, &x.state.name))
            .map_err(|e| x.bad_bundle(&e))?;
        t.write(x.dir.tls_dir().join(layout::CA_CERT_FILE), pem);
        t.write(x.dir.agent_config(), yaml(&agent)?);
    }
    t.commit().await?;
    tracing::info!(source = %a.state.name, destination = %b.state.name, "clusters disconnected");
    Ok((a.state.name, b.state.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_hosts_are_parsed_or_refused() {
        assert_eq!(endpoint_host("10.0.0.1:2379").unwrap(), "10.0.0.1");
        assert_eq!(endpoint_host("[::1]:2379").unwrap(), "::1");
        assert_eq!(endpoint_host("mesh.example:443").unwrap(), "mesh.example");
        assert!(endpoint_host("nohost").is_err());
        assert!(endpoint_host(":2379").is_err());
        assert!(endpoint_host("h:99999").is_err());
    }
}
