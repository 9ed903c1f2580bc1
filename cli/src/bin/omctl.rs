//! `omctl`: migrate, checkpoint, restart and list om processes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use om_cli::{EXIT_FAILURE, init_logging, report};

/// Control om processes: move them between nodes, checkpoint them to disk, restart them.
#[derive(Debug, Parser)]
#[command(name = "omctl", version)]
struct Args {
    /// Control socket of the local omd [default: /run/om/omd.sock for root, else
    /// $XDG_RUNTIME_DIR/om/omd.sock]
    #[arg(long, global = true, env = om::control::CONTROL_ENV, value_name = "PATH")]
    control: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    /// TCP, several streams.
    Tcp,
    /// InfiniBand/RoCE verbs, RDMA WRITE.
    Verbs,
    /// Dolphin SCI (SISCI).
    Sci,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Pre-copy rounds, then a short freeze.
    Precopy,
    /// Freeze, send every page, restore.
    StopAndCopy,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Live-migrate a process to another node by pre-copy.
    Migrate {
        /// The process (as omctl ps shows it).
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        pid: u32,
        /// The destination node's omd.
        #[arg(long, value_name = "IP:PORT")]
        to: SocketAddr,
        /// Print one JSON object with the result.
        #[arg(long)]
        json: bool,
        /// Downtime budget for the final freeze, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 50)]
        downtime: u32,
        /// Stop pre-copy after this many rounds.
        #[arg(long, value_name = "N", default_value_t = 30)]
        max_rounds: u32,
        /// How the pages travel.
        #[arg(long, value_enum, default_value_t = TransportKind::Tcp)]
        transport: TransportKind,
        /// Pre-copy rounds while the process runs, or stop-and-copy (everything while it is stopped).
        #[arg(long, value_enum, default_value_t = Mode::Precopy)]
        mode: Mode,
        /// Throttle the process while it dirties memory faster than the pages travel, more each
        /// round that does not halve the work (pre-copy only).
        #[arg(long)]
        auto_converge: bool,
    },
    /// Write a process's image to a directory.
    Checkpoint {
        /// The process.
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        pid: u32,
        /// The image directory to create.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Keep the process running after the image is written (otherwise it ends).
        #[arg(long)]
        leave_running: bool,
    },
    /// Bring a checkpointed process back on this node.
    Restart {
        /// The image directory.
        dir: PathBuf,
        /// Return at once instead of waiting for the process.
        #[arg(long)]
        detach: bool,
    },
    /// List the om processes started on this node and where they run now.
    Ps,
    /// List the migrations this node received lately, by commit token, and what became of each
    /// copy (prepared, starting, running with its pid here, or discarded).
    Incoming,
    /// Show omd's reserve (image memory made ahead of incoming migrations, `omd --reserve`): its
    /// size, how much of it is ready and how many images took it; with SIZE, set it first (0: none).
    Reserve {
        /// Bytes to keep ready (K, M, G, T suffixes).
        #[arg(value_parser = om_cli::parse_size)]
        size: Option<u64>,
    },
}

