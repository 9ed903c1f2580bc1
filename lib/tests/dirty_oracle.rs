//! Dirty tracking against a naive oracle, for every mechanism this machine has.
//!
//! A test owns a window of address space with up to [`SLOTS`] regions. Between rounds it writes
//! random pages from several threads and changes the layout (mmap, munmap, mremap, `MAP_FIXED` over a
//! part, `MADV_DONTNEED`). It keeps a receiver's copy of the memory, updated from each round the way a
//! migration would (zero the `zeroed` pages, copy the `dirty` ones), and checks:
//!
//! - exactness, in quiescent rounds: on regions whose layout did not change, the reported pages equal
//!   what the mechanism must report (the written pages; for none every populated page; for mprotect
//!   at least the written pages and at most their chunks' populated pages);
//! - soundness: after the final round (writers stopped, as in a migration's freeze) the receiver's
//!   copy equals the real memory byte for byte, also after rounds collected while writers ran.

#![allow(clippy::single_range_in_vec_init)] // one-run range tables read best as literals

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, RwLock};

use om::dirty::{self, Mechanism, RangeTable, Scope, Tracker};
use om::sys::mman::Region;
use om::sys::page_size;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const SLOT: usize = 4 << 20;
const SLOTS: usize = 12;
const MAX_PAGES: usize = 48;

/// One test at a time: each owns a window of the address space, and only one mprotect tracker may
/// exist per process.
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone)]
enum Op {
    Map { slot: usize, pages: usize },
    Unmap { slot: usize },
    Move { slot: usize, to: usize, pages: usize },
    Replace { slot: usize, first: usize, count: usize },
    DontNeed { slot: usize, first: usize, count: usize },
}

#[derive(Debug, Clone)]
struct RoundPlan {
    /// Per thread: (slot, page, word, value) writes; a write to a missing slot or page is skipped.
    writes: Vec<Vec<(usize, usize, usize, u64)>>,
    ops: Vec<Op>,
    more_writes: Vec<(usize, usize, usize, u64)>,
}

fn plan_strategy() -> impl Strategy<Value = Vec<RoundPlan>> {
    let write = (0..SLOTS, 0..MAX_PAGES, 0usize..512, 1u64..u64::MAX);
    let op = prop_oneof![
        (0..SLOTS, 1..=MAX_PAGES).prop_map(|(slot, pages)| Op::Map { slot, pages }),
        (0..SLOTS).prop_map(|slot| Op::Unmap { slot }),
        (0..SLOTS, 0..SLOTS, 1..=MAX_PAGES).prop_map(|(slot, to, pages)| Op::Move { slot, to, pages }),
        (0..SLOTS, 0..MAX_PAGES, 1usize..8).prop_map(|(slot, first, count)| Op::Replace {
            slot,
            first,
            count
        }),
        (0..SLOTS, 0..MAX_PAGES, 1usize..8).prop_map(|(slot, first, count)| Op::DontNeed {
            slot,
            first,
            count
        }),
    ];
    let round = (
        prop::collection::vec(prop::collection::vec(write.clone(), 0..40), 3),
        prop::collection::vec(op, 0..3),
        prop::collection::vec(write, 0..10),
    )
        .prop_map(|(writes, ops, more_writes)| RoundPlan {
            writes,
            ops,
            more_writes,
        });
    prop::collection::vec(round, 2..6)
}

/// The test's memory: one optional region per slot of the window.
struct World {
    base: usize,
    slots: RwLock<Vec<Option<Region>>>,
    /// Pages that hold data, by the test's own account.
    populated: Mutex<BTreeSet<u64>>,
}

impl World {
    fn new() -> Self {
        // Find a free window, then give it back: regions are placed in it with MAP_FIXED_NOREPLACE.
        let probe = Region::map_anon(SLOT * SLOTS, None).unwrap();
        let base = probe.addr();
        drop(probe);
        let slots = (0..SLOTS).map(|_| None).collect();
        Self {
            base,
            slots: RwLock::new(slots),
            populated: Mutex::new(BTreeSet::new()),
        }
    }

    fn window(&self) -> Range<u64> {
        self.base as u64..(self.base + SLOT * SLOTS) as u64
    }

    fn slot_addr(&self, slot: usize) -> usize {
        self.base + slot * SLOT
    }

    /// Writes; returns the pages written.
    fn write(&self, writes: &[(usize, usize, usize, u64)]) -> Vec<u64> {
        let slots = self.slots.read().unwrap();
        let page = page_size();
        let mut done = Vec::new();
        for &(slot, pg, word, value) in writes {
            let Some(r) = &slots[slot] else { continue };
            if pg * page >= r.len() {
                continue;
            }
            r.words()[(pg * page + word * 8) / 8].store(value, Relaxed);
            done.push((r.addr() + pg * page) as u64);
        }
        self.populated.lock().unwrap().extend(done.iter().copied());
        done
    }

