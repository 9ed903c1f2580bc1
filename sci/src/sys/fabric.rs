//! Safe handles on SISCI objects: each owns its SISCI handle and releases it when dropped.

use std::ffi::{c_uint, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use om_transport::api::Exportable;
use om_transport::sys::{Landing, ReadableBatch};

use super::api::{Api, Handle};
use crate::error::{Code, SciError};

/// Calls SISCI function `f` with an error out-parameter; `Err` with the code it set.
fn call<R>(name: &'static str, f: impl FnOnce(*mut c_uint) -> R) -> Result<R, SciError> {
    let mut e: c_uint = 0;
    let r = f(&raw mut e);
    match Code::from_raw(e) {
        None => Ok(r),
        Some(code) => Err(SciError::Call { call: name, code }),
    }
}

/// An open SISCI descriptor (`SCIOpen`). Dolphin's thread-safe library allows calls on it from any
/// thread.
#[derive(Debug)]
pub struct Sisci {
    api: Arc<Api>,
    desc: Handle,
}

// SAFETY: the descriptor is an opaque handle of the thread-safe library (the loader binds the `_MT_`
// entry points, never the single-threaded ones), which allows calls from any thread.
unsafe impl Send for Sisci {}
// SAFETY: as above: omd's sessions share one descriptor, which the thread-safe library allows.
unsafe impl Sync for Sisci {}

impl Sisci {
    /// Loads the library (`library`, or the usual places: see [`Api::load`]), initializes it and
    /// opens a descriptor.
    ///
    /// # Errors
    /// No library, or `SCIInitialize`/`SCIOpen` failing.
    pub fn open(library: Option<&str>) -> Result<Self, SciError> {
        let api = Arc::new(Api::load(library)?);
        // SAFETY: SCIInitialize takes flags 0 and an error out-parameter.
        call("SCIInitialize", |e| unsafe { (api.initialize)(0, e) })?;
        let mut desc: Handle = std::ptr::null_mut();
        // SAFETY: SCIOpen writes the new descriptor into `desc`.
        call("SCIOpen", |e| unsafe { (api.open)(&raw mut desc, 0, e) })?;
        Ok(Self { api, desc })
    }

    /// The library's path.
    #[must_use]
    pub fn library(&self) -> &str {
        &self.api.path
    }

    /// True when the library's DMA engine is the CPU itself (the emulation declares so).
    #[must_use]
    pub fn engine_is_cpu(&self) -> bool {
        self.api.engine_is_cpu
    }

    /// This node's id on the fabric (adapter 0).
    ///
    /// # Errors
    /// `SCIGetLocalNodeId` failing.
    pub fn node(&self) -> Result<u32, SciError> {
        let mut id: c_uint = 0;
        // SAFETY: writes the node id into `id`.
        call("SCIGetLocalNodeId", |e| unsafe {
            (self.api.get_local_node_id)(0, &raw mut id, 0, e)
        })?;
        Ok(id)
    }

    /// Creates a local segment of `size` bytes with its own memory, prepared, available and mapped
    /// here; returns it with its id (one of `ids`, the first that is free).
    ///
    /// # Errors
    /// Every id used, or a SISCI call failing.
    pub fn segment(&self, ids: impl Iterator<Item = u32>, size: usize) -> Result<LocalSegment, SciError> {
        let mut last = SciError::Call {
            call: "SCICreateSegment",
            code: Code::SegmentIdUsed,
        };
        for id in ids {
            match self.create_segment(id, size, 0) {
                Ok(mut s) => {
                    s.publish()?;
                    s.map_local()?;
                    return Ok(s);
                }
                Err(
                    e @ SciError::Call {
                        code: Code::SegmentIdUsed,
                        ..
                    },
                ) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn create_segment(&self, id: u32, size: usize, flags: c_uint) -> Result<LocalSegment, SciError> {
        let mut h: Handle = std::ptr::null_mut();
        let null = std::ptr::null_mut();
        // SAFETY: writes the new segment into `h`; no callback.
        call("SCICreateSegment", |e| unsafe {
            (self.api.create_segment)(self.desc, &raw mut h, id, size, null, null, flags, e)
        })?;
        Ok(LocalSegment {
            api: Arc::clone(&self.api),
            h,
            id,
            size,
            map: None,
            published: false,
        })
    }

    /// Connects to segment `id` of `node`, retrying while it does not exist yet (Dolphin's connect
    /// does not wait), for at most `timeout`.
    ///
    /// # Errors
    /// The segment did not appear, or another SISCI error.
    pub fn connect(&self, node: u32, id: u32, timeout: Duration) -> Result<RemoteSegment, SciError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut h: Handle = std::ptr::null_mut();
            let null = std::ptr::null_mut();
            let inf = self.api.infinite_timeout;
            // SAFETY: writes the connected segment into `h`; no callback.
            let r = call("SCIConnectSegment", |e| unsafe {
                (self.api.connect_segment)(self.desc, &raw mut h, node, id, 0, null, null, inf, 0, e)
            });
            match r {
                Ok(()) => {
                    // SAFETY: a connected segment.
                    let size = unsafe { (self.api.get_remote_segment_size)(h) };
                    return Ok(RemoteSegment {
                        api: Arc::clone(&self.api),
                        h,
                        size,
                        map: None,
                    });
                }
                Err(SciError::Call {
                    code: Code::NoSuchSegment | Code::Timeout,
                    ..
                }) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates a local interrupt with a number the library picks.
    ///
    /// # Errors
    /// `SCICreateInterrupt` failing.
    pub fn interrupt(&self) -> Result<LocalInterrupt, SciError> {
        let mut h: Handle = std::ptr::null_mut();
        let mut no: c_uint = 0;
        let null = std::ptr::null_mut();
        // SAFETY: writes the interrupt and its number; no callback.
        call("SCICreateInterrupt", |e| unsafe {
            (self.api.create_interrupt)(self.desc, &raw mut h, 0, &raw mut no, null, null, 0, e)
        })?;
        Ok(LocalInterrupt {
            api: Arc::clone(&self.api),
            h,
            no,
        })
    }

    /// Connects to interrupt `no` of `node`.
    ///
    /// # Errors
    /// `SCIConnectInterrupt` failing.
    pub fn connect_interrupt(&self, node: u32, no: u32) -> Result<RemoteInterrupt, SciError> {
        let mut h: Handle = std::ptr::null_mut();
        let inf = self.api.infinite_timeout;
        // SAFETY: writes the connected interrupt into `h`.
        call("SCIConnectInterrupt", |e| unsafe {
            (self.api.connect_interrupt)(self.desc, &raw mut h, node, 0, no, inf, 0, e)
        })?;
        Ok(RemoteInterrupt {
            api: Arc::clone(&self.api),
            h,
        })
    }

    /// A DMA queue, when the library can DMA from user memory.
    ///
    /// # Errors
    /// `SCICreateDMAQueue` failing.
    pub fn dma_queue(&self) -> Result<Option<DmaQueue>, SciError> {
        if self.api.start_dma_transfer_mem.is_none() {
            return Ok(None);
        }
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: writes the queue into `h`.
        call("SCICreateDMAQueue", |e| unsafe {
            (self.api.create_dma_queue)(self.desc, &raw mut h, 0, 1, 0, e)
        })?;
        Ok(Some(DmaQueue {
            api: Arc::clone(&self.api),
            h,
        }))
    }

    /// Exports `image`'s memory as segments of `1 << shift` bytes, ids from `ids`.
    ///
    /// # Errors
    /// Too many windows, or a SISCI call failing (what was exported is withdrawn).
    pub fn export_windows(
        &self,
        image: Arc<dyn Exportable>,
        shift: u32,
        max: usize,
        ids: &mut impl Iterator<Item = u32>,
    ) -> Result<Windows, SciError> {
        let memory = image.memory();
        let (base, len) = (memory.as_ptr() as usize, memory.len());
        let window = 1usize << shift;
        let count = len.div_ceil(window);
        if count > max {
            return Err(SciError::TooLarge {
                bytes: len as u64,
                max,
            });
        }
        let mut segments = Vec::with_capacity(count);
        for k in 0..count {
            let size = window.min(len - k * window);
            let mut seg = loop {
                let id = ids.next().ok_or(SciError::Call {
                    call: "SCICreateSegment",
                    code: Code::SegmentIdUsed,
                })?;
                match self.create_segment(id, size, self.api.flag_empty) {
                    Ok(s) => break s,
                    Err(SciError::Call {
                        code: Code::SegmentIdUsed,
                        ..
                    }) => {}
                    Err(e) => return Err(e),
                }
            };
            let at = (base + k * window) as *mut c_void;
            // SAFETY: `at..at + size` lies inside the image memory, which `Windows` keeps alive
            // (it holds `image`) until every segment is removed (they drop first).
            call("SCIRegisterSegmentMemory", |e| unsafe {
                (self.api.register_segment_memory)(at, size, seg.h, 0, e)
            })?;
            seg.publish()?;
            segments.push(seg);
        }
        Ok(Windows {
            segments,
            _image: image,
        })
    }
}

impl Drop for Sisci {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours; every object made through it holds the library, not it.
        let _ = call("SCIClose", |e| unsafe { (self.api.close)(self.desc, 0, e) });
    }
}

/// A local segment, removed (after being made unavailable and unmapped) when dropped.
#[derive(Debug)]
pub struct LocalSegment {
    api: Arc<Api>,
    h: Handle,
    id: u32,
    size: usize,
    map: Option<(Handle, usize)>,
    published: bool,
}

// SAFETY: an opaque handle of the thread-safe library, and a mapping address.
unsafe impl Send for LocalSegment {}
// SAFETY: as above; the mapping is accessed through atomics and copies only.
unsafe impl Sync for LocalSegment {}

impl LocalSegment {
    /// The segment id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.id
    }

    fn publish(&mut self) -> Result<(), SciError> {
        // SAFETY: a segment of ours, adapter 0.
        call("SCIPrepareSegment", |e| unsafe {
            (self.api.prepare_segment)(self.h, 0, 0, e)
        })?;
        // SAFETY: as above.
        call("SCISetSegmentAvailable", |e| unsafe {
            (self.api.set_segment_available)(self.h, 0, 0, e)
        })?;
        self.published = true;
        Ok(())
    }

    fn map_local(&mut self) -> Result<(), SciError> {
        let mut m: Handle = std::ptr::null_mut();
        let null = std::ptr::null_mut();
        let size = self.size;
        // SAFETY: maps the whole segment; writes the map handle into `m`.
        let p = call("SCIMapLocalSegment", |e| unsafe {
            (self.api.map_local_segment)(self.h, &raw mut m, 0, size, null, 0, e)
        })?;
        self.map = Some((m, p as usize));
        Ok(())
    }

    /// The segment's memory, as mapped here.
    #[must_use]
    pub fn view(&self) -> Option<View<'_>> {
        self.map.and_then(|(_, addr)| View::new(addr, self.size))
    }
}

impl Drop for LocalSegment {
    fn drop(&mut self) {
        if let Some((m, _)) = self.map.take() {
            // SAFETY: our map handle; `view`s borrow `self`, so none is alive.
            let _ = call("SCIUnmapSegment", |e| unsafe {
                (self.api.unmap_segment)(m, 0, e)
            });
        }
        if self.published {
            // SAFETY: a segment of ours.
            let _ = call("SCISetSegmentUnavailable", |e| unsafe {
                (self.api.set_segment_unavailable)(self.h, 0, 0, e)
            });
        }
        // SAFETY: a segment of ours, not used afterwards.
        let _ = call("SCIRemoveSegment", |e| unsafe {
            (self.api.remove_segment)(self.h, 0, e)
        });
    }
}

/// Image memory exported as window segments; the segments are withdrawn before the image is let go.
#[derive(Debug)]
pub struct Windows {
    segments: Vec<LocalSegment>,
    _image: Arc<dyn Exportable>,
}

impl Windows {
    /// The segment id of each window.
    #[must_use]
    pub fn ids(&self) -> Vec<u32> {
        self.segments.iter().map(LocalSegment::id).collect()
    }
}

/// A connected remote segment, disconnected (after unmapping) when dropped.
#[derive(Debug)]
pub struct RemoteSegment {
    api: Arc<Api>,
    h: Handle,
    size: usize,
    map: Option<RemoteMap>,
}

/// A mapping of a remote segment, with the map sequence its stores and barriers go through.
#[derive(Debug, Clone, Copy)]
struct RemoteMap {
    map: Handle,
    sequence: Handle,
    addr: usize,
}

// SAFETY: an opaque handle of the thread-safe library, and a mapping address.
unsafe impl Send for RemoteSegment {}
// SAFETY: as above; `SCIMemCpy` and stores into the mapping from several threads are allowed by the
// thread-safe library, and the mapping is only written through the kernel or copies.
unsafe impl Sync for RemoteSegment {}

impl RemoteSegment {
    /// Its size in bytes.
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }

    /// Maps the whole segment here (once).
    ///
    /// # Errors
    /// `SCIMapRemoteSegment` failing.
    pub fn map(&mut self) -> Result<(), SciError> {
        if self.map.is_some() {
            return Ok(());
        }
        let mut m: Handle = std::ptr::null_mut();
        let null = std::ptr::null_mut();
        let size = self.size;
        // SAFETY: maps the whole segment; writes the map handle into `m`.
        let p = call("SCIMapRemoteSegment", |e| unsafe {
            (self.api.map_remote_segment)(self.h, &raw mut m, 0, size, null, 0, e)
        })?;
        let mut sequence: Handle = std::ptr::null_mut();
        // SAFETY: our map handle; writes the new sequence into `sequence`.
        let seq = call("SCICreateMapSequence", |e| unsafe {
            (self.api.create_map_sequence)(m, &raw mut sequence, 0, e)
        });
        if let Err(e) = seq {
            // SAFETY: the map just made, not used afterwards.
            let _ = call("SCIUnmapSegment", |e| unsafe {
                (self.api.unmap_segment)(m, 0, e)
            });
            return Err(e);
        }
        self.map = Some(RemoteMap {
            map: m,
            sequence,
            addr: p as usize,
        });
        Ok(())
    }

    /// The mapped range of this process (never part of an image).
    #[must_use]
    pub fn mapping(&self) -> Option<std::ops::Range<u64>> {
        self.map.map(|m| m.addr as u64..(m.addr + self.size) as u64)
    }

    /// The mapped memory.
    #[must_use]
    pub fn view(&self) -> Option<View<'_>> {
        self.map.and_then(|m| View::new(m.addr, self.size))
    }

    /// PIO: copies `bytes` to `offset` (`SCIMemCpy`).
    ///
    /// # Errors
    /// Not mapped, or `SCIMemCpy` failing (out of range).
    pub fn mem_cpy(&self, offset: usize, bytes: &[u8]) -> Result<(), SciError> {
        let m = self.map.ok_or(SciError::Call {
            call: "SCIMemCpy",
            code: Code::SegmentNotConnected,
        })?;
        let src = bytes.as_ptr().cast_mut().cast::<c_void>();
        // SAFETY: `bytes.len()` readable bytes at `src` (the library only reads them); the library
        // checks the remote range against the mapping.
        call("SCIMemCpy", |e| unsafe {
            (self.api.mem_cpy)(m.sequence, src, m.map, offset, bytes.len(), 0, e)
        })
    }

    /// Orders the stores so far before later ones and pushes them out (`SCIStoreBarrier`,
    /// `SCIFlush`).
    pub fn barrier(&self) {
        let sequence = self.map.map_or(std::ptr::null_mut(), |m| m.sequence);
        // SAFETY: the map sequence of this segment's mapping (null before it is mapped), no flags.
        unsafe { (self.api.store_barrier)(sequence, 0) };
        // SAFETY: as above.
        unsafe { (self.api.flush)(sequence, 0) };
    }
}

