//! omd: configuration errors, its sockets, clean shutdown; and one omd per node of the rig.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use om_rig::Rig;

const OMD: &str = env!("CARGO_BIN_EXE_omd");

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("omd-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn key(dir: &Path, mode: u32) -> PathBuf {
    let p = dir.join("key");
    std::fs::write(&p, [9u8; 32]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn request(control: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(control).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    reply
}

fn start(dir: &Path, key: &Path, port: u16) -> Child {
    Command::new(OMD)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--key"])
        .arg(key)
        .arg("--control")
        .arg(dir.join("sock/omd.sock"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills the daemon if the test fails before stopping it (an orphan would hold the test's output open).
struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serves_control_refuses_peers_and_stops_cleanly() {
    let d = tempdir("serve");
    let k = key(&d.0, 0o600);
    let port = free_port();
    let mut omd = KillOnDrop(start(&d.0, &k, port));
    let control = d.0.join("sock/omd.sock");
    wait_for(&control);
    assert_eq!(
        std::fs::metadata(&control).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(request(&control, "ping").starts_with("OK omd "));
    assert_eq!(request(&control, "ps").trim_end(), "OK 0");
    assert!(request(&control, "migrate 1").starts_with("ERR usage: migrate"));
    assert!(request(&control, "migrate 99999 127.0.0.1:1 50 30 precopy").contains("not an om process"));
    assert!(request(&control, "bogus").starts_with("ERR unknown request"));
    // The reserve: none by default; set, made in the background, reported; refused over the limits.
    assert_eq!(
        request(&control, "reserve").trim_end(),
        "OK reserve=0 ready=0 taken=0"
    );
    assert!(request(&control, "reserve 4194304").starts_with("OK reserve=4194304 "));
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(&control, "reserve").trim_end() != "OK reserve=4194304 ready=4194304 taken=0" {
        assert!(Instant::now() < deadline, "the reserve was never made");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(request(&control, "reserve 1T").starts_with("ERR usage: reserve"));
    assert!(
        request(&control, "reserve 1099511627776000").contains("exceeds this node's image memory limits")
    );
    assert_eq!(
        request(&control, "reserve 0").trim_end(),
        "OK reserve=0 ready=0 taken=0"
    );

    // A second omd on the same control socket is refused, and the first keeps it.
    let second = Command::new(OMD)
        .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--key"])
        .arg(&k)
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
    assert!(request(&control, "ping").starts_with("OK"));

    // A peer that does not speak the protocol is told so and disconnected, not left hanging.
    let mut peer = TcpStream::connect(("127.0.0.1", port)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    peer.write_all(&[b'x'; 40]).unwrap();
    let mut msg = Vec::new();
    peer.read_to_end(&mut msg).unwrap();
    let msg = String::from_utf8_lossy(&msg);
    assert!(msg.contains("not an om frame"), "{msg}");
    assert!(request(&control, "images").starts_with("OK 0"));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(omd.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(omd.0.wait().unwrap().success());
    assert!(!control.exists(), "control socket left behind");
}

/// omd started with `args`, the key file `key` and the control socket `control` must fail: what it
/// said.
fn refused(args: &[&str], key: &Path, control: &Path) -> String {
    let out = Command::new(OMD)
        .args(args)
        .arg("--key")
        .arg(key)
        .arg("--control")
        .arg(control)
        .output()
        .unwrap();
    assert!(!out.status.success(), "omd {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn configuration_errors_are_clear() {
    let d = tempdir("errors");
    let sock = d.0.join("c.sock");
    let open_key = key(&d.0, 0o644);
    let err = refused(&["--listen", "127.0.0.1:0"], &open_key, &sock);
    assert!(
        err.contains("cluster key refused") && err.contains("chmod 600"),
        "{err}"
    );

    let k = key(&d.0, 0o600);
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let err = refused(&["--listen", &busy.local_addr().unwrap().to_string()], &k, &sock);
    assert!(
        err.contains("cannot listen on") && err.contains("in use"),
        "{err}"
    );

    let over = [
        "--listen",
        "127.0.0.1:0",
        "--max-total-mem",
        "1G",
        "--reserve",
        "2G",
    ];
    let err = refused(&over, &k, &sock);
    assert!(
        err.contains("--reserve refused") && err.contains("exceeds this node's image memory limits"),
        "{err}"
    );
}

#[test]
fn one_omd_per_rig_node_started_and_stopped() {
    let rig = Rig::new(3).expect("rig");
    let mut handles = Vec::new();
    for n in 0..3 {
        handles.push(rig.start_omd(n, Path::new(OMD), &[]).expect("omd up"));
    }
    for h in &handles {
        assert_eq!(h.listen.ip(), &rig.node(h.node).unwrap().addr());
        assert!(request(&h.control, "ping").starts_with("OK omd "));
    }
    rig.stop_omd(1).unwrap();
    assert!(!handles[1].control.exists(), "omd 1 did not shut down cleanly");
    assert!(matches!(rig.stop_omd(1), Err(om_rig::RigError::OmdNotRunning(1))));
    assert!(request(&handles[0].control, "ping").starts_with("OK"));
    // Restart it: same address, same socket.
    let again = rig.start_omd(1, Path::new(OMD), &[]).expect("omd restarts");
    assert!(request(&again.control, "ping").starts_with("OK"));
    let id = rig.id().to_owned();
    let pids: Vec<i32> = handles.iter().map(|h| h.pid).chain([again.pid]).collect();
    rig.teardown().unwrap();
    assert!(om_rig::leftovers(&id, &pids).is_empty());
}
