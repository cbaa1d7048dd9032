//! Planner rules, checked without privileges: plans are executed against in-memory maps
//! and the result is compared with what the desired services say the kernel must hold.
// Tests panic on unexpected results.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use proptest::prelude::*;

use super::*;
use crate::bpf::{
    encode::{port_host, words_addr},
    error::BpfError,
    exec::{execute, MapStore},
    mem_maps::{MemContent, MemMaps},
    state::State,
};
use clustermesh_api::model::{Affinity, Protocol, Tier};

const SLAB: u32 = 4096;

fn id(name: &str) -> ServicePortId {
    ServicePortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: "http".into(),
    }
}

fn backend(host: u8, active: bool, cluster: &str) -> Backend {
    Backend {
        ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, host)),
        port: 8080,
        protocol: Protocol::Tcp,
        cluster: cluster.into(),
        node: String::new(),
        zone: String::new(),
        tier: Tier::Cluster,
        weight: u32::from(active),
        state: if active {
            BackendState::Active
        } else {
            BackendState::Terminating
        },
    }
}

fn frontend(net: u8, host: u8) -> Frontend {
    Frontend {
        ip: IpAddr::V4(Ipv4Addr::new(10, 96, net, host)),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// A service whose table of `m` slots cycles through its active backends.
fn lb(name: &str, frontends: Vec<Frontend>, backends: Vec<Backend>, m: usize) -> DesiredService {
    let active: Vec<u32> = (0..backends.len())
        .filter(|&i| backends[i].state == BackendState::Active)
        .map(|i| u32::try_from(i).unwrap())
        .collect();
    let table: Vec<u32> = if active.is_empty() {
        Vec::new()
    } else {
        (0..m).map(|slot| active[slot % active.len()]).collect()
    };
    DesiredService {
        id: id(name),
        frontends,
        backends,
        table: Arc::from(table),
        active_tier: None,
        affinity: Affinity::None,
        global: false,
        shared: false,
    }
}

/// Plans and executes one upsert, as `State::upsert` does, on a synthetic clock.
fn upsert(
    p: &mut Planner,
    maps: &mut MemMaps,
    svc: &DesiredService,
    now: Instant,
) -> Result<bool, BpfError> {
    let Some(plan) = p.plan_upsert(svc, &*maps, now)? else {
        return Ok(false);
    };
    match execute(maps, &plan.plan) {
        Ok(_) => {
            p.commit(plan);
            Ok(true)
        }
        Err(e) => {
            p.abort(plan);
            Err(e)
        }
    }
}

fn remove(p: &mut Planner, maps: &mut MemMaps, lb_id: &ServicePortId, now: Instant) -> bool {
    match p.plan_remove(lb_id, now) {
        Some(plan) => {
            assert!(execute(maps, &plan).unwrap().is_empty());
            true
        }
        None => false,
    }
}

/// Map content other than the slab (whose free space a failed plan may have written).
fn without_slab(c: &MemContent) -> MemContent {
    MemContent {
        slab: Vec::new(),
        ..c.clone()
    }
}

/// The planner's bookkeeping is self-consistent.
fn check_invariants(p: &Planner) {
    let mut refs: HashMap<u32, u32> = HashMap::new();
    for s in p.services.values() {
        let distinct: HashSet<u32> = s.backend_ids.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            s.backend_ids.len(),
            "backend list is distinct"
        );
        for bid in &s.backend_ids {
            *refs.entry(*bid).or_default() += 1;
            assert!(
                p.backend_by_id.contains_key(bid),
                "referenced backend known"
            );
        }
    }
    for e in p.backends.values() {
        assert_eq!(e.refs, refs.get(&e.id).copied().unwrap_or(0), "refcount");
    }
    assert_eq!(p.backend_by_id.len(), p.backends.len());
    for (bid, identity) in &p.backend_by_id {
        assert_eq!(p.backends[identity].id, *bid);
    }
    let sids: HashSet<u32> = p.services.values().map(|s| s.id).collect();
    assert_eq!(sids.len(), p.services.len(), "service ids unique");
    assert_eq!(
        p.service_ids.in_use(),
        p.services.len() + p.orphan_meta.len()
    );
    assert_eq!(p.backend_ids.in_use(), p.backends.len());
    assert_eq!(p.cluster_ids.in_use(), p.clusters.len());
    let mut regions: Vec<Region> = p
        .services
        .values()
        .map(|s| s.region)
        .chain(p.quarantine.iter().map(|(_, r)| *r))
        .chain(p.orphan_regions.iter().copied())
        .filter(|r| r.len > 0)
        .collect();
    regions.sort();
    for w in regions.windows(2) {
        assert!(w[0].end() <= u64::from(w[1].offset), "overlap: {w:?}");
    }
    let used: u64 = regions.iter().map(|r| u64::from(r.len)).sum();
    assert_eq!(p.slab.used(), used, "slab accounting");
    let owned: usize = p.services.values().map(|s| s.frontends.len()).sum();
    assert_eq!(p.frontend_owner.len(), owned);
    for s in p.services.values() {
        for k in &s.frontends {
            assert_eq!(p.frontend_owner[k], s.id);
        }
    }
}

/// The maps enforce exactly `desired`: every frontend leads to a table of the desired
/// backends, and nothing else is programmed.
fn assert_enforces(c: &MemContent, desired: &BTreeMap<ServicePortId, DesiredService>) {
    let mut keys = BTreeSet::new();
    let mut live = BTreeSet::new();
    for svc in desired.values() {
        for f in &svc.frontends {
            let key = service_key(f);
            keys.insert(key);
            let v = c.services.get(&key).expect("frontend programmed");
            let start = v.table_offset as usize;
            let table = &c.slab[start..start + v.table_size as usize];
            assert_eq!(table.len(), svc.table.len());
            assert_eq!(v.flags == service_flags::REFUSE, svc.table.is_empty());
            for (slot, bid) in table.iter().enumerate() {
                let want = &svc.backends[svc.table[slot] as usize];
                let got = c.backends.get(bid).expect("table names a known backend");
                assert_eq!(words_addr(got.addr, got.family), Some(want.ip));
                assert_eq!(port_host(got.port), want.port);
                assert_eq!(got.state, backend_state::ACTIVE);
            }
            let meta = c.meta.get(&v.service_id).expect("service record");
            let name = &meta.name[..meta.name_len as usize];
            assert_eq!(name, service_name(&svc.id).as_bytes());
            assert_eq!(
                (meta.region_offset, meta.table_size),
                (v.table_offset, v.table_size)
            );
            let list_start = start + meta.table_size as usize;
            let list = &c.slab[list_start..list_start + meta.backend_count as usize];
            let distinct: HashSet<(IpAddr, u16, &str)> = svc
                .backends
                .iter()
                .map(|b| (b.ip, b.port, b.cluster.as_str()))
                .collect();
            assert_eq!(list.len(), distinct.len());
            live.extend(list.iter().copied());
        }
    }
    assert_eq!(c.services.keys().copied().collect::<BTreeSet<_>>(), keys);
    assert_eq!(c.meta.len(), desired.len());
    assert_eq!(c.backends.keys().copied().collect::<BTreeSet<_>>(), live);
}

#[test]
fn a_new_table_is_written_before_the_flip_and_the_old_state_retired_after() {
    let now = Instant::now();
    let mut p = Planner::new(SLAB);
    let mut maps = MemMaps::new(SLAB);
    let first = lb(
        "web",
        vec![frontend(1, 1), frontend(1, 2)],
        vec![backend(1, true, "east"), backend(2, true, "east")],
        7,
    );
    let plan = p.plan_upsert(&first, &maps, now).unwrap().unwrap();
    let kinds: Vec<&str> = plan
        .plan
        .ops()
        .map(|op| match op {
            MapOp::PutCluster { .. } => "cluster",
            MapOp::PutBackend { .. } => "backend",
            MapOp::PutSlab { .. } => "slab",
            MapOp::PutMeta { .. } => "meta",
            MapOp::PutService { .. } => "flip",
            _ => "delete",
        })
        .collect();
    assert_eq!(
        kinds,
        ["cluster", "backend", "backend", "slab", "meta", "flip", "flip"]
    );
    execute(&mut maps, &plan.plan).unwrap();
    p.commit(plan);

    // Replace: one backend and one frontend change.
    let second = lb(
        "web",
        vec![frontend(1, 1), frontend(1, 3)],
        vec![backend(1, true, "east"), backend(3, true, "west")],
        7,
    );
    let plan = p.plan_upsert(&second, &maps, now).unwrap().unwrap();
    let ops: Vec<&MapOp> = plan.plan.ops().collect();
    let last_build = ops
        .iter()
        .rposition(|op| matches!(op, MapOp::PutSlab { .. } | MapOp::PutMeta { .. }))
        .unwrap();
    let first_flip = ops
        .iter()
        .position(|op| matches!(op, MapOp::PutService { .. }))
        .unwrap();
    assert!(last_build < first_flip, "table and record before any flip");
    assert!(plan
        .plan
        .steps
        .iter()
        .all(|s| s.undo.is_some() || matches!(s.op, MapOp::PutSlab { .. })));
    let old_backend = p.services[&id("web")].backend_ids[1];
    assert_eq!(
        plan.plan.retire,
        vec![
            MapOp::DeleteService {
                key: service_key(&frontend(1, 2))
            },
            MapOp::DeleteBackend { id: old_backend },
        ]
    );
    execute(&mut maps, &plan.plan).unwrap();
    p.commit(plan);
    check_invariants(&p);
    assert_enforces(
        &maps.content,
        &BTreeMap::from([(id("web"), second.clone())]),
    );

    // The same state again plans nothing.
    assert!(p.plan_upsert(&second, &maps, now).unwrap().is_none());
}

#[test]
fn a_failed_flip_keeps_the_old_state_and_frees_what_the_plan_took() {
    let now = Instant::now();
    let mut p = Planner::new(SLAB);
    let mut maps = MemMaps::new(SLAB);
    let old = lb(
        "web",
        vec![frontend(1, 1), frontend(1, 2)],
        vec![backend(1, true, "east")],
        7,
    );
    upsert(&mut p, &mut maps, &old, now).unwrap();
    let before = without_slab(&maps.content);
    let used = p.slab.used();

    let new = lb(
        "web",
        vec![frontend(1, 1), frontend(1, 2), frontend(1, 3)],
        vec![backend(2, true, "west"), backend(1, false, "east")],
        11,
    );
    // The second frontend flip fails.
    let flips = |op: &MapOp| matches!(op, MapOp::PutService { key, .. } if *key == service_key(&frontend(1, 2)));
    maps.fail_when = Some(flips);
    let err = upsert(&mut p, &mut maps, &new, now).unwrap_err();
    assert!(matches!(err, BpfError::Map { .. }), "{err}");
    assert!(err.to_string().contains("default/web/http"), "{err}");
    maps.fail_when = None;
    assert_eq!(without_slab(&maps.content), before, "old state restored");
    assert_eq!(p.slab.used(), used, "the new region is free again");
    check_invariants(&p);
    assert_enforces(&maps.content, &BTreeMap::from([(id("web"), old)]));
    assert!(
        !p.clusters.contains_key("west"),
        "the staged cluster is forgotten"
    );

    upsert(&mut p, &mut maps, &new, now).unwrap();
    check_invariants(&p);
    assert_enforces(&maps.content, &BTreeMap::from([(id("web"), new)]));
}

#[test]
fn removal_frees_every_entry_id_and_region() {
    let now = Instant::now();
    let mut p = Planner::new(SLAB);
    let mut maps = MemMaps::new(SLAB);
    let shared = backend(1, true, "east");
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let svc = lb(
            name,
            vec![frontend(u8::try_from(i).unwrap(), 1)],
            vec![
                shared.clone(),
                backend(10 + u8::try_from(i).unwrap(), true, ""),
            ],
            7,
        );
        upsert(&mut p, &mut maps, &svc, now).unwrap();
    }
    assert_eq!(p.backends.len(), 4);
    assert_eq!(p.backends.values().map(|e| e.refs).max(), Some(3));
    for name in ["a", "b", "c"] {
        assert!(remove(&mut p, &mut maps, &id(name), now));
        check_invariants(&p);
    }
    assert!(!remove(&mut p, &mut maps, &id("a"), now));
    assert!(maps.content.services.is_empty());
    assert!(maps.content.backends.is_empty());
    assert!(maps.content.meta.is_empty());
    assert_eq!((p.service_ids.in_use(), p.backend_ids.in_use()), (0, 0));
    p.release_matured(now + REGION_GRACE);
    assert_eq!(p.slab.used(), 0);
}

