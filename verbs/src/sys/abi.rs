//! The libibverbs ABI (`IBVERBS_1.1`, rdma-core's `<infiniband/verbs.h>`): the structures om passes to
//! and reads from the library, and the constants it uses.
//!
//! `ibv_post_send`, `ibv_post_recv` and `ibv_poll_cq` are inline functions in the header: they call
//! through `ibv_context::ops`, whose layout is therefore part of the library's stable ABI. So is
//! `ibv_query_device_ex`, which calls through the end of `struct verbs_context`, the structure the
//! library places right before every context it hands out ([`VerbsContextTail`]). Every
//! layout here is checked at compile time (sizes) and, where rdma-core's headers are installed,
//! against the C compiler's `offsetof` (`tests/layout.rs`).

#![allow(missing_docs)]

use std::ffi::{c_int, c_uint, c_void};

/// `struct ibv_context`.
#[repr(C)]
#[derive(Debug)]
pub struct Context {
    pub device: *mut c_void,
    pub ops: ContextOps,
    pub cmd_fd: c_int,
    pub async_fd: c_int,
    pub num_comp_vectors: c_int,
    /// `pthread_mutex_t` (glibc, LP64).
    pub mutex: [u64; 5],
    /// [`VERBS_ABI_IS_EXTENDED`] when a [`VerbsContextTail`] precedes the context.
    pub abi_compat: *mut c_void,
}

/// `__VERBS_ABI_IS_EXTENDED`: the value of `abi_compat` in a context of rdma-core's providers.
pub const VERBS_ABI_IS_EXTENDED: usize = usize::MAX;

/// `ibv_query_device_ex`'s entry in `struct verbs_context`.
pub type QueryDeviceEx = unsafe extern "C" fn(*mut Context, *const c_void, *mut DeviceAttrEx, usize) -> c_int;

/// The last fields of `struct verbs_context`, which ends with the `ibv_context` the library hands
/// out ("grows up": new entries go before these, so their distance from the context is fixed).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VerbsContextTail {
    pub query_device_ex: Option<QueryDeviceEx>,
    /// From `ibv_destroy_flow` to `_ABI_placeholder3`.
    pub _later: [usize; 11],
    /// The size of the provider's `verbs_context`: an entry exists only if it reaches that far.
    pub sz: usize,
}

/// `struct ibv_odp_caps`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OdpCaps {
    pub general_caps: u64,
    pub rc_odp_caps: u32,
    pub uc_odp_caps: u32,
    pub ud_odp_caps: u32,
}

/// `struct ibv_device_attr_ex`, up to the on-demand paging capabilities (the rest is opaque).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceAttrEx {
    /// `struct ibv_device_attr` from `fw_ver` to `page_size_cap`.
    pub _orig_head: [u64; 12],
    pub vendor_id: u32,
    pub vendor_part_id: u32,
    /// The rest of `struct ibv_device_attr`.
    pub _orig_tail: [u64; 16],
    pub comp_mask: u32,
    pub odp_caps: OdpCaps,
    pub _rest: [u64; 17],
}

/// The vendor id soft-RoCE (rdma_rxe) reports.
pub const RXE_VENDOR_ID: u32 = 0x00ff_ffff;

/// An entry of `ops` that om does not call.
pub type Unused = Option<unsafe extern "C" fn()>;

/// `struct ibv_context_ops` (32 pointers; om calls three of them).
#[repr(C)]
#[derive(Debug)]
pub struct ContextOps {
    pub _compat_0_10: [Unused; 11],
    pub poll_cq: Option<unsafe extern "C" fn(*mut Cq, c_int, *mut Wc) -> c_int>,
    pub _compat_12_24: [Unused; 13],
    pub post_send: Option<unsafe extern "C" fn(*mut Qp, *mut SendWr, *mut *mut SendWr) -> c_int>,
    pub post_recv: Option<unsafe extern "C" fn(*mut Qp, *mut RecvWr, *mut *mut RecvWr) -> c_int>,
    pub _compat_27_31: [Unused; 5],
}

/// `struct ibv_pd` (only passed back to the library).
pub type Pd = c_void;

/// `struct ibv_cq`, up to what om reads.
#[repr(C)]
#[derive(Debug)]
pub struct Cq {
    pub context: *mut Context,
    pub channel: *mut c_void,
    pub cq_context: *mut c_void,
    pub handle: u32,
    pub cqe: c_int,
}

