//! SISCI error codes, flags and states, with the values of Dolphin's headers (`sisci_error.h`,
//! `sisci_types.h`; sources in `docs/sci.md`).

#![allow(missing_docs)]

/// Error codes (`sci_error_t`): each is `code | SCI_ERR_MASK`.
pub mod err {
    pub const MASK: u32 = 0x4000_0000;
    pub const OK: u32 = 0;
    pub const BUSY: u32 = 0x900 | MASK;
    pub const FLAG_NOT_IMPLEMENTED: u32 = 0x901 | MASK;
    pub const ILLEGAL_FLAG: u32 = 0x902 | MASK;
    pub const NOSPC: u32 = 0x904 | MASK;
    pub const NOT_IMPLEMENTED: u32 = 0x907 | MASK;
    pub const ILLEGAL_ADAPTERNO: u32 = 0x908 | MASK;
    pub const NO_SUCH_ADAPTERNO: u32 = 0x909 | MASK;
    pub const TIMEOUT: u32 = 0x90A | MASK;
    pub const OUT_OF_RANGE: u32 = 0x90B | MASK;
    /// Also `SCI_ERR_NO_SUCH_INTNO`.
    pub const NO_SUCH_SEGMENT: u32 = 0x90C | MASK;
    pub const ILLEGAL_NODEID: u32 = 0x90D | MASK;
    pub const CONNECTION_REFUSED: u32 = 0x90E | MASK;
    pub const SEGMENT_NOT_CONNECTED: u32 = 0x90F | MASK;
    pub const SIZE_ALIGNMENT: u32 = 0x910 | MASK;
    pub const OFFSET_ALIGNMENT: u32 = 0x911 | MASK;
    pub const ILLEGAL_PARAMETER: u32 = 0x912 | MASK;
    pub const MAX_ENTRIES: u32 = 0x913 | MASK;
    pub const SEGMENT_NOT_PREPARED: u32 = 0x914 | MASK;
    pub const ILLEGAL_ADDRESS: u32 = 0x915 | MASK;
    pub const ILLEGAL_OPERATION: u32 = 0x916 | MASK;
    pub const SEGMENTID_USED: u32 = 0x918 | MASK;
    pub const SYSTEM: u32 = 0x919 | MASK;
    pub const CANCELLED: u32 = 0x91A | MASK;
    pub const NOT_CONNECTED: u32 = 0x91B | MASK;
    pub const NOT_AVAILABLE: u32 = 0x91C | MASK;
    pub const NOT_INITIALIZED: u32 = 0x920 | MASK;
    pub const ACCESS: u32 = 0x921 | MASK;
    pub const NO_SUCH_NODEID: u32 = 0xA00 | MASK;
    pub const TRANSFER_FAILED: u32 = 0xA06 | MASK;
}

/// Flags (their meaning depends on the function that takes them).
pub mod flag {
    pub const USE_CALLBACK: u32 = 0x1;
    pub const EMPTY: u32 = 0x2;
    pub const FIXED_INTNO: u32 = 0x2;
    pub const READONLY_MAP: u32 = 0x2;
    pub const DMA_WAIT: u32 = 0x4;
    pub const DMA_READ: u32 = 0x10;
    pub const AUTO_ID: u32 = 0x2000_0000;
    pub const INFINITE_TIMEOUT: u32 = 0xffff_ffff;
}

/// `sci_dma_queue_state_t`.
pub mod dma_state {
    pub const IDLE: u32 = 0;
    pub const POSTED: u32 = 2;
    pub const DONE: u32 = 3;
    pub const ERROR: u32 = 5;
}

/// `sci_sequence_status_t`: `SCI_SEQ_OK`.
pub const SEQ_OK: i32 = 0;

/// The text of an error code.
#[must_use]
pub fn error_text(code: u32) -> &'static std::ffi::CStr {
    match code {
        err::OK => c"no error",
        err::BUSY => c"resource busy",
        err::FLAG_NOT_IMPLEMENTED => c"flag not implemented",
        err::ILLEGAL_FLAG => c"illegal flag",
        err::NOSPC => c"out of resources",
        err::NOT_IMPLEMENTED => c"not implemented",
        err::ILLEGAL_ADAPTERNO | err::NO_SUCH_ADAPTERNO => c"no such adapter",
        err::TIMEOUT => c"timeout",
        err::OUT_OF_RANGE => c"out of range",
        err::NO_SUCH_SEGMENT => c"no such segment or interrupt number",
        err::ILLEGAL_NODEID => c"illegal node id",
        err::CONNECTION_REFUSED => c"connection refused",
        err::SEGMENT_NOT_CONNECTED => c"segment not connected",
        err::SIZE_ALIGNMENT => c"size alignment",
        err::OFFSET_ALIGNMENT => c"offset alignment",
        err::ILLEGAL_PARAMETER => c"illegal parameter",
        err::MAX_ENTRIES => c"queue full",
        err::SEGMENT_NOT_PREPARED => c"segment not prepared",
        err::ILLEGAL_ADDRESS => c"illegal address",
        err::ILLEGAL_OPERATION => c"illegal operation",
        err::SEGMENTID_USED => c"segment id in use",
        err::SYSTEM => c"system error",
        err::CANCELLED => c"cancelled",
        err::NOT_CONNECTED => c"not connected",
        err::NOT_AVAILABLE => c"not available",
        err::NOT_INITIALIZED => c"SISCI not initialized",
        err::ACCESS => c"access denied",
        err::NO_SUCH_NODEID => c"no such node id",
        err::TRANSFER_FAILED => c"transfer failed",
        _ => c"unknown SISCI error",
    }
}
