//! The datapath's programmed state: the planner's mirror joined with the maps it
//! describes, and the one place where plans are executed.
//!
//! [`State`] plans every change with [`Planner`] and applies it with [`execute`]; it is
//! generic over the [`MapStore`] so the whole sequence runs against in-memory maps in unit
//! tests and against the pinned kernel maps in the agent.

use std::{collections::HashSet, time::Instant};

use clustermesh_agent_core::datapath::DesiredService;
use clustermesh_api::admin::BpfDump;
use clustermesh_api::model::ServicePortId;

use super::{
    error::{BpfError, Result},
    exec::{execute, MapStore},
    plan::{PlanError, Planner},
};

/// What [`State::gc`] did.
#[derive(Debug, Default)]
pub(crate) struct GcOutcome {
    /// Services removed because they are no longer desired.
    pub(crate) removed: usize,
    /// Services whose removal failed, with why.
    pub(crate) failed: Vec<(ServicePortId, BpfError)>,
}

/// The planner and the maps it plans for.
#[derive(Debug)]
pub(crate) struct State<M> {
    planner: Planner,
    maps: M,
}

impl<M: MapStore> State<M> {
    /// Rebuilds the planner from what `maps` hold. Nothing is written.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub(crate) fn rebuild(maps: M) -> Result<Self> {
        let snapshot = maps.snapshot()?;
        let planner = Planner::rebuild(&snapshot, &maps);
        tracing::info!(
            services = planner.service_count(),
            backends = planner.backend_count(),
            slab_used = planner.slab_used(),
            orphans = planner.orphan_count(),
            "rebuilt datapath state from pinned maps"
        );
        Ok(Self { planner, maps })
    }

    /// Number of services programmed.
    pub(crate) fn service_count(&self) -> usize {
        self.planner.service_count()
    }

    /// The maps.
    #[cfg(test)]
    pub(crate) fn maps(&self) -> &M {
        &self.maps
    }

    /// The maps, for tests that inject failures.
    #[cfg(test)]
    pub(crate) fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Programs one service (create or replace). Returns false when nothing changed.
    ///
    /// # Errors
    /// The service cannot be programmed; its previous state, if any, stays in force.
    pub(crate) fn upsert(&mut self, svc: &DesiredService) -> Result<bool> {
        let planned = match self.planner.plan_upsert(svc, &self.maps, Instant::now()) {
            Err(PlanError::SlabFull {
                retry_at: Some(at), ..
            }) => {
                // Retired regions free up within the grace period: wait for them once.
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                self.planner.plan_upsert(svc, &self.maps, Instant::now())
            }
            other => other,
        };
        let Some(plan) = planned.map_err(BpfError::from)? else {
            return Ok(false);
        };
        match execute(&mut self.maps, &plan.plan) {
            Ok(_) => {
                tracing::debug!(service = %plan.plan.service, "programmed service");
                self.planner.commit(plan);
                Ok(true)
            }
            Err(e) => {
                self.planner.abort(plan);
                Err(e)
            }
        }
    }

    /// Removes a service. Returns false if it was not programmed.
    ///
    /// # Errors
    /// The first map deletion that failed; the service is forgotten anyway (what is left
    /// in the maps is unreachable).
    pub(crate) fn remove(&mut self, id: &ServicePortId) -> Result<bool> {
        let Some(plan) = self.planner.plan_remove(id, Instant::now()) else {
            return Ok(false);
        };
        let failures = execute(&mut self.maps, &plan)?;
        tracing::debug!(service = %plan.service, "removed service");
        failures.into_iter().next().map_or(Ok(true), Err)
    }

    /// After a full reconcile: removes services not in `keep`, entries left by an
    /// interrupted run, and backends no service references.
    pub(crate) fn gc(&mut self, keep: &HashSet<ServicePortId>) -> GcOutcome {
        let mut outcome = GcOutcome::default();
        for id in self.planner.stale_services(keep) {
            match self.remove(&id) {
                Ok(_) => outcome.removed += 1,
                Err(e) => outcome.failed.push((id, e)),
            }
        }
        let cleanup = self.planner.plan_cleanup(Instant::now());
        // Failures are logged by the executor; a leftover nothing refers to is harmless.
        if let Err(e) = execute(&mut self.maps, &cleanup) {
            tracing::warn!(error = %e, "failed to clean up leftovers of an earlier run");
        }
        outcome
    }

    /// Snapshot for `bpf lb list` (pin directory and cgroup left empty).
    ///
    /// # Errors
    /// When the counters cannot be read.
    pub(crate) fn dump(&self, include_tables: bool) -> Result<BpfDump> {
        let counters = self.maps.counters()?;
        Ok(self.planner.listing(&self.maps, include_tables, counters))
    }
}
