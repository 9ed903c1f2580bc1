//! The Zero body: runs of pages that read as zeros.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Zero;

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(z) = Zero::decode(data, PAGE) {
        assert!(z.runs.windows(2).all(|w| w[0].end <= w[1].start));
        assert_eq!(Zero::decode(&Zero::encode(z.round, &z.runs, PAGE), PAGE), Ok(z));
    }
});
