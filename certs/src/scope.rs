//! Which identities each trusted CA may issue.
//!
//! A trust bundle holds our own CA and, after `connect`, every connected cluster's CA.
//! Trusting a peer's CA for *every* identity of the trust domain would let whoever holds
//! that CA key mint our admin or replica identities. So every CA is bound to what it may
//! issue (ARCHITECTURE.md, "Identity model"):
//!
//! | CA                                   | may issue |
//! |--------------------------------------|-----------|
//! | labelled with our own cluster `c`    | `cluster/c`, `cluster/c/agent`, `cluster/c/replica/<n>`, `admin/<any>` |
//! | labelled with a peer cluster `p`     | `cluster/p`, `cluster/p/agent` (read-only roles) |
//! | unlabelled, issued our own leaf      | as if labelled with our own cluster (bundles written before labels existed) |
//! | unlabelled, other                    | nothing (logged when the material is loaded) |
//!
//! The verifiers ([`crate::verify`]) validate the chain against each candidate CA alone
//! and accept the certificate only if a CA that validates it may issue its identity.

use std::collections::BTreeSet;
use std::fmt;

use rustls_pki_types::CertificateDer;

use crate::identity::{IdentityKind, PeerIdentity};
use crate::trust_bundle::TrustBundle;

/// What one trusted CA may issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaScope {
    /// The identities of `clusters` (mesh API server and agents); when `own` names our own
    /// cluster (one of `clusters`), also its replica identities and admin identities.
    Clusters {
        /// The clusters the CA is labelled with.
        clusters: BTreeSet<String>,
        /// Our own cluster, if the CA is labelled with it.
        own: Option<String>,
    },
    /// The unlabelled CA that issued our own *admin* certificate (the CLI): any cluster's
    /// mesh API server and agents and admins, never replicas.
    AdminHolder,
    /// An unlabelled CA that did not issue our certificate: trusted for nothing.
    Nothing,
}

impl CaScope {
    /// True if a CA with this scope may issue `identity`.
    pub fn allows(&self, identity: &PeerIdentity) -> bool {
        match self {
            Self::Clusters { clusters, own } => match identity.kind() {
                IdentityKind::Cluster | IdentityKind::Agent => clusters.contains(identity.name()),
                IdentityKind::Replica => own.as_deref() == Some(identity.name()),
                IdentityKind::Admin => own.is_some(),
            },
            Self::AdminHolder => identity.kind() != IdentityKind::Replica,
            Self::Nothing => false,
        }
    }
}

impl fmt::Display for CaScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Clusters { clusters, own } => {
                let names: Vec<&str> = clusters.iter().map(String::as_str).collect();
                write!(f, "the mesh API server and agent identities of cluster {}", names.join(", "))?;
                if let Some(own) = own {
                    write!(f, ", and replica and admin identities of our own cluster {own}")?;
                }
                Ok(())
            }
            Self::AdminHolder => f.write_str("cluster, agent and admin identities (the CA of our admin certificate)"),
            Self::Nothing => f.write_str(
                "nothing: it carries no `# clustermesh-ca: <cluster>` label; run `clustermesh connect` (or label it) to trust it for one cluster",
            ),
        }
    }
}

/// A trusted CA with its resolved scope and the names used to find and report it.
#[derive(Debug, Clone)]
pub(crate) struct ScopedCa {
    pub(crate) cert: CertificateDer<'static>,
    /// DER of the CA's subject, compared with a leaf's issuer to pick candidates.
    pub(crate) subject_der: Vec<u8>,
    /// The CA's subject in readable form, for messages.
    pub(crate) subject: String,
    pub(crate) scope: CaScope,
}

