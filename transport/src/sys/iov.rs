//! Vectored socket I/O over raw memory runs: `sendmsg` straight from the application's pages and
//! `readv` straight into the image, with no intermediate buffer and no Rust reference over either.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// At most this many iovecs go to one system call (`IOV_MAX` on Linux).
pub const IOV_MAX: usize = 1024;

/// A run of raw memory: `len` bytes at address `addr` of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRun {
    /// Start address.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
}

fn iovec(addr: usize, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    }
}

/// Drops `n` bytes from the front of `iovs[*first..]`, advancing `*first` past exhausted entries.
fn advance(iovs: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iovs.len() {
        let cur = &mut iovs[*first];
        if n >= cur.iov_len {
            n -= cur.iov_len;
            *first += 1;
        } else {
            cur.iov_base = (cur.iov_base as usize + n) as *mut libc::c_void;
            cur.iov_len -= n;
            n = 0;
        }
    }
    while *first < iovs.len() && iovs[*first].iov_len == 0 {
        *first += 1;
    }
}

/// Sends `head` (ordinary buffers) followed by the bytes of `runs`, all of it, with as few `sendmsg`
/// calls as the socket allows. `MSG_NOSIGNAL`: a closed peer is `EPIPE`, never a signal.
///
/// # Errors
/// The first failed `sendmsg`; `EFAULT` if a run was not mapped (the memory is left untouched: the
/// kernel only reads it).
///
/// # Safety
/// Every run must be memory of this process that stays readable for the whole call, or be unmapped
/// (then the call fails with `EFAULT`). The kernel only reads it.
pub unsafe fn send_vectored(fd: BorrowedFd<'_>, head: &[&[u8]], runs: &[MemRun]) -> io::Result<()> {
    // SAFETY: the caller's contract.
    unsafe { send_vectored_inner(fd, head, runs, false) }
}

/// [`send_vectored`] for runs the application may unmap meanwhile: where the kernel cannot read a
/// run (`EFAULT`), zeros go out in its place, so the frame stays whole. The receiver's checksum check
/// then flags those pages, which the sender sends again or drops with the VMA that held them.
///
/// # Errors
/// The first failed `sendmsg` other than `EFAULT`.
///
/// # Safety
/// As [`send_vectored`].
pub unsafe fn send_vectored_tolerant(fd: BorrowedFd<'_>, head: &[&[u8]], runs: &[MemRun]) -> io::Result<()> {
    // SAFETY: the caller's contract.
    unsafe { send_vectored_inner(fd, head, runs, true) }
}

/// Zeros sent in place of memory that vanished.
static ZEROS: [u8; 65536] = [0; 65536];

