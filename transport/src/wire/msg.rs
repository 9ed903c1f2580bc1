//! Message bodies: fixed-layout little-endian structs, encoded from and decoded into checked Rust
//! values. Every decoder bounds every count before it allocates and rejects trailing bytes.

use std::ops::Range;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    MAX_ACK_RUNS, MAX_BATCH_PAGES, MAX_BATCH_RUNS, MAX_EXTENTS, MAX_NAME, MAX_NAMES, MAX_TEXT, MAX_USER_ADDR,
    MAX_VMAS, MAX_WINDOWS, MAX_ZERO_RUNS, WireError,
};

/// A page run on the wire: `pages` pages from `addr`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RunEntry {
    /// Page-aligned start address in the source process.
    pub addr: U64,
    /// Number of pages, at least one.
    pub pages: U32,
    /// Must be zero.
    pub reserved: U32,
}
const _: () = assert!(size_of::<RunEntry>() == 16);

/// Client `Hello` and server `Welcome` bodies.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HelloBody {
    /// `OM-WIRE\0`.
    pub magic: [u8; 8],
    /// Oldest protocol version the sender of this message speaks.
    pub version_min: U16,
    /// Newest protocol version it speaks (in a `Welcome`: the chosen version, equal to `version_min`).
    pub version_max: U16,
    /// [`Role`] of the connection.
    pub role: U16,
    /// Data streams wanted (`Hello`) or granted (`Welcome`); index of this stream for a data stream.
    pub streams: U16,
    /// Capability bits ([`super::caps`]); a `Welcome` carries the intersection.
    pub caps: U32,
    /// Page size of the source (`Hello`); must match the receiver's (`Welcome` echoes it).
    pub page_size: U32,
    /// Zero when opening a session; the session to join for a data stream; in a `Welcome` to a
    /// control connection, the new session's id.
    pub session: U64,
    /// Fresh random bytes of this side.
    pub nonce: [u8; 32],
}
const _: () = assert!(size_of::<HelloBody>() == 64);

/// Magic at the start of a `Hello`/`Welcome` body.
pub const HELLO_MAGIC: [u8; 8] = *b"OM-WIRE\0";

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Role {
    /// Opens a session: image, rounds, commit.
    Control = 1,
    /// Joins an existing session and carries page batches.
    Data = 2,
    /// The home relay: a migrated process's stdio, signals and exit between the node it runs on and
    /// its home (`omrun`), authenticated with the process's own home token ([`crate::relay`]).
    Relay = 3,
}

impl TryFrom<u16> for Role {
    type Error = WireError;
    fn try_from(v: u16) -> Result<Self, WireError> {
        match v {
            1 => Ok(Self::Control),
            2 => Ok(Self::Data),
            3 => Ok(Self::Relay),
            other => Err(WireError::Invalid(format!("unknown connection role {other}"))),
        }
    }
}

/// A decoded `Hello` or `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Supported (or chosen) versions.
    pub versions: Range<u16>,
    /// The connection's role.
    pub role: Role,
    /// Streams wanted or granted, or the data stream's index.
    pub streams: u16,
    /// Capability bits.
    pub caps: u32,
    /// Page size.
    pub page_size: u32,
    /// Session id (see [`HelloBody::session`]).
    pub session: u64,
    /// This side's nonce.
    pub nonce: [u8; 32],
}

