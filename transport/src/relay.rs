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
//!    |--- Attach{g} --------------------------------->|
//!    |--- Output{1|2, bytes} ------------------------>|  stdout/stderr, in order per stream
//!    |<-- Input{bytes} / InputEnd ---------------------|  only once generation g-1 has ended
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

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

/// One relay message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Opens generation `g`.
    Attach(u32),
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
}

impl Msg {
    fn frame(&self) -> (Kind, Vec<u8>) {
        match self {
            Self::Attach(g) => (Kind::Attach, g.to_le_bytes().to_vec()),
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
            Kind::Attach => Self::Attach(u32::from_le_bytes(word("attach")?)),
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
            other => {
                return Err(WireError::Unexpected {
                    got: other,
                    state: "on a relay connection",
                });
            }
        })
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

/// Connects to `home` as generation `home.generation` and attaches.
///
/// # Errors
/// Connection or authentication errors.
pub fn connect(home: &Home, timeout: Duration) -> Result<Conn, TransportError> {
    let s = TcpStream::connect_timeout(&home.addr, timeout).map_err(|source| TransportError::Connect {
        addr: home.addr,
        source,
    })?;
    let mut c = Conn::new(s);
    c.set_read_timeout(Some(timeout))?;
    auth::client(&mut c, &home.key()?, &hello(auth::random_bytes()))?;
    send(&mut c, &Msg::Attach(home.generation))?;
    c.set_read_timeout(None)?;
    Ok(c)
}

/// Accepts a relay connection on omrun's side: checks the token and returns the connection and the
/// generation it attaches.
///
/// # Errors
/// A peer that does not hold the token, or does not attach.
pub fn accept(stream: TcpStream, token: &[u8], timeout: Duration) -> Result<(Conn, u32), TransportError> {
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
    let g = match recv(&mut c)? {
        Msg::Attach(g) => g,
        other => {
            return Err(c.wire(WireError::Invalid(format!("expected attach, got {other:?}"))));
        }
    };
    c.set_read_timeout(None)?;
    Ok((c, g))
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
            Msg::Attach(2),
            Msg::Output(1, b"hi".to_vec()),
            Msg::Output(2, Vec::new()),
            Msg::Input(b"x".to_vec()),
            Msg::InputEnd,
            Msg::Signal(10),
            Msg::Exit(0x100),
            Msg::Stop,
            Msg::Moved(b"rest".to_vec()),
        ] {
            let (k, b) = m.frame();
            assert_eq!(Msg::decode(k, &b).unwrap(), m);
        }
        assert!(Msg::decode(Kind::Output, &[3, 1]).is_err());
        assert!(Msg::decode(Kind::Signal, &[1]).is_err());
        assert!(Msg::decode(Kind::Batch, &[]).is_err());
    }
}
