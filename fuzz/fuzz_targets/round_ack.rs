//! The RoundAck body: what the receiver holds, and the suspect pages to send again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::RoundAck;

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = RoundAck::decode(data, PAGE) {
        assert!(a.suspects.windows(2).all(|w| w[0].end <= w[1].start));
        assert_eq!(RoundAck::decode(&a.encode(PAGE), PAGE), Ok(a));
    }
});
