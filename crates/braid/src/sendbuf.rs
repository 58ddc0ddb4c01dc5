//! The MPTCP sockets' send buffer, bounded on sub-millisecond paths only (`mptcp_send_buffer =
//! "auto"`, the default), and what such a bound needs beside it: a sender stuck on the kernel's
//! missing data acknowledgement gets one write past it, and the receive buffer is fixed.
//!
//! Kernel reason (6.18; docs/architecture.md, kernel workarounds): at tens of Gbit/s over a
//! sub-millisecond path, the MPTCP receiver can announce more window than its buffer holds.
//! Data sent into the excess is acknowledged at TCP level and then dropped
//! (`MPTcpExtNoDSSInWindow`); only the sender's MPTCP-level retransmission timer (200 ms,
//! backing off) fills the hole, so the transfer stands still for 0.1–1.4 s at a time. The
//! kernel's autotuning lets each subflow's send buffer grow to `tcp_wmem[2]` (4 MiB here, so
//! 8 MiB for two subflows) although such a path holds a few hundred KiB in flight; a 1 MiB
//! `SO_SNDBUF` keeps the sender inside what the receiver can take and removed the stalls —
//! provided it is there before the first byte: bounded 10 ms or 100 ms into the transfer,
//! transfers still stalled in their first 200 ms, and some never recovered (0.2 Gbit/s for the
//! whole run).
//!
//! A bound is wrong on other paths, whatever its size: `SO_SNDBUF` on an MPTCP socket gives
//! *every subflow* that buffer, while autotuning sizes each subflow to its own congestion
//! window, and the lock cannot be undone (the kernel has no call to give a locked buffer back
//! to autotuning). Bonding 10 + 20 + 50 Mbit/s got 65–72 % of the sum with 1 MiB and also with
//! 4 MiB, against ≥ 90 % autotuned.
//!
//! The path is known before the first byte only by its RTT (the handshake's), so that decides:
//! under [`SHORT_US`], the path is a data centre's or a LAN's, and the gateway's uplinks do not
//! cross it (an uplink to a converter across the Internet has a round trip of milliseconds:
//! DSL 5–20, LTE 20–60, even fibre 1–5); the buffer is bounded from then on, sized for [`RATE`]
//! at the slowest subflow's RTT but at least [`FLOOR`], changing only when [`AGREE`] readings
//! in a row ask for it. Any other path is left to the kernel's autotuning for good.
//!
//! A bound has a price the kernel's own bug sets (6.18): the receiver may never send the data
//! acknowledgement for the last data it took. Its subflows acknowledge segments at TCP level as
//! they arrive; when the MPTCP socket is busy (its reader holds it) or full, the data waits on
//! the socket's backlog and the acknowledgement carries the old data sequence number. The
//! reader later takes the backlog in, but the acknowledgement that would announce it is sent
//! only if the free receive space has doubled since the last one (`mptcp_cleanup_rbuf()`; after
//! the release callback's backlog spooling it is called with `copied = 0` and sends nothing).
//! A sender whose bounded buffer is full of such data has nothing more to send, the receiver
//! has nothing to answer, and only the MPTCP retransmission timer (200 ms, then 400, 800)
//! breaks the silence. Traced (`mptcp:ack_update_msk` at the converter): in both stalls of 20
//! downloads the last 18–33 acknowledgements moved the data acknowledgement by 0, with 3.9 and
//! 6.9 MB of window left and the 2 MiB buffer full; the next one came 203 ms later and covered
//! all 1.8 and 2.1 MB at once. So a write that waits [`STUCK_AFTER`] looks: MPTCP-level data
//! unacknowledged while no subflow has a segment in flight is that state ([`stuck`]); then
//! [`nudge`] lets one write past the bound, whose new data draws a fresh acknowledgement, and
//! the bound is put back at once ([`restore`]).
//!
//! The same bug stalls the start of a transfer towards a socket whose receive buffer is still
//! small: the converter's accepted sockets start at `tcp_rmem[1]` (128 KiB), so an upload's
//! first window is about 100 KiB; the sender fills it, the converter's relay reads it all, and
//! the window update that would follow is not sent (the same rule), so the sender, held back by
//! the window and not by its buffer (a write past the bound would not help), waits for its
//! 200 ms timer: 5 of 30 one-stream uploads on the lab's unshaped links. A bounded connection's
//! socket therefore also gets a fixed receive buffer of [`RECEIVE`], as the gateway's client
//! socket has from the start, so the window opens above anything the bounded sender can have
//! in flight (0 of 30). Fixed is right on such a path only: a sub-millisecond round trip needs
//! a few hundred KiB even at 20 Gbit/s, and no other path is bounded. Its CPU price on the
//! converter's uploads, if any, is within the noise of the measurements (docs/architecture.md).
//!
//! I/O: one `MPTCP_FULL_INFO` read when the relay starts; for a bounded connection one more
//! every 100 ms while it moves at least 1 MiB between readings, backing off to every second
//! when it does not; one more each time a write into a bounded socket has waited
//! [`STUCK_AFTER`].

