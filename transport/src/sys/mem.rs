//! Proof-carrying handles on raw memory: the one place where a promise about memory is made, so that
//! everything above (connections, senders, receivers) is safe code.
//!
//! - [`Readable`]: runs of this process's memory to send, split into batches here, so that a batch is
//!   a subset of what its creator handed over by construction. Three kinds: memory the caller
//!   promised stays mapped and readable (`unsafe` [`Readable::new`]: benchmarks and tests, whose
//!   memory nothing else unmaps); a running application's memory, which may vanish at any moment
//!   and is only ever read through the kernel ([`Readable::racy`]: the runtime's pre-copy rounds);
//!   and memory sent from a copy ([`Readable::copied`]: the final round, where the sender's own
//!   stack and heap are part of the image).
//! - [`Landing`]: a zone of a receiver's image memory, writable and mapped while the image lives.
//!   Created with an `unsafe` constructor by the image's owner (omd's `sys` module); it borrows the
//!   image, so it cannot outlive it.

use std::marker::PhantomData;
use std::ops::Range;

use super::checksum;
use super::iov::MemRun;

/// Page runs of this process that stay mapped and readable for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct Readable<'a> {
    runs: &'a [Range<u64>],
    /// The memory may be unmapped meanwhile: checksums read it through the kernel.
    racy: bool,
    /// Sent from a copy taken when the batch goes out (checksums and bytes agree even if the caller
    /// itself writes the memory meanwhile).
    copied: bool,
}

impl<'a> Readable<'a> {
    /// Wraps `runs`: sorted, disjoint, page-aligned ranges of this process's memory.
    ///
    /// # Safety
    /// Every run must stay mapped and readable for `'a` (the application may keep writing it: the
    /// kernel copies and checksums use atomic loads). If a run is unmapped anyway, sending fails with
    /// `EFAULT`, but checksums would fault: the caller must prevent it. Memory that may vanish is
    /// [`Readable::racy`].
    #[must_use]
    pub unsafe fn new(runs: &'a [Range<u64>]) -> Self {
        Self {
            runs,
            racy: false,
            copied: false,
        }
    }

    /// Wraps `runs` (sorted, disjoint, page-aligned) of this process's memory that the sender
    /// itself may write while it sends them (its own stack and heap, in the final round of a
    /// migration): each batch is copied through the kernel just before it goes out, and sent and
    /// checksummed from the copy.
    #[must_use]
    pub fn copied(runs: &'a [Range<u64>]) -> Self {
        Self {
            runs,
            racy: true,
            copied: true,
        }
    }

    /// Wraps `runs` (sorted, disjoint, page-aligned) of this process's memory that the application
    /// may unmap at any moment (a running application during a pre-copy round). Nothing reads the
    /// memory directly: the kernel copies it into the socket (an unmapped run fails the send with
    /// `EFAULT`) and checksums are taken from a copy made with `process_vm_readv` (a page that cannot
    /// be read gets no valid checksum and comes back as a suspect). Costs one extra read of the pages.
    #[must_use]
    pub fn racy(runs: &'a [Range<u64>]) -> Self {
        Self {
            runs,
            racy: true,
            copied: false,
        }
    }

    /// True when the pages go out from a copy ([`Readable::copied`]).
    #[must_use]
    pub fn is_copied(&self) -> bool {
        self.copied
    }

    /// The runs.
    #[must_use]
    pub fn runs(&self) -> &'a [Range<u64>] {
        self.runs
    }

    /// Splits the runs into batches of at most `max_pages` pages and `max_runs` runs.
    #[must_use]
    pub fn batches(&self, page_size: u64, max_pages: u64, max_runs: usize) -> Vec<ReadableBatch<'a>> {
        crate::batch::split(self.runs, page_size, max_pages, max_runs)
            .into_iter()
            .map(|runs| ReadableBatch {
                runs,
                racy: self.racy,
                copied: self.copied,
                _promise: PhantomData,
            })
            .collect()
    }
}

/// A batch cut from a [`Readable`]: covered by the same promise.
#[derive(Debug, Clone)]
pub struct ReadableBatch<'a> {
    runs: Vec<Range<u64>>,
    racy: bool,
    copied: bool,
    _promise: PhantomData<&'a [Range<u64>]>,
}

