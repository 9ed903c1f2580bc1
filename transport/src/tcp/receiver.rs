//! The TCP receiver: authenticates connections, runs the session state machine of [`crate::wire`], and
//! lands pages straight into the memory an [`ImageStore`] provides.

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::api::{Export, Exportable, Exporter, FilePiece, ImageSink, ImageStore, Refusal};
use crate::auth;
use crate::conn::Conn;
use crate::error::TransportError;
use crate::key::ClusterKey;
use crate::sys::Landing;
use crate::wire::{
    self, Batch, Begin, EndRound, ErrorCode, Fate, Hello, ImageInfo, Kind, MAX_ACK_RUNS, MAX_FATES, Record,
    Role, RoundAck, WireError, Zero, caps,
};

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Most data streams granted to one session.
    pub max_streams: u16,
    /// A peer silent for this long is dropped and its image discarded.
    pub idle_timeout: Duration,
    /// Most suspect pages (checksum mismatches) tolerated in one round.
    pub max_suspect_pages: u64,
    /// For fault tests: the receiving process dies (`abort`) at this point of every session.
    pub crash_at: Option<CrashPoint>,
    /// The placing transports this receiver offers (SCI, verbs): a sender that asks for one gets
    /// the image memory exported by it and puts its pages straight into it.
    pub exporters: Vec<Arc<dyn Exporter>>,
}

/// Where a fault test breaks the receiver, or omd's restorer (omd reads `OM_FAULT`: `round:N`,
/// `final`, `prepared`, `lost-go`, `lost-running`, `deaf-after-go`, `late-go`,
/// `home-unreachable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The receiver dies when round N ends (before its acknowledgement).
    Round(u32),
    /// The receiver dies when the final round ends.
    Final,
    /// The receiver dies after the commit of a migration: the copy is prepared, the go not yet
    /// received.
    Prepared,
    /// The connection drops as the go arrives, before the copy starts (the go's wait failed): the
    /// copy is discarded; the receiver lives on.
    LostGo,
    /// The connection drops after the copy started, before `Running` is sent; the receiver lives
    /// on.
    LostRunning,
    /// As `LostRunning`, and every `Ask` goes unanswered: the source cannot learn from here that
    /// the copy runs (only its home can tell it).
    DeafAfterGo,
    /// The connection drops as the go arrives, every `Ask` goes unanswered, and the copy is
    /// started 3 s later, as a go delayed on the way would start it.
    LateGo,
    /// The copy's claim goes to a closed port instead of its home (omd's restorer): the home is
    /// unreachable and the copy is discarded.
    HomeUnreachable,
}

impl CrashPoint {
    /// Parses `round:N`, `final`, `prepared`, `lost-go`, `lost-running`, `deaf-after-go`, `late-go`
    /// or `home-unreachable`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "final" => Some(Self::Final),
            "prepared" => Some(Self::Prepared),
            "lost-go" => Some(Self::LostGo),
            "lost-running" => Some(Self::LostRunning),
            "deaf-after-go" => Some(Self::DeafAfterGo),
            "late-go" => Some(Self::LateGo),
            "home-unreachable" => Some(Self::HomeUnreachable),
            _ => s.strip_prefix("round:")?.parse().ok().map(Self::Round),
        }
    }
}

fn crash_if(at: Option<CrashPoint>, now: CrashPoint) {
    if at == Some(now) {
        tracing::error!(?now, "OM_FAULT: crashing here");
        std::process::abort();
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            max_streams: 8,
            idle_timeout: Duration::from_secs(60),
            max_suspect_pages: 1 << 16,
            crash_at: None,
            exporters: Vec::new(),
        }
    }
}

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A control connection committed its image.
    Committed {
        /// The image id.
        image: u64,
    },
    /// A data stream finished.
    StreamDone,
    /// An `Ask` was answered.
    Answered(Fate),
}

/// Where a migration's copy on this node stands, as [`Receiver::incoming`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFate {
    /// Restored and held before its first instruction, waiting for its go.
    Prepared,
    /// Being started: its home's claim is under way.
    Starting,
    /// Started (with its pid here) or discarded.
    Decided(Fate),
}

impl std::fmt::Display for CopyFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Prepared => f.write_str("prepared"),
            Self::Starting => f.write_str("starting"),
            Self::Decided(Fate::Running(pid)) => write!(f, "running,pid={pid}"),
            Self::Decided(Fate::Discarded) => f.write_str("discarded"),
            Self::Decided(Fate::Unknown) => f.write_str("unknown"),
        }
    }
}

/// A migration's copy, by its commit token, as `Go` and `Ask` find it.
enum CopyState<I> {
    /// Restored and held: the first `Go` or `Ask` starts it.
    Prepared(Arc<I>),
    /// Being started (the claim at the home may take seconds): others wait for the outcome.
    Starting,
    /// Started or discarded.
    Decided(Fate),
}

#[derive(Debug, Default)]
struct Progress {
    round: u32,
    sealed: bool,
    batches: u32,
    pages: u64,
    suspects: Vec<u64>,
    failed: Option<Refusal>,
}

