//! Restoring a migrated image on this node: the prepared copy of the two-phase commit, the go, and
//! the relay that connects the running copy to its home.
//!
//! On commit of a migration image omd writes the manifest (the runs point into the image memfd) to
//! `STATE/incoming/ID/`, and starts `om-restore DIR --pages-fd 3 --ready-fd 4 --hold-fd 5` with the
//! memfd, a ready pipe and a hold pipe. om-restore restores the process, reports its pid on the ready
//! pipe and holds it before its first instruction: that is *prepared*. On `Go` omd writes `g` to
//! the hold pipe and the copy runs; if the image is dropped first (the source gave up or went away)
//! the hold pipe closes and om-restore discards the copy.
//!
//! The program's stdio are pipes to omd, or, for those that were on a terminal (the image's terminal
//! record), a pseudo-terminal in that terminal's state, which om-restore makes the controlling
//! terminal of the program's own session. Once it runs, a relay thread carries them to its home
//! (`omrun`, reached with the home record the image carries, see [`om_transport::relay`]) together
//! with signals and window sizes from home and, at the end, its exit status or the news that it
//! moved on.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use om::image::Checkpoint;
use om::image::checkpoint::{MANIFEST, Run};
use om::image::records::{KIND_HOME, KIND_TERMINAL};
use om_transport::api::{ImageSink, Refusal};
use om_transport::conn::Conn;
use om_transport::relay::{self, Home, Msg, Terminal};
use om_transport::tcp::receiver::CrashPoint;
use om_transport::wire::{Begin, ErrorCode};

use crate::image::Image;
use crate::runtimes::Runtimes;

/// How long om-restore may take to prepare a copy (a poll timeout: at most 65 s).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a copy's start waits for its home's grant.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the relay tries to reach the home.
const HOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Restores migration images on this node.
#[derive(Debug)]
pub struct Restorer {
    /// The `om-restore` program.
    pub program: PathBuf,
    /// Where manifests of incoming migrations are written.
    pub dir: PathBuf,
    /// The runtimes registered here (a copy that moves on says so through its runtime).
    pub runtimes: Runtimes,
    /// This omd's control socket (the restored runtime registers there).
    pub control: PathBuf,
    /// This omd's listen address (the relay tells the process's home where it runs).
    pub listen: std::net::SocketAddr,
    /// For fault tests (`OM_FAULT`): [`CrashPoint::HomeUnreachable`] sends every claim to a closed
    /// port.
    pub fault: Option<CrashPoint>,
}

/// A restored copy held before its first instruction.
#[derive(Debug)]
pub struct Prepared {
    child: Child,
    hold: Option<File>,
    pid: u32,
    dir: PathBuf,
    streams: Streams,
    home: Option<Home>,
    runtimes: Runtimes,
    listen: std::net::SocketAddr,
}

