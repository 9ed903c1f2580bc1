//! The capture arena: while the control thread writes an image, the runtime's own allocations come
//! from a separate mapping that is left out of the image.
//!
//! The runtime's heap is part of the image. Were the capture to allocate from it while it reads it,
//! the image could hold the heap's metadata half-updated, or name a segment that the allocator
//! mapped after the memory map was read; the restored runtime would then crash in its allocator
//! (this happened: a 4 MiB buffer got its own mapping after the map was read). So capture allocates
//! from a bump arena instead: the heap is untouched for the whole capture, and nothing allocated
//! during the capture outlives it. Frees into the arena are no-ops; the arena is reset by the next
//! capture, and forgotten by a restored copy (which does not have it).

use std::alloc::{GlobalAlloc, Layout};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Virtual size of the arena (reserved, not committed).
pub const SIZE: usize = 1 << 30;

static BASE: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicUsize = AtomicUsize::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// True once a [`CaptureAware`] allocator has served an allocation, i.e. it is this program's
/// global allocator (capture allocates inside a signal handler and needs it).
#[must_use]
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Maps the arena unless it exists.
///
/// # Errors
/// The `mmap` failure.
pub fn prepare() -> io::Result<()> {
    if BASE.load(Ordering::Acquire) != 0 {
        return Ok(());
    }
    // SAFETY: a fresh private anonymous mapping chosen by the kernel; nothing else is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // A name keeps the kernel from merging the arena with a neighbour (and shows it in the maps);
    // kernels without CONFIG_ANON_VMA_NAME refuse, which capture copes with (it cuts the arena out).
    // SAFETY: PR_SET_VMA_ANON_NAME only labels the mapping just made; the name is a valid C string.
    unsafe {
        libc::prctl(
            libc::PR_SET_VMA,
            libc::PR_SET_VMA_ANON_NAME,
            p as libc::c_ulong,
            SIZE as libc::c_ulong,
            c"om-capture-arena".as_ptr() as libc::c_ulong,
        )
    };
    BASE.store(p as usize, Ordering::Release);
    Ok(())
}

/// Starts a capture: allocations of this process's Rust code come from the (emptied) arena.
pub fn begin() {
    NEXT.store(BASE.load(Ordering::Acquire), Ordering::Release);
    ACTIVE.store(BASE.load(Ordering::Acquire) != 0, Ordering::Release);
}

/// Ends a capture.
pub fn end() {
    ACTIVE.store(false, Ordering::Release);
}

/// A restored copy has no arena (it was left out of the image): forget it, and end the capture
/// that was running when the image was taken.
pub fn forget() {
    ACTIVE.store(false, Ordering::Release);
    BASE.store(0, Ordering::Release);
}

/// The arena's range, if mapped.
#[must_use]
pub fn range() -> Option<Range<u64>> {
    let b = BASE.load(Ordering::Acquire);
    (b != 0).then(|| b as u64..(b + SIZE) as u64)
}

fn contains(p: *mut u8) -> bool {
    let b = BASE.load(Ordering::Acquire);
    b != 0 && (b..b + SIZE).contains(&(p as usize))
}

fn bump(layout: Layout) -> *mut u8 {
    let base = BASE.load(Ordering::Acquire);
    let mut cur = NEXT.load(Ordering::Acquire);
    loop {
        // At least malloc's alignment, as the heap it stands in for gives.
        let start = cur.next_multiple_of(layout.align().max(16));
        let Some(end) = start.checked_add(layout.size()) else {
            return std::ptr::null_mut();
        };
        if base == 0 || end > base + SIZE {
            return std::ptr::null_mut();
        }
        match NEXT.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return start as *mut u8,
            Err(now) => cur = now,
        }
    }
}

/// A global allocator that serves from the arena during a capture and from `A` otherwise.
#[derive(Debug)]
pub struct CaptureAware<A>(pub A);

// SAFETY: every block handed out is either from `A` (and given back only to `A`, outside a capture)
// or a fresh, aligned, exclusively owned part of the arena mapping, which stays mapped until a
// restored copy forgets it (and a restored copy never holds blocks from a previous capture).
unsafe impl<A: GlobalAlloc> GlobalAlloc for CaptureAware<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        if ACTIVE.load(Ordering::Acquire) {
            return bump(layout);
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Arena blocks are freed by the reset; a heap block freed during a capture is leaked, so
        // that the heap stays untouched.
        if contains(ptr) || ACTIVE.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: a block of `A` with its layout (the caller's contract).
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !contains(ptr) && !ACTIVE.load(Ordering::Acquire) {
            // SAFETY: a block of `A`, outside a capture (the caller's contract).
            return unsafe { self.0.realloc(ptr, layout, new_size) };
        }
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a valid non-zero layout (GlobalAlloc::realloc guarantees new_size > 0).
        let fresh = unsafe { self.alloc(new_layout) };
        if !fresh.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap (fresh is new).
            unsafe { std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size)) };
            // SAFETY: the old block with its layout.
            unsafe { self.dealloc(ptr, layout) };
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_blocks_are_aligned_disjoint_and_reset() {
        prepare().unwrap();
        begin();
        let a = bump(Layout::from_size_align(10, 8).unwrap());
        let b = bump(Layout::from_size_align(100, 64).unwrap());
        end();
        assert!(contains(a) && contains(b));
        assert_eq!(b as usize % 64, 0);
        assert!(b as usize >= a as usize + 10);
        assert!(bump(Layout::from_size_align(SIZE, 8).unwrap()).is_null());
        begin();
        assert_eq!(bump(Layout::from_size_align(10, 8).unwrap()), a);
        end();
    }
}
