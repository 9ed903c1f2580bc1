//! What the transfer tests share: seeded test memory, an in-process omd page server, image checks.

#![allow(dead_code, clippy::cast_possible_truncation)]

use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use om::sys::mman::Region;
use om_page_server::{Image, Limits, Store};
use om_transport::sys::Readable;
use om_transport::wire::{Begin, ImageInfo, Vma};
use om_transport::{ClusterKey, Receiver, ReceiverConfig};

pub const OMD: &str = env!("CARGO_BIN_EXE_omd");
pub const PAGE: u64 = 4096;
pub const MIB: usize = 1 << 20;

/// Test regions stay mapped until the test ends, which keeps the promise `send_round` needs.
pub fn readable(runs: &[Range<u64>]) -> Readable<'_> {
    // SAFETY: every run passed here lies in a Region that the test keeps alive across the call.
    unsafe { Readable::new(runs) }
}

pub fn key() -> ClusterKey {
    ClusterKey::from_bytes(vec![42u8; 32]).unwrap()
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The word at index `i` of the test content for `seed`.
pub fn word(seed: u64, i: usize) -> u64 {
    splitmix(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d))
}

/// A mapped region filled with seeded random words.
pub fn random_region(len: usize, seed: u64) -> Region {
    let r = Region::map_anon(len, None).unwrap();
    for (i, w) in r.words().iter().enumerate() {
        w.store(word(seed, i), Ordering::Relaxed);
    }
    r
}

pub fn region_matches_seed(r: &Region, seed: u64) -> bool {
    r.words()
        .iter()
        .enumerate()
        .all(|(i, w)| w.load(Ordering::Relaxed) == word(seed, i))
}

pub fn begin_for(r: &Region) -> Begin {
    let start = r.addr() as u64;
    Begin {
        info: ImageInfo {
            pid: std::process::id(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            flags: 0,
            populated_bytes: r.len() as u64,
        },
        vmas: vec![Vma {
            start,
            end: start + r.len() as u64,
            prot: 3,
            flags: 0,
            pgoff: 0,
            name: b"[test heap]".to_vec(),
        }],
    }
}

pub fn whole(r: &Region) -> Range<u64> {
    r.addr() as u64..(r.addr() + r.len()) as u64
}

/// An in-process omd page server on loopback.
pub struct Server {
    pub addr: SocketAddr,
    pub store: Store,
    pub receiver: Arc<Receiver<Store>>,
    pub errors: Arc<std::sync::Mutex<Vec<String>>>,
    pub finished: Arc<AtomicU64>,
}

pub fn server(limits: Limits) -> Server {
    server_with(limits, None)
}

pub fn server_with(limits: Limits, export: Option<Arc<dyn om_transport::api::Exporter>>) -> Server {
    server_at("127.0.0.1", limits, export)
}

/// An in-process omd page server listening on `ip`.
pub fn server_at(ip: &str, limits: Limits, export: Option<Arc<dyn om_transport::api::Exporter>>) -> Server {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let store = Store::new(limits);
    let receiver = Receiver::new(
        key(),
        Arc::new(store.clone()),
        ReceiverConfig {
            idle_timeout: Duration::from_secs(20),
            exporters: export.into_iter().collect(),
            ..ReceiverConfig::default()
        },
    );
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let finished = Arc::new(AtomicU64::new(0));
    let (r, e, f) = (Arc::clone(&receiver), Arc::clone(&errors), Arc::clone(&finished));
    thread::spawn(move || {
        for s in listener.incoming() {
            let (r, e, f) = (Arc::clone(&r), Arc::clone(&e), Arc::clone(&f));
            thread::spawn(move || {
                if let Err(err) = r.serve(s.unwrap()) {
                    e.lock().unwrap().push(om_transport::error::chain(&err));
                }
                f.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Server {
        addr,
        store,
        receiver,
        errors,
        finished,
    }
}

pub fn big_limits() -> Limits {
    Limits {
        per_image: 8 << 30,
        total: 8 << 30,
    }
}

impl Server {
    /// Waits until no session is open and `n` connections have finished.
    pub fn settle(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.receiver.sessions() > 0 || self.finished.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "receiver never settled");
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn errors(&self) -> String {
        self.errors.lock().unwrap().join(" | ")
    }
}

pub fn assert_image_equals(image: &Image, r: &Region, zeroed: &[Range<u64>]) {
    let mut buf = vec![0u8; PAGE as usize];
    let src = r.words();
    for (p, addr) in (whole(r)).step_by(PAGE as usize).enumerate() {
        let landed = image.read_page(addr, &mut buf).unwrap();
        let is_zero = zeroed.iter().any(|z| z.contains(&addr));
        assert_eq!(landed, !is_zero, "page {addr:#x} state");
        for (i, chunk) in buf.chunks_exact(8).enumerate() {
            let want = if is_zero {
                0
            } else {
                src[p * 512 + i].load(Ordering::Relaxed)
            };
            let got = u64::from_le_bytes(chunk.try_into().unwrap());
            assert_eq!(got, want, "page {addr:#x} word {i}");
        }
    }
}

/// Runs `f` while another thread keeps writing words of `r` (4099 words apart, so every page in
/// turn), as a running application does while its pages are sent.
pub fn while_writing<T>(r: &Region, f: impl FnOnce() -> T) -> T {
    let stop = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let words = r.words();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                words[(n * 4099) % words.len()].fetch_add(1, Ordering::Relaxed);
                n += 1;
                if n % 4096 == 0 {
                    // Leave the sender a core on small machines.
                    thread::yield_now();
                }
            }
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        out
    })
}
