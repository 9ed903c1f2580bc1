//! The launcher API: what an HPC launcher (or anyone) needs to run a program under om, move it and
//! wait for it, as a Rust API ([`Launcher`], [`Job`]) and as a C ABI ([`sys`], header `om.h`).
//!
//! Everything goes through the same programs and daemon that people use: a program starts under
//! `omrun` (its home anchor), and requests go to the local omd's control socket, exactly as `omctl`
//! sends them.
//!
//! ```no_run
//! let l = om_launch::Launcher::new(None);
//! let job = l.start(&["./simulation".into(), "--steps".into(), "1000".into()])?;
//! let m = l.migrate(job.pid(), "10.0.0.2:7070".parse()?, &om_launch::MigrateOptions::default())?;
//! println!("frozen {} ms", m.freeze_ms);
//! let status = job.wait()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod control;
pub mod report;
pub mod sys;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub use report::Migration;

/// Why a launcher operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// An argument is not usable (empty argv, a bad address).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// omd's control socket could not be reached or the exchange failed.
    #[error("talking to omd at {path}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// omrun could not be started.
    #[error("cannot start omrun ({path})")]
    Start {
        /// The omrun program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program did not register with omd in time (it ended, or its runtime did not load).
    #[error("the program did not register with omd within {0:?}")]
    NotRegistered(Duration),
    /// omd or the runtime refused the request; the text says why.
    #[error("{0}")]
    Refused(String),
    /// Waiting for omrun failed.
    #[error("waiting for the program")]
    Wait(#[source] std::io::Error),
}

/// Options of a migration (`omctl migrate`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    /// The acceptable freeze, in milliseconds.
    pub downtime_ms: u32,
    /// The most pre-copy rounds.
    pub max_rounds: u32,
    /// Stop-and-copy instead of pre-copy.
    pub stop_and_copy: bool,
    /// Throttle the program while it dirties memory faster than the link carries it
    /// (pre-copy only; see docs/migration.md).
    pub auto_converge: bool,
    /// How the pages travel.
    pub transport: Transport,
}

/// How a migration's pages travel (`omctl migrate --transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TCP.
    #[default]
    Tcp,
    /// Dolphin SCI (see docs/sci.md).
    Sci,
    /// InfiniBand/RoCE verbs (see docs/verbs.md).
    Verbs,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            downtime_ms: 50,
            max_rounds: 30,
            stop_and_copy: false,
            auto_converge: false,
            transport: Transport::Tcp,
        }
    }
}

/// omd's control request that migrates process `pid` to `to` (what `omctl migrate` and
/// [`Launcher::migrate`] send).
#[must_use]
pub fn migrate_request(pid: u32, to: SocketAddr, opts: &MigrateOptions) -> String {
    let mode = match (opts.stop_and_copy, opts.auto_converge) {
        (true, _) => "stop-and-copy",
        (false, true) => "auto-converge",
        (false, false) => "precopy",
    };
    let transport = match opts.transport {
        Transport::Tcp => "tcp",
        Transport::Sci => "sci",
        Transport::Verbs => "verbs",
    };
    format!(
        "migrate {pid} {to} {} {} {mode} {transport}",
        opts.downtime_ms, opts.max_rounds
    )
}

/// Runs programs under om on this node and moves them.
#[derive(Debug, Clone)]
pub struct Launcher {
    control: PathBuf,
    omrun: PathBuf,
}

/// A program started by [`Launcher::start`]: its omrun and its pid.
#[derive(Debug)]
pub struct Job {
    omrun: Child,
    pid: u32,
}

/// How long a started program has to register with omd.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);

