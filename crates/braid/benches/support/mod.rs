//! Pieces the namespace benchmarks share (a module directory, so cargo does not take it for a
//! benchmark of its own).
#![allow(dead_code)]

use std::time::Duration;

use braid_lab::Netns;

/// `BRAID_BENCH_DIRS` ("up,down"): whether uploads and downloads are measured, in that order.
pub fn dirs_wanted() -> [bool; 2] {
    let dirs: String = env_or("BRAID_BENCH_DIRS", "up,down".to_string());
    ["up", "down"].map(|d| dirs.split(',').any(|w| w.trim() == d))
}

/// An environment knob, or its default when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `BRAID_BENCH_CPU_QUOTA`: the fraction of a core to hold each relay process to, if set.
pub fn cpu_quota() -> Option<f64> {
    std::env::var("BRAID_BENCH_CPU_QUOTA")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|f: &f64| *f > 0.0)
}

/// With `BRAID_BENCH_CPU_QUOTA` set: each of `pids` in a CPU cgroup of its own, held to that
/// fraction of a core (a small router's CPU); the groups go when the value drops.
pub fn hold_to_quota<const N: usize>(pids: [u32; N]) -> Option<[braid_lab::cgroup::CpuQuota; N]> {
    let f = cpu_quota()?;
    Some(pids.map(|pid| {
        let q = braid_lab::cgroup::CpuQuota::new(f).expect("CPU quota");
        q.add(pid).expect("into the CPU quota");
        q
    }))
}