impl Hello {
    /// The body bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        HelloBody {
            magic: HELLO_MAGIC,
            version_min: U16::new(self.versions.start),
            version_max: U16::new(self.versions.end - 1),
            role: U16::new(self.role as u16),
            streams: U16::new(self.streams),
            caps: U32::new(self.caps),
            page_size: U32::new(self.page_size),
            session: U64::new(self.session),
            nonce: self.nonce,
        }
        .as_bytes()
        .to_vec()
    }

    /// Decodes a body.
    ///
    /// # Errors
    /// Wrong size, magic, version range, role or page size.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let b = HelloBody::read_from_bytes(body).map_err(|_| WireError::Truncated("hello"))?;
        if b.magic != HELLO_MAGIC {
            return Err(WireError::Invalid("not an om peer (bad hello magic)".into()));
        }
        let (lo, hi) = (b.version_min.get(), b.version_max.get());
        if lo == 0 || lo > hi || hi == u16::MAX {
            return Err(WireError::Invalid(format!("bad version range {lo}..={hi}")));
        }
        let page_size = b.page_size.get();
        if !page_size.is_power_of_two() || !(4096..=65536).contains(&page_size) {
            return Err(WireError::Invalid(format!("unsupported page size {page_size}")));
        }
        Ok(Self {
            versions: lo..hi + 1,
            role: Role::try_from(b.role.get())?,
            streams: b.streams.get(),
            caps: b.caps.get(),
            page_size,
            session: b.session.get(),
            nonce: b.nonce,
        })
    }
}

/// Head of a `Begin` body: the source process and the sizes of what follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BeginHead {
    pid: U32,
    uid: U32,
    gid: U32,
    flags: U32,
    vma_count: U32,
    names_len: U32,
    populated_bytes: U64,
}

/// One VMA on the wire; its name lives in the names blob after the table.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct VmaEntry {
    start: U64,
    end: U64,
    pgoff: U64,
    prot: U32,
    flags: U32,
    name_off: U32,
    name_len: U32,
}
const _: () = assert!(size_of::<VmaEntry>() == 40);

/// Who the image belongs to and how much memory it announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageInfo {
    /// The source process id.
    pub pid: u32,
    /// Its user id; a restored process never runs as anyone else.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Image flags ([`ImageInfo::MIGRATE`]); other bits must be zero.
    pub flags: u32,
    /// Bytes the sender expects to ship in round 0 (populated pages): lets the receiver refuse at once
    /// an image that cannot fit. The real usage is enforced page by page as well.
    pub populated_bytes: u64,
}

impl ImageInfo {
    /// A live migration: on commit the receiver restores the image and holds it (prepared); the copy
    /// starts only on `Go`, and is discarded if the sender goes away first.
    pub const MIGRATE: u32 = 1;
    /// Every flag this version knows.
    pub const KNOWN_FLAGS: u32 = Self::MIGRATE;
}

/// A VMA of the source process as the receiver needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Vma {
    /// Page-aligned start.
    pub start: u64,
    /// Page-aligned end (exclusive).
    pub end: u64,
    /// Offset into the mapped file, in bytes.
    pub pgoff: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// Mapping flags (`om` image flags: private/shared, anonymous, stack, ...).
    pub flags: u32,
    /// The mapped file's path or a pseudo name such as `[heap]`; may be empty.
    pub name: Vec<u8>,
}

