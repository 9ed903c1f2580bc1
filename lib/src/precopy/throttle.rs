//! Auto-converge: slowing the application's threads down while pre-copy rounds cannot keep up.
//!
//! A process that writes memory faster than the link carries it never converges: each round finds
//! as much dirty memory as the one before. QEMU's answer for virtual CPUs is to take a share of
//! their time away ("throttle"); om does the same to threads. A throttle thread wakes every
//! [`PERIOD`] and sends each application thread a real-time signal whose handler sleeps for the
//! throttle's share of the period, so a thread runs at most `1 - share` of the time.
//!
//! Application threads are told apart from the runtime's by their signal mask: every runtime thread
//! (the control thread, the transport's data streams, this thread) blocks every signal but the
//! synchronous faults (`task::FAULT_SIGNALS`). A thread that blocks the throttle signal is left
//! alone (the signal is chosen so that none did when throttling began). Threads that appear later
//! are found at the next period.
//!
//! Throttling ends just before the freeze (threads asleep in the handler sleep on into it): the
//! thread stops, and the handler is uninstalled in a way that drops any signal still pending (see [`crate::sys::task::uninstall_throttle_handler`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::capture::{preflight, state};
use crate::sys::task::{self, KernelSigaction};

/// How often each application thread is made to sleep.
pub const PERIOD: Duration = Duration::from_millis(20);

/// Why throttling could not start.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// Every real-time signal is taken.
    #[error("no real-time signal is free to throttle the application with")]
    NoSignal,
    /// Installing the handler failed.
    #[error("installing the throttle signal handler")]
    Handler(#[source] std::io::Error),
    /// The thread could not be started.
    #[error("starting the throttle thread")]
    Thread(#[source] std::io::Error),
}

/// The application's threads, throttled while this lives.
#[derive(Debug)]
pub struct Throttle {
    sig: i32,
    old: KernelSigaction,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// `share` (0 ..= 0.99) of [`PERIOD`], in nanoseconds.
fn sleep_ns(share_ppm: u64) -> u64 {
    let period = u64::try_from(PERIOD.as_nanos()).unwrap_or(u64::MAX);
    period / 1_000_000 * share_ppm.min(990_000)
}

/// Millionths of `share`, clamped to 0 ..= 0.99.
fn ppm(share: f64) -> u64 {
    // In range after the clamp: 0 ..= 990_000.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let p = (share.clamp(0.0, 0.99) * 1e6).round() as u64;
    p
}

impl Throttle {
    /// Starts taking `share` (0 ..= 0.99) of every application thread's time. Must run on a thread
    /// that blocks every signal but the faults (the runtime's control thread): the throttle thread
    /// inherits its mask.
    ///
    /// # Errors
    /// [`ThrottleError`]; nothing is throttled then.
    pub fn start(share: f64) -> Result<Self, ThrottleError> {
        let sig = preflight::choose_signal().ok_or(ThrottleError::NoSignal)?;
        task::set_throttle_sleep(sleep_ns(ppm(share)));
        let old = task::install_throttle_handler(sig).map_err(ThrottleError::Handler)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("om-throttle".into())
                .spawn(move || run(sig, &stop))
        };
        match thread {
            Ok(t) => Ok(Self {
                sig,
                old,
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                let _ = task::uninstall_throttle_handler(sig, &old);
                Err(ThrottleError::Thread(e))
            }
        }
    }

    /// Changes the share of time taken away.
    pub fn set(&self, share: f64) {
        task::set_throttle_sleep(sleep_ns(ppm(share)));
    }

    /// The share of time taken away now (the handler's sleep over the period).
    #[must_use]
    pub fn share(&self) -> f64 {
        // Both at most 2e7 ns: exact in an f64.
        #[allow(clippy::cast_precision_loss)]
        let s = task::throttle_sleep() as f64 / PERIOD.as_nanos() as f64;
        s
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        // Threads asleep in the handler wake within a period; the ones a signal has not reached yet
        // lose it.
        task::set_throttle_sleep(0);
        if let Err(e) = task::uninstall_throttle_handler(self.sig, &self.old) {
            tracing::warn!(error = %e, sig = self.sig, "cannot put the throttle signal's disposition back");
        }
    }
}

/// The throttle thread: every period, signals each application thread once.
fn run(sig: i32, stop: &AtomicBool) {
    let pid = std::process::id();
    let me = task::gettid();
    // Whether each thread seen so far takes the signal (runtime threads block it).
    let mut takes: HashMap<u32, bool> = HashMap::new();
    let bit = 1u64 << (sig - 1);
    while !stop.load(Ordering::Acquire) {
        if task::throttle_sleep() > 0 {
            let tasks = state::list_tasks().unwrap_or_default();
            takes.retain(|t, _| tasks.contains(t));
            for t in tasks.into_iter().filter(|t| *t != me) {
                let ok = *takes.entry(t).or_insert_with(|| {
                    state::sig_mask(&format!("/proc/self/task/{t}/status"), "SigBlk:") & bit == 0
                });
                if ok {
                    // A thread that ended meanwhile is simply gone (ESRCH).
                    let _ = task::tgkill(pid, t, sig);
                }
            }
        }
        // Woken early when throttling ends.
        std::thread::park_timeout(PERIOD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_become_sleeps_within_the_period() {
        assert_eq!(sleep_ns(ppm(0.0)), 0);
        assert_eq!(sleep_ns(ppm(0.5)), 10_000_000);
        assert_eq!(sleep_ns(ppm(0.99)), 19_800_000);
        // Out of range is clamped: a thread always keeps a share of its time.
        assert_eq!(sleep_ns(ppm(3.0)), 19_800_000);
        assert_eq!(sleep_ns(ppm(-1.0)), 0);
        assert_eq!(sleep_ns(ppm(f64::NAN)), 0);
    }
}
