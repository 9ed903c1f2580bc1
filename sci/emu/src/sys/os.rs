//! The operating-system calls the emulation makes: mappings, futexes and kernel copies.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::codes::err;

/// (inode, device major, device minor) of open descriptor `fd`.
pub fn file_id(fd: RawFd) -> Option<(u64, u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes one `struct stat` into the buffer, which is large enough.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstat succeeded and filled the struct (and it was zeroed before).
    let st = unsafe { st.assume_init() };
    Some((
        st.st_ino,
        u64::from(libc::major(st.st_dev)),
        u64::from(libc::minor(st.st_dev)),
    ))
}

/// Opens `path` for reading and writing (close-on-exec); async-signal-safe.
pub fn open(path: &CStr) -> Result<OwnedFd, u32> {
    // SAFETY: a valid C string; open has no other preconditions.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err::NOT_CONNECTED);
    }
    // SAFETY: a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A duplicate of `fd` (close-on-exec).
pub fn dup(fd: RawFd) -> Result<OwnedFd, u32> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; fails cleanly if it is not open.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(err::SYSTEM);
    }
    // SAFETY: a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// A sealed memfd of `size` bytes: it can be written and mapped, but nobody can shrink or grow it
/// (a peer that could would make the owner's accesses fault).
pub fn sealed_memory(size: u64) -> Result<OwnedFd, u32> {
    // SAFETY: a valid C string; memfd_create has no other preconditions.
    let fd = unsafe {
        libc::memfd_create(
            c"sisci-emu-segment".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(err::NOSPC);
    }
    // SAFETY: a fresh descriptor this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(size).map_err(|_| err::OUT_OF_RANGE)?;
    // SAFETY: ftruncate on our own descriptor.
    let sized = unsafe { libc::ftruncate(fd.as_raw_fd(), len) } == 0;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on our own descriptor.
    let ok = sized && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } == 0;
    if ok { Ok(fd) } else { Err(err::NOSPC) }
}

/// Maps `len` bytes of `fd` at file offset `off`, shared.
pub fn map(fd: &OwnedFd, off: u64, len: usize) -> Result<usize, u32> {
    let off = libc::off_t::try_from(off).map_err(|_| err::OUT_OF_RANGE)?;
    // SAFETY: a new shared mapping at an address the kernel picks: it cannot overlap anything.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(err::NOSPC);
    }
    Ok(p as usize)
}

/// Unmaps a mapping made by [`map`].
///
/// # Safety
/// `[addr, addr + len)` must be a mapping this emulation made and nothing may use it afterwards.
pub unsafe fn unmap(addr: usize, len: usize) {
    // SAFETY: the caller's promise.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

/// Writes `len` bytes from `src` (this process's memory, which may be unmapped: the kernel copies
/// and fails instead of faulting) to `fd` at `off`.
pub fn write_from(fd: &OwnedFd, src: usize, len: usize, off: u64) -> Result<(), u32> {
    let mut done = 0usize;
    while done < len {
        let at = libc::off_t::try_from(off + done as u64).map_err(|_| err::OUT_OF_RANGE)?;
        // SAFETY: the kernel reads the source with copy_from_user and returns EFAULT for memory
        // that is not mapped; nothing here dereferences it.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                (src + done) as *const libc::c_void,
                len - done,
                at,
            )
        };
        if n <= 0 {
            return Err(err::TRANSFER_FAILED);
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`, in the kernel.
pub fn copy_file(src: &OwnedFd, src_off: u64, dst: &OwnedFd, dst_off: u64, len: usize) -> Result<(), u32> {
    let mut so = libc::loff_t::try_from(src_off).map_err(|_| err::OUT_OF_RANGE)?;
    let mut d = libc::loff_t::try_from(dst_off).map_err(|_| err::OUT_OF_RANGE)?;
    let mut left = len;
    while left > 0 {
        // SAFETY: both offsets are valid loff_t variables; the descriptors are open.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &raw mut so, dst.as_raw_fd(), &raw mut d, left, 0)
        };
        if n <= 0 {
            return Err(err::TRANSFER_FAILED);
        }
        left -= usize::try_from(n).unwrap_or(left);
    }
    Ok(())
}

/// Waits while `word` holds `value`, at most `timeout` (`None`: forever). Shared between processes.
pub fn futex_wait(word: &AtomicU32, value: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos()),
    });
    let tsp = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: FUTEX_WAIT (not private: the word is in a shared mapping) on a live atomic; the
    // timespec outlives the call.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, value, tsp, 0, 0) };
}

/// Wakes up to `n` waiters on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE on a live atomic.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n, 0, 0, 0) };
}

/// Bytes of one descriptor in a control message.
const FD_BYTES: u32 = 4;
const _: () = assert!(std::mem::size_of::<RawFd>() == FD_BYTES as usize);

/// Room for one `SCM_RIGHTS` header, aligned for it (no allocation on the sender's data path).
#[repr(C, align(8))]
struct Control([u8; 64]);

/// A message of one byte (`iov`) with room for one descriptor in `control`; both must outlive its
/// use.
fn message(iov: &mut libc::iovec, control: &mut Control) -> libc::msghdr {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES) } as usize;
    // SAFETY: a zeroed msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = std::ptr::from_mut(iov);
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space.min(control.0.len());
    msg
}

/// Sends descriptor `fd` with one byte over the connected unix socket `sock` (`SCM_RIGHTS`).
pub fn send_fd(sock: RawFd, fd: RawFd) -> Result<(), u32> {
    let mut byte = [1u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = Control([0u8; 64]);
    let msg = message(&mut iov, &mut control);
    // SAFETY: the control buffer holds one header with room for one descriptor (CMSG_SPACE).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    if cmsg.is_null() {
        return Err(err::SYSTEM);
    }
    // SAFETY: CMSG_LEN is a pure computation.
    let len = unsafe { libc::CMSG_LEN(FD_BYTES) } as usize;
    let header = libc::cmsghdr {
        cmsg_len: len,
        cmsg_level: libc::SOL_SOCKET,
        cmsg_type: libc::SCM_RIGHTS,
    };
    // SAFETY: `cmsg` points into `control`, which is large enough for the header (CMSG_SPACE).
    unsafe { cmsg.write_unaligned(header) };
    // SAFETY: CMSG_DATA points inside the same header's room, which holds one descriptor.
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: as above: room for one descriptor at `data`.
    unsafe { data.cast::<RawFd>().write_unaligned(fd) };
    // SAFETY: a fully initialized message on an open socket.
    let n = unsafe { libc::sendmsg(sock, &raw const msg, libc::MSG_NOSIGNAL) };
    if n == 1 { Ok(()) } else { Err(err::SYSTEM) }
}

/// Receives one descriptor sent by [`send_fd`] (close-on-exec).
pub fn recv_fd(sock: RawFd) -> Result<OwnedFd, u32> {
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = Control([0u8; 64]);
    let mut msg = message(&mut iov, &mut control);
    // SAFETY: recvmsg writes at most the buffers described by `msg`.
    let n = unsafe { libc::recvmsg(sock, &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n != 1 || byte[0] != 1 {
        return Err(err::NO_SUCH_SEGMENT);
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR reads only within its control buffer.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    // SAFETY: checked non-null; the header lies in `control`.
    if cmsg.is_null() || unsafe { (*cmsg).cmsg_type } != libc::SCM_RIGHTS {
        return Err(err::SYSTEM);
    }
    // SAFETY: an SCM_RIGHTS header carries the descriptor right after it.
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: the descriptor right after the header, inside `control`.
    let fd = unsafe { data.cast::<RawFd>().read_unaligned() };
    // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
