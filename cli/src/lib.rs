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

/// A size in bytes as people write it on a command line: a number with an optional K, M, G or T
/// suffix (binary: K is 1024).
///
/// # Errors
/// Not a number, an unknown suffix, or more than 2^64 - 1 bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size in bytes"))
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_nothing_else() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("4X").unwrap_err().contains("unknown size suffix"));
        for bad in ["", "G", "-1", "1.5G", "4 G", "20000000T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
