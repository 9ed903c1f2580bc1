//! The image store: incoming images in memfd-backed sparse memory, memory limits per image and in
//! total, committed images kept until they are saved, restored or dropped.
//!
//! Layout: each image has one memfd. Address ranges get a place in it when a VMA table first covers
//! them (*extents*, appended one after the other), and keep it for the image's life, so a new VMA
//! table between rounds (a `Vmas` message: the process mapped or unmapped memory) never moves a
//! landed page. Only landed pages use memory. A page is *absent* (never sent: unpopulated, left to
//! the mapped file, or outside the current VMA table), *data* (landed, with the checksum it arrived
//! with) or *zero* (freed since: its memory is released with a hole punch).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use om_transport::api::{FilePiece, ImageSink, ImageStore, Refusal};
use om_transport::sys::Landing;
use om_transport::wire::{Begin, ErrorCode, Extent, ImageInfo, Record, Vma};
use rayon::prelude::*;

use crate::sys::{ImageMemory, WarmMemory};

/// Largest total VMA span of one image (the memfd's length; memory is used only for landed pages).
pub const MAX_SPAN: u64 = 1 << 44;
/// Record bytes kept per image.
pub const MAX_RECORD_BYTES: u64 = 64 << 20;
/// Address space an image keeps for VMAs that appear between rounds, at least.
const GROWTH: u64 = 1 << 30;
/// Batches with at least this many pages are checked on several cores.
const PARALLEL_VERIFY_PAGES: usize = 64;

/// Memory limits of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of landed pages one image may hold.
    pub per_image: u64,
    /// Bytes of landed pages all images together may hold.
    pub total: u64,
}

impl Limits {
    /// Half of this node's memory for all images together, and for one.
    #[must_use]
    pub fn from_memory() -> Self {
        let total = nix::sys::sysinfo::sysinfo()
            .map(|s| s.ram_total() / 2)
            .unwrap_or(4 << 30);
        Self {
            per_image: total,
            total,
        }
    }

    /// Refuses a reserve of `bytes` that no image could take whole or that exceeds all images'
    /// memory together.
    ///
    /// # Errors
    /// The refusal, naming both limits.
    pub fn check_reserve(&self, bytes: u64) -> Result<(), String> {
        if bytes > self.total.min(self.per_image) {
            return Err(format!(
                "a reserve of {bytes} bytes exceeds this node's image memory limits ({} per image, {} in all)",
                self.per_image, self.total
            ));
        }
        Ok(())
    }
}

/// Page states, one byte per page.
const ABSENT: u8 = 0;
const DATA: u8 = 1;
const ZERO: u8 = 2;
const CHUNK: usize = 512;
const CHUNK_PAGES: u64 = CHUNK as u64;

/// The state of 512 pages.
#[derive(Debug)]
struct Chunk {
    state: [u8; CHUNK],
}

/// Per-page state, allocated in chunks of 512 pages as pages arrive (a sparse image of a huge VMA
/// costs nothing). Indexed by page of image memory.
#[derive(Debug, Default)]
struct PageMap {
    chunks: HashMap<u64, Box<Chunk>>,
}

impl PageMap {
    /// Sets pages `[first, first+n)` (image page indices) to `state`; returns how many were `DATA`
    /// before and how many are `DATA` now among them.
    fn set(&mut self, first: u64, n: u64, state: u8) -> (u64, u64) {
        let (mut was, mut now) = (0, 0);
        let end = first + n;
        let mut p = first;
        while p < end {
            let chunk = p / CHUNK_PAGES;
            let lo = usize::try_from(p % CHUNK_PAGES).unwrap_or(0);
            let hi = usize::try_from((end - chunk * CHUNK_PAGES).min(CHUNK_PAGES)).unwrap_or(CHUNK);
            let c = self.chunks.entry(chunk).or_insert_with(|| {
                Box::new(Chunk {
                    state: [ABSENT; CHUNK],
                })
            });
            for slot in &mut c.state[lo..hi] {
                was += u64::from(*slot == DATA);
                *slot = state;
            }
            if state == DATA {
                now += (hi - lo) as u64;
            }
            p = (chunk + 1) * CHUNK_PAGES;
        }
        (was, now)
    }

    /// Every page that is not absent, as (image page index, state), in index order.
    #[cfg(test)]
    fn present(&self) -> impl Iterator<Item = (u64, u8)> + '_ {
        let mut keys: Vec<u64> = self.chunks.keys().copied().collect();
        keys.sort_unstable();
        keys.into_iter().flat_map(move |k| {
            let c = &self.chunks[&k];
            c.state
                .iter()
                .enumerate()
                .filter(|(_, s)| **s != ABSENT)
                .map(move |(i, s)| (k * CHUNK_PAGES + i as u64, *s))
        })
    }

    fn get(&self, p: u64) -> u8 {
        self.chunks
            .get(&(p / CHUNK_PAGES))
            .map_or(ABSENT, |c| c.state[usize::try_from(p % CHUNK_PAGES).unwrap_or(0)])
    }
}

