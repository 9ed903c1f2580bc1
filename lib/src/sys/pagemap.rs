//! `/proc/self/pagemap`: the `PAGEMAP_SCAN` ioctl (Linux 6.7) and the classic 64-bit entries.
//!
//! # References
//! `Documentation/admin-guide/mm/pagemap.rst`, `include/uapi/linux/fs.h`, `fs/proc/task_mmu.c`
//! (`do_pagemap_scan`).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use super::{IOC_READ, IOC_WRITE, ioc};

/// `PAGE_IS_WPALLOWED`.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN`: not write-protected, i.e. written since it was last protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`: mapped to the shared zero page (read but never written).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGE_IS_SOFT_DIRTY`.
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// `PM_SCAN_WP_MATCHING`: write-protect the matching pages in the same walk.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` on a VMA not registered for async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: a run of pages with the same categories.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The categories (masked by `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PmScanArg {
    /// `sizeof(struct pm_scan_arg)`.
    pub size: u64,
    /// `PM_SCAN_*`.
    pub flags: u64,
    /// Start of the walk.
    pub start: u64,
    /// End of the walk.
    pub end: u64,
    /// Where the walk ended (written by the kernel).
    pub walk_end: u64,
    /// Output vector of [`PageRegion`].
    pub vec: u64,
    /// Its capacity.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all be set.
    pub category_mask: u64,
    /// Categories of which one must be set.
    pub category_anyof_mask: u64,
    /// Categories reported.
    pub return_mask: u64,
}

const _: () = assert!(size_of::<PageRegion>() == 24);
const _: () = assert!(size_of::<PmScanArg>() == 96);

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u32 = ioc(IOC_READ | IOC_WRITE, b'f', 16, size_of::<PmScanArg>());
const _: () = assert!(PAGEMAP_SCAN == 0xC060_6610);

/// What one `PAGEMAP_SCAN` call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanResult {
    /// `n` regions were written. With fewer regions than the vector holds, the walk covered the whole
    /// range. With a full vector, continue from `walk_end`. Only then: the kernel sets `walk_end` on
    /// each internal `ENOSPC` (its bounce buffer holds 512 regions) and leaves it stale when the walk
    /// then completes, below regions the same call returned.
    Done {
        /// Regions written.
        n: usize,
        /// Where to continue when the vector was full.
        walk_end: u64,
    },
    /// `EPERM` under `PM_SCAN_CHECK_WPASYNC`: the walk met a VMA not registered for async
    /// write-protect. Regions found before it were written to the vector (whose count the kernel does
    /// not return) and, under `PM_SCAN_WP_MATCHING`, already re-protected: callers must zero the vector
    /// beforehand and collect its non-empty entries.
    NotRegistered,
}

/// Runs `PAGEMAP_SCAN` on `pagemap` (an open `/proc/self/pagemap`) with `arg`, writing into `out`.
/// `arg.vec`, `arg.vec_len` and `arg.size` are filled in here.
///
/// # Errors
/// Any error but `EPERM` (`EINVAL` on kernels without `PAGEMAP_SCAN`).
pub fn scan(pagemap: &impl AsFd, mut arg: PmScanArg, out: &mut [PageRegion]) -> io::Result<ScanResult> {
    arg.size = u64::try_from(size_of::<PmScanArg>()).unwrap_or(96);
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = u64::try_from(out.len()).unwrap_or(0);
    // SAFETY: `arg` is a correctly sized pm_scan_arg (asserted above) that lives for the call; the
    // kernel writes at most `vec_len` PageRegions to `vec`, which points at `out`, exclusively borrowed
    // for the call. The kernel validates the scanned address range itself (access_ok).
    let r = unsafe {
        libc::ioctl(
            pagemap.as_fd().as_raw_fd(),
            libc::c_ulong::from(PAGEMAP_SCAN),
            std::ptr::from_mut(&mut arg),
        )
    };
    if r >= 0 {
        return Ok(ScanResult::Done {
            n: usize::try_from(r).unwrap_or(0),
            walk_end: arg.walk_end,
        });
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        Ok(ScanResult::NotRegistered)
    } else {
        Err(e)
    }
}

/// Bit 63 of a pagemap entry: page present.
pub const PM_PRESENT: u64 = 1 << 63;
/// Bit 62: page swapped.
pub const PM_SWAP: u64 = 1 << 62;
/// Pagemap entry: a file page or shared anonymous memory.
pub const PM_FILE: u64 = 1 << 61;
/// Bit 55: pte is soft-dirty.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Address ranges of om's own scan buffers, which no tracker may track (see [`ScanVec`]).
static INTERNAL: std::sync::Mutex<Vec<std::ops::Range<u64>>> = std::sync::Mutex::new(Vec::new());

/// The ranges trackers must leave alone: om's own scan buffers.
#[must_use]
pub fn internal_ranges() -> Vec<std::ops::Range<u64>> {
    INTERNAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// A `PAGEMAP_SCAN` output buffer in a mapping of its own that trackers never track.
///
/// While the buffers lived on the (tracked) heap, whole-process scans failed with `EFAULT` in about one
/// run in three of `whole_process_sees_new_heap_new_thread_stacks_and_statics` (11/30, 5/20, 7/30);
/// with the buffers in their own untracked mapping, 0/40. The likely mechanism: the kernel's copy of
/// the results faults on a page that tracking write-protected, and a kernel-mode fault gives up when
/// it cannot take the mmap lock (another thread's mmap or brk queued as a writer).
#[derive(Debug)]
pub struct ScanVec {
    region: super::mman::Region,
    len: usize,
}

impl ScanVec {
    /// A zeroed buffer of `len` entries.
    ///
    /// # Errors
    /// When the mapping fails.
    pub fn new(len: usize) -> io::Result<Self> {
        let bytes = (len * size_of::<PageRegion>()).next_multiple_of(super::page_size());
        let region = super::mman::Region::map_anon(bytes.max(super::page_size()), None)?;
        let r = region.addr() as u64..(region.addr() + region.len()) as u64;
        INTERNAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(r);
        Ok(Self { region, len })
    }
}

impl std::ops::Deref for ScanVec {
    type Target = [PageRegion];
    fn deref(&self) -> &[PageRegion] {
        // SAFETY: the region is page-aligned, at least `len` PageRegions long, zero-initialised (a
        // valid PageRegion: plain u64s) and owned by `self`; the shared borrow of `self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.region.addr() as *const PageRegion, self.len) }
    }
}

impl std::ops::DerefMut for ScanVec {
    fn deref_mut(&mut self) -> &mut [PageRegion] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr() as *mut PageRegion, self.len) }
    }
}

impl Drop for ScanVec {
    fn drop(&mut self) {
        let start = self.region.addr() as u64;
        INTERNAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|r| r.start != start);
    }
}
