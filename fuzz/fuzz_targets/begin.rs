//! The Begin body: image info and the VMA table with names.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Begin;

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Begin::decode(data, PAGE) {
        for v in &b.vmas {
            assert!(v.start < v.end && v.start % PAGE == 0 && v.end % PAGE == 0);
        }
        let again = b.encode().expect("an accepted table encodes");
        assert_eq!(Begin::decode(&again, PAGE), Ok(b));
    }
});