impl Vma {
    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True when the VMA covers no bytes (never the case for a decoded table).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A decoded `Begin`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Begin {
    /// The process.
    pub info: ImageInfo,
    /// Its VMAs, sorted, page-aligned and disjoint.
    pub vmas: Vec<Vma>,
}

impl Begin {
    /// The body bytes.
    ///
    /// # Errors
    /// When the table exceeds the protocol's caps (the receiver would refuse it anyway).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        if self.vmas.len() > MAX_VMAS {
            return Err(WireError::Oversized {
                what: "VMA table",
                len: self.vmas.len() as u64,
                max: MAX_VMAS as u64,
            });
        }
        let names_len: usize = self.vmas.iter().map(|v| v.name.len()).sum();
        if names_len > MAX_NAMES {
            return Err(WireError::Oversized {
                what: "VMA names",
                len: names_len as u64,
                max: MAX_NAMES as u64,
            });
        }
        let mut out = Vec::with_capacity(32 + self.vmas.len() * 40 + names_len);
        out.extend_from_slice(
            BeginHead {
                pid: U32::new(self.info.pid),
                uid: U32::new(self.info.uid),
                gid: U32::new(self.info.gid),
                flags: U32::new(self.info.flags),
                vma_count: U32::new(u32_of(self.vmas.len())),
                names_len: U32::new(u32_of(names_len)),
                populated_bytes: U64::new(self.info.populated_bytes),
            }
            .as_bytes(),
        );
        let mut off = 0usize;
        for v in &self.vmas {
            out.extend_from_slice(
                VmaEntry {
                    start: U64::new(v.start),
                    end: U64::new(v.end),
                    pgoff: U64::new(v.pgoff),
                    prot: U32::new(v.prot),
                    flags: U32::new(v.flags),
                    name_off: U32::new(u32_of(off)),
                    name_len: U32::new(u32_of(v.name.len())),
                }
                .as_bytes(),
            );
            off += v.name.len();
        }
        for v in &self.vmas {
            out.extend_from_slice(&v.name);
        }
        Ok(out)
    }

    /// Decodes and validates a body for a receiver whose pages are `page_size` bytes.
    ///
    /// # Errors
    /// Truncation, oversized counts, unaligned, unsorted, overlapping or out-of-range VMAs, names
    /// outside the blob.
    pub fn decode(body: &[u8], page_size: u64) -> Result<Self, WireError> {
        let (head, rest) = BeginHead::read_from_prefix(body).map_err(|_| WireError::Truncated("begin"))?;
        let count = head.vma_count.get() as usize;
        let names_len = head.names_len.get() as usize;
        if count > MAX_VMAS {
            return Err(WireError::Oversized {
                what: "VMA table",
                len: count as u64,
                max: MAX_VMAS as u64,
            });
        }
        if names_len > MAX_NAMES {
            return Err(WireError::Oversized {
                what: "VMA names",
                len: names_len as u64,
                max: MAX_NAMES as u64,
            });
        }
        let (entries, names) = <[VmaEntry]>::ref_from_prefix_with_elems(rest, count)
            .map_err(|_| WireError::Truncated("VMA table"))?;
        if names.len() != names_len {
            return Err(WireError::Invalid(format!(
                "begin body has {} name bytes, header says {names_len}",
                names.len()
            )));
        }
        let mut vmas = Vec::with_capacity(count);
        let mut prev_end = 0u64;
        for (i, e) in entries.iter().enumerate() {
            let (start, end) = (e.start.get(), e.end.get());
            if start >= end || start % page_size != 0 || end % page_size != 0 || end > MAX_USER_ADDR {
                return Err(WireError::Invalid(format!(
                    "VMA {i} {start:#x}-{end:#x} is empty, unaligned or outside user space"
                )));
            }
            if start < prev_end {
                return Err(WireError::Invalid(format!(
                    "VMA {i} at {start:#x} overlaps or precedes the one before"
                )));
            }
            prev_end = end;
            let (off, len) = (e.name_off.get() as usize, e.name_len.get() as usize);
            if len > MAX_NAME || off.checked_add(len).is_none_or(|x| x > names.len()) {
                return Err(WireError::Invalid(format!(
                    "VMA {i} name lies outside the names blob"
                )));
            }
            vmas.push(Vma {
                start,
                end,
                pgoff: e.pgoff.get(),
                prot: e.prot.get(),
                flags: e.flags.get(),
                name: names[off..off + len].to_vec(),
            });
        }
        if head.flags.get() & !ImageInfo::KNOWN_FLAGS != 0 {
            return Err(WireError::Invalid(format!(
                "unknown image flags {:#x}",
                head.flags.get()
            )));
        }
        Ok(Self {
            info: ImageInfo {
                pid: head.pid.get(),
                uid: head.uid.get(),
                gid: head.gid.get(),
                flags: head.flags.get(),
                populated_bytes: head.populated_bytes.get(),
            },
            vmas,
        })
    }
}

/// Where an address range of the source lands in the receiver's image memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The source addresses.
    pub start: u64,
    /// End of the source addresses (exclusive).
    pub end: u64,
    /// Byte offset of `start` in the image memory.
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct PlacementHead {
    node: U32,
    mailbox: U32,
    doorbell: U32,
    window_shift: U32,
    windows: U32,
    extents: U32,
    endpoint: U32,
    reserved: U32,
}
const _: () = assert!(size_of::<PlacementHead>() == 32);

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ExtentEntry {
    start: U64,
    end: U64,
    offset: U64,
}
const _: () = assert!(size_of::<ExtentEntry>() == 24);

