//! The restore plan: where every piece goes, decided before anything is changed.
//!
//! A pure function of the image (its VMAs, process and thread records) and of the restorer's own
//! address space ([`Here`]). Everything the restorer lays out beside the image lies in holes of
//! *both* layouts, so that nothing of the restorer's is in the way of the image and nothing of the
//! image is overwritten by the restorer:
//!
//! - the **premap** area: every VMA of the image is mapped and filled here first, at a place the
//!   kernel cannot have used for anything else;
//! - the **leftover** area: the blob's code, its op list and data, a stack page and a scratch area
//!   for moving the vdso. It outlives the restore until the next checkpoint unmaps it.
//!
//! The op list then: unmaps every other address (the restorer), moves this kernel's vdso and vvar
//! to where the image had them, moves each premapped VMA to its address (`mremap` moves page tables,
//! it copies nothing), sets the mm fields, creates the threads with their ids and resumes each from
//! its signal frame.

use std::ops::Range;

use om::compat::USER_END;
use om::image::records::{ProcessRecord, Special, ThreadRecord};
use om::image::vma_flags;
use om_transport::wire::Vma;

use crate::blob::{ADDWAKE, Arg, Builder, CLONE, EXPECT, OP_BYTES, SIGRETURN, TRY, WAIT};
use crate::sys::{CloneArgs, PrctlMmMap, StackT};

/// Lowest address the restorer uses for its own areas (1 TiB): far below the heap of a
/// position-independent program and far above that of a fixed-address one.
pub const AREA_FLOOR: u64 = 1 << 40;
/// Free space kept around the restorer's areas (the kernel's stack guard gap is 1 MiB).
const PAD: u64 = 2 << 20;

const NR_MUNMAP: i64 = libc::SYS_munmap;
const NR_MREMAP: i64 = libc::SYS_mremap;
const NR_PRCTL: i64 = libc::SYS_prctl;
const NR_ARCH_PRCTL: i64 = libc::SYS_arch_prctl;
const NR_CLOSE: i64 = libc::SYS_close;
const NR_READ: i64 = libc::SYS_read;
const NR_IOCTL: i64 = libc::SYS_ioctl;
const NR_KILL: i64 = libc::SYS_kill;
const NR_TGKILL: i64 = libc::SYS_tgkill;
const NR_ROBUST: i64 = libc::SYS_set_robust_list;
const NR_TID_ADDRESS: i64 = libc::SYS_set_tid_address;
const NR_SIGALTSTACK: i64 = libc::SYS_sigaltstack;
const NR_RSEQ: i64 = libc::SYS_rseq;
const MREMAP_MOVE: u64 = 3; // MREMAP_MAYMOVE | MREMAP_FIXED
const PR_SET_MM: u64 = 35;
const PR_SET_NAME: u64 = 15;
const PR_SET_MM_EXE_FILE: u64 = 13;
const PR_SET_MM_MAP: u64 = 14;
const ARCH_SET_GS: u64 = 0x1001;
const ARCH_SET_FS: u64 = 0x1002;
const SS_DISABLE: u32 = libc::SS_DISABLE as u32;
const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS) as u64;

/// Why no plan could be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// No thread record has the process id as its thread id.
    #[error(
        "the image has no main thread (thread {0}); a process whose main thread has exited cannot be restored yet"
    )]
    NoLeader(u32),
    /// A thread record is unusable.
    #[error("thread record {0} is invalid (zero, duplicate or the restorer's pid 1)")]
    BadThread(u32),
    /// The VMA table is not sorted, overlaps or leaves user space.
    #[error("the VMA at {0:#x} is out of order, overlaps another or lies outside user space")]
    VmaOrder(u64),
    /// The vdso/vvar mappings do not pair up.
    #[error("the vdso/vvar mappings here ({here}) do not match the image's ({image})")]
    Specials {
        /// Here.
        here: String,
        /// In the image.
        image: String,
    },
    /// No room for the restorer's areas.
    #[error("no free range of {0} bytes for the restorer in both address spaces")]
    NoHole(u64),
    /// The restore marker is not inside one private writable VMA of the image.
    #[error("the restore marker at {0:#x} is not inside one private writable VMA of the image")]
    Marker(u64),
}

