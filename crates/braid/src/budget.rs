//! The memory the relays' buffers may hold in all (`relay_memory`), so that many busy
//! connections cannot take a small router's or a converter host's memory.
//!
//! A direction's copy buffer (or splice pipe) grows fourfold on each read that fills it, up to
//! `relay_buffer` (1 MiB): a download from a fast server to a slow client fills every read, so
//! each such connection holds the full size for as long as it runs (5,000 of them, 5 GiB). With
//! the budget, growth up to [`FLOOR`] is always granted, beyond it only while the sum of all
//! buffers stays within the cap; a buffer refused growth keeps its size and asks again on its
//! next full read. Shrinking (a quiet direction giving its buffer back) always succeeds. The
//! cost when refused is CPU, not rate: 64 KiB reads move a connection as fast as 1 MiB reads,
//! with more syscalls per byte (16 downloads under a 1 MiB cap took the same 2.4 s,
//! `many_downloads_keep_the_relays_within_relay_memory`; README, the attempts under "On a
//! router's CPU").
//!
//! One budget per process ([`Budget::global`]), its cap set from the configuration at start
//! (`relay_memory` takes a restart, as the other relay keys); tests make their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use prometheus_client::metrics::gauge::Gauge;

/// Growth up to this size needs no budget: a relay needs some buffer to move anything, and
/// below it reads cost much more per byte.
pub const FLOOR: usize = 64 * 1024;

/// What the buffers hold in all, and the cap.
pub struct Budget {
    used: AtomicUsize,
    cap: AtomicUsize,
    /// `used`, for the metrics.
    gauge: Gauge,
}

impl std::fmt::Debug for Budget {
    // Without what is held, which changes all the time: settings holding a budget compare
    // equal across a reload.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("cap", &self.cap.load(Relaxed))
            .finish_non_exhaustive()
    }
}

static GLOBAL: std::sync::LazyLock<Arc<Budget>> =
    std::sync::LazyLock::new(|| Arc::new(Budget::new(usize::MAX)));

impl Budget {
    /// A budget of `cap` bytes (`usize::MAX`: no limit).
    pub fn new(cap: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            cap: AtomicUsize::new(cap),
            gauge: Gauge::default(),
        }
    }

    /// The process's budget, which every [`crate::relay::RelayConfig`] uses unless told.
    pub fn global() -> Arc<Budget> {
        GLOBAL.clone()
    }

    /// Sets the cap (at start); buffers above it shrink as they go quiet.
    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Relaxed);
    }

    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// Registers the gauge (`relay_buffer_bytes`) in a daemon's registry.
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "relay_buffer_bytes",
            "Bytes held by the relays' buffers and pipes, in all (capped by relay_memory \
             beyond 64 KiB per direction)",
            self.gauge.clone(),
        );
    }

    /// Resizes a holding of `held` bytes towards `wanted`; returns the size granted.
    fn resize(&self, held: usize, wanted: usize) -> usize {
        let cap = self.cap.load(Relaxed);
        let mut granted = held;
        // The closure always returns Some: the update cannot fail.
        let _ = self.used.fetch_update(Relaxed, Relaxed, |used| {
            granted = grant(used, cap, held, wanted);
            Some(used - held + granted)
        });
        if granted != held {
            // A gauge of a process's buffers fits an i64.
            self.gauge.inc_by(granted as i64 - held as i64);
        }
        granted
    }
}

/// The size a holding of `held` bytes may have when it wants `wanted`, with `used` bytes held
/// in all (its own included) under `cap`.
fn grant(used: usize, cap: usize, held: usize, wanted: usize) -> usize {
    if wanted <= held || wanted <= FLOOR {
        return wanted;
    }
    let others = used.saturating_sub(held);
    if others.saturating_add(wanted) <= cap {
        wanted
    } else {
        // As far as the floor, never below what is held.
        held.max(FLOOR)
    }
}

/// One direction's share of a budget, given back when dropped (also when the relay ends with
/// an error).
#[derive(Debug)]
pub struct Lease {
    budget: Arc<Budget>,
    held: usize,
}

impl Lease {
    pub fn new(budget: Arc<Budget>) -> Lease {
        Lease { budget, held: 0 }
    }

    /// Asks for `wanted` bytes; returns what is granted (what is held now).
    pub fn resize(&mut self, wanted: usize) -> usize {
        self.held = self.budget.resize(self.held, wanted);
        self.held
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.resize(0);
    }
}

/// The default cap: an eighth of the machine's memory (`MemTotal`), at least 16 MiB;
/// `None` if it cannot be read.
pub fn default_cap() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some((kib.saturating_mul(1024) / 8).max(16 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_to_the_floor_is_free_and_beyond_it_within_the_cap() {
        let mib = 1 << 20;
        // Below the floor: always, even with the cap long spent.
        assert_eq!(grant(10 * mib, mib, 4096, 16384), 16384);
        assert_eq!(grant(10 * mib, mib, 16384, FLOOR), FLOOR);
        // Beyond it: only within the cap, counting what the others hold.
        assert_eq!(grant(FLOOR, 2 * mib, FLOOR, mib), mib);
        assert_eq!(grant(2 * mib, 2 * mib, FLOOR, mib), FLOOR);
        // Refused, a holding keeps what it has; never pushed below it.
        assert_eq!(grant(3 * mib, 2 * mib, 256 * 1024, mib), 256 * 1024);
        // From nothing, refused growth still reaches the floor.
        assert_eq!(grant(2 * mib, mib, 0, mib), FLOOR);
        // Shrinking always.
        assert_eq!(grant(3 * mib, mib, mib, 0), 0);
    }

    #[test]
    fn leases_add_up_and_give_back_on_drop() {
        let b = Arc::new(Budget::new(1 << 20));
        let mut x = Lease::new(b.clone());
        let mut y = Lease::new(b.clone());
        assert_eq!(x.resize(768 * 1024), 768 * 1024);
        assert_eq!(y.resize(4096), 4096);
        // 768 KiB + 1 MiB would pass the cap: y stops at the floor.
        assert_eq!(y.resize(1 << 20), FLOOR);
        assert_eq!(b.used(), 768 * 1024 + FLOOR);
        assert_eq!(b.gauge.get(), (768 * 1024 + FLOOR) as i64);
        drop(x);
        assert_eq!(b.used(), FLOOR);
        // Room again.
        assert_eq!(y.resize(1 << 20), 1 << 20);
        y.resize(0);
        assert_eq!(b.used(), 0);
        drop(y);
        assert_eq!(b.used(), 0);
        assert_eq!(b.gauge.get(), 0);
    }

    #[test]
    fn the_default_cap_is_an_eighth_of_memory() {
        let cap = default_cap().unwrap();
        assert!(cap >= 16 << 20);
    }
}
