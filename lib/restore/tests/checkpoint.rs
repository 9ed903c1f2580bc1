//! Checkpoint of real programs started with `omrun` under a real `omd`: the image is complete and
//! checks out, and a program checkpointed with `--leave-running` produces exactly the output of an
//! uninterrupted run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use om::image::Checkpoint;
use om::image::records::{KIND_PROCESS, KIND_THREAD, ProcessRecord, ThreadRecord};

mod common;

use common::{Kill, Node, bin_dir, build, clean_fds, parent_of, stdout_of};

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
                .filter_map(common::ps_pid)
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
