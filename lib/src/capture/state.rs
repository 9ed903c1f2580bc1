//! Reading this process's state and writing the image (on the control thread, everything else parked).

use std::fs;
use std::io::IoSliceMut;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

use nix::sys::uio::{RemoteIoVec, process_vm_readv};
use nix::unistd::Pid;
use om_transport::sys::crc32c;
use om_transport::wire::{Begin, ImageInfo, Record, Vma as WireVma};

use super::preflight::{self, Refusal};
use super::{CaptureError, MARKER, Summary};
use crate::dirty::maps::{self, Vma};
use crate::image::checkpoint::Writer;
use crate::image::records::{
    FdKind, FdRecord, KIND_FD, KIND_MAPPED_FILE, KIND_PROCESS, KIND_THREAD, MappedFile, MmFields,
    ProcessRecord, RLIMITS, Rseq, SigAction, Special, ThreadRecord,
};
use crate::image::vma_flags;
use crate::sys::task::{self, Freeze, RSEQ_SIG, Slot};

use crate::compat::USER_END;
const BOUNCE: usize = 4 << 20;

/// Thread ids of this process.
pub(crate) fn list_tasks() -> std::io::Result<Vec<u32>> {
    let mut out = task::numeric_entries(c"/proc/self/task")?;
    out.sort_unstable();
    Ok(out)
}

fn state_err(what: &str) -> impl Fn(std::io::Error) -> CaptureError + '_ {
    move |source| CaptureError::Proc {
        what: what.to_owned(),
        source,
    }
}

/// The value after `key` (such as `SigBlk:`) in a `/proc` status file, trimmed.
pub(crate) fn status_value(path: &str, key: &str) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
}

/// A signal mask (hexadecimal) from a `/proc` status file; 0 when absent.
pub(crate) fn sig_mask(path: &str, key: &str) -> u64 {
    status_value(path, key)
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0)
}

/// `vmas` without the capture arena and the transport's own ranges ([`own_ranges`]). The kernel may
/// have merged the arena with a neighbouring
/// mapping of the same kind (glibc's arena heaps are `MAP_NORESERVE` too), so the arena is cut out
/// of whatever VMA holds it rather than that VMA dropped.
fn without_arena(vmas: Vec<Vma>) -> Vec<Vma> {
    let vmas = match crate::sys::arena::range() {
        Some(arena) => without(vmas, &arena),
        None => vmas,
    };
    own_ranges_now().iter().fold(vmas, without)
}

/// Memory of this process that belongs to a migration's transport (an SCI placer's mappings of the
/// destination's windows): left out of the image like the arena.
static OWN_RANGES: std::sync::Mutex<Vec<std::ops::Range<u64>>> = std::sync::Mutex::new(Vec::new());

/// Sets the ranges of this process's memory that are om's own (replacing the previous set; empty
/// clears it).
pub fn own_ranges(ranges: &[std::ops::Range<u64>]) {
    if let Ok(mut v) = OWN_RANGES.lock() {
        v.clear();
        v.extend_from_slice(ranges);
    }
}

/// The ranges [`own_ranges`] set.
pub(crate) fn own_ranges_now() -> Vec<std::ops::Range<u64>> {
    OWN_RANGES.lock().map(|v| v.clone()).unwrap_or_default()
}

/// `vmas` without `cut`, which may lie inside a VMA, span several, or touch none.
fn without(vmas: Vec<Vma>, cut: &std::ops::Range<u64>) -> Vec<Vma> {
    let mut out = Vec::with_capacity(vmas.len() + 2);
    for v in vmas {
        if v.end <= cut.start || v.start >= cut.end {
            out.push(v);
            continue;
        }
        if v.start < cut.start {
            out.push(Vma {
                end: cut.start,
                ..v.clone()
            });
        }
        if v.end > cut.end {
            out.push(Vma {
                start: cut.end,
                offset: v.offset + (cut.end - v.start),
                ..v
            });
        }
    }
    out
}

/// The process's memory map as an image holds it: every VMA but om's capture arena, and the wire
/// table of those that travel (no vdso/vvar/vsyscall).
///
/// # Errors
/// `/proc/self/maps` could not be read.
pub fn memory_map() -> Result<(Vec<Vma>, Vec<WireVma>), CaptureError> {
    let vmas = without_arena(maps::read_self().map_err(CaptureError::Maps)?);
    let wire = vmas
        .iter()
        .filter(|v| !v.is_special() && v.end <= USER_END)
        .map(wire_vma)
        .collect();
    Ok((vmas, wire))
}

