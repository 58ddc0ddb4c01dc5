//! The relay: moves bytes both ways between two connected sockets (the MPTCP side and the TCP
//! side) until both directions are done. Shared by the converter and the gateway.
//!
//! Semantics: a FIN read on one side becomes `shutdown(SHUT_WR)` on the other (half-close) while
//! the other direction keeps flowing (towards an MPTCP socket, once its extra subflows are
//! open, see [`crate::joins`]); a reset (or any hard error) on one side becomes a reset of
//! the other (`SO_LINGER {1,0}`, applied here, sent when the caller drops the socket); a
//! connection with no bytes either way for `idle_timeout` is reset on both sides.
//!
//! Both sockets send what they are given at once (`TCP_NODELAY`): a relay passes bytes on as
//! they arrive, and the sender's own Nagle decision was made at its socket already. With
//! Nagle's algorithm on a relay socket, the partial segment that ends a burst waits until
//! everything sent before it is acknowledged, one round trip of that path: a 30 KB upload
//! written at once, through gateway and converter over uplinks of 20 and 50 ms round trip,
//! took 82 ms with Nagle on the gateway's MPTCP socket (its last 800 bytes held back 20 ms),
//! and takes 61 ms without, as forwarded over the faster uplink
//! (`an_upload_ends_as_soon_as_over_plain_tcp` checks it).
//!
//! Memory per direction is one buffer (copy) or one pipe (splice), held only while data flows:
//! taken when bytes arrive, and given back after [`BUFFER_IDLE`] without any, so an idle
//! connection — a keep-alive HTTP connection between requests, a chat session — costs only its
//! sockets. The copy buffer starts small and grows fourfold on each read that fills it, up to
//! the configured size, so a request and its short answer never touch a large buffer, and only
//! a direction whose socket holds more than the relay reads at once (bulk data, a busy CPU)
//! reads in large pieces.
//!
//! A write that has waited [`WRITE_RECHECK`] for the socket to become writable is tried anyway,
//! past tokio's cached readiness, and a write that then succeeds is logged (first time, then
//! every thousandth). Seen once: an upload through the gateway stood still for 20 s after the
//! only carrying uplink's subflows were set to backup priority and back and another uplink's
//! subflow was added; the MPTCP socket gave no EPOLLOUT, the recheck wrote a record into it,
//! and the data still did not leave. So this detects the state more than it cures it (the
//! trigger is avoided in `gateway::health`); with no such trouble it costs one failed syscall a
//! second while a peer is slow.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::budget::{Budget, Lease};

/// How bytes are moved (`relay_engine`, `--relay-engine`). Which is cheaper depends on the
/// socket read from: splice(2) from a TCP socket moves its pages into the pipe without a copy,
/// while MPTCP (6.18) has no zero-copy splice path and reading it through a pipe costs more
/// than a plain read (converter bench, one flow, reno: reading TCP, splice 17.3 Gbit/s at 0.33
/// CPU-s/GiB against copy 15.3 at 0.42; reading MPTCP, splice 12.3 at 0.31 against copy 19.6
/// at 0.28); hence `Auto`, per direction. Copy stays the default: with splice into the MPTCP
/// socket (`Auto` or `Splice` at the converter), downloads through gateway and converter on the
/// lab's unshaped links stood still for whole seconds in 3 of 6 rounds (copy: none in 9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Splice from plain TCP (and from an MPTCP socket that fell back to TCP), copy from MPTCP.
    Auto,
    /// read(2) into a user buffer, write(2) out of it.
    #[default]
    Copy,
    /// splice(2) socket → pipe → socket; the bytes never enter user space.
    Splice,
}

/// How long a direction may be quiet before its buffer or pipe is given back.
pub const BUFFER_IDLE: Duration = Duration::from_secs(2);
/// How long a blocked write waits for a readiness event before it tries the socket anyway.
pub const WRITE_RECHECK: Duration = Duration::from_secs(1);