struct Session<I> {
    peer: String,
    granted: u16,
    /// Pages come through this placing transport ([`ReceiverConfig::exporters`]).
    placed: Option<Arc<dyn Exporter>>,
    /// The thread that drains the placing transport's mailbox, and its stop flag.
    drain: Mutex<Option<std::thread::JoinHandle<()>>>,
    drain_stop: AtomicBool,
    image: Mutex<Option<Arc<I>>>,
    joined: Mutex<Vec<(u16, TcpStream)>>,
    control: TcpStream,
    progress: Mutex<Progress>,
    cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<I> Session<I> {
    /// Records the first failure and wakes everyone: the control thread reports it to the sender, and
    /// every stream of the session is shut down.
    fn fail(&self, code: ErrorCode, reason: String) {
        {
            let mut p = lock(&self.progress);
            if p.failed.is_none() {
                p.failed = Some((code, reason));
            }
        }
        self.cv.notify_all();
        // Abortive close: a sender blocked on a full window gets a reset at once, and the clones are
        // dropped here so that the data threads' own close is the last one.
        for (_, s) in lock(&self.joined).drain(..) {
            let _ = crate::sys::reset_on_close(s.as_fd());
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Wakes the control thread from a blocking read; it still writes the reason to the sender.
        let _ = self.control.shutdown(std::net::Shutdown::Read);
    }

    fn failure(&self) -> Option<Refusal> {
        lock(&self.progress).failed.clone()
    }

    /// Stops the mailbox drain (if any) and waits for it: afterwards nothing lands any more, and
    /// the export (windows, mailbox) is withdrawn.
    fn stop_drain(&self) {
        self.drain_stop.store(true, Ordering::Release);
        if let Some(h) = lock(&self.drain).take() {
            let _ = h.join();
        }
    }
}

/// An image as a placing transport exports it.
struct Held<I>(Arc<I>);

impl<I: ImageSink> std::fmt::Debug for Held<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Held").field(&self.0.id()).finish()
    }
}

impl<I: ImageSink> Exportable for Held<I> {
    fn memory(&self) -> Landing<'_> {
        // Only images that are placed are held (checked before the export).
        self.0.placed().map_or_else(
            // SAFETY: an empty zone at a non-null, aligned address covers no memory.
            || unsafe { Landing::new(8, 0) },
            |(m, _)| m,
        )
    }
}

/// Serves incoming transfers into an [`ImageStore`].
pub struct Receiver<S: ImageStore> {
    key: ClusterKey,
    store: Arc<S>,
    config: ReceiverConfig,
    page_size: u64,
    sessions: Mutex<HashMap<u64, Arc<Session<S::Image>>>>,
    /// The last [`MAX_FATES`] migration copies, by commit token.
    copies: Mutex<VecDeque<(u64, CopyState<S::Image>)>>,
    /// Signalled when a starting copy's fate is decided.
    decided: Condvar,
}

