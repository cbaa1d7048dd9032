//! All-or-nothing updates of several files, possibly in two state directories.
//!
//! `connect` and `disconnect` change both clusters' files. If any write fails, the files
//! already written are put back, so both sides stay as they were: a half-connected pair
//! (A trusts B but B doesn't know A) would be harder to diagnose than a clean failure.
//! Each single file is replaced atomically (temporary file + rename), so readers that
//! reload concurrently see either the old or the new content.

use std::path::{Path, PathBuf};

use clustermesh_certs::files::{write_atomic, CERT_FILE_MODE, KEY_FILE_MODE};

/// A failed transaction.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A write failed and every earlier write was undone.
    #[error("cannot write {path}: {reason}; nothing was changed")]
    RolledBack {
        /// The file that could not be written.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A write failed and undoing an earlier one failed too.
    #[error("cannot write {path}: {reason}; undoing the earlier changes failed too ({undo}); restore the files by hand")]
    Partial {
        /// The file that could not be written.
        path: PathBuf,
        /// Why.
        reason: String,
        /// What could not be undone.
        undo: String,
    },
}

/// A file as it was before a change: its bytes and mode, or `None` if it did not exist.
type Undo = (PathBuf, Option<(Vec<u8>, u32)>);

#[derive(Debug)]
enum Change {
    Write { contents: Vec<u8>, mode: u32 },
    Remove,
}

/// A set of file changes applied together by [`FileTxn::commit`].
#[derive(Debug, Default)]
pub struct FileTxn {
    changes: Vec<(PathBuf, Change)>,
}

impl FileTxn {
    /// An empty transaction.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `contents` (mode 0644).
    pub fn write(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.changes.push((
            path.into(),
            Change::Write {
                contents: contents.into(),
                mode: CERT_FILE_MODE,
            },
        ));
    }

    /// Writes a secret (mode 0600).
    pub fn write_secret(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) {
        self.changes.push((
            path.into(),
            Change::Write {
                contents: contents.into(),
                mode: KEY_FILE_MODE,
            },
        ));
    }

    /// Removes a file (missing is fine).
    pub fn remove(&mut self, path: impl Into<PathBuf>) {
        self.changes.push((path.into(), Change::Remove));
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
    /// reverse order.
    pub fn commit(self) -> Result<(), TxnError> {
        let mut undo: Vec<Undo> = Vec::new();
        for (path, change) in &self.changes {
            let before = snapshot(path);
            let result = match change {
                Change::Write { contents, mode } => ensure_parent(path)
                    .and_then(|()| write_atomic(path, contents, *mode).map_err(|e| e.to_string())),
                Change::Remove => match std::fs::remove_file(path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
            };
            match result {
                Ok(()) => undo.push((path.clone(), before)),
                Err(reason) => {
                    let failures = rollback(undo);
                    tracing::warn!(path = %path.display(), %reason, "file update failed; earlier changes undone");
                    return Err(if failures.is_empty() {
                        TxnError::RolledBack {
                            path: path.clone(),
                            reason,
                        }
                    } else {
                        TxnError::Partial {
                            path: path.clone(),
                            reason,
                            undo: failures.join("; "),
                        }
                    });
                }
            }
        }
        Ok(())
    }
}

fn ensure_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display())),
        _ => Ok(()),
    }
}

fn snapshot(path: &Path) -> Option<(Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    let bytes = std::fs::read(path).ok()?;
    Some((bytes, meta.permissions().mode() & 0o777))
}

fn rollback(undo: Vec<Undo>) -> Vec<String> {
    let mut failures = Vec::new();
    for (path, before) in undo.into_iter().rev() {
        let result = match before {
            Some((bytes, mode)) => write_atomic(&path, &bytes, mode).map_err(|e| e.to_string()),
            None => std::fs::remove_file(&path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e.to_string())
                }
            }),
        };
        if let Err(e) = result {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    failures
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

    #[test]
    fn commit_applies_every_change() {
        let d = tmp("ok");
        std::fs::write(d.join("gone"), "x").unwrap();
        let mut t = FileTxn::new();
        t.write(d.join("a/b.txt"), "hello");
        t.write_secret(d.join("k"), "secret");
        t.remove(d.join("gone"));
        t.commit().unwrap();
        assert_eq!(std::fs::read_to_string(d.join("a/b.txt")).unwrap(), "hello");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.join("k")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!d.join("gone").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failing_write_restores_earlier_files() {
        let d = tmp("fail");
        std::fs::write(d.join("existing"), "old").unwrap();
        // A regular file where a directory is needed makes the third write fail.
        std::fs::write(d.join("blocker"), "").unwrap();
        let mut t = FileTxn::new();
        t.write(d.join("existing"), "new");
        t.write(d.join("created"), "new");
        t.write(d.join("blocker/inside"), "never");
        let err = t.commit().unwrap_err();
        assert!(matches!(err, TxnError::RolledBack { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(d.join("existing")).unwrap(), "old");
        assert!(!d.join("created").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