/// The restorer's side.
#[derive(Debug, Clone)]
pub struct Here<'a> {
    /// Every range the restorer has mapped now.
    pub busy: Vec<Range<u64>>,
    /// Its vdso and vvar mappings, in address order.
    pub specials: Vec<Special>,
    /// The blob's code.
    pub code: &'a [u8],
    /// Page size.
    pub page: u64,
    /// The fd that reports the restore's outcome.
    pub status_fd: u32,
    /// An fd open on the image's executable, for `/proc/PID/exe`.
    pub exe_fd: Option<u32>,
    /// The userfaultfd through which lazy VMAs are served (registered by the blob, then closed).
    pub uffd: Option<u32>,
    /// Where the blob waits, once everything is restored and before any thread runs, for one byte
    /// (the go of a migration's two-phase commit); end of file ends the restore.
    pub hold_fd: Option<u32>,
    /// Bytes of the restore marker that the restorer writes (its generation, the leftover area,
    /// and from image version 2 the control socket's path).
    pub marker_len: u64,
}

/// How a VMA is premapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// Private anonymous memory.
    Anon,
    /// The main stack: private anonymous, growing down.
    Stack,
    /// A private mapping of a file (copy-on-write pages laid over).
    PrivateFile,
    /// A shared mapping of a file (the file holds the data).
    SharedFile,
}

/// One VMA of the image and where it is premapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Index into the image's VMA table.
    pub vma: usize,
    /// Its premap address.
    pub at: u64,
    /// How to map it.
    pub kind: ChunkKind,
    /// Its pages are served on demand after the process runs (private anonymous memory only).
    pub lazy: bool,
}

/// Everything the restorer does, with addresses.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The premap area.
    pub premap: Range<u64>,
    /// One chunk per VMA, in address order.
    pub chunks: Vec<Chunk>,
    /// The leftover area.
    pub leftover: Range<u64>,
    /// Bytes at the start of the leftover that hold code (made read-only and executable).
    pub code_len: u64,
    /// The bytes to copy to the start of the leftover: code, op list, data.
    pub image: Vec<u8>,
    /// The blob's entry point (= leftover start).
    pub entry: u64,
    /// The first op.
    pub ops: u64,
    /// The blob's stack pointer.
    pub stack_top: u64,
    /// What each op does, by index.
    pub steps: Vec<String>,
    /// The VMA starts, for [`Plan::premap_of`].
    starts: Vec<Range<u64>>,
}

