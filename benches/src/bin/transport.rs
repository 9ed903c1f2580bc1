//! Transport benchmark: `cargo run --release -p om-benches --bin transport [-- --gib 1,4 --runs 3]`
//! (as root: the veth path needs network namespaces).
//!
//! For each size and path (loopback; veth between two rig namespaces), in the same run:
//! - **plain**: a `send()` loop of the same bytes in 4 MiB chunks to a receiver that reads them into a
//!   reused buffer (the link's practical limit);
//! - **om**: the TCP transport shipping the same region (random content) as one round into a real
//!   `omd`, which lands the pages in its memfd image and checks every page's checksum, until the round
//!   is acknowledged.
//!
//! - **om-reserve**: the same, into memory omd allocated ahead of the image (`omd --reserve`), made
//!   before the transfer starts, as a page server expecting migrations keeps it;
//! - **plain-into-fresh**: the same loop, but the receiver reads into fresh memory of the full size
//!   (every receiver that keeps the bytes pays for allocating and zeroing each page once).
//!
//! It prints the rates, `om / plain` (the figure) and `om / plain-into-fresh`, and the machine's
//! busy CPU time per GiB of each (both ends share this machine's CPUs). The sub-commands `sink`, `blast` and `ship` are the two ends
//! of each measurement; the benchmark runs them inside the namespaces.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use om_benches::{machine_busy, median, omd_request, populated_region, set_reserve, word_after};
use om_transport::sys::Readable;
use om_transport::wire::{Begin, ImageInfo, Vma};
use om_transport::{ClusterKey, PageSender, SenderConfig, TcpSender};

const GIB: usize = 1 << 30;

/// `blast ADDR GIB`: sends GIB GiB of random content with a plain send loop ([`om_benches::blast`]).
fn blast(addr: &str, gib: usize) {
    let mut r = populated_region(gib * GIB, 7);
    om_benches::blast(addr, r.bytes_mut());
}

/// The benchmark's regions stay mapped until after the round is acknowledged.
fn readable(runs: &[std::ops::Range<u64>]) -> Readable<'_> {
    // SAFETY: the only caller passes its own region, alive across the call.
    unsafe { Readable::new(runs) }
}

/// `ship ADDR KEYFILE GIB STREAMS`: ships GIB GiB as one round into omd; prints seconds and the image id.
fn ship(addr: &str, key: &Path, gib: usize, streams: u16) {
    let key = ClusterKey::load(key).expect("key");
    let r = populated_region(gib * GIB, 11);
    let start = r.addr() as u64;
    let begin = Begin {
        info: ImageInfo {
            pid: std::process::id(),
            populated_bytes: r.len() as u64,
            ..ImageInfo::default()
        },
        vmas: vec![Vma {
            start,
            end: start + r.len() as u64,
            prot: 3,
            ..Vma::default()
        }],
    };
    let config = SenderConfig {
        streams,
        ..SenderConfig::default()
    };
    let mut tx = TcpSender::connect(addr.parse().expect("addr"), &key, config).expect("connect");
    tx.begin(&begin).expect("begin");
    let run = start..start + r.len() as u64;
    let cpu = machine_busy();
    let stats = tx.send_round(readable(&[run]), &[], true).expect("round");
    let cpu = machine_busy() - cpu;
    let id = tx.commit().expect("commit");
    println!(
        "SECS {} CPU {} ID {id}",
        stats.elapsed.as_secs_f64(),
        cpu.as_secs_f64()
    );
}

/// Where the two ends run.
struct Path2 {
    name: &'static str,
    sender: Box<dyn Fn() -> Command>,
    receiver: Box<dyn Fn() -> Command>,
    sink_addr: String,
    omd_addr: SocketAddr,
    omd_control: PathBuf,
    key: PathBuf,
}

