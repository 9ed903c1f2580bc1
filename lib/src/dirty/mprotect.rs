//! The mprotect fallback: tracked memory is made read-only; the first write to a chunk traps into a
//! SIGSEGV handler that records the chunk and makes it writable again.
//!
//! Chunks are coarse (64 KiB by default, aligned to absolute addresses) because each writable chunk
//! inside a read-only VMA splits it, and a process may hold at most `vm.max_map_count` VMAs (65,530
//! by default; PLATFORM.md measured the handler's `mprotect` failing at about 38,000 scattered pages).
//! A budget bounds the chunks opened per round: past it, the handler opens the whole range at once
//! and marks all of it dirty, so the VMA count stays bounded whatever the write pattern.
//!
//! The handler runs in signal context, so all shared state is static atomics, no locks, no
//! allocation: two tables of tracked ranges (one active, one being built by `collect`) and two halves
//! of a bit pool. A round builds the next table, switches to it, waits until no handler still runs on
//! the old one (an in-flight counter), then harvests and clears the old table's bits and re-protects
//! the harvested chunks. Two orders make it exact without stopping the application: the handler makes a
//! chunk writable before setting its bit, and `collect` clears a bit before re-protecting its chunk.
//!
//! Layout changes are read from `/proc/self/maps`, whose permissions are the truth: inside a tracked
//! range, a writable piece that the bits do not explain (replaced by `MAP_FIXED`, made writable by the
//! application) counts as dirty; a new writable VMA counts as dirty in full; a range that was cut or
//! moved is tracked anew.
//!
//! Kernel writes (`read(2)` into a tracked buffer) do not trap: the system call fails with `EFAULT`.
//! [`open_range`] opens the chunks of a buffer first; the runtime's system-call wrappers call it, and
//! call it before `mremap(2)` too (moved pages would keep our read-only protection where we no longer
//! track them).

use std::fs::File;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};

use super::maps::{self, Vma};
use super::populated::{DEFAULT_MARKER_SWAP_TYPE, PopulatedQuery, ZeroWatch};
use super::{DirtyError, Mechanism, RangeTable, Round, Scope, Tracker, tracked_ranges, tracked_table};
use crate::sys::mman::set_tracked_protection;
use crate::sys::segv;

/// Default chunk size.
pub const DEFAULT_CHUNK: u64 = 64 << 10;
/// Ranges one table can hold; writable ranges beyond it are reported in full every round.
const MAX_SLOTS: usize = 8192;
/// Bit-pool words per half: 2^21 chunks, 128 GiB at 64 KiB chunks (chunks grow beyond that).
const POOL_WORDS: usize = 1 << 15;
/// The most chunks opened per round, whatever `vm.max_map_count` allows.
const MAX_BUDGET: usize = 16_384;
const NONE: usize = usize::MAX;

struct Slot {
    start: AtomicU64,
    end: AtomicU64,
    prot: AtomicU32,
    /// log2 of the chunk size.
    shift: AtomicU32,
    /// First word in the pool half of the table.
    off: AtomicUsize,
    /// Set when the budget ran out and the whole range was opened.
    coarse: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Self {
            start: AtomicU64::new(0),
            end: AtomicU64::new(0),
            prot: AtomicU32::new(0),
            shift: AtomicU32::new(16),
            off: AtomicUsize::new(0),
            coarse: AtomicBool::new(false),
        }
    }
}

struct Table {
    len: AtomicUsize,
    slots: [Slot; MAX_SLOTS],
}

static TABLES: [Table; 2] = [const {
    Table {
        len: AtomicUsize::new(0),
        slots: [const { Slot::new() }; MAX_SLOTS],
    }
}; 2];
static POOL: [[AtomicU64; POOL_WORDS]; 2] = [const { [const { AtomicU64::new(0) }; POOL_WORDS] }; 2];
static ACTIVE: AtomicUsize = AtomicUsize::new(NONE);
static INFLIGHT: AtomicUsize = AtomicUsize::new(0);
static OPENED: AtomicUsize = AtomicUsize::new(0);
static BUDGET: AtomicUsize = AtomicUsize::new(MAX_BUDGET);
static OWNED: AtomicBool = AtomicBool::new(false);

