//! The primary tracker: userfaultfd asynchronous write-protect and `PAGEMAP_SCAN`.
//!
//! Every tracked VMA is registered with one userfaultfd in write-protect mode, with
//! `UFFD_FEATURE_WP_ASYNC` (the kernel resolves a write fault itself by clearing the page's protection,
//! no thread of ours is involved) and `UFFD_FEATURE_WP_UNPOPULATED` (protecting an unpopulated page
//! leaves a marker, so the first write to it is seen too). A round is one `PAGEMAP_SCAN` per span of
//! tracked VMAs with `PM_SCAN_WP_MATCHING`, which returns the written pages and re-protects them in the
//! same page-table walk.
//!
//! Following the address space: with `PM_SCAN_CHECK_WPASYNC` the scan fails with `EPERM` on any VMA
//! that is not registered, which is exactly a VMA that appeared (mmap, brk, a thread stack), was
//! replaced (`MAP_FIXED`) or was moved (`mremap` drops the registration). The kernel has by then
//! re-protected and copied out the regions before that VMA but does not return their count, so the
//! output vector is zeroed before each call and its non-empty entries are collected. The span is then
//! scanned VMA by VMA; each unregistered VMA is registered and protected, and all its populated pages
//! count as written. A VMA that cannot be registered (`EBUSY`: the application uses userfaultfd there;
//! `EPERM`: shared mapping of a read-only file; `EINVAL`) is reported in full every round.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;

use super::maps::{self, Vma};
use super::populated::{DEFAULT_MARKER_SWAP_TYPE, PopulatedQuery, SCAN_VEC, ZeroWatch};
use super::{
    DirtyError, Mechanism, RangeTable, Round, Scope, Tracker, private_file_table, tracked_ranges,
    tracked_table,
};
use crate::sys::pagemap::{
    self, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, PageRegion, PmScanArg, ScanResult,
    ScanVec,
};
use crate::sys::uffd;

/// Counters of the last round, for logs and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UffdRoundStats {
    /// `PAGEMAP_SCAN` calls.
    pub scans: u32,
    /// VMAs registered this round (new, replaced or moved).
    pub registered: u32,
    /// VMAs that cannot be registered, reported in full.
    pub untrackable: u32,
}

/// See the module documentation.
#[derive(Debug)]
pub struct UffdTracker {
    scope: Scope,
    uffd: OwnedFd,
    pagemap: File,
    populated: PopulatedQuery,
    vec: ScanVec,
    /// Ranges whose registration failed, by (start, end): retried only if the VMA changes.
    untrackable: HashSet<(u64, u64)>,
    /// Ranges we registered, to unregister at stop.
    registered: Vec<Range<u64>>,
    /// Pages that lost their data, found by a populated-page diff every round: of all tracked memory
    /// when the kernel's written-page scan does not report zapped pages (`zero_everywhere`, probed in
    /// `new`), else of the private file mappings alone: a copy-on-write page zapped there leaves a
    /// write-protect marker (the kernel keeps file-backed protection across a zap), so the scan does
    /// not report it, and the page is the file's again.
    zero: ZeroWatch,
    zero_everywhere: bool,
    /// Zeroed ranges found while arming this round: a re-armed range minus its populated pages.
    armed_zeroed: RangeTable,
    started: bool,
    stats: UffdRoundStats,
}

