//! Records: the parts of a process image that are not memory.
//!
//! Each record travels as a wire `Record { kind, bytes }` (and in a checkpoint's records section).
//! Kinds: 1 [`ProcessRecord`], 2 [`ThreadRecord`], 3 [`FdRecord`], 4 [`MappedFile`], 5 the home and
//! 6 the terminal (for omd's relay). Every field is
//! little-endian, every variable part has a length in front and a cap; unknown kinds are an error.

use super::codec::{Dec, DecodeError, Enc};

pub use super::codec::DecodeError as RecordError;

/// Record kind of [`ProcessRecord`].
pub const KIND_PROCESS: u32 = 1;
/// Record kind of [`ThreadRecord`].
pub const KIND_THREAD: u32 = 2;
/// Record kind of [`FdRecord`].
pub const KIND_FD: u32 = 3;
/// Record kind of [`MappedFile`].
pub const KIND_MAPPED_FILE: u32 = 4;
/// Record kind: where the process's home is ([`om_transport::relay::Home`]); only in migrations.
pub const KIND_HOME: u32 = 5;
/// Record kind: the terminal its stdio is on ([`om_transport::relay::Terminal`]); only in
/// migrations of a process that has one.
pub const KIND_TERMINAL: u32 = 6;

const MAX_PATH: usize = 4096;
const MAX_AUXV_WORDS: usize = 256;
const MAX_SPECIAL: usize = 8;
/// Largest deleted-but-open file carried inside an image.
pub const MAX_CARRIED_FILE: usize = 16 << 20;
/// Resource limits recorded (`RLIMIT_*` 0..16).
pub const RLIMITS: usize = 16;

/// The mm fields of `prctl(PR_SET_MM_MAP)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MmFields {
    /// Text start.
    pub start_code: u64,
    /// Text end.
    pub end_code: u64,
    /// Data start.
    pub start_data: u64,
    /// Data end.
    pub end_data: u64,
    /// Heap start.
    pub start_brk: u64,
    /// Current program break.
    pub brk: u64,
    /// Main stack start (as in `/proc/PID/stat`).
    pub start_stack: u64,
    /// Arguments.
    pub arg_start: u64,
    /// End of arguments.
    pub arg_end: u64,
    /// Environment.
    pub env_start: u64,
    /// End of environment.
    pub env_end: u64,
}

impl MmFields {
    fn words(&self) -> [u64; 11] {
        [
            self.start_code,
            self.end_code,
            self.start_data,
            self.end_data,
            self.start_brk,
            self.brk,
            self.start_stack,
            self.arg_start,
            self.arg_end,
            self.env_start,
            self.env_end,
        ]
    }

    fn from_words(w: [u64; 11]) -> Self {
        Self {
            start_code: w[0],
            end_code: w[1],
            start_data: w[2],
            end_data: w[3],
            start_brk: w[4],
            brk: w[5],
            start_stack: w[6],
            arg_start: w[7],
            arg_end: w[8],
            env_start: w[9],
            env_end: w[10],
        }
    }
}

/// A signal disposition as the raw `rt_sigaction` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SigAction {
    /// Signal number.
    pub signo: u32,
    /// Handler address, or `SIG_IGN` (1).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// Signals blocked during the handler.
    pub mask: u64,
}

/// A kernel-provided mapping (`[vdso]`, `[vvar]`, `[vvar_vclock]`) and where it was.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Special {
    /// Its name.
    pub name: String,
    /// Start.
    pub start: u64,
    /// End.
    pub end: u64,
}

/// Process-wide state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessRecord {
    /// The process id as the program sees it.
    pub pid: u32,
    /// The runtime's control thread.
    pub control_tid: u32,
    /// The mm fields.
    pub mm: MmFields,
    /// The auxiliary vector, as `(type, value)` words.
    pub auxv: Vec<u64>,
    /// `/proc/self/exe`.
    pub exe: String,
    /// The working directory.
    pub cwd: String,
    /// The file mode creation mask.
    pub umask: u32,
    /// `personality(0xffffffff)`.
    pub personality: u32,
    /// `(soft, hard)` for `RLIMIT_*` 0..16.
    pub rlimits: Vec<(u64, u64)>,
    /// Every disposition that is not `SIG_DFL`.
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process.
    pub shared_pending: u64,
    /// `XCR0`: the xsave features enabled where the image was taken.
    pub xcr0: u64,
    /// The xsave area size (CPUID 0xd, ebx) where the image was taken.
    pub xsave_size: u32,
    /// The vdso and vvar mappings, in address order.
    pub specials: Vec<Special>,
    /// CRC-32C of the vdso's bytes: restore refuses a different vdso.
    pub vdso_sum: u32,
    /// Address of the runtime's restore marker (a `u64` the restorer sets to the restore generation).
    pub restore_marker: u64,
    /// The interval timers `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`: `(interval, value)` in
    /// microseconds each (0, 0 when disarmed; a periodic timer whose signal is pending reads as
    /// `(interval, 0)`: the kernel re-arms it when the signal is taken).
    pub itimers: [(u64, u64); 3],
}

