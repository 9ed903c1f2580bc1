//! Live migration of this process, run by the runtime's control thread: pre-copy rounds straight
//! from the application's memory, the freeze, the final round, and the source's side of the
//! two-phase commit.
//!
//! ```text
//!  check ─ connect+auth ─ begin(VMA table) ─ round 0 (every populated page)
//!    ─ round N (pages written during N-1; a new VMA table first when the map changed) ...
//!    ─ converge::decide says stop ─ freeze ─ [in the control thread's handler: last dirty pages,
//!      records, home] ─ commit (the destination restores and holds the copy: prepared)
//!    ─ go (the copy runs) ─ the source ends without running another instruction
//! ```
//!
//! Any failure up to the go releases the threads and the process continues here; the destination
//! drops the image (and the prepared copy with it) when the connection ends without a go.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use om_transport::api::PageSender;
use om_transport::error::chain;
use om_transport::relay::{self, Home};
use om_transport::sys::Readable;
use om_transport::wire::{Begin, Fate, ImageInfo, Vma as WireVma};
use om_transport::{ClusterKey, KeyError, SenderConfig, TcpSender, TransportError};

use super::converge::{self, Budget, Decision, RoundStats, StopReason};
use super::throttle::{Throttle, ThrottleError};
use crate::capture::{self, CaptureError, Captured, Frozen, Summary};
use crate::dirty::{self, DirtyError, Mechanism, RangeTable, Scope, Tracker};
use crate::image::records::{KIND_HOME, KIND_TERMINAL};
use crate::image::vma_flags;

/// How pages are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rounds while the process runs, then a short freeze.
    PreCopy,
    /// No rounds: freeze, send every page, restore (the baseline pre-copy is measured against).
    StopAndCopy,
}

impl Mode {
    /// The mode and whether to auto-converge, from the control protocol's word: `precopy`,
    /// `auto-converge` (pre-copy that throttles the application when it dirties memory faster than
    /// the link carries it) or `stop-and-copy`.
    #[must_use]
    pub fn parse(word: &str) -> Option<(Self, bool)> {
        match word {
            "precopy" => Some((Self::PreCopy, false)),
            "auto-converge" => Some((Self::PreCopy, true)),
            "stop-and-copy" => Some((Self::StopAndCopy, false)),
            _ => None,
        }
    }
}

/// What to migrate where.
#[derive(Debug, Clone)]
pub struct Request {
    /// The destination omd.
    pub to: SocketAddr,
    /// The cluster key file.
    pub key: PathBuf,
    /// The acceptable freeze and the round limit.
    pub budget: Budget,
    /// Pre-copy or stop-and-copy.
    pub mode: Mode,
    /// How the pages travel.
    pub transport: Transport,
}

/// How pages travel (the control connection is TCP for every transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TCP data streams.
    #[default]
    Tcp,
    /// Dolphin SCI: stored straight into the destination's exported image memory (`om-sci`).
    Sci,
    /// InfiniBand/RoCE verbs: RDMA WRITE from the application's memory into the destination's
    /// registered image memory (`om-verbs`).
    Verbs,
}

impl Transport {
    /// The name on the control protocol (`tcp`, `sci`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Sci => "sci",
            Self::Verbs => "verbs",
        }
    }

    /// The transport of a control-protocol name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Self::Tcp),
            "sci" => Some(Self::Sci),
            "verbs" => Some(Self::Verbs),
            _ => None,
        }
    }
}

/// One pre-copy round as the user sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    /// Bytes of pages sent.
    pub bytes: u64,
    /// How long the round took.
    pub elapsed: Duration,
    /// Bytes the process wrote meanwhile (the next round's work).
    pub dirtied: u64,
    /// The share of its time the application was throttled to during the round (auto-converge).
    pub throttle: f64,
    /// Connections (or placing writers) the pages went over at once.
    pub lanes: usize,
}

impl RoundReport {
    /// Bytes per second the process dirtied during the round.
    #[must_use]
    pub fn dirty_rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 { self.dirtied as f64 / s } else { 0.0 }
    }
}

