//! Live migration between two namespace nodes of the rig: freeze and total time of om pre-copy and of
//! om stop-and-copy (the same code without rounds), against the raw transfer time of the same bytes
//! (a plain `send()` loop over the same veth path, into a reused buffer and into fresh memory), all
//! measured in one run, with the machine's busy CPU time per GiB of each.
//!
//! ```text
//! cargo build --release -p om-runtime -p om-cli -p om-page-server -p om-restore
//! cargo run --release -p om-benches --bin migrate -- [--gib 1,4] [--rates 0,64,256]
//!     [--modes precopy,stop-and-copy] [--dest fresh,reserve] [--json]
//! ```
//!
//! `--dest` says what memory the destination's omd lands the image in: `fresh` (allocated as pages
//! arrive) or `reserve` (`omd --reserve`: memory of the process's size plus 256 MiB allocated ahead
//! of the migration, made before it starts, as a page server that expects migrations keeps it).
//!
//! The process: `GIB` GiB of random content, then a random page written every so often to dirty
//! `RATE` MiB/s, under omrun on node 0; it is migrated to node 1 by `omctl migrate --json` (`--json`
//! here prints that report too: bytes and time per round). Both nodes share this machine's CPUs, so
//! the busy CPU time across a transfer is what both ends cost together. Needs root (network
//! namespaces).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// `writer MIB RATE`: fills MIB MiB with random bytes, prints READY, then dirties RATE MiB/s of
/// random pages until killed.
fn writer(mib: usize, rate: usize) {
    let mut mem = vec![0u8; mib * MIB];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for w in mem.chunks_mut(8) {
        w.copy_from_slice(&next().to_le_bytes()[..w.len()]);
    }
    println!("READY");
    std::io::stdout().flush().ok();
    let pages = mem.len() / 4096;
    // Pages per 1 ms tick.
    let per_tick = rate * MIB / 4096 / 1000;
    let start = Instant::now();
    let mut ticks = 0u64;
    loop {
        for _ in 0..per_tick {
            let p = usize::try_from(next() % pages as u64).unwrap_or(0);
            mem[p * 4096] = mem[p * 4096].wrapping_add(1);
        }
        ticks += 1;
        let due = start + Duration::from_millis(ticks);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
}

/// `blast ADDR BYTES`: sends BYTES from populated memory with a plain send loop
/// ([`om_benches::blast`]).
fn blast(addr: &str, bytes: usize) {
    let mem: Vec<u8> = (0..bytes)
        .map(|i| u8::try_from(i * 31 % 251).unwrap_or(0))
        .collect();
    om_benches::blast(addr, &mem);
}

use om_benches::machine_busy;
use om_launch::report::field;

fn num(json: &str, key: &str) -> f64 {
    field(json, key).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("exe")
        .parent()
        .expect("dir")
        .join(name)
}

fn omctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("omctl"))
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("omctl")
}

