//! Safe owners of verbs objects: an opened device port with its protection domain, memory regions,
//! completion queues and RC queue pairs. Each is destroyed when dropped, after what depends on it
//! (a queue pair keeps its completion queue and device alive, a region its device).

use std::ffi::{CStr, c_int, c_void};
use std::net::IpAddr;
use std::ptr::NonNull;
use std::sync::Arc;

use super::abi::{self, Gid, PortAttr, QpAttr, QpCap, QpInitAttr, RecvWr, SendWr, Sge, Wc};
use super::library::Library;
use crate::endpoint::Endpoint;
use crate::error::VerbsError;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// One port of an opened device, with a protection domain.
#[derive(Debug)]
pub struct Device {
    lib: Arc<Library>,
    ctx: NonNull<abi::Context>,
    pd: NonNull<abi::Pd>,
    /// The device's name (`mlx5_0`, `rxe0`).
    pub name: String,
    /// The port (from 1).
    pub port: u8,
    /// The port's attributes.
    pub attr: PortAttr,
    /// The source GID's index and value.
    pub gid_index: u8,
    /// The source GID.
    pub gid: Gid,
    /// What the device offers of on-demand paging (all zero where the library cannot say).
    pub odp: abi::OdpCaps,
    /// The device's vendor id (0 where the library cannot say).
    pub vendor_id: u32,
}

// SAFETY: libibverbs' device contexts and protection domains may be used from any thread (rdma-core
// serializes inside); the struct only holds them and plain values.
unsafe impl Send for Device {}
// SAFETY: as above: every call through a shared Device is one libibverbs guarantees thread-safe.
unsafe impl Sync for Device {}

/// The GID that stands for IP address `ip` (RoCE v2 maps IPv4 addresses into `::ffff:a.b.c.d`).
fn gid_of(ip: IpAddr) -> Gid {
    Gid(match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    })
}

/// The device's on-demand paging capabilities and vendor id, by `ibv_query_device_ex` (an inline
/// function of the header, called here through the provider's `verbs_context` as the header does);
/// zero where the provider has no extended query or it fails.
fn query_ex(ctx: NonNull<abi::Context>) -> (abi::OdpCaps, u32) {
    let none = (abi::OdpCaps::default(), 0);
    // SAFETY: an open context: the library's ibv_context, alive for this call.
    let compat = unsafe { ctx.as_ref() }.abi_compat as usize;
    if compat != abi::VERBS_ABI_IS_EXTENDED {
        return none;
    }
    let at = ctx
        .as_ptr()
        .cast::<u8>()
        .wrapping_sub(size_of::<abi::VerbsContextTail>())
        .cast::<abi::VerbsContextTail>();
    // SAFETY: an extended context is the last field of the provider's struct verbs_context, whose
    // fields right before it are VerbsContextTail's (layout checked in tests/layout.rs), plain
    // pointers and sizes that the provider wrote once; read by value, unaligned to be safe.
    let tail = unsafe { at.read_unaligned() };
    let Some(query) = tail
        .query_device_ex
        .filter(|_| tail.sz >= size_of::<abi::VerbsContextTail>() + size_of::<abi::Context>())
    else {
        return none;
    };
    let mut attr = abi::DeviceAttrEx::default();
    // SAFETY: the provider's own entry for this context; no input (NULL is allowed), and `attr`
    // is a zeroed ibv_device_attr_ex of the size passed, which the provider fills up to that size.
    let r = unsafe {
        query(
            ctx.as_ptr(),
            std::ptr::null(),
            &raw mut attr,
            size_of::<abi::DeviceAttrEx>(),
        )
    };
    if r == 0 {
        (attr.odp_caps, attr.vendor_id)
    } else {
        none
    }
}

/// How a port is chosen in one pass over the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// A GID that holds the local address (or `OM_VERBS_GID`, or GID 0 when there is no address).
    Exact,
    /// No GID matched anywhere: an InfiniBand port (LID addressed) with GID 0, or any active port
    /// of a device named by `OM_VERBS_DEVICE`.
    Fallback,
}