/// Where the freeze went, step by step, in order (measured on the source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FreezeSteps {
    /// From the freeze signal until every thread was parked and the final round began.
    pub park: Duration,
    /// The dirty tracker's last collect (and, for the mprotect tracker, giving back protections).
    pub collect: Duration,
    /// The snapshot of threads, memory map and descriptors.
    pub snapshot: Duration,
    /// The final round's pages, until the receiver acknowledged them.
    pub pages: Duration,
    /// The records (threads, process, descriptors, home, terminal).
    pub records: Duration,
    /// The commit: the destination restores the copy and holds it.
    pub restore: Duration,
    /// The go, until the copy runs.
    pub go: Duration,
}

/// What a migration did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The pre-copy rounds (none for stop-and-copy).
    pub rounds: Vec<RoundReport>,
    /// Bytes of the final round, sent while the process was stopped.
    pub final_bytes: u64,
    /// Every byte of pages sent.
    pub bytes_sent: u64,
    /// Threads stopped here until the copy ran there.
    pub freeze: Duration,
    /// From the request to the copy running.
    pub total: Duration,
    /// Why the rounds ended.
    pub stop: String,
    /// The dirty tracker used.
    pub tracker: &'static str,
    /// The copy's pid on the destination node (0 when only the process's home confirmed that the
    /// copy runs: the destination's answer was lost).
    pub pid_there: u32,
    /// Where the freeze went.
    pub freeze_steps: FreezeSteps,
}

impl Report {
    /// The report as one JSON object (`freeze_ms`, `total_ms`, `rounds`, `bytes_sent`, ...).
    #[must_use]
    pub fn json(&self) -> String {
        let rounds: Vec<String> = self
            .rounds
            .iter()
            .map(|r| {
                format!(
                    "{{\"bytes\":{},\"ms\":{:.3},\"dirtied\":{},\"dirty_rate\":{:.0},\"throttle\":{:.2},\"lanes\":{}}}",
                    r.bytes,
                    r.elapsed.as_secs_f64() * 1e3,
                    r.dirtied,
                    r.dirty_rate(),
                    r.throttle,
                    r.lanes
                )
            })
            .collect();
        let f = &self.freeze_steps;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let steps = format!(
            "{{\"park_ms\":{:.3},\"collect_ms\":{:.3},\"snapshot_ms\":{:.3},\"pages_ms\":{:.3},\"records_ms\":{:.3},\"restore_ms\":{:.3},\"go_ms\":{:.3}}}",
            ms(f.park),
            ms(f.collect),
            ms(f.snapshot),
            ms(f.pages),
            ms(f.records),
            ms(f.restore),
            ms(f.go)
        );
        format!(
            "{{\"freeze_ms\":{:.3},\"total_ms\":{:.3},\"rounds\":{},\"bytes_sent\":{},\"final_bytes\":{},\"stop\":\"{}\",\"tracker\":\"{}\",\"pid_there\":{},\"round_detail\":[{}],\"freeze_detail\":{}}}",
            self.freeze.as_secs_f64() * 1e3,
            self.total.as_secs_f64() * 1e3,
            self.rounds.len(),
            self.bytes_sent,
            self.final_bytes,
            self.stop.replace('"', "'"),
            self.tracker,
            self.pid_there,
            rounds.join(","),
            steps
        )
    }
}

/// How a migration ended, as the control thread sees it.
#[derive(Debug)]
pub enum Outcome {
    /// On the source: the copy runs on the destination; this process is still stopped and must end
    /// with [`Frozen::exit`] once the news is out.
    Moved(Box<Report>, Frozen),
    /// In the copy, on the destination: the process was just restored.
    Restored,
}