/// A decoded `Placement`: how a placing transport (SCI, verbs) reaches the receiver's image memory.
/// The image memory is cut into windows of `1 << window_shift` bytes, each exported as one segment
/// (SCI) or memory region (verbs); image offset `o` is byte `o % window` of window `o / window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The receiver's address on the fabric (a SISCI node id).
    pub node: u32,
    /// The mailbox segment (batch descriptors, flow control).
    pub mailbox: u32,
    /// The interrupt that says a descriptor is in the mailbox.
    pub doorbell: u32,
    /// log2 of the window size.
    pub window_shift: u32,
    /// Segment id (SCI) or remote key (verbs) of each window, in offset order.
    pub windows: Vec<u32>,
    /// Where each covered address range lands, sorted by start.
    pub extents: Vec<Extent>,
    /// The transport's own address of the receiver, opaque here (a verbs queue pair; empty for SCI),
    /// at most [`super::MAX_ENDPOINT`] bytes.
    pub endpoint: Vec<u8>,
}

impl Placement {
    /// Smallest window (1 MiB).
    pub const MIN_WINDOW_SHIFT: u32 = 20;
    /// Largest window (1 TiB).
    pub const MAX_WINDOW_SHIFT: u32 = 40;

    /// The body bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let head = PlacementHead {
            node: U32::new(self.node),
            mailbox: U32::new(self.mailbox),
            doorbell: U32::new(self.doorbell),
            window_shift: U32::new(self.window_shift),
            windows: U32::new(u32_of(self.windows.len())),
            extents: U32::new(u32_of(self.extents.len())),
            endpoint: U32::new(u32_of(self.endpoint.len())),
            reserved: U32::new(0),
        };
        let mut out = Vec::with_capacity(32 + self.windows.len() * 4 + self.extents.len() * 24);
        out.extend_from_slice(head.as_bytes());
        for w in &self.windows {
            out.extend_from_slice(U32::new(*w).as_bytes());
        }
        for e in &self.extents {
            let entry = ExtentEntry {
                start: U64::new(e.start),
                end: U64::new(e.end),
                offset: U64::new(e.offset),
            };
            out.extend_from_slice(entry.as_bytes());
        }
        out.extend_from_slice(&self.endpoint);
        out
    }

    /// Decodes and validates a body: caps, page-aligned extents sorted and disjoint inside user space,
    /// each inside the exported windows.
    ///
    /// # Errors
    /// Truncation, caps, bad extents, trailing bytes.
    pub fn decode(body: &[u8], page_size: u64) -> Result<Self, WireError> {
        let (head, rest) =
            PlacementHead::read_from_prefix(body).map_err(|_| WireError::Truncated("placement"))?;
        let (nw, ne) = (head.windows.get() as usize, head.extents.get() as usize);
        for (what, len, max) in [
            ("placement windows", nw, MAX_WINDOWS),
            ("placement extents", ne, MAX_EXTENTS),
            (
                "placement endpoint",
                head.endpoint.get() as usize,
                super::MAX_ENDPOINT,
            ),
        ] {
            if len > max {
                return Err(WireError::Oversized {
                    what,
                    len: len as u64,
                    max: max as u64,
                });
            }
        }
        let shift = head.window_shift.get();
        if !(Self::MIN_WINDOW_SHIFT..=Self::MAX_WINDOW_SHIFT).contains(&shift) || head.reserved.get() != 0 {
            return Err(WireError::Invalid(format!(
                "placement: window shift {shift} or reserved bytes out of range"
            )));
        }
        let (windows, rest) = <[U32]>::ref_from_prefix_with_elems(rest, nw)
            .map_err(|_| WireError::Truncated("placement windows"))?;
        let (entries, rest) = <[ExtentEntry]>::ref_from_prefix_with_elems(rest, ne)
            .map_err(|_| WireError::Truncated("placement extents"))?;
        let endpoint = rest
            .get(..head.endpoint.get() as usize)
            .ok_or(WireError::Truncated("placement endpoint"))?
            .to_vec();
        if rest.len() != endpoint.len() {
            return Err(WireError::Invalid("placement: trailing bytes".into()));
        }
        let span = (nw as u64) << shift;
        let mut extents = Vec::with_capacity(ne);
        let mut prev_end = 0u64;
        for e in entries {
            let (start, end, offset) = (e.start.get(), e.end.get(), e.offset.get());
            let aligned = [start, end, offset].iter().all(|v| v % page_size == 0);
            let inside = start >= prev_end
                && start < end
                && end <= MAX_USER_ADDR
                && offset.checked_add(end - start).is_some_and(|o| o <= span);
            if !aligned || !inside {
                return Err(WireError::Invalid(format!(
                    "placement: extent {start:#x}-{end:#x} at offset {offset:#x} is unaligned, unsorted, \
                     overlapping or outside the {nw} windows"
                )));
            }
            prev_end = end;
            extents.push(Extent { start, end, offset });
        }
        // No two extents may share image memory either.
        let mut by_offset: Vec<(u64, u64)> = extents.iter().map(|e| (e.offset, e.end - e.start)).collect();
        by_offset.sort_unstable();
        if by_offset.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(WireError::Invalid(
                "placement: two extents share image memory".into(),
            ));
        }
        Ok(Self {
            node: head.node.get(),
            mailbox: head.mailbox.get(),
            doorbell: head.doorbell.get(),
            window_shift: shift,
            windows: windows.iter().map(|w| w.get()).collect(),
            extents,
            endpoint,
        })
    }

    /// The pieces of image memory that hold `run`: `(window index, offset in the window, length)`,
    /// in run order, cut at extent and window boundaries. `None` when part of `run` has no place.
    #[must_use]
    pub fn pieces(&self, run: &Range<u64>) -> Option<Vec<(usize, u64, u64)>> {
        let window = 1u64 << self.window_shift;
        let mut out = Vec::new();
        let mut at = run.start;
        let mut i = self.extents.partition_point(|e| e.end <= at);
        while at < run.end {
            let e = self.extents.get(i).filter(|e| e.start <= at)?;
            let end = e.end.min(run.end);
            let mut off = e.offset + (at - e.start);
            let mut left = end - at;
            while left > 0 {
                let in_window = off % window;
                let n = left.min(window - in_window);
                out.push((usize::try_from(off / window).ok()?, in_window, n));
                off += n;
                left -= n;
            }
            at = end;
            i += 1;
        }
        Some(out)
    }
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A body that is one fixed struct, or a fixed head followed by run entries.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RoundHead {
    round: U32,
    count: U32,
    a: U64,
    b: U64,
}

