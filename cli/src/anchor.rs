//! The home anchor: `omrun` stays on the home node while its process runs, forwards the signals it
//! receives, and ends the way the process ended.
//!
//! Signals are blocked in omrun and read from a `signalfd`, so there is no handler and no race with the
//! child's exit: `SIGCHLD` arrives on the same descriptor. A signal that the kernel generated for the
//! whole foreground process group (Ctrl-C on a terminal) already reached the child, which shares omrun's
//! process group, so only signals sent by a process (`kill`, `sigqueue`, `tgkill`) are forwarded.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, raise, sigprocmask};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Signals that omrun passes on to its process.
pub const FORWARDED: [Signal; 8] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCONT,
    Signal::SIGWINCH,
];

/// Why the anchor could not run the program.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// Blocking the forwarded signals failed.
    #[error("cannot block signals")]
    BlockSignals(#[source] nix::Error),
    /// Creating the signalfd failed.
    #[error("cannot create a signalfd")]
    SignalFd(#[source] nix::Error),
    /// The program could not be started.
    #[error("cannot start {prog:?}")]
    Spawn {
        /// The program.
        prog: OsString,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading the signalfd failed.
    #[error("cannot read the signalfd")]
    ReadSignal(#[source] nix::Error),
    /// Waiting for the program failed.
    #[error("cannot wait for process {pid}")]
    Wait {
        /// The process.
        pid: i32,
        /// Why.
        #[source]
        source: nix::Error,
    },
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It called `exit` with this status.
    Exited(u8),
    /// A signal killed it.
    Signaled(Signal),
}

impl Outcome {
    /// Ends omrun the same way: returns the exit code, or dies of the same signal.
    #[must_use]
    pub fn reproduce(self) -> ExitCode {
        match self {
            Self::Exited(code) => ExitCode::from(code),
            Self::Signaled(sig) => {
                // The program already dumped core if it was going to; omrun must not add a second one.
                let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
                // SIGKILL's disposition cannot be changed (and needs no change).
                if sig == Signal::SIGKILL || crate::sys::set_default_disposition(sig).is_ok() {
                    let mut set = SigSet::empty();
                    set.add(sig);
                    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
                    let _ = raise(sig);
                }
                // Only reached for a signal whose default action does not kill: the shell convention.
                ExitCode::from(128u8.saturating_add(u8::try_from(sig as i32).unwrap_or(127)))
            }
        }
    }
}

/// Runs `prog args` as a child, forwards signals until it ends, and returns how it ended.
///
/// `env` is added to the child's environment (the runtime's `LD_PRELOAD` once it exists).
///
/// # Errors
/// An [`AnchorError`] when the program cannot be started or watched. The program's own failure is an
/// [`Outcome`], not an error.
pub fn run(prog: &OsString, args: &[OsString], env: &[(OsString, OsString)]) -> Result<Outcome, AnchorError> {
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    // Blocked before the child exists, so neither its exit nor an early signal can be missed; the child
    // starts with an empty mask.
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(AnchorError::BlockSignals)?;
    // Close-on-exec: the program must not inherit omrun's signalfd.
    let sfd = SignalFd::with_flags(&mask, nix::sys::signalfd::SfdFlags::SFD_CLOEXEC)
        .map_err(AnchorError::SignalFd)?;

    let mut cmd = Command::new(prog);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    // The child keeps omrun's argv[0] semantics: it sees its own name, not omrun's.
    cmd.arg0(prog);
    crate::sys::clear_signal_mask_in_child(&mut cmd);
    let child = cmd.spawn().map_err(|source| AnchorError::Spawn {
        prog: prog.clone(),
        source,
    })?;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    tracing::debug!(pid = pid.as_raw(), "started");

    loop {
        if let Some(outcome) = reap(pid)? {
            return Ok(outcome);
        }
        let Some(info) = sfd.read_signal().map_err(AnchorError::ReadSignal)? else {
            continue;
        };
        let Ok(sig) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) else {
            continue;
        };
        if sig == Signal::SIGCHLD {
            continue;
        }
        // si_code <= 0: sent by a process (SI_USER, SI_QUEUE, SI_TKILL). Kernel-generated ones (the
        // terminal's SIGINT, SIGWINCH) went to the whole foreground group, the child included.
        if info.ssi_code <= 0 {
            tracing::debug!(?sig, "forwarding");
            let _ = kill(pid, sig);
        }
    }
}

fn reap(pid: Pid) -> Result<Option<Outcome>, AnchorError> {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(Outcome::Exited(u8::try_from(code & 0xff).unwrap_or(1)))),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(Outcome::Signaled(sig))),
        Ok(_) => Ok(None),
        Err(source) => Err(AnchorError::Wait {
            pid: pid.as_raw(),
            source,
        }),
    }
}
