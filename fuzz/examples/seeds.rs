//! Writes the seed corpus in `fuzz/seeds/TARGET/`: valid encodings of every message, made by the real
//! encoders, so that the fuzzer starts past the magic numbers and length checks. Regenerate after a
//! format change:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::fs;
use std::path::Path;

use om::image::records::{
    FdKind, FdRecord, KIND_FD, KIND_HOME, KIND_MAPPED_FILE, KIND_PROCESS, KIND_TERMINAL, KIND_THREAD,
    MappedFile, MmFields, ProcessRecord, RLIMITS, Rseq, SigAction, Special, ThreadRecord,
};
use om_page_server::checkpoint::{Checkpoint, Run};
use om_transport::relay::{Home, Terminal, WinSize};
use om_transport::wire::{
    Batch, Begin, EndRound, Extent, Fate, FrameHeader, Hello, ImageInfo, Kind, Placement, Record, Role,
    RoundAck, Text, VERSION, Vma, Zero, caps,
};
use zerocopy::IntoBytes;

const P: u64 = 4096;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    fs::create_dir_all(&dir).expect("create the seed directory");
    fs::write(dir.join(name), bytes).expect("write a seed");
}

fn begin() -> Begin {
    let vma = |start: u64, pages: u64, prot: u32, flags: u32, name: &[u8]| Vma {
        start,
        end: start + pages * P,
        pgoff: 0,
        prot,
        flags,
        name: name.to_vec(),
    };
    Begin {
        info: ImageInfo {
            pid: 4242,
            uid: 1000,
            gid: 1000,
            flags: 0,
            populated_bytes: 64 * P,
        },
        vmas: vec![
            vma(0x40_0000, 4, 5, 1, b"/usr/bin/app"),
            vma(0x60_0000, 32, 3, 2, b"[heap]"),
            vma(0x7ffd_0000_0000, 8, 3, 4, b"[stack]"),
        ],
    }
}

/// One record of each kind om-restore and omd's relay read, as a capture writes them.
fn records() -> Vec<(&'static str, u32, Vec<u8>)> {
    let process = ProcessRecord {
        pid: 4242,
        control_tid: 4243,
        mm: MmFields {
            start_brk: 0x60_0000,
            brk: 0x62_0000,
            ..MmFields::default()
        },
        auxv: vec![6, 4096, 0, 0],
        exe: "/usr/bin/app".into(),
        cwd: "/home/user".into(),
        umask: 0o22,
        personality: 0,
        rlimits: vec![(8 << 20, u64::MAX); RLIMITS],
        sigactions: vec![SigAction {
            signo: 14,
            handler: 0x40_1000,
            flags: 0x0400_0004,
            restorer: 0x7f00_0000,
            mask: 0,
        }],
        shared_pending: 0,
        xcr0: 0xe7,
        xsave_size: 2696,
        specials: vec![Special {
            name: "[vdso]".into(),
            start: 0x7fff_0000,
            end: 0x7fff_2000,
        }],
        vdso_sum: 9,
        restore_marker: 0x7f12_3400,
        itimers: [(1000, 1000), (0, 0), (0, 0)],
    };
    let thread = ThreadRecord {
        tid: 4243,
        flags: ThreadRecord::CONTROL,
        frame: 0x7ffd_0000_1000,
        fs_base: 0x7f00_1000,
        rseq: Rseq {
            addr: 0x7f00_2000,
            len: 32,
            sig: 0x5305_3053,
        },
        name: *b"app\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ..ThreadRecord::default()
    };
    let fd = FdRecord {
        fd: 3,
        kind: FdKind::File,
        flags: 2,
        offset: 4096,
        path: "/home/user/data".into(),
        content: Vec::new(),
    };
    let file = MappedFile {
        path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
        dev: 0x801,
        ino: 1234,
        size: 2 << 20,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
    };
    vec![
        ("process", KIND_PROCESS, process.encode()),
        ("thread", KIND_THREAD, thread.encode()),
        ("fd", KIND_FD, fd.encode()),
        ("mapped_file", KIND_MAPPED_FILE, file.encode()),
        ("home", KIND_HOME, home().encode()),
        ("terminal", KIND_TERMINAL, terminal().encode()),
    ]
}

fn home() -> Home {
    Home {
        addr: "10.77.0.1:40000".parse().expect("an address"),
        token: vec![9; 32],
        generation: 2,
    }
}

fn terminal() -> Terminal {
    Terminal {
        fds: 0b111,
        iflag: 0x500,
        oflag: 0x5,
        cflag: 0xbf,
        lflag: 0x8a3b,
        line: 0,
        cc: [3; om_transport::relay::NCCS],
        ispeed: 15,
        ospeed: 15,
        size: WinSize {
            rows: 24,
            cols: 80,
            xpixel: 0,
            ypixel: 0,
        },
    }
}

