//! The home relay: how a migrated process keeps its home node's stdio, signals and exit status.
//!
//! `omrun` stays on the home node and listens; the process carries the address and a random *home
//! token* in its memory. Each node the process runs on away from home (a *generation*: 1 on the
//! first node it moves to, 2 on the next, ...) opens one relay connection to `omrun`, authenticated
//! with the token (the same handshake as the page protocol, role `Relay`; the token is the key).
//!
//! ```text
//!  node running generation g                       omrun (home)
//!    |--- Hello{Relay} / Welcome / Proofs ----------->|  token-keyed handshake
//!    |--- Claim{commit token, start} ---------------->|  before the copy may run (below)
//!    |<-- Claimed{commit token, started} -------------|  started: it runs; else it is discarded
//!    |--- Attach{g, node's omd address} ------------->|  omrun tells its omd where it runs
//!    |--- Terminal{fds} ----------------------------->|  if its stdio is a pseudo-terminal here
//!    |--- Output{1|2, bytes} ------------------------>|  stdout/stderr, in order per stream
//!    |<-- Input{bytes} / InputEnd ---------------------|  only once generation g-1 has ended
//!    |<-- Resize{rows, cols, ...} ---------------------|  the home terminal's size, after Terminal
//!    |<-- Signal{sig} ---------------------------------|
//!    |--- Exit{wait status} ------------------------->|  the process ended: omrun ends the same way
//!    |--- Stop -------------------------------------->|  or: it moved on to generation g+1;
//!    |<-- InputEnd ------------------------------------|  no more input after this
//!    |--- Moved{unread stdin} ----------------------->|  what it left in its stdin pipe
//! ```
//!
//! omrun writes a generation's output only after the previous generation ended (its relay sent
//! `Moved` after the last byte it relayed), and gives stdin to one generation at a time, starting with
//! the bytes the previous one left unread: nothing is lost, reordered or duplicated across a hop.
//!
//! **The home decides whether a copy may run.** A migration's two-phase commit has a moment of doubt:
//! the source sent `Go` and heard nothing back, and cannot reach the destination to ask. The home
//! settles it. The destination omd claims the migration's commit token (`Claim{start}`) before it
//! lets its copy run, and starts it only if the home says `started`; a source in doubt claims the
//! same token to cancel (`Claim{!start}`) and resumes only if the home says it is cancelled. The
//! first claim for a token decides it for good, so exactly one of the two runs: the source ends if
//! the copy won, the copy is discarded if the source won. A source's claim comes on a connection of
//! its own that ends after the answer.
//!
//! A process whose stdio was a terminal carries that terminal's state ([`Terminal`], a record of
//! the image): the node it moves to gives it a pseudo-terminal in that state as its controlling
//! terminal and says so (`Terminal`); omrun then puts the home terminal in raw mode, as `ssh -t`
//! does, so that keys reach the copy's terminal unchanged (its line editing, echo and `^C` are the
//! program's own settings), and passes window size changes on (`Resize`).

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::auth;
use crate::conn::{Conn, Frame};
use crate::error::TransportError;
use crate::key::ClusterKey;
use crate::wire::{self, Hello, Kind, Role, WireError, caps};

/// Largest `Output` or `Input` chunk.
pub const MAX_CHUNK: usize = 64 << 10;
/// Largest unread stdin carried by `Moved` (more than a pipe holds).
pub const MAX_LEFTOVER: usize = 1 << 20;

/// Where a process's home is and how to prove it is ours.
#[derive(Clone, PartialEq, Eq)]
pub struct Home {
    /// omrun's relay address.
    pub addr: SocketAddr,
    /// The home token (the relay's key).
    pub token: Vec<u8>,
    /// The generation of the copy this home record travels in.
    pub generation: u32,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home")
            .field("addr", &self.addr)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Home {
    /// The record bytes: `u32 generation, u16 addr len, addr (text), token`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let a = self.addr.to_string();
        let mut out = self.generation.to_le_bytes().to_vec();
        out.extend_from_slice(&u16::try_from(a.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(&self.token);
        out
    }

    /// Decodes a record.
    ///
    /// # Errors
    /// A truncated record, a bad address or a token of the wrong size.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let bad = |m: &str| WireError::Invalid(format!("home record: {m}"));
        if bytes.len() < 6 {
            return Err(WireError::Truncated("home record"));
        }
        let generation = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let n = usize::from(u16::from_le_bytes([bytes[4], bytes[5]]));
        let rest = &bytes[6..];
        if rest.len() < n {
            return Err(WireError::Truncated("home record"));
        }
        let addr = std::str::from_utf8(&rest[..n])
            .ok()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| bad("address"))?;
        let token = rest[n..].to_vec();
        if !(16..=64).contains(&token.len()) {
            return Err(bad("token size"));
        }
        Ok(Self {
            addr,
            token,
            generation,
        })
    }

