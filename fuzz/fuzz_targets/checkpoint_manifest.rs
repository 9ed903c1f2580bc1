//! A checkpoint directory's manifest, read from disk at restart: untrusted once it left the node.
//! (Fuzzing builds skip the manifest checksum, so mutations reach the parser behind it.)
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_page_server::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Checkpoint::decode_manifest(data) {
        let again = c.encode_manifest().expect("an accepted manifest encodes");
        let d = Checkpoint::decode_manifest(&again).expect("a re-encoded manifest decodes");
        assert_eq!(
            (d.page_size, &d.begin, &d.runs, &d.sums),
            (c.page_size, &c.begin, &c.runs, &c.sums)
        );
        assert_eq!(d.records, c.records);
    }
});