use std::time::Duration;

use braid_sys::sockopt::{SubflowInfo, mptcp_full, mptcp_subflows, send_buffer, set_send_buffer};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use crate::config::SendBuffer;
use crate::relay::Moved;

/// A path with a shorter handshake RTT (microseconds) is bounded.
pub const SHORT_US: u32 = 1_000;
/// The rate the buffer must allow at the path's RTT: 2.5 GB/s, 20 Gbit/s.
pub const RATE: u64 = 2_500_000_000;
/// The smallest buffer braid sets: what removed the stalls on the lab's unshaped links.
pub const FLOOR: usize = 1 << 20;
/// The largest: the kernel's own autotuning maximum (`tcp_wmem[2]` by default).
pub const CEILING: usize = 4 << 20;
/// Readings in a row that must agree before a bounded buffer changes size: a subflow's RTT
/// jumps for a reading or two (slow start's burst, a join's first samples: 5 ms seen on the
/// lab's 0.1 ms path); a queue that builds on a link lasts for seconds.
pub const AGREE: u8 = 3;

/// How long a write into a bounded socket waits before the relay looks for a [`stuck`] sender:
/// on a path of under a millisecond (the only kind bounded), many round trips.
pub const STUCK_AFTER: Duration = Duration::from_millis(5);
/// What a [`nudge`] adds to the bound for one write (the kernel doubles it, as the bound).
/// One segment would draw the acknowledgement; this much lets the write through even when the
/// queue holds a little more than the bound.
pub const NUDGE: usize = 512 << 10;

/// The receive buffer of a bounded connection's MPTCP socket (the kernel doubles it), and the
/// one the gateway's Convert client sets before it connects (`client.rs`); its window, about
/// 6 MB, is above what a sender bounded at [`FLOOR`] can have in flight, a nudge included
/// (2 MiB here left a nudged sender window-bound: 1 of 30 uploads stood still).
pub const RECEIVE: usize = 4 << 20;

/// Nudges so far in this process (both daemons' metrics, `mptcp_ack_nudges_total`).
static NUDGES: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);

/// Registers the process's nudge counter (`mptcp_ack_nudges_total`) in a daemon's registry:
/// how often the kernel's receiver left a sender waiting on a data acknowledgement.
pub fn register_nudges(r: &mut prometheus_client::registry::Registry) {
    r.register(
        "mptcp_ack_nudges",
        "Writes let past a bounded MPTCP send buffer because the kernel's MPTCP receiver left \
         the sender waiting for a data acknowledgement (each would have been a 200 ms stall)",
        NUDGES.clone(),
    );
}

const FAST: Duration = Duration::from_millis(100);
const SLOW: Duration = Duration::from_secs(1);
/// Bytes moved between two readings that keep the readings at [`FAST`].
const BUSY: u64 = 1 << 20;

