//! Exclusive ownership of a replica's data directory.
//!
//! Two replicas appending to the same segmented log (or writing the same snapshot file)
//! interleave their records and corrupt both. Before a replica touches its data
//! directory it takes an exclusive advisory lock (`flock(2)` through
//! [`std::fs::File::try_lock`]) on a `LOCK` file inside it. `flock` locks belong to the
//! open file description, so a second opener conflicts whether it is another process or
//! another replica in the same process. The lock goes away when the handle is dropped,
//! including when the holding process dies, so a crashed apiserver never leaves a stale
//! lock behind.
//!
//! The holder writes its pid into the file so a refused opener can name it; the pid is
//! informational only, the lock is the `flock`.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::StoreError;

/// Name of the lock file inside a data directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// The held lock on one data directory; released on drop.
#[derive(Debug)]
pub(crate) struct DirLock {
    dir: PathBuf,
    // Closing the file releases the flock.
    _file: File,
}

impl DirLock {
    /// Creates `dir` if needed and takes its lock, or fails with
    /// [`StoreError::DataDirInUse`] at once if another opener holds it.
    pub(crate) fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        fs::create_dir_all(dir)?;
        let path = dir.join(LOCK_FILE);
        // No truncation on open: the pid in it belongs to the holder until we hold the lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::DataDirInUse {
                    dir: dir.display().to_string(),
                    pid: read_pid(&mut file),
                })
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::Io(e)),
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        tracing::debug!(dir = %dir.display(), "raft data directory locked");
        Ok(DirLock {
            dir: dir.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        tracing::debug!(dir = %self.dir.display(), "raft data directory unlocked");
    }
}

/// The holder's pid from the lock file, if it wrote one that parses.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holder_pid_until_the_first_drops() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("raft");
        let first = DirLock::acquire(&data).unwrap();
        match DirLock::acquire(&data) {
            Err(StoreError::DataDirInUse { dir, pid }) => {
                assert_eq!(dir, data.display().to_string());
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected DataDirInUse, got {other:?}"),
        }
        drop(first);
        let again = DirLock::acquire(&data).unwrap();
        drop(again);
    }

    #[test]
    fn garbage_in_the_lock_file_is_not_a_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DirLock::acquire(dir.path()).unwrap();
        fs::write(dir.path().join(LOCK_FILE), "not a pid").unwrap();
        match DirLock::acquire(dir.path()) {
            Err(StoreError::DataDirInUse { pid, .. }) => assert_eq!(pid, None),
            other => panic!("expected DataDirInUse, got {other:?}"),
        }
    }
}
