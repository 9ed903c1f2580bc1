//! The transport's raw-memory operations: every `unsafe` block of `om-transport` lives under this module.
//!
//! Transports read pages straight from the application's address space and write pages straight into
//! the receiver's image. Neither side may form Rust references over that memory: the application keeps
//! writing its pages while a pre-copy round reads them, and a hostile sender may make two streams land
//! on the same image page at once. So memory is handed to the kernel as raw `iovec`s (the kernel copies,
//! and reports an unmapped address as `EFAULT` instead of faulting), and checksums read it with
//! relaxed atomic loads, which are defined behaviour under concurrent writes.
//!
//! The promises about that memory are made once, by `unsafe` constructors of [`Readable`] (sender) and
//! [`Landing`] (receiver); everything outside this module is safe code.

pub mod checksum;
pub mod iov;
pub mod mem;

pub use checksum::{crc32c, page_sum, page_sum_bytes};
pub use iov::{MemRun, reset_on_close};
pub use mem::{Landing, Readable, ReadableBatch};

/// The page size of this machine.
#[must_use]
pub fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(v).unwrap_or(4096)
    })
}
