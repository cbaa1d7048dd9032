//! Weighted Maglev consistent hashing.
//!
//! Every load-balanced service gets a lookup table of prime size `M`; the datapath hashes a
//! flow's 5-tuple to a slot and the slot names the backend. The table is built with the
//! population scheme of Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4 ("Consistent Hashing", Pseudocode 1): every backend
//! walks its own permutation of the slots and backends take turns claiming slots until
//! the table is full. Because each backend's permutation depends only on its own key,
//! removing one backend mostly frees only its own slots.
//!
//! # What the table promises
//!
//! * **Shares**: backend `i` with weight `w_i` of total `W` owns `slots_i` with
//!   `|slots_i/M − w_i/W| ≤ 0.01`, i.e. within one *percentage point* of its weight share
//!   (an absolute tolerance, not 1 % of the share). Every slot has an owner; terminating
//!   and weight-0 backends own none; a backend whose exact share rounds to at least one
//!   slot (largest-remainder quota ≥ 1) owns at least one.
//! * **Stability**: removing one backend rarely moves another backend's slots ("moved" =
//!   slots a remaining backend owned before and another backend owns after, over all slots
//!   the remaining backends owned before). Measured over random inputs with the automatic
//!   size `M ≥ 100·N` (`BENCHMARKS.md`, "Maglev"): from 21 backends on (`M ≥ 4093`) no
//!   measured removal moved more than 0.1 %; with 11 to 20 backends (`M = 2039`) the mean
//!   is below 0.1 % and about one removal in a thousand moves more than 1 % (at most
//!   1.4 %); with 3 to 10 backends (`M` = 509 or 1021) the share band is only ±5 or ±10
//!   slots, the mean is 0.3–1.2 % and single removals move up to about 6 %.
//! * Input order does not matter (backends are sorted by key) and the table is a pure
//!   function of keys, weights, seed and `M` (no process-random hashing), so every agent
//!   computes the same table.
//!
//! # How
//!
//! * **One probe per turn, exponential clocks.** A turn inspects exactly one permutation
//!   entry and claims it only if it is free. Backend `i` takes turns at a rate
//!   proportional to `w_i` on an exponential clock (see `GroupClock`). Without any cap the
//!   owner of a slot is therefore simply the backend that reaches it first — a weighted
//!   rendezvous rule (Thaler and Ravishankar, "Using Name-Based Mappings to Increase Hit
//!   Rates", IEEE/ACM ToN 1998), under which removing a backend hands its slots to the
//!   runners-up and moves nothing else. With the paper's loop (walk on to the next free
//!   slot) every skipped slot shifts the rest of that backend's claims and differences
//!   cascade.
//! * **Slack bounds, not exact quotas.** Stopping each backend at its exact quota
//!   (largest-remainder rounding of `M·w_i/W`) would force movement: the freed slots of a
//!   removed backend land on the runners-up at random, so keeping every count exact means
//!   re-balancing all the others, about `1/√M` of their slots (measured with exact quotas
//!   at 10 backends, M = 1021: 2.7 % mean for the worst input, 9.3 % for the worst single
//!   removal). So a backend stops at its cap `⌊M·(w_i/W + 1/100)⌋`, and after the fill
//!   every backend below its floor `⌈M·(w_i/W − 1/100)⌉` takes the earliest slots of its
//!   own permutation from backends above their floors (`raise_to_floors`). Bounds are
//!   computed in exact integer arithmetic, so the share promise holds by construction.
//!   Only backends whose rendezvous count falls outside the band are corrected, and only
//!   those corrections can shift when another backend goes. This is the bounded-load idea
//!   of Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads", SODA
//!   2018 (a capacity of `(1+ε)` times the average, overflow going to the next choice),
//!   applied to slots with an absolute band and a lower bound as well.
//! * **A non-linear permutation.** In the paper a backend visits `offset + k·skip (mod M)`.
//!   Between two such backends the turn numbers at which they reach the same slot are
//!   related by an affine map, and when the ratio of their skips is close to a fraction
//!   with small terms one of them wins far more than its share of their contests
//!   (measured: a backend 42 slots below its floor at 10 backends, M = 1021, which the
//!   repair then has to fix and re-fix on every removal). Here turn `k` visits
//!   `F(offset + k·skip) + shift (mod M)` with the fixed permutation `F(x) = x^e mod M`
//!   (`e` the smallest exponent ≥ 3 coprime to `M − 1`) and a per-backend `shift`, so the
//!   map between two backends' turn numbers is no longer affine (measured at 25 backends:
//!   the worst single removal moves 0.08 % with `F`, 2.3 % with the linear walk).
//! * **Speed.** Instead of materialising the `N × M` permutation matrix, each backend keeps
//!   its position and advances it by `skip` with one conditional subtraction (no per-step
//!   modulo); `F` is a table (cached per listed size); filled slots live in a bitmap;
//!   backends of equal weight share one scheduler entry, so equal weights cost no heap
//!   work at all.
//!
//! The trade-off: shares are exact to one percentage point instead of one slot, in
//! exchange for stability. With `M ≥ 100·N` the band is at least `N` slots wide on each
//! side while uncapped (rendezvous) counts vary by about ten slots, so from a few dozen
//! backends on nobody is corrected and removals move nothing else. Small services pay:
//! with 3 to 10 backends the band is narrower than that noise, several backends per table
//! are corrected, and a removal changes each correction by about the square root of the
//! number of slots that backend inherits — a few slots, against a 1 % budget of only 3 to
//! 9 slots. None of the stateless variants measured keeps every removal under 1 % there
//! (see `BENCHMARKS.md`).
//!
//! `offset` and `skip` come from one 64-bit xxh3 hash (seeded, configurable) of a stable
//! key of the backend: address, port and cluster. The low 32 bits give
//! `offset = h mod M`, the high 32 bits give `skip = h' mod (M − 1) + 1`; as `M` is prime,
//! every `skip` is coprime with `M` and the walk visits every slot. `shift` is the
//! SplitMix64 mix of the same hash, mod `M`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use clustermesh_api::model::BackendState;

