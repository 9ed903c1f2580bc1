//! Shared pieces of om's benchmarks.
//!
//! The machines are shared and noisy, so no benchmark reports an absolute time on its own: each one
//! measures its baseline in the same run and prints the ratio.

use std::time::Duration;

/// The median of `samples` (the mean of the two middle ones for an even count); `None` when empty.
#[must_use]
pub fn median(samples: &[Duration]) -> Option<Duration> {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2),
    }
}

/// The value after `--name` in `args`, or `default`.
#[must_use]
pub fn opt(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

/// `measured / baseline`, the figure every benchmark reports.
#[must_use]
pub fn ratio(measured: Duration, baseline: Duration) -> f64 {
    measured.as_secs_f64() / baseline.as_secs_f64()
}

/// A mapped region of `bytes` filled with xorshift words from `seed`: every page populated, none
/// alike.
///
/// # Panics
/// If the region cannot be mapped.
#[must_use]
pub fn populated_region(bytes: usize, seed: u64) -> om::sys::mman::Region {
    let r = om::sys::mman::Region::map_anon(bytes, None).expect("map");
    let mut x = seed | 1;
    for w in r.words() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.store(x, std::sync::atomic::Ordering::Relaxed);
    }
    r
}

/// The VMA table of one anonymous read-write region of `len` bytes at `start`, as a benchmark's
/// image opens it.
#[must_use]
pub fn begin_for_region(start: u64, len: u64) -> om_transport::wire::Begin {
    om_transport::wire::Begin {
        info: om_transport::wire::ImageInfo {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
            flags: 0,
            populated_bytes: len,
        },
        vmas: vec![om_transport::wire::Vma {
            start,
            end: start + len,
            prot: 3,
            flags: 0,
            pgoff: 0,
            name: b"[bench]".to_vec(),
        }],
    }
}

/// An in-process omd page server on `ip` (a free port) with cluster key `key`, at most `limit` bytes
/// per image and in all, offering `exporters` (placing transports); serves until the process ends.
#[must_use]
pub fn page_server(
    ip: &str,
    key: om_transport::ClusterKey,
    limit: u64,
    exporters: Vec<std::sync::Arc<dyn om_transport::api::Exporter>>,
) -> (std::net::SocketAddr, om_page_server::Store) {
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let store = om_page_server::Store::new(om_page_server::Limits {
        per_image: limit,
        total: limit,
    });
    let receiver = om_transport::Receiver::new(
        key,
        std::sync::Arc::new(store.clone()),
        om_transport::ReceiverConfig {
            exporters,
            ..om_transport::ReceiverConfig::default()
        },
    );
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let r = std::sync::Arc::clone(&receiver);
            std::thread::spawn(move || r.serve(s));
        }
    });
    (addr, store)
}

/// Bytes a plain transfer's ends move per call.
const PLAIN_CHUNK: usize = 4 << 20;

/// The receiving end of a plain transfer (a benchmark's `sink ADDR [FRESH_BYTES]`): accepts one
/// connection and reads it to the end, into a reused buffer, or with `fresh` into fresh memory of
/// that many bytes (what any receiver that keeps the bytes pays: every page is allocated and zeroed
/// once); then confirms with one byte and prints `SUNK` and the bytes read.
///
/// # Panics
/// If it cannot listen, accept, map or read.
pub fn sink(addr: &str, fresh: Option<usize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(addr).expect("bind");
    let mut fresh = fresh.map(|n| om::sys::mman::Region::map_anon(n, None).expect("map"));
    let mut reused = vec![0u8; PLAIN_CHUNK];
    println!("READY");
    std::io::stdout().flush().ok();
    let (mut s, _) = l.accept().expect("accept");
    let mut total = 0usize;
    loop {
        let buf: &mut [u8] = match &mut fresh {
            Some(r) => {
                let b = r.bytes_mut();
                let end = b.len().min(total + PLAIN_CHUNK);
                &mut b[total..end]
            }
            None => &mut reused,
        };
        if buf.is_empty() {
            break;
        }
        match s.read(buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("read: {e}"),
        }
    }
    s.write_all(b"k").ok();
    println!("SUNK {total}");
}

/// The sending end of a plain transfer: sends `bytes` to `addr` with a `send()` loop and prints
/// `SECS` (from the first byte to the receiver's confirmation) and `CPU` (the machine's busy time
/// across them, [`machine_busy`]).
///
/// # Panics
/// If it cannot connect or send, or gets no confirmation.
pub fn blast(addr: &str, bytes: &[u8]) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let cpu = machine_busy();
    let t = std::time::Instant::now();
    for c in bytes.chunks(PLAIN_CHUNK) {
        s.write_all(c).expect("send");
    }
    s.shutdown(std::net::Shutdown::Write).ok();
    let mut k = [0u8; 1];
    s.read_exact(&mut k).expect("confirmation");
    println!(
        "SECS {} CPU {}",
        t.elapsed().as_secs_f64(),
        (machine_busy() - cpu).as_secs_f64()
    );
}