impl ReadableBatch<'_> {
    /// The runs.
    #[must_use]
    pub fn runs(&self) -> &[Range<u64>] {
        &self.runs
    }

    /// One checksum per page, in run order. Racy memory is read through `reader` (made on first
    /// use and kept by the caller).
    ///
    /// # Errors
    /// The read buffer cannot be made or written.
    pub fn page_sums(&self, page_size: usize, reader: &mut Option<ReadBuffer>) -> std::io::Result<Vec<u32>> {
        let mut sums = Vec::new();
        if self.racy {
            let buf = match reader {
                Some(b) => b,
                None => reader.insert(ReadBuffer::for_pages(page_size)?),
            };
            self.page_sums_read(page_size, &mut sums, buf)?;
            return Ok(sums);
        }
        for r in &self.runs {
            for addr in (r.start..r.end).step_by(page_size) {
                // SAFETY: the batch is part of a Readable, whose creator promised the memory stays
                // mapped and readable; pages are page-aligned.
                sums.push(unsafe { checksum::page_sum(addr_of(addr) as *const u8, page_size) });
            }
        }
        Ok(sums)
    }

    /// True when `len` bytes at `addr` lie inside one run of the batch.
    #[must_use]
    pub fn covers(&self, addr: u64, len: usize) -> bool {
        self.runs
            .iter()
            .any(|r| r.start <= addr && addr.saturating_add(len as u64) <= r.end)
    }

    /// True when the batch's memory may vanish while it is sent ([`Readable::racy`],
    /// [`Readable::copied`]).
    #[must_use]
    pub fn is_racy(&self) -> bool {
        self.racy
    }

    /// Copies `dst.len()` bytes of this process's memory from `addr` (inside one run of the batch)
    /// into `dst`, through the kernel (`process_vm_readv`), so that memory the application unmaps
    /// meanwhile cannot fault: a page that cannot be read lands as zeros. Returns how many pages
    /// could not be read (their checksums, taken the same way, cannot match: they come back as
    /// suspects).
    ///
    /// # Errors
    /// A range outside the batch's runs.
    pub fn store(&self, addr: u64, dst: &Landing<'_>, page_size: usize) -> std::io::Result<u64> {
        if !self.covers(addr, dst.len()) {
            return Err(std::io::Error::other("a store outside the batch's runs"));
        }
        let mut done = 0usize;
        let mut unreadable = 0u64;
        while done < dst.len() {
            // SAFETY: the rest of `dst`, which its creator promised writable and mapped for its
            // lifetime.
            let got = unsafe {
                read_own(
                    (dst.run.addr + done) as *mut u8,
                    addr + done as u64,
                    dst.len() - done,
                )
            };
            done += got;
            if done < dst.len() {
                // The page at `done` is gone: zeros, and on with the next page.
                let end = (done / page_size + 1) * page_size;
                let end = end.min(dst.len());
                // SAFETY: inside `dst` (see above).
                unsafe { std::ptr::write_bytes((dst.run.addr + done) as *mut u8, 0, end - done) };
                done = end;
                unreadable += 1;
            }
        }
        Ok(unreadable)
    }

    /// Copies `buf.len()` bytes of this process's memory from `addr` (inside one run of the batch)
    /// into `buf` through the kernel, and appends one checksum per page of the copy to `sums`. A
    /// page that cannot be read (the application unmapped it) reads as zeros and gets the complement
    /// of its copy's sum, which the landed page cannot match (it comes back as a suspect).
    ///
    /// # Errors
    /// A range outside the batch's runs, or a length that is not whole pages.
    pub fn read_summed(
        &self,
        addr: u64,
        buf: &mut [u8],
        page_size: usize,
        sums: &mut Vec<u32>,
    ) -> std::io::Result<()> {
        let mut gone = Vec::new();
        self.read_tolerant(addr, buf, page_size, &mut gone)?;
        push_sums(sums, buf, page_size, &gone);
        Ok(())
    }

    /// Copies `buf.len()` bytes of this process's memory from `addr` (inside one run of the batch)
    /// into `buf` through the kernel. A page that cannot be read (the application unmapped it)
    /// reads as zeros, and its index in `buf` is appended to `gone`.
    ///
    /// # Errors
    /// A range outside the batch's runs, or a length that is not whole pages.
    pub fn read_tolerant(
        &self,
        addr: u64,
        buf: &mut [u8],
        page_size: usize,
        gone: &mut Vec<usize>,
    ) -> std::io::Result<()> {
        if !self.covers(addr, buf.len()) || buf.len() % page_size != 0 {
            return Err(std::io::Error::other("a read outside the batch's runs"));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is writable for its whole length.
            let got = unsafe { read_own(rest.as_mut_ptr(), addr + done as u64, rest.len()) };
            done += got / page_size * page_size;
            if done < buf.len() {
                buf[done..done + page_size].fill(0);
                gone.push(done / page_size);
                done += page_size;
            }
        }
        Ok(())
    }

    /// True when the batch goes out from a copy ([`Readable::copied`]).
    #[must_use]
    pub fn is_copied(&self) -> bool {
        self.copied
    }

    /// Copies the batch's pages, in run order, into `buf` (which must hold them all) through the
    /// kernel: `process_vm_readv`, up to [`IOV_MAX`](super::iov::IOV_MAX) runs a call, and
    /// `/proc/self/mem` for a run that it cannot read, which also reads pages the process may not
    /// (`PROT_NONE` memory that holds data).
    ///
    /// A final round's scattered single pages took 4-9 us each when every run was a `pread` of
    /// `/proc/self/mem` (which pins the page and copies it twice): 17-18 ms for 2000 pages.
    ///
    /// # Errors
    /// A buffer too small for the batch, or a page that cannot be read.
    pub fn copy_into(&self, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let runs = self.mem_runs();
        let total = runs.iter().map(|r| r.len).fold(0usize, usize::saturating_add);
        if buf.len() < total {
            return Err(std::io::Error::other("copy buffer too small for the batch"));
        }
        let mut forced: Option<std::fs::File> = None;
        let (mut i, mut at) = (0, 0);
        while i < runs.len() {
            let end = runs.len().min(i + super::iov::IOV_MAX);
            // SAFETY: `buf[at..]` is writable and holds at least the rest of the runs (checked
            // above), and only this function's exclusive borrow covers it.
            let mut got = unsafe { read_own_runs(buf[at..].as_mut_ptr(), &runs[i..end]) };
            // The kernel copies whole runs, up to the first it cannot read.
            while i < end && got >= runs[i].len {
                got -= runs[i].len;
                at += runs[i].len;
                i += 1;
            }
            if i < end {
                let r = &runs[i];
                let mem = match &forced {
                    Some(f) => f,
                    None => forced.insert(std::fs::File::open("/proc/self/mem")?),
                };
                mem.read_exact_at(&mut buf[at..at + r.len], r.addr as u64)?;
                at += r.len;
                i += 1;
            }
        }
        Ok(())
    }

    /// Checksums of a copy of the pages read through the kernel. A page it cannot read gets the
    /// complement of its copy's sum, which the landed page cannot match: the receiver reports it as a
    /// suspect, and the sender must send it again (or fail).
    fn page_sums_read(
        &self,
        page_size: usize,
        sums: &mut Vec<u32>,
        buf: &mut ReadBuffer,
    ) -> std::io::Result<()> {
        let chunk = (buf.len() / page_size * page_size) as u64;
        let mut gone = Vec::new();
        for r in &self.runs {
            let mut addr = r.start;
            while addr < r.end {
                let n = usize::try_from((r.end - addr).min(chunk)).unwrap_or(usize::MAX);
                gone.clear();
                let bytes = buf.read(self, addr, n, page_size, &mut gone)?;
                push_sums(sums, bytes, page_size, &gone);
                addr += n as u64;
            }
        }
        Ok(())
    }

    pub(crate) fn mem_runs(&self) -> Vec<MemRun> {
        self.runs
            .iter()
            .map(|r| MemRun {
                addr: addr_of(r.start),
                len: addr_of(r.end - r.start),
            })
            .collect()
    }
}

