//! Everything of om-restore that needs `unsafe`: the restore blob (position-independent x86-64
//! code), fork-like `clone3`, namespaces, mappings at fixed addresses, and the jump into the blob.
//!
//! # The blob
//! The last part of a restore cannot be Rust: it unmaps the restorer's own code and stack. The blob
//! is a small interpreter of an op list ([`crate::blob`]), copied into a mapping that is free in the
//! image's layout. It uses no stack, no memory but its op list, and only PC-relative jumps, so it
//! runs wherever it is copied and in several threads at once (each clone continues in it).
//!
//! Entry: `rdi` = first op, `rsi` = a stack pointer (only so that `rsp` does not point into memory
//! about to become the image's), `rdx` = the status fd. An op is eight words: kind, syscall number,
//! six arguments. On a failed op it writes `[op index, -errno]` (16 bytes) to the status fd and
//! calls `exit_group(127)`.
//!
//! # References
//! `clone3(2)` (`set_tid`), `mremap(2)`, `prctl(2)` (`PR_SET_MM_MAP`), `rt_sigreturn(2)`, the x86-64
//! syscall ABI (`rax` number; `rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9`; `rcx`, `r11` clobbered).

use std::io;
use std::os::fd::RawFd;

std::arch::global_asm!(
    // The op's syscall number and six arguments into the syscall registers (a macro, not a call:
    // the blob uses no stack). For TRY, a5 is the skip count; the syscalls it runs take five.
    ".macro om_restore_syscall_args",
    "    mov rax, [r12+8]",
    "    mov rdi, [r12+16]",
    "    mov rsi, [r12+24]",
    "    mov rdx, [r12+32]",
    "    mov r10, [r12+40]",
    "    mov r8, [r12+48]",
    "    mov r9, [r12+56]",
    ".endm",
    ".pushsection .text.om_blob,\"ax\",@progbits",
    ".globl om_blob_start",
    ".hidden om_blob_start",
    "om_blob_start:",
    "    mov rsp, rsi",
    "    mov r12, rdi",
    "    mov r14, rdi",
    "    mov r15, rdx",
    ".Lom_next:",
    "    mov rax, [r12]",
    "    cmp rax, 1",
    "    je .Lom_syscall",
    "    cmp rax, 2",
    "    je .Lom_mayfail",
    "    cmp rax, 3",
    "    je .Lom_clone",
    "    cmp rax, 4",
    "    je .Lom_sigreturn",
    "    cmp rax, 5",
    "    je .Lom_addwake",
    "    cmp rax, 6",
    "    je .Lom_wait",
    "    cmp rax, 7",
    "    je .Lom_try",
    "    cmp rax, 8",
    "    je .Lom_expect",
    "    mov rax, -22",
    "    jmp .Lom_fail",
    // SYSCALL: a failure ends the restore.
    ".Lom_syscall:",
    "    om_restore_syscall_args",
    "    syscall",
    "    cmp rax, -4095",
    "    jae .Lom_fail",
    "    add r12, 64",
    "    jmp .Lom_next",
    // MAYFAIL: the result is ignored.
    ".Lom_mayfail:",
    "    om_restore_syscall_args",
    "    syscall",
    "    add r12, 64",
    "    jmp .Lom_next",
    // EXPECT: the syscall must return exactly a5 (a failure or anything else ends the restore).
    ".Lom_expect:",
    "    om_restore_syscall_args",
    "    syscall",
    "    cmp rax, [r12+56]",
    "    jne .Lom_fail",
    "    add r12, 64",
    "    jmp .Lom_next",
    // TRY: on success skip the next a5 ops (the fallback), on failure run them.
    ".Lom_try:",
    "    om_restore_syscall_args",
    "    syscall",
    "    cmp rax, -4095",
    "    jae .Lom_try_failed",
    "    mov rax, [r12+56]",
    "    shl rax, 6",
    "    add r12, rax",
    ".Lom_try_failed:",
    "    add r12, 64",
    "    jmp .Lom_next",
    // CLONE: clone3(a0, a1); the child goes on at op a2, on the same (unused) stack pointer.
    ".Lom_clone:",
    "    mov rax, 435",
    "    mov rdi, [r12+16]",
    "    mov rsi, [r12+24]",
    "    syscall",
    "    test rax, rax",
    "    jz .Lom_child",
    "    cmp rax, -4095",
    "    jae .Lom_fail",
    "    add r12, 64",
    "    jmp .Lom_next",
    ".Lom_child:",
    "    mov r12, [r12+32]",
    "    jmp .Lom_next",
    // SIGRETURN: rt_sigreturn with rsp at the saved ucontext a0.
    ".Lom_sigreturn:",
    "    mov rsp, [r12+16]",
    "    mov rax, 15",
    "    syscall",
    "    jmp .Lom_fail",
    // ADDWAKE: *(u32 *)a0 += 1, then wake every waiter.
    ".Lom_addwake:",
    "    mov rdi, [r12+16]",
    "    lock add dword ptr [rdi], 1",
    "    mov rax, 202",
    "    mov rsi, 129",
    "    mov rdx, 0x7fffffff",
    "    syscall",
    "    add r12, 64",
    "    jmp .Lom_next",
    // WAIT: sleep until *(u32 *)a0 == a1.
    ".Lom_wait:",
    "    mov rdi, [r12+16]",
    "    mov r8, [r12+24]",
    ".Lom_wait_again:",
    "    mov edx, dword ptr [rdi]",
    "    cmp rdx, r8",
    "    je .Lom_wait_done",
    "    mov rax, 202",
    "    mov rsi, 128",
    "    xor r10, r10",
    "    syscall",
    "    jmp .Lom_wait_again",
    ".Lom_wait_done:",
    "    add r12, 64",
    "    jmp .Lom_next",
    // Failure: report [index, -errno] from the op's own last two words, then end the process.
    ".Lom_fail:",
    "    mov rbx, rax",
    "    mov rax, r12",
    "    sub rax, r14",
    "    shr rax, 6",
    "    mov [r12+48], rax",
    "    mov [r12+56], rbx",
    "    mov rax, 1",
    "    mov rdi, r15",
    "    lea rsi, [r12+48]",
    "    mov rdx, 16",
    "    syscall",
    "    mov rax, 231",
    "    mov rdi, 127",
    "    syscall",
    "    ud2",
    ".globl om_blob_end",
    ".hidden om_blob_end",
    "om_blob_end:",
    ".popsection",
);

