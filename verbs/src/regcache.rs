//! The sender's registration cache: which registered regions cover the application's memory, within
//! a locked-memory budget.
//!
//! Registering pins pages and costs a system call, so the placer registers whole runs (the dirty
//! range a piece belongs to), not pieces, and reuses them for every later piece of the same run.
//! The cache lives for one round: between rounds the application may unmap and remap memory, and a
//! registration would keep pinning the old pages. A run larger than the budget is registered in
//! budget-sized windows; when the next registration does not fit, the caller drains its queue and
//! clears the cache ([`RegCache::clear`]).

use std::collections::BTreeMap;
use std::ops::Range;

/// Registered regions by start address, and their total size.
#[derive(Debug)]
pub struct RegCache<R> {
    regions: BTreeMap<u64, (u64, R)>,
    /// Regions replaced by a registration at the same start: kept alive until the next clear
    /// (requests in flight may still use them).
    retired: Vec<R>,
    bytes: u64,
    budget: u64,
}

impl<R> RegCache<R> {
    /// An empty cache that registers at most `budget` bytes at a time.
    #[must_use]
    pub fn new(budget: u64) -> Self {
        Self {
            regions: BTreeMap::new(),
            retired: Vec::new(),
            bytes: 0,
            budget,
        }
    }

    /// The budget.
    #[must_use]
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes registered now.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The region that holds all of `piece`, if one does.
    #[must_use]
    pub fn lookup(&self, piece: &Range<u64>) -> Option<&R> {
        let (_, (end, r)) = self.regions.range(..=piece.start).next_back()?;
        (*end >= piece.end).then_some(r)
    }

    /// What to register for `piece`, a part of `run`: the whole run when the budget allows, else a
    /// budget-sized window from the piece's start (the caller cuts pieces to at most the budget).
    #[must_use]
    pub fn plan(&self, piece: &Range<u64>, run: &Range<u64>) -> Range<u64> {
        if run.end - run.start <= self.budget && run.start <= piece.start && piece.end <= run.end {
            run.clone()
        } else {
            piece.start
                ..piece
                    .end
                    .max(run.end.min(piece.start.saturating_add(self.budget)))
        }
    }

    /// True when `len` more bytes fit in the budget now.
    #[must_use]
    pub fn fits(&self, len: u64) -> bool {
        self.bytes.saturating_add(len) <= self.budget
    }

    /// Records a registration of `range`.
    pub fn insert(&mut self, range: Range<u64>, region: R) {
        self.bytes += range.end - range.start;
        if let Some((end, old)) = self.regions.insert(range.start, (range.end, region)) {
            self.bytes -= end - range.start;
            self.retired.push(old);
        }
    }

    /// Lets go of every registration (the caller made sure no request uses them any more).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.retired.clear();
        self.bytes = 0;
    }
}

/// The locked-memory budget of this process: unlimited with `CAP_IPC_LOCK` (the kernel does not
/// count pins then), else `RLIMIT_MEMLOCK`'s soft limit.
#[must_use]
pub fn memlock_budget() -> u64 {
    if has_ipc_lock() {
        return u64::MAX;
    }
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).map_or(0, |(soft, _)| {
        if soft == nix::sys::resource::RLIM_INFINITY {
            u64::MAX
        } else {
            soft
        }
    })
}

/// True when this process has `CAP_IPC_LOCK` in its effective set.
fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = 4096;

    /// Walks runs piece by piece as the placer does (register on a miss, clear when over budget)
    /// and checks every piece against the naive truth: some live registration covers it, and the
    /// registered bytes never exceed the budget.
    fn walk(runs: &[(u64, u64)], piece_pages: u64, budget_pages: u64) -> Result<(), TestCaseError> {
        let budget = budget_pages * P;
        let mut cache: RegCache<Range<u64>> = RegCache::new(budget);
        let mut at = 0x10_0000u64;
        for &(gap, pages) in runs {
            at += gap * P;
            let run = at..at + pages * P;
            at = run.end;
            let mut p = run.start;
            while p < run.end {
                let piece = p..run.end.min(p + (piece_pages * P).min(budget));
                if cache.lookup(&piece).is_none() {
                    let plan = cache.plan(&piece, &run);
                    prop_assert!(
                        plan.start <= piece.start && piece.end <= plan.end,
                        "plan {plan:?} misses {piece:?}"
                    );
                    prop_assert!(
                        run.start <= plan.start && plan.end <= run.end,
                        "plan {plan:?} leaves run {run:?}"
                    );
                    if !cache.fits(plan.end - plan.start) {
                        cache.clear();
                    }
                    cache.insert(plan.clone(), plan);
                }
                let r = cache.lookup(&piece).cloned();
                prop_assert!(r.is_some_and(|r| r.start <= piece.start && piece.end <= r.end));
                prop_assert!(cache.bytes() <= budget);
                p = piece.end;
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn every_piece_is_covered_within_the_budget(
            runs in proptest::collection::vec((0u64..4, 1u64..64), 1..20),
            piece_pages in 1u64..16,
            budget_pages in 1u64..80,
        ) {
            walk(&runs, piece_pages, budget_pages)?;
        }
    }

    #[test]
    fn a_run_within_the_budget_is_registered_whole() {
        let cache: RegCache<()> = RegCache::new(64 * P);
        let run = 0x1000 * P..0x1010 * P;
        assert_eq!(cache.plan(&(run.start + P..run.start + 2 * P), &run), run);
        let big = 0..1024 * P;
        assert_eq!(cache.plan(&(8 * P..9 * P), &big), 8 * P..72 * P);
    }

    #[test]
    fn the_budget_follows_the_limit() {
        // Root has CAP_IPC_LOCK (unlimited); others get their soft limit.
        let b = memlock_budget();
        assert!(b > 0);
    }
}
