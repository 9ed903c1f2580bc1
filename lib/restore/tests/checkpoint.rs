//! Checkpoint of real programs started with `omrun` under a real `omd`: the image is complete and
//! checks out, and a program checkpointed with `--leave-running` produces exactly the output of an
//! uninterrupted run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use om::image::Checkpoint;
use om::image::records::{KIND_PROCESS, KIND_THREAD, ProcessRecord, ThreadRecord};

/// The directory holding the workspace's binaries (`omd`, `omrun`, `omctl`, `libomrt.so`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Node {
    dir: PathBuf,
    _omd: Kill,
}

impl Node {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("om-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let omd = Command::new(bin_dir().join("omd"))
            .args(["--listen", "127.0.0.1:0", "--key"])
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

    fn omctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin_dir().join("omctl"))
            .arg("--control")
            .arg(self.dir.join("ctl.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Starts `prog` under omrun with stdout piped; returns once its runtime registered.
    fn omrun(&self, prog: &Path, args: &[&str]) -> (Kill, u32) {
        let child = clean_fds()
            .arg(bin_dir().join("omrun"))
            .arg("--control")
            .arg(self.dir.join("ctl.sock"))
            .arg("--")
            .arg(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map(Kill)
            .unwrap();
        let omrun = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.omctl(&["ps"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            // The program is omrun's child.
            let pid = text
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("pid=")?.parse::<u32>().ok())
                .find(|p| parent_of(*p) == Some(omrun));
            if let Some(pid) = pid {
                return (child, pid);
            }
            assert!(Instant::now() < deadline, "the program did not register: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A command that closes every inherited descriptor above 2 and then runs its arguments: whatever the
/// test runner's environment leaks is not the program's.
fn clean_fds() -> Command {
    let mut c = Command::new("bash");
    c.args([
        "-c",
        r#"for f in /proc/$$/fd/*; do n=${f##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-" 2>/dev/null; done; exec "$@""#,
        "clean-fds",
    ]);
    c
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn build(src: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("om-wl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = src.trim_end_matches(".c");
    let out = dir.join(name);
    let srcp = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workloads")
        .join(src);
    let ok = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&srcp)
        .status()
        .unwrap()
        .success();
    assert!(ok, "gcc {src}");
    out
}

fn stdout_of(child: &mut Kill) -> (Vec<u8>, std::process::ExitStatus) {
    let mut out = Vec::new();
    child.0.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let status = child.0.wait().unwrap();
    (out, status)
}

#[test]
fn leave_running_checkpoint_of_threads_is_complete_and_changes_nothing() {
    let prog = build("threads.c");
    let plain = Command::new(&prog).args(["200"]).output().unwrap();
    assert!(plain.status.success());

    let node = Node::start("leave");
    let (mut run, pid) = node.omrun(&prog, &["200"]);
    std::thread::sleep(Duration::from_millis(300));
    let ck = node.dir.join("ck");
    let out = node.omctl(&[
        "checkpoint",
        &pid.to_string(),
        "--out",
        ck.to_str().unwrap(),
        "--leave-running",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (stdout, status) = stdout_of(&mut run);
    assert!(status.success());
    assert_eq!(
        stdout, plain.stdout,
        "a checkpoint with --leave-running changed the output"
    );

    let c = Checkpoint::open(&ck).unwrap();
    let p = c.records.iter().find(|r| r.kind == KIND_PROCESS).unwrap();
    let p = ProcessRecord::decode(&p.bytes).unwrap();
    assert_eq!(p.pid, pid);
    let threads: Vec<ThreadRecord> = c
        .records
        .iter()
        .filter(|r| r.kind == KIND_THREAD)
        .map(|r| ThreadRecord::decode(&r.bytes).unwrap())
        .collect();
    // main, 8 workers and the runtime's control thread
    assert_eq!(threads.len(), 10, "{threads:?}");
    assert!(threads.iter().any(|t| t.tid == pid));
    assert_eq!(
        threads
            .iter()
            .filter(|t| t.flags & ThreadRecord::CONTROL != 0)
            .count(),
        1
    );
    for t in &threads {
        assert!(t.fs_base != 0 && t.frame != 0, "{t:?}");
        // The frame is inside a mapped, populated part of the image.
        assert!(
            c.runs.iter().any(|r| r.data && r.addr.contains(&t.frame)),
            "frame of {} not in the image",
            t.tid
        );
    }
    let mut pages = 0;
    c.for_each_page(|_, _| {
        pages += 1;
        Ok(())
    })
    .unwrap();
    assert!(pages > 16);
}

#[test]
fn checkpoint_without_leave_running_ends_the_process_after_the_image() {
    let prog = build("single.c");
    let node = Node::start("end");
    let (mut run, pid) = node.omrun(&prog, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let ck = node.dir.join("ck");
    let out = node.omctl(&["checkpoint", &pid.to_string(), "--out", ck.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, status) = stdout_of(&mut run);
    assert!(status.success(), "{status:?}");
    assert!(Checkpoint::open(&ck).is_ok());
    // Gone, and no longer listed.
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn unsupported_descriptor_is_refused_and_the_process_goes_on() {
    let prog = build("single.c");
    let node = Node::start("refuse");
    // A pipe inherited on fd 7 (a copy of the piped stdin) is something om cannot capture yet.
    let (mut run, pid) = {
        let mut cmd = clean_fds();
        cmd.arg("bash")
            .arg("-c")
            .arg(format!(
                "exec {omrun} --control {ctl} -- {prog} 7<&0",
                omrun = bin_dir().join("omrun").display(),
                ctl = node.dir.join("ctl.sock").display(),
                prog = prog.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let child = cmd.spawn().map(Kill).unwrap();
        let omrun = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = String::from_utf8_lossy(&node.omctl(&["ps"]).stdout).into_owned();
            if let Some(p) = text
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("pid=")?.parse::<u32>().ok())
                .find(|p| parent_of(*p) == Some(omrun))
            {
                break (child, p);
            }
            assert!(Instant::now() < deadline, "no registration");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let ck = node.dir.join("ck");
    let out = node.omctl(&["checkpoint", &pid.to_string(), "--out", ck.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fd 7 is a pipe"), "{err}");
    assert!(!ck.join("om-image").exists());
    drop(run.0.stdin.take());
    let (stdout, status) = stdout_of(&mut run);
    assert!(status.success(), "{status:?}");
    assert!(String::from_utf8_lossy(&stdout).contains("done"));
}
