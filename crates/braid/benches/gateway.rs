//! Gateway benchmark (prints figures, asserts nothing): unmodified iperf3 from the LAN client to
//! the server on the unshaped lab, through `braid gateway` (TPROXY) and `braid converter`,
//! against the same path with both middle namespaces simply forwarding IP. Both run in the same
//! lab, interleaved: the gateway bypasses port 5202, so iperf3 to that port is forwarded plain
//! while iperf3 to 5201 is captured and converted.
//!
//! Every round is printed (rate of both paths, their ratio, each relay's CPU-seconds per GiB,
//! the share of CPU time the hypervisor gave to other guests), then per case the median, the
//! worst round's ratio and the spread of braid's rate between rounds (max / min − 1): a stall
//! shows as one slow round, which a median hides. Forwarding's own spread beside it says how
//! steady the machine was.
//!
//! Run: `cargo bench -p braid --bench gateway` (as root). Knobs: `BRAID_BENCH_ROUNDS` (5),
//! `BRAID_BENCH_SECS` (3), `BRAID_BENCH_STREAMS` ("1,4"), `BRAID_BENCH_CC` ("reno"),
//! `BRAID_BENCH_DIRS` ("up,down"; down = server → client), `BRAID_BENCH_UPLINKS` (2),
//! `BRAID_BENCH_RATES` (Mbit/s per uplink, e.g. "100,200"; unset: unshaped),
//! `BRAID_BENCH_DELAYS` (one-way ms per uplink, e.g. "10,20"), `BRAID_BENCH_CAPTURE` ("tproxy"
//! or "redirect"), `BRAID_BENCH_GATEWAY_ARGS` and `BRAID_BENCH_CONVERTER_ARGS` (extra
//! arguments, space-separated), `BRAID_BENCH_NSTAT` (set: the kernel counters of both relays
//! per GiB for every converted run; `all`: every counter that moved), `BRAID_BENCH_INTERVALS`
//! (set: both paths' rate every 0.1 s, and per case how many intervals fell under half the
//! median one), `BRAID_BENCH_SS` (set: `ss -tinmM` in both relays' namespaces 1.5 s into every
//! converted run), `BRAID_BENCH_CPU_QUOTA` (e.g. 0.25: each daemon held to that fraction of a
//! core by a CPU cgroup, as on a small router), `BRAID_BENCH_CPUS` (e.g. "0": the whole lab's
//! processes on those CPUs only; see `support::pin_to_cpus`), `BRAID_BENCH_PLACE` ("sides",
//! the default on two or more CPUs unless `BRAID_BENCH_CPUS` is set: the client and the
//! gateway on CPU 0, the converter and the server on CPU 1, in every round; "scheduler":
//! wherever the scheduler puts them; see `support::placement`).

mod support;

use braid_lab::{Delay, StandardConfig, StandardLab};
use support::{
    counters, deltas, dirs_wanted, env_or, hold_to_quota, machine_cpu, median, pin_to_cpus, place,
    placement, proc_cpu_ticks, quota_report, start_daemons,
};

const CAPTURED: u16 = 5201;
const FORWARDED: u16 = 5202;

/// One iperf3 run: rate, bytes, and CPU ticks (USER_HZ) spent meanwhile.
#[derive(Debug, Clone, Copy)]
struct Run {
    gbit: f64,
    bytes: u64,
    gateway_ticks: u64,
    converter_ticks: u64,
    machine_ticks: u64,
    steal_ticks: u64,
    /// CPU-seconds the machine had during the run (all CPUs).
    cpu_secs: f64,
}

impl Run {
    fn per_gib(&self, ticks: u64) -> f64 {
        ticks as f64 / 100.0 / (self.bytes as f64 / (1u64 << 30) as f64)
    }

    /// Stolen CPU time, percent of all CPUs' time during the run.
    fn steal_percent(&self) -> f64 {
        self.steal_ticks as f64 / 100.0 / self.cpu_secs * 100.0
    }
}