    fn key(&self) -> Result<ClusterKey, TransportError> {
        ClusterKey::from_bytes(self.token.clone()).map_err(|_| TransportError::Misuse("home token"))
    }
}

/// A terminal's window size (`struct winsize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// Width in pixels.
    pub xpixel: u16,
    /// Height in pixels.
    pub ypixel: u16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WinSizeBody {
    rows: U16,
    cols: U16,
    xpixel: U16,
    ypixel: U16,
}
const _: () = assert!(size_of::<WinSizeBody>() == 8);

impl WinSize {
    fn body(self) -> WinSizeBody {
        WinSizeBody {
            rows: self.rows.into(),
            cols: self.cols.into(),
            xpixel: self.xpixel.into(),
            ypixel: self.ypixel.into(),
        }
    }

    fn of(b: &WinSizeBody) -> Self {
        Self {
            rows: b.rows.get(),
            cols: b.cols.get(),
            xpixel: b.xpixel.get(),
            ypixel: b.ypixel.get(),
        }
    }

    /// As the kernel takes it.
    #[must_use]
    pub fn to_libc(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: self.xpixel,
            ws_ypixel: self.ypixel,
        }
    }

    /// From the kernel's.
    #[must_use]
    pub fn from_libc(w: &libc::winsize) -> Self {
        Self {
            rows: w.ws_row,
            cols: w.ws_col,
            xpixel: w.ws_xpixel,
            ypixel: w.ws_ypixel,
        }
    }
}

/// Number of control characters in a `struct termios`.
pub const NCCS: usize = 32;
const _: () = assert!(libc::NCCS == NCCS);

/// The terminal that a process's stdio was on when it was captured (record kind 6 of an image): its
/// settings and window size, and which of the descriptors 0-2 are on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terminal {
    /// Bit `n` set: descriptor `n` (0, 1 or 2) is this terminal.
    pub fds: u8,
    /// `c_iflag`.
    pub iflag: u32,
    /// `c_oflag`.
    pub oflag: u32,
    /// `c_cflag`.
    pub cflag: u32,
    /// `c_lflag`.
    pub lflag: u32,
    /// `c_line`.
    pub line: u8,
    /// `c_cc`.
    pub cc: [u8; NCCS],
    /// Input speed.
    pub ispeed: u32,
    /// Output speed.
    pub ospeed: u32,
    /// The window size.
    pub size: WinSize,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct TerminalBody {
    fds: u8,
    line: u8,
    size: WinSizeBody,
    iflag: U32,
    oflag: U32,
    cflag: U32,
    lflag: U32,
    ispeed: U32,
    ospeed: U32,
    cc: [u8; NCCS],
}
const _: () = assert!(size_of::<TerminalBody>() == 66);

impl Terminal {
    /// The record bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        TerminalBody {
            fds: self.fds,
            line: self.line,
            size: self.size.body(),
            iflag: self.iflag.into(),
            oflag: self.oflag.into(),
            cflag: self.cflag.into(),
            lflag: self.lflag.into(),
            ispeed: self.ispeed.into(),
            ospeed: self.ospeed.into(),
            cc: self.cc,
        }
        .as_bytes()
        .to_vec()
    }

    /// Decodes a record.
    ///
    /// # Errors
    /// A record of the wrong size, or one that names no descriptor or one above 2.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let b = TerminalBody::read_from_bytes(bytes).map_err(|_| WireError::Truncated("terminal record"))?;
        if b.fds == 0 || b.fds > 0b111 {
            return Err(WireError::Invalid(format!(
                "terminal record: descriptor mask {:#x}",
                b.fds
            )));
        }
        Ok(Self {
            fds: b.fds,
            iflag: b.iflag.get(),
            oflag: b.oflag.get(),
            cflag: b.cflag.get(),
            lflag: b.lflag.get(),
            line: b.line,
            cc: b.cc,
            ispeed: b.ispeed.get(),
            ospeed: b.ospeed.get(),
            size: WinSize::of(&b.size),
        })
    }

    /// The settings as the kernel takes them.
    #[must_use]
    pub fn termios(&self) -> libc::termios {
        libc::termios {
            c_iflag: self.iflag,
            c_oflag: self.oflag,
            c_cflag: self.cflag,
            c_lflag: self.lflag,
            c_line: self.line,
            c_cc: self.cc,
            c_ispeed: self.ispeed,
            c_ospeed: self.ospeed,
        }
    }

    /// From the kernel's settings and window size of the terminal on descriptors `fds`.
    #[must_use]
    pub fn from_libc(fds: u8, t: &libc::termios, size: &libc::winsize) -> Self {
        Self {
            fds,
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc: t.c_cc,
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
            size: WinSize::from_libc(size),
        }
    }
}

