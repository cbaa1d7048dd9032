//! All-or-nothing updates of several stored things, on one or two clusters.
//!
//! `connect` and `disconnect` change both clusters; `enable` and `disable` change many
//! files of one. If any change fails, the changes already made are undone in reverse
//! order, so every cluster stays as it was: a half-connected pair (A trusts B but B does
//! not know A) would be harder to diagnose than a clean failure. The error says what
//! failed and whether the undo worked (the rollback report).
//!
//! Both targets use the one [`Txn`]; what differs is the kind of [`Change`]:
//! - a file of a state directory, replaced atomically (temporary file + rename) so
//!   readers that reload concurrently see either the old or the new content, and undone
//!   by writing back the bytes and mode it had;
//! - a Secret or ConfigMap in a Kubernetes API server, replaced guarded by the
//!   resourceVersion that was read, and undone by replacing it with the object that was
//!   read, guarded by the resourceVersion our write produced (so a concurrent change by
//!   someone else is not overwritten by the undo).

use std::fmt;
use std::path::{Path, PathBuf};

use clustermesh_certs::files::{write_atomic, CERT_FILE_MODE, KEY_FILE_MODE};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};

use crate::k8s::objects::Objects;
use crate::k8s::KubeModeError;

/// One change of a [`Txn`].
#[derive(Debug)]
pub enum Change<'a> {
    /// Write a file with this mode (its directory is created if needed).
    WriteFile {
        /// The file.
        path: PathBuf,
        /// Its new content.
        contents: Vec<u8>,
        /// Its permission bits.
        mode: u32,
    },
    /// Remove a file (a missing file is fine).
    RemoveFile {
        /// The file.
        path: PathBuf,
    },
    /// Replace a Secret that was read as `old` with `new`.
    ReplaceSecret {
        /// Where it lives.
        objs: &'a Objects<'a>,
        /// As read (the undo writes it back).
        old: Secret,
        /// What to store.
        new: Secret,
    },
    /// Replace a ConfigMap that was read as `old` with `new`.
    ReplaceConfigMap {
        /// Where it lives.
        objs: &'a Objects<'a>,
        /// As read (the undo writes it back).
        old: ConfigMap,
        /// What to store.
        new: ConfigMap,
    },
}

/// How to undo one applied change.
#[derive(Debug)]
enum Undo {
    /// Write back these bytes and mode, or remove the file if it did not exist.
    File(Option<(Vec<u8>, u32)>),
    /// Replace the object with the one read, guarded by this resourceVersion.
    Object(Option<String>),
}

/// Why one change could not be applied.
#[derive(Debug)]
pub enum Failure {
    /// A file could not be written or removed.
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A Kubernetes API request failed.
    Object(Box<KubeModeError>),
}

/// A failed transaction: the change that failed and what happened to the ones before it.
#[derive(Debug)]
pub struct TxnError {
    /// The change that failed.
    pub failure: Failure,
    /// How many changes had been applied before it (all undone unless listed in
    /// `not_undone`).
    pub applied: usize,
    /// The earlier changes whose undo failed, one description each.
    pub not_undone: Vec<String>,
}

impl fmt::Display for TxnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            Failure::File { path, reason } if self.not_undone.is_empty() => write!(
                f,
                "cannot write {}: {reason}; nothing was changed",
                path.display()
            ),
            Failure::File { path, reason } => write!(
                f,
                "cannot write {}: {reason}; undoing the earlier changes failed too ({}); restore the files by hand",
                path.display(),
                self.not_undone.join("; ")
            ),
            Failure::Object(failure) if !self.not_undone.is_empty() => write!(
                f,
                "{failure}; undoing the earlier writes failed for {}: run the same command again once the API servers answer, or `disconnect`",
                self.not_undone.join(", ")
            ),
            Failure::Object(failure) if self.applied == 0 => {
                write!(f, "{failure}; nothing was changed on either cluster")
            }
            Failure::Object(failure) => write!(
                f,
                "{failure}; the {} earlier write(s) were undone, both clusters are as they were",
                self.applied
            ),
        }
    }
}

impl std::error::Error for TxnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.failure {
            Failure::File { .. } => None,
            Failure::Object(e) => Some(e.as_ref()),
        }
    }
}

