//! Gateway benchmark (prints figures, asserts nothing): unmodified iperf3 from the LAN client to
//! the server on the unshaped lab, through `braid gateway` (TPROXY) and `braid converter`,
//! against the same path with both middle namespaces simply forwarding IP. Both run in the same
//! lab, interleaved: the gateway bypasses port 5202, so iperf3 to that port is forwarded plain
//! while iperf3 to 5201 is captured and converted.
//!
//! Run: `cargo bench -p braid --bench gateway` (as root). Knobs: `BRAID_BENCH_ROUNDS` (3),
//! `BRAID_BENCH_SECS` (3), `BRAID_BENCH_STREAMS` ("1,4"), `BRAID_BENCH_CC` ("reno").

mod support;

use braid_lab::process::spawn_daemon;
use braid_lab::standard::converter_args as lab_converter_args;
use braid_lab::{StandardConfig, StandardLab};
use support::{env_or, median};

const CAPTURED: u16 = 5201;
const FORWARDED: u16 = 5202;

fn main() {
    let rounds: usize = env_or("BRAID_BENCH_ROUNDS", 3);
    let secs: u32 = env_or("BRAID_BENCH_SECS", 3);
    let streams: Vec<u32> = env_or("BRAID_BENCH_STREAMS", "1,4".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let cc: String = env_or("BRAID_BENCH_CC", "reno".to_string());
    let lab = StandardLab::new(StandardConfig {
        uplinks: 2,
        rates: None,
        congestion_control: Some(cc.clone()),
        ..StandardConfig::default()
    })
    .expect("lab");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_braid"));
    let logs = std::env::temp_dir();
    let mut converter = spawn_daemon(
        &lab.converter,
        bin,
        "converter",
        &lab_converter_args(5124),
        logs.join(format!("{}-converter.log", lab.converter.name())),
        "listening",
    )
    .expect("converter");
    let conv = format!("{}:5124", lab.converter_v4());
    let mut gateway = spawn_daemon(
        &lab.gateway,
        bin,
        "gateway",
        &[
            "--converter".into(),
            conv,
            "--transparent".into(),
            "tproxy".into(),
            "--bypass-port".into(),
            FORWARDED.to_string(),
        ],
        logs.join(format!("{}-gateway.log", lab.gateway.name())),
        "gateway running",
    )
    .expect("gateway");

    println!(
        "# braid gateway benchmark: iperf3 LAN client → server, {rounds} interleaved rounds of \
         {secs} s, congestion control {cc}, 2 unshaped veth uplinks, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| streams | direction | forwarded Gbit/s | gateway + converter Gbit/s | ratio |");
    println!("|---|---|---|---|---|");
    for &n in &streams {
        for reverse in [false, true] {
            let (mut fwd, mut conv) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                fwd.push(iperf(&lab, FORWARDED, n, secs, reverse));
                conv.push(iperf(&lab, CAPTURED, n, secs, reverse));
            }
            let (f, c) = (median(fwd), median(conv));
            println!(
                "| {n} | {} | {f:.2} | {c:.2} | {:.2} |",
                if reverse {
                    "server → client"
                } else {
                    "client → server"
                },
                c / f
            );
        }
    }
    let _ = gateway.stop();
    let _ = converter.stop();
}

/// Gbit/s received (`end.sum_received`), NaN if the run failed.
fn iperf(lab: &StandardLab, port: u16, streams: u32, secs: u32, reverse: bool) -> f64 {
    let (secs, streams) = (secs.to_string(), streams.to_string());
    let mut args = vec!["-t", secs.as_str(), "-P", streams.as_str()];
    if reverse {
        args.push("-R");
    }
    match braid_lab::iperf3::run(
        &lab.server,
        &lab.client,
        lab.server_v4().into(),
        port,
        &args,
    ) {
        Ok(run) => run.received_bps / 1e9,
        Err(e) => {
            eprintln!("iperf3 failed: {e}");
            f64::NAN
        }
    }
}
