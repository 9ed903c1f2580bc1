//! The hello body: the first thing an unauthenticated peer sends.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Hello;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
    }
});