impl Drop for RemoteSegment {
    fn drop(&mut self) {
        if let Some(m) = self.map.take() {
            // SAFETY: our sequence, not used afterwards.
            let _ = call("SCIRemoveSequence", |e| unsafe {
                (self.api.remove_sequence)(m.sequence, 0, e)
            });
            // SAFETY: our map handle; views borrow `self`, so none is alive.
            let _ = call("SCIUnmapSegment", |e| unsafe {
                (self.api.unmap_segment)(m.map, 0, e)
            });
        }
        // SAFETY: our connection, not used afterwards.
        let _ = call("SCIDisconnectSegment", |e| unsafe {
            (self.api.disconnect_segment)(self.h, 0, e)
        });
    }
}

/// Mapped segment memory (local or remote): written by the other side at any time, so only read
/// through atomics and copies.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    addr: usize,
    len: usize,
    _owner: std::marker::PhantomData<&'a ()>,
}

impl<'a> View<'a> {
    /// A view of a mapping at `addr`; `None` unless 8-byte aligned (mappings are page-aligned).
    fn new(addr: usize, len: usize) -> Option<Self> {
        (addr % 8 == 0 && addr != 0).then_some(Self {
            addr,
            len,
            _owner: std::marker::PhantomData,
        })
    }

    /// The `len` bytes at `off` as a landing zone for kernel copies (`None` outside the view).
    #[must_use]
    pub fn zone(&self, off: usize, len: usize) -> Option<Landing<'a>> {
        // SAFETY: the mapping is writable and lives as long as its segment, which `'a` borrows; no
        // Rust reference covers it.
        let all = unsafe { Landing::new(self.addr, self.len) };
        all.part(off, len)
    }

    fn word(&self, off: usize) -> Option<&'a AtomicU64> {
        (off % 8 == 0 && off + 8 <= self.len).then(|| {
            // SAFETY: 8 aligned bytes inside the mapping, which lives for `'a`; shared memory is only
            // accessed atomically here.
            unsafe { AtomicU64::from_ptr((self.addr + off) as *mut u64) }
        })
    }

    /// Reads the 8-byte word at `off` (acquire).
    #[must_use]
    pub fn load(&self, off: usize) -> Option<u64> {
        self.word(off).map(|w| w.load(Ordering::Acquire))
    }

    /// Writes the 8-byte word at `off` (release).
    pub fn store(&self, off: usize, v: u64) -> bool {
        self.word(off).map(|w| w.store(v, Ordering::Release)).is_some()
    }

    /// Copies `buf.len()` bytes at `off` out of the view.
    #[must_use]
    pub fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        if off.checked_add(buf.len()).is_none_or(|e| e > self.len) {
            return false;
        }
        // SAFETY: inside the mapping (checked); the peer may write it meanwhile, which yields
        // arbitrary bytes that the caller validates (it never trusts them).
        unsafe { std::ptr::copy_nonoverlapping((self.addr + off) as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }
}

