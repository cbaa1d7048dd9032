//! Dense numeric ids for services and backends, reused after release.
//!
//! The kernel maps are keyed by these ids, so they must stay small (bounded by the map
//! capacity) and be rebuilt exactly from the pinned maps after a restart.

use std::collections::BTreeSet;

/// Hands out the smallest free id in `[first, limit)`.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    first: u32,
    limit: u32,
    /// Every id below `next` that is not in `free` is in use.
    next: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    /// Ids from `first` (inclusive) to `limit` (exclusive).
    #[must_use]
    pub fn new(first: u32, limit: u32) -> Self {
        Self {
            first,
            limit,
            next: first,
            free: BTreeSet::new(),
        }
    }

    /// The smallest free id, or `None` when all are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        if self.next >= self.limit {
            return None;
        }
        let id = self.next;
        self.next += 1;
        Some(id)
    }

    /// Marks `id` as used (rebuilding from pinned maps). False if out of range or taken.
    pub fn reserve(&mut self, id: u32) -> bool {
        if id < self.first || id >= self.limit {
            return false;
        }
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
            true
        } else {
            self.free.remove(&id)
        }
    }

    /// Returns `id` for reuse. False if it was not in use.
    pub fn release(&mut self, id: u32) -> bool {
        if id < self.first || id >= self.next || self.free.contains(&id) {
            return false;
        }
        if id + 1 == self.next {
            self.next = id;
            // Shrink past trailing free ids so `free` stays small.
            while self.next > self.first && self.free.remove(&(self.next - 1)) {
                self.next -= 1;
            }
        } else {
            self.free.insert(id);
        }
        true
    }

    /// Number of ids in use.
    #[must_use]
    pub fn in_use(&self) -> usize {
        (self.next - self.first) as usize - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn released_ids_are_reused_smallest_first() {
        let mut a = IdAllocator::new(1, 10);
        let ids: Vec<_> = (0..5).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert!(a.release(2));
        assert!(a.release(4));
        assert_eq!(a.allocate(), Some(2));
        assert_eq!(a.allocate(), Some(4));
        assert_eq!(a.allocate(), Some(6));
    }

    #[test]
    fn exhaustion_returns_none() {
        let mut a = IdAllocator::new(0, 2);
        assert!(a.allocate().is_some());
        assert!(a.allocate().is_some());
        assert_eq!(a.allocate(), None);
    }

    #[test]
    fn reserve_after_restart_skips_taken_ids() {
        let mut a = IdAllocator::new(1, 100);
        assert!(a.reserve(3));
        assert!(a.reserve(7));
        assert!(!a.reserve(3));
        assert!(!a.reserve(0));
        let got: Vec<_> = (0..6).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got, vec![1, 2, 4, 5, 6, 8]);
        assert_eq!(a.in_use(), 8);
    }

    proptest! {
        #[test]
        fn never_hands_out_an_id_twice(ops in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..300)) {
            let mut a = IdAllocator::new(1, 50);
            let mut live: Vec<u32> = Vec::new();
            for (alloc, idx) in ops {
                if alloc || live.is_empty() {
                    match a.allocate() {
                        Some(id) => {
                            prop_assert!(!live.contains(&id));
                            prop_assert!((1..50).contains(&id));
                            live.push(id);
                        }
                        None => prop_assert_eq!(live.len(), 49),
                    }
                } else {
                    let id = live.swap_remove(idx.index(live.len()));
                    prop_assert!(a.release(id));
                }
                prop_assert_eq!(a.in_use(), live.len());
                let set: HashSet<_> = live.iter().collect();
                prop_assert_eq!(set.len(), live.len());
            }
        }
    }
}
