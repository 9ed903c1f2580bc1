//! Checkpoint/restart benchmark: `cargo build --release -p om-runtime -p om-cli -p om-page-server
//! -p om-restore && cargo run --release -p om-benches --bin checkpoint [-- --mib 1024 --runs 3]`
//! (as root; the checkpoint goes to a directory under the system temp dir).
//!
//! For a process holding `--mib` MiB of random data, in the same run:
//! - **freeze**: the time its threads are stopped by `omctl checkpoint` (as the runtime measures it:
//!   from the first signal until the image is written and synced);
//! - **restart, lazy** (the default) and **restart, eager** (`OM_RESTORE_EAGER=1`): from starting
//!   `omctl restart --detach` until it reports the program running again; for lazy also when the
//!   last page is in (the userfaultfd registrations are gone);
//! - baselines: **write+fsync** of the same bytes from memory to a file in the same directory, and
//!   **read into fresh memory** of the checkpoint's pages file.
//!
//! It prints medians and the ratios against the baselines, next to CRIU's figures on this machine
//! (`../shared/PLATFORM.md`; CRIU itself cannot run here: Debian's 3.17 does not start on this
//! kernel and the machine has no network to build 4.2).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use om::sys::mman::Region;
use om_benches::{median, ratio};

const HOLD: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t n = strtoul(argv[1], 0, 10) << 17;
    uint64_t *a = malloc(n * 8), x = 88172645463325252ull, sum = 0;
    for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; a[i] = x; }
    printf("ready\n"); fflush(stdout);
    for (;;) {
        for (size_t i = 0; i < n; i += 512) sum += a[i];
        printf("%llx\n", (unsigned long long)sum); fflush(stdout);
        usleep(20000);
    }
}
"#;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --release -p om-runtime -p om-cli -p om-page-server -p om-restore)",
        p.display()
    );
    p
}

/// Waits for a line from `r` that satisfies `want`.
fn wait_line(r: &mut impl BufRead, want: impl Fn(&str) -> bool) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).expect("read") > 0, "the program ended");
        if want(&line) {
            return;
        }
    }
}

fn lazy_pending(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/smaps")).is_ok_and(|s| {
        s.lines()
            .filter_map(|l| l.strip_prefix("VmFlags:"))
            .any(|f| f.split_whitespace().any(|w| w == "um"))
    })
}

struct Sample {
    freeze: Duration,
    lazy: Duration,
    lazy_all_in: Duration,
    eager: Duration,
    write: Duration,
    read: Duration,
}

