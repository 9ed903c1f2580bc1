//! Threads and signals at the level capture needs: raw syscalls, the checkpoint signal's handler and
//! the slots where each parked thread leaves what its signal frame does not hold.
//!
//! # References
//! `tgkill(2)`, `futex(2)`, `arch_prctl(2)`, `get_robust_list(2)`, `prctl(2)` (`PR_GET_TID_ADDRESS`),
//! `sigaltstack(2)`, `rt_sigaction(2)`, `rseq(2)`; glibc's `__rseq_offset` / `__rseq_size`.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// The kernel's `struct sigaction` on x86_64 (what the raw syscall takes, not glibc's).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelSigaction {
    /// Handler, `SIG_DFL` (0) or `SIG_IGN` (1).
    pub handler: u64,
    /// `SA_*`.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// Blocked during the handler.
    pub mask: u64,
}
const _: () = assert!(size_of::<KernelSigaction>() == 32);

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// This thread's id.
#[must_use]
pub fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    let t = unsafe { libc::syscall(libc::SYS_gettid) };
    u32::try_from(t).unwrap_or(0)
}

/// Sends `sig` to thread `tid` of process `pid`.
///
/// # Errors
/// `ESRCH` when the thread is gone.
pub fn tgkill(pid: u32, tid: u32, sig: i32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) }).map(drop)
}

/// Reads the raw disposition of `sig`.
///
/// # Errors
/// `EINVAL` for a bad signal number.
pub fn sigaction_get(sig: i32) -> io::Result<KernelSigaction> {
    let mut old = KernelSigaction::default();
    // SAFETY: a null new action only reads; `old` is a valid out pointer of the kernel's layout and
    // the mask size is the kernel's (8 bytes).
    check(unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<KernelSigaction>(),
            &raw mut old,
            8usize,
        )
    })?;
    Ok(old)
}

/// Sets the raw disposition of `sig`.
///
/// # Errors
/// `EINVAL` for `SIGKILL`, `SIGSTOP` or a bad number.
///
/// # Safety
/// `act.handler` must be `SIG_DFL`, `SIG_IGN`, or a function that is sound to run as a signal handler
/// with `act.flags`, and `act.restorer` a valid `rt_sigreturn` trampoline when `SA_RESTORER` is set.
pub unsafe fn sigaction_set(sig: i32, act: &KernelSigaction) -> io::Result<()> {
    // SAFETY: the caller vouches for the handler; the pointers are valid for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::from_ref(act),
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        )
    })
    .map(drop)
}

/// Sleeps while `word` holds `expected` (or until woken, or `timeout_ms` passes).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ms: Option<u64>) {
    let ts = timeout_ms.map(|ms| libc::timespec {
        tv_sec: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        tv_nsec: i64::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    });
    let tsp = ts.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: `word` is a live aligned u32; the timeout pointer is null or valid for the call. A
    // futex wait only reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            tsp,
        );
    }
}

/// Wakes every waiter on `word`.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// Ends the process at once: no atexit handlers, no stdio flush (the image holds the unflushed
/// buffers; the restored copy flushes them).
pub fn exit_group(code: i32) -> ! {
    // SAFETY: never returns.
    unsafe { libc::syscall(libc::SYS_exit_group, code) };
    unreachable!("exit_group returned")
}

// SAFETY: glibc 2.35+ defines these (`ptrdiff_t __rseq_offset`, `unsigned int __rseq_size` in
// <sys/rseq.h>); the types here are the same sizes on x86_64.
unsafe extern "C" {
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

/// The rseq signature glibc registers with on x86_64.
pub const RSEQ_SIG: u32 = 0x5305_3053;

/// The main thread's `FS` base (its thread control block), 0 until [`note_main_thread`] ran.
static MAIN_TCB: AtomicU64 = AtomicU64::new(0);

/// Records the calling thread as the process's main thread. The runtime's constructor calls it (it
/// runs on the main thread, before `main`).
pub fn note_main_thread() {
    MAIN_TCB.store(arch_prctl_get(0x1003), Ordering::Release); // ARCH_GET_FS
}

/// Where the kernel writes on the main thread's behalf: its thread control block and its rseq area
/// (the `cpu_id` fields, rewritten on every return to user space after a preemption or a signal).
/// Such a write into a read-only page is not a fault the thread could handle: the kernel kills it
/// with SIGSEGV. Zeros stand for none (before [`note_main_thread`], or no rseq).
#[must_use]
pub fn main_thread_kernel_areas() -> [u64; 2] {
    let fs = MAIN_TCB.load(Ordering::Acquire);
    if fs == 0 {
        return [0; 2];
    }
    // SAFETY: glibc (2.35+) exports these as constants set before main.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    [
        fs,
        if size > 0 {
            fs.wrapping_add_signed(off as i64)
        } else {
            0
        },
    ]
}

