//! Image memory: one sparse memfd per image, mapped shared into omd. Every `unsafe` block of omd lives
//! in this module.
//!
//! The memfd is what the restorer maps (`MAP_PRIVATE`) at the process's addresses later, so pages land
//! exactly once. omd never forms a Rust reference over it: the kernel writes it (`pwrite` into the
//! memfd from a TCP stream's buffer, or remote writes of a placing transport), checksums read it with
//! atomic loads, and files are written from it with `write(2)`.

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap};
use om_transport::sys::{Landing, page_sum};

/// A sparse memfd of a fixed length, mapped shared and writable into this process.
#[derive(Debug)]
pub struct ImageMemory {
    file: File,
    base: NonNull<libc::c_void>,
    len: usize,
    /// Bytes from offset 0 whose pages were allocated and mapped before the image began (made from
    /// [`WarmMemory`]); 0 for an image made by [`ImageMemory::create`].
    warm: usize,
}

/// Image memory made ahead of an image (omd's `--reserve`): a memfd whose pages are allocated,
/// zeroed and mapped here (page tables populated), so that the image that takes it
/// ([`ImageMemory::from_warm`]) lands its pages with one copy from the socket and neither a page
/// allocation nor a fault. On this VM the first touch of a page costs more than the copy into it
/// (docs/transport.md).
#[derive(Debug)]
pub struct WarmMemory {
    file: File,
    base: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: as for ImageMemory: process-wide memory owned by this value, which hands out no references.
unsafe impl Send for WarmMemory {}

fn new_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    nix::unistd::ftruncate(&fd, file_len(len)?)?;
    Ok(fd)
}

fn file_len(len: usize) -> io::Result<i64> {
    i64::try_from(len).map_err(|_| io::Error::other("too large"))
}

/// Maps all of `fd`'s `len` bytes shared and writable.
fn map_shared(fd: &impl AsFd, len: usize) -> io::Result<NonNull<libc::c_void>> {
    let size = NonZeroUsize::new(len).ok_or_else(|| io::Error::other("empty image"))?;
    // SAFETY: a fresh shared mapping of our own memfd at an address the kernel picks: it cannot
    // overlap anything Rust owns.
    let base = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
            fd,
            0,
        )
    }?;
    Ok(base)
}

/// Fixes a memfd's size: whoever else gets it (the restorer; an SCI peer over the emulation's
/// descriptor server) cannot shrink it under omd's mapping and make omd fault. Hole punching (zero
/// pages) stays allowed.
fn seal_size(fd: &impl AsFd) -> io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_ADD_SEALS(
            nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_GROW,
        ),
    )?;
    Ok(())
}

impl WarmMemory {
    /// Creates a memfd of `len` bytes, maps it and allocates every page (`MADV_POPULATE_WRITE`),
    /// `step` bytes at a time. Slow by design (the first touch of `len` bytes), so before each step
    /// `proceed()` may wait for a quiet moment; its `false` abandons the memory (`Ok(None)`).
    ///
    /// # Errors
    /// `memfd_create`, `ftruncate`, `mmap` or `madvise` failures (out of memory among them).
    pub fn create(len: usize, step: usize, mut proceed: impl FnMut() -> bool) -> io::Result<Option<Self>> {
        let fd = new_memfd("om-image-reserve", len)?;
        let base = map_shared(&fd, len)?;
        let warm = Self {
            file: File::from(fd),
            base,
            len,
        };
        let step = step.max(1);
        for off in (0..len).step_by(step) {
            if !proceed() {
                return Ok(None);
            }
            let n = step.min(len - off);
            let at = (base.as_ptr() as usize + off) as *mut libc::c_void;
            let at = NonNull::new(at).ok_or_else(|| io::Error::other("null"))?;
            // SAFETY: `off..off+n` lies inside our own fresh mapping of `len` bytes; populating
            // changes no contents.
            unsafe { madvise(at, n, MmapAdvise::MADV_POPULATE_WRITE) }?;
        }
        Ok(Some(warm))
    }

    /// Its length in bytes, all of them allocated.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty reserve (never: `create` refuses it).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Lowers the calling thread's scheduling priority to nice 19: work that should yield to the
/// node's applications (making omd's reserve right after a migrated copy started beside it).
///
/// # Errors
/// `setpriority` failing.
pub fn lower_thread_priority() -> io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    let who = libc::id_t::try_from(tid).map_err(io::Error::other)?;
    // SAFETY: setpriority(2) takes plain integers; on Linux PRIO_PROCESS with a thread id changes
    // that thread only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, who, 19) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for WarmMemory {
    fn drop(&mut self) {
        if self.len == 0 {
            return; // handed to an image (ImageMemory::from_warm)
        }
        // SAFETY: our own mapping from `create` (or moved by `from_warm`); nothing refers into it.
        if let Err(e) = unsafe { munmap(self.base, self.len) } {
            tracing::warn!(error = %e, "cannot unmap reserved image memory");
        }
    }
}

