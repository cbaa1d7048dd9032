//! Mesh peer identities carried in certificates as SPIFFE URIs.
//!
//! Every clustermesh certificate names exactly one peer, in one role, in a URI subject
//! alternative name: `spiffe://<td>/cluster/<cluster>` for a cluster's mesh API server,
//! `spiffe://<td>/cluster/<cluster>/agent` for its agents,
//! `spiffe://<td>/cluster/<cluster>/replica/<n>` for its store replicas and
//! `spiffe://<td>/admin/<name>` for operators using the CLI. This module holds the typed form of those URIs, their
//! validation, and the extraction of the identity from a DER certificate, so that the
//! TLS verifiers and the gRPC services share one definition of "who is this peer".
//!
//! Syntax follows the SPIFFE ID specification
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>, §2): the trust
//! domain is lowercase letters, digits, `.`, `-` and `_`; path segments are non-empty and
//! are never `.` or `..`. Cluster names follow Cilium's rule (`ValidateClusterName` in
//! `pkg/clustermesh/types/option.go`): at most 32 characters, lowercase alphanumerics and
//! `-`, starting and ending with an alphanumeric.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;

/// Longest cluster name accepted (Cilium's `clusterNameMaxLength`).
pub const MAX_CLUSTER_NAME_LEN: usize = 32;
/// Longest admin name accepted.
pub const MAX_ADMIN_NAME_LEN: usize = 63;
/// Longest trust domain accepted (a DNS name's length limit, as SPIFFE recommends).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Errors from parsing or validating identities and trust domains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The trust domain violates the SPIFFE syntax.
    #[error("invalid trust domain {domain:?}: {reason}; use lowercase letters, digits, '.', '-' and '_' (e.g. \"clustermesh.local\")")]
    InvalidTrustDomain {
        /// The rejected value.
        domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The cluster name violates Cilium's cluster-name rule.
    #[error("invalid cluster name {name:?}: {reason}; cluster names are 1-32 lowercase alphanumerics or '-', starting and ending with an alphanumeric")]
    InvalidClusterName {
        /// The rejected value.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The admin name violates the admin-name rule.
    #[error("invalid admin name {name:?}: {reason}; admin names are 1-63 lowercase alphanumerics, '-', '.' or '_', starting and ending with an alphanumeric")]
    InvalidAdminName {
        /// The rejected value.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The URI is not a clustermesh SPIFFE identity.
    #[error("invalid mesh identity URI {uri:?}: {reason}; expected spiffe://<trust-domain>/cluster/<name>[/agent|/replica/<n>] or spiffe://<trust-domain>/admin/<name>")]
    InvalidUri {
        /// The rejected URI.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The certificate could not be parsed as X.509.
    #[error("peer certificate is not valid X.509 DER: {0}")]
    BadCertificate(String),
    /// The certificate carries no `spiffe://` URI SAN.
    #[error("peer certificate carries no spiffe:// URI SAN; issue it with `clustermesh` tooling so it names a cluster or admin identity")]
    NoIdentity,
    /// The certificate carries more than one `spiffe://` URI SAN.
    #[error("peer certificate carries {count} spiffe:// URI SANs; a mesh certificate must name exactly one identity")]
    MultipleIdentities {
        /// How many SPIFFE URIs were found.
        count: usize,
    },
    /// The identity belongs to another trust domain.
    #[error("peer identity {identity} is in trust domain {got:?}, this mesh is {expected:?}; issue the certificate from a CA of this trust domain")]
    ForeignTrustDomain {
        /// The identity found.
        identity: Box<PeerIdentity>,
        /// Its trust domain.
        got: String,
        /// The trust domain we accept.
        expected: String,
    },
    /// The CA that issued the certificate may not issue this identity.
    #[error(
        "peer identity {identity} was issued by CA \"{ca}\", which is trusted only for {scope}"
    )]
    OutOfScope {
        /// The identity found.
        identity: Box<PeerIdentity>,
        /// The issuing CA's subject.
        ca: String,
        /// What the CA may issue, in words.
        scope: String,
    },
    /// No certificate was presented at all.
    #[error("peer presented no certificate")]
    NoCertificate,
}

/// A validated SPIFFE trust domain, e.g. `clustermesh.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates `domain` and wraps it.
    pub fn new(domain: impl Into<String>) -> Result<Self, IdentityError> {
        let domain = domain.into();
        let reason = if domain.is_empty() {
            Some("it is empty")
        } else if domain.len() > MAX_TRUST_DOMAIN_LEN {
            Some("it is longer than 255 characters")
        } else if !domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            Some("it contains a character outside [a-z0-9._-]")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(IdentityError::InvalidTrustDomain { domain, reason }),
            None => Ok(Self(domain)),
        }
    }

    /// The trust domain as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The role an identity names. Every port checks the role, not just the trust domain
