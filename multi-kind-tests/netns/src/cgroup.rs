//! Per-node cgroups (v2): clients of a simulated node run in its cgroup so that the node's
//! agent can attach socket-level load balancing to exactly that node's processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Finds the cgroup2 mount point from `/proc/self/mounts` (e.g. `/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|source| Error::Io {
        action: "read",
        path: "/proc/self/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mountpoint, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
        })
        .next()
        .ok_or(Error::NoCgroup2)
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a cgroup directory (and its parents).
pub fn create(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io("create cgroup", path))
}

/// Moves the calling process into the cgroup at `path`.
pub fn join(path: &Path) -> Result<()> {
    let procs = path.join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(io("join cgroup", &procs))
}

/// The pids currently in the cgroup (not its descendants).
pub fn pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process in the cgroup tree and removes it, deepest first. Missing paths
/// are fine (cleanup is idempotent).
pub fn destroy(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io("list cgroup", path))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    children.sort();
    for child in children {
        destroy(&child)?;
    }
    // cgroup.kill (Linux >= 5.14) kills the whole subtree atomically; fall back to
    // signalling each pid on older kernels.
    if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
        for pid in pids(path) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    // A cgroup can only be removed once its processes have exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(io("remove cgroup", path)(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