/// Changes in the order they are to be applied.
impl<'a> FromIterator<Change<'a>> for Txn<'a> {
    fn from_iter<I: IntoIterator<Item = Change<'a>>>(changes: I) -> Self {
        Txn {
            changes: changes.into_iter().collect(),
        }
    }
}

/// A list of changes applied together by [`Txn::commit`].
#[derive(Debug, Default)]
pub struct Txn<'a> {
    changes: Vec<Change<'a>>,
}

impl<'a> Txn<'a> {
    /// An empty transaction.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a change.
    pub fn push(&mut self, change: Change<'a>) {
        self.changes.push(change);
    }

    /// Writes `contents` to a file (mode 0644).
    pub fn write(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.push(Change::WriteFile {
            path: path.into(),
            contents: contents.into(),
            mode: CERT_FILE_MODE,
        });
    }

    /// Writes a secret file (mode 0600).
    pub fn write_secret(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.push(Change::WriteFile {
            path: path.into(),
            contents: contents.into(),
            mode: KEY_FILE_MODE,
        });
    }

    /// Removes a file (missing is fine).
    pub fn remove(&mut self, path: impl Into<PathBuf>) {
        self.push(Change::RemoveFile { path: path.into() });
    }

    /// Number of changes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether there is nothing to do.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Applies every change in order; on the first failure undoes the applied ones in
    /// reverse order. Returns the number of changes applied.
    pub async fn commit(self) -> Result<usize, TxnError> {
        let mut undo: Vec<(&Change<'a>, Undo)> = Vec::new();
        for change in &self.changes {
            match apply(change).await {
                Ok(u) => {
                    tracing::debug!(change = %change.label(), "applied");
                    undo.push((change, u));
                }
                Err(failure) => {
                    let applied = undo.len();
                    let mut not_undone = Vec::new();
                    for (change, u) in undo.into_iter().rev() {
                        if let Err(e) = revert(change, u).await {
                            tracing::warn!(change = %change.label(), error = %e, "undo failed");
                            not_undone.push(e);
                        }
                    }
                    tracing::warn!(applied, "change failed; earlier changes undone");
                    return Err(TxnError {
                        failure,
                        applied,
                        not_undone,
                    });
                }
            }
        }
        Ok(self.changes.len())
    }
}

impl Change<'_> {
    /// What the change touches, for logs.
    fn label(&self) -> String {
        match self {
            Self::WriteFile { path, .. } | Self::RemoveFile { path } => path.display().to_string(),
            Self::ReplaceSecret { objs, old, .. } => format!(
                "Secret {} in context {}",
                old.metadata.name.as_deref().unwrap_or_default(),
                objs.context()
            ),
            Self::ReplaceConfigMap { objs, old, .. } => format!(
                "ConfigMap {} in context {}",
                old.metadata.name.as_deref().unwrap_or_default(),
                objs.context()
            ),
        }
    }
}

/// Applies one change; returns how to undo it.
async fn apply(change: &Change<'_>) -> Result<Undo, Failure> {
    let file_failure = |path: &Path, reason: String| Failure::File {
        path: path.to_path_buf(),
        reason,
    };
    match change {
        Change::WriteFile {
            path,
            contents,
            mode,
        } => {
            let before = snapshot(path);
            ensure_parent(path)
                .and_then(|()| write_atomic(path, contents, *mode).map_err(|e| e.to_string()))
                .map_err(|reason| file_failure(path, reason))?;
            Ok(Undo::File(before))
        }
        Change::RemoveFile { path } => {
            let before = snapshot(path);
            remove_file(path).map_err(|reason| file_failure(path, reason))?;
            Ok(Undo::File(before))
        }
        Change::ReplaceSecret { objs, new, .. } => objs
            .replace("Secret", new)
            .await
            .map(|s| Undo::Object(s.metadata.resource_version))
            .map_err(|e| Failure::Object(Box::new(e))),
        Change::ReplaceConfigMap { objs, new, .. } => objs
            .replace("ConfigMap", new)
            .await
            .map(|c| Undo::Object(c.metadata.resource_version))
            .map_err(|e| Failure::Object(Box::new(e))),
    }
}

