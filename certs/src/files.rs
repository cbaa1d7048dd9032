//! Certificate and key files on disk: reading and decoding them, writing them atomically
//! with the right mode, and writing whole bundle directories.
//!
//! The directory layout is [`crate::layout`]; an admin bundle ([`write_admin_bundle`], for
//! the CLI) holds `ca.crt`, `admin.crt` and `admin.key`.
//!
//! The CA's own key is written separately ([`write_ca`], `ca.key`) and should not be
//! shipped to nodes. Every file is written atomically (temporary file in the same
//! directory, fsync, rename) so a hot-reloading reader never sees half a file, and key
//! files are created with mode 0600 rather than chmod-ed afterwards, so no other user can
//! open them even briefly.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::issue::{IssueError, IssuedCert, MeshCa, ServerNames, Validity};
use crate::layout::{BundlePaths, TlsPaths, BUNDLE_REPLICA_ID, CA_CERT_FILE, CA_KEY_FILE};
use crate::pem::{self, PemError};

/// Mode of private key files.
pub const KEY_FILE_MODE: u32 = 0o600;
/// Mode of certificate files.
pub const CERT_FILE_MODE: u32 = 0o644;

/// Errors from reading or writing certificate material.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("failed to read {}: {source}; check that the file exists and is readable by this process", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("failed to write {}: {source}; check that the directory exists and is writable", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not the expected PEM.
    #[error("{}: {source}; restore the file from the cluster's certificate bundle or issue a new one", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: PemError,
    },
    /// Issuing the certificates of a bundle failed.
    #[error("failed to issue the certificate bundle: {0}")]
    Issue(#[from] IssueError),
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads every certificate of a PEM file (a CA bundle or a leaf chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let bytes = read_file(path)?;
    pem::parse_certs(&bytes).map_err(|source| FileError::Pem {
        path: path.to_owned(),
        source,
    })
}

/// Loads exactly one private key from a PEM file. A key readable by group or others is
/// loaded but logged as a warning.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    warn_if_exposed(path);
    let bytes = read_file(path)?;
    pem::parse_private_key(&bytes).map_err(|source| FileError::Pem {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "private key file is readable by other users; chmod 600 it"
            );
        }
    }
}

/// Writes a certificate PEM atomically with mode 0644.
pub fn write_cert(path: &Path, pem: &str) -> Result<(), FileError> {
    write_atomic(path, pem.as_bytes(), CERT_FILE_MODE)
}

/// Writes a private key PEM atomically; the file is created with mode 0600.
pub fn write_private_key(path: &Path, pem: &str) -> Result<(), FileError> {
    write_atomic(path, pem.as_bytes(), KEY_FILE_MODE)
}

