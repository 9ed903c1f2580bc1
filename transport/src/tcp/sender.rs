//! The TCP sender: one control connection, N data connections, pages sent with `sendmsg` straight from
//! the application's memory.

use std::net::{SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::api::{PageSender, Placer, RoundStats, Source};
use crate::auth;
use crate::batch;
use crate::conn::Conn;
use crate::error::TransportError;
use crate::key::ClusterKey;
use crate::sys::mem::{CopyBuffer, ReadBuffer};
use crate::sys::{self, Readable, ReadableBatch};
use crate::wire::{
    self, Batch, Begin, EndRound, ErrorCode, Fate, Hello, Kind, MAX_BATCH_PAGES, MAX_BATCH_RUNS,
    MAX_ZERO_RUNS, Placement, Record, Role, RoundAck, Text, Zero, caps,
};

/// Pages per batch sent from a copy (a migration's final round), and of the copy buffer: 8 MiB of
/// 4 KiB pages, a TCP batch's default.
const COPY_BATCH_PAGES: usize = 2048;
/// Pages per batch of a placing transport.
const PLACED_BATCH_PAGES: u64 = 8192;
const _: () = assert!(PLACED_BATCH_PAGES <= MAX_BATCH_PAGES as u64);
/// Stack of a round's data-stream threads. They are the migrating process's threads: their stacks
/// (which glibc caches for the next round's threads) are captured with it, and the 2 MiB default was
/// 4 MiB of every final round.
const STREAM_STACK: usize = 256 << 10;

/// How a [`TcpSender`] uses the link.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Data connections besides the control connection; 0 sends pages on the control connection.
    pub streams: u16,
    /// Pages per batch (one `sendmsg` series and one checksum vector each).
    pub batch_pages: u32,
    /// How long to wait for the receiver before giving up.
    pub timeout: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            streams: 2,
            batch_pages: 2048,
            timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connected,
    Open,
    Sealed,
    /// A migration's commit is acknowledged: the receiver holds the prepared copy.
    Prepared,
    Done,
}

/// Sends an image to an omd over TCP.
#[derive(Debug)]
pub struct TcpSender {
    control: Conn,
    data: Vec<Conn>,
    addr: SocketAddr,
    key: ClusterKey,
    session: u64,
    granted: u16,
    page_size: u64,
    config: SenderConfig,
    state: State,
    round: u32,
    /// Suspect pages of the last acknowledged round, with that round's number.
    suspects: (u32, Vec<Range<u64>>),
    /// The image is a migration (its commit prepares a copy that only `go` starts).
    migrate: bool,
    /// Rounds go over the control connection on the calling thread.
    serial: bool,
    /// Where batches sent from a copy are copied (made by `begin`, populated, and one of the
    /// sender's mappings, which a capture leaves out).
    bounce: Option<CopyBuffer>,
    /// Where racy pages are read for their checksums on this thread. Made at `begin`: a migration
    /// takes its first memory map before, and leaves the sender's own mappings out of every later
    /// one from then on.
    reader: Option<ReadBuffer>,
    /// A placing transport for the pages (SCI), with the receiver's current placement.
    placer: Option<(Box<dyn Placer>, Option<Placement>)>,
    /// The commit's token: names the migration's copy on the receiver (`Ask`).
    token: u64,
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, TransportError> {
    let s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| TransportError::Connect { addr, source })?;
    let c = Conn::new(s);
    c.set_read_timeout(Some(timeout))?;
    Ok(c)
}

impl TcpSender {
    /// Connects and authenticates the control connection. No page moves until [`PageSender::begin`].
    ///
    /// # Errors
    /// Connection failure, refusal, a receiver that does not hold the key.
    pub fn connect(addr: SocketAddr, key: &ClusterKey, config: SenderConfig) -> Result<Self, TransportError> {
        Self::connect_with(addr, key, config, None)
    }

