//! The image store: incoming images in memfd-backed sparse memory, memory limits per image and in
//! total, committed images kept until they are saved, restored or dropped.
//!
//! Layout: each image has one memfd. Its VMAs are laid out one after the other in VMA order, so the
//! page at source address `a` of VMA `v` lives at `offset[v] + (a - v.start)`. Only landed pages use
//! memory. A page is *absent* (never sent: unpopulated, or left to the mapped file), *data* (landed)
//! or *zero* (freed since: its memory is released with a hole punch).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use om_transport::api::{ImageSink, ImageStore, Refusal};
use om_transport::sys::Landing;
use om_transport::wire::{Begin, ErrorCode, ImageInfo, Record, Vma};
use rayon::prelude::*;

use crate::sys::ImageMemory;

/// Largest total VMA span of one image (the memfd's length; memory is used only for landed pages).
pub const MAX_SPAN: u64 = 1 << 44;
/// Record bytes kept per image.
pub const MAX_RECORD_BYTES: u64 = 64 << 20;
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
}

/// Page states, one byte per page.
const ABSENT: u8 = 0;
const DATA: u8 = 1;
const ZERO: u8 = 2;
const CHUNK: usize = 512;
const CHUNK_PAGES: u64 = CHUNK as u64;

/// Per-page state, allocated in chunks of 512 pages as pages arrive (a sparse image of a huge VMA
/// costs nothing).
#[derive(Debug, Default)]
struct PageMap {
    chunks: HashMap<u64, Box<[u8; CHUNK]>>,
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
            let c = self
                .chunks
                .entry(chunk)
                .or_insert_with(|| Box::new([ABSENT; CHUNK]));
            for slot in &mut c[lo..hi] {
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
    fn present(&self) -> impl Iterator<Item = (u64, u8)> + '_ {
        let mut keys: Vec<u64> = self.chunks.keys().copied().collect();
        keys.sort_unstable();
        keys.into_iter().flat_map(move |k| {
            self.chunks[&k]
                .iter()
                .enumerate()
                .filter(|(_, s)| **s != ABSENT)
                .map(move |(i, s)| (k * CHUNK_PAGES + i as u64, *s))
        })
    }

    fn get(&self, p: u64) -> u8 {
        self.chunks
            .get(&(p / CHUNK_PAGES))
            .map_or(ABSENT, |c| c[usize::try_from(p % CHUNK_PAGES).unwrap_or(0)])
    }
}

#[derive(Debug)]
struct Shared {
    limits: Limits,
    used: AtomicU64,
    next_id: AtomicU64,
    committed: Mutex<BTreeMap<u64, Arc<Image>>>,
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
        Self {
            shared: Arc::new(Shared {
                limits,
                used: AtomicU64::new(0),
                next_id: AtomicU64::new(1),
                committed: Mutex::new(BTreeMap::new()),
            }),
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
        let mut offsets = Vec::with_capacity(begin.vmas.len());
        let mut span = 0u64;
        for v in &begin.vmas {
            offsets.push(span);
            span += v.len();
            if span > MAX_SPAN {
                return Err((
                    ErrorCode::Limit,
                    format!("the VMAs span more than {MAX_SPAN} bytes"),
                ));
            }
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let len = usize::try_from(span.max(page_size)).map_err(|_| (ErrorCode::Limit, "span".into()))?;
        let mem = ImageMemory::create(&format!("om-image-{id}"), len)
            .map_err(|e| (ErrorCode::Internal, format!("cannot create image memory: {e}")))?;
        // Best effort: huge pages make landing several times faster where shmem THP is enabled.
        let _ = mem.advise_hugepages();
        tracing::debug!(id, peer, span, "image memory created");
        Ok(Image {
            id,
            info: begin.info,
            vmas: begin.vmas.clone(),
            offsets,
            page_size,
            mem,
            pages: Mutex::new(PageMap::default()),
            charged: AtomicU64::new(0),
            records: Mutex::new((Vec::new(), 0)),
            shared: Arc::clone(&self.shared),
        })
    }
}

/// One image, being received or committed.
#[derive(Debug)]
pub struct Image {
    id: u64,
    info: ImageInfo,
    vmas: Vec<Vma>,
    offsets: Vec<u64>,
    page_size: u64,
    mem: ImageMemory,
    pages: Mutex<PageMap>,
    charged: AtomicU64,
    records: Mutex<(Vec<Record>, u64)>,
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