/// (see ARCHITECTURE.md, "Identity model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKind {
    /// A cluster's mesh API server: `spiffe://<td>/cluster/<name>`. Other clusters see it as
    /// a (read-only) peer.
    Cluster,
    /// The agents on the nodes of a cluster: `spiffe://<td>/cluster/<name>/agent`. Read-only
    /// access to the cluster's own mesh API (and, in direct mode, to connected peers').
    Agent,
    /// A store replica of a cluster: `spiffe://<td>/cluster/<name>/replica/<n>`. The only
    /// identity the raft port accepts.
    Replica,
    /// An operator or tool (the CLI): `spiffe://<td>/admin/<name>`.
    Admin,
}

impl IdentityKind {
    /// A short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "cluster",
            Self::Agent => "agent",
            Self::Replica => "replica",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified or to-be-issued mesh identity (see [`IdentityKind`] for the URI forms).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIdentity {
    trust_domain: TrustDomain,
    kind: IdentityKind,
    name: String,
    /// The replica number of a [`IdentityKind::Replica`] identity.
    replica: Option<u64>,
}

impl PeerIdentity {
    /// The identity of cluster `name`'s mesh API server in `trust_domain`.
    pub fn cluster(trust_domain: TrustDomain, name: &str) -> Result<Self, IdentityError> {
        validate_cluster_name(name)?;
        Ok(Self {
            trust_domain,
            kind: IdentityKind::Cluster,
            name: name.to_owned(),
            replica: None,
        })
    }

    /// The identity of the agents of cluster `cluster`.
    pub fn agent(trust_domain: TrustDomain, cluster: &str) -> Result<Self, IdentityError> {
        validate_cluster_name(cluster)?;
        Ok(Self {
            trust_domain,
            kind: IdentityKind::Agent,
            name: cluster.to_owned(),
            replica: None,
        })
    }

    /// The identity of store replica `replica` of cluster `cluster`.
    pub fn replica(
        trust_domain: TrustDomain,
        cluster: &str,
        replica: u64,
    ) -> Result<Self, IdentityError> {
        validate_cluster_name(cluster)?;
        Ok(Self {
            trust_domain,
            kind: IdentityKind::Replica,
            name: cluster.to_owned(),
            replica: Some(replica),
        })
    }

    /// The identity of administrator `name` in `trust_domain`.
    pub fn admin(trust_domain: TrustDomain, name: &str) -> Result<Self, IdentityError> {
        validate_admin_name(name)?;
        Ok(Self {
            trust_domain,
            kind: IdentityKind::Admin,
            name: name.to_owned(),
            replica: None,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The role.
    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    /// The cluster name (cluster, agent and replica identities) or the admin name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster this identity belongs to: `Some` for cluster, agent and replica
    /// identities, `None` for admins.
    pub fn cluster_name(&self) -> Option<&str> {
        (self.kind != IdentityKind::Admin).then_some(self.name.as_str())
    }

    /// The replica number of a replica identity.
    pub fn replica_number(&self) -> Option<u64> {
        self.replica
    }

    /// True for admin identities.
    pub fn is_admin(&self) -> bool {
        self.kind == IdentityKind::Admin
    }

    /// True if this is the mesh API server identity of cluster `cluster`.
    pub fn is_cluster(&self, cluster: &str) -> bool {
        self.kind == IdentityKind::Cluster && self.name == cluster
    }

    /// The SPIFFE URI, e.g. `spiffe://clustermesh.local/cluster/east`.
    pub fn to_uri(&self) -> String {
        self.to_string()
    }

    /// Parses a SPIFFE URI of one of the forms of [`IdentityKind`].
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let invalid = |reason| IdentityError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("it does not start with spiffe://"))?;
        if rest.contains(['?', '#']) {
            return Err(invalid("it has a query or fragment"));
        }
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("it has no path"))?;
        if domain.contains([':', '@']) {
            return Err(invalid("the trust domain has a port or user info"));
        }
        let trust_domain = TrustDomain::new(domain)?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["admin", name] => Self::admin(trust_domain, name),
            ["cluster", name] => Self::cluster(trust_domain, name),
            ["cluster", name, "agent"] => Self::agent(trust_domain, name),
            ["cluster", name, "replica", n] => {
                // Canonical decimal only, so one replica has exactly one URI.
                let canonical = !n.is_empty()
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && (*n == "0" || !n.starts_with('0'));
                let number = n
                    .parse::<u64>()
                    .ok()
                    .filter(|_| canonical)
                    .ok_or_else(|| invalid("the replica number must be a decimal integer without leading zeros"))?;
                Self::replica(trust_domain, name, number)
            }
            ["admin" | "cluster", ..] => Err(invalid(
                "the path must be admin/<name>, cluster/<name>, cluster/<name>/agent or cluster/<name>/replica/<n>",
            )),
            _ => Err(invalid(
                "the first path segment must be 'cluster' or 'admin'",
            )),
        }
    }