impl UffdTracker {
    /// Opens the userfaultfd (unprivileged through `UFFD_USER_MODE_ONLY` when plain userfaultfd is
    /// refused) and checks that the kernel offers asynchronous write-protect.
    ///
    /// # Errors
    /// [`DirtyError::UffdOpen`], [`DirtyError::UffdApi`], [`DirtyError::PagemapOpen`].
    pub fn new(scope: Scope) -> Result<Self, DirtyError> {
        let fd = open_uffd()?;
        let want = uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED;
        // shmem and hugetlbfs write-protect where offered (6.0+); asked for separately because the
        // handshake fails as a whole on an unknown bit and can be made only once per descriptor.
        let fd = match uffd::api(&fd, want | uffd::FEATURE_WP_HUGETLBFS_SHMEM) {
            Ok(_) => fd,
            Err(_) => {
                let fd = open_uffd()?;
                uffd::api(&fd, want).map_err(DirtyError::UffdApi)?;
                fd
            }
        };
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::PagemapOpen)?;
        let marker = marker_swap_type(&fd, &pagemap).unwrap_or(DEFAULT_MARKER_SWAP_TYPE);
        let populated = PopulatedQuery::new(&pagemap, marker);
        let zaps_reported = zaps_are_reported(&fd, &pagemap);
        if !zaps_reported {
            tracing::info!(
                "this kernel's written-page scan misses zapped pages; diffing populated pages every round"
            );
        }
        Ok(Self {
            scope,
            uffd: fd,
            pagemap,
            populated,
            vec: ScanVec::new(SCAN_VEC).map_err(DirtyError::ScanBuffer)?,
            untrackable: HashSet::new(),
            registered: Vec::new(),
            zero: ZeroWatch::default(),
            zero_everywhere: !zaps_reported,
            armed_zeroed: RangeTable::new(),
            started: false,
            stats: UffdRoundStats::default(),
        })
    }

    /// Counters of the last `start` or `collect`.
    #[must_use]
    pub fn last_round(&self) -> UffdRoundStats {
        self.stats
    }

    /// Registers and write-protects `range`, then adds its populated pages to `out`. A range that
    /// cannot be registered is remembered as untrackable and reported in full.
    fn arm(&mut self, range: Range<u64>, out: &mut RangeTable) -> Result<(), DirtyError> {
        let len = range.end - range.start;
        match uffd::register_wp(&self.uffd, range.start, len) {
            Ok(()) => {
                // Protect first, then look: a page written in between is both reported now and
                // reported next round, never missed.
                match uffd::writeprotect(&self.uffd, range.start, len, true) {
                    Ok(()) => {}
                    // The application unmapped (part of) the range between its registration and
                    // its protection. Its populated pages are reported below; what is still
                    // mapped stays registered, and a registered page without protection is
                    // reported as written by the next scan, so no write is missed.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOMEM)) => {
                        tracing::debug!(
                            start = range.start,
                            end = range.end,
                            "range changed while protecting"
                        );
                    }
                    Err(source) => {
                        return Err(DirtyError::WriteProtect {
                            start: range.start,
                            end: range.end,
                            source,
                        });
                    }
                }
                self.registered.push(range.clone());
                self.stats.registered += 1;
            }
            Err(e) => {
                let code = e.raw_os_error();
                if code == Some(libc::ENOMEM) {
                    // Part of the range was unmapped since the maps were read: the next round sees
                    // the new layout. Report what is there now.
                    tracing::debug!(start = range.start, end = range.end, "range changed while arming");
                } else {
                    tracing::info!(start = format_args!("{:#x}", range.start), end = format_args!("{:#x}", range.end), error = %e,
                        "cannot track this range with userfaultfd; it is sent in full every round");
                    self.untrackable.insert((range.start, range.end));
                }
                self.stats.untrackable += 1;
            }
        }
        let mut now = RangeTable::new();
        self.populated.add(&self.pagemap, range.clone(), &mut now)?;
        // Whatever was here before is gone; the receiver zeroes what holds no data now.
        self.armed_zeroed = self
            .armed_zeroed
            .union(&RangeTable::from_runs(std::iter::once(range)).difference(&now));
        *out = out.union(&now);
        Ok(())
    }

    /// Scans `range` for written pages and re-protects them. Returns false when the walk met an
    /// unregistered VMA (the pages found before it are in `out` all the same).
    fn scan_written(&mut self, range: Range<u64>, out: &mut RangeTable) -> Result<bool, DirtyError> {
        let mut start = range.start;
        while start < range.end {
            // Zeroed so that the entries written before an EPERM can be told apart.
            self.vec.fill(PageRegion::default());
            let arg = PmScanArg {
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end: range.end,
                // Exactly these masks take the kernel's fast path for written-page scans.
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            self.stats.scans += 1;
            let res =
                pagemap::scan(&self.pagemap, arg, &mut self.vec).map_err(|source| DirtyError::Scan {
                    start,
                    end: range.end,
                    source,
                })?;
            match res {
                ScanResult::Done { n, walk_end } => {
                    for r in &self.vec[..n] {
                        out.push(r.start..r.end);
                    }
                    if n < self.vec.len() || walk_end <= start {
                        break;
                    }
                    start = walk_end;
                }
                ScanResult::NotRegistered => {
                    for r in self.vec.iter().take_while(|r| r.end != 0) {
                        out.push(r.start..r.end);
                    }
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The memory whose populated pages are diffed for `zeroed` (see [`UffdTracker::zero`]).
    fn zero_watched(&self, maps: &[Vma]) -> RangeTable {
        if self.zero_everywhere {
            tracked_table(maps, &self.scope)
        } else {
            private_file_table(maps, &self.scope)
        }
    }

    fn round(&mut self) -> Result<Round, DirtyError> {
        self.stats = UffdRoundStats::default();
        self.armed_zeroed = RangeTable::new();
        let maps = maps::read_self()?;
        let tracked: Vec<(Range<u64>, bool)> = tracked_ranges(&maps, &self.scope)
            .map(|(r, _)| {
                let known_bad = self.untrackable.contains(&(r.start, r.end));
                (r, known_bad)
            })
            .collect();
        // A VMA that changed is tried again; one that is gone is forgotten.
        self.untrackable
            .retain(|k| tracked.iter().any(|(r, _)| (r.start, r.end) == *k));

        let mut out = RangeTable::new();
        let mut i = 0;
        while i < tracked.len() {
            if tracked[i].1 {
                self.stats.untrackable += 1;
                self.populated
                    .add(&self.pagemap, tracked[i].0.clone(), &mut out)?;
                i += 1;
                continue;
            }
            // A span: consecutive trackable VMAs, scanned in one call.
            let first = i;
            while i < tracked.len() && !tracked[i].1 {
                i += 1;
            }
            let span = tracked[first].0.start..tracked[i - 1].0.end;
            if self.scan_written(span, &mut out)? {
                continue;
            }
            // Something in the span is not registered: VMA by VMA.
            let mut part = RangeTable::new();
            for (r, _) in &tracked[first..i] {
                let mut written = RangeTable::new();
                if !self.scan_written(r.clone(), &mut written)? {
                    // Written pages found before the failure and the whole VMA's populated pages
                    // overlap: merged, not appended.
                    let mut armed = RangeTable::new();
                    self.arm(r.clone(), &mut armed)?;
                    written = written.union(&armed);
                }
                part = part.union(&written);
            }
            out = out.union(&part);
        }
        let watched = self.zero_watched(&maps);
        let dropped = self
            .zero
            .round(&watched, &self.populated.over(&self.pagemap, &watched)?);
        let zeroed = if self.zero_everywhere {
            dropped
        } else {
            // Zapped anonymous pages in registered ranges are reported as written (and read back
            // as zeros); replaced or moved ranges were re-armed.
            std::mem::take(&mut self.armed_zeroed).union(&dropped)
        };
        Ok(Round { dirty: out, zeroed })
    }
}

/// Does the written-page scan report pages that `MADV_DONTNEED` zapped? Probed on a write-protected
/// 4 MiB region advised for huge pages: a whole 2 MiB (a page table's, or a huge page's, worth) and
/// 16 pages of another are zapped, and all must be reported. True on 6.18, including with
/// `CONFIG_PT_RECLAIM`; a kernel that frees the emptied table would report a hole instead.
fn zaps_are_reported(fd: &OwnedFd, pagemap: &File) -> bool {
    const HUGE: usize = 2 << 20;
    let page = crate::sys::page_size();
    let Ok(mut probe) = crate::sys::mman::Region::map_anon(3 * HUGE, None) else {
        return false;
    };
    let base = probe.addr();
    let off = base.next_multiple_of(HUGE) - base;
    let _ = probe.advise_hugepage(off, 2 * HUGE);
    probe.bytes_mut()[off..off + 2 * HUGE].fill(1);
    let (a, len) = ((base + off) as u64, (2 * HUGE) as u64);
    if uffd::register_wp(fd, a, len).is_err() || uffd::writeprotect(fd, a, len, true).is_err() {
        let _ = uffd::unregister(fd, a, len);
        return false;
    }
    let zapped = probe.dontneed(off, HUGE).is_ok() && probe.dontneed(off + HUGE, 16 * page).is_ok();
    let mut vec = vec![PageRegion::default(); 64];
    let arg = PmScanArg {
        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        start: a,
        end: a + len,
        category_mask: PAGE_IS_WRITTEN,
        return_mask: PAGE_IS_WRITTEN,
        ..Default::default()
    };
    let reported = match pagemap::scan(pagemap, arg, &mut vec) {
        Ok(ScanResult::Done { n, .. }) => vec[..n].iter().map(|r| r.end - r.start).sum::<u64>(),
        _ => 0,
    };
    let _ = uffd::unregister(fd, a, len);
    zapped && reported == (HUGE + 16 * page) as u64
}

/// Learns the swap type the kernel gives PTE markers: write-protects an unpopulated probe page, which
/// leaves a marker, and reads its pagemap entry.
fn marker_swap_type(fd: &OwnedFd, pagemap: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let page = crate::sys::page_size() as u64;
    let probe = crate::sys::mman::Region::map_anon(usize::try_from(page).ok()?, None).ok()?;
    let a = probe.addr() as u64;
    uffd::register_wp(fd, a, page).ok()?;
    let wp = uffd::writeprotect(fd, a, page, true);
    let mut e = [0u8; 8];
    let read = pagemap.read_exact_at(&mut e, a / page * 8);
    let _ = uffd::unregister(fd, a, page);
    wp.ok()?;
    read.ok()?;
    let e = u64::from_ne_bytes(e);
    (e & crate::sys::pagemap::PM_SWAP != 0).then_some(e & 0x1f)
}

/// Opens a userfaultfd: plain, or with `UFFD_USER_MODE_ONLY` when `vm.unprivileged_userfaultfd=0`
/// refuses a plain one to an unprivileged process. User-mode-only still sees the kernel's own writes
/// into tracked pages: async write-protect faults resolve in the kernel.
fn open_uffd() -> Result<OwnedFd, DirtyError> {
    match uffd::open(0) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            uffd::open(uffd::UFFD_USER_MODE_ONLY).map_err(DirtyError::UffdOpen)
        }
        r => r.map_err(DirtyError::UffdOpen),
    }
}

impl Tracker for UffdTracker {
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        vec![self.uffd.as_raw_fd(), self.pagemap.as_raw_fd()]
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::UffdWp
    }

    fn start(&mut self) -> Result<RangeTable, DirtyError> {
        self.stats = UffdRoundStats::default();
        self.started = true;
        let maps: Vec<Vma> = maps::read_self()?;
        let ranges: Vec<Range<u64>> = tracked_ranges(&maps, &self.scope).map(|(r, _)| r).collect();
        let mut out = RangeTable::new();
        for r in ranges {
            self.arm(r, &mut out)?;
        }
        let watched = self.zero_watched(&maps);
        self.zero.begin(&out.intersection(&watched));
        Ok(out)
    }

    fn collect(&mut self) -> Result<Round, DirtyError> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        self.round()
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if !std::mem::take(&mut self.started) {
            return Ok(());
        }
        // Unregistering clears the protection of every page, so no write faults after this. Ranges
        // that were unmapped or changed since are skipped; closing the descriptor releases the rest.
        for r in std::mem::take(&mut self.registered) {
            if let Err(e) = uffd::unregister(&self.uffd, r.start, r.end - r.start) {
                if e.kind() != io::ErrorKind::OutOfMemory && e.raw_os_error() != Some(libc::EINVAL) {
                    tracing::debug!(start = r.start, error = %e, "unregister failed");
                }
            }
        }
        Ok(())
    }
}

impl Drop for UffdTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
