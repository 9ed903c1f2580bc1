//! Dirty-page tracking: which pages did the process write since the last round?
//!
//! Pre-copy migration ships every populated page in round 0 and then, round after round, the pages
//! written meanwhile. A [`Tracker`] answers that question for the process it runs in (the runtime lives
//! inside the application), following its address space while it changes: a new mapping, a `brk`
//! extension, a new thread stack or a range replaced by `MAP_FIXED` or moved by `mremap` counts as
//! written in full; an unmapped range simply disappears from the answer.
//!
//! Four mechanisms, chosen at run time by a self-test ([`select`]), never by kernel version:
//!
//! | [`Mechanism`] | how | granularity | cost |
//! |---|---|---|---|
//! | `UffdWp` | userfaultfd async write-protect + `PAGEMAP_SCAN` (6.7+) | page | ~1 µs per first write |
//! | `SoftDirty` | `clear_refs` + pagemap bit 55 | page | a fault per first write |
//! | `Mprotect` | `mprotect` + SIGSEGV, coarse chunks | chunk | a signal per first write to a chunk |
//! | `Full` | none: every populated page, every round | page | nothing; means stop-and-copy |
//!
//! `OM_DIRTY_TRACKER=auto|uffd|soft-dirty|mprotect|none` forces one (tests cover each on one machine);
//! a forced mechanism whose self-test fails is an error, not a silent fallback.
//!
//! The contract for callers: the pages a round reports must be read *after* the call that reported
//! them returns; a write that races with the call is then either in the data read or in the next round.
//! Never-populated pages and pages mapped to the shared zero page are never reported.

mod full;
pub mod maps;
mod mprotect;
mod populated;
pub mod ranges;
mod softdirty;
mod uffd;

use std::fmt;
use std::io;
use std::ops::Range;

pub use full::FullTracker;
pub(crate) use mprotect::fault_handler_running;
pub use mprotect::{MprotectTracker, forget_copied, open_range};
pub use ranges::{RangeTable, Run};

/// What one round found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// Pages that may have been written: read them (after the call returns) and send them.
    pub dirty: RangeTable,
    /// Pages that held data at the previous round and hold none now: the receiver forgets their
    /// data (a restore makes them zero in anonymous memory and maps the file's page in a private
    /// file mapping). Apply before `dirty` (a page in both reads as zero or as its newer data).
    pub zeroed: RangeTable,
}
pub use softdirty::SoftDirtyTracker;
pub use uffd::UffdTracker;

use crate::sys::mman::Region;
use maps::{MapsError, Vma};

/// The environment variable that forces a mechanism.
pub const TRACKER_ENV: &str = "OM_DIRTY_TRACKER";

/// A dirty-tracking mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// userfaultfd asynchronous write-protect and `PAGEMAP_SCAN`.
    UffdWp,
    /// Soft-dirty bits.
    SoftDirty,
    /// `mprotect` and SIGSEGV.
    Mprotect,
    /// No tracking: every populated page is dirty every round.
    Full,
}

impl Mechanism {
    /// Every mechanism, best first.
    pub const ALL: [Self; 4] = [Self::UffdWp, Self::SoftDirty, Self::Mprotect, Self::Full];

