//! What one client, and all of them, may cost: connections in all and per client address, and
//! handshakes pending in all and per client prefix. Each admission is a guard that gives its
//! slot back when dropped, so every exit path of a connection releases what it took.
//!
//! A *pending handshake* is a connection whose request is not complete yet, or whose Error
//! (or Info) reply is being delivered. Well-behaved clients hold one for microseconds (their
//! request rides in the SYN) or, when refused, until they have read the Error and closed; slow
//! or stuck ones hold it until the handshake deadline. So pending slots are what a flood of
//! slow clients takes, and they are shared out per client prefix (an IPv4 /24 or IPv6 /48 by
//! default, what one subscriber or one attacker usually has): one prefix can take only its
//! share, and everybody else is still served.
//!
//! The upstream connect is counted apart, with a much larger share per prefix: a household
//! opening a thousand connections at once holds a thousand connects in flight, which is normal,
//! but a prefix sending complete requests to a blackholed destination must not hold the whole
//! connection table for the connect timeout.
//!
//! A connection slot (the total and the per-client count) is held from admission until the
//! connection ends or is refused; a refused connection then holds only a pending slot while
//! its Error is delivered, so a client refused for a missing cookie that reconnects at once
//! with one is not turned away by its own refusal, lingering until it closes.
//!
//! A refusal that finds no pending slot free is not lingered over: the Error is written only if
//! the client's handshake is already complete, and the connection is reset. A flood thus costs
//! a bounded amount.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use prometheus_client::metrics::gauge::Gauge;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitConfig {
    pub max_total: usize,
    pub max_per_client: usize,
    pub max_pending: usize,
    pub max_pending_per_prefix: usize,
    pub max_connecting_per_prefix: usize,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
}

#[derive(Debug)]
pub struct Limits {
    cfg: LimitConfig,
    total: AtomicUsize,
    pending: AtomicUsize,
    /// Mirrors `pending` for the metrics.
    pending_gauge: Gauge,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    per_client: HashMap<IpAddr, usize>,
    per_prefix: HashMap<IpNet, PrefixCounts>,
}

/// What one client prefix holds.
#[derive(Debug, Default, Clone, Copy)]
struct PrefixCounts {
    pending: usize,
    connecting: usize,
}

impl PrefixCounts {
    fn is_empty(&self) -> bool {
        self.pending == 0 && self.connecting == 0
    }
}

/// Which limit refused an admission (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Total,
    PerClient,
    Pending,
    PendingPerPrefix,
    ConnectingPerPrefix,
}

impl LimitHit {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::Total => "total",
            LimitHit::PerClient => "per_client",
            LimitHit::Pending => "pending",
            LimitHit::PendingPerPrefix => "pending_per_prefix",
            LimitHit::ConnectingPerPrefix => "connecting_per_prefix",
        }
    }
}

/// A counted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<Limits>,
    client: IpAddr,
}

/// A counted pending handshake; dropping it frees the slot.
#[derive(Debug)]
pub struct PendingSlot {
    limits: Arc<Limits>,
    prefix: IpNet,
}

/// A counted upstream connect in flight; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectingSlot {
    limits: Arc<Limits>,
    prefix: IpNet,
}

fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Limits {
    /// Limits as configured; `pending_gauge` follows the pending handshakes.
    pub fn new(cfg: LimitConfig, pending_gauge: Gauge) -> Arc<Limits> {
        Arc::new(Limits {
            cfg,
            total: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            pending_gauge,
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The prefix `client` is counted in.
    fn prefix_of(&self, client: IpAddr) -> IpNet {
        let len = match client {
            IpAddr::V4(_) => self.cfg.prefix_v4,
            IpAddr::V6(_) => self.cfg.prefix_v6,
        };
        IpNet::new(client, len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(client))
    }

    /// Admits a connection from `client` with a pending-handshake slot, or says which limit is
    /// full.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<(ConnSlot, PendingSlot), LimitHit> {
        let client = client.to_canonical();
        let prefix = self.prefix_of(client);
        if !try_take(&self.total, self.cfg.max_total) {
            return Err(LimitHit::Total);
        }
        let mut counts = self.counts();
        let n = counts.per_client.get(&client).copied().unwrap_or(0);
        let hit = if n >= self.cfg.max_per_client {
            Some(LimitHit::PerClient)
        } else {
            self.take_pending(&mut counts, prefix).err()
        };
        if let Some(hit) = hit {
            drop(counts);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(hit);
        }
        *counts.per_client.entry(client).or_insert(0) += 1;
        drop(counts);
        Ok((
            ConnSlot {
                limits: self.clone(),
                client,
            },
            PendingSlot {
                limits: self.clone(),
                prefix,
            },
        ))
    }

    /// A pending-handshake slot for `client` again (to deliver a refusal).
    pub fn pending_slot(self: &Arc<Self>, client: IpAddr) -> Result<PendingSlot, LimitHit> {
        let prefix = self.prefix_of(client.to_canonical());
        let mut counts = self.counts();
        self.take_pending(&mut counts, prefix)?;
        Ok(PendingSlot {
            limits: self.clone(),
            prefix,
        })
    }

    fn take_pending(&self, counts: &mut Counts, prefix: IpNet) -> Result<(), LimitHit> {
        let held = counts.per_prefix.get(&prefix).map_or(0, |c| c.pending);
        if held >= self.cfg.max_pending_per_prefix {
            return Err(LimitHit::PendingPerPrefix);
        }
        if !try_take(&self.pending, self.cfg.max_pending) {
            return Err(LimitHit::Pending);
        }
        counts.per_prefix.entry(prefix).or_default().pending += 1;
        self.pending_gauge.inc();
        Ok(())
    }

    /// A slot for an upstream connect from `client`.
    pub fn connecting_slot(self: &Arc<Self>, client: IpAddr) -> Result<ConnectingSlot, LimitHit> {
        let prefix = self.prefix_of(client.to_canonical());
        let mut counts = self.counts();
        let c = counts.per_prefix.entry(prefix).or_default();
        if c.connecting >= self.cfg.max_connecting_per_prefix {
            if c.is_empty() {
                counts.per_prefix.remove(&prefix);
            }
            return Err(LimitHit::ConnectingPerPrefix);
        }
        c.connecting += 1;
        Ok(ConnectingSlot {
            limits: self.clone(),
            prefix,
        })
    }

    /// Gives back one count of `prefix`, forgetting the prefix when nothing is left.
    fn release(&self, prefix: IpNet, f: impl FnOnce(&mut PrefixCounts)) {
        let mut counts = self.counts();
        if let Some(c) = counts.per_prefix.get_mut(&prefix) {
            f(c);
            if c.is_empty() {
                counts.per_prefix.remove(&prefix);
            }
        }
    }

    pub fn active(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        let mut counts = self.limits.counts();
        if let Some(n) = counts.per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                counts.per_client.remove(&self.client);
            }
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.limits.pending.fetch_sub(1, Ordering::AcqRel);
        self.limits.pending_gauge.dec();
        self.limits.release(self.prefix, |c| c.pending -= 1);
    }
}

impl Drop for ConnectingSlot {
    fn drop(&mut self) {
        self.limits.release(self.prefix, |c| c.connecting -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_client: usize, pending: usize, per_prefix: usize) -> Arc<Limits> {
        Limits::new(
            LimitConfig {
                max_total: total,
                max_per_client: per_client,
                max_pending: pending,
                max_pending_per_prefix: per_prefix,
                max_connecting_per_prefix: 3,
                prefix_v4: 24,
                prefix_v6: 48,
            },
            Gauge::default(),
        )
    }

    fn empty(l: &Limits) -> bool {
        let c = l.counts();
        c.per_client.is_empty() && c.per_prefix.is_empty()
    }

    #[test]
    fn every_limit_holds_and_slots_come_back() {
        let l = limits(3, 2, 2, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.1.2".parse().unwrap();
        let (c1, p1) = l.admit(a).unwrap();
        let (c2, _p2) = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), LimitHit::PerClient);
        assert_eq!(
            l.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap_err(),
            LimitHit::PerClient,
            "mapped form is the same client"
        );
        assert_eq!(l.admit(b).unwrap_err(), LimitHit::Pending);
        drop(p1);
        let (c3, _p3) = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), LimitHit::Total);
        assert_eq!(l.active(), 3);
        drop((c1, c2, c3));
        assert_eq!(l.active(), 0);
        drop((_p2, _p3));
        assert!(empty(&l));
    }

    #[test]
    fn one_prefix_gets_only_its_share_of_pending_handshakes() {
        let l = limits(1000, 1000, 100, 10);
        let flood: Vec<_> = (0..10)
            .map(|i| l.admit(format!("10.9.9.{i}").parse().unwrap()).unwrap())
            .collect();
        // Another address of the same /24 is refused; one of another /24 is served.
        assert_eq!(
            l.admit("10.9.9.200".parse().unwrap()).unwrap_err(),
            LimitHit::PendingPerPrefix
        );
        assert!(l.admit("10.9.8.1".parse().unwrap()).is_ok());
        // IPv6: the /48 is the unit.
        let v6: Vec<_> = (0..10)
            .map(|i| {
                l.admit(format!("2001:db8:1:{i}::1").parse().unwrap())
                    .unwrap()
            })
            .collect();
        assert_eq!(
            l.admit("2001:db8:1:ffff::9".parse().unwrap()).unwrap_err(),
            LimitHit::PendingPerPrefix
        );
        assert!(l.admit("2001:db8:2::1".parse().unwrap()).is_ok());
        drop((flood, v6));
        assert!(empty(&l));
        assert_eq!(l.pending(), 0);
    }

    #[test]
    fn the_connection_slot_outlives_the_pending_one() {
        let l = limits(10, 10, 10, 10);
        let (conn, pending) = l.admit("10.0.0.1".parse().unwrap()).unwrap();
        drop(pending);
        assert_eq!((l.active(), l.pending()), (1, 0));
        drop(conn);
        assert!(empty(&l));
    }

    #[test]
    fn upstream_connects_have_their_own_share() {
        let l = limits(100, 100, 100, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| l.connecting_slot(a).unwrap()).collect();
        assert_eq!(
            l.connecting_slot("10.0.0.9".parse().unwrap()).unwrap_err(),
            LimitHit::ConnectingPerPrefix
        );
        assert!(l.connecting_slot("10.0.1.1".parse().unwrap()).is_ok());
        // Connects do not use up the pending share.
        let (_c, _p) = l.admit(a).unwrap();
        drop((held, _p));
        assert!(l.connecting_slot(a).is_ok());
    }

    #[test]
    fn a_refusal_takes_a_pending_slot_again() {
        let l = limits(10, 10, 10, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let (_conn, pending) = l.admit(a).unwrap();
        drop(pending);
        let r1 = l.pending_slot(a).unwrap();
        let _r2 = l.pending_slot(a).unwrap();
        assert_eq!(
            l.pending_slot(a).unwrap_err(),
            LimitHit::PendingPerPrefix,
            "refusals count against the prefix's share"
        );
        drop(r1);
        assert!(l.pending_slot(a).is_ok());
    }
}