fn main() {
    for (i, kind) in [
        Kind::Hello,
        Kind::Begin,
        Kind::Batch,
        Kind::EndRound,
        Kind::Commit,
    ]
    .into_iter()
    .enumerate()
    {
        let h = FrameHeader::new(kind, 64, i as u64);
        put("frame_header", &format!("{kind:?}"), h.as_bytes());
    }
    let hello = Hello {
        versions: VERSION..VERSION + 1,
        role: Role::Control,
        streams: 2,
        caps: caps::SUPPORTED,
        page_size: 4096,
        session: 7,
        nonce: [9; 32],
    };
    put("hello", "control", &hello.encode());
    put(
        "hello",
        "data",
        &Hello {
            role: Role::Data,
            streams: 1,
            ..hello
        }
        .encode(),
    );
    put("begin", "three-vmas", &begin().encode().expect("encode begin"));
    let runs = [0x60_0000..0x60_0000 + 3 * P, 0x60_8000..0x60_8000 + P];
    put("batch", "two-runs", &Batch::encode(1, &runs, &[1, 2, 3, 4], P));
    put("zero", "two-runs", &Zero::encode(2, &runs, P));
    let endpoint = om_verbs::endpoint::Endpoint {
        qpn: 0x11,
        psn: 0xabcdef,
        lid: 0,
        mtu: 3,
        gid: om_verbs::sys::abi::Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2]),
        base: 0x7f00_0000_0000,
    };
    put("verbs_endpoint", "rxe1", &endpoint.encode());
    let placement = Placement {
        node: 8,
        mailbox: 0x1234_5679,
        doorbell: 1,
        window_shift: 30,
        windows: vec![0x7777_0001, 0x7777_0003],
        extents: vec![
            Extent {
                start: 0x60_0000,
                end: 0x60_0000 + 3 * P,
                offset: 0,
            },
            Extent {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0000_0000 + 256 * P,
                offset: (1 << 30) - 16 * P,
            },
        ],
        endpoint: endpoint.encode(),
    };
    put("placement", "two-windows", &placement.encode());
    let descriptor = Batch::encode(1, &runs[..1], &[1, 2, 3], P);
    let (_, word) = om_sci::mailbox::slot_of(0, descriptor.len());
    let mut slot = word.to_vec();
    slot.extend_from_slice(&descriptor);
    put("mailbox_slot", "one-batch", &slot);
    let end = EndRound {
        round: 3,
        last: true,
        batches: 5,
        pages: 1000,
    };
    put("end_round", "last", &end.encode());
    let ack = RoundAck {
        round: 3,
        pages: 1000,
        image_bytes: 1000 * P,
        suspects: runs.to_vec(),
    };
    put("round_ack", "suspects", &ack.encode(P));
    put(
        "text",
        "error",
        &Text::encode(3, "image exceeds the memory limit"),
    );
    put("record", "opaque", &Record::encode(1, &[0xab; 48]));
    for (name, kind, body) in records() {
        put("record", name, &Record::encode(kind, &body));
    }
    put("fate", "running", &Fate::Running(4242).encode());
    put("fate", "discarded", &Fate::Discarded.encode());
    let manifest = Checkpoint {
        dir: ".".into(),
        page_size: P,
        version: 2,
        begin: begin(),
        runs: vec![
            Run {
                addr: 0x60_0000..0x60_0000 + 3 * P,
                data: true,
                offset: 0,
            },
            Run {
                addr: 0x60_8000..0x60_8000 + P,
                data: false,
                offset: 0,
            },
        ],
        sums: vec![1, 2, 3],
        records: vec![Record {
            kind: 1,
            bytes: vec![7; 16],
        }],
    }
    .encode_manifest()
    .expect("encode the manifest");
    put("checkpoint_manifest", "small", &manifest);
    put("relay", "home", &home().encode());
    put("relay", "terminal", &terminal().encode());
    // The relay target reads a message as one kind byte, then the body.
    put("relay", "msg_terminal", &[Kind::Terminal as u8, 0b111]);
    put(
        "relay",
        "msg_resize",
        &[Kind::Resize as u8, 50, 0, 132, 0, 0, 0, 0, 0],
    );
    put("relay", "msg_output", &[Kind::Output as u8, 1, b'h', b'i']);
    let mut claim = vec![Kind::Claim as u8];
    claim.extend_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
    claim.push(1);
    put("relay", "msg_claim", &claim);
    put(
        "maps",
        "self",
        &fs::read("/proc/self/maps").expect("read /proc/self/maps"),
    );
}