#[test]
fn a_retired_region_is_reused_only_after_the_grace_period() {
    let t0 = Instant::now();
    // Room for exactly two regions of 7 slots + 1 backend.
    let mut p = Planner::new(16);
    let mut maps = MemMaps::new(16);
    let v1 = lb("web", vec![frontend(1, 1)], vec![backend(1, true, "")], 7);
    let v2 = lb("web", vec![frontend(1, 1)], vec![backend(2, true, "")], 7);
    let v3 = lb("web", vec![frontend(1, 1)], vec![backend(3, true, "")], 7);
    upsert(&mut p, &mut maps, &v1, t0).unwrap();
    upsert(&mut p, &mut maps, &v2, t0).unwrap();
    let err = p.plan_upsert(&v3, &maps, t0).unwrap_err();
    let PlanError::SlabFull { retry_at, .. } = err else {
        panic!("{err}");
    };
    assert_eq!(retry_at, Some(t0 + REGION_GRACE));
    check_invariants(&p);
    assert!(upsert(&mut p, &mut maps, &v3, t0 + REGION_GRACE).unwrap());
    check_invariants(&p);
    assert_enforces(&maps.content, &BTreeMap::from([(id("web"), v3)]));
}

#[test]
fn invalid_services_and_foreign_frontends_are_refused_before_anything_is_allocated() {
    let now = Instant::now();
    let mut p = Planner::new(SLAB);
    let mut maps = MemMaps::new(SLAB);
    upsert(
        &mut p,
        &mut maps,
        &lb("a", vec![frontend(1, 1)], vec![backend(1, true, "")], 7),
        now,
    )
    .unwrap();
    let before = maps.content.clone();
    let cases = [
        lb("b", vec![], vec![backend(2, true, "")], 7),
        lb("b", vec![frontend(1, 1)], vec![backend(2, true, "")], 7),
        DesiredService {
            table: Arc::from(vec![0u32]),
            ..lb("b", vec![frontend(2, 1)], vec![backend(2, false, "")], 0)
        },
        lb(
            "b",
            vec![frontend(2, 1)],
            vec![backend(2, true, &"x".repeat(61))],
            7,
        ),
    ];
    for svc in &cases {
        let err = p.plan_upsert(svc, &maps, now).unwrap_err();
        assert!(matches!(err, PlanError::Invalid { .. }), "{err}");
        check_invariants(&p);
    }
    assert_eq!(maps.content, before);
}

