//! rustls server and client configurations for mesh mTLS.
//!
//! [`TlsMaterial`] is a validated set of trusted CAs, our own certificate chain and its
//! key; [`MeshTls`] turns it into the two rustls configs every component needs:
//!
//! * the **server** config requires a client certificate, verifies it against the mesh
//!   CAs and requires a `spiffe://` identity in our trust domain;
//! * the **client** config verifies the server against the mesh CAs and the DNS/IP name
//!   dialled, requires the same identity check, and presents our certificate.
//!
//! Both use the `ring` provider explicitly (no process-wide default is needed), TLS 1.3
//! only (every peer is our own software), ALPN `h2` (all mesh traffic is gRPC), and no
//! session resumption, so every connection is fully verified against the material that
//! is current when it is made.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::files::{self, FileError};
use crate::identity::{IdentityError, PeerIdentity, TrustDomain};
use crate::layout::TlsPaths;
use crate::pem::{self, PemError};
use crate::scope::{self, CaScope, ScopedCa};
use crate::trust_bundle::{BundleError, TrustBundle};
use crate::verify::{MeshClientVerifier, MeshServerVerifier};

/// ALPN protocol id of HTTP/2, negotiated on every mesh connection.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a set of TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// A PEM input did not decode.
    #[error("the {what} PEM is unusable: {source}")]
    Pem {
        /// Which input ("CA bundle", "certificate", "private key").
        what: &'static str,
        /// The decoding error.
        #[source]
        source: PemError,
    },
    /// The CA bundle (with its cluster labels) did not parse.
    #[error("the CA bundle is unusable: {0}")]
    Bundle(#[source] BundleError),
    /// A CA certificate could not be added to the trust store.
    #[error("CA certificate #{index} cannot be used as a trust anchor: {source}")]
    BadRoot {
        /// Position in the CA bundle, from 0.
        index: usize,
        /// The rustls/webpki error.
        #[source]
        source: rustls::Error,
    },
    /// The private key is unusable or does not belong to the certificate.
    #[error("the private key does not match the certificate or is unsupported: {source}")]
    KeyMismatch {
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// Our own certificate does not carry a valid mesh identity.
    #[error("our own certificate has no usable mesh identity: {0}")]
    OwnIdentity(#[source] IdentityError),
    /// Reloaded material names another identity than the process started with.
    #[error("the new certificate names {now}, but this process runs as {was}")]
    IdentityChanged {
        /// The identity in use.
        was: Box<PeerIdentity>,
        /// The identity of the rejected certificate.
        now: Box<PeerIdentity>,
    },
    /// rustls refused to build a config or verifier.
    #[error("failed to build the rustls {what}: {reason}")]
    Build {
        /// What was being built.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

/// Errors from loading TLS material and building configs.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or decoded.
    #[error(transparent)]
    File(#[from] FileError),
    /// The material decoded but is inconsistent; `origin` names where it came from.
    #[error("TLS material from {origin} is unusable: {source}; fix or re-issue these files")]
    Material {
        /// The files (or "in-memory PEM") the material came from.
        origin: String,
        /// What is wrong.
        #[source]
        source: MaterialError,
    },
}

/// A validated set of trusted CAs, our certificate chain and its private key.
pub struct TlsMaterial {
    trust_domain: TrustDomain,
    roots: TrustBundle,
    /// Cluster that unlabelled CAs are scoped to, if set.
    unlabelled_ca_cluster: Option<String>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: PeerIdentity,
    not_after: Option<SystemTime>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("trust_domain", &self.trust_domain)
            .field("identity", &self.identity)
            .field("roots", &self.roots.len())
            .field("unlabelled_ca_cluster", &self.unlabelled_ca_cluster)
            .field("chain", &self.chain.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Validates DER material: at least one usable CA, a chain whose leaf carries a mesh
    /// identity in `trust_domain`, and a key that belongs to the leaf. The CAs carry no
    /// cluster labels: only the one that issued our own leaf is trusted (see
    /// [`crate::scope`]); use [`TlsMaterial::with_bundle`] for a labelled bundle.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, MaterialError> {
        let mut bundle = TrustBundle::new();
        for root in roots {
            bundle.insert(root);
        }
        Self::with_bundle(trust_domain, bundle, chain, key)
    }

    /// Validates material whose trusted CAs come from a (labelled) [`TrustBundle`].
    pub fn with_bundle(
        trust_domain: TrustDomain,
        roots: TrustBundle,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, MaterialError> {
        root_store(&roots.certificates())?;
        let identity = PeerIdentity::from_chain(Some(chain.as_slice()), &trust_domain)
            .map_err(MaterialError::OwnIdentity)?;
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|source| MaterialError::KeyMismatch { source })?;
        let not_after = chain.first().and_then(|leaf| {
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
            let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
        });
        Ok(Self {
            trust_domain,
            roots,
            unlabelled_ca_cluster: None,
            chain,
            key,
            identity,
            not_after,
        })
    }

    /// Scopes CAs that carry no `# clustermesh-ca:` label to `cluster` (an agent's CA file
    /// for one remote cluster: whatever it holds may vouch for that cluster only).
    #[must_use]
    pub fn with_unlabelled_ca_cluster(mut self, cluster: &str) -> Self {
        self.unlabelled_ca_cluster = Some(cluster.to_owned());
        self
    }

    /// Every trusted CA with what it may issue (for logs and `status`).
    pub fn ca_scopes(&self) -> Vec<(String, CaScope)> {
        self.scoped_cas()
            .into_iter()
            .map(|ca| (ca.subject, ca.scope))
            .collect()
    }

    fn scoped_cas(&self) -> Vec<ScopedCa> {
        match self.chain.first() {
            Some(leaf) => scope::resolve(
                &self.roots,
                &self.identity,
                leaf,
                self.unlabelled_ca_cluster.as_deref(),
            ),
            None => Vec::new(),
        }
    }

    /// Decodes and validates PEM material.
    pub fn from_pem(
        trust_domain: TrustDomain,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let material = (|| {
            let pem_err = |what| move |source| MaterialError::Pem { what, source };
            let roots = TrustBundle::from_pem(ca_pem).map_err(MaterialError::Bundle)?;
            let chain = pem::parse_certs(cert_pem).map_err(pem_err("certificate"))?;
            let key = pem::parse_private_key(key_pem).map_err(pem_err("private key"))?;
            Self::with_bundle(trust_domain, roots, chain, key)
        })();
        material.map_err(|source| TlsError::Material {
            origin: "in-memory PEM".to_owned(),
            source,
        })
    }

    /// Loads and validates material from files; errors name the file(s).
    pub fn load(trust_domain: TrustDomain, paths: &TlsPaths) -> Result<Self, TlsError> {
        let roots = TrustBundle::from_pem(&files::read_file(&paths.ca)?).map_err(|source| {
            TlsError::Material {
                origin: paths.ca.display().to_string(),
                source: MaterialError::Bundle(source),
            }
        })?;
        let chain = files::load_certs(&paths.cert)?;
        let key = files::load_private_key(&paths.key)?;
        Self::with_bundle(trust_domain, roots, chain, key).map_err(|source| TlsError::Material {
            origin: paths.describe(),
            source,
        })
    }

    /// Our own identity (from our leaf certificate).
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When our leaf certificate expires, if it could be read.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.not_after
    }

    /// Builds the server config (client certificates required).
    pub fn server_config(&self) -> Result<ServerConfig, MaterialError> {
        let provider = Arc::new(provider());
        let inner = WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(&self.roots.certificates())?),
            provider.clone(),
        )
        .build()
        .map_err(|e| build_err("client certificate verifier", e))?;
        let verifier = Arc::new(
            MeshClientVerifier::new(
                inner,
                self.scoped_cas(),
                &provider,
                self.trust_domain.clone(),
            )
            .map_err(|e| build_err("client certificate verifier", e))?,
        );
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| build_err("server config", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| MaterialError::KeyMismatch { source })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// Builds the client config (presents our certificate, verifies the server).
    pub fn client_config(&self) -> Result<ClientConfig, MaterialError> {
        let provider = Arc::new(provider());
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::new(root_store(&self.roots.certificates())?),
            provider.clone(),
        )
        .build()
        .map_err(|e| build_err("server certificate verifier", e))?;
        let verifier = Arc::new(
            MeshServerVerifier::new(
                inner,
                self.scoped_cas(),
                &provider,
                self.trust_domain.clone(),
            )
            .map_err(|e| build_err("server certificate verifier", e))?,
        );
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| build_err("client config", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|source| MaterialError::KeyMismatch { source })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        Ok(config)
    }
}

fn build_err(what: &'static str, e: impl fmt::Display) -> MaterialError {
    MaterialError::Build {
        what,
        reason: e.to_string(),
    }
}

/// The crypto provider used for every mesh connection.
pub(crate) fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, MaterialError> {
    let mut store = RootCertStore::empty();
    for (index, root) in roots.iter().enumerate() {
        store
            .add(root.clone())
            .map_err(|source| MaterialError::BadRoot { index, source })?;
    }
    if store.is_empty() {
        return Err(MaterialError::Pem {
            what: "CA bundle",
            source: PemError::NoCertificate,
        });
    }
    Ok(store)
}

/// A snapshot of ready-to-use rustls configs built from one [`TlsMaterial`].
#[derive(Debug, Clone)]
pub struct MeshTls {
    identity: PeerIdentity,
    trust_domain: TrustDomain,
    not_after: Option<SystemTime>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl MeshTls {
    /// Builds both configs from validated material. CAs trusted for nothing (unlabelled,
    /// not our own) are logged here, once per build.
    pub fn new(material: &TlsMaterial) -> Result<Self, MaterialError> {
        for (ca, scope) in material.ca_scopes() {
            if scope == CaScope::Nothing {
                tracing::warn!(%ca, identity = %material.identity, "a CA in the trust bundle carries no `# clustermesh-ca: <cluster>` label and did not issue our certificate; it is trusted for no identity (run `clustermesh connect` again to label it)");
            }
        }
        Ok(Self {
            identity: material.identity.clone(),
            trust_domain: material.trust_domain.clone(),
            not_after: material.not_after,
            server: Arc::new(material.server_config()?),
            client: Arc::new(material.client_config()?),
        })
    }

    /// Loads material from files and builds both configs.
    pub fn load(trust_domain: TrustDomain, paths: &TlsPaths) -> Result<Self, TlsError> {
        let material = TlsMaterial::load(trust_domain, paths)?;
        Self::new(&material).map_err(|source| TlsError::Material {
            origin: paths.describe(),
            source,
        })
    }

    /// Builds both configs from PEM material.
    pub fn from_pem(
        trust_domain: TrustDomain,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let material = TlsMaterial::from_pem(trust_domain, ca_pem, cert_pem, key_pem)?;
        Self::new(&material).map_err(|source| TlsError::Material {
            origin: "in-memory PEM".to_owned(),
            source,
        })
    }

    /// Our own identity.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// When our leaf certificate expires, if known.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.not_after
    }
}

/// A source of the current TLS configs. Implemented by a fixed [`MeshTls`] and by
/// [`crate::reload::ReloadingTls`]; the transport asks it once per new connection, so
/// established connections keep the config they were made with.
pub trait TlsSource: Send + Sync + fmt::Debug + 'static {
    /// The server config for the next accepted connection.
    fn server_config(&self) -> Arc<ServerConfig>;
    /// The client config for the next outgoing connection.
    fn client_config(&self) -> Arc<ClientConfig>;
    /// The trust domain peers must belong to.
    fn trust_domain(&self) -> TrustDomain;
}

impl TlsSource for MeshTls {
    fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }
    fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
    fn trust_domain(&self) -> TrustDomain {
        self.trust_domain.clone()
    }
}