/// Everything of a stopped process but its pages: the memory map and the records for the restorer.
#[derive(Debug)]
pub struct Snapshot {
    /// The memory map.
    pub vmas: Vec<Vma>,
    /// The VMAs that travel.
    pub wire_vmas: Vec<WireVma>,
    /// Process, thread, fd and mapped-file records.
    pub records: Vec<Record>,
    /// Threads captured.
    pub threads: usize,
}

/// Takes the snapshot of the stopped process; `frame` is the control thread's signal frame. Runs in
/// the control thread's handler.
///
/// # Errors
/// A file of `/proc/self` that could not be read, or something that cannot be captured.
pub fn snapshot(frame: u64) -> Result<Snapshot, CaptureError> {
    let (vmas, wire_vmas) = memory_map()?;
    let fds = preflight::fds()?;
    let f = Freeze::get();
    let control = Slot::default();
    task::record_control(&control, frame);
    let mut threads: Vec<ThreadRecord> = f
        .slots
        .iter()
        .filter(|s| s.tid.load(std::sync::atomic::Ordering::Acquire) != 0)
        .map(|s| thread_record(s, 0))
        .collect();
    threads.push(thread_record(&control, ThreadRecord::CONTROL));
    for t in &mut threads {
        t.pending = sig_mask(&format!("/proc/self/task/{}/status", t.tid), "SigPnd:");
        let comm = fs::read(format!("/proc/self/task/{}/comm", t.tid)).unwrap_or_default();
        let comm = comm.strip_suffix(b"\n").unwrap_or(&comm);
        let n = comm.len().min(15);
        t.name[..n].copy_from_slice(&comm[..n]);
    }
    let mut records = vec![Record {
        kind: KIND_PROCESS,
        bytes: process_record(&vmas, &threads)?.encode(),
    }];
    records.extend(threads.iter().map(|t| Record {
        kind: KIND_THREAD,
        bytes: t.encode(),
    }));
    for fd in &fds {
        records.push(Record {
            kind: KIND_FD,
            bytes: fd_record(fd)?.encode(),
        });
    }
    for m in mapped_files(&vmas)? {
        records.push(Record {
            kind: KIND_MAPPED_FILE,
            bytes: m.encode(),
        });
    }
    Ok(Snapshot {
        vmas,
        wire_vmas,
        records,
        threads: threads.len(),
    })
}

/// The identity of this process for an image.
#[must_use]
pub fn image_info(flags: u32, populated_bytes: u64) -> ImageInfo {
    ImageInfo {
        pid: std::process::id(),
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        flags,
        populated_bytes,
    }
}

pub(super) fn write_image(dir: &Path, frame: u64, started: Instant) -> Result<Summary, CaptureError> {
    let page = crate::sys::page_size() as u64;
    let snap = snapshot(frame)?;
    let mut writer = Writer::create(dir, page).map_err(CaptureError::Write)?;
    let pagemap = fs::File::open("/proc/self/pagemap").map_err(state_err("/proc/self/pagemap"))?;
    // Through /proc/self/mem the kernel reads even pages the process may not (PROT_NONE memory
    // that holds data), and a fault is an error, not a crash.
    let mem = fs::File::open("/proc/self/mem").map_err(state_err("/proc/self/mem"))?;
    let mut bounce = vec![0u8; BOUNCE];
    let mut planned = Vec::new();
    let (mut run_count, mut page_count) = (0usize, 0u64);
    for v in snap.vmas.iter().filter(|v| !v.is_special() && v.end <= USER_END) {
        if v.perms.shared {
            continue; // the file holds the data
        }
        let runs = data_runs(&pagemap, v, page)?;
        run_count += runs.len();
        page_count += runs.iter().map(|r| (r.end - r.start) / page).sum::<u64>();
        planned.extend(runs);
    }
    writer.reserve(run_count, usize::try_from(page_count).unwrap_or(0));
    let mut populated = 0u64;
    for run in &planned {
        let mut addr = run.start;
        while addr < run.end {
            let n = usize::try_from((run.end - addr).min(BOUNCE as u64)).unwrap_or(BOUNCE);
            read_mem(&mem, addr, &mut bounce[..n])?;
            writer.data(addr, &bounce[..n]).map_err(CaptureError::Write)?;
            addr += n as u64;
            populated += n as u64;
        }
    }

    let begin = Begin {
        info: image_info(0, populated),
        vmas: snap.wire_vmas,
    };
    let bytes = writer.finish(begin, snap.records).map_err(CaptureError::Write)?;
    Ok(Summary {
        dir: dir.to_path_buf(),
        bytes,
        threads: snap.threads,
        frozen: started.elapsed(),
    })
}