/// A slot's fields, loaded once.
#[derive(Clone, Copy)]
struct SlotView {
    start: u64,
    end: u64,
    shift: u32,
    off: usize,
    prot: i32,
}

impl Slot {
    fn view(&self) -> SlotView {
        SlotView {
            start: self.start.load(SeqCst),
            end: self.end.load(SeqCst),
            shift: self.shift.load(SeqCst),
            off: self.off.load(SeqCst),
            prot: prot_of(self),
        }
    }
}

fn prot_of(slot: &Slot) -> i32 {
    i32::try_from(slot.prot.load(SeqCst)).unwrap_or(libc::PROT_READ | libc::PROT_WRITE)
}

/// The chunk of `addr` in a range, clipped to it: absolute alignment, so chunks are the same
/// whatever VMA boundaries the kernel draws.
fn chunk_of(start: u64, end: u64, shift: u32, addr: u64) -> Range<u64> {
    let c = addr >> shift << shift;
    c.max(start)..(c + (1 << shift)).min(end)
}

/// Bit index of `addr`'s chunk within its range.
fn bit_of(start: u64, shift: u32, addr: u64) -> u64 {
    (addr >> shift) - (start >> shift)
}

/// Resolves a write fault at `addr` if it is in tracked memory. Async-signal-safe: atomics and
/// `mprotect` only.
fn claim(addr: usize) -> bool {
    INFLIGHT.fetch_add(1, SeqCst);
    let r = claim_in_active(addr as u64);
    INFLIGHT.fetch_sub(1, SeqCst);
    r
}

fn claim_in_active(addr: u64) -> bool {
    let t = ACTIVE.load(SeqCst);
    if t > 1 {
        return false;
    }
    let table = &TABLES[t];
    let n = table.len.load(SeqCst).min(MAX_SLOTS);
    let slots = &table.slots[..n];
    let i = slots.partition_point(|s| s.end.load(SeqCst) <= addr);
    let Some(slot) = slots.get(i).filter(|s| s.start.load(SeqCst) <= addr) else {
        return false;
    };
    let (start, end, shift, prot) = (
        slot.start.load(SeqCst),
        slot.end.load(SeqCst),
        slot.shift.load(SeqCst),
        prot_of(slot),
    );
    let words = &POOL[t];
    let off = slot.off.load(SeqCst);
    if slot.coarse.load(SeqCst) || OPENED.fetch_add(1, SeqCst) >= BUDGET.load(SeqCst) {
        // Over budget: open the whole range (one VMA again) and mark all of it.
        if set_tracked_protection(start, end - start, prot).is_err() && !open_page(addr, prot) {
            return false;
        }
        slot.coarse.store(true, SeqCst);
        let nbits = bit_of(start, shift, end - 1) + 1;
        for w in 0..usize::try_from(nbits.div_ceil(64)).unwrap_or(0) {
            if let Some(word) = words.get(off + w) {
                word.store(u64::MAX, SeqCst);
            }
        }
        return true;
    }
    let c = chunk_of(start, end, shift, addr);
    // Writable first, then marked: a collect that clears the bit in between re-protects the chunk, and
    // the retried write traps again and marks it then.
    if set_tracked_protection(c.start, c.end - c.start, prot).is_err() && !open_page(addr, prot) {
        return false;
    }
    let b = bit_of(start, shift, addr);
    if let Some(word) = words.get(off + usize::try_from(b / 64).unwrap_or(usize::MAX)) {
        word.fetch_or(1 << (b % 64), SeqCst);
    }
    true
}

/// Opens the page at `addr` alone, when its chunk (or range) cannot be opened as a whole because it
/// runs over a hole: memory unmapped inside a range that is still tracked (a gap in the maps is no
/// evidence that a range ended). The faulting page itself is mapped. Async-signal-safe.
fn open_page(addr: u64, prot: i32) -> bool {
    let page = crate::sys::page_size() as u64;
    set_tracked_protection(addr & !(page - 1), page, prot).is_ok()
}

