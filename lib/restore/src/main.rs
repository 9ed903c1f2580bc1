//! `om-restore DIR [--ready-fd N] [--pages-fd N] [--hold-fd N]`: restores the checkpoint in DIR on
//! this node, with this process's stdio, and exits as the program does. With `--ready-fd`, writes the
//! program's pid (as this node sees it) and a newline to fd N once it runs, then closes N.
//!
//! omd restores a migrated image with two more: `--pages-fd` names an open file that holds the pages
//! (its image memfd) instead of `DIR/pages`; `--hold-fd` holds the restored program before its first
//! instruction, after the ready line, until one byte `g` arrives on fd N (the go of the two-phase
//! commit). Anything else, or end of file, kills the copy and om-restore exits with status 75.
//! `--session` starts the program in a session of its own, with the terminal on its stdio (if any)
//! as its controlling terminal.
//!
//! `om-restore --describe DIR` prints what the image holds instead.

use std::io::Write;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: om-restore DIR [--ready-fd N] [--pages-fd N] [--hold-fd N] [--session] | om-restore --describe DIR"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = None;
    let mut ready: Option<i32> = None;
    let mut pages: Option<i32> = None;
    let mut hold: Option<i32> = None;
    let mut describe = false;
    let mut session = false;
    let mut it = args.iter();
    let fd_arg = |v: Option<&String>| v.and_then(|v| v.parse::<i32>().ok()).filter(|fd| *fd > 2);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--describe" => describe = true,
            "--session" => session = true,
            "--ready-fd" => match fd_arg(it.next()) {
                Some(fd) => ready = Some(fd),
                _ => return usage(),
            },
            "--pages-fd" => match fd_arg(it.next()) {
                Some(fd) => pages = Some(fd),
                _ => return usage(),
            },
            "--hold-fd" => match fd_arg(it.next()) {
                Some(fd) => hold = Some(fd),
                _ => return usage(),
            },
            s if dir.is_none() && !s.starts_with('-') => dir = Some(std::path::PathBuf::from(s)),
            _ => return usage(),
        }
    }
    let Some(dir) = dir else { return usage() };
    let mut img = match om_restore::Image::open(&dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!(
                "om-restore: {}: {}",
                dir.display(),
                om_transport::error::chain(&e)
            );
            return ExitCode::from(1);
        }
    };
    if describe {
        print!("{}", img.describe());
        return ExitCode::SUCCESS;
    }
    if let Some(fd) = pages {
        img.pages = format!("/proc/self/fd/{fd}").into();
        img.pages_fd = Some(fd);
    }
    img.hold = hold.is_some();
    img.session = session;
    // These fds are only for the caller and this process: the program must not inherit them.
    for fd in [ready, pages, hold].into_iter().flatten() {
        let _ = om_restore::sys::set_cloexec(fd, true);
    }
    let mut hold = hold.and_then(om_restore::sys::take_fd);
    let mut on_running = |pid: u32| {
        if let Some(fd) = ready.take() {
            if let Some(mut f) = om_restore::sys::take_fd(fd) {
                let _ = writeln!(f, "{pid}");
            }
            // Detached: the caller may be reading its own stdout or stderr to the end; only the
            // program keeps them now.
            om_restore::sys::stdio_to_null();
        }
        match hold.take() {
            Some(mut f) => {
                let mut go = [0u8; 1];
                matches!(std::io::Read::read(&mut f, &mut go), Ok(1) if go[0] == b'g')
            }
            None => true,
        }
    };
    match om_restore::restore(&img, &mut on_running) {
        Ok(om_restore::Ended::Exited(code)) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Ok(om_restore::Ended::Signaled(sig)) => om_restore::sys::die_of(sig),
        Err(om_restore::RestoreError::NotCommitted) => ExitCode::from(75),
        Err(e) => {
            eprintln!(
                "om-restore: {}: {}",
                dir.display(),
                om_transport::error::chain(&e)
            );
            ExitCode::from(1)
        }
    }
}
