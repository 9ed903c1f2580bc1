//! The sending side: each piece of a batch goes by RDMA WRITE straight from the application's
//! memory (registered through the [`RegCache`]) into the receiver's window; small pieces, copies and
//! descriptors go through a registered staging buffer. The batch's descriptor follows as a SEND.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use om_transport::TransportError;
use om_transport::api::{Placer, Source};
use om_transport::sys::ReadableBatch;
use om_transport::wire::{MAX_BATCH_BODY, Placement, caps};

use crate::endpoint::Endpoint;
use crate::error::VerbsError;
use crate::odp::{self, OdpSetting, Offer};
use crate::regcache::{RegCache, memlock_budget};
use crate::sys::abi::QpCap;
use crate::sys::queue::SEND_DEPTH;
use crate::sys::{Anon, Device, Library, Mr, SendQueue};

/// Pieces smaller than this are copied into the staging buffer and written from there: a
/// registration costs more than the copy.
pub const ZERO_COPY_MIN: u64 = 64 << 10;
/// Bytes of one staging slot (at least one descriptor).
pub const STAGING_SLOT: usize = 1 << 20;
/// Staging slots (copies in flight at once).
pub const STAGING_SLOTS: usize = 8;
/// The largest message the receiver takes: one batch descriptor.
pub const MESSAGE_BYTES: usize = MAX_BATCH_BODY.div_ceil(4096) * 4096;
const _: () = assert!(MESSAGE_BYTES <= STAGING_SLOT);
/// Locked memory left to the provider's own queues (which count against `RLIMIT_MEMLOCK` too).
pub const HEADROOM: u64 = 1 << 20;
/// Largest single RDMA WRITE: larger pieces go as several, so the send queue keeps the link busy
/// and completions come often enough to reuse staging slots (1 MiB reaches line rate on HCAs).
pub const MAX_WRITE: u64 = 1 << 20;

/// The registered staging buffer: slots reused once the requests reading them completed.
#[derive(Debug)]
struct Staging {
    mr: Arc<Mr>,
    buf: Anon,
    /// The last request reading each slot.
    busy: [u64; STAGING_SLOTS],
    next: usize,
}

/// A connection to one receiver.
#[derive(Debug)]
struct Link {
    // Field order is drop order: the queue pair goes before the memory its requests use.
    sq: SendQueue,
    cache: RegCache<Arc<Mr>>,
    staging: Staging,
    remote: Endpoint,
    /// Our first packet sequence number.
    psn: u32,
    windows: Vec<u32>,
    shift: u32,
    /// Registrations are on demand (ODP), pinning nothing ([`crate::odp`]).
    on_demand: bool,
    dev: Arc<Device>,
}

/// Places pages into a receiver's image over verbs.
#[derive(Debug)]
pub struct VerbsPlacer {
    lib: Arc<Library>,
    link: Option<Link>,
    /// Our endpoint, until the sender hands it over.
    fresh: Option<Vec<u8>>,
    /// The sender's control connection ([`Placer::watch`]).
    control: Option<std::os::fd::RawFd>,
    page_size: usize,
    timeout: Duration,
    budget: u64,
    /// `OM_VERBS_ODP`, read once.
    odp: OdpSetting,
    /// Checksums of staged reads nobody asked for (the sender checksummed those pages itself).
    scratch: Vec<u32>,
}

impl VerbsPlacer {
    /// Loads libibverbs. The device is opened when the receiver's placement arrives (by the address
    /// the control connection uses).
    ///
    /// # Errors
    /// No libibverbs, or a bad `OM_VERBS_ODP`.
    pub fn open() -> Result<Self, VerbsError> {
        Ok(Self {
            odp: OdpSetting::from_env()?,
            lib: Arc::new(Library::load()?),
            link: None,
            fresh: None,
            control: None,
            page_size: om_transport::sys::page_size(),
            timeout: Duration::from_secs(60),
            budget: memlock_budget(),
            scratch: Vec::new(),
        })
    }

