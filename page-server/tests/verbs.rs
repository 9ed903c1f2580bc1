//! The verbs transport on a real RDMA device: pages by RDMA WRITE from a live process's memory into
//! omd's registered image memory, byte for byte, pinned and on demand (ODP); bounded registration
//! windows; a memlock budget too small for the transport's own buffers; memory moved away under
//! the adapter; a receiver that dies mid-round.
//!
//! The on-demand tests need a device that offers ODP (rxe from Linux 6.14 on, mlx5). Where it does
//! not, they say so and pass, unless `OM_VERBS_EXPECT_ODP` is set (the guest with the newer kernel
//! sets it), which makes them fail instead.
//!
//! These tests need an RDMA device, so they are ignored by default. CI runs them inside the
//! soft-RoCE guest (`ci/rxe/run.sh`), where the receiver listens on rxe1's address and the sender
//! uses rxe0's. On a machine with an HCA:
//!
//! ```sh
//! OM_VERBS_DEVICE=mlx5_0 OM_VERBS_TEST_ADDR=<the port's IP> \
//!   cargo test -p om-page-server --test verbs -- --ignored
//! ```
//!
//! (`OM_VERBS_DEVICE` may be left out on RoCE, where the address picks the port.)

#![allow(clippy::cast_possible_truncation)]

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use om_page_server::Limits;
use om_transport::sys::Readable;
use om_transport::{PageSender, SenderConfig, TcpSender, TransportError};
use om_verbs::odp::OdpSetting;

/// The address the receiver listens on: one the device serves.
fn addr() -> String {
    std::env::var("OM_VERBS_TEST_ADDR").unwrap_or_else(|_| "127.0.0.1".into())
}

fn verbs_server(limits: Limits) -> Server {
    let exporter = om_verbs::VerbsExporter::open(limits.per_image).expect("an RDMA device");
    server_at(&addr(), limits, Some(std::sync::Arc::new(exporter)))
}

fn verbs_sender(
    to: std::net::SocketAddr,
    placer: om_verbs::VerbsPlacer,
) -> Result<TcpSender, TransportError> {
    TcpSender::connect_placed(to, &key(), SenderConfig::default(), Box::new(placer))
}

fn limits() -> Limits {
    Limits {
        per_image: 1 << 30,
        total: 1 << 30,
    }
}

/// Begins an image of a fresh 1 MiB region (content `seed`) with `placer` and expects that to fail
/// before any page moves, the region untouched; returns the error's whole text.
fn refused_before_any_page(srv: &Server, placer: om_verbs::VerbsPlacer, seed: u64) -> String {
    let r = random_region(MIB, seed);
    let e = verbs_sender(srv.addr, placer)
        .and_then(|mut tx| tx.begin(&begin_for(&r)).map(|_| ()))
        .expect_err("refused before any page moves");
    assert!(region_matches_seed(&r, seed), "source memory untouched");
    om_transport::error::chain(&e)
}

/// True when the device offers ODP both ways; false (after saying so) when it does not and the
/// test may pass without it.
fn odp_offered() -> bool {
    let local = addr().parse().ok();
    let offer = om_verbs::odp::offered(local).expect("an RDMA device");
    if offer.source && offer.target {
        return true;
    }
    assert!(
        std::env::var_os("OM_VERBS_EXPECT_ODP").is_none(),
        "OM_VERBS_EXPECT_ODP is set, but the device offers {offer:?}"
    );
    eprintln!("skipped: the device offers no on-demand paging ({offer:?})");
    false
}

/// Memory this process has pinned (`VmPin` of /proc/self/status, which counts verbs
/// registrations that pin), in bytes.
fn pinned_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmPin in /proc/self/status");
    kib * 1024
}

/// Rounds from stable and racy memory, a new VMA table, dirty pages and a freed range, and the
/// final round from a copy land byte for byte; no TCP data stream is opened.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn ships_pages_over_verbs_byte_for_byte() {
    ship_byte_for_byte(OdpSetting::Off, OdpSetting::Off);
}

