//! TCP backend: blocking `std::net`, one connection per pair of ranks.
//!
//! # Set-up
//! Rank `r` listens on `addrs[r]`, connects to every lower rank (retrying until the connect timeout,
//! since ranks start in any order) and accepts a connection from every higher rank. Each new
//! connection starts with a hello both ways (magic, rank, world size), so a misconfigured group
//! fails at set-up instead of exchanging garbage. Sockets use `TCP_NODELAY` (collectives are
//! request/response; Nagle would add delay to every small message) and read/write timeouts, so a
//! peer that dies or hangs surfaces as an error instead of a hang.
//!
//! # Messages
//! Every message carries a 24-byte header: the collective, a per-communicator sequence number, the
//! payload length and a collective-specific word (element count, root). Ranks that disagree on
//! which collective comes next, or on a buffer length, get [`CollectiveError::Protocol`].
//!
//! # All-reduce algorithms, chosen by size
//! - Small buffers (up to [`DEFAULT_RING_THRESHOLD_BYTES`]): gather to rank 0, which sums in rank
//!   order, then rank 0 sends the sum back. Two network hops whatever the world size, no helper
//!   threads, and deadlock-free for any size because no two ranks ever write to each other at once.
//!   Decode steps all-reduce a few KB per layer, so latency is what counts here.
//! - Large buffers: ring all-reduce (reduce-scatter, then all-gather, over `world_size` chunks).
//!   Each rank sends and receives `2 (n-1)/n` of the buffer instead of rank 0 moving `2 (n-1)`
//!   buffers, so bandwidth scales; it costs `2 (n-1)` hops and a helper thread per step (each step
//!   sends to the right neighbour while receiving from the left; doing both on one thread would
//!   deadlock once a chunk exceeds the socket buffers).
//!
//! Both orders are fixed: the star path sums `((x0 + x1) + x2) + ...` on rank 0; the ring sums
//! each chunk once along the ring and then copies it. Every rank therefore gets bit-identical
//! results, and reruns give the same bits. All ranks must use the same ring threshold.
//!
//! # Failures
//! A collective that fails part-way leaves the streams in an unknown state, so the communicator
//! shuts all its connections down and reports [`CollectiveError::Broken`] from then on. Shutting
//! down makes the other ranks fail at once (they see the connection close) instead of each waiting
//! for its own timeout. One exception keeps idle followers alive: a non-root rank whose
//! `broadcast` times out before any byte of it arrived returns [`CollectiveError::Timeout`] and
//! stays usable, so a follower can wait for the leader's next step in a loop.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::{CollectiveError, Communicator};

// The wire format is the hosts' native f32 layout (zero-copy); every supported host is
// little-endian, and refusing to build elsewhere keeps mixed-endian groups impossible.
#[cfg(target_endian = "big")]
compile_error!("tandem-collective's TCP wire format assumes little-endian hosts");

/// Default read/write timeout of the sockets once the group is connected.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed for the whole rendezvous (connect and accept) in [`TcpOptions`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// All-reduces of buffers larger than this use the ring; smaller ones the gather/broadcast star.
/// Around 64 KiB the two cost about the same on 2-4 ranks over a LAN (the ring's extra hops
/// against rank 0 moving `2 (n-1)` buffers); below it the star's two hops win.
pub const DEFAULT_RING_THRESHOLD_BYTES: usize = 64 * 1024;

const MAGIC: [u8; 8] = *b"TNDMCOL1";
const HELLO_LEN: usize = 16;
const HEADER_LEN: usize = 24;
/// Payloads up to this size go out in one write together with their header (one segment).
const COALESCE_BYTES: usize = 64 * 1024;
/// Pause between connection attempts to a rank that is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// Poll interval of the (non-blocking) accept loop.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// Tuning of a [`TcpCommunicator`].
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Time allowed for the whole rendezvous: every connect (with retries) and accept.
    pub connect_timeout: Duration,
    /// Read/write timeout of every socket afterwards; `None` blocks forever (not recommended:
    /// a hung peer then hangs the group).
    pub io_timeout: Option<Duration>,
    /// All-reduces above this many bytes use the ring algorithm. Must match on every rank.
    pub ring_threshold_bytes: usize,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            ring_threshold_bytes: DEFAULT_RING_THRESHOLD_BYTES,
        }
    }
}

