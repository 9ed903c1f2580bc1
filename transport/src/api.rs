//! The transport abstraction: what a sender hands over and what a receiver provides.
//!
//! Zero copy in both directions is part of the shape:
//! - a sender hands over **ranges of its own address space** (the dirty tracker's runs), never a copy;
//!   TCP gives them to `sendmsg` as iovecs, verbs posts them as RDMA WRITE scatter lists, SCI stores or
//!   DMAs them into a mapped remote segment;
//! - a receiver says **where pages land** ([`ImageSink::landing`]): stable memory of its image, which a
//!   TCP receiver `readv`s into and an RDMA or SCI receiver registers or exports once, so remote writes
//!   go straight into it.
//!
//! A round is durable only once acknowledged ([`PageSender::send_round`] returns after the ack).

use std::ops::Range;
use std::time::Duration;

use crate::error::TransportError;
use crate::sys::MemRun;
use crate::wire::{Begin, ErrorCode, Record};

/// What one acknowledged round moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// The round number (0 is the first, full round).
    pub round: u32,
    /// Pages shipped.
    pub pages: u64,
    /// Bytes of pages shipped.
    pub bytes: u64,
    /// Runs announced as zero.
    pub zero_runs: u64,
    /// Batches over all streams.
    pub batches: u32,
    /// Time from the first byte to the acknowledgement.
    pub elapsed: Duration,
    /// Pages whose checksum did not match on arrival. The next round must send each of them again
    /// (they were written while in flight); otherwise the next round fails as corrupted.
    pub suspects: Vec<Range<u64>>,
    /// Memory the receiver's image holds after the round.
    pub image_bytes: u64,
}

/// The sending side of a transport.
pub trait PageSender {
    /// Opens the image on the receiver: process identity and VMA table. Returns the receiver's image
    /// id. The receiver refuses here, before any page moves, when the image cannot fit.
    ///
    /// # Errors
    /// Refusal, connection or protocol errors.
    fn begin(&mut self, begin: &Begin) -> Result<u64, TransportError>;

    /// Ships one round: the pages of `pages` and the zero runs of `zeroed`, then waits for the
    /// receiver's acknowledgement. `last` marks the final round (the application is stopped): any
    /// checksum mismatch fails it.
    ///
    /// # Errors
    /// Connection, protocol or checksum errors; pages the previous round reported as suspect that are
    /// not in `pages` ([`TransportError::Corrupted`]).
    ///
    /// # Safety
    /// Every run of `pages` is page-aligned memory of this process that stays mapped and readable
    /// until the call returns (the application may keep writing it). The runtime guarantees this by
    /// holding its munmap/mremap guard for the duration.
    unsafe fn send_round(
        &mut self,
        pages: &[Range<u64>],
        zeroed: &[Range<u64>],
        last: bool,
    ) -> Result<RoundStats, TransportError>;

    /// Sends a record for the restorer (threads, file descriptors, process state).
    ///
    /// # Errors
    /// Connection or protocol errors, or a record over the size cap.
    fn send_record(&mut self, kind: u32, bytes: &[u8]) -> Result<(), TransportError>;

    /// Declares the image complete. Returns the receiver's image id once it holds the image.
    ///
    /// # Errors
    /// Connection or protocol errors; a commit before the final round.
    fn commit(&mut self) -> Result<u64, TransportError>;

    /// Gives up: the receiver discards everything. Never fails (the connection may already be gone).
    fn abort(&mut self, reason: &str);
}

/// A refusal from the receiving side, sent to the peer as an `Error` frame.
pub type Refusal = (ErrorCode, String);

/// Where a receiver keeps incoming images.
pub trait ImageStore: Send + Sync + 'static {
    /// One image being received.
    type Image: ImageSink;

    /// Opens an image for a validated `Begin` from an authenticated peer, or refuses it (limits,
    /// identity).
    ///
    /// # Errors
    /// A [`Refusal`] naming the limit or rule.
    fn open(&self, begin: &Begin, page_size: u64, peer: &str) -> Result<Self::Image, Refusal>;
}

/// One image being received. Dropping it without [`ImageSink::commit`] discards it and frees its
/// memory.
///
/// # Safety
/// Implementors promise that every [`MemRun`] returned by [`ImageSink::landing`] is memory owned by the
/// sink, writable, mapped for as long as the sink lives, and never covered by a Rust reference: the
/// transport lets the kernel (or a NIC) write into it, possibly from several streams at once.
pub unsafe trait ImageSink: Send + Sync + 'static {
    /// The receiver's id for this image (reported to the sender in `Begun` and `Committed`).
    fn id(&self) -> u64;

    /// Where the bytes of `run` (source addresses) land, as one or more zones in run order. Charges the
    /// image's memory limit for pages that were not present before.
    ///
    /// # Errors
    /// A run outside the image's VMAs, or a limit.
    fn landing(&self, run: &Range<u64>) -> Result<Vec<MemRun>, Refusal>;

    /// Marks `run` as zero (freed or zero-filled), releasing its memory.
    ///
    /// # Errors
    /// A run outside the image's VMAs.
    fn zero(&self, run: &Range<u64>) -> Result<(), Refusal>;

    /// Keeps a record for the restorer.
    ///
    /// # Errors
    /// A limit.
    fn record(&self, record: Record) -> Result<(), Refusal>;

    /// Checks landed pages against their checksums; returns the indices of the pages that differ.
    /// `zones` hold `sums.len()` pages of `page_size` bytes, in order. The default checks one page after
    /// the other; a receiver with cores to spare checks in parallel.
    fn verify(&self, zones: &[MemRun], sums: &[u32], page_size: usize) -> Vec<usize> {
        let mut bad = Vec::new();
        let mut i = 0;
        for z in zones {
            for off in (0..z.len).step_by(page_size) {
                // SAFETY: the zone is image memory that stays mapped while the sink lives (the trait's
                // contract); checksums read it with atomic loads.
                let s = unsafe { crate::sys::page_sum((z.addr + off) as *const u8, page_size) };
                if sums.get(i) != Some(&s) {
                    bad.push(i);
                }
                i += 1;
            }
        }
        bad
    }

    /// Memory the image holds now, in bytes.
    fn bytes(&self) -> u64;

    /// The image is complete: keep it (or hand it to the restorer). Returns its id.
    ///
    /// # Errors
    /// When the image cannot be kept.
    fn commit(self: std::sync::Arc<Self>) -> Result<u64, Refusal>;
}
