//! Before anything is frozen: is everything the process uses something om can bring back?

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::dirty::maps;
use crate::image::FdKind;
use crate::sys::task;

/// Something that makes a checkpoint impossible, named so that a person can act on it.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A file descriptor of an unsupported kind.
    #[error("fd {fd} is {what} ({target}), which om cannot capture yet")]
    Fd {
        /// The descriptor.
        fd: i32,
        /// What kind of thing it is.
        what: &'static str,
        /// Its `/proc/self/fd` link.
        target: String,
    },
    /// A mapping of an unsupported kind.
    #[error("mapping {start:#x}-{end:#x} of {name} is {what}, which om cannot capture yet")]
    Mapping {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Its name in `/proc/self/maps`.
        name: String,
        /// Why.
        what: &'static str,
    },
    /// The process holds POSIX timers (`timer_create`).
    #[error("the process has {0} POSIX timer(s) (timer_create), which om cannot capture yet")]
    PosixTimers(usize),
    /// The process has child processes: they would not exist in a restored copy.
    #[error("the process has child processes ({0}), which om cannot capture yet")]
    Children(String),
    /// The process is a restored copy whose pages are still being filled in.
    #[error("the process is still being restored (lazy pages pending after {0} s); try again")]
    StillRestoring(u64),
    /// `/proc/self` could not be read.
    #[error("reading {what}")]
    Proc {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/self/maps` could not be read or parsed.
    #[error("reading the memory map")]
    Maps(#[source] maps::MapsError),
}

/// Fds the runtime owns itself (its omd connection): never captured; a restored runtime reconnects.
static OWN_FDS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Marks `fd` as the runtime's own.
pub fn own_fd(fd: i32, own: bool) {
    if let Ok(mut v) = OWN_FDS.lock() {
        v.retain(|x| *x != fd);
        if own {
            v.push(fd);
        }
    }
}

pub(crate) fn is_own(fd: i32) -> bool {
    OWN_FDS.lock().map(|v| v.contains(&fd)).unwrap_or(false)
}

/// A classified descriptor.
#[derive(Debug, Clone)]
pub(crate) struct FdInfo {
    pub fd: i32,
    pub kind: FdKind,
    pub target: String,
}

/// Classifies every fd but the runtime's own.
pub(crate) fn fds() -> Result<Vec<FdInfo>, Refusal> {
    let list = task::numeric_entries(c"/proc/self/fd").map_err(|source| Refusal::Proc {
        what: "/proc/self/fd",
        source,
    })?;
    let mut out = Vec::new();
    for fd in list {
        let Ok(fd) = i32::try_from(fd) else { continue };
        if is_own(fd) {
            continue;
        }
        let path = format!("/proc/self/fd/{fd}");
        let Ok(link) = fs::read_link(&path) else {
            continue; // the descriptor the listing itself used, closed already
        };
        let target = link.to_string_lossy().into_owned();
        let meta = fs::metadata(&path);
        let kind = classify(fd, &target, meta.as_ref().ok());
        match kind {
            Ok(kind) => out.push(FdInfo { fd, kind, target }),
            Err(what) => return Err(Refusal::Fd { fd, what, target }),
        }
    }
    out.sort_by_key(|f| f.fd);
    Ok(out)
}

fn classify(fd: i32, target: &str, meta: Option<&fs::Metadata>) -> Result<FdKind, &'static str> {
    match target {
        "/dev/null" => return Ok(FdKind::DevNull),
        "/dev/zero" => return Ok(FdKind::DevZero),
        "/dev/urandom" | "/dev/random" => return Ok(FdKind::URandom),
        _ => {}
    }
    let stdio_like = target.starts_with("pipe:")
        || target.starts_with("socket:")
        || target.starts_with("/dev/pts/")
        || target.starts_with("/dev/tty")
        || target == "/dev/console";
    if (0..=2).contains(&fd) && stdio_like {
        return Ok(FdKind::Stdio);
    }
    let Some(meta) = meta else {
        return Err("unreadable");
    };
    let ft = meta.file_type();
    if ft.is_file() {
        // A memfd's link always ends in " (deleted)": tell it apart first (seals and sharing would
        // not survive being carried as a deleted file).
        if target.starts_with("/memfd:") {
            return Err("a memfd");
        }
        if target.ends_with(" (deleted)") {
            if meta.size() > crate::image::records::MAX_CARRIED_FILE as u64 {
                return Err("a deleted file larger than 16 MiB");
            }
            return Ok(FdKind::Deleted);
        }
        if target.starts_with('/') {
            return Ok(FdKind::File);
        }
        return Err("an unnamed file");
    }
    Err(if target.starts_with("socket:") {
        "a socket"
    } else if target.starts_with("pipe:") {
        "a pipe"
    } else if target.contains("io_uring") {
        "an io_uring"
    } else if target.starts_with("anon_inode:") {
        "an anonymous inode (eventfd, epoll, timerfd, userfaultfd, ...)"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else {
        "of an unsupported type"
    })
}

/// Checks fds and mappings.
///
/// # Errors
/// The first thing that cannot be captured.
pub fn preflight() -> Result<(), Refusal> {
    fds()?;
    // Each POSIX timer is one "ID:" line (absent file: a kernel without CONFIG_CHECKPOINT_RESTORE).
    let timers = fs::read_to_string("/proc/self/timers")
        .map(|t| t.lines().filter(|l| l.starts_with("ID:")).count())
        .unwrap_or(0);
    if timers > 0 {
        return Err(Refusal::PosixTimers(timers));
    }
    let vmas = maps::read_self().map_err(Refusal::Maps)?;
    for v in &vmas {
        if v.is_special() {
            continue;
        }
        let refuse = |what| Refusal::Mapping {
            start: v.start,
            end: v.end,
            name: v.path.clone(),
            what,
        };
        if v.path.starts_with("/dev/") && !v.path.starts_with("/dev/zero") {
            return Err(refuse("a device mapping"));
        }
        if v.perms.shared
            && (v.inode == 0 || v.path.ends_with(" (deleted)") || v.path.starts_with("/dev/zero"))
        {
            return Err(refuse("shared memory without a file"));
        }
        if v.inode != 0 && v.path.ends_with(" (deleted)") {
            return Err(refuse("a mapping of a deleted file"));
        }
        if v.inode != 0 && v.path.starts_with("/memfd:") {
            return Err(refuse("a memfd mapping"));
        }
    }
    Ok(())
}

/// The child processes of every thread of this process (`/proc/self/task/*/children`).
pub(crate) fn children() -> Vec<u32> {
    let mut out = Vec::new();
    for t in super::state::list_tasks().unwrap_or_default() {
        if let Ok(s) = fs::read_to_string(format!("/proc/self/task/{t}/children")) {
            out.extend(s.split_whitespace().filter_map(|w| w.parse::<u32>().ok()));
        }
    }
    out
}

/// Waits until the process has no child processes (a short-lived child ends and is reaped).
///
/// # Errors
/// [`Refusal::Children`] after `limit`.
pub fn wait_childless(limit: std::time::Duration) -> Result<(), Refusal> {
    let start = std::time::Instant::now();
    loop {
        let c = children();
        if c.is_empty() {
            return Ok(());
        }
        if start.elapsed() > limit {
            let list: Vec<String> = c.iter().map(u32::to_string).collect();
            return Err(Refusal::Children(list.join(", ")));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// True while any mapping is registered for missing-page faults (`um` in `/proc/self/smaps`): a
/// lazy restore of this process is still filling it in, and pages not yet in would be missed.
pub(crate) fn lazy_pages_pending() -> bool {
    fs::read_to_string("/proc/self/smaps").is_ok_and(|s| {
        s.lines()
            .filter_map(|l| l.strip_prefix("VmFlags:"))
            .any(|f| f.split_whitespace().any(|w| w == "um"))
    })
}

/// Waits until a lazy restore of this process has every page in.
///
/// # Errors
/// [`Refusal::StillRestoring`] after `limit`.
pub fn wait_restored(limit: std::time::Duration) -> Result<(), Refusal> {
    let start = std::time::Instant::now();
    while lazy_pages_pending() {
        if start.elapsed() > limit {
            return Err(Refusal::StillRestoring(limit.as_secs()));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// A real-time signal that has no handler and that no thread blocks.
pub(crate) fn choose_signal() -> Option<i32> {
    let blocked = blocked_in_any_thread();
    (libc::SIGRTMIN() + 2..=libc::SIGRTMAX()).rev().find(|&s| {
        let bit = 1u64 << (s - 1);
        blocked & bit == 0 && task::sigaction_get(s).is_ok_and(|a| a.handler == 0)
    })
}

fn blocked_in_any_thread() -> u64 {
    let mut all = 0;
    // The runtime's own thread blocks everything but unblocks the chosen signal for itself.
    let me = task::gettid();
    for t in super::state::list_tasks()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| *t != me)
    {
        all |= super::state::sig_mask(&format!("/proc/self/task/{t}/status"), "SigBlk:");
    }
    all
}
