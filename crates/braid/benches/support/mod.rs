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

/// `braid converter` on port 5124 (with `converter_args` too) in the lab's converter namespace
/// and `braid gateway` with the lab's converter and `gateway_args` in its gateway namespace,
/// each started once it says it runs (logs in the temporary directory).
pub fn start_daemons(
    lab: &braid_lab::StandardLab,
    converter_args: &[&str],
    gateway_args: &[String],
) -> Vec<braid_lab::Process> {
    use braid_lab::process::spawn_daemon;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_braid"));
    let logs = std::env::temp_dir();
    let converter = spawn_daemon(
        &lab.converter,
        bin,
        "converter",
        &[
            braid_lab::standard::converter_args(5124),
            converter_args.iter().map(|a| a.to_string()).collect(),
        ]
        .concat(),
        logs.join(format!("{}-converter.log", lab.converter.name())),
        "listening",
    )
    .expect("converter");
    let mut args = vec![
        "--converter".to_string(),
        format!("{}:5124", lab.converter_v4()),
    ];
    args.extend_from_slice(gateway_args);
    let gateway = spawn_daemon(
        &lab.gateway,
        bin,
        "gateway",
        &args,
        logs.join(format!("{}-gateway.log", lab.gateway.name())),
        "gateway running",
    )
    .expect("gateway");
    vec![converter, gateway]
}
