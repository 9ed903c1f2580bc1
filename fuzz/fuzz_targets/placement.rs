//! The Placement body: where a placing transport (SCI) puts each address range of an image.
#![no_main]
use libfuzzer_sys::fuzz_target;
use om_transport::wire::Placement;

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Placement::decode(data, PAGE) {
        assert!(p.extents.windows(2).all(|w| w[0].end <= w[1].start));
        let span = (p.windows.len() as u64) << p.window_shift;
        assert!(p.extents.iter().all(|e| e.offset + (e.end - e.start) <= span));
        assert_eq!(Placement::decode(&p.encode(), PAGE).as_ref(), Ok(&p));
        // Every page of an extent has a place inside the windows.
        if let Some(e) = p.extents.first() {
            let pieces = p.pieces(&(e.start..e.end)).expect("an extent is placed");
            assert_eq!(pieces.iter().map(|x| x.2).sum::<u64>(), e.end - e.start);
            assert!(
                pieces
                    .iter()
                    .all(|&(w, o, n)| w < p.windows.len() && o + n <= 1 << p.window_shift)
            );
        }
    }
});