/// `struct ibv_qp`, up to what om reads.
#[repr(C)]
#[derive(Debug)]
pub struct Qp {
    pub context: *mut Context,
    pub qp_context: *mut c_void,
    pub pd: *mut Pd,
    pub send_cq: *mut Cq,
    pub recv_cq: *mut Cq,
    pub srq: *mut c_void,
    pub handle: u32,
    pub qp_num: u32,
    pub state: c_uint,
    pub qp_type: c_uint,
}

/// `struct ibv_mr`.
#[repr(C)]
#[derive(Debug)]
pub struct Mr {
    pub context: *mut Context,
    pub pd: *mut Pd,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// `struct ibv_sge`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Sge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

/// `wr.rdma` of `struct ibv_send_wr` inside its 32-byte union.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RdmaWr {
    pub remote_addr: u64,
    pub rkey: u32,
    pub _union_rest: [u32; 5],
}

/// `struct ibv_send_wr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SendWr {
    pub wr_id: u64,
    pub next: *mut SendWr,
    pub sg_list: *mut Sge,
    pub num_sge: c_int,
    pub opcode: c_uint,
    pub send_flags: c_uint,
    pub imm_data: u32,
    pub rdma: RdmaWr,
    pub qp_type: u32,
    pub _pad: u32,
    pub bind_mw_or_tso: [u64; 6],
}

impl Default for SendWr {
    fn default() -> Self {
        Self {
            wr_id: 0,
            next: std::ptr::null_mut(),
            sg_list: std::ptr::null_mut(),
            num_sge: 0,
            opcode: 0,
            send_flags: 0,
            imm_data: 0,
            rdma: RdmaWr::default(),
            qp_type: 0,
            _pad: 0,
            bind_mw_or_tso: [0; 6],
        }
    }
}

/// `struct ibv_recv_wr`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RecvWr {
    pub wr_id: u64,
    pub next: *mut RecvWr,
    pub sg_list: *mut Sge,
    pub num_sge: c_int,
}

/// `struct ibv_wc`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Wc {
    pub wr_id: u64,
    pub status: c_uint,
    pub opcode: c_uint,
    pub vendor_err: u32,
    pub byte_len: u32,
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: c_uint,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

/// `struct ibv_qp_cap`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// `struct ibv_qp_init_attr`.
#[repr(C)]
#[derive(Debug)]
pub struct QpInitAttr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut Cq,
    pub recv_cq: *mut Cq,
    pub srq: *mut c_void,
    pub cap: QpCap,
    pub qp_type: c_uint,
    pub sq_sig_all: c_int,
}

/// `union ibv_gid` (its `global` view of two `__be64` makes it 8-aligned).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gid(pub [u8; 16]);

/// `struct ibv_global_route`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GlobalRoute {
    pub dgid: Gid,
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

/// `struct ibv_ah_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AhAttr {
    pub grh: GlobalRoute,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

/// `struct ibv_qp_attr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct QpAttr {
    pub qp_state: c_uint,
    pub cur_qp_state: c_uint,
    pub path_mtu: c_uint,
    pub path_mig_state: c_uint,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: c_uint,
    pub cap: QpCap,
    pub ah_attr: AhAttr,
    pub alt_ah_attr: AhAttr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

/// `struct ibv_port_attr` (the exported `ibv_query_port` fills a prefix of it: zero it first).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PortAttr {
    pub state: c_uint,
    pub max_mtu: c_uint,
    pub active_mtu: c_uint,
    pub gid_tbl_len: c_int,
    pub port_cap_flags: u32,
    pub max_msg_sz: u32,
    pub bad_pkey_cntr: u32,
    pub qkey_viol_cntr: u32,
    pub pkey_tbl_len: u16,
    pub lid: u16,
    pub sm_lid: u16,
    pub lmc: u8,
    pub max_vl_num: u8,
    pub sm_sl: u8,
    pub subnet_timeout: u8,
    pub init_type_reply: u8,
    pub active_width: u8,
    pub active_speed: u8,
    pub phys_state: u8,
    pub link_layer: u8,
    pub flags: u8,
    pub port_cap_flags2: u16,
}

