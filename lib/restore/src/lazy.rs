//! Lazy restore: the big VMAs of an image are not read before the process runs. They are
//! registered with a userfaultfd (missing-page mode) and this server, in the restorer, fills each
//! page on its first touch and, in the background, every other page, straight from the mapped pages
//! file (`UFFDIO_COPY`). Once every page is in, it closes the userfaultfd and the process no longer
//! depends on it.
//!
//! The process keeps running meanwhile and may change its memory map; the non-cooperative events say
//! so and keep the server right (the kernel holds back fills while an event is unread, `EAGAIN`):
//!
//! - `REMOVE` (`MADV_DONTNEED`) and `UNMAP`: those addresses no longer take image data; a fault
//!   there gets a zero page, as it would have without om (the memfd trap of PLATFORM.md avoided).
//! - `REMAP` (`mremap`): the image data moves with the mapping.
//! - `FORK`: the child gets a userfaultfd of its own, with the parent's map at that moment; pages
//!   neither had touched are served to it too.
//!
//! Each page's checksum is checked before it is copied. A bad page cannot be refused any more (the
//! process runs): the process is killed and the restore reports the page; the checkpoint is intact.

use std::ops::Range;
use std::os::fd::AsFd;

use om::image::Checkpoint;
use om::sys::uffd::{self, Fill, UffdMsg};

/// Bytes filled per background step (faults are served between steps).
const STEP: u64 = 1 << 20;

/// Image data: `addr` in the image, at `offset` in the pages file, with its first checksum index.
#[derive(Debug, Clone)]
struct Data {
    addr: Range<u64>,
    offset: u64,
    sum: usize,
}

/// Where part of the image's lazy memory is now: `now` in the process, starting at image `image`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    start: u64,
    end: u64,
    image: u64,
}

/// One bit per data page of the image.
#[derive(Debug, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    /// How many of the `n` bits from `i` on equal `value`, counted from `i` until the first that
    /// does not.
    fn run(&self, i: usize, n: usize, value: bool) -> usize {
        (0..n).take_while(|k| self.get(i + k) == value).count()
    }
}

/// One address space served: the restored process, or a child it forked meanwhile.
#[derive(Debug)]
struct Space {
    uffd: uffd::Foreign,
    pieces: Vec<Piece>,
    /// Background fill position: an address in the process; everything below is done.
    cursor: u64,
    /// Faulting addresses read but not yet served.
    faults: std::collections::VecDeque<u64>,
    /// Data pages already in this space (filled, or found present).
    filled: Bits,
}

/// How a fill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filled {
    /// The range is done (filled, or no longer there).
    Done,
    /// An event came first and was handled: look again.
    Retry,
    /// The space is gone (the process ended).
    Gone,
}

/// Why serving stopped early.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A page failed its checksum.
    #[error("page {0:#x} of the image fails its checksum; the restored process was stopped")]
    Checksum(u64),
}

/// The server.
#[derive(Debug)]
pub struct Server<'a> {
    page: u64,
    pages: &'a [u8],
    sums: &'a [u32],
    data: Vec<Data>,
    spaces: Vec<Space>,
    /// Data pages whose checksum was checked.
    verified: Bits,
}

fn cut(pieces: &mut Vec<Piece>, r: &Range<u64>) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut kept = Vec::with_capacity(pieces.len() + 1);
    for p in pieces.drain(..) {
        if p.end <= r.start || p.start >= r.end {
            kept.push(p);
            continue;
        }
        if p.start < r.start {
            kept.push(Piece { end: r.start, ..p });
        }
        if p.end > r.end {
            kept.push(Piece {
                start: r.end,
                image: p.image + (r.end - p.start),
                ..p
            });
        }
        let s = p.start.max(r.start);
        let e = p.end.min(r.end);
        out.push(Piece {
            start: s,
            end: e,
            image: p.image + (s - p.start),
        });
    }
    *pieces = kept;
    out
}

/// `mremap` of `[from, from + len)` to `to`: the image data there moves along; whatever was at the
/// destination is gone (the kernel unmaps it first).
fn remap(pieces: &mut Vec<Piece>, from: u64, to: u64, len: u64) {
    let moved = cut(pieces, &(from..from + len));
    cut(pieces, &(to..to + len));
    pieces.extend(moved.into_iter().map(|p| Piece {
        start: p.start - from + to,
        end: p.end - from + to,
        image: p.image,
    }));
    pieces.sort_by_key(|p| p.start);
}

/// The image address behind process address `at`, if the image still holds data for it.
#[cfg(test)]
fn lookup(pieces: &[Piece], at: u64) -> Option<u64> {
    pieces
        .iter()
        .find(|p| p.start <= at && at < p.end)
        .map(|p| p.image + (at - p.start))
}

