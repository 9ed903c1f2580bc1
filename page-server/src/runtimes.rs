//! The runtimes (`libomrt.so` inside om processes) registered on this node's control socket.
//!
//! A runtime connects once, says `register PID`, and keeps the connection open; omd checks with
//! `SO_PEERCRED` that the connecting process really is PID. Requests for a process (`checkpoint`)
//! are relayed over that connection, one at a time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// How long a runtime may take to answer (a checkpoint writes the whole image).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The registered runtimes, by pid.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    inner: Arc<Mutex<BTreeMap<u32, Arc<Mutex<UnixStream>>>>>,
}

impl Runtimes {
    /// Registers the runtime of `pid` on `stream` after checking the peer's credentials.
    ///
    /// # Errors
    /// A text for the `ERR` reply.
    pub fn register(&self, pid: u32, stream: &UnixStream) -> Result<(), String> {
        let cred = getsockopt(stream, PeerCredentials).map_err(|e| format!("peer credentials: {e}"))?;
        if u32::try_from(cred.pid()).ok() != Some(pid) {
            return Err(format!("register {pid}: the peer is process {}", cred.pid()));
        }
        let s = stream.try_clone().map_err(|e| e.to_string())?;
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid, Arc::new(Mutex::new(s)));
        tracing::debug!(pid, "runtime registered");
        Ok(())
    }

    /// The registered pids.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }

    /// Sends `request` to the runtime of `pid` and returns its one-line answer.
    ///
    /// # Errors
    /// A text for the `ERR` reply: not registered, or the runtime went away.
    pub fn ask(&self, pid: u32, request: &str) -> Result<String, String> {
        let conn = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&pid)
            .cloned()
            .ok_or_else(|| {
                format!("process {pid} is not an om process on this node (not started with omrun?)")
            })?;
        let stream = conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = (|| {
            stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            writeln!(&*stream, "{request}")?;
            let mut line = String::new();
            BufReader::new(&*stream).read_line(&mut line)?;
            Ok::<_, std::io::Error>(line)
        })();
        match result {
            Ok(line) if !line.is_empty() => Ok(line.trim_end().to_owned()),
            Ok(_) | Err(_) => {
                self.inner
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&pid);
                Err(format!("process {pid} went away without answering"))
            }
        }
    }
}