/// Resolves the scope of every CA of `bundle` for a holder whose own leaf is `own_leaf`
/// with identity `own`. `unlabelled_cluster` scopes unlabelled CAs to one cluster (an
/// agent's CA file for one remote cluster).
pub(crate) fn resolve(
    bundle: &TrustBundle,
    own: &PeerIdentity,
    own_leaf: &CertificateDer<'_>,
    unlabelled_cluster: Option<&str>,
) -> Vec<ScopedCa> {
    let own_issuer = x509_parser::parse_x509_certificate(own_leaf.as_ref())
        .map(|(_, c)| c.issuer().as_raw().to_vec())
        .ok();
    let own_cluster = own.cluster_name();
    bundle
        .cas()
        .iter()
        .map(|ca| {
            let (subject_der, subject) = match x509_parser::parse_x509_certificate(ca.cert.as_ref())
            {
                Ok((_, parsed)) => (
                    parsed.subject().as_raw().to_vec(),
                    parsed.subject().to_string(),
                ),
                Err(_) => (Vec::new(), "<unparsable CA>".to_owned()),
            };
            let mut clusters = ca.clusters.clone();
            if clusters.is_empty() {
                if let Some(cluster) = unlabelled_cluster {
                    clusters.insert(cluster.to_owned());
                }
            }
            let issued_ours = own_issuer.as_deref() == Some(subject_der.as_slice());
            let scope = if !clusters.is_empty() {
                CaScope::Clusters {
                    own: own_cluster
                        .filter(|c| clusters.contains(*c))
                        .map(str::to_owned),
                    clusters,
                }
            } else if issued_ours {
                match own_cluster {
                    Some(c) => CaScope::Clusters {
                        clusters: BTreeSet::from([c.to_owned()]),
                        own: Some(c.to_owned()),
                    },
                    None => CaScope::AdminHolder,
                }
            } else {
                CaScope::Nothing
            };
            ScopedCa {
                cert: ca.cert.clone(),
                subject_der,
                subject,
                scope,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use crate::issue::{MeshCa, ServerNames, Validity, DEFAULT_LEAF_VALIDITY};

    fn td() -> TrustDomain {
        TrustDomain::new("clustermesh.local").unwrap()
    }

    fn ids() -> Vec<PeerIdentity> {
        vec![
            PeerIdentity::cluster(td(), "east").unwrap(),
            PeerIdentity::agent(td(), "east").unwrap(),
            PeerIdentity::replica(td(), "east", 0).unwrap(),
            PeerIdentity::admin(td(), "ops").unwrap(),
            PeerIdentity::cluster(td(), "west").unwrap(),
            PeerIdentity::agent(td(), "west").unwrap(),
            PeerIdentity::replica(td(), "west", 0).unwrap(),
        ]
    }

    fn allowed(scope: &CaScope) -> Vec<String> {
        ids()
            .into_iter()
            .filter(|id| scope.allows(id))
            .map(|id| id.to_string().replace("spiffe://clustermesh.local/", ""))
            .collect()
    }

    #[test]
    fn each_ca_may_issue_only_its_clusters_roles() {
        let east = MeshCa::generate(td()).unwrap();
        let west = MeshCa::generate(td()).unwrap();
        let stray = MeshCa::generate(td()).unwrap();
        let mut bundle = TrustBundle::new();
        bundle.merge_as(
            &TrustBundle::from_pem(east.cert_pem().as_bytes()).unwrap(),
            "east",
        );
        bundle.merge_as(
            &TrustBundle::from_pem(west.cert_pem().as_bytes()).unwrap(),
            "west",
        );
        bundle.merge(&TrustBundle::from_pem(stray.cert_pem().as_bytes()).unwrap());
        let leaf = east
            .issue_server(
                "east",
                &ServerNames::default(),
                Validity::from_now(DEFAULT_LEAF_VALIDITY),
            )
            .unwrap();
        let der = crate::pem::parse_certs(leaf.cert_pem.as_bytes()).unwrap();
        let own = PeerIdentity::cluster(td(), "east").unwrap();
        let scopes = resolve(&bundle, &own, &der[0], None);
        assert_eq!(
            allowed(&scopes[0].scope),
            [
                "cluster/east",
                "cluster/east/agent",
                "cluster/east/replica/0",
                "admin/ops"
            ]
        );
        assert_eq!(
            allowed(&scopes[1].scope),
            ["cluster/west", "cluster/west/agent"]
        );
        assert_eq!(scopes[2].scope, CaScope::Nothing);
        assert!(allowed(&scopes[2].scope).is_empty());
        assert!(scopes[2].scope.to_string().contains("clustermesh-ca"));
    }

    #[test]
    fn unlabelled_own_ca_is_scoped_to_the_holders_cluster() {
        let east = MeshCa::generate(td()).unwrap();
        let bundle = TrustBundle::from_pem(east.cert_pem().as_bytes()).unwrap();
        let agent = east
            .issue_agent("east", Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        let der = crate::pem::parse_certs(agent.cert_pem.as_bytes()).unwrap();
        let own = PeerIdentity::agent(td(), "east").unwrap();
        let scopes = resolve(&bundle, &own, &der[0], None);
        assert_eq!(
            allowed(&scopes[0].scope),
            [
                "cluster/east",
                "cluster/east/agent",
                "cluster/east/replica/0",
                "admin/ops"
            ]
        );
        // The agent's CA file for remote cluster west: whatever it holds vouches for west.
        let scopes = resolve(&bundle, &own, &der[0], Some("west"));
        assert_eq!(
            allowed(&scopes[0].scope),
            ["cluster/west", "cluster/west/agent"]
        );
    }
}
