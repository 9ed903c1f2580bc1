//! The frame header and the message kinds.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::WireError;

/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"OMF1";
/// Length of the authentication tag carried in every frame header.
pub const TAG_LEN: usize = 16;

/// The fixed 40-byte header in front of every frame body.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    /// [`FRAME_MAGIC`].
    pub magic: [u8; 4],
    /// A [`Kind`].
    pub kind: U16,
    /// Must be zero in version 1.
    pub flags: U16,
    /// Body length in bytes (the raw pages after a `Batch` are not part of the body).
    pub len: U32,
    /// Must be zero in version 1.
    pub reserved: U32,
    /// Frame number in this direction of this connection, from 0; handshake frames carry 0.
    pub seq: U64,
    /// HMAC-SHA256 (truncated) over the header with a zero tag and the body; zero during the
    /// handshake.
    pub tag: [u8; TAG_LEN],
}

const _: () = assert!(size_of::<FrameHeader>() == 40);

/// Message kinds. Zero is invalid so that a zeroed header is never a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// Client's opening: versions, capabilities, nonce (handshake).
    Hello = 1,
    /// Server's answer: chosen version and capabilities, nonce (handshake).
    Welcome = 2,
    /// Proof of the cluster key over the handshake transcript (handshake).
    Proof = 3,
    /// The handshake was refused; a code and a reason follow (handshake).
    Refused = 4,
    /// Opens an image: process identity and the VMA table.
    Begin = 16,
    /// The receiver accepted the image.
    Begun = 17,
    /// A batch of page runs with per-page checksums; the raw pages follow the body.
    Batch = 18,
    /// Runs whose pages are now zero or gone.
    Zero = 19,
    /// All batches of a round are sent.
    EndRound = 20,
    /// The round is durable on the receiver.
    RoundAck = 21,
    /// An opaque record (threads, file descriptors, process state) for the restorer.
    Record = 22,
    /// The image is complete: keep or restore it.
    Commit = 23,
    /// The receiver holds the committed image.
    Committed = 24,
    /// The sender gives up; the receiver discards everything.
    Abort = 25,
    /// A failure, with a code and a reason; the connection closes after it.
    Error = 26,
    /// A new VMA table between rounds (the process mapped or unmapped memory); same body as `Begin`.
    Vmas = 27,
    /// Migration: the source is stopped for good; start the prepared copy.
    Go = 28,
    /// Migration: the copy runs; its pid on the receiving node follows.
    Running = 29,
    /// A placing transport (SCI): where the image's memory is exported and where each address range
    /// lands in it; sent by the receiver after `Begun` and after every `Vmas`.
    Placement = 30,
    /// A placing transport that connects both ways (verbs): the sender's endpoint, sent after the
    /// first `Placement`; the receiver connects to it and answers `Connected`.
    Connect = 31,
    /// Relay: opens the relay of one generation (hop) of a process; the address of the omd of the
    /// node it runs on follows, as text.
    Attach = 32,
    /// Relay: bytes the process wrote to its stdout (1) or stderr (2).
    Output = 33,
    /// Relay: bytes for the process's stdin.
    Input = 34,
    /// Relay: the home's stdin ended.
    InputEnd = 35,
    /// Relay: a signal for the process.
    Signal = 36,
    /// Relay: the process ended; its wait status follows.
    Exit = 37,
    /// Relay: the process moved on; the stdin bytes it had not read follow.
    Moved = 38,
    /// Relay: the copy stopped; no more input.
    Stop = 39,
    /// The receiver connected to the sender's endpoint: pages may move.
    Connected = 40,
    /// The new VMA table of a `Vmas` is in effect: pages of the next round may go to its new
    /// ranges (they travel on other streams, which must not overtake it).
    Relaid = 41,
    /// Migration, on a connection of its own: what became of the prepared copy of this commit
    /// token? Starts it if it is still prepared (the source has passed its point of no return).
    Ask = 42,
    /// The answer to `Ask`: a [`super::Fate`].
    Answer = 43,
    /// Relay: the copy's stdio is a pseudo-terminal on its node (a mask of the descriptors 0-2 on
    /// it follows); home puts its own terminal in raw mode, the copy's terminal does the line
    /// editing and echo.
    Terminal = 44,
    /// Relay: the home terminal's new window size, for the copy's pseudo-terminal.
    Resize = 45,
    /// Relay, first on a connection: decide the fate of the migration with this commit token, as
    /// the destination about to start its copy (start) or as a source that could not learn whether
    /// the copy started (cancel). The home decides once; the first claim wins.
    Claim = 46,
    /// Relay: the home's decision for a token: the copy starts (or started), or it never may.
    Claimed = 47,
}

