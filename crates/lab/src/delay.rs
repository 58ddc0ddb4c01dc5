//! One-way delay lines in user space (this kernel has no netem). A line owns what it adds to
//! one link end to hold the packets leaving it: a TAP device beside the interface, a tc
//! `clsact` egress filter that redirects the interface's outgoing packets into that TAP, a
//! thread that keeps each packet for its delay, and a packet socket that sends it on out of
//! the interface. [`Delay`] is the setting, [`DelayStats`] what a line has done.
//!
//! ```text
//!  stack ─ nft (loss, blackhole) ─ clsact egress ─┬─ mark? ─ root qdisc (tbf) ─ veth ─▶ peer
//!                                                 └─ TAP ─ thread (delay) ─ packet socket ─┘
//! ```
//!
//! The packet socket marks what it sends with [`RELEASE_MARK`], and the filter lets marked
//! packets through, so released packets go on to the qdisc instead of round again. The veth
//! itself is untouched: carrier, down/up and shaping behave as without a delay, and the
//! namespace's other interfaces see nothing. Frames cross user space with their virtio-net
//! header, so GSO packets and partial checksums stay as the stack made them.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::BuildHasher as _;
use std::io::{ErrorKind, Read as _};
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;
use socket2::Socket;

use crate::error::{Error, Result};
use crate::netns::Netns;
use braid_sys::rawio::{self, VNET_HDR_LEN};

/// `SO_MARK` of the packets a delay line sends on; the line's filter lets packets with this
/// mark pass. The mark is cleared when a packet crosses into the peer's namespace.
pub const RELEASE_MARK: u32 = 0x0b1a_de1a;

/// tc filter preference of the redirect, so it can be deleted on its own.
const FILTER_PREF: &str = "49";
/// Longest delay accepted; anything longer is a mistake in a test.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// Bytes a line may hold before it drops new arrivals (1.3 s at 800 Mbit/s, 100 ms at
/// 10 Gbit/s): a bound on memory, well above what a shaped link keeps in flight.
const QUEUE_LIMIT_BYTES: usize = 128 << 20;
/// The packet socket's send buffer: large, so that a full tbf queue drops packets (as it
/// would on a real link) before the socket would make the line wait.
const SNDBUF_BYTES: usize = 64 << 20;
/// A TAP frame is at most one 64 KiB GSO packet with its headers.
const FRAME_BUF: usize = 64 * 1024 + 1024;
/// Frames up to this size are copied out of the read buffer; bigger ones keep it.
const SMALL_FRAME: usize = 2048;
/// Read buffers kept for reuse (about 6.5 MiB).
const POOL_MAX: usize = 100;
/// Frames read per turn before the line looks at what is due.
const READ_BATCH: usize = 64;
/// How long an idle line sleeps before it looks at its stop flag again.
const IDLE_POLL: Duration = Duration::from_millis(10);
/// The TAP's queue towards user space (tun's default is 500 frames).
const TAP_QUEUE_LEN: &str = "10000";

/// The delay of the packets leaving one link end.
///
/// Each packet is held for a time drawn uniformly from `delay - jitter ..= delay + jitter`,
/// but never released before the packet ahead of it: as on a real link, order is kept, so
/// release time = max(previous release, arrival + delay + jitter sample). Under load the
/// effective delay therefore leans towards `delay + jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delay {
    /// Mean one-way delay.
    pub delay: Duration,
    /// Half-width of the uniform jitter around `delay`; at most `delay`.
    pub jitter: Duration,
}

impl Delay {
    /// No delay: setting it removes the delay line.
    pub const NONE: Delay = Delay {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
    };

    /// A fixed one-way delay, without jitter.
    pub fn new(delay: Duration) -> Delay {
        Delay {
            delay,
            jitter: Duration::ZERO,
        }
    }

    /// `delay` milliseconds, without jitter.
    pub fn ms(delay: u64) -> Delay {
        Delay::new(Duration::from_millis(delay))
    }

    /// Adds uniform jitter of ± `jitter`.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Duration) -> Delay {
        self.jitter = jitter;
        self
    }

    /// Whether this is no delay at all.
    pub fn is_none(&self) -> bool {
        self.delay.is_zero() && self.jitter.is_zero()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.delay > MAX_DELAY {
            return Err(Error::Config(format!(
                "delay {:?} is longer than {MAX_DELAY:?}",
                self.delay
            )));
        }
        if self.jitter > self.delay {
            return Err(Error::Config(format!(
                "jitter {:?} is larger than the delay {:?}",
                self.jitter, self.delay
            )));
        }
        Ok(())
    }
}

