//! The few operations of the command-line tools that need `unsafe`.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};

/// Restores the default disposition of `sig` in this process.
pub(crate) fn set_default_disposition(sig: Signal) -> nix::Result<()> {
    // SAFETY: installing SIG_DFL runs no code of ours in signal context, so no handler can observe
    // inconsistent state; `signal` is only unsafe because arbitrary handlers could.
    unsafe { signal::signal(sig, SigHandler::SigDfl) }.map(drop)
}

/// Makes the child of `cmd` start with no blocked signals. The standard library passes the parent's
/// mask on, and omrun blocks the signals it forwards.
pub(crate) fn clear_signal_mask_in_child(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls are allowed;
    // it makes a single rt_sigprocmask system call on a set built on the stack, allocating nothing.
    unsafe {
        cmd.pre_exec(|| {
            signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        });
    }
}
