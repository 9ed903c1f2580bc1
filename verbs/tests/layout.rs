//! om's copies of the libibverbs structures against the C compiler's view of rdma-core's header:
//! every size, offset and constant om relies on. Needs `<infiniband/verbs.h>` (libibverbs-dev,
//! which `ci/deps.sh` installs); without it the test says so, and fails when `OM_REQUIRE_VERBS_H`
//! is set.

use std::mem::{offset_of, size_of};
use std::process::Command;

use om_verbs::sys::abi::{
    self, AhAttr, Context, ContextOps, DeviceAttrEx, Mr, OdpCaps, PortAttr, Qp, QpAttr, QpInitAttr, RecvWr,
    SendWr, Sge, VerbsContextTail, Wc,
};

const HEADER: &str = "/usr/include/infiniband/verbs.h";

fn n(v: impl TryInto<usize>) -> usize {
    v.try_into().unwrap_or(usize::MAX)
}

/// Every (C expression, om's value) pair checked.
fn expected() -> Vec<(&'static str, usize)> {
    vec![
        ("sizeof(struct ibv_context_ops)", size_of::<ContextOps>()),
        (
            "offsetof(struct ibv_context_ops, poll_cq)",
            offset_of!(ContextOps, poll_cq),
        ),
        (
            "offsetof(struct ibv_context_ops, post_send)",
            offset_of!(ContextOps, post_send),
        ),
        (
            "offsetof(struct ibv_context_ops, post_recv)",
            offset_of!(ContextOps, post_recv),
        ),
        ("offsetof(struct ibv_context, ops)", offset_of!(Context, ops)),
        (
            "offsetof(struct ibv_context, cmd_fd)",
            offset_of!(Context, cmd_fd),
        ),
        (
            "offsetof(struct ibv_context, async_fd)",
            offset_of!(Context, async_fd),
        ),
        ("sizeof(struct ibv_context)", size_of::<Context>()),
        (
            "offsetof(struct ibv_context, abi_compat)",
            offset_of!(Context, abi_compat),
        ),
        (
            "offsetof(struct verbs_context, context) - offsetof(struct verbs_context, query_device_ex)",
            size_of::<VerbsContextTail>() - offset_of!(VerbsContextTail, query_device_ex),
        ),
        (
            "offsetof(struct verbs_context, context) - offsetof(struct verbs_context, sz)",
            size_of::<VerbsContextTail>() - offset_of!(VerbsContextTail, sz),
        ),
        ("(size_t)__VERBS_ABI_IS_EXTENDED", abi::VERBS_ABI_IS_EXTENDED),
        ("sizeof(struct ibv_device_attr_ex)", size_of::<DeviceAttrEx>()),
        (
            "sizeof(struct ibv_device_attr)",
            offset_of!(DeviceAttrEx, comp_mask),
        ),
        (
            "offsetof(struct ibv_device_attr, vendor_id)",
            offset_of!(DeviceAttrEx, vendor_id),
        ),
        (
            "offsetof(struct ibv_device_attr_ex, odp_caps)",
            offset_of!(DeviceAttrEx, odp_caps),
        ),
        ("sizeof(struct ibv_odp_caps)", size_of::<OdpCaps>()),
        (
            "offsetof(struct ibv_odp_caps, per_transport_caps.rc_odp_caps)",
            offset_of!(OdpCaps, rc_odp_caps),
        ),
        ("offsetof(struct ibv_qp, context)", offset_of!(Qp, context)),
        ("offsetof(struct ibv_qp, qp_num)", offset_of!(Qp, qp_num)),
        ("offsetof(struct ibv_cq, context)", offset_of!(abi::Cq, context)),
        ("sizeof(struct ibv_mr)", size_of::<Mr>()),
        ("offsetof(struct ibv_mr, addr)", offset_of!(Mr, addr)),
        ("offsetof(struct ibv_mr, length)", offset_of!(Mr, length)),
        ("offsetof(struct ibv_mr, lkey)", offset_of!(Mr, lkey)),
        ("offsetof(struct ibv_mr, rkey)", offset_of!(Mr, rkey)),
        ("sizeof(struct ibv_sge)", size_of::<Sge>()),
        ("sizeof(struct ibv_send_wr)", size_of::<SendWr>()),
        (
            "offsetof(struct ibv_send_wr, sg_list)",
            offset_of!(SendWr, sg_list),
        ),
        (
            "offsetof(struct ibv_send_wr, num_sge)",
            offset_of!(SendWr, num_sge),
        ),
        ("offsetof(struct ibv_send_wr, opcode)", offset_of!(SendWr, opcode)),
        (
            "offsetof(struct ibv_send_wr, send_flags)",
            offset_of!(SendWr, send_flags),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.rdma.remote_addr)",
            offset_of!(SendWr, rdma),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.rdma.rkey)",
            offset_of!(SendWr, rdma) + 8,
        ),
        ("sizeof(struct ibv_recv_wr)", size_of::<RecvWr>()),
        ("sizeof(struct ibv_wc)", size_of::<Wc>()),
        ("offsetof(struct ibv_wc, status)", offset_of!(Wc, status)),
        ("offsetof(struct ibv_wc, opcode)", offset_of!(Wc, opcode)),
        ("offsetof(struct ibv_wc, byte_len)", offset_of!(Wc, byte_len)),
        ("sizeof(struct ibv_qp_init_attr)", size_of::<QpInitAttr>()),
        (
            "offsetof(struct ibv_qp_init_attr, cap)",
            offset_of!(QpInitAttr, cap),
        ),
        (
            "offsetof(struct ibv_qp_init_attr, qp_type)",
            offset_of!(QpInitAttr, qp_type),
        ),
        ("sizeof(struct ibv_ah_attr)", size_of::<AhAttr>()),
        ("offsetof(struct ibv_ah_attr, dlid)", offset_of!(AhAttr, dlid)),
        (
            "offsetof(struct ibv_ah_attr, is_global)",
            offset_of!(AhAttr, is_global),
        ),
        (
            "offsetof(struct ibv_ah_attr, port_num)",
            offset_of!(AhAttr, port_num),
        ),
        ("sizeof(struct ibv_qp_attr)", size_of::<QpAttr>()),
        (
            "offsetof(struct ibv_qp_attr, dest_qp_num)",
            offset_of!(QpAttr, dest_qp_num),
        ),
        (
            "offsetof(struct ibv_qp_attr, qp_access_flags)",
            offset_of!(QpAttr, qp_access_flags),
        ),
        (
            "offsetof(struct ibv_qp_attr, ah_attr)",
            offset_of!(QpAttr, ah_attr),
        ),
        (
            "offsetof(struct ibv_qp_attr, ah_attr.grh.sgid_index)",
            offset_of!(QpAttr, ah_attr) + offset_of!(abi::GlobalRoute, sgid_index),
        ),
        (
            "offsetof(struct ibv_qp_attr, min_rnr_timer)",
            offset_of!(QpAttr, min_rnr_timer),
        ),
        (
            "offsetof(struct ibv_qp_attr, port_num)",
            offset_of!(QpAttr, port_num),
        ),
        (
            "offsetof(struct ibv_qp_attr, timeout)",
            offset_of!(QpAttr, timeout),
        ),
        (
            "offsetof(struct ibv_qp_attr, rnr_retry)",
            offset_of!(QpAttr, rnr_retry),
        ),
        ("sizeof(struct ibv_port_attr)", size_of::<PortAttr>()),
        (
            "offsetof(struct ibv_port_attr, active_mtu)",
            offset_of!(PortAttr, active_mtu),
        ),
        (
            "offsetof(struct ibv_port_attr, gid_tbl_len)",
            offset_of!(PortAttr, gid_tbl_len),
        ),
        ("offsetof(struct ibv_port_attr, lid)", offset_of!(PortAttr, lid)),
        (
            "offsetof(struct ibv_port_attr, link_layer)",
            offset_of!(PortAttr, link_layer),
        ),
        ("IBV_QPT_RC", n(abi::QPT_RC)),
        ("IBV_QPS_INIT", n(abi::QPS_INIT)),
        ("IBV_QPS_RTR", n(abi::QPS_RTR)),
        ("IBV_QPS_RTS", n(abi::QPS_RTS)),
        ("IBV_QPS_ERR", n(abi::QPS_ERR)),
        ("IBV_QP_STATE", n(abi::QP_STATE)),
        ("IBV_QP_ACCESS_FLAGS", n(abi::QP_ACCESS_FLAGS)),
        ("IBV_QP_PKEY_INDEX", n(abi::QP_PKEY_INDEX)),
        ("IBV_QP_PORT", n(abi::QP_PORT)),
        ("IBV_QP_AV", n(abi::QP_AV)),
        ("IBV_QP_PATH_MTU", n(abi::QP_PATH_MTU)),
        ("IBV_QP_TIMEOUT", n(abi::QP_TIMEOUT)),
        ("IBV_QP_RETRY_CNT", n(abi::QP_RETRY_CNT)),
        ("IBV_QP_RNR_RETRY", n(abi::QP_RNR_RETRY)),
        ("IBV_QP_RQ_PSN", n(abi::QP_RQ_PSN)),
        ("IBV_QP_MAX_QP_RD_ATOMIC", n(abi::QP_MAX_QP_RD_ATOMIC)),
        ("IBV_QP_MIN_RNR_TIMER", n(abi::QP_MIN_RNR_TIMER)),
        ("IBV_QP_SQ_PSN", n(abi::QP_SQ_PSN)),
        ("IBV_QP_MAX_DEST_RD_ATOMIC", n(abi::QP_MAX_DEST_RD_ATOMIC)),
        ("IBV_QP_DEST_QPN", n(abi::QP_DEST_QPN)),
        ("IBV_ACCESS_LOCAL_WRITE", n(abi::ACCESS_LOCAL_WRITE)),
        ("IBV_ACCESS_REMOTE_WRITE", n(abi::ACCESS_REMOTE_WRITE)),
        ("IBV_ACCESS_ON_DEMAND", n(abi::ACCESS_ON_DEMAND)),
        ("IBV_ODP_SUPPORT", n(abi::ODP_SUPPORT)),
        ("IBV_ODP_SUPPORT_SEND", n(abi::ODP_SUPPORT_SEND)),
        ("IBV_ODP_SUPPORT_WRITE", n(abi::ODP_SUPPORT_WRITE)),
        ("IBV_WC_LOC_PROT_ERR", n(abi::WC_LOC_PROT_ERR)),
        ("IBV_WC_WR_FLUSH_ERR", n(abi::WC_WR_FLUSH_ERR)),
        ("IBV_WR_RDMA_WRITE", n(abi::WR_RDMA_WRITE)),
        ("IBV_WR_SEND", n(abi::WR_SEND)),
        ("IBV_SEND_SIGNALED", n(abi::SEND_SIGNALED)),
        ("IBV_WC_SUCCESS", n(abi::WC_SUCCESS)),
        ("IBV_WC_RECV", n(abi::WC_RECV)),
        ("IBV_PORT_ACTIVE", n(abi::PORT_ACTIVE)),
        ("IBV_LINK_LAYER_ETHERNET", n(abi::LINK_LAYER_ETHERNET)),
    ]
}

