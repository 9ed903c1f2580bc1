//! om's wire protocol, version 3.
//!
//! # Connections and sessions
//!
//! A sender (the runtime inside a migrating process, or omctl) opens one **control** connection to the
//! receiving omd and, when it wants parallel streams, N **data** connections that join the session the
//! control connection opened. Every connection is authenticated on its own with the cluster key before
//! any other frame is accepted.
//!
//! ```text
//!  sender                                            receiver (omd)
//!    |--- Hello{versions, caps, page size, nonce_c} --->|  unauthenticated; 1 KiB cap
//!    |<-- Welcome{version, caps∩, session, nonce_s} ----|  or Refused{code, reason}
//!    |--- Proof{HMAC(K, "client" | transcript)} ------->|  receiver checks; on failure Refused
//!    |<-- Proof{HMAC(K, "server" | transcript)} --------|  sender checks: the receiver holds K too
//!    |      from here on every frame carries seq and HMAC(K_dir, header | body)                 |
//!    |--- Begin{pid, uid, gid, VMA table} ------------->|  receiver checks limits, makes the image
//!    |<-- Begun{image id} ------------------------------|  or Error{LIMIT, reason}
//!    |=== data streams: Hello{Data, session} ... Proof ==|  (same handshake, joins the session)
//!    |--- Batch{round r, runs, sums} + pages ---------->|  on any stream; lands in the image
//!    |--- Zero{round r, runs} ------------------------->|  pages that are zero now
//!    |--- EndRound{r, batches, pages, last} ----------->|  control stream
//!    |<-- RoundAck{r, pages, suspects} -----------------|  after every batch of r is verified
//!    |--- Vmas{VMA table} ----------------------------->|  between rounds, when the map changed
//!    |<-- Relaid ---------------------------------------|  in effect: the next round may use it
//!    |        ... rounds r+1, r+2, ...; the final one has last = 1 ...                         |
//!    |--- Record{kind, bytes} ------------------------->|  threads, fds, process state
//!    |--- Commit{token} ------------------------------>|  token: 64 random bits, names the copy
//!    |<-- Committed{image id} --------------------------|  the image is complete and kept
//!    |      a migration (Begin flag MIGRATE) goes on: Committed means *prepared*, the copy is   |
//!    |      restored on the receiver and held before its first instruction                     |
//!    |--- Go ------------------------------------------>|  the source is stopped for good
//!    |<-- Running{pid} ---------------------------------|  the copy runs
//! ```
//!
//! The two-phase commit of a migration: the source stays frozen from its final round until
//! `Running`, and exits only then. Any failure before `Go` (an error, a timeout, the connection
//! closing) discards the prepared copy and the source continues. `Go` is the point of no return:
//! once the source sends it, the source does not resume unless the receiver says the copy did not
//! run. When `Running` does not arrive (the connection failed after `Go` went out, or while it
//! did), the source asks on a new connection, by the commit token:
//!
//! ```text
//!    |--- Hello ... Proof (a control connection) ------>|
//!    |--- Ask{token} ---------------------------------->|  starts the copy if it is still prepared
//!    |<-- Answer{Running(pid) | Discarded | Unknown} ---|
//! ```
//!
//! `Running`: the copy runs, the source ends as after `Running`. `Discarded` (its `Go` wait failed
//! first) or `Unknown` (the receiver restarted, and its prepared copies died with it): the source
//! continues. The receiver remembers the fate of its last [`MAX_FATES`] commits.
//!
//! # Receiver states (one session)
//!
//! ```text
//!   Handshake --auth ok--> Authenticated --Begin ok--> Open(round 0)
//!   Open(r) --Batch/Zero of round r--> Open(r)
//!   Open(r) --EndRound r, all batches verified--> Open(r+1)     (RoundAck sent)
//!   Open(r) --EndRound r, last--> Sealed                         (RoundAck sent)
//!   Open(r) --Vmas--> Open(r)                  (pages outside the new table dropped; Relaid sent)
//!   Sealed --Record--> Sealed;  Sealed --Commit--> Committed     (image handed over)
//!   Committed (MIGRATE) --Go--> Running                          (the copy starts)
//!   Authenticated --Ask--> (Answer sent, connection ends)
//!   any state --Abort / error / disconnect / timeout--> Discarded (all memory freed)
//! ```
//!
//! A round is durable only when its `RoundAck` arrives: the receiver sends it after every batch the
//! `EndRound` announced has landed and been checked. The sender starts round r+1 only after the ack of
//! round r, so a page sent in two rounds always lands in round order even over parallel streams.
//!
//! # Integrity
//!
//! Frame headers and bodies (run tables, checksums, records) are authenticated with HMAC-SHA256 under a
//! per-connection, per-direction key derived from both nonces, with a sequence number: a forged,
//! corrupted, reordered or replayed frame is rejected. The raw pages after a `Batch` are covered by one
//! CRC-based checksum per page inside the authenticated body ([`crate::sys::checksum`]). Pre-copy sends
//! pages while the application writes them, so a mismatch in a non-final round is reported back as a
//! *suspect*; the sender accepts it only if the page is sent again in a later round (the application
//! wrote it), and otherwise fails the migration as corrupted in transit. In the final round (the
//! application is stopped) any mismatch fails at once.
//!
//! # Limits
//!
//! Every count and length is checked against a cap before anything is allocated: see the `MAX_*`
//! constants. Unknown kinds, set reserved bits and trailing bytes are errors.

