//! The terminal a process's stdio is on, as a migration records it.

use std::os::fd::BorrowedFd;

use om_transport::relay::Terminal;

/// The terminal on this process's descriptors 0-2, if any: its settings, its window size and which
/// of the three are on it (the first terminal found; a descriptor on another terminal is left out).
#[must_use]
pub fn stdio_terminal() -> Option<Terminal> {
    let mut first: Option<(u64, libc::termios, libc::winsize)> = None;
    let mut fds = 0u8;
    for fd in 0..=2 {
        // SAFETY: a zeroed termios is a valid out-buffer; TCGETS on a descriptor that is not a
        // terminal fails with ENOTTY and writes nothing.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: see above; `t` lives across the call.
        if unsafe { libc::tcgetattr(fd, &raw mut t) } != 0 {
            continue;
        }
        // SAFETY: descriptors 0-2 of this process, open (tcgetattr succeeded), borrowed for the call.
        let Ok(st) = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) }) else {
            continue;
        };
        match &first {
            None => {
                // SAFETY: a zeroed winsize is a valid out-buffer for TIOCGWINSZ.
                let mut w: libc::winsize = unsafe { std::mem::zeroed() };
                // SAFETY: TIOCGWINSZ writes one `struct winsize` into `w`, which lives across the call.
                if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &raw mut w) } != 0 {
                    w = libc::winsize {
                        ws_row: 24,
                        ws_col: 80,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                }
                first = Some((st.st_rdev, t, w));
            }
            Some((rdev, ..)) if *rdev != st.st_rdev => continue,
            Some(_) => {}
        }
        fds |= 1 << fd;
    }
    first.map(|(_, t, w)| Terminal::from_libc(fds, &t, &w))
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_terminal_without_one() {
        // Under cargo test the standard streams may be a terminal; in a child whose stdio are
        // pipes they are not: checked through /proc, as the function sees them.
        let on_tty = (0..=2).any(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|p| {
                p.to_string_lossy().starts_with("/dev/pts/") || p.to_string_lossy().starts_with("/dev/tty")
            })
        });
        assert_eq!(super::stdio_terminal().is_some(), on_tty);
    }
}