unsafe extern "C" {
    static om_blob_start: u8;
    static om_blob_end: u8;
}

/// The blob's machine code.
#[must_use]
pub fn blob_code() -> &'static [u8] {
    let start = &raw const om_blob_start;
    let end = &raw const om_blob_end;
    let len = (end as usize).saturating_sub(start as usize);
    // SAFETY: both symbols are defined by the assembly above, in one section, start before end;
    // the bytes between them are the blob's code, mapped read-only for the life of the program.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// The kernel's `struct clone_args` (version 2, with `set_tid` and `cgroup`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CloneArgs {
    /// `CLONE_*` flags.
    pub flags: u64,
    /// `CLONE_PIDFD` out pointer.
    pub pidfd: u64,
    /// `CLONE_CHILD_SETTID` / `CLONE_CHILD_CLEARTID` pointer.
    pub child_tid: u64,
    /// `CLONE_PARENT_SETTID` pointer.
    pub parent_tid: u64,
    /// Signal to the parent when the child ends.
    pub exit_signal: u64,
    /// Lowest address of the child's stack (0: share the caller's stack pointer).
    pub stack: u64,
    /// Its size.
    pub stack_size: u64,
    /// TLS for `CLONE_SETTLS`.
    pub tls: u64,
    /// Pointer to the pid array.
    pub set_tid: u64,
    /// Its length.
    pub set_tid_size: u64,
    /// cgroup fd for `CLONE_INTO_CGROUP`.
    pub cgroup: u64,
}
const _: () = assert!(size_of::<CloneArgs>() == 88);

