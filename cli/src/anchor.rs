//! The home anchor: `omrun` stays on the home node while its process runs, wherever it runs, keeps
//! its stdio flowing, forwards the signals it receives, and ends the way the process ended.
//!
//! At home the program uses omrun's stdin, stdout and stderr directly. omrun also listens for relay
//! connections ([`om_transport::relay`]) and gives the program `OM_ANCHOR=FD,PORT,TOKEN`: a socket
//! on which its runtime says `moved` just before the home copy ends, omrun's relay port, and a fresh
//! random home token that relays must prove. Each node the process runs on away from home connects
//! back as one *generation*; omrun writes a generation's output only once the previous one has ended,
//! reads its own stdin only once the process has left home, and hands each generation the stdin
//! bytes the previous one left unread: in order, nothing lost or repeated.
//!
//! When the copy's stdin is a pseudo-terminal on its node (the process's stdio was omrun's terminal,
//! the relay says `Terminal`), omrun puts its own terminal in raw mode while that copy reads it, as
//! `ssh -t` does: keys go through unchanged, and the copy's terminal edits lines, echoes and turns
//! `^C` into `SIGINT` by the program's own settings. Window size changes go along as `Resize`. omrun
//! gives its terminal its settings back when it ends.
//!
//! Signals are blocked in omrun and read from a `signalfd`, so there is no handler and no race with the
//! child's exit: `SIGCHLD` arrives on the same descriptor. A signal that the kernel generated for the
//! whole foreground process group (Ctrl-C on a terminal) already reached the child, which shares omrun's
//! process group, so only signals sent by a process (`kill`, `sigqueue`, `tgkill`) are forwarded.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::time::Duration;

use om_transport::conn::Conn;
use om_transport::relay::{self, Msg};

use crate::claims::Claims;

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, raise, sigprocmask};
use nix::sys::signalfd::SignalFd;
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};
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
    /// The relay listener could not be set up.
    #[error("cannot set up the relay listener")]
    Relay(#[source] std::io::Error),
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

/// Runs `prog args` as a child, relays its stdio and signals wherever it runs until it ends, and
/// returns how it ended.
///
/// `env` is added to the child's environment (the runtime's `LD_PRELOAD`); `control` is the home
/// omd's control socket, told where the process runs after each move.
///
/// # Errors
/// An [`AnchorError`] when the program cannot be started or watched. The program's own failure is an
/// [`Outcome`], not an error.
pub fn run(
    prog: &OsString,
    args: &[OsString],
    env: &[(OsString, OsString)],
    control: &std::path::Path,
) -> Result<Outcome, AnchorError> {
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

    // Both address families where the node has IPv6 (a v6 socket takes v4 too), else v4.
    let listener = TcpListener::bind(("::", 0))
        .or_else(|_| TcpListener::bind(("0.0.0.0", 0)))
        .map_err(AnchorError::Relay)?;
    let port = listener.local_addr().map_err(AnchorError::Relay)?.port();
    let token: [u8; 32] = om_transport::auth::random_bytes();
    let (home_end, child_end) = UnixStream::pair().map_err(AnchorError::Relay)?;
    // The child's end must survive exec: a dup has no close-on-exec flag.
    let child_fd = nix::unistd::dup(&child_end).map_err(|e| AnchorError::Relay(e.into()))?;
    drop(child_end);
    let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
    let anchor = format!("{},{port},{hex}", child_fd.as_raw_fd());

    let mut cmd = Command::new(prog);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("OM_ANCHOR", anchor);
    // The child keeps omrun's argv[0] semantics: it sees its own name, not omrun's.
    cmd.arg0(prog);
    crate::sys::clear_signal_mask_in_child(&mut cmd);
    let child = cmd.spawn().map_err(|source| AnchorError::Spawn {
        prog: prog.clone(),
        source,
    })?;
    drop(child_fd);
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    tracing::debug!(pid = pid.as_raw(), port, "started");
    home_end.set_nonblocking(true).map_err(AnchorError::Relay)?;

    let (tx, rx) = mpsc::channel();
    spawn_signals(sfd, tx.clone());
    spawn_listener(listener, token.to_vec(), tx.clone());
    let mut home = Home {
        pid: Some(pid),
        home_pid: pid,
        control: control.to_path_buf(),
        located: 0,
        anchor: home_end,
        gens: BTreeMap::new(),
        active: 0,
        stdin: Vec::new(),
        stdin_eof: false,
        stdin_started: false,
        signals: Vec::new(),
        frozen: false,
        moved: false,
        cooked: None,
        sized: 0,
        tx,
    };
    loop {
        let event = rx
            .recv()
            .map_err(|_| AnchorError::Relay(std::io::ErrorKind::BrokenPipe.into()))?;
        if let Some(outcome) = home.handle(event)? {
            return Ok(outcome);
        }
    }
}

/// What the anchor's threads report.
enum Event {
    Signal(nix::libc::signalfd_siginfo),
    Attached(u32, Box<Conn>, Option<std::net::SocketAddr>),
    Relay(u32, Msg),
    Closed(u32),
    Stdin(Vec<u8>),
    StdinEnd,
}

/// One generation of the process away from home.
#[derive(Default)]
struct Generation {
    writer: Option<Conn>,
    /// Output that waits for the earlier generations to end.
    held: Vec<(u8, Vec<u8>)>,
    /// Stopped: no more input (it moved on).
    stopped: bool,
    input_ended: bool,
    exit: Option<i32>,
    moved: Option<Vec<u8>>,
    /// Its descriptors on a pseudo-terminal there (bit n: descriptor n), once it said so.
    terminal: u8,
    /// The omd of the node it runs on.
    node: Option<std::net::SocketAddr>,
}

struct Home {
    /// The child while it runs at home.
    pid: Option<Pid>,
    /// The child's pid (the process's pid at home, under which the home omd knows it).
    home_pid: Pid,
    /// The home omd's control socket.
    control: std::path::PathBuf,
    /// The last generation whose node the home omd was told.
    located: u32,
    anchor: UnixStream,
    gens: BTreeMap<u32, Generation>,
    /// The generation whose output is written and which gets stdin and signals.
    active: u32,
    /// Stdin bytes not yet given to any generation.
    stdin: Vec<u8>,
    stdin_eof: bool,
    stdin_started: bool,
    /// Signals for a generation that has not attached yet, or held while the process is frozen.
    signals: Vec<i32>,
    /// The runtime said `freeze`: signals wait until it says where the process runs.
    frozen: bool,
    /// The runtime said `moved`.
    moved: bool,
    /// omrun's terminal settings before it made the terminal raw for a copy: given back at the end.
    cooked: Option<Termios>,
    /// The last generation told the window size (a change during a hop reaches the next copy
    /// when it takes over).
    sized: u32,
    tx: mpsc::Sender<Event>,
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Some(t) = self.cooked.take() {
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, &t);
        }
    }
}