// Sizes on x86_64/aarch64 (LP64), as rdma-core's header lays them out.
const _: () = assert!(size_of::<ContextOps>() == 32 * 8);
const _: () = assert!(std::mem::offset_of!(ContextOps, poll_cq) == 11 * 8);
const _: () = assert!(std::mem::offset_of!(ContextOps, post_send) == 25 * 8);
const _: () = assert!(std::mem::offset_of!(Context, ops) == 8);
const _: () = assert!(std::mem::offset_of!(Qp, qp_num) == 52);
const _: () = assert!(size_of::<Mr>() == 48);
const _: () = assert!(size_of::<Sge>() == 16);
const _: () = assert!(size_of::<SendWr>() == 128);
const _: () = assert!(std::mem::offset_of!(SendWr, rdma) == 40);
const _: () = assert!(size_of::<RecvWr>() == 32);
const _: () = assert!(size_of::<Wc>() == 48);
const _: () = assert!(size_of::<QpInitAttr>() == 64);
const _: () = assert!(size_of::<AhAttr>() == 32);
const _: () = assert!(size_of::<QpAttr>() == 144);
const _: () = assert!(size_of::<PortAttr>() == 52);
const _: () = assert!(std::mem::offset_of!(PortAttr, link_layer) == 46);
const _: () = assert!(std::mem::offset_of!(QpAttr, timeout) == 130);
const _: () = assert!(std::mem::offset_of!(Context, num_comp_vectors) == 272);
const _: () = assert!(std::mem::offset_of!(Context, abi_compat) == 320);
const _: () = assert!(size_of::<Context>() == 328);
const _: () = assert!(size_of::<VerbsContextTail>() == 104);
const _: () = assert!(size_of::<OdpCaps>() == 24);
const _: () = assert!(std::mem::offset_of!(DeviceAttrEx, odp_caps) == 240);
const _: () = assert!(std::mem::offset_of!(DeviceAttrEx, vendor_id) == 96);
const _: () = assert!(std::mem::offset_of!(DeviceAttrEx, comp_mask) == 232);
const _: () = assert!(size_of::<DeviceAttrEx>() == 400);

// enum ibv_qp_type
pub const QPT_RC: c_uint = 2;
// enum ibv_qp_state
pub const QPS_INIT: c_uint = 1;
pub const QPS_RTR: c_uint = 2;
pub const QPS_RTS: c_uint = 3;
pub const QPS_ERR: c_uint = 6;
// enum ibv_qp_attr_mask
pub const QP_STATE: c_int = 1;
pub const QP_ACCESS_FLAGS: c_int = 1 << 3;
pub const QP_PKEY_INDEX: c_int = 1 << 4;
pub const QP_PORT: c_int = 1 << 5;
pub const QP_AV: c_int = 1 << 7;
pub const QP_PATH_MTU: c_int = 1 << 8;
pub const QP_TIMEOUT: c_int = 1 << 9;
pub const QP_RETRY_CNT: c_int = 1 << 10;
pub const QP_RNR_RETRY: c_int = 1 << 11;
pub const QP_RQ_PSN: c_int = 1 << 12;
pub const QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub const QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub const QP_SQ_PSN: c_int = 1 << 16;
pub const QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub const QP_DEST_QPN: c_int = 1 << 20;
// enum ibv_access_flags
pub const ACCESS_LOCAL_WRITE: c_int = 1;
pub const ACCESS_REMOTE_WRITE: c_int = 1 << 1;
pub const ACCESS_ON_DEMAND: c_int = 1 << 6;
// enum ibv_odp_general_caps
pub const ODP_SUPPORT: u64 = 1;
// enum ibv_odp_transport_cap_bits
pub const ODP_SUPPORT_SEND: u32 = 1;
pub const ODP_SUPPORT_WRITE: u32 = 1 << 2;
// enum ibv_wr_opcode
pub const WR_RDMA_WRITE: c_uint = 0;
pub const WR_SEND: c_uint = 2;
// enum ibv_send_flags
pub const SEND_SIGNALED: c_uint = 1 << 1;
// enum ibv_wc_status
pub const WC_SUCCESS: c_uint = 0;
pub const WC_LOC_PROT_ERR: c_uint = 4;
pub const WC_WR_FLUSH_ERR: c_uint = 5;
// enum ibv_wc_opcode
pub const WC_RECV: c_uint = 1 << 7;
// enum ibv_port_state
pub const PORT_ACTIVE: c_uint = 4;
// IBV_LINK_LAYER_*
pub const LINK_LAYER_ETHERNET: u8 = 2;