fn thread_record(s: &Slot, flags: u32) -> ThreadRecord {
    use std::sync::atomic::Ordering::Acquire;
    let rseq = s.rseq_addr.load(Acquire);
    ThreadRecord {
        tid: s.tid.load(Acquire),
        flags,
        frame: s.frame.load(Acquire),
        fs_base: s.fs_base.load(Acquire),
        gs_base: s.gs_base.load(Acquire),
        altstack_sp: s.alt_sp.load(Acquire),
        altstack_size: s.alt_size.load(Acquire),
        altstack_flags: s.alt_flags.load(Acquire),
        robust_head: s.robust_head.load(Acquire),
        robust_len: s.robust_len.load(Acquire),
        clear_child_tid: s.clear_child_tid.load(Acquire),
        rseq: Rseq {
            addr: rseq,
            len: if rseq == 0 { 0 } else { s.rseq_len.load(Acquire) },
            sig: if rseq == 0 { 0 } else { RSEQ_SIG },
        },
        pending: 0,
        name: [0; 16],
    }
}

fn wire_vma(v: &Vma) -> WireVma {
    let mut prot = 0;
    if v.perms.read {
        prot |= libc::PROT_READ as u32;
    }
    if v.perms.write {
        prot |= libc::PROT_WRITE as u32;
    }
    if v.perms.exec {
        prot |= libc::PROT_EXEC as u32;
    }
    let mut flags = 0;
    if v.perms.shared {
        flags |= vma_flags::SHARED;
    }
    if v.inode != 0 {
        flags |= vma_flags::FILE;
    }
    if v.path == "[stack]" {
        flags |= vma_flags::STACK;
    }
    if v.path == "[heap]" {
        flags |= vma_flags::HEAP;
    }
    WireVma {
        start: v.start,
        end: v.end,
        pgoff: v.offset,
        prot,
        flags,
        name: v.path.as_bytes().to_vec(),
    }
}

/// The pages of `v` that hold the process's own data: present or swapped, and for a private file
/// mapping only the pages it wrote (copy-on-write copies, not the file's page cache).
fn data_runs(pagemap: &fs::File, v: &Vma, page: u64) -> Result<Vec<std::ops::Range<u64>>, CaptureError> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_PAGE: u64 = 1 << 61;
    let file = v.inode != 0;
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut addr = v.start;
    while addr < v.end {
        let pages = ((v.end - addr) / page).min(4096);
        let bytes = usize::try_from(pages * 8).unwrap_or(0);
        pagemap
            .read_exact_at(&mut buf[..bytes], addr / page * 8)
            .map_err(state_err("/proc/self/pagemap"))?;
        for (i, e) in buf[..bytes].chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let e = u64::from_le_bytes(w);
            let data = if file {
                e & (PRESENT | SWAPPED) != 0 && e & FILE_PAGE == 0
            } else {
                e & (PRESENT | SWAPPED) != 0
            };
            if data {
                let a = addr + i as u64 * page;
                match out.last_mut() {
                    Some(r) if r.end == a => r.end += page,
                    _ => out.push(a..a + page),
                }
            }
        }
        addr += pages * page;
    }
    Ok(out)
}

/// Copies this process's memory at `addr` into `buf` from `/proc/self/mem`.
fn read_mem(mem: &fs::File, addr: u64, buf: &mut [u8]) -> Result<(), CaptureError> {
    mem.read_exact_at(buf, addr)
        .map_err(|source| CaptureError::ReadMemory { addr, source })
}

