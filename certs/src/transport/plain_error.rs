//! Plain words for TLS handshake errors.
//!
//! rustls prints several certificate errors in their `Debug` form, so a refusal by our
//! verifier reads `invalid peer certificate: Other(OtherError(ForeignTrustDomain { … }))`
//! in a log line or an error message. An operator needs the reason in words: this
//! module finds the rustls error inside the `io::Error` that `tokio-rustls` returns and
//! prints the verifier's own message (or a short sentence for rustls' unit variants).

use std::fmt;
use std::io;

use rustls::CertificateError;

/// Displays a TLS handshake `io::Error` in plain words: the message of our verifier when
/// it refused the certificate, a sentence for rustls' bare certificate errors, and the
/// error's own `Display` otherwise.
#[derive(Debug, Clone, Copy)]
pub struct TlsErrorText<'a>(pub &'a io::Error);

impl fmt::Display for TlsErrorText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match rustls_error(self.0) {
            Some(err) => write_rustls_error(f, err),
            None => write!(f, "{}", self.0),
        }
    }
}

/// The rustls error inside an I/O error of `tokio-rustls`, if there is one.
pub(crate) fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

fn write_rustls_error(f: &mut fmt::Formatter<'_>, err: &rustls::Error) -> fmt::Result {
    match err {
        rustls::Error::InvalidCertificate(cert) => {
            f.write_str("invalid peer certificate: ")?;
            write_certificate_error(f, cert)
        }
        // `OtherError`'s Display is the inner error's Display.
        rustls::Error::Other(other) => write!(f, "{other}"),
        rustls::Error::NoCertificatesPresented => f.write_str("the peer sent no certificate"),
        other => write!(f, "{other}"),
    }
}

fn write_certificate_error(f: &mut fmt::Formatter<'_>, err: &CertificateError) -> fmt::Result {
    let text = match err {
        // Our verifiers' refusals (identity, trust domain, scope) arrive as `Other`.
        CertificateError::Other(other) => return write!(f, "{other}"),
        CertificateError::UnknownIssuer => "not issued by a trusted CA (unknown issuer)",
        CertificateError::BadEncoding => "the certificate is malformed",
        CertificateError::Expired => "the certificate has expired",
        CertificateError::NotValidYet => "the certificate is not valid yet",
        CertificateError::Revoked => "the certificate is revoked",
        CertificateError::BadSignature => "the certificate's signature is invalid",
        CertificateError::NotValidForName => "the certificate is not valid for the server name",
        CertificateError::InvalidPurpose => {
            "the certificate's extended key usage does not allow this role"
        }
        CertificateError::UnhandledCriticalExtension => {
            "the certificate has an unsupported critical extension"
        }
        CertificateError::ApplicationVerificationFailure => "the certificate was refused",
        // The remaining variants carry context that rustls already prints in words.
        other => return write!(f, "{other}"),
    };
    f.write_str(text)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::OtherError;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("identity spiffe://a/b is in trust domain a, expected c")]
    struct Refusal;

    fn io(err: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, err)
    }

    #[test]
    fn verifier_refusal_prints_the_verifier_message_not_debug() {
        let err = io(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(Refusal)),
        )));
        let text = TlsErrorText(&err).to_string();
        assert_eq!(
            text,
            "invalid peer certificate: identity spiffe://a/b is in trust domain a, expected c"
        );
        assert!(!text.contains("OtherError"), "{text}");
    }

    #[test]
    fn bare_certificate_errors_read_as_sentences() {
        let err = io(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert_eq!(
            TlsErrorText(&err).to_string(),
            "invalid peer certificate: not issued by a trusted CA (unknown issuer)"
        );
        let err = io(rustls::Error::NoCertificatesPresented);
        assert_eq!(
            TlsErrorText(&err).to_string(),
            "the peer sent no certificate"
        );
    }

    #[test]
    fn plain_io_errors_keep_their_text() {
        let err = io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(TlsErrorText(&err).to_string(), "reset by peer");
    }
}