/// Where address ranges live in image memory.
#[derive(Debug, Default)]
struct Layout {
    /// The current VMA table, in address order.
    vmas: Vec<Vma>,
    /// Extents by start address: `(end, offset)`. Disjoint; never moved or removed.
    extents: BTreeMap<u64, (u64, u64)>,
    /// Extents by offset: start address.
    by_offset: BTreeMap<u64, u64>,
    /// The next free offset.
    next: u64,
    /// The image memory's length: extents must fit below it.
    capacity: u64,
}

impl Layout {
    fn new(vmas: &[Vma], capacity: u64) -> Result<Self, Refusal> {
        let mut l = Self {
            capacity,
            ..Self::default()
        };
        l.set_vmas(vmas)?;
        Ok(l)
    }

    /// Takes a new VMA table and gives every range it covers a place.
    fn set_vmas(&mut self, vmas: &[Vma]) -> Result<(), Refusal> {
        for v in vmas {
            self.cover(v.start..v.end)?;
        }
        self.vmas = vmas.to_vec();
        Ok(())
    }

    /// Adds extents for the parts of `range` no extent covers yet.
    fn cover(&mut self, range: Range<u64>) -> Result<(), Refusal> {
        let mut gaps = Vec::new();
        let mut at = range.start;
        let first = self
            .extents
            .range(..=range.start)
            .next_back()
            .map_or(range.start, |(&s, _)| s);
        for (&s, &(e, _)) in self.extents.range(first..range.end) {
            if e <= at {
                continue;
            }
            if s > at {
                gaps.push(at..s);
            }
            at = at.max(e);
        }
        if at < range.end {
            gaps.push(at..range.end);
        }
        for g in gaps {
            let len = g.end - g.start;
            if self.next + len > self.capacity {
                return Err((
                    ErrorCode::Limit,
                    format!(
                        "the image's VMAs grew beyond its {} bytes of address space",
                        self.capacity
                    ),
                ));
            }
            self.extents.insert(g.start, (g.end, self.next));
            self.by_offset.insert(self.next, g.start);
            self.next += len;
        }
        Ok(())
    }

    /// The pieces of image memory `(offset, len)` that hold `run`, which must lie inside one VMA.
    fn zones(&self, run: &Range<u64>) -> Result<Vec<(u64, u64)>, Refusal> {
        let i = self.vmas.partition_point(|v| v.end <= run.start);
        if !matches!(self.vmas.get(i), Some(v) if v.start <= run.start && run.end <= v.end) {
            return Err((
                ErrorCode::Protocol,
                format!(
                    "pages {:#x}-{:#x} are not inside one VMA of the image",
                    run.start, run.end
                ),
            ));
        }
        self.pieces(run)
    }

    /// The pieces of image memory that hold `run` (which extents cover entirely).
    fn pieces(&self, run: &Range<u64>) -> Result<Vec<(u64, u64)>, Refusal> {
        let mut out = Vec::new();
        let mut at = run.start;
        while at < run.end {
            let Some((&s, &(e, off))) = self.extents.range(..=at).next_back() else {
                break;
            };
            if e <= at {
                break;
            }
            let end = e.min(run.end);
            out.push((off + (at - s), end - at));
            at = end;
        }
        if at < run.end {
            return Err((ErrorCode::Internal, format!("no image memory for {at:#x}")));
        }
        Ok(out)
    }

    /// The source address of image offset `off`.
    #[cfg(test)]
    fn address_of(&self, off: u64) -> Option<u64> {
        self.extent_at(off).map(|(a, _)| a)
    }

    /// The source address of image offset `off`, and how many bytes from there to the end of its
    /// extent.
    fn extent_at(&self, off: u64) -> Option<(u64, u64)> {
        let (&o, &start) = self.by_offset.range(..=off).next_back()?;
        let (end, _) = self.extents.get(&start)?;
        let a = start + (off - o);
        (a < *end).then(|| (a, *end - a))
    }
}

/// The runs of data and zero pages of `map` laid out by `layout`, in address order.
fn state_runs(map: &PageMap, layout: &Layout, ps: u64) -> Vec<StateRun> {
    // This runs while a migrating process is frozen: whole stretches of equal state at a time,
    // one extent lookup per stretch (a page at a time cost 34 ms for 1 GiB).
    let mut out: Vec<StateRun> = Vec::new();
    let mut keys: Vec<u64> = map.chunks.keys().copied().collect();
    keys.sort_unstable();
    for k in keys {
        let c = &map.chunks[&k];
        let mut i = 0;
        while i < CHUNK {
            let state = c.state[i];
            let offset = (k * CHUNK_PAGES + i as u64) * ps;
            let extent = (state != ABSENT).then(|| layout.extent_at(offset)).flatten();
            let Some((addr, left)) = extent else {
                i += 1;
                continue;
            };
            let most = CHUNK.min(i + usize_of(left / ps));
            let n = 1 + c.state[i + 1..most].iter().take_while(|s| **s == state).count();
            let data = state == DATA;
            let len = n as u64 * ps;
            match out.last_mut() {
                Some(r)
                    if r.addr.end == addr
                        && r.data == data
                        && r.offset + (r.addr.end - r.addr.start) == offset =>
                {
                    r.addr.end += len;
                }
                _ => out.push(StateRun {
                    addr: addr..addr + len,
                    data,
                    offset,
                }),
            }
            i += n;
        }
    }
    out.sort_unstable_by_key(|r| r.addr.start);
    out
}