    /// The name used by `OM_DIRTY_TRACKER`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::UffdWp => "uffd",
            Self::SoftDirty => "soft-dirty",
            Self::Mprotect => "mprotect",
            Self::Full => "none",
        }
    }

    /// Parses a name of `OM_DIRTY_TRACKER`; `auto` is `None`.
    ///
    /// # Errors
    /// [`DirtyError::UnknownMechanism`].
    pub fn parse(value: &str) -> Result<Option<Self>, DirtyError> {
        match value {
            "" | "auto" => Ok(None),
            v => Self::ALL
                .into_iter()
                .find(|m| m.name() == v)
                .map(Some)
                .ok_or_else(|| DirtyError::UnknownMechanism { value: v.to_owned() }),
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which part of the address space a tracker watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole process (what the runtime uses).
    Process,
    /// Only VMAs, or parts of them, inside this address window (tests, benchmarks, and the
    /// self-test, which must not disturb a tracker running on the rest of the process).
    Window(Range<u64>),
}

impl Scope {
    /// The part of `vma` that this scope watches, if any.
    #[must_use]
    pub fn clip(&self, vma: &Vma) -> Option<Range<u64>> {
        match self {
            Self::Process => Some(vma.start..vma.end),
            Self::Window(w) => {
                let (s, e) = (vma.start.max(w.start), vma.end.min(w.end));
                (s < e).then_some(s..e)
            }
        }
    }
}

/// Why dirty tracking failed. One variant per failed operation.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// `OM_DIRTY_TRACKER` names no mechanism.
    #[error(
        "unknown dirty tracker {value:?} in {TRACKER_ENV} (expected auto, uffd, soft-dirty, mprotect or none)"
    )]
    UnknownMechanism {
        /// The value.
        value: String,
    },
    /// A mechanism failed its self-test.
    #[error("dirty tracking with {mechanism} does not work here: {reason}")]
    SelfTest {
        /// The mechanism.
        mechanism: Mechanism,
        /// What the self-test saw.
        reason: String,
    },
    /// The memory map could not be read.
    #[error("cannot read the memory map")]
    Maps(#[from] MapsError),
    /// No userfaultfd could be opened.
    #[error("cannot open a userfaultfd (plain or UFFD_USER_MODE_ONLY)")]
    UffdOpen(#[source] io::Error),
    /// The userfaultfd handshake failed.
    #[error("userfaultfd API handshake failed (asynchronous write-protect needs Linux 6.7)")]
    UffdApi(#[source] io::Error),
    /// Write-protecting a registered range failed.
    #[error("cannot write-protect {start:#x}-{end:#x}")]
    WriteProtect {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap")]
    PagemapOpen(#[source] io::Error),
    /// A `PAGEMAP_SCAN` failed.
    #[error("PAGEMAP_SCAN of {start:#x}-{end:#x} failed")]
    Scan {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading pagemap entries failed.
    #[error("cannot read pagemap entries at {addr:#x}")]
    PagemapRead {
        /// The first address.
        addr: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Clearing soft-dirty bits failed.
    #[error("cannot clear soft-dirty bits (/proc/self/clear_refs)")]
    ClearRefs(#[source] io::Error),
    /// Changing protections failed.
    #[error("cannot change the protection of {start:#x}-{end:#x}")]
    Protect {
        /// Start.
        start: u64,
        /// End.
        end: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The SIGSEGV handler could not be installed.
    #[error("cannot install the SIGSEGV handler")]
    SignalHandler(#[source] io::Error),
    /// Only one mprotect tracker can run in a process.
    #[error("an mprotect tracker is already running in this process")]
    MprotectBusy,
    /// `collect` before `start`.
    #[error("the tracker was not started")]
    NotStarted,
    /// The `PAGEMAP_SCAN` output buffer could not be mapped.
    #[error("cannot map the PAGEMAP_SCAN buffer")]
    ScanBuffer(#[source] io::Error),
    /// The self-test could not map its probe.
    #[error("cannot map the self-test probe")]
    Probe(#[source] io::Error),
}

/// A dirty-page tracker for the calling process.
pub trait Tracker: Send + fmt::Debug {
    /// Its mechanism.
    fn mechanism(&self) -> Mechanism;

    /// The granularity at which writes are reported, in bytes (a page, or a chunk).
    fn granularity(&self) -> u64 {
        crate::sys::page_size() as u64
    }

    /// True when `collect` is exact only while the application's threads are stopped (soft-dirty:
    /// reading the bits and clearing them cannot be one atomic step, so a write in between would be
    /// lost). The pre-copy engine stops the threads around `collect` for such a tracker.
    fn needs_stopped_threads(&self) -> bool {
        false
    }

    /// True when tracking shows in `/proc/self/maps` (mprotect makes tracked memory read-only): a
    /// capture must stop the tracker before it reads the memory map, or the copy would get the
    /// tracker's protections instead of the application's.
    fn shows_in_maps(&self) -> bool {
        false
    }

    /// Arms tracking and returns every populated page in scope (round 0).
    ///
    /// # Errors
    /// A [`DirtyError`]; tracking is then off.
    fn start(&mut self) -> Result<RangeTable, DirtyError>;

    /// Returns the pages written since the previous `start` or `collect`, plus every populated page of
    /// ranges that appeared or were replaced meanwhile or cannot be tracked, and the pages that lost
    /// their data; re-arms.
    ///
    /// # Errors
    /// A [`DirtyError`]; the caller must then treat every page as dirty (stop-and-copy).
    fn collect(&mut self) -> Result<Round, DirtyError>;

    /// The descriptors the tracker holds (never part of an image: a capture leaves them out).
    fn fds(&self) -> Vec<std::os::fd::RawFd>;

    /// Stops tracking; the process runs on at full speed. Idempotent.
    ///
    /// # Errors
    /// A [`DirtyError`] when protections could not be removed.
    fn stop(&mut self) -> Result<(), DirtyError>;
}

/// Opens a tracker of `mechanism` after checking with its self-test that it works here.
///
/// # Errors
/// [`DirtyError::SelfTest`] when it does not; the mechanism's set-up errors.
pub fn open(mechanism: Mechanism, scope: Scope) -> Result<Box<dyn Tracker>, DirtyError> {
    self_test(mechanism)?;
    new_unchecked(mechanism, scope)
}

fn new_unchecked(mechanism: Mechanism, scope: Scope) -> Result<Box<dyn Tracker>, DirtyError> {
    Ok(match mechanism {
        Mechanism::UffdWp => Box::new(UffdTracker::new(scope)?),
        Mechanism::SoftDirty => Box::new(SoftDirtyTracker::new(scope)?),
        Mechanism::Mprotect => Box::new(MprotectTracker::new(scope)?),
        Mechanism::Full => Box::new(FullTracker::new(scope)?),
    })
}

/// The tracker to use: the one `OM_DIRTY_TRACKER` forces, else the best one whose self-test passes.
///
/// # Errors
/// [`DirtyError::UnknownMechanism`], or the forced mechanism's error.
pub fn select(scope: Scope) -> Result<Box<dyn Tracker>, DirtyError> {
    select_with(&std::env::var(TRACKER_ENV).unwrap_or_default(), scope)
}

/// [`select`] with the value of `OM_DIRTY_TRACKER` given (`""` or `"auto"`: the best that works).
///
/// # Errors
/// As [`select`].
pub fn select_with(forced: &str, scope: Scope) -> Result<Box<dyn Tracker>, DirtyError> {
    if let Some(m) = Mechanism::parse(forced)? {
        return open(m, scope);
    }
    for m in Mechanism::ALL {
        match self_test(m) {
            Ok(()) => return new_unchecked(m, scope),
            Err(e) => tracing::info!(mechanism = %m, error = %e, "dirty tracker unavailable"),
        }
    }
    // The Full tracker's self-test cannot fail, so this is not reached; keep a clear answer anyway.
    new_unchecked(Mechanism::Full, scope)
}

/// Checks that `mechanism` reports exactly the written page of a small probe mapping.
///
/// The probe has four pages; pages 0 and 2 are populated before tracking starts. Round 0 must be
/// {0, 2}; after writing page 1, the next round must be {1} (or its chunk); the round after, nothing.
///
/// A read-only page on either side keeps the probe a VMA of its own. Without them the kernel may
/// merge it with a writable neighbour, a thread stack say, that then decides how the tracker sees it
/// (a stack is reported in full every round): a migration test failed that way once in a dozen runs
/// on a loaded machine, and `auto` then passed over a tracker that works.
///
/// # Errors
/// [`DirtyError::SelfTest`] naming what the mechanism got wrong, or the error it failed with.
pub fn self_test(mechanism: Mechanism) -> Result<(), DirtyError> {
    let page = crate::sys::page_size();
    let mut probe = Region::map_anon(PROBE_PAGES * page, None).map_err(DirtyError::Probe)?;
    self_test_in(mechanism, &mut probe, 0)
}

/// Pages of the self-test's probe: four, and a fence on either side.
const PROBE_PAGES: usize = 6;

/// [`self_test`] on the [`PROBE_PAGES`] of `region` from page `at`.
fn self_test_in(mechanism: Mechanism, region: &mut Region, at: usize) -> Result<(), DirtyError> {
    let page = crate::sys::page_size();
    region
        .protect(at * page, page, libc::PROT_READ)
        .and_then(|()| region.protect((at + PROBE_PAGES - 1) * page, page, libc::PROT_READ))
        .map_err(DirtyError::Probe)?;
    let probe = &*region;
    let first = at + 1;
    let base = (probe.addr() + first * page) as u64;
    let p = page as u64;
    let w = |i: usize| {
        probe.words()[(first + i) * page / 8].store(0x5a5a, std::sync::atomic::Ordering::Relaxed);
    };
    w(0);
    w(2);
    let fail = |reason: String| DirtyError::SelfTest { mechanism, reason };
    let mut t = new_unchecked(mechanism, Scope::Window(base..base + 4 * p))?;
    let gran = t.granularity();
    let round0 = t.start()?;
    let expect0 = RangeTable::from_runs([base..base + p, base + 2 * p..base + 3 * p]);
    if round0 != expect0 {
        t.stop()?;
        return Err(fail(format!(
            "round 0 reported {:x?}, expected pages 0 and 2",
            round0.runs()
        )));
    }
    w(1);
    let round1 = t.collect()?.dirty;
    let round2 = t.collect()?.dirty;
    t.stop()?;
    let written = base + p;
    let ok1 = if mechanism == Mechanism::Full {
        round1 == RangeTable::from_runs(std::iter::once(base..base + 3 * p))
    } else {
        round1.contains(written) && round1.bytes() <= gran.max(p)
    };
    let ok2 = mechanism == Mechanism::Full || round2.is_empty();
    if !ok1 {
        return Err(fail(format!(
            "after a write to one page it reported {:x?}",
            round1.runs()
        )));
    }
    if !ok2 {
        return Err(fail(format!("with no write it reported {:x?}", round2.runs())));
    }
    Ok(())
}

/// The address ranges that `scope` watches in `maps`, as a table.
pub(crate) fn tracked_table(maps: &[Vma], scope: &Scope) -> RangeTable {
    RangeTable::from_runs(tracked_ranges(maps, scope).map(|(r, _)| r))
}

/// The tracked parts of private file mappings: where a page without data of its own is the
/// file's, not zeros.
pub(crate) fn private_file_table(maps: &[Vma], scope: &Scope) -> RangeTable {
    RangeTable::from_runs(
        tracked_ranges(maps, scope)
            .filter(|(_, v)| v.inode != 0 && !v.perms.shared)
            .map(|(r, _)| r),
    )
}

/// The VMAs of `maps` that `scope` watches and that can hold the process's data, clipped to the scope.
pub(crate) fn tracked_ranges<'a>(
    maps: &'a [Vma],
    scope: &'a Scope,
) -> impl Iterator<Item = (Range<u64>, &'a Vma)> + 'a {
    // Above the user address space: [vsyscall].
    const USER_END: u64 = 1 << 47;
    // om's own scan buffers are never tracked (see `sys::pagemap::ScanVec`), nor a migration
    // transport's mappings of the destination (see `capture::own_ranges`), nor the capture arena
    // (never part of an image; made just before a freeze, so arming its whole reservation in the
    // final round cost 9 ms of a 1 GiB process's freeze).
    let internal = RangeTable::from_runs(
        crate::sys::pagemap::internal_ranges()
            .into_iter()
            .chain(crate::capture::state::own_ranges_now())
            .chain(crate::sys::arena::range()),
    );
    maps.iter()
        .filter(|v| !v.is_special() && v.end <= USER_END)
        .filter_map(move |v| scope.clip(v).map(|r| (r, v)))
        .flat_map(move |(r, v)| {
            RangeTable::from_runs([r])
                .difference(&internal)
                .runs()
                .iter()
                .map(|p| (p.clone(), v))
                .collect::<Vec<_>>()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    /// Does this kernel set soft-dirty bits? Probed directly: clear, write a page, read bit 55.
    fn kernel_has_soft_dirty() -> bool {
        let page = crate::sys::page_size();
        let r = Region::map_anon(page, None).unwrap();
        r.words()[0].store(1, std::sync::atomic::Ordering::Relaxed);
        std::fs::OpenOptions::new()
            .write(true)
            .open("/proc/self/clear_refs")
            .unwrap()
            .write_all(b"4")
            .unwrap();
        r.words()[0].store(2, std::sync::atomic::Ordering::Relaxed);
        let mut e = [0u8; 8];
        let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
        pm.read_exact_at(&mut e, r.addr() as u64 / page as u64 * 8)
            .unwrap();
        u64::from_ne_bytes(e) & crate::sys::pagemap::PM_SOFT_DIRTY != 0
    }

    #[test]
    fn self_tests_match_the_kernel() {
        self_test(Mechanism::UffdWp).expect("uffd-wp async works on Linux >= 6.7");
        self_test(Mechanism::Full).expect("none always works");
        self_test(Mechanism::Mprotect).expect("mprotect always works");
        let sd = self_test(Mechanism::SoftDirty);
        assert_eq!(sd.is_ok(), kernel_has_soft_dirty(), "{sd:?}");
        if let Err(e) = sd {
            assert!(e.to_string().contains("soft-dirty does not work here"), "{e}");
        }
        // The probe right above memory that looks like a thread stack (writable, a PROT_NONE guard
        // below): unfenced, the kernel merged the two, and mprotect reported the probe in full.
        let page = crate::sys::page_size();
        for m in [Mechanism::UffdWp, Mechanism::Mprotect] {
            let mut r = Region::map_anon((2 + PROBE_PAGES) * page, None).unwrap();
            r.protect(0, page, libc::PROT_NONE).unwrap();
            r.words()[page / 8].store(1, std::sync::atomic::Ordering::Relaxed);
            self_test_in(m, &mut r, 2).unwrap_or_else(|e| panic!("{m} above a stack: {e}"));
        }
    }

    #[test]
    fn mechanism_names_round_trip() {
        for m in Mechanism::ALL {
            assert_eq!(Mechanism::parse(m.name()).unwrap(), Some(m));
        }
        assert_eq!(Mechanism::parse("auto").unwrap(), None);
        let e = Mechanism::parse("softdirty").unwrap_err().to_string();
        assert!(
            e.contains("expected auto, uffd, soft-dirty, mprotect or none"),
            "{e}"
        );
    }
}