impl<S: ImageStore> std::fmt::Debug for Receiver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("sessions", &lock(&self.sessions).len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn refusal_of(e: &TransportError) -> Refusal {
    (e.code(), crate::error::chain(e))
}

impl<S: ImageStore> Receiver<S> {
    /// A receiver that lands images in `store`.
    #[must_use]
    pub fn new(key: ClusterKey, store: Arc<S>, config: ReceiverConfig) -> Arc<Self> {
        Arc::new(Self {
            key,
            store,
            config,
            page_size: crate::sys::page_size() as u64,
            sessions: Mutex::new(HashMap::new()),
            copies: Mutex::new(VecDeque::new()),
            decided: Condvar::new(),
        })
    }

    /// Remembers the prepared copy of `token`.
    fn prepare(&self, token: u64, image: Arc<S::Image>) {
        let mut c = lock(&self.copies);
        if c.len() >= MAX_FATES {
            c.pop_front();
        }
        c.push_back((token, CopyState::Prepared(image)));
    }

    /// Starts the copy of `token` if it is still prepared (once, whoever asks first: the `Go` on its
    /// control connection, or an `Ask`), and returns its fate, with the reason when it could not
    /// start. The start runs without the lock (the home's claim may take seconds): a second caller
    /// for the same token waits for its outcome, other tokens are not held up.
    fn start(&self, token: u64) -> (Fate, Option<Refusal>) {
        let mut c = lock(&self.copies);
        loop {
            let Some(i) = c.iter().position(|(t, _)| *t == token) else {
                return (Fate::Unknown, None);
            };
            match std::mem::replace(&mut c[i].1, CopyState::Starting) {
                CopyState::Prepared(image) => {
                    drop(c);
                    // A panic must still decide the copy, or a second caller would wait forever.
                    let go = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| image.go(token)));
                    let (fate, why) = match go {
                        Ok(Ok(pid)) => (Fate::Running(pid), None),
                        Ok(Err(why)) => (Fate::Discarded, Some(why)),
                        Err(_) => (
                            Fate::Discarded,
                            Some((ErrorCode::Internal, "starting the copy panicked".to_owned())),
                        ),
                    };
                    let mut c = lock(&self.copies);
                    if let Some((_, copy)) = c.iter_mut().find(|(t, _)| *t == token) {
                        *copy = CopyState::Decided(fate);
                    }
                    self.decided.notify_all();
                    return (fate, why);
                }
                CopyState::Starting => {
                    c = self.decided.wait(c).unwrap_or_else(PoisonError::into_inner);
                }
                CopyState::Decided(f) => {
                    c[i].1 = CopyState::Decided(f);
                    return (f, None);
                }
            }
        }
    }

    /// Discards the copy of `token` unless it started (its image goes when the last holder drops
    /// it).
    fn discard(&self, token: u64) {
        let mut c = lock(&self.copies);
        if let Some((_, copy)) = c.iter_mut().find(|(t, _)| *t == token)
            && matches!(copy, CopyState::Prepared(_))
        {
            *copy = CopyState::Decided(Fate::Discarded);
        }
    }

    /// The copies of the last [`MAX_FATES`] migrations committed here, oldest first, by commit
    /// token.
    #[must_use]
    pub fn incoming(&self) -> Vec<(u64, CopyFate)> {
        lock(&self.copies)
            .iter()
            .map(|(token, c)| {
                let fate = match c {
                    CopyState::Prepared(_) => CopyFate::Prepared,
                    CopyState::Starting => CopyFate::Starting,
                    CopyState::Decided(f) => CopyFate::Decided(*f),
                };
                (*token, fate)
            })
            .collect()
    }

    /// Sessions in progress.
    #[must_use]
    pub fn sessions(&self) -> usize {
        lock(&self.sessions).len()
    }

    fn decide(&self, hello: &Hello) -> auth::Decision {
        if !hello.versions.contains(&wire::VERSION) {
            return Err((
                ErrorCode::Version,
                format!(
                    "no common protocol version (peer speaks {}..={}, this omd {})",
                    hello.versions.start,
                    hello.versions.end - 1,
                    wire::VERSION
                ),
            ));
        }
        let offered = self
            .config
            .exporters
            .iter()
            .fold(caps::REQUIRED, |c, e| c | e.cap());
        if hello.caps & caps::REQUIRED != caps::REQUIRED {
            return Err((ErrorCode::Capability, "peer lacks required capabilities".into()));
        }
        if u64::from(hello.page_size) != self.page_size {
            return Err((
                ErrorCode::Capability,
                format!(
                    "page size {} differs from this node's {}",
                    hello.page_size, self.page_size
                ),
            ));
        }
        if hello.role == Role::Relay {
            return Err((ErrorCode::Session, "omd takes no relay connections".into()));
        }
        let (streams, session) = match hello.role {
            Role::Control => (
                hello.streams.min(self.config.max_streams),
                u64::from_le_bytes(auth::random_bytes()),
            ),
            Role::Data | Role::Relay => (hello.streams, hello.session),
        };
        Ok(Hello {
            versions: wire::VERSION..wire::VERSION + 1,
            role: hello.role,
            streams,
            caps: hello.caps & offered,
            page_size: hello.page_size,
            session,
            nonce: auth::random_bytes(),
        })
    }

    /// Runs one accepted connection to its end (call it on a thread per connection).
    ///
    /// # Errors
    /// Why the connection failed; the peer was told the same in an `Error` frame.
    pub fn serve(self: &Arc<Self>, stream: TcpStream) -> Result<Outcome, TransportError> {
        let control_clone = stream.try_clone();
        let mut conn = Conn::new(stream);
        conn.set_read_timeout(Some(self.config.idle_timeout))?;
        let (hello, welcome) = match auth::server(&mut conn, &self.key, |h| self.decide(h)) {
            Ok(hw) => hw,
            Err(e) => {
                conn.send_error(e.code(), &crate::error::chain(&e));
                return Err(e);
            }
        };
        match hello.role {
            Role::Control => {
                let control = control_clone.map_err(|e| conn.io("duplicate socket", e))?;
                let placed = self
                    .config
                    .exporters
                    .iter()
                    .find(|e| welcome.caps & e.cap() != 0)
                    .cloned();
                let session = Arc::new(Session {
                    peer: conn.peer().to_owned(),
                    granted: welcome.streams,
                    placed,
                    drain: Mutex::new(None),
                    drain_stop: AtomicBool::new(false),
                    image: Mutex::new(None),
                    joined: Mutex::new(Vec::new()),
                    control,
                    progress: Mutex::new(Progress::default()),
                    cv: Condvar::new(),
                });
                lock(&self.sessions).insert(welcome.session, Arc::clone(&session));
                let r = self.run_control(&mut conn, &session);
                session.stop_drain();
                lock(&self.sessions).remove(&welcome.session);
                if let Err(e) = &r {
                    // The sender hears the first failure (maybe a data stream's), not a consequence.
                    let (code, reason) = session.failure().unwrap_or_else(|| refusal_of(e));
                    session.fail(code, reason.clone());
                    conn.send_error(code, &reason);
                    tracing::warn!(peer = %session.peer, %reason, "image discarded");
                }
                r
            }
            Role::Data => self.run_data(&mut conn, hello.session, hello.streams),
            Role::Relay => Err(TransportError::Misuse("relay connection")),
        }
    }

    fn run_control(
        &self,
        conn: &mut Conn,
        session: &Arc<Session<S::Image>>,
    ) -> Result<Outcome, TransportError> {
        let first = conn.recv()?;
        let body = match first.kind {
            Kind::Begin => first.body,
            Kind::Ask => {
                let token = wire::msg::decode_u64(&first.body, "ask").map_err(|e| conn.wire(e))?;
                if matches!(
                    self.config.crash_at,
                    Some(CrashPoint::DeafAfterGo | CrashPoint::LateGo)
                ) {
                    tracing::error!("OM_FAULT: the ask goes unanswered");
                    conn.reset_on_close();
                    return Err(TransportError::Misuse("OM_FAULT: ask unanswered"));
                }
                let (fate, why) = self.start(token);
                if let Some((_, reason)) = why {
                    tracing::warn!(peer = %session.peer, %reason, "an asked-for copy could not start");
                }
                tracing::info!(peer = %session.peer, ?fate, "asked for a copy's fate");
                conn.send(Kind::Answer, &fate.encode())?;
                return Ok(Outcome::Answered(fate));
            }
            other => {
                return Err(conn.wire(WireError::Unexpected {
                    got: other,
                    state: "before begin",
                }));
            }
        };
        let begin = Begin::decode(&body, self.page_size).map_err(|e| conn.wire(e))?;
        let image = self
            .store
            .open(&begin, self.page_size, conn.peer())
            .map_err(|(code, reason)| TransportError::Refused {
                peer: conn.peer().to_owned(),
                code,
                reason,
            })?;
        let image = Arc::new(image);
        *lock(&session.image) = Some(Arc::clone(&image));
        tracing::info!(peer = %session.peer, pid = begin.info.pid, vmas = begin.vmas.len(), "image opened");
        conn.send(Kind::Begun, &image.id().to_le_bytes())?;
        let mut export = if session.placed.is_some() {
            Some(self.start_drain(conn, session, &image)?)
        } else {
            None
        };
        loop {
            let frame = match conn.recv() {
                Ok(f) => f,
                // A data stream failed and shut our read side: report its reason.
                Err(e) => {
                    return Err(session
                        .failure()
                        .map_or(e, |(code, reason)| TransportError::Refused {
                            peer: session.peer.clone(),
                            code,
                            reason,
                        }));
                }
            };
            match frame.kind {
                Kind::Batch => self.land_batch(conn, session, &image, &frame.body)?,
                Kind::Zero => {
                    let z = Zero::decode(&frame.body, self.page_size).map_err(|e| conn.wire(e))?;
                    self.check_round(conn, session, z.round, "zero runs")?;
                    for r in &z.runs {
                        image.zero(r).map_err(|(c, m)| refused(conn, c, m))?;
                    }
                }
                Kind::EndRound => {
                    let end = EndRound::decode(&frame.body).map_err(|e| conn.wire(e))?;
                    let ack = self.end_round(conn, session, &image, end)?;
                    conn.send(Kind::RoundAck, &ack.encode(self.page_size))?;
                }
                Kind::Record => {
                    let r = Record::decode(&frame.body).map_err(|e| conn.wire(e))?;
                    image.record(r).map_err(|(c, m)| refused(conn, c, m))?;
                }
                Kind::Vmas => {
                    let table = Begin::decode(&frame.body, self.page_size).map_err(|e| conn.wire(e))?;
                    {
                        let p = lock(&session.progress);
                        if p.sealed || p.batches != 0 {
                            return Err(conn.wire(WireError::Invalid(
                                "a new VMA table inside a round or after the final round".into(),
                            )));
                        }
                    }
                    if table.info != begin.info {
                        return Err(
                            conn.wire(WireError::Invalid("a new VMA table for another process".into()))
                        );
                    }
                    image.relayout(&table).map_err(|(c, m)| refused(conn, c, m))?;
                    // Batches of the next round travel on the data streams: the sender waits for
                    // this before it sends any, so none reaches a range before the table that
                    // makes it part of the image.
                    conn.send(Kind::Relaid, &[])?;
                    if let Some(export) = &export {
                        send_placement(conn, export.as_ref(), image.as_ref())?;
                    }
                }
                Kind::Connect if let Some(export) = &export => {
                    export
                        .connect(&frame.body)
                        .map_err(|(c, m)| refused(conn, c, m))?;
                    conn.send(Kind::Connected, &[])?;
                }
                Kind::Commit => {
                    let token = wire::msg::decode_u64(&frame.body, "commit").map_err(|e| conn.wire(e))?;
                    if !lock(&session.progress).sealed {
                        return Err(refused(
                            conn,
                            ErrorCode::Session,
                            "commit before the final round".into(),
                        ));
                    }
                    // Nothing may land in the image once it is handed on: the drain ends, and the
                    // export (windows, mailbox, doorbell) is withdrawn.
                    session.stop_drain();
                    drop(export.take());
                    let id = Arc::clone(&image)
                        .commit()
                        .map_err(|(c, m)| refused(conn, c, m))?;
                    conn.send(Kind::Committed, &id.to_le_bytes())?;
                    tracing::info!(peer = %session.peer, image = id, bytes = image.bytes(), "image committed");
                    if begin.info.flags & ImageInfo::MIGRATE != 0 {
                        // Prepared: only Go (or an Ask of the same token) starts the copy; anything
                        // else (an error, a timeout, the connection closing) discards it.
                        self.prepare(token, Arc::clone(&image));
                        crash_if(self.config.crash_at, CrashPoint::Prepared);
                        let go = conn.expect(Kind::Go, "after a migration's commit").and_then(|_| {
                            if self.config.crash_at == Some(CrashPoint::LostGo) {
                                tracing::error!("OM_FAULT: the go is lost");
                                return Err(TransportError::Misuse("OM_FAULT lost-go"));
                            }
                            Ok(())
                        });
                        if go.is_ok() && self.config.crash_at == Some(CrashPoint::LateGo) {
                            tracing::error!("OM_FAULT: the go arrives late");
                            conn.shutdown();
                            std::thread::sleep(Duration::from_secs(3));
                            let (fate, why) = self.start(token);
                            tracing::error!(?fate, ?why, "OM_FAULT: the late go started the copy, or not");
                            return Err(TransportError::Misuse("OM_FAULT late-go"));
                        }
                        if let Err(e) = go {
                            self.discard(token);
                            return Err(e);
                        }
                        let pid = match self.start(token) {
                            (Fate::Running(pid), _) => pid,
                            (_, why) => {
                                let (c, m) =
                                    why.unwrap_or((ErrorCode::Session, "the copy was discarded".into()));
                                return Err(refused(conn, c, m));
                            }
                        };
                        tracing::info!(peer = %session.peer, image = id, pid, "migrated process running");
                        if matches!(
                            self.config.crash_at,
                            Some(CrashPoint::LostRunning | CrashPoint::DeafAfterGo)
                        ) {
                            tracing::error!("OM_FAULT: running is lost");
                            conn.reset_on_close();
                            return Err(TransportError::Misuse("OM_FAULT lost-running"));
                        }
                        conn.send(Kind::Running, &u64::from(pid).to_le_bytes())?;
                    }
                    return Ok(Outcome::Committed { image: id });
                }
                other => {
                    return Err(conn.wire(WireError::Unexpected {
                        got: other,
                        state: "in an open image",
                    }));
                }
            }
        }
    }

    fn check_round(
        &self,
        conn: &Conn,
        session: &Session<S::Image>,
        round: u32,
        what: &'static str,
    ) -> Result<(), TransportError> {
        check_round(conn.peer(), session, round, what)
    }

    /// Exports the image through the placing transport, tells the sender the placement, and
    /// starts the thread that lands the batches announced in the mailbox.
    fn start_drain(
        &self,
        conn: &mut Conn,
        session: &Arc<Session<S::Image>>,
        image: &Arc<S::Image>,
    ) -> Result<Arc<dyn Export>, TransportError> {
        let exporter = session
            .placed
            .as_ref()
            .ok_or(TransportError::Misuse("a placed session without an exporter"))?;
        if image.placed().is_none() {
            return Err(refused(
                conn,
                ErrorCode::Capability,
                "this image's memory cannot be exported".into(),
            ));
        }
        let export: Arc<dyn Export> = Arc::from(
            exporter
                .export(Arc::new(Held(Arc::clone(image))), conn.local_ip())
                .map_err(|(c, m)| refused(conn, c, m))?,
        );
        // Before any page lands.
        if export.pins() {
            image.pin();
        }
        send_placement(conn, export.as_ref(), image.as_ref())?;
        let (peer, page_size, max_suspects) = (
            session.peer.clone(),
            self.page_size,
            self.config.max_suspect_pages,
        );
        let (session2, image2, export2) = (Arc::clone(session), Arc::clone(image), Arc::clone(&export));
        let handle = std::thread::Builder::new()
            .name("om-drain".into())
            .spawn(move || {
                while !session2.drain_stop.load(Ordering::Acquire) {
                    let r = match export2.next(Duration::from_millis(20)) {
                        Ok(None) => continue,
                        Ok(Some(body)) => land_batch(
                            &peer,
                            page_size,
                            max_suspects,
                            &session2,
                            image2.as_ref(),
                            &body,
                            None,
                        ),
                        Err((code, reason)) => Err(TransportError::Refused {
                            peer: peer.clone(),
                            code,
                            reason: format!("mailbox: {reason}"),
                        }),
                    };
                    if let Err(e) = r {
                        let (code, reason) = refusal_of(&e);
                        tracing::warn!(%peer, %reason, "placed batch failed");
                        session2.fail(code, reason);
                        // A sender waiting for mailbox room learns it at once.
                        export2.abandon();
                        break;
                    }
                }
                // The export goes before the image: remote writes end before its memory can.
                drop(export2);
                drop(image2);
            })
            .map_err(|e| conn.io("start the mailbox thread", e))?;
        *lock(&session.drain) = Some(handle);
        Ok(export)
    }
}

