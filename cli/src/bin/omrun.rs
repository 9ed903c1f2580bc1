//! `omrun [--control PATH] -- PROG [ARGS...]`: runs PROG under om and stays as its home anchor.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use om_cli::{EXIT_FAILURE, anchor, init_logging, report};

/// Run a program under om. omrun stays on this (home) node while the program runs, wherever it
/// migrates: it forwards signals (HUP INT QUIT TERM USR1 USR2 CONT WINCH) and exits with the program's
/// exact status, or dies of the signal that killed it.
#[derive(Debug, Parser)]
#[command(name = "omrun", version, after_help = AFTER_HELP)]
struct Args {
    /// Control socket of the local omd [default: /run/om/omd.sock for root, else
    /// $XDG_RUNTIME_DIR/om/omd.sock]
    #[arg(long, env = om::control::CONTROL_ENV, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The program to run.
    #[arg(required = true, value_name = "PROG")]
    prog: OsString,
    /// Its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

const AFTER_HELP: &str = "The program runs as omrun's child with the om runtime (libomrt.so, found \
next to omrun or named by OM_RUNTIME) preloaded and registered with the omd of --control; `omctl \
migrate PID --to IP:PORT` moves it to another node while omrun stays here, relaying its stdio (a \
terminal too), signals and exit status wherever it runs. `omctl ps` here shows where it runs.";

fn main() -> ExitCode {
    init_logging(tracing::Level::WARN);
    let args = Args::parse();
    let control = om::control::resolve_socket_path(args.control.as_deref());
    tracing::debug!(control = %control.display(), "control socket");
    let runtime = std::env::var_os("OM_RUNTIME").map_or_else(|| om_cli::sibling("libomrt.so"), PathBuf::from);
    let mut env = vec![(
        OsString::from(om::control::CONTROL_ENV),
        control.clone().into_os_string(),
    )];
    if runtime.is_file() {
        let mut preload = runtime.into_os_string();
        if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
            preload.push(":");
            preload.push(old);
        }
        env.push((OsString::from("LD_PRELOAD"), preload));
    } else {
        tracing::warn!(runtime = %runtime.display(), "om runtime not found; the program runs without it");
    }
    match anchor::run(&args.prog, &args.args, &env, &control) {
        Ok(outcome) => outcome.reproduce(),
        Err(e @ anchor::AnchorError::Spawn { .. }) => report("omrun", &e, 127),
        Err(e) => report("omrun", &e, EXIT_FAILURE),
    }
}
