//! The Maglev slab array, mapped into the agent's memory.
//!
//! The slab is created with `BPF_F_MMAPABLE`, so writing a 16k-entry table is a memory copy
//! instead of 16k `bpf(BPF_MAP_UPDATE_ELEM)` calls. Only regions that no service entry
//! points to are ever written (new tables go to free space), so the kernel never reads a
//! region while it is being written. This is the one place outside aya where the agent
//! needs `unsafe`.
#![allow(unsafe_code)]

use std::{num::NonZeroUsize, os::fd::AsFd, ptr::NonNull};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use super::slab::Region;

/// A shared, writable mapping of the slab array's values.
#[derive(Debug)]
pub(crate) struct SlabMapping {
    ptr: NonNull<u32>,
    entries: u32,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; all access goes through
// &self/&mut self methods, and the datapath serialises writers behind a mutex.
unsafe impl Send for SlabMapping {}
// SAFETY: see above; reads through &self only copy out u32 values.
unsafe impl Sync for SlabMapping {}

impl SlabMapping {
    /// Maps `entries` u32 values of the array map behind `fd`.
    pub(crate) fn new(fd: impl AsFd, entries: u32) -> std::io::Result<Self> {
        let bytes = (entries as usize).saturating_mul(4);
        let page = 4096usize;
        let bytes = bytes.div_ceil(page).max(1) * page;
        let len = NonZeroUsize::new(bytes).ok_or_else(|| std::io::Error::other("empty slab"))?;
        // SAFETY: a fresh shared mapping of a BPF array map fd at offset 0; the kernel
        // checks that `len` does not exceed the map's (page-rounded) value area.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(std::io::Error::from)?;
        Ok(Self {
            ptr: ptr.cast(),
            entries,
            bytes,
        })
    }

    /// Number of entries.
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// Writes `values` at `offset`. Returns false if it would run past the end.
    pub(crate) fn write(&mut self, offset: u32, values: &[u32]) -> bool {
        let Some(end) = (offset as usize).checked_add(values.len()) else {
            return false;
        };
        if end > self.entries as usize {
            return false;
        }
        // SAFETY: [offset, end) is inside the mapping (checked above), the mapping is
        // 4-byte aligned (page aligned base), and we hold &mut self so no other agent
        // thread touches it; the kernel does not read a region before its service entry
        // points to it, which happens after this copy (the map update is a syscall).
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.as_ptr().add(offset as usize),
                values.len(),
            );
        }
        true
    }

    /// Reads a region. Returns `None` if it lies outside the slab.
    pub(crate) fn read(&self, region: Region) -> Option<Vec<u32>> {
        if region.end() > u64::from(self.entries) {
            return None;
        }
        let mut out = vec![0u32; region.len as usize];
        // SAFETY: bounds checked above; u32 has no invalid bit patterns; a concurrent
        // kernel read does not conflict with our read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(region.offset as usize),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        Some(out)
    }
}

impl Drop for SlabMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/bytes are exactly what mmap returned; nothing borrows the mapping
        // once the owner is dropped.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.bytes) } {
            tracing::warn!(error = %e, "failed to unmap the Maglev slab");
        }
    }
}
