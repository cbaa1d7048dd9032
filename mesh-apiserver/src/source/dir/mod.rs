//! The `dir:PATH` source: a directory of Kubernetes YAML manifests, polled for changes.
//!
//! Standalone hosts and the network-namespace test harness have no Kubernetes API; they
//! describe a cluster with the same manifests `kubectl` would read (multi-document YAML,
//! `---` separated, `kind: List` accepted). The directory is scanned every poll interval
//! (recursively; names starting with `.` are skipped, which also skips the `..data`
//! indirection of a mounted ConfigMap and the temporary file of a write-then-rename); a
//! changed file is re-parsed and, after any change, the full set of objects per kind is
//! sent as [`SourceEvent::Replace`]. The kinds read are `v1` Services, Nodes, Pods and
//! Namespaces, `discovery.k8s.io/v1` EndpointSlices, `networking.k8s.io/v1`
//! NetworkPolicies and `cilium.io/v2` CiliumNetworkPolicies; documents of other kinds are
//! ignored. A policy's spec is kept as written, so a policy that does not validate is
//! reported by name when it is translated rather than refusing its whole file.
//!
//! A half-written edit never makes services disappear:
//! - **Edit by write-then-rename** (write `.name.yaml.tmp`, then rename it over
//!   `name.yaml`): the change is applied at the next poll. A file that is new since the
//!   previous poll is applied at once too.
//! - **A file written in place** (same inode) is held, its last applied objects kept,
//!   until it has settled: unchanged for the settle time ([`DEFAULT_SETTLE_TIME`]), or
//!   modified longer ago than that and losing none of the file's objects. A file cut
//!   short while being written is therefore never applied before the writer has been
//!   quiet for the settle time. At start-up every file counts as written in place. See
//!   [`settle`] for the rule.
//! - **A file that fails to parse** is skipped as a whole with a warning naming the file
//!   and the line, and the objects it held at its last good parse are kept.
//! - **A file over a limit** ([`MAX_FILE_SIZE`] per file, [`MAX_DOCUMENT_SIZE`] per
//!   document, [`MAX_NESTING_DEPTH`] levels of nesting) is skipped before it is parsed,
//!   with a warning naming the file and the limit, its last good objects kept. Both count
//!   in the `rejected_inputs` metric (`reason="manifest"` and `reason="manifest_limit"`).
//!
//! Reading and parsing run on a blocking thread, never on the async runtime.

mod limits;
mod parse;
mod scan;
mod settle;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use limits::{LimitExceeded, MAX_DOCUMENT_SIZE, MAX_FILE_SIZE, MAX_NESTING_DEPTH};
pub use parse::{parse_manifests, ManifestError};
pub use settle::DEFAULT_SETTLE_TIME;

use super::{Source, SourceError, SourceEvent};
use crate::metrics::Metrics;
use scan::Scanner;

/// Default time between two scans.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the directory source.
#[derive(Debug, thiserror::Error)]
pub enum DirSourceError {
    /// The directory cannot be read at start-up.
    #[error("cannot read source directory {path}: {source}; check --source dir:PATH")]
    Unreadable {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The thread scanning the directory failed.
    #[error("scanning source directory {path} failed")]
    Scan {
        /// The directory.
        path: PathBuf,
        /// Why the scanning task ended.
        source: tokio::task::JoinError,
    },
}

/// The directory source. See the module docs. A clone scans the same directory from
/// scratch when run.
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
    poll_interval: Duration,
    settle_time: Duration,
    metrics: Option<Arc<Metrics>>,
}

impl DirSource {
    /// A source reading `root`, scanning every [`DEFAULT_POLL_INTERVAL`], holding
    /// in-place writes for [`DEFAULT_SETTLE_TIME`].
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirSource {
            root: root.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            settle_time: DEFAULT_SETTLE_TIME,
            metrics: None,
        }
    }

    /// Scans every `interval` instead.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Holds a file written in place until it has not changed for `settle` instead.
    #[must_use]
    pub fn with_settle_time(mut self, settle: Duration) -> Self {
        self.settle_time = settle;
        self
    }

    /// Counts rejected files in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

#[async_trait::async_trait]
impl Source for DirSource {
    async fn run(
        self: Box<Self>,
        events: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        std::fs::read_dir(&self.root).map_err(|source| DirSourceError::Unreadable {
            path: self.root.clone(),
            source,
        })?;
        let mut scanner = Scanner::new(self.root.clone(), self.settle_time, self.metrics);
        // Nothing is sent before every file read at start-up has settled: a first
        // `Replace` without a held file's objects would delete them from the store.
        let mut sent_first = false;
        loop {
            let scan = tokio::task::spawn_blocking(move || {
                let outcome = scanner.scan();
                let send = outcome.changed && sent_first || !sent_first && !outcome.holding;
                let replace = send.then(|| scanner.replace_events());
                (scanner, replace)
            });
            let replace;
            (scanner, replace) = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                joined = scan => joined.map_err(|source| DirSourceError::Scan {
                    path: self.root.clone(),
                    source,
                })?,
            };
            if let Some(replace) = replace {
                sent_first = true;
                for event in replace {
                    if events.send(event).await.is_err() {
                        return Ok(());
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }
}