/// The buffer a path with this smoothed RTT (microseconds) needs.
pub fn wanted(srtt_us: u32) -> usize {
    let bytes = RATE * u64::from(srtt_us) / 1_000_000;
    (bytes.min(CEILING as u64) as usize).max(FLOOR)
}

/// Follows a bounded connection's slowest subflow RTT and says when to resize.
#[derive(Debug)]
pub struct Governor {
    /// What braid set.
    set: usize,
    /// Readings in a row that asked for a change.
    streak: u8,
}

impl Governor {
    /// The decision at the handshake's RTT: a governor and the size to set on a short path,
    /// `None` (the kernel's autotuning, for good) on any other.
    pub fn first(srtt_us: u32) -> Option<Governor> {
        (srtt_us < SHORT_US).then(|| Governor {
            set: wanted(srtt_us),
            streak: 0,
        })
    }

    /// The size in effect.
    pub fn size(&self) -> usize {
        self.set
    }

    /// A later reading: the size to set now, if any.
    pub fn observe(&mut self, srtt_us: u32) -> Option<usize> {
        let (want, c) = (wanted(srtt_us), self.set);
        // Half again more or half as much, [`AGREE`] times in a row.
        if want < c + c / 2 && want > c / 2 {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        (self.streak >= AGREE).then(|| {
            self.streak = 0;
            self.set = want;
            want
        })
    }
}

/// The slowest established subflow's smoothed RTT, microseconds (`None`: not MPTCP any more,
/// or no subflow established). Only subflows that have had data acknowledged count while one
/// has (the RTT is sampled on acknowledged data): a joined subflow on the accepting side, and
/// any subflow that only receives, reports 1 ms (`tcpi_rtt` and `tcpi_min_rtt`) until its
/// first sample, whatever its path (seen at the converter with the lab's 0.04 ms links),
/// which would make every short path look long.
fn slowest_rtt(s: &TcpStream) -> Option<u32> {
    let subflows = mptcp_subflows(s).ok()?;
    let established = || subflows.iter().filter(|f| f.state == 1);
    // The SYN counts one.
    let any_acked = established().any(|f| f.bytes_acked > 1);
    let pick = established()
        .filter(|f| !any_acked || f.bytes_acked > 1)
        .map(|f| f.rtt_us)
        .max();
    tracing::trace!(
        subflows = ?subflows.iter().map(|f| (f.state, f.rtt_us, f.bytes_acked, f.bytes_received)).collect::<Vec<_>>(),
        ?pick,
        "subflow RTTs"
    );
    pick
}

/// Sets `size` on `s`; false if the socket refused (then nothing more is tried).
fn apply(s: &TcpStream, srtt_us: u32, size: usize) -> bool {
    match set_send_buffer(s, size) {
        Ok(got) => {
            tracing::debug!(srtt_us, size, got, "MPTCP send buffer");
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "MPTCP send buffer not set");
            false
        }
    }
}

/// What an MPTCP sender's own socket says about its data (`MPTCP_INFO`), bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sending {
    /// Written and not acknowledged at MPTCP level (`write_seq − snd_una`).
    pub unacked: u64,
    /// Of those, not sent yet (`unacked − (bytes_sent − bytes_acked)`): more than 0 when the
    /// peer's MPTCP window, not the send buffer, holds the sender back.
    pub unsent: u64,
}

impl Sending {
    pub fn of(info: &braid_sys::sockopt::MptcpInfo) -> Sending {
        let unacked = info.write_seq.wrapping_sub(info.snd_una);
        let in_flight = info.bytes_sent.saturating_sub(info.bytes_acked);
        Sending {
            unacked,
            unsent: unacked.saturating_sub(in_flight),
        }
    }
}

