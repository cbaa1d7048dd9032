//! The set of CA certificates a cluster trusts (`ca.crt`), each bound to the cluster
//! whose identities it may issue.
//!
//! `clustermesh connect` makes two clusters trust each other by adding each one's CA to
//! the other's bundle, and `disconnect` removes it again. A CA is trusted only for the
//! cluster it is labelled with (see [`crate::scope`]): the label is a comment line written
//! just before the CA's PEM block,
//!
//! ```text
//! # clustermesh-ca: west
//! -----BEGIN CERTIFICATE-----
//! ...
//! ```
//!
//! PEM tools (openssl, rustls-pemfile, kubectl) ignore such explanatory text (RFC 7468
//! §5.2), so the file stays an ordinary CA bundle; only clustermesh reads the labels.
//! [`TrustBundle`] holds the CAs as DER (so the same CA written with different line breaks
//! is one CA), keeps their order, and writes them back as labelled PEM.

use std::collections::BTreeSet;

use rustls_pki_types::CertificateDer;

use crate::identity::{validate_cluster_name, IdentityError};
use crate::pem::{self, PemError};

/// The comment that labels the next CA block with a cluster name.
pub const LABEL_PREFIX: &str = "# clustermesh-ca:";

/// Errors from reading a labelled bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A certificate block did not decode.
    #[error("CA bundle: {0}")]
    Pem(#[from] PemError),
    /// A label line names an invalid cluster.
    #[error("CA bundle line {line}: invalid cluster label: {source}")]
    Label {
        /// 1-based line of the label.
        line: usize,
        /// Why the name is invalid.
        #[source]
        source: IdentityError,
    },
}

/// One trusted CA and the clusters it is labelled with (empty: unlabelled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedCa {
    /// The CA certificate.
    pub cert: CertificateDer<'static>,
    /// The clusters this CA may issue identities of.
    pub clusters: BTreeSet<String>,
}

/// An ordered, duplicate-free set of labelled CA certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    cas: Vec<TrustedCa>,
}

impl TrustBundle {
    /// An empty bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a PEM bundle (one or more `CERTIFICATE` blocks, each optionally preceded by
    /// `# clustermesh-ca: <cluster>` lines); duplicates are merged, their labels joined.
    pub fn from_pem(pem: &[u8]) -> Result<Self, BundleError> {
        let text = String::from_utf8_lossy(pem);
        let mut bundle = Self::new();
        let mut labels = BTreeSet::new();
        let mut block: Option<String> = None;
        let mut saw_block = false;
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if let Some(current) = block.as_mut() {
                current.push_str(line);
                current.push('\n');
                if line.starts_with("-----END ") {
                    let certs = pem::parse_certs(current.as_bytes());
                    block = None;
                    match certs {
                        Ok(certs) => {
                            for cert in certs {
                                bundle.insert_labelled(cert, labels.iter().cloned());
                            }
                        }
                        // A block of another type (e.g. a key pasted by mistake) is not a CA.
                        Err(PemError::NoCertificate) => {}
                        Err(e) => return Err(e.into()),
                    }
                    labels.clear();
                }
                continue;
            }
            if line.starts_with("-----BEGIN ") {
                saw_block = true;
                block = Some(format!("{line}\n"));
            } else if let Some(name) = line.strip_prefix(LABEL_PREFIX) {
                let name = name.trim();
                validate_cluster_name(name).map_err(|source| BundleError::Label {
                    line: index + 1,
                    source,
                })?;
                labels.insert(name.to_owned());
            }
        }
        if block.is_some() {
            return Err(PemError::Malformed("unterminated PEM block".into()).into());
        }
        if !saw_block || bundle.is_empty() {
            return Err(PemError::NoCertificate.into());
        }
        Ok(bundle)
    }

    /// Adds a CA without a label; returns false if it was already present.
    pub fn insert(&mut self, ca: CertificateDer<'static>) -> bool {
        self.insert_labelled(ca, std::iter::empty())
    }

    /// Adds a CA labelled with `clusters` (joined to the labels it already has); returns
    /// false if the CA was already present.
    pub fn insert_labelled(
        &mut self,
        ca: CertificateDer<'static>,
        clusters: impl IntoIterator<Item = String>,
    ) -> bool {
        match self.cas.iter_mut().find(|c| c.cert == ca) {
            Some(existing) => {
                existing.clusters.extend(clusters);
                false
            }
            None => {
                self.cas.push(TrustedCa {
                    cert: ca,
                    clusters: clusters.into_iter().collect(),
                });
                true
            }
        }
    }

    /// Labels every CA of `other` with `cluster` and adds it; returns how many were new.
    pub fn merge_as(&mut self, other: &TrustBundle, cluster: &str) -> usize {
        other
            .cas
            .iter()
            .filter(|ca| self.insert_labelled(ca.cert.clone(), [cluster.to_owned()]))
            .count()
    }

    /// Adds every CA of `other` with its labels; returns how many were new.
    pub fn merge(&mut self, other: &TrustBundle) -> usize {
        other
            .cas
            .iter()
            .filter(|ca| self.insert_labelled(ca.cert.clone(), ca.clusters.iter().cloned()))
            .count()
    }

    /// Removes every CA of `other`; returns how many were present.
    pub fn remove_all(&mut self, other: &TrustBundle) -> usize {
        let before = self.cas.len();
        self.cas
            .retain(|ca| !other.cas.iter().any(|o| o.cert == ca.cert));
        before - self.cas.len()
    }

    /// Removes label `cluster` everywhere, and every CA left without a label that had it.
    pub fn remove_cluster(&mut self, cluster: &str) -> usize {
        let before = self.cas.len();
        self.cas.retain_mut(|ca| {
            let had = ca.clusters.remove(cluster);
            !(had && ca.clusters.is_empty())
        });
        before - self.cas.len()
    }

    /// True if `ca` is in the bundle.
    pub fn contains(&self, ca: &CertificateDer<'_>) -> bool {
        self.cas.iter().any(|c| c.cert.as_ref() == ca.as_ref())
    }

    /// The CAs with their labels, in insertion order.
    pub fn cas(&self) -> &[TrustedCa] {
        &self.cas
    }

    /// The clusters some CA is labelled with.
    pub fn clusters(&self) -> BTreeSet<String> {
        self.cas
            .iter()
            .flat_map(|ca| ca.clusters.iter().cloned())
            .collect()
    }

    /// The CA certificates, in insertion order.
    pub fn certificates(&self) -> Vec<CertificateDer<'static>> {
        self.cas.iter().map(|ca| ca.cert.clone()).collect()
    }

    /// Number of CAs.
    pub fn len(&self) -> usize {
        self.cas.len()
    }

    /// True when no CA is trusted.
    pub fn is_empty(&self) -> bool {
        self.cas.is_empty()
    }

    /// The bundle as PEM, one `CERTIFICATE` block per CA, each preceded by its labels.
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        for ca in &self.cas {
            for cluster in &ca.clusters {
                out.push_str(LABEL_PREFIX);
                out.push(' ');
                out.push_str(cluster);
                out.push('\n');
            }
            out.push_str(&encode_pem("CERTIFICATE", &ca.cert));
        }
        out
    }
}

