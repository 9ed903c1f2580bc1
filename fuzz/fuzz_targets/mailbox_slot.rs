//! A slot of the SCI mailbox, as the receiver copies it out of shared memory the sender writes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = om_sci::mailbox::decode_slot(data) {
        assert!(body.len() <= om_transport::wire::MAX_BATCH_BODY);
        assert_eq!(&data[8..8 + body.len()], body);
    }
});
