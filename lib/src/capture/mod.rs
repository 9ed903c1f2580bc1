//! Capture: freeze every thread of this process and write its image to a checkpoint directory.
//!
//! Runs on the runtime's control thread, inside the process. The sequence:
//!
//! 1. Preflight, nothing frozen yet: every fd and mapping must be supported ([`preflight`]), and a
//!    real-time signal that no thread blocks and no handler uses is chosen.
//! 2. Freeze: each other thread gets the signal and parks in the handler, its registers and FPU state
//!    in the signal frame on its own stack ([`crate::sys::task`]).
//! 3. The control thread signals itself and writes the image from inside its own handler, so that its
//!    frame too is on its stack: after restore it returns from that signal like every other thread.
//! 4. The handler returns. On the source the threads are released (or the process ends); in a restored
//!    copy the restorer has bumped the restore marker, and [`Restored`] says so.

pub(crate) mod preflight;
pub(crate) mod state;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use om_transport::error::chain;

use crate::dirty;
use crate::sys::arena;
use crate::sys::task::{self, Freeze};

pub use preflight::{Refusal, own_fd, preflight};
pub use state::{Snapshot, image_info, memory_map, own_ranges, snapshot};

/// Why a checkpoint failed. The process keeps running unharmed in every case.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Something the process uses cannot be captured yet.
    #[error("cannot checkpoint")]
    Refused(#[from] Refusal),
    /// No usable real-time signal.
    #[error("every real-time signal is blocked or handled by the application")]
    NoSignal,
    /// Threads released by the previous freeze have not left the checkpoint handler.
    #[error("{0} threads released by the previous checkpoint are still in its handler")]
    StillParked(u32),
    /// Every freeze caught a thread inside the mprotect tracker's fault handler.
    #[error("a thread was inside the dirty tracker's fault handler at every freeze for {ms} ms")]
    FaultInFlight {
        /// How long the freeze was tried.
        ms: u64,
    },
    /// This program's global allocator is not om's capture-aware one (only `libomrt.so` can
    /// checkpoint its process: capture allocates inside a signal handler).
    #[error("this program's allocator cannot run inside the checkpoint handler (not libomrt.so)")]
    Allocator,
    /// The capture arena could not be mapped.
    #[error("mapping the capture arena")]
    Arena(#[source] std::io::Error),
    /// Installing the signal handler failed.
    #[error("installing the checkpoint signal handler")]
    Handler(#[source] std::io::Error),
    /// Threads did not park in time.
    #[error("thread {tid} did not stop within {ms} ms (is it blocking signal {sig}?)")]
    Freeze {
        /// A thread that did not park.
        tid: u32,
        /// The signal.
        sig: i32,
        /// How long we waited.
        ms: u64,
    },
    /// The process has more threads than can be captured.
    #[error("more than {0} threads")]
    TooManyThreads(usize),
    /// Reading a file of `/proc/self` (or a file a mapping needs) failed.
    #[error("reading {what}")]
    Proc {
        /// What was read.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// `/proc/self/maps` could not be read or parsed.
    #[error("reading the memory map")]
    Maps(#[source] crate::dirty::maps::MapsError),
    /// `/proc/self/stat` has no command field.
    #[error("/proc/self/stat is malformed")]
    Stat,
    /// Reading the process's own memory failed.
    #[error("reading memory at {addr:#x}")]
    ReadMemory {
        /// Where.
        addr: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control thread could not signal itself.
    #[error("signalling the control thread")]
    SignalSelf(#[source] std::io::Error),
    /// The control thread's handler did not run the capture.
    #[error("the capture did not run in the control thread's handler")]
    NotRun,
    /// Writing the checkpoint failed.
    #[error("writing the checkpoint")]
    Write(#[source] crate::image::CheckpointError),
    /// Sending the final round of a migration failed.
    #[error("sending the final round")]
    Send(#[source] om_transport::TransportError),
    /// The dirty tracker failed in the final round.
    #[error("collecting the last dirty pages")]
    Dirty(#[source] crate::dirty::DirtyError),
}

/// What a checkpoint wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The directory.
    pub dir: PathBuf,
    /// Bytes of page data.
    pub bytes: u64,
    /// Threads captured.
    pub threads: usize,
    /// Time the threads were stopped.
    pub frozen: Duration,
}

/// The restore marker: the restorer writes the restore generation here (its address travels in the
/// process record), so that the control thread can tell a restored copy from the source. Aligned
/// to a power of two above its size, so that it never straddles a page, and so never two VMAs
/// (the restorer writes it into one premapped VMA; a build that placed it across the end of the
/// library's file-backed data made every restore of a lazily served `.bss` fail).
#[derive(Debug)]
#[repr(C, align(256))]
pub struct RestoreMarker {
    /// Bumped by each restore.
    pub generation: AtomicU64,
    /// Address of the restorer's leftover mapping (its code and plan). It is unmapped by the next
    /// checkpoint once every thread is parked: only then is no thread still on its way out of it.
    pub leftover_addr: AtomicU64,
    /// Its length.
    pub leftover_len: AtomicU64,
    /// The control socket of the omd on the node the copy was restored on (NUL-terminated; empty:
    /// unchanged). The environment the process carries names its old node's.
    pub control: [AtomicU8; CONTROL_PATH_MAX],
}

/// Room for the control socket path in the marker (a unix socket path is at most 108 bytes).
pub const CONTROL_PATH_MAX: usize = 128;
/// Bytes of the marker that the restorer writes.
pub const MARKER_LEN: u64 = 24 + CONTROL_PATH_MAX as u64;
const _: () = assert!(std::mem::offset_of!(RestoreMarker, control) == 24);
const _: () = assert!(size_of::<RestoreMarker>() as u64 >= MARKER_LEN);
const _: () = assert!(align_of::<RestoreMarker>() as u64 >= MARKER_LEN);

/// The process's marker.
pub static MARKER: RestoreMarker = RestoreMarker {
    generation: AtomicU64::new(0),
    leftover_addr: AtomicU64::new(0),
    leftover_len: AtomicU64::new(0),
    control: [const { AtomicU8::new(0) }; CONTROL_PATH_MAX],
};

impl RestoreMarker {
    /// The control socket path the restorer left, if any.
    #[must_use]
    pub fn control_path(&self) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStringExt;
        let bytes: Vec<u8> = self
            .control
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .take_while(|b| *b != 0)
            .collect();
        (!bytes.is_empty()).then(|| PathBuf::from(std::ffi::OsString::from_vec(bytes)))
    }
}

/// How a checkpoint ended, as the control thread sees it after its handler returned.
#[derive(Debug)]
pub enum Outcome {
    /// On the source: the image is written.
    Written(Summary),
    /// In a restored copy: the process was just restored from an image.
    Restored,
}

/// What the control thread does with the frozen process, inside its own handler: given the address
/// of its signal frame and when the freeze started, it takes the image somewhere (a directory, a
/// final round) and says what it took.
pub type Work = Box<dyn FnOnce(u64, Instant) -> Result<Summary, CaptureError> + Send>;

/// The job the control thread runs inside its own handler.
struct Job {
    work: Option<Work>,
    result: Option<Result<Summary, CaptureError>>,
    started: Instant,
}

static JOB: Mutex<Option<Job>> = Mutex::new(None);

fn run_job(frame: u64) {
    // The job leaves the mutex while the image is written: the mutex is part of the image, and a
    // restored copy must find it unlocked.
    let job = JOB.lock().ok().and_then(|mut g| g.take());
    let Some(mut job) = job else { return };
    arena::begin();
    let result = job.work.take().map(|w| w(frame, job.started));
    arena::end();
    let result = result.unwrap_or(Err(CaptureError::NotRun));
    job.result = Some(result);
    if let Ok(mut g) = JOB.lock() {
        *g = Some(job);
    }
}

/// Checkpoints this process into `dir`. Must run on the thread registered as the control thread.
/// Returns once the image is written (the threads are released again unless `leave_frozen`), or, in
/// a restored copy, once it runs again.
///
/// # Errors
/// [`CaptureError`]; the process continues unharmed.
pub fn checkpoint(dir: &Path, leave_frozen: bool) -> Result<Outcome, CaptureError> {
    check()?;
    let dir = dir.to_path_buf();
    match freeze_and_run(Box::new(move |frame, started| {
        state::write_image(&dir, frame, started)
    }))? {
        Captured::Restored => Ok(Outcome::Restored),
        Captured::Source(summary, frozen) => {
            if !leave_frozen {
                frozen.release();
            } else {
                std::mem::forget(frozen);
            }
            Ok(Outcome::Written(summary))
        }
    }
}

/// Everything that must hold before a capture can start: no lazy restore still running, no
/// resource that cannot be captured, the capture-aware allocator.
///
/// # Errors
/// The first reason the process cannot be captured now.
pub fn check() -> Result<(), CaptureError> {
    preflight::wait_restored(RESTORE_WAIT)?;
    preflight()?;
    if !arena::installed() {
        return Err(CaptureError::Allocator);
    }
    Ok(())
}

/// The process, stopped: every thread but the control thread is parked in the checkpoint handler.
/// Dropping it (or [`Frozen::release`]) lets them go on; a migrated source ends with
/// [`Frozen::exit`] instead, without running another instruction of the application.
#[derive(Debug)]
pub struct Frozen {
    sig: i32,
    old: task::KernelSigaction,
    released: bool,
}

impl Frozen {
    /// Releases the threads and puts the signal's disposition back.
    pub fn release(mut self) {
        self.let_go();
    }

    fn let_go(&mut self) {
        if !self.released {
            self.released = true;
            release(Freeze::get());
            let _ = task::restore_disposition(self.sig, &self.old);
        }
    }

    /// Ends the process with its threads still parked.
    pub fn exit(self, code: i32) -> ! {
        task::exit_group(code)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.let_go();
    }
}

/// How a capture ended, as the control thread sees it after its handler returned.
#[derive(Debug)]
pub enum Captured {
    /// On the source: `work` ran, and the process is still stopped.
    Source(Summary, Frozen),
    /// In a restored copy: the process was just restored from what `work` took.
    Restored,
}

/// Stops every thread and runs `work` inside the control thread's own signal handler (so that its
/// frame is on its stack, like every other thread's). Call [`check`] first. Must run on the
/// control thread.
///
/// # Errors
/// [`CaptureError`] (the work's own, or the freeze's); the threads are released and the process
/// continues unharmed.
pub fn freeze_and_run(work: Work) -> Result<Captured, CaptureError> {
    arena::prepare().map_err(CaptureError::Arena)?;
    let (f, sig, old) = claim_the_freeze(run_job as fn(u64) as usize)?;
    // A child process would not exist in a restored copy: wait for the process to have none, and
    // freeze again if one was forked meanwhile.
    let deadline = Instant::now() + CHILD_WAIT;
    let (started, generation) = loop {
        if let Err(e) = preflight::wait_childless(deadline.saturating_duration_since(Instant::now())) {
            let _ = task::restore_disposition(sig, &old);
            return Err(e.into());
        }
        let started = Instant::now();
        let generation = MARKER.generation.load(Ordering::Acquire);
        if let Err(e) = freeze(f, sig) {
            release(f);
            let _ = task::restore_disposition(sig, &old);
            return Err(e);
        }
        if preflight::children().is_empty() {
            break (started, generation);
        }
        release(f);
        if let Err(e) = wait_unparked(f) {
            let _ = task::restore_disposition(sig, &old);
            return Err(e);
        }
    };
    // Every thread is parked in the handler, so none still runs the last instructions of a
    // previous restore: its leftover can go, and stays out of this image.
    unmap_leftover();
    *JOB.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Job {
        work: Some(work),
        result: None,
        started,
    });
    // The image is written inside this call, in the handler, on this thread's stack. The runtime's
    // thread blocks every signal but this one, for this moment.
    task::mask_signal(sig, false);
    let raised = task::tgkill(std::process::id(), task::gettid(), sig);
    task::mask_signal(sig, true);
    let job = JOB.lock().ok().and_then(|mut g| g.take());
    if MARKER.generation.load(Ordering::Acquire) != generation {
        // A restored copy. Its arena was left out of the image and the capture that was running
        // when it was taken is over: nothing may allocate before this line. The restorer resumed
        // every thread straight from its signal frame, so none of them is parked any more.
        arena::forget();
        f.parked.store(0, Ordering::Release);
        let _ = task::restore_disposition(sig, &old);
        return Ok(Captured::Restored);
    }
    let result = match (raised, job.and_then(|j| j.result)) {
        (Err(e), _) => Err(CaptureError::SignalSelf(e)),
        (Ok(()), Some(r)) => r,
        (Ok(()), None) => Err(CaptureError::NotRun),
    };
    let frozen = Frozen {
        sig,
        old,
        released: false,
    };
    match result {
        Ok(summary) => Ok(Captured::Source(summary, frozen)),
        Err(e) => {
            drop(frozen);
            tracing::warn!(error = %chain(&e), "capture failed; the process continues");
            Err(e)
        }
    }
}

/// Runs `work` on the calling (control) thread while every other thread is parked in the checkpoint
/// handler, then lets them go: for a step that must not race with the application, such as a
/// soft-dirty round (reading the bits and clearing them are two system calls). Nothing is captured
/// and no child-process rule applies. Every other thread must take the signal: stop the runtime's
/// own threads (the throttle) first.
///
/// # Errors
/// [`CaptureError`] of the freeze; `work` has not run and the threads run on.
pub fn paused<T>(work: impl FnOnce() -> T) -> Result<T, CaptureError> {
    let (f, sig, old) = claim_the_freeze(0)?;
    // Releases the threads and puts the disposition back on every way out.
    let _parked = Frozen {
        sig,
        old,
        released: false,
    };
    freeze(f, sig)?;
    Ok(work())
}

/// The start of every freeze: chooses the signal, makes the calling thread the control thread
/// (whose handler runs `on_control`, a `fn(u64)` as an address, or nothing for 0), waits for
/// threads of an earlier freeze to leave the handler, and installs it. Returns the freeze state,
/// the signal and its old disposition (the caller puts it back).
fn claim_the_freeze(
    on_control: usize,
) -> Result<(&'static Freeze, i32, task::KernelSigaction), CaptureError> {
    // A runtime thread that has just ended (the throttle's, joined a moment ago) can still be
    // listed, with its mask that blocks every signal, until the kernel has reaped it.
    let deadline = Instant::now() + Duration::from_millis(100);
    let sig = loop {
        match preflight::choose_signal() {
            Some(s) => break s,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            None => return Err(CaptureError::NoSignal),
        }
    };
    let f = Freeze::get();
    f.control_tid.store(task::gettid(), Ordering::Release);
    f.on_control.store(on_control, Ordering::Release);
    wait_unparked(f)?;
    let old = task::install_checkpoint_handler(sig).map_err(CaptureError::Handler)?;
    Ok((f, sig, old))
}

/// Lets threads released by an earlier freeze leave the handler (on their own time), then clears
/// the slots. The count is never forced to zero: a late thread would take it below zero and make the
/// next freeze believe everyone parked.
fn wait_unparked(f: &Freeze) -> Result<(), CaptureError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    while f.parked.load(Ordering::Acquire) != 0 {
        if Instant::now() > deadline {
            return Err(CaptureError::StillParked(f.parked.load(Ordering::Acquire)));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f.next.store(0, Ordering::Release);
    for s in &*f.slots {
        s.tid.store(0, Ordering::Release);
    }
    Ok(())
}

/// How long a checkpoint waits for the process to have no child processes.
const CHILD_WAIT: Duration = Duration::from_secs(10);

/// How long a checkpoint waits for a lazy restore of this process to finish.
const RESTORE_WAIT: Duration = Duration::from_secs(120);

/// How long every thread has to park.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

fn release(f: &Freeze) {
    f.release.fetch_add(1, Ordering::AcqRel);
    task::futex_wake_all(&f.release);
}

/// Signals every other thread until all are parked, none of them inside the mprotect tracker's
/// fault handler.
///
/// That handler runs with signals open, so the freeze signal can park a thread halfway through it,
/// and every collect and stop of the tracker waits for the handler to finish: a collect under the
/// freeze (the final round's) would wait forever. Such a freeze is let go and taken again, after
/// the thread has finished its fault.
fn freeze(f: &Freeze, sig: i32) -> Result<(), CaptureError> {
    let deadline = Instant::now() + FREEZE_TIMEOUT;
    loop {
        park_all(f, sig, deadline)?;
        if !dirty::fault_handler_running() {
            return Ok(());
        }
        release(f);
        wait_unparked(f)?;
        if Instant::now() > deadline {
            return Err(CaptureError::FaultInFlight {
                ms: u64::try_from(FREEZE_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
            });
        }
        std::thread::yield_now();
    }
}

/// Signals every other thread until all are parked. Threads created meanwhile are caught by listing
/// again until the set is stable.
fn park_all(f: &Freeze, sig: i32, deadline: Instant) -> Result<(), CaptureError> {
    let me = task::gettid();
    let pid = std::process::id();
    let mut signalled = std::collections::BTreeSet::new();
    loop {
        let tasks = state::list_tasks().map_err(|source| CaptureError::Proc {
            what: "/proc/self/task".into(),
            source,
        })?;
        let fresh: Vec<u32> = tasks
            .into_iter()
            .filter(|t| *t != me && !signalled.contains(t))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        for t in fresh {
            if signalled.len() + 1 >= task::MAX_THREADS {
                return Err(CaptureError::TooManyThreads(task::MAX_THREADS));
            }
            // A thread that exits meanwhile is simply gone (ESRCH).
            if task::tgkill(pid, t, sig).is_ok() {
                signalled.insert(t);
            }
        }
        loop {
            let parked = f.parked.load(Ordering::Acquire);
            if parked as usize >= signalled.len() {
                break;
            }
            if Instant::now() > deadline {
                let done: std::collections::BTreeSet<u32> = f
                    .slots
                    .iter()
                    .map(|s| s.tid.load(Ordering::Acquire))
                    .filter(|t| *t != 0)
                    .collect();
                // A thread that exited after the signal never parks; anything else is stuck.
                let alive = state::list_tasks().unwrap_or_default();
                let stuck = signalled.iter().find(|t| !done.contains(t) && alive.contains(t));
                match stuck {
                    Some(&tid) => {
                        return Err(CaptureError::Freeze {
                            tid,
                            sig,
                            ms: u64::try_from(FREEZE_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
                        });
                    }
                    None => {
                        signalled.retain(|t| alive.contains(t));
                        break;
                    }
                }
            }
            task::futex_wait(&f.parked, parked, Some(10));
        }
    }
}

/// Unmaps what the restorer left behind (its code and plan).
fn unmap_leftover() {
    let addr = MARKER.leftover_addr.swap(0, Ordering::AcqRel);
    let len = MARKER.leftover_len.swap(0, Ordering::AcqRel);
    if addr != 0 && len != 0 {
        task::unmap_restorer_leftover(addr, len);
    }
}
