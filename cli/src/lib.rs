//! Shared pieces of om's command-line tools (omrun, omctl, omd): logging set-up, error reports, exit
//! codes, the home anchor.

pub mod anchor;
pub mod claims;
pub mod control;
pub mod migration;
mod sys;

/// The path of `name` installed next to the running program (om's binaries live together), or bare
/// `name` for a `PATH` lookup.
#[must_use]
pub fn sibling(name: &str) -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| std::path::PathBuf::from(name))
}

use std::process::ExitCode;

/// Exit code for an operation that failed.
pub const EXIT_FAILURE: u8 = 1;

/// Sets up `tracing` output on stderr at the level named by `OM_LOG` (`error`, `warn`, `info`,
/// `debug`, `trace`), else at `default`.
pub fn init_logging(default: tracing::Level) {
    let level = std::env::var("OM_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Prints `err` with its chain of causes as `tool: error: cause: cause` and returns `code`.
pub fn report(tool: &str, err: &dyn std::error::Error, code: u8) -> ExitCode {
    let mut msg = format!("{tool}: error: {err}");
    let mut src = err.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    ExitCode::from(code)
}
