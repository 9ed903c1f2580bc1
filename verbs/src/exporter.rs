//! The receiving side (omd): an image's memory registered for remote writes in windows of 1 GiB,
//! one remote key each; a queue pair with a ring of receive buffers for the batch descriptors.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use om_transport::api::{Export, Exportable, Exporter, Refusal};
use om_transport::wire::{ErrorCode, Extent, Placement, caps};

use crate::endpoint::Endpoint;
use crate::error::VerbsError;
use crate::odp::{self, OdpSetting, Offer};
use crate::placer::MESSAGE_BYTES;
use crate::sys::abi::QpCap;
use crate::sys::{Device, Library, Mr, Qp, RecvRing};

/// log2 of a window (one registration, one remote key).
pub const WINDOW_SHIFT: u32 = 30;
/// Registrations grow in steps of this many bytes (fewer re-registrations as VMAs appear).
const GROW: u64 = 2 << 20;
/// Receive buffers posted: descriptors the sender may have in flight before it waits.
pub const RECV_DEPTH: usize = 16;

/// Exports image memory over verbs.
#[derive(Debug)]
pub struct VerbsExporter {
    lib: Arc<Library>,
    /// Most bytes of image memory registered (pinned) for one image.
    budget: u64,
    /// `OM_VERBS_ODP`, read once.
    odp: OdpSetting,
}

impl VerbsExporter {
    /// Loads libibverbs and checks that a device with an active port is there. Whether an image
    /// is registered on demand is decided per image, by the device that serves the sender's
    /// address (a node may have several): here it is only logged for the first device.
    ///
    /// # Errors
    /// No libibverbs, no usable device, or a bad `OM_VERBS_ODP`.
    pub fn open(budget: u64) -> Result<Self, VerbsError> {
        Self::open_with(budget, OdpSetting::from_env()?)
    }

    /// As [`VerbsExporter::open`], with `odp` instead of `OM_VERBS_ODP`.
    ///
    /// # Errors
    /// As [`VerbsExporter::open`].
    pub fn open_with(budget: u64, odp: OdpSetting) -> Result<Self, VerbsError> {
        let lib = Arc::new(Library::load()?);
        let dev = Device::open(Arc::clone(&lib), None)?;
        match odp::for_export(odp, Offer::of_path(&dev, None), &dev.name) {
            Ok(on_demand) => {
                tracing::info!(device = %dev.name, port = dev.port, on_demand, "verbs transport offered");
            }
            Err(e) => tracing::warn!(
                device = %dev.name,
                port = dev.port,
                error = %e,
                "verbs transport offered; this device cannot register on demand as asked (decided per image, by the device serving the sender)"
            ),
        }
        drop(dev);
        Ok(Self { lib, budget, odp })
    }
}

impl Exporter for VerbsExporter {
    fn cap(&self) -> u32 {
        caps::VERBS
    }

    fn export(&self, image: Arc<dyn Exportable>, local: IpAddr) -> Result<Box<dyn Export>, Refusal> {
        VerbsExport::new(&self.lib, image, local, self.budget, self.odp)
            .map(|e| Box::new(e) as Box<dyn Export>)
            .map_err(|e| e.refusal())
    }
}

/// One session's export.
#[derive(Debug)]
pub struct VerbsExport {
    // Field order is drop order: the queue pair goes first, so no remote write or receive can
    // land after the registrations and buffers below are gone.
    qp: Qp,
    ring: RecvRing,
    windows: Mutex<Vec<Option<Mr>>>,
    image: Arc<dyn Exportable>,
    dev: Arc<Device>,
    psn: u32,
    budget: u64,
    /// Windows are registered on demand (ODP): whole, once, pinning nothing.
    on_demand: bool,
    connected: AtomicBool,
}

