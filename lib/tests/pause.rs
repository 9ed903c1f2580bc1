//! `capture::paused` (what a soft-dirty round runs under): while the work runs, every other thread
//! of the process stays parked in the checkpoint handler; afterwards they all run on. A process of
//! its own, as the runtime is: the freeze signals every thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

fn counts(counters: &[AtomicU64]) -> Vec<u64> {
    counters.iter().map(|c| c.load(Relaxed)).collect()
}

#[test]
fn no_other_thread_runs_while_paused_and_all_run_on_after() {
    let stop = AtomicBool::new(false);
    let counters: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
    /// Stops the counting threads however the test ends (a failed check must not hang the scope).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = Stop(&stop);
        for c in &counters {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(Relaxed) {
                    c.fetch_add(1, Relaxed);
                }
            });
        }
        while counts(&counters).contains(&0) {
            std::thread::yield_now();
        }
        for round in 0..5 {
            let (before, after) = om::capture::paused(|| {
                let before = counts(&counters);
                std::thread::sleep(Duration::from_millis(20));
                (before, counts(&counters))
            })
            .expect("pause");
            assert_eq!(
                before, after,
                "pause {round}: a thread ran while the others were paused"
            );
            // Every thread must run on; how soon is the scheduler's business (three spinning
            // threads on a loaded 2-core machine can wait tens of milliseconds for a CPU).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let later = counts(&counters);
                if later.iter().zip(&after).all(|(l, a)| l > a) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "pause {round}: a thread did not run on after the pause ({after:?} then {later:?})"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
}