impl<'a> Server<'a> {
    /// A server for the lazy ranges `lazy` (image addresses) of `ckpt`, whose pages file is mapped
    /// at `pages`, on `uffd`.
    #[must_use]
    pub fn new(ckpt: &'a Checkpoint, pages: &'a [u8], lazy: &[Range<u64>], uffd: uffd::Foreign) -> Self {
        // Segments lie inside one VMA each, and lazy ranges are whole VMAs.
        let mut data: Vec<Data> = ckpt
            .segments()
            .into_iter()
            .filter(|s| {
                lazy.iter()
                    .any(|l| l.start <= s.addr.start && s.addr.end <= l.end)
            })
            .map(|s| Data {
                addr: s.addr,
                offset: s.offset,
                sum: s.first_sum,
            })
            .collect();
        data.sort_by_key(|d| d.addr.start);
        let mut pieces: Vec<Piece> = lazy
            .iter()
            .map(|l| Piece {
                start: l.start,
                end: l.end,
                image: l.start,
            })
            .collect();
        pieces.sort_by_key(|p| p.start);
        Self {
            page: ckpt.page_size,
            pages,
            sums: &ckpt.sums,
            data,
            spaces: vec![Space {
                uffd,
                pieces,
                cursor: 0,
                faults: std::collections::VecDeque::new(),
                filled: Bits::new(ckpt.data_pages()),
            }],
            verified: Bits::new(if ckpt.sums.is_empty() {
                0
            } else {
                ckpt.data_pages()
            }),
        }
    }

    /// True once every space has all its pages.
    #[must_use]
    pub fn done(&self) -> bool {
        self.spaces.is_empty()
    }