/// The thread's `rseq` registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rseq {
    /// The area (0: none).
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// The abort signature.
    pub sig: u32,
}

/// One thread, parked in the checkpoint signal's handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThreadRecord {
    /// Thread id as the program sees it.
    pub tid: u32,
    /// [`ThreadRecord::CONTROL`] for the runtime's control thread.
    pub flags: u32,
    /// Address of the signal frame's `ucontext`: the stack pointer for `rt_sigreturn`.
    pub frame: u64,
    /// `FS` base (the thread pointer).
    pub fs_base: u64,
    /// `GS` base.
    pub gs_base: u64,
    /// `sigaltstack`: `ss_sp`.
    pub altstack_sp: u64,
    /// `sigaltstack`: `ss_size`.
    pub altstack_size: u64,
    /// `sigaltstack`: `ss_flags` (`SS_DISABLE`, `SS_AUTODISARM`).
    pub altstack_flags: u32,
    /// Robust futex list head (0: none).
    pub robust_head: u64,
    /// Robust futex list head length.
    pub robust_len: u64,
    /// `clear_child_tid` (`set_tid_address`).
    pub clear_child_tid: u64,
    /// `rseq` registration.
    pub rseq: Rseq,
    /// Signals pending for this thread only.
    pub pending: u64,
    /// The thread's name (`comm`, at most 15 bytes, NUL-padded).
    pub name: [u8; 16],
}

impl ThreadRecord {
    /// Flag: the runtime's control thread.
    pub const CONTROL: u32 = 1;
}

/// What a file descriptor refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FdKind {
    /// A regular file, reopened by path.
    File = 1,
    /// `/dev/null`.
    DevNull = 2,
    /// `/dev/zero`.
    DevZero = 3,
    /// `/dev/urandom` or `/dev/random`.
    URandom = 4,
    /// Standard input, output or error on a terminal, pipe or socket: reconnected to the restorer's.
    Stdio = 5,
    /// A regular file that was deleted while open: its content travels in the record.
    Deleted = 6,
}

impl FdKind {
    fn from_u32(v: u32) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::File,
            2 => Self::DevNull,
            3 => Self::DevZero,
            4 => Self::URandom,
            5 => Self::Stdio,
            6 => Self::Deleted,
            other => return Err(DecodeError::Invalid(format!("unknown fd kind {other}"))),
        })
    }
}

/// One file descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdRecord {
    /// The descriptor number.
    pub fd: u32,
    /// What it is.
    pub kind: FdKind,
    /// `O_*` status flags from `/proc/self/fdinfo` (access mode, append, nonblock, cloexec).
    pub flags: u32,
    /// The file offset.
    pub offset: u64,
    /// The path (for a deleted file, the name it had).
    pub path: String,
    /// A deleted file's content.
    pub content: Vec<u8>,
}

/// A file that a mapping needs, and how to tell it is the same file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MappedFile {
    /// The path.
    pub path: String,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
}

fn string(d: &mut Dec<'_>, what: &'static str) -> Result<String, DecodeError> {
    let b = d.bytes(MAX_PATH, what)?;
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid(format!("{what}: not UTF-8")))
}

fn count(d: &mut Dec<'_>, max: usize, what: &'static str) -> Result<usize, DecodeError> {
    let n = d.u32(what)? as usize;
    if n > max {
        return Err(DecodeError::Oversized {
            what,
            len: n as u64,
            max: max as u64,
        });
    }
    Ok(n)
}