/// Writes that succeeded after [`WRITE_RECHECK`] with no readiness event: wakeups the kernel
/// did not deliver.
static MISSED_WAKEUPS: AtomicU64 = AtomicU64::new(0);

/// What a wait for room in the destination ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// The socket said it is writable.
    Ready,
    /// No readiness came within [`WRITE_RECHECK`]: try the syscall anyway (tokio's cached
    /// readiness says "not writable").
    Recheck,
    /// The MPTCP sender was stuck and its send buffer raised for one write
    /// ([`crate::sendbuf::nudge`]): try the syscall, then put this bound back.
    Nudged(usize),
}

/// Waits until `dst` is writable. With `nudge` (`dst` is an MPTCP socket with a bounded send
/// buffer), a wait looks every [`crate::sendbuf::STUCK_AFTER`] for a sender stuck on a data
/// acknowledgement the peer will not send.
async fn room_in(dst: &TcpStream, nudge: bool) -> io::Result<Room> {
    use futures::FutureExt;
    // The common case, room in the socket, takes no timer (and no clock read) on the relay's
    // hot path.
    if let Some(r) = dst.writable().now_or_never() {
        return r.map(|()| Room::Ready);
    }
    let mut waited = Duration::ZERO;
    if nudge {
        let step = crate::sendbuf::STUCK_AFTER;
        while waited < WRITE_RECHECK {
            if let Ok(r) = tokio::time::timeout(step, dst.writable()).await {
                return r.map(|()| Room::Ready);
            }
            waited += step;
            if let Some(bound) = crate::sendbuf::nudge(dst) {
                return Ok(Room::Nudged(bound));
            }
        }
    }
    match tokio::time::timeout(WRITE_RECHECK.saturating_sub(waited), dst.writable()).await {
        Ok(r) => r.map(|()| Room::Ready),
        Err(_) => Ok(Room::Recheck),
    }
}

/// The socket a direction writes into, and whether its waits look for a stuck MPTCP sender.
struct Sink<'a> {
    sock: &'a TcpStream,
    nudge: bool,
}

impl Sink<'_> {
    /// Waits for room, then writes with `ready` (through tokio's readiness) or, after a recheck
    /// or a nudge, with `direct` (the syscall itself, past tokio's cached readiness). A nudged
    /// send buffer is put back right after the write. `WouldBlock`: wait again.
    async fn write(
        &self,
        ready: impl FnOnce(&TcpStream) -> io::Result<usize>,
        direct: impl FnOnce(&TcpStream) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let room = room_in(self.sock, self.nudge).await?;
        let wrote = if room == Room::Ready {
            ready(self.sock)
        } else {
            direct(self.sock)
        };
        if let Room::Nudged(bound) = room {
            crate::sendbuf::restore(self.sock, bound);
        }
        if let (Room::Recheck, Ok(m)) = (room, &wrote) {
            if *m > 0 {
                missed_wakeup(*m);
            }
        }
        wrote
    }
}

fn missed_wakeup(written: usize) {
    let n = MISSED_WAKEUPS.fetch_add(1, Relaxed);
    if n % 1000 == 0 {
        tracing::warn!(
            written,
            missed = n + 1,
            "a socket took data after {WRITE_RECHECK:?} without a writable event: the kernel's \
             MPTCP stopped signalling (seen after subflow priority changes, docs/architecture.md); \
             relays retry writes every second"
        );
    }
}

/// The first read size of a direction (it grows fourfold on each read that fills it, up to
/// [`RelayConfig::buffer`]).
const FIRST_BUFFER: usize = 4 * 1024;

