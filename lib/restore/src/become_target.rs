//! The new process turns itself into the image: premap and fill every VMA, restore fds, the
//! working directory and signal dispositions, lay the blob out and jump into it.
//!
//! Runs in the process that already has the image's pid (in its own pid namespace), forked from
//! the restorer, single-threaded, every signal blocked. Any failure is reported on the status fd
//! and ends this process; the restorer then says what failed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use om::image::Checkpoint;
use om::image::records::{FdKind, FdRecord, ProcessRecord};
use om_transport::wire::Vma;

use crate::error::RestoreError;
use crate::plan::{ChunkKind, Plan};
use crate::sys::{self, Area};

/// What the new process needs.
#[derive(Debug)]
pub struct Target<'a> {
    /// The checkpoint.
    pub ckpt: &'a Checkpoint,
    /// The process record.
    pub process: &'a ProcessRecord,
    /// The fd records.
    pub fds: &'a [FdRecord],
    /// The plan.
    pub plan: &'a Plan,
    /// The reserved leftover area.
    pub leftover: Area,
    /// The reserved premap area.
    pub premap: Area,
    /// The status fd (already at its planned number).
    pub status_fd: RawFd,
    /// The hold fd of a migration (already at its planned number).
    pub hold_fd: Option<RawFd>,
    /// A session of its own (see [`crate::Image::session`]).
    pub session: bool,
    /// The pages file.
    pub pages: &'a std::path::Path,
    /// The exe fd, if any (already at its planned number).
    pub exe_fd: Option<RawFd>,
    /// For a lazy restore: the planned userfaultfd number and the socket that hands it to the
    /// restorer.
    pub lazy: Option<(RawFd, std::os::fd::OwnedFd)>,
    /// The userfaultfd once placed (kept open for the blob, which closes it).
    pub uffd_fd: Option<RawFd>,
}

/// Becomes the image. Returns only on failure.
pub fn become_target(t: &mut Target<'_>) -> RestoreError {
    if let Err(e) = prepare(t) {
        return e;
    }
    om::sys::task::rseq_unregister_self();
    match t.leftover.enter_blob(t.plan.ops, t.plan.stack_top, t.status_fd) {
        Err(e) => RestoreError::os("entering the restore blob")(e),
        Ok(never) => match never {},
    }
}

fn prot_of(v: &Vma) -> i32 {
    i32::try_from(v.prot).unwrap_or(0) & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC)
}

