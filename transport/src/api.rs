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
use crate::sys::{Landing, Readable, ReadableBatch};
use crate::wire::{Begin, ErrorCode, Extent, Placement, Record};

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
    /// Connections (or placing writers) the round's pages went over at once: 1 for a serial round,
    /// such as a migration's final one.
    pub lanes: usize,
    /// Pages whose checksum did not match on arrival (they were written while in flight), this
    /// round's and earlier ones' not sent again yet. Each must be sent again before the image is
    /// sealed (or leave the VMA table); otherwise the final round fails as corrupted.
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
    /// `pages` says how the memory may be read ([`Readable::new`]: it stays mapped;
    /// [`Readable::racy`]: the running application may unmap it; [`Readable::copied`]: the caller
    /// itself writes it while it is sent).
    ///
    /// # Errors
    /// Connection, protocol or checksum errors; in the final round, suspect pages of earlier rounds
    /// that are not in `pages` ([`TransportError::Corrupted`]).
    fn send_round(
        &mut self,
        pages: Readable<'_>,
        zeroed: &[Range<u64>],
        last: bool,
    ) -> Result<RoundStats, TransportError>;

    /// Replaces the image's VMA table between rounds (the process mapped, unmapped or moved memory
    /// since `begin`). The receiver drops the pages outside the new table.
    ///
    /// # Errors
    /// Connection or protocol errors, a table the receiver cannot hold, or a call inside a round.
    fn update_vmas(&mut self, begin: &Begin) -> Result<(), TransportError>;

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

    /// After the commit of a migration (the receiver holds the prepared copy): the point of no
    /// return. Starts the copy and returns its pid on the receiving node once it runs.
    ///
    /// # Errors
    /// Connection or protocol errors. After an error the copy may or may not run: the caller must not
    /// resume the source (it cannot know), and reports the migration as lost in doubt.
    fn go(&mut self) -> Result<u32, TransportError>;

    /// Gives up: the receiver discards everything. Never fails (the connection may already be gone).
    fn abort(&mut self, reason: &str);
}

/// Where the bytes of one [`Placer::write`] come from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// `len` bytes of this process's memory at `addr`, inside one run of `batch` (covered by its
    /// promise; a racy batch's memory may vanish meanwhile).
    Memory {
        /// The batch the bytes belong to.
        batch: &'a ReadableBatch<'a>,
        /// Start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A copy (a batch sent from a copy).
    Bytes(&'a [u8]),
}

impl Source<'_> {
    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            Self::Memory { len, .. } => *len,
            Self::Bytes(b) => b.len() as u64,
        }
    }

    /// True for no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sending half of a *placing* transport (SCI; later verbs): the control connection stays TCP
/// (authentication, VMA tables, rounds, records, the commit), while pages go straight from the
/// application's memory into the receiver's exported image memory, at the places its
/// [`Placement`] gives. Each batch's descriptor (a `Batch` body) follows its pages through the
/// transport's own mailbox, which also carries the flow control.
pub trait Placer: Send + std::fmt::Debug {
    /// The capability bit this placer needs the receiver to grant ([`crate::wire::caps`]).
    fn cap(&self) -> u32;

    /// Takes the receiver's placement (after `Begun`, and again after every `Vmas`): reaches its
    /// mailbox and windows. `local` is this node's address on the control connection (a fabric
    /// that runs over IP picks its port by it).
    ///
    /// # Errors
    /// The fabric refusing or failing.
    fn attach(&mut self, placement: &Placement, local: std::net::IpAddr) -> Result<(), TransportError>;