    /// Its VMAs.
    #[must_use]
    pub fn vmas(&self) -> &[Vma] {
        &self.vmas
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
        let (_, off) = self.locate(&run).map_err(|(_, m)| std::io::Error::other(m))?;
        let landed = lock(&self.pages).get(off / self.page_size) == DATA;
        let off = i64::try_from(off).map_err(std::io::Error::other)?;
        let mut done = 0;
        while done < buf.len() {
            let at = off + i64::try_from(done).map_err(std::io::Error::other)?;
            let n = nix::sys::uio::pread(self.mem.fd(), &mut buf[done..], at)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(landed)
    }

    /// The VMA index and image offset of `run`, which must lie inside one VMA.
    fn locate(&self, run: &Range<u64>) -> Result<(usize, u64), Refusal> {
        let i = self.vmas.partition_point(|v| v.end <= run.start);
        match self.vmas.get(i) {
            Some(v) if v.start <= run.start && run.end <= v.end => {
                Ok((i, self.offsets[i] + (run.start - v.start)))
            }
            _ => Err((
                ErrorCode::Protocol,
                format!(
                    "pages {:#x}-{:#x} are not inside one VMA of the image",
                    run.start, run.end
                ),
            )),
        }
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
        let map = lock(&self.pages);
        let mut out: Vec<StateRun> = Vec::new();
        for (page, state) in map.present() {
            let offset = page * self.page_size;
            let v = self.offsets.partition_point(|&o| o <= offset).saturating_sub(1);
            let addr = self.vmas[v].start + (offset - self.offsets[v]);
            let data = state == DATA;
            match out.last_mut() {
                Some(r)
                    if r.addr.end == addr
                        && r.data == data
                        && r.offset + (r.addr.end - r.addr.start) == offset =>
                {
                    r.addr.end += self.page_size;
                }
                _ => out.push(StateRun {
                    addr: addr..addr + self.page_size,
                    data,
                    offset,
                }),
            }
        }
        out
    }
}

impl ImageSink for Image {
    fn id(&self) -> u64 {
        self.id
    }

    fn landing(&self, run: &Range<u64>) -> Result<Vec<Landing<'_>>, Refusal> {
        let (_, off) = self.locate(run)?;
        let n = (run.end - run.start) / self.page_size;
        let (was, now) = lock(&self.pages).set(off / self.page_size, n, DATA);
        self.charge(now - was)?;
        let (o, l) = (usize_of(off), usize_of(run.end - run.start));
        if now > was {
            // One call allocates the pages (huge ones where shmem THP allows) instead of one fault per
            // page inside the socket copy.
            self.mem
                .populate(o, l)
                .map_err(|e| (ErrorCode::Limit, format!("cannot allocate image memory: {e}")))?;
        }
        let zone = self
            .mem
            .zone(o, l)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        Ok(vec![zone])
    }

    fn zero(&self, run: &Range<u64>) -> Result<(), Refusal> {
        let (_, off) = self.locate(run)?;
        let n = (run.end - run.start) / self.page_size;
        let (was, _) = lock(&self.pages).set(off / self.page_size, n, ZERO);
        self.uncharge(was);
        self.mem
            .punch(usize_of(off), usize_of(run.end - run.start))
            .map_err(|e| (ErrorCode::Internal, format!("cannot free zero pages: {e}")))
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
        let shared = Arc::clone(&self.shared);
        lock(&shared.committed).insert(id, self);
        Ok(id)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let bytes = self.charged.load(Ordering::Relaxed);
        self.shared.used.fetch_sub(bytes, Ordering::Relaxed);
        tracing::debug!(id = self.id, bytes, "image memory freed");
    }
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}