/// True while a thread runs the fault handler's claim (or [`open_range`]). A freeze that parks a
/// thread there must let it go again: the harvest and [`Tracker::stop`] wait for the claim to end.
pub(crate) fn fault_handler_running() -> bool {
    INFLIGHT.load(SeqCst) != 0
}

/// Opens the tracked memory in `[addr, addr+len)` (restores write access) and marks it dirty. A no-op
/// when no mprotect tracker runs; cheap when none of the range is tracked.
///
/// The runtime's system-call wrappers call it before the kernel writes into application memory
/// (`read(2)`, `recv(2)`, ...: a protected buffer would make the call fail with `EFAULT`) and before
/// `mremap(2)` (moved pages would keep their read-only protection at an address the tracker does not
/// know, and the next write there would kill the process).
pub fn open_range(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    INFLIGHT.fetch_add(1, SeqCst);
    let t = ACTIVE.load(SeqCst);
    if t <= 1 {
        let (a, b) = (addr as u64, (addr as u64).saturating_add(len as u64));
        let table = &TABLES[t];
        for s in &table.slots[..table.len.load(SeqCst).min(MAX_SLOTS)] {
            let SlotView {
                start,
                end,
                shift,
                off,
                prot,
            } = s.view();
            let (lo, hi) = (a.max(start), b.min(end));
            if lo >= hi {
                continue;
            }
            // Whole chunks, writable first and marked after, as in the handler.
            let (lo, hi) = (
                chunk_of(start, end, shift, lo).start,
                chunk_of(start, end, shift, hi - 1).end,
            );
            if set_tracked_protection(lo, hi - lo, prot).is_err() {
                continue;
            }
            for bit in bit_of(start, shift, lo)..=bit_of(start, shift, hi - 1) {
                if let Some(w) = POOL[t].get(off + usize::try_from(bit / 64).unwrap_or(usize::MAX)) {
                    w.fetch_or(1 << (bit % 64), SeqCst);
                }
            }
        }
    }
    INFLIGHT.fetch_sub(1, SeqCst);
}

/// One range of a table, with what backs it (to tell replaced memory apart) and its own protection.
#[derive(Debug, Clone)]
struct Planned {
    start: u64,
    end: u64,
    prot: i32,
    dev: (u32, u32),
    inode: u64,
    shared: bool,
    /// True when it is new (or changed) this round: protect it and report it in full.
    fresh: bool,
}

impl Planned {
    fn new(r: &Range<u64>, prot: i32, v: &Vma, fresh: bool) -> Self {
        Self {
            start: r.start,
            end: r.end,
            prot,
            dev: v.dev,
            inode: v.inode,
            shared: v.perms.shared,
            fresh,
        }
    }

    fn backs(&self, v: &Vma) -> bool {
        self.dev == v.dev && self.inode == v.inode && self.shared == v.perms.shared
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct MprotectTracker {
    scope: Scope,
    pagemap: File,
    populated: PopulatedQuery,
    base_shift: u32,
    /// The ranges of the active table, slot by slot.
    identity: Vec<Planned>,
    /// Writable ranges that did not fit in a table, or must never be protected (stacks, the tracker's
    /// own state): reported in full every round.
    overflow: Vec<Range<u64>>,
    zero: ZeroWatch,
    /// New writable VMAs seen last round: protected from this round on if still there, unchanged.
    probation: Vec<(u64, u64)>,
    started: bool,
}

impl MprotectTracker {
    /// # Errors
    /// [`DirtyError::MprotectBusy`] when another one runs in this process; [`DirtyError::PagemapOpen`].
    pub fn new(scope: Scope) -> Result<Self, DirtyError> {
        if OWNED.swap(true, SeqCst) {
            return Err(DirtyError::MprotectBusy);
        }
        let pagemap = match File::open("/proc/self/pagemap") {
            Ok(f) => f,
            Err(e) => {
                OWNED.store(false, SeqCst);
                return Err(DirtyError::PagemapOpen(e));
            }
        };
        let populated = PopulatedQuery::new(&pagemap, DEFAULT_MARKER_SWAP_TYPE);
        let chunk = std::env::var("OM_MPROTECT_CHUNK")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|c| c.is_power_of_two() && *c >= crate::sys::page_size() as u64)
            .unwrap_or(DEFAULT_CHUNK);
        Ok(Self {
            scope,
            pagemap,
            populated,
            base_shift: chunk.trailing_zeros(),
            identity: Vec::new(),
            overflow: Vec::new(),
            zero: ZeroWatch::default(),
            probation: Vec::new(),
            started: false,
        })
    }

    /// Protection changes on memory that may have been unmapped meanwhile: `ENOMEM` means it is gone.
    fn protect_if_mapped(start: u64, end: u64, prot: i32) -> Result<(), DirtyError> {
        match set_tracked_protection(start, end - start, prot) {
            // A hole inside the range: `mprotect` changed the VMAs before it and stopped there,
            // leaving whatever lies beyond as it was (writable memory whose writes would then be
            // missed). Again VMA by VMA, only memory of this range's kind (its protection with or
            // without write); what went away stays away.
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                let same = |p: i32| p & !libc::PROT_WRITE == prot & !libc::PROT_WRITE;
                for v in maps::read_self()?
                    .iter()
                    .filter(|v| v.start < end && start < v.end && !v.perms.shared && same(v.perms.prot()))
                {
                    let (a, b) = (v.start.max(start), v.end.min(end));
                    match set_tracked_protection(a, b - a, prot) {
                        Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {}
                        r => r.map_err(|source| DirtyError::Protect {
                            start: a,
                            end: b,
                            source,
                        })?,
                    }
                }
                Ok(())
            }
            r => r.map_err(|source| DirtyError::Protect { start, end, source }),
        }
    }