use crate::datapath::Backend;

/// Table sizes the agent picks from (all prime), smallest first.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];

/// Default hash seed (any fixed value works; all agents of a mesh must use the same one so
/// that every node computes the same table for the same backends).
pub const DEFAULT_SEED: u64 = 0x6d61_676c_6576_3031; // "maglev01"

/// Marker in a partially built table for a slot nobody owns yet.
const EMPTY: u32 = u32::MAX;

/// Errors from building a Maglev table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// A configured fixed table size is not usable.
    #[error(
        "maglev table size {0} is not a prime >= 3; configure one of {TABLE_SIZES:?} (or another prime)"
    )]
    InvalidTableSize(u32),
    /// Two backends share the same key (address, port, cluster).
    #[error("backend {0} appears twice in one service; deduplicate backends before building the maglev table")]
    DuplicateBackend(String),
    /// More backends than the table index type can address.
    #[error("{0} backends is more than a maglev table can index; split the service")]
    TooManyBackends(usize),
}

/// How the table size `M` is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableSize {
    /// Smallest of [`TABLE_SIZES`] with `M ≥ 100 × backends` (the largest if none is).
    #[default]
    Auto,
    /// Always this (prime) size.
    Fixed(u32),
}

/// Maglev table builder: seed and table-size policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Maglev {
    seed: u64,
    size: TableSize,
}

impl Default for Maglev {
    fn default() -> Self {
        Self {
            seed: DEFAULT_SEED,
            size: TableSize::Auto,
        }
    }
}

/// The stable identity of a backend that its Maglev permutation is derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey<'a> {
    /// Backend address.
    pub ip: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Cluster the backend lives in.
    pub cluster: &'a str,
}

