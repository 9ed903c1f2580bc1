//! The rig: creation, running things in nodes, omd per node, teardown and its proof.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The nodes' subnet: node `i` has address `10.77.0.(i+1)`. It exists only inside a rig's namespaces.
pub const NODE_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 77, 0, 0), 24);
/// The most nodes a rig can have.
pub const MAX_NODES: usize = 200;
/// The port each node's omd listens on.
pub const OMD_PORT: u16 = 7070;

const REAPER: &str = include_str!("reaper.sh");
const NETNS_DIR: &str = "/run/netns";
const ID_PREFIX: &str = "omrig-";
const REAPER_PIDFILE: &str = "reaper.pid";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// What went wrong with a rig.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// Namespaces need privileges.
    #[error("the rig needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): run the test command as root")]
    NotRoot,
    /// A rig of 0 or too many nodes was asked for.
    #[error("a rig has 1 to {MAX_NODES} nodes, not {0}")]
    NodeCount(usize),
    /// A helper program could not be started.
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A helper program failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file of the rig's state directory could not be written.
    #[error("cannot write {path}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No such rig (for `attach`).
    #[error("no rig named {0} exists (its switch namespace is missing)")]
    NoSuchRig(String),
    /// No such node.
    #[error("rig {id} has {count} nodes; there is no node {index}")]
    NoSuchNode {
        /// The rig.
        id: String,
        /// Its node count.
        count: usize,
        /// The node asked for.
        index: usize,
    },
    /// omd did not come up.
    #[error("omd on node {node} did not answer `ping` on {control} within {secs} s; its log:\n{log}")]
    OmdNotReady {
        /// The node.
        node: usize,
        /// Its control socket.
        control: PathBuf,
        /// How long we waited.
        secs: u64,
        /// The daemon's log.
        log: String,
    },
    /// The test cluster's Slurm daemons did not come up ([`crate::slurm::Slurm::start`]).
    #[error("Slurm on node {node} did not take jobs within {secs} s: {log}")]
    SlurmNotReady {
        /// The node.
        node: usize,
        /// How long we waited.
        secs: u64,
        /// What was wrong, and the daemons' logs.
        log: String,
    },
    /// This machine's host name could not be read (a Slurm node is named after it).
    #[error("cannot read the host name")]
    Hostname(#[source] nix::Error),
    /// omd was asked to stop but does not run.
    #[error("omd is not running on node {0}")]
    OmdNotRunning(usize),
    /// A process could not be signalled.
    #[error("cannot signal process {pid}")]
    Signal {
        /// The process.
        pid: i32,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The reaper reported a failure.
    #[error("the reaper of rig {id} failed ({status})")]
    Reaper {
        /// The rig.
        id: String,
        /// Its exit status.
        status: String,
    },
    /// Teardown left something behind.
    #[error("rig {id} left things behind: {leftovers}")]
    Leftover {
        /// The rig.
        id: String,
        /// What is left.
        leftovers: Leftovers,
    },
}

/// What of a rig still exists.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// Its namespaces.
    pub namespaces: Vec<String>,
    /// Its state directory, if it still exists.
    pub state_dir: Option<PathBuf>,
    /// Processes it started that are still alive.
    pub pids: Vec<i32>,
}

impl Leftovers {
    /// True when nothing is left.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.state_dir.is_none() && self.pids.is_empty()
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "namespaces {:?}, live processes {:?}",
            self.namespaces, self.pids
        )?;
        if let Some(d) = &self.state_dir {
            write!(f, ", state directory {}", d.display())?;
        }
        Ok(())
    }
}

/// What of rig `id` still exists: its namespaces, its state directory, and which of `pids` still live.
#[must_use]
pub fn leftovers(id: &str, pids: &[i32]) -> Leftovers {
    let prefix = format!("{id}-");
    let mut namespaces: Vec<String> = list_netns()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    namespaces.sort();
    let dir = state_dir_of(id);
    Leftovers {
        namespaces,
        state_dir: dir.exists().then_some(dir),
        pids: pids.iter().copied().filter(|&p| alive(p)).collect(),
    }
}