/// What a thread leaves in its slot while it is parked.
#[derive(Debug, Default)]
pub struct Slot {
    /// The thread (0 while the slot is being filled).
    pub tid: AtomicU32,
    /// `&frame.uc`: the stack pointer for `rt_sigreturn`.
    pub frame: AtomicU64,
    /// `FS` base.
    pub fs_base: AtomicU64,
    /// `GS` base.
    pub gs_base: AtomicU64,
    /// `sigaltstack`.
    pub alt_sp: AtomicU64,
    /// `sigaltstack` size.
    pub alt_size: AtomicU64,
    /// `sigaltstack` flags.
    pub alt_flags: AtomicU32,
    /// Robust list head.
    pub robust_head: AtomicU64,
    /// Robust list length.
    pub robust_len: AtomicU64,
    /// `clear_child_tid`.
    pub clear_child_tid: AtomicU64,
    /// rseq area (0: none registered).
    pub rseq_addr: AtomicU64,
    /// rseq length.
    pub rseq_len: AtomicU32,
}

/// Most threads a process may have to be captured.
pub const MAX_THREADS: usize = 4096;

/// The state shared by the checkpoint signal's handler and the control thread.
#[derive(Debug)]
pub struct Freeze {
    /// One slot per parked thread.
    pub slots: Box<[Slot]>,
    /// Slots handed out.
    pub next: AtomicUsize,
    /// Threads parked (a futex word the control thread waits on).
    pub parked: AtomicU32,
    /// Parked threads sleep while this holds the value they saw on entry.
    pub release: AtomicU32,
    /// The control thread: on it the handler runs [`Freeze::on_control`] instead of parking.
    pub control_tid: AtomicU32,
    /// `fn(frame)` run on the control thread inside its own handler, as a `usize`.
    pub on_control: AtomicUsize,
}

static FREEZE: AtomicUsize = AtomicUsize::new(0);

impl Freeze {
    /// The process's freeze state, created on first use (never freed: a handler may run at any time).
    pub fn get() -> &'static Self {
        let p = FREEZE.load(Ordering::Acquire);
        if p != 0 {
            // SAFETY: a non-zero value is a leaked `Box<Freeze>` stored below and never freed.
            return unsafe { &*(p as *const Self) };
        }
        let slots = (0..MAX_THREADS).map(|_| Slot::default()).collect();
        let fresh = Box::into_raw(Box::new(Self {
            slots,
            next: AtomicUsize::new(0),
            parked: AtomicU32::new(0),
            release: AtomicU32::new(0),
            control_tid: AtomicU32::new(0),
            on_control: AtomicUsize::new(0),
        }));
        match FREEZE.compare_exchange(0, fresh as usize, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // SAFETY: just leaked, stored, never freed.
                unsafe { &*fresh }
            }
            Err(other) => {
                // SAFETY: `fresh` was never shared.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: `other` is the stored leaked box, never freed.
                unsafe { &*(other as *const Self) }
            }
        }
    }
}

fn arch_prctl_get(code: i32) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: ARCH_GET_FS/GS write one u64 to the valid pointer.
    unsafe { libc::syscall(libc::SYS_arch_prctl, code, &raw mut v) };
    v
}

