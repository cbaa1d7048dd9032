//! Certificate issuance: the mesh CA and the leaf certificates it signs.
//!
//! One self-signed CA per cluster signs its leaves: the mesh API server's, the agents',
//! each store replica's and the admins'. Each leaf names exactly one [`PeerIdentity`] (one
//! role) in a `spiffe://` URI SAN; server and replica leaves also carry the DNS names and
//! IP addresses peers dial. Keys are ECDSA P-256
//! (rcgen's default), which every rustls provider verifies and which keeps handshakes
//! cheap.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::OffsetDateTime;

use crate::identity::{IdentityError, PeerIdentity, TrustDomain};

/// Default lifetime of a CA certificate: ten years.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a leaf certificate: one year.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating applied to `not_before` so peers with slightly slow clocks accept new
/// certificates.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Errors from creating or loading a CA or issuing leaves.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// rcgen refused to generate a key or certificate.
    #[error("failed to {step}: {source}")]
    Rcgen {
        /// What was being done.
        step: &'static str,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A name given for the certificate is invalid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A DNS name given for a server SAN is invalid.
    #[error("invalid DNS name {name:?} for a server certificate SAN: {reason}")]
    InvalidDnsName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The validity window is empty or not representable.
    #[error("invalid validity window: {0}; not_after must be later than not_before")]
    InvalidValidity(String),
    /// The CA certificate given to [`MeshCa::from_pem`] is not usable.
    #[error("the CA certificate is unusable: {0}; pass the PEM of a CA certificate created by `clustermesh` (ca.crt) and its key (ca.key)")]
    BadCa(String),
}

fn rcgen_err(step: &'static str) -> impl FnOnce(rcgen::Error) -> IssueError {
    move |source| IssueError::Rcgen { step, source }
}

/// A certificate validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: SystemTime,
    /// Last instant the certificate is valid.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from [`CLOCK_SKEW_ALLOWANCE`] ago for `lifetime` from now.
    pub fn from_now(lifetime: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now.checked_sub(CLOCK_SKEW_ALLOWANCE).unwrap_or(now),
            not_after: now + lifetime,
        }
    }

    /// An explicit window (tests use it to mint expired or not-yet-valid certificates).
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Self {
        Self {
            not_before,
            not_after,
        }
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), IssueError> {
        if self.not_after <= self.not_before {
            return Err(IssueError::InvalidValidity(
                "not_after is not after not_before".into(),
            ));
        }
        params.not_before = to_offset(self.not_before)?;
        params.not_after = to_offset(self.not_after)?;
        Ok(())
    }
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, IssueError> {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs()).ok().map(|s| -s),
    };
    secs.and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| IssueError::InvalidValidity(format!("{t:?} is out of range")))
}

/// A PEM certificate and its PEM private key, as issued.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM (`-----BEGIN PRIVATE KEY-----`). Secret.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What a server leaf is valid for besides its identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames {
    /// DNS SANs (e.g. `clustermesh-apiserver.kube-system.svc`).
    pub dns: Vec<String>,
    /// IP SANs (e.g. the LoadBalancer address).
    pub ips: Vec<IpAddr>,
}

impl ServerNames {
    /// Names from DNS names and IPs.
    pub fn new(
        dns: impl IntoIterator<Item = String>,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        Self {
            dns: dns.into_iter().collect(),
            ips: ips.into_iter().collect(),
        }
    }
}

/// The mesh certificate authority: a self-signed CA certificate and its key.
pub struct MeshCa {
    trust_domain: TrustDomain,
    cert_pem: String,
    key: KeyPair,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// Generates a new CA for `trust_domain`, valid for [`DEFAULT_CA_VALIDITY`].
    pub fn generate(trust_domain: TrustDomain) -> Result<Self, IssueError> {
        Self::generate_with(
            trust_domain,
            "clustermesh CA",
            Validity::from_now(DEFAULT_CA_VALIDITY),
        )
    }

