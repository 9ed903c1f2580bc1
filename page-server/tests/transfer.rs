//! Pages from a live process's memory into omd's image: byte-for-byte on loopback and between two rig
//! nodes, and every way a transfer can go wrong (a dead receiver, a flipped byte, a wrong key, hostile
//! streams) fails clearly at both ends and leaves the source memory and the receiver's store as they
//! were.

#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use om_page_server::Limits;
use om_page_server::checkpoint::Checkpoint;
use om_transport::sys::Readable;
use om_transport::wire::ErrorCode;
use om_transport::{ClusterKey, PageSender, SenderConfig, TcpSender, TransportError};

mod common;
use common::*;

/// The SISCI emulation built next to omd (`cargo build` builds the workspace's `sisci-emu`).
fn sisci_library() -> String {
    let p = Path::new(OMD).with_file_name("libsisci.so");
    assert!(
        p.exists(),
        "{} is missing: build the SISCI emulation first (cargo build -p sisci-emu)",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

fn sci_server(limits: Limits) -> Server {
    let exporter = om_sci::SciExporter::open_with(Some(&sisci_library())).unwrap();
    server_with(limits, Some(Arc::new(exporter)))
}

fn sci_sender(addr: SocketAddr) -> Result<TcpSender, TransportError> {
    let placer = om_sci::SciPlacer::open_with(Some(&sisci_library())).unwrap();
    TcpSender::connect_placed(addr, &key(), SenderConfig::default(), Box::new(placer))
}

#[test]
fn ships_a_gib_in_rounds_byte_for_byte_over_loopback() {
    let srv = server(big_limits());
    let len = 1 << 30;
    let mut r = random_region(len, 1);
    let mut tx = TcpSender::connect(srv.addr, &key(), SenderConfig::default()).unwrap();
    assert_eq!(tx.streams(), 0, "data streams open only after begin");
    tx.begin(&begin_for(&r)).unwrap();
    assert_eq!(tx.streams(), 2);
    let s0 = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap();
    assert_eq!(s0.bytes, len as u64);
    assert!(s0.suspects.is_empty());
    assert_eq!(s0.image_bytes, len as u64);
    // Round 1: rewrite scattered pages, free a range; only those travel.
    let base = r.addr() as u64;
    let mut dirty = Vec::new();
    for p in (0..(len as u64 / PAGE)).step_by(97) {
        let w = usize::try_from(p * 512).unwrap();
        r.words()[w].store(!word(1, w), Ordering::Relaxed);
        dirty.push(base + p * PAGE..base + (p + 1) * PAGE);
    }
    let freed = base + 64 * PAGE * 1000 + 4 * PAGE..base + 64 * PAGE * 1000 + 68 * PAGE;
    dirty.retain(|d| !(freed.start < d.end && d.start < freed.end));
    r.dontneed(usize::try_from(freed.start - base).unwrap(), 64 * PAGE as usize)
        .unwrap();
    let s1 = tx
        .send_round(readable(&dirty), std::slice::from_ref(&freed), true)
        .unwrap();
    assert_eq!(s1.pages, dirty.len() as u64);
    assert_eq!(s1.image_bytes, len as u64 - 64 * PAGE);
    tx.send_record(7, b"threads go here").unwrap();
    let id = tx.commit().unwrap();
    srv.settle(3);
    let image = srv.store.get(id).expect("committed image kept");
    assert_eq!(image.records()[0].bytes, b"threads go here");
    assert_image_equals(&image, &r, &[freed]);
    // Dropping the image frees its memory.
    drop(image);
    assert!(srv.store.remove(id).is_some());
    assert_eq!(srv.store.used(), 0);
}

/// The SCI transport (over the SISCI emulation): pages placed straight into omd's exported image
/// memory by PIO and DMA, descriptors through the mailbox; rounds, zero runs, a changed VMA table
/// and the final round from a copy land byte for byte, as over TCP.
#[test]
fn ships_pages_over_emulated_sci_byte_for_byte() {
    let srv = sci_server(big_limits());
    let len = 256 * MIB;
    let mut r = random_region(len, 5);
    let mut tx = sci_sender(srv.addr).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    assert_eq!(tx.streams(), 0, "no TCP data streams: pages go over SCI");
    let mapped = tx.mappings();
    assert!(
        !mapped.is_empty(),
        "the receiver's windows and mailbox are mapped"
    );
    assert!(
        mapped
            .iter()
            .all(|m| m.end <= r.addr() as u64 || m.start >= whole(&r).end)
    );
    // Memory that stays mapped: sums from the memory, large pieces by DMA.
    let s0 = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap();
    assert_eq!(s0.bytes, len as u64);
    assert!(s0.suspects.is_empty(), "{:?}", s0.suspects);
    assert_eq!(s0.image_bytes, len as u64);
    // A running application's memory: read once, checksummed, stored by PIO, on two threads.
    let s0 = tx.send_round(Readable::racy(&[whole(&r)]), &[], false).unwrap();
    assert!(s0.suspects.is_empty(), "{:?}", s0.suspects);
    // The same by DMA straight from the memory after a checksum pass (a second session).
    let placer = om_sci::SciPlacer::open_with(Some(&sisci_library()))
        .unwrap()
        .with_racy(om_sci::Racy::Dma);
    assert_eq!(placer.racy(), om_sci::Racy::Dma, "the emulation offers DMA");
    let mut dma =
        TcpSender::connect_placed(srv.addr, &key(), SenderConfig::default(), Box::new(placer)).unwrap();
    dma.begin(&begin_for(&r)).unwrap();
    let d0 = dma.send_round(Readable::racy(&[whole(&r)]), &[], false).unwrap();
    assert!(d0.suspects.is_empty() && d0.bytes == len as u64, "{d0:?}");
    dma.send_round(Readable::copied(&[]), &[], true).unwrap();
    let dma_id = dma.commit().unwrap();
    // A new VMA table: the placement comes again (same windows).
    tx.update_vmas(&begin_for(&r)).unwrap();
    let base = r.addr() as u64;
    let mut dirty = Vec::new();
    for p in (0..(len as u64 / PAGE)).step_by(31) {
        let w = usize::try_from(p * 512).unwrap();
        r.words()[w].store(!word(5, w), Ordering::Relaxed);
        dirty.push(base + p * PAGE..base + (p + 1) * PAGE);
    }
    let freed = base + 40 * PAGE..base + 200 * PAGE;
    dirty.retain(|d| !(freed.start < d.end && d.start < freed.end));
    r.dontneed(40 * PAGE as usize, 160 * PAGE as usize).unwrap();
    // The final round from a copy (PIO with SCIMemCpy), as in a migration's freeze.
    let s1 = tx
        .send_round(Readable::copied(&dirty), std::slice::from_ref(&freed), true)
        .unwrap();
    assert_eq!(s1.pages, dirty.len() as u64);
    let id = tx.commit().unwrap();
    srv.settle(2);
    let image = srv.store.get(id).expect("committed image kept");
    assert_image_equals(&image, &r, &[freed]);
    drop(image);
    assert!(srv.store.remove(id).is_some());
    assert!(srv.store.remove(dma_id).is_some());
    assert_eq!(srv.store.used(), 0);
}

/// Pages the application writes while they are placed: the placer reads each page once and
/// checksums the bytes it stores, so what lands matches its checksum (no suspects, no torn page);
/// the write itself is the dirty tracker's to report, and the final round from a copy makes the
/// image exact.
#[test]
fn pages_written_while_placed_land_as_checksummed() {
    let srv = sci_server(big_limits());
    let len = 64 * MIB;
    let r = random_region(len, 6);
    let mut tx = sci_sender(srv.addr).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    while_writing(&r, || {
        for _ in 0..3 {
            let st = tx.send_round(Readable::racy(&[whole(&r)]), &[], false).unwrap();
            assert!(st.suspects.is_empty(), "{:?}", st.suspects);
        }
    });
    tx.send_round(Readable::copied(&[whole(&r)]), &[], true).unwrap();
    let id = tx.commit().unwrap();
    srv.settle(1);
    assert_image_equals(&srv.store.get(id).unwrap(), &r, &[]);
}

/// A sender that asks for SCI from an omd without it is refused at the handshake, clearly.
#[test]
fn an_omd_without_sci_refuses_a_sci_sender_clearly() {
    let srv = server(big_limits());
    let e = sci_sender(srv.addr).unwrap_err();
    let text = om_transport::error::chain(&e);
    assert!(text.contains("does not offer") && text.contains("SCI"), "{text}");
    assert_eq!(srv.store.used(), 0);
}

#[test]
fn wrong_key_is_refused_before_any_page_moves() {
    let srv = server(big_limits());
    let wrong = ClusterKey::from_bytes(vec![7u8; 32]).unwrap();
    let e = TcpSender::connect(srv.addr, &wrong, SenderConfig::default()).unwrap_err();
    assert!(
        matches!(
            &e,
            TransportError::Refused {
                code: ErrorCode::Auth,
                ..
            }
        ),
        "{e:?}"
    );
    srv.settle(1);
    assert!(
        srv.errors().contains("does not hold the cluster key"),
        "{}",
        srv.errors()
    );
    assert_eq!(srv.store.used(), 0);
    assert!(srv.store.committed().is_empty());
}

/// Forwards one connection to `to`, flipping the byte at `flip` (client to server direction, counted
/// from the first byte) if given.
fn proxy(to: SocketAddr, flip: Option<u64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        let (client, _) = l.accept().unwrap();
        let server = TcpStream::connect(to).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Both);
        });
        let (mut c, mut s) = (client, server);
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0u64;
        loop {
            let n = match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(f) = flip {
                if (at..at + n as u64).contains(&f) {
                    buf[usize::try_from(f - at).unwrap()] ^= 0x20;
                }
            }
            at += n as u64;
            if s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
    addr
}