fn one_run(bins: &Path, work: &Path, hold: &Path, mib: usize) -> Sample {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).expect("work dir");
    let key = work.join("key");
    std::fs::write(&key, [9u8; 32]).expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("key mode");
    let ctl = work.join("ctl.sock");
    let _omd = Kill(
        Command::new(bin(bins, "omd"))
            .args(["--listen", "127.0.0.1:0", "--key"])
            .arg(&key)
            .arg("--control")
            .arg(&ctl)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("omd"),
    );
    while !ctl.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let omctl_command = |args: &[&str]| {
        let mut c = Command::new(bin(bins, "omctl"));
        c.arg("--control").arg(&ctl).args(args).stdin(Stdio::null());
        c
    };
    let omctl = |args: &[&str]| omctl_command(args).output().expect("omctl");
    let mut run = Kill(
        Command::new(bin(bins, "omrun"))
            .arg("--control")
            .arg(&ctl)
            .arg("--")
            .arg(hold)
            .arg(mib.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("omrun"),
    );
    let mut out = BufReader::new(run.0.stdout.take().expect("stdout"));
    wait_line(&mut out, |l| l.starts_with("ready"));
    wait_line(&mut out, |_| true);
    let pid = loop {
        let ps = String::from_utf8_lossy(&omctl(&["ps"]).stdout).into_owned();
        if let Some(p) = ps
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid=")?.parse::<u32>().ok())
        {
            break p;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let ck = work.join("ck");
    let o = omctl(&[
        "checkpoint",
        &pid.to_string(),
        "--out",
        ck.to_str().expect("path"),
    ]);
    assert!(
        o.status.success(),
        "checkpoint: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let freeze_ms: f64 = text
        .split("frozen ")
        .nth(1)
        .and_then(|t| t.split(" ms").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no frozen time in {text:?}"));
    let _ = run.0.wait();

    let restart = |eager: bool| -> (Duration, Duration) {
        // Detached, the program keeps omctl's stdout: a file here, not a pipe read to its end.
        let said = work.join("restart.out");
        let mut c = omctl_command(&["restart", "--detach", ck.to_str().expect("path")]);
        c.stdout(std::fs::File::create(&said).expect("file"));
        if eager {
            c.env("OM_RESTORE_EAGER", "1");
        }
        let t = Instant::now();
        let st = c.status().expect("omctl restart");
        let running = t.elapsed();
        assert!(st.success(), "restart failed");
        let text = std::fs::read_to_string(&said).expect("restart output");
        // The program writes to the same file: find omctl's line.
        let p: u32 = text
            .lines()
            .find_map(|l| l.strip_prefix("restarted as pid ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {text:?}"));
        // Not too often: reading smaps walks the page tables the fill is populating.
        while lazy_pending(p) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let all_in = t.elapsed();
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
        while Path::new(&format!("/proc/{p}")).exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        (running, all_in)
    };
    let (lazy, lazy_all_in) = restart(false);
    let (eager, _) = restart(true);

    // Baselines over the same bytes.
    let pages = ck.join("pages");
    let bytes = usize::try_from(std::fs::metadata(&pages).expect("pages").len()).expect("size");
    let mut src = Region::map_anon(bytes, None).expect("map");
    src.bytes_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = u8::try_from(i * 31 % 251).unwrap_or(0));
    let copy = work.join("copy");
    let t = Instant::now();
    let mut f = std::fs::File::create(&copy).expect("create");
    f.write_all(src.bytes_mut()).expect("write");
    f.sync_all().expect("fsync");
    let write = t.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&copy);
    let t = Instant::now();
    let mut fresh = Region::map_anon(bytes, None).expect("map");
    std::fs::File::open(&pages)
        .expect("open")
        .read_exact(fresh.bytes_mut())
        .expect("read");
    let read = t.elapsed();
    Sample {
        freeze: Duration::from_secs_f64(freeze_ms / 1e3),
        lazy,
        lazy_all_in,
        eager,
        write,
        read,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: &str| om_benches::opt(&args, name, default);
    let mib: usize = opt("--mib", "1024").parse().expect("--mib");
    let runs: usize = opt("--runs", "3").parse().expect("--runs");
    let bins = std::env::current_exe()
        .expect("exe")
        .parent()
        .expect("dir")
        .to_path_buf();
    let work = std::env::temp_dir().join(format!("om-bench-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work");
    let src = work.join("hold.c");
    std::fs::write(&src, HOLD).expect("source");
    let hold = work.join("hold");
    let ok = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&hold)
        .arg(&src)
        .status()
        .expect("gcc");
    assert!(ok.success(), "gcc");
    let mut samples = Vec::new();
    for r in 0..runs {
        let s = one_run(&bins, &work.join(format!("run{r}")), &hold, mib);
        println!(
            "run {r}: freeze {:.0} ms, restart lazy {:.1} ms (all pages in {:.0} ms), eager {:.0} ms; write+fsync {:.0} ms, read into fresh memory {:.0} ms",
            s.freeze.as_secs_f64() * 1e3,
            s.lazy.as_secs_f64() * 1e3,
            s.lazy_all_in.as_secs_f64() * 1e3,
            s.eager.as_secs_f64() * 1e3,
            s.write.as_secs_f64() * 1e3,
            s.read.as_secs_f64() * 1e3
        );
        samples.push(s);
    }
    let _ = std::fs::remove_dir_all(&work);
    let m = |f: fn(&Sample) -> Duration| median(&samples.iter().map(f).collect::<Vec<_>>()).expect("runs");
    let (freeze, lazy, all_in, eager, write, read) = (
        m(|s| s.freeze),
        m(|s| s.lazy),
        m(|s| s.lazy_all_in),
        m(|s| s.eager),
        m(|s| s.write),
        m(|s| s.read),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("\n{mib} MiB, median of {runs} runs:");
    println!("| measure | om | baseline (same run) | om / baseline |");
    println!("|---|---|---|---|");
    println!(
        "| freeze (checkpoint, synced) | {:.0} ms | write+fsync {:.0} ms | {:.2} |",
        ms(freeze),
        ms(write),
        ratio(freeze, write)
    );
    println!(
        "| restart to running, lazy | {:.1} ms | read into fresh memory {:.0} ms | {:.3} |",
        ms(lazy),
        ms(read),
        ratio(lazy, read)
    );
    println!(
        "| restart, every page in (lazy) | {:.0} ms | read into fresh memory {:.0} ms | {:.2} |",
        ms(all_in),
        ms(read),
        ratio(all_in, read)
    );
    println!(
        "| restart to running, eager | {:.0} ms | read into fresh memory {:.0} ms | {:.2} |",
        ms(eager),
        ms(read),
        ratio(eager, read)
    );
    println!(
        "\nCRIU on this machine (PLATFORM.md; not run here): frozen 1.3-1.7 s per GiB, restore 0.5-2.1 s per GiB."
    );
    println!(
        "target: a 1 GiB image runs again within 100 ms: {}",
        if mib >= 1024 && lazy < Duration::from_millis(100) {
            "met"
        } else if mib >= 1024 {
            "NOT met"
        } else {
            "(run with --mib 1024)"
        }
    );
}