    /// Like [`TcpSender::connect`], with pages going through `placer` (straight into the receiver's
    /// exported image memory) instead of the TCP data streams. The receiver must grant the placer's
    /// capability.
    ///
    /// # Errors
    /// As [`TcpSender::connect`]; a receiver that does not offer the placer's transport.
    pub fn connect_placed(
        addr: SocketAddr,
        key: &ClusterKey,
        config: SenderConfig,
        placer: Box<dyn Placer>,
    ) -> Result<Self, TransportError> {
        Self::connect_with(addr, key, config, Some(placer))
    }

    fn connect_with(
        addr: SocketAddr,
        key: &ClusterKey,
        config: SenderConfig,
        placer: Option<Box<dyn Placer>>,
    ) -> Result<Self, TransportError> {
        let page_size = u32::try_from(sys::page_size()).map_err(|_| TransportError::Misuse("page size"))?;
        let mut control = connect(addr, config.timeout)?;
        let hello = Hello {
            versions: wire::VERSION..wire::VERSION + 1,
            role: Role::Control,
            streams: if placer.is_some() { 0 } else { config.streams },
            caps: caps::REQUIRED | placer.as_ref().map_or(0, |p| p.cap()),
            page_size,
            session: 0,
            nonce: auth::random_bytes(),
        };
        let welcome = auth::client(&mut control, key, &hello)?;
        if welcome.caps & caps::REQUIRED != caps::REQUIRED || welcome.page_size != page_size {
            control.send_error(ErrorCode::Capability, "capabilities do not match");
            return Err(TransportError::Refused {
                peer: control.peer().to_owned(),
                code: ErrorCode::Capability,
                reason: "the receiver lacks a required capability or page size".into(),
            });
        }
        if let Some(p) = &placer
            && welcome.caps & p.cap() == 0
        {
            control.send_error(ErrorCode::Capability, "the placing transport is not granted");
            return Err(TransportError::Refused {
                peer: control.peer().to_owned(),
                code: ErrorCode::Capability,
                reason: format!(
                    "the receiver does not offer the {} transport (its omd has no fabric library, \
                     or it cannot export image memory)",
                    caps::name(p.cap())
                ),
            });
        }
        let mut placer = placer;
        if let Some(p) = &mut placer {
            p.watch(control.raw_fd());
        }
        Ok(Self {
            control,
            data: Vec::new(),
            addr,
            key: key.clone(),
            session: welcome.session,
            granted: welcome.streams.min(config.streams),
            page_size: u64::from(page_size),
            config,
            state: State::Connected,
            round: 0,
            suspects: (0, Vec::new()),
            migrate: false,
            serial: false,
            bounce: None,
            reader: None,
            placer: placer.map(|p| (p, None)),
            token: u64::from_le_bytes(auth::random_bytes()),
        })
    }

    /// The token the commit names this image's copy by, for [`TcpSender::ask`].
    #[must_use]
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Asks the receiver at `addr`, on a connection of its own, what became of the migration copy
    /// committed with `token`, after a `Go` whose `Running` did not arrive. The receiver starts the
    /// copy if it is still prepared (the source passed its point of no return with the go).
    ///
    /// # Errors
    /// Connection, authentication or protocol errors: the fate is still unknown.
    pub fn ask(
        addr: SocketAddr,
        key: &ClusterKey,
        config: SenderConfig,
        token: u64,
    ) -> Result<Fate, TransportError> {
        let mut s = Self::connect(addr, key, config)?;
        // Nothing to abort on this connection, whatever happens.
        s.state = State::Done;
        s.control.send(Kind::Ask, &token.to_le_bytes())?;
        let body = s.control.expect(Kind::Answer, "after ask")?;
        Fate::decode(&body).map_err(|e| s.control.wire(e))
    }

