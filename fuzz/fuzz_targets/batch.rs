//! The Batch body: runs and one checksum per page (the raw pages follow outside the body).
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Batch;

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = Batch::decode(data, PAGE) {
        let pages: u64 = b.runs.iter().map(|r| (r.end - r.start) / PAGE).sum();
        assert_eq!(pages, b.sums.len() as u64);
        assert!(b.runs.windows(2).all(|w| w[0].end <= w[1].start));
        let again = Batch::encode(b.round, &b.runs, &b.sums, PAGE);
        assert_eq!(Batch::decode(&again, PAGE), Ok(b));
    }
});