/// The kernel's type of GID `index` of `dev`'s `port` ("RoCE v2", "IB/RoCE v1"), if it says.
fn gid_type(dev: &str, port: u8, index: u8) -> Option<String> {
    std::fs::read_to_string(format!(
        "/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/types/{index}"
    ))
    .ok()
    .map(|s| s.trim().to_owned())
}

impl Device {
    /// Opens the port that serves `local`, the IP address this node uses towards the peer: the
    /// port whose GID table holds that address (RoCE; the RoCE v2 entry where there are two), on
    /// any device. Without such a GID anywhere, the first active InfiniBand port (LID addressed,
    /// GID 0). `OM_VERBS_DEVICE` (a device name) restricts the choice to that device, where any
    /// active port will do, and `OM_VERBS_GID` picks the GID index.
    ///
    /// # Errors
    /// No device, no usable port, or the library failing.
    pub fn open(lib: Arc<Library>, local: Option<IpAddr>) -> Result<Self, VerbsError> {
        let wanted = std::env::var("OM_VERBS_DEVICE").ok().filter(|s| !s.is_empty());
        let mut n: c_int = 0;
        // SAFETY: ibv_get_device_list fills `n` and returns a NULL-terminated array (or NULL).
        let list = unsafe { (lib.get_device_list)(&raw mut n) };
        if list.is_null() {
            return Err(VerbsError::NoDevice(format!("ibv_get_device_list: {}", errno())));
        }
        let mut devices = Vec::new();
        for i in 0..usize::try_from(n).unwrap_or(0) {
            // SAFETY: `i` < the array's length.
            let slot = unsafe { list.add(i) };
            // SAFETY: an element of the array ibv_get_device_list returned.
            let dev = unsafe { *slot };
            // SAFETY: a device of the live list.
            let raw_name = unsafe { (lib.get_device_name)(dev) };
            // SAFETY: the name is a NUL-terminated string of the library, alive with the list.
            let name = unsafe { CStr::from_ptr(raw_name) }.to_string_lossy().into_owned();
            devices.push((dev, name));
        }
        let mut found = None;
        'passes: for pass in [Pass::Exact, Pass::Fallback] {
            for (dev, name) in &devices {
                if wanted.as_ref().is_some_and(|w| w != name) {
                    continue;
                }
                match Self::open_one(&lib, *dev, name, local, pass, wanted.is_some()) {
                    Ok(Some(d)) => {
                        found = Some(Ok(d));
                        break 'passes;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        found.get_or_insert(Err(e));
                    }
                }
            }
        }
        // SAFETY: the list from ibv_get_device_list, freed once; opened contexts stay valid.
        unsafe { (lib.free_device_list)(list) };
        let seen: Vec<&String> = devices.iter().map(|(_, n)| n).collect();
        match found {
            Some(Ok(d)) => Ok(d),
            Some(Err(e)) => Err(e),
            None => Err(VerbsError::NoDevice(match (&wanted, local) {
                (Some(w), _) => format!("no device {w} with an active port (devices: {seen:?})"),
                (None, Some(ip)) => {
                    format!("no active port with a GID for {ip}, and no InfiniBand port (devices: {seen:?})")
                }
                (None, None) => format!("no active port (devices: {seen:?})"),
            })),
        }
    }

    /// Opens `dev` and returns its port for `local` as `pass` chooses (`named`: the user named
    /// this device), or `None`.
    fn open_one(
        lib: &Arc<Library>,
        dev: *mut c_void,
        name: &str,
        local: Option<IpAddr>,
        pass: Pass,
        named: bool,
    ) -> Result<Option<Self>, VerbsError> {
        // SAFETY: `dev` is a device of a live device list.
        let ctx = NonNull::new(unsafe { (lib.open_device)(dev) })
            .ok_or_else(|| VerbsError::Call("ibv_open_device", errno()))?;
        let close = |lib: &Library| {
            // SAFETY: the context opened above, not used afterwards.
            unsafe { (lib.close_device)(ctx.as_ptr()) };
        };
        let want = local.map(gid_of);
        let forced_gid = std::env::var("OM_VERBS_GID")
            .ok()
            .and_then(|s| s.parse::<u8>().ok());
        let mut chosen = None;
        for port in 1..=u8::MAX {
            let mut attr = PortAttr::default();
            // SAFETY: `attr` is a zeroed ibv_port_attr, larger than the compat prefix it fills.
            if unsafe { (lib.query_port)(ctx.as_ptr(), port, &raw mut attr) } != 0 {
                break;
            }
            if attr.state != abi::PORT_ACTIVE {
                continue;
            }
            let gid_at = |index: u8| {
                let mut gid = Gid::default();
                // SAFETY: `gid` is a union ibv_gid; index < the table's length.
                let r = unsafe { (lib.query_gid)(ctx.as_ptr(), port, c_int::from(index), &raw mut gid) };
                (r == 0).then_some(gid)
            };
            let table = u8::try_from(attr.gid_tbl_len.clamp(0, 255)).unwrap_or(0);
            let pick = match (pass, forced_gid, want) {
                (_, Some(f), _) if f < table => gid_at(f).map(|g| (f, g)),
                (Pass::Exact, None, Some(w)) => {
                    // Every entry that holds the address; RoCE v2 (routable) before v1.
                    let hits: Vec<u8> = (0..table).filter(|&i| gid_at(i) == Some(w)).collect();
                    hits.iter()
                        .copied()
                        .find(|&i| gid_type(name, port, i).as_deref() == Some("RoCE v2"))
                        .or_else(|| hits.first().copied())
                        .map(|i| (i, w))
                }
                (Pass::Exact, None, None) => gid_at(0).map(|g| (0, g)),
                (Pass::Fallback, None, _) if named || attr.link_layer != abi::LINK_LAYER_ETHERNET => {
                    Some((0, gid_at(0).unwrap_or_default()))
                }
                _ => None,
            };
            if let Some((index, gid)) = pick {
                chosen = Some((port, attr, index, gid));
                break;
            }
        }
        let Some((port, attr, gid_index, gid)) = chosen else {
            close(lib);
            return Ok(None);
        };
        // SAFETY: an open context.
        let Some(pd) = NonNull::new(unsafe { (lib.alloc_pd)(ctx.as_ptr()) }) else {
            let e = errno();
            close(lib);
            return Err(VerbsError::Call("ibv_alloc_pd", e));
        };
        let (odp, vendor_id) = query_ex(ctx);
        Ok(Some(Self {
            lib: Arc::clone(lib),
            ctx,
            pd,
            name: name.into(),
            port,
            attr,
            gid_index,
            gid,
            odp,
            vendor_id,
        }))
    }

    /// True for RoCE (GID routed), false for InfiniBand (LID addressed).
    #[must_use]
    pub fn is_ethernet(&self) -> bool {
        self.attr.link_layer == abi::LINK_LAYER_ETHERNET
    }

    /// The descriptors the library opened for this device (its command and async event files).
    #[must_use]
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        // SAFETY: the context stays open while self lives; the two fields are plain ints written
        // once by ibv_open_device.
        let ctx = unsafe { self.ctx.as_ref() };
        [ctx.cmd_fd, ctx.async_fd]
            .into_iter()
            .filter(|&fd| fd >= 0)
            .collect()
    }

    /// The library.
    #[must_use]
    pub fn library(&self) -> &Arc<Library> {
        &self.lib
    }

    /// Registers `len` bytes at `addr` with `access` flags (pins them); the region keeps `keep`
    /// alive.
    ///
    /// # Safety
    /// With an access that lets the device write (`LOCAL_WRITE`, `REMOTE_WRITE`), the memory must
    /// stay mapped and owned by `keep` (or outlive the region otherwise), and no Rust reference may
    /// cover it while the device can write it.
    unsafe fn register_raw(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        access: c_int,
        keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Mr, VerbsError> {
        // SAFETY: registration records and pins the pages of [addr, addr+len) (the kernel checks
        // they are mapped); what the device may then do with them is the caller's contract.
        let mr = unsafe { (self.lib.reg_mr)(self.pd.as_ptr(), addr.cast(), len, access) };
        let mr = NonNull::new(mr).ok_or_else(|| VerbsError::Register {
            addr: addr as u64,
            len: len as u64,
            source: errno(),
        })?;
        Ok(Mr {
            dev: Arc::clone(self),
            mr,
            _keep: keep,
        })
    }

    /// Registers memory of this process for the device to read (the sources of writes and sends).
    /// Pinned, the pages stay readable by the device whatever the process does with the mapping
    /// meanwhile; `on_demand` (ODP), nothing is pinned and a page unmapped by then fails the
    /// request that reads it.
    ///
    /// # Errors
    /// [`VerbsError::Register`]: unmapped memory, `RLIMIT_MEMLOCK`, the device's limits.
    pub fn register_for_reading(
        self: &Arc<Self>,
        range: &std::ops::Range<u64>,
        on_demand: bool,
    ) -> Result<Mr, VerbsError> {
        let len = usize::try_from(range.end.saturating_sub(range.start)).unwrap_or(usize::MAX);
        let access = if on_demand { abi::ACCESS_ON_DEMAND } else { 0 };
        // SAFETY: read-only access: the device never writes these pages (an on-demand region
        // without write access faults pages in for reading only, so they do not turn dirty).
        unsafe { self.register_raw(range.start as *mut u8, len, access, None) }
    }

    /// Registers `buf` for the device to write locally (receive buffers); the region keeps it.
    ///
    /// # Errors
    /// As [`Device::register_for_reading`].
    pub fn register_for_receiving(self: &Arc<Self>, buf: &Arc<super::Anon>) -> Result<Mr, VerbsError> {
        // SAFETY: `buf` is a mapping of its own that the region keeps alive; Anon hands out no
        // reference into itself through a shared Arc (reads copy through a raw pointer).
        unsafe {
            self.register_raw(
                buf.as_ptr(),
                buf.len(),
                abi::ACCESS_LOCAL_WRITE,
                Some(Arc::clone(buf) as Arc<dyn std::any::Any + Send + Sync>),
            )
        }
    }

    /// Registers `len` bytes at `offset` of an exported image's memory for remote writes, pinned
    /// or `on_demand`; the region keeps the image alive.
    ///
    /// # Errors
    /// A range outside the image's memory, or as [`Device::register_for_reading`].
    pub fn register_exported(
        self: &Arc<Self>,
        image: &Arc<dyn om_transport::api::Exportable>,
        offset: usize,
        len: usize,
        on_demand: bool,
    ) -> Result<Mr, VerbsError> {
        let memory = image.memory();
        let zone = memory.part(offset, len).ok_or(VerbsError::OutsideRegion {
            addr: offset as u64,
            len: len as u64,
        })?;
        // SAFETY: the zone lies inside the image's memory (a shared mapping omd owns and only
        // accesses through the kernel or raw pointers, see `Landing`), which the region keeps
        // alive through its Arc.
        unsafe {
            self.register_raw(
                zone.as_ptr(),
                zone.len(),
                abi::ACCESS_LOCAL_WRITE
                    | abi::ACCESS_REMOTE_WRITE
                    | if on_demand { abi::ACCESS_ON_DEMAND } else { 0 },
                Some(Arc::new(Arc::clone(image)) as Arc<dyn std::any::Any + Send + Sync>),
            )
        }
    }

    /// Creates a completion queue of `entries`.
    ///
    /// # Errors
    /// The library failing.
    pub fn completion_queue(self: &Arc<Self>, entries: u32) -> Result<Cq, VerbsError> {
        let n = c_int::try_from(entries).unwrap_or(c_int::MAX);
        // SAFETY: an open context; no channel, no context pointer.
        let cq = unsafe {
            (self.lib.create_cq)(
                self.ctx.as_ptr(),
                n,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        Ok(Cq {
            dev: Arc::clone(self),
            cq: NonNull::new(cq).ok_or_else(|| VerbsError::Call("ibv_create_cq", errno()))?,
        })
    }

    /// Creates an RC queue pair on `cq` (sends and receives) and brings it to INIT, allowing remote
    /// writes.
    ///
    /// # Errors
    /// The library failing.
    pub fn queue_pair(self: &Arc<Self>, cq: Arc<Cq>, cap: QpCap) -> Result<Qp, VerbsError> {
        let mut init = QpInitAttr {
            qp_context: std::ptr::null_mut(),
            send_cq: cq.cq.as_ptr(),
            recv_cq: cq.cq.as_ptr(),
            srq: std::ptr::null_mut(),
            cap,
            qp_type: abi::QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: a valid protection domain and init attributes naming a live CQ.
        let qp = unsafe { (self.lib.create_qp)(self.pd.as_ptr(), &raw mut init) };
        let qp = Qp {
            qp: NonNull::new(qp).ok_or_else(|| VerbsError::Call("ibv_create_qp", errno()))?,
            cq,
            dev: Arc::clone(self),
        };
        let mut attr = QpAttr {
            qp_state: abi::QPS_INIT,
            port_num: self.port,
            qp_access_flags: u32::try_from(abi::ACCESS_REMOTE_WRITE | abi::ACCESS_LOCAL_WRITE).unwrap_or(0),
            ..QpAttr::default()
        };
        qp.modify(
            &mut attr,
            abi::QP_STATE | abi::QP_PKEY_INDEX | abi::QP_PORT | abi::QP_ACCESS_FLAGS,
            "INIT",
        )?;
        Ok(qp)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every region, queue and pair holds an Arc of this device, so none is left; the
        // domain and then the context are released once.
        unsafe {
            (self.lib.dealloc_pd)(self.pd.as_ptr());
        }
        // SAFETY: as above.
        unsafe {
            (self.lib.close_device)(self.ctx.as_ptr());
        }
    }
}

/// Objects of the library whose first field is their context (`ibv_cq`, `ibv_qp`).
trait HasContext {
    fn context(&self) -> *mut abi::Context;
}

impl HasContext for abi::Cq {
    fn context(&self) -> *mut abi::Context {
        self.context
    }
}

impl HasContext for abi::Qp {
    fn context(&self) -> *mut abi::Context {
        self.context
    }
}

/// The provider's operations of `obj`'s device context (where the header's inline `ibv_post_send`,
/// `ibv_post_recv` and `ibv_poll_cq` look them up).
fn ops<'a, T: HasContext>(obj: NonNull<T>) -> Result<&'a abi::ContextOps, VerbsError> {
    // SAFETY: `obj` is a live object of the library (owned by a Cq or Qp that holds its device).
    let ctx = unsafe { obj.as_ref() }.context();
    // SAFETY: the object's context is its device's, open for as long as the object lives; the ops
    // table is written by the provider when the context is opened and never changes.
    unsafe { ctx.as_ref() }.map(|c| &c.ops).ok_or(VerbsError::Call(
        "context",
        std::io::Error::from_raw_os_error(libc::EINVAL),
    ))
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    dev: Arc<Device>,
    mr: NonNull<abi::Mr>,
    /// What owns the registered memory, kept alive while the region is.
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

// SAFETY: a registration is a kernel object; its keys and bounds are read-only after creation.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    fn get(&self) -> &abi::Mr {
        // SAFETY: the library's ibv_mr, alive until dropped here, never written after creation.
        unsafe { self.mr.as_ref() }
    }

    /// Local key.
    #[must_use]
    pub fn lkey(&self) -> u32 {
        self.get().lkey
    }

    /// Remote key.
    #[must_use]
    pub fn rkey(&self) -> u32 {
        self.get().rkey
    }

    /// The registered range.
    #[must_use]
    pub fn range(&self) -> std::ops::Range<u64> {
        let m = self.get();
        m.addr as u64..m.addr as u64 + m.length as u64
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: the region registered by Device::register, deregistered once.
        unsafe { (self.dev.lib.dereg_mr)(self.mr.as_ptr()) };
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    dev: Arc<Device>,
    cq: NonNull<abi::Cq>,
}

// SAFETY: libibverbs' CQ polling is thread-safe (the provider locks); om polls each CQ from one
// thread at a time anyway.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    /// Takes up to `wc.len()` completions; returns how many.
    ///
    /// # Errors
    /// The provider failing to poll.
    pub fn poll(&self, wc: &mut [Wc]) -> Result<usize, VerbsError> {
        let poll = ops(self.cq)?.poll_cq.ok_or(VerbsError::Call(
            "poll_cq",
            std::io::Error::from_raw_os_error(libc::ENOSYS),
        ))?;
        let n = c_int::try_from(wc.len()).unwrap_or(c_int::MAX);
        // SAFETY: `wc` has room for `n` completions.
        let got = unsafe { poll(self.cq.as_ptr(), n, wc.as_mut_ptr()) };
        usize::try_from(got)
            .map_err(|_| VerbsError::Call("ibv_poll_cq", std::io::Error::from_raw_os_error(-got)))
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every queue pair on this CQ holds an Arc of it, so none is left.
        unsafe { (self.dev.lib.destroy_cq)(self.cq.as_ptr()) };
    }
}

/// A reliable-connected queue pair.
#[derive(Debug)]
pub struct Qp {
    qp: NonNull<abi::Qp>,
    cq: Arc<Cq>,
    dev: Arc<Device>,
}

// SAFETY: posting and modifying are thread-safe in libibverbs; om posts from one thread at a time.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

impl Qp {
    /// The queue pair number.
    #[must_use]
    pub fn number(&self) -> u32 {
        // SAFETY: the library's ibv_qp, alive while self is.
        unsafe { self.qp.as_ref().qp_num }
    }

    /// The completion queue.
    #[must_use]
    pub fn cq(&self) -> &Arc<Cq> {
        &self.cq
    }

    /// The device.
    #[must_use]
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    fn modify(&self, attr: &mut QpAttr, mask: c_int, to: &'static str) -> Result<(), VerbsError> {
        // SAFETY: a live QP and attributes valid for `mask`.
        let r = unsafe { (self.dev.lib.modify_qp)(self.qp.as_ptr(), attr, mask) };
        if r == 0 {
            Ok(())
        } else {
            Err(VerbsError::Modify(to, std::io::Error::from_raw_os_error(r)))
        }
    }

    /// Connects to `remote` (RTR then RTS), starting our sends at `psn`.
    ///
    /// # Errors
    /// The device refusing the transition (an unreachable GID, a bad MTU).
    pub fn connect(&self, remote: &Endpoint, psn: u32) -> Result<(), VerbsError> {
        let dev = &self.dev;
        let mtu = dev.attr.active_mtu.min(remote.mtu).max(1);
        let mut ah = abi::AhAttr {
            dlid: remote.lid,
            port_num: dev.port,
            ..abi::AhAttr::default()
        };
        if dev.is_ethernet() || remote.gid != Gid::default() {
            ah.is_global = 1;
            ah.grh = abi::GlobalRoute {
                dgid: remote.gid,
                sgid_index: dev.gid_index,
                hop_limit: 64,
                ..abi::GlobalRoute::default()
            };
        }
        let mut rtr = QpAttr {
            qp_state: abi::QPS_RTR,
            path_mtu: mtu,
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ah_attr: ah,
            ..QpAttr::default()
        };
        self.modify(
            &mut rtr,
            abi::QP_STATE
                | abi::QP_AV
                | abi::QP_PATH_MTU
                | abi::QP_DEST_QPN
                | abi::QP_RQ_PSN
                | abi::QP_MAX_DEST_RD_ATOMIC
                | abi::QP_MIN_RNR_TIMER,
            "RTR",
        )?;
        let mut rts = QpAttr {
            qp_state: abi::QPS_RTS,
            // 4.096 us << 14 = 67 ms per try, 7 tries; a receiver without a free receive buffer is
            // retried for ever (rnr_retry 7): the sender's own deadline bounds the wait.
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            sq_psn: psn,
            max_rd_atomic: 1,
            ..QpAttr::default()
        };
        self.modify(
            &mut rts,
            abi::QP_STATE
                | abi::QP_TIMEOUT
                | abi::QP_RETRY_CNT
                | abi::QP_RNR_RETRY
                | abi::QP_SQ_PSN
                | abi::QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Moves the pair to the error state: outstanding and later work completes in error at once,
    /// and the peer's retries fail.
    pub fn break_off(&self) {
        let mut attr = QpAttr {
            qp_state: abi::QPS_ERR,
            ..QpAttr::default()
        };
        if let Err(e) = self.modify(&mut attr, abi::QP_STATE, "ERR") {
            tracing::debug!(error = %e, "cannot move a queue pair to the error state");
        }
    }

    /// Posts a chain of send work requests.
    ///
    /// # Errors
    /// The provider refusing (a full send queue, a bad request).
    ///
    /// # Safety
    /// Every scatter entry must name registered memory that stays registered and unchanged (for
    /// sends) until the request completes; `wr` and its chain and scatter lists must be valid.
    pub unsafe fn post_send(&self, wr: &mut SendWr) -> Result<(), VerbsError> {
        let post = ops(self.qp)?.post_send.ok_or(VerbsError::Call(
            "post_send",
            std::io::Error::from_raw_os_error(libc::ENOSYS),
        ))?;
        let mut bad: *mut SendWr = std::ptr::null_mut();
        // SAFETY: the caller guarantees the chain; `bad` receives the failing request.
        let r = unsafe { post(self.qp.as_ptr(), wr, &raw mut bad) };
        if r == 0 {
            Ok(())
        } else {
            Err(VerbsError::Post(std::io::Error::from_raw_os_error(r)))
        }
    }

    /// Posts one receive buffer.
    ///
    /// # Errors
    /// The provider refusing.
    ///
    /// # Safety
    /// `sge` must name registered, writable memory that stays registered until the receive
    /// completes or the pair is destroyed.
    pub unsafe fn post_recv(&self, wr_id: u64, sge: Sge) -> Result<(), VerbsError> {
        let post = ops(self.qp)?.post_recv.ok_or(VerbsError::Call(
            "post_recv",
            std::io::Error::from_raw_os_error(libc::ENOSYS),
        ))?;
        let mut sge = sge;
        let mut wr = RecvWr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &raw mut sge,
            num_sge: 1,
        };
        let mut bad: *mut RecvWr = std::ptr::null_mut();
        // SAFETY: one request on the stack, its buffer as the caller guarantees.
        let r = unsafe { post(self.qp.as_ptr(), &raw mut wr, &raw mut bad) };
        if r == 0 {
            Ok(())
        } else {
            Err(VerbsError::Post(std::io::Error::from_raw_os_error(r)))
        }
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: the pair created by Device::queue_pair, destroyed once, before its CQ (held here).
        unsafe { (self.dev.lib.destroy_qp)(self.qp.as_ptr()) };
    }
}
