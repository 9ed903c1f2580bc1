//! The restorer's process tree and its outcome.
//!
//! ```text
//! om-restore (this process; stdio is the program's, its exit status the program's)
//!  └─ pid 1 of a new pid and mount namespace (mounts its /proc, reaps, reports the status)
//!      └─ the program, created with clone3 set_tid = its old pid; becomes the image
//! ```
//!
//! A pid namespace is what lets the program keep its pid and every thread its tid (`getpid()`,
//! `gettid()` and glibc's cached tids stay right). Without root, a user namespace that maps the
//! caller's own uid and gid comes first. Two pipes report back: the status pipe (empty at EOF when
//! the image runs, otherwise what failed) and the exit pipe (the program's wait status).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use om::compat::{Local, USER_END};
use om::dirty::maps;
use om::image::Checkpoint;
use om::image::records::{
    FdRecord, KIND_FD, KIND_MAPPED_FILE, KIND_PROCESS, KIND_THREAD, MappedFile, ProcessRecord, ThreadRecord,
};

use crate::become_target::{self, Target};
use crate::error::RestoreError;
use crate::plan::{self, Here, Plan};
use crate::sys::{self, Area};

/// A decoded image, ready to restore.
#[derive(Debug)]
pub struct Image {
    /// The checkpoint.
    pub ckpt: Checkpoint,
    /// The process record.
    pub process: ProcessRecord,
    /// Thread records.
    pub threads: Vec<ThreadRecord>,
    /// Fd records.
    pub fds: Vec<FdRecord>,
    /// The files that mappings need.
    pub files: Vec<MappedFile>,
    /// The pages file: `DIR/pages`, or the one the caller handed over (`--pages-fd`).
    pub pages: std::path::PathBuf,
    /// Hold the restored program before its first instruction until the caller says go (the
    /// prepared state of a migration's two-phase commit).
    pub hold: bool,
    /// The descriptor `pages` names, when the caller handed it over (closed once it is opened).
    pub pages_fd: Option<RawFd>,
    /// Start the program in a session of its own, with the terminal on its stdio (if any) as its
    /// controlling terminal (a migrated copy: omd gives it a pseudo-terminal or pipes).
    pub session: bool,
}

impl Image {
    /// Opens and decodes the checkpoint in `dir`.
    ///
    /// # Errors
    /// An unreadable or invalid checkpoint.
    pub fn open(dir: &Path) -> Result<Self, RestoreError> {
        let ckpt = Checkpoint::open(dir).map_err(RestoreError::Checkpoint)?;
        let rec = |what| move |source| RestoreError::Record { what, source };
        let mut process = None;
        let mut threads = Vec::new();
        let mut fds = Vec::new();
        let mut files = Vec::new();
        for r in &ckpt.records {
            match r.kind {
                KIND_PROCESS => {
                    if process
                        .replace(ProcessRecord::decode(&r.bytes).map_err(rec("process"))?)
                        .is_some()
                    {
                        return Err(RestoreError::Records("two process records".into()));
                    }
                }
                KIND_THREAD => threads.push(ThreadRecord::decode(&r.bytes).map_err(rec("thread"))?),
                KIND_FD => fds.push(FdRecord::decode(&r.bytes).map_err(rec("fd"))?),
                KIND_MAPPED_FILE => files.push(MappedFile::decode(&r.bytes).map_err(rec("mapped file"))?),
                // For omd's relay, which sets up the stdio; the restore itself has no use for them.
                om::image::records::KIND_HOME | om::image::records::KIND_TERMINAL => {}
                other => return Err(RestoreError::Records(format!("an unknown record kind {other}"))),
            }
        }
        let process = process.ok_or_else(|| RestoreError::Records("no process record".into()))?;
        if threads.is_empty() {
            return Err(RestoreError::Records("no thread records".into()));
        }
        Ok(Self {
            pages: dir.join(om::image::checkpoint::PAGES),
            hold: false,
            session: false,
            pages_fd: None,
            ckpt,
            process,
            threads,
            fds,
            files,
        })
    }

