//! Memory mappings: a safe owned anonymous [`Region`], and the raw calls trackers make.
//!
//! # References
//! `mmap(2)`, `mremap(2)`, `mprotect(2)`, `madvise(2)`.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// An anonymous private mapping owned by this value and unmapped when it is dropped.
///
/// Shared access goes through [`Region::words`], atomics that any number of threads may read and write
/// at once; exclusive access through [`Region::bytes_mut`].
#[derive(Debug)]
pub struct Region {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping belongs to the process, not to a thread; shared access is only through atomics
// and exclusive access needs `&mut`, so Rust's aliasing rules hold across threads.
unsafe impl Send for Region {}
// SAFETY: as above: `&Region` only hands out atomics.
unsafe impl Sync for Region {}

/// A system call's 0-or-error result.
fn status(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check(r: *mut libc::c_void) -> io::Result<NonNull<u8>> {
    if r == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(r.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

impl Region {
    /// Maps `len` bytes (a multiple of 8) of fresh zeroed memory; at exactly `at` when given (failing
    /// with `EEXIST` rather than replacing anything there), else where the kernel chooses.
    ///
    /// # Errors
    /// The `mmap` error.
    pub fn map_anon(len: usize, at: Option<usize>) -> io::Result<Self> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if at.is_some() {
            flags |= libc::MAP_FIXED_NOREPLACE;
        }
        let hint = at.unwrap_or(0) as *mut libc::c_void;
        // SAFETY: a new anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing mapping, so no
        // memory that Rust code references can change.
        let r = unsafe { libc::mmap(hint, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        let addr = check(r)?;
        if at.is_some_and(|a| a != addr.as_ptr() as usize) {
            // Kernels before 4.17 treat MAP_FIXED_NOREPLACE as a hint.
            // SAFETY: we just created this mapping and nothing references it.
            unsafe { libc::munmap(r, len) };
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(Self { addr, len })
    }

    /// First byte.
    #[must_use]
    pub fn addr(&self) -> usize {
        self.addr.as_ptr() as usize
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory as 64-bit atomics, for shared reads and writes from any thread.
    #[must_use]
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, `len` bytes long and lives as long as `self`; AtomicU64
        // has the size and alignment of u64 and permits concurrent access through shared references.
        unsafe { std::slice::from_raw_parts(self.addr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }

    /// The memory as bytes, exclusively.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `&mut self` guarantees no other reference into the mapping exists; the mapping is
        // `len` readable and writable bytes for as long as the borrow.
        unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr(), self.len) }
    }

    /// Moves and/or resizes the mapping (`mremap` with `MREMAP_MAYMOVE`, and `MREMAP_FIXED` to `to`).
    ///
    /// # Errors
    /// The `mremap` error; the region is unchanged then.
    pub fn remap(&mut self, new_len: usize, to: Option<usize>) -> io::Result<()> {
        let mut flags = libc::MREMAP_MAYMOVE;
        if to.is_some() {
            flags |= libc::MREMAP_FIXED;
        }
        let target = to.unwrap_or(0) as *mut libc::c_void;
        // SAFETY: `&mut self` means nothing references the old mapping; MREMAP_FIXED may replace what is
        // at `to`, which the caller states is its own by asking for it.
        let r = unsafe { libc::mremap(self.addr.as_ptr().cast(), self.len, new_len, flags, target) };
        self.addr = check(r)?;
        self.len = new_len;
        Ok(())
    }

    /// Drops the pages of `[offset, offset+len)` (`MADV_DONTNEED`): they read back as zeros.
    ///
    /// # Errors
    /// The `madvise` error.
    pub fn dontneed(&mut self, offset: usize, len: usize) -> io::Result<()> {
        self.advise(offset, len, libc::MADV_DONTNEED)
    }

    /// Advises transparent huge pages for `[offset, offset+len)` (`MADV_HUGEPAGE`).
    ///
    /// # Errors
    /// The `madvise` error (`EINVAL` without THP support).
    pub fn advise_hugepage(&mut self, offset: usize, len: usize) -> io::Result<()> {
        self.advise(offset, len, libc::MADV_HUGEPAGE)
    }

    /// `madvise` on a part of the region. Taking `&mut self` covers `MADV_DONTNEED`, which changes
    /// contents.
    fn advise(&mut self, offset: usize, len: usize, advice: i32) -> io::Result<()> {
        let part = self.part(offset, len)?;
        // SAFETY: the part lies inside our mapping and `&mut self` excludes other references to it,
        // so advice that drops its contents cannot surprise anyone.
        status(unsafe { libc::madvise(part, len, advice) })
    }

    /// Sets the protection of `[offset, offset+len)` to `prot` (`PROT_READ` makes a fence that keeps
    /// the kernel from merging the rest of the region with a writable neighbour). An access the new
    /// protection forbids faults; it cannot corrupt anything.
    ///
    /// # Errors
    /// The `mprotect` error.
    pub fn protect(&mut self, offset: usize, len: usize, prot: i32) -> io::Result<()> {
        let part = self.part(offset, len)?;
        // SAFETY: the part lies inside our mapping and `&mut self` excludes other references to it;
        // a protection change alters no contents.
        status(unsafe { libc::mprotect(part, len, prot) })
    }

    /// Maps fresh zeroed memory over `[offset, offset+len)` (`MAP_FIXED`): a new VMA in place of the
    /// old part, as an allocator or a loader does.
    ///
    /// # Errors
    /// The `mmap` error.
    pub fn replace(&mut self, offset: usize, len: usize) -> io::Result<()> {
        let part = self.part(offset, len)?;
        // SAFETY: the part lies inside our mapping and `&mut self` excludes other references to it, so
        // replacing it cannot invalidate memory anyone else uses.
        let r = unsafe {
            libc::mmap(
                part,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        check(r).map(drop)
    }

    /// The address of `[offset, offset+len)`, checked to lie inside the region.
    fn part(&self, offset: usize, len: usize) -> io::Result<*mut libc::c_void> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(self.addr.as_ptr().wrapping_add(offset).cast())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and `&mut self` in drop means no reference into it remains.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// Sets the protection of tracked memory to `prot`: a plain `mprotect` system call, usable in a
/// signal handler (async-signal-safe).
///
/// Only the mprotect dirty tracker calls this, and only to toggle `PROT_WRITE` on writable memory it
/// tracks, while its SIGSEGV handler is installed: a write to memory it made read-only traps into that
/// handler, which restores write access and lets the write proceed, so no Rust code can observe the
/// change (kernel writes are the exception, documented in `docs/dirty-tracking.md`). Restoring `prot`
/// gives memory back its original protection.
pub(crate) fn set_tracked_protection(addr: u64, len: u64, prot: i32) -> io::Result<()> {
    let (Ok(addr), Ok(len)) = (usize::try_from(addr), usize::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: see above: the range is memory the tracker tracks and only write access is toggled,
    // with the handler that restores it installed. The call reads and writes no memory of ours.
    status(unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) })
}

/// Moves the program break up by at least `bytes` (`sbrk`) and returns the new memory as atomics. It
/// belongs to the caller from then on and is never given back, hence `'static`. For tests that need
/// `brk` growth while other threads allocate from mmap'd arenas, where malloc would not grow the
/// break itself.
///
/// # Errors
/// `ENOMEM` from the kernel.
pub fn grow_brk(bytes: usize) -> io::Result<&'static [AtomicU64]> {
    let want = bytes
        .checked_add(8)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let incr = libc::intptr_t::try_from(want).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: growing the break only adds memory past the current break, which nothing references;
    // glibc's malloc copes with foreign sbrk calls (its main arena treats the break as non-contiguous).
    let old = unsafe { libc::sbrk(incr) };
    if old as isize == -1 {
        return Err(io::Error::last_os_error());
    }
    let start = (old as usize).next_multiple_of(8);
    // SAFETY: [start, start + bytes) lies inside the `want` bytes just added to the break, readable,
    // writable and zeroed, 8-byte aligned, referenced by nothing else and never released.
    Ok(unsafe { std::slice::from_raw_parts(start as *const AtomicU64, bytes / 8) })
}