/// One relay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Opens generation `g`, running on the node whose omd listens at this address (if known).
    Attach(u32, Option<SocketAddr>),
    /// Output of stream 1 (stdout) or 2 (stderr).
    Output(u8, Vec<u8>),
    /// Bytes for stdin.
    Input(Vec<u8>),
    /// End of stdin.
    InputEnd,
    /// A signal.
    Signal(i32),
    /// The process ended with this wait status.
    Exit(i32),
    /// The copy stopped (it moved on): send no more input, answer `InputEnd`.
    Stop,
    /// The process moved on, leaving these stdin bytes unread.
    Moved(Vec<u8>),
    /// The copy's descriptors in this mask (bit n: descriptor n) are a pseudo-terminal.
    Terminal(u8),
    /// The home terminal's window size changed.
    Resize(WinSize),
    /// Decide the fate of the migration with this commit token: `start` from the destination about
    /// to start its copy, `!start` from a source that could not learn whether it started.
    Claim {
        /// The commit token of the migration.
        token: u64,
        /// Start the copy (`true`) or cancel it (`false`).
        start: bool,
    },
    /// The home's decision for `token` (made by the first claim): the copy starts (or started).
    Claimed {
        /// The commit token of the migration.
        token: u64,
        /// The copy may run; `false`: it never may.
        started: bool,
    },
}

impl Msg {
    fn frame(&self) -> (Kind, Vec<u8>) {
        match self {
            Self::Attach(g, node) => {
                let mut v = g.to_le_bytes().to_vec();
                if let Some(a) = node {
                    v.extend_from_slice(a.to_string().as_bytes());
                }
                (Kind::Attach, v)
            }
            Self::Output(s, b) => {
                let mut v = vec![*s];
                v.extend_from_slice(b);
                (Kind::Output, v)
            }
            Self::Input(b) => (Kind::Input, b.clone()),
            Self::InputEnd => (Kind::InputEnd, Vec::new()),
            Self::Signal(s) => (Kind::Signal, s.to_le_bytes().to_vec()),
            Self::Exit(s) => (Kind::Exit, s.to_le_bytes().to_vec()),
            Self::Stop => (Kind::Stop, Vec::new()),
            Self::Moved(b) => (Kind::Moved, b.clone()),
            Self::Terminal(fds) => (Kind::Terminal, vec![*fds]),
            Self::Resize(w) => (Kind::Resize, w.body().as_bytes().to_vec()),
            Self::Claim { token, start } => (Kind::Claim, fate_body(*token, *start)),
            Self::Claimed { token, started } => (Kind::Claimed, fate_body(*token, *started)),
        }
    }