    /// A human-readable summary of the image.
    #[must_use]
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let p = &self.process;
        let mut s = String::new();
        let data: u64 = self
            .ckpt
            .runs
            .iter()
            .filter(|r| r.data)
            .map(|r| r.addr.end - r.addr.start)
            .sum();
        let _ = writeln!(s, "process {} ({}), cwd {}", p.pid, p.exe, p.cwd);
        let _ = writeln!(
            s,
            "memory: {} VMAs, {} bytes of page data",
            self.ckpt.begin.vmas.len(),
            data
        );
        for t in &self.threads {
            let control = if t.flags & ThreadRecord::CONTROL != 0 {
                " (om runtime)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "thread {}{control}: frame {:#x}, fs {:#x}",
                t.tid, t.frame, t.fs_base
            );
        }
        for f in &self.fds {
            let _ = writeln!(s, "fd {}: {:?} {} at {}", f.fd, f.kind, f.path, f.offset);
        }
        for (name, (interval, value)) in ["real", "virtual", "prof"].iter().zip(p.itimers) {
            if value != 0 || interval != 0 {
                let _ = writeln!(s, "itimer {name}: every {interval} us, next in {value} us");
            }
        }
        let _ = writeln!(
            s,
            "signal handlers: {}, pending: {:#x}",
            p.sigactions.len(),
            p.shared_pending
        );
        for f in &self.files {
            let _ = writeln!(s, "needs {} ({} bytes)", f.path, f.size);
        }
        s
    }

    /// The checks before anything is touched: owner, CPU and kernel, the mapped files.
    ///
    /// # Errors
    /// The first problem found.
    pub fn gate(&self) -> Result<(), RestoreError> {
        // Only pages handed over by omd (which checked each as it landed) may come unchecked.
        if self.pages_fd.is_none() && !self.ckpt.checks_pages() {
            return Err(RestoreError::Unchecked);
        }
        let you = nix::unistd::getuid().as_raw();
        let image = self.ckpt.begin.info.uid;
        if you != 0 && you != image {
            return Err(RestoreError::Owner { image, you });
        }
        Local::probe()
            .and_then(|l| l.check(&self.process))
            .map_err(RestoreError::Incompatible)?;
        for f in &self.files {
            check_file(f)?;
        }
        Ok(())
    }
}

fn check_file(f: &MappedFile) -> Result<(), RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let err = |what: String| RestoreError::MappedFile {
        path: f.path.clone(),
        what,
    };
    let m = std::fs::metadata(&f.path).map_err(|e| err(format!("cannot be opened: {e}")))?;
    if m.dev() != f.dev || m.ino() != f.ino {
        return Err(err("was replaced by another file since the checkpoint".into()));
    }
    if m.size() != f.size
        || m.mtime() != f.mtime_sec
        || u32::try_from(m.mtime_nsec()).ok() != Some(f.mtime_nsec)
    {
        return Err(err("was modified since the checkpoint".into()));
    }
    Ok(())
}

/// How the restored program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// It died of this signal.
    Signaled(i32),
}

impl Ended {
    fn from_wait(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            Self::Signaled(libc::WTERMSIG(status))
        } else {
            Self::Exited(libc::WEXITSTATUS(status))
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RestoreError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| RestoreError::os("creating a pipe")(e.into()))
}

/// Fds above every fd of the image, for the restorer's own.
fn free_fd_floor(img: &Image) -> RawFd {
    let top = img.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    RawFd::try_from(top).unwrap_or(1000).saturating_add(1).max(10)
}

/// The restorer's fds that the blob uses, at their planned numbers.
#[derive(Debug, Clone, Copy)]
struct BlobFds {
    status: RawFd,
    exe: Option<RawFd>,
    uffd: Option<RawFd>,
    hold: Option<RawFd>,
}

