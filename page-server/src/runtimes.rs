//! The runtimes (`libomrt.so` inside om processes) registered on this node's control socket.
//!
//! A runtime connects once, says `register PID`, and keeps the connection open; omd checks with
//! `SO_PEERCRED` that the connecting process really is PID. A restored process lives in its own pid
//! namespace and says its pid *there* (its old one): omd accepts it when the last entry of the
//! peer's `NSpid` is that pid, and files it under the pid this node sees, noting the other as its
//! `vpid`. Requests for a process (`checkpoint`) are relayed over that connection, one at a time.
//!
//! A process that leaves its home node is remembered there with its anchor (`omrun`, its parent):
//! omrun learns from each relay where the process runs next and says so (`at PID IP:PORT`, accepted
//! from that omrun only), and the entry goes once omrun has ended.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use om::procstat;

/// How long a runtime may take to answer (a checkpoint writes the whole image).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a request for a copy restored here waits for its runtime to register: the copy runs
/// (and its migration returns) a moment before its runtime has connected to this omd again.
pub const REGISTER_WAIT: Duration = Duration::from_secs(10);

/// One registered runtime.
#[derive(Debug)]
struct Entry {
    /// The process's pid as the program sees it (its pid namespace's).
    vpid: u32,
    conn: Arc<Mutex<UnixStream>>,
}

/// A process that migrated away from this node.
#[derive(Debug, Clone)]
struct Away {
    /// The omd it runs at now, as far as this node knows.
    at: String,
    /// For a process whose home is here: its omrun, by pid and start time (which tells a reused
    /// pid apart). Copies restored here have none: the relay takes their entry when they end.
    anchor: Option<(u32, u64)>,
}

/// The registered runtimes, by pid on this node.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    inner: Arc<Mutex<BTreeMap<u32, Entry>>>,
    /// Processes that migrated away from this node, by their pid here.
    moved: Arc<Mutex<BTreeMap<u32, Away>>>,
    /// Processes being migrated away, with the signals held for them meanwhile.
    migrating: Arc<Mutex<BTreeMap<u32, Vec<i32>>>>,
    /// Copies started here whose runtime has not registered yet, by pid on this node.
    expected: Arc<Mutex<BTreeSet<u32>>>,
    /// Signalled (with `inner`'s lock) when a runtime registers.
    arrived: Arc<Condvar>,
}

/// False once the runtime's end of `conn` is closed. A connection busy with a request is alive.
fn connected(conn: &Mutex<UnixStream>) -> bool {
    let Ok(s) = conn.try_lock() else {
        return true;
    };
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    match recv(
        s.as_raw_fd(),
        &mut [0u8; 1],
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e == nix::errno::Errno::EAGAIN,
    }
}

/// The pids of process `pid` in each pid namespace it belongs to, outermost first (`NSpid`).
fn ns_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("NSpid:")
                    .map(|v| v.split_whitespace().filter_map(|w| w.parse().ok()).collect())
            })
        })
        .unwrap_or_default()
}

