//! The seam between the planner and the kernel: [`PolicyStore`] is implemented by the
//! pinned maps (`aya_store`) and by in-memory maps in unit tests (`mem_store`), and
//! [`execute`] runs a plan on either, undoing its executed steps when one fails.

use clustermesh_agent_core::policy::datapath::{PolicyCounters, PolicyDatapathError};
use clustermesh_ebpf_common::{IpCacheEntry, PolicyOwnerEntry};

use super::{
    keys::{IpKey, RuleEntry},
    ops::{Index, Plan, PolicyOp},
};

/// The policy maps, as the planner and executor see them.
pub(crate) trait PolicyStore {
    /// Applies one operation; deleting a missing entry succeeds.
    ///
    /// # Errors
    /// The map refused the operation (the entry is as it was).
    fn apply(&mut self, op: &PolicyOp) -> Result<(), PolicyDatapathError>;

    /// Every enforced cgroup and its entry.
    ///
    /// # Errors
    /// The map cannot be listed.
    fn read_owners(&self) -> Result<Vec<(u64, PolicyOwnerEntry)>, PolicyDatapathError>;

    /// Every rule (canonical keys).
    ///
    /// # Errors
    /// The map cannot be listed.
    fn read_rules(&self) -> Result<Vec<RuleEntry>, PolicyDatapathError>;

    /// Every IP cache prefix of both families (canonical keys).
    ///
    /// # Errors
    /// A map cannot be listed.
    fn read_ipcache(&self) -> Result<Vec<(IpKey, IpCacheEntry)>, PolicyDatapathError>;

    /// The verdict counters summed over CPUs.
    ///
    /// # Errors
    /// The counter map cannot be read.
    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError>;
}

/// Runs `plan`: its steps all or nothing (each success recorded in `index`), then its
/// retire operations best effort. Returns the retire failures (logged; what they failed
/// to delete stays in the index, so the next update of the owner deletes it).
///
/// # Errors
/// The failing step, after the executed steps were undone.
pub(crate) fn execute(
    store: &mut (impl PolicyStore + ?Sized),
    index: &mut Index,
    plan: &Plan,
) -> Result<Vec<PolicyDatapathError>, PolicyDatapathError> {
    for (done, step) in plan.steps.iter().enumerate() {
        if let Err(e) = store.apply(&step.op) {
            for undo in plan.steps[..done]
                .iter()
                .rev()
                .filter_map(|s| s.undo.as_ref())
            {
                match store.apply(undo) {
                    Ok(()) => index.apply(undo),
                    Err(undo_err) => tracing::error!(
                        op = ?undo,
                        error = %undo_err,
                        "failed to revert a policy map write after a failed update"
                    ),
                }
            }
            return Err(e);
        }
        index.apply(&step.op);
    }
    let mut failures = Vec::new();
    for op in &plan.retire {
        match store.apply(op) {
            Ok(()) => index.apply(op),
            Err(e) => {
                tracing::warn!(op = ?op, error = %e, "failed to retire a policy map entry");
                failures.push(e);
            }
        }
    }
    Ok(failures)
}
