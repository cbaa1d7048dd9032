//! The executor: applies planned map operations to a [`MapStore`], reverting a service's
//! executed steps when a later one fails.
//!
//! [`MapStore`] is the seam between the pure planner and the kernel: the aya-backed maps
//! implement it for the real datapath, an in-memory store implements it in unit tests (with
//! injectable failures), so "plan, then execute" is checked end to end without privileges.

use std::collections::BTreeMap;

use super::{
    error::{BpfError, Result},
    plan::{MapOp, MapSnapshot, Plan, SlabRead},
};

/// Maps the executor writes to and the planner reads from.
pub(crate) trait MapStore: SlabRead {
    /// Applies one operation. Deleting a missing entry succeeds.
    ///
    /// # Errors
    /// When the map refuses the operation; the entry is left as it was.
    fn apply(&mut self, op: &MapOp) -> Result<()>;

    /// Reads everything a rebuild needs.
    ///
    /// # Errors
    /// When a map cannot be read.
    fn snapshot(&self) -> Result<MapSnapshot>;

    /// The datapath's counters by name.
    ///
    /// # Errors
    /// When the counters cannot be read.
    fn counters(&self) -> Result<BTreeMap<String, u64>>;
}

/// Executes `plan`: its steps all or nothing, then its retire operations best effort.
/// Returns the failures of retire operations (each already logged).
///
/// # Errors
/// The failure of a step, after the executed steps were undone (the old state is in force
/// again); retire operations are not attempted then.
pub(crate) fn execute(store: &mut (impl MapStore + ?Sized), plan: &Plan) -> Result<Vec<BpfError>> {
    for (done, step) in plan.steps.iter().enumerate() {
        if let Err(e) = store.apply(&step.op) {
            for undo in plan.steps[..done]
                .iter()
                .rev()
                .filter_map(|s| s.undo.as_ref())
            {
                if let Err(undo_err) = store.apply(undo) {
                    tracing::error!(
                        service = %plan.service,
                        op = ?undo,
                        error = %undo_err,
                        "failed to revert a map write after a failed update"
                    );
                }
            }
            return Err(e.for_service(&plan.service));
        }
    }
    let mut failures = Vec::new();
    for op in &plan.retire {
        if let Err(e) = store.apply(op) {
            tracing::warn!(service = %plan.service, op = ?op, error = %e, "failed to retire a map entry");
            failures.push(e.for_service(&plan.service));
        }
    }
    Ok(failures)
}