    /// Memory of this process the placing transport mapped (never part of an image).
    #[must_use]
    pub fn mappings(&self) -> Vec<Range<u64>> {
        self.reader
            .iter()
            .map(ReadBuffer::mapping)
            .chain(self.bounce.iter().map(CopyBuffer::mapping))
            .chain(self.placer.iter().flat_map(|(p, _)| p.mappings()))
            .collect()
    }

    /// Takes the receiver's (new) placement after `Begun` or `Vmas`.
    fn take_placement(&mut self) -> Result<(), TransportError> {
        let Some((placer, current)) = &mut self.placer else {
            return Ok(());
        };
        let body = self.control.expect(Kind::Placement, "after the VMA table")?;
        let placement = Placement::decode(&body, self.page_size).map_err(|e| self.control.wire(e))?;
        placer.attach(&placement, self.control.local_ip())?;
        *current = Some(placement);
        // A fabric that connects both ways: the receiver connects to us before any page moves.
        if let Some(endpoint) = placer.endpoint() {
            self.control.send(Kind::Connect, &endpoint)?;
            self.control.expect(Kind::Connected, "after Connect")?;
        }
        Ok(())
    }

    /// Places the batches through the placing transport: on two threads when the placer can fork a
    /// second writer and the round may start threads, else one after the other on this one. Returns
    /// how many writers placed them.
    fn place_batches(&mut self, batches: &[ReadableBatch<'_>]) -> Result<usize, TransportError> {
        let Some((placer, Some(placement))) = &mut self.placer else {
            return Err(TransportError::Misuse("placing before the receiver's placement"));
        };
        let at = Placing {
            placement,
            round: self.round,
            page_size: self.page_size,
            peer: self.control.peer(),
        };
        let parallel = !self.serial && batches.len() > 1 && batches.iter().all(|b| !b.is_copied());
        // Forking starts fabric objects: never in the final round (a signal handler, every other
        // thread stopped).
        if parallel && let Some(mut lane) = placer.fork() {
            let next = AtomicUsize::new(0);
            let failed = std::sync::atomic::AtomicBool::new(false);
            let work = |p: &mut dyn Placer, reader: &mut Option<ReadBuffer>| -> Result<(), TransportError> {
                let mut bounce = None;
                while !failed.load(Ordering::Relaxed)
                    && let Some(b) = batches.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    if let Err(e) = at.place_one(p, b, &mut bounce, reader) {
                        // The other writer stops too.
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(())
            };
            let (a, b) = std::thread::scope(|s| {
                let other = s.spawn(|| work(lane.as_mut(), &mut None));
                let mine = work(placer.as_mut(), &mut self.reader);
                (
                    mine,
                    other
                        .join()
                        .unwrap_or(Err(TransportError::Misuse("placing thread panicked"))),
                )
            });
            return a.and(b).map(|()| 2);
        }
        for batch in batches {
            at.place_one(placer.as_mut(), batch, &mut self.bounce, &mut self.reader)?;
        }
        Ok(1)
    }

    /// The descriptors of its connections and of its placer's fabric (never part of an image).
    #[must_use]
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        std::iter::once(&self.control)
            .chain(self.data.iter())
            .map(Conn::raw_fd)
            .chain(self.reader.iter().map(ReadBuffer::fd))
            .chain(self.placer.iter().flat_map(|(p, _)| p.fds()))
            .collect()
    }

    /// The local address of the control connection (the address the receiver reaches this node by).
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.control.local_addr()
    }

    /// Data streams in use.
    #[must_use]
    pub fn streams(&self) -> usize {
        self.data.len()
    }

    /// Sends the following rounds on the calling thread over the control connection only (`true`),
    /// or over the data streams in parallel (`false`, the default). A round sent from inside a signal
    /// handler while the application is stopped must not start threads.
    pub fn set_serial(&mut self, serial: bool) {
        self.serial = serial;
    }

