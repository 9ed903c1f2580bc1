//! SCI transport benchmark, over the SISCI emulation:
//! `cargo build --release -p sisci-emu && cargo run --release -p om-benches --bin sci [-- --gib 1,4 --runs 3]`
//!
//! For each size, in the same run and the same process:
//! - **memcpy**: a `memcpy` of the region into a remote mapping of a fresh shared segment of the same
//!   size (what a program that stores straight into the fabric reaches), then again into the same,
//!   now allocated, segment (warm);
//! - **om**: the SCI transport shipping the same region (random content) as one pre-copy round into an
//!   in-process omd page server whose image memory is exported as windows: checksums from a kernel
//!   copy, pages placed by DMA (256 KiB pieces and up) or PIO, descriptors through the mailbox, every
//!   page's checksum checked in place by omd, until the round is acknowledged; then a second full
//!   round into the same image (warm).
//!
//! om runs twice: racy pages read once and stored by PIO (the default over the emulation, whose DMA
//! engine is the CPU), and checksummed first, then DMAed straight from the application's memory
//! (the default on an adapter with a DMA engine). It prints the rates and `om / memcpy`, cold and
//! warm (the figure is the ratio).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use om::sys::mman::Region;
use om_benches::{median, populated_region};
use om_page_server::Store;
use om_transport::api::Exporter;
use om_transport::sys::Readable;
use om_transport::{ClusterKey, PageSender, SenderConfig, TcpSender};

const GIB: usize = 1 << 30;

fn library() -> String {
    let exe = std::env::current_exe().expect("exe");
    let p = exe.parent().expect("dir").join("libsisci.so");
    assert!(
        p.exists(),
        "build the emulation first: cargo build --release -p sisci-emu"
    );
    p.to_string_lossy().into_owned()
}

fn key() -> ClusterKey {
    ClusterKey::from_bytes(vec![9u8; 32]).expect("key")
}

/// An in-process omd page server that offers SCI.
fn server(lib: &str) -> (SocketAddr, Store) {
    let exporter: Arc<dyn Exporter> = Arc::new(om_sci::SciExporter::open_with(Some(lib)).expect("SISCI"));
    om_benches::page_server("127.0.0.1", key(), 16 << 30, vec![exporter])
}

/// Memcpy into a fresh segment, then into the same one again: (cold, warm).
fn memcpy(sci: &om_sci::sys::Sisci, src: &mut Region, seed: u32) -> (Duration, Duration) {
    let len = src.len();
    let ids = (0..64u32).map(|i| seed.wrapping_mul(2_654_435_761).wrapping_add(2 * i) | 1);
    let seg = sci.segment(ids, len).expect("segment");
    let mut remote = sci
        .connect(sci.node().expect("node"), seg.id(), Duration::from_secs(1))
        .expect("connect");
    remote.map().expect("map");
    let zone = remote.view().expect("view").zone(0, len).expect("zone");
    let bytes = src.bytes_mut();
    let t = Instant::now();
    zone.fill_from(bytes).expect("copy");
    let cold = t.elapsed();
    let t = Instant::now();
    zone.fill_from(bytes).expect("copy");
    (cold, t.elapsed())
}

/// One image, two full rounds: (cold, warm).
fn om(addr: SocketAddr, lib: &str, src: &Region, racy: om_sci::Racy) -> (Duration, Duration) {
    let start = src.addr() as u64;
    let run = std::slice::from_ref(&(start..start + src.len() as u64)).to_vec();
    let begin = om_benches::begin_for_region(start, src.len() as u64);
    let placer = om_sci::SciPlacer::open_with(Some(lib))
        .expect("SISCI")
        .with_racy(racy);
    let mut tx =
        TcpSender::connect_placed(addr, &key(), SenderConfig::default(), Box::new(placer)).expect("connect");
    tx.begin(&begin).expect("begin");
    let t = Instant::now();
    tx.send_round(Readable::racy(&run), &[], false).expect("round");
    let cold = t.elapsed();
    let t = Instant::now();
    tx.send_round(Readable::racy(&run), &[], false).expect("round");
    let warm = t.elapsed();
    tx.abort("benchmark done");
    (cold, warm)
}

fn rate(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: &str| om_benches::opt(&args, name, default);
    let sizes: Vec<usize> = opt("--gib", "1,4")
        .split(',')
        .map(|s| s.parse().expect("--gib"))
        .collect();
    let runs: usize = opt("--runs", "3").parse().expect("--runs");
    let lib = library();
    let (addr, store) = server(&lib);
    let sci = om_sci::sys::Sisci::open(Some(&lib)).expect("SISCI");
    println!("SCI over the SISCI emulation ({lib}); GB/s, medians of {runs}");
    println!(
        "| size | racy pages | memcpy cold | om cold | om / memcpy cold | memcpy warm | om warm | om / memcpy warm |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for gib in sizes {
        let len = gib * GIB;
        let mut src = populated_region(len, 0x5c1 + gib as u64);
        for (label, racy) in [
            ("read once, PIO", om_sci::Racy::ReadOnce),
            ("checksum pass, DMA", om_sci::Racy::Dma),
        ] {
            let (mut mc, mut mw, mut oc, mut ow) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for i in 0..runs {
                let (c, w) = memcpy(&sci, &mut src, u32::try_from(i).unwrap_or(0) + 1);
                mc.push(c);
                mw.push(w);
                let (c, w) = om(addr, &lib, &src, racy);
                oc.push(c);
                ow.push(w);
                // The aborted images are freed once their sessions end.
                let deadline = Instant::now() + Duration::from_secs(10);
                while store.used() > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let m = |v: &[Duration]| rate(len, median(v).expect("runs"));
            let (mc, oc, mw, ow) = (m(&mc), m(&oc), m(&mw), m(&ow));
            println!(
                "| {gib} GiB | {label} | {mc:.2} | {oc:.2} | {:.2} | {mw:.2} | {ow:.2} | {:.2} |",
                oc / mc,
                ow / mw
            );
        }
    }
}
