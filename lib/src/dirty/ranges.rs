//! [`RangeTable`]: sorted, merged runs of pages, the unit that dirty trackers produce and transports
//! consume.
//!
//! A table holds non-overlapping, non-adjacent, page-aligned `[start, end)` runs in address order.
//! [`RangeTable::chunks`] partitions it into batches bounded in bytes and in runs, so a transport can
//! hand each batch to one `sendmsg` (at most `IOV_MAX` iovecs) or one RDMA work request list.

use std::ops::Range;

/// A run of whole pages, `[start, end)`.
pub type Run = Range<u64>;

/// Sorted, merged page runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeTable {
    runs: Vec<Run>,
}

impl RangeTable {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A table from runs in any order, overlapping or not. Empty runs are dropped.
    #[must_use]
    pub fn from_runs(runs: impl IntoIterator<Item = Run>) -> Self {
        let mut v: Vec<Run> = runs.into_iter().filter(|r| r.start < r.end).collect();
        v.sort_unstable_by_key(|r| r.start);
        let mut t = Self {
            runs: Vec::with_capacity(v.len()),
        };
        for r in v {
            t.push(r);
        }
        t
    }

    /// Adds a run that starts at or after the start of the last run (the order scans produce),
    /// merging it with the last run when they touch or overlap.
    ///
    /// # Panics
    /// When `run` starts before the last run (use [`RangeTable::from_runs`] or [`RangeTable::union`]).
    pub fn push(&mut self, run: Run) {
        if run.start >= run.end {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            assert!(
                run.start >= last.start,
                "RangeTable::push out of order: {run:x?} after {last:x?}"
            );
            if run.start <= last.end {
                last.end = last.end.max(run.end);
                return;
            }
        }
        self.runs.push(run);
    }