#[derive(Debug)]
struct Shared {
    restorer: Option<Arc<crate::restorer::Restorer>>,
    limits: Limits,
    used: AtomicU64,
    next_id: AtomicU64,
    committed: Mutex<BTreeMap<u64, Arc<Image>>>,
    reserve: Reserve,
}

/// Image memory kept allocated and mapped ahead of the next image (omd's `--reserve`), and what its
/// filler thread waits for.
#[derive(Debug, Default)]
struct Reserve {
    state: Mutex<ReserveState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ReserveState {
    /// Bytes to keep ready; 0 for no reserve.
    size: u64,
    /// The memory, once made.
    spare: Option<WarmMemory>,
    /// Images being received (opened, neither committed nor dropped). The filler waits until there
    /// are none: making the reserve is a first touch of all of it, which would compete with their
    /// landing for the CPUs.
    receiving: usize,
    /// The filler thread runs.
    filler: bool,
    /// When `receiving` last changed.
    changed_at: Option<Instant>,
    /// Images that took the reserve so far.
    taken: u64,
}

/// The reserve is made this many bytes at a time, each step only at a quiet moment (and by a
/// thread of the lowest priority: each step holds omd's memory map lock for reading while the
/// kernel allocates, and an image that begins meanwhile needs it for writing).
const RESERVE_STEP: usize = 16 << 20;
/// How long no image may have begun or ended before a step of the reserve is made: a migration's
/// restore and its copy's first moments follow its image's end.
const QUIET: Duration = Duration::from_millis(500);

/// What [`Store::reserve`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReserveStatus {
    /// Bytes to keep ready (`--reserve`); 0 for none.
    pub size: u64,
    /// Bytes ready now: `size` once made, 0 while it is being made or waits for a quiet moment.
    pub ready: u64,
    /// Images that took the reserve since omd started.
    pub taken: u64,
}

/// Keeps the reserve of the store behind `weak` made, until the store is gone or the reserve is
/// turned off.
fn fill_reserve(weak: &Weak<Shared>) {
    // It competes with nothing of omd's, but with the node's applications, among them a copy
    // that was just migrated here.
    if let Err(e) = crate::sys::lower_thread_priority() {
        tracing::debug!(error = %e, "the reserve's thread keeps its priority");
    }
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let r = &shared.reserve;
        let size = {
            let mut st = lock(&r.state);
            if st.size == 0 {
                st.filler = false;
                return;
            }
            if st.spare.is_some() {
                // Woken by a change; the timeout lets the thread see the store dropped.
                drop(r.changed.wait_timeout(st, Duration::from_secs(1)));
                continue;
            }
            st.size
        };
        let started = Instant::now();
        let made = usize::try_from(size)
            .map_err(std::io::Error::other)
            .and_then(|len| WarmMemory::create(len, RESERVE_STEP, || shared.quiet_for_reserve(size)));
        let mut st = lock(&r.state);
        match made {
            Ok(None) => {} // the size changed meanwhile: made again at the new one
            Ok(Some(w)) if w.len() as u64 == st.size => {
                tracing::info!(
                    bytes = size,
                    ms = started.elapsed().as_millis(),
                    "image memory reserved"
                );
                st.spare = Some(w);
                r.changed.notify_all();
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::warn!(bytes = size, error = %e, "cannot reserve image memory; trying again in 10 s");
                drop(r.changed.wait_timeout(st, Duration::from_secs(10)));
            }
        }
    }
}