fn single_stream() -> SenderConfig {
    SenderConfig {
        streams: 0,
        ..SenderConfig::default()
    }
}

#[test]
fn a_flipped_page_byte_fails_the_final_round_at_both_ends() {
    let srv = server(big_limits());
    let r = random_region(16 * MIB, 2);
    // Well past the handshake and the first batch header: inside page data.
    let via = proxy(srv.addr, Some(3 * MIB as u64));
    let mut tx = TcpSender::connect(via, &key(), single_stream()).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    let e = tx.send_round(readable(&[whole(&r)]), &[], true).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            &e,
            TransportError::Refused {
                code: ErrorCode::Checksum,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg.contains("failed their checksum in the final round"), "{msg}");
    srv.settle(1);
    assert!(srv.errors().contains("checksum"), "{}", srv.errors());
    assert_eq!(srv.store.used(), 0, "the rejected image was freed");
    assert!(srv.store.committed().is_empty());
    assert!(region_matches_seed(&r, 2), "source memory untouched");
}

fn wait_reserve(srv: &Server, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while srv.store.reserve().ready != bytes {
        assert!(
            Instant::now() < deadline,
            "reserve never made: {:?}",
            srv.store.reserve()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// omd's reserve (`omd --reserve`): an image that takes it lands its first 64 MiB straight into the
/// reserve's mapping and the rest through the file. A page flipped on the way into the reserve is
/// named and accepted when sent again; scattered pages of a later round on both sides of the
/// reserve's end, a zero run inside it and a hole never sent read back as they should; the reserve
/// is made again once the image is over.
#[test]
fn pages_land_in_the_reserve_byte_for_byte() {
    let srv = server(big_limits());
    srv.store.set_reserve(64 * MIB as u64).unwrap();
    wait_reserve(&srv, 64 * MIB as u64);
    let len = 96 * MIB;
    let mut r = random_region(len, 21);
    let base = r.addr() as u64;
    let hole = base + 10 * MIB as u64..base + 11 * MIB as u64;
    // Inside the first batch's pages, which land in the reserve.
    let via = proxy(srv.addr, Some(3 * MIB as u64));
    let mut tx = TcpSender::connect(via, &key(), single_stream()).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    let s0 = tx
        .send_round(
            readable(&[base..hole.start, hole.end..base + len as u64]),
            &[],
            false,
        )
        .unwrap();
    assert_eq!(
        s0.suspects.len(),
        1,
        "the flipped page is named: {:?}",
        s0.suspects
    );
    assert!(s0.suspects[0].start < base + 64 * MIB as u64);
    assert_eq!(srv.store.reserve().ready, 0, "taken by the image");
    let mut dirty = s0.suspects.clone();
    for p in (0..(len as u64 / PAGE)).step_by(331) {
        let at = base + p * PAGE;
        if hole.contains(&at) || dirty.iter().any(|d| d.contains(&at)) {
            continue;
        }
        let w = usize::try_from(p * 512).unwrap();
        r.words()[w].store(!word(21, w), Ordering::Relaxed);
        dirty.push(at..at + PAGE);
    }
    dirty.sort_by_key(|d| d.start);
    let freed = base + 4 * MIB as u64..base + 4 * MIB as u64 + 16 * PAGE;
    dirty.retain(|d| !(freed.start < d.end && d.start < freed.end));
    r.dontneed(4 * MIB, 16 * PAGE as usize).unwrap();
    tx.send_round(readable(&dirty), std::slice::from_ref(&freed), true)
        .unwrap();
    let id = tx.commit().unwrap();
    srv.settle(1);
    let image = srv.store.get(id).expect("committed image kept");
    assert_eq!(image.memory().warm(), 64 * MIB);
    assert_image_equals(&image, &r, &[freed, hole]);
    drop(image);
    assert!(srv.store.remove(id).is_some());
    wait_reserve(&srv, 64 * MIB as u64);
}

#[test]
fn a_flipped_page_byte_not_sent_again_is_corruption() {
    let srv = server(big_limits());
    let r = random_region(16 * MIB, 3);
    let via = proxy(srv.addr, Some(3 * MIB as u64));
    let mut tx = TcpSender::connect(via, &key(), single_stream()).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    let s0 = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap();
    assert_eq!(s0.suspects.len(), 1, "one page reported: {:?}", s0.suspects);
    // The page was not written again, so it is not in the next round: corruption, not a race.
    let e = tx.send_round(readable(&[]), &[], true).unwrap_err();
    assert!(
        matches!(
            e,
            TransportError::Corrupted {
                round: 0,
                pages: 1,
                ..
            }
        ),
        "{e:?}"
    );
    srv.settle(1);
    assert!(srv.errors().contains("corrupted in transit"), "{}", srv.errors());
    assert_eq!(srv.store.used(), 0);
}

#[test]
fn a_suspect_page_sent_again_is_accepted() {
    let srv = server(big_limits());
    let r = random_region(16 * MIB, 4);
    let via = proxy(srv.addr, Some(3 * MIB as u64));
    let mut tx = TcpSender::connect(via, &key(), single_stream()).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    let s0 = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap();
    // As if the application had written it during round 0: it is dirty and goes again.
    tx.send_round(readable(&s0.suspects), &[], true).unwrap();
    let id = tx.commit().unwrap();
    assert_image_equals(&srv.store.get(id).unwrap(), &r, &[]);
}

#[test]
fn a_flipped_header_byte_is_rejected_as_forged() {
    let srv = server(big_limits());
    let r = random_region(MIB, 5);
    // Byte 250: inside the Begin frame's VMA entry (after a 104-byte Hello and a 72-byte Proof).
    let via = proxy(srv.addr, Some(250));
    let mut tx = TcpSender::connect(via, &key(), single_stream()).unwrap();
    let e = tx.begin(&begin_for(&r)).unwrap_err();
    assert!(
        e.to_string().contains("protocol violation") || matches!(e, TransportError::Refused { .. }),
        "{e:?}"
    );
    srv.settle(1);
    assert!(srv.errors().contains("protocol violation"), "{}", srv.errors());
    assert_eq!(srv.store.used(), 0);
}

#[test]
fn an_image_over_the_limit_is_refused_before_pages_move() {
    let srv = server(Limits {
        per_image: 8 * MIB as u64,
        total: 8 * MIB as u64,
    });
    let r = random_region(16 * MIB, 6);
    let mut tx = TcpSender::connect(srv.addr, &key(), SenderConfig::default()).unwrap();
    let e = tx.begin(&begin_for(&r)).unwrap_err();
    assert!(
        matches!(&e, TransportError::Refused { code: ErrorCode::Limit, reason, .. } if reason.contains("per-image limit")),
        "{e:?}"
    );
    // A sender that understates its size is stopped page by page.
    let mut tx = TcpSender::connect(srv.addr, &key(), SenderConfig::default()).unwrap();
    let mut b = begin_for(&r);
    b.info.populated_bytes = MIB as u64;
    tx.begin(&b).unwrap();
    let t = Instant::now();
    let e = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap_err();
    assert!(e.to_string().contains("memory limit exceeded"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        t.elapsed()
    );
    // The refused connection, then the control connection and both data streams: the image is freed
    // once the last of them lets go of it.
    srv.settle(4);
    assert_eq!(srv.store.used(), 0);
}

/// Raw bytes at the receiver: a handshake-less or truncated stream changes nothing.
#[test]
fn hostile_streams_change_nothing() {
    let srv = server(big_limits());
    let cases: Vec<Vec<u8>> = vec![
        vec![],                                                                 // connect and close
        b"GET / HTTP/1.0\r\nHost: omd.example\r\nAccept: */*\r\n\r\n".to_vec(), // not om
        {
            // a header claiming a huge hello body
            let mut h = b"OMF1".to_vec();
            h.extend_from_slice(&1u16.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&u32::MAX.to_le_bytes());
            h.resize(40, 0);
            h
        },
        {
            // a Begin before authentication
            let mut h = b"OMF1".to_vec();
            h.extend_from_slice(&16u16.to_le_bytes());
            h.resize(40, 0);
            h
        },
        b"OMF1\x01\x00".to_vec(), // truncated header
    ];
    let n = cases.len() as u64;
    for bytes in cases {
        let mut s = TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
    }
    srv.settle(n);
    let errs = srv.errors();
    for want in [
        "not an om frame",
        "exceeds the limit",
        "before authentication",
        "closed the connection",
    ] {
        assert!(errs.contains(want), "{want:?} not in {errs}");
    }
    // A real transfer still works afterwards.
    let r = random_region(MIB, 7);
    let mut tx = TcpSender::connect(srv.addr, &key(), SenderConfig::default()).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    tx.send_round(readable(&[whole(&r)]), &[], true).unwrap();
    let id = tx.commit().unwrap();
    assert_image_equals(&srv.store.get(id).unwrap(), &r, &[]);
}

#[test]
fn a_killed_receiver_fails_the_sender_and_leaves_the_source_untouched() {
    let dir = std::env::temp_dir().join(format!("om-transfer-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keyfile = dir.join("key");
    std::fs::write(&keyfile, [42u8; 32]).unwrap();
    std::fs::set_permissions(&keyfile, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut omd = Command::new(OMD)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--key"])
        .arg(&keyfile)
        .arg("--control")
        .arg(dir.join("omd.sock"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tx = loop {
        match TcpSender::connect(addr, &key(), SenderConfig::default()) {
            Ok(t) => break t,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("omd never came up: {e}"),
        }
    };
    let r = random_region(1 << 30, 8);
    tx.begin(&begin_for(&r)).unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(omd.id()).unwrap());
    let killer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(150));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    });
    let t = Instant::now();
    let e = tx.send_round(readable(&[whole(&r)]), &[], false).unwrap_err();
    killer.join().unwrap();
    omd.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(30), "the sender noticed late");
    assert!(
        matches!(e, TransportError::Io { .. } | TransportError::Closed { .. }),
        "{e:?}"
    );
    assert!(region_matches_seed(&r, 8), "source memory changed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs inside a rig node (see `ships_a_gib_between_two_rig_nodes`): ships a seeded GiB to the omd
/// named by the environment and prints the image id and the region's address.
#[test]
#[ignore = "helper run inside a rig node by ships_a_gib_between_two_rig_nodes"]
fn ship_helper() {
    let Ok(to) = std::env::var("OM_TEST_SHIP_TO") else {
        return;
    };
    let key = ClusterKey::load(Path::new(&std::env::var("OM_TEST_SHIP_KEY").unwrap())).unwrap();
    let seed: u64 = std::env::var("OM_TEST_SHIP_SEED").unwrap().parse().unwrap();
    let r = random_region(1 << 30, seed);
    let mut tx = TcpSender::connect(to.parse().unwrap(), &key, SenderConfig::default()).unwrap();
    tx.begin(&begin_for(&r)).unwrap();
    tx.send_round(readable(&[whole(&r)]), &[], true).unwrap();
    let id = tx.commit().unwrap();
    println!("SHIPPED id={id} addr={}", r.addr());
}

#[test]
fn ships_a_gib_between_two_rig_nodes() {
    let rig = om_rig::Rig::new(2).expect("rig");
    let b = rig.start_omd(1, Path::new(OMD), &[]).expect("omd on node 1");
    let seed = 99;
    let out = rig
        .node(0)
        .unwrap()
        .command(std::env::current_exe().unwrap())
        .args(["--exact", "ship_helper", "--ignored", "--nocapture"])
        .env("OM_TEST_SHIP_TO", b.listen.to_string())
        .env("OM_TEST_SHIP_KEY", &b.key)
        .env("OM_TEST_SHIP_SEED", seed.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("SHIPPED"))
        .expect("helper output");
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (id, base) = (field("id="), field("addr="));
    let dir = Path::new("/dev/shm").join(format!("om-transfer-{}", std::process::id()));
    let reply = control(&b.control, &format!("save {id} {}", dir.display()));
    assert!(reply.starts_with("OK saved"), "{reply}");
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.begin.vmas[0].start, base);
    let mut pages = 0u64;
    ck.for_each_page(|addr, page| {
        let first = usize::try_from((addr - base) / 8).unwrap();
        for (i, w) in page.chunks_exact(8).enumerate() {
            assert_eq!(
                u64::from_le_bytes(w.try_into().unwrap()),
                word(seed, first + i),
                "page {addr:#x}"
            );
        }
        pages += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(pages, (1u64 << 30) / PAGE);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(control(&b.control, &format!("drop {id}")).starts_with("OK"));
    assert!(control(&b.control, "images").starts_with("OK 0"));
    rig.teardown().unwrap();
}

fn control(sock: &Path, line: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut reply).unwrap();
    reply
}
