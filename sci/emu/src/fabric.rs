//! The emulated fabric: a directory every network namespace of the host shares, holding node ids,
//! segment entries and interrupt counters. Entries are written whole (a temporary file renamed over
//! them), so a reader sees an old or a new entry, never half of one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::codes::err;

/// An error code of the API.
pub type Code = u32;

/// The fabric directory.
pub fn dir() -> PathBuf {
    std::env::var_os("SISCI_EMU_DIR").map_or_else(|| PathBuf::from("/dev/shm/sisci-emu"), PathBuf::from)
}

fn sys_err(_: io::Error) -> Code {
    err::SYSTEM
}

/// A name no other thread or process uses at the same time.
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// True when process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// This process's node id: `SISCI_EMU_NODE_ID`, or the id of its network namespace (allocated on
/// first use: 4, 8, 12, ...).
pub fn local_node(dir: &Path) -> Result<u32, Code> {
    if let Some(id) = std::env::var("SISCI_EMU_NODE_ID").ok().and_then(|v| v.parse().ok()) {
        return Ok(id);
    }
    fs::create_dir_all(dir).map_err(sys_err)?;
    let ns = fs::read_link("/proc/self/ns/net").map_err(sys_err)?;
    let key: String = ns
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let node_file = dir.join(format!("node.{key}"));
    for _ in 0..64 {
        if let Some(id) = fs::read_to_string(&node_file).ok().and_then(|s| s.trim().parse().ok()) {
            return Ok(id);
        }
        // Claim the lowest free id, then bind it to this namespace; a loser of either race retries.
        let mut id = 4u32;
        while fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(format!("id.{id}")))
            .is_err()
        {
            id += 4;
            if id > 4 * 4096 {
                return Err(err::NOSPC);
            }
        }
        let tmp = dir.join(format!("node.{key}.{}", unique()));
        fs::write(&tmp, format!("{id}\n")).map_err(sys_err)?;
        if fs::hard_link(&tmp, &node_file).is_err() {
            let _ = fs::remove_file(dir.join(format!("id.{id}")));
        }
        let _ = fs::remove_file(&tmp);
    }
    Err(err::SYSTEM)
}

/// True when `node` is a node of the fabric.
pub fn node_exists(dir: &Path, node: u32) -> bool {
    if std::env::var("SISCI_EMU_NODE_ID").ok().and_then(|v| v.parse().ok()) == Some(node) {
        return true;
    }
    dir.join(format!("id.{node}")).exists()
}

/// The state of a segment as other nodes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Created (maybe with memory), not yet available.
    Hidden,
    /// Connections are accepted.
    Available,
}

/// A segment's entry: who owns it, whether it is available, and where its memory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub owner: u32,
    pub state: State,
    pub size: u64,
    /// The file that holds the memory (empty: none yet).
    pub path: String,
    /// Offset of the segment's first byte in that file.
    pub offset: u64,
}

impl Entry {
    fn encode(&self) -> String {
        let state = match self.state {
            State::Hidden => "hidden",
            State::Available => "available",
        };
        format!(
            "owner {}\nstate {state}\nsize {}\noffset {}\npath {}\n",
            self.owner, self.size, self.offset, self.path
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut e = Self {
            owner: 0,
            state: State::Hidden,
            size: 0,
            path: String::new(),
            offset: 0,
        };
        let mut seen = 0;
        for line in text.lines() {
            let (k, v) = line.split_once(' ')?;
            match k {
                "owner" => e.owner = v.parse().ok()?,
                "state" => e.state = if v == "available" { State::Available } else { State::Hidden },
                "size" => e.size = v.parse().ok()?,
                "offset" => e.offset = v.parse().ok()?,
                "path" => e.path = v.to_owned(),
                _ => return None,
            }
            seen += 1;
        }
        (seen == 5).then_some(e)
    }
}

/// The entry file of segment `id` of `node`.
pub fn segment_path(dir: &Path, node: u32, id: u32) -> PathBuf {
    dir.join(format!("seg.{node}.{id}"))
}

/// Claims segment `id` of `node` for this process: `SEGMENTID_USED` when a live process holds it.
pub fn claim_segment(dir: &Path, node: u32, id: u32, size: u64) -> Result<PathBuf, Code> {
    fs::create_dir_all(dir).map_err(sys_err)?;
    let path = segment_path(dir, node, id);
    let entry = Entry {
        owner: std::process::id(),
        state: State::Hidden,
        size,
        path: String::new(),
        offset: 0,
    };
    for _ in 0..2 {
        match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(entry.encode().as_bytes()).map_err(sys_err)?;
                return Ok(path);
            }
            Err(_) => match read_entry(&path) {
                // Left by a process that died: reclaim.
                Some(old) if !alive(old.owner) => {
                    let _ = fs::remove_file(&path);
                }
                _ => return Err(err::SEGMENTID_USED),
            },
        }
    }
    Err(err::SEGMENTID_USED)
}

