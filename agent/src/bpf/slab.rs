//! Free-space bookkeeping for the Maglev slab.
//!
//! Every service's table (plus its backend list) lives in one contiguous region of the
//! single slab array map. Replacing a table allocates a new region, writes it, flips the
//! service entry, and only then frees the old region, so the allocator must hand out
//! regions while the old ones are still in use. Best fit keeps large holes for large
//! tables; adjacent free blocks are merged on release.

use std::collections::{BTreeMap, BTreeSet};

/// A contiguous range of slab entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Region {
    /// First entry.
    pub offset: u32,
    /// Number of entries.
    pub len: u32,
}

impl Region {
    /// One past the last entry.
    #[must_use]
    pub fn end(self) -> u64 {
        u64::from(self.offset) + u64::from(self.len)
    }
}

/// Best-fit allocator over `[0, capacity)`.
#[derive(Debug, Clone)]
pub struct SlabAllocator {
    capacity: u32,
    /// Free blocks by offset → length.
    by_offset: BTreeMap<u32, u32>,
    /// Free blocks by (length, offset), for best fit.
    by_len: BTreeSet<(u32, u32)>,
    used: u64,
}

impl SlabAllocator {
    /// An allocator with the whole slab free.
    #[must_use]
    pub fn new(capacity: u32) -> Self {
        let mut s = Self {
            capacity,
            by_offset: BTreeMap::new(),
            by_len: BTreeSet::new(),
            used: 0,
        };
        if capacity > 0 {
            s.insert_free(0, capacity);
        }
        s
    }

    /// Total entries.
    #[must_use]
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries currently allocated.
    #[must_use]
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Size of the largest free block (the largest region that can be allocated now).
    #[must_use]
    pub fn largest_free(&self) -> u32 {
        self.by_len.last().map_or(0, |&(len, _)| len)
    }

    /// Allocates `len` entries (best fit). `None` when no free block is large enough.
    /// A zero-length request gets an empty region at offset 0.
    pub fn allocate(&mut self, len: u32) -> Option<Region> {
        if len == 0 {
            return Some(Region { offset: 0, len: 0 });
        }
        let &(block_len, offset) = self.by_len.range((len, 0)..).next()?;
        self.remove_free(offset, block_len);
        if block_len > len {
            self.insert_free(offset + len, block_len - len);
        }
        self.used += u64::from(len);
        Some(Region { offset, len })
    }

    /// Marks a region as used when rebuilding from pinned maps. Returns false (and changes
    /// nothing) if any part of it is outside the slab or already used.
    pub fn reserve(&mut self, region: Region) -> bool {
        if region.len == 0 {
            return true;
        }
        if region.end() > u64::from(self.capacity) {
            return false;
        }
        let Some((&offset, &len)) = self.by_offset.range(..=region.offset).next_back() else {
            return false;
        };
        let block = Region { offset, len };
        if block.end() < region.end() {
            return false;
        }
        self.remove_free(offset, len);
        if region.offset > offset {
            self.insert_free(offset, region.offset - offset);
        }
        if block.end() > region.end() {
            // Both ends are <= capacity (a u32), so the difference fits in u32.
            let tail = u32::try_from(block.end() - region.end()).unwrap_or(0);
            let tail_offset = u32::try_from(region.end()).unwrap_or(self.capacity);
            self.insert_free(tail_offset, tail);
        }
        self.used += u64::from(region.len);
        true
    }

    /// Returns a region to the free space, merging with its neighbours. Releasing a region
    /// that is not fully allocated is ignored (returns false) rather than corrupting the
    /// free lists.
    pub fn release(&mut self, region: Region) -> bool {
        if region.len == 0 {
            return true;
        }
        if region.end() > u64::from(self.capacity) || self.overlaps_free(region) {
            return false;
        }
        let mut offset = region.offset;
        let mut len = region.len;
        if let Some((&prev_off, &prev_len)) = self.by_offset.range(..offset).next_back() {
            if u64::from(prev_off) + u64::from(prev_len) == u64::from(offset) {
                self.remove_free(prev_off, prev_len);
                offset = prev_off;
                len += prev_len;
            }
        }
        let end = u64::from(offset) + u64::from(len);
        if let Ok(end32) = u32::try_from(end) {
            if let Some(&next_len) = self.by_offset.get(&end32) {
                self.remove_free(end32, next_len);
                len += next_len;
            }
        }
        self.insert_free(offset, len);
        self.used -= u64::from(region.len);
        true
    }