impl Kind {
    /// Largest body accepted for this kind.
    #[must_use]
    pub const fn max_body(self) -> usize {
        match self {
            Self::Hello | Self::Welcome | Self::Proof | Self::Refused => 1024,
            Self::Begin | Self::Vmas => super::MAX_BEGIN_BODY,
            Self::Begun
            | Self::EndRound
            | Self::Commit
            | Self::Committed
            | Self::Go
            | Self::Running
            | Self::Relaid
            | Self::Ask
            | Self::Answer => 256,
            Self::Connect | Self::Connected => super::MAX_ENDPOINT,
            Self::Batch => super::MAX_BATCH_BODY,
            Self::Placement => super::MAX_PLACEMENT_BODY,
            Self::Zero => super::MAX_ZERO_BODY,
            Self::RoundAck => super::MAX_ACK_BODY,
            Self::Record => super::MAX_RECORD_BODY,
            Self::Abort | Self::Error => super::MAX_TEXT + 8,
            Self::Attach => 128,
            Self::InputEnd
            | Self::Signal
            | Self::Exit
            | Self::Stop
            | Self::Terminal
            | Self::Resize
            | Self::Claim
            | Self::Claimed => 64,
            Self::Output | Self::Input => crate::relay::MAX_CHUNK + 8,
            Self::Moved => crate::relay::MAX_LEFTOVER + 8,
        }
    }

    /// True for the kinds that may appear before authentication completes.
    #[must_use]
    pub const fn is_handshake(self) -> bool {
        matches!(self, Self::Hello | Self::Welcome | Self::Proof | Self::Refused)
    }
}

impl TryFrom<u16> for Kind {
    type Error = WireError;
    fn try_from(v: u16) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Proof,
            4 => Self::Refused,
            16 => Self::Begin,
            17 => Self::Begun,
            18 => Self::Batch,
            19 => Self::Zero,
            20 => Self::EndRound,
            21 => Self::RoundAck,
            22 => Self::Record,
            23 => Self::Commit,
            27 => Self::Vmas,
            31 => Self::Connect,
            40 => Self::Connected,
            41 => Self::Relaid,
            42 => Self::Ask,
            43 => Self::Answer,
            44 => Self::Terminal,
            45 => Self::Resize,
            46 => Self::Claim,
            47 => Self::Claimed,
            28 => Self::Go,
            29 => Self::Running,
            30 => Self::Placement,
            32 => Self::Attach,
            33 => Self::Output,
            34 => Self::Input,
            35 => Self::InputEnd,
            36 => Self::Signal,
            37 => Self::Exit,
            38 => Self::Moved,
            39 => Self::Stop,
            24 => Self::Committed,
            25 => Self::Abort,
            26 => Self::Error,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

impl FrameHeader {
    /// A header for `kind` with a body of `len` bytes; the tag is filled in by the sealer.
    #[must_use]
    pub fn new(kind: Kind, len: u32, seq: u64) -> Self {
        Self {
            magic: FRAME_MAGIC,
            kind: U16::new(kind as u16),
            flags: U16::new(0),
            len: U32::new(len),
            reserved: U32::new(0),
            seq: U64::new(seq),
            tag: [0; TAG_LEN],
        }
    }

    /// Decodes and checks a header: magic, known kind, zero flags and reserved, body within the kind's
    /// cap.
    ///
    /// # Errors
    /// The [`WireError`] that names what is wrong.
    pub fn decode(bytes: &[u8; 40]) -> Result<(Self, Kind), WireError> {
        let h = Self::read_from_bytes(bytes).map_err(|_| WireError::Truncated("frame header"))?;
        if h.magic != FRAME_MAGIC {
            return Err(WireError::BadMagic(h.magic));
        }
        let kind = Kind::try_from(h.kind.get())?;
        if h.flags.get() != 0 || h.reserved.get() != 0 {
            return Err(WireError::Invalid(format!(
                "{kind:?} frame has reserved bits set"
            )));
        }
        let len = h.len.get() as usize;
        if len > kind.max_body() {
            return Err(WireError::Oversized {
                what: "frame body",
                len: len as u64,
                max: kind.max_body() as u64,
            });
        }
        Ok((h, kind))
    }
}