/// Undoes one applied change; the error describes what stays changed.
async fn revert(change: &Change<'_>, undo: Undo) -> Result<(), String> {
    match (change, undo) {
        (Change::WriteFile { path, .. } | Change::RemoveFile { path }, Undo::File(before)) => {
            let result = match before {
                Some((bytes, mode)) => write_atomic(path, &bytes, mode).map_err(|e| e.to_string()),
                None => remove_file(path),
            };
            result.map_err(|e| format!("{}: {e}", path.display()))
        }
        (Change::ReplaceSecret { objs, old, .. }, Undo::Object(rv)) => {
            let mut o = old.clone();
            o.metadata.resource_version = rv;
            o.metadata.managed_fields = None;
            objs.replace("Secret", &o)
                .await
                .map(|_| ())
                .map_err(|_| change.label())
        }
        (Change::ReplaceConfigMap { objs, old, .. }, Undo::Object(rv)) => {
            let mut o = old.clone();
            o.metadata.resource_version = rv;
            o.metadata.managed_fields = None;
            objs.replace("ConfigMap", &o)
                .await
                .map(|_| ())
                .map_err(|_| change.label())
        }
        (change, _) => Err(change.label()),
    }
}

fn remove_file(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn ensure_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display())),
        _ => Ok(()),
    }
}

/// A file as it is now: its bytes and mode, or `None` if it does not exist.
fn snapshot(path: &Path) -> Option<(Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    let bytes = std::fs::read(path).ok()?;
    Some((bytes, meta.permissions().mode() & 0o777))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cm-txn-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn commit_applies_every_change() {
        let d = tmp("ok");
        std::fs::write(d.join("gone"), "x").unwrap();
        let mut t = Txn::new();
        t.write(d.join("a/b.txt"), "hello");
        t.write_secret(d.join("k"), "secret");
        t.remove(d.join("gone"));
        assert_eq!(t.commit().await.unwrap(), 3);
        assert_eq!(std::fs::read_to_string(d.join("a/b.txt")).unwrap(), "hello");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.join("k")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!d.join("gone").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_failing_write_restores_earlier_files() {
        let d = tmp("fail");
        std::fs::write(d.join("existing"), "old").unwrap();
        // A regular file where a directory is needed makes the third write fail.
        std::fs::write(d.join("blocker"), "").unwrap();
        let mut t = Txn::new();
        t.write(d.join("existing"), "new");
        t.write(d.join("created"), "new");
        t.write(d.join("blocker/inside"), "never");
        let err = t.commit().await.unwrap_err();
        assert_eq!(err.applied, 2);
        assert!(err.not_undone.is_empty(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot write {}: ",
                d.join("blocker/inside").display()
            )),
            "{msg}"
        );
        assert!(msg.ends_with("; nothing was changed"), "{msg}");
        assert_eq!(std::fs::read_to_string(d.join("existing")).unwrap(), "old");
        assert!(!d.join("created").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_rollback_report_of_an_object_change_says_what_was_undone() {
        let failed = || Failure::Object(Box::new(KubeModeError::Invalid("write refused".into())));
        let err = |applied, not_undone: &[&str]| TxnError {
            failure: failed(),
            applied,
            not_undone: not_undone.iter().map(|s| (*s).to_string()).collect(),
        };
        assert_eq!(
            err(0, &[]).to_string(),
            "write refused; nothing was changed on either cluster"
        );
        assert_eq!(
            err(2, &[]).to_string(),
            "write refused; the 2 earlier write(s) were undone, both clusters are as they were"
        );
        assert_eq!(
            err(2, &["Secret a in context east", "ConfigMap b in context west"]).to_string(),
            "write refused; undoing the earlier writes failed for Secret a in context east, ConfigMap b in context west: run the same command again once the API servers answer, or `disconnect`"
        );
    }

    #[test]
    fn the_rollback_report_of_a_file_change_names_what_to_restore() {
        let err = TxnError {
            failure: Failure::File {
                path: PathBuf::from("/s/tls/ca.crt"),
                reason: "disk full".into(),
            },
            applied: 1,
            not_undone: vec!["/s/agent.yaml: denied".into()],
        };
        assert_eq!(
            err.to_string(),
            "cannot write /s/tls/ca.crt: disk full; undoing the earlier changes failed too (/s/agent.yaml: denied); restore the files by hand"
        );
    }
}
