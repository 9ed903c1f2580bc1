//! A framed, authenticated connection: frame headers, bodies under HMAC with sequence numbers, and
//! raw page payloads that go straight between memory and the socket.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zerocopy::IntoBytes;

use crate::error::TransportError;
use crate::sys::{self, Landing, ReadableBatch};
use crate::wire::{ErrorCode, FrameHeader, Kind, TAG_LEN, Text, WireError};

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its body, authenticated.
    pub body: Vec<u8>,
}

/// The per-direction MAC keys of an authenticated connection.
#[derive(Clone)]
pub(crate) struct Keys {
    pub(crate) send: HmacSha256,
    pub(crate) recv: HmacSha256,
}

/// A framed connection over TCP.
pub struct Conn {
    stream: TcpStream,
    peer: String,
    keys: Option<Keys>,
    send_seq: u64,
    recv_seq: u64,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.peer)
            .field("authenticated", &self.keys.is_some())
            .finish_non_exhaustive()
    }
}

fn tag(mac: &HmacSha256, header: &FrameHeader, body: &[u8]) -> [u8; TAG_LEN] {
    let mut h = *header;
    h.tag = [0; TAG_LEN];
    let mut m = mac.clone();
    m.update(h.as_bytes());
    m.update(body);
    let full = m.finalize().into_bytes();
    let mut out = [0; TAG_LEN];
    out.copy_from_slice(&full[..TAG_LEN]);
    out
}

impl Conn {
    /// Wraps a connected stream (Nagle off: frames are written whole).
    #[must_use]
    pub fn new(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        Self {
            stream,
            peer,
            keys: None,
            send_seq: 0,
            recv_seq: 0,
        }
    }

