//! userfaultfd: the structs and ioctls om uses for write-protect tracking and for lazy restore
//! (missing-page faults served from an image, with the non-cooperative events).
//!
//! # References
//! `userfaultfd(2)`, `ioctl_userfaultfd(2)`, `include/uapi/linux/userfaultfd.h`,
//! `Documentation/admin-guide/mm/userfaultfd.rst` (asynchronous write-protect mode).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{IOC_READ, IOC_WRITE, ioc};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: handle only user-mode faults; allowed unprivileged.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect shmem and hugetlbfs.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protecting an unpopulated page installs a marker.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself (Linux 6.7).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFD_FEATURE_EVENT_FORK`: a fork of the process hands over a userfaultfd for the child.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`: `mremap` of a registered range is reported.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`: `MADV_DONTNEED`/`MADV_REMOVE` of a registered range is reported.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP`: `munmap` of a registered range is reported.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// `api`.
    pub api: u64,
    /// `features`.
    pub features: u64,
    /// `ioctls`.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    /// `start`.
    pub start: u64,
    /// `len`.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    /// `range`.
    pub range: UffdioRange,
    /// `mode`.
    pub mode: u64,
    /// `ioctls`.
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    /// `range`.
    pub range: UffdioRange,
    /// `mode`.
    pub mode: u64,
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);

/// `UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)`.
pub const UFFDIO_API: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(0xAA, 0x00, struct uffdio_register)`.
pub const UFFDIO_REGISTER: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x00, size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, struct uffdio_range)`.
pub const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, 0xAA, 0x01, size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT = _IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
pub const UFFDIO_WRITEPROTECT: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x06, size_of::<UffdioWriteprotect>());
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x03, size_of::<UffdioCopy>());
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u32 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x04, size_of::<UffdioZeropage>());

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    /// Destination in the registered range.
    pub dst: u64,
    /// Source in the caller's memory.
    pub src: u64,
    /// Bytes.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*`.
    pub mode: u64,
    /// Out: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    /// The range.
    pub range: UffdioRange,
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    pub mode: u64,
    /// Out: bytes zeroed, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffd_msg` (32 bytes): the event and its first three argument words.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// pagefault: flags; fork: the new fd (low 32 bits); remap: from; remove/unmap: start.
    pub arg0: u64,
    /// pagefault: address; remap: to; remove/unmap: end.
    pub arg1: u64,
    /// remap: len.
    pub arg2: u64,
}
const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);
const _: () = assert!(UFFDIO_COPY == 0xC028_AA03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xC020_AA04);

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
pub const EVENT_UNMAP: u8 = 0x16;

// The values of the kernel headers.
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);

/// Opens a userfaultfd (`O_CLOEXEC | O_NONBLOCK`, plus `flags`).
///
/// # Errors
/// The system call's error: `EPERM` when unprivileged userfaultfd is disabled and `flags` lacks
/// [`UFFD_USER_MODE_ONLY`], `ENOSYS` without userfaultfd.
pub fn open(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes only an integer flag argument and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues a userfaultfd ioctl whose argument is `arg`.
fn ioctl<T>(fd: &OwnedFd, request: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the struct that `request` encodes (asserted sizes above), and `arg`
    // is a live exclusive reference for the call. Beyond the struct, only the fill ioctls touch
    // memory: UFFDIO_COPY reads its source (a live slice, see `copy`) and both write pages of the
    // userfaultfd's own process, which `Foreign` guarantees is another process.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::c_ulong::from(request),
            std::ptr::from_mut(arg),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `UFFDIO_API`: the handshake. Returns the features the kernel offers.
///
/// # Errors
/// `EINVAL` when a requested feature is not offered.
pub fn api(fd: &OwnedFd, features: u64) -> io::Result<UffdioApi> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_API, &mut a)?;
    Ok(a)
}

/// `UFFDIO_REGISTER` of `[start, start+len)` in write-protect mode.
///
/// # Errors
/// `EBUSY` (registered with another userfaultfd), `EPERM` (shared mapping of a read-only file),
/// `EINVAL` (a VMA that cannot be registered, e.g. `[vdso]`), `ENOMEM` (a hole in the range).
pub fn register_wp(fd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode: REGISTER_MODE_WP,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
}

