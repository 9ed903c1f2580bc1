//! Helpers shared by the checkpoint and restart tests: a real omd in a temporary directory,
//! programs started under omrun, workloads built from `tests/workloads`.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pid in a word of `omctl ps` output (`pid=P` or `pid=P,vpid=V`).
pub fn ps_pid(word: &str) -> Option<u32> {
    word.strip_prefix("pid=")?.split(',').next()?.parse().ok()
}

/// The directory holding the workspace's binaries (`omd`, `omrun`, `omctl`, `libomrt.so`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub struct Kill(pub Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Node {
    pub dir: PathBuf,
    _omd: Kill,
}

impl Drop for Node {
    /// Checkpoints are big (a 2 GiB heap makes a 2 GiB image): nothing stays behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Node {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, 7, "127.0.0.1:0", Command::new(bin_dir().join("omd")))
    }

    /// An omd run by `omd` (the program, perhaps wrapped: `ip netns exec ... omd`) listening on
    /// `listen`, with a key of 32 bytes `key_byte`.
    pub fn start_with(name: &str, key_byte: u8, listen: &str, mut omd: Command) -> Self {
        let dir = std::env::temp_dir().join(format!("om-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, [key_byte; 32]).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let omd = omd
            .args(["--listen", listen, "--key"])
            .arg(&key)
            .arg("--control")
            .arg(dir.join("ctl.sock"))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let node = Self { dir, _omd: Kill(omd) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.dir.join("ctl.sock").exists() {
            assert!(Instant::now() < deadline, "omd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// `omctl --control SOCKET ARGS` with stdin on /dev/null, not yet run.
    pub fn omctl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_dir().join("omctl"));
        c.arg("--control")
            .arg(self.dir.join("ctl.sock"))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs `omctl ARGS` to its end.
    pub fn omctl(&self, args: &[&str]) -> std::process::Output {
        self.omctl_command(args).output().unwrap()
    }

    /// Starts `prog` under omrun with stdout piped; returns once its runtime registered.
    pub fn omrun(&self, prog: &Path, args: &[&str]) -> (Kill, u32) {
        let w = Workload {
            argv: std::iter::once(prog.as_os_str().to_owned())
                .chain(args.iter().map(Into::into))
                .collect(),
            stdin: None,
            cwd: None,
        };
        self.run(&w)
    }

    /// Starts a workload under omrun with stdout piped; returns once its runtime registered.
    pub fn run(&self, w: &Workload) -> (Kill, u32) {
        let mut cmd = clean_fds();
        cmd.arg(bin_dir().join("omrun"))
            .arg("--control")
            .arg(self.dir.join("ctl.sock"))
            .arg("--");
        w.setup(&mut cmd);
        let child = cmd.spawn().map(Kill).unwrap();
        let omrun = child.0.id();
        let pid = self.wait_registered(|p, _| parent_of(p) == Some(omrun));
        (child, pid)
    }

    /// Waits until `omctl ps` lists a process for which `want(pid, vpid)` holds; returns its pid.
    pub fn wait_registered(&self, want: impl Fn(u32, u32) -> bool) -> u32 {
        self.wait_registered_while(want, || Ok(()))
    }

    /// [`Node::wait_registered`], failing early with the message `alive` returns once whatever
    /// should register has ended.
    pub fn wait_registered_while(
        &self,
        want: impl Fn(u32, u32) -> bool,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Err(why) = alive() {
                panic!("{why}");
            }
            let out = self.omctl(&["ps"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let found = text.split_whitespace().find_map(|w| {
                let p = ps_pid(w)?;
                let v = w
                    .split_once(",vpid=")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(p);
                want(p, v).then_some(p)
            });
            if let Some(pid) = found {
                return pid;
            }
            assert!(Instant::now() < deadline, "the program did not register: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A program to run: its command line, stdin (a file, else /dev/null) and working directory.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Program and arguments.
    pub argv: Vec<std::ffi::OsString>,
    /// A file to read as stdin.
    pub stdin: Option<PathBuf>,
    /// The working directory.
    pub cwd: Option<PathBuf>,
}

impl Workload {
    /// Appends the program to `cmd` with stdout piped, stderr and (unless a file is given) stdin
    /// on /dev/null.
    pub fn setup(&self, cmd: &mut Command) {
        cmd.args(&self.argv).stdout(Stdio::piped()).stderr(Stdio::null());
        match &self.stdin {
            Some(f) => cmd.stdin(std::fs::File::open(f).unwrap()),
            None => cmd.stdin(Stdio::null()),
        };
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
    }

    /// Runs it plainly to the end: its stdout and exit status.
    pub fn reference(&self) -> (Vec<u8>, std::process::ExitStatus) {
        let mut cmd = clean_fds();
        self.setup(&mut cmd);
        let out = cmd.output().unwrap();
        (out.stdout, out.status)
    }
}

/// A command that closes every inherited descriptor above 2 and then runs its arguments: whatever the
/// test runner's environment leaks is not the program's.
pub fn clean_fds() -> Command {
    let mut c = Command::new("bash");
    c.args(CLEAN_FDS);
    c
}

/// `bash` arguments that close every inherited descriptor above 2, then run the arguments that
/// follow (for commands built elsewhere, such as inside a rig node).
pub const CLEAN_FDS: [&str; 3] = [
    "-c",
    r#"for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-" 2>/dev/null; done; exec "$@""#,
    "clean-fds",
];

pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

pub fn build(src: &str) -> PathBuf {
    // Tests build in parallel: one build per source and test process, in one directory.
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, p)) = built.iter().find(|(s, _)| s == src) {
        return p.clone();
    }
    let dir = std::env::temp_dir().join(format!("om-wl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (name, ext) = src.rsplit_once('.').unwrap();
    let out = dir.join(name);
    let srcp = workload_source(src);
    let mut cmd = if ext == "rs" {
        let mut c = Command::new("rustc");
        c.args(["-O", "-o"]);
        c
    } else {
        let mut c = Command::new("gcc");
        c.args(["-O2", "-pthread"]);
        if name == "openmp" {
            c.arg("-fopenmp");
        }
        c.arg("-o");
        c
    };
    let ok = cmd.arg(&out).arg(&srcp).status().unwrap().success();
    assert!(ok, "building {src}");
    built.push((src.to_owned(), out.clone()));
    out
}

/// The path of a workload's source.
pub fn workload_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workloads")
        .join(name)
}

pub fn stdout_of(child: &mut Kill) -> (Vec<u8>, std::process::ExitStatus) {
    let mut out = Vec::new();
    child.0.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let status = child.0.wait().unwrap();
    (out, status)
}

/// A delay in `lo..hi` ms from the clock: a checkpoint or migration lands at a different place in
/// each run.
pub fn random_ms(lo: u64, hi: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut x = u64::from(nanos) ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    lo + x % (hi - lo)
}

/// A workload running `path args` with stdin on /dev/null in the current directory.
pub fn program(path: PathBuf, args: &[&str]) -> Workload {
    Workload {
        argv: std::iter::once(path.into_os_string())
            .chain(args.iter().map(Into::into))
            .collect(),
        stdin: None,
        cwd: None,
    }
}

/// Polls `done` every 10 ms until it holds or `timeout` passes; true if it held.
pub fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