    /// Generates a new CA with an explicit common name (a key-derived suffix is appended
    /// so CAs never share a subject) and validity.
    pub fn generate_with(
        trust_domain: TrustDomain,
        common_name: &str,
        validity: Validity,
    ) -> Result<Self, IssueError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        validity.apply(&mut params)?;
        // Every CA gets a distinct subject (name plus a key-derived suffix): after
        // `connect` a trust bundle holds several clusters' CAs, and identical subjects
        // would make path building try the wrong CA first.
        let key_id: String = params
            .key_identifier(&key)
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "clustermesh");
        dn.push(DnType::OrganizationalUnitName, trust_domain.as_str());
        dn.push(DnType::CommonName, format!("{common_name} {key_id}"));
        params.distinguished_name = dn;
        // Path length 0: the CA signs leaves only, never intermediates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign the CA certificate"))?;
        let issuer_key = clone_key(&key)?;
        Ok(Self {
            trust_domain,
            cert_pem: cert.pem(),
            key,
            issuer: Issuer::new(params, issuer_key),
        })
    }

    /// Loads an existing CA from its certificate and private key PEM.
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, IssueError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| IssueError::BadCa(format!("key: {e}")))?;
        let issuer_key = clone_key(&key)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, issuer_key)
            .map_err(|e| IssueError::BadCa(format!("certificate: {e}")))?;
        let der = crate::pem::parse_certs(cert_pem.as_bytes())
            .map_err(|e| IssueError::BadCa(e.to_string()))?;
        let first = der
            .first()
            .ok_or_else(|| IssueError::BadCa("no certificate in PEM".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(first.as_ref())
            .map_err(|e| IssueError::BadCa(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(IssueError::BadCa(
                "basicConstraints CA flag is not set".into(),
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(IssueError::BadCa(
                "the private key does not belong to the certificate".into(),
            ));
        }
        Ok(Self {
            trust_domain,
            cert_pem: cert_pem.to_owned(),
            key,
            issuer,
        })
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Secret: write it with [`crate::files::write_private_key`].
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues the mesh API server leaf of cluster `cluster` (`spiffe://<td>/cluster/<c>`),
    /// valid for server auth and for client auth (a cluster's server is the client when it
    /// reads a connected peer).
    pub fn issue_server(
        &self,
        cluster: &str,
        names: &ServerNames,
        validity: Validity,
    ) -> Result<IssuedCert, IssueError> {
        let identity = PeerIdentity::cluster(self.trust_domain.clone(), cluster)?;
        self.issue(
            &identity,
            names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    /// Issues the agents' client leaf of cluster `cluster`
    /// (`spiffe://<td>/cluster/<c>/agent`, client auth only): read-only mesh API access.
    pub fn issue_agent(&self, cluster: &str, validity: Validity) -> Result<IssuedCert, IssueError> {
        let identity = PeerIdentity::agent(self.trust_domain.clone(), cluster)?;
        self.issue(
            &identity,
            &ServerNames::default(),
            &[ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }

    /// Issues the leaf of store replica `replica` of cluster `cluster`
    /// (`spiffe://<td>/cluster/<c>/replica/<n>`), valid both ways: replicas dial each other.
    pub fn issue_replica(
        &self,
        cluster: &str,
        replica: u64,
        names: &ServerNames,
        validity: Validity,
    ) -> Result<IssuedCert, IssueError> {
        let identity = PeerIdentity::replica(self.trust_domain.clone(), cluster, replica)?;
        self.issue(
            &identity,
            names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    /// Issues an admin client leaf (what the CLI presents).
    pub fn issue_admin(&self, name: &str, validity: Validity) -> Result<IssuedCert, IssueError> {
        let identity = PeerIdentity::admin(self.trust_domain.clone(), name)?;
        self.issue(
            &identity,
            &ServerNames::default(),
            &[ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }

    /// Issues a leaf for any identity with the given SANs and extended key usages. The
    /// identity's trust domain is written as given, so tests can mint foreign identities.
    pub fn issue(
        &self,
        identity: &PeerIdentity,
        names: &ServerNames,
        usages: &[ExtendedKeyUsagePurpose],
        validity: Validity,
    ) -> Result<IssuedCert, IssueError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate a leaf key"))?;
        let mut params = CertificateParams::default();
        validity.apply(&mut params)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "clustermesh");
        dn.push(DnType::CommonName, identity.name());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        let uri = identity
            .to_uri()
            .try_into()
            .map_err(rcgen_err("encode the identity URI"))?;
        params.subject_alt_names.push(SanType::URI(uri));
        for dns in &names.dns {
            let ia5 =
                dns.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| IssueError::InvalidDnsName {
                        name: dns.clone(),
                        reason: e.to_string(),
                    })?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(names.ips.iter().copied().map(SanType::IpAddress));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("sign the leaf certificate"))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn clone_key(key: &KeyPair) -> Result<KeyPair, IssueError> {
    KeyPair::try_from(key.serialized_der()).map_err(rcgen_err("copy the CA key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("clustermesh.local").unwrap()
    }

    fn leaf_der(pem: &str) -> Vec<u8> {
        crate::pem::parse_certs(pem.as_bytes()).unwrap()[0].to_vec()
    }

    #[test]
    fn server_leaf_carries_identity_and_server_names() {
        let ca = MeshCa::generate(td()).unwrap();
        let names = ServerNames::new(
            ["mesh.east.example".to_owned()],
            ["127.0.0.1".parse().unwrap()],
        );
        let leaf = ca
            .issue_server("east", &names, Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        let der = leaf_der(&leaf.cert_pem);
        let id = PeerIdentity::from_certificate(&der, &td()).unwrap();
        assert_eq!(id.to_string(), "spiffe://clustermesh.local/cluster/east");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", san.value.general_names);
        assert!(text.contains("mesh.east.example"), "{text}");
        assert!(!cert.is_ca());
    }

    #[test]
    fn invalid_cluster_name_is_refused_before_signing() {
        let ca = MeshCa::generate(td()).unwrap();
        let err = ca
            .issue_agent("Not_Valid", Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap_err();
        assert!(matches!(
            err,
            IssueError::Identity(IdentityError::InvalidClusterName { .. })
        ));
    }

    #[test]
    fn ca_reloaded_from_pem_issues_leaves_that_chain_to_it() {
        let ca = MeshCa::generate(td()).unwrap();
        let reloaded = MeshCa::from_pem(td(), ca.cert_pem(), &ca.key_pem()).unwrap();
        let leaf = reloaded
            .issue_admin("alice", Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        let ca_der = leaf_der(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = leaf_der(&leaf.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn two_cas_have_distinct_subjects() {
        let subject = |ca: &MeshCa| {
            let der = leaf_der(ca.cert_pem());
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            cert.subject().to_string()
        };
        let (a, b) = (
            MeshCa::generate(td()).unwrap(),
            MeshCa::generate(td()).unwrap(),
        );
        assert_ne!(subject(&a), subject(&b));
        assert!(subject(&a).contains("clustermesh CA"), "{}", subject(&a));
    }

    #[test]
    fn ca_with_foreign_key_is_rejected() {
        let a = MeshCa::generate(td()).unwrap();
        let b = MeshCa::generate(td()).unwrap();
        let err = MeshCa::from_pem(td(), a.cert_pem(), &b.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn leaf_is_not_accepted_as_ca() {
        let ca = MeshCa::generate(td()).unwrap();
        let leaf = ca
            .issue_agent("east", Validity::from_now(DEFAULT_LEAF_VALIDITY))
            .unwrap();
        assert!(MeshCa::from_pem(td(), &leaf.cert_pem, &leaf.key_pem).is_err());
    }

    #[test]
    fn empty_validity_window_is_rejected() {
        let now = SystemTime::now();
        let ca = MeshCa::generate(td()).unwrap();
        let err = ca
            .issue_agent("east", Validity::between(now, now))
            .unwrap_err();
        assert!(matches!(err, IssueError::InvalidValidity(_)));
    }
}