fn internal(what: &str) -> impl Fn(io::Error) -> Refusal + '_ {
    move |e| (ErrorCode::Internal, format!("{what}: {e}"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// omd's side of a copy's standard streams.
#[derive(Debug)]
struct Streams {
    /// Where stdin bytes from home go: the stdin pipe, or the terminal's master.
    input: Option<File>,
    /// A reader of the stdin pipe, for what the copy leaves unread in it.
    peek: Option<File>,
    /// What to relay, by stream (1 stdout, 2 stderr): pipes, and the terminal's master once, as the
    /// first of the two that is on it.
    outputs: Vec<(u8, File)>,
    /// Where descriptor 2's output shows (om-restore's reason when it fails).
    diag: File,
    /// The pseudo-terminal, when some were on a terminal.
    terminal: Option<Tty>,
}

#[derive(Debug)]
struct Tty {
    master: File,
    /// omd's own slave: what the copy leaves unread is read from it, and it must close before the
    /// master can end.
    slave: Option<File>,
    /// The descriptors on it (bit n: descriptor n).
    fds: u8,
}

impl Streams {
    /// Pipes, and a pseudo-terminal in the state of `terminal` for the descriptors on it; returns
    /// omd's side and the child's descriptors 0, 1, 2.
    fn open(terminal: Option<&Terminal>) -> io::Result<(Self, [OwnedFd; 3])> {
        let tty = terminal
            .map(|t| crate::sys::open_terminal(t).map(|pair| (pair, t.fds)))
            .transpose()?;
        let on_tty = |fd: u8| tty.as_ref().is_some_and(|(_, fds)| fds & (1 << fd) != 0);
        let (input, peek, child0) = match &tty {
            Some(((master, slave), _)) if on_tty(0) => (master.try_clone()?, None, slave.try_clone()?),
            _ => {
                let (r, w) = pipe()?;
                (w, Some(File::from(r.try_clone()?)), r)
            }
        };
        let mut outputs = Vec::new();
        let mut diag = None;
        let mut child = Vec::new();
        for fd in [1u8, 2] {
            match &tty {
                Some(((master, slave), _)) if on_tty(fd) => {
                    child.push(slave.try_clone()?);
                    if outputs.iter().all(|(s, _)| !on_tty(*s)) {
                        outputs.push((fd, File::from(master.try_clone()?)));
                    }
                    if fd == 2 {
                        diag = Some(File::from(master.try_clone()?));
                    }
                }
                _ => {
                    let (r, w) = pipe()?;
                    child.push(w);
                    if fd == 2 {
                        diag = Some(File::from(r.try_clone()?));
                    }
                    outputs.push((fd, File::from(r)));
                }
            }
        }
        let [child1, child2]: [OwnedFd; 2] = child.try_into().map_err(|_| io::Error::other("stdio"))?;
        let diag = diag.ok_or_else(|| io::Error::other("stdio"))?;
        let terminal = tty.map(|((master, slave), fds)| Tty {
            master: File::from(master),
            slave: Some(File::from(slave)),
            fds,
        });
        Ok((
            Self {
                input: Some(File::from(input)),
                peek,
                outputs,
                diag,
                terminal,
            },
            [child0, child1, child2],
        ))
    }

    /// Once the copy has ended: what it left unread on the terminal, and the terminal's slave
    /// closed, so that its output ends. Empty without a terminal.
    fn release_terminal(&mut self) -> Vec<u8> {
        let slave = self.terminal.as_mut().and_then(|t| t.slave.take());
        slave.map(|s| crate::sys::drain_terminal(&s)).unwrap_or_default()
    }
}

impl Restorer {
    /// Restores `image` up to the prepared state.
    ///
    /// # Errors
    /// The manifest could not be written or om-restore failed (its message is the reason).
    pub fn prepare(&self, image: &Image) -> Result<Prepared, Refusal> {
        let started = Instant::now();
        let dir = self.dir.join(image.id().to_string());
        fs::create_dir_all(&dir).map_err(internal("creating the restore directory"))?;
        // No checksums: omd checked every page as it landed, and the copy is restored from this
        // very memory (`om-restore --pages-fd`); 4 bytes per page less to write and read while
        // the process is frozen.
        let runs = image.state_runs();
        let records = image.records();
        let mut home = records
            .iter()
            .find(|r| r.kind == KIND_HOME)
            .and_then(|r| Home::decode(&r.bytes).ok());
        if let Some(h) = home
            .as_mut()
            .filter(|_| self.fault == Some(CrashPoint::HomeUnreachable))
        {
            tracing::error!("OM_FAULT: the home is unreachable");
            h.addr.set_port(1);
        }
        let ckpt = Checkpoint {
            dir: dir.clone(),
            page_size: image.page_size(),
            version: om::image::checkpoint::VERSION,
            begin: Begin {
                info: *image.info(),
                vmas: image.vmas(),
            },
            runs: runs
                .into_iter()
                .map(|r| Run {
                    addr: r.addr,
                    data: r.data,
                    offset: if r.data { r.offset } else { 0 },
                })
                .collect(),
            sums: Vec::new(),
            records,
        };
        let manifest = ckpt
            .encode_manifest()
            .map_err(|e| (ErrorCode::Internal, format!("image manifest: {e}")))?;
        // No sync: the manifest only has to outlive this omd's handling of the image.
        fs::write(dir.join(MANIFEST), manifest).map_err(internal("writing the image manifest"))?;

        // A terminal for the copy only where it writes to one: stdin alone on a terminal (output
        // redirected) stays a pipe, as the input it gets from home is.
        let terminal = image
            .records()
            .iter()
            .find(|r| r.kind == KIND_TERMINAL)
            .and_then(|r| Terminal::decode(&r.bytes).ok())
            .filter(|t| t.fds & 0b110 != 0);
        let (ready_r, ready_w) = pipe().map_err(internal("pipe"))?;
        let (hold_r, hold_w) = pipe().map_err(internal("pipe"))?;
        let (streams, [in_r, out_w, err_w]) =
            Streams::open(terminal.as_ref()).map_err(internal("setting up the copy's stdio"))?;
        let mut cmd = Command::new(&self.program);
        cmd.env(om::control::CONTROL_ENV, &self.control)
            .arg(&dir)
            .args([
                "--pages-fd",
                "3",
                "--ready-fd",
                "4",
                "--hold-fd",
                "5",
                "--session",
            ])
            .stdin(Stdio::from(in_r))
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w));
        let fds = [
            image.memory().file().as_raw_fd(),
            ready_w.as_raw_fd(),
            hold_r.as_raw_fd(),
        ];
        let mut child = crate::sys::spawn_with_fds(&mut cmd, &fds).map_err(|e| {
            (
                ErrorCode::Internal,
                format!("cannot start {}: {e}", self.program.display()),
            )
        })?;
        drop((ready_w, hold_r));
        let mut line = String::new();
        let ready = File::from(ready_r);
        let in_time = {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            use std::os::fd::AsFd;
            let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(PREPARE_TIMEOUT.as_millis()).unwrap_or(u16::MAX);
            matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
        };
        let got = if in_time {
            BufReader::new(ready).read_line(&mut line)
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "om-restore did not get ready",
            ))
        };
        let pid = match (got, line.trim().parse::<u32>()) {
            (Ok(_), Ok(pid)) => pid,
            _ => {
                // om-restore failed: its stderr says why.
                let _ = child.kill();
                let _ = child.wait();
                let mut why = String::new();
                let _ = nix::fcntl::fcntl(
                    &streams.diag,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                );
                let _ = (&streams.diag).take(4096).read_to_string(&mut why);
                let _ = fs::remove_dir_all(&dir);
                let why = why.trim();
                return Err((
                    ErrorCode::Internal,
                    format!(
                        "restore failed: {}",
                        if why.is_empty() {
                            "om-restore ended without a word"
                        } else {
                            why
                        }
                    ),
                ));
            }
        };
        tracing::info!(
            pid,
            image = image.id(),
            ms = started.elapsed().as_millis(),
            "copy prepared"
        );
        Ok(Prepared {
            child,
            hold: Some(File::from(hold_w)),
            pid,
            dir,
            streams,
            home,
            runtimes: self.runtimes.clone(),
            listen: self.listen,
        })
    }
}