pub mod frame;
pub mod msg;

pub use frame::{FrameHeader, Kind, TAG_LEN};
pub use msg::{
    Batch, Begin, EndRound, Extent, Fate, Hello, ImageInfo, Placement, Record, Role, RoundAck, RunEntry,
    Text, Vma, Zero,
};

/// The protocol version this build speaks. 2: every `Vmas` is answered with `Relaid` (a peer of
/// version 1 would not wait for it, or not send it). 3: `Commit` carries the copy's token, and
/// `Ask`/`Answer` confirm a `Go` whose `Running` was lost. 4: relays carry `Terminal` and `Resize`,
/// and `Attach` the node's omd address. 5: the home decides whether a migration's copy may start
/// (`Claim`/`Claimed`).
/// The handshake refuses a mix.
pub const VERSION: u16 = 5;

/// Commits whose fate a receiver remembers for `Ask`.
pub const MAX_FATES: usize = 1024;

/// Capability bits negotiated in the handshake.
pub mod caps {
    /// Pages over TCP byte streams.
    pub const TCP: u32 = 1 << 0;
    /// Pages by RDMA WRITE into registered image memory (issue #7).
    pub const VERBS: u32 = 1 << 1;
    /// Pages by PIO/DMA into a SISCI segment (issue #8).
    pub const SCI: u32 = 1 << 2;
    /// Per-page four-lane CRC-32C checksums (always used in version 1).
    pub const PAGE_CRC32C: u32 = 1 << 8;
    /// Everything this build implements (a sender offers SCI or verbs only when it has the library
    /// and a device, a receiver grants it only when it can export its image memory).
    pub const SUPPORTED: u32 = TCP | VERBS | SCI | PAGE_CRC32C;
    /// What a version-1 peer must offer.
    pub const REQUIRED: u32 = TCP | PAGE_CRC32C;

    /// The name of a transport bit.
    #[must_use]
    pub fn name(bit: u32) -> &'static str {
        match bit {
            TCP => "TCP",
            VERBS => "verbs",
            SCI => "SCI",
            _ => "unknown",
        }
    }
}