    /// Plans the next table from the maps: continuing ranges keep going, the rest is fresh. Pieces
    /// that must never be protected go to `pinned`; the pieces of continuing ranges seen in the maps go
    /// to `ours`.
    ///
    /// A continuing range keeps its whole extent in the table, gaps included (a gap may be a misread),
    /// so the table is no map of what may be protected: a gap can hold memory mapped since, a thread
    /// stack among it. Only `ours` is.
    ///
    /// New writable memory serves one round of probation, reported in full but not protected: memory
    /// being set up (a thread's signal stack is mapped writable first and gets its guard page a moment
    /// later) must not become read-only before it shows what it is.
    fn plan(
        &mut self,
        maps: &[Vma],
        active: Option<usize>,
        pinned: &mut Vec<Range<u64>>,
        ours: &mut RangeTable,
    ) -> Vec<Planned> {
        let mut probation: Vec<(u64, u64)> = Vec::new();
        let mut planned: Vec<Planned> = Vec::new();
        let mut continuing: Vec<bool> = vec![true; self.identity.len()];
        // Pieces, split at tracked-range boundaries: the kernel merges a range we made read-only with a
        // read-only neighbour of the same file (a library's .data with its RELRO), so one VMA can
        // hold a tracked range and more.
        let mut pieces: Vec<(Range<u64>, Option<usize>, &Vma)> = Vec::new();
        for (r, v) in tracked_ranges(maps, &self.scope) {
            if v.perms.write && must_not_protect(maps, v) {
                pinned.push(r);
                continue;
            }
            let mut a = r.start;
            while a < r.end {
                let i = self.identity.partition_point(|id| id.end <= a);
                let (b, slot) = match self.identity.get(i).filter(|_| active.is_some()) {
                    Some(id) if id.start <= a => (r.end.min(id.end), id.backs(v).then_some(i)),
                    Some(id) => (r.end.min(id.start), None),
                    None => (r.end, None),
                };
                pieces.push((a..b, slot, v));
                a = b;
            }
        }
        // A slot continues unless a piece inside it shows a change: other permissions than its own or its
        // own minus write. Pieces with other backing were already split off (slot `None`). A gap is no
        // evidence: /proc/self/maps is read in parts while our handler splits and merges VMAs, so a
        // read can miss a piece; memory that really went away is simply not found again (re-protecting
        // it fails with ENOMEM, which is ignored).
        for (r, slot, v) in &pieces {
            if let Some(i) = *slot {
                let prot = self.identity[i].prot;
                let p = v.perms.prot();
                if p != prot && p != prot & !libc::PROT_WRITE {
                    tracing::debug!(start = r.start, "tracked range changed protection");
                    continuing[i] = false;
                }
            }
        }
        for (r, s, v) in &pieces {
            match s {
                Some(i) if continuing[*i] => {
                    ours.push(r.clone());
                    let id = &self.identity[*i];
                    if planned.last().is_none_or(|p| p.start != id.start) {
                        planned.push(Planned {
                            fresh: false,
                            ..id.clone()
                        });
                    }
                }
                Some(i) => {
                    // Part of a range that was cut, moved or changed: track anew. Its read-only pieces
                    // are ours (same identity, protection minus write), so they keep the writable
                    // protection as their own.
                    planned.push(Planned::new(r, self.identity[*i].prot, v, true));
                }
                None if v.perms.write => {
                    // The piece, not its VMA: the part of a VMA that a tracked range does not cover
                    // is new memory on its own, and the VMA's bounds change when the covered part
                    // becomes read-only, which would restart the probation.
                    let key = (r.start, r.end);
                    if active.is_none() || self.probation.contains(&key) {
                        planned.push(Planned::new(r, v.perms.prot(), v, true));
                    } else {
                        probation.push(key);
                        pinned.push(r.clone());
                    }
                }
                None => {}
            }
        }
        self.probation = probation;
        planned
    }