fn here_layout(code: &'static [u8], fds: BlobFds, marker_len: u64) -> Result<Here<'static>, RestoreError> {
    let vmas = maps::read_self().map_err(RestoreError::Maps)?;
    Ok(Here {
        busy: vmas.iter().map(|v| v.start..v.end).collect(),
        specials: vmas
            .iter()
            .filter(|v| v.is_special() && v.end <= USER_END)
            .map(|v| om::image::records::Special {
                name: v.path.clone(),
                start: v.start,
                end: v.end,
            })
            .collect(),
        code,
        page: om::sys::page_size() as u64,
        status_fd: u32::try_from(fds.status).unwrap_or(0),
        exe_fd: fds.exe.and_then(|f| u32::try_from(f).ok()),
        uffd: fds.uffd.and_then(|f| u32::try_from(f).ok()),
        hold_fd: fds.hold.and_then(|f| u32::try_from(f).ok()),
        marker_len,
    })
}

/// Plans and reserves the restorer's areas (a few attempts: an allocation of this process may
/// take a chosen range between planning and reserving).
fn plan_and_reserve(img: &Image, fds: BlobFds, lazy: &[bool]) -> Result<(Plan, Area, Area), RestoreError> {
    let mut last = None;
    for _ in 0..4 {
        let here = here_layout(sys::blob_code(), fds, marker_len(img))?;
        let plan = plan::plan(&img.ckpt.begin.vmas, &img.process, &img.threads, &here, lazy)
            .map_err(RestoreError::Plan)?;
        let leftover = match Area::reserve(plan.leftover.start, plan.leftover.end - plan.leftover.start) {
            Ok(a) => a,
            Err(e) => {
                last = Some(RestoreError::Reserve {
                    what: "the leftover area",
                    addr: plan.leftover.start,
                    source: e,
                });
                continue;
            }
        };
        match Area::reserve(plan.premap.start, plan.premap.end - plan.premap.start) {
            Ok(premap) => return Ok((plan, leftover, premap)),
            Err(e) => {
                last = Some(RestoreError::Reserve {
                    what: "the premap area",
                    addr: plan.premap.start,
                    source: e,
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| RestoreError::Setup("planning failed".into())))
}

/// Enters a user namespace that maps the caller's own ids, when not root.
fn enter_user_namespace() -> Result<(), RestoreError> {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        return Ok(());
    }
    let gid = nix::unistd::getegid().as_raw();
    sys::unshare(libc::CLONE_NEWUSER).map_err(RestoreError::os("creating a user namespace"))?;
    let w = |p: &str, s: String| std::fs::write(p, s).map_err(RestoreError::os(format!("writing {p}")));
    w("/proc/self/setgroups", "deny".into())?;
    w("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    w("/proc/self/gid_map", format!("{gid} {gid} 1"))
}

/// Called when the program runs: its pid as this node sees it.
pub type OnRunning<'a> = &'a mut dyn FnMut(u32) -> bool;

/// VMAs with at least this much page data are restored lazily.
pub const LAZY_MIN: u64 = 64 << 10;

/// Bytes of the restore marker the restorer writes: the control socket's path too from image
/// version 2 (`om::capture::MARKER_LEN`), else the first 24.
fn marker_len(img: &Image) -> u64 {
    if img.ckpt.version >= 2 {
        om::capture::MARKER_LEN
    } else {
        24
    }
}

/// Which VMAs to serve on demand: those holding at least [`LAZY_MIN`] bytes of data, unless
/// `OM_RESTORE_EAGER` is set.
fn lazy_vmas(img: &Image) -> Vec<bool> {
    let vmas = &img.ckpt.begin.vmas;
    let mut data = vec![0u64; vmas.len()];
    if std::env::var_os("OM_RESTORE_EAGER").is_some() {
        return vec![false; vmas.len()];
    }
    for s in img.ckpt.segments() {
        if let Some(i) = s.vma {
            data[i] += s.addr.end - s.addr.start;
        }
    }
    // The restore marker is written into its premapped page before the program runs: that VMA is
    // filled first (a lazy fill would find the page present and skip the rest of its data).
    let marker = img.process.restore_marker;
    data.iter()
        .zip(vmas)
        .map(|(d, v)| *d >= LAZY_MIN && !(v.start <= marker && marker < v.end))
        .collect()
}

/// Restores the image and waits for the program to end.
///
/// # Errors
/// Anything that stops the restore; the program then never ran.
pub fn restore(img: &Image, on_running: OnRunning<'_>) -> Result<Ended, RestoreError> {
    img.gate()?;
    let floor = free_fd_floor(img);
    let (status_r, status_w_low) = pipe()?;
    let status_w =
        sys::dup_above(status_w_low.as_raw_fd(), floor).map_err(RestoreError::os("placing the status fd"))?;
    drop(status_w_low);
    let exe_fd = File::open(&img.process.exe)
        .ok()
        .and_then(|f| sys::dup_above(f.as_raw_fd(), floor).ok());
    let lazy = lazy_vmas(img);
    // A lazy restore: a placeholder holds the userfaultfd's number, a socket brings it back here.
    let handoff = if lazy.contains(&true) {
        let placeholder = File::open("/dev/null").map_err(RestoreError::os("opening /dev/null"))?;
        let n = sys::dup_above(placeholder.as_raw_fd(), floor)
            .map_err(RestoreError::os("placing the userfaultfd"))?;
        let (mine, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| RestoreError::os("creating a socket pair")(e.into()))?;
        Some((n, mine, theirs))
    } else {
        None
    };
    let uffd_n = handoff.as_ref().map(|h| h.0);
    // A held restore: the blob reads one byte from this pipe before any thread runs.
    let (hold_r, mut hold_w) = if img.hold {
        let (r_low, w) = pipe()?;
        let r = sys::dup_above(r_low.as_raw_fd(), floor).map_err(RestoreError::os("placing the hold fd"))?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let (exit_r, exit_w) = pipe()?;
    let fds = BlobFds {
        status: status_w,
        exe: exe_fd,
        uffd: uffd_n,
        hold: hold_r,
    };
    // The areas stay reserved in this process; only the new process maps them.
    let (plan, leftover, premap) = plan_and_reserve(img, fds, &lazy)?;
    enter_user_namespace()?;

    let flags = (libc::CLONE_NEWPID | libc::CLONE_NEWNS) as u64;
    let init = sys::fork3(flags, None).map_err(RestoreError::os("creating the pid namespace"))?;
    if init == 0 {
        drop(status_r);
        drop(exit_r);
        let lazy = handoff.map(|(n, mine, theirs)| {
            drop(mine);
            (n, theirs)
        });
        drop(hold_w);
        let code = run_init(img, &plan, leftover, premap, fds, exit_w, lazy);
        std::process::exit(code);
    }
    sys::close(status_w);
    if let Some(fd) = hold_r {
        sys::close(fd);
    }
    if let Some(fd) = exe_fd {
        sys::close(fd);
    }
    drop(exit_w);
    // Signals sent to om-restore (which omctl became) go to the program, through its pid 1.
    sys::forward_signals(init, &FORWARDED);
    let server_sock = handoff.map(|(n, mine, theirs)| {
        sys::close(n);
        drop(theirs);
        mine
    });

    let lazy_ranges: Vec<std::ops::Range<u64>> = plan
        .chunks
        .iter()
        .filter(|c| c.lazy)
        .map(|c| {
            let v = &img.ckpt.begin.vmas[c.vma];
            v.start..v.end
        })
        .collect();
    let uffd = match &server_sock {
        Some(sock) => sys::recv_uffd(sock).map_err(RestoreError::os("receiving the userfaultfd"))?,
        None => None,
    };
    let pages_map;
    let mut server = match uffd {
        Some(u) => {
            let path = &img.pages;
            let f = File::open(path).map_err(RestoreError::os(format!("opening {}", path.display())))?;
            let len = f
                .metadata()
                .map_err(RestoreError::os("reading the pages file size"))?
                .len();
            pages_map = sys::map_file(&f, len).map_err(RestoreError::os("mapping the pages file"))?;
            Some(crate::lazy::Server::new(&img.ckpt, pages_map, &lazy_ranges, u))
        }
        None => None,
    };
    // The child has its own copy of a handed-over pages fd: this process is done with it.
    if let Some(fd) = img.pages_fd {
        sys::close(fd);
    }
    let mut committed = true;
    let running = watch(&plan, status_r, server.as_mut(), || {
        let Some(pid) = child_of(init) else {
            return true;
        };
        committed = on_running(pid);
        if let Some(w) = hold_w.take() {
            if committed {
                // The blob reads this byte and starts every thread.
                let _ = std::io::Write::write_all(&mut File::from(w), b"g");
            }
        }
        committed
    });
    let running = running.and_then(|()| committed.then_some(()).ok_or(RestoreError::NotCommitted));
    if let Err(e) = running {
        if let Some(pid) = child_of(init) {
            sys::kill(pid, libc::SIGKILL);
        }
        let _ = sys::wait_any();
        return Err(e);
    }
    // Every page is in: the pages file (for a migration, omd's image memory) is let go while the
    // program runs on.
    drop(server);
    let mut st = [0u8; 4];
    let got = File::from(exit_r).read_exact(&mut st);
    let _ = sys::wait_any();
    match got {
        Ok(()) => Ok(Ended::from_wait(i32::from_le_bytes(st))),
        Err(_) => Err(RestoreError::Vanished),
    }
}

/// Waits for the restore's outcome on the status pipe, serving lazy pages meanwhile and after,
/// until every page is in. Calls `running` once the program runs (or, held, is ready to); when it
/// returns false the watch ends there.
fn watch(
    plan: &Plan,
    status: OwnedFd,
    mut server: Option<&mut crate::lazy::Server<'_>>,
    mut running: impl FnMut() -> bool,
) -> Result<(), RestoreError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut status = Some(File::from(status));
    let mut report = Vec::new();
    loop {
        let lazy_left = server.as_ref().is_some_and(|s| !s.done());
        if status.is_none() && !lazy_left {
            return Ok(());
        }
        let (status_ready, ready) = {
            let uffds = server.as_ref().map(|s| s.fds()).unwrap_or_default();
            let mut fds: Vec<PollFd<'_>> = uffds.iter().map(|f| PollFd::new(*f, PollFlags::POLLIN)).collect();
            if let Some(st) = &status {
                fds.push(PollFd::new(st.as_fd(), PollFlags::POLLIN));
            }
            // The background fill runs whenever nothing is waiting.
            let timeout = if status.is_none() {
                PollTimeout::ZERO
            } else {
                PollTimeout::from(100u16)
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(RestoreError::os("polling")(e.into())),
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            let status_ready = status.is_some() && ready.last() == Some(&true);
            (status_ready, ready)
        };
        if let Some(s) = server.as_mut() {
            s.serve(&ready).map_err(RestoreError::Lazy)?;
        }
        if status_ready {
            let mut buf = [0u8; 4096];
            let n = status
                .as_mut()
                .map_or(0, |f| std::io::Read::read(f, &mut buf).unwrap_or(0));
            if n == 0 {
                status = None;
                if !report.is_empty() {
                    return Err(explain(plan, &report));
                }
                if !running() {
                    return Ok(());
                }
            } else {
                report.extend_from_slice(&buf[..n]);
            }
        } else if status.is_none() {
            if let Some(s) = server.as_mut() {
                s.step().map_err(RestoreError::Lazy)?;
            }
        }
    }
}

/// The program's pid as this node sees it: the one child of the namespace's pid 1.
fn child_of(init: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn explain(plan: &Plan, report: &[u8]) -> RestoreError {
    let word = |i: usize| {
        report
            .get(i * 8..i * 8 + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    match (word(0), word(1)) {
        (Some(u64::MAX), _) => RestoreError::Setup(String::from_utf8_lossy(&report[8..]).into_owned()),
        (Some(index), Some(errno)) => {
            let errno = i32::try_from(errno.wrapping_neg()).unwrap_or(0);
            RestoreError::Step {
                index,
                step: usize::try_from(index)
                    .ok()
                    .and_then(|i| plan.steps.get(i).cloned())
                    .unwrap_or_else(|| "unknown".into()),
                source: std::io::Error::from_raw_os_error(errno),
            }
        }
        _ => RestoreError::Setup(format!("garbled report {report:?}")),
    }
}

/// Pid 1 of the new namespace: mounts its /proc, creates the program with its old pid, reaps and
/// reports. Returns its own exit code.
fn run_init(
    img: &Image,
    plan: &Plan,
    leftover: Area,
    premap: Area,
    fds: BlobFds,
    exit_w: OwnedFd,
    lazy: Option<(RawFd, OwnedFd)>,
) -> i32 {
    let (status_w, exe_fd) = (fds.status, fds.exe);
    let fail = |e: RestoreError| {
        become_target::report(status_w, &e);
        127
    };
    if let Err(e) = sys::mount_own_proc() {
        return fail(RestoreError::os("mounting /proc for the new pid namespace")(e));
    }
    let pid = match sys::fork3(0, Some(img.process.pid)) {
        Ok(p) => p,
        Err(e) => return fail(RestoreError::os(format!("creating pid {}", img.process.pid))(e)),
    };
    if pid == 0 {
        drop(exit_w);
        let mut t = Target {
            ckpt: &img.ckpt,
            process: &img.process,
            fds: &img.fds,
            plan,
            leftover,
            premap,
            status_fd: status_w,
            hold_fd: fds.hold,
            session: img.session,
            pages: &img.pages,
            exe_fd,
            lazy,
            uffd_fd: None,
        };
        let e = become_target::become_target(&mut t);
        become_target::report(status_w, &e);
        om::sys::task::exit_group(127);
    }
    sys::close(status_w);
    if let Some(fd) = exe_fd {
        sys::close(fd);
    }
    if let Some(fd) = fds.hold {
        sys::close(fd);
    }
    if let Some((n, sock)) = lazy {
        sys::close(n);
        drop(sock);
    }
    // The program has its stdio; pid 1 must not keep the caller's pipes open (a detached caller
    // reads them to their end).
    sys::stdio_to_null();
    // Pid 1 of a namespace only gets the signals it handles: pass the usual ones on.
    sys::forward_signals(pid, &FORWARDED);
    loop {
        match sys::wait_any() {
            Ok((p, status)) if p == pid => {
                let mut f = File::from(exit_w);
                let _ = std::io::Write::write_all(&mut f, &status.to_le_bytes());
                return 0;
            }
            Ok(_) => {}
            Err(_) => return 1,
        }
    }
}

/// Signals that om-restore and its pid 1 pass on to the program.
pub const FORWARDED: [i32; 7] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGCONT,
];
