//! Errors of the verbs transport.

use om_transport::TransportError;
use om_transport::api::Refusal;
use om_transport::wire::ErrorCode;

/// A failed verbs operation.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// libibverbs could not be loaded.
    #[error("cannot load libibverbs: {0}")]
    Load(String),
    /// Registered memory would not survive a `fork()` correctly here.
    #[error(
        "registered memory is not fork-safe here (libibverbs does not report IBV_FORK_UNNEEDED: Linux 5.13 and rdma-core 35 or later are needed)"
    )]
    ForkUnsafe,
    /// No device or port to use.
    #[error("no RDMA device to use: {0}")]
    NoDevice(String),
    /// A libibverbs call failed.
    #[error("{0} failed: {1}")]
    Call(&'static str, #[source] std::io::Error),
    /// A queue pair refused a state transition.
    #[error("cannot move the queue pair to {0}: {1}")]
    Modify(&'static str, #[source] std::io::Error),
    /// Registering memory failed.
    #[error(
        "cannot register {len} bytes at {addr:#x} (RLIMIT_MEMLOCK, `ulimit -l`, may be too low): {source}"
    )]
    Register {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// The locked-memory budget cannot hold even the transport's own buffers.
    #[error(
        "RLIMIT_MEMLOCK allows {limit} bytes, the verbs transport needs at least {need}: raise it (`ulimit -l`)"
    )]
    Memlock {
        /// The budget.
        limit: u64,
        /// What is needed.
        need: u64,
    },
    /// Posting a work request failed.
    #[error("posting a work request failed: {0}")]
    Post(#[source] std::io::Error),
    /// A work request completed in error.
    #[error("a work request completed with {status} (vendor error {vendor:#x})")]
    Completion {
        /// The library's name for the status.
        status: String,
        /// The status (`enum ibv_wc_status`).
        code: u32,
        /// The device's own code.
        vendor: u32,
    },
    /// The peer did not complete work in time.
    #[error("no completion for {0:?}: the peer stopped taking work")]
    Timeout(std::time::Duration),
    /// The peer closed the control connection or reported a failure on it while the fabric was
    /// still waiting for it.
    #[error("the receiver gave up (its control connection closed or reported an error)")]
    PeerGone,
    /// A peer's endpoint did not decode.
    #[error("bad verbs endpoint from the peer: {0}")]
    Endpoint(String),
    /// A write outside the receiver's windows.
    #[error("no registered window {window} for {len} bytes at offset {offset:#x}")]
    NoWindow {
        /// Window index.
        window: usize,
        /// Offset in it.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Memory outside the registered region a request or registration names.
    #[error("{len} bytes at {addr:#x} lie outside the registered region")]
    OutsideRegion {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// More bytes than a buffer holds.
    #[error("{what} of {len} bytes exceeds its buffer ({max} bytes)")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The buffer's size.
        max: usize,
    },
    /// Used before the receiver's placement arrived.
    #[error("not attached to a receiver")]
    NotAttached,
    /// A setting in the environment with a value om does not know.
    #[error("{name} is {allowed}, not {value:?}")]
    Setting {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it may be.
        allowed: &'static str,
    },
    /// On-demand paging was asked for (`OM_VERBS_ODP=on`) and the device does not offer it.
    #[error("OM_VERBS_ODP=on, but device {device} offers no on-demand paging for {what}{why}")]
    NoOdp {
        /// The device.
        device: String,
        /// What it would be needed for.
        what: &'static str,
        /// Why om does not take what the device says it offers (empty, or `: ...`).
        why: String,
    },
    /// Memory registered on demand meets a path on which the device's on-demand paging is not
    /// sound (soft-RoCE below a page-sized path MTU).
    #[error("{device} registered this image on demand, which the path to this sender does not allow: {why}")]
    UnsoundOdp {
        /// The device.
        device: String,
        /// Why.
        why: &'static str,
    },
    /// A request failed reading on-demand memory of the application (most likely unmapped by it
    /// while the adapter read it).
    #[error(
        "a request failed ({status}) while the application's memory is registered on demand: most likely the application unmapped memory before the adapter read it (OM_VERBS_ODP=off pins instead)"
    )]
    OdpFault {
        /// The library's name for the completion's status.
        status: String,
    },
    /// Reading this process's memory failed.
    #[error("reading the pages to place: {0}")]
    Read(#[source] std::io::Error),
}

impl VerbsError {
    /// As a transport error, saying what was being done.
    #[must_use]
    pub fn during(self, op: &'static str) -> TransportError {
        TransportError::Fabric {
            transport: "verbs",
            op,
            source: Box::new(self),
        }
    }

    /// As a refusal for the peer.
    #[must_use]
    pub fn refusal(&self) -> Refusal {
        let code = match self {
            Self::Endpoint(_) | Self::NoWindow { .. } => ErrorCode::Protocol,
            Self::Memlock { .. } | Self::Register { .. } => ErrorCode::Limit,
            Self::Timeout(_) => ErrorCode::Timeout,
            Self::Load(_)
            | Self::NoDevice(_)
            | Self::ForkUnsafe
            | Self::NoOdp { .. }
            | Self::UnsoundOdp { .. } => ErrorCode::Capability,
            _ => ErrorCode::Internal,
        };
        (code, format!("verbs: {self}"))
    }
}