/// The same with registrations on demand, where the device offers it: omd's windows, then omd's
/// windows and the sender's memory, registered without pinning a page.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn ships_pages_on_demand_byte_for_byte() {
    if odp_offered() {
        // omd on demand with a pinning sender (what `auto` does), and both on demand.
        for (export, send) in [
            (OdpSetting::On, OdpSetting::Off),
            (OdpSetting::On, OdpSetting::On),
        ] {
            eprintln!("export {export:?}, send {send:?}");
            ship_byte_for_byte(export, send);
        }
    }
}

fn ship_byte_for_byte(export: OdpSetting, send: OdpSetting) {
    let exporter = om_verbs::VerbsExporter::open_with(limits().per_image, export).expect("an RDMA device");
    let srv = server_at(&addr(), limits(), Some(std::sync::Arc::new(exporter)));
    let len = 24 * MIB;
    let mut r = random_region(len, 11);
    let placer = om_verbs::VerbsPlacer::open().unwrap().with_odp(send);
    let mut tx = verbs_sender(srv.addr, placer).unwrap();
    let pinned_before = pinned_bytes();
    tx.begin(&begin_for(&r)).unwrap();
    assert_eq!(tx.streams(), 0, "no TCP data streams: pages go by RDMA WRITE");
    let s0 = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap();
    assert_eq!(s0.bytes, len as u64);
    assert!(s0.suspects.is_empty(), "{:?}", s0.suspects);
    // omd's windows stay registered until the commit: pinned, they hold at least the image; the
    // sender keeps its staging buffer (8 MiB) registered, and omd its receive buffers.
    let pinned = pinned_bytes().saturating_sub(pinned_before);
    match (export, send) {
        (OdpSetting::On, OdpSetting::On) => {
            assert!(pinned < 4 * MIB as u64, "{pinned} bytes pinned on demand");
        }
        (OdpSetting::On, _) => assert!(pinned < len as u64, "{pinned} bytes pinned"),
        _ => assert!(pinned >= len as u64, "only {pinned} bytes pinned"),
    }
    let s0 = tx.send_round(Readable::racy(&[whole(&r)]), &[], false).unwrap();
    assert!(s0.suspects.is_empty(), "{:?}", s0.suspects);
    tx.update_vmas(&begin_for(&r)).unwrap();
    let base = r.addr() as u64;
    let mut dirty = Vec::new();
    for p in (0..(len as u64 / PAGE)).step_by(29) {
        let w = usize::try_from(p * 512).unwrap();
        r.words()[w].store(!word(11, w), Ordering::Relaxed);
        // Runs of one and of several pages: staged and zero-copy writes.
        let n = if p % 2 == 0 {
            1
        } else {
            20.min(len as u64 / PAGE - p)
        };
        dirty.push(base + p * PAGE..base + (p + n) * PAGE);
    }
    dirty = om_transport::batch::union(&dirty, &[]);
    let freed = base + 40 * PAGE..base + 200 * PAGE;
    dirty = om_transport::batch::uncovered(&dirty, std::slice::from_ref(&freed));
    r.dontneed(40 * PAGE as usize, 160 * PAGE as usize).unwrap();
    let s1 = tx
        .send_round(readable(&dirty), std::slice::from_ref(&freed), false)
        .unwrap();
    assert!(s1.suspects.is_empty(), "{:?}", s1.suspects);
    // The final round from a copy, as in a migration's freeze.
    let last = &dirty[..dirty.len() / 2];
    tx.send_round(Readable::copied(last), &[], true).unwrap();
    let id = tx.commit().unwrap();
    srv.settle(1);
    assert_eq!(srv.errors(), "");
    let image = srv.store.get(id).expect("committed image kept");
    assert_image_equals(&image, &r, &[freed]);
}

/// With a locked-memory budget far below the memory shipped, the application's memory is
/// registered in bounded windows, dropped and registered again; every byte still lands.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn bounded_registration_windows_ship_everything() {
    let srv = verbs_server(limits());
    let len = 16 * MIB;
    let r = random_region(len, 12);
    let staging = (om_verbs::placer::STAGING_SLOT * om_verbs::placer::STAGING_SLOTS) as u64;
    let placer = om_verbs::VerbsPlacer::open()
        .unwrap()
        .with_budget(staging + om_verbs::placer::HEADROOM + MIB as u64);
    let mut tx = verbs_sender(srv.addr, placer).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    let s0 = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap();
    assert!(s0.suspects.is_empty());
    tx.send_round(Readable::copied(&[]), &[], true).unwrap();
    let id = tx.commit().unwrap();
    srv.settle(1);
    assert_image_equals(&srv.store.get(id).unwrap(), &r, &[]);
}