impl Plan {
    /// Where the image's address `addr` is while premapped.
    #[must_use]
    pub fn premap_of(&self, addr: u64) -> Option<u64> {
        let i = self.starts.partition_point(|r| r.end <= addr);
        let r = self.starts.get(i)?;
        (r.start <= addr).then(|| self.chunks[i].at + (addr - r.start))
    }
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Merges ranges into a sorted list of disjoint ones.
fn merged(mut v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    v.retain(|r| r.start < r.end);
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The lowest address at or above `floor` where `len` bytes with `pad` free on both sides fit
/// between the `busy` ranges, below [`USER_END`].
#[must_use]
pub fn find_hole(busy: &[Range<u64>], len: u64, floor: u64, pad: u64) -> Option<u64> {
    let busy = merged(busy.to_vec());
    let mut at = floor;
    for b in &busy {
        if b.end.saturating_add(pad) <= at {
            continue;
        }
        if at.checked_add(len)?.checked_add(pad)? <= b.start {
            return Some(at);
        }
        at = at.max(b.end.checked_add(pad)?);
    }
    (at.checked_add(len)? <= USER_END).then_some(at)
}

fn check_vmas(vmas: &[Vma], page: u64) -> Result<(), PlanError> {
    let mut prev = 0;
    for v in vmas {
        if v.start < prev || v.start >= v.end || v.end > USER_END || v.start % page != 0 || v.end % page != 0
        {
            return Err(PlanError::VmaOrder(v.start));
        }
        prev = v.end;
    }
    Ok(())
}

fn chunk_kind(v: &Vma) -> ChunkKind {
    match (v.flags & vma_flags::FILE != 0, v.flags & vma_flags::SHARED != 0) {
        (true, true) => ChunkKind::SharedFile,
        (true, false) => ChunkKind::PrivateFile,
        _ if v.flags & vma_flags::STACK != 0 => ChunkKind::Stack,
        _ => ChunkKind::Anon,
    }
}

fn describe(s: &[Special]) -> String {
    s.iter()
        .map(|s| format!("{} {:#x}", s.name, s.end - s.start))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pairs each special mapping here with the image's of the same name and size.
fn pair_specials(here: &[Special], image: &[Special]) -> Result<Vec<(Special, Special)>, PlanError> {
    let bad = || PlanError::Specials {
        here: describe(here),
        image: describe(image),
    };
    if here.len() != image.len() {
        return Err(bad());
    }
    here.iter()
        .map(|h| {
            let i = image.iter().find(|i| i.name == h.name).ok_or_else(bad)?;
            if i.end - i.start != h.end - h.start {
                return Err(bad());
            }
            Ok((h.clone(), i.clone()))
        })
        .collect()
}

/// Positions chosen for the restorer's areas.
#[derive(Debug, Clone, Copy)]
struct Areas {
    leftover: u64,
    leftover_len: u64,
    premap: u64,
    premap_len: u64,
}

/// Makes the plan.
///
/// # Errors
/// [`PlanError`]: an image that cannot be restored here, or no room.
/// `lazy[i]` asks for VMA `i` to be served on demand; it is honoured for private anonymous memory
/// when `here.uffd` is set.
pub fn plan(
    vmas: &[Vma],
    process: &ProcessRecord,
    threads: &[ThreadRecord],
    here: &Here<'_>,
    lazy: &[bool],
) -> Result<Plan, PlanError> {
    let page = here.page;
    check_vmas(vmas, page)?;
    let leader = threads
        .iter()
        .position(|t| t.tid == process.pid)
        .ok_or(PlanError::NoLeader(process.pid))?;
    let mut seen = std::collections::BTreeSet::new();
    for t in threads {
        if t.tid <= 1 || !seen.insert(t.tid) {
            return Err(PlanError::BadThread(t.tid));
        }
    }
    let specials = pair_specials(&here.specials, &process.specials)?;
    let marker_ok = vmas.iter().any(|v| {
        v.start <= process.restore_marker
            && process.restore_marker + here.marker_len <= v.end
            && v.flags & vma_flags::SHARED == 0
            && v.prot & libc::PROT_WRITE as u32 != 0
    });
    if !marker_ok {
        return Err(PlanError::Marker(process.restore_marker));
    }

    // Chunks, laid out in the premap area with a page between them.
    let mut chunks = Vec::with_capacity(vmas.len());
    let mut off = 0;
    for (i, v) in vmas.iter().enumerate() {
        let kind = chunk_kind(v);
        chunks.push(Chunk {
            vma: i,
            at: off,
            kind,
            lazy: here.uffd.is_some()
                && lazy.get(i) == Some(&true)
                && matches!(kind, ChunkKind::Anon | ChunkKind::Stack),
        });
        off += v.len() + page;
    }
    let premap_len = off.max(page);
    let scratch_len = round_up(
        here.specials.last().map_or(0, |l| l.end) - here.specials.first().map_or(0, |f| f.start),
        page,
    );

    // A first build with placeholder positions sizes the leftover area.
    let dummy = Areas {
        leftover: 0,
        leftover_len: 0,
        premap: 0,
        premap_len,
    };
    let sizing = build(vmas, process, threads, leader, &specials, &chunks, here, dummy, 0);
    // Gaps between kept ranges: at most one more than the kept ranges.
    let max_ops = sizing.ops.len() + here.specials.len() + 3;
    let code_len = round_up(here.code.len() as u64, page);
    let body = round_up((max_ops * OP_BYTES + sizing.data.len()) as u64, 8);
    let leftover_len = code_len + round_up(body, page) + page + scratch_len;

    let mut busy: Vec<Range<u64>> = vmas.iter().map(|v| v.start..v.end).collect();
    busy.extend(process.specials.iter().map(|s| s.start..s.end));
    busy.extend(here.busy.iter().cloned());
    let leftover = find_hole(&busy, leftover_len, AREA_FLOOR, PAD).ok_or(PlanError::NoHole(leftover_len))?;
    busy.push(leftover..leftover + leftover_len);
    let premap = find_hole(&busy, premap_len, AREA_FLOOR, PAD).ok_or(PlanError::NoHole(premap_len))?;
    let areas = Areas {
        leftover,
        leftover_len,
        premap,
        premap_len,
    };
    for c in &mut chunks {
        c.at += premap;
    }
    let scratch = leftover + leftover_len - scratch_len;
    let b = build(
        vmas, process, threads, leader, &specials, &chunks, here, areas, scratch,
    );
    debug_assert!(b.ops.len() <= max_ops);
    let ops_at = leftover + code_len;
    let data_at = ops_at + (b.ops.len() * OP_BYTES) as u64;
    let mut image = here.code.to_vec();
    image.resize(usize::try_from(code_len).unwrap_or(0), 0xcc);
    image.extend_from_slice(&b.encode_ops(ops_at, data_at));
    image.extend_from_slice(&b.encode_data(data_at));
    let stack_top = leftover + leftover_len - scratch_len;
    Ok(Plan {
        premap: premap..premap + premap_len,
        chunks,
        leftover: leftover..leftover + leftover_len,
        code_len,
        image,
        entry: leftover,
        ops: ops_at,
        stack_top,
        steps: b.ops.iter().map(|o| o.what.clone()).collect(),
        starts: vmas.iter().map(|v| v.start..v.end).collect(),
    })
}

fn bytes_of<T: crate::sys::Plain>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; size_of::<T>()];
    crate::sys::copy_struct(v, &mut out);
    out
}

/// Emits the op list for the given positions.
#[allow(clippy::too_many_arguments)]
fn build(
    vmas: &[Vma],
    process: &ProcessRecord,
    threads: &[ThreadRecord],
    leader: usize,
    specials: &[(Special, Special)],
    chunks: &[Chunk],
    here: &Here<'_>,
    areas: Areas,
    scratch: u64,
) -> Builder {
    let mut b = Builder::default();
    let pid = u64::from(process.pid);

    // 1. Unmap everything but the restorer's areas and this kernel's vdso/vvar.
    let mut keep = vec![
        areas.leftover..areas.leftover + areas.leftover_len,
        areas.premap..areas.premap + areas.premap_len,
    ];
    keep.extend(here.specials.iter().map(|s| s.start..s.end));
    let keep = merged(keep);
    let mut at = 0;
    for k in keep.iter().chain(std::iter::once(&(USER_END..USER_END))) {
        if k.start > at {
            b.syscall(
                NR_MUNMAP,
                &[at, k.start - at],
                format!("unmap the restorer at {at:#x}..{:#x}", k.start),
            );
        }
        at = at.max(k.end);
    }

    // 2. The vdso and vvar: to the scratch area first (the targets may overlap the current
    //    positions), then to where the image had them.
    let base = here.specials.first().map_or(0, |s| s.start);
    for (h, _) in specials {
        let len = h.end - h.start;
        let to = scratch + (h.start - base);
        b.syscall(
            NR_MREMAP,
            &[h.start, len, len, MREMAP_MOVE, to],
            format!("move {} aside", h.name),
        );
    }
    for (h, i) in specials {
        let len = h.end - h.start;
        let from = scratch + (h.start - base);
        b.syscall(
            NR_MREMAP,
            &[from, len, len, MREMAP_MOVE, i.start],
            format!("move {} to {:#x}", h.name, i.start),
        );
    }

    // 3. Every VMA to its address, then the premap area goes.
    for c in chunks {
        let v = &vmas[c.vma];
        b.syscall(
            NR_MREMAP,
            &[c.at, v.len(), v.len(), MREMAP_MOVE, v.start],
            format!("move the VMA {:#x}..{:#x} into place", v.start, v.end),
        );
    }
    b.syscall(
        NR_MUNMAP,
        &[areas.premap, areas.premap_len],
        "unmap the premap area",
    );

    // Lazy VMAs: registered for missing-page faults, which the restorer serves from the image.
    if let Some(uffd) = here.uffd {
        for c in chunks.iter().filter(|c| c.lazy) {
            let v = &vmas[c.vma];
            let reg = b.put(&om::sys::uffd::register_missing_bytes(v.start, v.len()));
            b.op(
                crate::blob::SYSCALL,
                NR_IOCTL.unsigned_abs(),
                [
                    Arg::Imm(u64::from(uffd)),
                    Arg::Imm(u64::from(om::sys::uffd::UFFDIO_REGISTER)),
                    Arg::Data(reg),
                    Arg::Imm(0),
                    Arg::Imm(0),
                    Arg::Imm(0),
                ],
                format!("register {:#x}..{:#x} for lazy pages", v.start, v.end),
            );
        }
        b.mayfail(NR_CLOSE, &[u64::from(uffd)], "close the userfaultfd");
    }

    // 4. The mm fields, with a fallback to one field at a time (needs CAP_SYS_RESOURCE).
    let mut auxv: Vec<u64> = Vec::new();
    for pair in process.auxv.chunks(2) {
        auxv.extend_from_slice(pair);
        if pair.first() == Some(&0) {
            break;
        }
    }
    let auxv_bytes: Vec<u8> = auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv_off = b.put(&auxv_bytes);
    let m = &process.mm;
    let map = PrctlMmMap {
        start_code: m.start_code,
        end_code: m.end_code,
        start_data: m.start_data,
        end_data: m.end_data,
        start_brk: m.start_brk,
        brk: m.brk,
        start_stack: m.start_stack,
        arg_start: m.arg_start,
        arg_end: m.arg_end,
        env_start: m.env_start,
        env_end: m.env_end,
        auxv: 0,
        auxv_size: u32::try_from(auxv_bytes.len()).unwrap_or(0),
        exe_fd: u32::MAX,
    };
    let map_off = b.put(&bytes_of(&map));
    b.fixup(map_off + 88, auxv_off);
    let fields: [(u64, u64); 11] = [
        (1, m.start_code),
        (2, m.end_code),
        (3, m.start_data),
        (4, m.end_data),
        (5, m.start_stack),
        (6, m.start_brk),
        (7, m.brk),
        (8, m.arg_start),
        (9, m.arg_end),
        (10, m.env_start),
        (11, m.env_end),
    ];
    b.op(
        TRY,
        NR_PRCTL.unsigned_abs(),
        [
            Arg::Imm(PR_SET_MM),
            Arg::Imm(PR_SET_MM_MAP),
            Arg::Data(map_off),
            Arg::Imm(size_of::<PrctlMmMap>() as u64),
            Arg::Imm(0),
            Arg::Imm(fields.len() as u64 + 1),
        ],
        "set the mm fields (PR_SET_MM_MAP)",
    );
    for (opt, v) in fields {
        b.mayfail(
            NR_PRCTL,
            &[PR_SET_MM, opt, v, 0, 0],
            format!("set mm field {opt}"),
        );
    }
    b.op(
        crate::blob::MAYFAIL,
        NR_PRCTL.unsigned_abs(),
        [
            Arg::Imm(PR_SET_MM),
            Arg::Imm(12), // PR_SET_MM_AUXV
            Arg::Data(auxv_off),
            Arg::Imm(auxv_bytes.len() as u64),
            Arg::Imm(0),
            Arg::Imm(0),
        ],
        "set the auxv",
    );
    if let Some(fd) = here.exe_fd {
        b.mayfail(
            NR_PRCTL,
            &[PR_SET_MM, PR_SET_MM_EXE_FILE, u64::from(fd), 0, 0],
            "set /proc/PID/exe",
        );
        b.mayfail(NR_CLOSE, &[u64::from(fd)], "close the exe fd");
    }

    // 5. Threads: each clone waits for `go`, after telling the main thread it is `ready`.
    let ready = b.put(&[0u8; 4]);
    let go = b.put(&[0u8; 4]);
    let mut clones = Vec::new();
    for (i, t) in threads.iter().enumerate() {
        if i == leader {
            continue;
        }
        let args = CloneArgs {
            flags: THREAD_FLAGS,
            tls: t.fs_base,
            set_tid_size: 1,
            ..CloneArgs::default()
        };
        let mut bytes = bytes_of(&args);
        bytes.extend_from_slice(&t.tid.to_le_bytes());
        let off = b.put(&bytes);
        b.fixup(off + 64, off + size_of::<CloneArgs>());
        let op = b.op(
            CLONE,
            0,
            [
                Arg::Data(off),
                Arg::Imm(size_of::<CloneArgs>() as u64),
                Arg::Op(0),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
            ],
            format!("create thread {}", t.tid),
        );
        clones.push((op, i));
    }
    let leader_t = &threads[leader];
    thread_setup(&mut b, leader_t, true);
    b.op(
        WAIT,
        0,
        [
            Arg::Data(ready),
            Arg::Imm(clones.len() as u64),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
        ],
        "wait for every thread",
    );
    for sig in signals(process.shared_pending) {
        b.mayfail(NR_KILL, &[pid, sig], format!("raise pending signal {sig}"));
    }
    for t in threads {
        for sig in signals(t.pending) {
            b.mayfail(
                NR_TGKILL,
                &[pid, u64::from(t.tid), sig],
                format!("raise signal {sig} for thread {}", t.tid),
            );
        }
    }
    b.mayfail(NR_CLOSE, &[u64::from(here.status_fd)], "close the status fd");
    if let Some(hold) = here.hold_fd {
        let byte = b.put(&[0u8; 8]);
        b.op(
            EXPECT,
            NR_READ.unsigned_abs(),
            [
                Arg::Imm(u64::from(hold)),
                Arg::Data(byte),
                Arg::Imm(1),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(1),
            ],
            "wait for the go of the commit",
        );
        b.mayfail(NR_CLOSE, &[u64::from(hold)], "close the hold fd");
    }
    b.op(
        ADDWAKE,
        0,
        [
            Arg::Data(go),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
        ],
        "start every thread",
    );
    b.op(
        SIGRETURN,
        0,
        [
            Arg::Imm(leader_t.frame),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
        ],
        format!("resume thread {}", leader_t.tid),
    );

    // The clones' own lists.
    for (op, i) in clones {
        let t = &threads[i];
        let start = b.next();
        b.ops[op].args[2] = Arg::Op(start);
        thread_setup(&mut b, t, false);
        b.op(
            ADDWAKE,
            0,
            [
                Arg::Data(ready),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
            ],
            format!("thread {} ready", t.tid),
        );
        b.op(
            WAIT,
            0,
            [
                Arg::Data(go),
                Arg::Imm(1),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
            ],
            format!("thread {} waits", t.tid),
        );
        b.op(
            SIGRETURN,
            0,
            [
                Arg::Imm(t.frame),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
            ],
            format!("resume thread {}", t.tid),
        );
    }
    b
}

/// The per-thread kernel state that the signal frame does not hold.
fn thread_setup(b: &mut Builder, t: &ThreadRecord, leader: bool) {
    let tid = t.tid;
    if t.name[0] != 0 {
        let off = b.put(&t.name);
        b.op(
            crate::blob::MAYFAIL,
            NR_PRCTL.unsigned_abs(),
            [
                Arg::Imm(PR_SET_NAME),
                Arg::Data(off),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
                Arg::Imm(0),
            ],
            format!("thread {tid}: name"),
        );
    }
    if t.robust_head != 0 {
        b.syscall(
            NR_ROBUST,
            &[t.robust_head, t.robust_len],
            format!("thread {tid}: robust futex list"),
        );
    }
    b.syscall(
        NR_TID_ADDRESS,
        &[t.clear_child_tid],
        format!("thread {tid}: clear_child_tid"),
    );
    let ss = StackT {
        sp: t.altstack_sp,
        flags: if t.altstack_flags & SS_DISABLE != 0 {
            libc::SS_DISABLE
        } else {
            i32::try_from(t.altstack_flags & !1).unwrap_or(0) // SS_ONSTACK is state, not a mode
        },
        pad: 0,
        size: t.altstack_size,
    };
    let off = b.put(&bytes_of(&ss));
    b.op(
        crate::blob::MAYFAIL,
        NR_SIGALTSTACK.unsigned_abs(),
        [
            Arg::Data(off),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
        ],
        format!("thread {tid}: sigaltstack"),
    );
    if t.rseq.addr != 0 {
        b.syscall(
            NR_RSEQ,
            &[t.rseq.addr, u64::from(t.rseq.len), 0, u64::from(t.rseq.sig)],
            format!("thread {tid}: rseq"),
        );
    }
    if leader {
        b.syscall(
            NR_ARCH_PRCTL,
            &[ARCH_SET_FS, t.fs_base],
            format!("thread {tid}: FS base"),
        );
    }
    if t.gs_base != 0 {
        b.syscall(
            NR_ARCH_PRCTL,
            &[ARCH_SET_GS, t.gs_base],
            format!("thread {tid}: GS base"),
        );
    }
}

/// Signal numbers in a mask (bit n - 1 is signal n).
fn signals(mask: u64) -> impl Iterator<Item = u64> {
    (1..=64u64).filter(move |s| mask & (1 << (s - 1)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_hole(busy: &[Range<u64>], len: u64, floor: u64, pad: u64) -> Option<u64> {
        // Candidates: the floor and every end + pad; the lowest that keeps clear of everything.
        let mut cands: Vec<u64> = busy
            .iter()
            .map(|b| b.end + pad)
            .chain([floor])
            .filter(|c| *c >= floor)
            .collect();
        cands.sort_unstable();
        cands.into_iter().find(|&c| {
            c + len <= USER_END && busy.iter().all(|b| c + len + pad <= b.start || b.end + pad <= c)
        })
    }

    proptest! {
        #[test]
        fn holes_match_a_naive_search(
            raw in proptest::collection::vec((0u64..64, 1u64..8), 0..12),
            len in 1u64..16,
            floor in 0u64..32,
        ) {
            let unit = 1u64 << 20;
            let busy: Vec<Range<u64>> = raw.iter().map(|(s, l)| s * unit..(s + l) * unit).collect();
            let got = find_hole(&busy, len * unit, floor * unit, unit);
            let want = naive_hole(&busy, len * unit, floor * unit, unit);
            prop_assert_eq!(got, want);
        }
    }

    fn vma(start: u64, end: u64, prot: u32, flags: u32, name: &str) -> Vma {
        Vma {
            start,
            end,
            pgoff: 0,
            prot,
            flags,
            name: name.as_bytes().to_vec(),
        }
    }

    fn sample() -> (Vec<Vma>, ProcessRecord, Vec<ThreadRecord>, Vec<Special>) {
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
        let vmas = vec![
            vma(0x5555_0000_0000, 0x5555_0000_4000, 5, vma_flags::FILE, "/bin/x"),
            vma(0x5555_0000_4000, 0x5555_0000_8000, rw, 0, ""),
            vma(
                0x7ffc_0000_0000,
                0x7ffc_0002_0000,
                rw,
                vma_flags::STACK,
                "[stack]",
            ),
        ];
        let specials = vec![
            Special {
                name: "[vvar]".into(),
                start: 0x7ffc_1000_0000,
                end: 0x7ffc_1000_4000,
            },
            Special {
                name: "[vdso]".into(),
                start: 0x7ffc_1000_4000,
                end: 0x7ffc_1000_6000,
            },
        ];
        let p = ProcessRecord {
            pid: 100,
            restore_marker: 0x5555_0000_4100,
            specials: specials.clone(),
            auxv: vec![33, 0x7ffc_1000_4000, 6, 4096, 0, 0, 0, 0],
            shared_pending: 1 << 9,
            ..ProcessRecord::default()
        };
        let threads = vec![
            ThreadRecord {
                tid: 100,
                frame: 0x7ffc_0001_0000,
                ..ThreadRecord::default()
            },
            ThreadRecord {
                tid: 101,
                frame: 0x5555_0000_5000,
                pending: 1,
                ..ThreadRecord::default()
            },
        ];
        let here_specials = vec![
            Special {
                name: "[vvar]".into(),
                start: 0x7fff_1000_0000,
                end: 0x7fff_1000_4000,
            },
            Special {
                name: "[vdso]".into(),
                start: 0x7fff_1000_4000,
                end: 0x7fff_1000_6000,
            },
        ];
        (vmas, p, threads, here_specials)
    }

    #[test]
    fn a_plan_keeps_clear_of_both_layouts_and_covers_every_step() {
        let (vmas, p, threads, hs) = sample();
        let code = [0x90u8; 300];
        let here = Here {
            busy: vec![
                0x1_0000_0000_0000..0x1_0000_1000_0000,
                0x100_0000_0000..0x100_0010_0000,
            ],
            specials: hs,
            code: &code,
            page: 4096,
            status_fd: 9,
            hold_fd: None,
            exe_fd: Some(10),
            uffd: Some(11),
            marker_len: 24,
        };
        let plan = plan(&vmas, &p, &threads, &here, &[true, true, false]).unwrap();
        assert_eq!(
            plan.chunks.iter().map(|c| c.lazy).collect::<Vec<_>>(),
            [false, true, false]
        );
        let mut all: Vec<Range<u64>> = vmas.iter().map(|v| v.start..v.end).collect();
        all.extend(here.busy.iter().cloned());
        for r in [&plan.premap, &plan.leftover] {
            assert!(r.start >= AREA_FLOOR);
            for b in &all {
                assert!(r.end <= b.start || b.end <= r.start, "{r:x?} overlaps {b:x?}");
            }
        }
        assert!(plan.premap.end <= plan.leftover.start || plan.leftover.end <= plan.premap.start);
        assert_eq!(plan.chunks.len(), 3);
        assert_eq!(plan.chunks[2].kind, ChunkKind::Stack);
        assert_eq!(plan.chunks[0].kind, ChunkKind::PrivateFile);
        assert_eq!(plan.premap_of(0x5555_0000_4100), Some(plan.chunks[1].at + 0x100));
        assert_eq!(plan.premap_of(0x5555_0000_8000), None);
        assert!(plan.image.len() as u64 <= plan.stack_top - plan.entry);
        assert_eq!(&plan.image[..300], &code[..]);
        let s = plan.steps.join("\n");
        for want in [
            "unmap the restorer",
            "move [vdso] to 0x7ffc10004000",
            "move the VMA 0x7ffc00000000..0x7ffc00020000 into place",
            "PR_SET_MM_MAP",
            "create thread 101",
            "raise pending signal 10",
            "register 0x555500004000..0x555500008000 for lazy pages",
            "close the userfaultfd",
            "raise signal 1 for thread 101",
            "resume thread 100",
            "thread 101 ready",
            "resume thread 101",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
        // The unmapping leaves exactly the kept ranges.
        let ops = &plan.image[usize::try_from(plan.code_len).unwrap()..];
        let word = |op: usize, w: usize| {
            u64::from_le_bytes(ops[op * 64 + w * 8..op * 64 + w * 8 + 8].try_into().unwrap())
        };
        let mut unmapped = Vec::new();
        for (i, st) in plan.steps.iter().enumerate() {
            if st.starts_with("unmap the restorer") {
                unmapped.push(word(i, 2)..word(i, 2) + word(i, 3));
            }
        }
        let mut covered = merged(
            [
                unmapped.clone(),
                vec![plan.leftover.clone(), plan.premap.clone()],
                here.specials.iter().map(|s| s.start..s.end).collect(),
            ]
            .concat(),
        );
        covered.retain(|r| r.start < r.end);
        assert_eq!(covered, vec![0..USER_END]);
        for u in &unmapped {
            assert!(u.end <= plan.leftover.start || u.start >= plan.leftover.end);
        }
    }

    #[test]
    fn refusals_are_named() {
        let (vmas, mut p, threads, hs) = sample();
        let here = Here {
            busy: vec![],
            specials: hs.clone(),
            code: &[0x90],
            page: 4096,
            status_fd: 3,
            hold_fd: None,
            exe_fd: None,
            uffd: None,
            marker_len: 24,
        };
        let mut t2 = threads.clone();
        t2[0].tid = 5;
        assert_eq!(
            plan(&vmas, &p, &t2, &here, &[]).unwrap_err(),
            PlanError::NoLeader(100)
        );
        let mut t3 = threads.clone();
        t3[1].tid = 100;
        assert_eq!(
            plan(&vmas, &p, &t3, &here, &[]).unwrap_err(),
            PlanError::BadThread(100)
        );
        let mut v2 = vmas.clone();
        v2.swap(0, 1);
        assert!(matches!(
            plan(&v2, &p, &threads, &here, &[]),
            Err(PlanError::VmaOrder(_))
        ));
        let mut h2 = here.clone();
        h2.specials[1].end += 4096;
        assert!(matches!(
            plan(&vmas, &p, &threads, &h2, &[]),
            Err(PlanError::Specials { .. })
        ));
        p.restore_marker = 0x5555_0000_0100; // read-only file mapping
        assert_eq!(
            plan(&vmas, &p, &threads, &here, &[]).unwrap_err(),
            PlanError::Marker(0x5555_0000_0100)
        );
        // Its first 24 bytes fit, the path after them would run past the end of the VMA.
        p.restore_marker = 0x5555_0000_8000 - 100;
        let mut h3 = here.clone();
        assert!(plan(&vmas, &p, &threads, &h3, &[]).is_ok());
        h3.marker_len = 152;
        assert_eq!(
            plan(&vmas, &p, &threads, &h3, &[]).unwrap_err(),
            PlanError::Marker(0x5555_0000_8000 - 100)
        );
    }
}