/// `UFFDIO_UNREGISTER` of `[start, start+len)`.
///
/// # Errors
/// The ioctl's error.
pub fn unregister(fd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    ioctl(fd, UFFDIO_UNREGISTER, &mut r)
}

/// `UFFDIO_WRITEPROTECT` of `[start, start+len)`: sets (`protect`) or clears write protection.
///
/// # Errors
/// The ioctl's error (`ENOENT` for a range that is not registered).
pub fn writeprotect(fd: &OwnedFd, start: u64, len: u64, protect: bool) -> io::Result<()> {
    let mode = if protect { WRITEPROTECT_MODE_WP } else { 0 };
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode,
    };
    ioctl(fd, UFFDIO_WRITEPROTECT, &mut w)
}

/// How a fill ioctl ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every byte was filled.
    Done,
    /// The first `n` bytes were filled, then the kernel said `errno` (`EEXIST`: a page there is
    /// already present; `EAGAIN`: events are pending and must be read first; `ENOENT`/`EINVAL`: the
    /// range is no longer registered).
    Partial(u64, i32),
}

fn fill_result(r: io::Result<()>, done: i64, len: u64) -> Fill {
    match r {
        Ok(()) => Fill::Done,
        Err(e) => Fill::Partial(
            u64::try_from(done).unwrap_or(0).min(len),
            e.raw_os_error().unwrap_or(libc::EIO),
        ),
    }
}

/// A userfaultfd of *another* process's memory (the restored process, or a child it forked).
/// Filling pages through it cannot write memory of this program, which makes [`copy`] and
/// [`zeropage`] safe to call.
#[derive(Debug)]
pub struct Foreign(OwnedFd);

impl Foreign {
    /// Wraps `fd`.
    ///
    /// # Safety
    /// `fd` must be a userfaultfd created for another process's memory (received from it, or
    /// installed by the kernel for a forked child), never one of this process.
    #[must_use]
    pub unsafe fn new(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

impl std::os::fd::AsFd for Foreign {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// `UFFDIO_COPY`: fills `[dst, dst + src.len())` of the registered process with `src`, waking the
/// threads that wait there.
pub fn copy(fd: &Foreign, dst: u64, src: &[u8]) -> Fill {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // The kernel reads `src`, a live slice, and writes the other process's pages and `c`.
    let r = ioctl(&fd.0, UFFDIO_COPY, &mut c);
    fill_result(r, c.copy, c.len)
}

/// `UFFDIO_ZEROPAGE`: maps zero pages at `[start, start + len)` and wakes the waiters.
pub fn zeropage(fd: &Foreign, start: u64, len: u64) -> Fill {
    let mut z = UffdioZeropage {
        range: UffdioRange { start, len },
        mode: 0,
        zeropage: 0,
    };
    let r = ioctl(&fd.0, UFFDIO_ZEROPAGE, &mut z);
    fill_result(r, z.zeropage, len)
}

/// Reads the pending messages (non-blocking fd): an empty vector when there are none.
///
/// # Errors
/// A read error other than `EAGAIN`.
pub fn read_msgs(fd: &impl std::os::fd::AsFd) -> io::Result<Vec<UffdMsg>> {
    let mut buf = [UffdMsg::default(); 64];
    // SAFETY: the buffer is valid for `size_of_val(&buf)` bytes and UffdMsg is plain integers, so
    // any bytes the kernel writes form valid values.
    let n = unsafe { libc::read(fd.as_fd().as_raw_fd(), buf.as_mut_ptr().cast(), size_of_val(&buf)) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    let count = n.unsigned_abs() / size_of::<UffdMsg>();
    Ok(buf[..count].to_vec())
}

/// The `struct uffdio_register` for missing-page faults on `[start, start + len)`, as bytes (for
/// a restorer that issues the ioctl itself).
#[must_use]
pub fn register_missing_bytes(start: u64, len: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&start.to_le_bytes());
    out[8..16].copy_from_slice(&len.to_le_bytes());
    out[16..24].copy_from_slice(&REGISTER_MODE_MISSING.to_le_bytes());
    out
}
