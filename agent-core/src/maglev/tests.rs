//! Unit tests of the Maglev builder: shares, stability, determinism and input validation.

use super::*;
use std::net::Ipv4Addr;

fn key(i: u32, cluster: &str) -> BackendKey<'_> {
    BackendKey {
        ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
        port: 8080,
        cluster,
    }
}

#[test]
fn auto_size_is_smallest_prime_with_100_slots_per_backend() {
    assert_eq!(auto_table_size(1), 251);
    assert_eq!(auto_table_size(2), 251);
    assert_eq!(auto_table_size(3), 509);
    assert_eq!(auto_table_size(10), 1021);
    assert_eq!(auto_table_size(100), 16381);
    assert_eq!(auto_table_size(164), 32749);
    assert_eq!(auto_table_size(5000), 131071);
}

#[test]
fn every_listed_size_is_prime() {
    assert!(TABLE_SIZES.iter().all(|&m| is_prime(m)));
    assert!(!is_prime(65537 * 3));
}

#[test]
fn fixed_size_must_be_prime() {
    let m = Maglev::default().with_table_size(TableSize::Fixed(1000));
    assert_eq!(m.validate(), Err(MaglevError::InvalidTableSize(1000)));
    let keys = [WeightedKey {
        key: key(1, "a"),
        weight: 1,
    }];
    assert!(m.build_keys(&keys).is_err());
    let ok = Maglev::default().with_table_size(TableSize::Fixed(7));
    assert_eq!(ok.build_keys(&keys).unwrap(), vec![0; 7]);
}

#[test]
fn no_weight_gives_empty_table() {
    let keys = [WeightedKey {
        key: key(1, "a"),
        weight: 0,
    }];
    assert!(Maglev::default().build_keys(&keys).unwrap().is_empty());
    assert!(Maglev::default().build_keys(&[]).unwrap().is_empty());
}

#[test]
fn duplicate_keys_are_refused() {
    let keys = [
        WeightedKey {
            key: key(1, "a"),
            weight: 1,
        },
        WeightedKey {
            key: key(1, "a"),
            weight: 2,
        },
    ];
    assert!(matches!(
        Maglev::default().build_keys(&keys),
        Err(MaglevError::DuplicateBackend(_))
    ));
}

#[test]
fn quotas_sum_to_m_and_follow_largest_remainder() {
    assert_eq!(quotas(&[1, 1, 1], 7), vec![3, 2, 2]);
    assert_eq!(quotas(&[1, 2], 7), vec![2, 5]);
    assert_eq!(quotas(&[3, 1], 251), vec![188, 63]);
    let q = quotas(&[u32::MAX, u32::MAX, 1], 131_071);
    assert_eq!(q.iter().map(|&q| u64::from(q)).sum::<u64>(), 131_071);
}

