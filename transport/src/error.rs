//! Errors of the transport layer, one variant per way a transfer fails.

use std::io;
use std::net::SocketAddr;

use crate::wire::{ErrorCode, WireError};

/// Why a transfer failed. Both ends get one: the side that detects a problem sends the peer an
/// `Error` frame with the same reason before closing.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The receiver could not be reached.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A socket operation failed (the peer died, the network broke).
    #[error("{op} failed (peer {peer})")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The peer.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("peer {peer} closed the connection {during}")]
    Closed {
        /// The peer.
        peer: String,
        /// Where the protocol was.
        during: &'static str,
    },
    /// The peer sent bytes that break the protocol.
    #[error("protocol violation by peer {peer}")]
    Wire {
        /// The peer.
        peer: String,
        /// What was wrong.
        #[source]
        source: WireError,
    },
    /// The peer refused the handshake or a request.
    #[error("peer {peer} refused: {reason} ({code:?})")]
    Refused {
        /// The peer.
        peer: String,
        /// The reason class.
        code: ErrorCode,
        /// The peer's words.
        reason: String,
    },
    /// The peer did not prove it holds the cluster key: nothing was sent to it or accepted from it.
    #[error("peer {peer} does not hold the cluster key; refused before any page moved")]
    PeerNotAuthenticated {
        /// The peer.
        peer: String,
    },
    /// The sender aborted the transfer.
    #[error("peer {peer} aborted: {reason}")]
    Aborted {
        /// The peer.
        peer: String,
        /// Its words.
        reason: String,
    },
    /// Pages failed their checksum and were not sent again: corrupted in transit.
    #[error(
        "{pages} page(s) from {first:#x} failed their checksum in round {round} and were not written again: corrupted in transit"
    )]
    Corrupted {
        /// The round where the mismatch was seen.
        round: u32,
        /// The first bad page.
        first: u64,
        /// How many pages.
        pages: u64,
    },
    /// The caller used the sender out of order (a bug in the caller, reported instead of panicking).
    #[error("transport misuse: {0}")]
    Misuse(&'static str),
    /// A placing transport's fabric failed (SCI: a SISCI call, the mailbox).
    #[error("{transport} transport: {op} failed")]
    Fabric {
        /// The transport.
        transport: &'static str,
        /// What was being done.
        op: &'static str,
        /// The fabric's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A data stream thread failed to start.
    #[error("cannot start a stream thread")]
    Thread(#[source] io::Error),
    /// Pages from this peer could not be written into the image's memory.
    #[error("cannot write pages from {peer} into image memory")]
    ImageWrite {
        /// The peer.
        peer: String,
        /// The write's error (`ENOSPC` or `ENOMEM`: out of memory).
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// The code to send to the peer for this error.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Wire { .. } | Self::Misuse(_) | Self::Closed { .. } => ErrorCode::Protocol,
            Self::PeerNotAuthenticated { .. } => ErrorCode::Auth,
            Self::Refused { code, .. } => *code,
            Self::Corrupted { .. } => ErrorCode::Checksum,
            Self::Aborted { .. } => ErrorCode::Aborted,
            Self::Io { source, .. } if source.kind() == io::ErrorKind::WouldBlock => ErrorCode::Timeout,
            Self::ImageWrite { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::ENOMEM)) =>
            {
                ErrorCode::Limit
            }
            _ => ErrorCode::Internal,
        }
    }
}

/// An error with all its sources, `a: b: c`, for messages that cross the wire or reach people.
#[must_use]
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