    fn write_from_threads(&self, per_thread: &[Vec<(usize, usize, usize, u64)>]) -> BTreeSet<u64> {
        std::thread::scope(|s| {
            let handles: Vec<_> = per_thread.iter().map(|w| s.spawn(|| self.write(w))).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
    }

    fn forget(&self, range: Range<u64>) {
        let mut p = self.populated.lock().unwrap();
        let gone: Vec<u64> = p.range(range).copied().collect();
        for g in gone {
            p.remove(&g);
        }
    }

    /// Applies a layout change; returns the address ranges whose layout changed (not exact-checked).
    fn apply(&self, op: &Op) -> Vec<Range<u64>> {
        let page = page_size();
        let mut slots = self.slots.write().unwrap();
        match *op {
            Op::Map { slot, pages } if slots[slot].is_none() => {
                // Something else of the process may have been mapped there meanwhile: skip.
                let Ok(r) = Region::map_anon(pages * page, Some(self.slot_addr(slot))) else {
                    return vec![];
                };
                let a = r.addr() as u64;
                slots[slot] = Some(r);
                vec![a..a + (pages * page) as u64]
            }
            Op::Unmap { slot } => match slots[slot].take() {
                Some(r) => {
                    let range = r.addr() as u64..(r.addr() + r.len()) as u64;
                    self.forget(range.clone());
                    vec![range]
                }
                None => vec![],
            },
            Op::Move { slot, to, pages } if slot != to && slots[to].is_none() && self.free(to, pages) => {
                let Some(mut r) = slots[slot].take() else {
                    return vec![];
                };
                let old = r.addr() as u64..(r.addr() + r.len()) as u64;
                // What the runtime's mremap wrapper does (a no-op unless the mprotect tracker runs).
                dirty::open_range(r.addr(), r.len());
                if let Err(e) = r.remap(pages * page, Some(self.slot_addr(to))) {
                    // EFAULT: the range is several VMAs of different kinds (a part replaced since the
                    // last round is not registered yet, so the kernel could not merge it). A documented
                    // limitation that the runtime's mremap wrapper covers; here the move did not happen.
                    assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
                    slots[slot] = Some(r);
                    return vec![];
                }
                let new = r.addr() as u64..(r.addr() + r.len()) as u64;
                // Data moves with the pages; a shrink drops the tail.
                let moved: Vec<u64> = {
                    let p = self.populated.lock().unwrap();
                    p.range(old.clone())
                        .map(|a| a - old.start + new.start)
                        .filter(|a| *a < new.end)
                        .collect()
                };
                self.forget(old.clone());
                self.populated.lock().unwrap().extend(moved);
                slots[to] = Some(r);
                vec![old, new]
            }
            Op::Replace { slot, first, count } | Op::DontNeed { slot, first, count } => {
                let Some(r) = slots[slot].as_mut() else {
                    return vec![];
                };
                let pages = r.len() / page;
                if first >= pages {
                    return vec![];
                }
                let count = count.min(pages - first);
                if matches!(op, Op::Replace { .. }) {
                    r.replace(first * page, count * page).unwrap();
                } else {
                    r.dontneed(first * page, count * page).unwrap();
                }
                let a = (r.addr() + first * page) as u64;
                self.forget(a..a + (count * page) as u64);
                let whole = r.addr() as u64..(r.addr() + r.len()) as u64;
                vec![whole]
            }
            _ => vec![],
        }
    }

    /// True when nothing is mapped where `pages` pages at `slot` would go (mremap would replace it).
    fn free(&self, slot: usize, pages: usize) -> bool {
        let (a, b) = (
            self.slot_addr(slot) as u64,
            (self.slot_addr(slot) + pages * page_size()) as u64,
        );
        om::dirty::maps::read_self()
            .unwrap()
            .iter()
            .all(|v| v.end <= a || b <= v.start)
    }

    /// The extents of the test's own regions.
    fn extents(&self) -> RangeTable {
        let slots = self.slots.read().unwrap();
        RangeTable::from_runs(
            slots
                .iter()
                .flatten()
                .map(|r| r.addr() as u64..(r.addr() + r.len()) as u64),
        )
    }

    /// Every page of every region with its content.
    fn snapshot(&self) -> HashMap<u64, Vec<u64>> {
        let slots = self.slots.read().unwrap();
        let page = page_size();
        let mut out = HashMap::new();
        for r in slots.iter().flatten() {
            for (i, chunk) in r.words().chunks(page / 8).enumerate() {
                out.insert(
                    (r.addr() + i * page) as u64,
                    chunk.iter().map(|w| w.load(Relaxed)).collect(),
                );
            }
        }
        out
    }

    fn read_page(&self, addr: u64) -> Option<Vec<u64>> {
        let slots = self.slots.read().unwrap();
        let page = page_size();
        let r = slots
            .iter()
            .flatten()
            .find(|r| (r.addr() as u64) <= addr && addr < (r.addr() + r.len()) as u64)?;
        let off = usize::try_from(addr).unwrap() - r.addr();
        Some(
            r.words()[off / 8..(off + page) / 8]
                .iter()
                .map(|w| w.load(Relaxed))
                .collect(),
        )
    }
}

/// The receiver's copy: page address to content (absent means zero).
#[derive(Default)]
struct Receiver {
    pages: HashMap<u64, Vec<u64>>,
}

impl Receiver {
    fn apply(&mut self, world: &World, zeroed: &RangeTable, dirty: &RangeTable) {
        let page = page_size() as u64;
        for p in zeroed.page_addrs(page) {
            self.pages.remove(&p);
        }
        for p in dirty.page_addrs(page) {
            match world.read_page(p) {
                Some(c) => self.pages.insert(p, c),
                None => self.pages.remove(&p),
            };
        }
    }

    /// The VMA table: pages no longer mapped are gone on the receiver too.
    fn retain_mapped(&mut self, world: &World) {
        let snap = world.snapshot();
        self.pages.retain(|p, _| snap.contains_key(p));
    }

    fn check(&self, world: &World) -> Result<(), String> {
        let zero = vec![0u64; page_size() / 8];
        for (p, content) in world.snapshot() {
            let got = self.pages.get(&p).unwrap_or(&zero);
            if *got != content {
                return Err(format!(
                    "page {p:#x}: the receiver's copy differs from memory (a missed write)"
                ));
            }
        }
        Ok(())
    }
}

/// What `mechanism` must report for stable memory, given the pages written in the round.
fn expected(
    mechanism: Mechanism,
    gran: u64,
    written: &BTreeSet<u64>,
    populated: &BTreeSet<u64>,
) -> BTreeSet<u64> {
    match mechanism {
        Mechanism::UffdWp | Mechanism::SoftDirty => written.clone(),
        Mechanism::Full => populated.clone(),
        Mechanism::Mprotect => {
            let chunks: BTreeSet<u64> = written.iter().map(|p| p / gran).collect();
            populated
                .iter()
                .copied()
                .filter(|p| chunks.contains(&(p / gran)))
                .collect()
        }
    }
}

/// The pages of `set` in the test's own regions whose layout did not change this round.
fn stable_part(set: &BTreeSet<u64>, volatile: &RangeTable, ours: &RangeTable) -> BTreeSet<u64> {
    set.iter()
        .copied()
        .filter(|p| ours.contains(*p) && !volatile.contains(*p))
        .collect()
}

fn run_case(mechanism: Mechanism, plans: &[RoundPlan]) -> Result<(), String> {
    let world = World::new();
    let window = world.window();
    // A few regions exist before tracking starts.
    for (slot, pages) in [(0, 16), (3, MAX_PAGES), (7, 5)] {
        world.apply(&Op::Map { slot, pages });
    }
    world.write(
        &(0..40)
            .map(|i| (i % 8, (i * 7) % MAX_PAGES, i, 0xabc0 + i as u64))
            .collect::<Vec<_>>(),
    );

    let mut t: Box<dyn Tracker> =
        dirty::open(mechanism, Scope::Window(window.clone())).map_err(|e| e.to_string())?;
    let round0 = t.start().map_err(|e| e.to_string())?;
    let pop: BTreeSet<u64> = world.populated.lock().unwrap().clone();
    let got0: BTreeSet<u64> = round0
        .intersection(&world.extents())
        .page_addrs(page_size() as u64)
        .collect();
    if got0 != pop {
        return Err(format!(
            "round 0: reported {} pages, {} are populated",
            got0.len(),
            pop.len()
        ));
    }
    let mut rx = Receiver::default();
    rx.apply(&world, &RangeTable::new(), &round0);

    // Quiescent rounds: exactness and soundness.
    let mut changed_before = RangeTable::new();
    for (n, plan) in plans.iter().enumerate() {
        let mut written = world.write_from_threads(&plan.writes);
        let mut changed = RangeTable::new();
        for op in &plan.ops {
            changed = changed.union(&RangeTable::from_runs(world.apply(op)));
        }
        // mprotect tracks new memory only after a round of probation, reporting it in full till then.
        let volatile = if mechanism == Mechanism::Mprotect {
            changed.union(&changed_before)
        } else {
            changed.clone()
        };
        changed_before = changed;
        written.extend(world.write(&plan.more_writes));
        let round = t.collect().map_err(|e| e.to_string())?;
        rx.retain_mapped(&world);
        rx.apply(&world, &round.zeroed, &round.dirty);
        rx.check(&world).map_err(|e| format!("round {}: {e}", n + 1))?;

        let gran = t.granularity();
        let pop = world.populated.lock().unwrap().clone();
        let ours = world.extents();
        let want = stable_part(&expected(mechanism, gran, &written, &pop), &volatile, &ours);
        let got = stable_part(
            &round.dirty.page_addrs(page_size() as u64).collect(),
            &volatile,
            &ours,
        );
        // mprotect's chunks are clipped to its tracked ranges, which the test cannot see (a region
        // mapped over a smaller one is tracked as two ranges): the chunk rule is an upper bound and
        // the written pages the lower one. The others report exactly what they must.
        let at_least = if mechanism == Mechanism::Mprotect {
            stable_part(&written, &volatile, &ours)
        } else {
            want.clone()
        };
        if !at_least.is_subset(&got) || !got.is_subset(&want) {
            let missing: Vec<_> = at_least
                .difference(&got)
                .take(4)
                .map(|p| format!("{p:#x}"))
                .collect();
            let extra: Vec<_> = got.difference(&want).take(4).map(|p| format!("{p:#x}")).collect();
            return Err(format!(
                "round {}: {} pages reported, {}..={} expected; missing {missing:?}, extra {extra:?}",
                n + 1,
                got.len(),
                at_least.len(),
                want.len()
            ));
        }
        let zeroed_stable = stable_part(
            &round.zeroed.page_addrs(page_size() as u64).collect(),
            &volatile,
            &ours,
        );
        if !zeroed_stable.is_empty() {
            return Err(format!(
                "round {}: {} stable pages reported as zeroed",
                n + 1,
                zeroed_stable.len()
            ));
        }
    }

    // Rounds collected while writers run, then the final round with writers stopped.
    if !t.needs_stopped_threads() {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| -> Result<(), String> {
            for k in 0..3u64 {
                let (world, stop) = (&world, &stop);
                s.spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Relaxed) {
                        let slot = usize::try_from((i * 7 + k) % SLOTS as u64).unwrap();
                        let pg = usize::try_from((i * 13 + k * 5) % MAX_PAGES as u64).unwrap();
                        world.write(&[(slot, pg, usize::try_from(i % 512).unwrap(), i ^ (k << 60) | 1)]);
                        i += 1;
                    }
                });
            }
            for _ in 0..6 {
                let round = t.collect().map_err(|e| e.to_string())?;
                rx.apply(&world, &round.zeroed, &round.dirty);
            }
            stop.store(true, Relaxed);
            Ok(())
        })?;
        let last = t.collect().map_err(|e| e.to_string())?;
        rx.retain_mapped(&world);
        rx.apply(&world, &last.zeroed, &last.dirty);
        rx.check(&world)
            .map_err(|e| format!("after concurrent rounds: {e}"))?;
    }
    t.stop().map_err(|e| e.to_string())?;
    // Tracking is off: writes proceed without faults into a tracker.
    world.write(&[(0, 1, 1, 7), (3, 2, 2, 9)]);
    Ok(())
}

fn check_mechanism(mechanism: Mechanism, cases: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = dirty::self_test(mechanism) {
        // Only soft-dirty may be missing, and only where the kernel lacks it: say so loudly.
        assert_eq!(mechanism, Mechanism::SoftDirty, "{e}");
        eprintln!("NOTE: {e}; its oracle test runs in the soft-dirty QEMU guest only");
        return;
    }
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&plan_strategy(), |plans| {
            run_case(mechanism, &plans).map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap();
}

#[test]
fn uffd_matches_the_oracle() {
    check_mechanism(Mechanism::UffdWp, 24);
}

#[test]
fn mprotect_matches_the_oracle() {
    check_mechanism(Mechanism::Mprotect, 16);
}

#[test]
fn none_matches_the_oracle() {
    check_mechanism(Mechanism::Full, 8);
}

#[test]
fn soft_dirty_matches_the_oracle_where_the_kernel_has_it() {
    check_mechanism(Mechanism::SoftDirty, 8);
}