/// `relay_buffer`'s default: the largest read (copy) or the pipe (splice) per direction.
pub const DEFAULT_BUFFER: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub engine: Engine,
    /// Reset both sides after this long without a byte in either direction.
    pub idle_timeout: Option<Duration>,
    /// Copy engine: buffer per direction. Splice engine: pipe capacity per direction.
    pub buffer: usize,
    /// The MPTCP side, when braid bounds its send buffer: writes into it that wait look for a
    /// stuck sender ([`crate::sendbuf::nudge`]). Per connection.
    pub nudge: Option<Side>,
    /// What all buffers (or pipes) may hold beyond 64 KiB each ([`crate::budget`]).
    pub memory: Arc<Budget>,
    /// `relay_memory`: the cap the daemon gives [`Self::memory`] at start (`usize::MAX`: none).
    pub memory_cap: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            engine: Engine::Copy,
            idle_timeout: Some(Duration::from_secs(3600)),
            buffer: DEFAULT_BUFFER,
            nudge: None,
            memory: Budget::global(),
            memory_cap: usize::MAX,
        }
    }
}

/// Bytes a relay has moved so far, readable while it runs (`braid status`).
#[derive(Debug, Default)]
pub struct Moved {
    pub a_to_b: AtomicU64,
    pub b_to_a: AtomicU64,
}

impl Moved {
    pub fn get(&self) -> (u64, u64) {
        (self.a_to_b.load(Relaxed), self.b_to_a.load(Relaxed))
    }
}

/// Which socket a relay event concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The socket passed first (the client / MPTCP side).
    A,
    /// The socket passed second (the server / TCP side).
    B,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::A => "client",
            Side::B => "server",
        }
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Closed,
    /// `side` reset the connection (or failed hard); the other side was reset in turn.
    Reset { side: Side, error: io::Error },
    /// Nothing moved for the idle timeout; both sides were reset.
    Idle,
}

impl Outcome {
    /// Label for logs and metrics (`closed`, `idle_timeout`, `reset_by_client`,
    /// `reset_by_server`) and the error's text, if any.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            Outcome::Closed => ("closed", String::new()),
            Outcome::Idle => ("idle_timeout", String::new()),
            Outcome::Reset { side, error } => (
                match side {
                    Side::A => "reset_by_client",
                    Side::B => "reset_by_server",
                },
                error.to_string(),
            ),
        }
    }
}

#[derive(Debug)]
pub struct Relayed {
    /// Bytes moved from A to B.
    pub a_to_b: u64,
    /// Bytes moved from B to A.
    pub b_to_a: u64,
    pub outcome: Outcome,
}

/// Why one direction stopped.
enum PumpEnd {
    Eof,
    ReadFailed(io::Error),
    WriteFailed(io::Error),
}

/// Relays between `a` and `b` until both directions are done, a side resets, or the connection
/// idles out. On reset or idle, both sockets are set to reset when dropped.
pub async fn relay(a: &TcpStream, b: &TcpStream, cfg: &RelayConfig, moved: &Moved) -> Relayed {
    let Moved { a_to_b, b_to_a } = moved;
    // See the module docs; a socket that refuses keeps its setting, which costs latency only.
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let up = pump(a, b, a_to_b, cfg, cfg.nudge == Some(Side::B));
    let down = pump(b, a, b_to_a, cfg, cfg.nudge == Some(Side::A));
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);

    let idle = cfg.idle_timeout.unwrap_or(Duration::MAX);
    // Checking the byte counters on a coarse tick costs nothing per byte; the timeout fires
    // between `idle` and `idle * 5/4` after the last byte.
    let tick = (idle / 4).max(Duration::from_millis(10));
    let mut idle_check = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    let mut last_total = 0u64;
    let mut quiet = Duration::ZERO;

    let outcome = loop {
        if up_done && down_done {
            break Outcome::Closed;
        }
        tokio::select! {
            end = &mut up, if !up_done => match end {
                PumpEnd::Eof => up_done = true,
                PumpEnd::ReadFailed(error) => break Outcome::Reset { side: Side::A, error },
                PumpEnd::WriteFailed(error) => break Outcome::Reset { side: Side::B, error },
            },
            end = &mut down, if !down_done => match end {
                PumpEnd::Eof => down_done = true,
                PumpEnd::ReadFailed(error) => break Outcome::Reset { side: Side::B, error },
                PumpEnd::WriteFailed(error) => break Outcome::Reset { side: Side::A, error },
            },
            _ = idle_check.tick(), if cfg.idle_timeout.is_some() => {
                let total = a_to_b.load(Relaxed) + b_to_a.load(Relaxed);
                if total == last_total {
                    quiet += tick;
                    if quiet >= idle {
                        break Outcome::Idle;
                    }
                } else {
                    last_total = total;
                    quiet = Duration::ZERO;
                }
            }
        }
    };
    if !matches!(outcome, Outcome::Closed) {
        reset_on_close(a);
        reset_on_close(b);
    }
    Relayed {
        a_to_b: a_to_b.load(Relaxed),
        b_to_a: b_to_a.load(Relaxed),
        outcome,
    }
}