#[test]
fn a_restart_rebuilds_the_same_view_and_rewrites_nothing() {
    let now = Instant::now();
    let mut p = Planner::new(SLAB);
    let mut maps = MemMaps::new(SLAB);
    let services = [
        lb(
            "a",
            vec![frontend(1, 1), frontend(1, 2)],
            vec![backend(1, true, "east"), backend(2, false, "west")],
            7,
        ),
        lb(
            "b",
            vec![frontend(2, 1)],
            vec![backend(1, true, "east")],
            11,
        ),
        lb("c", vec![frontend(3, 1)], vec![], 0),
    ];
    for svc in &services {
        upsert(&mut p, &mut maps, svc, now).unwrap();
    }
    let mut again = Planner::rebuild(&maps.snapshot().unwrap(), &maps);
    assert_eq!(again.services, p.services);
    assert_eq!(again.backends, p.backends);
    assert_eq!(again.clusters, p.clusters);
    check_invariants(&again);
    let log = maps.log.len();
    for svc in &services {
        assert!(!upsert(&mut again, &mut maps, svc, now).unwrap());
    }
    assert_eq!(maps.log.len(), log, "nothing written");
}

#[test]
fn leftovers_of_an_interrupted_run_are_kept_until_cleanup() {
    let now = Instant::now();
    let mut p = Planner::new(SLAB);
    let mut maps = MemMaps::new(SLAB);
    let a = lb("a", vec![frontend(1, 1)], vec![backend(1, true, "")], 7);
    upsert(&mut p, &mut maps, &a, now).unwrap();
    let a_entry = maps.content.services[&service_key(&frontend(1, 1))];
    // A frontend of no known service and an unreadable service record.
    let orphan = service_key(&frontend(9, 9));
    maps.content.services.insert(
        orphan,
        ServiceValue {
            service_id: 4242,
            ..a_entry
        },
    );
    let mut garbage = ServiceMeta {
        name_len: 7,
        ..ServiceMeta::default()
    };
    garbage.name[..7].copy_from_slice(b"garbage");
    maps.content.meta.insert(2, garbage);
    // A backend nobody references.
    maps.content
        .backends
        .insert(77, backend_value(&backend(77, true, ""), 0));

    let mut p = Planner::rebuild(&maps.snapshot().unwrap(), &maps);
    check_invariants(&p);
    assert_eq!((p.service_count(), p.orphan_count()), (1, 2));
    // The garbage record's id is not handed to a new service while the record exists.
    let b = lb("b", vec![frontend(2, 1)], vec![backend(2, true, "")], 7);
    upsert(&mut p, &mut maps, &b, now).unwrap();
    assert_ne!(p.services[&id("b")].id, 2);

    let cleanup = p.plan_cleanup(now);
    execute(&mut maps, &cleanup).unwrap();
    check_invariants(&p);
    assert_enforces(&maps.content, &BTreeMap::from([(id("a"), a), (id("b"), b)]));
}