fn main() -> ExitCode {
    init_logging(tracing::Level::WARN);
    let args = Args::parse();
    let control = om::control::resolve_socket_path(args.control.as_deref());
    tracing::debug!(control = %control.display(), cmd = ?args.cmd, "omctl");
    match args.cmd {
        Cmd::Migrate {
            pid,
            to,
            json,
            downtime,
            max_rounds,
            mode,
            transport,
            auto_converge,
        } => {
            if auto_converge && mode == Mode::StopAndCopy {
                eprintln!("omctl: error: --auto-converge throttles pre-copy rounds; stop-and-copy has none");
                return ExitCode::from(2);
            }
            let opts = om_launch::MigrateOptions {
                downtime_ms: downtime,
                max_rounds,
                stop_and_copy: mode == Mode::StopAndCopy,
                auto_converge,
                transport: match transport {
                    TransportKind::Tcp => om_launch::Transport::Tcp,
                    TransportKind::Sci => om_launch::Transport::Sci,
                    TransportKind::Verbs => om_launch::Transport::Verbs,
                },
            };
            let line = om_launch::migrate_request(pid, to, &opts);
            match om_cli::control::request(&control, &line) {
                Ok(reply) => match reply.strip_prefix("OK moved to ") {
                    Some(rest) => {
                        let report = rest.split_once(' ').map_or("{}", |(_, j)| j);
                        if json {
                            println!("{report}");
                        } else {
                            print!("{}", om_cli::migration::human(pid, &to.to_string(), report));
                        }
                        ExitCode::SUCCESS
                    }
                    None => {
                        eprintln!(
                            "omctl: error: migration of process {pid} failed, it continues here: {}",
                            reply.strip_prefix("ERR ").unwrap_or(&reply)
                        );
                        ExitCode::from(EXIT_FAILURE)
                    }
                },
                Err(e) => report("omctl", &e, EXIT_FAILURE),
            }
        }
        Cmd::Checkpoint {
            pid,
            out,
            leave_running,
        } => {
            let dir = match std::path::absolute(&out) {
                Ok(d) => d,
                Err(e) => return report("omctl", &e, EXIT_FAILURE),
            };
            let line = format!("checkpoint {pid} {} {}", u8::from(leave_running), dir.display());
            answer(&control, &line)
        }
        Cmd::Restart { dir, detach } => restart(&dir, detach, &control),
        Cmd::Ps => answer(&control, "ps"),
        Cmd::Incoming => answer(&control, "incoming"),
        Cmd::Reserve { size } => answer(
            &control,
            &size.map_or_else(|| "reserve".to_owned(), |s| format!("reserve {s}")),
        ),
    }
}

/// Sends one request line to omd and prints the answer: `OK` text on stdout (exit 0), `ERR` text
/// on stderr (exit 1).
fn answer(control: &std::path::Path, line: &str) -> ExitCode {
    match om_cli::control::request(control, line) {
        Ok(reply) => match reply.strip_prefix("OK") {
            Some(rest) => {
                let rest = rest.trim();
                if !rest.is_empty() {
                    println!("{rest}");
                }
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("omctl: error: {}", reply.strip_prefix("ERR ").unwrap_or(&reply));
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Err(e) => report("omctl", &e, EXIT_FAILURE),
    }
}

/// Runs `om-restore` (installed next to omctl) on `dir`, in the foreground unless `detach`.
/// Detached, omctl waits until the program runs again and prints its pid on this node. The restored
/// runtime registers with the omd at `control` (om-restore tells it through its restore marker).
fn restart(dir: &std::path::Path, detach: bool, control: &std::path::Path) -> ExitCode {
    let restorer = om_cli::sibling("om-restore");
    let mut cmd = std::process::Command::new(&restorer);
    cmd.arg(dir).env(om::control::CONTROL_ENV, control);
    if detach {
        return restart_detached(cmd);
    }
    use std::os::unix::process::CommandExt;
    let e = cmd.exec();
    report("omctl", &e, EXIT_FAILURE)
}

fn restart_detached(mut cmd: std::process::Command) -> ExitCode {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    // The write end goes to om-restore (inherited: no CLOEXEC), which writes the pid once the
    // program runs; EOF without it means the restore failed.
    let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return report("omctl", &std::io::Error::from(e), EXIT_FAILURE),
    };
    if let Err(e) = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())) {
        return report("omctl", &std::io::Error::from(e), EXIT_FAILURE);
    }
    cmd.arg("--ready-fd").arg(w.as_raw_fd().to_string());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return report("omctl", &e, EXIT_FAILURE),
    };
    drop(w);
    let mut line = String::new();
    // One line: the restorer's pid 1 may hold a copy of the write end for as long as it runs.
    let _ = std::io::BufReader::new(std::fs::File::from(r)).read_line(&mut line);
    match line.trim().parse::<u32>() {
        Ok(pid) => {
            println!("restarted as pid {pid}");
            ExitCode::SUCCESS
        }
        Err(_) => {
            // om-restore said why on stderr; pass its status on.
            let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
