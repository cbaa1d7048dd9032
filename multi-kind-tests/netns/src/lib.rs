//! The network-namespace two-cluster harness.
//!
//! This machine (and CI) has no Kubernetes and no Docker, so the multi-cluster scenarios run
//! on a topology made of Linux network namespaces: every simulated node is a namespace
//! with an address on a shared "fabric" bridge, every pod is a namespace behind its node's
//! bridge, and each node routes to every other node's pod subnet, across clusters too.
//! Nothing has a default route, so no packet can leave the machine. Each node also gets a
//! cgroup (v2) in which its clients run, so a per-node agent can attach socket-level load
//! balancing to exactly that node.
//!
//! Everything a [`Harness`] creates (namespaces, cgroups, pinned-map directories,
//! processes) is removed when it is dropped, also while unwinding from a failed assertion;
//! resources of a harness whose process died without unwinding are removed by
//! [`cleanup::sweep_stale`] at the next start (or `clustermesh-netns cleanup`).

pub mod cgroup;
pub mod cleanup;
mod cmd;
pub mod echo;
pub mod harness;
pub mod mesh;
pub mod policy;
pub mod scenario;
pub mod topology;

pub use harness::{Client, Harness};
pub use topology::{ClusterSpec, NodeSpec, PodSpec, TopologySpec};

/// Errors from building, using or tearing down the topology.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An external command could not be started.
    #[error("cannot run `{command}`: {source}; is iproute2 installed (bash scripts/setup)?")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: std::io::Error,
    },
    /// An external command failed.
    #[error("`{command}` failed with status {status}: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: i32,
        /// Its standard error.
        stderr: String,
    },
    /// A file-system operation (cgroups, bpffs, markers) failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No cgroup v2 hierarchy is mounted.
    #[error("no cgroup2 file system is mounted; mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NoCgroup2,
    /// The topology description is invalid.
    #[error("invalid topology: {0}")]
    Topology(String),
    /// A request through the topology failed.
    #[error("request from {from} to {to} failed: {reason}")]
    Request {
        /// Where the client ran.
        from: String,
        /// The destination.
        to: String,
        /// What went wrong.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether this process can build the topology (root with `ip netns` and cgroup2).
/// Returns the reason when it cannot.
pub fn privileges_missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_string());
    }
    if cmd::ip(&["netns", "list"]).is_err() {
        return Some("`ip netns` is not usable (install iproute2: bash scripts/setup)".to_string());
    }
    if cgroup::cgroup2_root().is_err() {
        return Some("no cgroup2 hierarchy mounted".to_string());
    }
    None
}