// SAFETY: the mapping is process-wide memory owned by this value; every access goes through the
// kernel or atomic loads, which are safe from any thread.
unsafe impl Send for ImageMemory {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for ImageMemory {}

impl ImageMemory {
    /// Creates a memfd of `len` bytes (no memory is used until pages land) and maps it.
    ///
    /// # Errors
    /// `memfd_create`, `ftruncate` or `mmap` failures.
    pub fn create(name: &str, len: usize) -> io::Result<Self> {
        let fd = new_memfd(name, len)?;
        seal_size(&fd)?;
        let base = map_shared(&fd, len)?;
        Ok(Self {
            file: File::from(fd),
            base,
            len,
            warm: 0,
        })
    }

    /// Image memory of `len` bytes made from `warm`: its first `min(len, warm.len())` bytes are
    /// allocated and mapped already (and read as zero). The memfd is resized to `len` and its
    /// mapping moved with it (`mremap` keeps the populated page tables), then sealed as
    /// [`ImageMemory::create`] seals it.
    ///
    /// # Errors
    /// `ftruncate`, `mremap` or sealing failures; `warm` is freed then.
    pub fn from_warm(mut warm: WarmMemory, len: usize) -> io::Result<Self> {
        let size = NonZeroUsize::new(len).ok_or_else(|| io::Error::other("empty image"))?;
        // Growing: the file first, so that the mapping never covers bytes beyond its end. Every
        // early return drops `warm`, which unmaps whatever mapping it holds by then.
        if len > warm.len {
            nix::unistd::ftruncate(&warm.file, file_len(len)?)?;
        }
        // SAFETY: `warm.base..warm.base+warm.len` is the reserve's whole mapping, owned by `warm`; MREMAP_MAYMOVE
        // lets the kernel move it to an address it picks, which overlaps nothing Rust owns. On
        // failure the old mapping stays as it was.
        warm.base = unsafe {
            nix::sys::mman::mremap(
                warm.base,
                warm.len,
                size.get(),
                nix::sys::mman::MRemapFlags::MREMAP_MAYMOVE,
                None,
            )
        }?;
        let old = std::mem::replace(&mut warm.len, len);
        if len < old {
            nix::unistd::ftruncate(&warm.file, file_len(len)?)?;
        }
        seal_size(&warm.file)?;
        let file = warm.file.try_clone()?;
        let base = warm.base;
        // The mapping is the image's from here: the reserve's drop leaves it alone.
        warm.len = 0;
        Ok(Self {
            file,
            base,
            len,
            warm: old.min(len),
        })
    }

    /// Bytes from offset 0 whose pages were allocated and mapped before the image began.
    #[must_use]
    pub fn warm(&self) -> usize {
        self.warm
    }

