//! The README's demo: `cargo run --release --bin om-demo`.
//!
//! It builds om's programs, starts an `omd` on loopback, runs a program under `omrun`, and asks `omctl`
//! to migrate it. Live migration has not landed yet, so the demo shows what exists and says what does
//! not; it grows with every feature.

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
    for (feature, on) in om::FEATURES {
        println!("  [{}] {feature}", if *on { "x" } else { " " });
    }

    let dir = std::env::temp_dir().join(format!("om-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = with_omd(&bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    step("summary");
    println!("  omd, omrun's home anchor and omctl's interface work; live migration, checkpoint and restart");
    println!("  are not built yet and say so. This demo will migrate a running program once they land.");
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

    step("ask omctl to migrate a running program");
    let mut sleeper = Command::new(bin.join("omrun"))
        .args(["--", "sleep", "30"])
        .stdin(Stdio::null())
        .spawn()?;
    let out = Command::new(bin.join("omctl"))
        .arg("--control")
        .arg(&control)
        .args(["migrate", &sleeper.id().to_string(), "--to", "127.0.0.1:7070"])
        .output()?;
    print!("  omctl says: {}", String::from_utf8_lossy(&out.stderr));
    println!("  (exit code {})", out.status.code().unwrap_or(-1));
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    step("stop omd");
    nix_term(omd.id());
    let st = omd.wait()?;
    println!(
        "  omd stopped ({st}); control socket removed: {}",
        !control.exists()
    );
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
        println!("building omd, omrun and omctl ...");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "om-cli", "-p", "om-page-server"]);
        if release {
            cmd.arg("--release");
        }
        if !cmd.status()?.success() {
            return Err("cargo build failed".into());
        }
    }
    for b in ["omd", "omrun", "omctl"] {
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
