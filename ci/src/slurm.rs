//! A one-node Slurm cluster inside a rig node: Debian's `munged`, `slurmctld` and `slurmd`, each in
//! the foreground as a process of the rig (killed at its teardown), with a configuration, a munge key
//! and state of their own under the rig's state directory. Everything talks over the node's
//! loopback, so several rigs can each run one at the same time.
//!
//! Tests run jobs with [`Slurm::srun`], exactly as a user of a cluster would: `srun -n 4 omrun ...`.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::rig::{Rig, RigError, write_random_key};

/// The Debian packages that hold the daemons and the client commands (`ci/deps.sh` installs them).
pub const PACKAGES: &str = "slurmd slurmctld slurm-client munge";

/// How long the node may take to be `idle` for jobs.
const READY: Duration = Duration::from_secs(30);

/// A running one-node cluster; its daemons end with the rig.
#[derive(Debug)]
pub struct Slurm {
    node: usize,
    netns: String,
    dir: PathBuf,
}

impl Slurm {
    /// Starts the daemons on node `node` of `rig` and waits until the node takes jobs. The node has
    /// as many CPUs as this machine; jobs may overcommit them (`srun -O`).
    ///
    /// # Errors
    /// The daemons are missing ([`RigError::Spawn`], which names the packages), a file cannot be
    /// written, or the node is not `idle` within 30 s ([`RigError::SlurmNotReady`], with the logs).
    pub fn start(rig: &Rig, node: usize) -> Result<Self, RigError> {
        let n = rig.node(node)?;
        let dir = rig.state_dir().join(format!("slurm-n{node}"));
        for sub in ["", "state", "spool"] {
            let d = dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|source| RigError::State { path: d, source })?;
        }
        let s = Self {
            node,
            netns: n.netns().to_owned(),
            dir,
        };
        write_random_key(&s.dir.join("munge.key"), 1024)?;
        let conf = s.conf();
        fs::write(&conf, s.config()?).map_err(|source| RigError::State { path: conf, source })?;
        let path = |name: &str| s.dir.join(name).to_string_lossy().into_owned();
        let munged = [
            "munged",
            "--foreground",
            "--force",
            &format!("--socket={}", path("munge.sock")),
            &format!("--key-file={}", path("munge.key")),
            &format!("--pid-file={}", path("munged.pid")),
            &format!("--log-file={}", path("munged.log")),
            &format!("--seed-file={}", path("munge.seed")),
        ];
        s.spawn(rig, &munged)?;
        s.wait_for(&s.dir.join("munge.sock"))?;
        s.spawn(rig, &["slurmctld", "-D", "-i", "-f", &path("slurm.conf")])?;
        s.spawn(rig, &["slurmd", "-D", "-N", "omnode", "-f", &path("slurm.conf")])?;
        s.wait_idle()?;
        Ok(s)
    }

    /// `srun -O -n TASKS ARGS` from the node, against this cluster; stdin on `/dev/null`, stdout and
    /// stderr piped.
    #[must_use]
    pub fn srun(&self, tasks: u32, args: &[&std::ffi::OsStr]) -> Command {
        let mut c = self.command("srun");
        c.args(["-O", "-n"])
            .arg(tasks.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// The tail of the daemons' logs, for a failure's message.
    #[must_use]
    pub fn logs(&self) -> String {
        ["munged.log", "slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| {
                let text = fs::read_to_string(self.dir.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {f}:\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `prog` in the node's network namespace with this cluster's configuration. Only the network
    /// namespace: `ip netns exec` would also mount a /sys of its own, without the cgroup file
    /// systems that slurmd probes at start (it refuses to start without them).
    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(prog)
            .env("SLURM_CONF", self.conf());
        c
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    fn config(&self) -> Result<String, RigError> {
        let host = hostname()?;
        let d = self.dir.to_string_lossy();
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Ok(format!(
            "# A one-node cluster for om's tests (om-rig's slurm.rs), on node {node}'s loopback.
ClusterName=omrig
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket={d}/munge.sock
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=omnode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=om Nodes=omnode Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
",
            node = self.node,
        ))
    }

    fn spawn(&self, rig: &Rig, argv: &[&str]) -> Result<(), RigError> {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        rig.spawn(&mut c).map_err(|e| match e {
            RigError::Spawn { cmd, source } => RigError::Spawn {
                cmd: format!("{cmd} (Debian packages: {PACKAGES})"),
                source,
            },
            e => e,
        })?;
        Ok(())
    }

    fn wait_for(&self, path: &Path) -> Result<(), RigError> {
        let deadline = Instant::now() + READY;
        while !path.exists() {
            if Instant::now() > deadline {
                return Err(self.not_ready(&format!("{} did not appear", path.display())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn wait_idle(&self) -> Result<(), RigError> {
        let deadline = Instant::now() + READY;
        loop {
            let out = self.command("sinfo").args(["-h", "-o", "%t"]).output();
            let state = out
                .as_ref()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            if state == "idle" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.not_ready(&format!("sinfo says {state:?}, not idle")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn not_ready(&self, what: &str) -> RigError {
        RigError::SlurmNotReady {
            node: self.node,
            secs: READY.as_secs(),
            log: format!("{what}\n{}", self.logs()),
        }
    }
}

/// This machine's short host name (slurmd checks its node's `NodeHostname` against it).
fn hostname() -> Result<String, RigError> {
    let h = nix::unistd::gethostname().map_err(RigError::Hostname)?;
    let h = h.to_string_lossy();
    Ok(h.split('.').next().unwrap_or(&h).to_owned())
}