/// Encodes DER as a PEM block with 64-column base64 lines and `\n` line ends (RFC 7468
/// §2), the form rcgen writes, so a bundle we rewrite keeps the bytes it had.
pub fn encode_pem(label: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(label, der), config)
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
            let body = if expected.is_empty() {
                String::new()
            } else {
                format!("{expected}\n")
            };
            assert_eq!(
                encode_pem("X", input.as_bytes()),
                format!("-----BEGIN X-----\n{body}-----END X-----\n")
            );
        }
    }

    #[test]
    fn merge_and_remove_model_connect_and_disconnect() {
        let (a, b) = (ca_pem(), ca_pem());
        let mut east = TrustBundle::from_pem(a.as_bytes()).unwrap();
        let west = TrustBundle::from_pem(b.as_bytes()).unwrap();
        assert_eq!(east.merge_as(&west, "west"), 1);
        assert_eq!(
            east.merge_as(&west, "west"),
            0,
            "merging twice must not duplicate"
        );
        assert_eq!(east.len(), 2);
        let reparsed = TrustBundle::from_pem(east.to_pem().as_bytes()).unwrap();
        assert_eq!(reparsed, east);
        assert_eq!(east.remove_all(&west), 1);
        assert_eq!(east, TrustBundle::from_pem(a.as_bytes()).unwrap());
    }

    #[test]
    fn labels_bind_cas_to_clusters_and_survive_a_round_trip() {
        let (a, b) = (ca_pem(), ca_pem());
        let text = format!("# clustermesh-ca: east\n{a}\nsome note\n# clustermesh-ca: west\r\n{b}");
        let bundle = TrustBundle::from_pem(text.as_bytes()).unwrap();
        assert_eq!(bundle.len(), 2);
        assert_eq!(
            bundle.cas()[0].clusters,
            BTreeSet::from(["east".to_owned()])
        );
        assert_eq!(
            bundle.cas()[1].clusters,
            BTreeSet::from(["west".to_owned()])
        );
        let again = TrustBundle::from_pem(bundle.to_pem().as_bytes()).unwrap();
        assert_eq!(again, bundle);
        // openssl-style readers still see two certificates.
        assert_eq!(
            crate::pem::parse_certs(bundle.to_pem().as_bytes())
                .unwrap()
                .len(),
            2
        );
        let mut removed = bundle.clone();
        assert_eq!(removed.remove_cluster("west"), 1);
        assert_eq!(removed.clusters(), BTreeSet::from(["east".to_owned()]));
    }

    #[test]
    fn invalid_labels_and_truncated_blocks_are_errors() {
        let a = ca_pem();
        let bad = format!("# clustermesh-ca: Not_A_Cluster\n{a}");
        let err = TrustBundle::from_pem(bad.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let cut = &a[..a.len() / 2];
        assert!(TrustBundle::from_pem(cut.as_bytes()).is_err());
        assert!(TrustBundle::from_pem(b"").is_err());
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
        fn bundle_parser_never_panics(text in "\\PC{0,400}") {
            let _ = TrustBundle::from_pem(text.as_bytes());
        }

        #[test]
        fn encode_pem_round_trips(der in proptest::collection::vec(any::<u8>(), 1..700)) {
            let text = encode_pem("CERTIFICATE", &der);
            let parsed = crate::pem::parse_certs(text.as_bytes()).unwrap();
            prop_assert_eq!(parsed.len(), 1);
            prop_assert_eq!(parsed[0].as_ref(), der.as_slice());
        }
    }
}
