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
//! - omd to runtime: `migrate IP:PORT DOWNTIME_MS MAX_ROUNDS MODE KEYFILE`; the runtime answers `OK
//!   moved to IP:PORT {json report}` once the copy runs there, waits for omd's `bye` (omd has noted
//!   the move), tells omrun if it is at home, and ends with its threads still parked; or `ERR ...`,
//!   and the process continues here.
//!
//! `OM_ANCHOR=FD,PORT,TOKEN` (set by omrun): a socket to omrun, omrun's relay port and the home
//! token (hex). The runtime keeps them for migrations; the fd is its own (never part of an image).

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

/// Reads `OM_ANCHOR` (see the crate docs).
fn read_anchor() {
    let Ok(v) = std::env::var("OM_ANCHOR") else {
        return;
    };
    let mut parts = v.split(',');
    let (Some(fd), Some(port), Some(token)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let token: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    let Ok(fd) = fd.parse::<i32>() else { return };
    // Only omrun's own child is at home: a process started by it inherits the variable, but its
    // parent is not at the other end of the socket (and the fd number may be anything of its own).
    let parent = Some(std::os::unix::process::parent_id());
    if fd <= 2 || om::sys::task::socket_peer_pid(fd) != parent {
        return;
    }
    if let (Ok(port), Some(token)) = (port.parse::<u16>(), token) {
        if om::sys::task::set_cloexec(fd).is_ok() {
            capture::own_fd(fd, true);
            om::precopy::migrate::set_anchor_fd(fd);
            om::precopy::migrate::set_home_seed(port, token);
        }
    }
}

/// Runs when the library is loaded.
extern "C" fn omrt_init() {
    if std::env::var_os("OM_RUNTIME_DISABLE").is_some() {
        return;
    }
    om::sys::task::note_main_thread();
    read_anchor();
    let control = om::control::resolve_socket_path(None);
    // The thread inherits a mask with every signal but the faults blocked, so it never takes the
    // application's.
    let _ = om::sys::task::with_signals_blocked(|| {
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

/// The control connection, read through one buffer for its whole life: omd may write a request
/// right behind its answer to `register`, and a buffer dropped after a line would lose it.
type Control = BufReader<UnixStream>;

fn connect(path: &PathBuf) -> Control {
    let mut delay = Duration::from_millis(50);
    loop {
        if let Ok(mut s) = UnixStream::connect(path) {
            capture::own_fd(s.as_raw_fd(), true);
            if writeln!(s, "register {}", std::process::id()).is_ok() {
                let mut control = BufReader::new(s);
                let mut line = String::new();
                if control.read_line(&mut line).is_ok() && line.starts_with("OK") {
                    return control;
                }
                s = control.into_inner();
            }
            capture::own_fd(s.as_raw_fd(), false);
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

fn control_loop(path: &std::path::Path) {
    let mut path = path.to_path_buf();
    let mut control = connect(&path);
    loop {
        let mut line = String::new();
        let read = control.read_line(&mut line);
        if !matches!(read, Ok(n) if n > 0) {
            capture::own_fd(control.get_ref().as_raw_fd(), false);
            drop(control);
            control = connect(&path);
            continue;
        }
        let stream = control.get_mut();
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
                            control = restored(control, &mut path);
                            continue;
                        }
                        Err(e) => format!("ERR {}", om_transport::error::chain(&e)),
                    }
                }
                None => "ERR usage: checkpoint LEAVE DIR".to_owned(),
            },
            Some(("migrate", rest)) => match migrate_request(rest) {
                Some(req) => match om::precopy::migrate::migrate(&req, |_| {}) {
                    Ok(om::precopy::migrate::Outcome::Moved(report, frozen)) => {
                        let _ = writeln!(stream, "OK moved to {} {}", req.to, report.json());
                        // omd notes the move before this process ends (its relay must not take the
                        // end for the program's).
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut bye = String::new();
                        let _ = control.read_line(&mut bye);
                        om::precopy::migrate::tell_anchor("moved");
                        frozen.exit(0);
                    }
                    Ok(om::precopy::migrate::Outcome::Restored) => {
                        control = restored(control, &mut path);
                        continue;
                    }
                    Err(e) => format!("ERR {}", om_transport::error::chain(&e)),
                },
                None => "ERR usage: migrate IP:PORT DOWNTIME_MS MAX_ROUNDS MODE KEYFILE".to_owned(),
            },
            _ => format!("ERR unknown command {:?}", line.trim_end()),
        };
        let _ = writeln!(control.get_mut(), "{reply}");
    }
}

/// In a restored copy: the old connection belongs to the source (its fd number may already be one
/// of the restored descriptors, so it is forgotten, not closed); the restorer named this node's omd.
fn restored(control: Control, path: &mut PathBuf) -> Control {
    capture::own_fd(control.into_inner().into_raw_fd(), false);
    if let Some(p) = capture::MARKER.control_path() {
        *path = p;
    }
    connect(path)
}

fn migrate_request(rest: &str) -> Option<om::precopy::migrate::Request> {
    let mut w = rest.splitn(6, ' ');
    let to = w.next()?.parse().ok()?;
    let downtime = w.next()?.parse::<u64>().ok()?;
    let max_rounds = w.next()?.parse::<u32>().ok()?;
    let (mode, auto_converge) = om::precopy::migrate::Mode::parse(w.next()?)?;
    let transport = om::precopy::migrate::Transport::parse(w.next()?)?;
    let key = PathBuf::from(w.next()?);
    Some(om::precopy::migrate::Request {
        to,
        key,
        budget: om::precopy::Budget {
            downtime: Duration::from_millis(downtime),
            max_rounds,
            auto_converge,
            ..om::precopy::Budget::default()
        },
        mode,
        transport,
    })
}