impl Launcher {
    /// A launcher for the omd at `control` (else `OM_CONTROL`, else the per-user default), with
    /// `omrun` from `OM_BIN_DIR`, next to the running program, or on `PATH`.
    #[must_use]
    pub fn new(control: Option<&Path>) -> Self {
        let control = control.map_or_else(control::default_path, Path::to_path_buf);
        let omrun = std::env::var_os("OM_BIN_DIR")
            .map(|d| PathBuf::from(d).join("omrun"))
            .or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("omrun")))
                    .filter(|p| p.exists())
            })
            .unwrap_or_else(|| PathBuf::from("omrun"));
        Self { control, omrun }
    }

    /// The control socket it talks to.
    #[must_use]
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// Starts `argv` under omrun (stdio inherited) and returns once its runtime registered with omd.
    ///
    /// # Errors
    /// An empty argv, omrun not starting, or the program not registering.
    pub fn start(&self, argv: &[OsString]) -> Result<Job, LaunchError> {
        let Some(prog) = argv.first() else {
            return Err(LaunchError::Invalid("empty argv".into()));
        };
        let mut omrun = Command::new(&self.omrun)
            .arg("--control")
            .arg(&self.control)
            .arg("--")
            .arg(prog)
            .args(&argv[1..])
            .spawn()
            .map_err(|source| LaunchError::Start {
                path: self.omrun.clone(),
                source,
            })?;
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        loop {
            if let Some(pid) = self
                .ps()?
                .iter()
                .find_map(|e| (e.at.is_none() && parent_of(e.pid) == Some(omrun.id())).then_some(e.pid))
            {
                return Ok(Job { omrun, pid });
            }
            if Instant::now() > deadline || matches!(omrun.try_wait(), Ok(Some(_))) {
                let _ = omrun.kill();
                let _ = omrun.wait();
                return Err(LaunchError::NotRegistered(REGISTER_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Migrates process `pid` of this node to the omd at `to`.
    ///
    /// # Errors
    /// [`LaunchError::Refused`] with the reason (the process continues where it was).
    pub fn migrate(&self, pid: u32, to: SocketAddr, opts: &MigrateOptions) -> Result<Migration, LaunchError> {
        let reply = self.request(&migrate_request(pid, to, opts))?;
        match reply.strip_prefix("OK moved to ") {
            Some(rest) => {
                let json = rest.split_once(' ').map_or("", |(_, j)| j);
                Migration::from_json(json)
                    .ok_or_else(|| LaunchError::Refused(format!("unreadable report: {json}")))
            }
            None => Err(LaunchError::Refused(
                reply.strip_prefix("ERR ").unwrap_or(&reply).to_owned(),
            )),
        }
    }

    /// Writes process `pid`'s image to `dir`; it ends unless `leave_running`.
    ///
    /// # Errors
    /// [`LaunchError::Refused`] with the reason.
    pub fn checkpoint(&self, pid: u32, dir: &Path, leave_running: bool) -> Result<(), LaunchError> {
        let dir = std::path::absolute(dir).map_err(|e| LaunchError::Invalid(e.to_string()))?;
        let reply = self.request(&format!(
            "checkpoint {pid} {} {}",
            u8::from(leave_running),
            dir.display()
        ))?;
        if reply.starts_with("OK") {
            Ok(())
        } else {
            Err(LaunchError::Refused(
                reply.strip_prefix("ERR ").unwrap_or(&reply).to_owned(),
            ))
        }
    }

    /// The om processes of this node, and those that moved away from it.
    ///
    /// # Errors
    /// omd not reachable.
    pub fn ps(&self) -> Result<Vec<ProcessEntry>, LaunchError> {
        let reply = self.request("ps")?;
        Ok(reply
            .split_whitespace()
            .skip(2)
            .filter_map(ProcessEntry::parse)
            .collect())
    }

    fn request(&self, line: &str) -> Result<String, LaunchError> {
        control::request(&self.control, line).map_err(|source| LaunchError::Control {
            path: self.control.clone(),
            source,
        })
    }
}

/// One entry of `ps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEntry {
    /// Its pid on this node.
    pub pid: u32,
    /// Its own pid (in its pid namespace), when it was restored here.
    pub vpid: Option<u32>,
    /// Where it runs now, when it migrated away from here (for a process whose home is here; for
    /// a copy that moved on from here, where it went).
    pub at: Option<String>,
}

impl ProcessEntry {
    /// Parses `pid=P`, `pid=P,vpid=V` or `pid=P,at=ADDR`.
    #[must_use]
    pub fn parse(word: &str) -> Option<Self> {
        let mut parts = word.strip_prefix("pid=")?.split(',');
        let pid = parts.next()?.parse().ok()?;
        let mut e = Self {
            pid,
            vpid: None,
            at: None,
        };
        for p in parts {
            if let Some(v) = p.strip_prefix("vpid=") {
                e.vpid = v.parse().ok();
            } else if let Some(a) = p.strip_prefix("at=") {
                e.at = Some(a.to_owned());
            }
        }
        Some(e)
    }
}

impl Job {
    /// The program's pid on this node.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the program to end, wherever it runs: omrun ends the way it did.
    ///
    /// # Errors
    /// Waiting failed.
    pub fn wait(mut self) -> Result<ExitStatus, LaunchError> {
        self.omrun.wait().map_err(LaunchError::Wait)
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_entries() {
        assert_eq!(
            ProcessEntry::parse("pid=5,vpid=9"),
            Some(ProcessEntry {
                pid: 5,
                vpid: Some(9),
                at: None
            })
        );
        assert_eq!(
            ProcessEntry::parse("pid=5,at=10.0.0.2:7070")
                .unwrap()
                .at
                .as_deref(),
            Some("10.0.0.2:7070")
        );
        assert_eq!(ProcessEntry::parse("x=5"), None);
    }
}
