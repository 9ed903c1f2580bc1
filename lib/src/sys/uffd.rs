//! userfaultfd: the structs and ioctls om uses for write-protect tracking.
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
    // SAFETY: every caller passes the struct that `request` encodes (asserted sizes above); the kernel
    // reads and writes only within it, and `arg` is a live exclusive reference for the call.
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