/// A DMA queue; removed when dropped.
#[derive(Debug)]
pub struct DmaQueue {
    api: Arc<Api>,
    h: Handle,
}

// SAFETY: an opaque handle of the thread-safe library.
unsafe impl Send for DmaQueue {}

impl DmaQueue {
    /// DMAs `len` bytes of this process's memory at `addr` (inside one run of `batch`) to `offset`
    /// of `remote`, and waits for the transfer.
    ///
    /// # Errors
    /// A range outside the batch, or the transfer failing (for instance: the application unmapped
    /// the memory; the engine reports it instead of reading it).
    pub fn write(
        &self,
        batch: &ReadableBatch<'_>,
        addr: u64,
        len: usize,
        remote: &RemoteSegment,
        offset: usize,
    ) -> Result<(), SciError> {
        let inside = batch
            .runs()
            .iter()
            .any(|r| r.start <= addr && addr.saturating_add(len as u64) <= r.end);
        let Some(start) = self.api.start_dma_transfer_mem.filter(|_| inside) else {
            return Err(SciError::Call {
                call: "SCIStartDmaTransferMem",
                code: Code::IllegalAddress,
            });
        };
        let src = usize::try_from(addr).unwrap_or(usize::MAX) as *mut c_void;
        let null = std::ptr::null_mut();
        // SAFETY: the source is this process's memory inside the batch's runs (checked), which the
        // engine reads by DMA (a pinning driver, or the emulation's kernel copy) and never through a
        // Rust reference; the library checks the remote range.
        call("SCIStartDmaTransferMem", |e| unsafe {
            start(self.h, src, remote.h, len, offset, None, null, 0, e)
        })?;
        let inf = self.api.infinite_timeout;
        // SAFETY: our queue.
        call("SCIWaitForDMAQueue", |e| unsafe {
            (self.api.wait_for_dma_queue)(self.h, inf, 0, e)
        })
        .map(|_| ())
    }
}

