//! Fixtures shared by clustermesh's integration tests and benchmarks.
//!
//! This crate exists so the test scaffolding lives in one dev-only place instead of being
//! copied into every crate's `tests/` directory or shipped in the crates' public API. It is
//! only ever a `[dev-dependencies]` entry (`publish = false`). Heavy fixtures are behind
//! features (see `Cargo.toml`) so a crate's test binary links only what it uses.
//!
//! - [`certs`]: a throwaway mesh CA, leaf certificates and raw rustls configs.
//! - [`prerequisites`]: skip-or-fail for missing tools and privileges, and the lock that
//!   keeps heavy privileged scenarios from overlapping.
//! - [`init_tracing`]: logs of the code under test in the test's captured output.
//! - `etcd` (feature `etcd`): a real etcd process on loopback ports.
//! - `mesh` (feature `mesh`): in-process mesh API servers for two (or more) clusters and
//!   the PKI and config files an agent needs to watch them.
//! - `fake_kube` (feature `fake-kube`): an in-memory Kubernetes API server.
//! - `sockets` (feature `sockets`): TCP sinks and timed raw connects for the datapath
//!   benchmarks.
//! - `limits` (feature `limits`): raising the open-file limit for benchmarks that hold
//!   thousands of connections.
//!
//! Setup failures panic: in a test harness a failed setup step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "fake-kube")]
pub mod fake_kube;
#[cfg(feature = "limits")]
pub mod limits;
#[cfg(feature = "mesh")]
pub mod mesh;
pub mod prerequisites;
#[cfg(feature = "sockets")]
pub mod sockets;

/// Routes `tracing` output of the code under test to the test's captured output. The
/// first call in a process installs the subscriber; later calls keep it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}