/// A budget that cannot even hold the staging buffer, with on-demand paging off, is a clear error
/// before any page moves.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn a_memlock_budget_below_the_staging_buffer_is_a_clear_error() {
    let srv = verbs_server(limits());
    let placer = om_verbs::VerbsPlacer::open()
        .unwrap()
        .with_budget(MIB as u64)
        .with_odp(OdpSetting::Off);
    let msg = refused_before_any_page(&srv, placer, 13);
    assert!(
        msg.contains("RLIMIT_MEMLOCK") && msg.contains("ulimit -l"),
        "{msg}"
    );
}

/// The same budget where the device offers ODP (and `OM_VERBS_ODP` is left at `auto`): the sender
/// registers on demand instead, and every byte lands.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn a_memlock_budget_below_the_staging_buffer_goes_on_demand_where_offered() {
    if !odp_offered() {
        return;
    }
    let srv = verbs_server(limits());
    let len = 8 * MIB;
    let r = random_region(len, 16);
    let placer = om_verbs::VerbsPlacer::open()
        .unwrap()
        .with_budget(MIB as u64)
        .with_odp(OdpSetting::Auto);
    let mut tx = verbs_sender(srv.addr, placer).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    let s0 = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap();
    assert!(s0.suspects.is_empty(), "{:?}", s0.suspects);
    tx.send_round(Readable::copied(&[]), &[], true).unwrap();
    let id = tx.commit().unwrap();
    srv.settle(1);
    assert_image_equals(&srv.store.get(id).unwrap(), &r, &[]);
}

/// omd registers its windows on demand judging by its own port (MTU 4096); a sender whose port
/// has a smaller MTU makes the path too small for soft-RoCE's on-demand copy, and omd refuses it
/// before any page moves. Runs only where the job arranged such ports
/// (`OM_VERBS_TEST_SMALL_PATH`: the sender's veth at MTU 1500, omd's at 9000).
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn on_demand_windows_refuse_a_path_too_small_for_them() {
    if std::env::var_os("OM_VERBS_TEST_SMALL_PATH").is_none() {
        eprintln!("skipped: OM_VERBS_TEST_SMALL_PATH is not set");
        return;
    }
    let exporter = om_verbs::VerbsExporter::open_with(limits().per_image, OdpSetting::On).unwrap();
    let srv = server_at(&addr(), limits(), Some(std::sync::Arc::new(exporter)));
    let placer = om_verbs::VerbsPlacer::open().unwrap().with_odp(OdpSetting::Auto);
    let msg = refused_before_any_page(&srv, placer, 18);
    assert!(
        msg.contains("registered this image on demand") && msg.contains("MTU"),
        "{msg}"
    );
}

/// The application moves its memory away (`mremap`) after the round's runs were taken and before
/// the adapter reads them. Pinned, the registration of the vanished run fails, the kernel read
/// gives zeros, and the pages come back as suspects: the round goes through. On demand, the
/// registration succeeds (nothing is faulted in) and the adapter's read fails: a clear error, and
/// the moved memory is untouched.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn memory_moved_away_under_the_adapter() {
    let len = 4 * MIB;
    for odp in [OdpSetting::Off, OdpSetting::On] {
        if odp == OdpSetting::On && !odp_offered() {
            continue;
        }
        let exporter = om_verbs::VerbsExporter::open_with(limits().per_image, odp).unwrap();
        let srv = server_at(&addr(), limits(), Some(std::sync::Arc::new(exporter)));
        let mut r = random_region(len, 17);
        let mut tx = verbs_sender(srv.addr, om_verbs::VerbsPlacer::open().unwrap().with_odp(odp)).unwrap();
        tx.begin(&begin_for(&r)).unwrap();
        let run = whole(&r);
        // A page mapped right after the region: it cannot grow in place, so the remap moves it.
        let guard = om::sys::mman::Region::map_anon(PAGE as usize, Some(r.addr() + len));
        r.remap(len + PAGE as usize, None).unwrap();
        drop(guard);
        assert_ne!(r.addr() as u64, run.start, "the region moved");
        // Racy: the sender promises nothing about the memory staying mapped.
        let result = tx.send_round(Readable::racy(std::slice::from_ref(&run)), &[], false);
        match odp {
            OdpSetting::Off => {
                let s = result.expect("pinned: the round goes through");
                // Memory the process maps meanwhile may land in the hole (a buffer of the
                // sender's, read consistently and not suspect), so not every page need be one.
                assert!(
                    !s.suspects.is_empty()
                        && s.suspects
                            .iter()
                            .all(|x| run.start <= x.start && x.end <= run.end),
                    "the vanished pages are suspects: {:?}",
                    s.suspects
                );
            }
            _ => {
                let msg =
                    om_transport::error::chain(&result.expect_err("on demand: the adapter's read fails"));
                assert!(
                    msg.contains("unmapped") && msg.contains("OM_VERBS_ODP=off"),
                    "{msg}"
                );
            }
        }
        let moved = &r.words()[..len / 8];
        assert!(
            moved
                .iter()
                .enumerate()
                .all(|(i, w)| w.load(Ordering::Relaxed) == word(17, i)),
            "the moved memory is untouched"
        );
    }
}

