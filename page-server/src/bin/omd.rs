//! `omd --listen IP:PORT --key FILE [--control PATH] [--state-dir DIR]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use om_cli::{EXIT_FAILURE, init_logging, report};
use om_page_server::{Config, Daemon};

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
}

const AFTER_HELP: &str = "Status of this build: omd checks its key, binds both sockets and answers \
`ping` on the control socket. Receiving pages (issue #4) and restoring processes (issue #5) are not \
built yet; peers that connect are told so and disconnected.";

fn main() -> ExitCode {
    init_logging(tracing::Level::INFO);
    let args = Args::parse();
    let config = Config {
        listen: args.listen,
        key: args.key,
        control: om::control::resolve_socket_path(args.control.as_deref()),
        state_dir: args.state_dir,
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
