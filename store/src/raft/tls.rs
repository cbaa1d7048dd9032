//! mTLS for replica traffic, on the `certs` crate's tonic transport.
//!
//! Every replica of one store belongs to one mesh cluster and presents a *replica*
//! certificate of that cluster (`spiffe://<trust-domain>/cluster/<name>/replica/<n>`,
//! valid for server and client auth). The TLS handshake already rejects other trust
//! domains and CAs, and CAs that may not issue replica identities of our cluster (a
//! connected peer's CA: see `clustermesh_certs::scope`); on top of that a replica accepts
//! RPCs only from, and dials only, **replicas of its own cluster**. The cluster's mesh API
//! server certificate, its agents' certificate, an admin certificate or a replica of
//! another cluster are all refused: raft RPCs write the store, and only replicas may.

use std::sync::Arc;

use clustermesh_certs::issue::DEFAULT_LEAF_VALIDITY;
use clustermesh_certs::transport::MeshEndpoint;
use clustermesh_certs::{
    IdentityKind, MeshCa, MeshTls, PeerIdentity, ServerNames, TlsSource, TrustDomain, Validity,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::StoreError;

/// The mTLS identity and trust of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaTls {
    source: Arc<dyn TlsSource>,
    cluster: String,
}

impl ReplicaTls {
    /// Replica TLS from a certificate source (fixed or hot-reloading) whose certificates
    /// carry the identity of mesh cluster `cluster`.
    pub fn new(source: Arc<dyn TlsSource>, cluster: impl Into<String>) -> Self {
        ReplicaTls {
            source,
            cluster: cluster.into(),
        }
    }

    /// A throwaway PKI for replicas on 127.0.0.1 (tests, benchmarks, the demo): a fresh
    /// CA for `trust_domain` and one replica leaf (replica 1, shared by every replica) for
    /// cluster `cluster` with `localhost` and `127.0.0.1` SANs. Returns the CA too, so callers can mint other identities.
    pub fn ephemeral_loopback(
        trust_domain: &str,
        cluster: &str,
    ) -> Result<(ReplicaTls, MeshCa), StoreError> {
        let tls_err = |e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("cannot create loopback replica certificates: {e}"))
        };
        let td = TrustDomain::new(trust_domain).map_err(|e| tls_err(&e))?;
        let ca = MeshCa::generate(td.clone()).map_err(|e| tls_err(&e))?;
        let names = ServerNames::new(
            ["localhost".to_owned()],
            [std::net::IpAddr::from([127, 0, 0, 1])],
        );
        let leaf = ca
            .issue_replica(
                cluster,
                1,
                &names,
                Validity::from_now(DEFAULT_LEAF_VALIDITY),
            )
            .map_err(|e| tls_err(&e))?;
        let tls = MeshTls::from_pem(
            td,
            ca.cert_pem().as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .map_err(|e| tls_err(&e))?;
        Ok((ReplicaTls::new(Arc::new(tls), cluster), ca))
    }

    /// The certificate source.
    #[must_use]
    pub fn source(&self) -> &Arc<dyn TlsSource> {
        &self.source
    }

    /// The mesh cluster the replicas belong to.
    #[must_use]
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// A lazily connecting channel to the replica at `addr`, which must present a replica
    /// identity of our cluster.
    pub(crate) fn channel(&self, addr: &str, endpoint: Endpoint) -> Result<Channel, String> {
        let cluster = PeerIdentity::cluster(self.source.trust_domain(), &self.cluster)
            .map_err(|e| format!("invalid replica cluster: {e}"))?;
        let mesh = MeshEndpoint::new(addr, self.source.clone())
            .map_err(|e| format!("invalid replica address {addr:?}: {e}"))?
            .expect_replica_of(cluster);
        Ok(mesh.connect_lazy_with(endpoint))
    }

    /// Accepts a request only from a replica of our own cluster.
    pub(crate) fn authorize(&self, peer: Option<&PeerIdentity>) -> Result<(), Status> {
        let Some(peer) = peer else {
            return Err(Status::unauthenticated(
                "raft RPC without a verified mesh identity; replicas must connect over mTLS",
            ));
        };
        if peer.kind() != IdentityKind::Replica || peer.cluster_name() != Some(&self.cluster) {
            tracing::warn!(%peer, cluster = %self.cluster, role = %peer.kind(), "refused raft RPC: only replicas of this cluster may call the raft port");
            return Err(Status::permission_denied(format!(
                "{peer} is not a replica of cluster {}; the raft port accepts only replica certificates (spiffe://<trust-domain>/cluster/{}/replica/<n>)",
                self.cluster, self.cluster
            )));
        }
        Ok(())
    }
}
