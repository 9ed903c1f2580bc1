//! Work on a connected queue pair, with the rule that makes posting safe built in: every request
//! holds the registration of the memory it reads or writes until its completion is seen.
//!
//! - [`SendQueue`] (the sender): RDMA WRITEs and SENDs, one request in [`SIGNAL_EVERY`] signalled
//!   (and every SEND), completions reaped in order (an RC send queue completes in order, so a
//!   signalled completion retires every request before it).
//! - [`RecvRing`] (the receiver): a ring of registered receive buffers, reposted as their messages
//!   are taken.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::abi::{self, SendWr, Sge, Wc};
use super::device::{Mr, Qp};
use super::memory::Anon;
use crate::error::VerbsError;

/// One request in this many is signalled (selective signalling).
pub const SIGNAL_EVERY: u64 = 32;
/// Requests in flight on the send queue, at most.
pub const SEND_DEPTH: u32 = 256;

/// A completion's status as a result: an error names the library's status and the device's code.
fn succeeded(qp: &Qp, c: &Wc) -> Result<(), VerbsError> {
    if c.status == abi::WC_SUCCESS {
        Ok(())
    } else {
        Err(VerbsError::Completion {
            status: qp.device().library().status_name(c.status),
            code: c.status,
            vendor: c.vendor_err,
        })
    }
}

/// The sending side of a connected queue pair.
#[derive(Debug)]
pub struct SendQueue {
    qp: Qp,
    /// Requests posted; request `n` has work request id `n` (from 1).
    posted: u64,
    /// Every request up to this one completed.
    done: u64,
    /// Registrations held by requests in flight, with the last request that uses each.
    holds: VecDeque<(u64, Arc<Mr>)>,
    /// The last signalled request.
    last_signalled: u64,
    /// How long to wait for the peer to take work before giving up.
    pub timeout: Duration,
    /// The control connection to the peer, watched while waiting ([`SendQueue::watch`]).
    control: Option<std::os::fd::RawFd>,
}

impl SendQueue {
    /// Takes a connected queue pair.
    #[must_use]
    pub fn new(qp: Qp, timeout: Duration) -> Self {
        Self {
            qp,
            posted: 0,
            done: 0,
            holds: VecDeque::new(),
            last_signalled: 0,
            timeout,
            control: None,
        }
    }

    /// Watches `control`, the peer's control connection, while waiting for completions: anything
    /// arriving on it mid-round (an `Error` frame) or its closing means the peer gave up, which an
    /// adapter may never report (soft-RoCE was seen retrying for good against a killed receiver).
    /// The caller keeps `control` open while the queue waits; if it did not, poll would report
    /// the number as invalid (or as some other file) and the wait would end early, nothing worse.
    pub fn watch(&mut self, control: std::os::fd::RawFd) {
        self.control = Some(control);
    }