impl ProcessRecord {
    /// The record bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(self.pid).u32(self.control_tid);
        for w in self.mm.words() {
            e.u64(w);
        }
        e.u32(u32::try_from(self.auxv.len()).unwrap_or(0));
        for w in &self.auxv {
            e.u64(*w);
        }
        e.bytes(self.exe.as_bytes()).bytes(self.cwd.as_bytes());
        e.u32(self.umask).u32(self.personality);
        e.u32(u32::try_from(self.rlimits.len()).unwrap_or(0));
        for (s, h) in &self.rlimits {
            e.u64(*s).u64(*h);
        }
        e.u32(u32::try_from(self.sigactions.len()).unwrap_or(0));
        for a in &self.sigactions {
            e.u32(a.signo)
                .u64(a.handler)
                .u64(a.flags)
                .u64(a.restorer)
                .u64(a.mask);
        }
        e.u64(self.shared_pending).u64(self.xcr0).u32(self.xsave_size);
        e.u32(u32::try_from(self.specials.len()).unwrap_or(0));
        for s in &self.specials {
            e.bytes(s.name.as_bytes()).u64(s.start).u64(s.end);
        }
        e.u32(self.vdso_sum).u64(self.restore_marker);
        for (interval, value) in self.itimers {
            e.u64(interval).u64(value);
        }
        e.0
    }

    /// Decodes and checks a record.
    ///
    /// # Errors
    /// Truncation, caps, bad values.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec(bytes);
        let pid = d.u32("pid")?;
        let control_tid = d.u32("control tid")?;
        let mut w = [0u64; 11];
        for x in &mut w {
            *x = d.u64("mm fields")?;
        }
        let n = count(&mut d, MAX_AUXV_WORDS, "auxv")?;
        let auxv = (0..n).map(|_| d.u64("auxv")).collect::<Result<_, _>>()?;
        let exe = string(&mut d, "exe")?;
        let cwd = string(&mut d, "cwd")?;
        let umask = d.u32("umask")?;
        let personality = d.u32("personality")?;
        let n = count(&mut d, RLIMITS, "rlimits")?;
        let rlimits = (0..n)
            .map(|_| Ok((d.u64("rlimit")?, d.u64("rlimit")?)))
            .collect::<Result<_, DecodeError>>()?;
        let n = count(&mut d, 64, "signal handlers")?;
        let mut sigactions = Vec::with_capacity(n);
        for _ in 0..n {
            let a = SigAction {
                signo: d.u32("signal")?,
                handler: d.u64("handler")?,
                flags: d.u64("sa_flags")?,
                restorer: d.u64("sa_restorer")?,
                mask: d.u64("sa_mask")?,
            };
            if !(1..=64).contains(&a.signo) || a.signo == 9 || a.signo == 19 {
                return Err(DecodeError::Invalid(format!("handler for signal {}", a.signo)));
            }
            sigactions.push(a);
        }
        let shared_pending = d.u64("pending")?;
        let xcr0 = d.u64("xcr0")?;
        let xsave_size = d.u32("xsave size")?;
        let n = count(&mut d, MAX_SPECIAL, "special mappings")?;
        let mut specials = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Special {
                name: string(&mut d, "special mapping")?,
                start: d.u64("special start")?,
                end: d.u64("special end")?,
            };
            if s.start >= s.end {
                return Err(DecodeError::Invalid(format!("empty special mapping {}", s.name)));
            }
            specials.push(s);
        }
        let vdso_sum = d.u32("vdso sum")?;
        let restore_marker = d.u64("restore marker")?;
        let mut itimers = [(0, 0); 3];
        for t in &mut itimers {
            *t = (d.u64("itimer interval")?, d.u64("itimer value")?);
        }
        d.finish("process record")?;
        if pid == 0 {
            return Err(DecodeError::Invalid("pid 0".into()));
        }
        Ok(Self {
            pid,
            control_tid,
            mm: MmFields::from_words(w),
            auxv,
            exe,
            cwd,
            umask,
            personality,
            rlimits,
            sigactions,
            shared_pending,
            xcr0,
            xsave_size,
            specials,
            vdso_sum,
            restore_marker,
            itimers,
        })
    }
}

impl ThreadRecord {
    /// The record bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(self.tid)
            .u32(self.flags)
            .u64(self.frame)
            .u64(self.fs_base)
            .u64(self.gs_base);
        e.u64(self.altstack_sp)
            .u64(self.altstack_size)
            .u32(self.altstack_flags);
        e.u64(self.robust_head)
            .u64(self.robust_len)
            .u64(self.clear_child_tid);
        e.u64(self.rseq.addr)
            .u32(self.rseq.len)
            .u32(self.rseq.sig)
            .u64(self.pending);
        e.0.extend_from_slice(&self.name);
        e.0
    }

    /// Decodes and checks a record.
    ///
    /// # Errors
    /// Truncation or bad values.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec(bytes);
        let t = Self {
            tid: d.u32("tid")?,
            flags: d.u32("thread flags")?,
            frame: d.u64("frame")?,
            fs_base: d.u64("fs base")?,
            gs_base: d.u64("gs base")?,
            altstack_sp: d.u64("altstack")?,
            altstack_size: d.u64("altstack size")?,
            altstack_flags: d.u32("altstack flags")?,
            robust_head: d.u64("robust list")?,
            robust_len: d.u64("robust list length")?,
            clear_child_tid: d.u64("clear_child_tid")?,
            rseq: Rseq {
                addr: d.u64("rseq")?,
                len: d.u32("rseq length")?,
                sig: d.u32("rseq signature")?,
            },
            pending: d.u64("thread pending")?,
            name: d.take(16, "thread name")?.try_into().unwrap_or([0; 16]),
        };
        d.finish("thread record")?;
        if t.tid == 0 || t.frame == 0 || t.frame % 8 != 0 {
            return Err(DecodeError::Invalid(format!(
                "thread {}: bad tid or frame",
                t.tid
            )));
        }
        if t.flags & !Self::CONTROL != 0 {
            return Err(DecodeError::Invalid(format!("thread {}: unknown flags", t.tid)));
        }
        Ok(t)
    }
}