#[test]
fn om_layouts_match_rdma_core_header() {
    if !std::path::Path::new(HEADER).exists() {
        assert!(
            std::env::var_os("OM_REQUIRE_VERBS_H").is_none(),
            "{HEADER} missing (install libibverbs-dev)"
        );
        eprintln!("skipped: {HEADER} missing (install libibverbs-dev)");
        return;
    }
    let checks = expected();
    let dir = std::env::temp_dir().join(format!("om-verbs-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <infiniband/verbs.h>\nint main(void) {\n",
    );
    for (expr, _) in &checks {
        c.push_str(&format!("    printf(\"%zu\\n\", (size_t)({expr}));\n"));
    }
    c.push_str("    return 0;\n}\n");
    let src = dir.join("layout.c");
    std::fs::write(&src, c).unwrap();
    let exe = dir.join("layout");
    let built = Command::new("gcc")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap();
    assert!(built.success(), "compiling the layout probe failed");
    let out = Command::new(&exe).output().unwrap();
    let got: Vec<usize> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(got.len(), checks.len());
    let wrong: Vec<String> = checks
        .iter()
        .zip(&got)
        .filter(|((_, om), c)| om != *c)
        .map(|((expr, om), c)| format!("{expr}: C {c}, om {om}"))
        .collect();
    assert!(wrong.is_empty(), "layouts differ: {wrong:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}
