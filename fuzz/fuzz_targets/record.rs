//! Record bodies: a kind and opaque bytes (thread and process state).
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Record::decode(data) {
        assert_eq!(Record::decode(&Record::encode(r.kind, &r.bytes)), Ok(r));
    }
});