/// Writes all of `buf` through a shared reference (tokio implements `AsyncWrite` only for
/// `&mut TcpStream`; the relay and handshakes hold `&TcpStream`).
pub async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the socket send RST instead of FIN when it is closed. Failing to set it is logged by
/// the kernel's absence of RST, not fatal: the peer then sees a FIN.
pub fn reset_on_close(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Whether a direction splices, given the engine and whether its source is MPTCP.
fn splices(engine: Engine, src_is_mptcp: impl FnOnce() -> bool) -> bool {
    match engine {
        Engine::Copy => false,
        Engine::Splice => true,
        Engine::Auto => !src_is_mptcp(),
    }
}

async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &AtomicU64,
    cfg: &RelayConfig,
    nudge: bool,
) -> PumpEnd {
    // One getsockopt per direction, for `Auto` only; 0 for plain TCP and after a fallback.
    let end = if splices(cfg.engine, || {
        braid_sys::sockopt::is_mptcp(src).unwrap_or(false)
    }) {
        pump_splice(src, &Sink { sock: dst, nudge }, moved, cfg).await
    } else {
        pump_copy(src, &Sink { sock: dst, nudge }, moved, cfg).await
    };
    if let PumpEnd::Eof = end {
        // Half-close: the peer learns there is no more, the other direction keeps going. On an
        // MPTCP socket, not before the kernel has opened its extra subflows: none can be
        // opened after the FIN (joins.rs).
        crate::joins::settle(dst, crate::joins::HALF_CLOSE_WAIT).await;
        if let Err(e) = SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
            if e.kind() != io::ErrorKind::NotConnected {
                return PumpEnd::WriteFailed(e);
            }
        }
    }
    end
}

/// When a direction last moved data, and the one timer that tells it has been quiet for
/// [`BUFFER_IDLE`]: armed once per quiet spell, not once per wait (a busy relay waits for
/// readiness thousands of times a second).
struct Quiet {
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    last_data: tokio::time::Instant,
}

impl Quiet {
    fn new() -> Quiet {
        let now = tokio::time::Instant::now();
        Quiet {
            timer: Box::pin(tokio::time::sleep_until(now + BUFFER_IDLE)),
            last_data: now,
        }
    }

    /// Data moved (one clock read).
    fn data(&mut self) {
        self.last_data = tokio::time::Instant::now();
    }

    /// Waits until `src` is readable (`Ok(true)`); when `holding` a buffer or pipe and nothing
    /// came for [`BUFFER_IDLE`], returns `Ok(false)` first so the caller can give it back.
    async fn readable(&mut self, src: &TcpStream, holding: bool) -> io::Result<bool> {
        loop {
            tokio::select! {
                biased;
                r = src.readable() => return r.map(|()| true),
                () = &mut self.timer, if holding => {
                    let due = self.last_data + BUFFER_IDLE;
                    if tokio::time::Instant::now() >= due {
                        self.timer.as_mut().reset(due + BUFFER_IDLE);
                        return Ok(false);
                    }
                    // Data came since the timer was armed: wait out the rest.
                    self.timer.as_mut().reset(due);
                }
            }
        }
    }
}

