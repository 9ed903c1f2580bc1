//! The exported C functions and data symbols. Every handle is a pointer to a boxed Rust value made by
//! the function that creates it and freed by the one that removes it; `sci_error_t` is a `u32`.

// The C API's shapes: many arguments, Dolphin's symbol names.
#![allow(non_snake_case, non_upper_case_globals, clippy::too_many_arguments)]

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

use super::os;
use crate::codes::{SEQ_OK, dma_state, err, error_text, flag};
use crate::fabric::{self, Entry, State};

static INITIALIZED: AtomicBool = AtomicBool::new(false);

pub struct Desc {
    dir: PathBuf,
    node: u32,
}

enum Backing {
    /// Memory the emulation created (a sealed memfd: a peer cannot shrink it under the owner).
    Own { fd: OwnedFd },
    /// Memory the caller registered: a duplicate of the descriptor behind its shared mapping.
    Registered { addr: usize, fd: OwnedFd, offset: u64 },
}

pub struct LocalSegment {
    size: u64,
    entry: PathBuf,
    backing: Option<Backing>,
    prepared: bool,
}

pub struct RemoteSegment {
    path: CString,
    offset: u64,
    size: u64,
}

pub struct Map {
    addr: usize,
    len: usize,
    /// Unmapped by `SCIUnmapSegment` (registered local memory is the caller's).
    owned: bool,
}

pub struct Sequence;

pub struct DmaQueue {
    state: AtomicU32,
}

pub struct LocalInterrupt {
    path: PathBuf,
    word: usize,
    cancelled: AtomicBool,
    waiters: AtomicU32,
}

pub struct RemoteInterrupt {
    path: CString,
}

type DmaCallback = Option<unsafe extern "C" fn(*mut c_void, *mut DmaQueue, c_uint) -> c_int>;

/// Stores `code` in `*error` (when the caller passed one).
///
/// # Safety
/// `error` is null or valid for a write.
unsafe fn put(error: *mut c_uint, code: u32) {
    if !error.is_null() {
        // SAFETY: the caller's promise.
        unsafe { error.write(code) };
    }
}

/// Boxes `value` into `*out`.
///
/// # Safety
/// `out` is null or valid for a write.
unsafe fn give<T>(out: *mut *mut T, value: T) -> Result<(), u32> {
    if out.is_null() {
        return Err(err::ILLEGAL_PARAMETER);
    }
    // SAFETY: the caller's promise.
    unsafe { out.write(Box::into_raw(Box::new(value))) };
    Ok(())
}

/// The handle behind `p`.
///
/// # Safety
/// `p` is null or a live handle of type `T` made by this library.
unsafe fn handle<'a, T>(p: *mut T) -> Result<&'a T, u32> {
    // SAFETY: the caller's promise.
    unsafe { p.as_ref() }.ok_or(err::ILLEGAL_PARAMETER)
}

/// The handle behind `p`, mutably.
///
/// # Safety
/// As [`handle`], and no other reference to it is in use.
unsafe fn handle_mut<'a, T>(p: *mut T) -> Result<&'a mut T, u32> {
    // SAFETY: the caller's promise.
    unsafe { p.as_mut() }.ok_or(err::ILLEGAL_PARAMETER)
}

/// Takes back ownership of the handle behind `p`.
///
/// # Safety
/// `p` is null or a live handle made by this library, not used afterwards.
unsafe fn take<T>(p: *mut T) -> Result<Box<T>, u32> {
    if p.is_null() {
        return Err(err::ILLEGAL_PARAMETER);
    }
    // SAFETY: the caller's promise: made by Box::into_raw in `give`.
    Ok(unsafe { Box::from_raw(p) })
}

fn code(r: Result<(), u32>) -> u32 {
    r.err().unwrap_or(err::OK)
}

fn initialized() -> Result<(), u32> {
    if INITIALIZED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(err::NOT_INITIALIZED)
    }
}

fn adapter(no: c_uint) -> Result<(), u32> {
    if no == 0 {
        Ok(())
    } else {
        Err(err::NO_SUCH_ADAPTERNO)
    }
}

fn cstring(path: &std::path::Path) -> Result<CString, u32> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| err::SYSTEM)
}

fn wait_for(timeout: c_uint) -> Option<Duration> {
    (timeout != flag::INFINITE_TIMEOUT).then(|| Duration::from_millis(u64::from(timeout)))
}

// --- Library, descriptors, nodes ---------------------------------------------------------------

unsafe fn initialize(flags: c_uint, error: *mut c_uint) {
    let c = if flags == 0 {
        INITIALIZED.store(true, Ordering::Release);
        err::OK
    } else {
        err::ILLEGAL_FLAG
    };
    // SAFETY: the caller's pointer.
    unsafe { put(error, c) };
}

unsafe fn terminate() {
    INITIALIZED.store(false, Ordering::Release);
}