impl FdRecord {
    /// The record bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u32(self.fd)
            .u32(self.kind as u32)
            .u32(self.flags)
            .u64(self.offset);
        e.bytes(self.path.as_bytes()).bytes(&self.content);
        e.0
    }

    /// Decodes and checks a record.
    ///
    /// # Errors
    /// Truncation, caps or bad values.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec(bytes);
        let fd = d.u32("fd")?;
        let kind = FdKind::from_u32(d.u32("fd kind")?)?;
        let flags = d.u32("fd flags")?;
        let offset = d.u64("fd offset")?;
        let path = string(&mut d, "fd path")?;
        let content = d.bytes(MAX_CARRIED_FILE, "carried file")?.to_vec();
        d.finish("fd record")?;
        if fd > i32::MAX as u32 {
            return Err(DecodeError::Invalid(format!("fd {fd}")));
        }
        if kind != FdKind::Deleted && !content.is_empty() {
            return Err(DecodeError::Invalid(format!(
                "fd {fd}: content for a file that exists"
            )));
        }
        Ok(Self {
            fd,
            kind,
            flags,
            offset,
            path,
            content,
        })
    }
}

#[allow(clippy::cast_sign_loss, clippy::cast_possible_wrap)]
impl MappedFile {
    /// The record bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(self.path.as_bytes())
            .u64(self.dev)
            .u64(self.ino)
            .u64(self.size);
        e.u64(self.mtime_sec as u64).u32(self.mtime_nsec);
        e.0
    }

    /// Decodes a record.
    ///
    /// # Errors
    /// Truncation or caps.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec(bytes);
        let m = Self {
            path: string(&mut d, "mapped file")?,
            dev: d.u64("dev")?,
            ino: d.u64("ino")?,
            size: d.u64("size")?,
            mtime_sec: d.u64("mtime")? as i64,
            mtime_nsec: d.u32("mtime ns")?,
        };
        d.finish("mapped file record")?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn process() -> ProcessRecord {
        ProcessRecord {
            pid: 42,
            control_tid: 43,
            mm: MmFields {
                brk: 0x1000,
                ..MmFields::default()
            },
            auxv: vec![6, 4096, 0, 0],
            exe: "/bin/app".into(),
            cwd: "/tmp".into(),
            umask: 0o22,
            personality: 0,
            rlimits: vec![(1, 2); RLIMITS],
            sigactions: vec![SigAction {
                signo: 14,
                handler: 0x401000,
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
            restore_marker: 0x7f12_3450,
            itimers: [(50_000, 12_000), (0, 0), (0, 7)],
        }
    }

    #[test]
    fn records_round_trip_and_reject_truncation() {
        let p = process();
        let b = p.encode();
        assert_eq!(ProcessRecord::decode(&b).unwrap(), p);
        for cut in 0..b.len() {
            assert!(ProcessRecord::decode(&b[..cut]).is_err());
        }
        let t = ThreadRecord {
            tid: 7,
            frame: 0x7ffd_0000,
            rseq: Rseq {
                addr: 1,
                len: 32,
                sig: 0x5305_3053,
            },
            ..ThreadRecord::default()
        };
        assert_eq!(ThreadRecord::decode(&t.encode()).unwrap(), t);
        let f = FdRecord {
            fd: 3,
            kind: FdKind::Deleted,
            flags: 2,
            offset: 5,
            path: "/tmp/x (deleted)".into(),
            content: b"hello".to_vec(),
        };
        assert_eq!(FdRecord::decode(&f.encode()).unwrap(), f);
        let m = MappedFile {
            path: "/lib/libc.so.6".into(),
            mtime_sec: -1,
            ..MappedFile::default()
        };
        assert_eq!(MappedFile::decode(&m.encode()).unwrap(), m);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = ProcessRecord::decode(&bytes);
            let _ = ThreadRecord::decode(&bytes);
            let _ = FdRecord::decode(&bytes);
            let _ = MappedFile::decode(&bytes);
        }
    }
}