/// A zone of image memory that pages land in, valid while the image it borrows lives.
#[derive(Debug, Clone, Copy)]
pub struct Landing<'a> {
    run: MemRun,
    _image: PhantomData<&'a ()>,
}

impl Landing<'_> {
    /// A zone of `len` bytes at `addr`.
    ///
    /// # Safety
    /// The memory must be owned by the value the lifetime borrows, writable, mapped for that whole
    /// lifetime, and never covered by a Rust reference: the kernel (or a NIC) writes it, possibly from
    /// several streams at once. `addr` must be 8-byte aligned.
    #[must_use]
    pub unsafe fn new(addr: usize, len: usize) -> Self {
        Self {
            run: MemRun { addr, len },
            _image: PhantomData,
        }
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.run.len
    }

    /// The start of the zone.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.run.addr as *mut u8
    }

    /// The `len` bytes at `off` of the zone (`off` a multiple of 8); `None` outside it.
    #[must_use]
    pub fn part(&self, off: usize, len: usize) -> Option<Self> {
        (off % 8 == 0 && off.checked_add(len).is_some_and(|e| e <= self.run.len)).then_some(Self {
            run: MemRun {
                addr: self.run.addr + off,
                len,
            },
            _image: PhantomData,
        })
    }

    /// Copies `bytes` into the start of the zone.
    ///
    /// # Errors
    /// More bytes than the zone holds.
    pub fn fill_from(&self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.len() > self.run.len {
            return Err(std::io::Error::other("more bytes than the zone holds"));
        }
        // SAFETY: the zone is writable and mapped for its lifetime and no Rust reference covers it
        // (the creator's promise); `bytes` is a distinct Rust slice, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.run.addr as *mut u8, bytes.len()) };
        Ok(())
    }

    /// Copies `bytes` (whole pages of `page_size`) into the start of the zone and appends each
    /// page's checksum to `sums`, reading every byte once for both.
    ///
    /// # Errors
    /// More bytes than the zone holds, or not whole pages.
    pub fn fill_summed(&self, bytes: &[u8], page_size: usize, sums: &mut Vec<u32>) -> std::io::Result<()> {
        if bytes.len() > self.run.len || page_size % 8 != 0 || bytes.len() % page_size != 0 {
            return Err(std::io::Error::other("not whole pages that fit the zone"));
        }
        for (i, page) in bytes.chunks(page_size).enumerate() {
            // SAFETY: inside the zone (checked), which is 8-byte aligned (the creator's promise) and
            // stays so at page offsets; writable, mapped for its lifetime and covered by no Rust
            // reference (the creator's promise); `page` is a distinct Rust slice.
            sums.push(unsafe {
                checksum::copy_page_summed((self.run.addr + i * page_size) as *mut u8, page)
            });
        }
        Ok(())
    }

    /// True for an empty zone.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.run.len == 0
    }

    /// The checksum of the `page_size` bytes at `off` in the zone; `None` outside it.
    #[must_use]
    pub fn page_sum(&self, off: usize, page_size: usize) -> Option<u32> {
        if off.checked_add(page_size).is_none_or(|e| e > self.run.len) {
            return None;
        }
        // SAFETY: inside the zone (checked), which its creator promised mapped for the lifetime;
        // atomic loads tolerate concurrent writers.
        Some(unsafe { checksum::page_sum((self.run.addr + off) as *const u8, page_size) })
    }

    pub(crate) fn mem_run(&self) -> MemRun {
        self.run
    }
}