    /// Builds, protects and publishes the next table; returns the fresh ranges and the old table.
    fn publish(&mut self, planned: &[Planned]) -> Result<(Vec<Range<u64>>, Option<usize>), DirtyError> {
        let old = ACTIVE.load(SeqCst);
        let old = (old <= 1).then_some(old);
        let next = old.map_or(0, |t| 1 - t);
        let (fit, over) = planned.split_at(planned.len().min(MAX_SLOTS));
        self.overflow = over.iter().map(|p| p.start..p.end).collect();
        // One chunk size for the round, grown until every range's bits fit in the pool half.
        let page_shift = (crate::sys::page_size() as u64).trailing_zeros();
        let mut shift = self.base_shift.max(page_shift);
        let words_needed = |shift: u32| -> usize {
            fit.iter()
                .map(|p| {
                    usize::try_from((bit_of(p.start, shift, p.end - 1) + 1).div_ceil(64))
                        .unwrap_or(usize::MAX)
                })
                .fold(0usize, usize::saturating_add)
        };
        while words_needed(shift) > POOL_WORDS && shift < 40 {
            shift += 1;
        }
        let table = &TABLES[next];
        let mut off = 0;
        for (i, p) in fit.iter().enumerate() {
            let s = &table.slots[i];
            s.start.store(p.start, SeqCst);
            s.end.store(p.end, SeqCst);
            s.prot.store(u32::try_from(p.prot).unwrap_or(0), SeqCst);
            s.shift.store(shift, SeqCst);
            s.off.store(off, SeqCst);
            s.coarse.store(false, SeqCst);
            let words = usize::try_from((bit_of(p.start, shift, p.end - 1) + 1).div_ceil(64)).unwrap_or(0);
            for w in &POOL[next][off..off + words] {
                w.store(0, SeqCst);
            }
            off += words;
        }
        table.len.store(fit.len(), SeqCst);
        self.identity = fit.to_vec();
        // Publish, then make fresh ranges read-only: the table that claims their faults must be active
        // before any can trap. A write before the protection lands needs no trap: the range is
        // reported in full this round and read after.
        OPENED.store(0, SeqCst);
        ACTIVE.store(next, SeqCst);
        let mut fresh = Vec::new();
        for p in fit.iter().filter(|p| p.fresh) {
            Self::protect_if_mapped(p.start, p.end, p.prot & !libc::PROT_WRITE)?;
            fresh.push(p.start..p.end);
        }
        Ok((fresh, old))
    }