    fn open_data_streams(&mut self) -> Result<(), TransportError> {
        for i in 0..self.granted {
            let mut c = connect(self.addr, self.config.timeout)?;
            let hello = Hello {
                versions: wire::VERSION..wire::VERSION + 1,
                role: Role::Data,
                streams: i,
                caps: caps::SUPPORTED,
                page_size: u32::try_from(self.page_size).unwrap_or(4096),
                session: self.session,
                nonce: auth::random_bytes(),
            };
            auth::client(&mut c, &self.key, &hello)?;
            self.data.push(c);
        }
        Ok(())
    }

    /// Fails the session on both ends with `err` and returns it.
    fn fail(&mut self, err: TransportError) -> TransportError {
        if self.state != State::Done {
            self.control.send_error(err.code(), &crate::error::chain(&err));
            for d in &self.data {
                d.shutdown();
            }
            self.state = State::Done;
        }
        err
    }

    /// A data stream failed while sending: the receiver usually said why on the control connection.
    fn reason_from_peer(&mut self, err: TransportError) -> TransportError {
        let _ = self.control.set_read_timeout(Some(Duration::from_secs(2)));
        match self.control.recv() {
            Err(e @ (TransportError::Refused { .. } | TransportError::Aborted { .. })) => e,
            _ => err,
        }
    }

    fn send_zero(&mut self, zeroed: &[Range<u64>]) -> Result<(), TransportError> {
        for chunk in zeroed.chunks(MAX_ZERO_RUNS) {
            let body = Zero::encode(self.round, chunk, self.page_size);
            self.control.send(Kind::Zero, &body)?;
        }
        Ok(())
    }

    /// Sends the batches over the data streams (or the control stream), in parallel; returns over how
    /// many connections at once.
    fn send_batches(&mut self, batches: &[ReadableBatch<'_>]) -> Result<usize, TransportError> {
        if self.placer.is_some() {
            return self.place_batches(batches);
        }
        let round = self.round;
        let page_size = self.page_size;
        let next = AtomicUsize::new(0);
        let work = |conn: &mut Conn,
                    bounce: &mut Option<CopyBuffer>,
                    reader: &mut Option<ReadBuffer>|
         -> Result<(), TransportError> {
            while let Some(batch) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                send_batch(conn, round, batch, page_size, bounce, reader)?;
            }
            Ok(())
        };
        // Batches sent from a copy go through the one copy buffer.
        if self.data.is_empty() || self.serial || batches.iter().any(ReadableBatch::is_copied) {
            return work(&mut self.control, &mut self.bounce, &mut self.reader).map(|()| 1);
        }
        let lanes = self.data.len().min(batches.len()).max(1);
        let results: Vec<Result<(), TransportError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .data
                .iter_mut()
                .map(|c| {
                    std::thread::Builder::new()
                        .stack_size(STREAM_STACK)
                        .spawn_scoped(s, || work(c, &mut None, &mut None))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or(Err(TransportError::Misuse("stream thread panicked"))),
                    Err(_) => Err(TransportError::Misuse("cannot start a stream thread")),
                })
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>().map(|()| lanes)
    }
}

fn read_error(peer: &str, source: std::io::Error) -> TransportError {
    TransportError::Io {
        op: "read the pages to send",
        peer: peer.to_owned(),
        source,
    }
}

/// Copies a batch sent from a copy into `bounce`; returns the copy and one checksum per page of it.
fn copy_and_sum<'b>(
    batch: &ReadableBatch<'_>,
    bounce: &'b mut Option<CopyBuffer>,
    page_size: usize,
    peer: &str,
) -> Result<(&'b [u8], Vec<u32>), TransportError> {
    let len = batch
        .runs()
        .iter()
        .map(|r| usize::try_from(r.end - r.start).unwrap_or(usize::MAX))
        .fold(0usize, usize::saturating_add);
    let buf = bounce
        .as_mut()
        .and_then(|b| b.bytes_mut(len))
        .ok_or(TransportError::Misuse(
            "a batch sent from a copy is larger than the copy buffer (or there is none)",
        ))?;
    batch.copy_into(buf).map_err(|source| TransportError::Io {
        op: "read the pages to send",
        peer: peer.to_owned(),
        source,
    })?;
    let sums = buf.chunks(page_size).map(crate::sys::page_sum_bytes).collect();
    Ok((buf, sums))
}