/// Bytes of the read buffers that checksum racy memory: small enough to stay in cache.
pub const READ_BUFFER: usize = 256 << 10;

/// A buffer in cache that this process's racy memory is read into without pinning it: the kernel
/// copies from the application's addresses into the buffer's own memfd (`pwrite`), faulting pages in
/// as the application itself would, and stops short at memory that has gone.
///
/// `process_vm_readv` pins each page it reads, and pinning marks the page accessed: the second time
/// a page is read, the kernel moves it to the active list under the LRU lock. Measured here (1 GiB
/// in 256 KiB pieces), the pinning read takes 0.20 s a pass and 0.28 s on the second; `pwrite` into
/// a memfd 0.15-0.16 s on every pass.
#[derive(Debug)]
pub struct ReadBuffer {
    fd: std::os::fd::OwnedFd,
    map: OwnMapping,
}

impl ReadBuffer {
    /// A buffer of `len` bytes (a multiple of the page size).
    ///
    /// # Errors
    /// `memfd_create`, `ftruncate` or `mmap` failing.
    pub fn new(len: usize) -> std::io::Result<Self> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: a valid C string; the flags are defined.
        let raw = unsafe { libc::memfd_create(c"om-read-buffer".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).map_err(|_| std::io::Error::other("buffer too large"))?;
        // SAFETY: an open memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let map = OwnMapping::new(len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd())?;
        Ok(Self { fd, map })
    }

