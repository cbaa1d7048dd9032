//! Small files a replica replaces whole (the vote, the log's purge point, the snapshot),
//! and the directory fsync that makes creating, renaming or removing a file durable.
//!
//! Each such file holds exactly one framed record ([`super::record`]), so a torn or
//! damaged file is detected on open instead of being half-read.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::record::{self, ScanEnd};
use crate::StoreError;

/// Mode a replaced file is created with before the umask applies (what `File::create`
/// uses), so files keep the mode they had before atomic writes went through `tempfile`.
const NEW_FILE_MODE: u32 = 0o666;

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same
/// directory (created with mode 0666 less the umask, as `File::create` would), fsynced,
/// renamed over `path`, then the directory fsynced so the rename survives a crash.
/// The temporary file is removed if any step fails.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut prefix = OsString::from(".");
    if let Some(name) = path.file_name() {
        prefix.push(name);
        prefix.push(".");
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(NEW_FILE_MODE))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Fsyncs a directory so a created, renamed or removed entry in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a file holding exactly one framed record; `Ok(None)` if the file is absent.
pub(crate) fn read_single_record<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (recs, end) = record::scan(&bytes);
    match (recs.as_slice(), end) {
        ([(_, payload)], ScanEnd::Clean) => record::decode(payload).map(Some).map_err(|e| {
            corrupt(
                path,
                format!("cannot decode contents: {e}; restore the file from a backup or remove this replica's data directory and re-add it to the cluster"),
            )
        }),
        _ => {
            let what = match end {
                ScanEnd::Corrupt { offset, reason } => format!("{reason} at offset {offset}"),
                ScanEnd::Torn { offset } => format!("file is cut short at offset {offset}"),
                ScanEnd::Clean => format!("{} records where one was expected", recs.len()),
            };
            Err(corrupt(
                path,
                format!("{what}; restore the file from a backup or remove this replica's data directory and re-add it to the cluster"),
            ))
        }
    }
}

/// A [`StoreError::Corrupt`] naming `path`.
pub(crate) fn corrupt(path: &Path, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("vote")]);
    }

    #[test]
    fn single_record_files_round_trip_and_absent_files_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        assert!(read_single_record::<u64>(&path).unwrap().is_none());
        let payload = record::encode(&42u64).unwrap();
        write_atomic(&path, &record::frame(&payload)).unwrap();
        assert_eq!(read_single_record::<u64>(&path).unwrap(), Some(42));
        fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            read_single_record::<u64>(&path),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