fn send_placement<I: ImageSink>(
    conn: &mut Conn,
    export: &dyn Export,
    image: &I,
) -> Result<(), TransportError> {
    let extents = image.placed().map(|(_, e)| e).unwrap_or_default();
    let placement = export.placement(extents).map_err(|(c, m)| refused(conn, c, m))?;
    conn.send(Kind::Placement, &placement.encode())
}

fn check_round<I>(
    peer: &str,
    session: &Session<I>,
    round: u32,
    what: &'static str,
) -> Result<(), TransportError> {
    {
        let p = lock(&session.progress);
        if let Some((code, reason)) = &p.failed {
            return Err(TransportError::Refused {
                peer: peer.to_owned(),
                code: *code,
                reason: reason.clone(),
            });
        }
        if p.sealed || round != p.round {
            return Err(TransportError::Wire {
                peer: peer.to_owned(),
                source: WireError::Invalid(format!(
                    "{what} for round {round} while the receiver is in round {}{}",
                    p.round,
                    if p.sealed { " (sealed)" } else { "" }
                )),
            });
        }
    }
    Ok(())
}

impl<S: ImageStore> Receiver<S> {
    fn end_round(
        &self,
        conn: &Conn,
        session: &Session<S::Image>,
        image: &S::Image,
        end: EndRound,
    ) -> Result<RoundAck, TransportError> {
        self.check_round(conn, session, end.round, "end of round")?;
        crash_if(
            self.config.crash_at,
            if end.last {
                CrashPoint::Final
            } else {
                CrashPoint::Round(end.round)
            },
        );
        let deadline = Instant::now() + self.config.idle_timeout;
        let mut p = lock(&session.progress);
        while p.batches < end.batches && p.failed.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(refused(
                    conn,
                    ErrorCode::Timeout,
                    format!(
                        "round {}: {} of {} batches arrived before the timeout",
                        end.round, p.batches, end.batches
                    ),
                ));
            }
            p = session
                .cv
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if let Some((code, reason)) = &p.failed {
            return Err(refused(conn, *code, reason.clone()));
        }
        if p.batches != end.batches || p.pages != end.pages {
            return Err(conn.wire(WireError::Invalid(format!(
                "round {}: {} batches with {} pages arrived, {} with {} announced",
                end.round, p.batches, p.pages, end.batches, end.pages
            ))));
        }
        let suspects = page_runs(&p.suspects, self.page_size);
        if !suspects.is_empty() && end.last {
            return Err(refused(
                conn,
                ErrorCode::Checksum,
                format!(
                    "{} page(s) from {:#x} failed their checksum in the final round {}: corrupted in transit",
                    p.suspects.len(),
                    p.suspects[0],
                    end.round
                ),
            ));
        }
        if suspects.len() > MAX_ACK_RUNS {
            return Err(refused(
                conn,
                ErrorCode::Checksum,
                format!(
                    "round {}: {} pages failed their checksum",
                    end.round,
                    p.suspects.len()
                ),
            ));
        }
        if !suspects.is_empty() {
            // Expected while a running process is copied: pages written in flight.
            tracing::debug!(
                round = end.round,
                pages = p.suspects.len(),
                first = format_args!("{:#x}", p.suspects[0]),
                "pages failed their checksum; accepted only if the sender sends them again"
            );
        }
        let ack = RoundAck {
            round: end.round,
            pages: p.pages,
            image_bytes: image.bytes(),
            suspects,
        };
        *p = Progress {
            round: end.round + 1,
            sealed: end.last,
            ..Progress::default()
        };
        Ok(ack)
    }

    /// Receives one batch into the image and checks it.
    fn land_batch(
        &self,
        conn: &mut Conn,
        session: &Session<S::Image>,
        image: &S::Image,
        body: &[u8],
    ) -> Result<(), TransportError> {
        let peer = conn.peer().to_owned();
        land_batch(
            &peer,
            self.page_size,
            self.config.max_suspect_pages,
            session,
            image,
            body,
            Some(conn),
        )
    }

    fn run_data(&self, conn: &mut Conn, session_id: u64, index: u16) -> Result<Outcome, TransportError> {
        let session = lock(&self.sessions).get(&session_id).cloned();
        let Some(session) = session else {
            let e = refused(conn, ErrorCode::Session, "no such session".into());
            conn.send_error(ErrorCode::Session, "no such session");
            return Err(e);
        };
        let image = lock(&session.image).clone();
        let Some(image) = image else {
            conn.send_error(ErrorCode::Session, "data stream before begin");
            return Err(refused(
                conn,
                ErrorCode::Session,
                "data stream before begin".into(),
            ));
        };
        {
            let mut joined = lock(&session.joined);
            if index >= session.granted || joined.iter().any(|(i, _)| *i == index) {
                drop(joined);
                let m = format!("data stream {index} not granted or already joined");
                conn.send_error(ErrorCode::Session, &m);
                return Err(refused(conn, ErrorCode::Session, m));
            }
            joined.push((index, conn.try_clone_stream()?));
        }
        loop {
            let r = conn.recv().and_then(|f| match f.kind {
                Kind::Batch => self.land_batch(conn, &session, &image, &f.body),
                other => Err(conn.wire(WireError::Unexpected {
                    got: other,
                    state: "on a data stream",
                })),
            });
            match r {
                Ok(()) => {}
                // The sender closes its data streams when it is done or gives up; the control
                // connection decides the image's fate.
                Err(TransportError::Closed {
                    during: "between frames",
                    ..
                }) => {
                    return Ok(Outcome::StreamDone);
                }
                Err(e) => {
                    conn.reset_on_close();
                    if session.failure().is_none() {
                        let (code, reason) = refusal_of(&e);
                        tracing::warn!(peer = %session.peer, stream = index, %reason, "data stream failed");
                        session.fail(code, format!("data stream {index}: {reason}"));
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Lands one batch: read from `stream` (with a placing transport, `None`: the pages are in the
/// image already), then checked against the batch's checksums.
fn land_batch<I: ImageSink>(
    peer: &str,
    page_size: u64,
    max_suspects: u64,
    session: &Session<I>,
    image: &I,
    body: &[u8],
    stream: Option<&mut Conn>,
) -> Result<(), TransportError> {
    let refused = |code, reason| TransportError::Refused {
        peer: peer.to_owned(),
        code,
        reason,
    };
    let b = Batch::decode(body, page_size).map_err(|source| TransportError::Wire {
        peer: peer.to_owned(),
        source,
    })?;
    check_round(peer, session, b.round, "batch")?;
    let ps = usize::try_from(page_size).unwrap_or(4096);
    let bad = match stream {
        // From a stream into a file: through a warm buffer, checked there.
        Some(conn) if image.lands_in_file() => {
            let mut pieces = Vec::with_capacity(b.runs.len());
            for r in &b.runs {
                pieces.extend(image.file_landing(r).map_err(|(c, m)| refused(c, m))?);
            }
            recv_into_file(conn, &pieces, &b.sums, ps)?
        }
        stream => {
            let mut zones = Vec::with_capacity(b.runs.len());
            for r in &b.runs {
                zones.extend(image.landing(r).map_err(|(c, m)| refused(c, m))?);
            }
            if let Some(conn) = stream {
                conn.recv_pages(&zones)?;
            }
            image.verify(&zones, &b.sums, ps)
        }
    };
    image.landed(&b.runs, &b.sums, &bad);
    let mut p = lock(&session.progress);
    if !bad.is_empty() {
        let addrs = page_addrs(&b.runs, page_size);
        p.suspects.extend(bad.iter().filter_map(|&i| addrs.get(i)));
        if p.suspects.len() as u64 > max_suspects {
            drop(p);
            return Err(refused(
                ErrorCode::Checksum,
                "too many pages failed their checksum".into(),
            ));
        }
    }
    p.batches += 1;
    p.pages += b.pages() as u64;
    drop(p);
    session.cv.notify_all();
    Ok(())
}

/// Bytes a stream reads at a time into its buffer before writing them to the image's file: small
/// enough to stay in the cache between the socket copy, the checksums and the write.
const FILE_CHUNK: usize = 1 << 20;

thread_local! {
    /// Each stream's buffer (a stream is served by a thread of its own).
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads the pages of a batch from `conn` into `pieces` of the image's file, [`FILE_CHUNK`] at a
/// time; returns the indices of the pages whose checksum does not match `sums`. Pieces the image
/// keeps mapped and allocated (its reserve) are received straight into the mapping; the others go
/// through the stream's buffer and `pwrite`. Either way a chunk spans pieces: a later round's batch
/// of scattered single pages is a few reads, not one per page. Writing fails as allocating image
/// memory does: `Limit` when the memory ran out.
fn recv_into_file(
    conn: &mut Conn,
    pieces: &[FilePiece<'_>],
    sums: &[u32],
    page: usize,
) -> Result<Vec<usize>, TransportError> {
    let chunk = FILE_CHUNK.max(page) / page * page;
    let mut check = Checker {
        sums,
        next: 0,
        bad: Vec::new(),
    };
    let mut i = 0;
    while i < pieces.len() {
        let mapped = pieces[i].mapped.is_some();
        let n = pieces[i..]
            .iter()
            .take_while(|p| p.mapped.is_some() == mapped)
            .count();
        let group = &pieces[i..i + n];
        if mapped {
            recv_into_mapped(conn, group, page, chunk, &mut check)?;
        } else {
            recv_through_buffer(conn, group, page, chunk, &mut check)?;
        }
        i += n;
    }
    Ok(check.bad)
}

/// A batch's pages checked against its checksums in the order they arrive.
struct Checker<'a> {
    sums: &'a [u32],
    /// The batch's index of the next page.
    next: usize,
    /// Pages whose checksum did not match.
    bad: Vec<usize>,
}

impl Checker<'_> {
    /// The next page, with its checksum (`None`: it could not be read).
    fn page(&mut self, sum: Option<u32>) {
        if sum.is_none() || sum != self.sums.get(self.next).copied() {
            self.bad.push(self.next);
        }
        self.next += 1;
    }
}

/// Receives `pieces` (all mapped) straight into their mappings, up to `chunk` bytes a call (one
/// `recvmsg` over several pieces), and checks each chunk's pages while they are still in the
/// cache.
fn recv_into_mapped(
    conn: &mut Conn,
    pieces: &[FilePiece<'_>],
    page: usize,
    chunk: usize,
    check: &mut Checker<'_>,
) -> Result<(), TransportError> {
    let mut land = |conn: &mut Conn, parts: &[Landing<'_>]| -> Result<(), TransportError> {
        conn.recv_pages(parts)?;
        for z in parts {
            for off in (0..z.len()).step_by(page) {
                check.page(z.page_sum(off, page));
            }
        }
        Ok(())
    };
    let mut parts = Vec::new();
    let mut filled = 0;
    for z in pieces.iter().filter_map(|p| p.mapped) {
        let mut at = 0;
        while at < z.len() {
            let n = (chunk - filled).min(z.len() - at);
            parts.push(z.part(at, n).expect("page-aligned parts of a page-aligned zone"));
            (at, filled) = (at + n, filled + n);
            if filled == chunk {
                land(conn, &parts)?;
                parts.clear();
                filled = 0;
            }
        }
    }
    if !parts.is_empty() {
        land(conn, &parts)?;
    }
    Ok(())
}

/// Receives `pieces` (none mapped) through the stream's buffer, `chunk` bytes at a time, checks
/// them there and writes them into the file with `pwrite`.
fn recv_through_buffer(
    conn: &mut Conn,
    pieces: &[FilePiece<'_>],
    page: usize,
    chunk: usize,
    check: &mut Checker<'_>,
) -> Result<(), TransportError> {
    BOUNCE.with_borrow_mut(|bounce| {
        let total: usize = pieces.iter().map(|p| p.len).sum();
        if bounce.len() < chunk.min(total) {
            bounce.resize(chunk.min(total), 0);
        }
        let (mut piece, mut within) = (0, 0);
        let mut done = 0;
        while done < total {
            let n = chunk.min(total - done);
            let buf = &mut bounce[..n];
            conn.recv_bytes(buf)?;
            for p in buf.chunks(page) {
                check.page(Some(crate::sys::checksum::page_sum_bytes(p)));
            }
            let mut at = 0;
            while at < n {
                let Some(p) = pieces.get(piece) else { break };
                let k = (p.len - within).min(n - at);
                std::os::unix::fs::FileExt::write_all_at(p.file, &buf[at..at + k], p.offset + within as u64)
                    .map_err(|source| TransportError::ImageWrite {
                        peer: conn.peer().to_owned(),
                        source,
                    })?;
                at += k;
                within += k;
                if within == p.len {
                    piece += 1;
                    within = 0;
                }
            }
            done += n;
        }
        Ok(())
    })
}

fn refused(conn: &Conn, code: ErrorCode, reason: String) -> TransportError {
    TransportError::Refused {
        peer: conn.peer().to_owned(),
        code,
        reason,
    }
}

fn page_addrs(runs: &[Range<u64>], page_size: u64) -> Vec<u64> {
    runs.iter()
        .flat_map(|r| (r.start..r.end).step_by(usize::try_from(page_size).unwrap_or(4096)))
        .collect()
}

/// Sorted, merged runs from page addresses in any order.
fn page_runs(pages: &[u64], page_size: u64) -> Vec<Range<u64>> {
    let mut v = pages.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<Range<u64>> = Vec::new();
    for p in v {
        match out.last_mut() {
            Some(r) if r.end == p => r.end = p + page_size,
            _ => out.push(p..p + page_size),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::net::{TcpListener, TcpStream};

    /// Pieces whose bounds fall inside the 1 MiB chunks, in a file out of order: every byte lands
    /// where its piece says, and a page changed on the way is reported by its index in the batch.
    #[test]
    fn pages_land_in_their_pieces_across_chunks_and_a_bad_page_is_named() {
        let page = 4096;
        // Pages per piece, and where in the file each piece goes (in pages).
        let layout = [(3usize, 700usize), (300, 0), (1, 650), (40, 310), (5, 400)];
        let total: usize = layout.iter().map(|(n, _)| n).sum::<usize>() * page;
        let data: Vec<u8> = (0..total)
            .flat_map(|i| u8::try_from((i * 7 + i / page) % 251))
            .collect();
        let sums: Vec<u32> = data
            .chunks(page)
            .map(crate::sys::checksum::page_sum_bytes)
            .collect();
        let mut wire = data.clone();
        let bad_page = 301;
        wire[bad_page * page + 17] ^= 1;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || TcpStream::connect(addr).unwrap().write_all(&wire));
        let mut conn = Conn::new(listener.accept().unwrap().0);
        let mut file = tempfile();
        let pieces: Vec<FilePiece<'_>> = layout
            .iter()
            .map(|&(n, at)| FilePiece {
                file: &file,
                offset: (at * page) as u64,
                len: n * page,
                mapped: None,
            })
            .collect();
        let bad = recv_into_file(&mut conn, &pieces, &sums, page).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(bad, vec![bad_page]);
        let mut landed = Vec::new();
        file.rewind().unwrap();
        file.read_to_end(&mut landed).unwrap();
        let mut at_wire = 0;
        for (n, at) in layout {
            let (want, got) = (
                &data[at_wire..at_wire + n * page],
                &landed[at * page..(at + n) * page],
            );
            if at_wire / page <= bad_page && bad_page < at_wire / page + n {
                let k = (bad_page - at_wire / page) * page + 17;
                assert_eq!(got[k], want[k] ^ 1, "the changed byte lands as received");
                assert_eq!(got[..k], want[..k]);
                assert_eq!(got[k + 1..], want[k + 1..]);
            } else {
                assert!(got == want, "piece at page {at}");
            }
            at_wire += n * page;
        }
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("om-recv-into-file-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