    /// The peer's address, for messages.
    #[must_use]
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The socket's descriptor number.
    #[must_use]
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.stream.as_raw_fd()
    }

    /// This end's address.
    #[must_use]
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// This end's IP address (the unspecified address if the socket cannot say): a fabric that runs
    /// over IP picks its port by it.
    #[must_use]
    pub fn local_ip(&self) -> std::net::IpAddr {
        self.local_addr()
            .map_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |a| a.ip())
    }

    /// Fails reads and writes that wait longer than `t` (a stalled peer must not pin memory or a
    /// thread forever).
    ///
    /// # Errors
    /// When the socket refuses the option.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), TransportError> {
        self.stream
            .set_read_timeout(t)
            .and_then(|()| self.stream.set_write_timeout(t))
            .map_err(|source| self.io("set timeout", source))
    }

    /// A second handle on the same connection, for a thread that only receives while this one only
    /// sends (or the other way round): each direction keeps its own key and sequence.
    ///
    /// # Errors
    /// When the socket cannot be duplicated.
    pub fn try_clone(&self) -> Result<Self, TransportError> {
        Ok(Self {
            stream: self.try_clone_stream()?,
            peer: self.peer.clone(),
            keys: self.keys.clone(),
            send_seq: self.send_seq,
            recv_seq: self.recv_seq,
        })
    }

    pub(crate) fn set_keys(&mut self, keys: Keys) {
        self.keys = Some(keys);
        self.send_seq = 0;
        self.recv_seq = 0;
    }

    pub(crate) fn io(&self, op: &'static str, source: io::Error) -> TransportError {
        TransportError::Io {
            op,
            peer: self.peer.clone(),
            source,
        }
    }

    pub(crate) fn wire(&self, source: WireError) -> TransportError {
        TransportError::Wire {
            peer: self.peer.clone(),
            source,
        }
    }

    fn header(&mut self, kind: Kind, body: &[u8]) -> Result<FrameHeader, TransportError> {
        if body.len() > kind.max_body() {
            return Err(TransportError::Misuse("frame body over its cap"));
        }
        let len = u32::try_from(body.len()).map_err(|_| TransportError::Misuse("body too long"))?;
        let mut h = FrameHeader::new(kind, len, self.send_seq);
        if let Some(k) = &self.keys {
            h.tag = tag(&k.send, &h, body);
        } else if !kind.is_handshake() {
            return Err(TransportError::Misuse("frame before authentication"));
        }
        self.send_seq += 1;
        Ok(h)
    }

    /// Sends one frame.
    ///
    /// # Errors
    /// Socket errors, or a body over the kind's cap.
    pub fn send(&mut self, kind: Kind, body: &[u8]) -> Result<(), TransportError> {
        self.send_with_pages(kind, body, None)
    }

    /// Sends one frame followed by the pages of `pages`, read straight from memory by the kernel.
    ///
    /// # Errors
    /// Socket errors.
    pub fn send_with_pages(
        &mut self,
        kind: Kind,
        body: &[u8],
        pages: Option<&ReadableBatch<'_>>,
    ) -> Result<(), TransportError> {
        let h = self.header(kind, body)?;
        sys::mem::send(self.stream.as_fd(), &[h.as_bytes(), body], pages)
            .map_err(|source| self.io("send", source))
    }

    /// Sends one frame followed by `data` (pages copied out of memory already).
    ///
    /// # Errors
    /// Socket errors.
    pub fn send_with_bytes(&mut self, kind: Kind, body: &[u8], data: &[u8]) -> Result<(), TransportError> {
        let h = self.header(kind, body)?;
        sys::mem::send(self.stream.as_fd(), &[h.as_bytes(), body, data], None)
            .map_err(|source| self.io("send", source))
    }

    /// Sends an `Error` frame and ignores failures (the connection is being given up anyway).
    pub fn send_error(&mut self, code: ErrorCode, text: &str) {
        let kind = if self.keys.is_some() {
            Kind::Error
        } else {
            Kind::Refused
        };
        let _ = self.send(kind, &Text::encode(code as u32, text));
    }

    fn read_exact(&mut self, buf: &mut [u8], during: &'static str) -> Result<(), TransportError> {
        match self.stream.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(TransportError::Closed {
                peer: self.peer.clone(),
                during,
            }),
            Err(e) => Err(self.io("receive", e)),
        }
    }

    /// Receives one frame: header checks, body within the cap, tag and sequence verified. `Error`,
    /// `Refused` and `Abort` frames become errors.
    ///
    /// # Errors
    /// Socket errors, protocol violations, authentication failures, or the peer's own error.
    pub fn recv(&mut self) -> Result<Frame, TransportError> {
        let mut hb = [0u8; 40];
        self.read_exact(&mut hb, "between frames")?;
        let (h, kind) = FrameHeader::decode(&hb).map_err(|e| self.wire(e))?;
        let mut body = vec![0u8; h.len.get() as usize];
        self.read_exact(&mut body, "inside a frame")?;
        if let Some(k) = &self.keys {
            if kind.is_handshake() && kind != Kind::Refused {
                return Err(self.wire(WireError::Unexpected {
                    got: kind,
                    state: "after the handshake",
                }));
            }
            if kind != Kind::Refused {
                let want = tag(&k.recv, &h, &body);
                if !constant_time_eq(&want, &h.tag) {
                    return Err(self.wire(WireError::BadTag { seq: h.seq.get() }));
                }
                if h.seq.get() != self.recv_seq {
                    return Err(self.wire(WireError::BadSeq {
                        expected: self.recv_seq,
                        got: h.seq.get(),
                    }));
                }
                self.recv_seq += 1;
            }
        } else if !kind.is_handshake() {
            return Err(self.wire(WireError::Unexpected {
                got: kind,
                state: "before authentication",
            }));
        }
        match kind {
            Kind::Error | Kind::Refused => {
                let t = Text::decode(&body).map_err(|e| self.wire(e))?;
                Err(TransportError::Refused {
                    peer: self.peer.clone(),
                    code: ErrorCode::from_u32(t.code),
                    reason: t.text,
                })
            }
            Kind::Abort => {
                let t = Text::decode(&body).map_err(|e| self.wire(e))?;
                Err(TransportError::Aborted {
                    peer: self.peer.clone(),
                    reason: t.text,
                })
            }
            _ => Ok(Frame { kind, body }),
        }
    }

    /// Receives the raw pages that follow a `Batch` straight into `zones`.
    ///
    /// # Errors
    /// Socket errors or the peer closing mid-batch.
    pub fn recv_pages(&mut self, zones: &[Landing<'_>]) -> Result<(), TransportError> {
        match sys::mem::recv(self.stream.as_fd(), zones) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(TransportError::Closed {
                peer: self.peer.clone(),
                during: "in the middle of a page batch",
            }),
            Err(e) => Err(self.io("receive pages", e)),
        }
    }

    /// Reads exactly `buf.len()` bytes of a batch's pages into `buf`.
    ///
    /// # Errors
    /// Socket errors; the end of the stream.
    pub fn recv_bytes(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        self.read_exact(buf, "in the middle of a page batch")
    }

    /// Reads and discards `len` bytes (the pages of a batch that is being refused).
    ///
    /// # Errors
    /// Socket errors.
    pub fn skip(&mut self, mut len: u64) -> Result<(), TransportError> {
        let mut buf = vec![0u8; 1 << 16];
        while len > 0 {
            let n = usize::try_from(len.min(1 << 16)).unwrap_or(1 << 16);
            self.read_exact(&mut buf[..n], "in the middle of a page batch")?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Receives a frame and insists on its kind.
    ///
    /// # Errors
    /// As [`Conn::recv`], or the wrong kind.
    pub fn expect(&mut self, kind: Kind, state: &'static str) -> Result<Vec<u8>, TransportError> {
        let f = self.recv()?;
        if f.kind != kind {
            return Err(self.wire(WireError::Unexpected { got: f.kind, state }));
        }
        Ok(f.body)
    }

    /// Makes closing this connection abortive (a reset), for connections given up mid-stream.
    pub fn reset_on_close(&self) {
        let _ = sys::reset_on_close(self.stream.as_fd());
    }

    /// Shuts the connection down in both directions, waking any thread blocked on it.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// A second handle on the same socket (for a thread that must unblock this one).
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated.
    pub fn try_clone_stream(&self) -> Result<TcpStream, TransportError> {
        self.stream
            .try_clone()
            .map_err(|source| self.io("duplicate socket", source))
    }
}

/// Compares two byte strings in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
