//! Kernel interfaces that need `unsafe`: every unsafe block of the `om` crate lives under this module.
//!
//! Each kernel struct is declared `#[repr(C)]` with compile-time asserts on its size, and each ioctl
//! number is computed from the kernel's `_IOC` encoding and asserted against the value the kernel
//! headers give, so a layout mistake fails the build instead of corrupting memory.

pub mod arena;
pub mod mman;
pub mod pagemap;
pub mod segv;
pub mod task;
pub mod tty;
pub mod uffd;

/// `_IOC(dir, type, nr, size)` from `include/uapi/asm-generic/ioctl.h`.
pub(crate) const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << 14));
    // Lossless: size < 2^14 was just asserted, and ty, nr are u8.
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    (dir << 30) | (size << 16) | ((ty as u32) << 8) | nr as u32
}

pub(crate) const IOC_WRITE: u32 = 1;
pub(crate) const IOC_READ: u32 = 2;

/// The page size of this machine.
#[must_use]
pub fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(4096)
    })
}