/// Binds `world_size` listeners on 127.0.0.1 with OS-chosen ports: the addresses to hand to every
/// rank, and the listeners to hand to [`TcpCommunicator::with_listener`] (binding first avoids
/// port races in tests and single-host groups).
pub fn bind_local(world_size: usize) -> io::Result<(Vec<TcpListener>, Vec<SocketAddr>)> {
    let listeners = (0..world_size)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<io::Result<Vec<_>>>()?;
    Ok((listeners, addrs))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduceStar = 1,
    AllReduceRing = 2,
    Broadcast = 3,
    Barrier = 4,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduceStar | Op::AllReduceRing => "all_reduce",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }

    fn describe(code: u32) -> String {
        match code {
            1 => "all_reduce (star)".into(),
            2 => "all_reduce (ring)".into(),
            3 => "broadcast".into(),
            4 => "barrier".into(),
            other => format!("unknown message {other}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    op: u32,
    seq: u32,
    /// Payload bytes that follow.
    len: u64,
    /// All-reduce: total element count; broadcast: root rank; barrier: 0.
    extra: u64,
}

impl Header {
    fn new(op: Op, seq: u32, len: usize, extra: usize) -> Self {
        Self {
            op: op as u32,
            seq,
            len: len as u64,
            extra: extra as u64,
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.extra.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            op: u32_at(0),
            seq: u32_at(4),
            len: u64_at(8),
            extra: u64_at(16),
        }
    }
}

fn hello(rank: usize, world_size: usize) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    b[12..16].copy_from_slice(&(world_size as u32).to_le_bytes());
    b
}

/// (rank, world size) from a hello, or `None` when the magic is wrong.
fn parse_hello(b: &[u8; HELLO_LEN]) -> Option<(usize, usize)> {
    if b[0..8] != MAGIC {
        return None;
    }
    let rank = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
    let world = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
    Some((rank, world))
}

/// One connected peer.
#[derive(Debug)]
struct Peer {
    rank: usize,
    addr: SocketAddr,
    stream: TcpStream,
    timeout: Option<Duration>,
}

impl Peer {
    fn error(&self, op: &'static str, e: io::Error) -> CollectiveError {
        match e.kind() {
            // Unix reports an expired SO_RCVTIMEO/SO_SNDTIMEO as EAGAIN, Windows as TimedOut.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
                peer: self.rank,
                addr: self.addr,
                op,
                timeout: self.timeout.unwrap_or_default(),
            },
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected => CollectiveError::Closed {
                peer: self.rank,
                addr: self.addr,
            },
            _ => CollectiveError::Io {
                peer: self.rank,
                addr: self.addr,
                op,
                error: e,
            },
        }
    }

    fn write_all(&self, bytes: &[u8], op: Op) -> Result<(), CollectiveError> {
        (&self.stream)
            .write_all(bytes)
            .map_err(|e| self.error(op.name(), e))
    }

    fn read_exact(&self, buf: &mut [u8], op: Op) -> Result<(), CollectiveError> {
        (&self.stream)
            .read_exact(buf)
            .map_err(|e| self.error(op.name(), e))
    }

    fn send(&self, header: Header, payload: &[u8], op: Op) -> Result<(), CollectiveError> {
        if payload.len() <= COALESCE_BYTES {
            let mut msg = Vec::with_capacity(HEADER_LEN + payload.len());
            msg.extend_from_slice(&header.encode());
            msg.extend_from_slice(payload);
            self.write_all(&msg, op)
        } else {
            self.write_all(&header.encode(), op)?;
            self.write_all(payload, op)
        }
    }

    fn recv_header(&self, op: Op) -> Result<Header, CollectiveError> {
        let mut b = [0u8; HEADER_LEN];
        self.read_exact(&mut b, op)?;
        Ok(Header::decode(&b))
    }

    /// Like [`Peer::recv_header`], but a timeout before the first byte is not fatal: nothing of
    /// the message was consumed, so the stream is still in sync and the call can be retried.
    fn recv_header_or_idle(&self, op: Op) -> Result<Header, OpFailure> {
        let mut b = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match (&self.stream).read(&mut b[got..]) {
                Ok(0) => {
                    return Err(OpFailure::fatal(CollectiveError::Closed {
                        peer: self.rank,
                        addr: self.addr,
                    }))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let error = self.error(op.name(), e);
                    let fatal = got > 0 || !error.is_timeout();
                    return Err(OpFailure { error, fatal });
                }
            }
        }
        Ok(Header::decode(&b))
    }

    /// Checks that `got` is the message this rank expects next.
    fn check(&self, got: Header, op: Op, seq: u32, extra: usize) -> Result<(), CollectiveError> {
        let protocol = |reason: String| CollectiveError::Protocol {
            peer: self.rank,
            addr: self.addr,
            reason,
        };
        if got.op != op as u32 || got.seq != seq {
            return Err(protocol(format!(
                "expected {} #{seq}, got {} #{}",
                Op::describe(op as u32),
                Op::describe(got.op),
                got.seq
            )));
        }
        if got.extra != extra as u64 {
            let what = match op {
                Op::Broadcast => "broadcast root",
                _ => "buffer length (elements)",
            };
            return Err(protocol(format!(
                "{what} differs: {extra} here, {} there",
                got.extra
            )));
        }
        Ok(())
    }

    /// Receives a header that must match and announce exactly `len` payload bytes.
    fn expect(&self, op: Op, seq: u32, extra: usize, len: usize) -> Result<(), CollectiveError> {
        let h = self.recv_header(op)?;
        self.check(h, op, seq, extra)?;
        if h.len != len as u64 {
            return Err(CollectiveError::Protocol {
                peer: self.rank,
                addr: self.addr,
                reason: format!("expected a {len}-byte payload, got {}", h.len),
            });
        }
        Ok(())
    }
}