/// Copies this process's memory at `addr` into `buf` through the kernel (a fault is an error, not a
/// crash).
fn read_own(addr: u64, buf: &mut [u8]) -> Result<(), CaptureError> {
    let len = buf.len();
    let remote = [RemoteIoVec {
        base: usize::try_from(addr).unwrap_or(0),
        len,
    }];
    let n = process_vm_readv(Pid::this(), &mut [IoSliceMut::new(buf)], &remote).map_err(|e| {
        CaptureError::ReadMemory {
            addr,
            source: e.into(),
        }
    })?;
    if n != len {
        return Err(CaptureError::ReadMemory {
            addr,
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    Ok(())
}

fn mm_fields() -> Result<MmFields, CaptureError> {
    let stat = fs::read_to_string("/proc/self/stat").map_err(state_err("/proc/self/stat"))?;
    let f = crate::procstat::fields(&stat).ok_or(CaptureError::Stat)?;
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let brk = task::current_brk();
    Ok(MmFields {
        start_code: field(26),
        end_code: field(27),
        start_data: field(45),
        end_data: field(46),
        start_brk: field(47),
        brk,
        start_stack: field(28),
        arg_start: field(48),
        arg_end: field(49),
        env_start: field(50),
        env_end: field(51),
    })
}

fn process_record(vmas: &[Vma], threads: &[ThreadRecord]) -> Result<ProcessRecord, CaptureError> {
    let auxv_bytes = fs::read("/proc/self/auxv").map_err(state_err("/proc/self/auxv"))?;
    let mut auxv: Vec<u64> = auxv_bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    auxv.truncate(256);
    let link = |p: &str| {
        fs::read_link(p)
            .map(|l| l.to_string_lossy().into_owned())
            .map_err(state_err(p))
    };
    let mut rlimits = Vec::with_capacity(RLIMITS);
    for r in 0..RLIMITS {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        task::getrlimit(r, &mut lim);
        rlimits.push((lim.rlim_cur, lim.rlim_max));
    }
    let mut sigactions = Vec::new();
    for s in 1..=64 {
        if s == libc::SIGKILL || s == libc::SIGSTOP {
            continue;
        }
        if let Ok(a) = task::sigaction_get(s) {
            if a.handler != 0 {
                sigactions.push(SigAction {
                    signo: u32::try_from(s).unwrap_or(0),
                    handler: a.handler,
                    flags: a.flags,
                    restorer: a.restorer,
                    mask: a.mask,
                });
            }
        }
    }
    let mut specials = Vec::new();
    let mut vdso_sum = 0;
    for v in vmas.iter().filter(|v| v.is_special() && v.end <= USER_END) {
        if v.path == "[vdso]" {
            let mut b = vec![0u8; usize::try_from(v.len()).unwrap_or(0)];
            read_own(v.start, &mut b)?;
            vdso_sum = crc32c(&b);
        }
        specials.push(Special {
            name: v.path.clone(),
            start: v.start,
            end: v.end,
        });
    }
    let umask = status_value("/proc/self/status", "Umask:")
        .and_then(|u| u32::from_str_radix(&u, 8).ok())
        .unwrap_or(0o022);
    Ok(ProcessRecord {
        pid: std::process::id(),
        control_tid: threads
            .iter()
            .find(|t| t.flags & ThreadRecord::CONTROL != 0)
            .map_or(0, |t| t.tid),
        mm: mm_fields()?,
        auxv,
        exe: link("/proc/self/exe")?,
        cwd: link("/proc/self/cwd")?,
        umask,
        personality: crate::sys::task::personality(),
        rlimits,
        sigactions,
        shared_pending: sig_mask("/proc/self/status", "ShdPnd:"),
        xcr0: task::xcr0(),
        xsave_size: task::xsave_size(),
        specials,
        vdso_sum,
        restore_marker: std::ptr::from_ref(&MARKER) as u64,
        itimers: [0, 1, 2].map(task::getitimer),
    })
}

fn fd_record(fd: &preflight::FdInfo) -> Result<FdRecord, CaptureError> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.fd)).map_err(state_err("fdinfo"))?;
    let field = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    let offset = field("pos:").parse().unwrap_or(0);
    let flags = u32::from_str_radix(&field("flags:"), 8).unwrap_or(0);
    let content = if fd.kind == FdKind::Deleted {
        fs::read(format!("/proc/self/fd/{}", fd.fd)).map_err(state_err("a deleted file"))?
    } else {
        Vec::new()
    };
    Ok(FdRecord {
        fd: u32::try_from(fd.fd).unwrap_or(0),
        kind: fd.kind,
        flags,
        offset,
        path: fd.target.clone(),
        content,
    })
}

/// The files that mappings need, checked to still be the mapped inode.
fn mapped_files(vmas: &[Vma]) -> Result<Vec<MappedFile>, CaptureError> {
    let mut out: Vec<MappedFile> = Vec::new();
    for v in vmas.iter().filter(|v| v.inode != 0 && !v.is_special()) {
        if out.iter().any(|m| m.path == v.path) {
            continue;
        }
        let meta = fs::metadata(&v.path).map_err(state_err(&v.path))?;
        if meta.ino() != v.inode {
            return Err(Refusal::Mapping {
                start: v.start,
                end: v.end,
                name: v.path.clone(),
                what: "a file that was replaced on disk since it was mapped",
            }
            .into());
        }
        out.push(MappedFile {
            path: v.path.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_sec: meta.mtime(),
            mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        });
    }
    Ok(out)
}