    /// Checks that this identity belongs to `expected`.
    pub fn ensure_trust_domain(&self, expected: &TrustDomain) -> Result<(), IdentityError> {
        if &self.trust_domain == expected {
            Ok(())
        } else {
            Err(IdentityError::ForeignTrustDomain {
                identity: Box::new(self.clone()),
                got: self.trust_domain.0.clone(),
                expected: expected.0.clone(),
            })
        }
    }

    /// Extracts the single mesh identity from a DER certificate and checks that it
    /// belongs to `trust_domain`.
    ///
    /// Only URI SANs with the `spiffe` scheme are considered; other URIs are ignored.
    /// Exactly one must be present and it must be a valid mesh identity.
    pub fn from_certificate(der: &[u8], trust_domain: &TrustDomain) -> Result<Self, IdentityError> {
        let identity = Self::from_certificate_any_domain(der)?;
        identity.ensure_trust_domain(trust_domain)?;
        Ok(identity)
    }

    /// Extracts the single mesh identity from a DER certificate without checking its
    /// trust domain (used to inspect certificates, e.g. for `status` output).
    pub fn from_certificate_any_domain(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        let uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .filter(|uri| {
                uri.get(..SCHEME.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
            })
            .collect();
        match uris.as_slice() {
            [] => Err(IdentityError::NoIdentity),
            [uri] => Self::parse(uri),
            many => Err(IdentityError::MultipleIdentities { count: many.len() }),
        }
    }

    /// Extracts the identity from a peer's certificate chain (end entity first), as
    /// returned by rustls' `peer_certificates()`.
    pub fn from_chain(
        chain: Option<&[rustls_pki_types::CertificateDer<'_>]>,
        trust_domain: &TrustDomain,
    ) -> Result<Self, IdentityError> {
        let end_entity = chain
            .and_then(|c| c.first())
            .ok_or(IdentityError::NoCertificate)?;
        Self::from_certificate(end_entity.as_ref(), trust_domain)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.replica) {
            (IdentityKind::Admin, _) => {
                write!(f, "{SCHEME}{}/admin/{}", self.trust_domain, self.name)
            }
            (IdentityKind::Cluster, _) => {
                write!(f, "{SCHEME}{}/cluster/{}", self.trust_domain, self.name)
            }
            (IdentityKind::Agent, _) => {
                write!(
                    f,
                    "{SCHEME}{}/cluster/{}/agent",
                    self.trust_domain, self.name
                )
            }
            (IdentityKind::Replica, n) => write!(
                f,
                "{SCHEME}{}/cluster/{}/replica/{}",
                self.trust_domain,
                self.name,
                n.unwrap_or_default()
            ),
        }
    }
}

impl FromStr for PeerIdentity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Validates a cluster name with Cilium's rule: 1..=32 characters of `[a-z0-9-]`,
/// starting and ending with an alphanumeric.
pub fn validate_cluster_name(name: &str) -> Result<(), IdentityError> {
    name_rule(name, MAX_CLUSTER_NAME_LEN, b"-").map_err(|reason| {
        IdentityError::InvalidClusterName {
            name: name.to_owned(),
            reason,
        }
    })
}

/// Validates an admin name: 1..=63 characters of `[a-z0-9._-]`, starting and ending with
/// an alphanumeric.
pub fn validate_admin_name(name: &str) -> Result<(), IdentityError> {
    name_rule(name, MAX_ADMIN_NAME_LEN, b"-._").map_err(|reason| IdentityError::InvalidAdminName {
        name: name.to_owned(),
        reason,
    })
}

fn name_rule(name: &str, max: usize, inner: &[u8]) -> Result<(), &'static str> {
    let bytes = name.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => Err("it is empty"),
        _ if bytes.len() > max => Err("it is too long"),
        (Some(first), Some(last)) if !alnum(first) || !alnum(last) => {
            Err("it must start and end with a lowercase letter or digit")
        }
        _ if !bytes.iter().all(|b| alnum(b) || inner.contains(b)) => {
            Err("it contains a character that is not allowed")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn td() -> TrustDomain {
        TrustDomain::new("clustermesh.local").unwrap()
    }

    #[test]
    fn cluster_identity_round_trips_through_uri() {
        let id = PeerIdentity::cluster(td(), "east-1").unwrap();
        assert_eq!(id.to_string(), "spiffe://clustermesh.local/cluster/east-1");
        assert_eq!(PeerIdentity::parse(&id.to_uri()).unwrap(), id);
        assert_eq!(id.cluster_name(), Some("east-1"));
        assert!(!id.is_admin());
    }

    #[test]
    fn agent_and_replica_identities_round_trip_through_uri() {
        let agent = PeerIdentity::agent(td(), "east").unwrap();
        assert_eq!(
            agent.to_string(),
            "spiffe://clustermesh.local/cluster/east/agent"
        );
        assert_eq!(PeerIdentity::parse(&agent.to_uri()).unwrap(), agent);
        assert_eq!(agent.cluster_name(), Some("east"));
        assert!(!agent.is_cluster("east"));
        let replica = PeerIdentity::replica(td(), "east", 3).unwrap();
        assert_eq!(
            replica.to_string(),
            "spiffe://clustermesh.local/cluster/east/replica/3"
        );
        assert_eq!(PeerIdentity::parse(&replica.to_uri()).unwrap(), replica);
        assert_eq!(replica.replica_number(), Some(3));
        assert_eq!(replica.kind(), IdentityKind::Replica);
        for bad in [
            "spiffe://clustermesh.local/cluster/east/replica/",
            "spiffe://clustermesh.local/cluster/east/replica/01",
            "spiffe://clustermesh.local/cluster/east/replica/-1",
            "spiffe://clustermesh.local/cluster/east/replica/1/x",
            "spiffe://clustermesh.local/cluster/east/agent/x",
            "spiffe://clustermesh.local/cluster/east/admin",
            "spiffe://clustermesh.local/admin/ops/agent",
        ] {
            assert!(PeerIdentity::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn admin_identity_round_trips_through_uri() {
        let id: PeerIdentity = "spiffe://mesh.example/admin/ops.alice".parse().unwrap();
        assert_eq!(id.kind(), IdentityKind::Admin);
        assert_eq!(id.name(), "ops.alice");
        assert_eq!(id.trust_domain().as_str(), "mesh.example");
        assert_eq!(id.cluster_name(), None);
    }

    #[test]
    fn cluster_names_follow_cilium_rule() {
        for ok in ["a", "default", "c1", "east-west", &"a".repeat(32)] {
            validate_cluster_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "-a", "a-", "East", "a_b", "a.b", &"a".repeat(33), "ä"] {
            assert!(validate_cluster_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn malformed_uris_are_rejected() {
        for bad in [
            "http://clustermesh.local/cluster/a",
            "spiffe://clustermesh.local",
            "spiffe://clustermesh.local/",
            "spiffe://clustermesh.local/cluster",
            "spiffe://clustermesh.local/cluster/",
            "spiffe://clustermesh.local/cluster/a/b",
            "spiffe://clustermesh.local/node/a",
            "spiffe://clustermesh.local/cluster/A",
            "spiffe://Clustermesh.local/cluster/a",
            "spiffe://clustermesh.local:443/cluster/a",
            "spiffe://user@clustermesh.local/cluster/a",
            "spiffe://clustermesh.local/cluster/a?x=1",
            "spiffe:///cluster/a",
        ] {
            assert!(PeerIdentity::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn foreign_trust_domain_is_named_in_error() {
        let other = TrustDomain::new("other.mesh").unwrap();
        let id = PeerIdentity::cluster(other, "a").unwrap();
        let err = id.ensure_trust_domain(&td()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("other.mesh") && msg.contains("clustermesh.local"),
            "{msg}"
        );
    }

    proptest! {
        #[test]
        fn valid_cluster_names_round_trip(name in "[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?") {
            let id = PeerIdentity::cluster(td(), &name).unwrap();
            prop_assert_eq!(PeerIdentity::parse(&id.to_string()).unwrap(), id);
        }

        #[test]
        fn parse_never_panics_and_accepts_only_what_it_prints(s in "\\PC{0,80}") {
            if let Ok(id) = PeerIdentity::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn spiffe_shaped_strings_parse_iff_parts_are_valid(
            domain in "[a-zA-Z0-9._:-]{0,12}",
            kind in "(cluster|admin|node)",
            name in "[a-zA-Z0-9._-]{0,40}",
        ) {
            let uri = format!("spiffe://{domain}/{kind}/{name}");
            let expected_ok = TrustDomain::new(domain.as_str()).is_ok()
                && match kind.as_str() {
                    "cluster" => validate_cluster_name(&name).is_ok(),
                    "admin" => validate_admin_name(&name).is_ok(),
                    _ => false,
                };
            prop_assert_eq!(PeerIdentity::parse(&uri).is_ok(), expected_ok);
        }
    }
}