/// What placing one batch needs to know.
struct Placing<'a> {
    placement: &'a Placement,
    round: u32,
    page_size: u64,
    peer: &'a str,
}

impl Placing<'_> {
    /// Places one batch's pages and posts its descriptor.
    fn place_one(
        &self,
        placer: &mut dyn Placer,
        batch: &ReadableBatch<'_>,
        bounce: &mut Option<CopyBuffer>,
        reader: &mut Option<ReadBuffer>,
    ) -> Result<(), TransportError> {
        let ps = usize::try_from(self.page_size).unwrap_or(4096);
        let pages: usize = batch
            .runs()
            .iter()
            .map(|r| usize::try_from((r.end - r.start) / self.page_size).unwrap_or(0))
            .sum();
        // Racy memory (a running application's) is read once: the placer checksums what it writes.
        // Otherwise the sums come first, from the copy or from the stable memory.
        let fused = batch.is_racy() && !batch.is_copied() && placer.reads_once();
        let (copied, mut sums) = if batch.is_copied() {
            let (bytes, sums) = copy_and_sum(batch, bounce, ps, self.peer)?;
            (Some(bytes), sums)
        } else if fused {
            (None, Vec::with_capacity(pages))
        } else {
            let sums = batch
                .page_sums(ps, reader)
                .map_err(|e| read_error(self.peer, e))?;
            (None, sums)
        };
        let mut at = 0usize;
        for run in batch.runs() {
            let pieces = self.placement.pieces(run).ok_or_else(|| TransportError::Wire {
                peer: self.peer.to_owned(),
                source: wire::WireError::Invalid(format!(
                    "the receiver's placement has no place for {:#x}-{:#x}",
                    run.start, run.end
                )),
            })?;
            let mut addr = run.start;
            for (window, offset, len) in pieces {
                let n = usize::try_from(len).unwrap_or(usize::MAX);
                if fused {
                    placer.write_summed(batch, addr, len, window, offset, &mut sums)?;
                } else {
                    let src = match copied {
                        Some(bytes) => Source::Bytes(&bytes[at..at + n]),
                        None => Source::Memory { batch, addr, len },
                    };
                    placer.write(src, window, offset)?;
                }
                addr += len;
                at += n;
            }
        }
        placer.post(&Batch::encode(self.round, batch.runs(), &sums, self.page_size))
    }
}

/// Sends one batch: checksums first (read from the live memory), then the frame and the pages. A
/// batch sent from a copy is copied into `bounce` first.
fn send_batch(
    conn: &mut Conn,
    round: u32,
    batch: &ReadableBatch<'_>,
    page_size: u64,
    bounce: &mut Option<CopyBuffer>,
    reader: &mut Option<ReadBuffer>,
) -> Result<(), TransportError> {
    let ps = usize::try_from(page_size).unwrap_or(4096);
    if batch.is_copied() {
        let (bytes, sums) = copy_and_sum(batch, bounce, ps, conn.peer())?;
        let body = Batch::encode(round, batch.runs(), &sums, page_size);
        return conn.send_with_bytes(Kind::Batch, &body, bytes);
    }
    let sums = batch
        .page_sums(ps, reader)
        .map_err(|e| read_error(conn.peer(), e))?;
    let body = Batch::encode(round, batch.runs(), &sums, page_size);
    conn.send_with_pages(Kind::Batch, &body, Some(batch))
}