impl Drop for DmaQueue {
    fn drop(&mut self) {
        // SAFETY: our queue, not used afterwards.
        let _ = call("SCIRemoveDMAQueue", |e| unsafe {
            (self.api.remove_dma_queue)(self.h, 0, e)
        });
    }
}

/// A local interrupt; removed when dropped.
#[derive(Debug)]
pub struct LocalInterrupt {
    api: Arc<Api>,
    h: Handle,
    no: u32,
}

// SAFETY: an opaque handle of the thread-safe library.
unsafe impl Send for LocalInterrupt {}
// SAFETY: as above; waits from several threads are allowed by the API.
unsafe impl Sync for LocalInterrupt {}

impl LocalInterrupt {
    /// The interrupt number.
    #[must_use]
    pub fn number(&self) -> u32 {
        self.no
    }

    /// Waits for the interrupt at most `timeout`; `false` when it did not come.
    ///
    /// # Errors
    /// `SCIWaitForInterrupt` failing otherwise.
    pub fn wait(&self, timeout: Duration) -> Result<bool, SciError> {
        let ms = c_uint::try_from(timeout.as_millis())
            .unwrap_or(c_uint::MAX - 1)
            .max(1);
        // SAFETY: our interrupt.
        match call("SCIWaitForInterrupt", |e| unsafe {
            (self.api.wait_for_interrupt)(self.h, ms, 0, e)
        }) {
            Ok(()) => Ok(true),
            Err(SciError::Call {
                code: Code::Timeout, ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LocalInterrupt {
    fn drop(&mut self) {
        // SAFETY: our interrupt, not used afterwards.
        let _ = call("SCIRemoveInterrupt", |e| unsafe {
            (self.api.remove_interrupt)(self.h, 0, e)
        });
    }
}

/// A connection to a remote interrupt; disconnected when dropped.
#[derive(Debug)]
pub struct RemoteInterrupt {
    api: Arc<Api>,
    h: Handle,
}

// SAFETY: an opaque handle of the thread-safe library.
unsafe impl Send for RemoteInterrupt {}
// SAFETY: as above; triggering from several threads is allowed by the API.
unsafe impl Sync for RemoteInterrupt {}

impl RemoteInterrupt {
    /// Triggers the interrupt.
    ///
    /// # Errors
    /// `SCITriggerInterrupt` failing.
    pub fn trigger(&self) -> Result<(), SciError> {
        // SAFETY: our connection.
        call("SCITriggerInterrupt", |e| unsafe {
            (self.api.trigger_interrupt)(self.h, 0, e)
        })
    }
}

impl Drop for RemoteInterrupt {
    fn drop(&mut self) {
        // SAFETY: our connection, not used afterwards.
        let _ = call("SCIDisconnectInterrupt", |e| unsafe {
            (self.api.disconnect_interrupt)(self.h, 0, e)
        });
    }
}
