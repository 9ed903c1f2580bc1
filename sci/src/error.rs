//! Errors of the SCI transport: every SISCI error code by name, and the transport's own failures.

use std::time::Duration;

/// A SISCI error code (`sci_error_t`), by name. Values from Dolphin's `sisci_error.h`: each is
/// `code | 0x40000000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Busy,
    FlagNotImplemented,
    IllegalFlag,
    NoSpace,
    ApiNoSpace,
    HwNoSpace,
    NotImplemented,
    IllegalAdapterNo,
    NoSuchAdapterNo,
    Timeout,
    OutOfRange,
    /// Also `SCI_ERR_NO_SUCH_INTNO`.
    NoSuchSegment,
    IllegalNodeId,
    ConnectionRefused,
    SegmentNotConnected,
    SizeAlignment,
    OffsetAlignment,
    IllegalParameter,
    MaxEntries,
    SegmentNotPrepared,
    IllegalAddress,
    IllegalOperation,
    IllegalQuery,
    SegmentIdUsed,
    System,
    Cancelled,
    NotConnected,
    NotAvailable,
    InconsistentVersions,
    CondIntRaceProblem,
    Overflow,
    NotInitialized,
    Access,
    NoSuchNodeId,
    NodeNotResponding,
    NoRemoteLinkAccess,
    NoLinkAccess,
    TransferFailed,
    /// A code this build does not know.
    Unknown(u32),
}

const TABLE: &[(u32, Code, &str)] = &[
    (0x900, Code::Busy, "SCI_ERR_BUSY: the resource is busy"),
    (
        0x901,
        Code::FlagNotImplemented,
        "SCI_ERR_FLAG_NOT_IMPLEMENTED: a flag is not implemented",
    ),
    (0x902, Code::IllegalFlag, "SCI_ERR_ILLEGAL_FLAG: an illegal flag"),
    (0x904, Code::NoSpace, "SCI_ERR_NOSPC: out of resources"),
    (
        0x905,
        Code::ApiNoSpace,
        "SCI_ERR_API_NOSPC: the API is out of resources",
    ),
    (
        0x906,
        Code::HwNoSpace,
        "SCI_ERR_HW_NOSPC: the adapter is out of resources",
    ),
    (
        0x907,
        Code::NotImplemented,
        "SCI_ERR_NOT_IMPLEMENTED: not implemented",
    ),
    (
        0x908,
        Code::IllegalAdapterNo,
        "SCI_ERR_ILLEGAL_ADAPTERNO: an illegal adapter number",
    ),
    (
        0x909,
        Code::NoSuchAdapterNo,
        "SCI_ERR_NO_SUCH_ADAPTERNO: no such adapter",
    ),
    (0x90A, Code::Timeout, "SCI_ERR_TIMEOUT: timed out"),
    (0x90B, Code::OutOfRange, "SCI_ERR_OUT_OF_RANGE: out of range"),
    (
        0x90C,
        Code::NoSuchSegment,
        "SCI_ERR_NO_SUCH_SEGMENT: no such segment or interrupt number",
    ),
    (
        0x90D,
        Code::IllegalNodeId,
        "SCI_ERR_ILLEGAL_NODEID: an illegal node id",
    ),
    (
        0x90E,
        Code::ConnectionRefused,
        "SCI_ERR_CONNECTION_REFUSED: the remote node refused the connection",
    ),
    (
        0x90F,
        Code::SegmentNotConnected,
        "SCI_ERR_SEGMENT_NOT_CONNECTED: the segment is not connected",
    ),
    (
        0x910,
        Code::SizeAlignment,
        "SCI_ERR_SIZE_ALIGNMENT: the size is not aligned",
    ),
    (
        0x911,
        Code::OffsetAlignment,
        "SCI_ERR_OFFSET_ALIGNMENT: the offset is not aligned",
    ),
    (
        0x912,
        Code::IllegalParameter,
        "SCI_ERR_ILLEGAL_PARAMETER: an illegal parameter",
    ),
    (0x913, Code::MaxEntries, "SCI_ERR_MAX_ENTRIES: the queue is full"),
    (
        0x914,
        Code::SegmentNotPrepared,
        "SCI_ERR_SEGMENT_NOT_PREPARED: the segment is not prepared",
    ),
    (
        0x915,
        Code::IllegalAddress,
        "SCI_ERR_ILLEGAL_ADDRESS: an illegal address",
    ),
    (
        0x916,
        Code::IllegalOperation,
        "SCI_ERR_ILLEGAL_OPERATION: an illegal operation",
    ),
    (
        0x917,
        Code::IllegalQuery,
        "SCI_ERR_ILLEGAL_QUERY: an illegal query",
    ),
    (
        0x918,
        Code::SegmentIdUsed,
        "SCI_ERR_SEGMENTID_USED: the segment id is in use",
    ),
    (0x919, Code::System, "SCI_ERR_SYSTEM: a system call failed"),
    (0x91A, Code::Cancelled, "SCI_ERR_CANCELLED: cancelled"),
    (0x91B, Code::NotConnected, "SCI_ERR_NOT_CONNECTED: not connected"),
    (0x91C, Code::NotAvailable, "SCI_ERR_NOT_AVAILABLE: not available"),
    (
        0x91D,
        Code::InconsistentVersions,
        "SCI_ERR_INCONSISTENT_VERSIONS: library and driver versions differ",
    ),
    (
        0x91E,
        Code::CondIntRaceProblem,
        "SCI_ERR_COND_INT_RACE_PROBLEM: a conditional interrupt race",
    ),
    (0x91F, Code::Overflow, "SCI_ERR_OVERFLOW: overflow"),
    (
        0x920,
        Code::NotInitialized,
        "SCI_ERR_NOT_INITIALIZED: SCIInitialize was not called",
    ),
    (0x921, Code::Access, "SCI_ERR_ACCESS: access denied"),
    (
        0xA00,
        Code::NoSuchNodeId,
        "SCI_ERR_NO_SUCH_NODEID: no such node on the fabric",
    ),
    (
        0xA02,
        Code::NodeNotResponding,
        "SCI_ERR_NODE_NOT_RESPONDING: the node does not respond",
    ),
    (
        0xA04,
        Code::NoRemoteLinkAccess,
        "SCI_ERR_NO_REMOTE_LINK_ACCESS: the remote link is down",
    ),
    (
        0xA05,
        Code::NoLinkAccess,
        "SCI_ERR_NO_LINK_ACCESS: the link is down",
    ),
    (
        0xA06,
        Code::TransferFailed,
        "SCI_ERR_TRANSFER_FAILED: the transfer failed",
    ),
];