impl PageSender for TcpSender {
    fn begin(&mut self, begin: &Begin) -> Result<u64, TransportError> {
        if self.state != State::Connected {
            return Err(TransportError::Misuse("begin called twice"));
        }
        let body = begin.encode().map_err(|source| self.control.wire(source))?;
        let page_size = usize::try_from(self.page_size).unwrap_or(4096);
        self.reader = Some(
            ReadBuffer::for_pages(page_size).map_err(|source| TransportError::Io {
                op: "make a read buffer",
                peer: self.control.peer().to_owned(),
                source,
            })?,
        );
        self.bounce =
            Some(
                CopyBuffer::new(COPY_BATCH_PAGES * page_size).map_err(|source| TransportError::Io {
                    op: "make a copy buffer",
                    peer: self.control.peer().to_owned(),
                    source,
                })?,
            );
        self.migrate = begin.info.flags & wire::ImageInfo::MIGRATE != 0;
        self.control.send(Kind::Begin, &body)?;
        let id = self
            .control
            .expect(Kind::Begun, "after begin")
            .and_then(|b| wire::msg::decode_u64(&b, "begun").map_err(|e| self.control.wire(e)))?;
        if let Err(e) = self.open_data_streams().and_then(|()| self.take_placement()) {
            return Err(self.fail(e));
        }
        self.state = State::Open;
        Ok(id)
    }

    fn send_round(
        &mut self,
        pages: Readable<'_>,
        zeroed: &[Range<u64>],
        last: bool,
    ) -> Result<RoundStats, TransportError> {
        if self.state != State::Open {
            return Err(TransportError::Misuse("send_round outside an open image"));
        }
        // Pages that failed their checksum must be sent again before the image is sealed: in this
        // round, or (not the last) a later one.
        let (sus_round, suspects) = &self.suspects;
        let carried = batch::uncovered(suspects, pages.runs());
        if last && !carried.is_empty() {
            let pages_bad = carried.iter().map(|r| (r.end - r.start) / self.page_size).sum();
            let e = TransportError::Corrupted {
                round: *sus_round,
                first: carried[0].start,
                pages: pages_bad,
            };
            return Err(self.fail(e));
        }
        let started = Instant::now();
        let max_pages = if self.placer.is_some() {
            // A placed batch costs the receiver one pass of bookkeeping and checking; on the
            // emulated fabric 32 MiB batches placed 1 GiB about a third faster than 8 MiB ones
            // (docs/sci.md).
            PLACED_BATCH_PAGES
        } else {
            u64::from(self.config.batch_pages).clamp(1, MAX_BATCH_PAGES as u64)
        };
        // A batch sent from a copy must fit the copy buffer.
        let max_pages = if pages.is_copied() {
            max_pages.min(COPY_BATCH_PAGES as u64)
        } else {
            max_pages
        };
        let batches = pages.batches(self.page_size, max_pages, MAX_BATCH_RUNS);
        let sent = self
            .send_zero(zeroed)
            .and_then(|()| self.send_batches(&batches))
            .and_then(|lanes| {
                self.placer
                    .as_mut()
                    .map_or(Ok(()), |(p, _)| p.round_done())
                    .map(|()| lanes)
            });
        let lanes = match sent {
            Ok(lanes) => lanes,
            Err(e) => {
                let e = self.reason_from_peer(e);
                return Err(self.fail(e));
            }
        };
        let page_count: u64 = pages
            .runs()
            .iter()
            .map(|r| (r.end - r.start) / self.page_size)
            .sum();
        let end = EndRound {
            round: self.round,
            last,
            batches: u32::try_from(batches.len()).unwrap_or(u32::MAX),
            pages: page_count,
        };
        let acked = self
            .control
            .send(Kind::EndRound, &end.encode())
            .and_then(|()| self.control.expect(Kind::RoundAck, "after end of round"))
            .and_then(|b| RoundAck::decode(&b, self.page_size).map_err(|e| self.control.wire(e)));
        let ack = match acked {
            Ok(a) => a,
            Err(e) => return Err(self.fail(e)),
        };
        if ack.round != self.round || ack.pages != page_count || (last && !ack.suspects.is_empty()) {
            let e = self.control.wire(wire::WireError::Invalid(format!(
                "acknowledgement of round {} does not match round {} ({} pages sent, {} acknowledged)",
                ack.round, self.round, page_count, ack.pages
            )));
            return Err(self.fail(e));
        }
        let outstanding = batch::union(&carried, &ack.suspects);
        let stats = RoundStats {
            round: self.round,
            pages: page_count,
            bytes: page_count * self.page_size,
            zero_runs: zeroed.len() as u64,
            batches: end.batches,
            elapsed: started.elapsed(),
            lanes,
            suspects: outstanding.clone(),
            image_bytes: ack.image_bytes,
        };
        self.suspects = (self.round, outstanding);
        self.round += 1;
        if last {
            self.state = State::Sealed;
        }
        Ok(stats)
    }

