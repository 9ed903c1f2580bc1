//! The README's demo: `cargo run --release --bin om-demo`.
//!
//! It builds om's programs, starts two `omd`s on loopback (two "nodes"), runs a small threaded
//! computation under `omrun`, migrates it live to the other node and back while it runs (its output
//! keeps coming through omrun), checkpoints another run part-way and restarts it from the image; each
//! time the output is byte for byte what an uninterrupted run prints.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("om-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn step(title: &str) {
    println!("\n== {title}");
}

fn demo() -> Res<()> {
    let bin = build_binaries()?;
    step("what this build of om can do");
    for feature in om::FEATURES {
        println!("  [x] {feature}");
    }

    let dir = std::env::temp_dir().join(format!("om-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = with_omd(&bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    step("summary");
    println!("  a running program moved to another omd and back without noticing, its output and exit");
    println!("  status kept by omrun at home; a checkpointed program came back from its image.");
    Ok(())
}

fn with_omd(bin: &Path, dir: &Path) -> Res<()> {
    step("start omd on loopback with a fresh cluster key");
    let key = dir.join("cluster.key");
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
    std::fs::write(&key, k)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let control = dir.join("omd.sock");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen = format!("127.0.0.1:{port}");
    let mut omd = Command::new(bin.join("omd"))
        .args(["--listen", &listen, "--key"])
        .arg(&key)
        .arg("--control")
        .arg(&control)
        .arg("--state-dir")
        .arg(dir.join("state-a"))
        .env("OM_LOG", "warn")
        .spawn()?;
    let reply = wait_ping(&control, Duration::from_secs(10));
    println!(
        "  $ omd --listen {listen} --key {} --control {}",
        key.display(),
        control.display()
    );
    println!(
        "  control socket answers: {}",
        reply.as_deref().unwrap_or("<nothing>")
    );

    step("run a program under omrun (the home anchor): its output and exit status come through");
    let status = Command::new(bin.join("omrun"))
        .arg("--control")
        .arg(&control)
        .args(["--", "sh", "-c", "echo \"  hello from pid $$\"; exit 7"])
        .status()?;
    println!("  omrun exited with {status} (the program's own status)");

    checkpoint_and_restart(bin, &control, dir)?;

    step("start a second omd (node B) with the same key");
    let control_b = dir.join("omd-b.sock");
    let port_b = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let listen_b = format!("127.0.0.1:{port_b}");
    let mut omd_b = Command::new(bin.join("omd"))
        .args(["--listen", &listen_b, "--key"])
        .arg(&key)
        .arg("--control")
        .arg(&control_b)
        .arg("--state-dir")
        .arg(dir.join("state-b"))
        .env("OM_LOG", "warn")
        .spawn()?;
    wait_ping(&control_b, Duration::from_secs(10)).ok_or("the second omd did not start")?;
    println!(
        "  $ omd --listen {listen_b} --key {} --control {}",
        key.display(),
        control_b.display()
    );

    let result = live_migration(bin, &control, &listen, &control_b, &listen_b);

    step("stop both omds");
    nix_term(omd_b.id());
    let _ = omd_b.wait();
    nix_term(omd.id());
    let st = omd.wait()?;
    println!(
        "  omd stopped ({st}); control socket removed: {}",
        !control.exists()
    );
    result
}

/// Runs om-counter under omrun on A, moves it to B and back while it runs, and compares what omrun
/// printed with an uninterrupted run.
fn live_migration(bin: &Path, control_a: &Path, listen_a: &str, control_b: &Path, listen_b: &str) -> Res<()> {
    step("live migration: run a computation under omrun on A, move it to B and back while it runs");
    let counter = bin.join("om-counter");
    let plain = Command::new(&counter).arg("60").stdin(Stdio::null()).output()?;
    let mut run = Command::new(bin.join("omrun"))
        .arg("--control")
        .arg(control_a)
        .arg("--")
        .arg(&counter)
        .arg("60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(run.stdout.take().ok_or("no stdout")?);
    let mut got = Vec::new();
    let mut line = String::new();
    // A few lines at home first.
    for _ in 0..5 {
        out.read_line(&mut line)?;
        print!("  | {line}");
        got.extend_from_slice(line.as_bytes());
        line.clear();
    }
    let pid = registered_child(control_a, run.id()).ok_or("the program did not register with omd")?;
    let omctl = |control: &Path, args: &[&str]| {
        Command::new(bin.join("omctl"))
            .arg("--control")
            .arg(control)
            .args(args)
            .output()
    };
    println!("  $ omctl migrate {pid} --to {listen_b}");
    let m = omctl(control_a, &["migrate", &pid.to_string(), "--to", listen_b])?;
    for l in String::from_utf8_lossy(&m.stdout).lines() {
        println!("  {l}");
    }
    if !m.status.success() {
        return Err(format!("migration failed: {}", String::from_utf8_lossy(&m.stderr)).into());
    }
    let report = String::from_utf8_lossy(&m.stdout).into_owned();
    let there = report
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .ok_or("no pid in the report")?
        .to_owned();
    for _ in 0..5 {
        out.read_line(&mut line)?;
        print!("  | {line}");
        got.extend_from_slice(line.as_bytes());
        line.clear();
    }
    println!("  (these lines came from node B through omrun on A)");
    println!("  $ omctl migrate {there} --to {listen_a}     (on B, back home)");
    let m = omctl(control_b, &["migrate", &there, "--to", listen_a])?;
    for l in String::from_utf8_lossy(&m.stdout).lines() {
        println!("  {l}");
    }
    if !m.status.success() {
        return Err(format!("migration back failed: {}", String::from_utf8_lossy(&m.stderr)).into());
    }
    while out.read_line(&mut line)? > 0 {
        print!("  | {line}");
        got.extend_from_slice(line.as_bytes());
        line.clear();
    }
    let st = run.wait()?;
    println!("  omrun exited with {st}");
    let same = got == plain.stdout && st.code() == plain.status.code();
    println!(
        "  output and exit status across two migrations are {} an uninterrupted run's",
        if same { "byte for byte" } else { "NOT" }
    );
    if !same {
        return Err("the migrated output differs".into());
    }
    Ok(())
}

/// The pid of omrun's child once its runtime registered with the omd at `control`.
fn registered_child(control: &Path, omrun: u32) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut s) = UnixStream::connect(control) {
            let _ = s.write_all(b"ps\n");
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() {
                let found = line.split_whitespace().find_map(|w| {
                    let p: u32 = w.strip_prefix("pid=")?.split(',').next()?.parse().ok()?;
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                    (ppid == omrun).then_some(p)
                });
                if found.is_some() {
                    return found;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn checkpoint_and_restart(bin: &Path, control: &Path, dir: &Path) -> Res<()> {
    step("run a computation under omrun, checkpoint it part-way, restart it from the image");
    let counter = bin.join("om-counter");
    let plain = Command::new(&counter).arg("30").stdin(Stdio::null()).output()?;
    let mut run = Command::new(bin.join("omrun"))
        .arg("--control")
        .arg(control)
        .arg("--")
        .arg(&counter)
        .arg("30")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut first = Vec::new();
    let mut out = BufReader::new(run.stdout.take().ok_or("no stdout")?);
    for _ in 0..10 {
        let mut line = String::new();
        out.read_line(&mut line)?;
        print!("  | {line}");
        first.extend_from_slice(line.as_bytes());
    }
    let ck = dir.join("counter.ck");
    let pid = run.id().to_string();
    let ps = Command::new(bin.join("omctl"))
        .arg("--control")
        .arg(control)
        .arg("ps")
        .output()?;
    let pid = String::from_utf8_lossy(&ps.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("pid="))
        .map(str::to_owned)
        .next()
        .unwrap_or(pid);
    let o = Command::new(bin.join("omctl"))
        .arg("--control")
        .arg(control)
        .args(["checkpoint", &pid, "--out"])
        .arg(&ck)
        .output()?;
    println!("  $ omctl checkpoint {pid} --out {}", ck.display());
    print!(
        "  {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        let _ = run.kill();
        let _ = run.wait();
        return Err("the checkpoint failed".into());
    }
    out.read_to_end(&mut first)?;
    let st = run.wait()?;
    println!("  the original process ended ({st}); the image is on disk");
    println!("  $ omctl restart {}", ck.display());
    let t = Instant::now();
    let mut restarted = Command::new(bin.join("omctl"))
        .arg("--control")
        .arg(control)
        .arg("restart")
        .arg(&ck)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut rest = Vec::new();
    let mut out = BufReader::new(restarted.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    while out.read_line(&mut line)? > 0 {
        print!("  | {line}");
        rest.extend_from_slice(line.as_bytes());
        line.clear();
    }
    let st = restarted.wait()?;
    println!(
        "  restarted program ended ({st}) after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut both = first;
    both.extend_from_slice(&rest);
    let same = both == plain.stdout;
    println!(
        "  output before + after the restart is {} an uninterrupted run's",
        if same { "byte for byte" } else { "NOT" }
    );
    if !same {
        return Err("the restarted output differs".into());
    }
    Ok(())
}

fn wait_ping(control: &Path, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut s) = UnixStream::connect(control) {
            let _ = s.write_all(b"ping\n");
            let mut line = String::new();
            if BufReader::new(s).read_line(&mut line).is_ok() {
                return Some(line.trim_end().to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn nix_term(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

/// Builds omd, omrun and omctl next to this binary when run through cargo; otherwise expects them there.
fn build_binaries() -> Res<PathBuf> {
    let here = std::env::current_exe()?;
    let dir = here.parent().ok_or("no directory")?.to_path_buf();
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = dir.ends_with("release");
        println!("building omd, omrun, omctl, om-restore and libomrt.so ...");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "om-cli",
            "-p",
            "om-page-server",
            "-p",
            "om-restore",
            "-p",
            "om-runtime",
            "-p",
            "om-examples",
        ]);
        if release {
            cmd.arg("--release");
        }
        if !cmd.status()?.success() {
            return Err("cargo build failed".into());
        }
    }
    for b in ["omd", "omrun", "omctl", "om-restore", "libomrt.so", "om-counter"] {
        if !dir.join(b).exists() {
            return Err(format!(
                "{} is missing: run `cargo build --release`",
                dir.join(b).display()
            )
            .into());
        }
    }
    Ok(dir)
}
