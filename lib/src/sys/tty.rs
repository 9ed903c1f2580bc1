//! The terminal a process's stdio is on, as a migration records it, and terminal window sizes.

use std::os::fd::{BorrowedFd, RawFd};

use om_transport::relay::{Terminal, WinSize};

/// The window size of the terminal on `fd`, if it is one.
#[must_use]
pub fn window_size(fd: RawFd) -> Option<WinSize> {
    // SAFETY: a zeroed winsize is a valid out-buffer.
    let mut w: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` into `w`, which lives across the call; on a
    // descriptor that is not a terminal it fails and writes nothing.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &raw mut w) };
    (r == 0).then(|| WinSize::from_libc(&w))
}

/// The terminal on this process's descriptors 0-2, if any: its settings, its window size and which
/// of the three are on it (the first terminal found; a descriptor on another terminal is left out).
/// Async-signal-safe (a migration's final round reads it in a signal handler).
#[must_use]
pub fn stdio_terminal() -> Option<Terminal> {
    terminal_on([0, 1, 2])
}

/// [`stdio_terminal`] for the descriptors that stand in for 0, 1 and 2.
fn terminal_on(fds: [RawFd; 3]) -> Option<Terminal> {
    let mut first: Option<(u64, libc::termios, WinSize)> = None;
    let mut on = 0u8;
    for (bit, fd) in fds.into_iter().enumerate() {
        // SAFETY: a zeroed termios is a valid out-buffer; TCGETS on a descriptor that is not a
        // terminal fails with ENOTTY and writes nothing.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: see above; `t` lives across the call.
        if unsafe { libc::tcgetattr(fd, &raw mut t) } != 0 {
            continue;
        }
        // SAFETY: the caller's open descriptor (tcgetattr succeeded), borrowed for the call.
        let Ok(st) = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) }) else {
            continue;
        };
        match &first {
            None => {
                let size = window_size(fd).unwrap_or(WinSize {
                    rows: 24,
                    cols: 80,
                    xpixel: 0,
                    ypixel: 0,
                });
                first = Some((st.st_rdev, t, size));
            }
            Some((rdev, ..)) if *rdev != st.st_rdev => continue,
            Some(_) => {}
        }
        on |= 1 << bit;
    }
    first.map(|(_, t, size)| Terminal::from_libc(on, &t, &size.to_libc()))
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;

    /// A pseudo-terminal of `rows` x `cols`: (master, slave).
    fn pty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
        let size = WinSize {
            rows,
            cols,
            xpixel: 0,
            ypixel: 0,
        }
        .to_libc();
        let (mut m, mut s) = (-1, -1);
        // SAFETY: out-pointers to two ints, no name buffer, no settings; `size` outlives the call.
        let r = unsafe {
            libc::openpty(
                &raw mut m,
                &raw mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                &raw const size,
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: an open descriptor nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(m) };
        // SAFETY: as for the master.
        let slave = unsafe { OwnedFd::from_raw_fd(s) };
        (master, slave)
    }

    #[test]
    fn the_first_terminal_its_descriptors_and_size() {
        let (_m, slave) = pty(50, 132);
        let (_m2, other) = pty(24, 80);
        let (r, _w) = nix::unistd::pipe().unwrap();
        let t = terminal_on([r.as_raw_fd(), slave.as_raw_fd(), slave.as_raw_fd()]).unwrap();
        assert_eq!(t.fds, 0b110);
        assert_eq!((t.size.rows, t.size.cols), (50, 132));
        // A second terminal is left out; the first one found decides.
        let t = terminal_on([other.as_raw_fd(), r.as_raw_fd(), slave.as_raw_fd()]).unwrap();
        assert_eq!(t.fds, 0b001);
        assert_eq!((t.size.rows, t.size.cols), (24, 80));
        assert!(terminal_on([r.as_raw_fd(); 3]).is_none());
        assert_eq!(window_size(slave.as_raw_fd()).map(|w| w.cols), Some(132));
        assert!(window_size(r.as_raw_fd()).is_none());
    }
}