/// Reads an entry; `None` when it is missing or unreadable.
pub fn read_entry(path: &Path) -> Option<Entry> {
    Entry::decode(&fs::read_to_string(path).ok()?)
}

/// Replaces an entry whole.
pub fn write_entry(path: &Path, e: &Entry) -> Result<(), Code> {
    let tmp = path.with_extension(format!("tmp{}", unique()));
    fs::write(&tmp, e.encode()).map_err(sys_err)?;
    fs::rename(&tmp, path).map_err(sys_err)
}

/// An available segment of a live owner, for a connection.
pub fn lookup(dir: &Path, node: u32, id: u32) -> Result<Entry, Code> {
    if !node_exists(dir, node) {
        return Err(err::NO_SUCH_NODEID);
    }
    match read_entry(&segment_path(dir, node, id)) {
        Some(e) if e.state == State::Available && alive(e.owner) && !e.path.is_empty() => Ok(e),
        _ => Err(err::NO_SUCH_SEGMENT),
    }
}

/// The counter file of interrupt `no` of `node`.
pub fn interrupt_path(dir: &Path, node: u32, no: u32) -> PathBuf {
    dir.join(format!("irq.{node}.{no}"))
}

/// Creates the counter file of a new interrupt: number `want`, or the lowest free one. Files of
/// processes that died are reclaimed. Returns the number and the open file.
pub fn create_interrupt(dir: &Path, node: u32, want: Option<u32>) -> Result<(u32, fs::File, PathBuf), Code> {
    fs::create_dir_all(dir).map_err(sys_err)?;
    let candidates: Box<dyn Iterator<Item = u32>> = match want {
        Some(n) => Box::new(std::iter::once(n)),
        None => Box::new(1..4096),
    };
    for no in candidates {
        let path = interrupt_path(dir, node, no);
        let owner_file = path.with_extension("owner");
        for _ in 0..2 {
            if let Ok(f) = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                f.set_len(4096).map_err(sys_err)?;
                fs::write(&owner_file, std::process::id().to_string()).map_err(sys_err)?;
                return Ok((no, f, path));
            }
            let owner = fs::read_to_string(&owner_file).ok().and_then(|s| s.trim().parse().ok());
            match owner {
                Some(pid) if !alive(pid) => {
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(&owner_file);
                }
                _ => break,
            }
        }
    }
    Err(if want.is_some() { err::BUSY } else { err::NOSPC })
}

/// Removes an interrupt's files.
pub fn remove_interrupt(path: &Path) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("owner"));
}

/// The counter file of a live interrupt, for a connection.
pub fn lookup_interrupt(dir: &Path, node: u32, no: u32) -> Result<PathBuf, Code> {
    if !node_exists(dir, node) {
        return Err(err::NO_SUCH_NODEID);
    }
    let path = interrupt_path(dir, node, no);
    let owner = fs::read_to_string(path.with_extension("owner"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    match owner {
        Some(pid) if alive(pid) && path.exists() => Ok(path),
        _ => Err(err::NO_SUCH_SEGMENT),
    }
}

/// The file and offset behind `[addr, addr + len)` of this process: a shared mapping of a file this
/// process holds open. Returns (fd number, offset of `addr` in the file).
pub fn backing_of(addr: u64, len: u64) -> Result<(i32, u64), Code> {
    let maps = fs::read_to_string("/proc/self/maps").map_err(sys_err)?;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(off), Some(dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        if !(s <= addr && addr < e) {
            continue;
        }
        let inode: u64 = inode.parse().unwrap_or(0);
        if addr.saturating_add(len) > e || !perms.ends_with('s') || inode == 0 {
            return Err(err::ILLEGAL_ADDRESS);
        }
        let file_off = u64::from_str_radix(off, 16).map_err(|_| err::SYSTEM)? + (addr - s);
        let (maj, min) = dev.split_once(':').ok_or(err::SYSTEM)?;
        let maj = u64::from_str_radix(maj, 16).map_err(|_| err::SYSTEM)?;
        let min = u64::from_str_radix(min, 16).map_err(|_| err::SYSTEM)?;
        for fd in fs::read_dir("/proc/self/fd").map_err(sys_err)?.flatten() {
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((ino, ma, mi)) = crate::sys::os::file_id(n)
                && ino == inode
                && ma == maj
                && mi == min
            {
                return Ok((n, file_off));
            }
        }
        return Err(err::ILLEGAL_ADDRESS);
    }
    Err(err::ILLEGAL_ADDRESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_reject_garbage() {
        let e = Entry {
            owner: 7,
            state: State::Available,
            size: 1 << 30,
            path: "/proc/7/fd/9".into(),
            offset: 4096,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode("owner x\n"), None);
        assert_eq!(Entry::decode(""), None);
    }
}