impl BackendKey<'_> {
    /// Hashes the key with xxh3-64 and `seed`. The byte encoding is fixed (family tag,
    /// address octets, big-endian port, cluster name) so every process agrees.
    #[must_use]
    pub fn hash(&self, seed: u64) -> u64 {
        let mut buf = [0u8; 1 + 16 + 2 + 64];
        let mut len = 0;
        match self.ip {
            IpAddr::V4(v4) => {
                buf[0] = 4;
                buf[1..5].copy_from_slice(&v4.octets());
                len += 5;
            }
            IpAddr::V6(v6) => {
                buf[0] = 6;
                buf[1..17].copy_from_slice(&v6.octets());
                len += 17;
            }
        }
        buf[len..len + 2].copy_from_slice(&self.port.to_be_bytes());
        len += 2;
        let cluster = self.cluster.as_bytes();
        if cluster.len() <= buf.len() - len {
            buf[len..len + cluster.len()].copy_from_slice(cluster);
            len += cluster.len();
            xxhash_rust::xxh3::xxh3_64_with_seed(&buf[..len], seed)
        } else {
            // Cluster names are at most 32 bytes; longer ones still hash deterministically.
            let mut long = buf[..len].to_vec();
            long.extend_from_slice(cluster);
            xxhash_rust::xxh3::xxh3_64_with_seed(&long, seed)
        }
    }
}

impl std::fmt::Display for BackendKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}@{}", self.port, self.cluster),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}@{}", self.port, self.cluster),
        }
    }
}

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightedKey<'a> {
    /// Stable identity.
    pub key: BackendKey<'a>,
    /// Relative weight; 0 keeps the backend out of the table.
    pub weight: u32,
}

impl<'a> From<&'a Backend> for WeightedKey<'a> {
    fn from(b: &'a Backend) -> Self {
        let weight = match b.state {
            BackendState::Active => b.weight,
            BackendState::Terminating => 0,
        };
        WeightedKey {
            key: BackendKey {
                ip: b.ip,
                port: b.port,
                cluster: &b.cluster,
            },
            weight,
        }
    }
}

impl Maglev {
    /// A builder with `seed` and the automatic table size.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            size: TableSize::Auto,
        }
    }

    /// Uses `size` to choose the table size.
    #[must_use]
    pub fn with_table_size(mut self, size: TableSize) -> Self {
        self.size = size;
        self
    }

    /// The hash seed.
    #[must_use]
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Checks the configuration (a fixed size must be a prime ≥ 3).
    pub fn validate(&self) -> Result<(), MaglevError> {
        match self.size {
            TableSize::Auto => Ok(()),
            TableSize::Fixed(m) if is_prime(m) && m >= 3 => Ok(()),
            TableSize::Fixed(m) => Err(MaglevError::InvalidTableSize(m)),
        }
    }

    /// Table size for a service with `active` backends in its table.
    #[must_use]
    pub fn table_size_for(&self, active: usize) -> u32 {
        match self.size {
            TableSize::Fixed(m) => m,
            TableSize::Auto => auto_table_size(active),
        }
    }

    /// Builds the table for a service's backends: entry = index into `backends`.
    /// Terminating backends and weight-0 backends get no slot. Returns an empty table when
    /// no backend has weight.
    pub fn build(&self, backends: &[Backend]) -> Result<Vec<u32>, MaglevError> {
        let keys: Vec<WeightedKey<'_>> = backends.iter().map(WeightedKey::from).collect();
        self.build_keys(&keys)
    }

    /// Like [`Maglev::build`], on bare keys and weights.
    pub fn build_keys(&self, backends: &[WeightedKey<'_>]) -> Result<Vec<u32>, MaglevError> {
        self.validate()?;
        if u32::try_from(backends.len()).map_or(true, |n| n == EMPTY) {
            return Err(MaglevError::TooManyBackends(backends.len()));
        }
        let mut active: Vec<u32> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .map(|i| i as u32)
            .collect();
        if active.is_empty() {
            return Ok(Vec::new());
        }
        // Key order makes the table independent of input order.
        active.sort_unstable_by(|&a, &b| backends[a as usize].key.cmp(&backends[b as usize].key));
        if let Some(w) = active
            .windows(2)
            .find(|w| backends[w[0] as usize].key == backends[w[1] as usize].key)
        {
            return Err(MaglevError::DuplicateBackend(
                backends[w[0] as usize].key.to_string(),
            ));
        }
        let m = self.table_size_for(active.len());
        let power = power_table(m);
        let mut cursors: Vec<Cursor> = active
            .iter()
            .map(|&i| Cursor::new(backends[i as usize].key.hash(self.seed), m))
            .collect();
        let weights: Vec<u32> = active
            .iter()
            .map(|&i| backends[i as usize].weight)
            .collect();
        let mut table = vec![EMPTY; m as usize];
        let mut filled = Bitmap::new(m);
        let bounds = Bounds::new(&weights, m);
        fill(
            &mut cursors,
            &weights,
            &bounds.cap,
            &power,
            &mut table,
            &mut filled,
        );
        raise_to_floors(&cursors, &bounds.floor, &power, &mut table);
        // Translate positions in `active` back to indices into `backends`.
        for slot in &mut table {
            *slot = active[*slot as usize];
        }
        Ok(table)
    }
}

