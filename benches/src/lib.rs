//! Shared pieces of om's benchmarks.
//!
//! The machines are shared and noisy, so no benchmark reports an absolute time on its own: each one
//! measures its baseline in the same run and prints the ratio.

use std::time::Duration;

/// The median of `samples` (the mean of the two middle ones for an even count); `None` when empty.
#[must_use]
pub fn median(samples: &[Duration]) -> Option<Duration> {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2),
    }
}

/// The value after `--name` in `args`, or `default`.
#[must_use]
pub fn opt(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// `measured / baseline`, the figure every benchmark reports.
#[must_use]
pub fn ratio(measured: Duration, baseline: Duration) -> f64 {
    measured.as_secs_f64() / baseline.as_secs_f64()
}

/// A mapped region of `bytes` filled with xorshift words from `seed`: every page populated, none
/// alike.
///
/// # Panics
/// If the region cannot be mapped.
#[must_use]
pub fn populated_region(bytes: usize, seed: u64) -> om::sys::mman::Region {
    let r = om::sys::mman::Region::map_anon(bytes, None).expect("map");
    let mut x = seed | 1;
    for w in r.words() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.store(x, std::sync::atomic::Ordering::Relaxed);
    }
    r
}

/// The VMA table of one anonymous read-write region of `len` bytes at `start`, as a benchmark's
/// image opens it.
#[must_use]
pub fn begin_for_region(start: u64, len: u64) -> om_transport::wire::Begin {
    om_transport::wire::Begin {
        info: om_transport::wire::ImageInfo {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
            flags: 0,
            populated_bytes: len,
        },
        vmas: vec![om_transport::wire::Vma {
            start,
            end: start + len,
            prot: 3,
            flags: 0,
            pgoff: 0,
            name: b"[bench]".to_vec(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(3), ms(1), ms(2)]), Some(ms(2)));
        assert_eq!(
            median(&[ms(4), ms(1), ms(2), ms(3)]),
            Some(Duration::from_micros(2500))
        );
        assert_eq!(median(&[]), None);
        assert!((ratio(ms(3), ms(2)) - 1.5).abs() < 1e-12);
        let args: Vec<String> = ["b", "--runs", "5"].map(String::from).to_vec();
        assert_eq!(opt(&args, "--runs", "3"), "5");
        assert_eq!(opt(&args, "--gib", "1"), "1");
    }
}