    /// Decodes a relay frame.
    ///
    /// # Errors
    /// A kind that is not a relay message, or a body of the wrong size.
    pub fn decode(kind: Kind, body: &[u8]) -> Result<Self, WireError> {
        let word =
            |what| -> Result<[u8; 4], WireError> { body.try_into().map_err(|_| WireError::Truncated(what)) };
        Ok(match kind {
            Kind::Attach => {
                let (g, node) = body
                    .split_first_chunk::<4>()
                    .ok_or(WireError::Truncated("attach"))?;
                let node = match node {
                    [] => None,
                    text => Some(
                        std::str::from_utf8(text)
                            .ok()
                            .and_then(|t| t.parse().ok())
                            .ok_or_else(|| WireError::Invalid("attach: node address".into()))?,
                    ),
                };
                Self::Attach(u32::from_le_bytes(*g), node)
            }
            Kind::Output => match body.split_first() {
                Some((&s @ (1 | 2), rest)) => Self::Output(s, rest.to_vec()),
                _ => return Err(WireError::Invalid("output for no stream".into())),
            },
            Kind::Input => Self::Input(body.to_vec()),
            Kind::InputEnd if body.is_empty() => Self::InputEnd,
            Kind::Signal => Self::Signal(i32::from_le_bytes(word("signal")?)),
            Kind::Exit => Self::Exit(i32::from_le_bytes(word("exit")?)),
            Kind::Stop if body.is_empty() => Self::Stop,
            Kind::Moved => Self::Moved(body.to_vec()),
            Kind::Terminal => match body {
                &[fds @ 1..=0b111] => Self::Terminal(fds),
                _ => return Err(WireError::Invalid("terminal: descriptor mask".into())),
            },
            Kind::Resize => Self::Resize(WinSize::of(
                &WinSizeBody::read_from_bytes(body).map_err(|_| WireError::Truncated("resize"))?,
            )),
            Kind::Claim => {
                let (token, start) = decode_fate(body, "claim")?;
                Self::Claim { token, start }
            }
            Kind::Claimed => {
                let (token, started) = decode_fate(body, "claimed")?;
                Self::Claimed { token, started }
            }
            other => {
                return Err(WireError::Unexpected {
                    got: other,
                    state: "on a relay connection",
                });
            }
        })
    }
}

/// `u64 token, u8 0|1`.
fn fate_body(token: u64, yes: bool) -> Vec<u8> {
    let mut v = token.to_le_bytes().to_vec();
    v.push(u8::from(yes));
    v
}

fn decode_fate(body: &[u8], what: &'static str) -> Result<(u64, bool), WireError> {
    match body {
        [t @ .., yes @ (0 | 1)] if t.len() == 8 => {
            let token = u64::from_le_bytes(t.try_into().map_err(|_| WireError::Truncated(what))?);
            Ok((token, *yes == 1))
        }
        _ if body.len() < 9 => Err(WireError::Truncated(what)),
        _ => Err(WireError::Invalid(format!("{what}: body"))),
    }
}

/// Sends one message.
///
/// # Errors
/// Socket errors.
pub fn send(conn: &mut Conn, msg: &Msg) -> Result<(), TransportError> {
    let (kind, body) = msg.frame();
    conn.send(kind, &body)
}

/// Receives one message.
///
/// # Errors
/// Socket, authentication or protocol errors.
pub fn recv(conn: &mut Conn) -> Result<Msg, TransportError> {
    let Frame { kind, body } = conn.recv()?;
    Msg::decode(kind, &body).map_err(|e| conn.wire(e))
}

fn hello(nonce: [u8; 32]) -> Hello {
    Hello {
        versions: wire::VERSION..wire::VERSION + 1,
        role: Role::Relay,
        streams: 0,
        caps: caps::SUPPORTED,
        page_size: u32::try_from(crate::sys::page_size()).unwrap_or(4096),
        session: 0,
        nonce,
    }
}

/// Connects to `home` and proves the home token; nothing is attached yet ([`attach`], [`claim`]).
///
/// # Errors
/// Connection or authentication errors.
pub fn open(home: &Home, timeout: Duration) -> Result<Conn, TransportError> {
    let s = TcpStream::connect_timeout(&home.addr, timeout).map_err(|source| TransportError::Connect {
        addr: home.addr,
        source,
    })?;
    let mut c = Conn::new(s);
    c.set_read_timeout(Some(timeout))?;
    auth::client(&mut c, &home.key()?, &hello(auth::random_bytes()))?;
    Ok(c)
}

/// Asks the home on `conn` (from [`open`]) to decide the migration of commit token `token`: start
/// its copy (`start`) or cancel it. Returns the decision, which the first claim for a token made:
/// `true` when the copy may run (or runs).
///
/// # Errors
/// Socket errors, or an answer that is not about `token`.
pub fn claim(conn: &mut Conn, token: u64, start: bool) -> Result<bool, TransportError> {
    send(conn, &Msg::Claim { token, start })?;
    match recv(conn)? {
        Msg::Claimed { token: t, started } if t == token => Ok(started),
        other => Err(conn.wire(WireError::Invalid(format!(
            "expected the home's decision on {token:#x}, got {other:?}"
        )))),
    }
}