/// One request line to the omd whose control socket is `sock`, and its answer (empty when omd
/// cannot be reached: it may still be starting).
#[must_use]
pub fn omd_request(sock: &std::path::Path, line: &str) -> String {
    use std::io::{BufRead, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return String::new();
    };
    writeln!(s, "{line}").ok();
    let mut reply = String::new();
    std::io::BufReader::new(s).read_line(&mut reply).ok();
    reply
}

/// Sets the reserve of the omd at `sock` to `bytes` (`omd --reserve`) and waits until it is made:
/// a first touch of all of it, seconds per GiB.
///
/// # Panics
/// If omd refuses, or has not made it within 180 s.
pub fn set_reserve(sock: &std::path::Path, bytes: usize) {
    let reply = omd_request(sock, &format!("reserve {bytes}"));
    assert!(reply.starts_with("OK"), "reserve {bytes}: {reply:?}");
    let ready = format!("ready={bytes}");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while !omd_request(sock, "reserve")
        .split_whitespace()
        .any(|w| w == ready)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "omd did not make its reserve of {bytes} bytes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The word after `key` in a sub-command's output (`SECS 0.31 CPU 0.52` ...).
///
/// # Panics
/// If `key` is not there.
#[must_use]
pub fn word_after(out: &str, key: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != key)
        .nth(1)
        .unwrap_or_else(|| panic!("no {key} in {out:?}"))
        .to_owned()
}

/// CPU time the whole machine spent busy (user, nice, system, irq and softirq time of every CPU, from
/// `/proc/stat`) since boot. Both ends of a benchmark's transfer run on this machine, so the busy
/// time across a measured window is what the two ends cost together, whichever process spent it.
///
/// # Panics
/// If `/proc/stat` cannot be read or parsed.
#[must_use]
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    busy_of(&stat).expect("a cpu line in /proc/stat")
}

/// The busy time in the `cpu` line of a `/proc/stat` text.
fn busy_of(stat: &str) -> Option<Duration> {
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal ...: idle, iowait and steal are not busy.
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i))
        .sum::<Option<u64>>()?;
    // In USER_HZ ticks, 100 a second in the kernel's ABI on every architecture om builds for.
    Some(Duration::from_millis(busy * 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(3), ms(1), ms(2)]), Some(ms(2)));
        assert_eq!(
            median(&[ms(4), ms(1), ms(2), ms(3)]),
            Some(Duration::from_micros(2500))
        );
        assert_eq!(median(&[]), None);
        assert!((ratio(ms(3), ms(2)) - 1.5).abs() < 1e-12);
        let args: Vec<String> = ["b", "--runs", "5"].map(String::from).to_vec();
        assert_eq!(opt(&args, "--runs", "3"), "5");
        assert_eq!(opt(&args, "--gib", "1"), "1");
    }

    #[test]
    fn a_word_after_its_key() {
        assert_eq!(super::word_after("SECS 0.5 CPU 0.75", "CPU"), "0.75");
        assert_eq!(super::word_after("SECS 0.5 CPU 0.75", "SECS"), "0.5");
    }

    #[test]
    fn busy_time_counts_user_system_and_interrupts_only() {
        let stat = "cpu  100 20 30 5000 7 1 2 900 0 0\ncpu0 50 10 15 2500 3 0 1 450 0 0\n";
        assert_eq!(super::busy_of(stat), Some(Duration::from_millis(1530)));
        assert_eq!(super::busy_of("cpu0 1 2 3\n"), None);
        assert_eq!(super::busy_of("cpu  1 2\n"), None);
    }

    /// The machine's steal time so far: what the host took from this VM's CPUs while they had work.
    fn steal() -> Duration {
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        let ticks: u64 = stat
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .nth(8)
            .unwrap()
            .parse()
            .unwrap();
        Duration::from_millis(ticks * 10)
    }

    #[test]
    fn a_spinning_thread_shows_as_busy() {
        let (before, stolen) = (super::machine_busy(), steal());
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(300) {
            std::hint::spin_loop();
        }
        // The 300 ms this thread spun are busy time, but for what the host stole meanwhile (on a
        // shared VM, it does), less one tick of rounding at each end.
        let busy = super::machine_busy() - before;
        let stolen = steal() - stolen;
        assert!(
            busy + stolen >= Duration::from_millis(280),
            "{busy:?} busy, {stolen:?} stolen"
        );
        assert!(busy > Duration::ZERO);
    }
}
