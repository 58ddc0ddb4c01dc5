//! What one client, and all of them, may cost: total connections, connections per client
//! address, and handshakes in progress. Each admission is a guard that gives its slot back when
//! dropped, so every exit path of a connection releases what it took.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Limits {
    max_total: usize,
    max_per_client: usize,
    max_pending: usize,
    total: AtomicUsize,
    pending: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// Which limit refused an admission (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Total,
    PerClient,
    Pending,
}

impl LimitHit {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::Total => "total",
            LimitHit::PerClient => "per_client",
            LimitHit::Pending => "pending",
        }
    }
}

/// A counted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<Limits>,
    client: IpAddr,
}

/// A counted handshake in progress; dropping it frees the slot.
#[derive(Debug)]
pub struct PendingSlot {
    limits: Arc<Limits>,
}

fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Limits {
    pub fn new(max_total: usize, max_per_client: usize, max_pending: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max_total,
            max_per_client,
            max_pending,
            total: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `client`, or says which limit is full.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<(ConnSlot, PendingSlot), LimitHit> {
        let client = client.to_canonical();
        if !try_take(&self.total, self.max_total) {
            return Err(LimitHit::Total);
        }
        {
            let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(client).or_insert(0);
            if *n >= self.max_per_client {
                drop(map);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(LimitHit::PerClient);
            }
            *n += 1;
        }
        let conn = ConnSlot {
            limits: self.clone(),
            client,
        };
        if !try_take(&self.pending, self.max_pending) {
            return Err(LimitHit::Pending);
        }
        Ok((
            conn,
            PendingSlot {
                limits: self.clone(),
            },
        ))
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
        let mut map = self
            .limits
            .per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.limits.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_holds_and_slots_come_back() {
        let l = Limits::new(3, 2, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
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
        assert!(l.per_client.lock().unwrap().is_empty());
    }
}
