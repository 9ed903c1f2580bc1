//! `/proc/self/maps`: the process's VMAs, as trackers need them.
//!
//! Format (`proc(5)`): `start-end perms offset major:minor inode [path]`, addresses and offset in hex,
//! the path after any number of spaces, possibly with spaces inside and ` (deleted)` at the end.

use std::fmt;
use std::io::Read;

/// The most bytes read from a maps file (about 400,000 VMAs; `vm.max_map_count` defaults to 65,530).
pub const MAX_MAPS_BYTES: usize = 64 << 20;
/// The longest line accepted (a path is at most `PATH_MAX`).
pub const MAX_LINE: usize = 4096 + 128;

/// Why a maps file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// Reading failed.
    #[error("cannot read /proc/self/maps")]
    Read(#[source] std::io::Error),
    /// The file is larger than [`MAX_MAPS_BYTES`].
    #[error("/proc/self/maps is larger than {MAX_MAPS_BYTES} bytes")]
    TooLarge,
    /// A line did not parse.
    #[error("malformed maps line {line_no}: {reason}: {line:?}")]
    Malformed {
        /// 1-based line number.
        line_no: usize,
        /// What was wrong.
        reason: &'static str,
        /// The line (truncated to 200 bytes).
        line: String,
    },
}

/// Access rights of a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms {
    /// `r`.
    pub read: bool,
    /// `w`.
    pub write: bool,
    /// `x`.
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
}

impl Perms {
    /// The `PROT_*` bits.
    #[must_use]
    pub fn prot(self) -> i32 {
        let mut p = libc::PROT_NONE;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        if self.exec {
            p |= libc::PROT_EXEC;
        }
        p
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |b, ch| if b { ch } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x'),
            if self.shared { 's' } else { 'p' }
        )
    }
}

/// One VMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Access rights.
    pub perms: Perms,
    /// Offset in the mapped file.
    pub offset: u64,
    /// Device of the mapped file (major, minor).
    pub dev: (u32, u32),
    /// Inode of the mapped file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-path (`[heap]`, `[stack]`, `[vdso]`, ...); empty for anonymous memory.
    pub path: String,
}

impl Vma {
    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty VMA (never produced by the kernel).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Kernel-provided mappings whose contents are not the process's data and cannot be tracked:
    /// `[vdso]`, `[vvar]`, `[vvar_vclock]` (6.13+), `[vsyscall]`, `[uprobes]`.
    #[must_use]
    pub fn is_special(&self) -> bool {
        matches!(
            self.path.as_str(),
            "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[uprobes]"
        )
    }
}

impl fmt::Display for Vma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:x}-{:x} {} {:08x} {:02x}:{:02x} {}",
            self.start, self.end, self.perms, self.offset, self.dev.0, self.dev.1, self.inode
        )?;
        if !self.path.is_empty() {
            write!(f, " {}", self.path)?;
        }
        Ok(())
    }
}

/// Reads this process's VMAs.
///
/// # Errors
/// [`MapsError`].
pub fn read_self() -> Result<Vec<Vma>, MapsError> {
    let mut f = std::fs::File::open("/proc/self/maps").map_err(MapsError::Read)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut len = 0;
    loop {
        if len == buf.len() {
            if len > MAX_MAPS_BYTES {
                return Err(MapsError::TooLarge);
            }
            buf.resize(len * 2, 0);
        }
        // The kernel writes the text: a buffer the mprotect tracker made read-only would fail the
        // read with EFAULT (the heap is tracked memory too).
        super::open_range(buf[len..].as_ptr() as usize, buf.len() - len);
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MapsError::Read(e)),
        }
    }
    parse(&buf[..len])
}

/// Parses the text of a maps file.
///
/// # Errors
/// [`MapsError::Malformed`] for the first line that does not parse, [`MapsError::TooLarge`].
pub fn parse(text: &[u8]) -> Result<Vec<Vma>, MapsError> {
    if text.len() > MAX_MAPS_BYTES {
        return Err(MapsError::TooLarge);
    }
    let mut out = Vec::with_capacity(text.len() / 80);
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        out.push(parse_line(line).map_err(|reason| MapsError::Malformed {
            line_no: i + 1,
            reason,
            line: String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
        })?);
    }
    Ok(out)
}

fn hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

