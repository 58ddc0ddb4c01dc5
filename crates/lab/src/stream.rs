//! A live stream as an application feels it: records sent at a constant rate (a video call, a
//! live streamer's feed), each carrying its sequence number and the time it was sent, and a
//! receiver that checks every byte and records the longest gap between arrivals and the worst
//! delay of a record. Used by the failover tests, the failover benchmark and the demo.
//!
//! Record layout (big-endian): magic `u32`, sequence `u64`, send time `u64` (nanoseconds of the
//! wall clock, which all network namespaces share), then payload bytes that are a function of
//! the sequence number, so that a lost, repeated or corrupted byte shows.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::netns::{Netns, NsThread};

const MAGIC: u32 = 0x6272_6431; // "brd1"
const HEADER: usize = 4 + 8 + 8;

/// What is streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub rate_bps: u64,
    /// Bytes per record, header included (at least 32).
    pub record: usize,
    pub duration: Duration,
}

impl Default for Spec {
    /// 4 Mbit/s (a 1080p live stream) in 1000-byte records (one every 2 ms) for 10 s.
    fn default() -> Self {
        Spec {
            rate_bps: 4_000_000,
            record: 1000,
            duration: Duration::from_secs(10),
        }
    }
}

impl Spec {
    pub fn records(&self) -> u64 {
        (self.rate_bps as f64 * self.duration.as_secs_f64() / (self.record as f64 * 8.0)) as u64
    }

    fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.record as f64 * 8.0 / self.rate_bps as f64)
    }
}

/// What the receiver saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub records: u64,
    pub bytes: u64,
    /// Every record arrived in order with every byte right (until the end or the first error).
    pub intact: bool,
    /// The first error: a bad record or an I/O error.
    pub error: Option<String>,
    /// The longest time between two arrivals, and when it ended (since the first arrival).
    pub longest_gap: Duration,
    pub longest_gap_at: Duration,
    /// The worst time from a record's sending to its arrival.
    pub worst_delay: Duration,
    /// Gaps longer than 200 ms: (when they ended since the first arrival, length).
    pub stalls: Vec<(Duration, Duration)>,
}

/// What the receiver has seen so far, for a live view while the stream runs.
#[derive(Debug, Default)]
pub struct Live {
    records: AtomicU64,
    longest_gap_ns: AtomicU64,
    /// Gaps longer than [`Live::GAP`], each with the moment it ended.
    gaps: Mutex<Vec<(Instant, Duration)>>,
}

impl Live {
    /// Gaps longer than this are kept with their time.
    pub const GAP: Duration = Duration::from_millis(20);

    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    pub fn longest_gap(&self) -> Duration {
        Duration::from_nanos(self.longest_gap_ns.load(Ordering::Relaxed))
    }