/// The application writes while its pages go by RDMA straight from its memory: pages torn by a
/// write come back as suspects (the sender checksummed before the adapter read), the final round
/// from a copy makes the image exact.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn pages_written_while_written_remotely_end_exact() {
    let srv = verbs_server(limits());
    let len = 8 * MIB;
    let r = random_region(len, 14);
    let mut tx = verbs_sender(srv.addr, om_verbs::VerbsPlacer::open().unwrap()).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    while_writing(&r, || {
        for _ in 0..2 {
            tx.send_round(Readable::racy(&[whole(&r)]), &[], false).unwrap();
        }
    });
    tx.send_round(Readable::copied(&[whole(&r)]), &[], true).unwrap();
    let id = tx.commit().unwrap();
    srv.settle(1);
    assert_image_equals(&srv.store.get(id).unwrap(), &r, &[]);
}

/// omd (the real daemon) dies in the middle of a round: the sender gets a clear error and its
/// memory is untouched.
#[test]
#[ignore = "needs an RDMA device (runs in the soft-RoCE guest)"]
fn a_killed_receiver_fails_the_sender_and_leaves_the_source_untouched() {
    let dir = std::env::temp_dir().join(format!("om-verbs-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, [42u8; 32]).unwrap();
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = 17000 + (std::process::id() % 1000) as u16;
    let listen = format!("{}:{port}", addr());
    // In the guest the daemon is not where cargo built it.
    let omd_bin = std::env::var("OM_OMD").unwrap_or_else(|_| OMD.into());
    let mut omd = Command::new(omd_bin)
        .args(["--listen", &listen, "--key"])
        .arg(&key_file)
        .arg("--control")
        .arg(dir.join("omd.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let to: std::net::SocketAddr = listen.parse().unwrap();
    let mut tx = None;
    for _ in 0..100 {
        match verbs_sender(to, om_verbs::VerbsPlacer::open().unwrap()) {
            Ok(t) => {
                tx = Some(t);
                break;
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
    let mut tx = tx.expect("omd up");
    let len = 64 * MIB;
    let r = random_region(len, 15);
    tx.begin(&begin_for(&r)).unwrap();
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        omd.kill().unwrap();
        omd.wait().unwrap();
        std::time::Instant::now()
    });
    let mut failed = None;
    for _ in 0..20 {
        if let Err(e) = tx.send_round(readable(&[whole(&r)]), &[], false) {
            failed = Some((e, std::time::Instant::now()));
            break;
        }
    }
    let killed = killer.join().unwrap();
    let (e, when) = failed.expect("the sender notices the dead receiver");
    let msg = om_transport::error::chain(&e);
    let after = when.saturating_duration_since(killed);
    eprintln!("the sender failed {after:?} after the kill: {msg}");
    // The control connection breaks at once, or the adapter's retries end (about 0.5 s): never
    // the 60 s no-progress deadline.
    assert!(after < Duration::from_secs(20), "{after:?}: {msg}");
    assert!(region_matches_seed(&r, 15), "source memory untouched");
    let _ = std::fs::remove_dir_all(&dir);
}
