//! Trust-bundle edits shared by both targets.
//!
//! A cluster's trust bundle lists its own CA and the CA of every connected cluster, each
//! labelled with the one cluster it may issue identities of (see
//! `clustermesh_certs::scope`). `connect`, `disconnect` and `enable` edit it the same way
//! whether it lives in a state directory or in a Kubernetes Secret, so the edits live
//! here, on top of [`TrustBundle`] and the `pem` crate.

use clustermesh_certs::trust_bundle::{BundleError, TrustBundle};
use pem::{EncodeConfig, LineEnding};

/// The `CERTIFICATE` blocks of `text`, each re-encoded in one canonical form (LF line
/// ends, 64 columns, one trailing newline) so two copies of one certificate compare
/// equal. Text that is not PEM has no certificate.
#[must_use]
pub fn certificate_blocks(text: &str) -> Vec<String> {
    let config = EncodeConfig::new().set_line_ending(LineEnding::LF);
    pem::parse_many(text)
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b.tag() == "CERTIFICATE")
                .map(|b| pem::encode_config(b, config))
                .collect()
        })
        .unwrap_or_default()
}

/// Parses a labelled trust bundle; a blank text is an empty bundle.
fn parse_bundle(text: &str) -> Result<TrustBundle, BundleError> {
    if text.trim().is_empty() {
        return Ok(TrustBundle::new());
    }
    TrustBundle::from_pem(text.as_bytes())
}

/// Adds the CAs of `add` to `bundle`, labelled with `cluster` (the only cluster they may
/// issue identities of). A CA already present keeps its place and gains the label.
pub(crate) fn bundle_with(bundle: &str, add: &str, cluster: &str) -> Result<String, BundleError> {
    let mut out = parse_bundle(bundle)?;
    out.merge_as(&parse_bundle(add)?, cluster);
    Ok(out.to_pem())
}

/// Removes the CAs of `remove` from `bundle`.
pub(crate) fn bundle_without(bundle: &str, remove: &str) -> Result<String, BundleError> {
    let mut out = parse_bundle(bundle)?;
    out.remove_all(&parse_bundle(remove)?);
    Ok(out.to_pem())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clustermesh_certs::{MeshCa, TrustDomain};

    use super::*;

    fn ca_pem() -> String {
        MeshCa::generate(TrustDomain::new("clustermesh.local").unwrap())
            .unwrap()
            .cert_pem()
            .to_owned()
    }

    #[test]
    fn bundles_add_labelled_without_duplicates_and_remove_exactly() {
        let (a, b) = (ca_pem(), ca_pem());
        let own = bundle_with("", &a, "east").unwrap();
        let ab = bundle_with(&own, &b, "west").unwrap();
        assert_eq!(certificate_blocks(&ab).len(), 2);
        assert!(ab.contains("# clustermesh-ca: east\n-----BEGIN"), "{ab}");
        assert!(ab.contains("# clustermesh-ca: west\n-----BEGIN"), "{ab}");
        assert_eq!(bundle_with(&ab, &b, "west").unwrap(), ab);
        assert_eq!(bundle_without(&ab, &b).unwrap(), own);
        assert_eq!(bundle_without(&own, &b).unwrap(), own);
        let parsed = TrustBundle::from_pem(ab.as_bytes()).unwrap();
        assert_eq!(
            parsed.clusters(),
            BTreeSet::from(["east".to_owned(), "west".to_owned()])
        );
    }

    #[test]
    fn certificate_blocks_are_canonical_whatever_the_wrapping_and_comments() {
        let a = ca_pem();
        let crlf = format!("# a comment\r\n{}\r\n\r\n", a.trim().replace('\n', "\r\n"));
        assert_eq!(certificate_blocks(&crlf), vec![a.clone()]);
        assert_eq!(certificate_blocks(&format!("{a}{a}")).len(), 2);
        assert!(certificate_blocks("not pem").is_empty());
        assert!(certificate_blocks("").is_empty());
    }
}