/// Why a migration failed. The process continues on the source in every case.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The process cannot be captured.
    #[error("the process cannot migrate")]
    Capture(#[source] CaptureError),
    /// The cluster key could not be read.
    #[error("cluster key")]
    Key(#[source] KeyError),
    /// Connecting to or authenticating with the destination failed.
    #[error("connecting to omd at {to}")]
    Connect {
        /// The destination.
        to: SocketAddr,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The SCI transport could not start on this node (no SISCI library, fabric error).
    #[error("the SCI transport")]
    Sci(#[source] om_sci::SciError),
    /// The verbs transport could not start on this node (no libibverbs).
    #[error("the verbs transport")]
    Verbs(#[source] om_verbs::VerbsError),
    /// Dirty tracking could not start or failed.
    #[error("dirty tracking")]
    Dirty(#[source] DirtyError),
    /// Auto-converge could not throttle the application.
    #[error("auto-converge")]
    Throttle(#[source] ThrottleError),
    /// The application's threads could not be stopped for a round's dirty scan.
    #[error("stopping the threads for a dirty-page scan")]
    Pause(#[source] CaptureError),
    /// The destination refused the image.
    #[error("opening the image on the destination")]
    Begin(#[source] TransportError),
    /// A pre-copy round failed.
    #[error("round {round}")]
    Round {
        /// The round.
        round: usize,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The destination could not restore the copy (it said why).
    #[error("restoring on the destination")]
    Commit(#[source] TransportError),
    /// The go was not acknowledged, and the destination says the copy does not run.
    #[error("starting the copy on the destination")]
    Go(#[source] TransportError),
    /// The go went out, and neither `Running`, nor an answer to `Ask`, nor the home's decision came
    /// back: the copy may run on the destination too (if the home granted it before it became
    /// unreachable).
    #[error(
        "starting the copy on the destination: neither the destination nor the process's home answered \
         within {secs} s; the process continues here, and a copy may run there too"
    )]
    GoInDoubt {
        /// How long the destination was asked.
        secs: u64,
        /// The go's own failure.
        #[source]
        source: TransportError,
    },
}

/// The home of this process: set once from `omrun`'s relay port and token, its address fixed at the
/// first migration (the address the destination reached this node by).
static HOME: Mutex<Option<Home>> = Mutex::new(None);
/// omrun's relay port and token, before the first migration.
static HOME_SEED: Mutex<Option<(u16, Vec<u8>)>> = Mutex::new(None);
/// How many times this process has moved (0 at home).
static GENERATION: AtomicU32 = AtomicU32::new(0);

/// The socket to omrun while the process runs at home (-1 elsewhere): omrun holds signals for the
/// process while it is frozen (`freeze`), and sends them to wherever it runs once it knows
/// (`thaw`: here again; `moved`: the copy).
static ANCHOR_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Records the socket to omrun (see [`ANCHOR_FD`]); -1 once the process is away from home.
pub fn set_anchor_fd(fd: i32) {
    ANCHOR_FD.store(fd, Ordering::Release);
}

/// Tells omrun, if the process is at home, `what` (`freeze`, `thaw` or `moved`).
pub fn tell_anchor(what: &str) {
    let fd = ANCHOR_FD.load(Ordering::Acquire);
    if fd >= 0 {
        crate::sys::task::write_fd(fd, format!("{what}\n").as_bytes());
    }
}

/// Records omrun's relay port and token (the runtime reads them from its environment at start).
pub fn set_home_seed(port: u16, token: Vec<u8>) {
    *HOME_SEED.lock().unwrap_or_else(PoisonError::into_inner) = Some((port, token));
}

/// How many times this process has moved.
#[must_use]
pub fn generation() -> u32 {
    GENERATION.load(Ordering::Acquire)
}

/// The home record for the copy (generation `generation() + 1`), fixing the home's address on the
/// first move.
fn home_for_copy(local: Option<SocketAddr>) -> Option<Home> {
    let mut home = HOME.lock().unwrap_or_else(PoisonError::into_inner);
    if home.is_none() {
        let seed = HOME_SEED.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let (Some((port, token)), Some(local)) = (seed, local) {
            *home = Some(Home {
                addr: SocketAddr::new(local.ip(), port),
                token,
                generation: 0,
            });
        }
    }
    home.clone().map(|mut h| {
        h.generation = generation() + 1;
        h
    })
}

/// `OM_TEST_START_PAUSE_MS` (tests only): a pause between the tracker's start and the first reading of
/// the memory map, long enough for a busy program to map new memory in between.
fn pause_for_tests() {
    if let Some(ms) = std::env::var("OM_TEST_START_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms.min(1000)));
    }
}

/// The pages of `table` that travel: inside a private VMA of `vmas` (a shared mapping's file holds
/// its data), cut at VMA boundaries (a receiver lands each run inside one VMA).
fn private_runs(table: &RangeTable, vmas: &[WireVma]) -> Vec<std::ops::Range<u64>> {
    let mut out = Vec::new();
    for v in vmas.iter().filter(|v| v.flags & vma_flags::SHARED == 0) {
        out.extend(table.intersect(&(v.start..v.end)).runs().iter().cloned());
    }
    out
}

/// The private memory of `vmas` the process cannot read (`PROT_NONE` that may hold data): the kernel
/// will not send it from the live process, so it waits for the final round (read through
/// `/proc/self/mem`).
fn unreadable(vmas: &[WireVma]) -> RangeTable {
    RangeTable::from_runs(
        vmas.iter()
            .filter(|v| v.flags & vma_flags::SHARED == 0 && v.prot & libc::PROT_READ.unsigned_abs() == 0)
            .map(|v| v.start..v.end),
    )
}

fn bytes_of(runs: &[std::ops::Range<u64>]) -> u64 {
    runs.iter().map(|r| r.end - r.start).sum()
}

/// The pages written since the last round. A tracker that reads and clears in two steps
/// (soft-dirty) runs with the application's threads parked, as CRIU's pre-dump freezes its task: a
/// write between the steps would be in neither round and lost. The throttle's thread takes no
/// signals, so it stops for that moment and starts again at the same share.
fn collect_round(
    tracker: &mut dyn Tracker,
    throttle: &mut Option<Throttle>,
) -> Result<dirty::Round, MigrateError> {
    if !tracker.needs_stopped_threads() {
        return tracker.collect().map_err(MigrateError::Dirty);
    }
    let share = throttle.take().map(|t| t.share());
    let round = capture::paused(|| tracker.collect()).map_err(MigrateError::Pause)?;
    if let Some(share) = share {
        *throttle = Some(Throttle::start(share).map_err(MigrateError::Throttle)?);
    }
    round.map_err(MigrateError::Dirty)
}

/// What the final round needs, shared with the work that runs in the control thread's handler.
struct Session {
    sender: TcpSender,
    tracker: Box<dyn Tracker>,
    info: ImageInfo,
    table: Vec<WireVma>,
    /// Pages the receiver reported as suspect in the last round: they go again.
    suspects: RangeTable,
    /// Pages the last collect reported (written during the last pre-copy round), and pages the
    /// rounds left for the final one (unreadable), for the final round; and pages reported as zero.
    pending: RangeTable,
    pending_zero: RangeTable,
    home: Option<Home>,
    final_bytes: u64,
    /// When the threads were stopped.
    frozen_at: Option<Instant>,
    /// The final round's steps (set in the handler, without allocating).
    steps: FreezeSteps,
}

/// Migrates this process. Must run on the runtime's control thread.
///
/// # Errors
/// [`MigrateError`]; the process continues here.
pub fn migrate(req: &Request, mut on_round: impl FnMut(&RoundReport)) -> Result<Outcome, MigrateError> {
    let t0 = Instant::now();
    capture::check().map_err(MigrateError::Capture)?;
    let key = ClusterKey::load(&req.key).map_err(MigrateError::Key)?;
    let sender = match req.transport {
        Transport::Tcp => TcpSender::connect(req.to, &key, SenderConfig::default()),
        Transport::Sci => {
            let placer = om_sci::SciPlacer::open().map_err(MigrateError::Sci)?;
            TcpSender::connect_placed(req.to, &key, SenderConfig::default(), Box::new(placer))
        }
        Transport::Verbs => {
            let placer = om_verbs::VerbsPlacer::open().map_err(MigrateError::Verbs)?;
            TcpSender::connect_placed(req.to, &key, SenderConfig::default(), Box::new(placer))
        }
    }
    .map_err(|source| MigrateError::Connect { to: req.to, source })?;
    let home = home_for_copy(sender.local_addr());
    let mut tracker = match req.mode {
        Mode::StopAndCopy => dirty::open(Mechanism::Full, Scope::Process),
        Mode::PreCopy => dirty::select(Scope::Process),
    }
    .map_err(MigrateError::Dirty)?;
    let tracker_name = tracker.mechanism().name();
    let populated = tracker.start().map_err(MigrateError::Dirty)?;
    // The map that cuts a round's pages into VMAs is read after the tracker's own reading, never
    // before: memory mapped between the two readings would be in the tracker's round 0 and missing
    // from an older map, so cut from the round, and never sent again (it is tracked, and clean). Read
    // after, such memory is in the map but new to the tracker, which reports it in full next round.
    pause_for_tests();
    let (_, table) = capture::memory_map().map_err(MigrateError::Capture)?;
    let info = capture::image_info(ImageInfo::MIGRATE, bytes_of(&private_runs(&populated, &table)));
    let mut session = Session {
        sender,
        tracker,
        info,
        table,
        suspects: RangeTable::new(),
        pending: RangeTable::new(),
        pending_zero: RangeTable::new(),
        home,
        final_bytes: 0,
        steps: FreezeSteps::default(),
        frozen_at: None,
    };
    let fail_dirty = |s: &mut Session, e| {
        let _ = s.tracker.stop();
        capture::own_ranges(&[]);
        e
    };
    session
        .sender
        .begin(&Begin {
            info,
            vmas: session.table.clone(),
        })
        .map_err(|e| fail_dirty(&mut session, MigrateError::Begin(e)))?;
    // A placing transport mapped the destination's windows here: never part of the image.
    capture::own_ranges(&session.sender.mappings());

    let mut rounds: Vec<RoundStats> = Vec::new();
    let mut reports = Vec::new();
    let mut stop = StopReason::RoundLimit;
    let mut sent = 0u64;
    // Auto-converge: the application's threads lose a share of their time until the freeze.
    let mut throttle: Option<Throttle> = None;
    if req.mode == Mode::PreCopy {
        let mut work = populated;
        let mut zeroed = RangeTable::new();
        let mut skipped = RangeTable::new();
        loop {
            let want = work.union(&session.suspects);
            let later = unreadable(&session.table);
            skipped = skipped.union(&want.intersection(&later));
            let runs = private_runs(&want.difference(&later), &session.table);
            let zero = private_runs(&zeroed, &session.table);
            let st = match session.sender.send_round(Readable::racy(&runs), &zero, false) {
                Ok(st) => st,
                Err(source) => {
                    let round = rounds.len();
                    return Err(fail_dirty(&mut session, MigrateError::Round { round, source }));
                }
            };
            session.suspects = RangeTable::from_runs(st.suspects.iter().cloned());
            sent += st.bytes;
            let next = match collect_round(session.tracker.as_mut(), &mut throttle) {
                Ok(n) => n,
                Err(e) => return Err(fail_dirty(&mut session, e)),
            };
            let (_, now) = match capture::memory_map() {
                Ok(m) => m,
                Err(e) => return Err(fail_dirty(&mut session, MigrateError::Capture(e))),
            };
            if now != session.table {
                let b = Begin {
                    info,
                    vmas: now.clone(),
                };
                if let Err(source) = session.sender.update_vmas(&b) {
                    let round = rounds.len();
                    return Err(fail_dirty(&mut session, MigrateError::Round { round, source }));
                }
                capture::own_ranges(&session.sender.mappings());
                session.table = now;
            }
            let dirtied = bytes_of(&private_runs(&next.dirty, &session.table));
            let share = throttle.as_ref().map_or(0.0, Throttle::share);
            let r = RoundReport {
                bytes: st.bytes,
                elapsed: st.elapsed,
                lanes: st.lanes,
                dirtied,
                throttle: share,
            };
            on_round(&r);
            reports.push(r);
            rounds.push(RoundStats {
                sent: st.bytes,
                elapsed: st.elapsed,
                dirtied,
                lanes: u32::try_from(st.lanes).unwrap_or(u32::MAX),
            });
            work = next.dirty;
            zeroed = next.zeroed;
            match converge::decide(&rounds, &req.budget, t0.elapsed(), share) {
                Decision::Continue { throttle: next } if next > 0.0 => match &throttle {
                    Some(t) => t.set(next),
                    None => match Throttle::start(next) {
                        Ok(t) => throttle = Some(t),
                        Err(e) => return Err(fail_dirty(&mut session, MigrateError::Throttle(e))),
                    },
                },
                Decision::Continue { .. } => {}
                Decision::Stop(reason) => {
                    stop = reason;
                    // What the process wrote during the last round goes in the final one.
                    session.pending = work.union(&skipped);
                    session.pending_zero = zeroed;
                    break;
                }
            }
        }
    }
    let stop = match req.mode {
        Mode::StopAndCopy => "stop-and-copy".to_owned(),
        Mode::PreCopy => format!("{stop:?}"),
    };

    // The migration's own descriptors are not the application's: the capture leaves them out.
    let own: Vec<i32> = session
        .sender
        .fds()
        .into_iter()
        .chain(session.tracker.fds())
        .collect();
    for &fd in &own {
        capture::own_fd(fd, true);
    }
    let disown = || {
        for &fd in &own {
            capture::own_fd(fd, false);
        }
    };
    // The freeze: the final round runs in the control thread's handler.
    let shared = Arc::new(Mutex::new(session));
    let in_handler = Arc::clone(&shared);
    let work: capture::Work = Box::new(move |frame, started| final_round(&in_handler, frame, started));
    // Signals for the process wait in omrun from here until it knows where the process runs.
    tell_anchor("freeze");
    // The throttle thread would not park for the freeze; throttled threads asleep in its handler
    // sleep on into it.
    drop(throttle);
    let captured = capture::freeze_and_run(work);
    let captured = match captured {
        Ok(c) => c,
        Err(e) => {
            tell_anchor("thaw");
            disown();
            capture::own_ranges(&[]);
            let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = s.tracker.stop();
            s.sender.abort("the final round failed");
            return Err(match e {
                CaptureError::Send(source) => MigrateError::Round {
                    round: rounds.len(),
                    source,
                },
                other => MigrateError::Capture(other),
            });
        }
    };
    let (summary, frozen) = match captured {
        Captured::Restored => {
            // The copy: the session's sockets and tracker belong to the source (their numbers may
            // be the application's now). Forget them without closing anything.
            set_anchor_fd(-1);
            disown();
            // Those ranges are not mapped in the copy.
            capture::own_ranges(&[]);
            std::mem::forget(shared);
            dirty::forget_copied();
            return Ok(Outcome::Restored);
        }
        Captured::Source(summary, frozen) => (summary, frozen),
    };
    let mut session = shared.lock().unwrap_or_else(PoisonError::into_inner);
    let freeze_started = session
        .frozen_at
        .unwrap_or_else(|| Instant::now() - summary.frozen);
    disown();
    // The source runs on: one generation back, threads released, omrun's held signals delivered
    // here, full speed again.
    let resume = |session: &mut Session, frozen: Frozen| {
        GENERATION.fetch_sub(1, Ordering::AcqRel);
        drop(frozen);
        tell_anchor("thaw");
        let _ = session.tracker.stop();
        capture::own_ranges(&[]);
    };
    // Two-phase commit: the destination restores the copy and holds it (prepared)...
    let committing = Instant::now();
    if let Err(e) = session.sender.commit() {
        resume(&mut session, frozen);
        return Err(MigrateError::Commit(e));
    }
    session.steps.restore = committing.elapsed();
    let going = Instant::now();
    // ...and starts it on go, the point of no return: without `Running`, the destination is asked
    // what became of the copy, and the source resumes only if it did not start.
    let pid_there = match session.sender.go() {
        Ok(p) => p,
        Err(e) => match confirm_go(req.to, &key, session.sender.token()) {
            Some(Fate::Running(pid)) => {
                tracing::warn!(error = %chain(&e), pid, "the go's answer was lost; the destination confirms the copy runs");
                pid
            }
            Some(fate) => {
                tracing::warn!(error = %chain(&e), ?fate, "the go failed; the destination did not start the copy");
                resume(&mut session, frozen);
                return Err(MigrateError::Go(e));
            }
            None => {
                resume(&mut session, frozen);
                return Err(MigrateError::GoInDoubt {
                    secs: CONFIRM_GO.as_secs(),
                    source: e,
                });
            }
        },
    };
    let freeze = freeze_started.elapsed();
    session.steps.go = going.elapsed();
    let final_bytes = session.final_bytes;
    Ok(Outcome::Moved(
        Box::new(Report {
            rounds: reports,
            final_bytes,
            bytes_sent: sent + final_bytes,
            freeze,
            total: t0.elapsed(),
            stop,
            tracker: tracker_name,
            pid_there,
            freeze_steps: session.steps,
        }),
        frozen,
    ))
}

/// How long a source whose go went unanswered asks what became of the copy.
const CONFIRM_GO: Duration = Duration::from_secs(20);

/// After a go without `Running`: learns the copy's fate from the destination, on a new connection
/// (`Ask`, which starts the copy if it is still prepared), or, failing that, from the home, which
/// decides it for good: the source claims the migration to cancel it, and the home answers that the
/// copy runs if the destination claimed it first (its omd starts a copy only on the home's grant).
/// Asks both until one answers or [`CONFIRM_GO`] passes (`None`). A copy known to run only from the
/// home has pid 0 here.
fn confirm_go(to: SocketAddr, key: &ClusterKey, token: u64) -> Option<Fate> {
    let home = HOME.lock().unwrap_or_else(PoisonError::into_inner).clone();
    relay::retry(CONFIRM_GO, Duration::from_millis(250), || {
        match TcpSender::ask(to, key, SenderConfig::default(), token) {
            Ok(fate) => return Ok(fate),
            Err(e) => tracing::warn!(error = %chain(&e), "asking the destination what became of the copy"),
        }
        let Some(h) = &home else { return Err(()) };
        match relay::open(h, Duration::from_secs(2)).and_then(|mut c| relay::claim(&mut c, token, false)) {
            Ok(true) => {
                tracing::warn!("the home says the copy runs: it claimed the migration first");
                Ok(Fate::Running(0))
            }
            Ok(false) => {
                tracing::warn!("the home cancelled the copy: it will not run");
                Ok(Fate::Discarded)
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "asking the home what became of the copy");
                Err(())
            }
        }
    })
    .ok()
}

/// The final round, in the control thread's handler with every other thread parked.
fn final_round(shared: &Mutex<Session>, frame: u64, started: Instant) -> Result<Summary, CaptureError> {
    let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
    let s = &mut *guard;
    s.frozen_at = Some(started);
    let mut mark = Instant::now();
    s.steps.park = mark - started;
    // The time since the last mark, which moves on.
    let mut lap = || {
        let now = Instant::now();
        let d = now - mark;
        mark = now;
        d
    };
    // The copy is one generation further (this write is itself a dirty page of the final round).
    GENERATION.fetch_add(1, Ordering::AcqRel);
    let result = (|| {
        let last = s.tracker.collect().map_err(CaptureError::Dirty)?;
        if s.tracker.shows_in_maps() {
            // The last round is known and nothing runs: the application's protections go back
            // before the snapshot reads them (a failed migration would stop the tracker anyway).
            s.tracker.stop().map_err(CaptureError::Dirty)?;
        }
        s.steps.collect = lap();
        let snap = capture::snapshot(frame)?;
        if snap.wire_vmas != s.table {
            let b = Begin {
                info: s.info,
                vmas: snap.wire_vmas.clone(),
            };
            s.sender.update_vmas(&b).map_err(CaptureError::Send)?;
            s.table = snap.wire_vmas.clone();
        }
        // No threads may start from a signal handler: the final round goes over one connection.
        s.sender.set_serial(true);
        let dirty = last.dirty.union(&s.pending).union(&s.suspects);
        let zeroed = last.zeroed.union(&s.pending_zero).difference(&dirty);
        let runs = private_runs(&dirty, &s.table);
        let zero = private_runs(&zeroed, &s.table);
        s.steps.snapshot = lap();
        let st = s
            .sender
            .send_round(Readable::copied(&runs), &zero, true)
            .map_err(CaptureError::Send)?;
        s.steps.pages = lap();
        for r in &snap.records {
            s.sender
                .send_record(r.kind, &r.bytes)
                .map_err(CaptureError::Send)?;
        }
        if let Some(h) = &s.home {
            s.sender
                .send_record(KIND_HOME, &h.encode())
                .map_err(CaptureError::Send)?;
        }
        // Read now, with the process stopped: the settings it last made.
        if let Some(t) = crate::sys::tty::stdio_terminal() {
            s.sender
                .send_record(KIND_TERMINAL, &t.encode())
                .map_err(CaptureError::Send)?;
        }
        s.final_bytes = st.bytes;
        s.steps.records = lap();
        Ok(Summary {
            dir: PathBuf::new(),
            bytes: st.bytes,
            threads: snap.threads,
            frozen: started.elapsed(),
        })
    })();
    if result.is_err() {
        GENERATION.fetch_sub(1, Ordering::AcqRel);
    }
    result
}
