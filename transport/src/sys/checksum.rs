//! The per-page checksum of the wire protocol: four interleaved CRC-32C lanes.
//!
//! A page is read as little-endian 64-bit words; word `i` feeds lane `i % 4`. Each lane is a CRC-32C
//! (Castagnoli, the polynomial of iSCSI and ext4) seeded with `!lane`, and the page's sum is
//! `!(l0 ^ l1.rotl(8) ^ l2.rotl(16) ^ l3.rotl(24))`. Four independent lanes keep four `crc32`
//! instructions in flight (one lane alone is bound by the instruction's 3-cycle latency), which makes the
//! sum about as fast as the memory can be read. Any error confined to one lane is caught by that lane's
//! CRC (every burst of up to 32 bits, every odd number of flipped bits); errors in several lanes escape
//! with probability about 2^-32.
//!
//! SSE4.2 is used when the CPU has it (checked once at run time); elsewhere a table-driven CRC gives the
//! same values. A property test holds the two to each other and to a bytewise reference.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

const POLY: u32 = 0x82f6_3b78;
const LANES: usize = 4;

static TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        #[allow(clippy::cast_possible_truncation)]
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C update over the 8 little-endian bytes of `word`, without pre- or post-inversion: the
/// semantics of the `crc32q` instruction.
fn crc_word_soft(mut crc: u32, word: u64) -> u32 {
    for b in word.to_le_bytes() {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn combine(lanes: [u32; LANES]) -> u32 {
    !(lanes[0] ^ lanes[1].rotate_left(8) ^ lanes[2].rotate_left(16) ^ lanes[3].rotate_left(24))
}

fn seeds() -> [u32; LANES] {
    [!0, !1, !2, !3]
}

fn sum_words_soft(words: &[AtomicU64]) -> u32 {
    let mut lanes = seeds();
    for quad in words.chunks(LANES) {
        for (lane, w) in lanes.iter_mut().zip(quad) {
            *lane = crc_word_soft(*lane, w.load(Ordering::Relaxed));
        }
    }
    combine(lanes)
}

/// The little-endian word at `bytes[8 * i..]` (the caller keeps `i` in range).
fn word_at(bytes: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
    u64::from_le_bytes(w)
}

fn copy_summed_soft(dst: &[AtomicU64], src: &[u8]) -> u32 {
    let mut lanes = seeds();
    for (i, d) in dst.iter().enumerate() {
        let w = word_at(src, i);
        lanes[i % LANES] = crc_word_soft(lanes[i % LANES], w);
        d.store(w, Ordering::Relaxed);
    }
    combine(lanes)
}

#[cfg(target_arch = "x86_64")]
mod hw {
    use super::{LANES, combine, seeds, word_at};
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// # Safety
    /// The CPU must support SSE4.2.
    #[target_feature(enable = "sse4.2")]
    // Rust >= 1.86 treats these intrinsic calls as safe inside a target_feature function; 1.85 does not.
    #[allow(unused_unsafe)]
    pub(super) unsafe fn sum_words(words: &[AtomicU64]) -> u32 {
        let [mut a, mut b, mut c, mut d] = seeds().map(u64::from);
        let mut quads = words.chunks_exact(LANES);
        for q in &mut quads {
            // SAFETY: the caller guarantees SSE4.2 (this function's contract).
            a = unsafe { _mm_crc32_u64(a, q[0].load(Ordering::Relaxed)) };
            // SAFETY: as above.
            b = unsafe { _mm_crc32_u64(b, q[1].load(Ordering::Relaxed)) };
            // SAFETY: as above.
            c = unsafe { _mm_crc32_u64(c, q[2].load(Ordering::Relaxed)) };
            // SAFETY: as above.
            d = unsafe { _mm_crc32_u64(d, q[3].load(Ordering::Relaxed)) };
        }
        let mut lanes = [a, b, c, d];
        for (lane, w) in lanes.iter_mut().zip(quads.remainder()) {
            // SAFETY: as above.
            *lane = unsafe { _mm_crc32_u64(*lane, w.load(Ordering::Relaxed)) };
        }
        // The instruction leaves the upper 32 bits zero.
        #[allow(clippy::cast_possible_truncation)]
        combine(lanes.map(|l| l as u32))
    }

    /// Stores the words of `src` into `dst` (as long) and returns their checksum: each word is loaded
    /// once, for both.
    ///
    /// # Safety
    /// The CPU must support SSE4.2.
    #[target_feature(enable = "sse4.2")]
    #[allow(unused_unsafe)]
    pub(super) unsafe fn copy_summed(dst: &[AtomicU64], src: &[u8]) -> u32 {
        let [mut a, mut b, mut c, mut d] = seeds().map(u64::from);
        let mut quads = dst.chunks_exact(LANES);
        let mut i = 0;
        for q in &mut quads {
            let w = [
                word_at(src, i),
                word_at(src, i + 1),
                word_at(src, i + 2),
                word_at(src, i + 3),
            ];
            // SAFETY: the caller guarantees SSE4.2 (this function's contract).
            a = unsafe { _mm_crc32_u64(a, w[0]) };
            // SAFETY: as above.
            b = unsafe { _mm_crc32_u64(b, w[1]) };
            // SAFETY: as above.
            c = unsafe { _mm_crc32_u64(c, w[2]) };
            // SAFETY: as above.
            d = unsafe { _mm_crc32_u64(d, w[3]) };
            for (slot, w) in q.iter().zip(w) {
                slot.store(w, Ordering::Relaxed);
            }
            i += LANES;
        }
        let mut lanes = [a, b, c, d];
        for (lane, slot) in lanes.iter_mut().zip(quads.remainder()) {
            let w = word_at(src, i);
            // SAFETY: as above.
            *lane = unsafe { _mm_crc32_u64(*lane, w) };
            slot.store(w, Ordering::Relaxed);
            i += 1;
        }
        // The instruction leaves the upper 32 bits zero.
        #[allow(clippy::cast_possible_truncation)]
        combine(lanes.map(|l| l as u32))
    }

    /// The standard CRC-32C of `bytes`, eight bytes per instruction.
    ///
    /// # Safety
    /// The CPU must support SSE4.2.
    #[target_feature(enable = "sse4.2")]
    #[allow(unused_unsafe)]
    pub(super) unsafe fn crc32c(bytes: &[u8]) -> u32 {
        let mut words = bytes.chunks_exact(8);
        let mut crc = u64::from(!0u32);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            // SAFETY: the caller guarantees SSE4.2 (this function's contract).
            crc = unsafe { _mm_crc32_u64(crc, u64::from_le_bytes(b)) };
        }
        // The instruction leaves the upper 32 bits zero.
        #[allow(clippy::cast_possible_truncation)]
        let mut crc = crc as u32;
        for &b in words.remainder() {
            // SAFETY: as above.
            crc = unsafe { _mm_crc32_u8(crc, b) };
        }
        !crc
    }
}

fn have_sse42() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("sse4.2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

fn sum_words(words: &[AtomicU64]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if have_sse42() {
        // SAFETY: SSE4.2 was detected at run time.
        return unsafe { hw::sum_words(words) };
    }
    sum_words_soft(words)
}

/// The checksum of `len` bytes of memory at `addr`, read with relaxed atomic loads so that concurrent
/// writers (the application during a pre-copy round) make the value stale, never undefined.
///
/// # Safety
/// `addr` must be 8-byte aligned and `len` bytes from it must stay mapped and readable for the whole
/// call. `len` must be a multiple of 8.
#[must_use]
pub unsafe fn page_sum(addr: *const u8, len: usize) -> u32 {
    debug_assert_eq!(addr.align_offset(8), 0);
    debug_assert_eq!(len % 8, 0);
    // SAFETY: the caller guarantees `len` readable, aligned bytes at `addr` for the call; AtomicU64 has
    // the size and alignment of u64 and every bit pattern is valid, and atomic loads tolerate writers.
    let words = unsafe { std::slice::from_raw_parts(addr.cast::<AtomicU64>(), len / 8) };
    sum_words(words)
}

/// Copies the page `src` to `dst` and returns its checksum, loading each word once for both: a page
/// stored into a fabric's window from a buffer in cache costs one pass over the buffer, not two.
/// The stores are relaxed atomic ones, so that readers of the destination (a receiver checking an
/// earlier page) see stale values, never undefined ones.
///
/// # Safety
/// `dst` must be 8-byte aligned, writable for `src.len()` bytes for the whole call and not covered
/// by a Rust reference. `src.len()` must be a multiple of 8.
#[must_use]
pub unsafe fn copy_page_summed(dst: *mut u8, src: &[u8]) -> u32 {
    debug_assert_eq!(dst.align_offset(8), 0);
    debug_assert_eq!(src.len() % 8, 0);
    // SAFETY: the caller guarantees `src.len()` writable, aligned bytes at `dst` for the call that no
    // Rust reference covers; AtomicU64 has the size and alignment of u64.
    let words = unsafe { std::slice::from_raw_parts(dst.cast::<AtomicU64>().cast_const(), src.len() / 8) };
    #[cfg(target_arch = "x86_64")]
    if have_sse42() {
        // SAFETY: SSE4.2 was detected at run time.
        return unsafe { hw::copy_summed(words, src) };
    }
    copy_summed_soft(words, src)
}

/// The standard CRC-32C of `bytes` (file manifests and other metadata; a migration's manifest is
/// checked while the process is frozen, so the instruction is used where the CPU has it).
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if have_sse42() {
        // SAFETY: SSE4.2 was detected at run time.
        return unsafe { hw::crc32c(bytes) };
    }
    crc32c_soft(bytes)
}

fn crc32c_soft(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The checksum of a page held in an ordinary buffer (tests, checkpoint files).
///
/// # Panics
/// If `bytes.len()` is not a multiple of 8.
#[must_use]
pub fn page_sum_bytes(bytes: &[u8]) -> u32 {
    assert_eq!(bytes.len() % 8, 0, "pages are whole words");
    if bytes.as_ptr().align_offset(8) == 0 {
        // SAFETY: an aligned slice of whole words, readable for the call.
        return unsafe { page_sum(bytes.as_ptr(), bytes.len()) };
    }
    let mut lanes = seeds();
    for (i, w) in bytes.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        lanes[i % LANES] = crc_word_soft(lanes[i % LANES], word);
    }
    combine(lanes)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook bitwise CRC-32C, as the naive oracle for the table and the instruction.
    fn crc_bitwise(mut crc: u32, bytes: &[u8]) -> u32 {
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
            }
        }
        crc
    }

    fn oracle(bytes: &[u8]) -> u32 {
        let mut lanes = seeds();
        for (i, w) in bytes.chunks_exact(8).enumerate() {
            lanes[i % LANES] = crc_bitwise(lanes[i % LANES], w);
        }
        combine(lanes)
    }

    fn atomics(bytes: &[u8]) -> Vec<AtomicU64> {
        bytes
            .chunks_exact(8)
            .map(|w| AtomicU64::new(u64::from_le_bytes(w.try_into().unwrap())))
            .collect()
    }

    #[test]
    fn standard_crc32c_check_value() {
        // CRC-32C("123456789") = 0xe3069283 (RFC 3720, appendix B.4).
        assert_eq!(!crc_bitwise(!0, b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    proptest! {
        #[test]
        fn all_implementations_agree(words in proptest::collection::vec(any::<u64>(), 0..700)) {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let want = oracle(&bytes);
            let a = atomics(&bytes);
            prop_assert_eq!(page_sum_bytes(&bytes), want);
            // A misaligned copy takes the table path of `page_sum_bytes`.
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let misaligned = &shifted[1..];
            if !misaligned.is_empty() && shifted.as_ptr().align_offset(8) == 0 {
                prop_assert_ne!(misaligned.as_ptr().align_offset(8), 0);
            }
            prop_assert_eq!(page_sum_bytes(misaligned), want);
            prop_assert_eq!(sum_words_soft(&a), want);
            prop_assert_eq!(sum_words(&a), want);
        }

        #[test]
        fn a_summed_copy_copies_and_sums_as_the_oracle(words in proptest::collection::vec(any::<u64>(), 0..700), skew in 0usize..8) {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            // The source need not be aligned.
            let mut shifted = vec![0u8; bytes.len() + skew];
            shifted[skew..].copy_from_slice(&bytes);
            let src = &shifted[skew..];
            let dst = atomics(&vec![0xa5; bytes.len()]);
            // SAFETY: `dst` is aligned, owned by this test and read only after the call.
            let sum = unsafe { copy_page_summed(dst.as_ptr().cast::<u8>().cast_mut(), src) };
            prop_assert_eq!(sum, oracle(&bytes));
            let copied: Vec<u8> = dst.iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
            prop_assert_eq!(&copied, &bytes);
            let soft = atomics(&vec![0; bytes.len()]);
            prop_assert_eq!(copy_summed_soft(&soft, src), sum);
            prop_assert_eq!(soft.iter().map(|w| w.load(Ordering::Relaxed)).collect::<Vec<_>>(), words);
        }

        #[test]
        fn the_standard_crc_agrees_with_the_bitwise_definition(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let want = !crc_bitwise(!0, &bytes);
            prop_assert_eq!(crc32c_soft(&bytes), want);
            prop_assert_eq!(crc32c(&bytes), want);
        }

        #[test]
        fn any_single_flip_is_caught(seed in any::<u64>(), at in 0usize..4096, bit in 0u8..8) {
            let mut page: Vec<u8> = (0..4096u64).map(|i| (i.wrapping_mul(seed | 1) >> 7) as u8).collect();
            let before = page_sum_bytes(&page);
            page[at] ^= 1 << bit;
            prop_assert_ne!(page_sum_bytes(&page), before);
        }
    }

    #[test]
    fn lanes_are_position_sensitive() {
        // Swapping two words of different lanes changes the sum (a plain CRC-free xor would not).
        let mut page = vec![0u8; 4096];
        page[0] = 1;
        let a = page_sum_bytes(&page);
        page[0] = 0;
        page[8] = 1;
        assert_ne!(a, page_sum_bytes(&page));
    }
}