impl Home {
    fn handle(&mut self, event: Event) -> Result<Option<Outcome>, AnchorError> {
        match event {
            Event::Signal(info) => return self.signal(&info),
            Event::Attached(g, conn, node) => {
                // A generation that already ended has nothing more to say.
                if g < self.active {
                    return Ok(None);
                }
                let reader = conn.try_clone().ok();
                let hop = self.gens.entry(g).or_default();
                hop.writer = Some(*conn);
                hop.node = node;
                if let Some(r) = reader {
                    spawn_relay_reader(g, r, self.tx.clone());
                }
                self.feed();
            }
            Event::Relay(g, msg) => {
                let hop = self.gens.entry(g).or_default();
                match msg {
                    Msg::Output(stream, bytes) => {
                        if g == self.active {
                            write_out(stream, &bytes);
                        } else {
                            hop.held.push((stream, bytes));
                        }
                    }
                    Msg::Stop => {
                        hop.stopped = true;
                        if !hop.input_ended {
                            hop.input_ended = true;
                            if let Some(w) = hop.writer.as_mut() {
                                let _ = relay::send(w, &Msg::InputEnd);
                            }
                        }
                    }
                    Msg::Moved(left) => {
                        hop.moved = Some(left);
                        hop.writer = None;
                    }
                    Msg::Exit(status) => hop.exit = Some(status),
                    // Signals that reached a copy while it was moving on: for the next one.
                    Msg::Signal(sig) => self.signals.push(sig),
                    Msg::Terminal(fds) => {
                        hop.terminal = fds;
                        self.feed();
                    }
                    other => tracing::warn!(generation = g, ?other, "unexpected relay message"),
                }
                return Ok(self.advance());
            }
            Event::Closed(g) => {
                if g < self.active {
                    // It moved on and was settled then (its `Moved` came first): the close ends it.
                    self.gens.remove(&g);
                    return Ok(None);
                }
                let hop = self.gens.entry(g).or_default();
                hop.writer = None;
                if hop.exit.is_none() && hop.moved.is_none() {
                    // The node it ran on is gone, and the process with it.
                    tracing::warn!(generation = g, "the relay closed before the process ended");
                    hop.exit = Some(Signal::SIGKILL as i32);
                }
                return Ok(self.advance());
            }
            Event::Stdin(bytes) => {
                self.stdin.extend_from_slice(&bytes);
                self.feed();
            }
            Event::StdinEnd => {
                self.stdin_eof = true;
                self.feed();
            }
        }
        Ok(None)
    }

