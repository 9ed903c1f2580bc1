//! The C ABI (`om.h`, generated from this module by cbindgen): the crate's only `unsafe` code.
//!
//! Every function returns an [`OmResult`]; `OM_OK` is 0. A failure leaves a message for this
//! thread that [`om_last_error`] returns. Every body runs behind a panic boundary (a panic becomes
//! `OM_ERR_PANIC`, never an unwind into C). Null pointers where a value is required are
//! `OM_ERR_INVALID_ARGUMENT`, not a crash.
//!
//! # References
//! rustls-ffi's conventions (numeric results, panic boundary, committed header checked in CI).

use std::cell::RefCell;
use std::ffi::{CStr, CString, OsString, c_char};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use crate::{Job, LaunchError, Launcher, MigrateOptions, Migration, Transport};

/// The result of every om call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OmResult {
    /// Success.
    OmOk = 0,
    /// A null or malformed argument.
    OmErrInvalidArgument = 1,
    /// omd's control socket could not be reached.
    OmErrNoOmd = 2,
    /// The program could not be started or did not register with omd.
    OmErrStart = 3,
    /// omd or the process refused the request (the process continues where it was).
    OmErrRefused = 4,
    /// Waiting for the program failed.
    OmErrWait = 5,
    /// A panic inside om (a bug): nothing was changed by the call.
    OmErrPanic = 6,
}

/// How a migration's pages travel.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OmTransport {
    /// TCP (what [`om_migrate`] uses).
    OmTransportTcp = 0,
    /// Dolphin SCI: both nodes need a SISCI library (see docs/sci.md).
    OmTransportSci = 1,
    /// InfiniBand/RoCE verbs: both nodes need libibverbs and an RDMA port (see docs/verbs.md).
    OmTransportVerbs = 2,
}

/// [`OmMigrateOptions::flags`]: everything while the process is stopped, no pre-copy rounds.
pub const OM_MIGRATE_STOP_AND_COPY: u32 = 1;
/// [`OmMigrateOptions::flags`]: throttle the process while it dirties memory faster than the pages
/// travel (pre-copy only).
pub const OM_MIGRATE_AUTO_CONVERGE: u32 = 2;

/// The options of [`om_migrate_with`] (`omctl migrate`'s); zero-initialised means the defaults
/// over TCP.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OmMigrateOptions {
    /// The acceptable freeze in milliseconds (0: the default, 50).
    pub downtime_ms: u32,
    /// The most pre-copy rounds (0: the default, 30).
    pub max_rounds: u32,
    /// How the pages travel: an `om_transport` value (a plain integer here, so that a value this
    /// library does not know is an invalid argument, not undefined behaviour).
    pub transport: u32,
    /// `OM_MIGRATE_*` bits; unknown bits are an invalid argument.
    pub flags: u32,
}

/// A program started by [`om_start`].
#[derive(Debug)]
pub struct OmJob {
    job: Job,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn fail(e: &LaunchError) -> OmResult {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    set_error(&msg);
    match e {
        LaunchError::Invalid(_) => OmResult::OmErrInvalidArgument,
        LaunchError::Control { .. } => OmResult::OmErrNoOmd,
        LaunchError::Start { .. } | LaunchError::NotRegistered(_) => OmResult::OmErrStart,
        LaunchError::Refused(_) => OmResult::OmErrRefused,
        LaunchError::Wait(_) => OmResult::OmErrWait,
    }
}

fn boundary(f: impl FnOnce() -> OmResult) -> OmResult {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        set_error("internal error (panic) in om");
        OmResult::OmErrPanic
    })
}

fn invalid(what: &str) -> OmResult {
    set_error(&format!("invalid argument: {what}"));
    OmResult::OmErrInvalidArgument
}

/// A nullable C string as a path.
///
/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn opt_path(p: *const c_char) -> Option<PathBuf> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null, and NUL-terminated and valid per the caller's contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes().to_vec();
    Some(PathBuf::from(OsString::from_vec(bytes)))
}

/// The message of the last failed om call on this thread (empty if none). Valid until the next om
/// call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn om_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Starts `argv` (a NULL-terminated array, `argv[0]` the program) under omrun, talking to the omd
/// at `control` (NULL: `OM_CONTROL` or the default), with this process's stdio. On success `*out`
/// is the job; free it with [`om_wait`] or [`om_job_free`].
///
/// # Safety
/// `control` is NULL or a NUL-terminated string; `argv` is a NULL-terminated array of
/// NUL-terminated strings; `out` is a valid pointer to write to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn om_start(
    control: *const c_char,
    argv: *const *const c_char,
    out: *mut *mut OmJob,
) -> OmResult {
    boundary(|| {
        if argv.is_null() || out.is_null() {
            return invalid("argv and out must not be NULL");
        }
        let mut args = Vec::new();
        let mut i = 0;
        loop {
            // SAFETY: argv is a NULL-terminated array (the caller's contract) and we stop at its NULL,
            // so entry `i` is inside it.
            let slot = unsafe { argv.add(i) };
            // SAFETY: `slot` points at a readable entry of the array (above).
            let a = unsafe { *slot };
            if a.is_null() {
                break;
            }
            // SAFETY: each entry is a NUL-terminated string (the caller's contract).
            args.push(OsString::from_vec(
                unsafe { CStr::from_ptr(a) }.to_bytes().to_vec(),
            ));
            i += 1;
        }
        // SAFETY: the caller's contract on `control`.
        let control = unsafe { opt_path(control) };
        match Launcher::new(control.as_deref()).start(&args) {
            Ok(job) => {
                // SAFETY: `out` is non-null and writable (checked above, and the caller's contract).
                unsafe { *out = Box::into_raw(Box::new(OmJob { job })) };
                OmResult::OmOk
            }
            Err(e) => fail(&e),
        }
    })
}