/// Smallest size from [`TABLE_SIZES`] with `M ≥ 100 × active`.
#[must_use]
pub fn auto_table_size(active: usize) -> u32 {
    let need = (active as u64).saturating_mul(100);
    TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| u64::from(m) >= need)
        .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1])
}

/// Trial-division primality test (table sizes are at most a few million).
fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.checked_rem(d) == Some(0) {
            return false;
        }
        d += 1;
    }
    true
}

/// A backend's walk through its slot permutation.
///
/// Turn `k` visits slot `(F(offset + k·skip mod M) + shift) mod M`, where `F(x) = x^e mod M`
/// is the power permutation of [`power_table`]. `offset + k·skip` alone is the paper's
/// permutation; `F` and `shift` break its linear structure (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Position of the next turn in the affine walk `offset + k·skip (mod M)`.
    x: u32,
    offset: u32,
    skip: u32,
    shift: u32,
    m: u32,
    owned: u32,
}

impl Cursor {
    fn new(hash: u64, m: u32) -> Self {
        let offset = (hash as u32) % m;
        let skip = ((hash >> 32) as u32) % (m - 1) + 1;
        let shift = (mix64(hash) % u64::from(m)) as u32;
        Self {
            x: offset,
            offset,
            skip,
            shift,
            m,
            owned: 0,
        }
    }

    /// The same walk from its first turn, owning nothing.
    fn restart(&self) -> Self {
        Self {
            x: self.offset,
            owned: 0,
            ..*self
        }
    }

    /// The slot of the current turn; moves on to the next turn.
    #[inline]
    fn step(&mut self, power: &[u32]) -> u32 {
        let x = self.x;
        // `x + skip` is below 2·M: one subtraction replaces `% M`.
        let advanced = x + self.skip;
        self.x = if advanced >= self.m {
            advanced - self.m
        } else {
            advanced
        };
        let slot = power[x as usize] + self.shift;
        if slot >= self.m {
            slot - self.m
        } else {
            slot
        }
    }

    /// One turn: inspects the next slot of the permutation and claims it if it is free.
    /// Returns true if the slot was claimed.
    #[inline]
    fn probe(&mut self, me: u32, power: &[u32], table: &mut [u32], filled: &mut Bitmap) -> bool {
        let slot = self.step(power);
        if filled.set_if_clear(slot) {
            table[slot as usize] = me;
            self.owned += 1;
            true
        } else {
            false
        }
    }
}

