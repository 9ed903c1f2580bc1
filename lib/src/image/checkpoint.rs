//! The checkpoint directory, format version 2: an image written to disk, and read back and checked.
//!
//! ```text
//! DIR/om-image   manifest (little-endian):
//!                  "OMIMAGE\0"  u32 version = 2  u32 page size
//!                  u64 len + the Begin body of the wire protocol (process identity, VMA table, names)
//!                  u64 len + runs: { u64 addr, u32 pages, u32 kind (1 = data, 2 = zero), u64 offset }
//!                                  in address order; offset: where a data run lies in the pages file
//!                  u64 len + one u32 page checksum per data page (the wire protocol's page sum)
//!                  u64 len + records: { u32 kind, u32 len, bytes }
//!                  u32 CRC-32C of everything above
//! DIR/pages      the data pages (omctl checkpoint writes them concatenated in address order; omd's
//!                incoming image is a sparse memfd laid out its own way, handed to om-restore as is)
//! ```
//!
//! Version 1 (16-byte runs, no offset: data runs concatenated) is still read.
//!
//! Addresses not covered by a run are absent: never populated, or left to the mapped file. Every
//! length is capped before anything is allocated; the reader rejects a wrong magic, version, size or
//! checksum with an error naming the file.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use om_transport::sys::{crc32c, page_sum_bytes};
use om_transport::wire::{Begin, MAX_BEGIN_BODY, Record};

/// The manifest's file name.
pub const MANIFEST: &str = "om-image";
/// The page data's file name.
pub const PAGES: &str = "pages";
const MAGIC: [u8; 8] = *b"OMIMAGE\0";
/// The format version written.
pub const VERSION: u32 = 2;
/// The oldest format version read.
pub const OLDEST_VERSION: u32 = 1;
const MAX_RUNS: u64 = 1 << 26;
/// Largest records section: 64 MiB of record bytes and their headers.
pub const MAX_RECORDS_LEN: u64 = (64 << 20) + (1 << 20);

/// Why a checkpoint directory could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file could not be created, written or read.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The directory does not hold a valid checkpoint.
    #[error("{path} is not a valid om checkpoint: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A page does not match its checksum.
    #[error("{path}: page at {addr:#x} does not match its checksum")]
    PageChecksum {
        /// The pages file.
        path: PathBuf,
        /// The page's address in the process.
        addr: u64,
    },
}

/// A run of the image in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Source addresses.
    pub addr: Range<u64>,
    /// Data (in the pages file) or zero.
    pub data: bool,
    /// Where a data run's first page lies in the pages file (0 for zero runs).
    pub offset: u64,
}

/// A checkpoint read back from disk (the manifest; pages are read on demand).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Page size.
    pub page_size: u64,
    /// The format version it was read in (written: always [`VERSION`]). Version 1 images come from
    /// runtimes whose restore marker is 24 bytes long (no control socket path).
    pub version: u32,
    /// Process identity and VMAs.
    pub begin: Begin,
    /// Data and zero runs in address order.
    pub runs: Vec<Run>,
    /// One checksum per data page; empty when whoever hands over the pages has checked them
    /// already (omd, which checks every page as it lands, for a migration's copy).
    pub sums: Vec<u32>,
    /// Records for the restorer.
    pub records: Vec<Record>,
}

