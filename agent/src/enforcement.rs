//! The agent's policy task: feeds the policy plane with what the cluster watchers
//! deliver and flushes it to the policy datapath, and finds pods' cgroups by their UID.
//!
//! Like the service reconciler, nothing is written before every configured cluster has
//! synced once (or the initial-sync timeout passed): a restarted agent leaves the pinned
//! verdicts of its predecessor in force until it knows the whole mesh, then reconciles.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clustermesh_agent_core::metrics::Metrics;
use clustermesh_agent_core::policy::plane::{CgroupResolver, PlaneUpdate, PolicyPlane};
use clustermesh_agent_core::policy::{PolicyCounters, PolicyDatapath};
use clustermesh_agent_core::watcher::StatusBoard;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often pending work (unresolved cgroups, failed writes) is retried and the
/// datapath's verdict counters are read into the metrics.
const TICK: Duration = Duration::from_millis(500);

/// The policy plane and its datapath, shared with the admin API.
#[derive(Clone)]
pub struct Enforcement {
    plane: Arc<Mutex<PolicyPlane>>,
    datapath: Arc<Mutex<Box<dyn PolicyDatapath>>>,
}

impl std::fmt::Debug for Enforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcement").finish_non_exhaustive()
    }
}

impl Enforcement {
    /// Wraps a plane and its datapath.
    #[must_use]
    pub fn new(plane: PolicyPlane, datapath: Box<dyn PolicyDatapath>) -> Self {
        Self {
            plane: Arc::new(Mutex::new(plane)),
            datapath: Arc::new(Mutex::new(datapath)),
        }
    }

    /// The plane (for the admin API).
    pub fn plane(&self) -> MutexGuard<'_, PolicyPlane> {
        self.plane
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn datapath(&self) -> MutexGuard<'_, Box<dyn PolicyDatapath>> {
        self.datapath
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs the denied flows the datapath reported since the last call.
    pub fn drain_denied(&self) -> usize {
        self.datapath().drain_denied()
    }

    /// The datapath's verdict counters.
    ///
    /// # Errors
    /// The counters cannot be read.
    pub fn counters(
        &self,
    ) -> Result<PolicyCounters, clustermesh_agent_core::policy::PolicyDatapathError> {
        self.datapath().counters()
    }
}

/// Runs the policy task until `cancel` or until `rx` closes.
pub async fn run(
    enforcement: Enforcement,
    mut rx: mpsc::Receiver<PlaneUpdate>,
    board: StatusBoard,
    initial_sync_deadline: tokio::time::Instant,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut gate_open = false;
    let mut pending = true;
    let mut last_counters = PolicyCounters::default();
    // Clusters with an IP cache size reported: one that leaves (disconnected, stale) is
    // reported as 0 rather than keeping its last size.
    let mut sized: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut updates = Vec::new();
        tokio::select! {
            () = cancel.cancelled() => return,
            u = rx.recv() => match u {
                Some(u) => updates.push(u),
                None => return,
            },
            _ = tick.tick() => {
                record_counters(&enforcement, &metrics, &mut last_counters);
                enforcement.drain_denied();
                if !pending && gate_open {
                    continue;
                }
            }
        }
        while let Ok(u) = rx.try_recv() {
            updates.push(u);
        }
        // The gate opens once every listed cluster's full state has reached the plane
        // (the board saying "synced" is not enough: the watcher marks it before its
        // `Replace` has travelled through the service loop to here, and flushing in
        // between would reconcile the pinned IP cache without that cluster's pods), or at
        // the initial-sync deadline.
        let listed: Option<Vec<String>> =
            (!gate_open).then(|| board.snapshot().into_iter().map(|c| c.name).collect());
        let deadline_passed = tokio::time::Instant::now() >= initial_sync_deadline;
        let e = enforcement.clone();
        let m = Arc::clone(&metrics);
        let round = tokio::task::spawn_blocking(move || {
            let mut plane = e.plane();
            for u in updates {
                plane.apply(u);
            }
            let flush = match &listed {
                None => true,
                Some(names) => {
                    let all_synced =
                        !names.is_empty() && names.iter().all(|n| plane.ipcache().is_synced(n));
                    if all_synced || deadline_passed {
                        tracing::info!(all_synced, "initial sync done; programming policy");
                    }
                    all_synced || deadline_passed
                }
            };
            let counters = plane.counters();
            m.policy_refusals(counters.policies_refused, counters.records_refused);
            let sizes: Vec<(String, usize)> = plane
                .ipcache()
                .sizes()
                .into_iter()
                .map(|(c, n)| (c.to_string(), n))
                .collect();
            if !flush {
                return (true, sizes, false);
            }
            let report = plane.flush(e.datapath().as_mut());
            for f in &report.failures {
                tracing::warn!(error = %f, "policy datapath write failed; retrying");
            }
            m.policy_datapath_errors(report.failures.len());
            if report.installed + report.removed > 0 || report.ipcache_changes > 0 {
                tracing::debug!(
                    installed = report.installed,
                    removed = report.removed,
                    ipcache_changes = report.ipcache_changes,
                    unresolved = report.unresolved,
                    "policy datapath updated"
                );
            }
            (
                !report.failures.is_empty() || report.unresolved > 0,
                sizes,
                true,
            )
        })
        .await;
        match round {
            Ok((p, sizes, flushed)) => {
                pending = p;
                gate_open |= flushed;
                let now: BTreeSet<String> = sizes.iter().map(|(c, _)| c.clone()).collect();
                for gone in sized.difference(&now) {
                    metrics.ipcache_entries(gone, 0);
                }
                for (cluster, n) in &sizes {
                    metrics.ipcache_entries(cluster, *n);
                }
                sized = now;
            }
            Err(e) => {
                tracing::error!(error = %e, "policy computation panicked; the agent cannot enforce policy");
                return;
            }
        }
    }
}

