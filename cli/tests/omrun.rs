//! omrun as home anchor: exact exit status, death by the same signal, forwarded signals.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

const OMRUN: &str = env!("CARGO_BIN_EXE_omrun");

#[test]
fn exit_status_is_the_programs() {
    for code in [0, 1, 7, 255] {
        let st = Command::new(OMRUN)
            .args(["--", "sh", "-c", &format!("exit {code}")])
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(code));
    }
}

#[test]
fn output_and_arguments_pass_through() {
    let out = Command::new(OMRUN)
        .args(["--", "printf", "%s|", "-n", "a b", "--x"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"-n|a b|--x|");
}

#[test]
fn dies_of_the_programs_fatal_signal() {
    for sig in [libc::SIGKILL, libc::SIGSEGV, libc::SIGTERM] {
        let st = Command::new(OMRUN)
            .args(["--", "sh", "-c", &format!("kill -{sig} $$")])
            .status()
            .unwrap();
        assert_eq!(st.signal(), Some(sig), "{st:?}");
    }
}

#[test]
fn missing_program_is_a_clear_error() {
    let out = Command::new(OMRUN)
        .args(["--", "/nonexistent/prog"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot start \"/nonexistent/prog\""), "{err}");
}

#[test]
fn signals_sent_to_omrun_reach_the_program() {
    // The program reports each signal it gets and exits on TERM with a status that proves it ran its
    // handler.
    let script = "trap 'echo usr1' USR1; trap 'echo hup' HUP; trap 'echo term; exit 42' TERM; \
                  echo ready; while :; do sleep 0.01; done";
    // A shell cannot trap a signal that was ignored when it started, and a test run under `nohup`
    // (or as a background job) starts with HUP (or INT and QUIT) ignored: env puts the defaults back
    // before it execs omrun, which passes them on.
    let mut child = Command::new("env")
        .args(["--default-signal=HUP,INT,QUIT", OMRUN, "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    for (sig, expect) in [
        (nix::sys::signal::Signal::SIGUSR1, "usr1"),
        (nix::sys::signal::Signal::SIGHUP, "hup"),
        (nix::sys::signal::Signal::SIGTERM, "term"),
    ] {
        nix::sys::signal::kill(pid, sig).unwrap();
        assert_eq!(lines.next().unwrap().unwrap(), expect);
    }
    assert_eq!(child.wait().unwrap().code(), Some(42));
}

#[test]
fn the_program_starts_with_no_signal_blocked() {
    // omrun blocks the signals it forwards; the program must not inherit that mask.
    let out = Command::new(OMRUN)
        .args(["--", "grep", "^SigBlk:", "/proc/self/status"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "SigBlk:\t0000000000000000"
    );
}