    /// A buffer of [`READ_BUFFER`] bytes, or one page where pages are larger.
    ///
    /// # Errors
    /// As [`ReadBuffer::new`].
    pub fn for_pages(page_size: usize) -> std::io::Result<Self> {
        Self::new(READ_BUFFER.max(page_size))
    }

    /// Bytes it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// True for an empty buffer.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Its mapping (not part of an image).
    #[must_use]
    pub fn mapping(&self) -> Range<u64> {
        self.map.range()
    }

    /// Its memfd (not part of an image).
    #[must_use]
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// Copies `len` bytes of this process's memory from `addr` (inside one run of `batch`) into
    /// the start of the buffer and returns them. A page that cannot be read (the application
    /// unmapped it) reads as zeros, and its index is appended to `gone`.
    ///
    /// # Errors
    /// A range outside the batch's runs, more bytes than the buffer holds, a length that is not
    /// whole pages, or the memfd failing.
    pub fn read(
        &mut self,
        batch: &ReadableBatch<'_>,
        addr: u64,
        len: usize,
        page_size: usize,
        gone: &mut Vec<usize>,
    ) -> std::io::Result<&[u8]> {
        use std::os::fd::AsRawFd;
        if !batch.covers(addr, len) || len % page_size != 0 || len > self.map.len {
            return Err(std::io::Error::other(
                "a read outside the batch's runs or the buffer",
            ));
        }
        let mut done = 0usize;
        while done < len {
            let off = libc::off_t::try_from(done).unwrap_or(libc::off_t::MAX);
            // SAFETY: the kernel reads `len - done` bytes at `addr + done` in this process and stops
            // short (or fails with EFAULT) at memory that is not mapped; nothing here dereferences it.
            let got = unsafe {
                libc::pwrite(
                    self.fd.as_raw_fd(),
                    addr_of(addr + done as u64) as *const libc::c_void,
                    len - done,
                    off,
                )
            };
            let got = match usize::try_from(got) {
                Ok(n) => n,
                Err(_) => match std::io::Error::last_os_error() {
                    e if e.raw_os_error() == Some(libc::EFAULT) => 0,
                    e if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    e => return Err(e),
                },
            };
            done += got / page_size * page_size;
            if done < len {
                let zeros = vec![0u8; page_size];
                let off = libc::off_t::try_from(done).unwrap_or(libc::off_t::MAX);
                // SAFETY: a buffer of `page_size` readable bytes.
                let n = unsafe { libc::pwrite(self.fd.as_raw_fd(), zeros.as_ptr().cast(), page_size, off) };
                if usize::try_from(n).ok() != Some(page_size) {
                    return Err(std::io::Error::last_os_error());
                }
                gone.push(done / page_size);
                done += page_size;
            }
        }
        // SAFETY: the first `len` bytes of the mapping, which lives as long as `self`; only the
        // kernel writes it, in this method, which the returned borrow of `self` excludes meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(self.map.addr as *const u8, len) })
    }
}

/// A mapping this process made and owns, unmapped when dropped.
#[derive(Debug)]
struct OwnMapping {
    addr: usize,
    len: usize,
}

impl OwnMapping {
    /// `mmap` of `len` bytes with `prot` and `flags` (of `fd`, or -1), at an address the kernel
    /// picks.
    fn new(len: usize, prot: libc::c_int, flags: libc::c_int, fd: libc::c_int) -> std::io::Result<Self> {
        // SAFETY: a new mapping at an address the kernel picks cannot overlap memory Rust owns.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr as usize,
            len,
        })
    }

    fn range(&self) -> Range<u64> {
        self.addr as u64..(self.addr + self.len) as u64
    }
}