/// SplitMix64 finaliser (Steele, Lea and Flood, "Fast Splittable Pseudorandom Number
/// Generators", OOPSLA 2014): derives the `shift` bits from the key hash.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Smallest `e ≥ 3` with `gcd(e, M − 1) = 1`: then `x ↦ x^e` permutes `0..M` (M prime).
fn power_exponent(m: u32) -> u64 {
    let order = u64::from(m - 1);
    let mut e = 3u64;
    while gcd(e, order) != 1 {
        e += 2;
    }
    e
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `F(x) = x^e mod M` for every `x < M`, a fixed non-linear permutation of the slots.
fn compute_power_table(m: u32) -> Box<[u32]> {
    let e = power_exponent(m);
    let m64 = u64::from(m);
    (0..m)
        .map(|x| {
            let (mut base, mut exp, mut acc) = (u64::from(x), e, 1u64);
            while exp > 0 {
                if exp & 1 == 1 {
                    acc = acc * base % m64;
                }
                base = base * base % m64;
                exp >>= 1;
            }
            // acc < m ≤ u32::MAX.
            acc as u32
        })
        .collect()
}

/// Power tables computed so far, keyed by table size `M` (at most 512 KiB for the
/// largest of [`TABLE_SIZES`]); a configured fixed prime is cached like the listed sizes.
static POWER_TABLES: Mutex<BTreeMap<u32, Arc<[u32]>>> = Mutex::new(BTreeMap::new());

/// The power permutation for table size `m`, computed once per size.
fn power_table(m: u32) -> Arc<[u32]> {
    // A panic elsewhere while holding the lock cannot leave a half-written entry (insert is
    // the only mutation), so a poisoned cache is still valid.
    let cached = POWER_TABLES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&m)
        .cloned();
    if let Some(table) = cached {
        return table;
    }
    // Computed without the lock held, so builds of other sizes are not blocked; a
    // concurrent first build of the same size keeps whichever insert came first.
    let table: Arc<[u32]> = compute_power_table(m).into();
    POWER_TABLES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(m)
        .or_insert(table)
        .clone()
}

/// Per-backend bounds on slot counts: `floor_i ≤ count_i ≤ cap_i`.
#[derive(Debug)]
struct Bounds {
    cap: Vec<u32>,
    floor: Vec<u32>,
}

impl Bounds {
    /// `cap = ⌊M·(w/W + 1/100)⌋`, `floor = ⌈M·(w/W − 1/100)⌉` (at least 0; at least 1 when
    /// the largest-remainder quota is), in exact integer arithmetic, so every count within
    /// the bounds has a share within one percentage point of `w/W`. For tables smaller than 100 slots the bounds could leave no valid
    /// count; they are then widened to include the largest-remainder quota.
    fn new(weights: &[u32], m: u32) -> Self {
        let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        let quota = quotas(weights, m);
        let m128 = u128::from(m);
        let denominator = 100 * total;
        let mut cap = Vec::with_capacity(weights.len());
        let mut floor = Vec::with_capacity(weights.len());
        for (&w, &q) in weights.iter().zip(&quota) {
            let w = u128::from(w);
            let high = (m128 * (100 * w + total) / denominator).min(m128) as u32;
            let low = if 100 * w > total {
                (m128 * (100 * w - total)).div_ceil(denominator) as u32
            } else {
                0
            };
            cap.push(high.max(q));
            // A backend whose quota is a slot or more keeps at least one slot, even when
            // the band alone would allow zero (weight share below one percentage point).
            floor.push(low.min(q).max(q.min(1)));
        }
        Self { cap, floor }
    }
}

/// Largest-remainder apportionment of `m` slots to `weights` (ties by position).
fn quotas(weights: &[u32], m: u32) -> Vec<u32> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let mut quotas = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut assigned: u64 = 0;
    for (i, &w) in weights.iter().enumerate() {
        let scaled = u128::from(m) * u128::from(w);
        let q = (scaled / total) as u32;
        quotas.push(q);
        assigned += u64::from(q);
        remainders.push((scaled % total, i));
    }
    let left = (u64::from(m) - assigned) as usize;
    if left > 0 {
        // Largest remainder first; equal remainders in key order.
        remainders.select_nth_unstable_by(left - 1, |a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &remainders[..left] {
            quotas[i] += 1;
        }
    }
    quotas
}