/// Highest user-space address (exclusive) accepted anywhere: 57-bit (five-level paging) user space.
pub const MAX_USER_ADDR: u64 = 1 << 56;
/// VMAs in one image (Linux's default `vm.max_map_count` is 65530).
pub const MAX_VMAS: usize = 1 << 17;
/// Bytes of one VMA name (`PATH_MAX`).
pub const MAX_NAME: usize = 4096;
/// Bytes of all VMA names together.
pub const MAX_NAMES: usize = 8 << 20;
/// Largest `Begin` body.
pub const MAX_BEGIN_BODY: usize = 32 + MAX_VMAS * 40 + MAX_NAMES;
/// Pages in one batch.
pub const MAX_BATCH_PAGES: usize = 16384;
/// Runs in one batch (one iovec each, plus the header and body, within `IOV_MAX`).
pub const MAX_BATCH_RUNS: usize = 1022;
/// Largest `Batch` body.
pub const MAX_BATCH_BODY: usize = 24 + MAX_BATCH_RUNS * 16 + MAX_BATCH_PAGES * 4;
/// Runs in one `Zero` frame.
pub const MAX_ZERO_RUNS: usize = 1 << 16;
/// Largest `Zero` body.
pub const MAX_ZERO_BODY: usize = 24 + MAX_ZERO_RUNS * 16;
/// Suspect runs in one ack; more mismatches than this fail the round.
pub const MAX_ACK_RUNS: usize = 4096;
/// Largest `RoundAck` body.
pub const MAX_ACK_BODY: usize = 24 + MAX_ACK_RUNS * 16;
/// Largest `Record` body.
pub const MAX_RECORD_BODY: usize = 16 << 20;
/// Windows of one placement (segments a placing transport exports per image).
pub const MAX_WINDOWS: usize = 4096;
/// Extents of one placement.
pub const MAX_EXTENTS: usize = 1 << 18;
/// Largest `Placement` body.
pub const MAX_PLACEMENT_BODY: usize = 32 + MAX_WINDOWS * 4 + MAX_EXTENTS * 24 + MAX_ENDPOINT;
/// Bytes of a placing transport's endpoint (a queue pair's address).
pub const MAX_ENDPOINT: usize = 256;
/// Bytes of text in `Error`, `Refused` and `Abort`.
pub const MAX_TEXT: usize = 1024;

/// Why the peer's bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame does not start with the protocol's magic.
    #[error("not an om frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// A length or count above its cap.
    #[error("{what} of {len} exceeds the limit of {max}")]
    Oversized {
        /// What was too large.
        what: &'static str,
        /// Its size.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// A body shorter than its fixed part.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field with a value the protocol does not allow.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The authentication tag does not match: forged or corrupted.
    #[error("frame {seq} failed authentication (forged or corrupted)")]
    BadTag {
        /// The frame's sequence number.
        seq: u64,
    },
    /// A frame out of sequence: replayed, dropped or reordered.
    #[error("frame out of sequence: expected {expected}, got {got} (replayed or reordered)")]
    BadSeq {
        /// The expected number.
        expected: u64,
        /// The number received.
        got: u64,
    },
    /// A kind that is valid but not in this state.
    #[error("unexpected {got:?} frame {state}")]
    Unexpected {
        /// The kind received.
        got: Kind,
        /// Where the protocol was.
        state: &'static str,
    },
}

/// Codes carried by `Error` and `Refused` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Malformed or unexpected frame.
    Protocol = 1,
    /// The peer did not prove the cluster key.
    Auth = 2,
    /// No common protocol version.
    Version = 3,
    /// Page size or required capabilities differ.
    Capability = 4,
    /// A memory or size limit would be exceeded.
    Limit = 5,
    /// Pages failed their checksum.
    Checksum = 6,
    /// The session or image is unknown or in the wrong state.
    Session = 7,
    /// The receiver failed internally (out of memory, I/O).
    Internal = 8,
    /// The sender gave up.
    Aborted = 9,
    /// The peer was idle too long.
    Timeout = 10,
}

