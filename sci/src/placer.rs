//! The sending side: pages go from the application's memory into the receiver's windows, by PIO
//! (a kernel copy into the mapped remote segment; CPU stores that checksum on the way for a running
//! application's pages; `SCIMemCpy` for copies) or, for large pieces, by DMA straight from the
//! application's memory; each batch's descriptor follows through the mailbox.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use om_transport::TransportError;
use om_transport::api::{Placer, Source};
use om_transport::sys::ReadableBatch;
use om_transport::sys::mem::{ReadBuffer, mark_gone};
use om_transport::wire::{Placement, caps};

use crate::error::SciError;
use crate::mailbox;
use crate::sys::{DmaQueue, RemoteInterrupt, RemoteSegment, Sisci};

/// Pieces of at least this many bytes go by DMA when the library offers it.
pub const DMA_MIN: usize = 256 << 10;

/// How a running application's pages (memory it may unmap meanwhile) are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Racy {
    /// Each page is read once through the kernel into a buffer in cache, then stored from there by
    /// PIO stores that checksum each word on the way: one read of the application's memory, one
    /// pass over the buffer, all of it done by the CPU.
    ReadOnce,
    /// Checksums from a kernel copy, then pieces of [`DMA_MIN`] bytes and more by DMA straight from
    /// the application's memory (the adapter reads it while the CPU checksums the next batch), the
    /// rest by PIO.
    Dma,
}

impl Racy {
    /// The default for a library: DMA when its engine is an adapter's, read-once when the engine is
    /// the CPU (the emulation says so: its DMA is a synchronous kernel copy) or there is no DMA.
    /// `OM_SCI_DMA=on|off` overrides.
    fn choose(sci: &Sisci, dma: bool) -> Self {
        match std::env::var("OM_SCI_DMA").as_deref() {
            Ok("on") if dma => Self::Dma,
            Ok("off") => Self::ReadOnce,
            _ if dma && !sci.engine_is_cpu() => Self::Dma,
            _ => Self::ReadOnce,
        }
    }
}

/// The receiver's exported objects, connected; shared by a placer and its forks.
#[derive(Debug)]
struct Link {
    key: (u32, u32, u32, Vec<u32>),
    mailbox: RemoteSegment,
    doorbell: RemoteInterrupt,
    windows: Vec<RemoteSegment>,
    /// Descriptors posted; held while one is posted (one producer at a time).
    head: Mutex<u64>,
}

/// Window `window` of `link`, if it holds `len` bytes at `offset`.
fn window_of(link: Option<&Link>, window: usize, offset: u64, len: u64) -> Result<&RemoteSegment, SciError> {
    link.and_then(|l| l.windows.get(window))
        .filter(|w| offset.checked_add(len).is_some_and(|e| e <= w.size() as u64))
        .ok_or(SciError::NoWindow { window, offset, len })
}

/// Places pages into a receiver's image over SISCI.
#[derive(Debug)]
pub struct SciPlacer {
    link: Option<Arc<Link>>,
    dma: Option<DmaQueue>,
    sci: Arc<Sisci>,
    page_size: usize,
    timeout: Duration,
    /// Bytes placed by DMA and by PIO (for the benchmark and the logs).
    pub placed: (u64, u64),
    /// Where racy memory is read (once) before it is stored: small enough to stay in cache.
    /// Made when the placer attaches (after the migration's first memory map, like the windows).
    bounce: Option<ReadBuffer>,
    /// How racy memory is placed.
    racy: Racy,
}

impl SciPlacer {
    /// Loads the SISCI library and opens the fabric. Nothing is connected until the receiver's
    /// placement arrives.
    ///
    /// # Errors
    /// No SISCI library, or the fabric failing.
    pub fn open() -> Result<Self, SciError> {
        Self::open_with(None)
    }

    /// Like `open`, with the SISCI library at `library`.
    ///
    /// # Errors
    /// As `open`.
    pub fn open_with(library: Option<&str>) -> Result<Self, SciError> {
        let sci = Sisci::open(library)?;
        let dma = sci.dma_queue()?;
        let racy = Racy::choose(&sci, dma.is_some());
        Ok(Self {
            link: None,
            dma,
            sci: Arc::new(sci),
            page_size: om_transport::sys::page_size(),
            timeout: Duration::from_secs(60),
            placed: (0, 0),
            bounce: None,
            racy,
        })
    }