#[test]
fn state_reconciles_against_in_memory_maps_and_survives_a_restart() {
    let mut st = State::rebuild(MemMaps::new(SLAB)).unwrap();
    let a = lb("a", vec![frontend(1, 1)], vec![backend(1, true, "east")], 7);
    let b = lb("b", vec![frontend(2, 1)], vec![backend(2, true, "west")], 7);
    assert!(st.upsert(&a).unwrap());
    assert!(st.upsert(&b).unwrap());
    assert!(!st.upsert(&a).unwrap());

    // Restart: b is no longer desired.
    let maps = st.maps().clone();
    let mut st = State::rebuild(maps).unwrap();
    assert_eq!(st.service_count(), 2);
    assert!(!st.upsert(&a).unwrap());
    let gc = st.gc(&HashSet::from([id("a")]));
    assert_eq!((gc.removed, gc.failed.len()), (1, 0));
    assert_enforces(&st.maps().content, &BTreeMap::from([(id("a"), a.clone())]));

    // A failing map write: the old state stays, the error names the service.
    let a2 = lb("a", vec![frontend(1, 1)], vec![backend(3, true, "east")], 7);
    st.maps_mut().fail_when = Some(|op| matches!(op, MapOp::PutMeta { .. }));
    assert!(st.upsert(&a2).is_err());
    st.maps_mut().fail_when = None;
    assert_enforces(&st.maps().content, &BTreeMap::from([(id("a"), a)]));
    let dump = st.dump(true).unwrap();
    assert_eq!(dump.services.len(), 1);
    assert_eq!(dump.services[0].name, "default/a/http");
    assert_eq!(dump.backends.len(), 1);
    assert_eq!(dump.backends[0].cluster, "east");
}