impl From<Duration> for Delay {
    fn from(delay: Duration) -> Delay {
        Delay::new(delay)
    }
}

/// What one delay line has done since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DelayStats {
    /// Packets sent on (a GSO packet counts once).
    pub packets: u64,
    /// Their bytes, Ethernet headers included.
    pub bytes: u64,
    /// Packets dropped: line full, or refused by the interface (full tbf queue, link down).
    pub dropped: u64,
    /// Packets held right now.
    pub queued: usize,
    /// The latest any packet was sent after its release time (thread scheduling, timers).
    pub max_late: Duration,
}

/// Run state of the thread.
const RUN: u8 = 0;
/// Send what is left (the filter is gone, so nothing new arrives), then stop.
const DRAIN: u8 = 1;
/// Stop at once; what is held is lost.
const ABORT: u8 = 2;

/// State shared by a [`DelayLine`] handle and its thread.
#[derive(Debug, Default)]
struct Shared {
    delay_ns: AtomicU64,
    jitter_ns: AtomicU64,
    mode: AtomicU8,
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicUsize,
    max_late_ns: AtomicU64,
}

impl Shared {
    fn set(&self, d: Delay) {
        self.jitter_ns.store(nanos(d.jitter), Ordering::Relaxed);
        self.delay_ns.store(nanos(d.delay), Ordering::Relaxed);
    }

    fn get(&self) -> Delay {
        Delay {
            delay: Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed)),
            jitter: Duration::from_nanos(self.jitter_ns.load(Ordering::Relaxed)),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The delay line of one interface; see the module docs. Dropping it stops the thread at
/// once (for namespace teardown); [`DelayLine::remove`] takes it away from a live link.
#[derive(Debug)]
pub(crate) struct DelayLine {
    ifname: String,
    tap: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DelayLine {
    /// Puts a delay line on `ifname` in `ns`.
    pub(crate) fn start(ns: &Netns, ifname: &str, delay: Delay) -> Result<DelayLine> {
        let name = ifname.to_string();
        let ifindex = ns
            .enter(|| nix::net::if_::if_nametoindex(name.as_str()))?
            .map_err(|e| Error::io(format!("find interface {ifname}"), ns.name(), e.into()))?;
        // Named after the interface's index, which is unique within the namespace.
        let tap = format!("dly{ifindex}");
        let (file, sock) = ns
            .enter(|| {
                let file = rawio::open_tap(&tap)?;
                let sock = rawio::packet_sender(ifindex, RELEASE_MARK, SNDBUF_BYTES)?;
                Ok::<_, std::io::Error>((file, sock))
            })?
            .map_err(|e| Error::io(format!("open delay line for {ifname}"), ns.name(), e))?;

        let shared = Arc::new(Shared::default());
        shared.set(delay);
        shared.mode.store(RUN, Ordering::Relaxed);
        let thread = {
            let shared = shared.clone();
            // Thread names are cut at 15 bytes by the kernel.
            let tname: String = format!("dly:{ifname}").chars().take(15).collect();
            std::thread::Builder::new()
                .name(tname)
                .spawn(move || run(&file, &sock, &shared))
                .map_err(|e| Error::io("spawn delay thread", ns.name(), e))?
        };
        let line = DelayLine {
            ifname: ifname.to_string(),
            tap: tap.clone(),
            shared,
            thread: Some(thread),
        };
        // From here on `line` owns the thread and the TAP: an error drops it, which stops both.
        // The TAP must never send anything of its own (its frames would be taken for the
        // link's), so it gets no IPv6 (IPv4 without an address is silent already).
        ns.sysctl(&format!("net.ipv6.conf.{tap}.disable_ipv6"), 1)?;
        ns.ip(&[
            "link",
            "set",
            "dev",
            &tap,
            "txqueuelen",
            TAP_QUEUE_LEN,
            "up",
        ])?;
        match ns.tc(&["qdisc", "add", "dev", ifname, "clsact"]) {
            Ok(_) => {}
            // Already there (an earlier line on this interface left it, or a test added it).
            Err(Error::Command { stderr, .. })
                if stderr.contains("File exists") || stderr.contains("Exclusivity") => {}
            Err(e) => return Err(e),
        }
        ns.tc(&[
            "filter",
            "add",
            "dev",
            ifname,
            "egress",
            "pref",
            FILTER_PREF,
            "bpf",
            "bytecode",
            &mark_filter_bytecode(RELEASE_MARK),
            "action",
            "mirred",
            "egress",
            "redirect",
            "dev",
            &tap,
        ])?;
        tracing::debug!(ns = %ns, ifname, tap, ?delay, "delay line started");
        Ok(line)
    }

    /// Changes the delay; packets already held keep their release times.
    pub(crate) fn set(&self, delay: Delay) {
        self.shared.set(delay);
    }

    /// The current setting.
    pub(crate) fn delay(&self) -> Delay {
        self.shared.get()
    }

    pub(crate) fn stats(&self) -> DelayStats {
        let s = &self.shared;
        DelayStats {
            packets: s.packets.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed),
            max_late: Duration::from_nanos(s.max_late_ns.load(Ordering::Relaxed)),
        }
    }