impl Shared {
    /// Waits until a step of the reserve of `size` bytes may be made: no image being received, none
    /// begun or ended for [`QUIET`], and room under the total limit. False when the reserve's size
    /// changed meanwhile.
    fn quiet_for_reserve(&self, size: u64) -> bool {
        let r = &self.reserve;
        let mut st = lock(&r.state);
        loop {
            if st.size != size {
                return false;
            }
            let since = st.changed_at.map_or(QUIET, |t| t.elapsed());
            let room = self.used.load(Ordering::Relaxed).saturating_add(size) <= self.limits.total;
            if st.receiving == 0 && room && since >= QUIET {
                return true;
            }
            let wait = if st.receiving == 0 && room {
                QUIET - since
            } else {
                Duration::from_secs(1)
            };
            st = r
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// All images of one omd.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    /// An empty store.
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        Self::with_restorer(limits, None)
    }

    /// An empty store whose migration images are restored by `restorer` on commit.
    #[must_use]
    pub fn with_restorer(limits: Limits, restorer: Option<Arc<crate::restorer::Restorer>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                restorer,
                limits,
                used: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                committed: Mutex::new(BTreeMap::new()),
                reserve: Reserve::default(),
            }),
        }
    }

    /// Keeps `bytes` of image memory allocated and mapped ahead of the next image (0: none), made
    /// again by a thread of its own after an image took it, once no image is being received. An
    /// image takes it when it announces at least half as many populated bytes; its pages then land
    /// with one copy from the socket, without allocating (docs/transport.md, "Reserve").
    ///
    /// The reserve is memory omd holds besides the images' landed pages: it is made only while it
    /// fits under the total limit with them, and the unlanded part of a taken reserve stays with
    /// its image until the image is freed.
    ///
    /// # Errors
    /// A reserve larger than the total limit, or than one image may hold.
    pub fn set_reserve(&self, bytes: u64) -> Result<(), String> {
        self.shared.limits.check_reserve(bytes)?;
        usize::try_from(bytes)
            .map_err(|_| format!("a reserve of {bytes} bytes does not fit this machine"))?;
        let r = &self.shared.reserve;
        let mut st = lock(&r.state);
        if st.size != bytes {
            st.size = bytes;
            st.spare = None;
        }
        if bytes > 0 && !st.filler {
            let weak = Arc::downgrade(&self.shared);
            std::thread::Builder::new()
                .name("omd-reserve".into())
                .spawn(move || fill_reserve(&weak))
                .map_err(|e| format!("cannot start the reserve's thread: {e}"))?;
            st.filler = true;
        }
        r.changed.notify_all();
        Ok(())
    }

    /// The reserve's size and how much of it is ready.
    #[must_use]
    pub fn reserve(&self) -> ReserveStatus {
        let st = lock(&self.shared.reserve.state);
        ReserveStatus {
            size: st.size,
            ready: st.spare.as_ref().map_or(0, |w| w.len() as u64),
            taken: st.taken,
        }
    }

    /// Bytes of landed pages over all images, in progress or committed.
    #[must_use]
    pub fn used(&self) -> u64 {
        self.shared.used.load(Ordering::Relaxed)
    }

    /// The limits.
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// Committed images, by id.
    #[must_use]
    pub fn committed(&self) -> Vec<Arc<Image>> {
        lock(&self.shared.committed).values().cloned().collect()
    }

    /// One committed image.
    #[must_use]
    pub fn get(&self, id: u64) -> Option<Arc<Image>> {
        lock(&self.shared.committed).get(&id).cloned()
    }

    /// Forgets a committed image; its memory is freed when the last user lets go.
    #[must_use]
    pub fn remove(&self, id: u64) -> Option<Arc<Image>> {
        lock(&self.shared.committed).remove(&id)
    }
}

impl ImageStore for Store {
    type Image = Image;

    fn open(&self, begin: &Begin, page_size: u64, peer: &str) -> Result<Image, Refusal> {
        let limits = self.shared.limits;
        let want = begin.info.populated_bytes;
        let used = self.used();
        if want > limits.per_image {
            return Err((
                ErrorCode::Limit,
                format!(
                    "image of {want} bytes exceeds this node's per-image limit of {} bytes",
                    limits.per_image
                ),
            ));
        }
        if used.saturating_add(want) > limits.total {
            return Err((
                ErrorCode::Limit,
                format!(
                    "image of {want} bytes does not fit: {used} of {} bytes of image memory in use",
                    limits.total
                ),
            ));
        }
        let span = begin.vmas.iter().map(Vma::len).fold(0u64, u64::saturating_add);
        if span > MAX_SPAN {
            return Err((
                ErrorCode::Limit,
                format!("the VMAs span more than {MAX_SPAN} bytes"),
            ));
        }
        // Room for the VMAs a process maps between rounds: as much again, at least 1 GiB.
        let capacity = span.saturating_add(span.max(GROWTH)).min(MAX_SPAN).max(page_size);
        let layout = Layout::new(&begin.vmas, capacity)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let len = usize::try_from(capacity).map_err(|_| (ErrorCode::Limit, "span".into()))?;
        // Counted as being received from here: the reserve is not made again meanwhile.
        let warm = self.shared.reserve.take(want).and_then(|w| {
            ImageMemory::from_warm(w, len)
                .inspect_err(
                    |e| tracing::warn!(id, error = %e, "cannot use the reserve; fresh memory instead"),
                )
                .ok()
        });
        let mem = match warm {
            Some(mem) => mem,
            None => ImageMemory::create(&format!("om-image-{id}"), len).map_err(|e| {
                self.shared.reserve.received();
                (ErrorCode::Internal, format!("cannot create image memory: {e}"))
            })?,
        };
        // Best effort: huge pages make landing several times faster where shmem THP is enabled.
        let _ = mem.advise_hugepages();
        tracing::debug!(id, peer, span, warm = mem.warm(), "image memory created");
        Ok(Image {
            id,
            info: begin.info,
            layout: Mutex::new(layout),
            prepared: Mutex::new(None),
            restorer: self.shared.restorer.clone(),
            page_size,
            mem,
            pages: Mutex::new(PageMap::default()),
            charged: AtomicU64::new(0),
            pinned: std::sync::atomic::AtomicBool::new(false),
            records: Mutex::new((Vec::new(), 0)),
            receiving: std::sync::atomic::AtomicBool::new(true),
            shared: Arc::clone(&self.shared),
        })
    }
}