async fn pump_copy(
    src: &TcpStream,
    dst: &Sink<'_>,
    moved: &AtomicU64,
    cfg: &RelayConfig,
) -> PumpEnd {
    let size = cfg.buffer;
    // Bytes are read into the spare capacity and written out before the next read, so the
    // buffer is empty between reads; its capacity is this direction's read size (0: quiet),
    // and the lease holds as much of the budget.
    let mut buf: Vec<u8> = Vec::new();
    let mut lease = Lease::new(cfg.memory.clone());
    let mut quiet = Quiet::new();
    loop {
        match quiet.readable(src, buf.capacity() > 0).await {
            Ok(true) => {}
            Ok(false) => {
                buf = Vec::new();
                lease.resize(0);
                continue;
            }
            Err(e) => return PumpEnd::ReadFailed(e),
        }
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(lease.resize(FIRST_BUFFER.min(size)));
            quiet.data();
        }
        // Into uninitialised capacity: a buffer the read overwrites is never zeroed first.
        let n = match src.try_read_buf(&mut buf) {
            Ok(0) => return PumpEnd::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return PumpEnd::ReadFailed(e),
        };
        let mut off = 0;
        while off < n {
            let chunk = &buf[off..n];
            // The direct way is send(2) with MSG_NOSIGNAL.
            let wrote = dst
                .write(|d| d.try_write(chunk), |d| SockRef::from(d).send(chunk))
                .await;
            match wrote {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return PumpEnd::WriteFailed(e),
            }
        }
        moved.fetch_add(n as u64, Relaxed);
        quiet.data();
        let read_size = buf.capacity();
        buf.clear();
        if let Some(bigger) = next_read_size(n, read_size, size) {
            let granted = lease.resize(bigger);
            if granted > read_size {
                buf = Vec::with_capacity(granted);
            }
        }
    }
}

/// The read size after a read of `n` bytes into `read_size`: a full read means more was
/// waiting, so the next reads are four times larger, up to `max`. Larger reads cost less per
/// byte where it counts, when the relay is behind: fewer syscalls, and fewer window updates
/// each followed by the peer's burst (converter bench, a quarter of a core: 1 MiB reads cut
/// CPU per GiB by 10-30 % and raised the rate 12-30 % against 256 KiB; 4 MiB reads made an
/// upload crawl, the relay then sitting on data the window needs).
fn next_read_size(n: usize, read_size: usize, max: usize) -> Option<usize> {
    (n == read_size && read_size < max).then(|| read_size.saturating_mul(4).min(max))
}

/// A pipe for splice, created on first data. `F_SETPIPE_SZ` failing (a lower
/// `fs.pipe-max-size`) only costs speed, so it is ignored.
fn make_pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let _ = fcntl(
        &w,
        FcntlArg::F_SETPIPE_SZ(size.min(i32::MAX as usize) as i32),
    );
    Ok((r, w))
}