impl Drop for OwnMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made; no borrow of it outlives the value (its owners hand
        // out borrows of themselves only).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Where a batch sent from a copy ([`Readable::copied`], a migration's final round) is copied: a
/// mapping of its own, so that it is never part of a captured image (it is one of the sender's
/// [mappings](crate::TcpSender::mappings)), populated when made, so that the final round does not
/// fault in fresh memory while the process is frozen. A buffer grown at the first copy (in the
/// capture arena) took 3-8 ms of each final round.
#[derive(Debug)]
pub struct CopyBuffer {
    map: OwnMapping,
}

impl CopyBuffer {
    /// A buffer of `len` bytes (more than 0), every page of it allocated.
    ///
    /// # Errors
    /// `mmap` failing (out of memory).
    pub fn new(len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::other("an empty copy buffer"));
        }
        let map = OwnMapping::new(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
        )?;
        Ok(Self { map })
    }

    /// Its mapping (not part of an image).
    #[must_use]
    pub fn mapping(&self) -> Range<u64> {
        self.map.range()
    }

    /// Its first `len` bytes to write, or `None` when it is smaller.
    pub fn bytes_mut(&mut self, len: usize) -> Option<&mut [u8]> {
        // SAFETY: the mapping is readable and writable for its whole length and lives as long as
        // `self`, whose exclusive borrow makes this the only reference to it.
        (len <= self.map.len)
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.map.addr as *mut u8, len) })
    }
}

/// Appends the checksum of each page of `bytes` to `sums`, the complement for the pages of `gone`
/// (indices into `bytes`), which could not be read.
fn push_sums(sums: &mut Vec<u32>, bytes: &[u8], page_size: usize, gone: &[usize]) {
    let first = sums.len();
    sums.extend(bytes.chunks(page_size).map(checksum::page_sum_bytes));
    mark_gone(&mut sums[first..], gone);
}

/// Gives each page of `gone` (indices into `sums`) the complement of its copy's checksum: the copy
/// holds zeros where the page could not be read, which the landed page must not be taken for.
pub fn mark_gone(sums: &mut [u32], gone: &[usize]) {
    for &i in gone {
        if let Some(s) = sums.get_mut(i) {
            *s = !*s;
        }
    }
}

/// Copies up to `len` bytes of this process's memory at `src` to `dst` through the kernel
/// (`process_vm_readv`); returns how many bytes it copied before memory that is not mapped (none
/// when `src` itself is not). Nothing here dereferences `src`: a running application may unmap it.
///
/// # Safety
/// `dst` must be writable for `len` bytes and not covered by a Rust reference other than the
/// caller's exclusive one.
unsafe fn read_own(dst: *mut u8, src: u64, len: usize) -> usize {
    let run = MemRun {
        addr: addr_of(src),
        len,
    };
    // SAFETY: the caller's promise on `dst` covers the one run's length.
    unsafe { read_own_runs(dst, &[run]) }
}

