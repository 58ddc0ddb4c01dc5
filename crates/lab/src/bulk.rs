//! A bulk TCP/MPTCP transfer between two namespaces, for checking rates and failover. It is a
//! measuring tool, not a benchmark harness: one connection, 64 KiB writes, bytes counted by
//! the receiver.

use std::fmt;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// How often blocked reads and writes look at the stop flag.
const POLL: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Bytes moved in some time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Payload bytes received.
    pub bytes: u64,
    /// Seconds over which they were received.
    pub secs: f64,
}

impl Throughput {
    /// Payload rate in bit/s.
    pub fn bits_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 * 8.0 / self.secs
        } else {
            0.0
        }
    }

    /// Payload rate in Mbit/s (10^6).
    pub fn mbit_per_sec(&self) -> f64 {
        self.bits_per_sec() / 1e6
    }
}

impl fmt::Display for Throughput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} Mbit/s ({} bytes in {:.2} s)",
            self.mbit_per_sec(),
            self.bytes,
            self.secs
        )
    }
}

/// A transfer to set up: `Bulk::new(from, to, dst)`, then options, then [`Bulk::measure`] or
/// [`Bulk::start`].
#[derive(Debug, Clone)]
pub struct Bulk {
    from: Netns,
    to: Netns,
    dst: SocketAddr,
    src: Option<IpAddr>,
    mptcp: bool,
    duration: Duration,
    warmup: Duration,
    connect_timeout: Duration,
}

impl Bulk {
    /// Data flows from a socket in `from` to a listener on `dst` in `to` (which must own
    /// `dst`'s address). Defaults: TCP, 3 s measured after 0.2 s of warm-up.
    pub fn new(from: &Netns, to: &Netns, dst: SocketAddr) -> Self {
        Bulk {
            from: from.clone(),
            to: to.clone(),
            dst,
            src: None,
            mptcp: false,
            duration: Duration::from_secs(3),
            warmup: Duration::from_millis(200),
            connect_timeout: CONNECT_TIMEOUT,
        }
    }

    /// Binds the sending socket to this source address (port chosen by the kernel), which on
    /// the gateway selects the uplink through policy routing.
    #[must_use]
    pub fn src(mut self, src: IpAddr) -> Self {
        self.src = Some(src);
        self
    }

    /// Uses MPTCP sockets (`IPPROTO_MPTCP`) on both sides.
    #[must_use]
    pub fn mptcp(mut self, on: bool) -> Self {
        self.mptcp = on;
        self
    }

