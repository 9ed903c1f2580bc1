//! The home relay's messages and the home and terminal records a migrated image carries.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::relay::{Home, Msg, Terminal};
use om_transport::wire::Kind;

fuzz_target!(|data: &[u8]| {
    let Some((&k, body)) = data.split_first() else {
        return;
    };
    if let Ok(kind) = Kind::try_from(u16::from(k)) {
        let _ = Msg::decode(kind, body);
    }
    if let Ok(h) = Home::decode(data) {
        assert_eq!(Home::decode(&h.encode()), Ok(h));
    }
    if let Ok(t) = Terminal::decode(data) {
        assert_eq!(Terminal::decode(&t.encode()), Ok(t));
    }
});