/// Whether an MPTCP sender waits for a data acknowledgement its peer will not send, in a way
/// one more write can end: everything written was sent and some of it is unacknowledged at
/// MPTCP level, while no established subflow has a segment unacknowledged, so no subflow timer
/// runs and no acknowledgement is on its way (see the module docs). A sender whose peer's
/// window is merely full has its data acknowledged; one waiting on a slow link has segments in
/// flight; one held back by the peer's MPTCP window has data unsent, and a write past the
/// bound would only queue more behind it.
pub fn stuck(sending: Sending, subflows: &[SubflowInfo]) -> bool {
    let mut established = subflows.iter().filter(|f| f.state == 1).peekable();
    sending.unacked > 0
        && sending.unsent == 0
        && established.peek().is_some()
        && established.all(|f| f.unacked == 0)
}

/// If `s` is [`stuck`], raises its send buffer by [`NUDGE`] so that the caller's next write
/// goes through, and returns the size to [`restore`] right after it.
pub fn nudge(s: &TcpStream) -> Option<usize> {
    let (info, subflows) = mptcp_full(s).ok()?;
    let sending = Sending::of(&info);
    if !stuck(sending, &subflows) {
        tracing::trace!(
            ?sending,
            in_flight = subflows.iter().map(|f| f.unacked).sum::<u32>(),
            "a write waits; not stuck"
        );
        return None;
    }
    let bound = raise(s)?;
    let n = NUDGES.inc() + 1;
    tracing::debug!(
        unacked = sending.unacked,
        bound,
        nudges = n,
        "MPTCP sender stuck on an unsent data acknowledgement: one write past the bound"
    );
    Some(bound)
}

/// Raises the send buffer by [`NUDGE`]; the size set before.
fn raise(s: &TcpStream) -> Option<usize> {
    // What the kernel reports is twice what was set.
    let bound = send_buffer(s).ok()? / 2;
    set_send_buffer(s, bound + NUDGE).ok()?;
    Some(bound)
}

/// Puts back the bound [`nudge`] raised.
pub fn restore(s: &TcpStream, bound: usize) {
    if let Err(e) = set_send_buffer(s, bound) {
        tracing::debug!(error = %e, bound, "MPTCP send buffer not restored");
    }
}

/// One connection's governor between readings (`None`: nothing to do), and whether its send
/// buffer is bounded (by the governor or a fixed `mptcp_send_buffer`).
#[derive(Debug)]
pub struct Watch {
    governor: Option<Governor>,
    bounded: bool,
}

impl Watch {
    /// The first reading, made before the relay moves a byte (a transfer over the lab's
    /// unshaped links that started unbounded stalled within its first 100 ms, and bounding it
    /// 10 ms in was too late). Sets nothing unless `mode` is [`SendBuffer::Auto`] (a fixed size
    /// is set when the socket is made, and counts as bounded) and the socket is MPTCP. A socket
    /// bounded here gets its receive buffer fixed at [`RECEIVE`] too.
    pub fn start(s: &TcpStream, mode: SendBuffer, mptcp: bool) -> Watch {
        if mode != SendBuffer::Auto || !mptcp {
            let bounded = mptcp && matches!(mode, SendBuffer::Fixed(_));
            return Watch {
                governor: None,
                bounded,
            };
        }
        let governor =
            slowest_rtt(s).and_then(|rtt| Governor::first(rtt).filter(|g| apply(s, rtt, g.size())));
        if governor.is_some() {
            // The receiving side of a short path too (module docs): a window that starts
            // above what the peer's bounded sender can have in flight.
            if let Err(e) = socket2::SockRef::from(s).set_recv_buffer_size(RECEIVE) {
                tracing::debug!(error = %e, "MPTCP receive buffer not set");
            }
        }
        Watch {
            bounded: governor.is_some(),
            governor,
        }
    }

    /// The socket's send buffer is bounded: a write into it that waits may need a [`nudge`].
    pub fn bounded(&self) -> bool {
        self.bounded
    }