fn run_out(mut c: Command) -> String {
    let out = c.stderr(Stdio::inherit()).output().expect("run");
    assert!(out.status.success(), "{c:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One measurement: the transfer's wall time and the machine's busy CPU time across it.
type Sample = (Duration, Duration);

fn secs(out: &str, key: &str) -> Duration {
    Duration::from_secs_f64(word_after(out, key).parse().expect("seconds"))
}

fn plain_once(p: &Path2, gib: usize, fresh: bool) -> Sample {
    let mut rx = (p.receiver)();
    rx.args(["sink", &p.sink_addr]);
    if fresh {
        rx.arg((gib * GIB).to_string());
    }
    let mut rx = rx.stdout(Stdio::piped()).spawn().expect("sink");
    let mut out = BufReader::new(rx.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).ok();
    assert_eq!(line.trim(), "READY");
    let mut tx = (p.sender)();
    tx.args(["blast", &p.sink_addr, &gib.to_string()]);
    let out = run_out(tx);
    rx.wait().ok();
    (secs(&out, "SECS"), secs(&out, "CPU"))
}

/// One om transfer into omd, into fresh memory or, with `reserved`, into the memory omd keeps
/// allocated ahead of an image (`omd --reserve`), made before the transfer starts.
fn om_once(p: &Path2, gib: usize, streams: u16, reserved: bool) -> Sample {
    set_reserve(&p.omd_control, if reserved { gib * GIB } else { 0 });
    let mut tx = (p.sender)();
    tx.args(["ship", &p.omd_addr.to_string()])
        .arg(&p.key)
        .args([gib.to_string(), streams.to_string()]);
    let out = run_out(tx);
    let id = word_after(&out, "ID");
    let reply = omd_request(&p.omd_control, &format!("drop {id}"));
    assert!(reply.starts_with("OK"), "{reply}");
    (secs(&out, "SECS"), secs(&out, "CPU"))
}

fn rate(gib: usize, d: Duration) -> f64 {
    (gib * GIB) as f64 / d.as_secs_f64() / 1e9
}

/// The medians of the wall and CPU times of `samples`.
fn medians(samples: &[Sample]) -> Sample {
    let wall: Vec<Duration> = samples.iter().map(|s| s.0).collect();
    let cpu: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    (median(&wall).expect("runs"), median(&cpu).expect("runs"))
}

fn measure(p: &Path2, sizes: &[usize], runs: usize, streams: &[u16]) {
    for &gib in sizes {
        let n = if gib > 1 { 1 } else { runs };
        let plain: Vec<Sample> = (0..n).map(|_| plain_once(p, gib, false)).collect();
        let (pm, pc) = medians(&plain);
        let fresh: Vec<Sample> = (0..n).map(|_| plain_once(p, gib, true)).collect();
        let (fm, fc) = medians(&fresh);
        for &s in streams {
            let om: Vec<Sample> = (0..n).map(|_| om_once(p, gib, s, false)).collect();
            let (omm, omc) = medians(&om);
            let warm: Vec<Sample> = (0..n).map(|_| om_once(p, gib, s, true)).collect();
            let (wm, wc) = medians(&warm);
            println!(
                "{:<9} {gib} GiB  streams {s}  plain {:5.2} GB/s  plain-into-fresh {:5.2} GB/s  om {:5.2} GB/s  om-reserve {:5.2} GB/s  om/plain {:.2}  om-reserve/plain {:.2}  om/plain-into-fresh {:.2}  (median of {n})",
                p.name,
                rate(gib, pm),
                rate(gib, fm),
                rate(gib, omm),
                rate(gib, wm),
                pm.as_secs_f64() / omm.as_secs_f64(),
                pm.as_secs_f64() / wm.as_secs_f64(),
                fm.as_secs_f64() / omm.as_secs_f64()
            );
            // Both ends share this machine's CPUs: what each way costs them per GiB, and how many
            // CPUs were busy on average while it ran.
            let per_gib = |c: Duration| c.as_secs_f64() / gib as f64;
            let busy = |c: Duration, w: Duration| c.as_secs_f64() / w.as_secs_f64();
            println!(
                "{:<9} {gib} GiB  streams {s}  CPU s/GiB (busy CPUs): plain {:.2} ({:.1})  plain-into-fresh {:.2} ({:.1})  om {:.2} ({:.1})  om-reserve {:.2} ({:.1})",
                p.name,
                per_gib(pc),
                busy(pc, pm),
                per_gib(fc),
                busy(fc, fm),
                per_gib(omc),
                busy(omc, omm),
                per_gib(wc),
                busy(wc, wm)
            );
            set_reserve(&p.omd_control, 0);
        }
    }
}

fn self_cmd() -> Command {
    Command::new(std::env::current_exe().expect("exe"))
}

fn omd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    exe.parent().expect("dir").join("omd")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("sink") => return om_benches::sink(&args[2], args.get(3).map(|n| n.parse().expect("bytes"))),
        Some("blast") => return blast(&args[2], args[3].parse().expect("gib")),
        Some("ship") => {
            return ship(
                &args[2],
                Path::new(&args[3]),
                args[4].parse().expect("gib"),
                args[5].parse().expect("streams"),
            );
        }
        _ => {}
    }
    let opt = |name: &str, default: &str| om_benches::opt(&args, name, default);
    let sizes: Vec<usize> = opt("--gib", "1,4")
        .split(',')
        .map(|s| s.parse().expect("--gib"))
        .collect();
    let runs: usize = opt("--runs", "3").parse().expect("--runs");
    let streams: Vec<u16> = opt("--streams", "0,2")
        .split(',')
        .map(|s| s.parse().expect("--streams"))
        .collect();
    let omd = omd_bin();
    assert!(
        omd.exists(),
        "build omd first: cargo build --release -p om-page-server"
    );
    println!(
        "shmem THP: {}",
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default()
            .trim()
    );

    // Loopback: omd on 127.0.0.1, both ends in this namespace.
    let dir = std::env::temp_dir().join(format!("om-bench-transport-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("key");
    std::fs::write(&key, [5u8; 32]).expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let omd_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let sock = dir.join("omd.sock");
    let mut daemon = Command::new(&omd)
        .args(["--listen", &omd_addr.to_string(), "--key"])
        .arg(&key)
        .arg("--control")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .expect("omd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !omd_request(&sock, "ping").starts_with("OK") {
        assert!(Instant::now() < deadline, "omd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sink_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let lo = Path2 {
        name: "loopback",
        sender: Box::new(self_cmd),
        receiver: Box::new(self_cmd),
        sink_addr: format!("127.0.0.1:{sink_port}"),
        omd_addr,
        omd_control: sock.clone(),
        key: key.clone(),
    };
    measure(&lo, &sizes, runs, &streams);
    daemon.kill().ok();
    daemon.wait().ok();
    std::fs::remove_dir_all(&dir).ok();

    // veth: sender in node 0, receivers in node 1.
    let rig = om_rig::Rig::new(2).expect("rig (needs root)");
    let h = rig.start_omd(1, &omd, &[]).expect("omd on node 1");
    let exe = std::env::current_exe().expect("exe");
    let (n0, n1) = (rig.node(0).expect("n0").clone(), rig.node(1).expect("n1").clone());
    let sink_addr = format!("{}:7071", n1.addr());
    let (e0, e1) = (exe.clone(), exe);
    let veth = Path2 {
        name: "veth",
        sender: Box::new(move || n0.command(&e0)),
        receiver: Box::new(move || n1.command(&e1)),
        sink_addr,
        omd_addr: SocketAddr::V4(h.listen),
        omd_control: h.control.clone(),
        key: h.key.clone(),
    };
    measure(&veth, &sizes, runs, &streams);
    rig.teardown().expect("teardown");
}