    /// Gaps longer than [`Live::GAP`] so far: (when each ended, its length).
    pub fn gaps(&self) -> Vec<(Instant, Duration)> {
        self.gaps.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn arrived(&self, gap: Option<(Instant, Duration)>) {
        self.records.fetch_add(1, Ordering::Relaxed);
        if let Some((at, gap)) = gap {
            self.longest_gap_ns
                .fetch_max(gap.as_nanos() as u64, Ordering::Relaxed);
            if gap > Self::GAP {
                if let Ok(mut g) = self.gaps.lock() {
                    g.push((at, gap));
                }
            }
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn payload_byte(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8
}

/// Writes `spec.records()` records at the pace of `spec.rate_bps`, then shuts the write side.
/// A sender that is held up (the connection stalls) catches up when it can, as a live
/// encoder's buffer would. Returns the records sent.
pub fn send(w: &mut TcpStream, spec: &Spec) -> io::Result<u64> {
    let _ = w.set_write_timeout(Some(STALL_LIMIT));
    let record = spec.record.max(32);
    let interval = spec.interval();
    let mut buf = vec![0u8; record];
    let start = Instant::now();
    let start_ns = now_ns();
    let n = spec.records();
    for seq in 0..n {
        let offset = interval.mul_f64(seq as f64);
        let due = start + offset;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        buf[..4].copy_from_slice(&MAGIC.to_be_bytes());
        buf[4..12].copy_from_slice(&seq.to_be_bytes());
        // The time the record fell due, not when the sender got to write it: a record held up
        // behind a stall counts its whole wait.
        let due_ns = start_ns + offset.as_nanos() as u64;
        buf[12..20].copy_from_slice(&due_ns.to_be_bytes());
        for (i, b) in buf[HEADER..].iter_mut().enumerate() {
            *b = payload_byte(seq, i);
        }
        w.write_all(&buf)?;
    }
    w.shutdown(std::net::Shutdown::Write)?;
    Ok(n)
}

/// A stream that moves nothing for this long is reported broken instead of waited for.
pub const STALL_LIMIT: Duration = Duration::from_secs(20);

/// Reads records until the sender closes, checking each; `live` (if any) follows along.
pub fn receive(r: &mut TcpStream, record: usize, live: Option<&Live>) -> Report {
    let _ = r.set_read_timeout(Some(STALL_LIMIT));
    let record = record.max(32);
    let mut buf = vec![0u8; record];
    let mut rep = Report {
        records: 0,
        bytes: 0,
        intact: true,
        error: None,
        longest_gap: Duration::ZERO,
        longest_gap_at: Duration::ZERO,
        worst_delay: Duration::ZERO,
        stalls: Vec::new(),
    };
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    loop {
        match read_record(r, &mut buf) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                rep.intact = false;
                rep.error = Some(format!("after {} records: {e}", rep.records));
                break;
            }
        }
        let arrived = Instant::now();
        let arrived_ns = now_ns();
        let seq = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
        let sent = u64::from_be_bytes(buf[12..20].try_into().expect("8 bytes"));
        let bad = if u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) != MAGIC {
            Some("bad magic".to_string())
        } else if seq != rep.records {
            Some(format!("record {seq} where {} was due", rep.records))
        } else if buf[HEADER..]
            .iter()
            .enumerate()
            .any(|(i, b)| *b != payload_byte(seq, i))
        {
            Some(format!("record {seq}: payload corrupted"))
        } else {
            None
        };
        if let Some(b) = bad {
            rep.intact = false;
            rep.error = Some(b);
            break;
        }
        rep.records += 1;
        rep.bytes += record as u64;
        let t0 = *first.get_or_insert(arrived);
        if let Some(l) = live {
            l.arrived(last.map(|prev| (arrived, arrived.duration_since(prev))));
        }
        if let Some(prev) = last {
            let gap = arrived.duration_since(prev);
            if gap > rep.longest_gap {
                rep.longest_gap = gap;
                rep.longest_gap_at = arrived.duration_since(t0);
            }
            if gap > Duration::from_millis(200) {
                rep.stalls.push((arrived.duration_since(t0), gap));
            }
        }
        last = Some(arrived);
        rep.worst_delay = rep
            .worst_delay
            .max(Duration::from_nanos(arrived_ns.saturating_sub(sent)));
    }
    rep
}

/// One whole record; false at a clean end (EOF at a record boundary).
fn read_record(r: &mut TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "record cut short",
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Which way the stream flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Server → client: a live video watched.
    Down,
    /// Client → server: a live streamer's feed to an ingest server.
    Up,
}

/// A stream under way between a client and a server namespace.
#[derive(Debug)]
pub struct Running {
    server: NsThread<io::Result<Option<Report>>>,
    client: NsThread<io::Result<Option<Report>>>,
    pub spec: Spec,
    live: Arc<Live>,
}

impl Running {
    /// Starts a server on `server_addr` in `server_ns` and a client connecting to it from
    /// `client_ns`; returns once both are started (the client may still be connecting).
    pub fn start(
        client_ns: &Netns,
        server_ns: &Netns,
        server_addr: SocketAddr,
        flow: Flow,
        spec: Spec,
    ) -> Result<Running> {
        if spec.rate_bps == 0 || spec.duration.is_zero() {
            return Err(Error::Config(format!(
                "stream {spec:?}: rate and duration must be greater than 0"
            )));
        }
        let listener = server_ns
            .enter(|| TcpListener::bind(server_addr))?
            .map_err(|e| Error::io(format!("listen on {server_addr}"), server_ns.name(), e))?;
        // accept(2) honours the receive timeout: a client that never connects fails the
        // stream instead of hanging it.
        socket2::SockRef::from(&listener)
            .set_read_timeout(Some(STALL_LIMIT))
            .map_err(|e| Error::io("listener timeout", server_ns.name(), e))?;
        let live = Arc::new(Live::default());
        let l = live.clone();
        let server = server_ns.thread(move || -> io::Result<Option<Report>> {
            let (mut s, _) = listener.accept()?;
            let _ = s.set_nodelay(true);
            match flow {
                Flow::Down => send(&mut s, &spec).map(|_| None),
                Flow::Up => Ok(Some(receive(&mut s, spec.record, Some(&l)))),
            }
        })?;
        let l = live.clone();
        let client = client_ns.thread(move || -> io::Result<Option<Report>> {
            let mut s = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
            let _ = s.set_nodelay(true);
            match flow {
                Flow::Down => Ok(Some(receive(&mut s, spec.record, Some(&l)))),
                Flow::Up => send(&mut s, &spec).map(|_| None),
            }
        })?;
        Ok(Running {
            server,
            client,
            spec,
            live,
        })
    }

    /// The receiver's view so far.
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// Waits for the end and returns the receiver's report.
    pub fn wait(self) -> Result<Report> {
        let io_err = |side: &str, e: io::Error| Error::io(format!("stream {side}"), "", e);
        let s = self
            .server
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
            .map_err(|e| io_err("server", e))?;
        let c = self
            .client
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
            .map_err(|e| io_err("client", e))?;
        s.or(c)
            .ok_or_else(|| io_err("receiver", io::Error::other("no report")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_over_loopback_is_paced_and_intact() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let spec = Spec {
            duration: Duration::from_millis(500),
            ..Spec::default()
        };
        let live = Arc::new(Live::default());
        let lv = live.clone();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            receive(&mut s, spec.record, Some(&lv))
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        assert_eq!(send(&mut c, &spec).unwrap(), 250);
        let took = started.elapsed();
        let rep = t.join().unwrap();
        assert!(rep.intact, "{:?}", rep.error);
        assert_eq!(rep.records, 250);
        assert!(took >= Duration::from_millis(490), "paced: {took:?}");
        assert!(rep.longest_gap < Duration::from_millis(100), "{rep:?}");
        assert_eq!(live.records(), 250);
        assert!(live.longest_gap() <= rep.longest_gap);
    }

    #[test]
    fn a_corrupted_or_missing_record_is_seen() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            receive(&mut s, 100, None)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let mut rec = vec![0u8; 100];
        rec[..4].copy_from_slice(&MAGIC.to_be_bytes());
        // Record 1 where 0 was due.
        rec[4..12].copy_from_slice(&1u64.to_be_bytes());
        c.write_all(&rec).unwrap();
        drop(c);
        let rep = t.join().unwrap();
        assert!(!rep.intact);
        assert!(rep.error.unwrap().contains("record 1 where 0"));
    }
}