/// Virtual clock of one group of equal-weight backends.
///
/// Turn `k` of a backend with weight `w` runs at time `E_k / w`, where
/// `E_k = 1/M + 1/(M−1) + … + 1/(M−k+1)` (so `E_0 = 0`). `E_k` is the expected `k`-th
/// smallest of `M` unit exponentials, i.e. the turn index pushed through the exponential
/// quantile `−ln(1 − k/M)`. As a backend's permutation puts a given slot at a uniformly
/// random position, the time at which backend `i` first probes a slot is then (close to)
/// exponential with rate `w_i`, and the first prober of a freed slot is backend `i` with
/// probability `w_i / W`: freed slots are handed out in proportion to weight, so the
/// remaining backends' counts stay inside their bands and corrections rarely cascade when
/// a backend is removed. (Plain `k / w` favours heavy
/// backends, e.g. 3/4 instead of 2/3 for weights 2:1.) Only `+` and `/` on `f64` are used,
/// which IEEE 754 makes bit-identical on every platform.
#[derive(Debug, Clone, Copy)]
struct GroupClock {
    /// `E_turn / weight`.
    time: f64,
    /// `E_turn`.
    expected: f64,
    turn: u32,
    weight: u32,
    group: u32,
}

impl GroupClock {
    fn new(weight: u32, group: u32) -> Self {
        Self {
            time: 0.0,
            expected: 0.0,
            turn: 0,
            weight,
            group,
        }
    }

    fn advance(&mut self, m: u32) {
        // A backend probes each slot once at most, so `turn < m` while it still runs.
        self.expected += 1.0 / f64::from(m.saturating_sub(self.turn).max(1));
        self.turn += 1;
        self.time = self.expected / f64::from(self.weight);
    }
}

impl PartialEq for GroupClock {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for GroupClock {}

impl Ord for GroupClock {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: "greater" = runs first = earlier virtual time, then the
        // heavier group, then the lower group index.
        other
            .time
            .total_cmp(&self.time)
            .then(self.weight.cmp(&other.weight))
            .then(other.group.cmp(&self.group))
    }
}

impl PartialOrd for GroupClock {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Runs the turns until every slot has an owner; a backend stops taking turns once it holds
/// its cap. The caps sum to at least `M` (each is at least the quota), so the table fills:
/// a slot stays free only while every backend that has probed it is already full.
/// Backends of equal weight take their turns together (in key order), so the scheduler's
/// heap holds one entry per distinct weight.
fn fill(
    cursors: &mut [Cursor],
    weights: &[u32],
    caps: &[u32],
    power: &[u32],
    table: &mut [u32],
    filled: &mut Bitmap,
) {
    let mut by_weight: Vec<u32> = (0..weights.len() as u32).collect();
    // Stable: keeps key order inside a weight group.
    by_weight.sort_by(|&a, &b| weights[b as usize].cmp(&weights[a as usize]));
    let mut groups: Vec<Vec<u32>> = Vec::new();
    let mut group_weights: Vec<u32> = Vec::new();
    for &i in &by_weight {
        let w = weights[i as usize];
        if group_weights.last() != Some(&w) {
            group_weights.push(w);
            groups.push(Vec::new());
        }
        if caps[i as usize] > 0 {
            if let Some(g) = groups.last_mut() {
                g.push(i);
            }
        }
    }
    let mut heap: BinaryHeap<GroupClock> = group_weights
        .iter()
        .enumerate()
        .filter(|(g, _)| !groups[*g].is_empty())
        .map(|(g, &weight)| GroupClock::new(weight, g as u32))
        .collect();
    let m32 = table.len() as u32;
    let m = table.len();
    let mut count = 0usize;
    while let Some(mut top) = heap.peek_mut() {
        let members = &mut groups[top.group as usize];
        let mut finished = false;
        for &i in members.iter() {
            let c = &mut cursors[i as usize];
            if c.owned < caps[i as usize] && c.probe(i, power, table, filled) {
                count += 1;
                finished |= c.owned == caps[i as usize];
            }
        }
        if count == m {
            return;
        }
        if finished {
            members.retain(|&i| cursors[i as usize].owned < caps[i as usize]);
        }
        if members.is_empty() {
            std::collections::binary_heap::PeekMut::pop(top);
        } else {
            top.advance(m32);
        }
    }
}

/// Lifts every backend below its floor up to it, in key order: the backend walks its own
/// permutation from the first turn and takes each slot whose owner holds more than that
/// owner's floor. The slots taken are the ones it probes earliest, which makes the choice
/// stable when other backends come and go. This always succeeds, because the floors sum
/// to at most `M` (each is at most the quota, and the quotas sum to `M`): while the backend
/// is short, the other backends together hold more than their floors, and its walk visits
/// each of their slots.
fn raise_to_floors(cursors: &[Cursor], floors: &[u32], power: &[u32], table: &mut [u32]) {
    if cursors.iter().zip(floors).all(|(c, &f)| c.owned >= f) {
        return;
    }
    let mut owned: Vec<u32> = cursors.iter().map(|c| c.owned).collect();
    for (i, cursor) in cursors.iter().enumerate() {
        if owned[i] >= floors[i] {
            continue;
        }
        let me = i as u32;
        let mut walk = cursor.restart();
        for _ in 0..table.len() {
            let slot = walk.step(power) as usize;
            let owner = table[slot] as usize;
            if owner != i && owned[owner] > floors[owner] {
                table[slot] = me;
                owned[owner] -= 1;
                owned[i] += 1;
                if owned[i] >= floors[i] {
                    break;
                }
            }
        }
    }
}

/// One bit per slot: set once the slot has an owner.
#[derive(Debug)]
struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    fn new(bits: u32) -> Self {
        Self {
            words: vec![0; (bits as usize).div_ceil(64)],
        }
    }