/// Fills `slot` with the calling thread's kernel state. Async-signal-safe: syscalls only.
fn record_self(slot: &Slot, frame: u64) {
    slot.frame.store(frame, Ordering::Relaxed);
    let fs = arch_prctl_get(0x1003); // ARCH_GET_FS
    slot.fs_base.store(fs, Ordering::Relaxed);
    slot.gs_base.store(arch_prctl_get(0x1004), Ordering::Relaxed); // ARCH_GET_GS
    let mut ss = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: 0,
        ss_size: 0,
    };
    // SAFETY: a null new stack only reads into the valid `ss`.
    unsafe { libc::sigaltstack(std::ptr::null(), &raw mut ss) };
    slot.alt_sp.store(ss.ss_sp as u64, Ordering::Relaxed);
    slot.alt_size.store(ss.ss_size as u64, Ordering::Relaxed);
    slot.alt_flags
        .store(u32::try_from(ss.ss_flags).unwrap_or(0), Ordering::Relaxed);
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: pid 0 is the caller; both out pointers are valid.
    unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &raw mut head, &raw mut len) };
    slot.robust_head.store(head, Ordering::Relaxed);
    slot.robust_len.store(len as u64, Ordering::Relaxed);
    let mut ctid: u64 = 0;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer-sized value to the valid out pointer.
    unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &raw mut ctid) };
    slot.clear_child_tid.store(ctid, Ordering::Relaxed);
    // SAFETY: glibc (2.35+) exports these as constants set before main.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    let mut rseq = 0;
    if size > 0 && fs != 0 {
        let area = fs.wrapping_add_signed(off as i64);
        // cpu_id at offset 4 is negative (-1 uninitialized, -2 failed) unless registered.
        // SAFETY: glibc places the area inside the thread's TCB, which is mapped while it runs.
        let cpu_id = unsafe { std::ptr::read_volatile((area + 4) as *const i32) };
        if cpu_id >= 0 {
            rseq = area;
        }
    }
    slot.rseq_addr.store(rseq, Ordering::Relaxed);
    slot.rseq_len.store(size.max(32), Ordering::Relaxed);
}

/// The checkpoint signal's handler (`SA_SIGINFO`).
extern "C" fn on_checkpoint_signal(_sig: i32, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    let f = Freeze::get();
    let tid = gettid();
    if tid == f.control_tid.load(Ordering::Acquire) {
        let run = f.on_control.load(Ordering::Acquire);
        if run != 0 {
            // SAFETY: the control thread stores a `fn(u64)` here before it signals itself.
            let run: fn(u64) = unsafe { std::mem::transmute::<usize, fn(u64)>(run) };
            run(uc as u64);
        }
        return;
    }
    let seen = f.release.load(Ordering::Acquire);
    let i = f.next.fetch_add(1, Ordering::AcqRel);
    if let Some(slot) = f.slots.get(i) {
        record_self(slot, uc as u64);
        slot.tid.store(tid, Ordering::Release);
    }
    f.parked.fetch_add(1, Ordering::AcqRel);
    futex_wake_all(&f.parked);
    while f.release.load(Ordering::Acquire) == seen {
        futex_wait(&f.release, seen, None);
    }
    f.parked.fetch_sub(1, Ordering::AcqRel);
    futex_wake_all(&f.parked);
}

/// Installs the checkpoint handler for `sig` (all signals but the faults blocked while it runs) and
/// returns the disposition it replaced.
///
/// # Errors
/// The `rt_sigaction` failure.
pub fn install_checkpoint_handler(sig: i32) -> io::Result<KernelSigaction> {
    // The checkpoint handler is async-signal-safe: syscalls and atomics only, or the control
    // thread's own job.
    install_handler(
        sig,
        on_checkpoint_signal as *const () as usize,
        libc::SA_SIGINFO | libc::SA_RESTART,
        true,
    )
}