    /// How long [`Bulk::measure`] measures.
    #[must_use]
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration = d;
        self
    }

    /// How long [`Bulk::measure`] lets the connection ramp up before measuring.
    #[must_use]
    pub fn warmup(mut self, d: Duration) -> Self {
        self.warmup = d;
        self
    }

    /// How long [`Bulk::start`] waits for the connection (default 3 s).
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Connects and starts sending; returns once the connection is established.
    pub fn start(self) -> Result<Flow> {
        let proto = if self.mptcp {
            Protocol::MPTCP
        } else {
            Protocol::TCP
        };
        let domain = Domain::for_address(self.dst);
        let dst = self.dst;
        let io = |op: &str, ns: &Netns, e: std::io::Error| {
            Error::io(format!("{op} {dst}"), ns.name(), e)
        };

        let listener = self
            .to
            .enter(|| -> std::io::Result<Socket> {
                let s = Socket::new(domain, Type::STREAM, Some(proto))?;
                s.set_reuse_address(true)?;
                s.bind(&dst.into())?;
                s.listen(4)?;
                Ok(s)
            })?
            .map_err(|e| io("listen on", &self.to, e))?;
        let (src, connect_timeout) = (self.src, self.connect_timeout);
        let sender = self
            .from
            .enter(|| -> std::io::Result<Socket> {
                let s = Socket::new(domain, Type::STREAM, Some(proto))?;
                if let Some(ip) = src {
                    s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
                }
                // A plain blocking connect (as MPTCP tools do), bounded by SO_SNDTIMEO.
                s.set_write_timeout(Some(connect_timeout))?;
                s.connect(&dst.into())?;
                Ok(s)
            })?
            .map_err(|e| io("connect to", &self.from, e))?;
        // Established at the client; the server side may still wait for a lost final ACK,
        // so accept is bounded too (SO_RCVTIMEO applies to accept).
        let (receiver, _) = listener
            .set_read_timeout(Some(connect_timeout))
            .and_then(|()| listener.accept())
            .map_err(|e| io("accept on", &self.to, e))?;
        // The listener must outlive the accept: MP_JOIN SYNs of extra subflows arrive at it.
        for s in [&sender, &receiver] {
            s.set_read_timeout(Some(POLL))
                .and_then(|()| s.set_write_timeout(Some(POLL)))
                // Reset on close: no orphaned sockets outlive the flow (or its namespaces).
                .and_then(|()| s.set_linger(Some(Duration::ZERO)))
                .map_err(|e| io("configure socket for", &self.from, e))?;
        }

        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let send_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || send_loop(sender, &stop))
        };
        let recv_thread = {
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::spawn(move || recv_loop(receiver, &stop, &received))
        };
        Ok(Flow {
            received,
            stop,
            threads: Some((send_thread, recv_thread)),
            started: Instant::now(),
            _listener: listener,
            bulk: self,
        })
    }

    /// Runs the transfer: warm-up, then counts what the receiver gets during `duration`.
    pub fn measure(self) -> Result<Throughput> {
        let (warmup, duration) = (self.warmup, self.duration);
        let flow = self.start()?;
        std::thread::sleep(warmup);
        let t = flow.rate_over(duration);
        flow.stop()?;
        Ok(t)
    }
}

/// `Bulk::new(from, to, dst).duration(secs).mptcp(mptcp).measure()`.
pub fn measure(
    from: &Netns,
    to: &Netns,
    dst: SocketAddr,
    secs: f64,
    mptcp: bool,
) -> Result<Throughput> {
    Bulk::new(from, to, dst)
        .duration(Duration::from_secs_f64(secs))
        .mptcp(mptcp)
        .measure()
}

type Loop = JoinHandle<std::io::Result<()>>;

/// A running transfer. Stops (and resets the connection) on [`Flow::stop`] or drop.
#[derive(Debug)]
pub struct Flow {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Option<(Loop, Loop)>,
    started: Instant,
    _listener: Socket,
    bulk: Bulk,
}

impl Flow {
    /// Bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Sleeps for `d` and returns what was received meanwhile.
    pub fn rate_over(&self, d: Duration) -> Throughput {
        let (b0, t0) = (self.bytes(), Instant::now());
        std::thread::sleep(d);
        Throughput {
            bytes: self.bytes() - b0,
            secs: t0.elapsed().as_secs_f64(),
        }
    }

    /// Whether both ends are still transferring (no error, not stopped).
    pub fn is_running(&self) -> bool {
        self.threads
            .as_ref()
            .is_some_and(|(s, r)| !s.is_finished() && !r.is_finished())
    }

    /// Stops; returns the totals since the start, or the first I/O error either end hit.
    pub fn stop(mut self) -> Result<Throughput> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Throughput> {
        self.stop.store(true, Ordering::Relaxed);
        let total = Throughput {
            bytes: self.bytes(),
            secs: self.started.elapsed().as_secs_f64(),
        };
        let Some((s, r)) = self.threads.take() else {
            return Ok(total);
        };
        for (side, ns, t) in [("send", &self.bulk.from, s), ("receive", &self.bulk.to, r)] {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Error::io(
                        format!("bulk {side} ({} → {})", self.bulk.from, self.bulk.dst),
                        ns.name(),
                        e,
                    ));
                }
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        Ok(total)
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

fn send_loop(mut s: Socket, stop: &AtomicBool) -> std::io::Result<()> {
    let buf = vec![0x5a_u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.write(&buf) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            // The receiver resets the connection when the flow is stopped.
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn recv_loop(mut s: Socket, stop: &AtomicBool, received: &AtomicU64) -> std::io::Result<()> {
    let mut buf = vec![0_u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) if stop.load(Ordering::Relaxed) => break,
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
