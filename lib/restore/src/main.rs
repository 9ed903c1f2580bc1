//! `om-restore DIR [--ready-fd N]`: restores the checkpoint in DIR on this node, with this
//! process's stdio, and exits as the program does. With `--ready-fd`, writes the program's pid (as
//! this node sees it) and a newline to fd N once it runs, then closes N.
//!
//! `om-restore --describe DIR` prints what the image holds instead.

use std::io::Write;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: om-restore DIR [--ready-fd N] | om-restore --describe DIR");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = None;
    let mut ready: Option<i32> = None;
    let mut describe = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--describe" => describe = true,
            "--ready-fd" => match it.next().and_then(|v| v.parse().ok()) {
                Some(fd) if fd > 2 => ready = Some(fd),
                _ => return usage(),
            },
            s if dir.is_none() && !s.starts_with('-') => dir = Some(std::path::PathBuf::from(s)),
            _ => return usage(),
        }
    }
    let Some(dir) = dir else { return usage() };
    let img = match om_restore::Image::open(&dir) {
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
    // The ready fd is only for the caller: the program must not inherit it.
    if let Some(fd) = ready {
        let _ = om_restore::sys::set_cloexec(fd, true);
    }
    let mut on_running = |pid: u32| {
        if let Some(fd) = ready.take() {
            if let Some(mut f) = om_restore::sys::take_fd(fd) {
                let _ = writeln!(f, "{pid}");
            }
            // Detached: the caller may be reading its own stdout or stderr to the end; only the
            // program keeps them now.
            om_restore::sys::stdio_to_null();
        }
    };
    match om_restore::restore(&img, &mut on_running) {
        Ok(om_restore::Ended::Exited(code)) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Ok(om_restore::Ended::Signaled(sig)) => om_restore::sys::die_of(sig),
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