/// Attaches `conn` (from [`open`], perhaps after a [`claim`]) as generation `home.generation` of
/// the node whose omd listens at `omd` (an unspecified address stands for the one this connection
/// leaves from); the relay flows from here on.
///
/// # Errors
/// Socket errors.
pub fn attach(conn: &mut Conn, home: &Home, omd: SocketAddr) -> Result<(), TransportError> {
    let node = if omd.ip().is_unspecified() {
        conn.local_addr().map(|l| SocketAddr::new(l.ip(), omd.port()))
    } else {
        Some(omd)
    };
    send(conn, &Msg::Attach(home.generation, node))?;
    conn.set_read_timeout(None)
}

/// [`open`], then [`attach`].
///
/// # Errors
/// Connection or authentication errors.
pub fn connect(home: &Home, omd: SocketAddr, timeout: Duration) -> Result<Conn, TransportError> {
    let mut c = open(home, timeout)?;
    attach(&mut c, home, omd)?;
    Ok(c)
}

/// Calls `attempt` until it succeeds, pausing `pause` after each failure, for as long as `within`
/// has not passed since the first call; then returns the last failure. The home (or a destination)
/// may be briefly unreachable while a node's network settles: each caller that must reach one
/// retries this way.
///
/// # Errors
/// The last error of `attempt`.
pub fn retry<T, E>(
    within: Duration,
    pause: Duration,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match attempt() {
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(pause),
            r => return r,
        }
    }
}

/// What a relay connection opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// The relay of generation `.0`, on the node whose omd listens at `.1` (if known).
    Attach(u32, Option<SocketAddr>),
    /// A claim on the migration with this commit token ([`claim`]); the connection may attach
    /// after the answer.
    Claim {
        /// The commit token.
        token: u64,
        /// Start (`true`) or cancel.
        start: bool,
    },
}

/// Accepts a relay connection on omrun's side: checks the token and returns the connection and
/// what it opened with.
///
/// # Errors
/// A peer that does not hold the token, or opens with anything but an attach or a claim.
pub fn accept(stream: TcpStream, token: &[u8], timeout: Duration) -> Result<(Conn, First), TransportError> {
    let mut c = Conn::new(stream);
    c.set_read_timeout(Some(timeout))?;
    let key = ClusterKey::from_bytes(token.to_vec()).map_err(|_| TransportError::Misuse("home token"))?;
    auth::server(&mut c, &key, |h| {
        if h.role == Role::Relay {
            Ok(hello(auth::random_bytes()))
        } else {
            Err((
                wire::ErrorCode::Session,
                "omrun takes relay connections only".into(),
            ))
        }
    })?;
    let first = next_first(&mut c)?;
    Ok((c, first))
}