impl Prepared {
    /// Starts the copy of the migration with commit token `token`, and its relay; returns its pid on
    /// this node. A copy with a home starts only if the home grants it (the first claim on the token
    /// decides, [`om_transport::relay`]): a source that could not learn whether it started may have
    /// resumed already.
    ///
    /// # Errors
    /// The home refused the copy or could not be reached (the copy is discarded), or the hold pipe
    /// could not be written (om-restore is gone).
    pub fn go(mut self, token: u64) -> Result<u32, Refusal> {
        let pid = self.pid;
        // Dropping `self` before `hold` is taken discards the copy.
        let claimed = match &self.home {
            Some(home) => Some(claim_start(home, token, pid)?),
            None => None,
        };
        let mut hold = self
            .hold
            .take()
            .ok_or((ErrorCode::Internal, "no hold pipe".to_owned()))?;
        let _ = fs::remove_dir_all(&self.dir);
        // The relay thread exists before the copy may run: once `g` is written nothing can fail.
        let (start, started) = std::sync::mpsc::channel::<bool>();
        let runtimes = self.runtimes.clone();
        thread::Builder::new()
            .name(format!("omd-relay-{pid}"))
            .spawn(move || {
                let runtimes = self.runtimes.clone();
                if started.recv() == Ok(true) {
                    self.relay(claimed);
                } else {
                    let _ = self.child.wait();
                }
                runtimes.forget_expected(pid);
            })
            // Dropping `hold` on the way out discards the copy.
            .map_err(internal("starting the relay"))?;
        // Before the copy can register: a request right after the migration waits for it.
        runtimes.expect(pid);
        match hold.write_all(b"g") {
            Ok(()) => {
                let _ = start.send(true);
                Ok(pid)
            }
            Err(e) => {
                let _ = start.send(false);
                Err(internal("starting the copy")(e))
            }
        }
    }