/// Installs one of om's own async-signal-safe handlers (`handler`, with `flags`; every signal but
/// the faults blocked while it runs when `block_all`) for `sig` through glibc, which supplies its restorer so
/// that the frame returns like any other; returns the disposition it replaced.
fn install_handler(
    sig: i32,
    handler: usize,
    flags: libc::c_int,
    block_all: bool,
) -> io::Result<KernelSigaction> {
    let old = sigaction_get(sig)?;
    let mut tmp: libc::sigaction = unsafe_zeroed_sigaction();
    tmp.sa_sigaction = handler;
    tmp.sa_flags = flags;
    if block_all {
        tmp.sa_mask = all_but_faults();
    }
    // SAFETY: `tmp` is a valid glibc sigaction; `handler` is one of this module's handlers, each
    // async-signal-safe and of the signature `flags` says.
    if unsafe { libc::sigaction(sig, &raw const tmp, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(old)
}

fn unsafe_zeroed_sigaction() -> libc::sigaction {
    // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, empty mask, no flags).
    unsafe { std::mem::zeroed() }
}

/// How long a thread sleeps when the throttle signal reaches it, in nanoseconds (0: not at all).
static THROTTLE_SLEEP_NS: AtomicU64 = AtomicU64::new(0);

/// The throttle signal's handler: sleeps [`THROTTLE_SLEEP_NS`] (auto-converge, see
/// `precopy::throttle`). Async-signal-safe: an atomic load and `nanosleep`.
extern "C" fn on_throttle_signal(_sig: i32) {
    let ns = THROTTLE_SLEEP_NS.load(Ordering::Acquire);
    if ns == 0 {
        return;
    }
    let ts = libc::timespec {
        tv_sec: i64::try_from(ns / 1_000_000_000).unwrap_or(0),
        tv_nsec: i64::try_from(ns % 1_000_000_000).unwrap_or(0),
    };
    // The interrupted code may be about to read errno.
    let saved = nix::errno::Errno::last_raw();
    // SAFETY: a valid timespec; a null remainder is allowed. An interruption just ends the sleep.
    unsafe { libc::nanosleep(&raw const ts, std::ptr::null_mut()) };
    nix::errno::Errno::set_raw(saved);
}

/// Sets how long the throttle signal puts a thread to sleep.
pub fn set_throttle_sleep(ns: u64) {
    THROTTLE_SLEEP_NS.store(ns, Ordering::Release);
}

/// How long the throttle signal puts a thread to sleep now, in nanoseconds.
#[must_use]
pub fn throttle_sleep() -> u64 {
    THROTTLE_SLEEP_NS.load(Ordering::Acquire)
}

/// Installs the throttle handler for `sig` (restarting interrupted calls) and returns the
/// disposition it replaced.
///
/// # Errors
/// The `rt_sigaction` failure.
pub fn install_throttle_handler(sig: i32) -> io::Result<KernelSigaction> {
    // An atomic load and nanosleep, errno kept; other signals (the checkpoint's) may nest.
    install_handler(
        sig,
        on_throttle_signal as *const () as usize,
        libc::SA_RESTART,
        false,
    )
}

/// Puts back the disposition `old` of the throttle signal `sig`, discarding any instance still
/// pending in some thread first (ignoring a signal drops what is pending): a late one must not meet
/// the default action, which for a real-time signal ends the process.
///
/// # Errors
/// The `rt_sigaction` failure.
pub fn uninstall_throttle_handler(sig: i32, old: &KernelSigaction) -> io::Result<()> {
    let ignore = KernelSigaction {
        handler: 1,
        ..KernelSigaction::default()
    };
    // SAFETY: SIG_IGN needs no handler or restorer.
    unsafe { sigaction_set(sig, &ignore) }?;
    // SAFETY: `old` came from the kernel for this very signal.
    unsafe { sigaction_set(sig, old) }
}

/// Puts back a disposition saved by [`install_checkpoint_handler`].
///
/// # Errors
/// The `rt_sigaction` failure.
pub fn restore_disposition(sig: i32, old: &KernelSigaction) -> io::Result<()> {
    // SAFETY: `old` came from the kernel for this very signal.
    unsafe { sigaction_set(sig, old) }
}

/// Records the calling thread's kernel state into `slot` (the control thread, inside its handler).
pub fn record_control(slot: &Slot, frame: u64) {
    record_self(slot, frame);
    slot.tid.store(gettid(), Ordering::Release);
}

/// The `xcr0` register: the xsave features the kernel enabled.
#[must_use]
pub fn xcr0() -> u64 {
    let c = std::arch::x86_64::__cpuid(1);
    if c.ecx & (1 << 27) == 0 {
        return 0;
    }
    // SAFETY: xgetbv with ecx=0 is valid where the OS enabled xsave (CPUID.1:ECX.OSXSAVE, checked).
    unsafe { std::arch::x86_64::_xgetbv(0) }
}

/// The xsave area size for the enabled features (CPUID 0xd, ebx).
#[must_use]
pub fn xsave_size() -> u32 {
    std::arch::x86_64::__cpuid_count(0xd, 0).ebx
}

/// `personality(0xffffffff)`: the current persona.
#[must_use]
pub fn personality() -> u32 {
    // SAFETY: 0xffffffff only queries.
    let p = unsafe { libc::personality(0xffff_ffff) };
    u32::try_from(p).unwrap_or(0)
}

/// `getrlimit(resource)` into `lim` (left unchanged for an unknown resource).
pub fn getrlimit(resource: usize, lim: &mut libc::rlimit) {
    let Ok(r) = libc::__rlimit_resource_t::try_from(resource) else {
        return;
    };
    // SAFETY: `lim` is a valid out pointer.
    unsafe { libc::getrlimit(r, lim) };
}

/// The current program break (`brk(0)`).
#[must_use]
pub fn current_brk() -> u64 {
    // SAFETY: brk(0) never moves the break; it returns the current one.
    let b = unsafe { libc::syscall(libc::SYS_brk, 0) };
    u64::try_from(b).unwrap_or(0)
}

/// The numeric names in directory `path` (such as `/proc/self/task`), read with `getdents64`.
///
/// Unlike `std::fs::read_dir`, which goes through glibc's `opendir` and so through `malloc`, this
/// takes no lock that an application thread parked mid-`malloc` could hold.
///
/// # Errors
/// The directory cannot be opened or read.
pub fn numeric_entries(path: &std::ffi::CStr) -> io::Result<Vec<u32>> {
    // SAFETY: a valid NUL-terminated path; the fd is closed below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let result = loop {
        // SAFETY: `buf` is valid for its length; getdents64 writes at most that much.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            break Err(io::Error::last_os_error());
        }
        if n == 0 {
            break Ok(());
        }
        let n = usize::try_from(n).unwrap_or(0);
        let mut off = 0;
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        while off + 19 <= n {
            let reclen = usize::from(u16::from_le_bytes([buf[off + 16], buf[off + 17]]));
            if reclen == 0 || off + reclen > n {
                break;
            }
            let name = &buf[off + 19..off + reclen];
            let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
            if let Some(v) = std::str::from_utf8(name).ok().and_then(|s| s.parse().ok()) {
                out.push(v);
            }
            off += reclen;
        }
    };
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    result.map(|()| out)
}