/// One line saying how hard the quota held `names` (e.g. "copy / splice") back.
pub fn quota_report(quotas: &[braid_lab::cgroup::CpuQuota], names: &str) -> String {
    let throttled: Vec<String> = quotas.iter().map(|q| q.throttled().to_string()).collect();
    format!(
        "# each held to {} of a core, throttled {} times ({names})",
        quotas.first().map_or(0.0, |q| q.fraction()),
        throttled.join(" / ")
    )
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

/// Kernel counters worth reading when a path is slow: TCP retransmissions, segments beyond the
/// window, MPTCP-level retransmissions and duplicates.
pub const WATCHED: &[&str] = &[
    "TcpRetransSegs",
    "TcpExtBeyondWindow",
    "TcpExtTCPLossProbes",
    "TcpExtTCPSackRecovery",
    "TcpExtTCPTimeouts",
    "TcpExtTCPRcvQDrop",
    "TcpExtTCPZeroWindowDrop",
    "TcpExtTCPOFOQueue",
    "MPTcpExtDuplicateData",
    "MPTcpExtNoDSSInWindow",
    "MPTcpExtMPTCPRetrans",
    "MPTcpExtOFOQueue",
    "MPTcpExtRcvPruned",
    "MPTcpExtSubflowRecover",
    "TcpExtTCPBacklogDrop",
    "TcpExtTCPWantZeroWindowAdv",
    "TcpExtTCPToZeroWindowAdv",
    "MPTcpExtDSSNotMatching",
    "MPTcpExtMPRstTx",
    "MPTcpExtMPRstRx",
    "MPTcpExtRcvWndShared",
    "MPTcpExtRcvWndConflict",
    "IpExtInNoRoutes",
    // Not a netstat counter: packets dropped by the per-CPU input backlog, machine-wide
    // (/proc/net/softnet_stat), added to every namespace's map.
    "softnet_dropped",
];

/// The namespace's SNMP/netstat counters (`nstat -asz`) plus `softnet_dropped`.
pub fn counters(ns: &Netns) -> std::collections::HashMap<String, u64> {
    let mut m: std::collections::HashMap<String, u64> = ns
        .run(["nstat", "-asz"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect();
    let softnet: u64 = std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum();
    m.insert("softnet_dropped".into(), softnet);
    m
}

/// The [`WATCHED`] counters that moved from `a` to `b`, as `name=count/GiB (count)`: per GiB
/// moved meanwhile, and the raw count, because some counters move per connection, not per byte
/// (a round's teardown resets the data connection's two subflows: `MPTcpExtMPRstTx` reads
/// 10/GiB in a round that moved 0.2 GiB and 0.3/GiB in one that moved 6), and a handful of
/// MPTCP-level retransmissions in a round of several GiB would otherwise round to nothing.
/// Every counter that moved with `BRAID_BENCH_NSTAT=all`.
pub fn deltas(
    a: &std::collections::HashMap<String, u64>,
    b: &std::collections::HashMap<String, u64>,
    gib: f64,
) -> String {
    let all = std::env::var("BRAID_BENCH_NSTAT").is_ok_and(|v| v == "all");
    let mut keys: Vec<&str> = if all {
        b.keys().map(String::as_str).collect()
    } else {
        WATCHED.to_vec()
    };
    keys.sort_unstable();
    keys.iter()
        .filter_map(|k| {
            let d = b.get(*k)?.saturating_sub(*a.get(*k).unwrap_or(&0));
            (d > 0).then(|| {
                let per = d as f64 / gib.max(1e-9);
                let digits = if per < 10.0 { 1 } else { 0 };
                format!("{k}={per:.digits$} ({d})")
            })
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15 of the line, i.e. 11 and 12 after the state.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

/// The whole machine's CPU time so far, from one read of /proc/stat (USER_HZ ticks, all CPUs).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// Everything but idle and iowait.
    pub busy: u64,
    /// Time the hypervisor gave this machine's vCPUs to others while they had work (`steal`):
    /// a round whose relays cost more per byte with steal high was slowed by the neighbours.
    pub steal: u64,
    /// CPUs counted (the `cpuN` lines: all of the machine's, whatever this process is pinned to).
    pub cpus: u64,
}

pub fn machine_cpu() -> MachineCpu {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut lines = stat.lines();
    let v: Vec<u64> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    MachineCpu {
        // idle and iowait are the 4th and 5th numbers, steal the 8th.
        busy: v.iter().sum::<u64>() - at(3) - at(4),
        steal: at(7),
        cpus: lines.filter(|l| l.starts_with("cpu")).count() as u64,
    }
}

/// `BRAID_BENCH_CPUS` (e.g. "0"): this process, and so everything it starts (daemons and
/// iperf3 inherit it through `ip netns exec`), runs on those CPUs only. On one CPU no wakeup
/// crosses to another; on a virtual machine each crossing is an inter-processor interrupt,
/// and on this one (Firecracker, 2 vCPUs) plain forwarding of one flow in the lab moves 42-44
/// Gbit/s at 0.19-0.20 CPU-s/GiB on one vCPU against 28-30 Gbit/s at 0.41-0.44 on two. So
/// per-byte figures on one CPU are the software's own, and those on two include the VM's price
/// of waking threads on the other vCPU (the converter benchmark prints interrupts between CPUs
/// per GiB with `BRAID_BENCH_NSTAT`; docs/architecture.md, "CPU per byte").
pub fn pin_to_cpus() {
    let Ok(list) = std::env::var("BRAID_BENCH_CPUS") else {
        return;
    };
    let mut set = nix::sched::CpuSet::new();
    for c in list
        .split(',')
        .filter_map(|c| c.trim().parse::<usize>().ok())
    {
        set.set(c).expect("BRAID_BENCH_CPUS: a CPU number");
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .expect("BRAID_BENCH_CPUS: sched_setaffinity");
}

/// Where the gateway benchmark's processes run, the same in every round: the user's side on
/// CPU 0 and the network's side on CPU 1, as two machines would be (the LAN client and the
/// gateway on one, the converter and the server on the other), as `Some((0, 1))`; the caller
/// places iperf3's ends with its `-A client,server`. This is the default on two or more CPUs;
/// `BRAID_BENCH_PLACE=scheduler` leaves placement to the scheduler, and `BRAID_BENCH_CPUS`
/// (everything on the CPUs listed) turns it off. Left to the scheduler, the four processes land
/// differently from round to round, and on this VM each wakeup that crosses vCPUs is an
/// inter-processor interrupt (a VM exit, 32-34 µs of CPU), so the cost per byte, and with it
/// the rate, changes with the placement rather than with the software (docs/architecture.md,
/// "CPU per byte").
pub fn placement() -> Option<(usize, usize)> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if std::env::var_os("BRAID_BENCH_CPUS").is_some() || cpus < 2 {
        return None;
    }
    match std::env::var("BRAID_BENCH_PLACE").as_deref() {
        Err(_) | Ok("sides") => Some((0, 1)),
        Ok("scheduler") => None,
        Ok(other) => panic!("BRAID_BENCH_PLACE: \"sides\" or \"scheduler\", not {other:?}"),
    }
}

/// Every thread of `pid` (a daemon's async workers already exist) on `cpu` only; threads it
/// starts later inherit that.
pub fn place(pid: u32, cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("a CPU number");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            // A thread that has just exited is no matter.
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
        }
    }
}

/// Inter-processor interrupts so far, all CPUs (`/proc/interrupts`: rescheduling, function
/// call and TLB shootdown lines).
pub fn ipis() -> u64 {
    let s = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    s.lines()
        .filter(|l| {
            let k = l.trim_start();
            k.starts_with("RES:") || k.starts_with("CAL:") || k.starts_with("TLB:")
        })
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|x| x.parse::<u64>().ok())
        })
        .sum()
}