/// Starts the writer under omrun on node 0; returns omrun and the writer's pid once it is ready.
fn start_writer(rig: &om_rig::Rig, control: &Path, mib: usize, rate: usize) -> (Child, u32) {
    let mut cmd = rig.node(0).expect("n0").command(bin("omrun"));
    cmd.arg("--control")
        .arg(control)
        .arg("--")
        .arg(std::env::current_exe().expect("exe"))
        .args(["writer", &mib.to_string(), &rate.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("omrun");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .ok();
    assert_eq!(line.trim(), "READY", "the writer did not start");
    let omrun = child.id();
    let pid = (0..500)
        .find_map(|_| {
            let ps = String::from_utf8_lossy(&omctl(control, &["ps"]).stdout).into_owned();
            let found = ps.split_whitespace().find_map(|w| {
                let p: u32 = w.strip_prefix("pid=")?.split(',').next()?.parse().ok()?;
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                (ppid == omrun).then_some(p)
            });
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            found
        })
        .expect("the writer did not register");
    (child, pid)
}

/// A plain transfer of `bytes` from node 0 to node 1, into a reused buffer or into fresh memory:
/// `(seconds, machine CPU seconds)`.
fn plain_transfer(rig: &om_rig::Rig, bytes: usize, fresh: bool) -> (f64, f64) {
    let exe = std::env::current_exe().expect("exe");
    let addr = format!("{}:7072", rig.node(1).expect("n1").addr());
    let mut sink = rig.node(1).expect("n1").command(&exe);
    sink.args(["sink", &addr]);
    if fresh {
        sink.arg(bytes.to_string());
    }
    let mut rx = sink.stdout(Stdio::piped()).spawn().expect("sink");
    let mut line = String::new();
    BufReader::new(rx.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .ok();
    let out = rig
        .node(0)
        .expect("n0")
        .command(&exe)
        .args(["blast", &addr, &bytes.to_string()])
        .output()
        .expect("blast");
    rx.wait().ok();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |key: &str| -> f64 { om_benches::word_after(&text, key).parse().expect("seconds") };
    (value("SECS"), value("CPU"))
}

struct Row {
    gib: usize,
    rate: usize,
    mode: String,
    dest: String,
    freeze_ms: f64,
    total_ms: f64,
    sent: f64,
    rounds: f64,
    raw_ms: f64,
    fresh_ms: f64,
    /// The machine's busy CPU seconds per GiB sent: the migration, the raw transfer, into fresh memory.
    cpu: [f64; 3],
}

/// How many images took omd's reserve so far.
fn taken(control: &Path) -> u64 {
    let reply = om_benches::omd_request(control, "reserve");
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("taken=")?.parse().ok())
        .unwrap_or_else(|| panic!("no taken= in {reply:?}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("writer") => return writer(args[2].parse().expect("mib"), args[3].parse().expect("rate")),
        Some("sink") => return om_benches::sink(&args[2], args.get(3).map(|n| n.parse().expect("bytes"))),
        Some("blast") => return blast(&args[2], args[3].parse().expect("bytes")),
        _ => {}
    }
    let opt = |name: &str, default: &str| om_benches::opt(&args, name, default);
    let list = |s: String| -> Vec<usize> { s.split(',').map(|v| v.parse().expect("number")).collect() };
    let sizes = list(opt("--gib", "1,4"));
    let rates = list(opt("--rates", "0,64,256"));
    let words = |s: String| -> Vec<String> { s.split(',').map(str::to_owned).collect() };
    let modes = words(opt("--modes", "precopy,stop-and-copy"));
    let dests = words(opt("--dest", "fresh,reserve"));
    // --json: also print omctl's JSON report of each migration (rounds, bytes and times per round).
    let show_json = args.iter().any(|a| a == "--json");
    for b in ["omd", "omrun", "omctl", "om-restore", "libomrt.so"] {
        assert!(
            bin(b).exists(),
            "build first: cargo build --release -p om-runtime -p om-cli -p om-page-server -p om-restore"
        );
    }
    let rig = om_rig::Rig::new(2).expect("rig (needs root)");
    let a = rig.start_omd(0, &bin("omd"), &[]).expect("omd 0");
    let b = rig.start_omd(1, &bin("omd"), &[]).expect("omd 1");
    let mut rows = Vec::new();
    for &gib in &sizes {
        for &rate in &rates {
            for (mode, dest) in modes.iter().flat_map(|m| dests.iter().map(move |d| (m, d))) {
                let reserve = match dest.as_str() {
                    "fresh" => 0,
                    "reserve" => (gib << 30) + 256 * MIB,
                    other => panic!("--dest: {other:?} is neither fresh nor reserve"),
                };
                om_benches::set_reserve(&b.control, reserve);
                let taken_before = taken(&b.control);
                let (mut omrun, pid) = start_writer(&rig, &a.control, gib * 1024, rate);
                std::thread::sleep(Duration::from_millis(500));
                let cpu = machine_busy();
                let out = omctl(
                    &a.control,
                    &[
                        "migrate",
                        &pid.to_string(),
                        "--to",
                        &b.listen.to_string(),
                        "--json",
                        "--mode",
                        mode,
                    ],
                );
                let om_cpu = (machine_busy() - cpu).as_secs_f64();
                if reserve > 0 {
                    assert_eq!(
                        taken(&b.control),
                        taken_before + 1,
                        "the image did not take the reserve"
                    );
                    // omd B makes its reserve again once the copy runs: not while the baselines
                    // are measured (it would slow them).
                    om_benches::set_reserve(&b.control, reserve);
                }
                let json = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(
                    out.status.success(),
                    "{gib} GiB at {rate} MiB/s, {mode}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                // omrun forwards TERM to the process, wherever it runs now.
                let _ = Command::new("kill")
                    .args(["-TERM", &omrun.id().to_string()])
                    .status();
                let _ = omrun.wait();
                if show_json {
                    println!("{}", json.trim());
                }
                let sent_bytes: usize = field(&json, "bytes_sent")
                    .and_then(|v| v.parse().ok())
                    .expect("bytes_sent");
                let sent = num(&json, "bytes_sent");
                let (raw, raw_cpu) = plain_transfer(&rig, sent_bytes, false);
                let (fresh, fresh_cpu) = plain_transfer(&rig, sent_bytes, true);
                let gib_sent = sent / (1u64 << 30) as f64;
                let row = Row {
                    gib,
                    rate,
                    mode: mode.clone(),
                    dest: dest.clone(),
                    freeze_ms: num(&json, "freeze_ms"),
                    total_ms: num(&json, "total_ms"),
                    sent,
                    rounds: num(&json, "rounds"),
                    raw_ms: raw * 1e3,
                    fresh_ms: fresh * 1e3,
                    cpu: [om_cpu, raw_cpu, fresh_cpu].map(|c| c / gib_sent),
                };
                println!(
                    "{gib} GiB, {rate:>3} MiB/s, {mode:<13}, into {dest:<7}: freeze {:>8.1} ms, total {:>8.1} ms, {:>5} rounds, {:>7.1} MiB sent, raw transfer {:>7.1} ms (into fresh memory {:>7.1} ms), total/raw {:.2} (/fresh {:.2}); CPU s/GiB om {:.2}, raw {:.2}, fresh {:.2}",
                    row.freeze_ms,
                    row.total_ms,
                    row.rounds,
                    row.sent / MIB as f64,
                    row.raw_ms,
                    row.fresh_ms,
                    row.total_ms / row.raw_ms,
                    row.total_ms / row.fresh_ms,
                    row.cpu[0],
                    row.cpu[1],
                    row.cpu[2],
                );
                rows.push(row);
            }
        }
    }
    println!();
    println!(
        "| process | dirty rate | mode | destination memory | freeze | total | rounds | sent | raw transfer of the same bytes | total / raw | raw into fresh memory | total / raw into fresh | CPU s/GiB: om, raw, raw into fresh |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} GiB | {} MiB/s | {} | {} | {:.1} ms | {:.0} ms | {} | {:.0} MiB | {:.0} ms | {:.2} | {:.0} ms | {:.2} | {:.2}, {:.2}, {:.2} |",
            r.gib,
            r.rate,
            r.mode,
            r.dest,
            r.freeze_ms,
            r.total_ms,
            r.rounds,
            r.sent / MIB as f64,
            r.raw_ms,
            r.total_ms / r.raw_ms,
            r.fresh_ms,
            r.total_ms / r.fresh_ms,
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
        );
    }
    println!();
    println!(
        "CRIU 3.17/4.x on these machines (PLATFORM.md; it does not run on this kernel here): 1.3-1.7 s freeze for an idle 1 GiB, no pre-copy (no soft-dirty)."
    );
    rig.teardown().expect("teardown");
}