unsafe fn open(sd: *mut *mut Desc, flags: c_uint, error: *mut c_uint) {
    let r = (|| {
        initialized()?;
        if flags != 0 {
            return Err(err::ILLEGAL_FLAG);
        }
        let dir = fabric::dir();
        let node = fabric::local_node(&dir)?;
        // SAFETY: the caller's pointer.
        unsafe { give(sd, Desc { dir, node }) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn close(sd: *mut Desc, _flags: c_uint, error: *mut c_uint) {
    // SAFETY: the caller's handle, not used afterwards.
    let r = unsafe { take(sd) }.map(drop);
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn get_local_node_id(adapter_no: c_uint, node: *mut c_uint, _flags: c_uint, error: *mut c_uint) {
    let r = (|| {
        initialized()?;
        adapter(adapter_no)?;
        let id = fabric::local_node(&fabric::dir())?;
        if node.is_null() {
            return Err(err::ILLEGAL_PARAMETER);
        }
        // SAFETY: checked non-null; the caller's pointer.
        unsafe { node.write(id) };
        Ok(())
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn probe_node(
    sd: *mut Desc,
    adapter_no: c_uint,
    node: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) -> c_int {
    let r = (|| {
        // SAFETY: the caller's handle.
        let d = unsafe { handle(sd) }?;
        adapter(adapter_no)?;
        Ok(fabric::node_exists(&d.dir, node))
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, r.err().unwrap_or(err::OK)) };
    c_int::from(r.unwrap_or(false))
}

// --- Local segments ----------------------------------------------------------------------------

unsafe fn create_segment(
    sd: *mut Desc,
    segment: *mut *mut LocalSegment,
    id: c_uint,
    size: usize,
    _callback: *mut c_void,
    _arg: *mut c_void,
    flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let d = unsafe { handle(sd) }?;
        if flags & !(flag::EMPTY | flag::AUTO_ID) != 0 {
            return Err(if flags & flag::USE_CALLBACK != 0 {
                err::FLAG_NOT_IMPLEMENTED
            } else {
                err::ILLEGAL_FLAG
            });
        }
        if size == 0 {
            return Err(err::SIZE_ALIGNMENT);
        }
        let size64 = size as u64;
        let (entry, _id) = if flags & flag::AUTO_ID != 0 {
            (1u32..1 << 20)
                .find_map(|i| {
                    fabric::claim_segment(&d.dir, d.node, i, size64)
                        .ok()
                        .map(|p| (p, i))
                })
                .ok_or(err::NOSPC)?
        } else {
            (fabric::claim_segment(&d.dir, d.node, id, size64)?, id)
        };
        let backing = if flags & flag::EMPTY == 0 {
            match os::sealed_memory(size64) {
                Ok(fd) => Some(Backing::Own { fd }),
                Err(e) => {
                    let _ = std::fs::remove_file(&entry);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let seg = LocalSegment {
            size: size64,
            entry,
            backing,
            prepared: false,
        };
        // SAFETY: the caller's pointer.
        unsafe { give(segment, seg) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn remove_segment(segment: *mut LocalSegment, _flags: c_uint, error: *mut c_uint) {
    // SAFETY: the caller's handle, not used afterwards.
    let r = unsafe { take(segment) }.map(|s| {
        let _ = std::fs::remove_file(&s.entry);
        if let Some(name) = s.entry.file_name() {
            fabric::withdraw_fd(&name.to_string_lossy());
        }
    });
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn register_segment_memory(
    address: *mut c_void,
    size: usize,
    segment: *mut LocalSegment,
    _flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle, used by this call only.
        let s = unsafe { handle_mut(segment) }?;
        if s.backing.is_some() || s.prepared {
            return Err(err::ILLEGAL_OPERATION);
        }
        if size as u64 != s.size || address.is_null() {
            return Err(err::SIZE_ALIGNMENT);
        }
        let (fd, offset) = fabric::backing_of(address as u64, size as u64)?;
        s.backing = Some(Backing::Registered {
            addr: address as usize,
            fd: os::dup(fd)?,
            offset,
        });
        Ok(())
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

/// The entry other processes see for a segment.
fn entry_of(s: &LocalSegment, state: State) -> Result<Entry, u32> {
    // Other processes (in other pid and network namespaces too) get the memory's descriptor from
    // this process's descriptor server.
    let (fd, offset) = match &s.backing {
        Some(Backing::Own { fd }) => (fd, 0),
        Some(Backing::Registered { fd, offset, .. }) => (fd, *offset),
        None => return Err(err::SEGMENT_NOT_PREPARED),
    };
    let dir = s.entry.parent().ok_or(err::SYSTEM)?;
    let name = s.entry.file_name().ok_or(err::SYSTEM)?.to_string_lossy();
    let path = {
        use std::os::fd::AsRawFd;
        fabric::serve_fd(dir, &name, os::dup(fd.as_raw_fd())?)?
    };
    Ok(Entry {
        owner: std::process::id(),
        pidns: fabric::pid_namespace(),
        state,
        size: s.size,
        path,
        offset,
    })
}

unsafe fn prepare_segment(
    segment: *mut LocalSegment,
    adapter_no: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle, used by this call only.
        let s = unsafe { handle_mut(segment) }?;
        adapter(adapter_no)?;
        if s.backing.is_none() {
            return Err(err::ILLEGAL_OPERATION);
        }
        s.prepared = true;
        Ok(())
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn set_available(segment: *mut LocalSegment, adapter_no: c_uint, available: bool, error: *mut c_uint) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let s = unsafe { handle(segment) }?;
        adapter(adapter_no)?;
        if !s.prepared {
            return Err(err::SEGMENT_NOT_PREPARED);
        }
        let state = if available {
            State::Available
        } else {
            State::Hidden
        };
        fabric::write_entry(&s.entry, &entry_of(s, state)?)
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn map_local_segment(
    segment: *mut LocalSegment,
    map: *mut *mut Map,
    offset: usize,
    size: usize,
    _addr: *mut c_void,
    flags: c_uint,
    error: *mut c_uint,
) -> *mut c_void {
    let r = (|| {
        // SAFETY: the caller's handle.
        let s = unsafe { handle(segment) }?;
        check_map(flags, offset, size, s.size)?;
        let m = match &s.backing {
            Some(Backing::Registered { addr, .. }) => Map {
                addr: addr + offset,
                len: size,
                owned: false,
            },
            Some(Backing::Own { fd }) => {
                if offset % page() != 0 {
                    return Err(err::OFFSET_ALIGNMENT);
                }
                Map {
                    addr: os::map(fd, offset as u64, size)?,
                    len: size,
                    owned: true,
                }
            }
            None => return Err(err::SEGMENT_NOT_PREPARED),
        };
        let addr = m.addr;
        // SAFETY: the caller's pointer.
        unsafe { give(map, m) }.map(|()| addr as *mut c_void)
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, r.err().unwrap_or(err::OK)) };
    r.unwrap_or(std::ptr::null_mut())
}

unsafe fn unmap_segment(map: *mut Map, _flags: c_uint, error: *mut c_uint) {
    // SAFETY: the caller's handle, not used afterwards.
    let r = unsafe { take(map) }.map(|m| {
        if m.owned {
            // SAFETY: this mapping was made by `os::map` for this handle, which is gone now.
            unsafe { os::unmap(m.addr, m.len) };
        }
    });
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

/// The checks every map call makes: flags, and a non-empty range inside the segment.
fn check_map(flags: c_uint, offset: usize, size: usize, segment_size: u64) -> Result<(), u32> {
    if flags & !flag::READONLY_MAP != 0 {
        return Err(err::ILLEGAL_FLAG);
    }
    if offset.checked_add(size).is_none_or(|e| e as u64 > segment_size) || size == 0 {
        return Err(err::OUT_OF_RANGE);
    }
    Ok(())
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

// --- Remote segments ---------------------------------------------------------------------------

unsafe fn connect_segment(
    sd: *mut Desc,
    segment: *mut *mut RemoteSegment,
    node: c_uint,
    id: c_uint,
    adapter_no: c_uint,
    _callback: *mut c_void,
    _arg: *mut c_void,
    _timeout: c_uint,
    flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let d = unsafe { handle(sd) }?;
        adapter(adapter_no)?;
        if flags & flag::USE_CALLBACK != 0 {
            return Err(err::FLAG_NOT_IMPLEMENTED);
        }
        // Like Dolphin's library, the connect does not block: callers retry on NO_SUCH_SEGMENT.
        let e = fabric::lookup(&d.dir, node, id)?;
        let rs = RemoteSegment {
            path: CString::new(e.path).map_err(|_| err::SYSTEM)?,
            offset: e.offset,
            size: e.size,
        };
        // SAFETY: the caller's pointer.
        unsafe { give(segment, rs) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn disconnect_segment(segment: *mut RemoteSegment, _flags: c_uint, error: *mut c_uint) {
    // SAFETY: the caller's handle, not used afterwards.
    let r = unsafe { take(segment) }.map(drop);
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn remote_segment_size(segment: *mut RemoteSegment) -> usize {
    // SAFETY: the caller's handle.
    unsafe { handle(segment) }.map_or(0, |s| usize::try_from(s.size).unwrap_or(0))
}

unsafe fn map_remote_segment(
    segment: *mut RemoteSegment,
    map: *mut *mut Map,
    offset: usize,
    size: usize,
    _addr: *mut c_void,
    flags: c_uint,
    error: *mut c_uint,
) -> *mut c_void {
    let r = (|| {
        // SAFETY: the caller's handle.
        let s = unsafe { handle(segment) }?;
        check_map(flags, offset, size, s.size)?;
        if offset % page() != 0 {
            return Err(err::OFFSET_ALIGNMENT);
        }
        let fd = fabric::fetch_fd(&s.path)?;
        let addr = os::map(&fd, s.offset + offset as u64, size)?;
        let m = Map {
            addr,
            len: size,
            owned: true,
        };
        // SAFETY: the caller's pointer.
        let given = unsafe { give(map, m) };
        if given.is_err() {
            // SAFETY: just mapped, never handed out.
            unsafe { os::unmap(addr, size) };
        }
        given.map(|()| addr as *mut c_void)
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, r.err().unwrap_or(err::OK)) };
    r.unwrap_or(std::ptr::null_mut())
}

// --- PIO ---------------------------------------------------------------------------------------

unsafe fn mem_cpy(
    _sequence: *mut Sequence,
    mem: *mut c_void,
    map: *mut Map,
    remote_offset: usize,
    size: usize,
    _flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let m = unsafe { handle(map) }?;
        if remote_offset.checked_add(size).is_none_or(|e| e > m.len) || mem.is_null() {
            return Err(err::OUT_OF_RANGE);
        }
        // SAFETY: the destination lies inside the mapping (checked); the caller promises `size`
        // readable bytes at `mem` (as with Dolphin's library, a bad source faults).
        unsafe { std::ptr::copy_nonoverlapping(mem.cast::<u8>(), (m.addr + remote_offset) as *mut u8, size) };
        Ok(())
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn barrier(_sequence: *mut Sequence, _flags: c_uint) {
    fence(Ordering::SeqCst);
}

unsafe fn create_map_sequence(
    map: *mut Map,
    sequence: *mut *mut Sequence,
    _flags: c_uint,
    error: *mut c_uint,
) {
    // SAFETY: the caller's handle and pointer.
    let r = unsafe { handle(map) }.and_then(|_| unsafe { give(sequence, Sequence) });
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn remove_sequence(sequence: *mut Sequence, _flags: c_uint, error: *mut c_uint) {
    // SAFETY: the caller's handle, not used afterwards.
    let r = unsafe { take(sequence) }.map(drop);
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn check_sequence(sequence: *mut Sequence, _flags: c_uint, error: *mut c_uint) -> c_int {
    fence(Ordering::SeqCst);
    // SAFETY: the caller's handle and pointer.
    let r = unsafe { handle(sequence) }.map(|_| ());
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
    SEQ_OK
}

// --- DMA ---------------------------------------------------------------------------------------

unsafe fn create_dma_queue(
    sd: *mut Desc,
    dq: *mut *mut DmaQueue,
    adapter_no: c_uint,
    max_entries: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        unsafe { handle(sd) }?;
        adapter(adapter_no)?;
        if max_entries == 0 {
            return Err(err::ILLEGAL_PARAMETER);
        }
        let q = DmaQueue {
            state: AtomicU32::new(dma_state::IDLE),
        };
        // SAFETY: the caller's pointer.
        unsafe { give(dq, q) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn remove_dma_queue(dq: *mut DmaQueue, _flags: c_uint, error: *mut c_uint) {
    // SAFETY: the caller's handle, not used afterwards.
    let r = unsafe { take(dq) }.map(drop);
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

/// Runs one transfer on the (synchronous) engine and settles the queue's state.
///
/// # Safety
/// `dq` is a live queue handle; `callback` (if any) is callable with `arg`.
unsafe fn run_dma(
    dq: *mut DmaQueue,
    flags: c_uint,
    callback: DmaCallback,
    arg: *mut c_void,
    copy: impl FnOnce(&RemoteSegment) -> Result<(), u32>,
    remote: &RemoteSegment,
) -> Result<(), u32> {
    // SAFETY: the caller's handle.
    let q = unsafe { handle(dq) }?;
    if flags & !(flag::USE_CALLBACK | flag::DMA_WAIT) != 0 {
        return Err(if flags & flag::DMA_READ != 0 {
            err::FLAG_NOT_IMPLEMENTED
        } else {
            err::ILLEGAL_FLAG
        });
    }
    if q.state.swap(dma_state::POSTED, Ordering::AcqRel) == dma_state::POSTED {
        q.state.store(dma_state::POSTED, Ordering::Release);
        return Err(err::BUSY);
    }
    let r = copy(remote);
    let status = r.err().unwrap_or(err::OK);
    q.state.store(
        if r.is_ok() {
            dma_state::DONE
        } else {
            dma_state::ERROR
        },
        Ordering::Release,
    );
    if flags & flag::USE_CALLBACK != 0
        && let Some(cb) = callback
    {
        // SAFETY: the caller registered this callback for exactly this use.
        unsafe { cb(arg, dq, status) };
    }
    Ok(())
}

fn remote_range(s: &RemoteSegment, offset: usize, size: usize) -> Result<u64, u32> {
    if offset.checked_add(size).is_none_or(|e| e as u64 > s.size) || size == 0 {
        return Err(err::OUT_OF_RANGE);
    }
    Ok(s.offset + offset as u64)
}

unsafe fn start_dma_transfer_mem(
    dq: *mut DmaQueue,
    local: *mut c_void,
    remote: *mut RemoteSegment,
    size: usize,
    remote_offset: usize,
    callback: DmaCallback,
    arg: *mut c_void,
    flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let rs = unsafe { handle(remote) }?;
        let at = remote_range(rs, remote_offset, size)?;
        let copy = |rs: &RemoteSegment| {
            let fd = fabric::fetch_fd(&rs.path)?;
            os::write_from(&fd, local as usize, size, at)
        };
        // SAFETY: the caller's handles.
        unsafe { run_dma(dq, flags, callback, arg, copy, rs) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn start_dma_transfer(
    dq: *mut DmaQueue,
    local: *mut LocalSegment,
    remote: *mut RemoteSegment,
    local_offset: usize,
    size: usize,
    remote_offset: usize,
    callback: DmaCallback,
    arg: *mut c_void,
    flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handles.
        let ls = unsafe { handle(local) }?;
        // SAFETY: the caller's handle.
        let rs = unsafe { handle(remote) }?;
        if !ls.prepared {
            return Err(err::SEGMENT_NOT_PREPARED);
        }
        if local_offset.checked_add(size).is_none_or(|e| e as u64 > ls.size) {
            return Err(err::OUT_OF_RANGE);
        }
        let at = remote_range(rs, remote_offset, size)?;
        let copy = |rs: &RemoteSegment| {
            let fd = fabric::fetch_fd(&rs.path)?;
            match &ls.backing {
                Some(Backing::Registered { addr, .. }) => os::write_from(&fd, addr + local_offset, size, at),
                Some(Backing::Own { fd: src }) => os::copy_file(src, local_offset as u64, &fd, at, size),
                None => Err(err::SEGMENT_NOT_PREPARED),
            }
        };
        // SAFETY: the caller's handles.
        unsafe { run_dma(dq, flags, callback, arg, copy, rs) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn wait_for_dma_queue(
    dq: *mut DmaQueue,
    _timeout: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) -> c_uint {
    // SAFETY: the caller's handle.
    let r = unsafe { handle(dq) }.map(|q| q.state.load(Ordering::Acquire));
    let c = match r {
        // The engine is synchronous: nothing is ever still posted.
        Ok(dma_state::IDLE) => err::ILLEGAL_OPERATION,
        Ok(dma_state::ERROR) => err::TRANSFER_FAILED,
        Ok(_) => err::OK,
        Err(e) => e,
    };
    // SAFETY: the caller's pointer.
    unsafe { put(error, c) };
    r.unwrap_or(dma_state::ERROR)
}

unsafe fn dma_queue_state(dq: *mut DmaQueue) -> c_uint {
    // SAFETY: the caller's handle.
    unsafe { handle(dq) }.map_or(dma_state::ERROR, |q| q.state.load(Ordering::Acquire))
}

// --- Interrupts --------------------------------------------------------------------------------

/// The counter of a mapped interrupt file.
///
/// # Safety
/// `word` is the address of a live mapping of an interrupt file.
unsafe fn counter<'a>(word: usize) -> &'a AtomicU32 {
    // SAFETY: the caller's promise; the file's first 4 bytes are the counter, 4-aligned (page start).
    unsafe { AtomicU32::from_ptr(word as *mut u32) }
}

unsafe fn create_interrupt(
    sd: *mut Desc,
    interrupt: *mut *mut LocalInterrupt,
    adapter_no: c_uint,
    number: *mut c_uint,
    _callback: *mut c_void,
    _arg: *mut c_void,
    flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let d = unsafe { handle(sd) }?;
        adapter(adapter_no)?;
        if flags & flag::USE_CALLBACK != 0 {
            return Err(err::FLAG_NOT_IMPLEMENTED);
        }
        if flags & !flag::FIXED_INTNO != 0 || number.is_null() {
            return Err(err::ILLEGAL_FLAG);
        }
        // SAFETY: checked non-null; the caller's pointer.
        let want = (flags & flag::FIXED_INTNO != 0).then(|| unsafe { number.read() });
        let (no, file, path) = fabric::create_interrupt(&d.dir, d.node, want)?;
        let word = os::map(&OwnedFd::from(file), 0, 4096).inspect_err(|_| fabric::remove_interrupt(&path))?;
        let li = LocalInterrupt {
            path,
            word,
            cancelled: AtomicBool::new(false),
            waiters: AtomicU32::new(0),
        };
        // SAFETY: checked non-null; the caller's pointer.
        unsafe { number.write(no) };
        // SAFETY: the caller's pointer.
        unsafe { give(interrupt, li) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn remove_interrupt(interrupt: *mut LocalInterrupt, _flags: c_uint, error: *mut c_uint) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let li = unsafe { handle(interrupt) }?;
        fabric::remove_interrupt(&li.path);
        li.cancelled.store(true, Ordering::Release);
        // SAFETY: the mapping lives until the handle is freed below.
        let c = unsafe { counter(li.word) };
        os::futex_wake(c, i32::MAX);
        // Waiters in other threads see the cancel and leave before the mapping goes (a wait that
        // starts after this point uses a removed handle: the caller's error, as with Dolphin's).
        while li.waiters.load(Ordering::Acquire) != 0 {
            os::futex_wake(c, i32::MAX);
            std::thread::yield_now();
        }
        // SAFETY: the caller's handle, not used afterwards.
        let li = unsafe { take(interrupt) }?;
        // SAFETY: mapped at creation; the handle is gone.
        unsafe { os::unmap(li.word, 4096) };
        Ok(())
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn wait_for_interrupt(
    interrupt: *mut LocalInterrupt,
    timeout: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let li = unsafe { handle(interrupt) }?;
        li.waiters.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the mapping lives while the handle does.
        let c = unsafe { counter(li.word) };
        let deadline = wait_for(timeout).map(|t| Instant::now() + t);
        let r = loop {
            if li.cancelled.load(Ordering::Acquire) {
                break Err(err::CANCELLED);
            }
            let v = c.load(Ordering::Acquire);
            if v > 0 {
                if c.compare_exchange(v, v - 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break Ok(());
                }
                continue;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                break Err(err::TIMEOUT);
            }
            os::futex_wait(c, 0, left);
        };
        li.waiters.fetch_sub(1, Ordering::AcqRel);
        r
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn connect_interrupt(
    sd: *mut Desc,
    interrupt: *mut *mut RemoteInterrupt,
    node: c_uint,
    adapter_no: c_uint,
    number: c_uint,
    _timeout: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let d = unsafe { handle(sd) }?;
        adapter(adapter_no)?;
        let path = fabric::lookup_interrupt(&d.dir, node, number)?;
        let ri = RemoteInterrupt {
            path: cstring(&path)?,
        };
        // SAFETY: the caller's pointer.
        unsafe { give(interrupt, ri) }
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn disconnect_interrupt(interrupt: *mut RemoteInterrupt, _flags: c_uint, error: *mut c_uint) {
    // SAFETY: the caller's handle, not used afterwards.
    let r = unsafe { take(interrupt) }.map(drop);
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn trigger_interrupt(interrupt: *mut RemoteInterrupt, _flags: c_uint, error: *mut c_uint) {
    let r = (|| {
        // SAFETY: the caller's handle.
        let ri = unsafe { handle(interrupt) }?;
        // Opened and mapped per trigger: the sender keeps no descriptor or mapping of its own.
        let fd = os::open(&ri.path)?;
        let word = os::map(&fd, 0, 4096)?;
        // SAFETY: just mapped.
        let c = unsafe { counter(word) };
        c.fetch_add(1, Ordering::AcqRel);
        os::futex_wake(c, 1);
        // SAFETY: mapped above, used no more.
        unsafe { os::unmap(word, 4096) };
        Ok(())
    })();
    // SAFETY: the caller's pointer.
    unsafe { put(error, code(r)) };
}

unsafe fn get_error_string(error: c_uint) -> *const c_char {
    error_text(error).as_ptr()
}

// --- The exported symbols ----------------------------------------------------------------------

/// Exports each function under Dolphin's two linkage names (thread-safe and single-threaded
/// builds of the headers); the emulation is thread-safe, so both are the same function.
macro_rules! export {
    ($($imp:ident => $st:ident, $mt:ident ($($a:ident: $t:ty),*) $(-> $r:ty)?;)*) => {$(
        /// A SISCI function (see Dolphin's documentation).
        ///
        /// # Safety
        /// As for Dolphin's library: handles made by this library, valid pointers.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $st($($a: $t),*) $(-> $r)? {
            // SAFETY: the caller's promise, passed on.
            unsafe { $imp($($a),*) }
        }
        /// A SISCI function (see Dolphin's documentation).
        ///
        /// # Safety
        /// As for Dolphin's library: handles made by this library, valid pointers.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $mt($($a: $t),*) $(-> $r)? {
            // SAFETY: the caller's promise, passed on.
            unsafe { $imp($($a),*) }
        }
    )*};
}

export! {
    initialize => _SISCI_PUBLIC_FUNC_ST_SCIInitialize, _SISCI_PUBLIC_FUNC_MT_SCIInitialize(flags: c_uint, error: *mut c_uint);
    terminate => _SISCI_PUBLIC_FUNC_ST_SCITerminate, _SISCI_PUBLIC_FUNC_MT_SCITerminate();
    open => _SISCI_PUBLIC_FUNC_ST_SCIOpen, _SISCI_PUBLIC_FUNC_MT_SCIOpen(sd: *mut *mut Desc, flags: c_uint, error: *mut c_uint);
    close => _SISCI_PUBLIC_FUNC_ST_SCIClose, _SISCI_PUBLIC_FUNC_MT_SCIClose(sd: *mut Desc, flags: c_uint, error: *mut c_uint);
    get_local_node_id => _SISCI_PUBLIC_FUNC_ST_SCIGetLocalNodeId, _SISCI_PUBLIC_FUNC_MT_SCIGetLocalNodeId(adapter_no: c_uint, node: *mut c_uint, flags: c_uint, error: *mut c_uint);
    probe_node => _SISCI_PUBLIC_FUNC_ST_SCIProbeNode, _SISCI_PUBLIC_FUNC_MT_SCIProbeNode(sd: *mut Desc, adapter_no: c_uint, node: c_uint, flags: c_uint, error: *mut c_uint) -> c_int;
    create_segment => _SISCI_PUBLIC_FUNC_ST_SCICreateSegment, _SISCI_PUBLIC_FUNC_MT_SCICreateSegment(sd: *mut Desc, segment: *mut *mut LocalSegment, id: c_uint, size: usize, callback: *mut c_void, arg: *mut c_void, flags: c_uint, error: *mut c_uint);
    remove_segment => _SISCI_PUBLIC_FUNC_ST_SCIRemoveSegment, _SISCI_PUBLIC_FUNC_MT_SCIRemoveSegment(segment: *mut LocalSegment, flags: c_uint, error: *mut c_uint);
    register_segment_memory => _SISCI_PUBLIC_FUNC_ST_SCIRegisterSegmentMemory, _SISCI_PUBLIC_FUNC_MT_SCIRegisterSegmentMemory(address: *mut c_void, size: usize, segment: *mut LocalSegment, flags: c_uint, error: *mut c_uint);
    prepare_segment => _SISCI_PUBLIC_FUNC_ST_SCIPrepareSegment, _SISCI_PUBLIC_FUNC_MT_SCIPrepareSegment(segment: *mut LocalSegment, adapter_no: c_uint, flags: c_uint, error: *mut c_uint);
    set_segment_available => _SISCI_PUBLIC_FUNC_ST_SCISetSegmentAvailable, _SISCI_PUBLIC_FUNC_MT_SCISetSegmentAvailable(segment: *mut LocalSegment, adapter_no: c_uint, flags: c_uint, error: *mut c_uint);
    set_segment_unavailable => _SISCI_PUBLIC_FUNC_ST_SCISetSegmentUnavailable, _SISCI_PUBLIC_FUNC_MT_SCISetSegmentUnavailable(segment: *mut LocalSegment, adapter_no: c_uint, flags: c_uint, error: *mut c_uint);
    map_local_segment => _SISCI_PUBLIC_FUNC_ST_SCIMapLocalSegment, _SISCI_PUBLIC_FUNC_MT_SCIMapLocalSegment(segment: *mut LocalSegment, map: *mut *mut Map, offset: usize, size: usize, addr: *mut c_void, flags: c_uint, error: *mut c_uint) -> *mut c_void;
    unmap_segment => _SISCI_PUBLIC_FUNC_ST_SCIUnmapSegment, _SISCI_PUBLIC_FUNC_MT_SCIUnmapSegment(map: *mut Map, flags: c_uint, error: *mut c_uint);
    connect_segment => _SISCI_PUBLIC_FUNC_ST_SCIConnectSegment, _SISCI_PUBLIC_FUNC_MT_SCIConnectSegment(sd: *mut Desc, segment: *mut *mut RemoteSegment, node: c_uint, id: c_uint, adapter_no: c_uint, callback: *mut c_void, arg: *mut c_void, timeout: c_uint, flags: c_uint, error: *mut c_uint);
    disconnect_segment => _SISCI_PUBLIC_FUNC_ST_SCIDisconnectSegment, _SISCI_PUBLIC_FUNC_MT_SCIDisconnectSegment(segment: *mut RemoteSegment, flags: c_uint, error: *mut c_uint);
    remote_segment_size => _SISCI_PUBLIC_FUNC_ST_SCIGetRemoteSegmentSize, _SISCI_PUBLIC_FUNC_MT_SCIGetRemoteSegmentSize(segment: *mut RemoteSegment) -> usize;
    map_remote_segment => _SISCI_PUBLIC_FUNC_ST_SCIMapRemoteSegment, _SISCI_PUBLIC_FUNC_MT_SCIMapRemoteSegment(segment: *mut RemoteSegment, map: *mut *mut Map, offset: usize, size: usize, addr: *mut c_void, flags: c_uint, error: *mut c_uint) -> *mut c_void;
    mem_cpy => _SISCI_PUBLIC_FUNC_ST_SCIMemCpy, _SISCI_PUBLIC_FUNC_MT_SCIMemCpy(sequence: *mut Sequence, mem: *mut c_void, map: *mut Map, remote_offset: usize, size: usize, flags: c_uint, error: *mut c_uint);
    barrier => _SISCI_PUBLIC_FUNC_ST_SCIStoreBarrier, _SISCI_PUBLIC_FUNC_MT_SCIStoreBarrier(sequence: *mut Sequence, flags: c_uint);
    barrier => _SISCI_PUBLIC_FUNC_ST_SCIFlush, _SISCI_PUBLIC_FUNC_MT_SCIFlush(sequence: *mut Sequence, flags: c_uint);
    create_map_sequence => _SISCI_PUBLIC_FUNC_ST_SCICreateMapSequence, _SISCI_PUBLIC_FUNC_MT_SCICreateMapSequence(map: *mut Map, sequence: *mut *mut Sequence, flags: c_uint, error: *mut c_uint);
    remove_sequence => _SISCI_PUBLIC_FUNC_ST_SCIRemoveSequence, _SISCI_PUBLIC_FUNC_MT_SCIRemoveSequence(sequence: *mut Sequence, flags: c_uint, error: *mut c_uint);
    check_sequence => _SISCI_PUBLIC_FUNC_ST_SCIStartSequence, _SISCI_PUBLIC_FUNC_MT_SCIStartSequence(sequence: *mut Sequence, flags: c_uint, error: *mut c_uint) -> c_int;
    check_sequence => _SISCI_PUBLIC_FUNC_ST_SCICheckSequence, _SISCI_PUBLIC_FUNC_MT_SCICheckSequence(sequence: *mut Sequence, flags: c_uint, error: *mut c_uint) -> c_int;
    create_dma_queue => _SISCI_PUBLIC_FUNC_ST_SCICreateDMAQueue, _SISCI_PUBLIC_FUNC_MT_SCICreateDMAQueue(sd: *mut Desc, dq: *mut *mut DmaQueue, adapter_no: c_uint, max_entries: c_uint, flags: c_uint, error: *mut c_uint);
    remove_dma_queue => _SISCI_PUBLIC_FUNC_ST_SCIRemoveDMAQueue, _SISCI_PUBLIC_FUNC_MT_SCIRemoveDMAQueue(dq: *mut DmaQueue, flags: c_uint, error: *mut c_uint);
    start_dma_transfer => _SISCI_PUBLIC_FUNC_ST_SCIStartDmaTransfer, _SISCI_PUBLIC_FUNC_MT_SCIStartDmaTransfer(dq: *mut DmaQueue, local: *mut LocalSegment, remote: *mut RemoteSegment, local_offset: usize, size: usize, remote_offset: usize, callback: DmaCallback, arg: *mut c_void, flags: c_uint, error: *mut c_uint);
    start_dma_transfer_mem => _SISCI_PUBLIC_FUNC_ST_SCIStartDmaTransferMem, _SISCI_PUBLIC_FUNC_MT_SCIStartDmaTransferMem(dq: *mut DmaQueue, local: *mut c_void, remote: *mut RemoteSegment, size: usize, remote_offset: usize, callback: DmaCallback, arg: *mut c_void, flags: c_uint, error: *mut c_uint);
    wait_for_dma_queue => _SISCI_PUBLIC_FUNC_ST_SCIWaitForDMAQueue, _SISCI_PUBLIC_FUNC_MT_SCIWaitForDMAQueue(dq: *mut DmaQueue, timeout: c_uint, flags: c_uint, error: *mut c_uint) -> c_uint;
    dma_queue_state => _SISCI_PUBLIC_FUNC_ST_SCIDMAQueueState, _SISCI_PUBLIC_FUNC_MT_SCIDMAQueueState(dq: *mut DmaQueue) -> c_uint;
    create_interrupt => _SISCI_PUBLIC_FUNC_ST_SCICreateInterrupt, _SISCI_PUBLIC_FUNC_MT_SCICreateInterrupt(sd: *mut Desc, interrupt: *mut *mut LocalInterrupt, adapter_no: c_uint, number: *mut c_uint, callback: *mut c_void, arg: *mut c_void, flags: c_uint, error: *mut c_uint);
    remove_interrupt => _SISCI_PUBLIC_FUNC_ST_SCIRemoveInterrupt, _SISCI_PUBLIC_FUNC_MT_SCIRemoveInterrupt(interrupt: *mut LocalInterrupt, flags: c_uint, error: *mut c_uint);
    wait_for_interrupt => _SISCI_PUBLIC_FUNC_ST_SCIWaitForInterrupt, _SISCI_PUBLIC_FUNC_MT_SCIWaitForInterrupt(interrupt: *mut LocalInterrupt, timeout: c_uint, flags: c_uint, error: *mut c_uint);
    connect_interrupt => _SISCI_PUBLIC_FUNC_ST_SCIConnectInterrupt, _SISCI_PUBLIC_FUNC_MT_SCIConnectInterrupt(sd: *mut Desc, interrupt: *mut *mut RemoteInterrupt, node: c_uint, adapter_no: c_uint, number: c_uint, timeout: c_uint, flags: c_uint, error: *mut c_uint);
    disconnect_interrupt => _SISCI_PUBLIC_FUNC_ST_SCIDisconnectInterrupt, _SISCI_PUBLIC_FUNC_MT_SCIDisconnectInterrupt(interrupt: *mut RemoteInterrupt, flags: c_uint, error: *mut c_uint);
    trigger_interrupt => _SISCI_PUBLIC_FUNC_ST_SCITriggerInterrupt, _SISCI_PUBLIC_FUNC_MT_SCITriggerInterrupt(interrupt: *mut RemoteInterrupt, flags: c_uint, error: *mut c_uint);
    get_error_string => _SISCI_PUBLIC_FUNC_ST_SCIGetErrorString, _SISCI_PUBLIC_FUNC_MT_SCIGetErrorString(error: c_uint) -> *const c_char;
}

unsafe fn set_segment_available(
    segment: *mut LocalSegment,
    adapter_no: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) {
    // SAFETY: the caller's handle and pointer.
    unsafe { set_available(segment, adapter_no, true, error) };
}

unsafe fn set_segment_unavailable(
    segment: *mut LocalSegment,
    adapter_no: c_uint,
    _flags: c_uint,
    error: *mut c_uint,
) {
    // SAFETY: the caller's handle and pointer.
    unsafe { set_available(segment, adapter_no, false, error) };
}

/// The flag values, as Dolphin's library exports them (`extern const unsigned int`).
macro_rules! constants {
    ($($name:ident = $v:expr;)*) => {$(
        /// A SISCI constant.
        #[unsafe(no_mangle)]
        pub static $name: c_uint = $v;
    )*};
}

/// Not a SISCI symbol: tells om's transport that this library's DMA engine is the CPU (a
/// synchronous kernel copy), so DMA saves it no work.
#[unsafe(no_mangle)]
pub static _SISCI_EMU_DMA_ENGINE_IS_CPU: c_uint = 1;

constants! {
    _SISCI_PUBLIC_CONST_SCI_FLAG_USE_CALLBACK = flag::USE_CALLBACK;
    _SISCI_PUBLIC_CONST_SCI_FLAG_EMPTY = flag::EMPTY;
    _SISCI_PUBLIC_CONST_SCI_FLAG_FIXED_INTNO = flag::FIXED_INTNO;
    _SISCI_PUBLIC_CONST_SCI_FLAG_READONLY_MAP = flag::READONLY_MAP;
    _SISCI_PUBLIC_CONST_SCI_FLAG_DMA_WAIT = flag::DMA_WAIT;
    _SISCI_PUBLIC_CONST_SCI_FLAG_DMA_READ = flag::DMA_READ;
    _SISCI_PUBLIC_CONST_SCI_FLAG_AUTO_ID = flag::AUTO_ID;
    _SISCI_PUBLIC_CONST_SCI_INFINITE_TIMEOUT = flag::INFINITE_TIMEOUT;
}
