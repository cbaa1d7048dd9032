//! The layout of a bundle directory: which file holds what, and which files make up one
//! TLS endpoint.
//!
//! A cluster bundle directory holds everything one cluster's components need for mTLS:
//!
//! | file          | content                                              | mode |
//! |---------------|------------------------------------------------------|------|
//! | `ca.crt`      | trusted CA certificates (one or more, PEM)           | 0644 |
//! | `server.crt`  | the mesh API server / store replica leaf (PEM)       | 0644 |
//! | `server.key`  | its private key (PKCS#8 PEM)                         | 0600 |
//! | `client.crt`  | the agents' leaf (`cluster/<c>/agent`, PEM)          | 0644 |
//! | `client.key`  | its private key (PKCS#8 PEM)                         | 0600 |
//! | `replica.crt` | the store replica's leaf (`cluster/<c>/replica/1`)   | 0644 |
//! | `replica.key` | its private key (PKCS#8 PEM)                         | 0600 |
//!
//! `ca.crt` is a labelled trust bundle ([`crate::trust_bundle`]); `server.crt` names the
//! mesh API server (`cluster/<c>`). Each role has its own key, so the files handed to a
//! node (`ca.crt`, `client.*`) can read the mesh API and nothing else. An admin bundle
//! (for the CLI) holds `ca.crt`, `admin.crt` and `admin.key` with the same modes; the
//! CA's own key (`ca.key`) lives only where certificates are issued.
//!
//! Its own module because both sides use it: [`crate::files`] writes bundles in this
//! layout and [`crate::config`] loads an endpoint's material from it.

use std::path::{Path, PathBuf};

/// File name of the trusted CA bundle in a bundle directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key (only where certificates are issued).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the server certificate in a bundle directory.
pub const SERVER_CERT_FILE: &str = "server.crt";
/// File name of the server key in a bundle directory.
pub const SERVER_KEY_FILE: &str = "server.key";
/// File name of the client certificate in a bundle directory.
pub const CLIENT_CERT_FILE: &str = "client.crt";
/// File name of the client key in a bundle directory.
pub const CLIENT_KEY_FILE: &str = "client.key";

/// File name of the store replica certificate in a bundle directory.
pub const REPLICA_CERT_FILE: &str = "replica.crt";
/// File name of the store replica key in a bundle directory.
pub const REPLICA_KEY_FILE: &str = "replica.key";
/// Raft ID of the replica whose certificate a bundle directory holds (a standalone cluster
/// runs one replica, ID 1).
pub const BUNDLE_REPLICA_ID: u64 = 1;

/// File name of an admin certificate (CLI bundle).
pub const ADMIN_CERT_FILE: &str = "admin.crt";
/// File name of an admin key (CLI bundle).
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// Paths of the files of a bundle directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundlePaths {
    /// `ca.crt`.
    pub ca: PathBuf,
    /// `server.crt`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `client.crt`.
    pub client_cert: PathBuf,
    /// `client.key`.
    pub client_key: PathBuf,
    /// `replica.crt`.
    pub replica_cert: PathBuf,
    /// `replica.key`.
    pub replica_key: PathBuf,
}

impl BundlePaths {
    /// The paths inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            server_cert: dir.join(SERVER_CERT_FILE),
            server_key: dir.join(SERVER_KEY_FILE),
            client_cert: dir.join(CLIENT_CERT_FILE),
            client_key: dir.join(CLIENT_KEY_FILE),
            replica_cert: dir.join(REPLICA_CERT_FILE),
            replica_key: dir.join(REPLICA_KEY_FILE),
        }
    }
}

/// The three files a TLS endpoint is configured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// Trusted CA bundle (PEM, one or more certificates).
    pub ca: PathBuf,
    /// Our certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Our private key (PEM).
    pub key: PathBuf,
}

impl TlsPaths {
    /// `ca.crt`, `server.crt`, `server.key` in a bundle directory.
    pub fn server(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(SERVER_CERT_FILE),
            key: dir.join(SERVER_KEY_FILE),
        }
    }

    /// `ca.crt`, `client.crt`, `client.key` in a bundle directory.
    pub fn client(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(CLIENT_CERT_FILE),
            key: dir.join(CLIENT_KEY_FILE),
        }
    }

    /// `ca.crt`, `replica.crt`, `replica.key` in a bundle directory.
    pub fn replica(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(REPLICA_CERT_FILE),
            key: dir.join(REPLICA_KEY_FILE),
        }
    }

    /// `ca.crt`, `admin.crt`, `admin.key` in an admin bundle directory.
    pub fn admin(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(ADMIN_CERT_FILE),
            key: dir.join(ADMIN_KEY_FILE),
        }
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "CA {}, certificate {}, key {}",
            self.ca.display(),
            self.cert.display(),
            self.key.display()
        )
    }
}
