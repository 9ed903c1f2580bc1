//! `omd --listen IP:PORT --key FILE [--control PATH] [--state-dir DIR]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use om_cli::{EXIT_FAILURE, init_logging, parse_size, report};
use om_page_server::{Config, Daemon, Limits};

/// om's per-node daemon: page server for incoming migrations, restorer, and the local control point
/// for omrun and omctl. Stops cleanly on SIGTERM, SIGINT or SIGHUP.
#[derive(Debug, Parser)]
#[command(name = "omd", version, after_help = AFTER_HELP)]
struct Args {
    /// Address other nodes connect to.
    #[arg(long, value_name = "IP:PORT")]
    listen: SocketAddr,
    /// The cluster key file (mode 600, at least 16 bytes), the same on every node.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Local control socket [default: /run/om/omd.sock for root, else $XDG_RUNTIME_DIR/om/omd.sock]
    #[arg(long, env = om::control::CONTROL_ENV, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Where images and state are kept.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Most memory one incoming image may use (bytes; K, M, G, T suffixes) [default: half of RAM]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_image_mem: Option<u64>,
    /// Most memory all images together may use [default: half of RAM]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_total_mem: Option<u64>,
    /// Image memory to keep allocated ahead of the next incoming image, so that its pages land
    /// without the first-touch cost of fresh memory (made again, in the background, after an image
    /// that announces at least half as much took it) [default: 0, none]
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "0")]
    reserve: u64,
    /// Seconds a silent peer may keep its image before it is discarded.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    idle_timeout: u64,
}

const AFTER_HELP: &str = "omd receives migrating and checkpointed images from authenticated peers \
(over TCP, and over Dolphin SCI or InfiniBand/RoCE verbs where this node has a SISCI library or an \
active RDMA port), restores migrated processes, and serves omrun and omctl on the control socket \
(`ping`, `images`, `save ID DIR`, `drop ID`, `reserve [SIZE]`, `ps`, `checkpoint ...`, `migrate ...`). OM_LOG=debug turns on logs.";

fn main() -> ExitCode {
    init_logging(tracing::Level::INFO);
    let args = Args::parse();
    let config = Config {
        listen: args.listen,
        key: args.key,
        control: om::control::resolve_socket_path(args.control.as_deref()),
        state_dir: args.state_dir,
        limits: {
            let default = Limits::from_memory();
            let total = args.max_total_mem.unwrap_or(default.total);
            Limits {
                per_image: args.max_image_mem.unwrap_or(default.per_image).min(total),
                total,
            }
        },
        reserve: args.reserve,
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
    };
    // Blocked before any thread starts, so every thread inherits the mask and only sigwait sees them.
    let mut stop = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stop.add(s);
    }
    if let Err(e) = stop.thread_block() {
        return report("omd", &e, EXIT_FAILURE);
    }
    let daemon = match Daemon::bind(config) {
        Ok(d) => d,
        Err(e) => return report("omd", &e, EXIT_FAILURE),
    };
    let handle = match daemon.serve() {
        Ok(h) => h,
        Err(e) => return report("omd", &e, EXIT_FAILURE),
    };
    let sig = stop.wait();
    tracing::info!(?sig, "omd stopping");
    handle.shutdown();
    ExitCode::SUCCESS
}