/// Unmaps the restorer's leftover mapping at `addr`, `len` bytes. Only the restore marker names it;
/// the caller makes sure that no thread still runs its last instructions (every thread is parked).
pub fn unmap_restorer_leftover(addr: u64, len: u64) {
    // SAFETY: the range is the restorer's private code and plan mapping (see above); no Rust object
    // lives there.
    unsafe { libc::munmap(addr as *mut libc::c_void, usize::try_from(len).unwrap_or(0)) };
}

/// Unblocks (`block == false`) or blocks `sig` in the calling thread.
pub fn mask_signal(sig: i32, block: bool) {
    let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
    let mut set: libc::sigset_t = unsafe_zeroed_sigset();
    // SAFETY: `set` is a valid sigset_t; a bad number only fails with EINVAL.
    unsafe { libc::sigaddset(&raw mut set, sig) };
    // SAFETY: a valid set; a null old set is allowed.
    unsafe { libc::pthread_sigmask(how, &raw const set, std::ptr::null_mut()) };
}

fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is the empty set.
    unsafe { std::mem::zeroed() }
}

/// The synchronous fault signals, never blocked by om: a fault whose signal is blocked kills the
/// process on the spot, so blocking one defers nothing, and the mprotect dirty tracker resolves the
/// runtime's own writes to tracked memory (its self-test, its allocations) through SIGSEGV.
pub const FAULT_SIGNALS: [i32; 5] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
];

/// Every signal but [`FAULT_SIGNALS`].
fn all_but_faults() -> libc::sigset_t {
    let mut set: libc::sigset_t = unsafe_zeroed_sigset();
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigfillset(&raw mut set) };
    for sig in FAULT_SIGNALS {
        // SAFETY: a valid set and signal number.
        unsafe { libc::sigdelset(&raw mut set, sig) };
    }
    set
}

/// Runs `f` with every signal but the faults ([`FAULT_SIGNALS`]) blocked in the calling thread,
/// then puts the old mask back. A thread created inside `f` starts with that mask: no window in
/// which it could take a signal meant for the application.
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    let all = all_but_faults();
    let mut old: libc::sigset_t = unsafe_zeroed_sigset();
    // SAFETY: valid sets; `old` receives the current mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const all, &raw mut old) };
    let r = f();
    // SAFETY: `old` holds the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &raw const old, std::ptr::null_mut()) };
    r
}