    /// Carries stdio, signals and the end of the copy between it and its home.
    /// `claimed`: the connection on which the home granted the start, attached here.
    fn relay(mut self, claimed: Option<Conn>) {
        let pid = self.pid;
        let conn = self.home.as_ref().and_then(|h| {
            claimed
                .and_then(|mut c| match relay::attach(&mut c, h, self.listen) {
                    Ok(()) => Some(c),
                    Err(e) => {
                        tracing::debug!(pid, error = %e, "attaching after the claim failed; connecting again");
                        None
                    }
                })
                .or_else(|| connect_home(h, self.listen, pid))
        });
        let Some(conn) = conn else {
            // No home to report to: the output goes to omd's own.
            drop(self.streams.input.take());
            let pumps: Vec<_> = self
                .streams
                .outputs
                .drain(..)
                .map(|(s, f)| pump_local(f, s))
                .collect();
            let status = self.child.wait();
            self.streams.release_terminal();
            for p in pumps {
                let _ = p.join();
            }
            tracing::info!(pid, ?status, "migrated process ended");
            return;
        };
        let writer = Arc::new(Mutex::new(conn.try_clone().ok()));
        if let Some(t) = &self.streams.terminal {
            // Before any output: omrun switches its terminal to raw mode for it.
            if let Some(w) = writer.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
                let _ = relay::send(w, &Msg::Terminal(t.fds));
            }
        }
        let pumps: Vec<_> = self
            .streams
            .outputs
            .drain(..)
            .map(|(s, f)| pump_home(f, s, Arc::clone(&writer)))
            .collect();
        let mut reader = conn;
        // Input goes through a queue and a writer thread that never blocks the relay: what the
        // copy has not taken when it moves on is handed back, nothing is lost.
        let feed = Arc::new(Feed::default());
        let writer_thread = self.streams.input.take().map(|s| {
            let feed = Arc::clone(&feed);
            thread::spawn(move || feed.write_into(s))
        });
        let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
        let runtimes = self.runtimes.clone();
        let input_feed = Arc::clone(&feed);
        let master = self
            .streams
            .terminal
            .as_ref()
            .and_then(|t| t.master.try_clone().ok());
        let _input = thread::spawn(move || {
            loop {
                match relay::recv(&mut reader) {
                    Ok(Msg::Input(b)) => input_feed.push(&b),
                    Ok(Msg::InputEnd) => {
                        input_feed.end();
                        let _ = ended_tx.send(());
                    }
                    Ok(Msg::Signal(sig)) => {
                        // While the copy here is being migrated on, signals wait: they belong to
                        // wherever it runs next.
                        if !runtimes.hold_signal(pid, sig) {
                            deliver(pid, sig);
                        }
                    }
                    // The kernel tells the program (SIGWINCH to the terminal's foreground group).
                    Ok(Msg::Resize(size)) => match &master {
                        Some(m) => {
                            if let Err(e) = crate::sys::set_window_size(m, size) {
                                tracing::warn!(pid, error = %e, "cannot set the copy's window size");
                            }
                        }
                        None => tracing::warn!(pid, "a window size for a copy without a terminal"),
                    },
                    Ok(other) => tracing::warn!(pid, ?other, "unexpected relay message from home"),
                    Err(_) => return,
                }
            }
        });
        let status = self.child.wait();
        let left_on_terminal = self.streams.release_terminal();
        for p in pumps {
            let _ = p.join();
        }
        let moved = self.runtimes.take_moved(pid);
        let held = self.runtimes.end_migrating(pid);
        let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(w) = w.as_mut() else { return };
        let end = if moved {
            // The copy moved on: stop the home's input, then hand back what the copy left unread:
            // its pipe or terminal first, then what was still queued.
            let _ = relay::send(w, &Msg::Stop);
            let _ = ended_rx.recv_timeout(HOME_TIMEOUT);
            feed.stop();
            if let Some(t) = writer_thread {
                let _ = t.join();
            }
            for sig in held {
                let _ = relay::send(w, &Msg::Signal(sig));
            }
            let mut left = left_on_terminal;
            if let Some(peek) = &self.streams.peek {
                left.extend(unread(peek));
            }
            left.extend(feed.take());
            left.truncate(relay::MAX_LEFTOVER);
            Msg::Moved(left)
        } else {
            let code = match &status {
                Ok(s) => s.signal().unwrap_or_else(|| s.code().unwrap_or(1) << 8),
                Err(_) => 1 << 8,
            };
            Msg::Exit(code)
        };
        tracing::info!(pid, moved, ?status, "migrated process ended here");
        let _ = relay::send(w, &end);
        // Nothing follows: the input thread ends on the closed connection, and omrun lets go.
        w.shutdown();
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.hold.is_some() {
            // Never started: closing the hold pipe makes om-restore discard the copy.
            drop(self.hold.take());
            let _ = self.child.wait();
            let _ = fs::remove_dir_all(&self.dir);
            tracing::info!(pid = self.pid, "prepared copy discarded");
        }
    }
}

