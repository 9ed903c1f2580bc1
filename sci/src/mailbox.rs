//! The mailbox: a small segment the receiver exports, through which the sender hands over one batch
//! descriptor (a `Batch` body: runs and checksums) per batch whose pages it has placed, with flow
//! control.
//!
//! ```text
//! offset 0      head: descriptors posted (written by the sender)
//! offset 8      tail: descriptors taken  (written by the receiver)
//! offset 16     magic "OMSCIMB1"
//! offset 4096   SLOTS slots of SLOT_BYTES: length (u32), 4 bytes reserved, the descriptor
//! ```
//!
//! The sender waits while `head - tail == SLOTS`, writes slot `head % SLOTS`, issues a store
//! barrier, publishes `head + 1` and rings the doorbell interrupt. The receiver copies a slot out
//! before it decodes it (the sender could still write it) and then publishes `tail + 1`. Interrupts
//! count, so a doorbell rung between the receiver's check and its wait is not lost.

use om_transport::wire::MAX_BATCH_BODY;

use crate::error::SciError;
use crate::sys::View;

/// Descriptors in flight at most.
pub const SLOTS: u64 = 8;
const SLOTS_USIZE: usize = 8;
const _: () = assert!(SLOTS_USIZE as u64 == SLOTS);
/// Bytes of one slot: the length word and the largest descriptor, page-rounded.
pub const SLOT_BYTES: usize = (8 + MAX_BATCH_BODY).div_ceil(4096) * 4096;
/// Bytes of the mailbox segment.
pub const BYTES: usize = 4096 + SLOTS_USIZE * SLOT_BYTES;
const HEAD: usize = 0;
const TAIL: usize = 8;
const MAGIC_AT: usize = 16;
/// Written by the receiver when it creates the mailbox.
pub const MAGIC: u64 = u64::from_le_bytes(*b"OMSCIMB1");

const _: () = assert!(SLOT_BYTES >= 8 + MAX_BATCH_BODY && SLOT_BYTES % 4096 == 0);

fn slot(n: u64) -> usize {
    4096 + usize::try_from(n % SLOTS).unwrap_or(0) * SLOT_BYTES
}

/// Marks a fresh mailbox as initialized.
pub fn init(view: &View<'_>) {
    view.store(HEAD, 0);
    view.store(TAIL, 0);
    view.store(MAGIC_AT, MAGIC);
}

/// The tail the receiver writes when it gives the session up.
pub const ABANDONED: u64 = u64::MAX;

/// Marks the mailbox abandoned by the receiver.
pub fn abandon(view: &View<'_>) {
    view.store(TAIL, ABANDONED);
}

/// The sender's side: whether descriptor `head` fits.
///
/// # Errors
/// The receiver abandoned the session, or took more descriptors than were posted.
pub fn has_room(view: &View<'_>, head: u64) -> Result<bool, SciError> {
    let tail = view.load(TAIL).unwrap_or(ABANDONED);
    if tail == ABANDONED {
        return Err(SciError::Mailbox("the receiver gave the session up".into()));
    }
    if tail > head {
        return Err(SciError::Mailbox(format!(
            "the receiver took {tail} of {head} descriptors"
        )));
    }
    Ok(head - tail < SLOTS)
}

/// Where descriptor `head` goes: the slot's offset and the length word.
#[must_use]
pub fn slot_of(head: u64, len: usize) -> (usize, [u8; 8]) {
    let mut word = [0u8; 8];
    word[..4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    (slot(head), word)
}

/// Publishes `head` (after a store barrier).
pub fn publish(view: &View<'_>, head: u64) {
    view.store(HEAD, head);
}

/// The receiver's side: takes descriptor `tail` if the sender posted it. Validates everything the
/// sender wrote.
///
/// # Errors
/// A mailbox the sender broke: a head behind the tail or too far ahead, a length over the cap.
pub fn take(view: &View<'_>, tail: u64) -> Result<Option<Vec<u8>>, SciError> {
    let head = view.load(HEAD).unwrap_or(0);
    if head == tail {
        return Ok(None);
    }
    if head < tail || head - tail > SLOTS {
        return Err(SciError::Mailbox(format!(
            "the sender posted {head} descriptors while {tail} were taken and {SLOTS} fit"
        )));
    }
    let at = slot(tail);
    let mut word = [0u8; 8];
    if !view.read(at, &mut word) {
        return Err(SciError::Mailbox("slot outside the mailbox".into()));
    }
    let len = slot_len(word)?;
    let mut body = vec![0u8; len];
    if !view.read(at + 8, &mut body) {
        return Err(SciError::Mailbox("descriptor outside the mailbox".into()));
    }
    view.store(TAIL, tail + 1);
    Ok(Some(body))
}

/// The descriptor length a slot's length word announces.
///
/// # Errors
/// A length over the cap, or reserved bytes set.
pub fn slot_len(word: [u8; 8]) -> Result<usize, SciError> {
    let len = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
    if len > MAX_BATCH_BODY || word[4..] != [0; 4] {
        return Err(SciError::Mailbox(format!(
            "a descriptor of {len} bytes (at most {MAX_BATCH_BODY}) or reserved bytes set"
        )));
    }
    Ok(len)
}

/// A slot's descriptor, from a copy of the slot's bytes (the fuzz target's entry point).
///
/// # Errors
/// As [`slot_len`], or a slot shorter than its length word says.
pub fn decode_slot(slot: &[u8]) -> Result<&[u8], SciError> {
    let word: [u8; 8] = slot
        .get(..8)
        .and_then(|w| w.try_into().ok())
        .ok_or_else(|| SciError::Mailbox("a slot shorter than its length word".into()))?;
    let len = slot_len(word)?;
    slot.get(8..8 + len)
        .ok_or_else(|| SciError::Mailbox(format!("a descriptor of {len} bytes past the slot's end")))
}

/// True when the mailbox was initialized by a receiver.
#[must_use]
pub fn is_initialized(view: &View<'_>) -> bool {
    view.load(MAGIC_AT) == Some(MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_bad_lengths_are_refused() {
        let (at, word) = slot_of(3, 100);
        assert_eq!(at, 4096 + 3 * SLOT_BYTES);
        let mut slot = word.to_vec();
        slot.extend(std::iter::repeat_n(7u8, 100));
        assert_eq!(decode_slot(&slot).unwrap(), &[7u8; 100][..]);
        assert!(decode_slot(&slot[..50]).is_err(), "truncated");
        let mut big = slot.clone();
        big[..4].copy_from_slice(&u32::try_from(MAX_BATCH_BODY + 1).unwrap().to_le_bytes());
        assert!(decode_slot(&big).is_err(), "over the cap");
        let mut reserved = slot;
        reserved[6] = 1;
        assert!(decode_slot(&reserved).is_err(), "reserved bytes");
    }
}