    /// The mapping's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: `create` refuses it).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd (for the restorer, which maps it at the process's addresses; for a TCP stream,
    /// which writes pages into it).
    #[must_use]
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check(&self, off: usize, len: usize) -> io::Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(io::Error::other(format!(
                "range {off:#x}+{len:#x} outside image memory of {:#x} bytes",
                self.len
            )));
        }
        Ok(())
    }

    fn at(&self, off: usize, len: usize) -> io::Result<NonNull<libc::c_void>> {
        self.check(off, len)?;
        NonNull::new((self.base.as_ptr() as usize + off) as *mut libc::c_void)
            .ok_or_else(|| io::Error::other("null"))
    }

    /// The zone of `len` bytes at `off`, for the transport to write into; it borrows the mapping.
    ///
    /// # Errors
    /// A range outside the mapping.
    pub fn zone(&self, off: usize, len: usize) -> io::Result<Landing<'_>> {
        let at = self.at(off, len)?;
        // SAFETY: inside our own mapping (checked), which lives as long as the borrow of `self`; no
        // method of ImageMemory hands out references into it; page-aligned offsets keep alignment.
        Ok(unsafe { Landing::new(at.as_ptr() as usize, len) })
    }

    /// Frees the memory of `len` bytes at `off`; they read as zero afterwards.
    ///
    /// # Errors
    /// A range outside the mapping, or `fallocate` failing.
    pub fn punch(&self, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        let o = i64::try_from(off).map_err(io::Error::other)?;
        let l = i64::try_from(len).map_err(io::Error::other)?;
        fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )?;
        Ok(())
    }

    /// Overwrites `len` bytes at `off` with zeros, keeping the pages (memory a fabric has pinned
    /// must stay the memory the image reads: punching would leave the fabric writing to pages the
    /// memfd no longer holds).
    ///
    /// # Errors
    /// A range outside the mapping.
    pub fn clear(&self, off: usize, len: usize) -> io::Result<()> {
        let at = self.at(off, len)?;
        // SAFETY: the range lies inside our own shared mapping (checked), which no Rust reference
        // covers; concurrent remote writes to it are the fabric's, and land whole pages.
        unsafe { std::ptr::write_bytes(at.as_ptr().cast::<u8>(), 0, len) };
        Ok(())
    }

    /// Allocates the pages of `len` bytes at `off` ahead of a write (`MADV_POPULATE_WRITE`): one call
    /// instead of one fault per page.
    ///
    /// # Errors
    /// A range outside the mapping, or `madvise` failing (for instance out of memory).
    pub fn populate(&self, off: usize, len: usize) -> io::Result<()> {
        let at = self.at(off, len)?;
        // SAFETY: the range lies inside our own mapping (checked); populating changes no contents.
        unsafe { madvise(at, len, MmapAdvise::MADV_POPULATE_WRITE) }?;
        Ok(())
    }

    /// Asks for transparent huge pages (effective when shmem THP is `advise` or `always`).
    ///
    /// # Errors
    /// `madvise` failing.
    pub fn advise_hugepages(&self) -> io::Result<()> {
        // SAFETY: the whole range is our own mapping; the advice changes no contents.
        unsafe { madvise(self.base, self.len, MmapAdvise::MADV_HUGEPAGE) }?;
        Ok(())
    }

    /// The checksum of the page of `page` bytes at `off`.
    ///
    /// # Errors
    /// A range outside the mapping.
    pub fn page_sum(&self, off: usize, page: usize) -> io::Result<u32> {
        let at = self.at(off, page)?;
        // SAFETY: inside our mapping (checked), which lives as long as `self`; page-aligned offsets
        // keep the 8-byte alignment.
        Ok(unsafe { page_sum(at.as_ptr().cast::<u8>(), page) })
    }

    /// Writes `len` bytes at `off` to `out` (the kernel reads the mapping).
    ///
    /// # Errors
    /// A range outside the mapping, or the write failing.
    pub fn write_to(&self, out: &impl AsFd, off: usize, len: usize) -> io::Result<()> {
        self.check(off, len)?;
        let mut done = 0;
        while done < len {
            let at = self.at(off + done, len - done)?;
            // SAFETY: the source range lies inside our live mapping (checked); write(2) only reads it.
            let n = unsafe {
                libc::write(
                    std::os::fd::AsRawFd::as_raw_fd(&out.as_fd()),
                    at.as_ptr(),
                    (len - done).min(1 << 30),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            done += usize::try_from(n).unwrap_or(0);
        }
        Ok(())
    }
}

impl Drop for ImageMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `create` and nothing refers into it any more (no method
        // hands out references; zones handed to the transport are only used while the image lives).
        if let Err(e) = unsafe { munmap(self.base, self.len) } {
            tracing::warn!(error = %e, "cannot unmap image memory");
        }
    }
}

