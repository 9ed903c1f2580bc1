//! Dirty-tracking benchmark: `cargo run --release -p om-benches --bin dirty [-- GIB]`.
//!
//! On a populated region (1 GiB by default), for every mechanism that works here:
//! - one round's collect with 0%, 5% and 100% of the pages written (median of several rounds), and
//!   its ratio to copying the dirty bytes once (the work a round must do anyway);
//! - the cost of the first write to a tracked page, next to a plain write to a populated page;
//! - the slowdown of a write-heavy loop (random writes all over the region, one second) while
//!   tracked, with a collector thread calling `collect` every 20 ms, against the same loop untracked.
//!
//! All baselines are measured in the same run.

use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use om::dirty::{self, Mechanism, Scope};
use om::sys::mman::Region;
use om_benches::{median, ratio};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_pages(n_pages: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut r = Rng(seed | 1);
    (0..count)
        .map(|_| usize::try_from(r.next() % n_pages as u64).unwrap_or(0))
        .collect()
}

fn write_pages(words: &[AtomicU64], pages: &[usize], words_per_page: usize, v: u64) -> Duration {
    let t = Instant::now();
    for &p in pages {
        words[p * words_per_page].store(v, Relaxed);
    }
    t.elapsed()
}

fn copy_pages(words: &[AtomicU64], pages: &[usize], words_per_page: usize, out: &mut [u64]) -> Duration {
    let t = Instant::now();
    let mut o = 0;
    for &p in pages {
        for w in &words[p * words_per_page..(p + 1) * words_per_page] {
            out[o % out.len()] = w.load(Relaxed);
            o += 1;
        }
    }
    black_box(&out);
    t.elapsed()
}

fn main() {
    let gib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let page = om::sys::page_size();
    let len = gib << 30;
    let n_pages = len / page;
    let wpp = page / 8;
    let region = Region::map_anon(len, None).expect("map");
    let words = region.words();
    for p in 0..n_pages {
        words[p * wpp].store(1, Relaxed);
    }
    let w = region.addr() as u64..(region.addr() + len) as u64;
    let five = n_pages / 20;
    let mut copy_buf = vec![0u64; 1 << 20];
    println!(
        "dirty tracking on {gib} GiB ({n_pages} pages of {page} B), 5% = {five} random pages per round\n"
    );
    println!(
        "| mechanism | arm | scan 0% | scan 5% | scan 100% | scan 5% / copy of its pages | first write | plain write | write-heavy slowdown |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");

    // Baselines that do not depend on the mechanism.
    let sample = random_pages(n_pages, five, 99);
    let plain = write_pages(words, &sample, wpp, 3) / u32::try_from(five).unwrap_or(1);
    heavy_loop(words, n_pages, wpp, 5); // warm-up: TLB and caches, as the tracked runs will find them
    let untracked_loop = heavy_loop(words, n_pages, wpp, 7);

    for m in Mechanism::ALL {
        if let Err(e) = dirty::self_test(m) {
            println!("| {m} | {e} | | | | | | | |");
            continue;
        }
        let mut t = dirty::open(m, Scope::Window(w.clone())).expect("open");
        let arm0 = Instant::now();
        t.start().expect("start");
        let arm = arm0.elapsed();
        let (mut s0, mut s5, mut s100, mut firsts, mut copies) = (vec![], vec![], vec![], vec![], vec![]);
        for round in 0..7u64 {
            let c = Instant::now();
            t.collect().expect("collect");
            s0.push(c.elapsed());
            let pages = random_pages(n_pages, five, round + 1);
            firsts.push(write_pages(words, &pages, wpp, round) / u32::try_from(five).unwrap_or(1));
            let c = Instant::now();
            let r = t.collect().expect("collect");
            s5.push(c.elapsed());
            copies.push(copy_pages(words, &pages, wpp, &mut copy_buf));
            black_box(r);
        }
        for round in 0..3u64 {
            for p in 0..n_pages {
                words[p * wpp].store(round, Relaxed);
            }
            let c = Instant::now();
            t.collect().expect("collect");
            s100.push(c.elapsed());
        }
        let tracked_loop = {
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                let collector = s.spawn(|| {
                    while !stop.load(Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        t.collect().expect("collect");
                    }
                });
                let d = heavy_loop(words, n_pages, wpp, 11);
                stop.store(true, Relaxed);
                collector.join().unwrap();
                d
            })
        };
        t.stop().expect("stop");
        let (m0, m5, m100) = (median(&s0).unwrap(), median(&s5).unwrap(), median(&s100).unwrap());
        let first = median(&firsts).unwrap();
        println!(
            "| {m} | {:.1} ms | {:.2} ms | {:.2} ms | {:.1} ms | {:.2} | {:.2} µs | {:.3} µs | {:.2}x |",
            ms(arm),
            ms(m0),
            ms(m5),
            ms(m100),
            ratio(m5, median(&copies).unwrap()),
            first.as_secs_f64() * 1e6,
            plain.as_secs_f64() * 1e6,
            ratio(tracked_loop, untracked_loop),
        );
    }
}

/// A write-heavy program: random 8-byte writes over the whole region for one second. Returns the
/// time per write.
fn heavy_loop(words: &[AtomicU64], n_pages: usize, wpp: usize, seed: u64) -> Duration {
    let mut r = Rng(seed);
    let t = Instant::now();
    let mut i = 0u64;
    while t.elapsed() < Duration::from_secs(1) {
        for _ in 0..10_000 {
            let p = usize::try_from(r.next() % n_pages as u64).unwrap_or(0);
            words[p * wpp + usize::try_from(i % wpp as u64).unwrap_or(0)].store(i, Relaxed);
            i += 1;
        }
    }
    t.elapsed() / u32::try_from(i.max(1)).unwrap_or(u32::MAX)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