fn prepare(t: &mut Target<'_>) -> Result<(), RestoreError> {
    let plan = t.plan;
    sys::block_all_signals();
    if t.session {
        sys::new_session().map_err(RestoreError::os("starting a session with the terminal"))?;
    }
    let vmas = &t.ckpt.begin.vmas;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // The leftover area: fresh read-write memory over the reservation.
    t.leftover
        .map(
            plan.leftover.start,
            plan.leftover.end - plan.leftover.start,
            rw,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
        .map_err(RestoreError::os("mapping the restorer's leftover area"))?;

    // Premap every VMA.
    let mut files: BTreeMap<(String, bool), File> = BTreeMap::new();
    for c in &plan.chunks {
        let v = &vmas[c.vma];
        let name = String::from_utf8_lossy(&v.name).into_owned();
        let (prot, flags, fd) =
            match c.kind {
                ChunkKind::Anon => (rw, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
                ChunkKind::Stack => (
                    rw,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN,
                    -1,
                ),
                ChunkKind::PrivateFile | ChunkKind::SharedFile => {
                    let shared = c.kind == ChunkKind::SharedFile;
                    let write = shared && prot_of(v) & libc::PROT_WRITE != 0;
                    let key = (name.clone(), write);
                    if !files.contains_key(&key) {
                        let f = OpenOptions::new().read(true).write(write).open(&name).map_err(
                            RestoreError::os(format!("opening {name}, which the process maps")),
                        )?;
                        files.insert(key.clone(), f);
                    }
                    let fd = files.get(&key).map_or(-1, AsRawFd::as_raw_fd);
                    if shared {
                        (prot_of(v), libc::MAP_SHARED, fd)
                    } else {
                        (rw, libc::MAP_PRIVATE, fd)
                    }
                }
            };
        t.premap
            .map(c.at, v.len(), prot, flags, fd, v.pgoff)
            .map_err(RestoreError::os(format!(
                "premapping {:#x}..{:#x} {name}",
                v.start, v.end
            )))?;
    }
    drop(files);

    fill(t)?;
    mark(t)?;
    for c in &plan.chunks {
        let v = &vmas[c.vma];
        if c.kind != ChunkKind::SharedFile {
            t.premap
                .protect(c.at, v.len(), prot_of(v))
                .map_err(RestoreError::os(format!(
                    "protecting {:#x}..{:#x}",
                    v.start, v.end
                )))?;
        }
    }
    if let Some((n, sock)) = t.lazy.take() {
        // The userfaultfd belongs to this process's memory; the restorer serves it.
        let uffd = sys::lazy_uffd().map_err(RestoreError::os("opening a userfaultfd for lazy pages"))?;
        sys::dup_onto(uffd.as_raw_fd(), n, true).map_err(RestoreError::os("placing the userfaultfd"))?;
        drop(uffd);
        sys::send_fd(&sock, n).map_err(RestoreError::os("handing the userfaultfd to the restorer"))?;
        drop(sock);
        t.uffd_fd = Some(n);
    }
    restore_fds(t)?;
    let p = t.process;
    std::env::set_current_dir(&p.cwd).map_err(RestoreError::os(format!("entering {}", p.cwd)))?;
    sys::set_umask(p.umask);
    sys::set_personality(p.personality);
    restore_sigactions(p)?;
    for (r, (soft, hard)) in p.rlimits.iter().enumerate() {
        let r = u32::try_from(r).unwrap_or(u32::MAX);
        if sys::setrlimit(r, *soft, *hard).is_err() {
            // Raising a hard limit needs privilege: keep the highest we may.
            let mut cur = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            om::sys::task::getrlimit(r as usize, &mut cur);
            let _ = sys::setrlimit(r, (*soft).min(cur.rlim_max), (*hard).min(cur.rlim_max));
        }
    }
    // Interval timers last: they run from here on, and their signals wait (blocked) for the image.
    // A periodic ITIMER_REAL whose signal is pending reads as value 0: the kernel re-arms it only
    // when the signal is taken. Arm it one interval ahead (its pending signal is raised again).
    for (which, &(interval, value)) in p.itimers.iter().enumerate() {
        let value = if value == 0 { interval } else { value };
        if value != 0 {
            om::sys::task::setitimer(i32::try_from(which).unwrap_or(0), interval, value)
                .map_err(RestoreError::os(format!("setting interval timer {which}")))?;
        }
    }
    // The blob: code, ops and data, then the code made executable.
    t.leftover
        .write(plan.leftover.start, &plan.image)
        .map_err(RestoreError::os("copying the restore blob"))?;
    t.leftover
        .protect(
            plan.leftover.start,
            plan.code_len,
            libc::PROT_READ | libc::PROT_EXEC,
        )
        .map_err(RestoreError::os("making the blob executable"))?;
    Ok(())
}

/// Reads every data page straight into its premapped place, then checks its checksum there (when
/// the manifest has checksums).
fn fill(t: &mut Target<'_>) -> Result<(), RestoreError> {
    let ckpt = t.ckpt;
    let page = ckpt.page_size;
    let path = t.pages;
    let pages = File::open(path).map_err(RestoreError::os(format!("opening {}", path.display())))?;
    for seg in ckpt.segments() {
        let (addr, end) = (seg.addr.start, seg.addr.end);
        let private = seg
            .vma
            .filter(|&i| ckpt.begin.vmas[i].flags & om::image::vma_flags::SHARED == 0);
        let Some(i) = private else {
            return Err(RestoreError::Setup(format!(
                "page data at {addr:#x} lies outside private memory"
            )));
        };
        if t.plan.chunks[i].lazy {
            continue; // served on demand once the process runs
        }
        let at = t
            .plan
            .premap_of(addr)
            .ok_or_else(|| RestoreError::Setup(format!("no premap for {addr:#x}")))?;
        t.premap
            .pread(pages.as_raw_fd(), at, end - addr, seg.offset)
            .map_err(RestoreError::os(format!(
                "reading the pages of {addr:#x}..{end:#x}"
            )))?;
        if ckpt.sums.is_empty() {
            continue; // checked by whoever handed the pages over (see `Checkpoint::sums`)
        }
        for (k, a) in (addr..end)
            .step_by(usize::try_from(page).unwrap_or(4096))
            .enumerate()
        {
            let got = t
                .premap
                .page_sum(at + (a - addr), page)
                .map_err(RestoreError::os("checking a page"))?;
            if ckpt.sums.get(seg.first_sum + k) != Some(&got) {
                return Err(RestoreError::PageChecksum {
                    path: path.to_path_buf(),
                    addr: a,
                });
            }
        }
    }
    Ok(())
}

/// Bumps the restore marker's generation and names the leftover area for the runtime.
fn mark(t: &mut Target<'_>) -> Result<(), RestoreError> {
    let m = t.process.restore_marker;
    let at = t
        .plan
        .premap_of(m)
        .ok_or_else(|| RestoreError::Setup(format!("the restore marker {m:#x} is not mapped")))?;
    // The plan checked that the marker lies in private writable memory of the image.
    let generation = u64::from_le_bytes(
        t.premap
            .read::<8>(at)
            .map_err(RestoreError::os("reading the marker"))?,
    ) + 1;
    let mut words = generation.to_le_bytes().to_vec();
    words.extend_from_slice(&t.plan.leftover.start.to_le_bytes());
    words.extend_from_slice(&(t.plan.leftover.end - t.plan.leftover.start).to_le_bytes());
    // The omd of this node, for the runtime to register with. A version-1 image comes from a
    // runtime whose marker ends after the 24 bytes above.
    if t.ckpt.version >= 2 {
        let control = om::control::resolve_socket_path(None);
        let mut path = [0u8; om::capture::CONTROL_PATH_MAX];
        let p = control.as_os_str().as_encoded_bytes();
        if p.len() < path.len() {
            path[..p.len()].copy_from_slice(p);
        }
        words.extend_from_slice(&path);
    }
    t.premap
        .write(at, &words)
        .map_err(RestoreError::os("writing the marker"))
}

const REOPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_LARGEFILE;

fn open_fd(r: &FdRecord) -> Result<Option<File>, RestoreError> {
    let flags = i32::try_from(r.flags).unwrap_or(0);
    let acc = flags & libc::O_ACCMODE;
    let ctx = |what: &str| format!("fd {}: {what} {}", r.fd, r.path);
    let open = |path: &str, flags: i32| -> Result<File, RestoreError> {
        OpenOptions::new()
            .read(acc != libc::O_WRONLY)
            .write(acc != libc::O_RDONLY)
            .custom_flags(flags & REOPEN_FLAGS & !libc::O_ACCMODE)
            .open(path)
            .map_err(RestoreError::os(ctx("reopening")))
    };
    Ok(Some(match r.kind {
        FdKind::Stdio => return Ok(None),
        FdKind::DevNull => open("/dev/null", flags)?,
        FdKind::DevZero => open("/dev/zero", flags)?,
        FdKind::URandom => open("/dev/urandom", flags)?,
        FdKind::File => {
            let mut f = open(&r.path, flags)?;
            f.seek(SeekFrom::Start(r.offset))
                .map_err(RestoreError::os(ctx("seeking in")))?;
            f
        }
        FdKind::Deleted => {
            let name = r.path.trim_end_matches(" (deleted)");
            let dir = std::path::Path::new(name)
                .parent()
                .unwrap_or(std::path::Path::new("/tmp"));
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .open(dir)
                .or_else(|_| {
                    nix::sys::memfd::memfd_create(c"om-deleted", nix::sys::memfd::MFdFlags::empty())
                        .map(File::from)
                        .map_err(std::io::Error::from)
                })
                .map_err(RestoreError::os(ctx("recreating the deleted file")))?;
            f.write_all(&r.content)
                .map_err(RestoreError::os(ctx("writing the deleted file")))?;
            f.seek(SeekFrom::Start(r.offset))
                .map_err(RestoreError::os(ctx("seeking in")))?;
            f
        }
    }))
}

/// Puts every fd of the image at its number and closes everything else but the status and exe
/// fds.
fn restore_fds(t: &Target<'_>) -> Result<(), RestoreError> {
    let mut keep: Vec<RawFd> = vec![t.status_fd];
    keep.extend(t.exe_fd);
    keep.extend(t.hold_fd);
    keep.extend(t.uffd_fd);
    for r in t.fds {
        let n = RawFd::try_from(r.fd).unwrap_or(-1);
        let cloexec = r.flags & libc::O_CLOEXEC as u32 != 0;
        match open_fd(r)? {
            Some(f) => {
                let fd = f.into_raw_fd();
                sys::dup_onto(fd, n, cloexec).map_err(RestoreError::os(format!("placing fd {n}")))?;
                if fd != n {
                    sys::close(fd);
                }
            }
            None => {
                // Stdio: the restorer's own, unless it has none there.
                if sys::set_cloexec(n, cloexec).is_err() {
                    let f = File::options()
                        .read(true)
                        .write(true)
                        .open("/dev/null")
                        .map_err(RestoreError::os("opening /dev/null"))?;
                    let fd = f.into_raw_fd();
                    sys::dup_onto(fd, n, cloexec).map_err(RestoreError::os(format!("placing fd {n}")))?;
                    if fd != n {
                        sys::close(fd);
                    }
                }
            }
        }
        keep.push(n);
    }
    let open = om::sys::task::numeric_entries(c"/proc/self/fd")
        .map_err(RestoreError::os("listing /proc/self/fd"))?;
    for fd in open {
        let fd = RawFd::try_from(fd).unwrap_or(-1);
        if !keep.contains(&fd) {
            sys::close(fd);
        }
    }
    Ok(())
}

fn restore_sigactions(p: &ProcessRecord) -> Result<(), RestoreError> {
    for sig in 1..=64u32 {
        if sig == libc::SIGKILL as u32 || sig == libc::SIGSTOP as u32 {
            continue;
        }
        let (handler, flags, restorer, mask) = p
            .sigactions
            .iter()
            .find(|a| a.signo == sig)
            .map_or((0, 0, 0, 0), |a| (a.handler, a.flags, a.restorer, a.mask));
        sys::set_raw_sigaction(sig, handler, flags, restorer, mask).map_err(RestoreError::os(format!(
            "setting the disposition of signal {sig}"
        )))?;
    }
    Ok(())
}

/// Reports a failure of this process on the status fd (as `u64::MAX` and the message).
pub fn report(status_fd: RawFd, e: &RestoreError) {
    let mut msg = u64::MAX.to_le_bytes().to_vec();
    msg.extend_from_slice(om_transport::error::chain(e).as_bytes());
    sys::write_fd(status_fd, &msg);
}