fn parse_line(line: &[u8]) -> Result<Vma, &'static str> {
    if line.len() > MAX_LINE {
        return Err("line too long");
    }
    let mut fields = line.splitn(6, |&b| b == b' ');
    let mut next = |what| fields.next().ok_or(what);
    let range = next("no address range")?;
    let perms = next("no permissions")?;
    let offset = next("no offset")?;
    let dev = next("no device")?;
    let inode = next("no inode")?;
    let path = fields.next().unwrap_or(&[]);

    let dash = range
        .iter()
        .position(|&b| b == b'-')
        .ok_or("address range without '-'")?;
    let start = hex(&range[..dash]).ok_or("bad start address")?;
    let end = hex(&range[dash + 1..]).ok_or("bad end address")?;
    if end <= start {
        return Err("end address not above start");
    }
    let &[r, w, x, s] = perms else {
        return Err("permissions are not 4 characters");
    };
    let flag = |c: u8, yes: u8| match c {
        c if c == yes => Ok(true),
        b'-' => Ok(false),
        _ => Err("bad permission character"),
    };
    let perms = Perms {
        read: flag(r, b'r')?,
        write: flag(w, b'w')?,
        exec: flag(x, b'x')?,
        shared: match s {
            b's' => true,
            b'p' => false,
            _ => return Err("bad sharing character"),
        },
    };
    let offset = hex(offset).ok_or("bad offset")?;
    let colon = dev.iter().position(|&b| b == b':').ok_or("device without ':'")?;
    let major = hex(&dev[..colon])
        .and_then(|v| u32::try_from(v).ok())
        .ok_or("bad device major")?;
    let minor = hex(&dev[colon + 1..])
        .and_then(|v| u32::try_from(v).ok())
        .ok_or("bad device minor")?;
    let inode = std::str::from_utf8(inode)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad inode")?;
    let path = String::from_utf8_lossy(path).trim_start_matches(' ').to_owned();
    Ok(Vma {
        start,
        end,
        perms,
        offset,
        dev: (major, minor),
        inode,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn real_lines() {
        let text = b"55d4c8a00000-55d4c8a21000 rw-p 00000000 00:00 0                          [heap]\n\
7f1c2c000000-7f1c2c021000 rw-p 00000000 00:00 0 \n\
7f1c2e7d1000-7f1c2e7f7000 r-xp 00028000 fe:01 1311                       /usr/lib/x86_64-linux-gnu/libc.so.6\n\
7ffd5b1f4000-7ffd5b1f8000 r--p 00000000 00:00 0                          [vvar]\n\
7f00aa000000-7f00aa001000 rw-s 00000000 00:01 4242                       /memfd:my buf (deleted)\n\
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n";
        let v = parse(text).unwrap();
        assert_eq!(v.len(), 6);
        assert_eq!(v[0].path, "[heap]");
        assert_eq!(
            v[0].perms,
            Perms {
                read: true,
                write: true,
                exec: false,
                shared: false
            }
        );
        assert_eq!(v[1].path, "");
        assert_eq!(v[2].offset, 0x28000);
        assert_eq!(v[2].dev, (0xfe, 1));
        assert_eq!(v[2].inode, 1311);
        assert!(v[3].is_special() && v[5].is_special() && !v[0].is_special());
        assert_eq!(v[4].path, "/memfd:my buf (deleted)");
        assert!(v[4].perms.shared);
        assert_eq!(v[5].end, 0xffff_ffff_ff60_1000);
    }

    #[test]
    fn own_maps_parse() {
        let v = read_self().unwrap();
        assert!(v.iter().any(|m| m.path == "[stack]"));
        assert!(v.windows(2).all(|w| w[0].end <= w[1].start));
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            &b"zz-10 rw-p 0 00:00 0"[..],
            b"20-10 rw-p 0 00:00 0",
            b"10-20 rw-q 0 00:00 0",
            b"10-20 rw 0 00:00 0",
            b"10-20 rw-p 0 0000 0",
            b"10-20 rw-p 0 00:00 x",
            b"10-20 rw-p",
            b"10-11111111111111111 rw-p 0 00:00 0",
        ] {
            assert!(
                matches!(parse(bad), Err(MapsError::Malformed { line_no: 1, .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("10-20 rw-p 0 00:00 0 /{}", "a".repeat(MAX_LINE));
        assert!(parse(long.as_bytes()).is_err());
    }

    fn vma_strategy() -> impl Strategy<Value = Vma> {
        (
            0u64..1 << 47,
            1u64..1 << 20,
            any::<[bool; 4]>(),
            any::<u32>(),
            (0u32..4096, 0u32..1 << 20),
            any::<u64>(),
            "(|\\[heap\\]|/[a-z ./]{1,40})",
        )
            .prop_map(
                |(start, len, [read, write, exec, shared], off, dev, inode, path)| Vma {
                    start,
                    end: start + len,
                    perms: Perms {
                        read,
                        write,
                        exec,
                        shared,
                    },
                    offset: u64::from(off),
                    dev,
                    inode,
                    path: path.trim_start().to_owned(),
                },
            )
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(v in prop::collection::vec(vma_strategy(), 0..20)) {
            let text: String = v.iter().map(|m| format!("{m}\n")).collect();
            prop_assert_eq!(parse(text.as_bytes()).unwrap(), v);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse(&bytes);
        }
    }
}
