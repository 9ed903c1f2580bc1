//! Answer bodies (a migration copy's fate): a state and a pid that must match it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Fate;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Fate::decode(data) {
        assert_eq!(Fate::decode(&f.encode()), Ok(f));
        assert_eq!(f.encode().as_slice(), data);
    }
});