    /// Registers at most `bytes` of memory at a time (staging included) instead of what
    /// `RLIMIT_MEMLOCK` allows.
    #[must_use]
    pub fn with_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }

    /// Uses `setting` instead of `OM_VERBS_ODP`.
    #[must_use]
    pub fn with_odp(mut self, setting: OdpSetting) -> Self {
        self.odp = setting;
        self
    }

    fn connect(
        &self,
        remote: Endpoint,
        placement: &Placement,
        local: std::net::IpAddr,
    ) -> Result<Link, VerbsError> {
        let staging_bytes = STAGING_SLOT * STAGING_SLOTS;
        let need = staging_bytes as u64 + HEADROOM + ZERO_COPY_MIN;
        let dev = Arc::new(Device::open(Arc::clone(&self.lib), Some(local))?);
        let offer = Offer::of_path(&dev, Some(remote.mtu));
        let on_demand = odp::for_sender(self.odp, offer, self.budget, need, &dev.name)?;
        let cq = Arc::new(dev.completion_queue(SEND_DEPTH * 2)?);
        let qp = dev.queue_pair(
            cq,
            QpCap {
                max_send_wr: SEND_DEPTH,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
        )?;
        let psn = crate::endpoint::random_psn();
        qp.connect(&remote, psn)?;
        let buf = Anon::new(staging_bytes).map_err(|e| VerbsError::Call("mmap", e))?;
        let mr = Arc::new(dev.register_for_reading(&buf.range(), on_demand)?);
        let mut sq = SendQueue::new(qp, self.timeout);
        if let Some(fd) = self.control {
            sq.watch(fd);
        }
        Ok(Link {
            sq,
            cache: RegCache::new(if on_demand {
                u64::MAX
            } else {
                self.budget - staging_bytes as u64 - HEADROOM
            }),
            staging: Staging {
                mr,
                buf,
                busy: [0; STAGING_SLOTS],
                next: 0,
            },
            remote,
            psn,
            windows: placement.windows.clone(),
            shift: placement.window_shift,
            on_demand,
            dev,
        })
    }

    fn link(&mut self) -> Result<&mut Link, VerbsError> {
        self.link.as_mut().ok_or(VerbsError::NotAttached)
    }

    /// A failure, explained: under ODP, a local protection error, or a flush with no error before
    /// it (soft-RoCE breaks the queue pair without one), means the adapter could not read the
    /// application's memory.
    fn explain(&self, e: VerbsError) -> VerbsError {
        use crate::sys::abi::{WC_LOC_PROT_ERR, WC_WR_FLUSH_ERR};
        match e {
            VerbsError::Completion { status, code, .. }
                if matches!(code, WC_LOC_PROT_ERR | WC_WR_FLUSH_ERR)
                    && self.link.as_ref().is_some_and(|l| l.on_demand) =>
            {
                VerbsError::OdpFault { status }
            }
            e => e,
        }
    }

    fn place(&mut self, src: Source<'_>, window: usize, offset: u64) -> Result<(), VerbsError> {
        let page_size = self.page_size;
        let (remote, rkey) = self.link()?.target(window, offset, src.len())?;
        match src {
            Source::Bytes(b) => {
                let link = self.link()?;
                for (i, part) in b.chunks(STAGING_SLOT).enumerate() {
                    let at = remote + (i * STAGING_SLOT) as u64;
                    link.stage(
                        at,
                        rkey,
                        |slot| {
                            slot.copy_from_slice(part);
                            Ok(())
                        },
                        part.len(),
                    )?;
                }
                Ok(())
            }
            Source::Memory { batch, addr, len } => {
                self.place_memory(batch, addr, len, remote, rkey, page_size)
            }
        }
    }

    /// Writes `len` bytes of the application's memory at `addr`: from its registration when large
    /// enough (registering its run on a miss), else through the staging buffer.
    fn place_memory(
        &mut self,
        batch: &ReadableBatch<'_>,
        addr: u64,
        len: u64,
        remote: u64,
        rkey: u32,
        page_size: usize,
    ) -> Result<(), VerbsError> {
        let link = self.link.as_mut().ok_or(VerbsError::NotAttached)?;
        if len < ZERO_COPY_MIN {
            self.scratch.clear();
            return link.stage_read(batch, addr, len, remote, rkey, page_size, &mut self.scratch);
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(link.cache.budget());
            let piece = addr + done..addr + done + n;
            let mr = match link.cache.lookup(&piece) {
                Some(mr) => Arc::clone(mr),
                None => {
                    let run = batch
                        .runs()
                        .iter()
                        .find(|r| r.start <= piece.start && piece.start < r.end)
                        .cloned()
                        .unwrap_or_else(|| piece.clone());
                    let plan = link.cache.plan(&piece, &run);
                    if !link.cache.fits(plan.end - plan.start) {
                        link.drop_registrations()?;
                    }
                    let mut attempt = link.dev.register_for_reading(&plan, link.on_demand);
                    if let Err(VerbsError::Register { source, .. }) = &attempt
                        && matches!(source.raw_os_error(), Some(libc::ENOMEM | libc::EAGAIN))
                        && link.cache.bytes() > 0
                    {
                        // Locked memory ran short (the provider's own queues count too): let go of
                        // this round's registrations and try once more.
                        link.drop_registrations()?;
                        attempt = link.dev.register_for_reading(&plan, link.on_demand);
                    }
                    match attempt {
                        Ok(mr) => {
                            let mr = Arc::new(mr);
                            link.cache.insert(plan, Arc::clone(&mr));
                            mr
                        }
                        // The application unmapped part of it meanwhile: the kernel read gives what
                        // is left (the rest reads as zeros and comes back as suspect pages).
                        Err(e) => {
                            tracing::debug!(error = %e, addr = piece.start, "registration failed, staging");
                            self.scratch.clear();
                            link.stage_read(
                                batch,
                                piece.start,
                                n,
                                remote + done,
                                rkey,
                                page_size,
                                &mut self.scratch,
                            )?;
                            done += n;
                            continue;
                        }
                    }
                }
            };
            let mut at = 0u64;
            while at < n {
                let k = (n - at).min(MAX_WRITE);
                let k32 = u32::try_from(k).unwrap_or(u32::MAX);
                link.sq
                    .write(&mr, piece.start + at, k32, remote + done + at, rkey, false)?;
                at += k;
            }
            done += n;
        }
        Ok(())
    }
}