/// A failed collective; `fatal` failures break the communicator.
struct OpFailure {
    error: CollectiveError,
    fatal: bool,
}

impl OpFailure {
    fn fatal(error: CollectiveError) -> Self {
        Self { error, fatal: true }
    }
}

impl From<CollectiveError> for OpFailure {
    fn from(error: CollectiveError) -> Self {
        Self::fatal(error)
    }
}

#[derive(Debug)]
struct Inner {
    /// Indexed by rank; `None` at this rank's own index.
    peers: Vec<Option<Peer>>,
    /// Sequence number of the next collective; identical on every rank of a healthy group.
    seq: u32,
    /// Why the communicator stopped working, once it has.
    broken: Option<String>,
    /// Receive buffer for partial sums, kept between calls.
    scratch: Vec<f32>,
}

fn peer_of(peers: &[Option<Peer>], rank: usize) -> Result<&Peer, CollectiveError> {
    peers
        .get(rank)
        .and_then(Option::as_ref)
        .ok_or_else(|| CollectiveError::Internal(format!("no connection to rank {rank}")))
}

impl Inner {
    fn peer(&self, rank: usize) -> Result<&Peer, CollectiveError> {
        peer_of(&self.peers, rank)
    }

    fn shutdown_all(&self) {
        for p in self.peers.iter().flatten() {
            // Already closed by the peer is fine: all we want is for them to see a close.
            let _ = p.stream.shutdown(Shutdown::Both);
        }
    }
}

/// [`Communicator`] over TCP; see the [module docs](self) for the protocol and its guarantees.
///
/// A follower waiting for the leader's next step should call `broadcast` in a loop that retries
/// on [`CollectiveError::Timeout`] while [`TcpCommunicator::is_broken`] is false, or the leader
/// should broadcast at least once per I/O timeout (a heartbeat also tells followers that the leader
/// is alive).
#[derive(Debug)]
pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    addrs: Vec<SocketAddr>,
    ring_threshold_bytes: AtomicUsize,
    inner: Mutex<Inner>,
}