fn encode_runs(out: &mut Vec<u8>, runs: &[Range<u64>], page_size: u64) {
    for r in runs {
        out.extend_from_slice(
            RunEntry {
                addr: U64::new(r.start),
                pages: U32::new(u32::try_from((r.end - r.start) / page_size).unwrap_or(u32::MAX)),
                reserved: U32::new(0),
            }
            .as_bytes(),
        );
    }
}

/// A round head followed by run entries (`Zero`, `RoundAck`).
fn encode_with_runs(head: &RoundHead, runs: &[Range<u64>], page_size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size_of::<RoundHead>() + runs.len() * 16);
    out.extend_from_slice(head.as_bytes());
    encode_runs(&mut out, runs, page_size);
    out
}

/// Decodes a round head followed by exactly `head.count` runs (at most `max`) and nothing else.
fn decode_with_runs(
    body: &[u8],
    page_size: u64,
    max: usize,
    what: &'static str,
) -> Result<(RoundHead, Vec<Range<u64>>), WireError> {
    let (head, rest) = RoundHead::read_from_prefix(body).map_err(|_| WireError::Truncated(what))?;
    let count = head.count.get() as usize;
    if count > max {
        return Err(WireError::Oversized {
            what,
            len: count as u64,
            max: max as u64,
        });
    }
    let (runs, rest) = decode_runs(rest, count, page_size, what)?;
    if !rest.is_empty() {
        return Err(WireError::Invalid(format!("{what}: trailing bytes")));
    }
    Ok((head, runs))
}