async fn pump_splice(
    src: &TcpStream,
    dst: &Sink<'_>,
    moved: &AtomicU64,
    cfg: &RelayConfig,
) -> PumpEnd {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    // The pipe's capacity, granted by the budget when the pipe is made (a pipe's pages are
    // taken as it fills, so a full one holds this much).
    let mut lease = Lease::new(cfg.memory.clone());
    let mut size = 0;
    let mut quiet = Quiet::new();
    loop {
        match quiet.readable(src, pipe.is_some()).await {
            Ok(true) => {}
            Ok(false) => {
                // Quiet: the pipe (two descriptors) goes back; it is empty here.
                pipe = None;
                lease.resize(0);
                continue;
            }
            Err(e) => return PumpEnd::ReadFailed(e),
        }
        if pipe.is_none() {
            size = lease.resize(cfg.buffer);
        }
        let (pr, pw) = match &pipe {
            Some(p) => (&p.0, &p.1),
            None => match make_pipe(size) {
                Ok(p) => {
                    let p = pipe.insert(p);
                    (&p.0, &p.1)
                }
                Err(e) => return PumpEnd::ReadFailed(e),
            },
        };
        // The pipe is empty here (drained below), so EAGAIN can only mean "socket empty".
        let filled = src.try_io(Interest::READABLE, || {
            splice(src, None, pw, None, size, flags).map_err(io::Error::from)
        });
        let mut in_pipe = match filled {
            Ok(0) => return PumpEnd::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return PumpEnd::ReadFailed(e),
        };
        moved.fetch_add(in_pipe as u64, Relaxed);
        quiet.data();
        while in_pipe > 0 {
            let out =
                |d: &TcpStream| splice(pr, None, d, None, in_pipe, flags).map_err(io::Error::from);
            let wrote = dst
                .write(|d| d.try_io(Interest::WRITABLE, || out(d)), &out)
                .await;
            match wrote {
                Ok(m) => in_pipe -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return PumpEnd::WriteFailed(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected pairs: (app_a, relay_a) and (relay_b, app_b). The relay runs between
    /// relay_a and relay_b; tests talk through app_a and app_b.
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            (c, s)
        }
        (pair().await, pair().await)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[0] ^ seed)
            .collect()
    }

    async fn both_ways(engine: Engine) {
        let ((mut app_a, relay_a), (relay_b, mut app_b)) = pairs().await;
        let cfg = RelayConfig {
            engine,
            buffer: 16 * 1024,
            ..RelayConfig::default()
        };
        let task =
            tokio::spawn(async move { relay(&relay_a, &relay_b, &cfg, &Moved::default()).await });
        let up = pattern(3 << 20, 1);
        let down = pattern(5 << 20, 2);
        let (up2, down2) = (up.clone(), down.clone());
        let (mut ar, mut aw) = app_a.split();
        let (mut br, mut bw) = app_b.split();
        let (_, _, got_b, got_a) = tokio::join!(
            async {
                aw.write_all(&up2).await.unwrap();
                aw.shutdown().await.unwrap();
            },
            async {
                bw.write_all(&down2).await.unwrap();
                bw.shutdown().await.unwrap();
            },
            async {
                let mut v = Vec::new();
                br.read_to_end(&mut v).await.unwrap();
                v
            },
            async {
                let mut v = Vec::new();
                ar.read_to_end(&mut v).await.unwrap();
                v
            },
        );
        assert!(got_b == up, "A→B bytes differ");
        assert!(got_a == down, "B→A bytes differ");
        let r = task.await.unwrap();
        assert!(matches!(r.outcome, Outcome::Closed), "{:?}", r.outcome);
        assert_eq!((r.a_to_b, r.b_to_a), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn copy_moves_every_byte_both_ways() {
        both_ways(Engine::Copy).await;
    }

    #[tokio::test]
    async fn splice_moves_every_byte_both_ways() {
        both_ways(Engine::Splice).await;
    }

    #[tokio::test]
    async fn auto_moves_every_byte_both_ways() {
        both_ways(Engine::Auto).await;
    }

    #[test]
    fn reads_grow_fourfold_on_full_reads_up_to_the_maximum() {
        let max = DEFAULT_BUFFER;
        assert_eq!(next_read_size(4096, 4096, max), Some(16384));
        assert_eq!(next_read_size(262144, 262144, max), Some(max));
        // A partial read keeps the size; the maximum stays the maximum.
        assert_eq!(next_read_size(4095, 4096, max), None);
        assert_eq!(next_read_size(max, max, max), None);
        // A maximum that is not a power of four is still reached.
        assert_eq!(next_read_size(16384, 16384, 20000), Some(20000));
    }

    #[test]
    fn auto_splices_from_tcp_and_copies_from_mptcp() {
        assert!(splices(Engine::Auto, || false));
        assert!(!splices(Engine::Auto, || true));
        // The fixed engines do not ask.
        assert!(splices(Engine::Splice, || unreachable!()));
        assert!(!splices(Engine::Copy, || unreachable!()));
    }

    async fn half_close(engine: Engine) {
        let ((mut app_a, relay_a), (relay_b, mut app_b)) = pairs().await;
        let cfg = RelayConfig {
            engine,
            ..RelayConfig::default()
        };
        let task =
            tokio::spawn(async move { relay(&relay_a, &relay_b, &cfg, &Moved::default()).await });
        // A finishes sending first; B must see EOF and still be able to answer.
        app_a.write_all(b"request").await.unwrap();
        app_a.shutdown().await.unwrap();
        let mut req = Vec::new();
        app_b.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        app_b.write_all(b"response after half-close").await.unwrap();
        app_b.shutdown().await.unwrap();
        let mut resp = Vec::new();
        app_a.read_to_end(&mut resp).await.unwrap();
        assert_eq!(resp, b"response after half-close");
        assert!(matches!(task.await.unwrap().outcome, Outcome::Closed));
    }

    /// A reader that stops for longer than [`WRITE_RECHECK`]: the relay's write retries past
    /// tokio's readiness (and finds the socket still full), then goes on when the reader does,
    /// every byte in order.
    async fn stalled_reader(engine: Engine) {
        let ((mut app_a, relay_a), (relay_b, mut app_b)) = pairs().await;
        let cfg = RelayConfig {
            engine,
            buffer: 64 * 1024,
            ..RelayConfig::default()
        };
        let task =
            tokio::spawn(async move { relay(&relay_a, &relay_b, &cfg, &Moved::default()).await });
        let up = pattern(24 << 20, 3);
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            app_a.write_all(&up2).await.unwrap();
            app_a.shutdown().await.unwrap();
            app_a
        });
        tokio::time::sleep(WRITE_RECHECK * 2 + Duration::from_millis(200)).await;
        let mut got = Vec::new();
        app_b.read_to_end(&mut got).await.unwrap();
        assert!(got == up, "bytes differ after a stalled reader");
        drop(writer.await.unwrap());
        drop(app_b);
        let r = task.await.unwrap();
        assert_eq!(r.a_to_b, up.len() as u64);
    }

    #[tokio::test]
    async fn copy_survives_a_reader_stalled_past_the_recheck() {
        stalled_reader(Engine::Copy).await;
    }

    #[tokio::test]
    async fn splice_survives_a_reader_stalled_past_the_recheck() {
        stalled_reader(Engine::Splice).await;
    }

    #[tokio::test]
    async fn copy_propagates_half_close() {
        half_close(Engine::Copy).await;
    }

    #[tokio::test]
    async fn splice_propagates_half_close() {
        half_close(Engine::Splice).await;
    }

    async fn reset(engine: Engine) {
        let ((app_a, relay_a), (relay_b, mut app_b)) = pairs().await;
        let cfg = RelayConfig {
            engine,
            ..RelayConfig::default()
        };
        let task = tokio::spawn(async move {
            let r = relay(&relay_a, &relay_b, &cfg, &Moved::default()).await;
            drop((relay_a, relay_b));
            r
        });
        reset_on_close(&app_a);
        drop(app_a);
        let mut buf = [0u8; 16];
        let err = app_b.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let r = task.await.unwrap();
        assert!(
            matches!(r.outcome, Outcome::Reset { side: Side::A, .. }),
            "{:?}",
            r.outcome
        );
    }

    #[tokio::test]
    async fn copy_propagates_reset() {
        reset(Engine::Copy).await;
    }

    #[tokio::test]
    async fn splice_propagates_reset() {
        reset(Engine::Splice).await;
    }

    /// Bytes keep flowing after a direction went quiet long enough to give its buffer (or
    /// pipe) back, and through the growth from the first small buffer to the full one.
    async fn quiet_then_busy(engine: Engine) {
        let ((mut app_a, relay_a), (relay_b, mut app_b)) = pairs().await;
        let cfg = RelayConfig {
            engine,
            ..RelayConfig::default()
        };
        let task =
            tokio::spawn(async move { relay(&relay_a, &relay_b, &cfg, &Moved::default()).await });
        let mut got = vec![0u8; 5];
        app_a.write_all(b"hello").await.unwrap();
        app_b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        tokio::time::sleep(BUFFER_IDLE + Duration::from_millis(300)).await;
        let big = pattern(4 << 20, 7);
        let got = send_through(&mut app_a, &mut app_b, &big, Duration::ZERO).await;
        assert!(got == big, "bytes after the quiet spell differ");
        drop(app_b);
        let r = task.await.unwrap();
        assert_eq!(r.a_to_b, 5 + big.len() as u64);
    }

    /// Writes `data` into `a` and closes it, while reading `b` to its end with a pause after
    /// each read (of at most 256 KiB); returns what `b` read.
    async fn send_through(
        a: &mut TcpStream,
        b: &mut TcpStream,
        data: &[u8],
        pause: Duration,
    ) -> Vec<u8> {
        let (_, got) = tokio::join!(
            async {
                a.write_all(data).await.unwrap();
                a.shutdown().await.unwrap();
            },
            async {
                let mut v = Vec::new();
                let mut chunk = vec![0u8; 256 * 1024];
                loop {
                    let n = b.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break v;
                    }
                    v.extend_from_slice(&chunk[..n]);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        );
        got
    }

    /// Four relays at once under a 1 MiB budget, each behind a slow reader (so that every read
    /// fills its buffer and asks to grow): every byte arrives, the buffers beyond 64 KiB never
    /// hold more than the cap, and everything is given back at the end.
    async fn under_a_budget(engine: Engine) {
        let budget = Arc::new(Budget::new(1 << 20));
        let cfg = RelayConfig {
            engine,
            memory: budget.clone(),
            ..RelayConfig::default()
        };
        let peak = Arc::new(AtomicU64::new(0));
        let watch = {
            let (budget, peak) = (budget.clone(), peak.clone());
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(budget.used() as u64, Relaxed);
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            })
        };
        let mut runs = Vec::new();
        for seed in 0..4u8 {
            let ((mut app_a, relay_a), (relay_b, mut app_b)) = pairs().await;
            let cfg = cfg.clone();
            let relay =
                tokio::spawn(
                    async move { relay(&relay_a, &relay_b, &cfg, &Moved::default()).await },
                );
            runs.push(tokio::spawn(async move {
                let big = pattern(8 << 20, seed);
                let got =
                    send_through(&mut app_a, &mut app_b, &big, Duration::from_millis(1)).await;
                assert!(got == big, "bytes differ");
                drop(app_b);
                relay.await.unwrap().a_to_b
            }));
        }
        for r in runs {
            assert_eq!(r.await.unwrap(), 8 << 20);
        }
        watch.abort();
        let peak = peak.load(Relaxed) as usize;
        // Growth to the floor is free: eight directions may each hold it besides the cap.
        assert!(
            peak <= (1 << 20) + 8 * crate::budget::FLOOR,
            "the buffers held {peak} bytes"
        );
        assert!(peak > crate::budget::FLOOR, "nothing grew: {peak}");
        assert_eq!(budget.used(), 0, "not all given back");
    }

    #[tokio::test]
    async fn copy_keeps_its_buffers_within_the_budget() {
        under_a_budget(Engine::Copy).await;
    }

    #[tokio::test]
    async fn splice_keeps_its_pipes_within_the_budget() {
        under_a_budget(Engine::Splice).await;
    }

    #[tokio::test]
    async fn copy_gives_its_buffer_back_and_keeps_working() {
        quiet_then_busy(Engine::Copy).await;
    }

    #[tokio::test]
    async fn splice_gives_its_pipe_back_and_keeps_working() {
        quiet_then_busy(Engine::Splice).await;
    }

    #[tokio::test]
    async fn idle_connection_is_reset() {
        let ((mut app_a, relay_a), (relay_b, _app_b)) = pairs().await;
        let cfg = RelayConfig {
            idle_timeout: Some(Duration::from_millis(200)),
            ..RelayConfig::default()
        };
        let task = tokio::spawn(async move {
            let r = relay(&relay_a, &relay_b, &cfg, &Moved::default()).await;
            drop((relay_a, relay_b));
            r
        });
        let mut buf = [0u8; 1];
        let err = tokio::time::timeout(Duration::from_secs(5), app_a.read(&mut buf))
            .await
            .expect("idle timeout did not fire")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(matches!(task.await.unwrap().outcome, Outcome::Idle));
    }
}