    /// Sleeps up to `pause`, returning early with an error when the watched control connection
    /// has something to say or closed.
    fn nap(&self, pause: Duration) -> Result<(), VerbsError> {
        let Some(fd) = self.control else {
            std::thread::sleep(pause);
            return Ok(());
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        let ms = libc::c_int::try_from(pause.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd on the stack, valid for the call; poll only reports readiness (for any
        // number, open or not) and reads nothing.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n > 0 && pfd.revents != 0 {
            return Err(VerbsError::PeerGone);
        }
        Ok(())
    }

    /// The queue pair.
    #[must_use]
    pub fn qp(&self) -> &Qp {
        &self.qp
    }

    /// Requests posted so far (the id of the last one).
    #[must_use]
    pub fn posted(&self) -> u64 {
        self.posted
    }

    /// Every request up to this id has completed.
    #[must_use]
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Writes `len` bytes of `mr`'s memory at `addr` to `remote` (under `rkey`) at the peer;
    /// `signal` asks for a completion of its own (for memory to be reused once it is done).
    ///
    /// # Errors
    /// A range outside `mr`, the provider refusing, or a completion in error.
    pub fn write(
        &mut self,
        mr: &Arc<Mr>,
        addr: u64,
        len: u32,
        remote: u64,
        rkey: u32,
        signal: bool,
    ) -> Result<u64, VerbsError> {
        self.post(mr, addr, len, Some((remote, rkey)), signal)
    }

    /// Sends `len` bytes of `mr`'s memory at `addr` as one message into the peer's next receive
    /// buffer; it arrives after every write posted before it. Always signalled.
    ///
    /// # Errors
    /// As [`SendQueue::write`].
    pub fn send(&mut self, mr: &Arc<Mr>, addr: u64, len: u32) -> Result<u64, VerbsError> {
        self.post(mr, addr, len, None, true)
    }

    fn post(
        &mut self,
        mr: &Arc<Mr>,
        addr: u64,
        len: u32,
        rdma: Option<(u64, u32)>,
        signal: bool,
    ) -> Result<u64, VerbsError> {
        let range = mr.range();
        if addr < range.start || addr + u64::from(len) > range.end {
            return Err(VerbsError::OutsideRegion {
                addr,
                len: u64::from(len),
            });
        }
        // Room in the send queue: wait for the oldest signalled request.
        while self.posted - self.done >= u64::from(SEND_DEPTH) - 1 {
            let want = self.done + 1;
            self.wait(want)?;
        }
        let id = self.posted + 1;
        let signalled = signal || rdma.is_none() || id % SIGNAL_EVERY == 0;
        let mut sge = Sge {
            addr,
            length: len,
            lkey: mr.lkey(),
        };
        let mut wr = SendWr {
            wr_id: id,
            sg_list: &raw mut sge,
            num_sge: 1,
            opcode: if rdma.is_some() {
                abi::WR_RDMA_WRITE
            } else {
                abi::WR_SEND
            },
            send_flags: if signalled { abi::SEND_SIGNALED } else { 0 },
            ..SendWr::default()
        };
        if let Some((remote, rkey)) = rdma {
            wr.rdma.remote_addr = remote;
            wr.rdma.rkey = rkey;
        }
        // The registration stays alive (held below) until the request's completion is seen.
        if !self.holds.back().is_some_and(|(_, m)| Arc::ptr_eq(m, mr)) {
            self.holds.push_back((id, Arc::clone(mr)));
        } else if let Some(last) = self.holds.back_mut() {
            last.0 = id;
        }
        // SAFETY: one request with one scatter entry inside `mr` (checked above), whose
        // registration is held in `holds` until a completion at or after `id` is reaped.
        unsafe { self.qp.post_send(&mut wr) }?;
        self.posted = id;
        if signalled {
            self.last_signalled = id;
        }
        Ok(id)
    }

    /// Waits until request `id` (and so every one before it) has completed; when no signalled
    /// request at or after `id` is posted yet, posts an empty SEND (which the receiver skips) to
    /// have one.
    ///
    /// # Errors
    /// A completion in error, or no progress for [`SendQueue::timeout`].
    pub fn wait(&mut self, id: u64) -> Result<(), VerbsError> {
        if id > self.last_signalled
            && id > self.done
            && let Some((_, mr)) = self.holds.back().cloned()
        {
            self.post(&mr, mr.range().start, 0, None, true)?;
        }
        let mut last = Instant::now();
        let mut wc = [Wc::default(); 16];
        let mut pause = Duration::from_micros(2);
        while self.done < id {
            let n = self.qp.cq().poll(&mut wc)?;
            for c in &wc[..n] {
                succeeded(&self.qp, c)?;
                self.done = self.done.max(c.wr_id);
            }
            while self.holds.front().is_some_and(|(last, _)| *last <= self.done) {
                self.holds.pop_front();
            }
            if n > 0 {
                last = Instant::now();
                pause = Duration::from_micros(2);
            } else if last.elapsed() > self.timeout {
                return Err(VerbsError::Timeout(self.timeout));
            } else {
                self.nap(pause)?;
                pause = (pause * 2).min(Duration::from_micros(100));
            }
        }
        Ok(())
    }

    /// Waits until every request posted so far has completed, and lets go of every registration.
    ///
    /// # Errors
    /// As [`SendQueue::wait`].
    pub fn quiesce(&mut self) -> Result<(), VerbsError> {
        let last = self.posted;
        self.wait(last)?;
        self.holds.clear();
        Ok(())
    }
}

/// A ring of registered receive buffers on a queue pair.
#[derive(Debug)]
pub struct RecvRing {
    mr: Arc<Mr>,
    /// The buffers (registered; the region keeps the mapping alive).
    buf: Arc<Anon>,
    size: usize,
    count: usize,
}

impl RecvRing {
    /// Registers `count` buffers of `size` bytes on `qp`'s device and posts them all.
    ///
    /// # Errors
    /// Registration or posting failing.
    pub fn new(qp: &Qp, count: usize, size: usize) -> Result<Self, VerbsError> {
        let buf = Arc::new(Anon::new(count * size).map_err(|e| VerbsError::Call("mmap", e))?);
        let mr = Arc::new(qp.device().register_for_receiving(&buf)?);
        let ring = Self { mr, buf, size, count };
        for i in 0..count {
            ring.repost(qp, i)?;
        }
        Ok(ring)
    }

    fn repost(&self, qp: &Qp, i: usize) -> Result<(), VerbsError> {
        let sge = Sge {
            addr: self.buf.as_ptr() as u64 + (i * self.size) as u64,
            length: u32::try_from(self.size).unwrap_or(u32::MAX),
            lkey: self.mr.lkey(),
        };
        // SAFETY: buffer `i` lies inside the registered `buf`, which the registration keeps
        // mapped for as long as the ring (which holds the registration) lives; the ring is dropped
        // after the queue pair is destroyed (the exporter's field order).
        unsafe { qp.post_recv(i as u64, sge) }
    }

    /// Waits up to `timeout` for the next message; copies it out and reposts its buffer. Empty
    /// messages (a sender's flush, [`SendQueue::quiesce`]) are skipped.
    ///
    /// # Errors
    /// A completion in error (the sender broke the connection, a message too long).
    pub fn next(&self, qp: &Qp, timeout: Duration) -> Result<Option<Vec<u8>>, VerbsError> {
        let deadline = Instant::now() + timeout;
        let mut wc = [Wc::default(); 1];
        let mut pause = Duration::from_micros(2);
        loop {
            if qp.cq().poll(&mut wc)? == 1 {
                let c = wc[0];
                succeeded(qp, &c)?;
                let i = usize::try_from(c.wr_id).unwrap_or(usize::MAX);
                let len = usize::try_from(c.byte_len).unwrap_or(usize::MAX);
                if c.opcode & abi::WC_RECV == 0 || i >= self.count || len > self.size {
                    return Err(VerbsError::Endpoint(format!(
                        "unexpected completion (opcode {:#x}, id {i}, {len} bytes)",
                        c.opcode
                    )));
                }
                // The device finished writing buffer `i` (its completion was reaped) and will not
                // touch it again until it is reposted below.
                let msg = self.buf.read(i * self.size, len).unwrap_or_default();
                self.repost(qp, i)?;
                if msg.is_empty() {
                    continue;
                }
                return Ok(Some(msg));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_micros(200));
        }
    }
}