pub fn io_err(path: &Path) -> impl Fn(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn section(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Creates the checkpoint directory `dir` (mode 0700, parents as needed).
///
/// # Errors
/// The directory could not be created.
pub fn create_dir(dir: &Path) -> Result<(), CheckpointError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Writes `checkpoint`'s manifest into its directory, last and by rename, once the pages file is
/// synced: a crash mid-write never leaves a manifest that names pages which are not there.
///
/// # Errors
/// The manifest could not be encoded or written.
pub fn write_manifest(checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let m = checkpoint.encode_manifest()?;
    let dir = &checkpoint.dir;
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&m).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    let path = dir.join(MANIFEST);
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Writes a checkpoint directory from memory that the caller reads: data runs in address order,
/// each page checksummed as it is written.
#[derive(Debug)]
pub struct Writer {
    dir: PathBuf,
    page_size: u64,
    pages: File,
    runs: Vec<Run>,
    sums: Vec<u32>,
    written: u64,
}

impl Writer {
    /// Creates `dir` and its pages file.
    ///
    /// # Errors
    /// The directory or file could not be created.
    pub fn create(dir: &Path, page_size: u64) -> Result<Self, CheckpointError> {
        create_dir(dir)?;
        let path = dir.join(PAGES);
        let pages = File::create(&path).map_err(io_err(&path))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            page_size,
            pages,
            runs: Vec::new(),
            sums: Vec::new(),
            written: 0,
        })
    }

    /// Makes room for `runs` more runs and `pages` more pages, so that [`Writer::data`] does not
    /// allocate. Capture relies on this: it reads the runtime's own heap while it writes, and an
    /// allocation between two page reads would tear the heap's metadata in the image.
    pub fn reserve(&mut self, runs: usize, pages: usize) {
        self.runs.reserve(runs);
        self.sums.reserve(pages);
    }

    /// Appends the pages at `addr` with contents `bytes` (whole pages, above every earlier run).
    ///
    /// # Errors
    /// Misaligned or out-of-order input, or a failed write.
    pub fn data(&mut self, addr: u64, bytes: &[u8]) -> Result<(), CheckpointError> {
        let ps = self.page_size;
        let len = bytes.len() as u64;
        let prev = self.runs.last().map_or(0, |r| r.addr.end);
        if addr % ps != 0 || len % ps != 0 || addr < prev {
            return Err(CheckpointError::Invalid {
                path: self.dir.join(PAGES),
                reason: format!("pages at {addr:#x} (+{len:#x}) misaligned or out of order"),
            });
        }
        let psz = usize::try_from(ps).unwrap_or(4096);
        self.sums.extend(bytes.chunks(psz).map(page_sum_bytes));
        if let Err(e) = self.pages.write_all(bytes) {
            return Err(io_err(&self.dir.join(PAGES))(e));
        }
        match self.runs.last_mut() {
            Some(r) if r.data && r.addr.end == addr => r.addr.end += len,
            _ => self.runs.push(Run {
                addr: addr..addr + len,
                data: true,
                offset: self.written,
            }),
        }
        self.written += len;
        Ok(())
    }

    /// Syncs the pages and writes the manifest; returns the bytes of page data.
    ///
    /// # Errors
    /// A failed sync or manifest write.
    pub fn finish(self, begin: Begin, records: Vec<Record>) -> Result<u64, CheckpointError> {
        let path = self.dir.join(PAGES);
        self.pages.sync_all().map_err(io_err(&path))?;
        write_manifest(&Checkpoint {
            dir: self.dir,
            page_size: self.page_size,
            version: VERSION,
            begin,
            runs: self.runs,
            sums: self.sums,
            records,
        })?;
        Ok(self.written)
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bad(&self, reason: impl Into<String>) -> CheckpointError {
        CheckpointError::Invalid {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], CheckpointError> {
        let n = usize::try_from(n).map_err(|_| self.bad(format!("{what} too large")))?;
        if self.bytes.len() < n {
            return Err(self.bad(format!("truncated {what}")));
        }
        let (a, b) = self.bytes.split_at(n);
        self.bytes = b;
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, CheckpointError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, CheckpointError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    fn section(&mut self, what: &str, max: u64) -> Result<&'a [u8], CheckpointError> {
        let len = self.u64(what)?;
        if len > max {
            return Err(self.bad(format!("{what} of {len} bytes exceeds {max}")));
        }
        self.take(len, what)
    }
}

/// Page data of a checkpoint, cut at VMA boundaries: where it lies in the image, where in the pages
/// file, the index of its first page's checksum, and its VMA (`None`: outside every VMA, which a
/// valid image does not have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Image addresses.
    pub addr: Range<u64>,
    /// Offset in the pages file.
    pub offset: u64,
    /// Index into [`Checkpoint::sums`] of its first page.
    pub first_sum: usize,
    /// Index into the VMA table.
    pub vma: Option<usize>,
}

impl Checkpoint {
    /// The page data, in address order, each piece inside one VMA.
    #[must_use]
    pub fn segments(&self) -> Vec<Segment> {
        let vmas = &self.begin.vmas;
        let mut out = Vec::new();
        let mut sum = 0usize;
        for r in self.runs.iter().filter(|r| r.data) {
            let mut offset = r.offset;
            let mut addr = r.addr.start;
            while addr < r.addr.end {
                let i = vmas.partition_point(|v| v.end <= addr);
                let (end, vma) = match vmas.get(i) {
                    Some(v) if v.start <= addr => (r.addr.end.min(v.end), Some(i)),
                    Some(v) => (r.addr.end.min(v.start), None),
                    None => (r.addr.end, None),
                };
                out.push(Segment {
                    addr: addr..end,
                    offset,
                    first_sum: sum,
                    vma,
                });
                offset += end - addr;
                sum += usize::try_from((end - addr) / self.page_size).unwrap_or(0);
                addr = end;
            }
        }
        out
    }

    /// How many data pages the runs hold.
    #[must_use]
    pub fn data_pages(&self) -> usize {
        let bytes: u64 = self
            .runs
            .iter()
            .filter(|r| r.data)
            .map(|r| r.addr.end - r.addr.start)
            .sum();
        usize::try_from(bytes / self.page_size).unwrap_or(usize::MAX)
    }

    /// True when the manifest carries a checksum for every data page (see [`Checkpoint::sums`]).
    #[must_use]
    pub fn checks_pages(&self) -> bool {
        self.sums.len() == self.data_pages()
    }

    /// Reads and checks the manifest of the checkpoint in `dir`.
    ///
    /// # Errors
    /// A missing or unreadable file, or a manifest that is not valid.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(MANIFEST);
        let max = MAX_BEGIN_BODY as u64 + MAX_RUNS * 16 + MAX_RUNS * 4 + MAX_RECORDS_LEN + 64;
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
            .map_err(io_err(&path))?;
        Self::decode(dir, &path, &bytes)
    }

    fn decode(dir: &Path, path: &Path, bytes: &[u8]) -> Result<Self, CheckpointError> {
        let bad = |reason: &str| CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        if bytes.len() < 20 || bytes[..8] != MAGIC {
            return Err(bad("no om checkpoint magic"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        // Fuzzing builds skip the checksum so that mutated manifests reach the parser behind it.
        if !cfg!(fuzzing) && crc32c(body).to_le_bytes() != crc {
            return Err(bad("manifest checksum mismatch (corrupted or truncated)"));
        }
        let mut c = Cursor {
            bytes: &body[8..],
            path,
        };
        let version = c.u32("version")?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(bad(&format!(
                "format version {version}; this build reads versions {OLDEST_VERSION} to {VERSION}"
            )));
        }
        let entry = if version == 1 { 16 } else { 24 };
        let page_size = u64::from(c.u32("page size")?);
        if !page_size.is_power_of_two() || !(4096..=65536).contains(&page_size) {
            return Err(bad("bad page size"));
        }
        let begin = Begin::decode(c.section("VMA table", MAX_BEGIN_BODY as u64)?, page_size)
            .map_err(|e| bad(&e.to_string()))?;
        let run_bytes = c.section("runs", MAX_RUNS * 24)?;
        let mut runs = Vec::with_capacity(run_bytes.len() / entry);
        let mut data_pages = 0u64;
        let mut prev_end = 0;
        let mut concatenated = 0u64;
        for e in run_bytes.chunks(entry) {
            if e.len() != entry {
                return Err(bad("truncated run"));
            }
            let addr = u64::from_le_bytes(e[..8].try_into().unwrap_or([0; 8]));
            let n = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]]));
            let kind = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
            let end = n
                .checked_mul(page_size)
                .and_then(|l| addr.checked_add(l))
                .ok_or_else(|| bad("run overflows"))?;
            if n == 0 || addr % page_size != 0 || addr < prev_end || !(1..=2).contains(&kind) {
                return Err(bad(&format!("bad run at {addr:#x}")));
            }
            prev_end = end;
            let offset = match (kind, version) {
                (1, 1) => concatenated,
                (1, _) => u64::from_le_bytes(e[16..24].try_into().unwrap_or([0; 8])),
                _ => 0,
            };
            if kind == 1 {
                data_pages += n;
                concatenated += end - addr;
                if offset % page_size != 0 || offset.checked_add(end - addr).is_none() {
                    return Err(bad(&format!("bad pages file offset of the run at {addr:#x}")));
                }
            }
            runs.push(Run {
                addr: addr..end,
                data: kind == 1,
                offset,
            });
        }
        let sum_bytes = c.section("checksums", MAX_RUNS * 4)?;
        if !sum_bytes.is_empty() && sum_bytes.len() as u64 != data_pages * 4 {
            return Err(bad("checksum count does not match the data pages"));
        }
        let sums = sum_bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut rc = Cursor {
            bytes: c.section("records", MAX_RECORDS_LEN)?,
            path,
        };
        let mut records = Vec::new();
        while !rc.bytes.is_empty() {
            let kind = rc.u32("record kind")?;
            let len = rc.u32("record length")?;
            records.push(Record {
                kind,
                bytes: rc.take(u64::from(len), "record")?.to_vec(),
            });
        }
        if !c.bytes.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            page_size,
            version,
            begin,
            runs,
            sums,
            records,
        })
    }

    /// Reads every data page, checks it against its checksum and hands it to `visit` with its address.
    ///
    /// # Errors
    /// An unreadable or short pages file, a page that fails its checksum, or an error from `visit`.
    pub fn for_each_page(
        &self,
        mut visit: impl FnMut(u64, &[u8]) -> Result<(), CheckpointError>,
    ) -> Result<(), CheckpointError> {
        use std::os::unix::fs::FileExt;
        let path = self.dir.join(PAGES);
        let f = File::open(&path).map_err(io_err(&path))?;
        let mut page = vec![0u8; usize::try_from(self.page_size).unwrap_or(4096)];
        let mut i = 0;
        for r in self.runs.iter().filter(|r| r.data) {
            for addr in (r.addr.start..r.addr.end).step_by(page.len()) {
                f.read_exact_at(&mut page, r.offset + (addr - r.addr.start))
                    .map_err(io_err(&path))?;
                if self.sums.get(i) != Some(&page_sum_bytes(&page)) {
                    return Err(CheckpointError::PageChecksum { path, addr });
                }
                visit(addr, &page)?;
                i += 1;
            }
        }
        Ok(())
    }

    /// The manifest bytes for this checkpoint (the inverse of [`Checkpoint::decode_manifest`]).
    ///
    /// # Errors
    /// A VMA table or a run that the format cannot hold.
    pub fn encode_manifest(&self) -> Result<Vec<u8>, CheckpointError> {
        let ps = self.page_size;
        let bad = |reason: String| CheckpointError::Invalid {
            path: self.dir.join(MANIFEST),
            reason,
        };
        let mut runs = Vec::with_capacity(self.runs.len() * 24);
        for r in &self.runs {
            let pages = u32::try_from((r.addr.end - r.addr.start) / ps)
                .map_err(|_| bad(format!("run at {:#x} too long", r.addr.start)))?;
            runs.extend_from_slice(&r.addr.start.to_le_bytes());
            runs.extend_from_slice(&pages.to_le_bytes());
            runs.extend_from_slice(&(if r.data { 1u32 } else { 2 }).to_le_bytes());
            runs.extend_from_slice(&(if r.data { r.offset } else { 0 }).to_le_bytes());
        }
        let sums: Vec<u8> = self.sums.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut records = Vec::new();
        for r in &self.records {
            let len = u32::try_from(r.bytes.len()).map_err(|_| bad("record too long".into()))?;
            records.extend_from_slice(&r.kind.to_le_bytes());
            records.extend_from_slice(&len.to_le_bytes());
            records.extend_from_slice(&r.bytes);
        }
        let mut m = MAGIC.to_vec();
        m.extend_from_slice(&VERSION.to_le_bytes());
        m.extend_from_slice(
            &u32::try_from(ps)
                .map_err(|_| bad("page size".into()))?
                .to_le_bytes(),
        );
        section(&mut m, &self.begin.encode().map_err(|e| bad(e.to_string()))?);
        section(&mut m, &runs);
        section(&mut m, &sums);
        section(&mut m, &records);
        let crc = crc32c(&m);
        m.extend_from_slice(&crc.to_le_bytes());
        Ok(m)
    }

    /// Decodes a manifest held in memory (the fuzz target's entry point).
    ///
    /// # Errors
    /// As [`Checkpoint::open`].
    pub fn decode_manifest(bytes: &[u8]) -> Result<Self, CheckpointError> {
        Self::decode(Path::new("."), Path::new(MANIFEST), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest() -> Vec<u8> {
        Checkpoint {
            dir: PathBuf::from("."),
            page_size: 4096,
            version: VERSION,
            begin: Begin {
                vmas: vec![om_transport::wire::Vma {
                    start: 0x10000,
                    end: 0x14000,
                    prot: 3,
                    ..Default::default()
                }],
                ..Begin::default()
            },
            runs: vec![Run {
                addr: 0x10000..0x12000,
                data: true,
                offset: 0,
            }],
            sums: vec![1, 2],
            records: vec![Record {
                kind: 5,
                bytes: b"abc".to_vec(),
            }],
        }
        .encode_manifest()
        .unwrap()
    }

    #[test]
    fn segments_cut_runs_at_vma_boundaries_and_count_offsets_and_sums() {
        let vma = |start, end| om_transport::wire::Vma {
            start,
            end,
            prot: 3,
            ..Default::default()
        };
        let c = Checkpoint {
            dir: PathBuf::from("."),
            page_size: 0x1000,
            version: VERSION,
            begin: Begin {
                vmas: vec![
                    vma(0x10000, 0x12000),
                    vma(0x12000, 0x14000),
                    vma(0x20000, 0x21000),
                ],
                ..Begin::default()
            },
            runs: vec![
                Run {
                    addr: 0x11000..0x13000,
                    data: true,
                    offset: 0,
                },
                Run {
                    addr: 0x13000..0x14000,
                    data: false,
                    offset: 0,
                },
                Run {
                    addr: 0x1f000..0x21000,
                    data: true,
                    offset: 0x2000,
                },
            ],
            sums: vec![0; 4],
            records: Vec::new(),
        };
        let seg = |a: u64, b: u64, offset, first_sum, vma| Segment {
            addr: a..b,
            offset,
            first_sum,
            vma,
        };
        assert_eq!(
            c.segments(),
            vec![
                seg(0x11000, 0x12000, 0, 0, Some(0)),
                seg(0x12000, 0x13000, 0x1000, 1, Some(1)),
                seg(0x1f000, 0x20000, 0x2000, 2, None),
                seg(0x20000, 0x21000, 0x3000, 3, Some(2)),
            ]
        );
    }

    #[test]
    fn checksums_are_all_or_none() {
        let mut c = Checkpoint::decode_manifest(&manifest()).unwrap();
        assert!(c.checks_pages());
        assert_eq!(c.data_pages(), 2);
        // None: the pages were checked by whoever handed them over.
        c.sums.clear();
        let none = Checkpoint::decode_manifest(&c.encode_manifest().unwrap()).unwrap();
        assert!(!none.checks_pages() && none.sums.is_empty());
        // Some but not all: refused.
        c.sums = vec![1];
        assert!(Checkpoint::decode_manifest(&c.encode_manifest().unwrap()).is_err());
    }

    #[test]
    fn decodes_a_valid_manifest_and_rejects_any_flipped_byte() {
        let m = manifest();
        let c = Checkpoint::decode_manifest(&m).unwrap();
        assert_eq!(
            c.runs,
            vec![Run {
                addr: 0x10000..0x12000,
                data: true,
                offset: 0,
            }]
        );
        assert_eq!(c.sums, vec![1, 2]);
        assert_eq!(c.records[0].bytes, b"abc");
        for i in 0..m.len() {
            let mut bad = m.clone();
            bad[i] ^= 1;
            assert!(Checkpoint::decode_manifest(&bad).is_err(), "flip at {i} accepted");
        }
    }

    proptest! {
        #[test]
        fn manifest_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Checkpoint::decode_manifest(&bytes);
            // Also with a valid checksum, so the section parsers see the bytes.
            let mut m = MAGIC.to_vec();
            m.extend_from_slice(&bytes);
            let crc = crc32c(&m);
            m.extend_from_slice(&crc.to_le_bytes());
            let _ = Checkpoint::decode_manifest(&m);
        }
    }
}
