//! omrun under an HPC launcher: `mpirun -np 4 omrun ./app` (Debian's Open MPI) starts four ranks,
//! each under its own omrun with the runtime loaded and registered with the node's omd; their output
//! arrives as from a plain `mpirun -np 4 ./app`, and the job's exit code is the ranks'. Without a
//! terminal. The same under Slurm's `srun` (a one-node cluster in a rig node, `om_rig::slurm`). A rank
//! moves to another node and back under either launcher.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Node, bin_dir, build, clean_fds, ps_pid};

fn mpirun() -> PathBuf {
    let p = PathBuf::from("/usr/bin/mpirun");
    assert!(
        p.exists(),
        "mpirun is missing: ci/deps.sh installs Debian's openmpi-bin"
    );
    p
}

/// `mpirun -np RANKS ARGS` as root, oversubscribed (two cores), stdin on /dev/null, no terminal.
fn mpirun_command(ranks: u32, args: &[std::ffi::OsString]) -> Command {
    let mut c = clean_fds();
    c.arg(mpirun())
        .args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn sorted_lines(out: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(out)
        .lines()
        .filter(|l| l.starts_with("rank "))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

#[test]
fn four_ranks_under_mpirun_run_like_a_plain_job() {
    let node = Node::start("mpirun");
    let prog = build("ranks.c");
    let args =
        |code: &str| -> Vec<std::ffi::OsString> { vec![prog.clone().into(), "40".into(), code.into()] };
    let omrun_args = |code: &str| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            bin_dir().join("omrun").into(),
            "--control".into(),
            node.dir.join("ctl.sock").into(),
            "--".into(),
        ];
        v.extend(args(code));
        v
    };

    let plain = run(&mut mpirun_command(4, &args("0")));
    assert!(
        plain.status.success(),
        "plain mpirun: {}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let want = sorted_lines(&plain.stdout);
    assert_eq!(want.len(), 160, "4 ranks x 40 lines");

    // Under omrun: while the job runs, omd lists four om processes, one per rank.
    let mut job = mpirun_command(4, &omrun_args("0")).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0;
    while Instant::now() < deadline && seen < 4 {
        let ps = node.omctl(&["ps"]);
        seen = String::from_utf8_lossy(&ps.stdout)
            .split_whitespace()
            .filter_map(ps_pid)
            .count();
        if matches!(job.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(seen, 4, "the four ranks registered with omd: {err}");
    assert!(out.status.success(), "mpirun omrun: {:?} {err}", out.status);
    assert_eq!(sorted_lines(&out.stdout), want, "the ranks' output through omrun");
    assert_eq!(
        err.matches("done, tty: no").count(),
        4,
        "no terminal, as under srun: {err}"
    );

    // The job's exit code is the ranks', as without omrun.
    exits_7_both_ways(
        &run(&mut mpirun_command(4, &args("7"))),
        &run(&mut mpirun_command(4, &omrun_args("7"))),
    );
}

/// A job whose ranks exit with 7 exits with 7, without omrun (`plain`) and with it.
fn exits_7_both_ways(plain: &Output, with_omrun: &Output) {
    assert_eq!(
        plain.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert_eq!(
        with_omrun.status.code(),
        plain.status.code(),
        "{}",
        String::from_utf8_lossy(&with_omrun.stderr)
    );
}

/// A rig of two nodes, each with its omd.
fn two_nodes() -> (om_rig::Rig, [om_rig::OmdHandle; 2]) {
    let rig = om_rig::Rig::new(2).expect("rig");
    let omd = bin_dir().join("omd");
    let omds = [
        rig.start_omd(0, &omd, &[]).expect("omd 0"),
        rig.start_omd(1, &omd, &[]).expect("omd 1"),
    ];
    (rig, omds)
}

/// Waits for the four ranks of a job on node 0 to register with its omd, then moves one to node 1
/// and back, at random moments.
fn move_a_rank_there_and_back(omds: &[om_rig::OmdHandle; 2]) {
    let omctl = |node: usize, args: &[&str]| {
        Command::new(bin_dir().join("omctl"))
            .arg("--control")
            .arg(&omds[node].control)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        let ps = String::from_utf8_lossy(&omctl(0, &["ps"]).stdout).into_owned();
        let pids: Vec<u32> = ps.split_whitespace().filter_map(ps_pid).collect();
        if pids.len() == 4 {
            break pids[0];
        }
        assert!(Instant::now() < deadline, "ranks did not register: {ps}");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(common::random_ms(300, 800)));
    let to1 = omds[1].listen.to_string();
    let out = omctl(0, &["migrate", &pid.to_string(), "--to", &to1, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let there = om_launch::Migration::from_json(String::from_utf8_lossy(&out.stdout).trim())
        .expect("report")
        .pid_there;
    std::thread::sleep(Duration::from_millis(common::random_ms(300, 800)));
    let to0 = omds[0].listen.to_string();
    let back = omctl(1, &["migrate", &there.to_string(), "--to", &to0, "--json"]);
    assert!(back.status.success(), "{}", String::from_utf8_lossy(&back.stderr));
}

/// A rank moves to another node while mpirun runs, and comes back: the job's output is complete
/// (omrun, the rank's home anchor, relays it) and its exit code unchanged.
#[test]
fn a_rank_moves_to_another_node_and_back_under_mpirun() {
    let (rig, omds) = two_nodes();
    let prog = build("ranks.c");
    let lines = "300";
    let plain = run(&mut mpirun_command(
        4,
        &[prog.clone().into(), lines.into(), "0".into()],
    ));
    let want = sorted_lines(&plain.stdout);
    assert_eq!(want.len(), 1200);
    // mpirun on node 0, each rank under omrun with node 0's omd.
    let mut c = rig.node(0).unwrap().command("bash");
    c.args(common::CLEAN_FDS)
        .arg(mpirun())
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "4"])
        .arg(bin_dir().join("omrun"))
        .arg("--control")
        .arg(&omds[0].control)
        .arg("--")
        .arg(&prog)
        .args([lines, "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let job = c.spawn().unwrap();
    move_a_rank_there_and_back(&omds);
    let out = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert_eq!(sorted_lines(&out.stdout), want, "lines lost or repeated: {err}");
    drop(omds);
    rig.teardown().unwrap();
}

/// The same jobs under Slurm: a one-node cluster of Debian's slurmctld and slurmd in node 0's
/// namespace. `srun -n 4 omrun ./app` runs like `srun -n 4 ./app` (output, no terminal, exit code),
/// and a rank moves to node 1 and back while srun waits for it.
#[test]
fn four_ranks_under_srun_run_like_a_plain_job_and_one_moves_away_and_back() {
    let (rig, omds) = two_nodes();
    let slurm = om_rig::slurm::Slurm::start(&rig, 0).unwrap_or_else(|e| panic!("{e}"));
    let prog = build("ranks.c");
    let omrun = bin_dir().join("omrun");
    let srun = |with_omrun: bool, lines: &str, code: &str| {
        let mut args: Vec<&std::ffi::OsStr> = Vec::new();
        if with_omrun {
            args.extend([
                omrun.as_os_str(),
                "--control".as_ref(),
                omds[0].control.as_os_str(),
                "--".as_ref(),
            ]);
        }
        args.extend([prog.as_os_str(), lines.as_ref(), code.as_ref()]);
        slurm.srun(4, &args)
    };
    let plain = run(&mut srun(false, "300", "0"));
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(plain.status.success(), "plain srun: {err}\n{}", slurm.logs());
    let want = sorted_lines(&plain.stdout);
    assert_eq!(want.len(), 1200, "4 ranks x 300 lines: {err}");

    let job = srun(true, "300", "0").spawn().unwrap();
    move_a_rank_there_and_back(&omds);
    let out = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "srun omrun: {:?}: {err}\n{}",
        out.status,
        slurm.logs()
    );
    assert_eq!(sorted_lines(&out.stdout), want, "lines lost or repeated: {err}");
    assert_eq!(
        err.matches("done, tty: no").count(),
        4,
        "no terminal under srun: {err}"
    );

    // srun's exit code is the ranks', as without omrun.
    exits_7_both_ways(&run(&mut srun(false, "5", "7")), &run(&mut srun(true, "5", "7")));
    drop(omds);
    rig.teardown().unwrap();
}
