//! Text bodies (Refused, Error, Abort): a code and a UTF-8 message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Text;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = Text::decode(data) {
        assert_eq!(Text::decode(&Text::encode(t.code, &t.text)), Ok(t));
    }
});
