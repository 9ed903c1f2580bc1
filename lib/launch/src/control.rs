//! A client of omd's control socket: one request line, one answer line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The environment variable that may name the control socket.
pub const CONTROL_ENV: &str = "OM_CONTROL";

/// `OM_CONTROL`, else the per-user default (`/run/om/omd.sock` for root, else
/// `$XDG_RUNTIME_DIR/om/omd.sock` or `/tmp/om-UID/omd.sock`), as `om::control` resolves it.
#[must_use]
pub fn default_path() -> PathBuf {
    if let Some(p) = std::env::var_os(CONTROL_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0);
    if uid == 0 {
        return PathBuf::from("/run/om/omd.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("om/omd.sock"),
        _ => PathBuf::from(format!("/tmp/om-{uid}/omd.sock")),
    }
}

/// Sends `line` and returns the answer line without its newline.
///
/// # Errors
/// The socket could not be reached, or omd closed it without an answer.
pub fn request(path: &Path, line: &str) -> std::io::Result<String> {
    exchange(&UnixStream::connect(path)?, line)
}

/// Sends `line` on a connected control socket and returns the answer line without its newline.
///
/// # Errors
/// A failed write or read, or omd closing the connection without an answer.
pub fn exchange(stream: &UnixStream, line: &str) -> std::io::Result<String> {
    writeln!(&*stream, "{line}")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "omd closed the connection",
        ));
    }
    Ok(answer.trim_end().to_owned())
}