impl VerbsExport {
    fn new(
        lib: &Arc<Library>,
        image: Arc<dyn Exportable>,
        local: IpAddr,
        budget: u64,
        odp: OdpSetting,
    ) -> Result<Self, VerbsError> {
        let dev = Arc::new(Device::open(Arc::clone(lib), Some(local))?);
        let on_demand = odp::for_export(odp, Offer::of_path(&dev, None), &dev.name)?;
        let depth = u32::try_from(RECV_DEPTH).unwrap_or(16);
        let cq = Arc::new(dev.completion_queue(depth * 2)?);
        let qp = dev.queue_pair(
            cq,
            QpCap {
                max_send_wr: 1,
                max_recv_wr: depth,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
        )?;
        let ring = RecvRing::new(&qp, RECV_DEPTH, MESSAGE_BYTES)?;
        let psn = crate::endpoint::random_psn();
        tracing::debug!(device = %dev.name, qpn = qp.number(), on_demand, "verbs export opened");
        Ok(Self {
            qp,
            ring,
            windows: Mutex::new(Vec::new()),
            image,
            dev,
            psn,
            budget,
            on_demand,
            connected: AtomicBool::new(false),
        })
    }

    /// Registers what `extents` cover of the image memory, window by window; returns the remote
    /// keys. Pinned, each registration reaches from its window's start to the highest byte an
    /// extent needs in it, within the budget; on demand, each window is registered whole.
    fn register(&self, extents: &[Extent]) -> Result<Vec<u32>, VerbsError> {
        let memory = self.image.memory();
        let total = memory.len() as u64;
        let window = 1u64 << WINDOW_SHIFT;
        let mut need: Vec<u64> = Vec::new();
        for e in extents {
            let (start, end) = (e.offset, e.offset + (e.end - e.start));
            let (first, last) = (start / window, (end - 1) / window);
            for w in first..=last {
                let w = usize::try_from(w).unwrap_or(usize::MAX);
                if need.len() <= w {
                    need.resize(w + 1, 0);
                }
                let in_window = end.min((w as u64 + 1) * window) - w as u64 * window;
                need[w] = need[w].max(in_window);
            }
        }
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let len = windows.len().max(need.len());
        windows.resize_with(len, || None);
        let registered: u64 = windows
            .iter()
            .flatten()
            .map(|m| m.range().end - m.range().start)
            .sum();
        let mut total_after = registered;
        for (w, &n) in need.iter().enumerate() {
            let have = windows[w].as_ref().map_or(0, |m| m.range().end - m.range().start);
            if n == 0 || have >= n {
                continue;
            }
            let start = w as u64 * window;
            let len = if self.on_demand {
                window
            } else {
                n.div_ceil(GROW) * GROW
            };
            let len = len.min(window).min(total - start);
            total_after = total_after - have + len;
            if !self.on_demand && total_after > self.budget {
                return Err(VerbsError::Memlock {
                    limit: self.budget,
                    need: total_after,
                });
            }
            // The previous round was acknowledged (a new table comes only between rounds): no
            // write uses the old registration, which goes first (its pins count too).
            windows[w] = None;
            windows[w] = Some(self.dev.register_exported(
                &self.image,
                usize::try_from(start).unwrap_or(usize::MAX),
                usize::try_from(len).unwrap_or(usize::MAX),
                self.on_demand,
            )?);
        }
        Ok(windows.iter().map(|m| m.as_ref().map_or(0, Mr::rkey)).collect())
    }
}

impl Export for VerbsExport {
    fn placement(&self, extents: Vec<Extent>) -> Result<Placement, Refusal> {
        let windows = self.register(&extents).map_err(|e| e.refusal())?;
        let endpoint = Endpoint {
            qpn: self.qp.number(),
            psn: self.psn,
            lid: self.dev.attr.lid,
            mtu: self.dev.attr.active_mtu,
            gid: self.dev.gid,
            base: self.image.memory().as_ptr() as u64,
        };
        Ok(Placement {
            node: 0,
            mailbox: 0,
            doorbell: 0,
            window_shift: WINDOW_SHIFT,
            windows,
            extents,
            endpoint: endpoint.encode(),
        })
    }

    fn connect(&self, peer: &[u8]) -> Result<(), Refusal> {
        if self.connected.swap(true, Ordering::AcqRel) {
            return Err((ErrorCode::Protocol, "verbs: the sender connected twice".into()));
        }
        let remote = Endpoint::decode(peer).map_err(|e| e.refusal())?;
        // The windows were registered on demand for this port's MTU; the path's may be smaller.
        if self.on_demand
            && let Some(why) = Offer::of_path(&self.dev, Some(remote.mtu)).withheld
        {
            return Err(VerbsError::UnsoundOdp {
                device: self.dev.name.clone(),
                why,
            }
            .refusal());
        }
        self.qp.connect(&remote, self.psn).map_err(|e| e.refusal())?;
        tracing::debug!(
            qpn = self.qp.number(),
            peer_qpn = remote.qpn,
            "verbs export connected"
        );
        Ok(())
    }

    fn abandon(&self) {
        self.qp.break_off();
    }

    fn pins(&self) -> bool {
        !self.on_demand
    }

    fn next(&self, timeout: Duration) -> Result<Option<Vec<u8>>, Refusal> {
        self.ring.next(&self.qp, timeout).map_err(|e| e.refusal())
    }
}
