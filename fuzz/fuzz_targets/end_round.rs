//! The EndRound body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::EndRound;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = EndRound::decode(data) {
        assert_eq!(EndRound::decode(&e.encode()), Ok(e));
    }
});
