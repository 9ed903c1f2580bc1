//! The 40-byte frame header: every frame's first bytes, read before anything is authenticated.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::{FrameHeader, Kind};

fuzz_target!(|data: &[u8]| {
    let mut bytes = [0u8; 40];
    let n = data.len().min(40);
    bytes[..n].copy_from_slice(&data[..n]);
    if let Ok((h, kind)) = FrameHeader::decode(&bytes) {
        // Whatever is accepted names a known kind and respects that kind's cap.
        assert_eq!(Kind::try_from(h.kind.get()), Ok(kind));
        assert!(h.len.get() as usize <= kind.max_body());
    }
});