/// The next opening message on an accepted relay connection (after a claim was answered: an attach
/// or the end of the connection, `Closed`).
///
/// # Errors
/// Socket errors, or any other message.
pub fn next_first(c: &mut Conn) -> Result<First, TransportError> {
    let first = match recv(c)? {
        Msg::Attach(g, node) => {
            c.set_read_timeout(None)?;
            First::Attach(g, node)
        }
        Msg::Claim { token, start } => First::Claim { token, start },
        other => {
            return Err(c.wire(WireError::Invalid(format!(
                "expected attach or claim, got {other:?}"
            ))));
        }
    };
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_record_round_trips_and_rejects_garbage() {
        let h = Home {
            addr: "10.0.0.1:4000".parse().unwrap(),
            token: vec![7; 32],
            generation: 3,
        };
        assert_eq!(Home::decode(&h.encode()).unwrap(), h);
        let e = h.encode();
        for n in 0..e.len() {
            let _ = Home::decode(&e[..n]);
        }
        assert!(Home::decode(&e[..e.len() - 20]).is_err());
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            Msg::Attach(2, None),
            Msg::Attach(7, Some("10.77.0.2:7070".parse().unwrap())),
            Msg::Attach(7, Some("[fe80::1]:7070".parse().unwrap())),
            Msg::Output(1, b"hi".to_vec()),
            Msg::Output(2, Vec::new()),
            Msg::Input(b"x".to_vec()),
            Msg::InputEnd,
            Msg::Signal(10),
            Msg::Exit(0x100),
            Msg::Stop,
            Msg::Moved(b"rest".to_vec()),
            Msg::Terminal(0b110),
            Msg::Resize(WinSize {
                rows: 50,
                cols: 132,
                xpixel: 1,
                ypixel: 65535,
            }),
            Msg::Claim {
                token: u64::MAX - 3,
                start: true,
            },
            Msg::Claim {
                token: 0,
                start: false,
            },
            Msg::Claimed {
                token: 0x1234_5678_9abc_def0,
                started: true,
            },
            Msg::Claimed {
                token: 9,
                started: false,
            },
        ] {
            let (k, b) = m.frame();
            assert_eq!(Msg::decode(k, &b).unwrap(), m);
        }
        assert!(Msg::decode(Kind::Output, &[3, 1]).is_err());
        assert!(Msg::decode(Kind::Signal, &[1]).is_err());
        assert!(Msg::decode(Kind::Attach, &[1, 0, 0]).is_err());
        assert!(Msg::decode(Kind::Attach, b"\x01\0\0\0nowhere").is_err());
        assert!(Msg::decode(Kind::Batch, &[]).is_err());
        assert!(Msg::decode(Kind::Terminal, &[0]).is_err());
        assert!(Msg::decode(Kind::Terminal, &[8]).is_err());
        assert!(Msg::decode(Kind::Resize, &[1; 7]).is_err());
        assert!(Msg::decode(Kind::Claim, &[0; 8]).is_err());
        assert!(Msg::decode(Kind::Claim, &[0; 10]).is_err());
        assert!(Msg::decode(Kind::Claimed, &[0, 0, 0, 0, 0, 0, 0, 0, 2]).is_err());
    }

    #[test]
    fn claims_are_answered_and_a_claimed_connection_attaches() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let token = vec![5u8; 32];
        let home = Home {
            addr: l.local_addr().unwrap(),
            token: token.clone(),
            generation: 2,
        };
        let t = Duration::from_secs(5);
        let server = std::thread::spawn(move || {
            // Accepts a claim on token 77, checks it, and answers that the copy runs.
            let answer = |start: bool| {
                let (mut c, first) = accept(l.accept().unwrap().0, &token, t).unwrap();
                assert_eq!(first, First::Claim { token: 77, start });
                let started = Msg::Claimed {
                    token: 77,
                    started: true,
                };
                send(&mut c, &started).unwrap();
                c
            };
            // A destination: claims to start, then attaches on the same connection.
            let attached = next_first(&mut answer(true)).unwrap();
            // A source: claims to cancel, learns the copy runs, hangs up.
            let closed = next_first(&mut answer(false));
            assert!(matches!(closed, Err(TransportError::Closed { .. })));
            // An answer about another migration.
            let (mut c, _) = accept(l.accept().unwrap().0, &token, t).unwrap();
            send(
                &mut c,
                &Msg::Claimed {
                    token: 78,
                    started: false,
                },
            )
            .unwrap();
            attached
        });
        let mut c = open(&home, t).unwrap();
        assert!(claim(&mut c, 77, true).unwrap());
        attach(&mut c, &home, "0.0.0.0:7070".parse().unwrap()).unwrap();
        let mut source = open(&home, t).unwrap();
        assert!(claim(&mut source, 77, false).unwrap());
        drop(source);
        let mut other = open(&home, t).unwrap();
        assert!(claim(&mut other, 77, false).is_err());
        assert_eq!(
            server.join().unwrap(),
            First::Attach(2, Some("127.0.0.1:7070".parse().unwrap()))
        );
    }

    #[test]
    fn terminal_record_round_trips_through_the_kernel_struct() {
        let mut cc = [0u8; NCCS];
        for (i, c) in cc.iter_mut().enumerate() {
            *c = u8::try_from(i * 7).unwrap();
        }
        let t = Terminal {
            fds: 0b011,
            iflag: 0x500,
            oflag: 0x5,
            cflag: 0xbf,
            lflag: 0x8a3b,
            line: 0,
            cc,
            ispeed: 15,
            ospeed: 15,
            size: WinSize {
                rows: 24,
                cols: 80,
                xpixel: 0,
                ypixel: 0,
            },
        };
        assert_eq!(Terminal::decode(&t.encode()).unwrap(), t);
        let k = t.termios();
        assert_eq!(Terminal::from_libc(t.fds, &k, &t.size.to_libc()), t);
        let e = t.encode();
        for n in 0..e.len() {
            assert!(Terminal::decode(&e[..n]).is_err());
        }
        let mut none = e.clone();
        none[0] = 0;
        assert!(Terminal::decode(&none).is_err());
        none[0] = 0b1000;
        assert!(Terminal::decode(&none).is_err());
    }
}