impl TcpCommunicator {
    /// Listens on `addrs[rank]` and connects to every other rank of the group, waiting up to
    /// `timeout` for all of them (ranks start in any order). I/O timeout and ring threshold are
    /// the defaults of [`TcpOptions`].
    pub fn connect(
        rank: usize,
        world_size: usize,
        addrs: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let options = TcpOptions {
            connect_timeout: timeout,
            ..TcpOptions::default()
        };
        Self::connect_with(rank, world_size, addrs, &options)
    }

    /// [`TcpCommunicator::connect`] with every option.
    pub fn connect_with(
        rank: usize,
        world_size: usize,
        addrs: &[SocketAddr],
        options: &TcpOptions,
    ) -> Result<Self, CollectiveError> {
        validate(rank, world_size, addrs, options)?;
        let listener = TcpListener::bind(addrs[rank]).map_err(|error| CollectiveError::Bind {
            rank,
            addr: addrs[rank],
            error,
        })?;
        Self::with_listener(rank, world_size, listener, addrs, options)
    }

    /// Like [`TcpCommunicator::connect_with`], on a listener the caller already bound (for
    /// example with [`bind_local`]); other ranks must reach it at `addrs[rank]`.
    pub fn with_listener(
        rank: usize,
        world_size: usize,
        listener: TcpListener,
        addrs: &[SocketAddr],
        options: &TcpOptions,
    ) -> Result<Self, CollectiveError> {
        validate(rank, world_size, addrs, options)?;
        let deadline = Instant::now() + options.connect_timeout;
        let mut peers: Vec<Option<Peer>> = (0..world_size).map(|_| None).collect();

        // Lower ranks first, then accept the higher ones. A rank only waits on lower ranks, which
        // never wait on it, so the rendezvous cannot deadlock whatever the start order.
        for (peer, &addr) in addrs.iter().enumerate().take(rank) {
            let stream = connect_peer(rank, world_size, peer, addr, deadline, options)?;
            peers[peer] = Some(Peer {
                rank: peer,
                addr,
                stream,
                timeout: options.io_timeout,
            });
        }
        accept_peers(
            rank, world_size, &listener, addrs, deadline, options, &mut peers,
        )?;
        drop(listener);

        for p in peers.iter().flatten() {
            configure(&p.stream, options.io_timeout, p.addr)?;
        }
        tracing::debug!(rank, world_size, "tcp communicator connected");
        Ok(Self {
            rank,
            world_size,
            addrs: addrs.to_vec(),
            ring_threshold_bytes: AtomicUsize::new(options.ring_threshold_bytes),
            inner: Mutex::new(Inner {
                peers,
                seq: 0,
                broken: None,
                scratch: Vec::new(),
            }),
        })
    }

