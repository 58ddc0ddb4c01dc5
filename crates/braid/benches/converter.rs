//! Converter throughput benchmark (a benchmark: it prints figures and asserts nothing).
//!
//! On the unshaped standard lab (client namespace unused; gateway ⇉ 2 veths ⇉ converter →
//! server), in interleaved rounds, bulk transfers gateway → server ("up") and server → gateway
//! ("down") over four paths:
//! - `forward`: plain TCP, the converter namespace only forwards IP (baseline a);
//! - `mptcp`: MPTCP end to end, both ends MPTCP, converter namespace forwarding (baseline b,
//!   the real limit for a converter);
//! - two columns through `braid converter`, each with a relay engine of `BRAID_BENCH_ENGINES`
//!   ("copy,splice"; `auto` is the default engine: splice from TCP, copy from MPTCP).
//!
//! For every congestion control, number of parallel flows and direction it reports the median
//! rate, the converter's ratio to (a) and (b), the relay's CPU-seconds per GiB (the converter
//! process's utime + stime), the whole machine's for (a), (b) and the first engine, and the
//! relay's cost read from the machine's by difference (see `by_difference`).
//!
//! Run: `cargo bench -p braid --bench converter` (as root). Environment knobs:
//! `BRAID_BENCH_ROUNDS` (3), `BRAID_BENCH_SECS` (2), `BRAID_BENCH_FLOWS` ("1,4,16"),
//! `BRAID_BENCH_CC` ("reno,bbr"), `BRAID_BENCH_DIRS` ("up,down"), `BRAID_BENCH_ENGINES`
//! ("copy,splice"), `BRAID_BENCH_CONVERTER_ARGS` (more arguments for both converters,
//! space-separated), `BRAID_BENCH_RELAY_CC` (the converter's own sockets; default:
//! the namespaces' congestion control), `BRAID_BENCH_NSTAT` (set: print the kernel counters of
//! `WATCHED` per GiB for every measurement), `BRAID_BENCH_CPU_QUOTA` (e.g. 0.25: each relay
//! process held to that fraction of a core by a CPU cgroup, as on a small router; forwarding
//! and kernel MPTCP stay unconstrained, they run in the kernel), `BRAID_BENCH_CPUS` (e.g. "0":
//! everything on that CPU, the relay's own cost without wakeups between CPUs; see
//! `support::pin_to_cpus`), `BRAID_BENCH_WARMUP` (seconds of every transfer left out of its
//! rate, 0.5; 0 counts the start, where stalls gather), `BRAID_BENCH_EACH` (set: print every
//! round's rates, which the median hides).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use braid::client::{self, ClientOptions};
use braid_lab::{Netns, Process, StandardConfig, StandardLab};
use socket2::{Domain, Protocol, Socket, Type};
use support::{
    counters, deltas, dirs_wanted, env_or, hold_to_quota, ipis, machine_cpu, pin_to_cpus,
    proc_cpu_ticks, quota_report, wait_listening,
};

const TCP_SINK: u16 = 8001;
const TCP_SOURCE: u16 = 8002;
const MPTCP_SINK: u16 = 8101;
const MPTCP_SOURCE: u16 = 8102;
const CONV_FIRST: u16 = 5124;
const CONV_SECOND: u16 = 5125;
const CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Forward,
    Mptcp,
    /// Through `braid converter`, the first and the second of `BRAID_BENCH_ENGINES`.
    First,
    Second,
}

const PATHS: [Path; 4] = [Path::Forward, Path::Mptcp, Path::First, Path::Second];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

