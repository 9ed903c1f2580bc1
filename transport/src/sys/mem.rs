//! Proof-carrying handles on raw memory: the one place where a promise about memory is made, so that
//! everything above (connections, senders, receivers) is safe code.
//!
//! - [`Readable`]: runs of this process's memory that the caller promised stay mapped and readable
//!   (the application's pages during a round). Created with an `unsafe` constructor by the code that
//!   can keep the promise (the runtime, holding its munmap guard); split into batches here, so a batch
//!   is a subset of the promise by construction.
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
    /// `EFAULT`, but checksums would fault: the caller must prevent it (the runtime's munmap guard).
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

    /// One checksum per page, in run order. Racy memory is read through `scratch` (grown to fit
    /// and kept by the caller: a fresh buffer per batch dirtied fresh heap pages, which a migration
    /// then sends in its final round).
    #[must_use]
    pub fn page_sums(&self, page_size: usize, scratch: &mut Vec<u8>) -> Vec<u32> {
        let mut sums = Vec::new();
        if self.racy {
            self.page_sums_copied(page_size, &mut sums, scratch);
            return sums;
        }
        for r in &self.runs {
            for addr in (r.start..r.end).step_by(page_size) {
                // SAFETY: the batch is part of a Readable, whose creator promised the memory stays
                // mapped and readable; pages are page-aligned.
                sums.push(unsafe { checksum::page_sum(addr_of(addr) as *const u8, page_size) });
            }
        }
        sums
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
        if !self.covers(addr, buf.len()) || buf.len() % page_size != 0 {
            return Err(std::io::Error::other("a read outside the batch's runs"));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is writable for its whole length.
            let got = unsafe { read_own(rest.as_mut_ptr(), addr + done as u64, rest.len()) };
            let whole = done + got / page_size * page_size;
            for page in buf[done..whole].chunks(page_size) {
                sums.push(checksum::page_sum_bytes(page));
            }
            done = whole;
            if done < buf.len() {
                let page = &mut buf[done..done + page_size];
                page.fill(0);
                sums.push(!checksum::page_sum_bytes(page));
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

    /// Copies the batch's pages, in run order, into `buf` (which must hold them all) through
    /// `/proc/self/mem`, which also reads pages the process may not (`PROT_NONE` memory that holds
    /// data).
    ///
    /// # Errors
    /// A page that cannot be read.
    pub fn copy_into(&self, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open("/proc/self/mem")?;
        let mut at = 0usize;
        for r in &self.runs {
            let n = usize::try_from(r.end - r.start).unwrap_or(usize::MAX);
            let Some(dst) = buf.get_mut(at..at.saturating_add(n)) else {
                return Err(std::io::Error::other("copy buffer too small for the batch"));
            };
            mem.read_exact_at(dst, r.start)?;
            at += n;
        }
        Ok(())
    }

    /// Checksums of a copy of the pages read through the kernel. A page it cannot read gets the
    /// complement of its copy's sum, which the landed page cannot match: the receiver reports it as a
    /// suspect, and the sender must send it again (or fail).
    fn page_sums_copied(&self, page_size: usize, sums: &mut Vec<u32>, scratch: &mut Vec<u8>) {
        const BOUNCE: usize = 256 << 10;
        if scratch.len() < BOUNCE.max(page_size) {
            scratch.resize(BOUNCE.max(page_size), 0);
        }
        let buf = &mut scratch[..BOUNCE.max(page_size)];
        for r in &self.runs {
            let mut addr = r.start;
            while addr < r.end {
                let n = usize::try_from(r.end - addr).unwrap_or(usize::MAX).min(buf.len());
                // SAFETY: `buf` is writable for `n` bytes.
                let got = unsafe { read_own(buf.as_mut_ptr(), addr, n) };
                for off in (0..n).step_by(page_size) {
                    let sum = checksum::page_sum_bytes(&buf[off..off + page_size]);
                    sums.push(if off + page_size <= got { sum } else { !sum });
                }
                addr += n as u64;
            }
        }
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

/// Copies up to `len` bytes of this process's memory at `src` to `dst` through the kernel
/// (`process_vm_readv`); returns how many bytes it copied before memory that is not mapped (none
/// when `src` itself is not). Nothing here dereferences `src`: a running application may unmap it.
///
/// # Safety
/// `dst` must be writable for `len` bytes and not covered by a Rust reference other than the
/// caller's exclusive one.
unsafe fn read_own(dst: *mut u8, src: u64, len: usize) -> usize {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let local = libc::iovec {
        iov_base: dst.cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr_of(src) as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` is writable for `len` bytes (the caller's promise); the kernel reads
    // `remote` in this process and stops short (or fails) on memory that is not mapped.
    let got = unsafe { libc::process_vm_readv(me, &raw const local, 1, &raw const remote, 1, 0) };
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
