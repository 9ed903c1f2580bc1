//! Dirty tracking of the whole process, as the runtime uses it: memory the program gets after tracking
//! starts (heap growth, a new thread's stack, statics), writes made by the kernel, the forced
//! mechanism switch, and a program that uses userfaultfd itself.

#![allow(clippy::single_range_in_vec_init)] // one-run range tables read best as literals

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use om::dirty::{self, DirtyError, Mechanism, RangeTable, Scope, Tracker, UffdTracker};
use om::sys::mman::Region;
use om::sys::page_size;

/// Whole-process trackers see every test's memory; one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());
static A_STATIC: AtomicU64 = AtomicU64::new(0);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn page_of(addr: usize) -> u64 {
    (addr & !(page_size() - 1)) as u64
}

fn heap_end() -> u64 {
    dirty::maps::read_self()
        .unwrap()
        .iter()
        .filter(|v| v.path == "[heap]")
        .map(|v| v.end)
        .max()
        .unwrap_or(0)
}

/// Runs the test `name` of this binary alone in a child process, with no other test harness thread:
/// a tracker whose scope is the whole process write-protects every thread's memory, and the
/// harness's own threads (result reporting, output capture) must not share the process with it.
fn alone(name: &str) -> bool {
    if std::env::var_os("OM_TEST_ALONE").is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env("OM_TEST_ALONE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} in a child process: {:?}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

#[test]
fn whole_process_sees_new_heap_new_thread_stacks_and_statics() {
    if !alone("whole_process_sees_new_heap_new_thread_stacks_and_statics") {
        return;
    }
    let _s = serial();
    for mechanism in [Mechanism::UffdWp, Mechanism::Full, Mechanism::Mprotect] {
        let writable_at_start: Vec<_> = dirty::maps::read_self()
            .unwrap()
            .into_iter()
            .filter(|v| v.perms.write && !v.perms.shared)
            .collect();
        let mut t = dirty::select_with(mechanism.name(), Scope::Process).unwrap();
        assert_eq!(t.mechanism(), mechanism);
        t.start().unwrap();
        let heap_before = heap_end();
        // Heap growth: the break moves up (malloc's own arenas may be mmap'd in test threads), and the
        // new memory is written.
        let brk = om::sys::mman::grow_brk(256 << 10).unwrap();
        let brk_last = brk.last().unwrap();
        assert!(heap_end() > heap_before, "the heap VMA did not grow");
        brk_last.store(42, Relaxed);
        let brk_page = page_of(std::ptr::from_ref(brk_last) as usize);
        // Heap allocations from whatever arena.
        let boxes: Vec<Box<[u8; 16 << 10]>> = (0..64)
            .map(|i| Box::new([u8::try_from(i % 251).unwrap() + 1; 16 << 10]))
            .collect();
        // A new thread: its stack is a new mapping, written by the thread.
        let (stack_addr, tid) = std::thread::spawn(|| {
            let marker = [0x5au8; 64];
            let m = std::hint::black_box(&marker);
            (m.as_ptr() as usize, nix::unistd::gettid().as_raw())
        })
        .join()
        .unwrap();
        A_STATIC.store(u64::from(tid.unsigned_abs()), Relaxed);
        let round = t.collect().unwrap();
        for b in &boxes {
            let a = b.as_ptr() as usize;
            assert!(
                round.dirty.contains(page_of(a)),
                "{mechanism}: heap allocation at {a:#x} not reported"
            );
        }
        assert!(
            round.dirty.contains(page_of(stack_addr))
                || round.zeroed.contains(page_of(stack_addr))
                || !mapped(stack_addr),
            "{mechanism}: the new thread's stack at {stack_addr:#x} was not reported"
        );
        let s = std::ptr::from_ref(&A_STATIC) as usize;
        assert!(
            round.dirty.contains(page_of(s)),
            "{mechanism}: a write to a static was not reported"
        );
        assert!(
            round.dirty.contains(brk_page),
            "{mechanism}: memory from brk growth was not reported"
        );
        t.stop().unwrap();
        // Everything the tracker made read-only is writable again: no anonymous or file-backed
        // private memory that was writable at the start is read-only now.
        let after = dirty::maps::read_self().unwrap();
        for v in writable_at_start.iter() {
            let now_ro = after.iter().any(|a| {
                a.start < v.end && v.start < a.end && !a.perms.write && a.inode == v.inode && !a.is_special()
            });
            assert!(!now_ro, "{mechanism}: {v} is still read-only after stop");
        }
        eprintln!("{mechanism}: {} bytes dirty", round.dirty.bytes());
    }
}

/// The thread's stack may already be unmapped when it exited (glibc caches stacks, so usually not).
fn mapped(addr: usize) -> bool {
    dirty::maps::read_self()
        .unwrap()
        .iter()
        .any(|v| v.start <= addr as u64 && (addr as u64) < v.end)
}

fn pipe_with(bytes: &[u8]) -> std::fs::File {
    let (r, w) = nix::unistd::pipe().unwrap();
    std::fs::File::from(w).write_all(bytes).unwrap();
    std::fs::File::from(r)
}

#[test]
fn kernel_writes_are_caught() {
    let _s = serial();
    let page = page_size();
    for mechanism in [Mechanism::UffdWp, Mechanism::Mprotect] {
        let mut buf = Region::map_anon(8 * page, None).unwrap();
        buf.bytes_mut()[0] = 1; // populated before tracking
        let w = buf.addr() as u64..(buf.addr() + buf.len()) as u64;
        let mut t = dirty::open(mechanism, Scope::Window(w)).unwrap();
        t.start().unwrap();
        let target = buf.addr() + 5 * page + 100;
        let src = pipe_with(b"written by the kernel");
        if mechanism == Mechanism::Mprotect {
            // What the runtime's read() wrapper does; without it the kernel's write gets EFAULT.
            dirty::open_range(target, 21);
        }
        let n = nix::unistd::read(&src, &mut buf.bytes_mut()[5 * page + 100..5 * page + 121]).unwrap();
        assert_eq!(n, 21);
        let round = t.collect().unwrap();
        assert!(
            round.dirty.contains(page_of(target)),
            "{mechanism}: read() into a tracked page not reported"
        );
        t.stop().unwrap();
    }
}

/// A tracked range that the program unmaps keeps its slot while any piece of it remains (a gap in the
/// maps is no evidence). A thread stack mapped into the gap (a guard page below, writable memory
/// reaching into the old range) must stay writable: a new thread's first push onto a read-only
/// stack cannot be delivered as a signal, and the kernel kills the process. This was a SIGSEGV in
/// the source during round 0 (glibc reused the cached stack of a sender thread).
#[test]
fn mprotect_never_protects_a_stack_mapped_into_a_tracked_range() {
    let _s = serial();
    let page = page_size();
    let mut r = Region::map_anon(33 * page, None).unwrap();
    r.bytes_mut()[page..].fill(7);
    // Page 0 is not writable, so not tracked and not (yet) a guard.
    r.protect(0, page, libc::PROT_READ).unwrap();
    let w = (r.addr() + page) as u64..(r.addr() + r.len()) as u64;
    let mut t = dirty::open(Mechanism::Mprotect, Scope::Window(w)).unwrap();
    t.start().unwrap();
    t.collect().unwrap();
    // Pages 1..17 become a stack as glibc lays one out: a guard below, fresh writable memory above.
    // Pages 17..33 are left as they are (made read-only by the tracker), so the range continues.
    r.protect(0, page, libc::PROT_NONE).unwrap();
    r.replace(page, 16 * page).unwrap();
    r.bytes_mut()[page..17 * page].fill(9);
    let stack = (r.addr() + page) as u64..(r.addr() + 17 * page) as u64;
    let round = t.collect().unwrap();
    let maps = dirty::maps::read_self().unwrap();
    let read_only: Vec<_> = maps
        .iter()
        .filter(|v| v.start < stack.end && stack.start < v.end && !v.perms.write)
        .map(ToString::to_string)
        .collect();
    assert!(
        read_only.is_empty(),
        "the stack was made read-only: {read_only:?}"
    );
    assert!(
        stack.clone().step_by(page).all(|p| round.dirty.contains(p)),
        "the stack's pages were not all reported"
    );
    t.stop().unwrap();
}

#[test]
fn mprotect_without_the_wrapper_fails_the_kernel_write_visibly() {
    let _s = serial();
    let page = page_size();
    let mut buf = Region::map_anon(4 * page, None).unwrap();
    buf.bytes_mut()[0] = 1;
    let w = buf.addr() as u64..(buf.addr() + buf.len()) as u64;
    let mut t = dirty::open(Mechanism::Mprotect, Scope::Window(w)).unwrap();
    t.start().unwrap();
    let src = pipe_with(b"x");
    // The documented limitation: EFAULT, never a silent lost write.
    let r = nix::unistd::read(&src, &mut buf.bytes_mut()[page..page + 1]);
    t.stop().unwrap();
    assert_eq!(r, Err(nix::errno::Errno::EFAULT));
}

#[test]
fn forced_mechanisms_and_unknown_names() {
    let _s = serial();
    let r = Region::map_anon(4 * page_size(), None).unwrap();
    let w = r.addr() as u64..(r.addr() + r.len()) as u64;
    for m in [Mechanism::UffdWp, Mechanism::Mprotect, Mechanism::Full] {
        assert_eq!(
            dirty::select_with(m.name(), Scope::Window(w.clone()))
                .unwrap()
                .mechanism(),
            m
        );
    }
    assert_eq!(
        dirty::select_with("auto", Scope::Window(w.clone()))
            .unwrap()
            .mechanism(),
        Mechanism::UffdWp
    );
    assert!(matches!(
        dirty::select_with("bogus", Scope::Window(w.clone())),
        Err(DirtyError::UnknownMechanism { .. })
    ));
    // A forced mechanism that does not work is an error, never a silent fallback.
    if dirty::self_test(Mechanism::SoftDirty).is_err() {
        let e = dirty::select_with("soft-dirty", Scope::Window(w)).unwrap_err();
        assert!(
            matches!(
                e,
                DirtyError::SelfTest {
                    mechanism: Mechanism::SoftDirty,
                    ..
                }
            ),
            "{e}"
        );
    }
}

#[test]
fn a_program_that_uses_userfaultfd_itself_keeps_working_and_is_still_tracked() {
    let _s = serial();
    let page = page_size() as u64;
    // The program's own userfaultfd on region A; om's tracker on A and B.
    let a = Region::map_anon(16 * page_size(), None).unwrap();
    let b = Region::map_anon(16 * page_size(), None).unwrap();
    let (aa, ba) = (a.addr() as u64, b.addr() as u64);
    let w = |r: &Region, i: usize, v: u64| r.words()[i * page_size() / 8].store(v, Relaxed);
    w(&a, 0, 1);
    w(&b, 0, 1);
    let mut app = UffdTracker::new(Scope::Window(aa..aa + 16 * page)).unwrap();
    app.start().unwrap();
    let both = RangeTable::from_runs([aa..aa + 16 * page, ba..ba + 16 * page]);
    let lo = both.runs()[0].start;
    let hi = both.runs().last().unwrap().end;
    let mut om = UffdTracker::new(Scope::Window(lo..hi)).unwrap();
    let round0 = om.start().unwrap();
    assert!(round0.contains(aa) && round0.contains(ba));
    assert!(
        om.last_round().untrackable >= 1,
        "A's registration must have failed with EBUSY"
    );

    for round in 1..4u64 {
        w(&a, 3, round);
        w(&b, 5, round);
        let ours = om.collect().unwrap();
        let theirs = app.collect().unwrap();
        // The program's tracker still sees exactly its write.
        assert_eq!(
            theirs.dirty,
            RangeTable::from_runs([aa + 3 * page..aa + 4 * page])
        );
        // om sends A's populated pages in full (it cannot track them) and B's written page exactly.
        let a_pages = ours.dirty.intersect(&(aa..aa + 16 * page));
        assert_eq!(
            a_pages,
            RangeTable::from_runs([aa..aa + page, aa + 3 * page..aa + 4 * page])
        );
        assert_eq!(
            ours.dirty.intersect(&(ba..ba + 16 * page)),
            RangeTable::from_runs([ba + 5 * page..ba + 6 * page])
        );
    }
    om.stop().unwrap();
    // om's stop leaves the program's registration alone.
    w(&a, 7, 9);
    assert_eq!(
        app.collect().unwrap().dirty,
        RangeTable::from_runs([aa + 7 * page..aa + 8 * page])
    );
    app.stop().unwrap();
}

#[test]
fn unprivileged_processes_get_uffd_through_user_mode_only() {
    // vm.unprivileged_userfaultfd=0 refuses plain userfaultfd to a non-root process; the tracker
    // must fall back to UFFD_USER_MODE_ONLY. Run the forced-mechanism test again as nobody.
    if !nix::unistd::geteuid().is_root() {
        // Already unprivileged: the other tests of this file exercise the path directly.
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "forced_mechanisms_and_unknown_names",
            "--test-threads=1",
        ])
        .output()
        .expect("setpriv (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    eprintln!("vm.unprivileged_userfaultfd = {}", plain.trim());
}
