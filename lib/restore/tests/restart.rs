//! Checkpoint and restart of real programs: each is checkpointed at a random moment under `omrun`
//! (which ends it once the image is safe), restarted with `omctl restart`, and what it printed
//! before and after must be, byte for byte, what an uninterrupted run prints, with the same exit
//! status.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Kill, Node, Workload, bin_dir, build, program, random_ms, stdout_of, workload_source};

/// `omctl restart DIR` in the foreground, stdout piped.
fn restart(node: &Node, ck: &std::path::Path) -> Kill {
    node.omctl_command(&["restart", ck.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(Kill)
        .unwrap()
}

fn finish(mut k: Kill) -> (Vec<u8>, std::process::ExitStatus, String) {
    let mut err = String::new();
    let mut e = k.0.stderr.take().unwrap();
    let (out, status) = stdout_of(&mut k);
    let _ = e.read_to_string(&mut err);
    (out, status, err)
}

/// Checkpoints `w` after `delay` ms (or a random moment in `window`), restarts it `cycles` times
/// in a row (each restarted copy checkpointed again), and compares with an uninterrupted run.
fn checkpoint_restart(name: &str, w: &Workload, window: (u64, u64), cycles: usize) {
    let (want, want_status) = w.reference();
    assert!(!want.is_empty(), "{name}: the reference run printed nothing");
    let node = Node::start(&format!("rs-{name}"));
    let (mut run, pid) = node.run(w);
    let mut got = Vec::new();
    let mut delays = Vec::new();
    let delay = random_ms(window.0, window.1);
    delays.push(delay);
    std::thread::sleep(Duration::from_millis(delay));
    let ck = node.dir.join("ck0");
    let out = node.omctl(&["checkpoint", &pid.to_string(), "--out", ck.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{name}: checkpoint after {delay} ms: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (part, status) = stdout_of(&mut run);
    assert!(status.success(), "{name}: omrun after the checkpoint: {status:?}");
    got.extend(part);

    let mut ck = ck;
    let mut seen = vec![pid];
    for cycle in 1..=cycles {
        let running = restart(&node, &ck);
        if cycle == cycles {
            let (part, status, err) = finish(running);
            got.extend(part);
            assert_eq!(
                status.code(),
                want_status.code(),
                "{name}: exit status after restart (delays {delays:?}): {err}"
            );
            break;
        }
        // The restored copy registers again under a new node pid, with its own pid unchanged.
        let mut running = running;
        let now = node.wait_registered_while(
            |p, v| v == pid && !seen.contains(&p),
            || match running.0.try_wait() {
                Ok(Some(st)) => Err(format!(
                    "{name}: restart {cycle} ended ({st:?}) before it registered"
                )),
                _ => Ok(()),
            },
        );
        seen.push(now);
        let delay = random_ms(window.0 / 2, window.1 / 2);
        delays.push(delay);
        std::thread::sleep(Duration::from_millis(delay));
        let next = node.dir.join(format!("ck{cycle}"));
        let out = node.omctl(&["checkpoint", &now.to_string(), "--out", next.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: checkpoint {cycle}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (part, status, err) = finish(running);
        assert!(
            status.success(),
            "{name}: restart {cycle} ended with {status:?}: {err}"
        );
        got.extend(part);
        ck = next;
    }
    if got != want {
        let g = String::from_utf8_lossy(&got);
        let w = String::from_utf8_lossy(&want);
        panic!(
            "{name}: output differs (checkpoints after {delays:?} ms)\n--- restarted:\n{g}\n--- uninterrupted:\n{w}"
        );
    }
}

#[test]
fn single_threaded_c() {
    let w = program(build("single.c"), &[]);
    checkpoint_restart("single", &w, (200, 1200), 1);
}

#[test]
fn c_with_eight_pthreads_mutexes_and_condvars() {
    let w = program(build("threads.c"), &[]);
    checkpoint_restart("threads", &w, (200, 1200), 1);
}

#[test]
fn rust_threads_and_channels() {
    let w = program(build("rust_threads.rs"), &[]);
    checkpoint_restart("rust", &w, (200, 1200), 1);
}

#[test]
fn openmp_loop() {
    let w = program(build("openmp.c"), &[]);
    checkpoint_restart("openmp", &w, (200, 1200), 1);
}

#[test]
fn python3_computation() {
    // The interpreter itself, not a pyenv shim script.
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"));
    let mut w = program(python, &[]);
    w.argv.push(workload_source("compute.py").into_os_string());
    checkpoint_restart("python", &w, (300, 1200), 1);
}

#[test]
fn sqlite3_transaction_script_on_stdin() {
    let mut w = program(PathBuf::from("sqlite3"), &[":memory:"]);
    w.stdin = Some(workload_source("sqlite.sql"));
    checkpoint_restart("sqlite", &w, (200, 1200), 1);
}

#[test]
fn sigalrm_handler_on_a_sigaltstack() {
    let w = program(build("sigalrm.c"), &[]);
    checkpoint_restart("sigalrm", &w, (200, 1200), 1);
}

#[test]
fn file_written_while_running_continues_at_its_offset() {
    let prog = build("filewriter.c");
    let dir = std::env::temp_dir().join(format!("om-fw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = program(prog, &[]);
    w.cwd = Some(dir.clone());
    checkpoint_restart("filewriter", &w, (200, 1200), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_gib_heap() {
    let w = program(build("bigheap.c"), &["2048"]);
    checkpoint_restart("bigheap", &w, (500, 1500), 1);
}

/// manyvmas runs 400 rounds, about 2 s here: at its default 100 it could end before a checkpoint
/// late in the window was done with its 10,035 VMAs (a fresh-clone CI run saw "went away without
/// answering" after 564 ms).
#[test]
fn ten_thousand_vmas() {
    let w = program(build("manyvmas.c"), &["400"]);
    checkpoint_restart("manyvmas", &w, (200, 1000), 1);
}

#[test]
fn exit_status_of_the_restarted_program() {
    let w = program(build("exitcode.c"), &[]);
    checkpoint_restart("exitcode", &w, (200, 1000), 1);
}

#[test]
fn checkpoint_and_restart_five_times_in_a_row() {
    let w = program(build("threads.c"), &["500"]);
    checkpoint_restart("cycles", &w, (200, 600), 6);
}

/// Checkpoints `w` (a fresh copy of a built program) once, returning the node, the checkpoint and
/// the program's path.
fn checkpointed(name: &str, src: &str) -> (Node, PathBuf, PathBuf) {
    let node = Node::start(&format!("rs-{name}"));
    let prog = node.dir.join(src.trim_end_matches(".c"));
    std::fs::copy(build(src), &prog).unwrap();
    let (mut run, pid) = node.run(&program(prog.clone(), &[]));
    std::thread::sleep(Duration::from_millis(300));
    let ck = node.dir.join("ck");
    let out = node.omctl(&["checkpoint", &pid.to_string(), "--out", ck.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = stdout_of(&mut run);
    (node, ck, prog)
}

fn assert_restart_fails(node: &Node, ck: &std::path::Path, what: &str) {
    let (_, status, err) = finish(restart(node, ck));
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(what), "wanted {what:?} in: {err}");
    // Nothing of it runs or registered.
    let ps = String::from_utf8_lossy(&node.omctl(&["ps"]).stdout).into_owned();
    assert_eq!(ps.trim(), "0", "{ps}");
}

#[test]
fn a_mapped_file_changed_since_the_checkpoint_is_refused_by_name() {
    let (node, ck, prog) = checkpointed("changed", "single.c");
    let mut f = std::fs::OpenOptions::new().append(true).open(&prog).unwrap();
    std::io::Write::write_all(&mut f, b"\0").unwrap();
    drop(f);
    assert_restart_fails(
        &node,
        &ck,
        &format!("{} (mapped by the process) was modified", prog.display()),
    );
    std::fs::remove_file(&prog).unwrap();
    assert_restart_fails(
        &node,
        &ck,
        &format!("{} (mapped by the process) cannot be opened", prog.display()),
    );
}

#[test]
fn a_corrupted_page_is_refused_and_nothing_runs() {
    let (node, ck, _) = checkpointed("corrupt", "single.c");
    let pages = ck.join("pages");
    let mut bytes = std::fs::read(&pages).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&pages, &bytes).unwrap();
    assert_restart_fails(&node, &ck, "fails its checksum");
}

/// A checkpoint directory whose manifest lost its checksums (only omd may hand over pages without
/// them, pages it checked itself) is refused before anything runs.
#[test]
fn a_checkpoint_without_page_checksums_is_refused() {
    let (node, ck, _) = checkpointed("nosums", "single.c");
    let mut c = om::image::Checkpoint::open(&ck).unwrap();
    assert!(c.checks_pages() && !c.sums.is_empty());
    c.sums.clear();
    let manifest = c.encode_manifest().unwrap();
    std::fs::write(ck.join(om::image::checkpoint::MANIFEST), manifest).unwrap();
    assert!(!om::image::Checkpoint::open(&ck).unwrap().checks_pages());
    assert_restart_fails(&node, &ck, "no checksum for its pages");
}

#[test]
fn detached_restart_prints_the_pid_and_the_file_output_continues() {
    let prog = build("threads.c");
    // About 4 s of work: still running when the detached restart returns.
    let w = program(prog.clone(), &["600"]);
    let (want, _) = w.reference();
    let node = Node::start("rs-detach");
    let out_file = node.dir.join("out.txt");
    // stdout is a regular file this time: the restored process reopens it at its offset.
    let mut cmd = common::clean_fds();
    cmd.arg(bin_dir().join("omrun"))
        .arg("--control")
        .arg(node.dir.join("ctl.sock"))
        .arg("--")
        .arg(&prog)
        .arg("600")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null());
    let mut run = cmd.spawn().map(Kill).unwrap();
    let omrun = run.0.id();
    let pid = node.wait_registered(|p, _| common::parent_of(p) == Some(omrun));
    std::thread::sleep(Duration::from_millis(random_ms(200, 1000)));
    let ck = node.dir.join("ck");
    let out = node.omctl(&["checkpoint", &pid.to_string(), "--out", ck.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(run.0.wait().unwrap().success());

    // Detached, omctl returns once the program runs (om-restore lets go of omctl's stdio then).
    let out = node.omctl(&["restart", "--detach", ck.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let now: u32 = text
        .trim()
        .strip_prefix("restarted as pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {text:?}"));
    // It runs (omctl returned as soon as it did; it has seconds of work left) under its old pid in
    // its namespace.
    let status = std::fs::read_to_string(format!("/proc/{now}/status")).expect("the restarted program runs");
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_default()
        .to_owned();
    assert!(nspid.trim_end().ends_with(&format!("\t{pid}")), "{nspid:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::path::Path::new(&format!("/proc/{now}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted program did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(&out_file).unwrap(), want);
}

#[test]
fn lazy_restore_keeps_fork_dontneed_mremap_and_munmap_right() {
    // 512 MiB of heap is restored lazily; every round forks, drops, moves and remaps slices of it.
    let w = program(build("lazyevents.c"), &[]);
    checkpoint_restart("lazyevents", &w, (1200, 2600), 3);
}

#[test]
fn a_program_linked_with_lomrt_is_checkpointed_and_restarted_without_omrun() {
    let node = Node::start("rs-linked");
    let prog = node.dir.join("single-linked");
    let lib = bin_dir();
    let ok = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&prog)
        .arg(workload_source("single.c"))
        .arg(format!("-L{}", lib.display()))
        // The program calls nothing in it: without this, --as-needed (Debian's default) drops it.
        .args(["-Wl,--no-as-needed", "-lomrt", "-Wl,--as-needed"])
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .unwrap()
        .success();
    assert!(ok, "linking single.c with -lomrt");
    let w = program(prog.clone(), &[]);
    let (want, _) = w.reference();
    // No omrun: the runtime starts from the library's constructor and finds omd through OM_CONTROL.
    let mut cmd = common::clean_fds();
    w.setup(&mut cmd);
    cmd.env(om::control::CONTROL_ENV, node.dir.join("ctl.sock"));
    let mut run = cmd.spawn().map(Kill).unwrap();
    let shell = run.0.id();
    // clean_fds execs the program: it is the spawned process itself.
    let pid = node.wait_registered(|p, _| p == shell);
    std::thread::sleep(Duration::from_millis(random_ms(200, 1000)));
    let ck = node.dir.join("ck");
    let out = node.omctl(&["checkpoint", &pid.to_string(), "--out", ck.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (mut got, status) = stdout_of(&mut run);
    assert!(status.success(), "{status:?}");
    let (rest, status, err) = finish(restart(&node, &ck));
    assert!(status.success(), "{err}");
    got.extend(rest);
    assert!(got == want, "output differs:\n{}", String::from_utf8_lossy(&got));
}

#[test]
fn signals_sent_to_omctl_restart_reach_the_program_once() {
    let node = Node::start("rs-signals");
    let w = program(build("signals.c"), &[]);
    let (mut run, pid) = node.run(&w);
    std::thread::sleep(Duration::from_millis(500));
    let ck = node.dir.join("ck");
    let out = node.omctl(&["checkpoint", &pid.to_string(), "--out", ck.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = stdout_of(&mut run);
    let restarted = restart(&node, &ck);
    node.wait_registered(|_, v| v == pid);
    let anchor = restarted.0.id().to_string();
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &anchor])
                .status()
                .unwrap()
                .success()
        )
    };
    kill("-USR1");
    std::thread::sleep(Duration::from_millis(400));
    kill("-TERM");
    let (out, status, err) = finish(restarted);
    let text = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(status.code(), Some(3), "{err}\n{text}");
    assert_eq!(text.matches("USR1 ").count(), 1, "{text}");
    assert!(text.contains("TERM after 1 USR1"), "{text}");
}