/// Asks `home` for the start of the copy of `token`, for up to [`CLAIM_TIMEOUT`]; returns the
/// connection it granted it on.
fn claim_start(home: &Home, token: u64, pid: u32) -> Result<Conn, Refusal> {
    let claimed = relay::retry(CLAIM_TIMEOUT, Duration::from_millis(100), || {
        relay::open(home, CLAIM_TIMEOUT)
            .and_then(|mut c| Ok((relay::claim(&mut c, token, true)?, c)))
            .inspect_err(|e| tracing::debug!(pid, error = %e, "home not reachable for the claim yet"))
    });
    match claimed {
        Ok((true, c)) => Ok(c),
        Ok((false, _)) => {
            tracing::warn!(
                pid,
                "the process's home cancelled this migration: its source resumed"
            );
            Err((
                ErrorCode::Session,
                "the process's home cancelled this migration (its source resumed)".into(),
            ))
        }
        Err(e) => {
            let reason = format!(
                "cannot reach the process's home at {} to start the copy: {}",
                home.addr,
                om_transport::error::chain(&e)
            );
            tracing::warn!(pid, %reason);
            Err((ErrorCode::Timeout, reason))
        }
    }
}

fn connect_home(home: &Home, listen: std::net::SocketAddr, pid: u32) -> Option<Conn> {
    relay::retry(HOME_TIMEOUT, Duration::from_millis(200), || {
        relay::connect(home, listen, Duration::from_secs(5))
            .inspect_err(|e| tracing::debug!(pid, error = %e, "home not reachable yet"))
    })
    .inspect_err(|e| {
        tracing::warn!(pid, home = %home.addr, error = %om_transport::error::chain(e), "cannot reach the process's home; its output goes to omd's");
    })
    .ok()
}

fn pump_local(from: File, stream: u8) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        pump(&from, |bytes| {
            let _ = if stream == 2 {
                io::stderr().write_all(bytes)
            } else {
                io::stdout().write_all(bytes)
            };
        });
    })
}

fn pump_home(from: File, stream: u8, to: Arc<Mutex<Option<Conn>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        pump(&from, |bytes| {
            let mut c = to.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(conn) = c.as_mut() {
                if relay::send(conn, &Msg::Output(stream, bytes.to_vec())).is_err() {
                    *c = None;
                }
            }
        });
    })
}

/// Reads `from` to its end (end of file, or `EIO` from a terminal's master once its slave is
/// closed), handing each chunk to `each`. A terminal's master is shared with the input writer, which
/// makes it non-blocking: then it waits for data.
fn pump(mut from: &File, mut each: impl FnMut(&[u8])) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut buf = vec![0u8; relay::MAX_CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => each(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Sends `sig` to process `pid` of this node.
fn deliver(pid: u32, sig: i32) {
    if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)), sig);
    }
}

/// Stdin bytes from home on their way into the copy's stdin pipe.
#[derive(Debug, Default)]
struct Feed {
    state: Mutex<FeedState>,
    cv: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct FeedState {
    bytes: std::collections::VecDeque<u8>,
    ended: bool,
    stopped: bool,
}

impl Feed {
    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, b: &[u8]) {
        self.lock().bytes.extend(b);
        self.cv.notify_all();
    }

    fn end(&self) {
        self.lock().ended = true;
        self.cv.notify_all();
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.cv.notify_all();
    }

    fn take(&self) -> Vec<u8> {
        self.lock().bytes.drain(..).collect()
    }

    /// Writes queued bytes into `pipe` (made non-blocking) until the input ends or the feed stops;
    /// bytes not written stay queued.
    fn write_into(&self, pipe: File) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let _ = nix::fcntl::fcntl(
            &pipe,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let mut chunk = Vec::with_capacity(relay::MAX_CHUNK);
        loop {
            {
                let mut st = self.lock();
                while st.bytes.is_empty() && !st.ended && !st.stopped {
                    st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
                if st.stopped || (st.bytes.is_empty() && st.ended) {
                    return;
                }
                chunk.clear();
                chunk.extend(st.bytes.iter().take(relay::MAX_CHUNK));
            }
            match (&pipe).write(&chunk) {
                Ok(n) => {
                    self.lock().bytes.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(100u16));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// The bytes left in the copy's stdin pipe (it has ended; nobody writes any more).
fn unread(peek: &File) -> Vec<u8> {
    let _ = nix::fcntl::fcntl(peek, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK));
    let mut out = Vec::new();
    let _ = peek.take(relay::MAX_LEFTOVER as u64).read_to_end(&mut out);
    out
}