    fn signal(&mut self, info: &nix::libc::signalfd_siginfo) -> Result<Option<Outcome>, AnchorError> {
        let Ok(sig) = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0)) else {
            return Ok(None);
        };
        if sig == Signal::SIGCHLD {
            return self.reap_home();
        }
        self.read_anchor();
        match self.pid {
            // At home, a signal the kernel generated for the whole foreground group (the terminal's
            // SIGINT, SIGWINCH) already reached the child, which shares omrun's process group: only
            // those sent by a process (si_code <= 0) are forwarded. While the process is frozen for
            // a migration they wait: after it the process may run elsewhere.
            Some(pid) => {
                if info.ssi_code <= 0 {
                    if self.frozen || self.moved {
                        self.signals.push(sig as i32);
                    } else {
                        tracing::debug!(?sig, "forwarding");
                        let _ = kill(pid, sig);
                    }
                }
            }
            // Away, on a terminal: the copy's terminal learns the new size and signals it.
            None if sig == Signal::SIGWINCH && self.cooked.is_some() => self.resize(),
            None => {
                self.signals.push(sig as i32);
                self.feed();
            }
        }
        Ok(None)
    }

    /// Tells the home omd where the process runs now (for `omctl ps`).
    fn locate(&self, node: std::net::SocketAddr) {
        let line = format!("at {} {node}", self.home_pid);
        match crate::control::request(&self.control, &line) {
            Ok(reply) if reply.starts_with("OK") => {}
            Ok(reply) => tracing::debug!(%reply, "the home omd did not note where the process runs"),
            Err(e) => tracing::debug!(error = %e, "cannot tell the home omd where the process runs"),
        }
    }

    /// Sends the active generation the home terminal's window size.
    fn resize(&mut self) {
        let Some(size) = om::sys::tty::window_size(std::io::stdin().as_raw_fd()) else {
            return;
        };
        if let Some(w) = self.gens.get_mut(&self.active).and_then(|h| h.writer.as_mut()) {
            let _ = relay::send(w, &Msg::Resize(size));
        }
    }

    /// Makes omrun's terminal raw for a copy whose stdin is a pseudo-terminal (once; the settings
    /// come back at the end).
    fn go_raw(&mut self) {
        if self.cooked.is_some() {
            return;
        }
        let stdin = std::io::stdin();
        let Ok(cooked) = tcgetattr(&stdin) else {
            return;
        };
        let mut raw = cooked.clone();
        cfmakeraw(&mut raw);
        if let Err(e) = tcsetattr(&stdin, SetArg::TCSANOW, &raw) {
            tracing::warn!(error = %e, "cannot put the terminal in raw mode");
            return;
        }
        self.cooked = Some(cooked);
    }

    fn reap_home(&mut self) -> Result<Option<Outcome>, AnchorError> {
        let Some(pid) = self.pid else { return Ok(None) };
        let Some(outcome) = reap(pid)? else {
            return Ok(None);
        };
        self.pid = None;
        // The runtime says `moved` before the home copy ends: the news is already in the socket.
        self.read_anchor();
        if !self.moved {
            return Ok(Some(outcome));
        }
        tracing::debug!("the process left home");
        self.active = 1;
        if !self.stdin_started {
            self.stdin_started = true;
            spawn_stdin(self.tx.clone());
        }
        Ok(self.advance())
    }

    /// Reads what the runtime said on the anchor socket: `freeze`, `thaw` (signals held meanwhile go
    /// to the process at home) or `moved`.
    fn read_anchor(&mut self) {
        let mut buf = [0u8; 256];
        while let Ok(n) = self.anchor.read(&mut buf) {
            if n == 0 {
                break;
            }
            for word in String::from_utf8_lossy(&buf[..n]).split_whitespace() {
                match word {
                    "freeze" => self.frozen = true,
                    "thaw" => {
                        self.frozen = false;
                        if let Some(pid) = self.pid {
                            for s in self.signals.drain(..) {
                                if let Ok(sig) = Signal::try_from(s) {
                                    let _ = kill(pid, sig);
                                }
                            }
                        }
                    }
                    "moved" => self.moved = true,
                    _ => {}
                }
            }
        }
    }

    /// Moves on past every generation that has ended, writing held output in order.
    fn advance(&mut self) -> Option<Outcome> {
        loop {
            if self.active == 0 {
                return None;
            }
            let g = self.active;
            let hop = self.gens.entry(g).or_default();
            for (stream, bytes) in hop.held.drain(..) {
                write_out(stream, &bytes);
            }
            if let Some(status) = hop.exit {
                return Some(outcome_of(status));
            }
            let Some(left) = hop.moved.take() else {
                self.feed();
                return None;
            };
            // What it left unread comes first for the next one.
            let mut stdin = left;
            stdin.append(&mut self.stdin);
            self.stdin = stdin;
            self.active += 1;
        }
    }

    /// Gives the active generation the stdin and signals it is due.
    fn feed(&mut self) {
        if self.active == 0 {
            return;
        }
        let g = self.active;
        let Some(hop) = self.gens.get(&g) else { return };
        if hop.stopped || hop.writer.is_none() {
            return;
        }
        let (terminal, node) = (hop.terminal, hop.node);
        if terminal & 1 != 0 && self.sized != g {
            self.go_raw();
            self.sized = g;
            self.resize();
        }
        if let Some(node) = node.filter(|_| self.located != g) {
            self.located = g;
            self.locate(node);
        }
        let Some(hop) = self.gens.get_mut(&g) else { return };
        let Some(w) = hop.writer.as_mut() else { return };
        for sig in self.signals.drain(..) {
            let _ = relay::send(w, &Msg::Signal(sig));
        }
        for chunk in self.stdin.chunks(relay::MAX_CHUNK) {
            let _ = relay::send(w, &Msg::Input(chunk.to_vec()));
        }
        self.stdin.clear();
        if self.stdin_eof && !hop.input_ended {
            hop.input_ended = true;
            let _ = relay::send(w, &Msg::InputEnd);
        }
    }
}