    /// Sets `bit`; returns true if it was clear.
    #[inline]
    fn set_if_clear(&mut self, bit: u32) -> bool {
        let word = &mut self.words[(bit >> 6) as usize];
        let mask = 1u64 << (bit & 63);
        let was_clear = *word & mask == 0;
        *word |= mask;
        was_clear
    }
}

/// A direct transcription of the paper's Pseudocode 1 (precomputed `permutation[i][j]`,
/// `% M` at every step) for equal weights; weights are honoured the naive way by giving a
/// backend `w` consecutive turns per round. Kept as the oracle for tests and as the
/// baseline in `benches/maglev.rs`; not used by the agent.
#[doc(hidden)]
pub mod reference {
    use super::WeightedKey;

    /// Builds a table of size `m` (entries index `backends`); backends must be distinct
    /// and have weight > 0. Order of turns is key order, like the fast builder.
    #[must_use]
    pub fn build(backends: &[WeightedKey<'_>], m: u32, seed: u64) -> Vec<u32> {
        let mut order: Vec<usize> = (0..backends.len()).collect();
        order.sort_by(|&a, &b| backends[a].key.cmp(&backends[b].key));
        let n = order.len();
        let m = m as usize;
        let mut permutation = vec![vec![0usize; m]; n];
        for (row, &i) in order.iter().enumerate() {
            let h = backends[i].key.hash(seed);
            let offset = ((h as u32) as usize) % m;
            let skip = (((h >> 32) as u32) as usize) % (m - 1) + 1;
            for (j, slot) in permutation[row].iter_mut().enumerate() {
                *slot = (offset + j * skip) % m;
            }
        }
        let mut next = vec![0usize; n];
        let mut entry = vec![-1i64; m];
        let mut filled = 0;
        loop {
            for (row, &i) in order.iter().enumerate() {
                for _ in 0..backends[i].weight {
                    let mut c = permutation[row][next[row]];
                    while entry[c] >= 0 {
                        next[row] += 1;
                        c = permutation[row][next[row]];
                    }
                    entry[c] = i as i64;
                    next[row] += 1;
                    filled += 1;
                    if filled == m {
                        return entry.into_iter().map(|e| e as u32).collect();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
