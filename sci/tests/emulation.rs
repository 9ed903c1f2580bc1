//! om-sci against the SISCI emulation (`sci/emu`, built as `libsisci.so` with the workspace): error
//! codes as the API defines them, counting interrupts, the mailbox's flow control and its refusal of a
//! hostile sender, and DMA from memory that is gone.

use std::time::{Duration, Instant};

use om_sci::sys::Sisci;
use om_sci::{Code, SciError, mailbox};
use om_transport::sys::Readable;

fn library() -> String {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("libsisci.so");
    assert!(
        p.exists(),
        "{} is missing: build the SISCI emulation first (cargo build -p sisci-emu)",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

fn open() -> Sisci {
    Sisci::open(Some(&library())).expect("the emulation loads")
}

fn code(e: SciError) -> Code {
    match e {
        SciError::Call { code, .. } => code,
        other => panic!("not a SISCI error: {other}"),
    }
}

fn ids(seed: u32) -> impl Iterator<Item = u32> {
    (0..64).map(move |i| seed.wrapping_mul(2_654_435_761).wrapping_add(i * 2) | 1)
}

#[test]
fn a_library_that_is_not_there_is_a_clear_error() {
    let e = Sisci::open(Some("/nonexistent/libsisci.so")).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("cannot load the SISCI library") && text.contains("OM_SISCI_LIB"),
        "{text}"
    );
}

#[test]
fn connections_fail_with_the_api_s_error_codes() {
    let sci = open();
    let node = sci.node().unwrap();
    assert!(node >= 4 && node % 4 == 0, "node id {node}");
    let t0 = Instant::now();
    let e = sci
        .connect(node, 0x0bad_0001, Duration::from_millis(50))
        .unwrap_err();
    assert_eq!(code(e), Code::NoSuchSegment);
    assert!(
        t0.elapsed() >= Duration::from_millis(50),
        "the connect retried until its timeout"
    );
    let e = sci
        .connect(4 * 100_000, 1, Duration::from_millis(10))
        .unwrap_err();
    assert_eq!(code(e), Code::NoSuchNodeId);
    let e = sci.connect_interrupt(node, 4000).unwrap_err();
    assert_eq!(
        code(e),
        Code::NoSuchSegment,
        "SCI_ERR_NO_SUCH_INTNO is the same code"
    );
    // A segment id is one segment's.
    let seg = sci.segment(ids(7), 4096).unwrap();
    let e = sci.segment(std::iter::once(seg.id()), 4096).unwrap_err();
    assert_eq!(code(e), Code::SegmentIdUsed);
    // Gone once removed.
    let id = seg.id();
    drop(seg);
    let e = sci.connect(node, id, Duration::from_millis(10)).unwrap_err();
    assert_eq!(code(e), Code::NoSuchSegment);
}

#[test]
fn a_remote_store_is_a_local_load_and_interrupts_count() {
    let sci = open();
    let node = sci.node().unwrap();
    let seg = sci.segment(ids(11), 64 << 10).unwrap();
    let mut remote = sci.connect(node, seg.id(), Duration::from_secs(1)).unwrap();
    assert_eq!(remote.size(), 64 << 10);
    remote.map().unwrap();
    remote.mem_cpy(4096, b"over the fabric").unwrap();
    remote.barrier();
    let mut got = [0u8; 15];
    assert!(seg.view().unwrap().read(4096, &mut got));
    assert_eq!(&got, b"over the fabric");
    let e = remote.mem_cpy((64 << 10) - 4, b"too long").unwrap_err();
    assert_eq!(code(e), Code::OutOfRange);

    let irq = sci.interrupt().unwrap();
    let bell = sci.connect_interrupt(node, irq.number()).unwrap();
    for _ in 0..3 {
        bell.trigger().unwrap();
    }
    for i in 0..3 {
        assert!(
            irq.wait(Duration::from_millis(100)).unwrap(),
            "trigger {i} was counted"
        );
    }
    let t0 = Instant::now();
    assert!(!irq.wait(Duration::from_millis(30)).unwrap(), "no fourth trigger");
    assert!(t0.elapsed() >= Duration::from_millis(30));
    // A waiter wakes when a trigger comes from another thread.
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            bell.trigger().unwrap();
        });
        assert!(irq.wait(Duration::from_secs(5)).unwrap());
    });
}

