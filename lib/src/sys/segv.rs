//! The SIGSEGV handler of the mprotect tracker, and its chaining to whatever handler was there.
//!
//! The handler calls one registered function with the faulting address. That function must be
//! async-signal-safe: atomics and plain system calls only, no allocation, no locks. If it does not
//! claim the fault, the fault goes to the handler installed before om's, called as the kernel would
//! call it; with no such handler the default action is restored and the faulting instruction
//! re-executes, so the process dies of SIGSEGV as it would have without om.
//!
//! # References
//! `sigaction(2)`, `signal-safety(7)`.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fault claimant: returns true when it resolved the fault at this address.
pub type Claim = fn(usize) -> bool;

static CLAIM: AtomicUsize = AtomicUsize::new(0);
/// `si_code` of a protection fault.
const SEGV_ACCERR: i32 = 2;
/// Serializes `install`; true once the handler is in place.
static INSTALLED: Mutex<bool> = Mutex::new(false);
// The previous action, readable from the handler without a lock.
static PREVIOUS_RAW: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let si = unsafe { &*info };
    // SAFETY: a SIGSEGV siginfo carries a fault address.
    let addr = unsafe { si.si_addr() } as usize;
    let code = si.si_code;
    let claim = CLAIM.load(Ordering::Acquire);
    // Only protection faults (a write to a page made read-only) can be ours, never unmapped addresses.
    if claim != 0 && code == SEGV_ACCERR {
        // SAFETY: CLAIM only ever holds a `Claim` fn pointer stored by `install`.
        let f: Claim = unsafe { std::mem::transmute::<usize, Claim>(claim) };
        if f(addr) {
            return;
        }
    }
    chain(sig, info, ctx);
}

/// Passes a fault that is not ours to the handler that was installed before ours.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS_RAW.load(Ordering::Acquire) as *const libc::sigaction;
    // SAFETY: `prev` is null or points at the leaked, immutable copy made by `install`, which lives
    // for the rest of the process.
    let prev = unsafe { prev.as_ref() };
    let handler = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    let siginfo = prev.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Returning re-executes the faulting instruction, which now gets the default action (a
        // SIGSEGV that cannot be ignored would loop forever, so SIG_IGN also gets the default).
        // SAFETY: restoring the default action is always valid; SIG_DFL runs no code of ours.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    } else if siginfo {
        // SAFETY: the application installed this as an SA_SIGINFO handler; we call it exactly as the
        // kernel would have, with the kernel's own arguments.
        let f = unsafe {
            std::mem::transmute::<usize, extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)>(
                handler,
            )
        };
        f(sig, info, ctx);
    } else {
        // SAFETY: as above, for a plain handler.
        let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(handler) };
        f(sig);
    }
}

/// Installs the handler with `claim` as the claimant (replacing an earlier claimant).
///
/// # Errors
/// The `sigaction` error.
pub fn install(claim: Claim) -> io::Result<()> {
    let mut installed = INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    CLAIM.store(claim as *const () as usize, Ordering::Release);
    if *installed {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_segv as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART | libc::SA_NODEFER;
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both structs are valid for the call; the handler only uses async-signal-safe operations
    // (an atomic load, the claimant's contract, sigaction).
    if unsafe { libc::sigaction(libc::SIGSEGV, &raw const act, &raw mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Kept for the process's lifetime: the handler may read it at any time. An earlier om handler is
    // never chained to itself: a second `install` returns early above.
    let leaked: &'static libc::sigaction = Box::leak(Box::new(old));
    PREVIOUS_RAW.store(std::ptr::from_ref(leaked) as usize, Ordering::Release);
    *installed = true;
    Ok(())
}

/// Stops claiming faults; the handler stays installed but passes every fault on.
pub fn release() {
    CLAIM.store(0, Ordering::Release);
}
