//! Finding and removing everything a harness run created, including runs whose process
//! died without unwinding (SIGKILL, abort): each run leaves a marker naming its owner
//! process, and all its resources carry the run id in their names.

use std::path::{Path, PathBuf};

use crate::{cgroup, cmd, Result};

/// Directory holding one marker per live run.
pub const MARKER_DIR: &str = "/run/clustermesh-netns";
/// Prefix of every namespace the harness creates.
pub const NETNS_PREFIX: &str = "cmh-";
/// bpffs directory under which each run's agents pin their maps.
pub const BPF_DIR: &str = "/sys/fs/bpf";

/// Namespace-name prefix of a run.
#[must_use]
pub fn netns_prefix(run: &str) -> String {
    format!("{NETNS_PREFIX}{run}-")
}

/// cgroup directory of a run.
pub fn cgroup_dir(run: &str) -> Result<PathBuf> {
    Ok(cgroup::cgroup2_root()?.join(format!("clustermesh-netns-{run}")))
}

/// Pinned-map directory of a run (each node's agent pins under a subdirectory).
#[must_use]
pub fn bpf_dir(run: &str) -> PathBuf {
    Path::new(BPF_DIR).join(format!("clustermesh-netns-{run}"))
}

/// Scratch directory of a run (state directories, raft data), removed with the run.
#[must_use]
pub fn state_dir(run: &str) -> PathBuf {
    Path::new(MARKER_DIR).join(format!("{run}.d"))
}

/// Identifies a process across pid reuse: (pid, start time in clock ticks).
fn process_identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), counted after the parenthesized command name.
    let after = &stat[stat.rfind(')')? + 2..];
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Writes the marker for `run`, owned by the current process.
pub fn write_marker(run: &str) -> Result<()> {
    let dir = Path::new(MARKER_DIR);
    std::fs::create_dir_all(dir).map_err(|source| crate::Error::Io {
        action: "create marker dir",
        path: dir.to_path_buf(),
        source,
    })?;
    let id = process_identity(std::process::id()).unwrap_or_default();
    let path = dir.join(run);
    std::fs::write(&path, id).map_err(|source| crate::Error::Io {
        action: "write marker",
        path,
        source,
    })
}

/// Names of all network namespaces starting with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    cmd::ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Kills every process in the namespace, then deletes it (its veths go with it).
pub fn delete_namespace(ns: &str) {
    if let Ok(pids) = cmd::ip(&["netns", "pids", ns]) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if let Err(e) = cmd::ip(&["netns", "delete", ns]) {
        tracing::warn!(netns = ns, error = %e, "could not delete network namespace");
    }
}

/// Removes every resource of `run`: processes, namespaces, cgroups, pinned maps, marker.
/// Returns the problems it could not fix (empty when everything is gone).
pub fn cleanup_run(run: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if let Ok(dir) = cgroup_dir(run) {
        if let Err(e) = cgroup::destroy(&dir) {
            problems.push(e.to_string());
        }
    }
    for ns in namespaces_with_prefix(&netns_prefix(run)) {
        delete_namespace(&ns);
    }
    let left = namespaces_with_prefix(&netns_prefix(run));
    if !left.is_empty() {
        problems.push(format!("namespaces left: {left:?}"));
    }
    let pins = bpf_dir(run);
    if pins.exists() {
        // Removing a pin file unpins the map; the kernel frees it once unused.
        if let Err(e) = std::fs::remove_dir_all(&pins) {
            problems.push(format!("remove {}: {e}", pins.display()));
        }
    }
    let scratch = state_dir(run);
    if scratch.exists() {
        if let Err(e) = std::fs::remove_dir_all(&scratch) {
            problems.push(format!("remove {}: {e}", scratch.display()));
        }
    }
    let _ = std::fs::remove_file(Path::new(MARKER_DIR).join(run));
    problems
}

/// Cleans up every run whose owner process is gone. Returns the runs removed.
pub fn sweep_stale() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(MARKER_DIR) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
    {
        let run = entry.file_name().to_string_lossy().into_owned();
        let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let alive = owner
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .and_then(process_identity)
            .is_some_and(|id| id == owner.trim());
        if !alive {
            tracing::info!(run = %run, "removing resources of a harness run whose process is gone");
            for p in cleanup_run(&run) {
                tracing::warn!(run = %run, problem = %p, "stale cleanup incomplete");
            }
            removed.push(run);
        }
    }
    removed
}

/// Removes every harness resource on the machine, live runs included (for `cleanup --all`).
pub fn cleanup_everything() -> Vec<String> {
    let mut problems = Vec::new();
    let mut runs: Vec<String> = std::fs::read_dir(MARKER_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .trim_end_matches(".d")
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    if let Ok(root) = cgroup::cgroup2_root() {
        if let Ok(d) = std::fs::read_dir(root) {
            runs.extend(d.filter_map(|e| e.ok()).filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix("clustermesh-netns-")
                    .map(str::to_string)
            }));
        }
    }
    runs.sort();
    runs.dedup();
    for run in runs {
        problems.extend(cleanup_run(&run));
    }
    for ns in namespaces_with_prefix(NETNS_PREFIX) {
        delete_namespace(&ns);
    }
    problems
}
