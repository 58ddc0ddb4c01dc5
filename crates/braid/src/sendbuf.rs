//! The MPTCP sockets' send buffer, bounded on sub-millisecond paths only (`mptcp_send_buffer =
//! "auto"`, the default).
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
//! I/O: one `MPTCP_FULL_INFO` read when the relay starts; for a bounded connection one more
//! every 100 ms while it moves at least 1 MiB between readings, backing off to every second
//! when it does not.

use std::time::Duration;

use braid_sys::sockopt::{mptcp_subflows, set_send_buffer};
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

/// One connection's governor between readings (`None`: nothing to do).
#[derive(Debug)]
pub struct Watch(Option<Governor>);

impl Watch {
    /// The first reading, made before the relay moves a byte (a transfer over the lab's
    /// unshaped links that started unbounded stalled within its first 100 ms, and bounding it
    /// 10 ms in was too late). Does nothing unless `mode` is [`SendBuffer::Auto`] (a fixed size
    /// is set when the socket is made) and the socket is MPTCP.
    pub fn start(s: &TcpStream, mode: SendBuffer, mptcp: bool) -> Watch {
        if mode != SendBuffer::Auto || !mptcp {
            return Watch(None);
        }
        let governor =
            slowest_rtt(s).and_then(|rtt| Governor::first(rtt).filter(|g| apply(s, rtt, g.size())));
        Watch(governor)
    }

    /// Runs beside the relay in a `select!` and never returns.
    pub async fn run(self, s: &TcpStream, moved: &Moved) -> ! {
        if let Some(mut governor) = self.0 {
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
