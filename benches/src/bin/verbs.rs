//! Verbs transport benchmark, against perftest's `ib_write_bw` on the same devices in the same run.
//! It needs two RDMA ports that reach each other; CI runs it inside the soft-RoCE guest
//! (`ci/rxe/run.sh`), where rxe0 (10.0.0.1) and rxe1 (10.0.0.2) are joined by a veth pair:
//!
//! `verbs [--mib 64] [--runs 3] [--server-dev rxe1] [--client-dev rxe0] [--addr 10.0.0.2] [--odp]`
//!
//! In one run, for the same bytes:
//! - **ib_write_bw**: perftest's RDMA WRITE bandwidth with messages of [`om_verbs::placer::MAX_WRITE`]
//!   bytes (what om's largest writes are), client on `--client-dev`, server on `--server-dev`;
//! - **om**: the verbs transport shipping a region of random content as one pre-copy round into an
//!   in-process omd page server listening on `--addr`: checksums from the application's memory,
//!   RDMA WRITE straight from it (registered per round), descriptors by SEND, every page's checksum
//!   checked in place by omd, until the round is acknowledged.
//!
//! With `--odp`, both sides register on demand: `ib_write_bw --odp`, and om with `OM_VERBS_ODP=on`
//! (omd's windows and the sender's memory). It prints both rates and `om / ib_write_bw` (the issue's
//! figure).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use om_benches::{median, populated_region};
use om_page_server::Store;
use om_transport::sys::Readable;
use om_transport::{ClusterKey, PageSender, SenderConfig, TcpSender};
use om_verbs::odp::OdpSetting;

const MIB: usize = 1 << 20;

fn key() -> ClusterKey {
    ClusterKey::from_bytes(vec![7u8; 32]).expect("key")
}

/// An in-process omd page server on `ip` that offers verbs.
fn server(ip: &str, odp: OdpSetting) -> (SocketAddr, Store) {
    let limit = 8 << 30;
    let exporter = om_verbs::VerbsExporter::open_with(limit, odp).expect("an RDMA device");
    om_benches::page_server(ip, key(), limit, vec![Arc::new(exporter)])
}

/// One full round of `src` into a new image.
fn om(addr: SocketAddr, src: &om::sys::mman::Region, odp: OdpSetting) -> Duration {
    let start = src.addr() as u64;
    let run = std::slice::from_ref(&(start..start + src.len() as u64)).to_vec();
    let placer = om_verbs::VerbsPlacer::open().expect("libibverbs").with_odp(odp);
    let mut tx =
        TcpSender::connect_placed(addr, &key(), SenderConfig::default(), Box::new(placer)).expect("connect");
    tx.begin(&om_benches::begin_for_region(start, src.len() as u64))
        .expect("begin");
    let t = Instant::now();
    let stats = tx.send_round(Readable::racy(&run), &[], false).expect("round");
    let took = t.elapsed();
    assert!(stats.suspects.is_empty(), "an idle region has no suspect pages");
    tx.abort("benchmark done");
    took
}

/// perftest's RDMA WRITE bandwidth in MB/s (10^6 bytes) for `iters` messages of `size` bytes.
fn ib_write_bw(server_dev: &str, client_dev: &str, addr: &str, size: usize, iters: usize, odp: bool) -> f64 {
    let args = |dev: &str| {
        let mut v = vec![
            "-d".to_owned(),
            dev.to_owned(),
            "-s".to_owned(),
            size.to_string(),
            "-n".to_owned(),
            iters.to_string(),
            "-F".to_owned(),
            "-p".to_owned(),
            "18515".to_owned(),
        ];
        if odp {
            v.push("--odp".to_owned());
        }
        v
    };
    let mut srv = Command::new("ib_write_bw")
        .args(args(server_dev))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ib_write_bw (perftest) in PATH");
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let o = Command::new("ib_write_bw")
            .args(args(client_dev))
            .arg(addr)
            .output()
            .expect("ib_write_bw");
        if o.status.success() {
            out = Some(String::from_utf8_lossy(&o.stdout).into_owned());
            break;
        }
    }
    let _ = srv.wait();
    let out = out.expect("ib_write_bw ran");
    // " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]"
    // " 1048576    64               12.34              12.30                0.000012"
    out.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[0] == size.to_string()).then(|| f[3].parse::<f64>().ok())?
        })
        .unwrap_or_else(|| panic!("no bandwidth line in ib_write_bw's output:\n{out}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: &str| om_benches::opt(&args, name, default);
    let mib: usize = opt("--mib", "64").parse().expect("--mib");
    let runs: usize = opt("--runs", "3").parse().expect("--runs");
    let (server_dev, client_dev, ip) = (
        opt("--server-dev", "rxe1"),
        opt("--client-dev", "rxe0"),
        opt("--addr", "10.0.0.2"),
    );
    let odp = args.iter().any(|a| a == "--odp");
    let setting = if odp { OdpSetting::On } else { OdpSetting::Off };
    let size = usize::try_from(om_verbs::placer::MAX_WRITE).unwrap_or(MIB);
    let len = mib * MIB;
    let (addr, store) = server(&ip, setting);
    let src = populated_region(len, 0x7e4b);
    let (mut perf, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let mbs = ib_write_bw(&server_dev, &client_dev, &ip, size, len / size, odp);
        perf.push(Duration::from_secs_f64(len as f64 / (mbs * 1e6)));
        ours.push(om(addr, &src, setting));
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.used() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let rate = |d: Duration| len as f64 / d.as_secs_f64() / 1e6;
    let (p, o) = (
        rate(median(&perf).expect("runs")),
        rate(median(&ours).expect("runs")),
    );
    let how = if odp { "on demand (ODP)" } else { "pinned" };
    println!(
        "verbs: {client_dev} -> {server_dev}, {mib} MiB, {size}-byte messages, registrations {how}; MB/s, medians of {runs}"
    );
    println!("| size | ib_write_bw | om | om / ib_write_bw |");
    println!("|---|---|---|---|");
    println!("| {mib} MiB | {p:.1} | {o:.1} | {:.2} |", o / p);
}