/// The kernel's `struct prctl_mm_map`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PrctlMmMap {
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
    /// Program break.
    pub brk: u64,
    /// Stack start.
    pub start_stack: u64,
    /// Arguments.
    pub arg_start: u64,
    /// Arguments end.
    pub arg_end: u64,
    /// Environment.
    pub env_start: u64,
    /// Environment end.
    pub env_end: u64,
    /// Pointer to the auxv words.
    pub auxv: u64,
    /// Their size in bytes.
    pub auxv_size: u32,
    /// New `/proc/PID/exe` fd, or `u32::MAX` to keep.
    pub exe_fd: u32,
}
const _: () = assert!(size_of::<PrctlMmMap>() == 104);

/// The kernel's `stack_t`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct StackT {
    /// Base.
    pub sp: u64,
    /// `SS_*` flags.
    pub flags: i32,
    /// Padding.
    pub pad: i32,
    /// Size.
    pub size: u64,
}
const _: () = assert!(size_of::<StackT>() == 24);

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A fork through `clone3`: `flags` may add new namespaces, `set_tid` chooses the child's pid in its
/// pid namespace. Returns the child's pid in the parent and 0 in the child. The child must not rely
/// on glibc's fork handlers (raw `clone3` skips them).
///
/// # Errors
/// A multi-threaded caller (`EBUSY`), or the kernel's refusal.
pub fn fork3(flags: u64, set_tid: Option<u32>) -> io::Result<u32> {
    let threads = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_owned()))
        });
    if threads.as_deref() != Some("1") {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    let tid = [set_tid.unwrap_or(0)];
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if set_tid.is_some() { tid.as_ptr() as u64 } else { 0 },
        set_tid_size: u64::from(set_tid.is_some()),
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed; without CLONE_VM the child gets a
    // copy of this address space (fork semantics) and returns here with 0. The process has one
    // thread (checked above), so no lock can be held by a thread that the child would lack.
    let r = check(unsafe { libc::syscall(libc::SYS_clone3, &raw const args, size_of::<CloneArgs>()) })?;
    Ok(u32::try_from(r).unwrap_or(0))
}

/// `unshare(2)`.
///
/// # Errors
/// The kernel's refusal (`EPERM`, `EINVAL`).
pub fn unshare(flags: i32) -> io::Result<()> {
    // SAFETY: plain flags.
    check(libc::c_long::from(unsafe { libc::unshare(flags) })).map(drop)
}

/// Makes every mount private in this (new) mount namespace and mounts a fresh `/proc` for the
/// calling process's pid namespace.
///
/// # Errors
/// A failed `mount`.
pub fn mount_own_proc() -> io::Result<()> {
    let none = c"none";
    // SAFETY: valid C strings; MS_REC | MS_PRIVATE on "/" changes only propagation.
    check(libc::c_long::from(unsafe {
        libc::mount(
            none.as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    }))?;
    // SAFETY: valid C strings; a proc mount takes no data.
    check(libc::c_long::from(unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    }))
    .map(drop)
}

/// A range of the address space that belongs to the restorer alone: reserved with
/// `MAP_FIXED_NOREPLACE` (so nothing of this program lived there), and only ever mapped, filled and
/// protected through this type. No Rust object lives inside it.
#[derive(Debug, Clone)]
pub struct Area {
    start: u64,
    len: u64,
}

fn inval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn usize_of(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| inval())
}