    /// A whole group in this process, each rank connected on 127.0.0.1 (ports bound first):
    /// for tests, and for running tensor parallelism across threads of one process.
    pub fn local_group(
        world_size: usize,
        options: &TcpOptions,
    ) -> Result<Vec<Self>, CollectiveError> {
        let (listeners, addrs) = bind_local(world_size).map_err(|error| CollectiveError::Bind {
            rank: 0,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            error,
        })?;
        thread::scope(|s| {
            let mut handles = Vec::with_capacity(world_size);
            for (rank, listener) in listeners.into_iter().enumerate() {
                let addrs = &addrs;
                let handle = thread::Builder::new()
                    .name(format!("collective-rank-{rank}"))
                    .spawn_scoped(s, move || {
                        Self::with_listener(rank, world_size, listener, addrs, options)
                    })
                    .map_err(|e| CollectiveError::Internal(format!("spawn: {e}")))?;
                handles.push(handle);
            }
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(CollectiveError::Internal("rank thread panicked".into()))
                    })
                })
                .collect()
        })
    }

    /// Where each rank listens (as given at set-up).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Changes the read/write timeout of every connection (`None`: block forever).
    pub fn set_io_timeout(&self, timeout: Option<Duration>) -> Result<(), CollectiveError> {
        if timeout == Some(Duration::ZERO) {
            return Err(CollectiveError::InvalidArgument(
                "io timeout must be positive (or None)".into(),
            ));
        }
        let mut inner = self.lock();
        for p in inner.peers.iter_mut().flatten() {
            configure(&p.stream, timeout, p.addr)?;
            p.timeout = timeout;
        }
        Ok(())
    }

    /// Changes the size above which all-reduce uses the ring. Every rank must use the same value.
    pub fn set_ring_threshold_bytes(&self, bytes: usize) {
        self.ring_threshold_bytes.store(bytes, Ordering::Relaxed);
    }

    /// True once a collective failed part-way; every later call returns
    /// [`CollectiveError::Broken`].
    pub fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // No code path panics while holding the lock; if one ever did, the `broken` flag and the
        // sequence number are still consistent, so the guard is usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one collective with the communicator locked: refuses when broken, advances the
    /// sequence number on success, and on a fatal failure closes every connection so that the
    /// other ranks fail fast too.
    fn run<T>(
        &self,
        op: Op,
        f: impl FnOnce(&mut Inner, u32) -> Result<T, OpFailure>,
    ) -> Result<T, CollectiveError> {
        let mut inner = self.lock();
        if let Some(why) = &inner.broken {
            return Err(CollectiveError::Broken(why.clone()));
        }
        let seq = inner.seq;
        match f(&mut inner, seq) {
            Ok(v) => {
                inner.seq = seq.wrapping_add(1);
                Ok(v)
            }
            Err(OpFailure { error, fatal }) => {
                if fatal {
                    tracing::warn!(rank = self.rank, op = op.name(), %error, "collective failed; closing the group's connections");
                    inner.broken = Some(format!("{} #{seq} failed: {error}", op.name()));
                    inner.shutdown_all();
                }
                Err(error)
            }
        }
    }

    /// Gather to rank 0, sum there in rank order, send the sum back.
    fn all_reduce_star(
        &self,
        inner: &mut Inner,
        seq: u32,
        buf: &mut [f32],
    ) -> Result<(), OpFailure> {
        let op = Op::AllReduceStar;
        let n = buf.len();
        let bytes = n * 4;
        if self.rank == 0 {
            let Inner { peers, scratch, .. } = inner;
            scratch.resize(n, 0.0);
            for r in 1..self.world_size {
                let p = peer_of(peers, r)?;
                p.expect(op, seq, n, bytes)?;
                p.read_exact(bytemuck::cast_slice_mut(&mut scratch[..n]), op)?;
                add_into(buf, &scratch[..n]);
            }
            let header = Header::new(op, seq, bytes, n);
            for r in 1..self.world_size {
                inner.peer(r)?.send(header, bytemuck::cast_slice(buf), op)?;
            }
        } else {
            let root = inner.peer(0)?;
            root.send(
                Header::new(op, seq, bytes, n),
                bytemuck::cast_slice(buf),
                op,
            )?;
            root.expect(op, seq, n, bytes)?;
            root.read_exact(bytemuck::cast_slice_mut(buf), op)?;
        }
        Ok(())
    }

    /// Ring all-reduce: `world_size - 1` reduce-scatter steps, then as many all-gather steps.
    fn all_reduce_ring(
        &self,
        inner: &mut Inner,
        seq: u32,
        buf: &mut [f32],
    ) -> Result<(), OpFailure> {
        let op = Op::AllReduceRing;
        let (w, r, n) = (self.world_size, self.rank, buf.len());
        let Inner { peers, scratch, .. } = inner;
        let right = peer_of(peers, (r + 1) % w)?;
        let left = peer_of(peers, (r + w - 1) % w)?;
        scratch.resize(n / w + 1, 0.0);

        // Reduce-scatter: at step s, send chunk r-s (ours, or the partial sum just received) and
        // add chunk r-s-1 from the left. Afterwards this rank holds the full sum of chunk r+1.
        for step in 0..w - 1 {
            let send = chunk(n, w, (r + w - step) % w);
            let recv = chunk(n, w, (r + 2 * w - step - 1) % w);
            let incoming = &mut scratch[..recv.len()];
            exchange(
                right,
                &buf[send],
                left,
                bytemuck::cast_slice_mut(incoming),
                op,
                seq,
                n,
            )?;
            add_into(&mut buf[recv], incoming);
        }
        // All-gather: pass the completed chunks around the ring; received chunks are copied in.
        for step in 0..w - 1 {
            let send = chunk(n, w, (r + 1 + w - step) % w);
            let recv = chunk(n, w, (r + w - step) % w);
            let (outgoing, incoming) = disjoint(buf, send, recv);
            exchange(
                right,
                outgoing,
                left,
                bytemuck::cast_slice_mut(incoming),
                op,
                seq,
                n,
            )?;
        }
        Ok(())
    }
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let ring = buf.len() * 4 > self.ring_threshold_bytes.load(Ordering::Relaxed);
        let op = if ring {
            Op::AllReduceRing
        } else {
            Op::AllReduceStar
        };
        self.run(op, |inner, seq| {
            if self.world_size == 1 {
                Ok(())
            } else if ring {
                self.all_reduce_ring(inner, seq, buf)
            } else {
                self.all_reduce_star(inner, seq, buf)
            }
        })
    }

    fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} out of range for world size {}",
                self.world_size
            )));
        }
        let op = Op::Broadcast;
        self.run(op, |inner, seq| {
            if self.rank == root {
                // Straight from the root to each rank: the payloads (step plans, token ids) are
                // small, so a tree or pipeline would only add hops.
                let header = Header::new(op, seq, data.len(), root);
                for p in inner.peers.iter().flatten() {
                    p.send(header, data, op)?;
                }
                return Ok(());
            }
            let p = inner.peer(root)?;
            let header = p.recv_header_or_idle(op)?;
            p.check(header, op, seq, root)?;
            let len = usize::try_from(header.len).map_err(|_| protocol_len(p, header.len))?;
            data.clear();
            data.try_reserve_exact(len)
                .map_err(|_| protocol_len(p, header.len))?;
            data.resize(len, 0);
            p.read_exact(data, op)?;
            Ok(())
        })
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let op = Op::Barrier;
        self.run(op, |inner, seq| {
            if self.world_size == 1 {
                return Ok(());
            }
            let header = Header::new(op, seq, 0, 0);
            if self.rank == 0 {
                for r in 1..self.world_size {
                    inner.peer(r)?.expect(op, seq, 0, 0)?;
                }
                for r in 1..self.world_size {
                    inner.peer(r)?.send(header, &[], op)?;
                }
            } else {
                let root = inner.peer(0)?;
                root.send(header, &[], op)?;
                root.expect(op, seq, 0, 0)?;
            }
            Ok(())
        })
    }
}

