//! `libomrt.so`: the om runtime inside the application.
//!
//! Loaded by `omrun` through `LD_PRELOAD` (or linked with `-lomrt`), it starts one control thread
//! that registers the process with the local omd over the control socket and waits for commands. The
//! runtime allocates from its own heap (dlmalloc over `mmap`), never through glibc's `malloc`: while
//! it captures, the application's threads are parked at arbitrary points, perhaps inside `malloc`
//! holding an arena lock.
//!
//! Protocol on the control socket (one line each way):
//! - runtime to omd, once: `register PID`; omd answers `OK`.
//! - omd to runtime: `checkpoint LEAVE DIR` (LEAVE is 1 to keep running); the runtime answers `OK
//!   ...` or `ERR ...`. Without LEAVE the process ends right after the answer, its threads still
//!   parked, so that nothing runs between the image and the end.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use om::capture::{self, Outcome};

/// dlmalloc, except during a capture, when allocations come from the capture arena (see
/// `om::sys::arena`).
#[global_allocator]
static ALLOC: om::sys::arena::CaptureAware<dlmalloc::GlobalDlmalloc> =
    om::sys::arena::CaptureAware(dlmalloc::GlobalDlmalloc);

/// Runs when the library is loaded.
extern "C" fn omrt_init() {
    if std::env::var_os("OM_RUNTIME_DISABLE").is_some() {
        return;
    }
    let control = om::control::resolve_socket_path(None);
    // The thread inherits a mask with every signal blocked, so it never takes the application's.
    let _ = om::sys::task::with_all_signals_blocked(|| {
        std::thread::Builder::new()
            .name("omrt".into())
            .stack_size(1 << 20)
            .spawn(move || control_loop(&control))
    });
}

// SAFETY: `.init_array` holds `extern "C" fn()` pointers that the dynamic loader calls once when the
// library is loaded; `omrt_init` has that type and is sound to run then (it only starts a thread).
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = omrt_init;

fn connect(path: &PathBuf) -> UnixStream {
    let mut delay = Duration::from_millis(50);
    loop {
        if let Ok(mut s) = UnixStream::connect(path) {
            capture::own_fd(s.as_raw_fd(), true);
            let ok = writeln!(s, "register {}", std::process::id()).is_ok();
            let mut line = String::new();
            if ok && BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("OK") {
                return s;
            }
            capture::own_fd(s.as_raw_fd(), false);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn control_loop(path: &PathBuf) {
    let mut stream = connect(path);
    loop {
        let mut line = String::new();
        let read = BufReader::new(&stream).read_line(&mut line);
        if !matches!(read, Ok(n) if n > 0) {
            capture::own_fd(stream.as_raw_fd(), false);
            drop(stream);
            stream = connect(path);
            continue;
        }
        let reply = match line.trim_end().split_once(' ') {
            Some(("checkpoint", rest)) => match rest.split_once(' ') {
                Some((leave, dir)) => {
                    let leave = leave == "1";
                    match capture::checkpoint(std::path::Path::new(dir), !leave) {
                        Ok(Outcome::Written(s)) => {
                            let msg = format!(
                                "OK checkpointed {} threads, {} bytes of pages to {} (frozen {:.1} ms)",
                                s.threads,
                                s.bytes,
                                s.dir.display(),
                                s.frozen.as_secs_f64() * 1e3
                            );
                            if leave {
                                msg
                            } else {
                                let _ = writeln!(stream, "{msg}");
                                om::sys::task::exit_group(0);
                            }
                        }
                        Ok(Outcome::Restored) => {
                            // The old connection belongs to the source; its fd number may already
                            // be one of the restored descriptors, so it is forgotten, not closed.
                            capture::own_fd(stream.into_raw_fd(), false);
                            stream = connect(path);
                            continue;
                        }
                        Err(e) => format!("ERR {}", om_transport::error::chain(&e)),
                    }
                }
                None => "ERR usage: checkpoint LEAVE DIR".to_owned(),
            },
            _ => format!("ERR unknown command {:?}", line.trim_end()),
        };
        let _ = writeln!(stream, "{reply}");
    }
}