    /// Waits until no handler runs on the old table, then clears its bits and returns the chunks they
    /// marked; the caller re-protects them.
    fn harvest(old: usize) -> RangeTable {
        while INFLIGHT.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        let table = &TABLES[old];
        let mut out = RangeTable::new();
        for s in &table.slots[..table.len.load(SeqCst).min(MAX_SLOTS)] {
            let SlotView {
                start,
                end,
                shift,
                off,
                ..
            } = s.view();
            let nbits = bit_of(start, shift, end - 1) + 1;
            for w in 0..usize::try_from(nbits.div_ceil(64)).unwrap_or(0) {
                let mut bits = POOL[old][off + w].swap(0, SeqCst);
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let idx = w as u64 * 64 + b;
                    if idx < nbits {
                        let first = ((start >> shift) + idx) << shift;
                        out.push(chunk_of(start, end, shift, first.max(start)));
                    }
                }
            }
        }
        out
    }

    /// Memory of the active table that the next table will not track goes back to its own protection
    /// first, while the active table still claims its faults: nothing stays read-only untracked.
    fn restore_dropped(&self, maps: &[Vma], planned: &[Planned]) -> Result<(), DirtyError> {
        let next = RangeTable::from_runs(planned.iter().map(|p| p.start..p.end));
        for id in &self.identity {
            let dropped = RangeTable::from_runs(std::iter::once(id.start..id.end)).difference(&next);
            for r in dropped.runs() {
                for v in maps.iter().filter(|v| v.start < r.end && r.start < v.end) {
                    if v.perms.prot() == id.prot & !libc::PROT_WRITE && id.backs(v) {
                        let (a, b) = (v.start.max(r.start), v.end.min(r.end));
                        Self::protect_if_mapped(a, b, id.prot)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn round(&mut self, first: bool) -> Result<Round, DirtyError> {
        let maps = maps::read_self()?;
        let budget = max_map_count().saturating_sub(maps.len()) / 3;
        BUDGET.store(budget.min(MAX_BUDGET), SeqCst);
        let active = if first {
            None
        } else {
            Some(ACTIVE.load(SeqCst)).filter(|t| *t <= 1)
        };
        let mut pinned = Vec::new();
        let mut ours = RangeTable::new();
        let planned = self.plan(&maps, active, &mut pinned, &mut ours);
        if active.is_some() {
            self.restore_dropped(&maps, &planned)?;
        }
        let (fresh, old) = self.publish(&planned)?;
        self.overflow.extend(pinned);
        let mut dirty = RangeTable::new();
        if let Some(old) = old {
            dirty = Self::harvest(old);
            // Writable memory in the pieces of continuing ranges that no bit explains: replaced or
            // opened by the application. Dirty, like the marked chunks. An intersection, not
            // containment: the kernel may merge such memory with a writable neighbour outside the
            // range.
            let writable = RangeTable::from_runs(
                maps.iter()
                    .filter(|v| v.perms.write)
                    .filter_map(|v| self.scope.clip(v)),
            );
            dirty = dirty.union(&writable.intersection(&ours));
            // Cleared above, now read-only again, range by range (a merged run may span two ranges of
            // different protections), and only in the pieces the maps showed as the range's own: a
            // marked chunk may reach into memory that is no longer the range's.
            let reprotect = dirty.intersection(&ours);
            for p in planned.iter().filter(|p| !p.fresh) {
                for r in reprotect.intersect(&(p.start..p.end)).runs() {
                    Self::protect_if_mapped(r.start, r.end, p.prot & !libc::PROT_WRITE)?;
                }
            }
        }
        let tracked = tracked_table(&maps, &self.scope);
        let now = self.populated.over(&self.pagemap, &tracked)?;
        if first {
            // Round 0 is every populated page in scope, read-only memory included: a read-only
            // private mapping holds data of its own too (a library's RELRO, relocated by ld.so).
            self.zero.begin(&now);
            return Ok(Round {
                dirty: now,
                zeroed: RangeTable::new(),
            });
        }
        // Only data: the populated pages of the dirty chunks, fresh ranges and overflow, from the one
        // scan of the tracked memory that also tells which pages lost their data.
        let wanted = dirty.union(&RangeTable::from_runs(
            fresh.into_iter().chain(self.overflow.iter().cloned()),
        ));
        let out = now.intersection(&wanted);
        let zeroed = self.zero.round(&tracked, &now);
        Ok(Round { dirty: out, zeroed })
    }
}

/// Memory whose protection would kill the process or the tracker, reported in full instead:
///
/// - stacks: a write fault on a read-only stack cannot be delivered (the kernel has nowhere to put
///   the signal frame) and kills the process. `[stack]`, and thread stacks, which glibc and most
///   runtimes map with a `PROT_NONE` guard page directly below;
/// - the VMA holding the tracker's own state, which the handler writes;
/// - the main thread's thread control block and rseq area, which the kernel writes for it (a
///   failed kernel write there kills the thread; other threads' blocks lie in their guarded stacks).
fn must_not_protect(maps: &[Vma], v: &Vma) -> bool {
    if v.path == "[stack]" {
        return true;
    }
    let guarded = maps
        .iter()
        .any(|g| g.end == v.start && g.perms.prot() == libc::PROT_NONE && !g.perms.shared);
    let own = [
        std::ptr::from_ref(&POOL) as u64,
        std::ptr::from_ref(&TABLES) as u64,
        std::ptr::from_ref(&INFLIGHT) as u64,
    ];
    let kernel = crate::sys::task::main_thread_kernel_areas();
    guarded
        || own
            .iter()
            .chain(kernel.iter().filter(|a| **a != 0))
            .any(|a| v.start <= *a && *a < v.end)
}

fn max_map_count() -> usize {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65_530)
}

impl Tracker for MprotectTracker {
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        vec![self.pagemap.as_raw_fd()]
    }

    fn mechanism(&self) -> Mechanism {
        Mechanism::Mprotect
    }

    fn granularity(&self) -> u64 {
        let t = ACTIVE.load(SeqCst);
        if t <= 1 && TABLES[t].len.load(SeqCst) > 0 {
            1 << TABLES[t].slots[0].shift.load(SeqCst)
        } else {
            1 << self.base_shift
        }
    }

    fn start(&mut self) -> Result<RangeTable, DirtyError> {
        segv::install(claim).map_err(DirtyError::SignalHandler)?;
        self.started = true;
        Ok(self.round(true)?.dirty)
    }

    fn shows_in_maps(&self) -> bool {
        true
    }

    fn collect(&mut self) -> Result<Round, DirtyError> {
        if !self.started {
            return Err(DirtyError::NotStarted);
        }
        self.round(false)
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if !std::mem::take(&mut self.started) {
            return Ok(());
        }
        // Writable again first, unpublished after: a write in between still finds its handler.
        let t = ACTIVE.load(SeqCst);
        let mut result = Ok(());
        if t <= 1 {
            let maps = maps::read_self()?;
            let table = &TABLES[t];
            for s in &table.slots[..table.len.load(SeqCst).min(MAX_SLOTS)] {
                let (start, end, prot) = (s.start.load(SeqCst), s.end.load(SeqCst), prot_of(s));
                for v in maps
                    .iter()
                    .filter(|v| v.start < end && start < v.end && v.perms.prot() == prot & !libc::PROT_WRITE)
                {
                    let (a, b) = (v.start.max(start), v.end.min(end));
                    if let Err(source) = set_tracked_protection(a, b - a, prot) {
                        result = Err(DirtyError::Protect {
                            start: a,
                            end: b,
                            source,
                        });
                    }
                }
            }
        }
        ACTIVE.store(NONE, SeqCst);
        while INFLIGHT.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        segv::release();
        self.identity.clear();
        result
    }
}

/// In a restored copy: the tracker that ran in the source was stopped before the capture and is
/// forgotten there (its descriptors are not the copy's), so it never drops; let a new one start.
pub fn forget_copied() {
    OWNED.store(false, SeqCst);
}

impl Drop for MprotectTracker {
    fn drop(&mut self) {
        let _ = self.stop();
        OWNED.store(false, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_absolute_and_clipped() {
        assert_eq!(chunk_of(0x10000, 0x50000, 16, 0x12345), 0x10000..0x20000);
        assert_eq!(chunk_of(0x11000, 0x50000, 16, 0x12345), 0x11000..0x20000);
        assert_eq!(chunk_of(0x11000, 0x1f000, 16, 0x1e000), 0x11000..0x1f000);
        assert_eq!(bit_of(0x11000, 16, 0x11000), 0);
        assert_eq!(bit_of(0x11000, 16, 0x20000), 1);
    }
}
