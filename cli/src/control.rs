//! A client of omd's control socket: one request line, one answer line.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Why a request to omd failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No omd listens there.
    #[error("cannot reach omd at {path} (is omd running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("talking to omd at {path}")]
    Exchange {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Sends `line` and returns the answer line without its newline.
///
/// # Errors
/// [`ControlError`].
pub fn request(path: &Path, line: &str) -> Result<String, ControlError> {
    let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    om_launch::control::exchange(&stream, line).map_err(|source| ControlError::Exchange {
        path: path.to_path_buf(),
        source,
    })
}