/// The construction written out naively: list every (backend, turn) at virtual time
/// E_turn/weight, sort by (time, heavier first, key order), play them in order with the
/// caps, then lift backends below their floors; slots via plain `pow` and `%`.
fn naive(keys: &[WeightedKey<'_>], m: u32, seed: u64) -> Vec<u32> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[a].key.cmp(&keys[b].key));
    let weights: Vec<u32> = order.iter().map(|&i| keys[i].weight).collect();
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let mf = f64::from(m);
    // Float bounds are exact enough for these small inputs.
    let cap: Vec<u32> = weights
        .iter()
        .map(|&w| (mf * (f64::from(w) / total + 0.01)).floor() as u32)
        .collect();
    let quota = quotas(&weights, m);
    let floor: Vec<u32> = weights
        .iter()
        .zip(&quota)
        .map(|(&w, &q)| {
            let band = (mf * (f64::from(w) / total - 0.01)).ceil().max(0.0) as u32;
            band.max(q.min(1))
        })
        .collect();
    let e = power_exponent(m);
    let slot_of = |pos: usize, turn: u64| -> usize {
        let h = keys[order[pos]].key.hash(seed);
        let m = u64::from(m);
        let offset = u64::from(h as u32) % m;
        let skip = u64::from((h >> 32) as u32) % (m - 1) + 1;
        let x = (offset + turn * skip) % m;
        let y = (0..e).fold(1u64, |acc, _| acc * x % m);
        ((y + mix64(h) % m) % m) as usize
    };
    let mut events: Vec<(f64, u32, usize, u64)> = Vec::new();
    for (pos, _) in order.iter().enumerate() {
        let mut expected = 0.0f64;
        for turn in 0..m {
            events.push((
                expected / f64::from(weights[pos]),
                weights[pos],
                pos,
                u64::from(turn),
            ));
            expected += 1.0 / f64::from(m - turn);
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let mut table: Vec<Option<usize>> = vec![None; m as usize];
    let mut owned = vec![0u32; order.len()];
    for (_, _, pos, turn) in events {
        let slot = slot_of(pos, turn);
        if owned[pos] < cap[pos] && table[slot].is_none() {
            table[slot] = Some(pos);
            owned[pos] += 1;
        }
    }
    for pos in 0..order.len() {
        for turn in 0..u64::from(m) {
            if owned[pos] >= floor[pos] {
                break;
            }
            let slot = slot_of(pos, turn);
            let owner = table[slot].expect("filled");
            if owner != pos && owned[owner] > floor[owner] {
                table[slot] = Some(pos);
                owned[owner] -= 1;
                owned[pos] += 1;
            }
        }
    }
    table
        .into_iter()
        .map(|e| order[e.expect("naive filled every slot")] as u32)
        .collect()
}

#[test]
fn bounds_keep_shares_within_one_percentage_point() {
    for (weights, m) in [
        (vec![1, 1, 1], 509),
        (vec![20, 1, 1, 1], 509),
        (vec![1; 10], 1021),
        (vec![7, 3], 251),
        (vec![u32::MAX, 1], 131_071),
    ] {
        let b = Bounds::new(&weights, m);
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        for ((&w, &lo), &hi) in weights.iter().zip(&b.floor).zip(&b.cap) {
            let p = f64::from(w) / total;
            assert!(lo <= hi);
            assert!(f64::from(hi) / f64::from(m) - p <= 0.01 + 1e-12);
            assert!(p - f64::from(lo) / f64::from(m) <= 0.01 + 1e-12);
            // The bounds have room: about M/100 slots either side of M·w/W.
            let mf = f64::from(m);
            assert!(f64::from(hi) >= (mf * (p + 0.01) - 1.0).min(mf));
            assert!(f64::from(lo) <= (mf * (p - 0.01) + 1.0).max(0.0));
        }
        assert!(b.cap.iter().map(|&c| u64::from(c)).sum::<u64>() >= u64::from(m));
        assert!(b.floor.iter().map(|&c| u64::from(c)).sum::<u64>() <= u64::from(m));
    }
    // Below 100 slots the quota is always admissible.
    let b = Bounds::new(&[1, 1, 1], 7);
    assert_eq!(b.cap.iter().sum::<u32>(), 7);
    assert_eq!(b.floor.iter().sum::<u32>(), 7);
}

#[test]
fn backends_below_their_floor_take_their_earliest_slots_from_donors_above_theirs() {
    let m = 11;
    let power = compute_power_table(m);
    let mut cursors = [
        Cursor::new(1, m),
        Cursor::new(0xdead_beef_0000_0042, m),
        Cursor::new(7 << 32, m),
    ];
    // Backend 0 owns everything; floors 2 (donor keeps at least 2), 4 and 3.
    let mut table = vec![0u32; m as usize];
    cursors[0].owned = m;
    raise_to_floors(&cursors, &[2, 4, 3], &power, &mut table);
    let count = |b: u32| table.iter().filter(|&&o| o == b).count();
    assert_eq!((count(0), count(1), count(2)), (4, 4, 3));
    // Backend 1 took the first four slots of its walk.
    let mut walk = cursors[1].restart();
    let first: Vec<u32> = (0..4).map(|_| walk.step(&power)).collect();
    assert!(
        first.iter().all(|&s| table[s as usize] == 1),
        "{first:?} {table:?}"
    );
}

#[test]
fn a_light_backend_with_a_quota_keeps_a_slot() {
    // Weight 1 next to weight-256 backends: a share below one slot's worth of the band,
    // so the band alone would allow zero slots.
    let b = Bounds::new(&[256, 256, 1], 509);
    assert_eq!(quotas(&[256, 256, 1], 509)[2], 1);
    assert_eq!(b.floor[2], 1);
    for seed in 0..40u64 {
        for heavy in 1..=12u32 {
            let mut keys: Vec<WeightedKey<'_>> = (0..heavy)
                .map(|i| WeightedKey {
                    key: key(i * 11, "east"),
                    weight: 256,
                })
                .collect();
            keys.push(WeightedKey {
                key: key(999, "west"),
                weight: 1,
            });
            let table = Maglev::new(seed).build_keys(&keys).unwrap();
            let weights: Vec<u32> = keys.iter().map(|k| k.weight).collect();
            // The light backend also sorts last by key.
            let quota = quotas(&weights, table.len() as u32)[heavy as usize];
            let owned = table.iter().filter(|&&i| i == heavy).count();
            assert!(
                owned >= quota.min(1) as usize,
                "seed={seed} heavy={heavy} quota={quota} owned={owned}"
            );
        }
    }
}

#[test]
fn power_table_is_a_permutation() {
    for m in [3, 7, 251, 1021, 4093] {
        let t = compute_power_table(m);
        let mut seen = vec![false; m as usize];
        for &y in t.iter() {
            assert!(!seen[y as usize], "m={m}: {y} twice");
            seen[y as usize] = true;
        }
        assert!(power_exponent(m) >= 3);
    }
}

#[test]
fn fast_builder_matches_the_naive_schedule() {
    for (n, weights) in [(1, 1), (3, 1), (5, 1), (4, 20), (13, 3), (13, 7), (40, 5)] {
        let keys: Vec<WeightedKey<'_>> = (0..n)
            .map(|i| WeightedKey {
                key: key(i * 7, if i % 2 == 0 { "east" } else { "west" }),
                weight: 1 + (i * 5) % weights,
            })
            .collect();
        let fast = Maglev::new(42).build_keys(&keys).unwrap();
        assert_eq!(fast, naive(&keys, fast.len() as u32, 42), "n={n}");
    }
}

#[test]
fn terminating_backends_get_no_slot() {
    use clustermesh_api::model::{Protocol, Tier};
    let b = |i: u32, state| Backend {
        ip: IpAddr::V4(Ipv4Addr::from(i)),
        port: 80,
        protocol: Protocol::Tcp,
        cluster: "c1".into(),
        node: String::new(),
        zone: String::new(),
        tier: Tier::Cluster,
        weight: 1,
        state,
    };
    let backends = vec![
        b(1, BackendState::Active),
        b(2, BackendState::Terminating),
        b(3, BackendState::Active),
    ];
    let table = Maglev::default().build(&backends).unwrap();
    assert_eq!(table.len(), 251);
    assert!(table.iter().all(|&i| i == 0 || i == 2));
    assert!(table.contains(&0) && table.contains(&2));
}

#[test]
fn key_hash_distinguishes_fields() {
    let a = key(1, "a").hash(1);
    assert_ne!(a, key(1, "b").hash(1));
    assert_ne!(a, key(2, "a").hash(1));
    assert_ne!(a, key(1, "a").hash(2));
    let long = "x".repeat(100);
    assert_eq!(key(1, &long).hash(1), key(1, &long).hash(1));
}