/// One image, being received or committed.
#[derive(Debug)]
pub struct Image {
    id: u64,
    info: ImageInfo,
    layout: Mutex<Layout>,
    /// A migration's copy, restored and held until the go (see [`crate::restorer`]).
    prepared: Mutex<Option<crate::restorer::Prepared>>,
    restorer: Option<Arc<crate::restorer::Restorer>>,
    page_size: u64,
    mem: ImageMemory,
    pages: Mutex<PageMap>,
    charged: AtomicU64,
    /// Exported by a fabric that may pin the memory ([`ImageSink::pin`]).
    pinned: std::sync::atomic::AtomicBool,
    records: Mutex<(Vec<Record>, u64)>,
    /// Counted in the reserve's `receiving` until committed or dropped.
    receiving: std::sync::atomic::AtomicBool,
    shared: Arc<Shared>,
}

/// A run of pages in one state, as the checkpoint writer walks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRun {
    /// Source addresses.
    pub addr: Range<u64>,
    /// True for landed data, false for zero pages.
    pub data: bool,
    /// Offset of the first page in image memory.
    pub offset: u64,
}

impl Image {
    /// The process the image came from.
    #[must_use]
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// Its VMAs (the current table).
    #[must_use]
    pub fn vmas(&self) -> Vec<Vma> {
        lock(&self.layout).vmas.clone()
    }

    /// The page size of the image.
    #[must_use]
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The records received, in order.
    #[must_use]
    pub fn records(&self) -> Vec<Record> {
        lock(&self.records).0.clone()
    }

    /// The image memory.
    #[must_use]
    pub fn memory(&self) -> &ImageMemory {
        &self.mem
    }

