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
//! The program's stdio are pipes to omd. Once it runs, a relay thread carries them to its home
//! (`omrun`, reached with the home record the image carries, see [`om_transport::relay`]) together
//! with signals from home and, at the end, its exit status or the news that it moved on.

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
use om::image::records::KIND_HOME;
use om_transport::api::{ImageSink, Refusal};
use om_transport::conn::Conn;
use om_transport::relay::{self, Home, Msg};
use om_transport::wire::{Begin, ErrorCode};

use crate::image::Image;
use crate::runtimes::Runtimes;

/// How long om-restore may take to prepare a copy (a poll timeout: at most 65 s).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
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
}

/// A restored copy held before its first instruction.
#[derive(Debug)]
pub struct Prepared {
    child: Child,
    hold: Option<File>,
    pid: u32,
    dir: PathBuf,
    stdin: Option<File>,
    stdin_peek: File,
    stdout: File,
    stderr: File,
    home: Option<Home>,
    runtimes: Runtimes,
}

fn internal(what: &str) -> impl Fn(io::Error) -> Refusal + '_ {
    move |e| (ErrorCode::Internal, format!("{what}: {e}"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
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
        let home = records
            .iter()
            .find(|r| r.kind == KIND_HOME)
            .and_then(|r| Home::decode(&r.bytes).ok());
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

        let (ready_r, ready_w) = pipe().map_err(internal("pipe"))?;
        let (hold_r, hold_w) = pipe().map_err(internal("pipe"))?;
        let (in_r, in_w) = pipe().map_err(internal("pipe"))?;
        let (out_r, out_w) = pipe().map_err(internal("pipe"))?;
        let (err_r, err_w) = pipe().map_err(internal("pipe"))?;
        let stdin_peek = in_r.try_clone().map_err(internal("dup"))?;
        let mut cmd = Command::new(&self.program);
        cmd.env(om::control::CONTROL_ENV, &self.control)
            .arg(&dir)
            .args(["--pages-fd", "3", "--ready-fd", "4", "--hold-fd", "5"])
            .stdin(Stdio::from(in_r))
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w));
        let fds = [
            image.memory().fd().as_raw_fd(),
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
        let stderr = File::from(err_r);
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
                    &stderr,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                );
                let _ = (&stderr).take(4096).read_to_string(&mut why);
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
            stdin: Some(File::from(in_w)),
            stdin_peek: File::from(stdin_peek),
            stdout: File::from(out_r),
            stderr,
            home,
            runtimes: self.runtimes.clone(),
        })
    }
}

impl Prepared {
    /// Starts the copy and its relay; returns its pid on this node.
    ///
    /// # Errors
    /// The hold pipe could not be written (om-restore is gone).
    pub fn go(mut self) -> Result<u32, Refusal> {
        let pid = self.pid;
        let mut hold = self
            .hold
            .take()
            .ok_or((ErrorCode::Internal, "no hold pipe".to_owned()))?;
        let _ = fs::remove_dir_all(&self.dir);
        // The relay thread exists before the copy may run: once `g` is written nothing can fail.
        let (start, started) = std::sync::mpsc::channel::<bool>();
        thread::Builder::new()
            .name(format!("omd-relay-{pid}"))
            .spawn(move || {
                if started.recv() == Ok(true) {
                    self.relay();
                } else {
                    let _ = self.child.wait();
                }
            })
            // Dropping `hold` on the way out discards the copy.
            .map_err(internal("starting the relay"))?;
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
    fn relay(mut self) {
        let pid = self.pid;
        let conn = self.home.as_ref().and_then(|h| connect_home(h, pid));
        let Some(conn) = conn else {
            // No home to report to: the output goes to omd's own.
            drop(self.stdin.take());
            let out = pump_local(self.stdout.try_clone().ok(), io::stdout());
            let err = pump_local(self.stderr.try_clone().ok(), io::stderr());
            let status = self.child.wait();
            let _ = (out.join(), err.join());
            tracing::info!(pid, ?status, "migrated process ended");
            return;
        };
        let writer = Arc::new(Mutex::new(conn.try_clone().ok()));
        let out = pump_home(self.stdout.try_clone().ok(), 1, Arc::clone(&writer));
        let err = pump_home(self.stderr.try_clone().ok(), 2, Arc::clone(&writer));
        let mut reader = conn;
        // Input goes through a queue and a writer thread that never blocks the relay: what the
        // copy has not taken when it moves on is handed back, nothing is lost.
        let feed = Arc::new(Feed::default());
        let writer_thread = self.stdin.take().map(|s| {
            let feed = Arc::clone(&feed);
            thread::spawn(move || feed.write_into(s))
        });
        let (ended_tx, ended_rx) = std::sync::mpsc::channel::<()>();
        let runtimes = self.runtimes.clone();
        let input_feed = Arc::clone(&feed);
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
                    Ok(other) => tracing::warn!(pid, ?other, "unexpected relay message from home"),
                    Err(_) => return,
                }
            }
        });
        let status = self.child.wait();
        let _ = (out.join(), err.join());
        let moved = self.runtimes.take_moved(pid);
        let held = self.runtimes.end_migrating(pid);
        let mut w = writer.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(w) = w.as_mut() else { return };
        let end = if moved {
            // The copy moved on: stop the home's input, then hand back what the copy left unread:
            // its pipe first, then what was still queued.
            let _ = relay::send(w, &Msg::Stop);
            let _ = ended_rx.recv_timeout(HOME_TIMEOUT);
            feed.stop();
            if let Some(t) = writer_thread {
                let _ = t.join();
            }
            for sig in held {
                let _ = relay::send(w, &Msg::Signal(sig));
            }
            let mut left = unread(&self.stdin_peek);
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

fn connect_home(home: &Home, pid: u32) -> Option<Conn> {
    let deadline = Instant::now() + HOME_TIMEOUT;
    loop {
        match relay::connect(home, Duration::from_secs(5)) {
            Ok(c) => return Some(c),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(pid, error = %e, "home not reachable yet");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                tracing::warn!(pid, home = %home.addr, error = %om_transport::error::chain(&e), "cannot reach the process's home; its output goes to omd's");
                return None;
            }
        }
    }
}

fn pump_local(from: Option<File>, mut to: impl Write + Send + 'static) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        if let Some(mut f) = from {
            let _ = io::copy(&mut f, &mut to);
        }
    })
}

fn pump_home(from: Option<File>, stream: u8, to: Arc<Mutex<Option<Conn>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Some(mut f) = from else { return };
        let mut buf = vec![0u8; relay::MAX_CHUNK];
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut c = to.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(conn) = c.as_mut() {
                if relay::send(conn, &Msg::Output(stream, buf[..n].to_vec())).is_err() {
                    *c = None;
                }
            }
        }
    })
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
