//! Anonymous memory of the transport's own (the staging buffer): page-aligned, its own mapping, so
//! that the capture can leave it out of the image and out of dirty tracking.

use std::ops::Range;
use std::ptr::NonNull;

/// A private anonymous read-write mapping, unmapped when dropped.
#[derive(Debug)]
pub struct Anon {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value; access goes through &self/&mut self.
unsafe impl Send for Anon {}
// SAFETY: shared access only reads the pointer and length.
unsafe impl Sync for Anon {}

impl Anon {
    /// Maps `len` bytes (rounded up to pages).
    ///
    /// # Errors
    /// `mmap` failing.
    pub fn new(len: usize) -> std::io::Result<Self> {
        let len = len.div_ceil(4096).max(1) * 4096;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    /// `len` bytes at `off`, to fill (`None` outside the mapping). A device may read other parts
    /// of the mapping meanwhile; it never writes a mapping handed out this way (staging buffers are
    /// registered for reading only).
    pub fn slice_mut(&mut self, off: usize, len: usize) -> Option<&mut [u8]> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        let at = self.ptr.as_ptr().wrapping_add(off);
        // SAFETY: inside the mapping (checked), which self owns; &mut self makes this the only
        // reference into it.
        Some(unsafe { std::slice::from_raw_parts_mut(at, len) })
    }

    /// A copy of `len` bytes at `off` (`None` outside the mapping), read through a raw pointer: a
    /// device may be writing other parts of the mapping meanwhile, so no reference covers it.
    #[must_use]
    pub fn read(&self, off: usize, len: usize) -> Option<Vec<u8>> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        let mut out = vec![0u8; len];
        let at = self.ptr.as_ptr().wrapping_add(off);
        // SAFETY: the source lies inside the mapping (checked), which self keeps mapped; the caller
        // reads a part the device finished writing (a reaped receive).
        unsafe { std::ptr::copy_nonoverlapping(at, out.as_mut_ptr(), len) };
        Some(out)
    }

    /// Start address.
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for no bytes (never: at least one page).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped address range.
    #[must_use]
    pub fn range(&self) -> Range<u64> {
        self.ptr.as_ptr() as u64..self.ptr.as_ptr() as u64 + self.len as u64
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no reference into it outlives self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