    /// The union of two tables.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        let mut out = Self {
            runs: Vec::with_capacity(self.runs.len() + other.runs.len()),
        };
        let (mut a, mut b) = (self.runs.iter().peekable(), other.runs.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.start <= y.start => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            if let Some(r) = next {
                out.push(r.clone());
            }
        }
        out
    }

    /// The part of the table inside `window`.
    #[must_use]
    pub fn intersect(&self, window: &Run) -> Self {
        let first = self.runs.partition_point(|r| r.end <= window.start);
        let mut out = Self::new();
        for r in &self.runs[first..] {
            if r.start >= window.end {
                break;
            }
            out.push(r.start.max(window.start)..r.end.min(window.end));
        }
        out
    }

    /// The pages of `self` that are not in `other`.
    #[must_use]
    pub fn difference(&self, other: &Self) -> Self {
        let mut out = Self::new();
        let mut j = 0;
        for r in &self.runs {
            let mut start = r.start;
            while j < other.runs.len() && other.runs[j].end <= start {
                j += 1;
            }
            let mut k = j;
            while start < r.end {
                match other.runs.get(k) {
                    Some(o) if o.start < r.end => {
                        if o.start > start {
                            out.push(start..o.start);
                        }
                        start = start.max(o.end);
                        k += 1;
                    }
                    _ => {
                        out.push(start..r.end);
                        break;
                    }
                }
            }
        }
        out
    }

    /// The pages of `self` that are also in `other`.
    #[must_use]
    pub fn intersection(&self, other: &Self) -> Self {
        self.difference(&self.difference(other))
    }

    /// The runs, in address order.
    #[must_use]
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// True when no page is in the table.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Total bytes.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.end - r.start).sum()
    }

    /// Total pages of `page_size` bytes.
    #[must_use]
    pub fn pages(&self, page_size: u64) -> u64 {
        self.bytes() / page_size
    }

    /// True when `addr` lies in a run.
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end <= addr);
        self.runs.get(i).is_some_and(|r| r.start <= addr)
    }

    /// Every page address in the table (for tests and oracles; a real consumer walks the runs).
    pub fn page_addrs(&self, page_size: u64) -> impl Iterator<Item = u64> + '_ {
        self.runs
            .iter()
            .flat_map(move |r| (r.start..r.end).step_by(usize::try_from(page_size).unwrap_or(4096)))
    }

    /// Partitions the table into batches of at most `max_bytes` bytes and `max_runs` runs each, splitting
    /// runs at batch boundaries. Together the batches cover the table exactly, in order.
    ///
    /// # Panics
    /// When `max_bytes` or `max_runs` is zero.
    #[must_use]
    pub fn chunks(&self, max_bytes: u64, max_runs: usize) -> Vec<Vec<Run>> {
        assert!(max_bytes > 0 && max_runs > 0, "chunks of nothing");
        let mut out = Vec::new();
        let mut cur: Vec<Run> = Vec::new();
        let mut cur_bytes = 0;
        for r in &self.runs {
            let mut start = r.start;
            while start < r.end {
                if cur_bytes == max_bytes || cur.len() == max_runs {
                    out.push(std::mem::take(&mut cur));
                    cur_bytes = 0;
                }
                let take = (r.end - start).min(max_bytes - cur_bytes);
                cur.push(start..start + take);
                cur_bytes += take;
                start += take;
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

impl FromIterator<Run> for RangeTable {
    fn from_iter<I: IntoIterator<Item = Run>>(iter: I) -> Self {
        Self::from_runs(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const P: u64 = 4096;

    fn pages_of(runs: &[Run]) -> BTreeSet<u64> {
        runs.iter().flat_map(|r| (r.start..r.end).step_by(4096)).collect()
    }

    fn runs_strategy() -> impl Strategy<Value = Vec<Run>> {
        prop::collection::vec((0u64..512, 0u64..32), 0..40)
            .prop_map(|v| v.into_iter().map(|(s, l)| s * P..(s + l) * P).collect())
    }

    proptest! {
        #[test]
        fn from_runs_matches_page_set(runs in runs_strategy()) {
            let t = RangeTable::from_runs(runs.clone());
            prop_assert_eq!(pages_of(t.runs()), pages_of(&runs));
            // Canonical: sorted, non-empty, neither overlapping nor touching.
            for w in t.runs().windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            prop_assert!(t.runs().iter().all(|r| r.start < r.end));
            prop_assert_eq!(t.bytes() / P, pages_of(&runs).len() as u64);
        }

        #[test]
        fn union_and_intersect_match_sets(a in runs_strategy(), b in runs_strategy(), w0 in 0u64..600, wl in 0u64..200) {
            let (ta, tb) = (RangeTable::from_runs(a.clone()), RangeTable::from_runs(b.clone()));
            let u = ta.union(&tb);
            let expect: BTreeSet<u64> = pages_of(&a).union(&pages_of(&b)).copied().collect();
            prop_assert_eq!(pages_of(u.runs()), expect);
            prop_assert_eq!(&u, &RangeTable::from_runs(a.iter().chain(b.iter()).cloned()));
            let window = w0 * P..(w0 + wl) * P;
            let i = ta.intersect(&window);
            let expect: BTreeSet<u64> = pages_of(&a).into_iter().filter(|p| window.contains(p)).collect();
            prop_assert_eq!(pages_of(i.runs()), expect);
            for p in (0..700).map(|x| x * P + 5) {
                prop_assert_eq!(ta.contains(p), pages_of(ta.runs()).contains(&(p - 5)));
            }
        }

        #[test]
        fn difference_and_intersection_match_sets(a in runs_strategy(), b in runs_strategy()) {
            let (ta, tb) = (RangeTable::from_runs(a.clone()), RangeTable::from_runs(b.clone()));
            let d = ta.difference(&tb);
            let expect: BTreeSet<u64> = pages_of(&a).difference(&pages_of(&b)).copied().collect();
            prop_assert_eq!(pages_of(d.runs()), expect);
            prop_assert_eq!(&d, &RangeTable::from_runs(d.runs().to_vec()));
            let i = ta.intersection(&tb);
            let expect: BTreeSet<u64> = pages_of(&a).intersection(&pages_of(&b)).copied().collect();
            prop_assert_eq!(pages_of(i.runs()), expect);
        }

        #[test]
        fn chunks_cover_exactly_within_bounds(runs in runs_strategy(), max_pages in 1u64..20, max_runs in 1usize..6) {
            let t = RangeTable::from_runs(runs);
            let chunks = t.chunks(max_pages * P, max_runs);
            let flat: Vec<Run> = chunks.iter().flatten().cloned().collect();
            // In order, covering the table exactly.
            prop_assert_eq!(RangeTable::from_runs(flat.clone()), t.clone());
            prop_assert_eq!(flat.iter().map(|r| r.end - r.start).sum::<u64>(), t.bytes());
            for w in flat.windows(2) {
                prop_assert!(w[0].end <= w[1].start);
            }
            for c in &chunks {
                prop_assert!(!c.is_empty() && c.len() <= max_runs);
                prop_assert!(c.iter().map(|r| r.end - r.start).sum::<u64>() <= max_pages * P);
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn push_out_of_order_panics() {
        let mut t = RangeTable::new();
        t.push(8 * P..9 * P);
        t.push(P..2 * P);
    }
}