/// Writes `bytes` to `path` through a temporary file created with `mode` in the same
/// directory, fsyncs it, renames it over `path` and fsyncs the directory. The temporary
/// file is removed if any step fails.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let write_err = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        ))
    })?;
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty());
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(file_name);
    prefix.push(".tmp.");
    let result = (|| {
        // Created with `mode` (less the umask), never chmod-ed: a key is never readable
        // by others, not even briefly.
        let mut tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .permissions(fs::Permissions::from_mode(mode))
            .tempfile_in(parent.unwrap_or(Path::new(".")))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        if let Some(dir) = parent {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(write_err)
}

/// Everything one cluster's components need for mTLS; see the module docs for the
/// directory layout [`write_cluster_bundle`] produces.
#[derive(Debug, Clone)]
pub struct ClusterBundle {
    /// Trusted CA certificates, PEM (may hold several CAs after `connect`).
    pub ca_pem: String,
    /// The server leaf.
    pub server: IssuedCert,
    /// The agents' leaf.
    pub client: IssuedCert,
    /// The store replica's leaf (replica [`BUNDLE_REPLICA_ID`]).
    pub replica: IssuedCert,
}

impl ClusterBundle {
    /// Issues the server, agent and replica leaves of `cluster` from `ca`; the bundle
    /// trusts `ca`, labelled with `cluster`.
    pub fn issue(
        ca: &MeshCa,
        cluster: &str,
        server_names: &ServerNames,
        validity: Validity,
    ) -> Result<Self, IssueError> {
        Ok(Self {
            ca_pem: labelled_ca_pem(ca, cluster),
            server: ca.issue_server(cluster, server_names, validity)?,
            client: ca.issue_agent(cluster, validity)?,
            replica: ca.issue_replica(cluster, BUNDLE_REPLICA_ID, server_names, validity)?,
        })
    }
}

/// `ca`'s certificate as a one-CA trust bundle labelled with `cluster`.
pub fn labelled_ca_pem(ca: &MeshCa, cluster: &str) -> String {
    format!(
        "{} {cluster}\n{}",
        crate::trust_bundle::LABEL_PREFIX,
        ca.cert_pem()
    )
}

/// Writes `bundle` into `dir` (created if missing) with the layout of the module docs.
/// Each key is written just before its certificate; a hot-reloading reader that looks
/// in between sees a mismatched pair, keeps its last good material and retries on its
/// next poll.
pub fn write_cluster_bundle(dir: &Path, bundle: &ClusterBundle) -> Result<BundlePaths, FileError> {
    fs::create_dir_all(dir).map_err(|source| FileError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let paths = BundlePaths::in_dir(dir);
    write_cert(&paths.ca, &bundle.ca_pem)?;
    write_private_key(&paths.server_key, &bundle.server.key_pem)?;
    write_cert(&paths.server_cert, &bundle.server.cert_pem)?;
    write_private_key(&paths.client_key, &bundle.client.key_pem)?;
    write_cert(&paths.client_cert, &bundle.client.cert_pem)?;
    write_private_key(&paths.replica_key, &bundle.replica.key_pem)?;
    write_cert(&paths.replica_cert, &bundle.replica.cert_pem)?;
    Ok(paths)
}

/// Writes an admin bundle (`ca.crt`, `admin.crt`, `admin.key`) into `dir` (created if
/// missing); returns the paths for [`crate::TlsPaths`].
pub fn write_admin_bundle(
    dir: &Path,
    ca_pem: &str,
    admin: &IssuedCert,
) -> Result<TlsPaths, FileError> {
    fs::create_dir_all(dir).map_err(|source| FileError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let paths = TlsPaths::admin(dir);
    write_cert(&paths.ca, ca_pem)?;
    write_private_key(&paths.key, &admin.key_pem)?;
    write_cert(&paths.cert, &admin.cert_pem)?;
    Ok(paths)
}

/// Writes the CA certificate (`ca.crt`, 0644) and key (`ca.key`, 0600) into `dir`.
pub fn write_ca(dir: &Path, ca: &MeshCa) -> Result<(PathBuf, PathBuf), FileError> {
    fs::create_dir_all(dir).map_err(|source| FileError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let cert = dir.join(CA_CERT_FILE);
    let key = dir.join(CA_KEY_FILE);
    write_private_key(&key, &ca.key_pem())?;
    write_cert(&cert, ca.cert_pem())?;
    Ok((cert, key))
}

/// Loads a CA (certificate and key) written by [`write_ca`].
pub fn load_ca(
    dir: &Path,
    trust_domain: crate::identity::TrustDomain,
) -> Result<MeshCa, FileError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert = read_file(&cert_path)?;
    let key = read_file(&key_path)?;
    let utf8 = |path: &Path, bytes: Vec<u8>| {
        String::from_utf8(bytes).map_err(|e| FileError::Pem {
            path: path.to_owned(),
            source: PemError::Malformed(e.to_string()),
        })
    };
    let cert = utf8(&cert_path, cert)?;
    let key = utf8(&key_path, key)?;
    Ok(MeshCa::from_pem(trust_domain, &cert, &key)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn bundle_keys_are_0600_and_certs_0644() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::generate(TrustDomain::new("clustermesh.local").unwrap()).unwrap();
        let bundle = ClusterBundle::issue(
            &ca,
            "east",
            &ServerNames::new(["localhost".to_owned()], []),
            Validity::from_now(crate::issue::DEFAULT_LEAF_VALIDITY),
        )
        .unwrap();
        let paths = write_cluster_bundle(&dir.path().join("east"), &bundle).unwrap();
        assert_eq!(mode(&paths.server_key), 0o600);
        assert_eq!(mode(&paths.client_key), 0o600);
        assert_eq!(mode(&paths.ca), 0o644);
        assert_eq!(mode(&paths.server_cert), 0o644);
        assert_eq!(load_certs(&paths.ca).unwrap().len(), 1);
        load_private_key(&paths.server_key).unwrap();
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("east"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn rewriting_a_key_keeps_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_private_key(&path, "one").unwrap();
        write_private_key(&path, "two").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "two");
    }

    #[test]
    fn corrupt_pem_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.crt");
        fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_certs(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let err = load_private_key(&path).unwrap_err();
        assert!(err.to_string().contains("server.crt"), "{err}");
    }

    #[test]
    fn missing_file_error_names_the_file() {
        let err = load_certs(Path::new("/nonexistent/clustermesh/ca.crt")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/clustermesh/ca.crt"),
            "{err}"
        );
    }

    #[test]
    fn admin_bundle_loads_as_admin_identity() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("clustermesh.local").unwrap();
        let ca = MeshCa::generate(td.clone()).unwrap();
        let admin = ca
            .issue_admin(
                "alice",
                Validity::from_now(crate::issue::DEFAULT_LEAF_VALIDITY),
            )
            .unwrap();
        let paths = write_admin_bundle(dir.path(), ca.cert_pem(), &admin).unwrap();
        assert_eq!(mode(&paths.key), 0o600);
        let tls = crate::MeshTls::load(td, &paths).unwrap();
        assert!(tls.identity().is_admin());
    }

    #[test]
    fn ca_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("clustermesh.local").unwrap();
        let ca = MeshCa::generate(td.clone()).unwrap();
        let (_, key) = write_ca(dir.path(), &ca).unwrap();
        assert_eq!(mode(&key), 0o600);
        let loaded = load_ca(dir.path(), td).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
    }
}