/// The bytes of this process's vdso at `start`, `len` bytes long (from `/proc/self/maps`).
#[must_use]
pub fn vdso_bytes(start: u64, len: u64) -> &'static [u8] {
    let len = usize::try_from(len).unwrap_or(0);
    // SAFETY: the kernel maps the vdso readable for the life of the process and never changes it;
    // `start` and `len` are its mapping as `/proc/self/maps` gives it.
    unsafe { std::slice::from_raw_parts(start as *const u8, len) }
}

/// Unregisters the calling thread's `rseq` area (glibc's, inside its TCB). A restorer must do this
/// before it unmaps its own memory: the kernel writes to a registered area on every return to user
/// space, and kills the thread when the area is gone.
pub fn rseq_unregister_self() {
    // SAFETY: glibc (2.35+) exports these as constants set before main.
    let (off, size) = unsafe { (__rseq_offset, __rseq_size) };
    let fs = arch_prctl_get(0x1003); // ARCH_GET_FS
    if size == 0 || fs == 0 {
        return;
    }
    let area = fs.wrapping_add_signed(off as i64);
    // SAFETY: RSEQ_FLAG_UNREGISTER with the very area, length and signature glibc registered; a
    // mismatch only fails with EINVAL.
    unsafe { libc::syscall(libc::SYS_rseq, area, size.max(32), 1, RSEQ_SIG) };
}

/// `getitimer(which)` as `(interval, value)` in microseconds.
#[must_use]
pub fn getitimer(which: i32) -> (u64, u64) {
    // SAFETY: an all-zero itimerval is valid.
    let mut v: libc::itimerval = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer; a bad `which` only fails.
    unsafe { libc::syscall(libc::SYS_getitimer, which, &raw mut v) };
    let us = |t: libc::timeval| {
        u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec).unwrap_or(0)
    };
    (us(v.it_interval), us(v.it_value))
}

/// `setitimer(which)` from `(interval, value)` in microseconds.
///
/// # Errors
/// The kernel's refusal.
pub fn setitimer(which: i32, interval_us: u64, value_us: u64) -> io::Result<()> {
    let tv = |us: u64| libc::timeval {
        tv_sec: i64::try_from(us / 1_000_000).unwrap_or(i64::MAX),
        tv_usec: i64::try_from(us % 1_000_000).unwrap_or(0),
    };
    let v = libc::itimerval {
        it_interval: tv(interval_us),
        it_value: tv(value_us),
    };
    // SAFETY: a valid itimerval; no old value wanted.
    check(unsafe {
        libc::syscall(
            libc::SYS_setitimer,
            which,
            &raw const v,
            std::ptr::null_mut::<libc::itimerval>(),
        )
    })
    .map(drop)
}

/// Sets `FD_CLOEXEC` on `fd`.
///
/// # Errors
/// `fcntl` failing (`EBADF` for a closed fd).
pub fn set_cloexec(fd: i32) -> io::Result<()> {
    // SAFETY: F_SETFD on a number only changes that descriptor's flags (or fails with EBADF).
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pid of the process at the other end of unix socket `fd` (`SO_PEERCRED`), if it is one.
#[must_use]
pub fn socket_peer_pid(fd: i32) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).ok()?;
    // SAFETY: `cred` and `len` are valid for writing; getsockopt writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (r == 0).then(|| u32::try_from(cred.pid).ok()).flatten()
}

/// Writes `bytes` to `fd` once, ignoring the result (a best-effort notice).
pub fn write_fd(fd: i32, bytes: &[u8]) {
    // SAFETY: `bytes` is readable for its length; write(2) on a number touches nothing else.
    let _ = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

#[cfg(test)]
mod itimer_tests {
    #[test]
    fn itimers_round_trip() {
        super::setitimer(0, 500_000, 900_000).unwrap();
        let (i, v) = super::getitimer(0);
        super::setitimer(0, 0, 0).unwrap();
        assert_eq!(i, 500_000);
        assert!(v > 800_000 && v <= 900_000, "{v}");
    }
}
