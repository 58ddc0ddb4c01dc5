//! Pieces the namespace benchmarks share (a module directory, so cargo does not take it for a
//! benchmark of its own).
#![allow(dead_code)]

use std::time::Duration;

use braid_lab::Netns;

/// An environment knob, or its default when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median of the finite values (NaN if none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Waits until something in `ns` listens on TCP `port`.
pub fn wait_listening(ns: &Netns, port: u16) {
    ns.wait_listening(port, Duration::from_secs(10))
        .expect("listener");
}
