//! Records: the wire envelope (a kind and opaque bytes), then the body by its kind: process,
//! thread, descriptor, mapped file (om-restore reads them from an image that came over the network
//! or from a checkpoint directory), home and terminal (omd's relay).
#![no_main]
use libfuzzer_sys::fuzz_target;
use om::image::records::{
    FdRecord, KIND_FD, KIND_HOME, KIND_MAPPED_FILE, KIND_PROCESS, KIND_TERMINAL, KIND_THREAD, MappedFile,
    ProcessRecord, ThreadRecord,
};
use om_transport::relay::{Home, Terminal};
use om_transport::wire::Record;

/// Whatever a decoder accepts encodes back to bytes that decode to the same value.
macro_rules! round_trip {
    ($t:ty, $bytes:expr) => {
        if let Ok(v) = <$t>::decode($bytes) {
            assert_eq!(<$t>::decode(&v.encode()).ok(), Some(v));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Ok(r) = Record::decode(data) else {
        return;
    };
    assert_eq!(Record::decode(&Record::encode(r.kind, &r.bytes)).as_ref(), Ok(&r));
    let b = r.bytes.as_slice();
    match r.kind {
        KIND_PROCESS => round_trip!(ProcessRecord, b),
        KIND_THREAD => round_trip!(ThreadRecord, b),
        KIND_FD => round_trip!(FdRecord, b),
        KIND_MAPPED_FILE => round_trip!(MappedFile, b),
        KIND_HOME => round_trip!(Home, b),
        KIND_TERMINAL => round_trip!(Terminal, b),
        _ => {}
    }
});