fn main() {
    pin_to_cpus();
    let rounds: usize = env_or("BRAID_BENCH_ROUNDS", 5);
    let secs: u32 = env_or("BRAID_BENCH_SECS", 3);
    let streams: Vec<u32> = env_or("BRAID_BENCH_STREAMS", "1,4".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let cc: String = env_or("BRAID_BENCH_CC", "reno".to_string());
    let dirs = dirs_wanted();
    let capture: String = env_or("BRAID_BENCH_CAPTURE", "tproxy".to_string());
    let words = |key: &str| -> Vec<String> {
        env_or(key, String::new())
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let list = |key: &str| -> Option<Vec<u64>> {
        let v: Vec<u64> = env_or(key, String::new())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        (!v.is_empty()).then_some(v)
    };
    let shaping = format!(
        "uplinks {} Mbit/s, one-way delay {} ms",
        env_or("BRAID_BENCH_RATES", "unshaped".to_string()),
        env_or("BRAID_BENCH_DELAYS", "0".to_string())
    );
    let lab = StandardLab::new(StandardConfig {
        uplinks: env_or("BRAID_BENCH_UPLINKS", 2),
        rates: list("BRAID_BENCH_RATES").map(|v| v.iter().map(|m| m * 1_000_000).collect()),
        delays: list("BRAID_BENCH_DELAYS").map(|v| v.into_iter().map(Delay::ms).collect()),
        congestion_control: Some(cc.clone()),
        ..StandardConfig::default()
    })
    .expect("lab");
    let converter_args = words("BRAID_BENCH_CONVERTER_ARGS");
    let mut gateway_args = vec![
        "--transparent".to_string(),
        capture.clone(),
        "--bypass-port".into(),
        FORWARDED.to_string(),
    ];
    gateway_args.extend(words("BRAID_BENCH_GATEWAY_ARGS"));
    let converter_args: Vec<&str> = converter_args.iter().map(String::as_str).collect();
    let mut daemons = start_daemons(&lab, &converter_args, &gateway_args);
    let pids = (daemons[1].pid(), daemons[0].pid());
    // A small router's CPU: each daemon held to its own quota, the forwarding left free.
    let quotas = hold_to_quota([pids.0, pids.1]);
    let placed = placement();
    if let Some((user, network)) = placed {
        place(pids.0, user);
        place(pids.1, network);
    }
    let nstat = std::env::var_os("BRAID_BENCH_NSTAT").is_some();
    let snapshots = std::env::var_os("BRAID_BENCH_SS").is_some();

    println!(
        "# braid gateway benchmark: iperf3 LAN client → server, {rounds} interleaved rounds of \
         {secs} s, congestion control {cc}, capture {capture}, {shaping}, {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        match placed {
            Some((user, network)) =>
                format!("client and gateway on CPU {user}, converter and server on CPU {network}"),
            None => "placed by the scheduler".to_string(),
        }
    );
    println!();
    println!(
        "| streams | direction | round | forwarded Gbit/s | gateway + converter Gbit/s | ratio | \
         CPU-s/GiB gateway / converter | machine CPU-s/GiB fwd / braid | steal % fwd / braid |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let (mut summary, mut dips) = (Vec::new(), Vec::new());
    for &n in &streams {
        for reverse in [false, true] {
            if !dirs[usize::from(reverse)] {
                continue;
            }
            let dir = if reverse {
                "server → client"
            } else {
                "client → server"
            };
            let (mut fwd, mut conv) = (Vec::new(), Vec::new());
            // Every 0.1 s interval's rate, with `BRAID_BENCH_INTERVALS`.
            let (mut fwd_steps, mut conv_steps) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                let (f, f_steps) = iperf(&lab, FORWARDED, n, secs, reverse, pids, placed);
                let n0 = nstat.then(|| (counters(&lab.gateway), counters(&lab.converter)));
                let (c, c_steps) = std::thread::scope(|scope| {
                    if snapshots {
                        scope.spawn(|| {
                            std::thread::sleep(std::time::Duration::from_millis(1500));
                            for ns in [&lab.gateway, &lab.converter] {
                                let out = ns.run(["ss", "-tinmM"]).unwrap_or_default();
                                println!("# ss -tinmM in {}, round {round}:\n{out}", ns.name());
                            }
                        });
                    }
                    iperf(&lab, CAPTURED, n, secs, reverse, pids, placed)
                });
                if let (Some((g0, c0)), Some(c)) = (n0, c) {
                    let gib = c.bytes as f64 / (1u64 << 30) as f64;
                    let (g1, c1) = (counters(&lab.gateway), counters(&lab.converter));
                    println!(
                        "# nstat per GiB (count), round {round}: gateway [{}] converter [{}]",
                        deltas(&g0, &g1, gib),
                        deltas(&c0, &c1, gib)
                    );
                }
                let rate = |r: &Option<Run>| r.map_or(f64::NAN, |r| r.gbit);
                let cpu =
                    |r: &Option<Run>, t: fn(&Run) -> u64| r.map_or(f64::NAN, |r| r.per_gib(t(&r)));
                let steal = |r: &Option<Run>| r.map_or(f64::NAN, |r| r.steal_percent());
                println!(
                    "| {n} | {dir} | {round} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} \
                     | {:.1} / {:.1} |",
                    rate(&f),
                    rate(&c),
                    rate(&c) / rate(&f),
                    cpu(&c, |r| r.gateway_ticks),
                    cpu(&c, |r| r.converter_ticks),
                    cpu(&f, |r| r.machine_ticks),
                    cpu(&c, |r| r.machine_ticks),
                    steal(&f),
                    steal(&c),
                );
                fwd.push(rate(&f));
                conv.push(rate(&c));
                fwd_steps.extend(f_steps);
                conv_steps.extend(c_steps);
            }
            let worst = fwd
                .iter()
                .zip(&conv)
                .map(|(f, c)| c / f)
                .fold(f64::INFINITY, f64::min);
            let spread = |rates: &[f64]| {
                let finite = rates.iter().copied().filter(|x| x.is_finite());
                finite.clone().fold(0.0, f64::max) / finite.fold(f64::INFINITY, f64::min) - 1.0
            };
            // Forwarding's own spread says how steady the machine was during the run.
            let (spread_c, spread_f) = (spread(&conv), spread(&fwd));
            let (f, c) = (median(fwd), median(conv));
            summary.push(format!(
                "| {n} | {dir} | {f:.2} | {c:.2} | {:.2} | {worst:.2} | {:.0}% | {:.0}% |",
                c / f,
                spread_c * 100.0,
                spread_f * 100.0
            ));
            if !conv_steps.is_empty() {
                dips.push(format!(
                    "# {n} stream(s), {dir}: 0.1 s intervals under half the case's median \
                     interval, gateway + converter {} / forwarded {}",
                    dips_of(&conv_steps),
                    dips_of(&fwd_steps)
                ));
            }
        }
    }
    println!();
    println!(
        "| streams | direction | forwarded Gbit/s | gateway + converter Gbit/s | ratio (median) | \
         worst round | spread | forwarded spread |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in summary {
        println!("{line}");
    }
    for line in dips {
        println!("{line}");
    }
    if let Some(q) = &quotas {
        println!("{}", quota_report(q, "gateway / converter"));
    }
    for d in daemons.iter_mut().rev() {
        let _ = d.stop();
    }
}

/// How many of `steps` (rates of 0.1 s intervals) are under half their median, as "k of n":
/// a round's dip, whether a stall of the path or a slow spell of the machine, shows here for
/// either path alike, which says which of the two it was when a round is slow.
fn dips_of(steps: &[f64]) -> String {
    let half = median(steps.to_vec()) / 2.0;
    let k = steps.iter().filter(|&&x| x < half).count();
    format!("{k} of {}", steps.len())
}

/// One iperf3 run to `port` (`None` if it failed), and with `BRAID_BENCH_INTERVALS` its rate
/// in every 0.1 s interval (printed too), Gbit/s.
fn iperf(
    lab: &StandardLab,
    port: u16,
    streams: u32,
    secs: u32,
    reverse: bool,
    (gateway, converter): (u32, u32),
    placed: Option<(usize, usize)>,
) -> (Option<Run>, Vec<f64>) {
    let (secs, streams) = (secs.to_string(), streams.to_string());
    let affinity = placed.map(|(user, network)| format!("{user},{network}"));
    let mut args = vec!["-t", secs.as_str(), "-P", streams.as_str()];
    if let Some(a) = &affinity {
        args.extend(["-A", a.as_str()]);
    }
    if reverse {
        args.push("-R");
    }
    let intervals = std::env::var_os("BRAID_BENCH_INTERVALS").is_some();
    if intervals {
        args.extend(["-i", "0.1"]);
    }
    let (g0, c0, m0) = (
        proc_cpu_ticks(gateway),
        proc_cpu_ticks(converter),
        machine_cpu(),
    );
    let t0 = std::time::Instant::now();
    let run = braid_lab::iperf3::run(
        &lab.server,
        &lab.client,
        lab.server_v4().into(),
        port,
        &args,
    );
    match run {
        Ok(run) => {
            let mut steps = Vec::new();
            if intervals {
                // Each interval's "sum" (the end's totals are "sum_sent" and "sum_received").
                steps = run
                    .json
                    .split("\"sum\":")
                    .skip(1)
                    .filter_map(|s| s.split("\"bits_per_second\":").nth(1))
                    .filter_map(|s| s.split([',', '}']).next()?.trim().parse::<f64>().ok())
                    .map(|b| b / 1e9)
                    .collect();
                let shown: Vec<String> = steps.iter().map(|g| format!("{g:.1}")).collect();
                let path = if port == CAPTURED {
                    "gateway + converter"
                } else {
                    "forwarded"
                };
                println!("# {path}, Gbit/s per 0.1 s: {}", shown.join(" "));
            }
            let m1 = machine_cpu();
            let run = Run {
                gbit: run.received_bps / 1e9,
                bytes: run.received_bytes.max(1),
                gateway_ticks: proc_cpu_ticks(gateway) - g0,
                converter_ticks: proc_cpu_ticks(converter) - c0,
                machine_ticks: m1.busy - m0.busy,
                steal_ticks: m1.steal - m0.steal,
                cpu_secs: t0.elapsed().as_secs_f64() * m1.cpus.max(1) as f64,
            };
            (Some(run), steps)
        }
        Err(e) => {
            eprintln!("iperf3 failed: {e}");
            (None, Vec::new())
        }
    }
}