    /// Copies the page at `addr` into `buf` (one page long); returns whether it was landed (false for
    /// absent and zero pages, which read as zeros).
    ///
    /// # Errors
    /// An address outside the image, or the read failing.
    pub fn read_page(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        let run = addr..addr + self.page_size;
        let off = self.locate(&run).map_err(|(_, m)| std::io::Error::other(m))?[0].0;
        let landed = lock(&self.pages).get(off / self.page_size) == DATA;
        let off = i64::try_from(off).map_err(std::io::Error::other)?;
        let mut done = 0;
        while done < buf.len() {
            let at = off + i64::try_from(done).map_err(std::io::Error::other)?;
            let n = nix::sys::uio::pread(self.mem.file(), &mut buf[done..], at)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(landed)
    }

    /// Marks the `len` bytes at image offset `off` as holding data and charges the pages that did
    /// not before; returns the data pages before and after.
    fn mark_landed(&self, off: u64, len: u64) -> Result<(u64, u64), Refusal> {
        let (was, now) = lock(&self.pages).set(off / self.page_size, len / self.page_size, DATA);
        self.charge(now - was)?;
        Ok((was, now))
    }

    /// Where `run`, which must lie inside one VMA, lives in image memory: `(offset, len)` pieces.
    fn locate(&self, run: &Range<u64>) -> Result<Vec<(u64, u64)>, Refusal> {
        lock(&self.layout).zones(run)
    }

    fn charge(&self, pages: u64) -> Result<(), Refusal> {
        let bytes = pages * self.page_size;
        let limits = self.shared.limits;
        let mine = self.charged.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let all = self.shared.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if mine > limits.per_image || all > limits.total {
            self.uncharge(pages);
            return Err((
                ErrorCode::Limit,
                format!(
                    "image memory limit exceeded: this image would hold {mine} bytes (limit {}), all images {all} (limit {})",
                    limits.per_image, limits.total
                ),
            ));
        }
        Ok(())
    }

    fn uncharge(&self, pages: u64) {
        let bytes = pages * self.page_size;
        self.charged.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The image's pages as runs of data and zero pages, in address order. Walks only the pages that
    /// arrived, so a huge reserved but unused VMA costs nothing.
    #[must_use]
    pub fn state_runs(&self) -> Vec<StateRun> {
        let layout = lock(&self.layout);
        let map = lock(&self.pages);
        state_runs(&map, &layout, self.page_size)
    }

    /// Makes `len` bytes at image offset `off` zero: released (a hole), or overwritten when the
    /// memory is pinned by an export.
    fn release(&self, off: u64, len: u64) -> std::io::Result<()> {
        if self.pinned.load(std::sync::atomic::Ordering::Acquire) {
            self.mem.clear(usize_of(off), usize_of(len))
        } else {
            self.mem.punch(usize_of(off), usize_of(len))
        }
    }

    /// Makes `len` bytes at `off` zero after `landed` of their pages had held data: nothing to do
    /// when none had (a page that never landed reads zero already: a hole, or reserved memory that
    /// was allocated zeroed). Punching reserved memory that nothing landed in would cost a freeze
    /// the freeing of every page of it: a zero run over a sparse VMA can span hundreds of MiB.
    fn release_landed(&self, landed: u64, off: u64, len: u64) -> std::io::Result<()> {
        if landed == 0 {
            return Ok(());
        }
        self.release(off, len)
    }

    /// Drops pages in `range` (outside the new VMA table): absent again, memory released.
    fn drop_range(&self, layout: &Layout, range: &Range<u64>) -> Result<(), Refusal> {
        for (off, len) in layout.pieces(range).unwrap_or_default() {
            let (was, _) = lock(&self.pages).set(off / self.page_size, len / self.page_size, ABSENT);
            self.uncharge(was);
            self.release_landed(was, off, len)
                .map_err(|e| (ErrorCode::Internal, format!("cannot free dropped pages: {e}")))?;
        }
        Ok(())
    }
}

impl ImageSink for Image {
    fn id(&self) -> u64 {
        self.id
    }

    fn lands_in_file(&self) -> bool {
        true
    }

    fn file_landing(&self, run: &Range<u64>) -> Result<Vec<FilePiece<'_>>, Refusal> {
        let mut pieces = Vec::new();
        let warm_end = self.mem.warm() as u64;
        for (off, len) in self.locate(run)? {
            self.mark_landed(off, len)?;
            // The part in reserved memory is mapped and allocated: the stream lands it there.
            let warm = warm_end.saturating_sub(off).min(len);
            if warm > 0 {
                let zone = self
                    .mem
                    .zone(usize_of(off), usize_of(warm))
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                pieces.push(FilePiece {
                    file: self.mem.file(),
                    offset: off,
                    len: usize_of(warm),
                    mapped: Some(zone),
                });
            }
            if len > warm {
                pieces.push(FilePiece {
                    file: self.mem.file(),
                    offset: off + warm,
                    len: usize_of(len - warm),
                    mapped: None,
                });
            }
        }
        Ok(pieces)
    }

    fn landing(&self, run: &Range<u64>) -> Result<Vec<Landing<'_>>, Refusal> {
        let mut zones = Vec::new();
        for (off, len) in self.locate(run)? {
            let (was, now) = self.mark_landed(off, len)?;
            let (o, l) = (usize_of(off), usize_of(len));
            if now > was {
                // One call allocates the pages (huge ones where shmem THP allows) instead of one
                // fault per page inside the socket copy.
                self.mem
                    .populate(o, l)
                    .map_err(|e| (ErrorCode::Limit, format!("cannot allocate image memory: {e}")))?;
            }
            zones.push(
                self.mem
                    .zone(o, l)
                    .map_err(|e| (ErrorCode::Internal, e.to_string()))?,
            );
        }
        Ok(zones)
    }

    fn pin(&self) {
        self.pinned.store(true, std::sync::atomic::Ordering::Release);
    }

    fn placed(&self) -> Option<(Landing<'_>, Vec<Extent>)> {
        let memory = self.mem.zone(0, self.mem.len()).ok()?;
        let layout = lock(&self.layout);
        let extents = layout
            .extents
            .iter()
            .map(|(&start, &(end, offset))| Extent { start, end, offset })
            .collect();
        Some((memory, extents))
    }

    fn zero(&self, run: &Range<u64>) -> Result<(), Refusal> {
        for (off, len) in self.locate(run)? {
            let (was, _) = lock(&self.pages).set(off / self.page_size, len / self.page_size, ZERO);
            self.uncharge(was);
            self.release_landed(was, off, len)
                .map_err(|e| (ErrorCode::Internal, format!("cannot free zero pages: {e}")))?;
        }
        Ok(())
    }

    fn relayout(&self, begin: &Begin) -> Result<(), Refusal> {
        let mut layout = lock(&self.layout);
        // Pages of the old table that the new one does not cover are gone from the process.
        // Both tables are sorted: one walk over them.
        let mut gone = Vec::new();
        let mut k = 0;
        for v in &layout.vmas {
            while k < begin.vmas.len() && begin.vmas[k].end <= v.start {
                k += 1;
            }
            let mut at = v.start;
            let mut j = k;
            while let Some(c) = begin.vmas.get(j).filter(|c| c.start < v.end) {
                if c.start > at {
                    gone.push(at..c.start);
                }
                at = at.max(c.end);
                j += 1;
            }
            if at < v.end {
                gone.push(at..v.end);
            }
        }
        for g in &gone {
            self.drop_range(&layout, g)?;
        }
        layout.set_vmas(&begin.vmas)
    }