    fn update_vmas(&mut self, begin: &Begin) -> Result<(), TransportError> {
        if self.state != State::Open {
            return Err(TransportError::Misuse("a new VMA table outside an open image"));
        }
        let body = begin.encode().map_err(|source| self.control.wire(source))?;
        // The receiver drops pages outside the new table: their suspects are gone with them.
        let table: Vec<Range<u64>> = begin.vmas.iter().map(|v| v.start..v.end).collect();
        let table = batch::union(&table, &[]);
        let gone = batch::uncovered(&self.suspects.1, &table);
        self.suspects.1 = batch::uncovered(&self.suspects.1, &gone);
        match self
            .control
            .send(Kind::Vmas, &body)
            .and_then(|()| {
                self.control
                    .expect(Kind::Relaid, "after a new VMA table")
                    .map(drop)
            })
            .and_then(|()| self.take_placement())
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn send_record(&mut self, kind: u32, bytes: &[u8]) -> Result<(), TransportError> {
        if !matches!(self.state, State::Open | State::Sealed) {
            return Err(TransportError::Misuse("record outside an open image"));
        }
        let body = Record::encode(kind, bytes);
        if body.len() > Kind::Record.max_body() {
            return Err(TransportError::Misuse("record over the size cap"));
        }
        self.control.send(Kind::Record, &body)
    }

    fn commit(&mut self) -> Result<u64, TransportError> {
        if self.state != State::Sealed {
            return Err(TransportError::Misuse("commit before the final round"));
        }
        let r = self
            .control
            .send(Kind::Commit, &self.token.to_le_bytes())
            .and_then(|()| self.control.expect(Kind::Committed, "after commit"))
            .and_then(|b| wire::msg::decode_u64(&b, "committed").map_err(|e| self.control.wire(e)));
        match r {
            Ok(id) => {
                self.state = if self.migrate {
                    State::Prepared
                } else {
                    State::Done
                };
                for d in self.data.drain(..) {
                    d.shutdown();
                }
                Ok(id)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn go(&mut self) -> Result<u32, TransportError> {
        if self.state != State::Prepared {
            return Err(TransportError::Misuse("go before a migration's commit"));
        }
        // Past this frame the copy may run: the connection is never failed or aborted from here.
        self.state = State::Done;
        let pid = self
            .control
            .send(Kind::Go, &[])
            .and_then(|()| self.control.expect(Kind::Running, "after go"))
            .and_then(|b| wire::msg::decode_u64(&b, "running").map_err(|e| self.control.wire(e)))?;
        u32::try_from(pid).map_err(|_| {
            self.control.wire(wire::WireError::Invalid(format!(
                "running pid {pid} out of range"
            )))
        })
    }

    fn abort(&mut self, reason: &str) {
        if self.state != State::Done {
            let _ = self
                .control
                .send(Kind::Abort, &Text::encode(ErrorCode::Aborted as u32, reason));
            self.control.shutdown();
            for d in &self.data {
                d.shutdown();
            }
            self.state = State::Done;
        }
    }
}

impl Drop for TcpSender {
    fn drop(&mut self) {
        self.abort("sender dropped before commit");
    }
}