impl Dir {
    fn label(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    gbit: f64,
    relay_cpu_per_gib: f64,
    machine_cpu_per_gib: f64,
}

fn main() {
    pin_to_cpus();
    let rounds: usize = env_or("BRAID_BENCH_ROUNDS", 3);
    let secs: f64 = env_or("BRAID_BENCH_SECS", 2.0);
    let flows: Vec<usize> = env_or("BRAID_BENCH_FLOWS", "1,4,16".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let ccs: Vec<String> = env_or("BRAID_BENCH_CC", "reno,bbr".to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    println!(
        "# braid converter benchmark: {rounds} interleaved rounds of {secs} s, flows {flows:?}, \
         congestion control {ccs:?}, 2 unshaped veth uplinks, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    let (e1, e2) = engines();
    println!(
        "| cc | flows | dir | (a) forward Gbit/s | (b) MPTCP e2e | {e1} | {e2} | {e1}/(a) | \
         {e1}/(b) | {e2}/(b) | relay CPU-s/GiB {e1} / {e2} | machine CPU-s/GiB (a) / (b) / {e1} \
         | relay by difference {e1} / {e2} |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for cc in &ccs {
        bench_cc(cc, rounds, secs, &flows);
    }
}

/// The relay engines of the two converter columns (`BRAID_BENCH_ENGINES`, "copy,splice").
fn engines() -> (String, String) {
    let v: String = env_or("BRAID_BENCH_ENGINES", "copy,splice".to_string());
    let mut it = v.split(',').map(|e| e.trim().to_string());
    let first = it.next().unwrap_or_else(|| "copy".into());
    let second = it.next().unwrap_or_else(|| "splice".into());
    (first, second)
}

fn bench_cc(cc: &str, rounds: usize, secs: f64, flow_set: &[usize]) {
    let dirs = dirs_wanted();
    let lab = StandardLab::new(StandardConfig {
        uplinks: 2,
        rates: None,
        congestion_control: Some(cc.to_string()),
        ..StandardConfig::by_hand()
    })
    .expect("lab");
    lab.server.mptcp_limits(2, 2).expect("server MPTCP limits");
    let stop = Arc::new(AtomicBool::new(false));
    let _servers: Vec<_> = [
        (TCP_SINK, false, false),
        (TCP_SOURCE, false, true),
        (MPTCP_SINK, true, false),
        (MPTCP_SOURCE, true, true),
    ]
    .into_iter()
    .map(|(port, mptcp, source)| serve(&lab.server, port, mptcp, source, stop.clone()))
    .collect();
    // The relay's own sockets may use another congestion control than the hosts around it.
    let relay_cc: String = env_or("BRAID_BENCH_RELAY_CC", cc.to_string());
    let (e1, e2) = engines();
    let mut first = start_converter(&lab, CONV_FIRST, &e1, &relay_cc);
    let mut second = start_converter(&lab, CONV_SECOND, &e2, &relay_cc);
    // A small router's CPU: each relay held to its own quota, the kernel paths left free.
    let quotas = hold_to_quota([first.pid(), second.pid()]);
    // results[flows][dir][path] = samples
    let mut results = vec![vec![vec![Vec::<Sample>::new(); 4]; 2]; flow_set.len()];
    let each = std::env::var_os("BRAID_BENCH_EACH").is_some();
    for round in 0..rounds {
        for (fi, &flows) in flow_set.iter().enumerate() {
            for (di, dir) in wanted(dirs) {
                for (pi, path) in PATHS.into_iter().enumerate() {
                    let relay_pid = match path {
                        Path::First => Some(first.pid()),
                        Path::Second => Some(second.pid()),
                        _ => None,
                    };
                    let s = measure(&lab, path, dir, flows, secs, relay_pid);
                    results[fi][di][pi].push(s);
                }
                if each {
                    let r: Vec<String> = results[fi][di]
                        .iter()
                        .map(|samples| format!("{:.2}", samples[round].gbit))
                        .collect();
                    println!(
                        "# round {round} {cc} {flows} {}: Gbit/s forward {} mptcp {} {e1} {} {e2} {}",
                        dir.label(),
                        r[0],
                        r[1],
                        r[2],
                        r[3]
                    );
                }
            }
        }
    }
    for (fi, &flows) in flow_set.iter().enumerate() {
        for (di, dir) in wanted(dirs) {
            let dir = dir.label();
            let med = |pi: usize| median(&results[fi][di][pi]);
            let (a, b, c, s) = (med(0), med(1), med(2), med(3));
            println!(
                "| {cc} | {flows} | {dir} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | \
                 {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} |",
                a.gbit,
                b.gbit,
                c.gbit,
                s.gbit,
                c.gbit / a.gbit,
                c.gbit / b.gbit,
                s.gbit / b.gbit,
                c.relay_cpu_per_gib,
                s.relay_cpu_per_gib,
                a.machine_cpu_per_gib,
                b.machine_cpu_per_gib,
                c.machine_cpu_per_gib,
                by_difference(&a, &b, &c),
                by_difference(&a, &b, &s),
            );
        }
    }
    if let Some(q) = &quotas {
        println!("{} ({cc})", quota_report(q, &format!("{e1} / {e2}")));
    }
    stop.store(true, Relaxed);
    let _ = first.stop();
    let _ = second.stop();
}

/// The relay's own cost read from the whole machine, so that no attribution between
/// processes enters (on veth a sender is charged for its peer's receive): with `T` and `M`
/// what one TCP and one MPTCP end cost, forwarding costs `2T + F` and MPTCP end to end
/// `2M + F` (`F`: the converter namespace forwarding), a converted path `M + T + R`. So
/// `R = relay - (forward + mptcp) / 2 + F`: this is that without `F`, a lower bound.
fn by_difference(forward: &Sample, mptcp: &Sample, relay: &Sample) -> f64 {
    relay.machine_cpu_per_gib - (forward.machine_cpu_per_gib + mptcp.machine_cpu_per_gib) / 2.0
}

/// Per-field medians (each field sorted on its own).
fn median(samples: &[Sample]) -> Sample {
    let pick = |f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Sample {
        gbit: pick(|s| s.gbit),
        relay_cpu_per_gib: pick(|s| s.relay_cpu_per_gib),
        machine_cpu_per_gib: pick(|s| s.machine_cpu_per_gib),
    }
}

fn start_converter(lab: &StandardLab, port: u16, engine: &str, cc: &str) -> Process {
    let bin = env!("CARGO_BIN_EXE_braid");
    let p = lab
        .converter
        .command(bin)
        .arg("converter")
        .args(braid_lab::standard::converter_args(port))
        .args(["--relay-engine", engine, "--congestion-control", cc])
        .args(env_or("BRAID_BENCH_CONVERTER_ARGS", String::new()).split_whitespace())
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("braid converter");
    wait_listening(&lab.converter, port);
    p
}

/// A listener in `ns` that either swallows (sink) or sends (source) on every connection.
fn serve(ns: &Netns, port: u16, mptcp: bool, source: bool, stop: Arc<AtomicBool>) -> impl Drop {
    let listener = ns
        .enter(move || {
            let proto = if mptcp {
                Protocol::MPTCP
            } else {
                Protocol::TCP
            };
            let s = Socket::new(Domain::IPV6, Type::STREAM, Some(proto))?;
            s.set_only_v6(false)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            std::io::Result::Ok(std::net::TcpListener::from(s))
        })
        .expect("enter")
        .expect("listen");
    let handle = std::thread::spawn(move || {
        while !stop.load(Relaxed) {
            match listener.accept() {
                Ok((c, _)) => {
                    let _ = c.set_nonblocking(false);
                    std::thread::spawn(move || pump(c, source));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    struct Server(Option<std::thread::JoinHandle<()>>);
    impl Drop for Server {
        fn drop(&mut self) {
            // The thread ends at the next accept poll after `stop`.
            let _ = self.0.take();
        }
    }
    Server(Some(handle))
}

fn pump(mut c: TcpStream, source: bool) {
    let mut buf = vec![0u8; CHUNK];
    if source {
        while c.write_all(&buf).is_ok() {}
    } else {
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    }
}

fn open_flow(lab: &StandardLab, path: Path, dir: Dir) -> TcpStream {
    let server = lab.server_v4();
    let (port_tcp, port_mptcp) = match dir {
        Dir::Up => (TCP_SINK, MPTCP_SINK),
        Dir::Down => (TCP_SOURCE, MPTCP_SOURCE),
    };
    match path {
        Path::Forward | Path::Mptcp => {
            let (port, proto) = if path == Path::Forward {
                (port_tcp, Protocol::TCP)
            } else {
                (port_mptcp, Protocol::MPTCP)
            };
            lab.gateway
                .enter(move || {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(proto))?;
                    s.connect(&SocketAddr::from((server, port)).into())?;
                    std::io::Result::Ok(TcpStream::from(s))
                })
                .expect("enter")
                .expect("connect")
        }
        Path::First | Path::Second => {
            let conv_port = if path == Path::First {
                CONV_FIRST
            } else {
                CONV_SECOND
            };
            let conv: SocketAddr = (lab.converter_v4(), conv_port).into();
            let dest: SocketAddr = (server, port_tcp).into();
            lab.gateway
                .enter(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let c = rt
                        .block_on(client::connect(
                            conv,
                            dest,
                            None,
                            b"",
                            &ClientOptions::default(),
                        ))
                        .expect("converted connection");
                    let s = c.stream.into_std().unwrap();
                    s.set_nonblocking(false).unwrap();
                    s
                })
                .expect("enter")
        }
    }
}

fn measure(
    lab: &StandardLab,
    path: Path,
    dir: Dir,
    flows: usize,
    secs: f64,
    relay_pid: Option<u32>,
) -> Sample {
    let moved = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..flows)
        .map(|_| {
            let mut s = open_flow(lab, path, dir);
            let (moved, stop) = (moved.clone(), stop.clone());
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                let mut buf = vec![0u8; CHUNK];
                while !stop.load(Relaxed) {
                    let r = match dir {
                        Dir::Up => s.write(&buf),
                        Dir::Down => s.read(&mut buf),
                    };
                    match r {
                        Ok(0) => break,
                        Ok(n) => {
                            moved.fetch_add(n as u64, Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            })
        })
        .collect();
    // Rate is measured after a warm-up (slow start, autotuning) unless asked otherwise: with
    // 0, a stall at a transfer's start counts too.
    std::thread::sleep(Duration::from_secs_f64(env_or("BRAID_BENCH_WARMUP", 0.5)));
    let nstat = std::env::var_os("BRAID_BENCH_NSTAT").is_some();
    let n0 = nstat.then(|| (counters(&lab.gateway), counters(&lab.converter), ipis()));
    let (b0, t0) = (moved.load(Relaxed), Instant::now());
    let r0 = relay_pid.map(proc_cpu_ticks);
    let m0 = machine_cpu().busy;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (b1, dt) = (moved.load(Relaxed), t0.elapsed().as_secs_f64());
    let r1 = relay_pid.map(proc_cpu_ticks);
    let m1 = machine_cpu().busy;
    if let Some((g0, c0, i0)) = n0 {
        let i1 = ipis();
        let gib = (moved.load(Relaxed) - b0) as f64 / (1u64 << 30) as f64;
        let (g1, c1) = (counters(&lab.gateway), counters(&lab.converter));
        println!(
            "# nstat per GiB (count), {path:?} {dir:?} {flows} flow(s): gateway [{}] converter [{}]",
            deltas(&g0, &g1, gib),
            deltas(&c0, &c1, gib)
        );
        println!(
            "# interrupts between CPUs per GiB, {path:?} {dir:?} {flows} flow(s): {:.0}",
            (i1 - i0) as f64 / gib
        );
    }
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // Let the server side notice the resets before the next measurement.
    std::thread::sleep(Duration::from_millis(200));
    let bytes = (b1 - b0) as f64;
    let gib = bytes / (1u64 << 30) as f64;
    let tick = 100.0; // USER_HZ
    Sample {
        gbit: bytes * 8.0 / dt / 1e9,
        relay_cpu_per_gib: match (r0, r1) {
            (Some(a), Some(b)) => (b - a) as f64 / tick / gib,
            _ => f64::NAN,
        },
        machine_cpu_per_gib: (m1 - m0) as f64 / tick / gib,
    }
}

/// The directions `BRAID_BENCH_DIRS` asks for, each with its index in the results.
fn wanted(dirs: [bool; 2]) -> impl Iterator<Item = (usize, Dir)> {
    [Dir::Up, Dir::Down]
        .into_iter()
        .enumerate()
        .filter(move |(i, _)| dirs[*i])
}
