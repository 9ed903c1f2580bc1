//! A freeze never holds a thread inside the mprotect tracker's fault handler.
//!
//! A round's harvest (and the tracker's stop) waits until no handler runs on the old table. The
//! freeze signal may reach a thread in the middle of that handler (it runs with signals open), and
//! a thread parked there never finishes it: a collect while frozen, as the final round and a
//! soft-dirty round do, then waited forever. This drives a writer that faults all the time and
//! collects under `capture::paused` again and again; before the fix it hung within a few rounds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use om::dirty::{self, Mechanism, Scope};
use om::sys::mman::Region;
use om::sys::page_size;

/// Collects, each under a freeze.
const ROUNDS: usize = 300;
/// How long all of them may take: each is a few milliseconds.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs the work in a child process that is killed after [`LIMIT`]: a freeze parks every thread
/// of the process but the collecting one, a watchdog thread included.
#[test]
fn a_collect_while_frozen_never_waits_for_a_parked_fault() {
    if std::env::var_os("OM_TEST_CHILD").is_some() {
        collect_while_faulting();
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "a_collect_while_frozen_never_waits_for_a_parked_fault",
            "--exact",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("OM_TEST_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out);
    let status = status.unwrap_or_else(|| {
        panic!(
            "{ROUNDS} collects under a freeze did not end within {LIMIT:?}: one waits for a fault \
             handler that a parked thread never finishes\n{out}"
        )
    });
    assert!(status.success() && out.contains("1 passed"), "{status:?}\n{out}");
}

fn collect_while_faulting() {
    // 1024 chunks of 64 KiB: after each collect, the writer faults once per chunk it comes to.
    let len = 64 << 20;
    let region = Region::map_anon(len, None).unwrap();
    let words = region.words();
    let stride = (64 << 10) / 8;
    for i in (0..words.len()).step_by(page_size() / 8) {
        words[i].store(1, Relaxed);
    }
    let base = region.addr() as u64;
    let mut tracker = dirty::open(Mechanism::Mprotect, Scope::Window(base..base + len as u64)).unwrap();
    tracker.start().unwrap();
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0;
            while !stop.load(Relaxed) {
                words[i].fetch_add(1, Relaxed);
                writes.fetch_add(1, Relaxed);
                i = (i + stride) % words.len();
            }
        });
        while writes.load(Relaxed) == 0 {
            std::thread::yield_now();
        }
        let rounds = (0..ROUNDS).map(|_| om::capture::paused(|| tracker.collect()));
        let failed = rounds.enumerate().find_map(|(i, r)| match r {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("collect {i}: {e}")),
            Err(e) => Some(format!("freeze {i}: {e}")),
        });
        stop.store(true, Relaxed);
        assert_eq!(failed, None);
    });
    tracker.stop().unwrap();
    println!("{ROUNDS} collects under a freeze while faulting: ok");
}