/// The pid of the job's program on this node (0 for NULL).
///
/// # Safety
/// `job` is NULL or a job from [`om_start`] not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn om_job_pid(job: *const OmJob) -> u32 {
    // SAFETY: null or a live job (the caller's contract).
    unsafe { job.as_ref() }.map_or(0, |j| j.job.pid())
}

/// Migrates process `pid` of this node to the omd at `to` (`"IP:PORT"`) over TCP, through the omd
/// at `control` (NULL: the default). `downtime_ms` and `max_rounds` are `omctl migrate`'s options
/// (0: the defaults). On success `*out` (if not NULL) holds the report.
///
/// # Safety
/// `control` is NULL or a NUL-terminated string, `to` a NUL-terminated string, `out` NULL or valid
/// to write to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn om_migrate(
    control: *const c_char,
    pid: u32,
    to: *const c_char,
    downtime_ms: u32,
    max_rounds: u32,
    out: *mut Migration,
) -> OmResult {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        om_migrate_over(
            control,
            pid,
            to,
            downtime_ms,
            max_rounds,
            OmTransport::OmTransportTcp,
            out,
        )
    }
}

/// [`om_migrate`] with the pages over `transport`.
///
/// # Safety
/// As [`om_migrate`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn om_migrate_over(
    control: *const c_char,
    pid: u32,
    to: *const c_char,
    downtime_ms: u32,
    max_rounds: u32,
    transport: OmTransport,
    out: *mut Migration,
) -> OmResult {
    let opts = OmMigrateOptions {
        downtime_ms,
        max_rounds,
        transport: transport as u32,
        flags: 0,
    };
    // SAFETY: the caller's contract, passed on; `opts` lives for the call.
    unsafe { om_migrate_with(control, pid, to, &raw const opts, out) }
}

/// [`om_migrate`] with every option: `opts` (NULL: the defaults over TCP).
///
/// # Safety
/// As [`om_migrate`]; `opts` is NULL or valid to read.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn om_migrate_with(
    control: *const c_char,
    pid: u32,
    to: *const c_char,
    opts: *const OmMigrateOptions,
    out: *mut Migration,
) -> OmResult {
    boundary(|| {
        if to.is_null() {
            return invalid("to must not be NULL");
        }
        // SAFETY: non-null and NUL-terminated (the caller's contract).
        let Ok(to) = unsafe { CStr::from_ptr(to) }.to_string_lossy().parse() else {
            return invalid("to is not IP:PORT");
        };
        // SAFETY: null or valid to read (the caller's contract).
        let given = unsafe { opts.as_ref() }.copied().unwrap_or(OmMigrateOptions {
            downtime_ms: 0,
            max_rounds: 0,
            transport: OmTransport::OmTransportTcp as u32,
            flags: 0,
        });
        let transport = [
            (OmTransport::OmTransportTcp, Transport::Tcp),
            (OmTransport::OmTransportSci, Transport::Sci),
            (OmTransport::OmTransportVerbs, Transport::Verbs),
        ]
        .into_iter()
        .find(|(c, _)| *c as u32 == given.transport);
        let Some((_, transport)) = transport else {
            return invalid("unknown transport");
        };
        if given.flags & !(OM_MIGRATE_STOP_AND_COPY | OM_MIGRATE_AUTO_CONVERGE) != 0 {
            return invalid("unknown bits in flags");
        }
        let mut opts = MigrateOptions {
            transport,
            stop_and_copy: given.flags & OM_MIGRATE_STOP_AND_COPY != 0,
            auto_converge: given.flags & OM_MIGRATE_AUTO_CONVERGE != 0,
            ..MigrateOptions::default()
        };
        if opts.stop_and_copy && opts.auto_converge {
            return invalid("auto-converge throttles pre-copy rounds; stop-and-copy has none");
        }
        if given.downtime_ms > 0 {
            opts.downtime_ms = given.downtime_ms;
        }
        if given.max_rounds > 0 {
            opts.max_rounds = given.max_rounds;
        }
        // SAFETY: the caller's contract on `control`.
        let control = unsafe { opt_path(control) };
        match Launcher::new(control.as_deref()).migrate(pid, to, &opts) {
            Ok(m) => {
                if !out.is_null() {
                    // SAFETY: non-null and writable (the caller's contract).
                    unsafe { *out = m };
                }
                OmResult::OmOk
            }
            Err(e) => fail(&e),
        }
    })
}

/// Waits for the job's program to end wherever it runs, stores its wait status (as `waitpid`
/// gives it: `WIFEXITED`/`WEXITSTATUS`/`WIFSIGNALED`/`WTERMSIG` apply) in `*status` (if not NULL),
/// and frees the job.
///
/// # Safety
/// `job` is a job from [`om_start`] not yet freed (it is freed by this call); `status` is NULL or
/// valid to write to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn om_wait(job: *mut OmJob, status: *mut i32) -> OmResult {
    boundary(|| {
        if job.is_null() {
            return invalid("job must not be NULL");
        }
        // SAFETY: a live job from om_start (the caller's contract); ownership comes back here.
        let job = unsafe { Box::from_raw(job) };
        match job.job.wait() {
            Ok(st) => {
                if !status.is_null() {
                    // SAFETY: non-null and writable (the caller's contract).
                    unsafe { *status = st.into_raw() };
                }
                OmResult::OmOk
            }
            Err(e) => fail(&e),
        }
    })
}

/// Frees a job without waiting (its program runs on; omrun is not waited for).
///
/// # Safety
/// `job` is NULL or a job from [`om_start`] not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn om_job_free(job: *mut OmJob) {
    if !job.is_null() {
        // SAFETY: a live job from om_start (the caller's contract).
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(job) })));
    }
}