/// Spawns `cmd` with `fds[i]` placed at fd `3 + i` in the child (inherited across exec).
///
/// # Errors
/// The spawn failing.
pub fn spawn_with_fds(
    cmd: &mut std::process::Command,
    fds: &[std::os::fd::RawFd],
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    const PARK: libc::c_int = 100;
    if fds.len() > 16 {
        return Err(io::Error::other("too many fds"));
    }
    let mut list = [0 as libc::c_int; 16];
    list[..fds.len()].copy_from_slice(fds);
    let n = fds.len();
    // Runs in the forked child between fork and exec: only fcntl, dup2 and close (async-signal-safe)
    // on numbers copied into it, and no allocation. Each source is first moved above every target
    // so that placing one never overwrites another.
    let place = move || -> io::Result<()> {
        let mut parked = [0 as libc::c_int; 16];
        for i in 0..n {
            // SAFETY: F_DUPFD on a number only creates a new descriptor (or fails).
            let p = unsafe { libc::fcntl(list[i], libc::F_DUPFD, PARK) };
            if p < 0 {
                return Err(io::Error::last_os_error());
            }
            parked[i] = p;
        }
        for (i, &p) in parked.iter().enumerate().take(n) {
            let target = 3 + libc::c_int::try_from(i).unwrap_or(0);
            // SAFETY: dup2 between numbers of this child; the targets are ours to take.
            if unsafe { libc::dup2(p, target) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the parked copy made above, owned by nothing else.
            unsafe { libc::close(p) };
        }
        Ok(())
    };
    // SAFETY: `place` is async-signal-safe as described above.
    unsafe { cmd.pre_exec(place) };
    cmd.spawn()
}

/// A pseudo-terminal in the state `t` records (settings and window size): `(master, slave)`, both
/// close-on-exec (the slave reaches a child as its stdio through `dup2`).
///
/// # Errors
/// `openpty` or `fcntl` failed.
pub fn open_terminal(t: &om_transport::relay::Terminal) -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let termios = t.termios();
    let size = t.size.to_libc();
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: out-pointers to two ints; a null name buffer; termios and winsize live across the
    // call, which only reads them. glibc opens the slave with O_NOCTTY: omd never gets it as its
    // controlling terminal.
    let r = unsafe {
        libc::openpty(
            &raw mut master,
            &raw mut slave,
            std::ptr::null_mut(),
            &raw const termios,
            &raw const size,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: an open descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: as for the master.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    for fd in [&master, &slave] {
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    }
    Ok((master, slave))
}

/// Sets a terminal's window size (on the master: the kernel signals the slave's foreground group).
///
/// # Errors
/// `TIOCSWINSZ` failed.
pub fn set_window_size(fd: &impl AsFd, size: om_transport::relay::WinSize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let w = size.to_libc();
    // SAFETY: TIOCSWINSZ reads one `struct winsize`, which lives across the call.
    if unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &raw const w) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What waits in a terminal's input queue, read from its slave once its program has ended: a
/// partial line too (the slave is switched to non-canonical reads first).
#[must_use]
pub fn drain_terminal(slave: &impl AsFd) -> Vec<u8> {
    use nix::sys::termios::{LocalFlags, SetArg, SpecialCharacterIndices, tcgetattr, tcsetattr};
    let mut out = Vec::new();
    let Ok(mut t) = tcgetattr(slave) else {
        return out;
    };
    t.local_flags.remove(LocalFlags::ICANON | LocalFlags::ECHO);
    t.control_chars[SpecialCharacterIndices::VMIN as usize] = 0;
    t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
    if tcsetattr(slave, SetArg::TCSANOW, &t).is_err() {
        return out;
    }
    let mut buf = [0u8; 4096];
    while out.len() < om_transport::relay::MAX_LEFTOVER {
        match nix::unistd::read(slave.as_fd(), &mut buf) {
            Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    const MIB: usize = 1 << 20;

    /// Bytes of memory the memfd holds (shmem counts allocated pages in its blocks).
    fn allocated(f: &File) -> u64 {
        f.metadata().unwrap().blocks() * 512
    }

    fn warm(len: usize) -> WarmMemory {
        WarmMemory::create(len, MIB, || true).unwrap().expect("made")
    }

    #[test]
    fn warm_memory_is_allocated_step_by_step_and_can_be_abandoned() {
        let w = warm(8 * MIB);
        assert_eq!(allocated(&w.file), 8 * MIB as u64);
        let mut steps = 0;
        let abandoned = WarmMemory::create(8 * MIB, MIB, || {
            steps += 1;
            steps <= 3
        })
        .unwrap();
        assert!(abandoned.is_none());
        assert_eq!(steps, 4, "asked before every step, and stopped at the first no");
    }

    #[test]
    fn an_image_grown_from_warm_memory_keeps_its_pages_reads_zero_and_is_sealed() {
        let image = ImageMemory::from_warm(warm(8 * MIB), 16 * MIB).unwrap();
        assert_eq!((image.len(), image.warm()), (16 * MIB, 8 * MIB));
        assert_eq!(
            allocated(image.file()),
            8 * MIB as u64,
            "the reserve's pages, no more"
        );
        let zero = om_transport::sys::checksum::page_sum_bytes(&[0u8; 4096]);
        for off in [0, 4 * MIB, 8 * MIB - 4096, 12 * MIB] {
            assert_eq!(image.page_sum(off, 4096).unwrap(), zero, "at {off:#x}");
        }
        // The mapping moved with the file: a write through the file shows in it, warm or not.
        for off in [MIB, 12 * MIB] {
            image.file().write_all_at(&[7u8; 4096], off as u64).unwrap();
            let want = om_transport::sys::checksum::page_sum_bytes(&[7u8; 4096]);
            assert_eq!(image.page_sum(off, 4096).unwrap(), want);
        }
        assert!(
            image.file().set_len(MIB as u64).is_err(),
            "sealed against shrinking"
        );
        assert!(image.file().set_len(32 * MIB as u64).is_err(), "and growing");
    }

    #[test]
    fn an_image_shrunk_from_warm_memory_frees_the_rest() {
        let image = ImageMemory::from_warm(warm(8 * MIB), 4 * MIB).unwrap();
        assert_eq!((image.len(), image.warm()), (4 * MIB, 4 * MIB));
        assert_eq!(allocated(image.file()), 4 * MIB as u64);
        assert!(image.zone(4 * MIB, 4096).is_err(), "nothing beyond its length");
    }
}