/// Decodes `count` run entries from the front of `bytes`: page-aligned, non-empty, strictly
/// increasing and disjoint, inside user space.
fn decode_runs<'a>(
    bytes: &'a [u8],
    count: usize,
    page_size: u64,
    what: &'static str,
) -> Result<(Vec<Range<u64>>, &'a [u8]), WireError> {
    let (entries, rest) =
        <[RunEntry]>::ref_from_prefix_with_elems(bytes, count).map_err(|_| WireError::Truncated(what))?;
    let mut runs = Vec::with_capacity(count);
    let mut prev_end = 0u64;
    for e in entries {
        let (addr, pages) = (e.addr.get(), u64::from(e.pages.get()));
        let end = pages
            .checked_mul(page_size)
            .and_then(|len| addr.checked_add(len))
            .filter(|&end| end <= MAX_USER_ADDR);
        let Some(end) = end else {
            return Err(WireError::Invalid(format!(
                "{what}: run at {addr:#x} leaves user space"
            )));
        };
        if pages == 0 || addr % page_size != 0 || e.reserved.get() != 0 {
            return Err(WireError::Invalid(format!(
                "{what}: run at {addr:#x} is empty or unaligned"
            )));
        }
        if addr < prev_end {
            return Err(WireError::Invalid(format!(
                "{what}: run at {addr:#x} is out of order or overlaps"
            )));
        }
        prev_end = end;
        runs.push(addr..end);
    }
    Ok((runs, rest))
}

/// A decoded `Batch` body. The pages themselves follow the frame, in run order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The round the pages belong to.
    pub round: u32,
    /// The runs, sorted and disjoint.
    pub runs: Vec<Range<u64>>,
    /// One checksum per page, in run order.
    pub sums: Vec<u32>,
}

impl Batch {
    /// Total pages.
    #[must_use]
    pub fn pages(&self) -> usize {
        self.sums.len()
    }

    /// The body bytes.
    #[must_use]
    pub fn encode(round: u32, runs: &[Range<u64>], sums: &[u32], page_size: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + runs.len() * 16 + sums.len() * 4);
        out.extend_from_slice(
            RoundHead {
                round: U32::new(round),
                count: U32::new(u32_of(runs.len())),
                a: U64::new(sums.len() as u64),
                b: U64::new(0),
            }
            .as_bytes(),
        );
        encode_runs(&mut out, runs, page_size);
        for s in sums {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// Decodes and validates a body.
    ///
    /// # Errors
    /// Truncation, caps, bad runs, a page count that does not match the runs.
    pub fn decode(body: &[u8], page_size: u64) -> Result<Self, WireError> {
        let (head, rest) = RoundHead::read_from_prefix(body).map_err(|_| WireError::Truncated("batch"))?;
        let count = head.count.get() as usize;
        let pages = head.a.get();
        if count == 0 || count > MAX_BATCH_RUNS || pages > MAX_BATCH_PAGES as u64 {
            return Err(WireError::Oversized {
                what: "batch",
                len: pages.max(count as u64),
                max: MAX_BATCH_PAGES as u64,
            });
        }
        if head.b.get() != 0 {
            return Err(WireError::Invalid("batch: reserved field set".into()));
        }
        let (runs, rest) = decode_runs(rest, count, page_size, "batch")?;
        let total: u64 = runs.iter().map(|r| (r.end - r.start) / page_size).sum();
        if total != pages || rest.len() as u64 != pages * 4 {
            return Err(WireError::Invalid(format!(
                "batch: runs hold {total} pages, header says {pages}, {} checksum bytes",
                rest.len()
            )));
        }
        let sums = rest
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            round: head.round.get(),
            runs,
            sums,
        })
    }
}

