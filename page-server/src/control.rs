//! The control socket's line protocol: one request line, one reply line.
//!
//! Replies start with `OK ` or `ERR `. Requests are at most [`MAX_REQUEST`] bytes; a longer or
//! non-UTF-8 request gets an `ERR` reply and the connection is closed.

use std::path::Path;

use om_transport::ImageSink;
use om_transport::error::chain;
use om_transport::tcp::CopyFate;

use crate::checkpoint;
use crate::image::Store;
use crate::runtimes::Runtimes;

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 4096;

/// What a control request is answered from: this omd's state.
pub struct Node<'a> {
    /// The images.
    pub store: &'a Store,
    /// The om processes registered here.
    pub runtimes: &'a Runtimes,
    /// The cluster key file (migrations use it).
    pub key: &'a Path,
    /// The copies of migrations committed here, by commit token (`incoming`).
    pub incoming: &'a dyn Fn() -> Vec<(u64, CopyFate)>,
}

impl std::fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("store", self.store)
            .field("runtimes", self.runtimes)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// The reply to one request line.
///
/// - `ping`: `OK omd VERSION`
/// - `images`: `OK N` then ` id=ID pid=PID bytes=BYTES vmas=N` per committed image
/// - `save ID DIR`: writes the image as a checkpoint directory
/// - `drop ID`: forgets the image and frees its memory
/// - `reserve [BYTES]`: `OK reserve=SIZE ready=READY taken=N`: the image memory kept allocated
///   ahead of the next image, how much of it is made, and how many images took it so far; with
///   BYTES, sets its size first (0 for none)
/// - `checkpoint PID LEAVE DIR`: asks the runtime of PID to write its image to DIR (an absolute path);
///   LEAVE is 1 to keep it running, 0 to end it once the image is safe
/// - `ps`: `OK N` then ` pid=PID` per om process registered here (` pid=PID,vpid=V` for a restored
///   process whose own pid, in its namespace, is V), and ` pid=PID,at=IP:PORT` per process that
///   migrated away from here: where it runs now, for one whose home is here (until its omrun ends)
/// - `incoming`: `OK N` then ` token=HEX state=STATE` per migration committed here (the last 1024,
///   oldest first): STATE is `prepared` (held before its first instruction), `starting` (its home's
///   claim under way), `running,pid=PID`, `discarded` or `unknown`
/// - `at PID IP:PORT` (handled by the daemon: it needs the peer's credentials): omrun, anchor of
///   the process PID of this node that moved away, says where it runs now
/// - `migrate PID IP:PORT DOWNTIME_MS MAX_ROUNDS MODE [TRANSPORT]`: asks the runtime of PID to
///   migrate to the omd at IP:PORT (MODE `precopy`, `auto-converge` or `stop-and-copy`; TRANSPORT `tcp`, the
///   default, `sci` or `verbs`) with this omd's cluster key; the answer is the runtime's (`OK moved ...`
///   with a JSON report, or `ERR ...`)
#[must_use]
pub fn answer(request: &str, node: &Node<'_>) -> String {
    let Node {
        store, runtimes, key, ..
    } = *node;
    let mut words = request.split_ascii_whitespace();
    match words.next() {
        Some("ping") => format!("OK omd {}", env!("CARGO_PKG_VERSION")),
        Some("images") => {
            let images = store.committed();
            let mut out = format!("OK {}", images.len());
            for i in images {
                out.push_str(&format!(
                    " id={} pid={} bytes={} vmas={}",
                    i.id(),
                    i.info().pid,
                    i.bytes(),
                    i.vmas().len()
                ));
            }
            out
        }
        Some("save") => {
            let id = words.next().and_then(|w| w.parse::<u64>().ok());
            let dir = request
                .trim_start()
                .splitn(3, char::is_whitespace)
                .nth(2)
                .map(str::trim);
            match (id, dir) {
                (Some(id), Some(dir)) if !dir.is_empty() => match store.get(id) {
                    Some(image) => match checkpoint::write(&image, Path::new(dir)) {
                        Ok(bytes) => format!("OK saved image {id} to {dir} ({bytes} bytes of pages)"),
                        Err(e) => format!("ERR cannot save image {id}: {}", chain(&e)),
                    },
                    None => format!("ERR no committed image {id}"),
                },
                _ => "ERR usage: save ID DIR".to_owned(),
            }
        }
        Some("drop") => match words.next().and_then(|w| w.parse::<u64>().ok()) {
            Some(id) => match store.remove(id) {
                Some(_) => format!("OK dropped image {id}"),
                None => format!("ERR no committed image {id}"),
            },
            None => "ERR usage: drop ID".to_owned(),
        },
        Some("reserve") => {
            let set = match words.next().map(str::parse::<u64>) {
                None => Ok(()),
                Some(Ok(bytes)) => store.set_reserve(bytes),
                Some(Err(_)) => Err("usage: reserve [BYTES]".to_owned()),
            };
            match set {
                Ok(()) => {
                    let r = store.reserve();
                    format!("OK reserve={} ready={} taken={}", r.size, r.ready, r.taken)
                }
                Err(e) => format!("ERR {e}"),
            }
        }
        Some("ps") => {
            let pids = runtimes.pids();
            let moved = runtimes.moved();
            let mut out = format!("OK {}", pids.len() + moved.len());
            for (p, v) in pids {
                out.push_str(&format!(" pid={p}"));
                if v != p {
                    out.push_str(&format!(",vpid={v}"));
                }
            }
            for (p, at) in moved {
                out.push_str(&format!(" pid={p},at={at}"));
            }
            out
        }
        Some("incoming") => {
            let copies = (node.incoming)();
            let mut out = format!("OK {}", copies.len());
            for (token, fate) in copies {
                out.push_str(&format!(" token={token:016x} state={fate}"));
            }
            out
        }
        Some("migrate") => {
            let args: Vec<&str> = words.collect();
            let (args, transport) = match args.as_slice() {
                [rest @ .., t] if args.len() == 6 => (rest.to_vec(), *t),
                _ => (args, "tcp"),
            };
            let parsed = match args.as_slice() {
                [pid, to, downtime, rounds, mode] => pid
                    .parse::<u32>()
                    .ok()
                    .filter(|_| to.parse::<std::net::SocketAddr>().is_ok())
                    .filter(|_| downtime.parse::<u32>().is_ok() && rounds.parse::<u32>().is_ok())
                    .filter(|_| om::precopy::migrate::Mode::parse(mode).is_some())
                    .filter(|_| om::precopy::migrate::Transport::parse(transport).is_some())
                    .map(|pid| {
                        (
                            pid,
                            format!(
                                "migrate {to} {downtime} {rounds} {mode} {transport} {}",
                                key.display()
                            ),
                        )
                    }),
                _ => None,
            };
            match parsed {
                Some((pid, req)) => {
                    runtimes.begin_migrating(pid);
                    let reply = match runtimes.ask(pid, &req) {
                        Ok(reply) if reply.starts_with("OK") || reply.starts_with("ERR") => reply,
                        Ok(reply) => format!(
                            "ERR unexpected answer from process {pid}: {}",
                            truncate(&reply, 200)
                        ),
                        Err(e) => format!("ERR {e}"),
                    };
                    if !reply.starts_with("OK moved") {
                        // It runs on here: what was held for it arrives now.
                        for sig in runtimes.end_migrating(pid) {
                            if let Ok(s) = nix::sys::signal::Signal::try_from(sig) {
                                let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
                                let _ = nix::sys::signal::kill(pid, s);
                            }
                        }
                    }
                    reply
                }
                None => {
                    "ERR usage: migrate PID IP:PORT DOWNTIME_MS MAX_ROUNDS precopy|auto-converge|stop-and-copy [tcp|sci|verbs]"
                        .to_owned()
                }
            }
        }
        Some("checkpoint") => {
            let pid = words.next().and_then(|w| w.parse::<u32>().ok());
            let leave = words.next().filter(|w| *w == "0" || *w == "1");
            let dir = request
                .trim_start()
                .splitn(4, char::is_whitespace)
                .nth(3)
                .map(str::trim);
            match (pid, leave, dir) {
                (Some(pid), Some(leave), Some(dir)) if dir.starts_with('/') => {
                    match runtimes.ask(pid, &format!("checkpoint {leave} {dir}")) {
                        Ok(reply) if reply.starts_with("OK") || reply.starts_with("ERR") => reply,
                        Ok(reply) => format!(
                            "ERR unexpected answer from process {pid}: {}",
                            truncate(&reply, 200)
                        ),
                        Err(e) => format!("ERR {e}"),
                    }
                }
                _ => "ERR usage: checkpoint PID 0|1 /ABSOLUTE/DIR".to_owned(),
            }
        }
        Some("restart") => {
            "ERR restart runs on the node itself: omctl restart DIR (om-restore), not through omd".to_owned()
        }
        Some(other) => format!("ERR unknown request {:?}", truncate(other, 64)),
        None => "ERR empty request".to_owned(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::image::Limits;

    #[test]
    fn answers() {
        let store = Store::new(Limits {
            per_image: 1 << 20,
            total: 1 << 20,
        });
        let runtimes = Runtimes::default();
        let incoming = || {
            vec![
                (0xab, CopyFate::Prepared),
                (7, CopyFate::Decided(om_transport::wire::Fate::Running(42))),
            ]
        };
        let node = Node {
            store: &store,
            runtimes: &runtimes,
            key: Path::new("/k"),
            incoming: &incoming,
        };
        let answer = |r: &str| answer(r, &node);
        assert!(answer("ping").starts_with("OK omd "));
        assert_eq!(answer("ps"), "OK 0");
        assert_eq!(
            answer("incoming"),
            "OK 2 token=00000000000000ab state=prepared token=0000000000000007 state=running,pid=42"
        );
        assert_eq!(
            answer("checkpoint 12 1 rel/dir"),
            "ERR usage: checkpoint PID 0|1 /ABSOLUTE/DIR"
        );
        assert!(answer("checkpoint 12 1 /tmp/x").contains("not an om process"));
        assert!(answer("  migrate 12 ").starts_with("ERR usage: migrate"));
        assert!(answer("migrate 12 1.2.3.4:5 20 30 precopy").contains("not an om process"));
        assert!(answer("migrate 12 nowhere 20 30 precopy").starts_with("ERR usage"));
        assert!(answer("migrate 12 1.2.3.4:5 20 30 precopy sci").contains("not an om process"));
        assert!(answer("migrate 12 1.2.3.4:5 20 30 precopy carrier-pigeon").starts_with("ERR usage"));
        assert_eq!(answer(""), "ERR empty request");
        assert_eq!(answer("images"), "OK 0");
        assert_eq!(answer("save 3 /tmp/x"), "ERR no committed image 3");
        assert_eq!(answer("save 3"), "ERR usage: save ID DIR");
        assert_eq!(answer("drop x"), "ERR usage: drop ID");
        let long = "x".repeat(1000);
        assert!(answer(&long).len() < 100);
    }
}