    /// For a fabric whose receiver must connect back (verbs): this side's endpoint, once after an
    /// [`Placer::attach`] that opened a new connection. The sender hands it to the receiver
    /// (`Connect`) and waits for `Connected` before any page moves.
    fn endpoint(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// Writes `src` at byte `offset` of window `window`.
    ///
    /// # Errors
    /// The fabric failing, or a place outside the windows.
    fn write(&mut self, src: Source<'_>, window: usize, offset: u64) -> Result<(), TransportError>;

    /// True when racy memory should go through [`Placer::write_summed`] (read once, checksummed by
    /// the placer); false when the sender checksums it first and then [`Placer::write`]s it (for a
    /// placer whose adapter reads the memory itself).
    fn reads_once(&self) -> bool {
        true
    }

    /// Writes `len` bytes of `batch`'s memory at `addr` (memory the application may unmap meanwhile)
    /// at byte `offset` of window `window`, and appends one checksum per page *of the bytes written*
    /// to `sums`: one read of the application's memory serves both.
    ///
    /// # Errors
    /// The fabric failing, or a place outside the windows.
    fn write_summed(
        &mut self,
        batch: &ReadableBatch<'_>,
        addr: u64,
        len: u64,
        window: usize,
        offset: u64,
        sums: &mut Vec<u32>,
    ) -> Result<(), TransportError>;

    /// Makes every write so far visible at the receiver, then posts `descriptor` to its mailbox
    /// (waiting for room) and rings its doorbell.
    ///
    /// # Errors
    /// The fabric failing, or the receiver not draining its mailbox in time.
    fn post(&mut self, descriptor: &[u8]) -> Result<(), TransportError>;

    /// Every batch of a round is posted: waits until the fabric is done reading the application's
    /// memory and lets go of any hold on it (registrations), since the application may remap it
    /// before the next round.
    ///
    /// # Errors
    /// The fabric failing to complete the round's writes.
    fn round_done(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// The control connection's descriptor, owned by the sender for as long as the placer lives:
    /// a placer that waits for its fabric may watch it, since the receiver says it gave up there
    /// (an `Error` frame, or the connection closing) while the fabric itself may stay silent.
    fn watch(&mut self, control: std::os::fd::RawFd) {
        let _ = control;
    }

    /// Descriptors the placer's fabric library opened in this process (a verbs device): never part
    /// of an image.
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// Memory of this process the placer mapped (the receiver's windows and mailbox): never part of
    /// an image.
    fn mappings(&self) -> Vec<Range<u64>>;

    /// A second writer for another thread: the same windows and the same mailbox (descriptors from
    /// both go through it in turn). `None` when the placer cannot share them.
    fn fork(&self) -> Option<Box<dyn Placer>> {
        None
    }
}

/// Image memory a receiving [`Export`] keeps alive and exports.
pub trait Exportable: Send + Sync + std::fmt::Debug {
    /// The image's whole memory.
    fn memory(&self) -> Landing<'_>;
}

/// The receiving half of a placing transport: exports image memory and takes batch descriptors out
/// of its mailbox.
pub trait Exporter: Send + Sync + std::fmt::Debug {
    /// The capability bit this exporter serves ([`crate::wire::caps`]).
    fn cap(&self) -> u32;

    /// Exports `image`'s memory (in windows) and opens a mailbox for one session. The export keeps
    /// `image` alive and withdraws everything when dropped. `local` is this node's address on the
    /// session's control connection.
    ///
    /// # Errors
    /// A [`Refusal`] saying what the fabric refused.
    fn export(
        &self,
        image: std::sync::Arc<dyn Exportable>,
        local: std::net::IpAddr,
    ) -> Result<Box<dyn Export>, Refusal>;
}

/// One session's export.
pub trait Export: Send + Sync + std::fmt::Debug {
    /// The placement the sender needs, with these extents (a fabric that registers memory
    /// registers what they cover).
    ///
    /// # Errors
    /// The fabric refusing to export the memory.
    fn placement(&self, extents: Vec<Extent>) -> Result<Placement, Refusal>;

    /// Connects to the sender's endpoint (a fabric that connects both ways, [`Placer::endpoint`]).
    ///
    /// # Errors
    /// A bad endpoint, or one this fabric does not take.
    fn connect(&self, peer: &[u8]) -> Result<(), Refusal> {
        let _ = peer;
        Err((
            crate::wire::ErrorCode::Protocol,
            "this transport takes no endpoint from the sender".into(),
        ))
    }

    /// The receiver gives the session up: a sender waiting for room in the mailbox fails at once
    /// instead of waiting out its timeout (also done when the export is dropped).
    fn abandon(&self) {}

    /// True when the fabric pins the exported memory (its registrations keep the pages they
    /// hold, so a page the image releases would no longer be the one the fabric writes): the
    /// image then overwrites zero and dropped pages instead of releasing them ([`ImageSink::pin`]).
    fn pins(&self) -> bool {
        true
    }

    /// Waits up to `timeout` for the next batch descriptor; `None` when none came.
    ///
    /// # Errors
    /// The fabric failing, or a sender that broke the mailbox's rules.
    fn next(&self, timeout: Duration) -> Result<Option<Vec<u8>>, Refusal>;
}

/// A refusal from the receiving side, sent to the peer as an `Error` frame.
pub type Refusal = (ErrorCode, String);

/// `len` bytes of an image's file at `offset` (see [`ImageSink::file_landing`]).
#[derive(Debug, Clone, Copy)]
pub struct FilePiece<'a> {
    /// The image's memory as a file.
    pub file: &'a std::fs::File,
    /// Where in the file.
    pub offset: u64,
    /// How many bytes.
    pub len: usize,
    /// The same bytes mapped in this process, where the image keeps them allocated and mapped
    /// already (omd's reserve): the stream receives straight into them, one copy and no page
    /// allocation, instead of through its buffer and `pwrite`.
    pub mapped: Option<Landing<'a>>,
}

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
pub trait ImageSink: Send + Sync + 'static {
    /// The receiver's id for this image (reported to the sender in `Begun` and `Committed`).
    fn id(&self) -> u64;

    /// Where the bytes of `run` (source addresses) land, as one or more zones of the image's memory in
    /// run order ([`Landing`] borrows the image, which keeps them mapped). Charges the image's memory
    /// limit for pages that were not present before.
    ///
    /// # Errors
    /// A run outside the image's VMAs, or a limit.
    fn landing(&self, run: &Range<u64>) -> Result<Vec<Landing<'_>>, Refusal>;

    /// True when the image's memory is a file that [`ImageSink::file_landing`] hands out.
    fn lands_in_file(&self) -> bool {
        false
    }

    /// Where the bytes of `run` land in the image's file, in run order, counted and charged as
    /// [`ImageSink::landing`] does. A TCP stream reads its pages into a warm buffer, checks them
    /// there and writes them with `pwrite`: no page of the image is mapped on the way, and on a
    /// machine whose page faults are slow, populating fresh mapped memory cost more than the copy
    /// itself (docs/transport.md).
    ///
    /// # Errors
    /// As [`ImageSink::landing`]; the default refuses (no file, see [`ImageSink::lands_in_file`]).
    fn file_landing(&self, run: &Range<u64>) -> Result<Vec<FilePiece<'_>>, Refusal> {
        let _ = run;
        Err((ErrorCode::Internal, "this image has no file to land in".into()))
    }

