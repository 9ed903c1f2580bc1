//! Soft-dirty bits: `echo 4 > /proc/self/clear_refs` clears every pte's soft-dirty bit and
//! write-protects it; the first write sets bit 55 of the page's pagemap entry again.
//!
//! Only where the self-test shows it works: kernels without `CONFIG_MEM_SOFT_DIRTY` accept the write
//! to `clear_refs` silently and never set the bit (this machine's 6.18 is one). New VMAs carry
//! `VM_SOFTDIRTY`, so every page of a new mapping reads as soft-dirty: layout changes are seen
//! without extra bookkeeping.
//!
//! Reading the bits and clearing them are two steps, and `clear_refs` acts on the whole process, so a
//! write between them would be lost: [`Tracker::needs_stopped_threads`] is true, as for CRIU's
//! pre-dump, which freezes the task for each round.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use super::maps;
use super::populated::{DEFAULT_MARKER_SWAP_TYPE, PopulatedQuery, ZeroWatch};
use super::{DirtyError, Mechanism, RangeTable, Round, Scope, Tracker, tracked_ranges, tracked_table};
use crate::sys::pagemap::{PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP};

/// See the module documentation.
#[derive(Debug)]
pub struct SoftDirtyTracker {
    scope: Scope,
    pagemap: File,
    clear_refs: File,
    populated: PopulatedQuery,
    buf: Vec<u8>,
    zero: ZeroWatch,
    started: bool,
}

impl SoftDirtyTracker {
    /// # Errors
    /// [`DirtyError::PagemapOpen`], [`DirtyError::ClearRefs`].
    pub fn new(scope: Scope) -> Result<Self, DirtyError> {
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::PagemapOpen)?;
        let clear_refs = OpenOptions::new()
            .write(true)
            .open("/proc/self/clear_refs")
            .map_err(DirtyError::ClearRefs)?;
        let populated = PopulatedQuery::new(&pagemap, DEFAULT_MARKER_SWAP_TYPE);
        Ok(Self {
            scope,
            pagemap,
            clear_refs,
            populated,
            buf: Vec::new(),
            zero: ZeroWatch::default(),
            started: false,
        })
    }

    fn clear(&mut self) -> Result<(), DirtyError> {
        self.clear_refs.write_all(b"4").map_err(DirtyError::ClearRefs)
    }
}

impl Tracker for SoftDirtyTracker {
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        vec![self.pagemap.as_raw_fd(), self.clear_refs.as_raw_fd()]
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::SoftDirty
    }

    fn needs_stopped_threads(&self) -> bool {
        true
    }

    fn start(&mut self) -> Result<RangeTable, DirtyError> {
        self.clear()?;
        self.started = true;
        let maps = maps::read_self()?;
        let mut out = RangeTable::new();
        for (r, _) in tracked_ranges(&maps, &self.scope) {
            self.populated.add(&self.pagemap, r, &mut out)?;
        }
        self.zero.begin(&out);
        Ok(out)
    }

    fn collect(&mut self) -> Result<Round, DirtyError> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        let p = crate::sys::page_size() as u64;
        let maps = maps::read_self()?;
        let mut out = RangeTable::new();
        for (r, _) in tracked_ranges(&maps, &self.scope) {
            let (first, last) = (r.start / p, r.end / p);
            self.buf
                .resize(usize::try_from((last - first) * 8).unwrap_or(0), 0);
            self.pagemap
                .read_exact_at(&mut self.buf, first * 8)
                .map_err(|source| DirtyError::PagemapRead {
                    addr: r.start,
                    source,
                })?;
            for (i, e) in self.buf.chunks_exact(8).enumerate() {
                let e = u64::from_ne_bytes(e.try_into().unwrap_or([0; 8]));
                // An unpopulated page of a new VMA reads as soft-dirty too; only data counts.
                if e & PM_SOFT_DIRTY != 0 && e & (PM_PRESENT | PM_SWAP) != 0 {
                    let a = (first + i as u64) * p;
                    out.push(a..a + p);
                }
            }
        }
        self.clear()?;
        let tracked = tracked_table(&maps, &self.scope);
        let now = self.populated.over(&self.pagemap, &tracked)?;
        let zeroed = self.zero.round(&tracked, &now);
        Ok(Round { dirty: out, zeroed })
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        // Nothing to undo: soft-dirty write-protection faults are resolved by the kernel.
        self.started = false;
        Ok(())
    }
}