/// The mappings of RDMA device files in a `/proc/PID/maps` text.
fn device_mappings(maps: &str) -> Vec<Range<u64>> {
    maps.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|p| p.starts_with("/dev/infiniband/"))
        })
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some(u64::from_str_radix(a, 16).ok()?..u64::from_str_radix(b, 16).ok()?)
        })
        .collect()
}

impl Link {
    /// Waits until every request posted so far has completed, then lets go of every registration
    /// of the application's memory.
    fn drop_registrations(&mut self) -> Result<(), VerbsError> {
        let r = self.sq.quiesce();
        self.cache.clear();
        r
    }

    /// The remote address and key of `len` bytes at `offset` of window `window`.
    fn target(&self, window: usize, offset: u64, len: u64) -> Result<(u64, u32), VerbsError> {
        let size = 1u64 << self.shift;
        match self.windows.get(window) {
            Some(&rkey) if rkey != 0 && offset.checked_add(len).is_some_and(|e| e <= size) => {
                Ok((self.remote.base + ((window as u64) << self.shift) + offset, rkey))
            }
            _ => Err(VerbsError::NoWindow { window, offset, len }),
        }
    }

    /// Fills the first `len` bytes (at most a slot) of the next free staging slot with `fill` and
    /// writes them to `remote` under `rkey`.
    fn stage(
        &mut self,
        remote: u64,
        rkey: u32,
        fill: impl FnOnce(&mut [u8]) -> Result<(), VerbsError>,
        len: usize,
    ) -> Result<(), VerbsError> {
        let (addr, slot) = self.slot()?;
        let at = slot * STAGING_SLOT;
        let part = self
            .staging
            .buf
            .slice_mut(at, len)
            .filter(|_| len <= STAGING_SLOT)
            .ok_or(VerbsError::TooLarge {
                what: "a staged write",
                len,
                max: STAGING_SLOT,
            })?;
        fill(part)?;
        // Signalled: the slot is reused once this write completes, without a flush to wait for.
        let id = self.sq.write(
            &self.staging.mr,
            addr,
            u32::try_from(len).unwrap_or(u32::MAX),
            remote,
            rkey,
            true,
        )?;
        self.staging.busy[slot] = id;
        Ok(())
    }

    /// Reads `len` bytes of the application's memory at `addr` through the kernel, slot by slot,
    /// appending a checksum per page to `sums`, and writes them to `remote` under `rkey`.
    #[allow(clippy::too_many_arguments)]
    fn stage_read(
        &mut self,
        batch: &ReadableBatch<'_>,
        addr: u64,
        len: u64,
        remote: u64,
        rkey: u32,
        page_size: usize,
        sums: &mut Vec<u32>,
    ) -> Result<(), VerbsError> {
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(STAGING_SLOT as u64)).unwrap_or(STAGING_SLOT);
            let at = addr + done;
            self.stage(
                remote + done,
                rkey,
                |slot| {
                    batch
                        .read_summed(at, slot, page_size, sums)
                        .map_err(VerbsError::Read)
                },
                n,
            )?;
            done += n as u64;
        }
        Ok(())
    }

    /// The next staging slot, once no request reads it any more: its address and index.
    fn slot(&mut self) -> Result<(u64, usize), VerbsError> {
        let slot = self.staging.next;
        self.staging.next = (slot + 1) % STAGING_SLOTS;
        let busy = self.staging.busy[slot];
        if busy > self.sq.done() {
            self.sq.wait(busy)?;
        }
        Ok((
            self.staging.buf.as_ptr() as u64 + (slot * STAGING_SLOT) as u64,
            slot,
        ))
    }

    /// Sends `descriptor` after everything written so far.
    fn post(&mut self, descriptor: &[u8]) -> Result<(), VerbsError> {
        let too_large = VerbsError::TooLarge {
            what: "a batch descriptor",
            len: descriptor.len(),
            max: MESSAGE_BYTES,
        };
        if descriptor.len() > MESSAGE_BYTES {
            return Err(too_large);
        }
        let (addr, slot) = self.slot()?;
        self.staging
            .buf
            .slice_mut(slot * STAGING_SLOT, descriptor.len())
            .ok_or(too_large)?
            .copy_from_slice(descriptor);
        let id = self.sq.send(
            &self.staging.mr,
            addr,
            u32::try_from(descriptor.len()).unwrap_or(u32::MAX),
        )?;
        self.staging.busy[slot] = id;
        Ok(())
    }
}