fn protocol_len(p: &Peer, len: u64) -> CollectiveError {
    CollectiveError::Protocol {
        peer: p.rank,
        addr: p.addr,
        reason: format!("cannot allocate a {len}-byte broadcast"),
    }
}

/// Element range of chunk `i` when `n` elements are split into `w` near-equal chunks.
fn chunk(n: usize, w: usize, i: usize) -> std::ops::Range<usize> {
    let (base, rem) = (n / w, n % w);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

/// Two non-overlapping sub-slices of `buf`, the first shared and the second mutable.
fn disjoint(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.len()], &mut lo[b])
    }
}

/// Element-wise `acc += x`, in index order (the same on every rank).
fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

/// One ring step: send `outgoing` to the right neighbour on a helper thread while receiving
/// `incoming` from the left on this one. A failure on either side shuts the other socket down so
/// the blocked half returns at once instead of waiting for its timeout.
fn exchange(
    right: &Peer,
    outgoing: &[f32],
    left: &Peer,
    incoming: &mut [u8],
    op: Op,
    seq: u32,
    total: usize,
) -> Result<(), CollectiveError> {
    let header = Header::new(op, seq, outgoing.len() * 4, total);
    // Which half failed first (SEND or RECV): that error is the cause, the other half's is only
    // the consequence of the shutdown.
    const SEND: u8 = 1;
    const RECV: u8 = 2;
    let first = AtomicU8::new(0);
    let first = &first;
    thread::scope(|s| {
        let sender = thread::Builder::new()
            .name("collective-send".into())
            .spawn_scoped(s, move || {
                let res = right.send(header, bytemuck::cast_slice(outgoing), op);
                if res.is_err() && claim(first, SEND) {
                    let _ = left.stream.shutdown(Shutdown::Read);
                }
                res
            })
            .map_err(|e| CollectiveError::Internal(format!("spawn: {e}")))?;
        let received = left
            .expect(op, seq, total, incoming.len())
            .and_then(|()| left.read_exact(incoming, op));
        if received.is_err() && claim(first, RECV) {
            let _ = right.stream.shutdown(Shutdown::Write);
        }
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(CollectiveError::Internal("sender thread panicked".into())));
        match first.load(Ordering::Acquire) {
            RECV => received.and(sent),
            _ => sent.and(received),
        }
    })
}