    /// Marks `run` as zero (freed or zero-filled), releasing its memory.
    ///
    /// # Errors
    /// A run outside the image's VMAs.
    fn zero(&self, run: &Range<u64>) -> Result<(), Refusal>;

    /// Replaces the VMA table (a `Vmas` message between rounds): pages outside the new table are
    /// dropped and their memory released.
    ///
    /// # Errors
    /// A table the image cannot hold.
    fn relayout(&self, begin: &Begin) -> Result<(), Refusal> {
        let _ = begin;
        Err((
            ErrorCode::Protocol,
            "this receiver cannot change an image's VMA table".into(),
        ))
    }

    /// The pages of `runs` landed and matched `sums` (one per page, in run order), except those
    /// listed in `suspects` (indices). A receiver that hands the image on keeps the sums.
    fn landed(&self, runs: &[Range<u64>], sums: &[u32], suspects: &[usize]) {
        let _ = (runs, sums, suspects);
    }

    /// The image's memory is being exported, and a fabric may pin it (verbs registrations keep
    /// the pages they pinned): from now on zero and dropped pages are overwritten with zeros, never
    /// released, so that later remote writes land in the memory the image reads.
    fn pin(&self) {}

    /// The image's whole memory and where address ranges land in it, for a placing transport;
    /// `None` when this image cannot be exported.
    fn placed(&self) -> Option<(Landing<'_>, Vec<Extent>)> {
        None
    }

    /// Starts the prepared copy of the committed migration with commit token `token`; returns its
    /// pid on this node.
    ///
    /// # Errors
    /// Not a migration, or the copy could not be started (or its home refused it).
    fn go(&self, _token: u64) -> Result<u32, Refusal> {
        Err((
            ErrorCode::Session,
            "this receiver does not restore migrations".into(),
        ))
    }

    /// Keeps a record for the restorer.
    ///
    /// # Errors
    /// A limit.
    fn record(&self, record: Record) -> Result<(), Refusal>;

    /// Checks landed pages against their checksums; returns the indices of the pages that differ.
    /// `zones` hold `sums.len()` pages of `page_size` bytes, in order. The default checks one page after
    /// the other; a receiver with cores to spare checks in parallel.
    fn verify(&self, zones: &[Landing<'_>], sums: &[u32], page_size: usize) -> Vec<usize> {
        let pages = zones.iter().flat_map(|z| {
            (0..z.len())
                .step_by(page_size)
                .map(move |off| z.page_sum(off, page_size))
        });
        pages
            .enumerate()
            .filter(|(i, s)| s.is_none() || sums.get(*i) != s.as_ref())
            .map(|(i, _)| i)
            .collect()
    }

    /// Memory the image holds now, in bytes.
    fn bytes(&self) -> u64;

    /// The image is complete: keep it (or hand it to the restorer). Returns its id.
    ///
    /// # Errors
    /// When the image cannot be kept.
    fn commit(self: std::sync::Arc<Self>) -> Result<u64, Refusal>;
}