fn outcome_of(status: i32) -> Outcome {
    if status & 0x7f != 0 {
        Signal::try_from(status & 0x7f).map_or(Outcome::Exited(1), Outcome::Signaled)
    } else {
        Outcome::Exited(u8::try_from((status >> 8) & 0xff).unwrap_or(1))
    }
}

fn write_out(stream: u8, bytes: &[u8]) {
    if stream == 2 {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(bytes);
        let _ = e.flush();
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(bytes);
        let _ = o.flush();
    }
}

fn spawn_signals(sfd: SignalFd, tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        loop {
            match sfd.read_signal() {
                Ok(Some(info)) => {
                    if tx.send(Event::Signal(info)).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    });
}

/// Handshakes in progress at once, at most: unauthenticated peers cannot pile up threads.
const MAX_HANDSHAKES: usize = 16;

fn spawn_listener(listener: TcpListener, token: Vec<u8>, tx: mpsc::Sender<Event>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let busy = Arc::new(AtomicUsize::new(0));
    let claims = Arc::new(Claims::default());
    let _ = std::thread::Builder::new()
        .name("omrun-relay".into())
        .spawn(move || {
            for s in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
                let (tx, token, busy) = (tx.clone(), token.clone(), Arc::clone(&busy));
                let claims = Arc::clone(&claims);
                let spawned = std::thread::Builder::new().spawn(move || {
                    if let Some((conn, g, node)) = answer_relay(s, &token, &claims) {
                        tracing::debug!(generation = g, peer = conn.peer(), ?node, "relay attached");
                        let _ = tx.send(Event::Attached(g, Box::new(conn), node));
                    }
                    busy.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    tracing::warn!("cannot start a thread for a relay connection");
                }
            }
        });
}

/// Handles one relay connection up to its attach: answers the claims it opens with (a destination
/// claims before its copy runs, then attaches; a source in doubt claims and hangs up). Returns the
/// attached relay, its generation and its node's omd.
fn answer_relay(
    s: std::net::TcpStream,
    token: &[u8],
    claims: &Claims,
) -> Option<(Conn, u32, Option<std::net::SocketAddr>)> {
    let (mut conn, mut first) = match relay::accept(s, token, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %om_transport::error::chain(&e), "relay connection refused");
            return None;
        }
    };
    loop {
        match first {
            relay::First::Attach(g, node) => return Some((conn, g, node)),
            relay::First::Claim { token, start } => {
                let started = claims.claim(token, start);
                tracing::info!(
                    token = format_args!("{token:#x}"),
                    start,
                    started,
                    "a migration's fate claimed"
                );
                relay::send(&mut conn, &Msg::Claimed { token, started }).ok()?;
            }
        }
        first = match relay::next_first(&mut conn) {
            Ok(f) => f,
            // A source's claim ends its connection.
            Err(om_transport::TransportError::Closed { .. }) => return None,
            Err(e) => {
                tracing::warn!(error = %om_transport::error::chain(&e), "relay connection failed after a claim");
                return None;
            }
        };
    }
}

fn spawn_relay_reader(g: u32, mut conn: Conn, tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        loop {
            match relay::recv(&mut conn) {
                Ok(m) => {
                    if tx.send(Event::Relay(g, m)).is_err() {
                        return;
                    }
                }
                Err(_) => {
                    let _ = tx.send(Event::Closed(g));
                    return;
                }
            }
        }
    });
}

fn spawn_stdin(tx: mpsc::Sender<Event>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; relay::MAX_CHUNK];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Event::StdinEnd);
                    return;
                }
                Ok(n) => {
                    if tx.send(Event::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
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