/// Records `who` as the first failure unless another was recorded already.
fn claim(first: &AtomicU8, who: u8) -> bool {
    first
        .compare_exchange(0, who, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

fn validate(
    rank: usize,
    world_size: usize,
    addrs: &[SocketAddr],
    options: &TcpOptions,
) -> Result<(), CollectiveError> {
    let bad = |m: String| Err(CollectiveError::InvalidArgument(m));
    if world_size == 0 || world_size > u32::MAX as usize {
        return bad(format!("world size {world_size} out of range"));
    }
    if rank >= world_size {
        return bad(format!(
            "rank {rank} out of range for world size {world_size}"
        ));
    }
    if addrs.len() != world_size {
        return bad(format!(
            "{} addresses for world size {world_size}",
            addrs.len()
        ));
    }
    if options.io_timeout == Some(Duration::ZERO) {
        return bad("io timeout must be positive (or None)".into());
    }
    Ok(())
}

fn configure(
    stream: &TcpStream,
    timeout: Option<Duration>,
    addr: SocketAddr,
) -> Result<(), CollectiveError> {
    let fail = |e: io::Error| CollectiveError::Handshake {
        addr,
        reason: format!("configuring the socket: {e}"),
    };
    stream.set_nodelay(true).map_err(fail)?;
    stream.set_read_timeout(timeout).map_err(fail)?;
    stream.set_write_timeout(timeout).map_err(fail)?;
    Ok(())
}

/// Time left until `deadline`, at least 1 ms (a zero socket timeout is an error).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Connects to lower rank `peer`, retrying while it is not listening yet, and exchanges hellos.
fn connect_peer(
    rank: usize,
    world_size: usize,
    peer: usize,
    addr: SocketAddr,
    deadline: Instant,
    options: &TcpOptions,
) -> Result<TcpStream, CollectiveError> {
    let stream = loop {
        let attempt = remaining(deadline).min(Duration::from_secs(2));
        match TcpStream::connect_timeout(&addr, attempt) {
            Ok(s) => break s,
            Err(error) => {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::Connect {
                        peer,
                        addr,
                        timeout: options.connect_timeout,
                        error,
                    });
                }
                thread::sleep(CONNECT_RETRY.min(remaining(deadline)));
            }
        }
    };
    configure(&stream, Some(remaining(deadline)), addr)?;
    let handshake = |reason: String| CollectiveError::Handshake { addr, reason };
    (&stream)
        .write_all(&hello(rank, world_size))
        .map_err(|e| handshake(format!("sending hello to rank {peer}: {e}")))?;
    let mut reply = [0u8; HELLO_LEN];
    (&stream).read_exact(&mut reply).map_err(|e| {
        handshake(format!(
            "no hello from rank {peer} (it may have rejected ours; check rank/world size on both): {e}"
        ))
    })?;
    match parse_hello(&reply) {
        None => Err(handshake(format!(
            "expected rank {peer} of a tandem collective group, got something else"
        ))),
        Some((r, w)) if r != peer || w != world_size => Err(handshake(format!(
            "expected rank {peer} of {world_size}, found rank {r} of {w}"
        ))),
        Some(_) => {
            tracing::debug!(rank, peer, %addr, "connected");
            Ok(stream)
        }
    }
}