    /// Takes the line off a live interface without reordering what it holds: new packets are
    /// released at once (behind the held ones), the held ones at their times; when none are
    /// left the filter goes, and the thread sends what is still in the TAP and stops. Only the
    /// few packets in the TAP at that instant can be overtaken by the first direct ones.
    pub(crate) fn remove(mut self, ns: &Netns) -> Result<()> {
        let old = self.shared.get();
        self.shared.set(Delay::NONE);
        let deadline = Instant::now() + old.delay + old.jitter + Duration::from_secs(1);
        while self.shared.queued.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = self.remove_filter(ns);
        // Stop in any case: with the filter still there (namespace gone), there is nothing
        // left to carry.
        self.shared.mode.store(DRAIN, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::debug!(ns = %ns, ifname = %self.ifname, tap = %self.tap, "delay line removed");
        r
    }

    fn remove_filter(&self, ns: &Netns) -> Result<()> {
        ns.tc(&[
            "filter",
            "del",
            "dev",
            &self.ifname,
            "egress",
            "pref",
            FILTER_PREF,
        ])?;
        // The clsact qdisc was only there for this filter, unless someone added others.
        let left = ns.tc(&["filter", "show", "dev", &self.ifname, "egress"])?
            + &ns.tc(&["filter", "show", "dev", &self.ifname, "ingress"])?;
        if left.trim().is_empty() {
            ns.tc(&["qdisc", "del", "dev", &self.ifname, "clsact"])?;
        }
        Ok(())
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.shared.mode.store(ABORT, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // At most one IDLE_POLL.
            let _ = t.join();
        }
    }
}

/// Classic BPF for `tc filter ... bpf bytecode`: match (return -1) every packet whose mark is
/// not `mark`; packets with it do not match and pass on to the qdisc.
fn mark_filter_bytecode(mark: u32) -> String {
    // ld [SKF_AD_OFF + SKF_AD_MARK]; jeq #mark, +0, +1; ret #0; ret #-1
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let skf_ad_mark = (libc::SKF_AD_OFF + libc::SKF_AD_MARK) as u32;
    format!(
        "4,{LD_W_ABS} 0 0 {skf_ad_mark},{JEQ_K} 0 1 {mark},{RET_K} 0 0 0,{RET_K} 0 0 {}",
        u32::MAX
    )
}

/// One held frame: virtio-net header and Ethernet frame, `len` bytes of `buf`.
struct Frame {
    release: Instant,
    buf: Vec<u8>,
    len: usize,
}

/// Small, fast, good enough for jitter (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The line's thread: read what the TAP has, send what is due, sleep until the next of the
/// two. One thread per delayed direction.
fn run(tap: &File, sock: &Socket, shared: &Shared) {
    // The default 50 µs timer slack would be most of the timing error.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    // Timing must not depend on how busy the test keeps the machine (two cores here, often
    // both saturated by the transfers the test runs). Without it, packets were held up to a
    // scheduler slice (~10 ms) too long under load; with it, about 2 ms at most.
    if let Err(e) = rawio::set_realtime() {
        tracing::debug!(error = %e, "delay line: no real-time priority");
    }
    let mut rng = Rng(RandomState::new().hash_one(std::thread::current().id()));
    let mut held: VecDeque<Frame> = VecDeque::new();
    let mut held_bytes = 0_usize;
    let mut last_release = Instant::now();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0_u8; FRAME_BUF];
    let mut logged_send_error = false;
    loop {
        let mode = shared.mode.load(Ordering::Relaxed);
        if mode == ABORT {
            break;
        }
        let mut drained = false;
        for _ in 0..READ_BATCH {
            match (&*tap).read(&mut buf) {
                Ok(n) if n >= buf.len() || n < VNET_HDR_LEN => {
                    // Truncated or malformed: never send half a frame.
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) => {
                    let now = Instant::now();
                    if held_bytes + n > QUEUE_LIMIT_BYTES {
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let delay = shared.delay_ns.load(Ordering::Relaxed);
                    let jitter = shared.jitter_ns.load(Ordering::Relaxed);
                    // The two are stored apart: a change while traffic runs may pair a new
                    // jitter with the old delay for a packet, so clamp rather than trust it.
                    let jitter = jitter.min(delay);
                    let hold = if jitter == 0 {
                        delay
                    } else {
                        // Uniform in delay - jitter ..= delay + jitter.
                        delay - jitter + rng.next() % (2 * jitter + 1)
                    };
                    let release = (now + Duration::from_nanos(hold)).max(last_release);
                    last_release = release;
                    let frame_buf = if n <= SMALL_FRAME {
                        buf[..n].to_vec()
                    } else {
                        let fresh = pool.pop().unwrap_or_else(|| vec![0; FRAME_BUF]);
                        std::mem::replace(&mut buf, fresh)
                    };
                    held_bytes += n;
                    held.push_back(Frame {
                        release,
                        buf: frame_buf,
                        len: n,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // The TAP went away under us: the namespace is being deleted.
                    tracing::debug!(error = %e, "delay line: TAP read failed, stopping");
                    return;
                }
            }
        }

        let now = Instant::now();
        while held.front().is_some_and(|f| f.release <= now) {
            let Some(f) = held.pop_front() else { break };
            held_bytes -= f.len;
            let late = now.saturating_duration_since(f.release);
            shared.max_late_ns.fetch_max(nanos(late), Ordering::Relaxed);
            match sock.send(&f.buf[..f.len]) {
                Ok(_) => {
                    shared.packets.fetch_add(1, Ordering::Relaxed);
                    shared
                        .bytes
                        .fetch_add((f.len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    // ENOBUFS (tbf queue full), ENETDOWN / ENXIO (link down), EAGAIN (send
                    // buffer full): a real link would lose the packet too.
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    if !logged_send_error {
                        tracing::debug!(error = %e, "delay line: send failed, packet dropped");
                        logged_send_error = true;
                    }
                }
            }
            if f.buf.len() == FRAME_BUF && pool.len() < POOL_MAX {
                pool.push(f.buf);
            }
        }
        shared.queued.store(held.len(), Ordering::Relaxed);
        if mode == DRAIN && drained && held.is_empty() {
            break;
        }
        if !drained {
            continue;
        }
        let wait = match held.front() {
            Some(f) => f.release.saturating_duration_since(Instant::now()),
            None => IDLE_POLL,
        };
        if wait.is_zero() {
            continue;
        }
        let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
        let _ = ppoll(&mut fds, Some(TimeSpec::from(wait.min(IDLE_POLL))), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_everything_but_the_mark() {
        assert_eq!(
            mark_filter_bytecode(0x0b1a_de1a),
            "4,32 0 0 4294963220,21 0 1 186310170,6 0 0 0,6 0 0 4294967295"
        );
    }

    #[test]
    fn delay_validation() {
        assert!(Delay::ms(10).validate().is_ok());
        assert!(
            Delay::ms(10)
                .with_jitter(Duration::from_millis(10))
                .validate()
                .is_ok()
        );
        assert!(
            Delay::ms(10)
                .with_jitter(Duration::from_millis(11))
                .validate()
                .is_err()
        );
        assert!(Delay::new(Duration::from_secs(61)).validate().is_err());
        assert!(Delay::NONE.is_none());
        assert_eq!(Delay::from(Duration::from_millis(3)), Delay::ms(3));
    }

    #[test]
    fn rng_spreads() {
        let mut r = Rng(1);
        let v: Vec<u64> = (0..1000).map(|_| r.next() % 11).collect();
        for k in 0..11 {
            let n = v.iter().filter(|&&x| x == k).count();
            assert!((50..150).contains(&n), "{k}: {n}");
        }
    }
}