// ---------------------------------------------------------------------------------------
// Properties.

/// One step of a random workload.
#[derive(Debug, Clone)]
enum Action {
    /// Programs service `svc` with these backends (host, cluster) and table size.
    Upsert {
        svc: u8,
        alt_vip: bool,
        backends: Vec<(u8, u8)>,
        m: usize,
        /// Fails the plan's step with this index (modulo the step count).
        fail_step: Option<usize>,
    },
    /// Removes service `svc`.
    Remove(u8),
    /// Lets time pass.
    Tick(u64),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        5 => (
            0u8..4,
            any::<bool>(),
            proptest::collection::vec((0u8..6, 0u8..3), 0..5),
            prop::sample::select(vec![0usize, 5, 7, 11]),
            prop::option::weighted(0.3, 0usize..64),
        )
            .prop_map(|(svc, alt_vip, backends, m, fail_step)| Action::Upsert {
                svc,
                alt_vip,
                backends,
                m,
                fail_step,
            }),
        2 => (0u8..4).prop_map(Action::Remove),
        2 => (0u64..30).prop_map(Action::Tick),
    ]
}

/// A service as the control plane builds it: each backend (address and cluster) once, its
/// state a property of the backend (host 6 is terminating), not of the service.
fn build(svc: u8, alt_vip: bool, backends: &[(u8, u8)], m: usize) -> DesiredService {
    let clusters = ["", "east", "west"];
    let mut seen = HashSet::new();
    lb(
        &format!("s{svc}"),
        vec![frontend(svc, if alt_vip { 2 } else { 1 })],
        backends
            .iter()
            .filter(|&&(h, c)| seen.insert((h, c)))
            .map(|&(h, c)| backend(h + 1, h != 5, clusters[c as usize]))
            .collect(),
        m,
    )
}

