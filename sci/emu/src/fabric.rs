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

/// This process's pid namespace (its inode).
pub fn pid_namespace() -> u64 {
    fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|p| {
            p.to_string_lossy()
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// True when process `pid` of pid namespace `ns` may be alive. Only a process of the same
/// namespace can tell; others (a restored process runs in a namespace of its own) assume it is.
fn alive(pid: u32, ns: u64) -> bool {
    ns != pid_namespace() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Where this process hands out descriptors of registered memory: a unix socket in the fabric
/// directory, served by one thread, so that processes in other pid and network namespaces (which
/// cannot open `/proc/<pid>/fd`) can map it.
struct FdServer {
    path: PathBuf,
    fds: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<std::os::fd::OwnedFd>>>,
}

static FD_SERVER: std::sync::OnceLock<Result<FdServer, Code>> = std::sync::OnceLock::new();

fn fd_server(dir: &Path) -> Result<&'static FdServer, Code> {
    FD_SERVER
        .get_or_init(|| {
            let path = dir.join(format!("fds.{}", unique()));
            let _ = fs::remove_file(&path);
            let listener = std::os::unix::net::UnixListener::bind(&path).map_err(sys_err)?;
            std::thread::Builder::new()
                .name("sisci-emu-fds".into())
                .spawn(move || {
                    for conn in listener.incoming().flatten() {
                        serve_one(conn);
                    }
                })
                .map_err(sys_err)?;
            Ok(FdServer {
                path,
                fds: std::sync::Mutex::new(std::collections::HashMap::new()),
            })
        })
        .as_ref()
        .map_err(|e| *e)
}

fn serve_one(mut conn: std::os::unix::net::UnixStream) {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let mut name = String::new();
    if std::io::BufReader::new(&mut conn).read_line(&mut name).is_err() {
        return;
    }
    let fd = FD_SERVER
        .get()
        .and_then(|s| s.as_ref().ok())
        .and_then(|s| s.fds.lock().ok().and_then(|m| m.get(name.trim()).cloned()));
    match fd {
        Some(fd) => {
            let _ = crate::sys::os::send_fd(conn.as_raw_fd(), fd.as_raw_fd());
        }
        None => {
            let _ = conn.write_all(&[0]);
        }
    }
}

/// Offers `fd` under `name` (a segment entry's file name); returns the `path` field for the entry.
pub fn serve_fd(dir: &Path, name: &str, fd: std::os::fd::OwnedFd) -> Result<String, Code> {
    let s = fd_server(dir)?;
    s.fds
        .lock()
        .map_err(|_| err::SYSTEM)?
        .insert(name.to_owned(), std::sync::Arc::new(fd));
    Ok(format!("fdsrv:{}:{name}", s.path.display()))
}

/// Stops offering `name`.
pub fn withdraw_fd(name: &str) {
    if let Some(Ok(s)) = FD_SERVER.get()
        && let Ok(mut m) = s.fds.lock()
    {
        m.remove(name);
    }
}

/// The descriptor behind an entry's `path`: from the owner's descriptor server, or the file.
pub fn fetch_fd(path: &std::ffi::CStr) -> Result<std::os::fd::OwnedFd, Code> {
    let text = path.to_str().map_err(|_| err::SYSTEM)?;
    let Some(rest) = text.strip_prefix("fdsrv:") else {
        return crate::sys::os::open(path);
    };
    let (sock, name) = rest.rsplit_once(':').ok_or(err::SYSTEM)?;
    let mut conn = std::os::unix::net::UnixStream::connect(sock).map_err(|_| err::NO_SUCH_SEGMENT)?;
    conn.write_all(format!("{name}\n").as_bytes())
        .map_err(|_| err::NO_SUCH_SEGMENT)?;
    use std::os::fd::AsRawFd;
    crate::sys::os::recv_fd(conn.as_raw_fd())
}

/// This process's node id: `SISCI_EMU_NODE_ID`, or the id of its network namespace (allocated on
/// first use: 4, 8, 12, ...).
pub fn local_node(dir: &Path) -> Result<u32, Code> {
    if let Some(id) = std::env::var("SISCI_EMU_NODE_ID")
        .ok()
        .and_then(|v| v.parse().ok())
    {
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
        if let Some(id) = fs::read_to_string(&node_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
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
    if std::env::var("SISCI_EMU_NODE_ID")
        .ok()
        .and_then(|v| v.parse().ok())
        == Some(node)
    {
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
    /// The owner's pid namespace.
    pub pidns: u64,
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
            "owner {}\npidns {}\nstate {state}\nsize {}\noffset {}\npath {}\n",
            self.owner, self.pidns, self.size, self.offset, self.path
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut e = Self {
            owner: 0,
            pidns: 0,
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
                "pidns" => e.pidns = v.parse().ok()?,
                "state" => {
                    e.state = if v == "available" {
                        State::Available
                    } else {
                        State::Hidden
                    }
                }
                "size" => e.size = v.parse().ok()?,
                "offset" => e.offset = v.parse().ok()?,
                "path" => e.path = v.to_owned(),
                _ => return None,
            }
            seen += 1;
        }
        (seen == 6).then_some(e)
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
        pidns: pid_namespace(),
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
                Some(old) if !alive(old.owner, old.pidns) => {
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
        Some(e) if e.state == State::Available && alive(e.owner, e.pidns) && !e.path.is_empty() => Ok(e),
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
                fs::write(&owner_file, format!("{} {}", std::process::id(), pid_namespace()))
                    .map_err(sys_err)?;
                return Ok((no, f, path));
            }
            match owner_of(&owner_file) {
                Some((pid, ns)) if !alive(pid, ns) => {
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(&owner_file);
                }
                _ => break,
            }
        }
    }
    Err(if want.is_some() { err::BUSY } else { err::NOSPC })
}

/// The (pid, pid namespace) in an interrupt's owner file.
fn owner_of(file: &Path) -> Option<(u32, u64)> {
    let text = fs::read_to_string(file).ok()?;
    let (pid, ns) = text.trim().split_once(' ')?;
    Some((pid.parse().ok()?, ns.parse().ok()?))
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
    match owner_of(&path.with_extension("owner")) {
        Some((pid, ns)) if alive(pid, ns) && path.exists() => Ok(path),
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
            pidns: 4_026_531_836,
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