fn record_counters(e: &Enforcement, metrics: &Metrics, last: &mut PolicyCounters) {
    let Ok(now) = e.counters() else {
        return;
    };
    let d = |n: u64, o: u64| n.saturating_sub(o);
    metrics.policy_verdicts(
        "egress",
        "allowed",
        d(now.egress_allowed, last.egress_allowed),
    );
    metrics.policy_verdicts("egress", "denied", d(now.egress_denied, last.egress_denied));
    metrics.policy_verdicts(
        "ingress",
        "allowed",
        d(now.ingress_allowed, last.ingress_allowed),
    );
    metrics.policy_verdicts(
        "ingress",
        "denied",
        d(now.ingress_denied, last.ingress_denied),
    );
    metrics.policy_verdicts("any", "syncing", d(now.syncing_passed, last.syncing_passed));
    metrics.policy_verdicts("ingress", "reply", d(now.reply_passed, last.reply_passed));
    *last = now;
}

/// Finds pod cgroups under a cgroup v2 directory by pod UID, as the kubelet names them:
/// `pod<uid>` (cgroupfs driver) or `...-pod<uid with '_' for '-'>.slice` (systemd driver).
/// A pod's cgroups are its pod cgroup and every cgroup below it (its containers); a
/// cgroup's ID is the inode number of its directory.
#[derive(Debug)]
pub struct CgroupTree {
    root: PathBuf,
    index: HashMap<String, PathBuf>,
    scanned: Option<Instant>,
}

/// Least time between two scans of the tree for a UID not found.
const RESCAN: Duration = Duration::from_millis(200);
/// Deepest directory level scanned below the root.
const MAX_DEPTH: usize = 8;

impl CgroupTree {
    /// Looks for pods below `root`.
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            index: HashMap::new(),
            scanned: None,
        }
    }

    fn scan(&mut self) {
        self.index.clear();
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if let Some(uid) = pod_uid_of(&name) {
                    self.index.insert(uid, entry.path());
                    continue;
                }
                if depth < MAX_DEPTH {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
        self.scanned = Some(Instant::now());
    }
}

/// The pod UID a kubelet cgroup directory name carries, normalised to the API's form.
fn pod_uid_of(name: &str) -> Option<String> {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let at = name.rfind("pod")?;
    let uid = &name[at + 3..];
    let uid = uid.replace('_', "-");
    let valid = uid.len() >= 8 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

fn cgroup_ids(path: &Path) -> Option<Vec<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = vec![std::fs::metadata(path).ok()?.ino()];
    let mut stack = vec![(path.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(m) = entry.metadata() {
                    ids.push(m.ino());
                }
                if depth < MAX_DEPTH {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
    }
    Some(ids)
}

impl CgroupResolver for CgroupTree {
    fn resolve(&mut self, pod_uid: &str) -> Option<Vec<u64>> {
        let uid = pod_uid.to_ascii_lowercase();
        if let Some(path) = self.index.get(&uid) {
            if let Some(ids) = cgroup_ids(path) {
                return Some(ids);
            }
        }
        if self.scanned.is_none_or(|t| t.elapsed() >= RESCAN) {
            self.scan();
            if let Some(path) = self.index.get(&uid) {
                return cgroup_ids(path);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_cgroup_names_yield_the_pod_uid() {
        let uid = "0f3c2a1e-8b7d-4c6e-9a5b-1d2e3f4a5b6c";
        assert_eq!(pod_uid_of(&format!("pod{uid}")).as_deref(), Some(uid));
        assert_eq!(
            pod_uid_of(&format!(
                "kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ))
            .as_deref(),
            Some(uid)
        );
        assert_eq!(pod_uid_of("kubepods.slice"), None);
        assert_eq!(pod_uid_of("system.slice"), None);
    }

    #[test]
    fn a_pod_is_found_with_its_container_cgroups() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let uid = "11111111-2222-3333-4444-555555555555";
        let pod = dir
            .path()
            .join("kubepods/burstable")
            .join(format!("pod{uid}"));
        std::fs::create_dir_all(pod.join("c1")).unwrap();
        let mut tree = CgroupTree::new(dir.path());
        let ids = tree.resolve(uid).unwrap();
        assert_eq!(ids[0], std::fs::metadata(&pod).unwrap().ino());
        assert_eq!(ids.len(), 2);
        assert_eq!(tree.resolve("99999999-0000-0000-0000-000000000000"), None);
    }
}