/// Copies the runs of this process's memory, in order, to `dst` through the kernel with one
/// `process_vm_readv` (at most [`IOV_MAX`](super::iov::IOV_MAX) runs); returns how many bytes it
/// copied. The kernel stops at the first run it cannot read (not mapped, or not readable by the
/// process), after the whole runs before it. Nothing here dereferences the runs.
///
/// # Safety
/// `dst` must be writable for the runs' total length and not covered by a Rust reference other than
/// the caller's exclusive one.
unsafe fn read_own_runs(dst: *mut u8, runs: &[MemRun]) -> usize {
    let runs = &runs[..runs.len().min(super::iov::IOV_MAX)];
    let len = runs.iter().map(|r| r.len).sum();
    let remote: Vec<libc::iovec> = runs
        .iter()
        .map(|r| libc::iovec {
            iov_base: r.addr as *mut libc::c_void,
            iov_len: r.len,
        })
        .collect();
    let local = libc::iovec {
        iov_base: dst.cast(),
        iov_len: len,
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    // SAFETY: `local` is writable for `len` bytes (the caller's promise); the kernel reads the
    // remote runs in this process and stops short (or fails) on memory it cannot read.
    let got = unsafe {
        libc::process_vm_readv(
            me,
            &raw const local,
            1,
            remote.as_ptr(),
            libc::c_ulong::try_from(remote.len()).unwrap_or(0),
            0,
        )
    };
    usize::try_from(got).unwrap_or(0)
}

fn addr_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Sends `head` followed by the pages of `batch` (if any), straight from memory.
///
/// # Errors
/// The first failed `sendmsg`.
pub fn send(
    fd: std::os::fd::BorrowedFd<'_>,
    head: &[&[u8]],
    batch: Option<&ReadableBatch<'_>>,
) -> std::io::Result<()> {
    let runs = batch.map(ReadableBatch::mem_runs).unwrap_or_default();
    if batch.is_some_and(|b| b.racy) {
        // SAFETY: racy runs are this process's memory that may vanish; the tolerant send reads them
        // only through the kernel and sends zeros where they are gone.
        return unsafe { super::iov::send_vectored_tolerant(fd, head, &runs) };
    }
    // SAFETY: the runs come from a ReadableBatch, covered by its Readable's promise.
    unsafe { super::iov::send_vectored(fd, head, &runs) }
}

/// Fills every zone completely from the socket, in order.
///
/// # Errors
/// The first failed `readv`, or `UnexpectedEof`.
pub fn recv(fd: std::os::fd::BorrowedFd<'_>, zones: &[Landing<'_>]) -> std::io::Result<()> {
    let runs: Vec<MemRun> = zones.iter().map(Landing::mem_run).collect();
    // SAFETY: every zone is a Landing, whose creator promised writable, unaliased memory that stays
    // mapped while the borrow lives (at least this call).
    unsafe { super::iov::recv_exact_into(fd, &runs) }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// `pages` pages of anonymous memory, page `i` filled with the byte `i + 1`.
    fn pattern(pages: usize) -> usize {
        // SAFETY: a new private anonymous mapping.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        for i in 0..pages {
            let page = (addr as usize + i * PAGE) as *mut u8;
            // SAFETY: page `i` of the new mapping, which no Rust reference covers.
            unsafe { std::ptr::write_bytes(page, (i + 1) as u8, PAGE) };
        }
        addr as usize
    }

    fn unmap(addr: usize, len: usize) {
        // SAFETY: part of a mapping the test made and reads only through the kernel from now on.
        assert_eq!(unsafe { libc::munmap(addr as *mut libc::c_void, len) }, 0);
    }

    #[test]
    fn a_read_buffer_reads_memory_and_zeros_pages_that_are_gone() {
        let at = pattern(8);
        // Pages 3, 6 and 7 go, as if the application unmapped them.
        unmap(at + 3 * PAGE, PAGE);
        unmap(at + 6 * PAGE, 2 * PAGE);
        let run = [at as u64..(at + 8 * PAGE) as u64];
        let batch = Readable::racy(&run).batches(PAGE as u64, 64, 64).remove(0);
        let mut buf = ReadBuffer::new(16 * PAGE).unwrap();
        let mut gone = Vec::new();
        let bytes = buf.read(&batch, at as u64, 8 * PAGE, PAGE, &mut gone).unwrap();
        assert_eq!(gone, [3, 6, 7]);
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let want = if gone.contains(&i) { 0 } else { (i + 1) as u8 };
            assert!(page.iter().all(|&b| b == want), "page {i}");
        }
        // The checksums of racy memory: gone pages get the complement of their zeros' sum.
        let sums = batch.page_sums(PAGE, &mut Some(buf)).unwrap();
        for (i, s) in sums.iter().enumerate() {
            let page = vec![if gone.contains(&i) { 0 } else { (i + 1) as u8 }; PAGE];
            let sum = checksum::page_sum_bytes(&page);
            assert_eq!(*s, if gone.contains(&i) { !sum } else { sum }, "page {i}");
        }
        unmap(at, 3 * PAGE);
        unmap(at + 4 * PAGE, 2 * PAGE);
    }

    #[test]
    fn a_copy_reads_scattered_runs_protected_pages_too_and_fails_on_gone_ones() {
        // More single-page runs than one `process_vm_readv` takes, one of them PROT_NONE.
        let pages = 2 * super::super::iov::IOV_MAX + 10;
        let at = pattern(pages);
        // SAFETY: page 700 of the test's own mapping; the copy reads it through the kernel only.
        let r = unsafe { libc::mprotect((at + 700 * PAGE) as *mut libc::c_void, PAGE, libc::PROT_NONE) };
        assert_eq!(r, 0);
        // Every other page, in order: page i is filled with (i + 1) as u8.
        let runs: Vec<Range<u64>> = (0..pages)
            .step_by(2)
            .map(|i| (at + i * PAGE) as u64..(at + (i + 1) * PAGE) as u64)
            .collect();
        let readable = Readable::copied(&runs);
        let batches = readable.batches(PAGE as u64, pages as u64, runs.len());
        assert_eq!(batches.len(), 1);
        let mut buf = vec![0u8; runs.len() * PAGE];
        batches[0].copy_into(&mut buf).unwrap();
        for (k, page) in buf.chunks(PAGE).enumerate() {
            let want = (2 * k + 1) as u8;
            assert!(page.iter().all(|&b| b == want), "run {k}");
        }
        // Too small a buffer is refused before anything is read.
        assert!(batches[0].copy_into(&mut buf[PAGE..]).is_err());
        // A page that is gone cannot be copied: an error, not zeros.
        unmap(at + 1000 * PAGE, PAGE);
        let gone = [(at + 998 * PAGE) as u64..(at + 1001 * PAGE) as u64];
        let batch = Readable::copied(&gone).batches(PAGE as u64, 64, 64).remove(0);
        assert!(batch.copy_into(&mut buf[..3 * PAGE]).is_err());
        unmap(at, 1000 * PAGE);
        unmap(at + 1001 * PAGE, (pages - 1001) * PAGE);
    }

    #[test]
    fn a_copy_buffer_is_its_own_populated_mapping() {
        let mut b = CopyBuffer::new(4 * PAGE).unwrap();
        let m = b.mapping();
        assert_eq!(m.end - m.start, (4 * PAGE) as u64);
        b.bytes_mut(2 * PAGE).unwrap().fill(7);
        assert!(b.bytes_mut(2 * PAGE).unwrap().iter().all(|&x| x == 7));
        assert!(b.bytes_mut(4 * PAGE + 1).is_none());
        // Populated when made: every page is resident (mincore).
        let mut resident = [0u8; 4];
        // SAFETY: the buffer's own mapping, four pages, and a vector of four bytes.
        let r = unsafe { libc::mincore(m.start as *mut libc::c_void, 4 * PAGE, resident.as_mut_ptr()) };
        assert_eq!(r, 0);
        assert!(resident.iter().all(|&x| x & 1 == 1), "{resident:?}");
        assert!(CopyBuffer::new(0).is_err());
    }

    #[test]
    fn a_read_buffer_refuses_reads_outside_the_batch_or_itself() {
        let at = pattern(4);
        let run = [at as u64..(at + 2 * PAGE) as u64];
        let batch = Readable::racy(&run).batches(PAGE as u64, 64, 64).remove(0);
        let mut buf = ReadBuffer::new(PAGE).unwrap();
        let mut gone = Vec::new();
        // Beyond the batch's run, more than the buffer holds, not whole pages.
        assert!(
            buf.read(&batch, at as u64 + PAGE as u64, 2 * PAGE, PAGE, &mut gone)
                .is_err()
        );
        assert!(buf.read(&batch, at as u64, 2 * PAGE, PAGE, &mut gone).is_err());
        assert!(buf.read(&batch, at as u64, PAGE / 2, PAGE, &mut gone).is_err());
        assert!(gone.is_empty());
        let bytes = buf
            .read(&batch, at as u64 + PAGE as u64, PAGE, PAGE, &mut gone)
            .unwrap();
        assert!(bytes.iter().all(|&b| b == 2));
        unmap(at, 4 * PAGE);
    }

    #[test]
    fn a_summed_fill_lands_the_pages_and_their_checksums() {
        let at = pattern(4);
        // SAFETY: the test's own mapping, written only through the zone while it is used.
        let zone = unsafe { Landing::new(at, 4 * PAGE) };
        let src: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
        let mut sums = vec![42];
        zone.part(PAGE, 3 * PAGE)
            .unwrap()
            .fill_summed(&src, PAGE, &mut sums)
            .unwrap();
        let want: Vec<u32> = src.chunks(PAGE).map(checksum::page_sum_bytes).collect();
        assert_eq!(sums[1..], want[..]);
        for (i, sum) in want.iter().enumerate() {
            assert_eq!(zone.page_sum(PAGE * (i + 1), PAGE), Some(*sum));
        }
        assert_eq!(zone.page_sum(0, PAGE), Some(checksum::page_sum_bytes(&[1; PAGE])));
        // Too much for the zone, or not whole pages.
        assert!(
            zone.part(PAGE, PAGE)
                .unwrap()
                .fill_summed(&src, PAGE, &mut sums)
                .is_err()
        );
        assert!(zone.fill_summed(&src[..100], PAGE, &mut sums).is_err());
        unmap(at, 4 * PAGE);
    }
}