#[test]
fn the_mailbox_flows_and_refuses_a_hostile_sender() {
    let sci = open();
    let node = sci.node().unwrap();
    let seg = sci.segment(ids(13), mailbox::BYTES).unwrap();
    let local = seg.view().unwrap();
    mailbox::init(&local);
    let mut remote = sci.connect(node, seg.id(), Duration::from_secs(1)).unwrap();
    remote.map().unwrap();
    let view = remote.view().unwrap();
    assert!(mailbox::is_initialized(&view));
    // The sender fills every slot; then there is no room until the receiver takes one.
    for head in 0..mailbox::SLOTS {
        assert!(mailbox::has_room(&view, head).unwrap());
        let body = vec![u8::try_from(head).unwrap(); 100 + usize::try_from(head).unwrap()];
        let (at, word) = mailbox::slot_of(head, body.len());
        remote.mem_cpy(at, &word).unwrap();
        remote.mem_cpy(at + 8, &body).unwrap();
        remote.barrier();
        mailbox::publish(&view, head + 1);
    }
    assert!(!mailbox::has_room(&view, mailbox::SLOTS).unwrap());
    let first = mailbox::take(&local, 0).unwrap().unwrap();
    assert_eq!(first, vec![0u8; 100]);
    assert!(mailbox::has_room(&view, mailbox::SLOTS).unwrap());
    for tail in 1..mailbox::SLOTS {
        let b = mailbox::take(&local, tail).unwrap().unwrap();
        assert_eq!(b.len(), 100 + usize::try_from(tail).unwrap());
    }
    assert_eq!(mailbox::take(&local, mailbox::SLOTS).unwrap(), None);
    // A head too far ahead, and a length over the cap: refused, nothing taken.
    mailbox::publish(&view, 3 * mailbox::SLOTS);
    assert!(matches!(
        mailbox::take(&local, mailbox::SLOTS),
        Err(SciError::Mailbox(_))
    ));
    let (at, _) = mailbox::slot_of(mailbox::SLOTS, 0);
    remote.mem_cpy(at, &u64::MAX.to_le_bytes()).unwrap();
    mailbox::publish(&view, mailbox::SLOTS + 1);
    assert!(matches!(
        mailbox::take(&local, mailbox::SLOTS),
        Err(SciError::Mailbox(_))
    ));
    // A receiver that gives up: the sender learns it at once instead of waiting for room.
    mailbox::abandon(&local);
    let e = mailbox::has_room(&view, 0).unwrap_err();
    assert!(e.to_string().contains("gave the session up"), "{e}");
}

#[test]
fn dma_from_memory_that_is_gone_fails_and_pio_lands_zeros() {
    let sci = open();
    let node = sci.node().unwrap();
    let seg = sci.segment(ids(17), 64 << 10).unwrap();
    let mut remote = sci.connect(node, seg.id(), Duration::from_secs(1)).unwrap();
    remote.map().unwrap();
    remote.mem_cpy(0, &[0xee; 4096]).unwrap();
    // Below mmap_min_addr: never mapped.
    let runs = std::slice::from_ref(&(0x10000u64..0x11000)).to_vec();
    let readable = Readable::racy(&runs);
    let batch = readable.batches(4096, 16, 16).remove(0);
    let q = sci
        .dma_queue()
        .unwrap()
        .expect("the emulation offers DMA from user memory");
    let e = q.write(&batch, 0x10000, 4096, &remote, 0).unwrap_err();
    assert_eq!(code(e), Code::TransferFailed);
    // Outside the batch: refused before the engine sees it.
    let e = q.write(&batch, 0x20000, 4096, &remote, 0).unwrap_err();
    assert_eq!(code(e), Code::IllegalAddress);
    let zone = remote.view().unwrap().zone(0, 4096).unwrap();
    assert_eq!(
        batch.store(0x10000, &zone, 4096).unwrap(),
        1,
        "one page unreadable"
    );
    let mut got = [1u8; 4096];
    assert!(seg.view().unwrap().read(0, &mut got));
    assert!(got.iter().all(|b| *b == 0), "the unreadable page landed as zeros");
}