    /// The userfaultfds to poll.
    #[must_use]
    pub fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.spaces.iter().map(|s| s.uffd.as_fd()).collect()
    }

    /// The data segment holding image address `at`, if any.
    fn locate(&self, at: u64) -> Option<&Data> {
        let i = self.data.partition_point(|d| d.addr.end <= at);
        self.data.get(i).filter(|d| d.addr.start <= at)
    }

    /// The image bytes of data pages `first..first + n` (page indexes), starting at image address
    /// `at` in segment `d`, each checked against its checksum once.
    fn checked(&mut self, d: &Data, at: u64, first: usize, n: usize) -> Result<&'a [u8], LazyError> {
        let ps = usize::try_from(self.page).unwrap_or(4096);
        let off = usize::try_from(d.offset + (at - d.addr.start)).unwrap_or(usize::MAX);
        let pages: &'a [u8] = self.pages;
        let bytes = pages.get(off..off + n * ps).ok_or(LazyError::Checksum(at))?;
        if self.sums.is_empty() {
            return Ok(bytes); // checked by whoever handed the pages over
        }
        for (k, p) in bytes.chunks(ps).enumerate() {
            if self.verified.get(first + k) {
                continue;
            }
            if self.sums.get(first + k) != Some(&om_transport::sys::page_sum_bytes(p)) {
                return Err(LazyError::Checksum(at + (k * ps) as u64));
            }
            self.verified.set(first + k);
        }
        Ok(bytes)
    }

    /// Fills `[at, at + len)` of space `s` (process addresses within one piece, image address
    /// `image`): image data where there is some and the space lacks it, zero pages elsewhere.
    fn fill(&mut self, s: usize, at: u64, len: u64, image: u64) -> Result<Filled, LazyError> {
        let page = self.page;
        // One fill may not cross a VMA boundary (ENOENT); the server does not know where the
        // process split its VMAs, so after such a refusal it goes on one page at a time.
        let mut limit = len;
        let mut done = 0;
        while done < len {
            let want = (len - done).min(limit);
            let img = image + done;
            let (n, r, first) = match self.locate(img).cloned() {
                Some(d) => {
                    let first = d.sum + usize::try_from((img - d.addr.start) / page).unwrap_or(0);
                    let avail = usize::try_from(want.min(d.addr.end - img) / page)
                        .unwrap_or(0)
                        .max(1);
                    let have = self.spaces[s].filled.run(first, avail, true);
                    if have > 0 {
                        done += have as u64 * page;
                        continue;
                    }
                    let run = self.spaces[s].filled.run(first, avail, false);
                    let b = self.checked(&d, img, first, run)?;
                    let r = uffd::copy(&self.spaces[s].uffd, at + done, b);
                    (b.len() as u64, r, Some(first))
                }
                None => {
                    // No data up to the next image run (or the end): zero pages.
                    let i = self.data.partition_point(|d| d.addr.start <= img);
                    let next = self.data.get(i).map_or(u64::MAX, |d| d.addr.start);
                    let n = want.min(next - img);
                    (n, uffd::zeropage(&self.spaces[s].uffd, at + done, n), None)
                }
            };
            let mark = |sp: &mut Space, pages: u64| {
                if let Some(f) = first {
                    for k in 0..usize::try_from(pages).unwrap_or(0) {
                        sp.filled.set(f + k);
                    }
                }
            };
            match r {
                Fill::Done => {
                    mark(&mut self.spaces[s], n / page);
                    done += n;
                }
                Fill::Partial(k, e) if e == libc::EEXIST => {
                    // Pages up to k were filled, the one at k was already there.
                    mark(&mut self.spaces[s], k / page + 1);
                    done += k + page;
                }
                Fill::Partial(_, e) if e == libc::EAGAIN => {
                    // An event is pending: it must be read (and applied) first.
                    return Ok(if self.pump(s) { Filled::Retry } else { Filled::Gone });
                }
                Fill::Partial(_, e) if e == libc::ESRCH => {
                    self.spaces.remove(s);
                    return Ok(Filled::Gone);
                }
                Fill::Partial(k, _) if n > page => {
                    mark(&mut self.spaces[s], k / page);
                    done += k;
                    limit = page;
                }
                Fill::Partial(_, _) => {
                    // This very page is not registered any more (unmapped meanwhile).
                    cut(&mut self.spaces[s].pieces, &(at + done..at + done + page));
                    done += page;
                }
            }
        }
        Ok(Filled::Done)
    }

    /// Reads the pending messages of space `s`: events are applied at once (before any later
    /// fill), faults are queued. Returns false when the space is gone.
    fn pump(&mut self, s: usize) -> bool {
        loop {
            let msgs = match uffd::read_msgs(&self.spaces[s].uffd) {
                Ok(m) => m,
                Err(_) => {
                    self.spaces.remove(s);
                    return false;
                }
            };
            if msgs.is_empty() {
                return true;
            }
            for m in msgs {
                self.apply(s, m);
            }
        }
    }

    fn apply(&mut self, s: usize, m: UffdMsg) {
        match m.event {
            uffd::EVENT_PAGEFAULT => self.spaces[s].faults.push_back(m.arg1 & !(self.page - 1)),
            uffd::EVENT_REMOVE | uffd::EVENT_UNMAP => {
                cut(&mut self.spaces[s].pieces, &(m.arg0..m.arg1));
            }
            uffd::EVENT_REMAP => {
                let sp = &mut self.spaces[s];
                remap(&mut sp.pieces, m.arg0, m.arg1, m.arg2);
                sp.cursor = 0;
            }
            uffd::EVENT_FORK => {
                let fd = i32::try_from(m.arg0 & 0xffff_ffff).unwrap_or(-1);
                if let Some(child) = crate::sys::adopt_child_uffd(fd) {
                    // The child has what the parent had at the fork.
                    let pieces = self.spaces[s].pieces.clone();
                    let filled = self.spaces[s].filled.clone();
                    self.spaces.push(Space {
                        uffd: child,
                        pieces,
                        cursor: 0,
                        faults: std::collections::VecDeque::new(),
                        filled,
                    });
                }
            }
            _ => {}
        }
    }

    /// Serves one queued fault of space `s`: the page (and a few after it) from the image, or a
    /// zero page where the image has nothing (any more). Returns false when the space is gone.
    fn fault(&mut self, s: usize, at: u64) -> Result<bool, LazyError> {
        let page = self.page;
        loop {
            let piece = self.spaces[s]
                .pieces
                .iter()
                .find(|p| p.start <= at && at < p.end)
                .copied();
            let r = match piece {
                Some(p) => {
                    let len = (16 * page).min(p.end - at);
                    self.fill(s, at, len, p.image + (at - p.start))?
                }
                None => match uffd::zeropage(&self.spaces[s].uffd, at, page) {
                    Fill::Partial(_, e) if e == libc::EAGAIN => {
                        if self.pump(s) {
                            Filled::Retry
                        } else {
                            Filled::Gone
                        }
                    }
                    Fill::Partial(_, e) if e == libc::ESRCH => {
                        self.spaces.remove(s);
                        Filled::Gone
                    }
                    _ => Filled::Done,
                },
            };
            match r {
                Filled::Done => return Ok(true),
                Filled::Gone => return Ok(false),
                Filled::Retry => {}
            }
        }
    }

    /// Serves the pending faults and events of every space whose fd `ready` marks.
    ///
    /// # Errors
    /// A page that fails its checksum.
    pub fn serve(&mut self, ready: &[bool]) -> Result<(), LazyError> {
        for s in (0..self.spaces.len().min(ready.len())).rev() {
            if !ready[s] || !self.pump(s) {
                continue;
            }
            while let Some(at) = self.spaces[s].faults.pop_front() {
                if !self.fault(s, at)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One background step: copies up to [`STEP`] bytes of image data into the first unfinished
    /// space (pages without data are left to fault: they are zero, with or without om). A space
    /// that has every page gets its userfaultfd closed, which unregisters its ranges.
    ///
    /// # Errors
    /// A page that fails its checksum.
    pub fn step(&mut self) -> Result<(), LazyError> {
        let Some(sp) = self.spaces.first() else {
            return Ok(());
        };
        let cursor = sp.cursor;
        // The next image data at or after the cursor, in process addresses.
        let mut target = None;
        for p in sp.pieces.iter().filter(|p| p.end > cursor) {
            let from = p.start.max(cursor);
            let image = p.image + (from - p.start);
            let image_end = p.image + (p.end - p.start);
            let i = self.data.partition_point(|d| d.addr.end <= image);
            if let Some(d) = self.data.get(i).filter(|d| d.addr.start < image_end) {
                let img = d.addr.start.max(image);
                let len = STEP.min(d.addr.end.min(image_end) - img);
                target = Some((p.start + (img - p.image), len, img));
                break;
            }
        }
        let Some((at, len, image)) = target else {
            self.spaces.remove(0);
            return Ok(());
        };
        // Faults first: a thread waiting on a page must not wait for the background.
        while let Some(f) = self.spaces.first_mut().and_then(|sp| sp.faults.pop_front()) {
            if !self.fault(0, f)? {
                return Ok(());
            }
        }
        if self.fill(0, at, len, image)? == Filled::Done {
            if let Some(sp) = self.spaces.first_mut() {
                sp.cursor = at + len;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Change {
        /// `MADV_DONTNEED` / `munmap` of pages `a..a + n`.
        Remove(u64, u64),
        /// `mremap` of pages `a..a + n` to page `b`.
        Remap(u64, u64, u64),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (0u64..64, 1u64..16).prop_map(|(a, n)| Change::Remove(a, n)),
            (0u64..64, 1u64..16, 0u64..96).prop_map(|(a, n, b)| Change::Remap(a, n, b)),
        ]
    }

    proptest! {
        /// The pieces against a naive map of every page: after any sequence of removals and moves
        /// (overlapping ones included), each page maps to the same image page or to none.
        #[test]
        fn pieces_follow_removals_and_moves_like_a_page_map(
            changes in proptest::collection::vec(change(), 0..24),
        ) {
            const P: u64 = 4096;
            let mut pieces = vec![Piece { start: 0, end: 48 * P, image: 0x10_0000 }];
            let mut naive: std::collections::BTreeMap<u64, u64> =
                (0..48).map(|i| (i, 0x10_0000 + i * P)).collect();
            for c in &changes {
                match *c {
                    Change::Remove(a, n) => {
                        cut(&mut pieces, &(a * P..(a + n) * P));
                        for i in a..a + n {
                            naive.remove(&i);
                        }
                    }
                    Change::Remap(a, n, b) => {
                        // The kernel refuses overlapping source and destination.
                        if a < b + n && b < a + n {
                            continue;
                        }
                        remap(&mut pieces, a * P, b * P, n * P);
                        let moved: Vec<(u64, u64)> =
                            (a..a + n).filter_map(|i| naive.remove(&i).map(|v| (i - a + b, v))).collect();
                        for i in b..b + n {
                            naive.remove(&i);
                        }
                        naive.extend(moved);
                    }
                }
            }
            for i in 0..128 {
                prop_assert_eq!(lookup(&pieces, i * P + 8).map(|v| v - 8), naive.get(&i).copied(), "page {}", i);
            }
            for w in pieces.windows(2) {
                prop_assert!(w[0].end <= w[1].start);
            }
        }
    }

    #[test]
    fn cutting_pieces_keeps_the_image_offsets() {
        let mut v = vec![Piece {
            start: 0x1000,
            end: 0x5000,
            image: 0x1000,
        }];
        let out = cut(&mut v, &(0x2000..0x3000));
        assert_eq!(
            out,
            vec![Piece {
                start: 0x2000,
                end: 0x3000,
                image: 0x2000
            }]
        );
        assert_eq!(
            v,
            vec![
                Piece {
                    start: 0x1000,
                    end: 0x2000,
                    image: 0x1000
                },
                Piece {
                    start: 0x3000,
                    end: 0x5000,
                    image: 0x3000
                }
            ]
        );
        let out = cut(&mut v, &(0..0x10_000));
        assert_eq!(out.len(), 2);
        assert!(v.is_empty());
    }
}
