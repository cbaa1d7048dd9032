//! Read-only facts about a certificate, for `status` output and expiry warnings.
//!
//! Components report which identity they run as and when their certificate expires;
//! the CLI shows the same for bundle files. This module decodes those facts once, with
//! errors instead of panics on any input.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use x509_parser::extensions::GeneralName;

use crate::identity::{IdentityError, PeerIdentity};

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject distinguished name (RFC 4514 text).
    pub subject: String,
    /// Issuer distinguished name (RFC 4514 text).
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// The mesh identity, if it carries exactly one valid one (any trust domain).
    pub identity: Option<PeerIdentity>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
}

impl CertInfo {
    /// Decodes a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let bad = |e: &dyn std::fmt::Display| IdentityError::BadCertificate(e.to_string());
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(&e))?;
        let validity = cert.validity();
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        if let Some(san) = cert.subject_alternative_name().map_err(|e| bad(&e))? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    GeneralName::IPAddress(raw) => {
                        if let Some(ip) = ip_from_san(raw) {
                            ips.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
            is_ca: cert.is_ca(),
            identity: PeerIdentity::from_certificate_any_domain(der).ok(),
            dns_names,
            ips,
        })
    }

    /// Time left until expiry at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }

    /// True if valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

fn ip_from_san(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .unwrap_or(SystemTime::UNIX_EPOCH),
        Err(_) => SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(unix.unsigned_abs()))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use crate::issue::{MeshCa, ServerNames, Validity};
    use proptest::prelude::*;

    #[test]
    fn server_leaf_facts() {
        let ca = MeshCa::generate(TrustDomain::new("clustermesh.local").unwrap()).unwrap();
        let now = SystemTime::now();
        let validity = Validity::between(
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        );
        let names = ServerNames::new(
            ["mesh.example".to_owned()],
            ["10.1.2.3".parse().unwrap(), "fd00::1".parse().unwrap()],
        );
        let leaf = ca.issue_server("east", &names, validity).unwrap();
        let der = crate::pem::parse_certs(leaf.cert_pem.as_bytes()).unwrap();
        let info = CertInfo::from_der(&der[0]).unwrap();
        assert_eq!(info.dns_names, ["mesh.example"]);
        assert_eq!(info.ips, names.ips);
        assert_eq!(info.identity.as_ref().unwrap().name(), "east");
        assert!(!info.is_ca);
        assert!(info.is_valid_at(now));
        assert!(!info.is_valid_at(now + Duration::from_secs(7200)));
        let left = info.remaining(now);
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        assert!(info.issuer.contains("clustermesh CA"), "{}", info.issuer);

        let ca_der = crate::pem::parse_certs(ca.cert_pem().as_bytes()).unwrap();
        let ca_info = CertInfo::from_der(&ca_der[0]).unwrap();
        assert!(ca_info.is_ca);
        assert_eq!(ca_info.identity, None);
        assert_eq!(ca_info.subject, info.issuer);
    }

    proptest! {
        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = CertInfo::from_der(&bytes);
        }
    }
}