/// One node of a rig.
#[derive(Debug, Clone)]
pub struct Node {
    index: usize,
    netns: String,
    addr: Ipv4Addr,
}

impl Node {
    /// The node's index in its rig.
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The name of its network namespace.
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its address on the rig's bridge.
    #[must_use]
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// A command that runs `prog` inside this node (through `ip netns exec`, which execs it in place, so
    /// the child's pid is the program's).
    #[must_use]
    pub fn command(&self, prog: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(prog);
        cmd
    }
}

/// A node's omd, as started by [`Rig::start_omd`].
#[derive(Debug, Clone)]
pub struct OmdHandle {
    /// The node.
    pub node: usize,
    /// The daemon's pid.
    pub pid: i32,
    /// Where other nodes reach it.
    pub listen: SocketAddrV4,
    /// Its control socket (reachable from the root namespace: it is a file).
    pub control: PathBuf,
    /// The cluster key it uses.
    pub key: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

struct Owner {
    reaper: Child,
    pipe: Option<ChildStdin>,
}

/// A running rig. Dropping it tears it down; [`Rig::teardown`] does so and proves it.
pub struct Rig {
    id: String,
    state_dir: PathBuf,
    nodes: Vec<Node>,
    /// None for a rig attached to by name (the command-line tool): its owner tears it down.
    owner: Option<Owner>,
    /// Processes started through the rig, reaped and checked at teardown.
    children: Mutex<Vec<Child>>,
    omds: Mutex<HashMap<usize, Child>>,
}

impl fmt::Debug for Rig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rig")
            .field("id", &self.id)
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Rig {
    /// Creates a rig of `nodes` nodes on one bridge. First sweeps rigs whose owner and reaper died.
    ///
    /// # Errors
    /// [`RigError::NotRoot`] without privileges; otherwise the step that failed. Whatever was created
    /// before the failure is torn down.
    pub fn new(nodes: usize) -> Result<Self, RigError> {
        if !(1..=MAX_NODES).contains(&nodes) {
            return Err(RigError::NodeCount(nodes));
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(RigError::NotRoot);
        }
        sweep_stale();
        let id = format!(
            "{ID_PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let state_dir = state_dir_of(&id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&state_dir)
            .map_err(|source| RigError::State {
                path: state_dir.clone(),
                source,
            })?;
        // The reaper exists before the first namespace, so a kill at any point of set-up is cleaned up.
        let mut reaper = spawn_reaper(&id, &state_dir, Stdio::piped())?;
        let pipe = reaper.stdin.take();
        let pidfile = state_dir.join(REAPER_PIDFILE);
        if let Err(source) = fs::write(&pidfile, pid_of(&reaper).to_string()) {
            drop(pipe);
            let _ = reaper.wait();
            return Err(RigError::State {
                path: pidfile,
                source,
            });
        }
        let mut rig = Self {
            nodes: (0..nodes).map(|i| node_of(&id, i)).collect(),
            id,
            state_dir,
            owner: Some(Owner { reaper, pipe }),
            children: Mutex::new(Vec::new()),
            omds: Mutex::new(HashMap::new()),
        };
        rig.build()?;
        write_key(&rig.key_path())?;
        tracing::info!(id = %rig.id, nodes, "rig up");
        Ok(rig)
    }

    /// Attaches to a rig that another process owns (for the command-line tool). Dropping it does not
    /// tear the rig down.
    ///
    /// # Errors
    /// [`RigError::NoSuchRig`] when no such rig exists.
    pub fn attach(id: &str) -> Result<Self, RigError> {
        let names = list_netns();
        if !names.iter().any(|n| *n == format!("{id}-sw")) {
            return Err(RigError::NoSuchRig(id.to_owned()));
        }
        let count = (0..MAX_NODES)
            .take_while(|i| names.contains(&format!("{id}-n{i}")))
            .count();
        Ok(Self {
            nodes: (0..count).map(|i| node_of(id, i)).collect(),
            id: id.to_owned(),
            state_dir: state_dir_of(id),
            owner: None,
            children: Mutex::new(Vec::new()),
            omds: Mutex::new(HashMap::new()),
        })
    }

    fn build(&mut self) -> Result<(), RigError> {
        let sw = format!("{}-sw", self.id);
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for node in &self.nodes {
            let ns = node.netns.as_str();
            let port = format!("p{}", node.index);
            let addr = format!("{}/{}", node.addr, NODE_SUBNET.1);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // Both ends are created directly in their namespaces: no name is ever taken in the root
            // namespace, so concurrent rigs cannot collide.
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The rig's name (the prefix of its namespaces).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its nodes.
    #[must_use]
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index`.
    ///
    /// # Errors
    /// [`RigError::NoSuchNode`].
    pub fn node(&self, index: usize) -> Result<&Node, RigError> {
        self.nodes.get(index).ok_or_else(|| RigError::NoSuchNode {
            id: self.id.clone(),
            count: self.nodes.len(),
            index,
        })
    }

    /// The rig's private directory (keys, sockets, logs); removed at teardown.
    #[must_use]
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The cluster key file shared by the rig's omds.
    #[must_use]
    pub fn key_path(&self) -> PathBuf {
        self.state_dir.join("cluster.key")
    }

    /// Starts `cmd` (usually from [`Node::command`]) in the background. The rig kills and reaps it at
    /// teardown. Returns its pid.
    ///
    /// # Errors
    /// [`RigError::Spawn`].
    pub fn spawn(&self, cmd: &mut Command) -> Result<i32, RigError> {
        let child = cmd.spawn().map_err(|source| RigError::Spawn {
            cmd: format!("{cmd:?}"),
            source,
        })?;
        let pid = pid_of(&child);
        lock(&self.children).push(child);
        Ok(pid)
    }

    /// Starts `omd` (the binary at `omd_bin`) on node `node`, listening on the node's address at
    /// [`OMD_PORT`] with the rig's key, and waits until it answers on its control socket.
    ///
    /// # Errors
    /// [`RigError::OmdNotReady`] with the daemon's log when it does not come up.
    pub fn start_omd(&self, node: usize, omd_bin: &Path, extra_args: &[&str]) -> Result<OmdHandle, RigError> {
        let h = self.omd(node)?;
        let dir = self.state_dir.join(format!("n{node}"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| RigError::State {
                path: dir.clone(),
                source,
            })?;
        let log = fs::File::create(&h.log).map_err(|source| RigError::State {
            path: h.log.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| RigError::State {
            path: h.log.clone(),
            source,
        })?;
        let mut cmd = self.node(node)?.command(omd_bin);
        cmd.arg("--listen")
            .arg(h.listen.to_string())
            .arg("--key")
            .arg(&h.key)
            .arg("--control")
            .arg(&h.control)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let mut child = cmd.spawn().map_err(|source| RigError::Spawn {
            cmd: format!("{cmd:?}"),
            source,
        })?;
        let pid = pid_of(&child);
        let pidfile = dir.join("omd.pid");
        fs::write(&pidfile, pid.to_string()).map_err(|source| RigError::State {
            path: pidfile,
            source,
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(&h.control) {
                break;
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() > deadline {
                if !exited {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(RigError::OmdNotReady {
                    node,
                    control: h.control,
                    secs: 10,
                    log: fs::read_to_string(&h.log).unwrap_or_default(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
        lock(&self.omds).insert(node, child);
        Ok(OmdHandle { pid, ..h })
    }

    /// Where node `node`'s omd listens, its control socket, key and log (whether or not it runs).
    ///
    /// # Errors
    /// [`RigError::NoSuchNode`].
    pub fn omd(&self, node: usize) -> Result<OmdHandle, RigError> {
        let n = self.node(node)?;
        let dir = self.state_dir.join(format!("n{node}"));
        let pid = fs::read_to_string(dir.join("omd.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok(OmdHandle {
            node,
            pid,
            listen: SocketAddrV4::new(n.addr, OMD_PORT),
            control: dir.join("omd.sock"),
            key: self.key_path(),
            log: dir.join("omd.log"),
        })
    }

    /// Stops node `node`'s omd with SIGTERM (SIGKILL after 5 s) and waits until it is gone.
    ///
    /// # Errors
    /// [`RigError::OmdNotRunning`] when it does not run; [`RigError::Signal`].
    pub fn stop_omd(&self, node: usize) -> Result<(), RigError> {
        let h = self.omd(node)?;
        if h.pid <= 0 || !alive(h.pid) {
            return Err(RigError::OmdNotRunning(node));
        }
        let child = lock(&self.omds).remove(&node);
        let pid = Pid::from_raw(h.pid);
        kill(pid, Signal::SIGTERM).map_err(|source| RigError::Signal { pid: h.pid, source })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut child = child;
        loop {
            let gone = match child.as_mut() {
                Some(c) => matches!(c.try_wait(), Ok(Some(_)) | Err(_)),
                None => !alive(h.pid),
            };
            if gone {
                break;
            }
            if Instant::now() > deadline {
                let _ = kill(pid, Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = fs::remove_file(self.state_dir.join(format!("n{node}/omd.pid")));
        Ok(())
    }

    /// Tears the rig down and proves that nothing is left: no namespace (and so no veth or bridge), no
    /// process it started, no state directory.
    ///
    /// # Errors
    /// [`RigError::Reaper`] or [`RigError::Leftover`].
    pub fn teardown(mut self) -> Result<(), RigError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), RigError> {
        let Some(mut owner) = self.owner.take() else {
            return Ok(());
        };
        // Closing the pipe is the reaper's signal: the same path as when the owner dies.
        drop(owner.pipe.take());
        let status = owner.reaper.wait();
        let mut pids = Vec::new();
        let children = std::mem::take(&mut *lock(&self.children));
        let omds = std::mem::take(&mut *lock(&self.omds));
        for mut c in children.into_iter().chain(omds.into_values()) {
            pids.push(pid_of(&c));
            // The reaper killed everything inside the namespaces; this only collects the zombies.
            let _ = c.kill();
            let _ = c.wait();
        }
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                return Err(RigError::Reaper {
                    id: self.id.clone(),
                    status: s.to_string(),
                });
            }
            Err(e) => {
                return Err(RigError::Reaper {
                    id: self.id.clone(),
                    status: e.to_string(),
                });
            }
        }
        let left = leftovers(&self.id, &pids);
        if left.is_empty() {
            tracing::info!(id = %self.id, "rig down");
            Ok(())
        } else {
            Err(RigError::Leftover {
                id: self.id.clone(),
                leftovers: left,
            })
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("omrig: teardown of {} failed: {e}", self.id);
        }
    }
}

/// Tears down every rig whose owner and reaper are both dead (e.g. `kill -9` of both). A rig whose
/// reaper still runs is left to it. Runs at the start of every rig.
pub fn sweep_stale() {
    let mut dead: Vec<String> = list_netns()
        .into_iter()
        .filter_map(|n| rig_id_of(&n).map(str::to_owned))
        .filter(|id| owner_pid(id).is_some_and(|p| !alive(p)) && !reaper_alive(id))
        .collect();
    dead.sort();
    dead.dedup();
    for id in dead {
        tracing::warn!(%id, "sweeping a rig whose owner died");
        match spawn_reaper(&id, &state_dir_of(&id), Stdio::null()).map(|mut c| c.wait()) {
            Ok(Ok(s)) if s.success() => {}
            other => tracing::warn!(%id, ?other, "sweep failed"),
        }
    }
}

fn spawn_reaper(id: &str, state_dir: &Path, stdin: Stdio) -> Result<Child, RigError> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(REAPER)
        .arg("omrig-reaper")
        .arg(id)
        .arg(state_dir)
        .stdin(stdin)
        .stdout(Stdio::null())
        // Its own process group: a signal to the owner's group (Ctrl-C, a test harness) spares it.
        .process_group(0);
    cmd.spawn().map_err(|source| RigError::Spawn {
        cmd: "sh (rig reaper)".into(),
        source,
    })
}

fn node_of(id: &str, index: usize) -> Node {
    let host = u8::try_from(index + 1).expect("node count is capped at MAX_NODES");
    let [a, b, c, _] = NODE_SUBNET.0.octets();
    Node {
        index,
        netns: format!("{id}-n{index}"),
        addr: Ipv4Addr::new(a, b, c, host),
    }
}

fn state_dir_of(id: &str) -> PathBuf {
    std::env::temp_dir().join(id)
}

/// `omrig-<pid>-<seq>` from a namespace name `omrig-<pid>-<seq>-<suffix>`.
fn rig_id_of(netns: &str) -> Option<&str> {
    let rest = netns.strip_prefix(ID_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let seq = parts.next()?;
    parts.next()?;
    if pid.parse::<u32>().is_err() || seq.parse::<u32>().is_err() {
        return None;
    }
    Some(&netns[..ID_PREFIX.len() + pid.len() + 1 + seq.len()])
}

fn owner_pid(id: &str) -> Option<i32> {
    id.strip_prefix(ID_PREFIX)?.split('-').next()?.parse().ok()
}

fn reaper_alive(id: &str) -> bool {
    fs::read_to_string(state_dir_of(id).join(REAPER_PIDFILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .is_some_and(alive)
}

fn list_netns() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive: it holds no namespace and runs nothing.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn pid_of(child: &Child) -> i32 {
    i32::try_from(child.id()).unwrap_or(i32::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ip(args: &[&str]) -> Result<(), RigError> {
    let cmd = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RigError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RigError::Command {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn write_key(path: &Path) -> Result<(), RigError> {
    write_random_key(path, 32)
}

/// Writes `len` fresh random bytes to a new file `path`, readable by its owner only: a key of the
/// rig's own (the cluster key; [`crate::slurm`]'s munge key).
pub(crate) fn write_random_key(path: &Path, len: usize) -> Result<(), RigError> {
    let err = |source| RigError::State {
        path: path.to_path_buf(),
        source,
    };
    let mut key = vec![0u8; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(err)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(&key).map_err(err)
}

fn ping(control: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(control) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("OK")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(rig_id_of("omrig-12-3-n0"), Some("omrig-12-3"));
        assert_eq!(rig_id_of("omrig-12-3-sw"), Some("omrig-12-3"));
        assert_eq!(rig_id_of("omrig-12-n0"), None);
        assert_eq!(rig_id_of("omrig-x-3-n0"), None);
        assert_eq!(rig_id_of("other-12-3-n0"), None);
        assert_eq!(owner_pid("omrig-12-3"), Some(12));
    }

    #[test]
    fn addresses() {
        assert_eq!(node_of("r", 0).addr, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(node_of("r", 199).addr, Ipv4Addr::new(10, 77, 0, 200));
        assert_eq!(node_of("r", 2).netns, "r-n2");
    }

    #[test]
    fn node_count_checked_before_privileges() {
        assert!(matches!(Rig::new(0), Err(RigError::NodeCount(0))));
        assert!(matches!(Rig::new(MAX_NODES + 1), Err(RigError::NodeCount(_))));
    }

    #[test]
    fn self_is_alive() {
        assert!(alive(i32::try_from(std::process::id()).unwrap()));
        assert!(!alive(i32::MAX));
    }
}