impl Area {
    /// Reserves `len` bytes at exactly `addr` as inaccessible memory.
    ///
    /// # Errors
    /// `EEXIST` when anything is mapped there.
    pub fn reserve(addr: u64, len: u64) -> io::Result<Self> {
        let n = usize_of(len)?;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                n,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if p as u64 != addr {
            // A kernel without MAP_FIXED_NOREPLACE takes it as a hint.
            // SAFETY: `p` was just mapped by this call and holds nothing.
            unsafe { libc::munmap(p, n) };
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(Self { start: addr, len })
    }

    fn check(&self, at: u64, len: u64) -> io::Result<usize> {
        let end = at.checked_add(len).ok_or_else(inval)?;
        if at < self.start || end > self.start + self.len {
            return Err(inval());
        }
        usize_of(len)
    }

    /// Maps `len` bytes at `at` (inside the area) with `prot` and `flags`, from `fd` at `offset`
    /// (anonymous memory when `fd` is -1).
    ///
    /// # Errors
    /// A range outside the area, or the `mmap` failure.
    pub fn map(&self, at: u64, len: u64, prot: i32, flags: i32, fd: RawFd, offset: u64) -> io::Result<()> {
        let n = self.check(at, len)?;
        let off = i64::try_from(offset).map_err(|_| inval())?;
        // SAFETY: the range lies inside this area, which holds nothing of this program (see the
        // type); MAP_FIXED places the mapping exactly there.
        let p = unsafe { libc::mmap(at as *mut libc::c_void, n, prot, flags | libc::MAP_FIXED, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Changes the protection of `len` bytes at `at`.
    ///
    /// # Errors
    /// A range outside the area, or the kernel's refusal.
    pub fn protect(&self, at: u64, len: u64, prot: i32) -> io::Result<()> {
        let n = self.check(at, len)?;
        // SAFETY: inside this area, where no Rust object lives.
        check(libc::c_long::from(unsafe {
            libc::mprotect(at as *mut libc::c_void, n, prot)
        }))
        .map(drop)
    }

    /// Copies `bytes` to `at`, which must be mapped writable.
    ///
    /// # Errors
    /// A range outside the area.
    pub fn write(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        let n = self.check(at, bytes.len() as u64)?;
        // SAFETY: inside this area, where no Rust object lives, so nothing aliases the
        // destination; `&mut self` keeps other writers through this type out. Memory that is not
        // mapped writable faults (the restore fails), it cannot corrupt this program.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, n) };
        Ok(())
    }

    /// Reads `N` bytes at `at`, which must be mapped readable.
    ///
    /// # Errors
    /// A range outside the area.
    pub fn read<const N: usize>(&self, at: u64) -> io::Result<[u8; N]> {
        self.check(at, N as u64)?;
        let mut out = [0u8; N];
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(at as *const u8, out.as_mut_ptr(), N) };
        Ok(out)
    }

    /// Reads from `fd` at `offset` straight into `len` bytes at `at` (mapped writable).
    ///
    /// # Errors
    /// A range outside the area, or a failed or short read.
    pub fn pread(&mut self, fd: RawFd, at: u64, len: u64, offset: u64) -> io::Result<()> {
        self.check(at, len)?;
        let mut done = 0u64;
        while done < len {
            let n = usize_of((len - done).min(1 << 30))?;
            let off = i64::try_from(offset + done).map_err(|_| inval())?;
            // SAFETY: the destination lies inside this area (checked above), where no Rust object
            // lives; the kernel writes at most `n` bytes.
            let r = unsafe { libc::pread(fd, (at + done) as *mut libc::c_void, n, off) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += r.unsigned_abs() as u64;
        }
        Ok(())
    }

    /// The page checksum of `len` bytes at `at` (readable, 8-byte aligned).
    ///
    /// # Errors
    /// A range outside the area or misaligned.
    pub fn page_sum(&self, at: u64, len: u64) -> io::Result<u32> {
        let n = self.check(at, len)?;
        if at % 8 != 0 || n % 8 != 0 {
            return Err(inval());
        }
        // SAFETY: aligned, inside this area and readable by the caller's contract above; nothing
        // writes it meanwhile (single-threaded restorer).
        Ok(unsafe { om_transport::sys::page_sum(at as *const u8, n) })
    }

    /// Jumps into the blob at the start of this area, never to return: `ops`, `stack` lie inside.
    /// The caller has copied [`blob_code`] to the start (made executable) and a plan's op list to
    /// `ops`, and blocked every signal.
    ///
    /// # Errors
    /// Addresses outside the area, or the code is not in place.
    pub fn enter_blob(&self, ops: u64, stack: u64, status_fd: RawFd) -> io::Result<std::convert::Infallible> {
        let code = blob_code();
        self.check(ops, OP_WORDS * 8)?;
        self.check(stack - 8, 8)?;
        if self.read_slice(code.len())? != code {
            return Err(inval());
        }
        // SAFETY: the blob's code is in place at the start of this area (checked just above) and
        // the plan's op list, which ends every thread in rt_sigreturn or exit_group, at `ops`; the
        // blob uses only this area and the image's memory, never returns into Rust.
        unsafe {
            std::arch::asm!(
                "jmp {entry}",
                entry = in(reg) self.start,
                in("rdi") ops,
                in("rsi") stack,
                in("rdx") i64::from(status_fd),
                options(noreturn),
            )
        }
    }

    fn read_slice(&self, n: usize) -> io::Result<Vec<u8>> {
        self.check(self.start, n as u64)?;
        let mut out = vec![0u8; n];
        // SAFETY: as in `write`; the code part is mapped readable and executable.
        unsafe { std::ptr::copy_nonoverlapping(self.start as *const u8, out.as_mut_ptr(), n) };
        Ok(out)
    }
}

/// Words in one op.
const OP_WORDS: u64 = 8;

/// Sets the raw disposition of `sig` (handler, flags, restorer and mask exactly as an image
/// recorded them), for a restorer: every signal of the calling process is blocked first and stays
/// blocked until the image's threads resume from their frames, when the handlers are in place.
///
/// # Errors
/// The kernel's refusal.
pub fn set_raw_sigaction(sig: u32, handler: u64, flags: u64, restorer: u64, mask: u64) -> io::Result<()> {
    block_all_signals();
    let act = om::sys::task::KernelSigaction {
        handler,
        flags,
        restorer,
        mask,
    };
    // SAFETY: no handler can run in this process before the image is in place: every signal is
    // blocked (above) in its only thread, and the restored threads get their masks back only
    // from their own signal frames.
    unsafe { om::sys::task::sigaction_set(i32::try_from(sig).unwrap_or(-1), &act) }
}

/// Makes the calling process the leader of a new session and, when one of its descriptors 0-2 is a
/// terminal, makes that terminal the session's controlling terminal (so that its line discipline
/// signals the program: `^C`, a window size change).
///
/// # Errors
/// `setsid` or `TIOCSCTTY` failed.
pub fn new_session() -> io::Result<()> {
    nix::unistd::setsid()?;
    for fd in 0..=2 {
        // SAFETY: isatty only queries the descriptor.
        if unsafe { libc::isatty(fd) } == 1 {
            // SAFETY: TIOCSCTTY takes an int argument (0: do not steal it from another session).
            if unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            break;
        }
    }
    Ok(())
}

/// Blocks every signal in the calling thread.
pub fn block_all_signals() {
    // SAFETY: an all-zero sigset_t is valid and sigfillset fills it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a valid sigset_t.
    unsafe { libc::sigfillset(&raw mut all) };
    // SAFETY: valid set; no old set wanted.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &raw const all, std::ptr::null_mut()) };
}

/// `setrlimit(2)` with the raw values.
///
/// # Errors
/// `EPERM` when raising a hard limit without privilege.
pub fn setrlimit(resource: u32, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: a valid rlimit struct; a bad resource only fails.
    check(libc::c_long::from(unsafe {
        libc::setrlimit(resource, &raw const lim)
    }))
    .map(drop)
}

/// `personality(2)`.
pub fn set_personality(p: u32) {
    // SAFETY: only changes the execution domain flags of this process.
    unsafe { libc::personality(libc::c_ulong::from(p)) };
}

/// `umask(2)`.
pub fn set_umask(mask: u32) {
    // SAFETY: always succeeds.
    unsafe { libc::umask(mask) };
}

/// `dup3(2)`: `old` onto `new`, with `O_CLOEXEC` when `cloexec`.
///
/// # Errors
/// The kernel's refusal.
pub fn dup_onto(old: RawFd, new: RawFd, cloexec: bool) -> io::Result<()> {
    if old == new {
        return set_cloexec(new, cloexec);
    }
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: plain fds; `new` is replaced atomically.
    check(libc::c_long::from(unsafe { libc::dup3(old, new, flags) })).map(drop)
}

/// Sets or clears `FD_CLOEXEC`.
///
/// # Errors
/// A bad fd.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let v = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD only changes fd flags.
    check(libc::c_long::from(unsafe { libc::fcntl(fd, libc::F_SETFD, v) })).map(drop)
}

/// `fcntl(F_DUPFD_CLOEXEC)`: the lowest free fd at or above `min`.
///
/// # Errors
/// No free fd.
pub fn dup_above(fd: RawFd, min: RawFd) -> io::Result<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new fd; nothing else changes.
    let r = check(libc::c_long::from(unsafe {
        libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min)
    }))?;
    Ok(RawFd::try_from(r).unwrap_or(-1))
}

/// Closes `fd` (errors ignored: used only on fds this program owns or inherited by accident).
pub fn close(fd: RawFd) {
    // SAFETY: closing an fd number does not touch memory; callers never close an fd that a live
    // `File` owns.
    unsafe { libc::close(fd) };
}

/// `waitpid(-1, &status, __WALL)`: the next child to end and its raw wait status.
///
/// # Errors
/// `ECHILD` when there is none.
pub fn wait_any() -> io::Result<(u32, i32)> {
    let mut status = 0;
    loop {
        // SAFETY: a valid out pointer.
        let r = unsafe { libc::waitpid(-1, &raw mut status, libc::__WALL) };
        if r >= 0 {
            return Ok((u32::try_from(r).unwrap_or(0), status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Ends the process as a process that died of `sig` would, falling back to exit code 128 + sig.
pub fn die_of(sig: i32) -> ! {
    let act = om::sys::task::KernelSigaction::default();
    // SAFETY: SIG_DFL is always a sound disposition.
    let _ = unsafe { om::sys::task::sigaction_set(sig, &act) };
    // SAFETY: an empty mask unblocks `sig` so the default action happens.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set.
    unsafe { libc::sigemptyset(&raw mut none) };
    // SAFETY: valid set.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut()) };
    kill(std::process::id(), sig);
    std::process::exit(128 + sig);
}

/// `kill(2)`.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: plain integers.
    unsafe { libc::kill(i32::try_from(pid).unwrap_or(-1), sig) };
}

/// Copies the bytes of a `#[repr(C)]` plain-integer struct (with explicit padding fields, so that
/// every byte is initialized) into `out`.
///
/// # Panics
/// If `out` is not exactly the size of `T`.
pub fn copy_struct<T: Plain>(v: &T, out: &mut [u8]) {
    assert_eq!(out.len(), size_of::<T>());
    // SAFETY: `out` has room for exactly `size_of::<T>()` bytes; the callers pass only the
    // repr(C) kernel structs of this module, whose fields are integers with no implicit padding.
    unsafe { std::ptr::copy_nonoverlapping(std::ptr::from_ref(v).cast::<u8>(), out.as_mut_ptr(), out.len()) };
}

mod sealed {
    pub trait Sealed {}
}

/// The kernel structs of this module: `#[repr(C)]`, integers only, no implicit padding.
pub trait Plain: Copy + sealed::Sealed {}

impl sealed::Sealed for CloneArgs {}
impl Plain for CloneArgs {}
impl sealed::Sealed for PrctlMmMap {}
impl Plain for PrctlMmMap {}
impl sealed::Sealed for StackT {}
impl Plain for StackT {}

/// Writes `bytes` to `fd` without taking ownership of it (reports on the status pipe).
pub fn write_fd(fd: RawFd, bytes: &[u8]) {
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: a valid buffer of the given length; a bad fd only fails.
        let r = unsafe { libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done) };
        if r <= 0 {
            return;
        }
        done += r.unsigned_abs();
    }
}

static FORWARD_TO: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn forward(sig: i32, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // Only signals a process sent (kill, sigqueue): one the terminal generated (SI_KERNEL) reached
    // the program already, through its process group.
    if code != libc::SI_USER && code != libc::SI_QUEUE {
        return;
    }
    let pid = FORWARD_TO.load(std::sync::atomic::Ordering::Relaxed);
    if pid != 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(i32::try_from(pid).unwrap_or(0), sig) };
    }
}

/// Installs handlers that pass each of `signals` on to `pid` when a process sent them (not when
/// the terminal did: those reach the whole foreground process group anyway).
pub fn forward_signals(pid: u32, signals: &[i32]) {
    FORWARD_TO.store(pid, std::sync::atomic::Ordering::Relaxed);
    for &s in signals {
        // SAFETY: an all-zero sigaction is valid; the handler only calls kill (async-signal-safe).
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = forward as *const () as usize;
        act.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO;
        // SAFETY: a valid sigaction for a catchable signal.
        unsafe { libc::sigaction(s, &raw const act, std::ptr::null_mut()) };
    }
}

/// Takes ownership of `fd`, an fd number handed to this program by its caller (`--ready-fd`), if
/// it is open.
#[must_use]
pub fn take_fd(fd: RawFd) -> Option<std::fs::File> {
    // SAFETY: F_GETFD only queries.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the fd is open (checked above) and was handed to this program to own; nothing else
    // in it uses that number.
    Some(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Sends `fd` over the unix socket `sock` (`SCM_RIGHTS`).
///
/// # Errors
/// The `sendmsg` failure.
pub fn send_fd(sock: &impl std::os::fd::AsFd, fd: RawFd) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let fds = [fd];
    let iov = [io::IoSlice::new(b"u")];
    sendmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&sock.as_fd()),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map(drop)
    .map_err(io::Error::from)
}

/// Receives one fd sent with [`send_fd`]; `None` when the peer closed without sending.
///
/// # Errors
/// The `recvmsg` failure.
fn recv_fd(sock: &impl std::os::fd::AsFd) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&sock.as_fd()),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor in our table for us
                // (SCM_RIGHTS); nothing else owns it.
                return Ok(Some(unsafe {
                    <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                }));
            }
        }
    }
    Ok(None)
}

