//! The set of CA certificates a cluster trusts (`ca.crt`).
//!
//! `clustermesh connect` makes two clusters trust each other by adding each one's CA to
//! the other's bundle, and `disconnect` removes it again. [`TrustBundle`] holds the CAs
//! as DER (so the same CA written with different line breaks is one CA), keeps their
//! order, and writes them back as PEM.

use rustls_pki_types::CertificateDer;

use crate::pem::{self, PemError};

/// An ordered, duplicate-free set of CA certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    cas: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// An empty bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a PEM bundle (one or more `CERTIFICATE` blocks); duplicates are dropped.
    pub fn from_pem(pem: &[u8]) -> Result<Self, PemError> {
        let mut bundle = Self::new();
        for ca in pem::parse_certs(pem)? {
            bundle.insert(ca);
        }
        Ok(bundle)
    }

    /// Adds a CA; returns false if it was already present.
    pub fn insert(&mut self, ca: CertificateDer<'static>) -> bool {
        if self.cas.contains(&ca) {
            false
        } else {
            self.cas.push(ca);
            true
        }
    }

    /// Adds every CA of `other`; returns how many were new.
    pub fn merge(&mut self, other: &TrustBundle) -> usize {
        other
            .cas
            .iter()
            .filter(|ca| self.insert((*ca).clone()))
            .count()
    }

    /// Removes every CA of `other`; returns how many were present.
    pub fn remove_all(&mut self, other: &TrustBundle) -> usize {
        let before = self.cas.len();
        self.cas.retain(|ca| !other.cas.contains(ca));
        before - self.cas.len()
    }

    /// True if `ca` is in the bundle.
    pub fn contains(&self, ca: &CertificateDer<'_>) -> bool {
        self.cas.iter().any(|c| c.as_ref() == ca.as_ref())
    }

    /// The CAs, in insertion order.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.cas
    }

    /// Number of CAs.
    pub fn len(&self) -> usize {
        self.cas.len()
    }

    /// True when no CA is trusted.
    pub fn is_empty(&self) -> bool {
        self.cas.is_empty()
    }

    /// The bundle as PEM, one `CERTIFICATE` block per CA.
    pub fn to_pem(&self) -> String {
        self.cas
            .iter()
            .map(|ca| encode_pem("CERTIFICATE", ca))
            .collect()
    }
}

/// Encodes DER as a PEM block with 64-column base64 lines (RFC 7468 §2).
pub fn encode_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use crate::issue::MeshCa;
    use proptest::prelude::*;

    fn ca_pem() -> String {
        MeshCa::generate(TrustDomain::new("clustermesh.local").unwrap())
            .unwrap()
            .cert_pem()
            .to_owned()
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), expected);
        }
    }

    #[test]
    fn merge_and_remove_model_connect_and_disconnect() {
        let (a, b) = (ca_pem(), ca_pem());
        let mut east = TrustBundle::from_pem(a.as_bytes()).unwrap();
        let west = TrustBundle::from_pem(b.as_bytes()).unwrap();
        assert_eq!(east.merge(&west), 1);
        assert_eq!(east.merge(&west), 0, "merging twice must not duplicate");
        assert_eq!(east.len(), 2);
        let reparsed = TrustBundle::from_pem(east.to_pem().as_bytes()).unwrap();
        assert_eq!(reparsed, east);
        assert_eq!(east.remove_all(&west), 1);
        assert_eq!(east, TrustBundle::from_pem(a.as_bytes()).unwrap());
    }

    #[test]
    fn duplicate_blocks_collapse() {
        let a = ca_pem();
        let twice = format!("{a}{a}");
        assert_eq!(TrustBundle::from_pem(twice.as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn pem_written_by_us_matches_rcgen_output() {
        let a = ca_pem();
        let bundle = TrustBundle::from_pem(a.as_bytes()).unwrap();
        assert_eq!(
            bundle.to_pem().replace("\r\n", "\n"),
            a.replace("\r\n", "\n")
        );
    }

    proptest! {
        #[test]
        fn encode_pem_round_trips(der in proptest::collection::vec(any::<u8>(), 1..700)) {
            let text = encode_pem("CERTIFICATE", &der);
            let parsed = crate::pem::parse_certs(text.as_bytes()).unwrap();
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(parsed[0].as_ref(), der.as_slice());
        }
    }
}
