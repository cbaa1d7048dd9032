//! PEM decoding of certificates and private keys into the DER types rustls uses.
//!
//! Kept apart from file I/O so the same decoder serves files, Kubernetes secrets and
//! tests; [`crate::files`] adds the path to every error.

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors from decoding PEM text.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The text is not well-formed PEM.
    #[error("malformed PEM: {0}")]
    Malformed(String),
    /// No `CERTIFICATE` block was found.
    #[error("no CERTIFICATE block found")]
    NoCertificate,
    /// No private key block was found.
    #[error("no PRIVATE KEY block found (PKCS#8, PKCS#1 or SEC1)")]
    NoPrivateKey,
    /// More than one private key block was found.
    #[error("more than one private key block found; keep exactly one key per file")]
    MultiplePrivateKeys,
}

fn malformed(e: pem::Error) -> PemError {
    PemError::Malformed(e.to_string())
}

/// Decodes every `CERTIFICATE` block in `pem`, in order. Fails if there is none or if
/// any block is malformed; other block types are ignored.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(malformed)?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// Decodes exactly one private key (PKCS#8, PKCS#1 or SEC1) from `pem`.
pub fn parse_private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    let mut keys = PrivateKeyDer::pem_slice_iter(pem);
    let key = match keys.next() {
        None => return Err(PemError::NoPrivateKey),
        Some(key) => key.map_err(malformed)?,
    };
    match keys.next() {
        None => Ok(key),
        Some(Err(e)) => Err(malformed(e)),
        Some(Ok(_)) => Err(PemError::MultiplePrivateKeys),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOT_BASE64: &str = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";

    #[test]
    fn empty_input_has_no_certificate() {
        assert!(matches!(parse_certs(b""), Err(PemError::NoCertificate)));
        assert!(matches!(
            parse_private_key(b""),
            Err(PemError::NoPrivateKey)
        ));
    }

    #[test]
    fn corrupt_block_is_malformed() {
        assert!(matches!(
            parse_certs(NOT_BASE64.as_bytes()),
            Err(PemError::Malformed(_))
        ));
    }

    #[test]
    fn unterminated_block_is_malformed() {
        let text = "-----BEGIN PRIVATE KEY-----\nAAAA\n";
        assert!(matches!(
            parse_private_key(text.as_bytes()),
            Err(PemError::Malformed(_))
        ));
    }

    #[test]
    fn two_keys_are_refused() {
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let two = format!("{key}{key}");
        assert!(matches!(
            parse_private_key(two.as_bytes()),
            Err(PemError::MultiplePrivateKeys)
        ));
        assert!(parse_private_key(key.as_bytes()).is_ok());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_certs(&bytes);
            let _ = parse_private_key(&bytes);
        }

        #[test]
        fn decoders_never_panic_on_pem_shaped_text(body in "[A-Za-z0-9+/=\n-]{0,200}") {
            let text = format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n");
            let _ = parse_certs(text.as_bytes());
            let key = format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n");
            let _ = parse_private_key(key.as_bytes());
        }
    }
}