/// The mask every SISCI error code carries.
pub const MASK: u32 = 0x4000_0000;

impl Code {
    /// The code of a raw `sci_error_t` (`None` for `SCI_ERR_OK`).
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        if raw == 0 {
            return None;
        }
        Some(
            TABLE
                .iter()
                .find(|(v, _, _)| v | MASK == raw)
                .map_or(Self::Unknown(raw), |(_, c, _)| *c),
        )
    }

    /// The raw value.
    #[must_use]
    pub fn raw(self) -> u32 {
        match self {
            Self::Unknown(v) => v,
            c => TABLE
                .iter()
                .find(|(_, k, _)| *k == c)
                .map_or(0, |(v, _, _)| v | MASK),
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match TABLE.iter().find(|(_, k, _)| k == self) {
            Some((_, _, text)) => f.write_str(text),
            None => write!(f, "unknown SISCI error {:#x}", self.raw()),
        }
    }
}

/// How the SCI transport fails.
#[derive(Debug, thiserror::Error)]
pub enum SciError {
    /// The SISCI library could not be loaded.
    #[error(
        "cannot load the SISCI library ({tried}): {reason}; install Dolphin's DIS software or set OM_SISCI_LIB"
    )]
    Load {
        /// The paths tried.
        tried: String,
        /// The loader's message.
        reason: String,
    },
    /// The library lacks a function the transport needs.
    #[error("the SISCI library {path} has no {symbol}")]
    Symbol {
        /// The library.
        path: String,
        /// The function.
        symbol: &'static str,
    },
    /// A SISCI call failed.
    #[error("{call}: {code}")]
    Call {
        /// The function.
        call: &'static str,
        /// Its error code.
        code: Code,
    },
    /// The receiver's memory is too large to export in windows.
    #[error("an image of {bytes} bytes needs more than {max} windows")]
    TooLarge {
        /// The image memory's size.
        bytes: u64,
        /// The window limit.
        max: usize,
    },
    /// The receiver did not take descriptors out of its mailbox in time.
    #[error("the receiver's mailbox stayed full for {0:?}")]
    MailboxFull(Duration),
    /// The sender broke the mailbox's rules (hostile or broken).
    #[error("mailbox: {0}")]
    Mailbox(String),
    /// The application's pages could not be read or stored here.
    #[error("{0}")]
    Local(String),
    /// A post or write before the receiver's placement arrived.
    #[error("nothing attached: the receiver's placement has not arrived")]
    NotAttached,
    /// A write outside the receiver's windows.
    #[error("no window {window} (or nothing attached) for {len} bytes at {offset:#x}")]
    NoWindow {
        /// The window.
        window: usize,
        /// The offset in it.
        offset: u64,
        /// The length.
        len: u64,
    },
}

impl SciError {
    /// The transport error for `op`.
    #[must_use]
    pub fn during(self, op: &'static str) -> om_transport::TransportError {
        om_transport::TransportError::Fabric {
            transport: "SCI",
            op,
            source: Box::new(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_says_its_name() {
        for (v, c, text) in TABLE {
            assert_eq!(Code::from_raw(v | MASK), Some(*c));
            assert_eq!(c.raw(), v | MASK);
            assert!(c.to_string().starts_with("SCI_ERR_"), "{text}");
        }
        assert_eq!(Code::from_raw(0), None);
        assert_eq!(Code::from_raw(0x4000_0bad), Some(Code::Unknown(0x4000_0bad)));
        assert!(Code::Unknown(7).to_string().contains("0x7"));
    }
}