    /// Runs beside the relay in a `select!` and never returns.
    pub async fn run(self, s: &TcpStream, moved: &Moved) -> ! {
        if let Some(mut governor) = self.governor {
            let mut pause = FAST;
            let mut last = 0;
            loop {
                tokio::time::sleep(pause).await;
                let (a, b) = moved.get();
                pause = (pause * 2).min(if a + b - last >= BUSY { FAST } else { SLOW });
                last = a + b;
                let Some(rtt) = slowest_rtt(s) else { break };
                if let Some(size) = governor.observe(rtt) {
                    if !apply(s, rtt, size) {
                        break;
                    }
                }
            }
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subflow(state: u8, unacked: u32) -> SubflowInfo {
        let any = "127.0.0.1:1".parse().unwrap();
        SubflowInfo {
            local: any,
            remote: any,
            rtt_us: 50,
            min_rtt_us: 40,
            bytes_acked: 1 << 20,
            bytes_received: 0,
            state,
            backoff: 0,
            options: 0,
            unacked,
            total_retrans: 0,
            data_segs_out: 1000,
            rcv_ooopack: 0,
        }
    }

    fn sent(unacked: u64) -> Sending {
        Sending { unacked, unsent: 0 }
    }

    #[test]
    fn stuck_is_data_sent_and_unacknowledged_above_subflows_with_nothing_in_flight() {
        let idle = [subflow(1, 0), subflow(1, 0)];
        // The downloads' stall: the 2 MiB buffer full, all of it sent, TCP all acknowledged.
        assert!(stuck(sent(2_094_512), &idle));
        // Everything acknowledged (a full receive window included): nothing to wait for.
        assert!(!stuck(sent(0), &idle));
        // Segments in flight on any subflow: its acknowledgement, or its timer, will come.
        assert!(!stuck(sent(2_094_512), &[subflow(1, 0), subflow(1, 3)]));
        // Held back by the peer's window (uploads' first 100 KiB window at a transfer's
        // start): a write would only queue behind the unsent data.
        let windowed = Sending {
            unacked: 2_097_152,
            unsent: 1_989_000,
        };
        assert!(!stuck(windowed, &idle));
        // Only established subflows count; with none there is nothing a write could draw.
        assert!(stuck(sent(1), &[subflow(7, 40), subflow(1, 0)]));
        assert!(!stuck(sent(1), &[subflow(2, 1)]));
        assert!(!stuck(sent(1), &[]));
    }

    #[test]
    fn what_is_unsent_comes_from_the_byte_counters() {
        let info = |write_seq, snd_una, bytes_sent, bytes_acked| {
            let mut i = braid_sys::sockopt::MptcpInfo::default();
            (i.write_seq, i.snd_una, i.bytes_sent, i.bytes_acked) =
                (write_seq, snd_una, bytes_sent, bytes_acked);
            i
        };
        let s = Sending::of(&info(
            1_000 + 3_000_000,
            1_000 + 900_000,
            1_000_000,
            900_000,
        ));
        assert_eq!(s.unacked, 2_100_000);
        assert_eq!(s.unsent, 2_000_000);
        // Sequence numbers wrap; byte counters that disagree never make "unsent" negative.
        let wrapped = info(5, u64::MAX - 4, 10, 0);
        assert_eq!(
            Sending::of(&wrapped),
            Sending {
                unacked: 10,
                unsent: 0
            }
        );
    }

    /// A real MPTCP connection over loopback (root not needed; MPTCP must be enabled).
    async fn mptcp_pair() -> Option<(TcpStream, TcpStream)> {
        use socket2::{Domain, Protocol, Socket, Type};
        let l = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP)).ok()?;
        l.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .ok()?;
        l.listen(1).ok()?;
        let addr = l.local_addr().ok()?.as_socket()?;
        l.set_nonblocking(true).ok()?;
        let l = tokio::net::TcpListener::from_std(l.into()).ok()?;
        let c = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP)).ok()?;
        c.connect(&addr.into()).ok()?;
        c.set_nonblocking(true).ok()?;
        let c = TcpStream::from_std(c.into()).ok()?;
        let (s, _) = l.accept().await.ok()?;
        Some((c, s))
    }

    #[tokio::test]
    async fn a_loopback_connection_is_bounded_and_its_receive_buffer_fixed_from_the_start() {
        let (c, _s) = mptcp_pair()
            .await
            .expect("an MPTCP connection over loopback (net.mptcp.enabled = 1)");
        let autotuned = socket2::SockRef::from(&c).recv_buffer_size().unwrap();
        assert!(autotuned < 2 * RECEIVE, "{autotuned}");
        let watch = Watch::start(&c, SendBuffer::Auto, true);
        assert!(watch.bounded());
        assert_eq!(send_buffer(&c).unwrap(), 2 * FLOOR);
        let fixed = socket2::SockRef::from(&c).recv_buffer_size().unwrap();
        assert_eq!(fixed, 2 * RECEIVE);
        // Not MPTCP, or the kernel's autotuning asked for: nothing is touched.
        let (c2, _s2) = mptcp_pair().await.unwrap();
        let before = (
            send_buffer(&c2).unwrap(),
            socket2::SockRef::from(&c2).recv_buffer_size().unwrap(),
        );
        assert!(!Watch::start(&c2, SendBuffer::Kernel, true).bounded());
        assert!(!Watch::start(&c2, SendBuffer::Auto, false).bounded());
        let after = (
            send_buffer(&c2).unwrap(),
            socket2::SockRef::from(&c2).recv_buffer_size().unwrap(),
        );
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn a_connection_that_is_not_stuck_is_left_alone_and_a_raise_is_undone() {
        let (c, _s) = mptcp_pair()
            .await
            .expect("an MPTCP connection over loopback (net.mptcp.enabled = 1)");
        set_send_buffer(&c, FLOOR).unwrap();
        let bounded = send_buffer(&c).unwrap();
        assert_eq!(bounded, 2 * FLOOR);
        // Nothing sent, nothing unacknowledged.
        assert_eq!(nudge(&c), None);
        assert_eq!(send_buffer(&c).unwrap(), bounded);
        // The raise and its undoing, as a nudge does them around one write.
        assert_eq!(raise(&c), Some(FLOOR));
        assert_eq!(send_buffer(&c).unwrap(), 2 * (FLOOR + NUDGE));
        restore(&c, FLOOR);
        assert_eq!(send_buffer(&c).unwrap(), bounded);
    }

    #[test]
    fn wanted_covers_the_rate_at_the_rtt_within_bounds() {
        assert_eq!(wanted(0), FLOOR);
        assert_eq!(wanted(90), FLOOR); // the lab's unshaped veth under load
        assert_eq!(wanted(1_000), 2_500_000);
        assert_eq!(wanted(1_700), CEILING);
        assert_eq!(wanted(50_000), CEILING); // a shaped uplink's full queue
        assert_eq!(wanted(u32::MAX), CEILING);
    }

    #[test]
    fn a_path_of_a_millisecond_or_more_is_left_to_autotuning_for_good() {
        // Decided at the first reading: later short readings cannot change it, since an
        // unbounded path has no governor to read them.
        assert!(Governor::first(SHORT_US).is_none());
        assert!(Governor::first(20_000).is_none());
    }

    #[test]
    fn a_short_path_is_bounded_then_follows_its_rtt() {
        let mut g = Governor::first(60).expect("bounded");
        assert_eq!(g.size(), FLOOR);
        // Noise on a fast path, and a jump that does not last: no change.
        for rtt in [90, 300, 500, 20, 5_000, 5_400, 100, 5_000, 100] {
            assert_eq!(g.observe(rtt), None, "{rtt} µs");
        }
        // A queue builds: up once it has lasted, to the ceiling...
        assert_eq!(g.observe(800), None);
        assert_eq!(g.observe(900), None);
        assert_eq!(g.observe(800), Some(2_000_000));
        for rtt in [30_000, 50_000] {
            assert_eq!(g.observe(rtt), None, "{rtt} µs");
        }
        assert_eq!(g.observe(40_000), Some(CEILING));
        // ... and down again once it has drained.
        assert_eq!(g.observe(700), None);
        assert_eq!(g.observe(100), None);
        assert_eq!(g.observe(100), Some(FLOOR));
        assert_eq!(g.size(), FLOOR);
    }
}
