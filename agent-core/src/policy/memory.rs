//! An in-memory [`PolicyDatapath`] that answers verdicts the way the eBPF programs do:
//! the reference the control plane is tested against without privileges.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use clustermesh_api::cidr::Cidr;

use super::datapath::{
    Direction, EndpointRules, IpCacheValue, PolicyCounters, PolicyDatapath, PolicyDatapathError,
    PolicyOwner, RuleKey,
};

/// Reserved `world` identity: what an address without an IP cache entry is.
const WORLD: u32 = 2;

/// What the datapath decides for one connection or flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The socket's cgroup belongs to no endpoint, or the endpoint is not isolated in
    /// that direction.
    NotEnforced,
    /// The peer's cluster is still syncing.
    Syncing,
    /// A rule admits it.
    Allowed,
    /// No rule admits it.
    Denied,
}

#[derive(Debug, Default)]
struct State {
    ipcache: BTreeMap<Cidr, IpCacheValue>,
    owners: BTreeMap<u64, (PolicyOwner, EndpointRules)>,
    cgroups: BTreeMap<u64, u64>,
    installs: u64,
    fail_next: usize,
}

/// In-memory policy datapath; clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemPolicyDatapath {
    state: Arc<Mutex<State>>,
}

impl MemPolicyDatapath {
    /// An empty datapath.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next `n` installs fail (and leave the previous rules in force).
    pub fn fail_installs(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Installs done so far.
    #[must_use]
    pub fn installs(&self) -> u64 {
        self.lock().installs
    }

    /// The IP cache's longest-prefix answer for `ip`.
    #[must_use]
    pub fn lookup(&self, ip: IpAddr) -> Option<IpCacheValue> {
        self.lock()
            .ipcache
            .iter()
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.prefix_len())
            .map(|(_, v)| *v)
    }

    /// The IP cache content.
    #[must_use]
    pub fn ipcache(&self) -> BTreeMap<Cidr, IpCacheValue> {
        self.lock().ipcache.clone()
    }

    /// Owners installed.
    #[must_use]
    pub fn owners(&self) -> BTreeSet<u64> {
        self.lock().owners.keys().copied().collect()
    }

    /// The verdict for a socket in `cgroup` talking to `peer` on `protocol`/`port`
    /// (destination port on egress, the endpoint's own port on ingress).
    #[must_use]
    pub fn verdict(
        &self,
        cgroup: u64,
        direction: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Verdict {
        let peer_value = self.lookup(peer);
        let st = self.lock();
        let Some(owner) = st.cgroups.get(&cgroup) else {
            return Verdict::NotEnforced;
        };
        let Some((_, rules)) = st.owners.get(owner) else {
            return Verdict::NotEnforced;
        };
        let set = match direction {
            Direction::Ingress => &rules.ingress,
            Direction::Egress => &rules.egress,
        };
        let Some(set) = set else {
            return Verdict::NotEnforced;
        };
        if peer_value.is_some_and(|v| v.syncing) {
            return Verdict::Syncing;
        }
        let identity = peer_value.map_or(WORLD, |v| v.identity);
        let admits = |r: &RuleKey| {
            (r.identity == identity || r.identity == 0)
                && (r.protocol == 0
                    || (r.protocol == protocol && {
                        let mask = if r.port_bits == 0 {
                            0
                        } else {
                            u16::MAX << (16 - r.port_bits)
                        };
                        port & mask == r.port
                    }))
        };
        if set.iter().any(admits) {
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }
}

impl PolicyDatapath for MemPolicyDatapath {
    fn apply_ipcache(
        &mut self,
        changes: &[(Cidr, Option<IpCacheValue>)],
    ) -> Result<(), PolicyDatapathError> {
        let mut st = self.lock();
        for (c, v) in changes {
            match v {
                Some(v) => st.ipcache.insert(*c, *v),
                None => st.ipcache.remove(c),
            };
        }
        Ok(())
    }

    fn reconcile_ipcache(
        &mut self,
        entries: &[(Cidr, IpCacheValue)],
    ) -> Result<(), PolicyDatapathError> {
        self.lock().ipcache = entries.iter().copied().collect();
        Ok(())
    }

    fn install(
        &mut self,
        owner: &PolicyOwner,
        rules: &EndpointRules,
    ) -> Result<(), PolicyDatapathError> {
        let mut st = self.lock();
        if st.fail_next > 0 {
            st.fail_next -= 1;
            return Err(PolicyDatapathError {
                map: "memory".into(),
                operation: format!("install owner {}", owner.owner),
                detail: "injected failure".into(),
            });
        }
        st.installs += 1;
        if let Some((old, _)) = st.owners.get(&owner.owner).cloned() {
            for c in &old.cgroups {
                st.cgroups.remove(c);
            }
        }
        for c in &owner.cgroups {
            st.cgroups.insert(*c, owner.owner);
        }
        st.owners
            .insert(owner.owner, (owner.clone(), rules.clone()));
        Ok(())
    }

    fn remove(&mut self, owner: &PolicyOwner) -> Result<(), PolicyDatapathError> {
        let mut st = self.lock();
        if let Some((old, _)) = st.owners.remove(&owner.owner) {
            for c in &old.cgroups {
                st.cgroups.remove(c);
            }
        }
        Ok(())
    }

    fn reconcile_owners(&mut self, live: &[PolicyOwner]) -> Result<(), PolicyDatapathError> {
        let keep: BTreeSet<u64> = live.iter().map(|o| o.owner).collect();
        let mut st = self.lock();
        let gone: Vec<u64> = st
            .owners
            .keys()
            .filter(|o| !keep.contains(o))
            .copied()
            .collect();
        for o in gone {
            if let Some((old, _)) = st.owners.remove(&o) {
                for c in &old.cgroups {
                    st.cgroups.remove(c);
                }
            }
        }
        Ok(())
    }

    fn counters(&self) -> Result<PolicyCounters, PolicyDatapathError> {
        Ok(PolicyCounters::default())
    }
}