impl Placer for VerbsPlacer {
    fn cap(&self) -> u32 {
        caps::VERBS
    }

    /// The adapter reads the application's memory itself: the sender checksums first.
    fn reads_once(&self) -> bool {
        false
    }

    fn attach(&mut self, placement: &Placement, local: std::net::IpAddr) -> Result<(), TransportError> {
        let remote =
            Endpoint::decode(&placement.endpoint).map_err(|e| e.during("read the receiver's endpoint"))?;
        if let Some(link) = self.link.as_mut().filter(|l| l.remote == remote) {
            // A new VMA table: the same connection, windows registered anew.
            link.windows.clone_from(&placement.windows);
            link.shift = placement.window_shift;
            return Ok(());
        }
        self.link = None;
        let link = self
            .connect(remote, placement, local)
            .map_err(|e| e.during("connect to the receiver's queue pair"))?;
        let mine = Endpoint {
            qpn: link.sq.qp().number(),
            psn: link.psn,
            lid: link.dev.attr.lid,
            mtu: link.dev.attr.active_mtu,
            gid: link.dev.gid,
            base: 0,
        };
        tracing::debug!(
            device = %link.dev.name,
            qpn = mine.qpn,
            peer_qpn = remote.qpn,
            on_demand = link.on_demand,
            "verbs connected"
        );
        self.fresh = Some(mine.encode());
        self.link = Some(link);
        Ok(())
    }

    fn endpoint(&mut self) -> Option<Vec<u8>> {
        self.fresh.take()
    }

    fn watch(&mut self, control: std::os::fd::RawFd) {
        self.control = Some(control);
    }

    fn write(&mut self, src: Source<'_>, window: usize, offset: u64) -> Result<(), TransportError> {
        self.place(src, window, offset)
            .map_err(|e| self.explain(e).during("write pages"))
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
        let page_size = self.page_size;
        self.link()
            .and_then(|l| {
                let (remote, rkey) = l.target(window, offset, len)?;
                l.stage_read(batch, addr, len, remote, rkey, page_size, sums)
            })
            .map_err(|e| self.explain(e).during("write pages"))
    }

    fn post(&mut self, descriptor: &[u8]) -> Result<(), TransportError> {
        self.link()
            .and_then(|l| l.post(descriptor))
            .map_err(|e| self.explain(e).during("send a batch descriptor"))
    }

    fn round_done(&mut self) -> Result<(), TransportError> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        link.drop_registrations()
            .map_err(|e| self.explain(e).during("complete the round's writes"))
    }

    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self.link.as_ref().map_or_else(Vec::new, |l| l.dev.fds())
    }

    /// The staging buffer, and the device's queues, which the provider maps from the device file
    /// (an application that opened a verbs device itself is refused by the capture for its
    /// descriptor anyway).
    fn mappings(&self) -> Vec<Range<u64>> {
        let Some(link) = &self.link else {
            return Vec::new();
        };
        let mut v = device_mappings(&std::fs::read_to_string("/proc/self/maps").unwrap_or_default());
        v.push(link.staging.buf.range());
        v.sort_by_key(|r| r.start);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_mappings_are_found_by_path() {
        let maps = "\
7f0000000000-7f0000001000 rw-s 00000000 00:05 12 /dev/infiniband/uverbs0
7f0000001000-7f0000003000 r--p 00000000 08:01 99 /usr/lib/libibverbs.so.1
7f0000004000-7f0000006000 rw-s 10000000 00:05 12 /dev/infiniband/uverbs0
7f0000008000-7f0000009000 rw-p 00000000 00:00 0
";
        assert_eq!(
            device_mappings(maps),
            vec![
                0x7f00_0000_0000..0x7f00_0000_1000,
                0x7f00_0000_4000..0x7f00_0000_6000
            ]
        );
    }
}
