//! `om-counter [STEPS]`: a small computation for the demo. Two threads take turns extending a
//! running hash of a heap buffer; every 50 ms the main thread prints the step and the hash, so a run
//! that was checkpointed and restarted part-way prints exactly what an uninterrupted one does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

fn main() {
    let steps: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(40);
    let state = Arc::new(Mutex::new((vec![0u64; 1 << 20], 0xcbf2_9ce4_8422_2325u64)));
    for step in 1..=steps {
        let worker = {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                let mut g = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (buf, hash) = &mut *g;
                for (i, w) in buf.iter_mut().enumerate() {
                    *hash = (*hash ^ (*w ^ i as u64)).wrapping_mul(0x100_0000_01b3);
                    *w = *hash;
                }
            })
        };
        let _ = worker.join();
        let hash = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1;
        println!("step {step:2}/{steps}  state {hash:016x}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