impl Runtimes {
    /// Registers the runtime of `pid` on `stream` after checking the peer's credentials, and
    /// answers it `OK registered`.
    ///
    /// The answer goes out before the runtime is listed: from then on a request for it (a
    /// `migrate` waiting for this copy, say) may be written on the connection at any moment, and
    /// must not come before the answer the runtime is waiting for.
    ///
    /// # Errors
    /// A text for the `ERR` reply.
    pub fn register(&self, pid: u32, stream: &UnixStream) -> Result<(), String> {
        let cred = getsockopt(stream, PeerCredentials).map_err(|e| format!("peer credentials: {e}"))?;
        let peer = u32::try_from(cred.pid()).unwrap_or(0);
        if peer != pid && ns_pids(peer).last() != Some(&pid) {
            return Err(format!("register {pid}: the peer is process {}", cred.pid()));
        }
        let s = stream.try_clone().map_err(|e| e.to_string())?;
        writeln!(&s, "OK registered").map_err(|e| format!("answering the runtime: {e}"))?;
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).insert(
            peer,
            Entry {
                vpid: pid,
                conn: Arc::new(Mutex::new(s)),
            },
        );
        self.expected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer);
        self.arrived.notify_all();
        tracing::debug!(pid = peer, vpid = pid, "runtime registered");
        Ok(())
    }

    /// A copy of a process starts here as `pid`: requests for it wait for its runtime to register
    /// (at most [`REGISTER_WAIT`]) instead of being refused.
    pub fn expect(&self, pid: u32) {
        self.expected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid);
    }

    /// The copy `pid` did not start, or has ended: no runtime of it will register.
    pub fn forget_expected(&self, pid: u32) {
        self.expected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid);
        self.arrived.notify_all();
    }

    /// The connection of `pid`'s runtime, waiting for a copy started here to register.
    fn connection(&self, pid: u32) -> Result<Arc<Mutex<UnixStream>>, String> {
        let deadline = Instant::now() + REGISTER_WAIT;
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(e) = map.get(&pid) {
                return Ok(Arc::clone(&e.conn));
            }
            let expected = self
                .expected
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&pid);
            let left = deadline.saturating_duration_since(Instant::now());
            if !expected || left.is_zero() {
                return Err(if expected {
                    format!(
                        "process {pid} was restored here but its runtime did not register within {} s",
                        REGISTER_WAIT.as_secs()
                    )
                } else {
                    format!("process {pid} is not an om process on this node (not started with omrun?)")
                });
            }
            map = self
                .arrived
                .wait_timeout(map, left.min(Duration::from_millis(100)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The registered processes: `(pid on this node, pid as the program sees it)`. Runtimes whose
    /// connection has closed (the process ended) are dropped first.
    #[must_use]
    pub fn pids(&self) -> Vec<(u32, u32)> {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, e| connected(&e.conn));
        map.iter().map(|(p, e)| (*p, e.vpid)).collect()
    }

    /// Marks `pid` as being migrated: signals relayed to it are held until [`Runtimes::end_migrating`]
    /// returns them (to deliver here if the migration failed, or to pass on if it moved).
    pub fn begin_migrating(&self, pid: u32) {
        self.migrating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid, Vec::new());
    }

    /// Holds `sig` for `pid` if it is being migrated; false when it is not (deliver it now).
    #[must_use]
    pub fn hold_signal(&self, pid: u32, sig: i32) -> bool {
        match self
            .migrating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&pid)
        {
            Some(held) => {
                held.push(sig);
                true
            }
            None => false,
        }
    }

    /// The migration of `pid` is over: returns the signals held meanwhile.
    #[must_use]
    pub fn end_migrating(&self, pid: u32) -> Vec<i32> {
        self.migrating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid)
            .unwrap_or_default()
    }

    /// True (once) when the process `pid` of this node migrated away.
    #[must_use]
    pub fn take_moved(&self, pid: u32) -> bool {
        self.moved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid)
            .is_some()
    }

    /// Processes that migrated away from this node and where they run: `(pid, address)`. Those
    /// whose home is here and whose omrun has ended are forgotten first.
    #[must_use]
    pub fn moved(&self) -> Vec<(u32, String)> {
        let mut moved = self.moved.lock().unwrap_or_else(PoisonError::into_inner);
        moved.retain(|_, a| a.anchor.is_none_or(procstat::still_runs));
        moved.iter().map(|(p, a)| (*p, a.at.clone())).collect()
    }

    /// Notes where the process `pid`, whose home is here, runs now: told by its omrun, the peer of
    /// `stream`.
    ///
    /// # Errors
    /// A text for the `ERR` reply: no such process, or the peer is not its omrun.
    pub fn relocate(&self, pid: u32, at: &str, stream: &UnixStream) -> Result<(), String> {
        let cred = getsockopt(stream, PeerCredentials).map_err(|e| format!("peer credentials: {e}"))?;
        let peer = u32::try_from(cred.pid()).unwrap_or(0);
        let mut moved = self.moved.lock().unwrap_or_else(PoisonError::into_inner);
        match moved.get_mut(&pid) {
            Some(a)
                if a.anchor
                    .is_some_and(|anchor| anchor.0 == peer && procstat::still_runs(anchor)) =>
            {
                a.at = at.to_owned();
                Ok(())
            }
            Some(_) => Err(format!("at {pid}: the peer (process {peer}) is not its omrun")),
            None => Err(format!(
                "at {pid}: no process of this node moved away under that pid"
            )),
        }
    }

    /// Sends `request` to the runtime of `pid` and returns its one-line answer.
    ///
    /// # Errors
    /// A text for the `ERR` reply: not registered, or the runtime went away.
    pub fn ask(&self, pid: u32, request: &str) -> Result<String, String> {
        let conn = self.connection(pid)?;
        let stream = conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = (|| {
            stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            writeln!(&*stream, "{request}")?;
            let mut line = String::new();
            BufReader::new(&*stream).read_line(&mut line)?;
            Ok::<_, std::io::Error>(line)
        })();
        match result {
            Ok(line) if line.starts_with("OK moved") => {
                // The process left: note it before it ends (the relay asks), then let it go. A
                // process that is not a restored copy (same pid in its namespace) is at home: its
                // parent is its omrun.
                let at = line.split_whitespace().nth(3).unwrap_or("?").to_owned();
                let home = self
                    .inner
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&pid)
                    .is_some_and(|e| e.vpid == pid);
                let anchor = home
                    .then(|| procstat::parent_and_start(pid))
                    .flatten()
                    .and_then(|(parent, _)| Some((parent, procstat::parent_and_start(parent)?.1)));
                self.moved
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(pid, Away { at, anchor });
                let _ = writeln!(&*stream, "bye");
                Ok(line.trim_end().to_owned())
            }
            Ok(line) if !line.is_empty() => Ok(line.trim_end().to_owned()),
            Ok(_) | Err(_) => {
                self.inner
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&pid);
                Err(format!("process {pid} went away without answering"))
            }
        }
    }
}