/// Maps `len` bytes of the file `fd` read-only for the life of the program.
///
/// # Errors
/// The `mmap` failure.
pub fn map_file(fd: &impl std::os::fd::AsFd, len: u64) -> io::Result<&'static [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    let n = usize_of(len)?;
    // SAFETY: a fresh read-only shared mapping chosen by the kernel; it is never unmapped, so the
    // slice stays valid. Checkpoint files are not modified while restored from (and a page that
    // changes anyway fails its checksum before it is used).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` readable bytes just mapped at `p`, never unmapped.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) })
}

/// A userfaultfd for the calling process, with the non-cooperative events a lazy restore needs.
///
/// # Errors
/// No userfaultfd, or a kernel without those events.
pub fn lazy_uffd() -> io::Result<std::os::fd::OwnedFd> {
    use om::sys::uffd;
    let fd = uffd::open(0).or_else(|_| uffd::open(uffd::UFFD_USER_MODE_ONLY))?;
    uffd::api(
        &fd,
        uffd::FEATURE_EVENT_FORK
            | uffd::FEATURE_EVENT_REMAP
            | uffd::FEATURE_EVENT_REMOVE
            | uffd::FEATURE_EVENT_UNMAP,
    )?;
    Ok(fd)
}

/// The userfaultfd of a child the restored process forked: `fd` was installed in this process's
/// table by the kernel, as part of a `UFFD_EVENT_FORK` message; `None` for a bad number.
#[must_use]
pub fn adopt_child_uffd(fd: RawFd) -> Option<om::sys::uffd::Foreign> {
    // SAFETY: F_GETFD only queries.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the kernel created this descriptor for this process as part of the event message;
    // nothing else refers to it.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: it is the userfaultfd of the forked child's memory, not of this process.
    Some(unsafe { om::sys::uffd::Foreign::new(owned) })
}

/// Receives the restored process's userfaultfd over `sock` (see [`send_fd`]); `None` when the
/// process ended without sending it.
///
/// # Errors
/// The `recvmsg` failure.
pub fn recv_uffd(sock: &impl std::os::fd::AsFd) -> io::Result<Option<om::sys::uffd::Foreign>> {
    // SAFETY: only the new process holds the other end of this socket pair, and it sends the
    // userfaultfd it opened for its own memory: another process's.
    Ok(recv_fd(sock)?.map(|fd| unsafe { om::sys::uffd::Foreign::new(fd) }))
}

/// Points this process's stdin, stdout and stderr at `/dev/null`.
pub fn stdio_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            let _ = dup_onto(std::os::fd::AsRawFd::as_raw_fd(&null), fd, false);
        }
    }
}