    fn go(&self, token: u64) -> Result<u32, Refusal> {
        let prepared = lock(&self.prepared).take();
        match prepared {
            Some(p) => p.go(token),
            None => Err((ErrorCode::Session, "no prepared copy to start".into())),
        }
    }

    fn record(&self, record: Record) -> Result<(), Refusal> {
        let mut r = lock(&self.records);
        r.1 += record.bytes.len() as u64;
        if r.1 > MAX_RECORD_BYTES {
            return Err((
                ErrorCode::Limit,
                format!("records exceed {MAX_RECORD_BYTES} bytes"),
            ));
        }
        r.0.push(record);
        Ok(())
    }

    fn verify(&self, zones: &[Landing<'_>], sums: &[u32], page_size: usize) -> Vec<usize> {
        let pages: Vec<(&Landing<'_>, usize)> = zones
            .iter()
            .flat_map(|z| (0..z.len()).step_by(page_size).map(move |off| (z, off)))
            .collect();
        let check = |(i, &(z, off)): (usize, &(&Landing<'_>, usize))| {
            let s = z.page_sum(off, page_size);
            (s.is_none() || sums.get(i) != s.as_ref()).then_some(i)
        };
        if pages.len() >= PARALLEL_VERIFY_PAGES {
            pages.par_iter().enumerate().filter_map(check).collect()
        } else {
            pages.iter().enumerate().filter_map(check).collect()
        }
    }

    fn bytes(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    fn commit(self: Arc<Self>) -> Result<u64, Refusal> {
        let id = self.id;
        if self.info.flags & ImageInfo::MIGRATE == 0 {
            // A migration's image counts until its copy runs or is discarded (the image's drop):
            // its restore is part of the freeze.
            self.stop_receiving();
        }
        if self.info.flags & ImageInfo::MIGRATE != 0 {
            let Some(restorer) = &self.restorer else {
                return Err((ErrorCode::Session, "this omd does not restore migrations".into()));
            };
            let prepared = restorer.prepare(&self)?;
            *lock(&self.prepared) = Some(prepared);
            return Ok(id);
        }
        let shared = Arc::clone(&self.shared);
        lock(&shared.committed).insert(id, self);
        Ok(id)
    }
}

impl Image {
    /// Leaves the reserve's count of images being received (once).
    fn stop_receiving(&self) {
        if self.receiving.swap(false, Ordering::AcqRel) {
            self.shared.reserve.received();
        }
    }
}

impl Reserve {
    /// The reserve, for an image that announced `want` populated bytes and is being received from
    /// now on: taken when the image would use at least half of it.
    fn take(&self, want: u64) -> Option<WarmMemory> {
        let mut st = lock(&self.state);
        st.receiving += 1;
        st.changed_at = Some(Instant::now());
        let fits = st
            .spare
            .as_ref()
            .is_some_and(|w| want.saturating_mul(2) >= w.len() as u64);
        let taken = if fits { st.spare.take() } else { None };
        st.taken += u64::from(taken.is_some());
        self.changed.notify_all();
        taken
    }

    /// An image is no longer being received.
    fn received(&self) {
        let mut st = lock(&self.state);
        st.receiving = st.receiving.saturating_sub(1);
        st.changed_at = Some(Instant::now());
        self.changed.notify_all();
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        self.stop_receiving();
        let bytes = self.charged.load(Ordering::Relaxed);
        self.shared.used.fetch_sub(bytes, Ordering::Relaxed);
        tracing::debug!(id = self.id, bytes, "image memory freed");
    }
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: u64 = 4096;

    fn vma(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            pgoff: 0,
            prot: 3,
            flags: 0,
            name: Vec::new(),
        }
    }

    const MIB: u64 = 1 << 20;

    fn begin(populated: u64, start: u64, end: u64) -> Begin {
        Begin {
            info: ImageInfo {
                populated_bytes: populated,
                ..ImageInfo::default()
            },
            vmas: vec![vma(start, end)],
        }
    }

    fn wait_ready(store: &Store, bytes: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.reserve().ready != bytes {
            assert!(
                Instant::now() < deadline,
                "reserve never made: {:?}",
                store.reserve()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A store of 1 GiB with a reserve of `bytes`, made.
    fn store_with_reserve(bytes: u64) -> Store {
        let store = Store::new(Limits {
            per_image: 1 << 30,
            total: 1 << 30,
        });
        store.set_reserve(bytes).unwrap();
        wait_ready(&store, bytes);
        store
    }

    #[test]
    fn an_image_takes_the_reserve_lands_in_it_up_to_its_end_and_it_is_made_again_afterwards() {
        let store = store_with_reserve(8 * MIB);
        // An image that would use less than half of it leaves it.
        let base = 0x1000_0000;
        let small = store.open(&begin(MIB, base, base + MIB), PS, "test").unwrap();
        assert_eq!(small.memory().warm(), 0);
        assert_eq!(store.reserve().ready, 8 * MIB);
        drop(small);
        let big = store
            .open(&begin(12 * MIB, base, base + 12 * MIB), PS, "test")
            .unwrap();
        assert_eq!(big.memory().warm(), 8 << 20);
        assert_eq!(store.reserve().ready, 0);
        // A run across the reserve's end: mapped up to it, through the file after it.
        let pieces = big.file_landing(&(base + 7 * MIB..base + 9 * MIB)).unwrap();
        let kinds: Vec<_> = pieces
            .iter()
            .map(|p| (p.offset, p.len, p.mapped.is_some()))
            .collect();
        assert_eq!(kinds, vec![(7 * MIB, 1 << 20, true), (8 * MIB, 1 << 20, false)]);
        drop(pieces);
        // Not made again while an image is being received, however long...
        std::thread::sleep(QUIET * 3);
        assert_eq!(store.reserve().ready, 0);
        // ...but once it is over.
        drop(big);
        wait_ready(&store, 8 * MIB);
        assert!(store.set_reserve(2 << 30).unwrap_err().contains("exceeds"));
        store.set_reserve(0).unwrap();
        assert_eq!(
            store.reserve(),
            ReserveStatus {
                size: 0,
                ready: 0,
                taken: 1
            }
        );
    }

    /// A zero run or a dropped range frees image memory only where pages had landed: reserved
    /// memory that nothing landed in reads zero already, and freeing it would cost a freeze the
    /// freeing of every page of a sparse VMA (this made an idle migration's final round 30 ms
    /// instead of 2).
    #[test]
    fn zero_runs_free_memory_only_where_pages_landed() {
        use std::os::unix::fs::MetadataExt;
        let store = store_with_reserve(8 * MIB);
        let base = 0x1000_0000;
        let image = store
            .open(&begin(8 * MIB, base, base + 8 * MIB), PS, "test")
            .unwrap();
        let allocated = || image.memory().file().metadata().unwrap().blocks() * 512;
        assert_eq!(allocated(), 8 * MIB);
        image.zero(&(base..base + 4 * MIB)).unwrap();
        assert_eq!(allocated(), 8 * MIB, "nothing had landed there: nothing to free");
        drop(
            image
                .file_landing(&(base + 4 * MIB..base + 4 * MIB + PS))
                .unwrap(),
        );
        image.zero(&(base + 4 * MIB..base + 6 * MIB)).unwrap();
        assert_eq!(allocated(), 6 * MIB, "a landed page: the run is freed");
        let mut page = vec![1u8; 4096];
        assert!(!image.read_page(base + 4 * MIB, &mut page).unwrap());
        assert!(page.iter().all(|&b| b == 0));
    }

    /// The plain definition: every present page on its own, merged with the previous run when it
    /// continues it in address, state and image offset; then in address order.
    fn oracle(map: &PageMap, layout: &Layout) -> Vec<StateRun> {
        let mut out: Vec<StateRun> = Vec::new();
        for (page, state) in map.present() {
            let offset = page * PS;
            let Some(addr) = layout.address_of(offset) else {
                continue;
            };
            let data = state == DATA;
            match out.last_mut() {
                Some(r)
                    if r.addr.end == addr
                        && r.data == data
                        && r.offset + (r.addr.end - r.addr.start) == offset =>
                {
                    r.addr.end += PS;
                }
                _ => out.push(StateRun {
                    addr: addr..addr + PS,
                    data,
                    offset,
                }),
            }
        }
        out.sort_unstable_by_key(|r| r.addr.start);
        out
    }

    proptest! {
        /// Two VMA tables (the second adds extents elsewhere in image memory, out of address
        /// order), pages set to data, zero or absent again at random: the stretch-wise walk gives
        /// exactly the page-wise one.
        #[test]
        fn state_runs_match_the_page_by_page_definition(
            first in proptest::collection::vec((0u64..64, 1u64..1200), 1..5),
            later in proptest::collection::vec((0u64..64, 1u64..1200), 0..4),
            sets in proptest::collection::vec((0u64..6000, 1u64..1500, 0u8..3), 0..40),
        ) {
            // VMAs at 2 MiB slots (disjoint, some adjacent), each up to 1200 pages long.
            let table = |v: &[(u64, u64)]| {
                let mut t: Vec<Vma> = v
                    .iter()
                    .map(|&(slot, pages)| vma((1 << 30) + slot * 512 * PS, (1 << 30) + slot * 512 * PS + pages.min(512) * PS))
                    .collect();
                t.sort_by_key(|v| v.start);
                t.dedup_by_key(|v| v.start);
                t
            };
            let mut layout = Layout::new(&table(&first), 1 << 40).unwrap();
            let mut both = table(&first);
            both.extend(table(&later));
            both.sort_by_key(|v| v.start);
            both.dedup_by_key(|v| v.start);
            layout.set_vmas(&both).unwrap();
            let mut map = PageMap::default();
            for &(page, n, state) in &sets {
                map.set(page, n, state);
            }
            prop_assert_eq!(state_runs(&map, &layout, PS), oracle(&map, &layout));
        }
    }
}
