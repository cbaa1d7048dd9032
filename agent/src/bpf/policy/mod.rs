//! The kernel side of NetworkPolicy: [`BpfPolicy`] implements the control plane's
//! [`PolicyDatapath`] contract on the pinned policy maps of the eBPF datapath.
//!
//! The programs (see `ebpf/programs/src/policy.rs`) decide egress in the `connect`/
//! `sendmsg` hooks after service translation and ingress in a `cgroup_skb/ingress`
//! program, from four maps: the IP cache (LPM, v4 and v6), the enforced cgroups with their
//! owner and active generation, the rules (one LPM trie keyed by owner, generation,
//! direction, peer identity, protocol and port) and per-CPU counters.
//!
//! What to write is decided by a pure planner (`plan`, over the `ops::Index` of what the
//! kernel holds) and run by `store::execute` on a `PolicyStore`: the aya maps here, in-memory
//! maps in unit tests. The maps are pinned, so verdicts stay while the agent restarts; a
//! new [`BpfPolicy`] rebuilds its index from the maps and flips generations relative to
//! what the kernel holds.

mod aya_store;
mod engine;
mod events;
mod keys;
#[cfg(test)]
mod mem_store;
mod ops;
mod plan;
mod store;

use std::{os::fd::AsFd as _, path::Path};

use aya::maps::{MapData, RingBuf};
use clustermesh_agent_core::policy::datapath::{
    EndpointRules, IpCacheValue, PolicyCounters, PolicyDatapath, PolicyDatapathError, PolicyOwner,
};
use clustermesh_api::cidr::Cidr;
use clustermesh_ebpf_common::map_names;

pub use events::DeniedFlow;

use super::error::Result;
use aya_store::{open_pinned, AyaPolicyMaps};
use engine::PolicyEngine;

/// The eBPF implementation of [`PolicyDatapath`], on the maps pinned by
/// [`super::BpfDatapath::open`] (obtain it with [`super::BpfDatapath::policy`]).
///
/// Keep one per agent: each instance mirrors the kernel's owners in memory, and two
/// writers would not see each other's updates.
pub struct BpfPolicy {
    engine: PolicyEngine<AyaPolicyMaps>,
    events: RingBuf<MapData>,
}

impl std::fmt::Debug for BpfPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfPolicy")
            .field("owners", &self.engine.owner_count())
            .finish_non_exhaustive()
    }
}

impl BpfPolicy {
    /// Opens the policy maps pinned in `pin_dir` and reads the owners and rules they hold.
    ///
    /// # Errors
    /// A map is missing (the datapath was not opened with this pin directory) or cannot
    /// be read.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let maps = AyaPolicyMaps::open(pin_dir)?;
        let events = open_pinned(pin_dir, map_names::POL_EVENTS)?;
        let engine = PolicyEngine::rebuild(maps).map_err(super::BpfError::PolicyState)?;
        tracing::info!(
            pin_dir = %pin_dir.display(),
            owners = engine.owner_count(),
            "eBPF policy datapath ready"
        );
        Ok(Self { engine, events })
    }

    /// Takes up to `max` denied flows from the kernel's ring buffer and logs each at
    /// debug level with both identities. Call it periodically (or when
    /// [`Self::denied_flows_fd`] is readable).
    pub fn drain_denied_flows(&mut self, max: usize) -> Vec<DeniedFlow> {
        let mut flows = Vec::new();
        while flows.len() < max {
            let Some(item) = self.events.next() else {
                break;
            };
            match events::decode(&item) {
                Some(flow) => {
                    tracing::debug!(
                        direction = ?flow.direction,
                        owner = flow.owner,
                        identity = flow.owner_identity,
                        peer = %flow.peer,
                        peer_identity = flow.peer_identity,
                        protocol = flow.protocol,
                        port = flow.port,
                        "policy denied a flow"
                    );
                    flows.push(flow);
                }
                None => tracing::warn!(len = item.len(), "ignored a malformed denied-flow record"),
            }
        }
        flows
    }

    /// The ring buffer's descriptor, readable (epoll) when denied flows are waiting.
    #[must_use]
    pub fn denied_flows_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.as_fd()
    }
}

impl PolicyDatapath for BpfPolicy {
    fn apply_ipcache(
        &mut self,
        changes: &[(Cidr, Option<IpCacheValue>)],
    ) -> Result<(), PolicyDatapathError> {
        self.engine.apply_ipcache(changes)
    }

    fn reconcile_ipcache(
        &mut self,
        entries: &[(Cidr, IpCacheValue)],
    ) -> Result<(), PolicyDatapathError> {
        self.engine.reconcile_ipcache(entries)
    }

    fn install(
        &mut self,
        owner: &PolicyOwner,
        rules: &EndpointRules,
    ) -> Result<(), PolicyDatapathError> {
        self.engine.install(owner, rules)
    }

    fn remove(&mut self, owner: &PolicyOwner) -> Result<(), PolicyDatapathError> {
        self.engine.remove(owner)
    }

    fn reconcile_owners(&mut self, live: &[PolicyOwner]) -> Result<(), PolicyDatapathError> {
        self.engine.reconcile_owners(live)
    }

    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError> {
        self.engine.counters()
    }

    fn drain_denied(&mut self) -> usize {
        // Each drained flow is logged at debug level with both identities.
        self.drain_denied_flows(4096).len()
    }
}
