//! A queue pair's address from the peer (the receiver's in its `Placement`, the sender's in
//! `Connect`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = om_verbs::endpoint::Endpoint::decode(data) {
        assert!(e.qpn < 1 << 24 && e.psn < 1 << 24 && (1..=5).contains(&e.mtu));
        assert_eq!(e.encode(), data);
    }
});
