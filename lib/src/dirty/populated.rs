//! Which pages of a range hold the process's own data: present or swapped, not the shared zero
//! page, and not a file's page (in a private file mapping only the copy-on-write copies are the
//! process's; the rest is the file, which a restore maps again, as a checkpoint's capture decides).
//! Shared mappings are never sent page by page, so the rule does not matter for them.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use super::{DirtyError, RangeTable};
use crate::sys::pagemap::{
    self, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PM_FILE, PM_PRESENT, PM_SWAP,
    PageRegion, PmScanArg, ScanResult, ScanVec,
};

/// Output slots per `PAGEMAP_SCAN` call.
pub(crate) const SCAN_VEC: usize = 4096;

/// The swap type of PTE markers in pagemap entries (bits 0-4) when no probe could tell: markers are
/// the last special swap type (`SWP_PTE_MARKER`) with all special types configured, as on 6.18.
pub(crate) const DEFAULT_MARKER_SWAP_TYPE: u64 = 0x1f;
const SWAP_TYPE_MASK: u64 = 0x1f;

/// How populated pages are found.
///
/// A non-present page holds data when it is swapped out or being migrated (both swap-format
/// entries), but not when its entry is a PTE marker: the marker userfaultfd leaves on an unpopulated
/// write-protected page, or a guard marker (`MADV_GUARD_INSTALL`, which must never be read).
/// `PAGEMAP_SCAN` calls them all `PAGE_IS_SWAPPED`, so non-present runs are checked entry by entry.
#[derive(Debug)]
pub(crate) struct PopulatedQuery {
    /// `PAGEMAP_SCAN` output buffer; `None` on kernels without it (before 6.7).
    scan: Option<ScanVec>,
    /// Buffer for classic pagemap entries.
    entries: Vec<u8>,
    marker_type: u64,
}

impl PopulatedQuery {
    /// The best query this kernel supports on `pagemap`; `marker_type` is the swap type of PTE markers.
    pub(crate) fn new(pagemap: &File, marker_type: u64) -> Self {
        let mut probe = vec![PageRegion::default(); 1];
        let arg = PmScanArg {
            start: 0,
            end: 0,
            ..Default::default()
        };
        let scan = pagemap::scan(pagemap, arg, &mut probe)
            .ok()
            .and_then(|_| ScanVec::new(SCAN_VEC).ok());
        Self {
            scan,
            entries: Vec::new(),
            marker_type: marker_type & SWAP_TYPE_MASK,
        }
    }

    /// The populated pages of every range of `ranges`.
    pub(crate) fn over(&mut self, pagemap: &File, ranges: &RangeTable) -> Result<RangeTable, DirtyError> {
        let mut out = RangeTable::new();
        for r in ranges.runs() {
            self.add(pagemap, r.clone(), &mut out)?;
        }
        Ok(out)
    }

    /// Adds the populated pages of `range` to `out`, in order.
    pub(crate) fn add(
        &mut self,
        pagemap: &File,
        range: Range<u64>,
        out: &mut RangeTable,
    ) -> Result<(), DirtyError> {
        let marker = self.marker_type;
        match &mut self.scan {
            Some(vec) => {
                let mut start = range.start;
                while start < range.end {
                    let arg = PmScanArg {
                        start,
                        end: range.end,
                        category_inverted: PAGE_IS_PFNZERO | PAGE_IS_FILE,
                        category_mask: PAGE_IS_PFNZERO | PAGE_IS_FILE,
                        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                        return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                        ..Default::default()
                    };
                    let err = |source| DirtyError::Scan {
                        start,
                        end: range.end,
                        source,
                    };
                    match pagemap::scan(pagemap, arg, vec).map_err(err)? {
                        ScanResult::Done { n, walk_end } => {
                            for r in &vec[..n] {
                                if r.categories & PAGE_IS_PRESENT != 0 {
                                    out.push(r.start..r.end);
                                } else {
                                    entries(pagemap, r.start..r.end, marker, &mut self.entries, out)?;
                                }
                            }
                            if n < vec.len() || walk_end <= start {
                                break;
                            }
                            start = walk_end;
                        }
                        // Without PM_SCAN_CHECK_WPASYNC the kernel never answers EPERM.
                        ScanResult::NotRegistered => break,
                    }
                }
                Ok(())
            }
            None => entries(pagemap, range, marker, &mut self.entries, out),
        }
    }
}

/// Adds the pages of `range` whose pagemap entries say they hold data: present and not a file's page,
/// or swap-format but not a PTE marker.
fn entries(
    pagemap: &File,
    range: Range<u64>,
    marker_type: u64,
    bytes: &mut Vec<u8>,
    out: &mut RangeTable,
) -> Result<(), DirtyError> {
    let p = crate::sys::page_size() as u64;
    const BATCH: u64 = 8192;
    let mut page = range.start / p;
    let last = range.end / p;
    while page < last {
        let n = (last - page).min(BATCH);
        bytes.resize(usize::try_from(n * 8).unwrap_or(0), 0);
        // Written by the kernel: opened first, as the mprotect tracker may have protected it.
        super::open_range(bytes.as_ptr() as usize, bytes.len());
        pagemap
            .read_exact_at(bytes, page * 8)
            .map_err(|source| DirtyError::PagemapRead {
                addr: page * p,
                source,
            })?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
            let data = (e & PM_PRESENT != 0 && e & PM_FILE == 0)
                || (e & PM_SWAP != 0 && e & SWAP_TYPE_MASK != marker_type);
            if data {
                let a = (page + i as u64) * p;
                out.push(a..a + p);
            }
        }
        page += n;
    }
    Ok(())
}

/// Finds pages that held data at the previous round and hold none now (`MADV_DONTNEED`, a range
/// replaced by fresh memory): the receiver must make them zero. The written-page scans cannot be
/// trusted with these: zapping anonymous memory drops its write-protect markers, and the kernel may
/// free a page table left empty.
#[derive(Debug, Default)]
pub(crate) struct ZeroWatch {
    previous: RangeTable,
}

impl ZeroWatch {
    /// Round 0: everything populated now was sent.
    pub(crate) fn begin(&mut self, populated: &RangeTable) {
        self.previous = populated.clone();
    }

    /// A later round: `now` is what is populated in `tracked` (the ranges tracked now). Returns what
    /// became empty. Memory that is no longer mapped at all is not "zeroed": the VMA table tells the
    /// receiver it is gone.
    pub(crate) fn round(&mut self, tracked: &RangeTable, now: &RangeTable) -> RangeTable {
        let zeroed = self.previous.intersection(tracked).difference(now);
        self.previous = now.clone();
        zeroed
    }
}