/// Sends `iovs` one entry at a time, the first `heads` of them (our own buffers) as they are and the
/// others page by page, zeros in place of a page the kernel cannot read.
///
/// # Safety
/// The entries describe readable buffers of ours (the heads) and runs of this process's memory.
unsafe fn send_piecewise(fd: BorrowedFd<'_>, iovs: &[libc::iovec], heads: usize) -> io::Result<()> {
    const PIECE: usize = 4096;
    for (i, v) in iovs.iter().enumerate() {
        let mut at = v.iov_base as usize;
        let end = at + v.iov_len;
        while at < end {
            let k = if i < heads {
                end - at
            } else {
                (end - at).min(PIECE - at % PIECE)
            };
            // SAFETY: `k` bytes at `at` lie in this entry; the kernel only reads them.
            let n = unsafe { libc::send(fd.as_raw_fd(), at as *const libc::c_void, k, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                at += usize::try_from(n).unwrap_or(0);
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EFAULT) if i >= heads => {
                    let mut left = k;
                    while left > 0 {
                        // SAFETY: ZEROS is a static buffer of at least `left.min(len)` bytes.
                        let z = unsafe {
                            libc::send(
                                fd.as_raw_fd(),
                                ZEROS.as_ptr().cast(),
                                left.min(ZEROS.len()),
                                libc::MSG_NOSIGNAL,
                            )
                        };
                        if z < 0 {
                            let e = io::Error::last_os_error();
                            if e.kind() != io::ErrorKind::Interrupted {
                                return Err(e);
                            }
                            continue;
                        }
                        left -= usize::try_from(z).unwrap_or(0);
                    }
                    at += k;
                }
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

unsafe fn send_vectored_inner(
    fd: BorrowedFd<'_>,
    head: &[&[u8]],
    runs: &[MemRun],
    tolerant: bool,
) -> io::Result<()> {
    let n_head = head.iter().filter(|b| !b.is_empty()).count();
    let mut iovs: Vec<libc::iovec> = head
        .iter()
        .map(|b| iovec(b.as_ptr() as usize, b.len()))
        .chain(runs.iter().map(|r| iovec(r.addr, r.len)))
        .filter(|v| v.iov_len > 0)
        .collect();
    let mut first = 0;
    while first < iovs.len() {
        let window = &mut iovs[first..];
        let count = window.len().min(IOV_MAX);
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = window.as_mut_ptr();
        msg.msg_iovlen = count;
        // SAFETY: the iovecs describe `head` (borrowed for this call) and runs the caller guarantees
        // readable; the kernel only reads them and reports bad addresses as EFAULT.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if tolerant && e.raw_os_error() == Some(libc::EFAULT) {
                // Some run in this window is gone; the kernel does not say which, and may have
                // refused bytes before it. Go on one piece at a time.
                // SAFETY: the entries describe our head buffers and the caller's runs.
                return unsafe { send_piecewise(fd, &iovs[first..], n_head.saturating_sub(first)) };
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0);
        advance(&mut iovs, &mut first, n);
    }
    Ok(())
}

/// Fills every zone completely from the socket with `readv`, in order.
///
/// # Errors
/// The first failed `readv`, or `UnexpectedEof` if the peer closed the stream first.
///
/// # Safety
/// Every zone must be memory that this process may overwrite and that stays mapped and writable for
/// the whole call. No Rust reference to it may be in use (the kernel writes it behind Rust's back).
pub unsafe fn recv_exact_into(fd: BorrowedFd<'_>, zones: &[MemRun]) -> io::Result<()> {
    let mut iovs: Vec<libc::iovec> = zones
        .iter()
        .filter(|z| z.len > 0)
        .map(|z| iovec(z.addr, z.len))
        .collect();
    let mut first = 0;
    while first < iovs.len() {
        let window = &iovs[first..];
        let count = libc::c_int::try_from(window.len().min(IOV_MAX)).unwrap_or(1);
        // SAFETY: the iovecs describe zones the caller guarantees writable and unaliased.
        let n = unsafe { libc::readv(fd.as_raw_fd(), window.as_ptr(), count) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the stream in the middle of a page batch",
            ));
        }
        advance(&mut iovs, &mut first, usize::try_from(n).unwrap_or(0));
    }
    Ok(())
}

/// Makes the socket's last close abortive (`SO_LINGER` with a zero timeout): the peer gets a reset at
/// once instead of waiting on a full window for data nobody will read.
///
/// # Errors
/// `setsockopt` failing.
pub fn reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = libc::socklen_t::try_from(size_of::<libc::linger>()).unwrap_or(8);
    // SAFETY: a valid linger struct and its exact size; the fd is borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn tolerant_send_puts_zeros_where_memory_is_gone() {
        const P: usize = 4096;
        // SAFETY: a fresh private anonymous mapping of 4 pages at an address the kernel picks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * P,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as usize;
        for p in 0..4 {
            // SAFETY: inside the mapping made above.
            unsafe { std::ptr::write_bytes((base + p * P) as *mut u8, 0x11 * (p as u8 + 1), P) };
        }
        // SAFETY: the second page of our own mapping; nothing refers to it.
        assert_eq!(unsafe { libc::munmap((base + P) as *mut libc::c_void, P) }, 0);
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v
        });
        let runs = [
            MemRun {
                addr: base,
                len: 3 * P,
            },
            MemRun {
                addr: base + 3 * P,
                len: P,
            },
        ];
        // SAFETY: the runs are our mapping, one page of which is gone on purpose.
        unsafe { send_vectored_tolerant(a.as_fd(), &[b"head"], &runs) }.unwrap();
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), 4 + 4 * P);
        assert_eq!(&got[..4], b"head");
        let page = |i: usize| &got[4 + i * P..4 + (i + 1) * P];
        assert!(page(0).iter().all(|&x| x == 0x11));
        assert!(page(1).iter().all(|&x| x == 0));
        assert!(page(2).iter().all(|&x| x == 0x33));
        assert!(page(3).iter().all(|&x| x == 0x44));
        // SAFETY: the rest of our mapping.
        unsafe { libc::munmap(base as *mut libc::c_void, 4 * P) };
    }

    #[test]
    fn advance_steps_over_partial_and_empty_entries() {
        let buf = [0u8; 64];
        let base = buf.as_ptr() as usize;
        let mut v = vec![iovec(base, 10), iovec(base + 10, 0), iovec(base + 20, 5)];
        let mut first = 0;
        advance(&mut v, &mut first, 4);
        assert_eq!((first, v[0].iov_len, v[0].iov_base as usize), (0, 6, base + 4));
        advance(&mut v, &mut first, 6);
        assert_eq!(first, 2, "the empty entry is skipped");
        advance(&mut v, &mut first, 5);
        assert_eq!(first, 3);
    }

    #[test]
    fn sends_more_iovecs_than_iov_max_and_large_runs() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let src: Vec<u8> = (0..3 * IOV_MAX * 16).map(|i| (i % 251) as u8).collect();
        let runs: Vec<MemRun> = src
            .chunks(16)
            .map(|c| MemRun {
                addr: c.as_ptr() as usize,
                len: c.len(),
            })
            .collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        // SAFETY: every run lies inside `src`, alive for the call.
        unsafe { send_vectored(a.as_fd(), &[b"head"], &runs).unwrap() };
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &src[..]);
    }

    #[test]
    fn receives_into_zones_and_reports_early_eof() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let w = std::thread::spawn(move || {
            use std::io::Write;
            a.write_all(&data).unwrap();
            data
        });
        let mut dst = vec![0u8; 10_000];
        let base = dst.as_mut_ptr() as usize;
        let zones = [
            MemRun {
                addr: base,
                len: 3000,
            },
            MemRun {
                addr: base + 3000,
                len: 7000,
            },
        ];
        // SAFETY: both zones lie inside `dst`, which nothing else touches during the call.
        unsafe { recv_exact_into(b.as_fd(), &zones).unwrap() };
        let data = w.join().unwrap();
        assert_eq!(dst, data);
        let zones = [MemRun { addr: base, len: 10 }];
        // SAFETY: as above; the writer is gone, so the stream is at EOF.
        let e = unsafe { recv_exact_into(b.as_fd(), &zones) }.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