proptest! {
    /// Any sequence of upserts (some failing part-way), removals and pauses keeps the
    /// bookkeeping consistent (refcounts, distinct ids, disjoint regions), leaves the maps
    /// enforcing exactly the services that were programmed successfully, restores the old
    /// state of a service whose update failed, survives a rebuild, and removing everything
    /// frees everything.
    #[test]
    fn plans_keep_the_maps_equal_to_the_programmed_services(
        actions in proptest::collection::vec(action(), 1..60)
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        // Small enough that updates run into a full slab now and then.
        let capacity = 96;
        let mut p = Planner::new(capacity);
        let mut maps = MemMaps::new(capacity);
        let mut desired: BTreeMap<ServicePortId, DesiredService> = BTreeMap::new();
        for a in actions {
            match a {
                Action::Upsert { svc, alt_vip, backends, m, fail_step } => {
                    let s = build(svc, alt_vip, &backends, m);
                    let before = without_slab(&maps.content);
                    let planned = match p.plan_upsert(&s, &maps, now) {
                        Ok(planned) => planned,
                        Err(e) => {
                            prop_assert!(matches!(e, PlanError::SlabFull { .. }), "{}", e);
                            None
                        }
                    };
                    if let Some(plan) = planned {
                        let steps = plan.plan.steps.len();
                        maps.fail_after = fail_step.filter(|_| steps > 0).map(|k| k % steps);
                        let result = execute(&mut maps, &plan.plan);
                        maps.fail_after = None;
                        match result {
                            Ok(retire_failures) => {
                                prop_assert!(retire_failures.is_empty());
                                p.commit(plan);
                                desired.insert(s.id.clone(), s);
                            }
                            Err(_) => {
                                p.abort(plan);
                                prop_assert_eq!(without_slab(&maps.content), before);
                            }
                        }
                    }
                }
                Action::Remove(svc) => {
                    let lb_id = id(&format!("s{svc}"));
                    prop_assert_eq!(remove(&mut p, &mut maps, &lb_id, now), desired.remove(&lb_id).is_some());
                }
                Action::Tick(ms) => now += Duration::from_millis(ms),
            }
            check_invariants(&p);
            assert_enforces(&maps.content, &desired);
        }
        let rebuilt = Planner::rebuild(&maps.snapshot().unwrap(), &maps);
        prop_assert_eq!(&rebuilt.services, &p.services);
        prop_assert_eq!(&rebuilt.backends, &p.backends);
        for lb_id in desired.keys() {
            prop_assert!(remove(&mut p, &mut maps, lb_id, now));
        }
        p.release_matured(now + REGION_GRACE);
        check_invariants(&p);
        prop_assert_eq!(p.slab.used(), 0);
        prop_assert!(maps.content.services.is_empty() && maps.content.backends.is_empty() && maps.content.meta.is_empty());
    }
}