/// A decoded `Zero` body: runs that are zero now (freed, or never written since they were zeroed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zero {
    /// The round.
    pub round: u32,
    /// The runs.
    pub runs: Vec<Range<u64>>,
}

impl Zero {
    /// The body bytes.
    #[must_use]
    pub fn encode(round: u32, runs: &[Range<u64>], page_size: u64) -> Vec<u8> {
        let head = RoundHead {
            round: U32::new(round),
            count: U32::new(u32_of(runs.len())),
            a: U64::new(0),
            b: U64::new(0),
        };
        encode_with_runs(&head, runs, page_size)
    }

    /// Decodes and validates a body.
    ///
    /// # Errors
    /// Truncation, caps, bad runs, trailing bytes.
    pub fn decode(body: &[u8], page_size: u64) -> Result<Self, WireError> {
        let (head, runs) = decode_with_runs(body, page_size, MAX_ZERO_RUNS, "zero runs")?;
        if head.a.get() != 0 || head.b.get() != 0 {
            return Err(WireError::Invalid("zero runs: reserved bytes set".into()));
        }
        Ok(Self {
            round: head.round.get(),
            runs,
        })
    }
}

/// A decoded `EndRound`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndRound {
    /// The round that ends.
    pub round: u32,
    /// True for the final round (sent with the application stopped): any checksum mismatch is fatal.
    pub last: bool,
    /// `Batch` frames of this round, over all streams.
    pub batches: u32,
    /// Pages in those batches.
    pub pages: u64,
}

impl EndRound {
    /// The body bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        RoundHead {
            round: U32::new(self.round),
            count: U32::new(self.batches),
            a: U64::new(self.pages),
            b: U64::new(u64::from(self.last)),
        }
        .as_bytes()
        .to_vec()
    }

    /// Decodes a body.
    ///
    /// # Errors
    /// Wrong size or a flag other than 0 or 1.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let h = RoundHead::read_from_bytes(body).map_err(|_| WireError::Truncated("end of round"))?;
        let last = match h.b.get() {
            0 => false,
            1 => true,
            other => return Err(WireError::Invalid(format!("end of round: bad flag {other}"))),
        };
        Ok(Self {
            round: h.round.get(),
            last,
            batches: h.count.get(),
            pages: h.a.get(),
        })
    }
}

/// A decoded `RoundAck`: the round is durable on the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundAck {
    /// The round.
    pub round: u32,
    /// Pages landed in this round.
    pub pages: u64,
    /// Bytes of memory the image holds now.
    pub image_bytes: u64,
    /// Pages whose checksum did not match: acceptable only if they are sent again (the application
    /// wrote them while they were on the way).
    pub suspects: Vec<Range<u64>>,
}

impl RoundAck {
    /// The body bytes.
    #[must_use]
    pub fn encode(&self, page_size: u64) -> Vec<u8> {
        let head = RoundHead {
            round: U32::new(self.round),
            count: U32::new(u32_of(self.suspects.len())),
            a: U64::new(self.pages),
            b: U64::new(self.image_bytes),
        };
        encode_with_runs(&head, &self.suspects, page_size)
    }

    /// Decodes and validates a body.
    ///
    /// # Errors
    /// Truncation, caps, bad runs, trailing bytes.
    pub fn decode(body: &[u8], page_size: u64) -> Result<Self, WireError> {
        let (h, suspects) = decode_with_runs(body, page_size, MAX_ACK_RUNS, "round ack")?;
        Ok(Self {
            round: h.round.get(),
            pages: h.a.get(),
            image_bytes: h.b.get(),
            suspects,
        })
    }
}

/// What became of a migration's prepared copy: the body of `Answer`, for the commit token of an
/// `Ask`. Eight bytes: the state (`u32`: 0 unknown, 1 running, 2 discarded), then the copy's pid
/// (`u32`, non-zero exactly when it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The receiver knows no copy of that token: it never prepared one, or it restarted since
    /// (its prepared copies died with it).
    Unknown,
    /// The copy runs; its pid on the receiving node.
    Running(u32),
    /// The copy was discarded before it ran.
    Discarded,
}

