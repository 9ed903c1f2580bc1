//! Splitting a round's runs into batches bounded in pages and in runs.

use std::ops::Range;

/// Splits sorted, disjoint page runs into batches of at most `max_pages` pages and `max_runs` runs,
/// cutting runs where needed. Concatenating the batches gives back exactly the input.
///
/// # Panics
/// If `max_pages` or `max_runs` is zero.
#[must_use]
pub fn split(runs: &[Range<u64>], page_size: u64, max_pages: u64, max_runs: usize) -> Vec<Vec<Range<u64>>> {
    assert!(max_pages > 0 && max_runs > 0);
    let mut out = Vec::new();
    let mut cur: Vec<Range<u64>> = Vec::new();
    let mut cur_pages = 0u64;
    for r in runs {
        let mut start = r.start;
        while start < r.end {
            if cur_pages == max_pages || cur.len() == max_runs {
                out.push(std::mem::take(&mut cur));
                cur_pages = 0;
            }
            let room = (max_pages - cur_pages) * page_size;
            let end = r.end.min(start + room);
            cur.push(start..end);
            cur_pages += (end - start) / page_size;
            start = end;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// True when every run of `needle` lies inside the union of `hay` (both sorted and disjoint). Returns
/// the first page of `needle` that is not covered, if any.
#[must_use]
pub fn first_uncovered(needle: &[Range<u64>], hay: &[Range<u64>]) -> Option<u64> {
    let mut h = hay.iter().peekable();
    for n in needle {
        let mut at = n.start;
        while at < n.end {
            while h.peek().is_some_and(|r| r.end <= at) {
                h.next();
            }
            match h.peek() {
                Some(r) if r.start <= at => at = r.end.min(n.end),
                _ => return Some(at),
            }
        }
    }
    None
}

/// The parts of `needle` outside `hay` (both sorted and disjoint), sorted.
#[must_use]
pub fn uncovered(needle: &[Range<u64>], hay: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut h = 0;
    for n in needle {
        let mut at = n.start;
        while h < hay.len() && hay[h].end <= at {
            h += 1;
        }
        let mut k = h;
        while at < n.end {
            match hay.get(k) {
                Some(r) if r.start < n.end => {
                    if r.start > at {
                        out.push(at..r.start);
                    }
                    at = at.max(r.end);
                    k += 1;
                }
                _ => {
                    out.push(at..n.end);
                    at = n.end;
                }
            }
        }
    }
    out
}

/// The sorted union of two sorted, disjoint run lists, adjacent runs merged.
#[must_use]
pub fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.iter().chain(b).cloned().collect();
    all.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = 4096;

    fn runs_strategy() -> impl Strategy<Value = Vec<Range<u64>>> {
        proptest::collection::vec((0u64..64, 1u64..40), 0..30).prop_map(|v| {
            let mut at = 0;
            v.into_iter()
                .map(|(gap, len)| {
                    let s = at + gap * P + if at == 0 { 0 } else { P };
                    at = s + len * P;
                    s..at
                })
                .collect()
        })
    }

    fn pages(runs: &[Range<u64>]) -> Vec<u64> {
        runs.iter().flat_map(|r| (r.start..r.end).step_by(4096)).collect()
    }

    proptest! {
        #[test]
        fn split_respects_limits_and_loses_nothing(runs in runs_strategy(), mp in 1u64..50, mr in 1usize..6) {
            let batches = split(&runs, P, mp, mr);
            for b in &batches {
                prop_assert!(!b.is_empty() && b.len() <= mr);
                prop_assert!(pages(b).len() as u64 <= mp);
            }
            let flat: Vec<Range<u64>> = batches.concat();
            prop_assert_eq!(pages(&flat), pages(&runs));
        }

        #[test]
        fn coverage_matches_a_page_set(a in runs_strategy(), b in runs_strategy()) {
            let hay: std::collections::BTreeSet<u64> = pages(&b).into_iter().collect();
            let want = pages(&a).into_iter().find(|p| !hay.contains(p));
            prop_assert_eq!(first_uncovered(&a, &b), want);
        }
    }

    proptest! {
        #[test]
        fn uncovered_and_union_match_a_page_set(a in runs_strategy(), b in runs_strategy()) {
            use std::collections::BTreeSet;
            let pages = |v: &[Range<u64>]| -> BTreeSet<u64> {
                v.iter().flat_map(|r| (r.start..r.end).step_by(4096)).collect()
            };
            let (pa, pb) = (pages(&a), pages(&b));
            let diff = uncovered(&a, &b);
            prop_assert_eq!(pages(&diff), pa.difference(&pb).copied().collect::<BTreeSet<_>>());
            prop_assert!(diff.windows(2).all(|w| w[0].end <= w[1].start));
            let u = union(&a, &b);
            prop_assert_eq!(pages(&u), pa.union(&pb).copied().collect::<BTreeSet<_>>());
            prop_assert!(u.windows(2).all(|w| w[0].end < w[1].start));
        }
    }
}