impl ErrorCode {
    /// The code for a received value; unknown values read as `Protocol`.
    #[must_use]
    pub fn from_u32(v: u32) -> Self {
        match v {
            2 => Self::Auth,
            3 => Self::Version,
            4 => Self::Capability,
            5 => Self::Limit,
            6 => Self::Checksum,
            7 => Self::Session,
            8 => Self::Internal,
            9 => Self::Aborted,
            10 => Self::Timeout,
            _ => Self::Protocol,
        }
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = 4096;

    fn runs() -> impl Strategy<Value = Vec<std::ops::Range<u64>>> {
        proptest::collection::vec((0u64..1000, 1u64..50), 1..40).prop_map(|v| {
            let mut at = 0x1000_0000u64;
            v.into_iter()
                .map(|(gap, n)| {
                    let s = at + gap * P;
                    at = s + n * P;
                    s..at
                })
                .collect()
        })
    }

    #[test]
    fn placement_rejects_extents_outside_its_windows_and_overlaps() {
        let p = |extents: Vec<Extent>| Placement {
            node: 4,
            mailbox: 1,
            doorbell: 2,
            window_shift: 20,
            windows: vec![7],
            extents,
            endpoint: Vec::new(),
        };
        let ok = p(vec![Extent {
            start: 0x1000,
            end: 0x3000,
            offset: 0,
        }]);
        assert!(Placement::decode(&ok.encode(), P).is_ok());
        let outside = p(vec![Extent {
            start: 0x1000,
            end: 0x3000,
            offset: (1 << 20) - P,
        }]);
        assert!(Placement::decode(&outside.encode(), P).is_err());
        let overlap = p(vec![
            Extent {
                start: 0x1000,
                end: 0x3000,
                offset: 0,
            },
            Extent {
                start: 0x2000,
                end: 0x4000,
                offset: 0x8000,
            },
        ]);
        assert!(Placement::decode(&overlap.encode(), P).is_err());
        let shared = p(vec![
            Extent {
                start: 0x1000,
                end: 0x3000,
                offset: 0,
            },
            Extent {
                start: 0x8000,
                end: 0x9000,
                offset: 0x1000,
            },
        ]);
        assert!(
            Placement::decode(&shared.encode(), P).is_err(),
            "two extents on one image page"
        );
        let unaligned = p(vec![Extent {
            start: 0x1001,
            end: 0x3000,
            offset: 0,
        }]);
        assert!(Placement::decode(&unaligned.encode(), P).is_err());
        let mut huge = ok.encode();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Placement::decode(&huge, P),
            Err(WireError::Oversized { .. })
        ));
    }

    #[test]
    fn invalid_utf8_text_is_capped_after_replacement() {
        // Found by the `text` fuzz target: each bad byte becomes a 3-byte U+FFFD.
        let mut body = 7u32.to_le_bytes().to_vec();
        body.extend(std::iter::repeat_n(0xffu8, MAX_TEXT));
        let t = Text::decode(&body).unwrap();
        assert!(t.text.len() <= MAX_TEXT);
        assert_eq!(Text::decode(&Text::encode(t.code, &t.text)).unwrap(), t);
    }

    #[test]
    fn a_fate_round_trips_and_a_pid_must_match_its_state() {
        for f in [Fate::Unknown, Fate::Running(4242), Fate::Discarded] {
            assert_eq!(Fate::decode(&f.encode()), Ok(f));
        }
        let body = |state: u32, pid: u32| {
            let mut b = state.to_le_bytes().to_vec();
            b.extend_from_slice(&pid.to_le_bytes());
            b
        };
        for (state, pid) in [(1, 0), (0, 7), (2, 7), (3, 0)] {
            assert!(matches!(
                Fate::decode(&body(state, pid)),
                Err(WireError::Invalid(_))
            ));
        }
        assert!(matches!(
            Fate::decode(&body(1, 5)[..7]),
            Err(WireError::Truncated(_))
        ));
        assert!(matches!(Fate::decode(&[0; 9]), Err(WireError::Truncated(_))));
    }

    proptest! {
        /// Every decoder takes arbitrary bytes without panicking (the in-CI stand-in for fuzzing).
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut h = [0u8; 40];
            let n = bytes.len().min(40);
            h[..n].copy_from_slice(&bytes[..n]);
            let _ = FrameHeader::decode(&h);
            let _ = Hello::decode(&bytes);
            let _ = Begin::decode(&bytes, P);
            let _ = Batch::decode(&bytes, P);
            let _ = Zero::decode(&bytes, P);
            let _ = EndRound::decode(&bytes);
            let _ = RoundAck::decode(&bytes, P);
            let _ = Text::decode(&bytes);
            let _ = Record::decode(&bytes);
            let _ = Placement::decode(&bytes, P);
            let _ = Fate::decode(&bytes);
        }

        /// A placement round-trips, and its pieces put every page of a run exactly where a
        /// page-by-page oracle (find the extent, add the offset, split by window) puts it.
        #[test]
        fn placement_pieces_match_a_page_oracle(
            lens in proptest::collection::vec((1u64..40, 0u64..6), 1..12),
            shift in 20u32..23,
            run in (0u64..400, 1u64..300),
        ) {
            let mut extents = Vec::new();
            let (mut addr, mut off) = (0x10_0000u64, 0u64);
            for (pages, gap) in lens {
                extents.push(Extent { start: addr, end: addr + pages * P, offset: off });
                addr += (pages + gap) * P;
                off += pages * P + gap * 7 * P;
            }
            let windows = u32::try_from(off.div_ceil(1 << shift)).unwrap().max(1);
            let p = Placement { node: 8, mailbox: 3, doorbell: 1, window_shift: shift,
                windows: (100..100 + windows).collect(), extents, endpoint: vec![7; usize::try_from(run.0 % 64).unwrap()] };
            prop_assert_eq!(&Placement::decode(&p.encode(), P).unwrap(), &p);
            let r = 0x10_0000 + run.0 * P..0x10_0000 + (run.0 + run.1) * P;
            let oracle: Option<Vec<(usize, u64)>> = (r.start..r.end).step_by(usize::try_from(P).unwrap()).map(|a| {
                let e = p.extents.iter().find(|e| e.start <= a && a < e.end)?;
                let o = e.offset + (a - e.start);
                Some((usize::try_from(o >> shift).unwrap(), o % (1 << shift)))
            }).collect();
            let got = p.pieces(&r).map(|v| v.into_iter().flat_map(|(w, o, n)| {
                (0..n / P).map(move |k| (w, o + k * P))
            }).collect::<Vec<_>>());
            prop_assert_eq!(got, oracle);
        }

        #[test]
        fn batch_round_trips_and_rejects_any_truncation(r in runs(), cut in 1usize..64) {
            let pages: u64 = r.iter().map(|x| (x.end - x.start) / P).sum();
            let sums: Vec<u32> = (0..u32::try_from(pages).unwrap()).collect();
            let body = Batch::encode(3, &r, &sums, P);
            let b = Batch::decode(&body, P).unwrap();
            prop_assert_eq!(&b.runs, &r);
            prop_assert_eq!(b.sums, sums);
            prop_assert!(Batch::decode(&body[..body.len() - cut.min(body.len())], P).is_err());
        }

        #[test]
        fn begin_round_trips(names in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..20)) {
            let vmas: Vec<Vma> = names.into_iter().enumerate().map(|(i, name)| {
                let start = 0x40_0000 + (i as u64) * 16 * P;
                Vma { start, end: start + 8 * P, pgoff: i as u64 * P, prot: 5, flags: 1, name }
            }).collect();
            let b = Begin { info: ImageInfo { pid: 9, uid: 1, gid: 2, flags: 0, populated_bytes: 77 }, vmas };
            prop_assert_eq!(Begin::decode(&b.encode().unwrap(), P).unwrap(), b);
        }

        #[test]
        fn zero_and_ack_round_trip(r in runs()) {
            let z = Zero::decode(&Zero::encode(5, &r, P), P).unwrap();
            prop_assert_eq!(z, Zero { round: 5, runs: r.clone() });
            let a = RoundAck { round: 2, pages: 10, image_bytes: 40960, suspects: r };
            prop_assert_eq!(RoundAck::decode(&a.encode(P), P).unwrap(), a);
        }
    }

    #[test]
    fn rejects_overlapping_unaligned_and_oversized_runs() {
        let ok = Zero::encode(0, &[0x1000..0x3000, 0x5000..0x6000], P);
        assert!(Zero::decode(&ok, P).is_ok());
        let overlap = Zero::encode(0, &[0x1000..0x3000, 0x2000..0x4000], P);
        assert!(
            Zero::decode(&overlap, P)
                .unwrap_err()
                .to_string()
                .contains("overlaps")
        );
        let mut unaligned = ok.clone();
        unaligned[24] = 0x10; // low byte of the first run's address
        assert!(Zero::decode(&unaligned, P).is_err());
        let high = Zero::encode(0, &[MAX_USER_ADDR - P..MAX_USER_ADDR + P], P);
        assert!(
            Zero::decode(&high, P)
                .unwrap_err()
                .to_string()
                .contains("user space")
        );
        let mut h = FrameHeader::new(Kind::Batch, 0, 0);
        h.len = zerocopy::byteorder::little_endian::U32::new(u32::try_from(MAX_BATCH_BODY + 1).unwrap());
        let bytes: [u8; 40] = zerocopy::IntoBytes::as_bytes(&h).try_into().unwrap();
        assert!(matches!(
            FrameHeader::decode(&bytes),
            Err(WireError::Oversized { .. })
        ));
        let mut zero_kind = bytes;
        zero_kind[4] = 0;
        zero_kind[5] = 0;
        assert_eq!(
            FrameHeader::decode(&zero_kind).unwrap_err(),
            WireError::UnknownKind(0)
        );
    }
}