/// The fixed layout of a [`Fate`].
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct FateBody {
    state: U32,
    pid: U32,
}
const _: () = assert!(size_of::<FateBody>() == 8);

impl Fate {
    /// The body.
    #[must_use]
    pub fn encode(self) -> [u8; 8] {
        let (state, pid) = match self {
            Self::Unknown => (0u32, 0u32),
            Self::Running(pid) => (1, pid),
            Self::Discarded => (2, 0),
        };
        let mut out = [0; 8];
        out.copy_from_slice(
            FateBody {
                state: state.into(),
                pid: pid.into(),
            }
            .as_bytes(),
        );
        out
    }

    /// Parses a body.
    ///
    /// # Errors
    /// [`WireError::Truncated`] for a wrong size; [`WireError::Invalid`] for an unknown state or a
    /// pid that does not match it.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let b = FateBody::read_from_bytes(body).map_err(|_| WireError::Truncated("answer"))?;
        let (state, pid) = (b.state.get(), b.pid.get());
        match (state, pid) {
            (0, 0) => Ok(Self::Unknown),
            (1, p) if p != 0 => Ok(Self::Running(p)),
            (2, 0) => Ok(Self::Discarded),
            _ => Err(WireError::Invalid(format!(
                "answer: state {state} with pid {pid}"
            ))),
        }
    }
}

/// A body that is a single `u64` (`Begun`, `Committed`, the token of `Commit` and `Ask`).
///
/// # Errors
/// Wrong size.
pub fn decode_u64(body: &[u8], what: &'static str) -> Result<u64, WireError> {
    U64::read_from_bytes(body)
        .map(U64::get)
        .map_err(|_| WireError::Truncated(what))
}

/// A coded text message (`Error`, `Refused`, `Abort`): a `u32` code, then UTF-8 text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text {
    /// An [`super::ErrorCode`] value (zero for `Abort`).
    pub code: u32,
    /// The reason, for people.
    pub text: String,
}

impl Text {
    /// The body bytes; the text is cut at [`MAX_TEXT`] bytes on a character boundary.
    #[must_use]
    pub fn encode(code: u32, text: &str) -> Vec<u8> {
        let mut out = code.to_le_bytes().to_vec();
        out.extend_from_slice(capped(text).as_bytes());
        out
    }

    /// Decodes a body; invalid UTF-8 is replaced, never trusted, and the result is cut to
    /// [`MAX_TEXT`] bytes again (each replacement character takes three).
    ///
    /// # Errors
    /// Fewer than four bytes, or a text over the cap.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let (code, text) = U32::read_from_prefix(body).map_err(|_| WireError::Truncated("text"))?;
        if text.len() > MAX_TEXT {
            return Err(WireError::Oversized {
                what: "text",
                len: text.len() as u64,
                max: MAX_TEXT as u64,
            });
        }
        Ok(Self {
            code: code.get(),
            text: capped(&String::from_utf8_lossy(text)).to_owned(),
        })
    }
}

/// `text` cut to at most [`MAX_TEXT`] bytes, on a character boundary.
fn capped(text: &str) -> &str {
    let mut cut = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// A decoded `Record`: a kind and opaque bytes for the restorer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// What the record describes (defined by the capture format).
    pub kind: u32,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl Record {
    /// The body bytes.
    #[must_use]
    pub fn encode(kind: u32, bytes: &[u8]) -> Vec<u8> {
        let mut out = kind.to_le_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }

    /// Decodes a body.
    ///
    /// # Errors
    /// Fewer than four bytes.
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let (kind, bytes) = U32::read_from_prefix(body).map_err(|_| WireError::Truncated("record"))?;
        Ok(Self {
            kind: kind.get(),
            bytes: bytes.to_vec(),
        })
    }
}
