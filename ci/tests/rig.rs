//! The rig itself: nodes talk to each other, and teardown leaves nothing behind however the owner ends.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use om_rig::{Rig, leftovers};

const OMRIG: &str = env!("CARGO_BIN_EXE_omrig");

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    // Only names: counters and states change on their own.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .collect::<Vec<_>>()
        .join(",")
}

fn wait_until_gone(id: &str, pids: &[i32]) -> om_rig::Leftovers {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = leftovers(id, pids);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn three_nodes_echo_between_every_pair_then_nothing_is_left() {
    let links_before = root_links();
    let rig = Rig::new(3).expect("rig");
    let id = rig.id().to_owned();
    let mut pids = Vec::new();
    for n in rig.nodes() {
        let listen = format!("{}:7777", n.addr());
        let tag = format!("n{}", n.index());
        let pid = rig
            .spawn(
                n.command(OMRIG)
                    .args(["echo-server", "--listen", &listen, "--tag", &tag])
                    .stdin(Stdio::null()),
            )
            .expect("echo server");
        pids.push(pid);
    }
    for from in rig.nodes() {
        for to in rig.nodes() {
            if from.index() == to.index() {
                continue;
            }
            let msg = format!("hello from n{} to n{}", from.index(), to.index());
            let out = from
                .command(OMRIG)
                .args([
                    "echo-client",
                    "--connect",
                    &format!("{}:7777", to.addr()),
                    "--message",
                    &msg,
                ])
                .output()
                .expect("echo client");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("n{}: {msg}\n", to.index())
            );
        }
    }
    rig.teardown().expect("teardown proves nothing is left");
    assert!(leftovers(&id, &pids).is_empty());
    assert_eq!(
        root_links(),
        links_before,
        "the root namespace's interfaces changed"
    );
}

#[test]
fn a_panicking_test_leaves_nothing() {
    let seen = std::sync::Mutex::new((String::new(), 0));
    let r = std::panic::catch_unwind(|| {
        let rig = Rig::new(2).expect("rig");
        let n = rig.node(1).unwrap();
        let pid = rig
            .spawn(n.command("sleep").arg("1000").stdin(Stdio::null()))
            .unwrap();
        *seen.lock().unwrap() = (rig.id().to_owned(), pid);
        panic!("the test fails with the rig up");
    });
    assert!(r.is_err());
    let (id, pid) = seen.into_inner().unwrap();
    let left = leftovers(&id, &[pid]);
    assert!(left.is_empty(), "{left}");
}

/// Starts `omrig hold`, which brings a rig up with a `sleep` in each node; returns the child, the
/// rig's id, the reaper's pid and the sleepers' pids.
fn hold(nodes: usize) -> (std::process::Child, String, Vec<i32>) {
    let mut child = Command::new(OMRIG)
        .args(["hold", "--nodes", &nodes.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("omrig hold");
    let mut id = String::new();
    let mut pids = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        match line.split_once(' ') {
            Some(("id", v)) => id = v.to_owned(),
            Some(("pid", v)) => pids.push(v.parse().unwrap()),
            _ if line == "ready" => break,
            _ => panic!("unexpected line {line:?}"),
        }
    }
    assert!(!id.is_empty() && pids.len() == nodes);
    (child, id, pids)
}

#[test]
fn sigkill_of_the_owner_leaves_nothing() {
    let (mut child, id, pids) = hold(2);
    assert!(leftovers(&id, &pids).namespaces.len() == 3, "rig not up");
    child.kill().unwrap(); // SIGKILL: no destructor runs.
    child.wait().unwrap();
    let left = wait_until_gone(&id, &pids);
    assert!(left.is_empty(), "{left}");
}

#[test]
fn a_rig_whose_reaper_also_died_is_swept_by_the_next_rig() {
    let (mut child, id, pids) = hold(1);
    // Kill the reaper first (it is the owner's only `sh` child), then the owner: nobody cleans up.
    let reapers = Command::new("pgrep")
        .args(["-P", &child.id().to_string(), "sh"])
        .output()
        .unwrap();
    let reaper: i32 = String::from_utf8_lossy(&reapers.stdout)
        .trim()
        .parse()
        .expect("one reaper");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(reaper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        leftovers(&id, &pids).namespaces.len(),
        2,
        "without a reaper the rig stays"
    );
    let next = Rig::new(1).expect("next rig");
    let left = leftovers(&id, &pids);
    assert!(left.is_empty(), "{left}");
    next.teardown().unwrap();
}

#[test]
fn shell_interface_runs_a_script_against_a_rig() {
    let script = format!(
        "set -e; a=$({OMRIG} addr 1); test \"$a\" = 10.77.0.2; \
         {OMRIG} exec 0 -- ip -o -4 addr show dev eth0 | grep -q 10.77.0.1/24; echo \"$OMRIG_ID\""
    );
    let out = Command::new(OMRIG)
        .args(["run", "--nodes", "2", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(id.starts_with("omrig-"));
    assert!(leftovers(&id, &[]).is_empty());
    // A failing script's status comes back, and the rig still goes.
    let out = Command::new(OMRIG)
        .args(["run", "--nodes", "1", "--", "sh", "-c", "exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}
