//! Property tests for the weighted Maglev builder (Eisenbud et al., NSDI 2016, §3.4),
//! checking the guarantees the datapath relies on.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use clustermesh_agent_core::maglev::{auto_table_size, BackendKey, Maglev, TableSize, WeightedKey};
use proptest::prelude::*;

const CLUSTERS: [&str; 3] = ["east", "west", "north"];

/// Distinct backends (address, port, cluster) with weights.
#[derive(Debug, Clone)]
struct Input {
    backends: Vec<(IpAddr, u16, usize, u32)>,
}

impl Input {
    fn keys(&self) -> Vec<WeightedKey<'static>> {
        self.backends
            .iter()
            .map(|&(ip, port, c, weight)| WeightedKey {
                key: BackendKey {
                    ip,
                    port,
                    cluster: CLUSTERS[c],
                },
                weight,
            })
            .collect()
    }
}

fn input(max_n: usize, max_weight: u32) -> impl Strategy<Value = Input> {
    prop::collection::btree_set((any::<u32>(), any::<bool>(), 0usize..3), 1..=max_n).prop_flat_map(
        move |set: BTreeSet<(u32, bool, usize)>| {
            let n = set.len();
            prop::collection::vec(1..=max_weight, n).prop_map(move |weights| Input {
                backends: set
                    .iter()
                    .zip(weights)
                    .map(|(&(a, v6, c), w)| {
                        let ip = if v6 {
                            IpAddr::V6(Ipv6Addr::from(u128::from(a) | (0xfd00 << 112)))
                        } else {
                            IpAddr::V4(Ipv4Addr::from(a))
                        };
                        (ip, 8080, c, w)
                    })
                    .collect(),
            })
        },
    )
}

/// Disruption of single removals: removes up to `victims` backends, one at a time from the
/// full set, keeping M fixed. For each removal, "moved" is the number of slots owned by a
/// remaining backend before that have a different owner after, over the number of slots
/// the remaining backends owned before. Returns (mean, worst single removal, M).
fn disruption(
    inp: &Input,
    equal: bool,
    m: Option<u32>,
    victims: usize,
) -> Result<(f64, f64, u32), TestCaseError> {
    let fail = |e: clustermesh_agent_core::maglev::MaglevError| TestCaseError::fail(e.to_string());
    let mut keys = inp.keys();
    if equal {
        keys.iter_mut().for_each(|k| k.weight = 1);
    }
    let n = keys.len();
    let m = m.unwrap_or_else(|| auto_table_size(n));
    let maglev = Maglev::new(99).with_table_size(TableSize::Fixed(m));
    let before = owners(&keys, &maglev.build_keys(&keys).map_err(fail)?);
    let victims: Vec<usize> = (0..n).step_by(n.div_ceil(victims)).collect();
    let mut sum = 0.0;
    let mut worst: f64 = 0.0;
    for &v in &victims {
        let mut rest = keys.clone();
        let removed = rest.remove(v).key;
        let after = owners(&rest, &maglev.build_keys(&rest).map_err(fail)?);
        let others = before.iter().filter(|&&k| k != removed).count();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != removed && b != a)
            .count();
        let f = moved as f64 / others as f64;
        sum += f;
        worst = worst.max(f);
    }
    Ok((sum / victims.len() as f64, worst, m))
}

