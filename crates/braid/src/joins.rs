//! A connection's extra subflows: holding a half-close until the kernel has opened them, and
//! counting them for the log.
//!
//! The in-kernel path manager opens a client's extra subflows from a worker that is scheduled
//! when the connection becomes fully established (for braid's 0-RTT connections: when the
//! Convert reply arrives), and `__mptcp_subflow_connect()` refuses to join unless the MPTCP
//! socket is still in `TCP_ESTABLISHED`. An application that sends its request and half-closes
//! at once (`nc -N`, uploads, many RPC clients) makes the relay call `shutdown(SHUT_WR)` within
//! microseconds of the reply; when that wins the race with the worker, the endpoint is marked
//! used, no MP_JOIN SYN is ever sent (`MPJoinSynTx` does not move) and the whole download runs
//! on one link. Measured here: 1 to 3 connections in 20 idle, 8 in 20 under load. Nothing can
//! add the subflow later (the socket is no longer `TCP_ESTABLISHED`), so the only cure is to
//! send the FIN after the worker has run, which `MPTCP_INFO` shows.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use braid_sys::sockopt::{MptcpInfo, mptcp_info};
use tokio::net::TcpStream;

/// How long a half-close waits at most. The worker normally runs within a millisecond of the
/// reply; the bound only matters on a machine so loaded that the FIN should not wait longer.
pub const HALF_CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Waits (at most `bound`) until the path manager has opened every extra subflow it is going
/// to open for `s`. Returns at once for plain TCP, for connections that fell back, and for
/// connections whose subflows are already there; so it costs one getsockopt per half-close.
pub async fn settle(s: &TcpStream, bound: Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    // Whether the initial subflow's own address is a `subflow` endpoint (asked only if needed).
    let mut initial_is_endpoint = None;
    loop {
        let Ok(info) = mptcp_info(s) else {
            return; // not MPTCP, or already closed: nothing to wait for
        };
        if info.fell_back() {
            return;
        }
        match progress(&info) {
            Progress::Done => return,
            Progress::OneShort => {
                if initial_is_endpoint.is_none() {
                    initial_is_endpoint = Some(is_subflow_endpoint(s.local_addr().ok()).await);
                }
                if initial_is_endpoint == Some(true) {
                    return;
                }
            }
            Progress::Waiting => {}
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!(
                local_addr_used = info.local_addr_used,
                local_addr_max = info.local_addr_max,
                subflows = info.subflows,
                "half-close sent before the path manager opened every subflow"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    Done,
    Waiting,
    /// Done if the initial subflow's address is itself a `subflow` endpoint.
    OneShort,
}

/// The worker's loop (`mptcp_pm_create_subflow_or_signal_addr()`) runs until every `subflow`
/// endpoint is used or the subflow limit is reached. An endpoint whose address is the initial
/// subflow's is accounted as ID 0 and never counted in `local_addr_used`, so then the loop ends
/// one short of `local_addr_max`.
fn progress(info: &MptcpInfo) -> Progress {
    if info.subflows >= info.subflows_max || info.local_addr_used >= info.local_addr_max {
        Progress::Done
    } else if info.local_addr_used + 1 == info.local_addr_max {
        Progress::OneShort
    } else {
        Progress::Waiting
    }
}

/// One netlink dump of the endpoints; only asked when the count is one short, which in a
/// set-up without an endpoint on the initial subflow's address lasts until the worker runs.
async fn is_subflow_endpoint(local: Option<SocketAddr>) -> bool {
    let Some(local) = local else {
        return false;
    };
    let Ok(mut pm) = braid_sys::pm::PathManager::new() else {
        return false;
    };
    match pm.endpoints().await {
        Ok(eps) => eps
            .iter()
            .any(|e| e.flags.subflow && e.addr.to_canonical() == local.ip().to_canonical()),
        Err(_) => false,
    }
}

/// The most subflows a connection had at once. The kernel reports only the current count and
/// subflows close before the connection does, so it is sampled while the relay runs: one
/// getsockopt a second, nothing per byte.
#[derive(Debug)]
pub struct SubflowPeak {
    /// Whether the socket is MPTCP at all (plain TCP or fallback: nothing to sample, count 0).
    mptcp: bool,
    peak: AtomicU8,
}

impl SubflowPeak {
    pub fn new(mptcp: bool) -> SubflowPeak {
        SubflowPeak {
            mptcp,
            peak: AtomicU8::new(0),
        }
    }

    /// Whether the socket is MPTCP (checked once, at accept).
    pub fn mptcp(&self) -> bool {
        self.mptcp
    }

    fn sample(&self, s: &TcpStream) {
        if let Ok(info) = mptcp_info(s) {
            self.peak.fetch_max(info.subflows_total, Relaxed);
        }
    }

    /// Samples 200 ms in (subflows appear once the connection carries data), then after 1, 2,
    /// 4 ... seconds, at most every 30 s: a long idle connection should not wake the daemon
    /// every second (ten thousand of them would be ten thousand wake-ups a second). Never
    /// returns, so it runs beside the relay in a `select!`.
    pub async fn watch(&self, s: &TcpStream) -> ! {
        if !self.mptcp {
            std::future::pending().await
        }
        let mut pause = Duration::from_millis(200);
        loop {
            tokio::time::sleep(pause).await;
            self.sample(s);
            pause = (pause * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        }
    }

    /// The peak after a last sample: at least 1 (the initial subflow) for an MPTCP connection,
    /// 0 otherwise.
    pub fn get(&self, s: &TcpStream) -> u8 {
        if !self.mptcp {
            return 0;
        }
        self.sample(s);
        self.peak.load(Relaxed).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(subflows: u8, subflows_max: u8, used: u8, max: u8) -> MptcpInfo {
        let mut i = MptcpInfo::default();
        i.subflows = subflows;
        i.subflows_max = subflows_max;
        i.local_addr_used = used;
        i.local_addr_max = max;
        i
    }

    #[test]
    fn done_when_endpoints_or_limit_are_used_up() {
        use Progress::*;
        assert_eq!(progress(&info(0, 0, 0, 2)), Done); // no subflows allowed
        assert_eq!(progress(&info(0, 8, 0, 0)), Done); // no subflow endpoints
        assert_eq!(progress(&info(1, 8, 1, 1)), Done); // the one endpoint used
        assert_eq!(progress(&info(2, 2, 2, 3)), Done); // limit reached
        assert_eq!(progress(&info(0, 8, 0, 2)), Waiting); // worker not run yet
        assert_eq!(progress(&info(1, 8, 1, 3)), Waiting);
        assert_eq!(progress(&info(0, 8, 0, 1)), OneShort);
        assert_eq!(progress(&info(1, 8, 1, 2)), OneShort);
    }
}