    /// Places racy memory as `racy` says (DMA only where the library can).
    #[must_use]
    pub fn with_racy(mut self, racy: Racy) -> Self {
        self.racy = if self.dma.is_some() { racy } else { Racy::ReadOnce };
        self
    }

    /// How racy memory is placed.
    #[must_use]
    pub fn racy(&self) -> Racy {
        self.racy
    }

    fn connect(&self, p: &Placement) -> Result<Link, SciError> {
        let wait = Duration::from_secs(5);
        let mut mailbox = self.sci.connect(p.node, p.mailbox, wait)?;
        mailbox.map()?;
        if mailbox.size() < mailbox::BYTES || !mailbox.view().is_some_and(|v| mailbox::is_initialized(&v)) {
            return Err(SciError::Mailbox(
                "the receiver's mailbox is not an om mailbox".into(),
            ));
        }
        let doorbell = self.sci.connect_interrupt(p.node, p.doorbell)?;
        let mut windows = Vec::with_capacity(p.windows.len());
        for &id in &p.windows {
            let mut w = self.sci.connect(p.node, id, wait)?;
            w.map()?;
            windows.push(w);
        }
        Ok(Link {
            key: (p.node, p.mailbox, p.doorbell, p.windows.clone()),
            mailbox,
            doorbell,
            windows,
            head: Mutex::new(0),
        })
    }

    fn window(&self, window: usize, offset: u64, len: u64) -> Result<&RemoteSegment, SciError> {
        window_of(self.link.as_deref(), window, offset, len)
    }

    fn place(&mut self, src: Source<'_>, window: usize, offset: u64) -> Result<(), SciError> {
        let len = src.len();
        let w = self.window(window, offset, len)?;
        let (off, n) = (
            usize::try_from(offset).unwrap_or(usize::MAX),
            usize::try_from(len).unwrap_or(usize::MAX),
        );
        match src {
            Source::Bytes(b) => {
                w.mem_cpy(off, b)?;
                self.placed.1 += len;
            }
            Source::Memory { batch, addr, .. } => {
                if n >= DMA_MIN
                    && let Some(q) = &self.dma
                {
                    match q.write(batch, addr, n, w, off) {
                        Ok(()) => {
                            self.placed.0 += len;
                            return Ok(());
                        }
                        // The application unmapped part of it: PIO reads what is left.
                        Err(e) => tracing::debug!(error = %e, addr, "DMA failed, placing by PIO"),
                    }
                }
                let zone = w.view().and_then(|v| v.zone(off, n)).ok_or(SciError::NoWindow {
                    window,
                    offset,
                    len,
                })?;
                batch
                    .store(addr, &zone, self.page_size)
                    .map_err(|e| SciError::Local(format!("storing pages by PIO: {e}")))?;
                self.placed.1 += len;
            }
        }
        Ok(())
    }

    /// Racy memory: each chunk is read once through the kernel into the (cache-resident) bounce
    /// buffer, then stored from there by PIO, checksummed on the way (one pass over the buffer).
    fn place_summed(
        &mut self,
        batch: &ReadableBatch<'_>,
        addr: u64,
        len: u64,
        window: usize,
        offset: u64,
        sums: &mut Vec<u32>,
    ) -> Result<(), SciError> {
        let no_window = || SciError::NoWindow { window, offset, len };
        let view = window_of(self.link.as_deref(), window, offset, len)?
            .view()
            .ok_or_else(no_window)?;
        let bounce = self.bounce.as_mut().ok_or(SciError::NotAttached)?;
        let chunk = bounce.len();
        let mut done = 0u64;
        let mut gone = Vec::new();
        while done < len {
            let n = usize::try_from(len - done).map_or(chunk, |rest| rest.min(chunk));
            gone.clear();
            let bytes = bounce
                .read(batch, addr + done, n, self.page_size, &mut gone)
                .map_err(|e| SciError::Local(format!("reading the pages to place: {e}")))?;
            let at = usize::try_from(offset + done).unwrap_or(usize::MAX);
            let zone = view.zone(at, n).ok_or_else(no_window)?;
            let first = sums.len();
            zone.fill_summed(bytes, self.page_size, sums)
                .map_err(|e| SciError::Local(format!("storing pages by PIO: {e}")))?;
            mark_gone(&mut sums[first..], &gone);
            done += n as u64;
        }
        self.placed.1 += len;
        Ok(())
    }