/// Owner key of every slot (independent of how the input was ordered).
fn owners<'a>(keys: &[WeightedKey<'a>], table: &[u32]) -> Vec<BackendKey<'a>> {
    table.iter().map(|&i| keys[i as usize].key).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_slot_is_filled_by_a_weighted_backend(inp in input(60, 10), zero in any::<prop::sample::Index>()) {
        let mut keys = inp.keys();
        let z = zero.index(keys.len());
        keys[z].weight = 0;
        let table = Maglev::new(7).build_keys(&keys).unwrap();
        if keys.len() == 1 {
            prop_assert!(table.is_empty());
        } else {
            prop_assert_eq!(table.len() as u32, auto_table_size(keys.len() - 1));
            prop_assert!(table.iter().all(|&i| (i as usize) < keys.len() && i as usize != z));
        }
    }

    /// Share tolerance, absolute reading: |slots_i/M − w_i/W| ≤ 0.01 for every backend,
    /// for every automatically chosen M, equal or mixed weights.
    #[test]
    fn slot_shares_are_within_one_percentage_point_of_weights(
        inp in input(60, 20),
        equal in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut keys = inp.keys();
        if equal {
            keys.iter_mut().for_each(|k| k.weight = 1);
        }
        let table = Maglev::new(seed).build_keys(&keys).unwrap();
        let m = table.len() as f64;
        prop_assert_eq!(table.len() as u32, auto_table_size(keys.len()));
        let total: f64 = keys.iter().map(|k| f64::from(k.weight)).sum();
        let mut counts = vec![0u32; keys.len()];
        for &i in &table {
            counts[i as usize] += 1;
        }
        for (k, &c) in keys.iter().zip(&counts) {
            let (share, want) = (f64::from(c) / m, f64::from(k.weight) / total);
            prop_assert!((share - want).abs() <= 0.01, "share {} want {} (m={})", share, want, m);
        }
    }

    /// Automatically sized tables with more than 20 backends (M ≥ 4093): no single removal
    /// moves more than 1 % of the other backends' slots.
    #[test]
    fn removing_a_backend_moves_at_most_one_percent_of_the_others(
        inp in input(60, 20).prop_filter("more than 20 backends", |i| i.backends.len() > 20),
        equal in any::<bool>(),
    ) {
        let (_, worst, m) = disruption(&inp, equal, None, 6)?;
        prop_assert!(worst <= 0.01, "worst {} (m={})", worst, m);
    }

    /// Large fixed tables: the same bound for up to 100 backends at M = 16381.
    #[test]
    fn removing_a_backend_moves_at_most_one_percent_of_the_others_in_large_tables(
        inp in input(100, 20).prop_filter("need two backends", |i| i.backends.len() >= 2),
        equal in any::<bool>(),
    ) {
        let (_, worst, m) = disruption(&inp, equal, Some(16381), 4)?;
        prop_assert!(worst <= 0.01, "worst {} (m={})", worst, m);
    }

    /// 11 to 20 backends (M = 2039): removals move on average far less than 1 %, but the
    /// share band (±20 slots) is narrow enough that an occasional single removal moves a
    /// little more (measured up to 1.4 %; see BENCHMARKS.md). Bound what is measured.
    #[test]
    fn removing_a_backend_moves_about_one_percent_of_the_others_at_m_2039(
        inp in input(20, 20).prop_filter("11 to 20 backends", |i| i.backends.len() > 10),
        equal in any::<bool>(),
    ) {
        let (mean, worst, m) = disruption(&inp, equal, None, 6)?;
        prop_assert!(mean <= 0.01, "mean {} (m={})", mean, m);
        prop_assert!(worst <= MID_WORST, "worst {} (m={})", worst, m);
    }

    /// 2 to 10 backends (M = 251, 509 or 1021): the share band is only ±2.5 to ±10 slots
    /// and does not leave room for 1 % per removal (see BENCHMARKS.md). Bound what is
    /// measured.
    #[test]
    fn removing_one_of_few_backends_moves_few_of_the_others(
        inp in input(10, 20).prop_filter("need two backends", |i| i.backends.len() >= 2),
        equal in any::<bool>(),
    ) {
        let (mean, worst, m) = disruption(&inp, equal, None, 10)?;
        prop_assert!(mean <= SMALL_MEAN, "mean {} (m={})", mean, m);
        prop_assert!(worst <= SMALL_WORST, "worst {} (m={})", worst, m);
    }

    #[test]
    fn input_order_does_not_change_the_table(inp in input(60, 5), perm_seed in any::<u64>()) {
        let keys = inp.keys();
        let mut shuffled = keys.clone();
        // Deterministic Fisher-Yates driven by the generated seed.
        let mut s = perm_seed | 1;
        for i in (1..shuffled.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let maglev = Maglev::new(3);
        let a = owners(&keys, &maglev.build_keys(&keys).unwrap());
        let b = owners(&shuffled, &maglev.build_keys(&shuffled).unwrap());
        prop_assert_eq!(a, b);
    }
}

/// The share band also holds for the large automatic sizes the proptests above do not reach
/// (M = 16381 … 131071), with weights up to the annotation's maximum of 256.
#[test]
fn slot_shares_are_within_one_percentage_point_in_large_tables() {
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for n in [100u32, 200, 400, 700, 1300] {
        let keys: Vec<WeightedKey<'static>> = (0..n)
            .map(|i| WeightedKey {
                key: BackendKey {
                    ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
                    port: 8080,
                    cluster: CLUSTERS[(i % 3) as usize],
                },
                weight: 1 + (next() % 256) as u32,
            })
            .collect();
        let table = Maglev::new(next()).build_keys(&keys).unwrap();
        assert_eq!(table.len() as u32, auto_table_size(n as usize));
        let m = table.len() as f64;
        let total: f64 = keys.iter().map(|k| f64::from(k.weight)).sum();
        let mut counts = vec![0u32; keys.len()];
        for &i in &table {
            counts[i as usize] += 1;
        }
        for (k, &c) in keys.iter().zip(&counts) {
            let (share, want) = (f64::from(c) / m, f64::from(k.weight) / total);
            assert!(
                (share - want).abs() <= 0.01,
                "n={n}: share {share} want {want}"
            );
            // A share worth a whole slot or more always gets one.
            if m * want >= 1.0 {
                assert!(c > 0, "n={n}: weight {} got no slot", k.weight);
            }
        }
    }
}

/// The table for a fixed input and seed is pinned: a different build, platform or process
/// producing another table would make nodes disagree on backends. The golden value was
/// computed by this implementation once; changing the key encoding, hash, or turn order
/// changes it (and needs a mesh-wide, coordinated rollout).
#[test]
fn same_input_gives_the_same_table_in_every_process() {
    let clusters = ["east", "west"];
    let keys: Vec<WeightedKey<'_>> = (0..100u32)
        .map(|i| WeightedKey {
            key: BackendKey {
                ip: IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1)),
                port: 8080,
                cluster: clusters[(i % 2) as usize],
            },
            weight: 1 + i % 4,
        })
        .collect();
    let table = Maglev::new(0x5eed).build_keys(&keys).unwrap();
    assert_eq!(table.len(), 16381);
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
    let checksum = xxhash_rust::xxh3::xxh3_64(&bytes);
    assert_eq!(checksum, GOLDEN, "table checksum changed: {checksum:#018x}");
}

/// Worst single removal allowed for 11..=20 backends (measured 1.4 % over 4,800 removals).
const MID_WORST: f64 = 0.025;
/// Bounds for 2..=10 backends: mean over one input's removals and worst single removal
/// (measured 5.7 % worst over 23,000 removals).
const SMALL_MEAN: f64 = 0.04;
const SMALL_WORST: f64 = 0.08;

const GOLDEN: u64 = 0x49b0_fd6c_3991_3a92;