    fn overlaps_free(&self, region: Region) -> bool {
        if let Some((&off, &len)) = self.by_offset.range(..=region.offset).next_back() {
            if u64::from(off) + u64::from(len) > u64::from(region.offset) {
                return true;
            }
        }
        self.by_offset
            .range(region.offset..)
            .next()
            .is_some_and(|(&off, _)| u64::from(off) < region.end())
    }

    fn insert_free(&mut self, offset: u32, len: u32) {
        self.by_offset.insert(offset, len);
        self.by_len.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u32, len: u32) {
        self.by_offset.remove(&offset);
        self.by_len.remove(&(len, offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_slab_refuses_and_keeps_existing_regions() {
        let mut s = SlabAllocator::new(10);
        let a = s.allocate(6).unwrap();
        assert_eq!(s.allocate(5), None);
        assert_eq!(s.largest_free(), 4);
        assert!(s.release(a));
        assert_eq!(s.allocate(10), Some(Region { offset: 0, len: 10 }));
    }

    #[test]
    fn release_merges_neighbours() {
        let mut s = SlabAllocator::new(30);
        let a = s.allocate(10).unwrap();
        let b = s.allocate(10).unwrap();
        let c = s.allocate(10).unwrap();
        assert!(s.release(a));
        assert!(s.release(c));
        assert_eq!(s.largest_free(), 10);
        assert!(s.release(b));
        assert_eq!(s.largest_free(), 30);
        assert_eq!(s.used(), 0);
    }

    #[test]
    fn best_fit_prefers_the_smallest_hole() {
        let mut s = SlabAllocator::new(100);
        let a = s.allocate(20).unwrap();
        let _keep = s.allocate(5).unwrap();
        let b = s.allocate(8).unwrap();
        let _keep2 = s.allocate(5).unwrap();
        s.release(a);
        s.release(b);
        assert_eq!(
            s.allocate(7),
            Some(Region {
                offset: b.offset,
                len: 7
            })
        );
    }

    #[test]
    fn reserve_rebuilds_state_and_rejects_overlaps() {
        let mut s = SlabAllocator::new(100);
        assert!(s.reserve(Region {
            offset: 10,
            len: 10
        }));
        assert!(!s.reserve(Region {
            offset: 15,
            len: 10
        }));
        assert!(!s.reserve(Region {
            offset: 95,
            len: 10
        }));
        assert!(s.reserve(Region {
            offset: 20,
            len: 80
        }));
        assert_eq!(s.largest_free(), 10);
        assert_eq!(s.used(), 90);
    }

    #[test]
    fn double_release_is_refused() {
        let mut s = SlabAllocator::new(10);
        let a = s.allocate(4).unwrap();
        assert!(s.release(a));
        assert!(!s.release(a));
        assert_eq!(s.used(), 0);
    }

    proptest! {
        /// Random allocate/release sequences never hand out overlapping regions and the
        /// used count always equals the sum of live regions.
        #[test]
        fn regions_never_overlap(ops in proptest::collection::vec((any::<bool>(), 1u32..40, any::<prop::sample::Index>()), 1..200)) {
            let mut s = SlabAllocator::new(500);
            let mut live: Vec<Region> = Vec::new();
            for (alloc, len, idx) in ops {
                if alloc || live.is_empty() {
                    if let Some(r) = s.allocate(len) {
                        prop_assert!(r.end() <= 500);
                        for other in &live {
                            prop_assert!(r.end() <= u64::from(other.offset) || other.end() <= u64::from(r.offset));
                        }
                        live.push(r);
                    } else {
                        prop_assert!(s.largest_free() < len);
                    }
                } else {
                    let r = live.swap_remove(idx.index(live.len()));
                    prop_assert!(s.release(r));
                }
                let sum: u64 = live.iter().map(|r| u64::from(r.len)).sum();
                prop_assert_eq!(s.used(), sum);
            }
            for r in live.drain(..) {
                prop_assert!(s.release(r));
            }
            prop_assert_eq!(s.largest_free(), 500);
        }
    }
}