/// Accepts one connection from every higher rank.
fn accept_peers(
    rank: usize,
    world_size: usize,
    listener: &TcpListener,
    addrs: &[SocketAddr],
    deadline: Instant,
    options: &TcpOptions,
    peers: &mut [Option<Peer>],
) -> Result<(), CollectiveError> {
    let my_addr = addrs[rank];
    let bind_err = |error: io::Error| CollectiveError::Bind {
        rank,
        addr: my_addr,
        error,
    };
    // Non-blocking so that the deadline is honoured while nobody connects.
    listener.set_nonblocking(true).map_err(bind_err)?;
    let missing = |peers: &[Option<Peer>]| -> Vec<usize> {
        (rank + 1..world_size)
            .filter(|&r| peers[r].is_none())
            .collect()
    };
    loop {
        if missing(peers).is_empty() {
            return Ok(());
        }
        let (stream, from) = match listener.accept() {
            Ok(conn) => conn,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::AcceptTimeout {
                        rank,
                        addr: my_addr,
                        missing: missing(peers),
                        timeout: options.connect_timeout,
                    });
                }
                thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => return Err(bind_err(e)),
        };
        // Accepted sockets may inherit non-blocking mode on some platforms.
        let handshake = |reason: String| CollectiveError::Handshake { addr: from, reason };
        stream
            .set_nonblocking(false)
            .map_err(|e| handshake(e.to_string()))?;
        configure(&stream, Some(remaining(deadline)), from)?;
        let mut b = [0u8; HELLO_LEN];
        if let Err(e) = (&stream).read_exact(&mut b) {
            // A connection that never says hello (a port scan, a health probe) is not a rank.
            tracing::warn!(rank, %from, error = %e, "dropping a connection without a hello");
            continue;
        }
        let Some((peer, w)) = parse_hello(&b) else {
            tracing::warn!(rank, %from, "dropping a connection with a foreign hello");
            continue;
        };
        if w != world_size {
            return Err(handshake(format!(
                "rank {peer} thinks the world size is {w}, rank {rank} thinks {world_size}"
            )));
        }
        if peer <= rank || peer >= world_size {
            return Err(handshake(format!(
                "rank {rank} accepts only ranks {}..{world_size}, got a hello from rank {peer}",
                rank + 1
            )));
        }
        if peers[peer].is_some() {
            return Err(handshake(format!(
                "rank {peer} connected twice (two processes with the same rank?)"
            )));
        }
        (&stream)
            .write_all(&hello(rank, world_size))
            .map_err(|e| handshake(format!("answering rank {peer}: {e}")))?;
        tracing::debug!(rank, peer, %from, "accepted");
        peers[peer] = Some(Peer {
            rank: peer,
            addr: addrs[peer],
            stream,
            timeout: options.io_timeout,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for n in [0, 1, 7, 10, 100_003] {
            for w in 1..6 {
                let mut next = 0;
                for i in 0..w {
                    let c = chunk(n, w, i);
                    assert_eq!(c.start, next);
                    assert!(c.len() <= n / w + 1);
                    next = c.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn header_round_trips() {
        let h = Header::new(Op::Broadcast, 7, 1 << 33, 3);
        assert_eq!(Header::decode(&h.encode()), h);
    }

    #[test]
    fn disjoint_slices_either_order() {
        let mut v: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let (a, b) = disjoint(&mut v, 0..3, 5..8);
        assert_eq!(a, &[0.0, 1.0, 2.0]);
        assert_eq!(b, &mut [5.0, 6.0, 7.0]);
        let (a, b) = disjoint(&mut v, 6..9, 1..4);
        assert_eq!(a, &[6.0, 7.0, 8.0]);
        assert_eq!(b, &mut [1.0, 2.0, 3.0]);
    }
}
