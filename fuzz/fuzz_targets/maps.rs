//! `/proc/PID/maps` text. The kernel writes it, but a parser that panics on a surprise (a new flag, a
//! name with odd bytes) would take the runtime down inside the application.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(vmas) = om::dirty::maps::parse(data) {
        for v in &vmas {
            assert!(v.start <= v.end);
        }
    }
});
