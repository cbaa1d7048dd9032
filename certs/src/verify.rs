//! Certificate verifiers that add the mesh identity and CA-scope checks to WebPKI path
//! validation.
//!
//! rustls' WebPKI verifiers check the chain to a CA, validity dates, key usage and (for
//! servers) the DNS/IP name. On top of that every mesh peer must carry exactly one
//! `spiffe://` identity in our trust domain, and the CA that vouches for the chain must be
//! allowed to issue that identity ([`crate::scope`]). The chain is validated against each
//! candidate CA *alone* (candidates: the CAs whose subject is the leaf's issuer), so we
//! know which CA vouched for it. Doing these checks inside the verifier (not after the
//! handshake) means a refused certificate fails the handshake itself, with a TLS alert,
//! exactly like a certificate from an unknown CA.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{IdentityError, PeerIdentity, TrustDomain};
use crate::scope::ScopedCa;

pub(crate) fn identity_failure(err: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

fn single_root(cert: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, rustls::Error> {
    let mut store = RootCertStore::empty();
    store.add(cert.clone())?;
    Ok(Arc::new(store))
}

/// The DER of the leaf's issuer name, if the leaf parses.
fn issuer_of(end_entity: &CertificateDer<'_>) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(end_entity.as_ref())
        .ok()
        .map(|(_, c)| c.issuer().as_raw().to_vec())
}

/// Indices of the CAs to try for `end_entity`: those named as its issuer, or all.
fn candidates(cas: &[ScopedCa], end_entity: &CertificateDer<'_>) -> Vec<usize> {
    let by_issuer: Vec<usize> = issuer_of(end_entity)
        .map(|issuer| {
            cas.iter()
                .enumerate()
                .filter(|(_, ca)| ca.subject_der == issuer)
                .map(|(i, _)| i)
                .collect()
        })
        .unwrap_or_default();
    if by_issuer.is_empty() {
        (0..cas.len()).collect()
    } else {
        by_issuer
    }
}

/// After a chain validated against `validated` CAs: the identity, if one of them may
/// issue it.
fn scoped_identity(
    cas: &[ScopedCa],
    validated: &[usize],
    end_entity: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
) -> Result<PeerIdentity, rustls::Error> {
    let identity = PeerIdentity::from_certificate(end_entity.as_ref(), trust_domain)
        .map_err(identity_failure)?;
    if validated.iter().any(|&i| cas[i].scope.allows(&identity)) {
        return Ok(identity);
    }
    let ca = &cas[validated[0]];
    Err(identity_failure(IdentityError::OutOfScope {
        identity: Box::new(identity),
        ca: ca.subject.clone(),
        scope: ca.scope.to_string(),
    }))
}

/// The scoped check both verifiers share: validate the chain against each candidate CA
/// alone (`per_ca(i)`), then require that a CA which validated it may issue the leaf's
/// identity. When no candidate validates it, `whole_bundle()` reports why (e.g.
/// `UnknownIssuer`), as validation against the whole bundle would.
fn verify_scoped(
    cas: &[ScopedCa],
    end_entity: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
    per_ca: impl Fn(usize) -> Result<(), rustls::Error>,
    whole_bundle: impl FnOnce() -> Result<(), rustls::Error>,
) -> Result<(), rustls::Error> {
    let mut validated = Vec::new();
    let mut last_err = None;
    for i in candidates(cas, end_entity) {
        match per_ca(i) {
            Ok(()) => validated.push(i),
            Err(e) => last_err = Some(e),
        }
    }
    if validated.is_empty() {
        return Err(match whole_bundle() {
            Err(e) => e,
            Ok(()) => last_err.unwrap_or(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        });
    }
    scoped_identity(cas, &validated, end_entity, trust_domain).map(|_| ())
}

/// Server-side verifier of client certificates: WebPKI against each scoped CA, then the
/// mesh identity and the CA's scope. Client certificates are mandatory.
#[derive(Debug)]
pub(crate) struct MeshClientVerifier {
    /// All CAs together: root hints and signature checks.
    all: Arc<dyn ClientCertVerifier>,
    cas: Vec<ScopedCa>,
    per_ca: Vec<Arc<dyn ClientCertVerifier>>,
    trust_domain: TrustDomain,
}

impl MeshClientVerifier {
    pub(crate) fn new(
        all: Arc<dyn ClientCertVerifier>,
        cas: Vec<ScopedCa>,
        provider: &Arc<CryptoProvider>,
        trust_domain: TrustDomain,
    ) -> Result<Self, rustls::Error> {
        let per_ca = cas
            .iter()
            .map(|ca| {
                WebPkiClientVerifier::builder_with_provider(
                    single_root(&ca.cert)?,
                    provider.clone(),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            all,
            cas,
            per_ca,
            trust_domain,
        })
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.all.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_scoped(
            &self.cas,
            end_entity,
            &self.trust_domain,
            |i| {
                self.per_ca[i]
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(|_| ())
            },
            || {
                self.all
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(|_| ())
            },
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.all.supported_verify_schemes()
    }
}

/// Client-side verifier of server certificates: WebPKI against each scoped CA (including
/// the DNS/IP server name), then the mesh identity and the CA's scope.
#[derive(Debug)]
pub(crate) struct MeshServerVerifier {
    all: Arc<dyn ServerCertVerifier>,
    cas: Vec<ScopedCa>,
    per_ca: Vec<Arc<WebPkiServerVerifier>>,
    trust_domain: TrustDomain,
}

impl MeshServerVerifier {
    pub(crate) fn new(
        all: Arc<dyn ServerCertVerifier>,
        cas: Vec<ScopedCa>,
        provider: &Arc<CryptoProvider>,
        trust_domain: TrustDomain,
    ) -> Result<Self, rustls::Error> {
        let per_ca = cas
            .iter()
            .map(|ca| {
                WebPkiServerVerifier::builder_with_provider(
                    single_root(&ca.cert)?,
                    provider.clone(),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            all,
            cas,
            per_ca,
            trust_domain,
        })
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_scoped(
            &self.cas,
            end_entity,
            &self.trust_domain,
            |i| {
                self.per_ca[i]
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                    .map(|_| ())
            },
            || {
                self.all
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                    .map(|_| ())
            },
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.all.supported_verify_schemes()
    }
}