    fn post_descriptor(&mut self, descriptor: &[u8]) -> Result<(), SciError> {
        let timeout = self.timeout;
        let link = self.link.as_ref().ok_or(SciError::NotAttached)?;
        let mut head = link.head.lock().unwrap_or_else(PoisonError::into_inner);
        let view = link
            .mailbox
            .view()
            .ok_or_else(|| SciError::Mailbox("mailbox not mapped".into()))?;
        // The pages first: DMA transfers were waited for; PIO stores are ordered by the barrier.
        link.mailbox.barrier();
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(5);
        while !mailbox::has_room(&view, *head)? {
            if Instant::now() > deadline {
                return Err(SciError::MailboxFull(timeout));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_micros(50));
        }
        let (at, word) = mailbox::slot_of(*head, descriptor.len());
        link.mailbox.mem_cpy(at, &word)?;
        link.mailbox.mem_cpy(at + 8, descriptor)?;
        link.mailbox.barrier();
        *head += 1;
        mailbox::publish(&view, *head);
        link.mailbox.barrier();
        link.doorbell.trigger()?;
        Ok(())
    }
}

impl Placer for SciPlacer {
    fn cap(&self) -> u32 {
        caps::SCI
    }

    fn reads_once(&self) -> bool {
        self.racy == Racy::ReadOnce
    }

    fn attach(&mut self, placement: &Placement, _local: std::net::IpAddr) -> Result<(), TransportError> {
        let key = (
            placement.node,
            placement.mailbox,
            placement.doorbell,
            placement.windows.clone(),
        );
        if self.link.as_ref().is_some_and(|l| l.key == key) {
            return Ok(());
        }
        self.link = None;
        if self.bounce.is_none() {
            let buf = ReadBuffer::for_pages(self.page_size)
                .map_err(|e| SciError::Local(format!("a read buffer: {e}")).during("attach"))?;
            self.bounce = Some(buf);
        }
        let link = self
            .connect(placement)
            .map_err(|e| e.during("connect to the receiver's segments"))?;
        self.link = Some(Arc::new(link));
        Ok(())
    }

    fn write(&mut self, src: Source<'_>, window: usize, offset: u64) -> Result<(), TransportError> {
        self.place(src, window, offset)
            .map_err(|e| e.during("place pages"))
    }

    fn write_summed(
        &mut self,
        batch: &ReadableBatch<'_>,
        addr: u64,
        len: u64,
        window: usize,
        offset: u64,
        sums: &mut Vec<u32>,
    ) -> Result<(), TransportError> {
        self.place_summed(batch, addr, len, window, offset, sums)
            .map_err(|e| e.during("place pages"))
    }

    fn post(&mut self, descriptor: &[u8]) -> Result<(), TransportError> {
        self.post_descriptor(descriptor)
            .map_err(|e| e.during("post a batch descriptor"))
    }

    fn fork(&self) -> Option<Box<dyn Placer>> {
        let link = Arc::clone(self.link.as_ref()?);
        Some(Box::new(Self {
            link: Some(link),
            dma: self.sci.dma_queue().ok().flatten(),
            sci: Arc::clone(&self.sci),
            page_size: self.page_size,
            timeout: self.timeout,
            placed: (0, 0),
            bounce: Some(ReadBuffer::for_pages(self.page_size).ok()?),
            racy: self.racy,
        }))
    }

    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self.bounce.iter().map(ReadBuffer::fd).collect()
    }

    fn mappings(&self) -> Vec<Range<u64>> {
        let mut own: Vec<Range<u64>> = self.bounce.iter().map(ReadBuffer::mapping).collect();
        if let Some(l) = &self.link {
            own.extend(
                std::iter::once(&l.mailbox)
                    .chain(&l.windows)
                    .filter_map(RemoteSegment::mapping),
            );
        }
        own
    }
}
