//! Converter connection benchmark (prints figures, asserts nothing):
//! - new connections per second, short request/response (16 bytes up, 100 bytes down, server
//!   closes), through `braid converter` with the request riding in the SYN, against the same
//!   exchange over plain TCP with the converter namespace forwarding IP (baseline);
//! - memory per idle connection with many converted connections open, each after one small
//!   exchange through the relay (100 bytes each way, like a keep-alive connection between
//!   requests): the converter's RSS and the kernel's slab and TCP buffer memory (whole machine:
//!   both ends, the converter's MPTCP socket with its two subflows and its upstream TCP socket);
//! - memory per pending handshake: connections that sent one byte of a Convert header and
//!   stall (the converter's RSS).
//!
//! Run: `cargo bench -p braid --bench conns` (as root). Knobs: `BRAID_BENCH_ROUNDS` (3),
//! `BRAID_BENCH_SECS` (3), `BRAID_BENCH_CONCURRENCY` (64), `BRAID_BENCH_IDLE` (10000),
//! `BRAID_BENCH_CONVERTERS` (2: converter processes sharing the idle connections),
//! `BRAID_BENCH_PENDING` (4000).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use braid::client::{self, ClientOptions};
use braid_lab::{Netns, StandardConfig, StandardLab};
use support::{env_or, median, wait_listening};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RR_PORT: u16 = 8201;
const IDLE_PORT: u16 = 8202;
const CONV_PORT: u16 = 5124;
const RESPONSE: usize = 100;

const SERVE_ENV: &str = "BRAID_BENCH_CONNS_SERVER";

fn main() {
    if std::env::var_os(SERVE_ENV).is_some() {
        serve_forever();
    }
    let rounds: usize = env_or("BRAID_BENCH_ROUNDS", 3);
    let secs: f64 = env_or("BRAID_BENCH_SECS", 3.0);
    let concurrency: usize = env_or("BRAID_BENCH_CONCURRENCY", 64);
    let idle: usize = env_or("BRAID_BENCH_IDLE", 10_000);
    let pending: usize = env_or("BRAID_BENCH_PENDING", 4_000);
    braid::daemon::raise_fd_limit();

    let lab = StandardLab::new(StandardConfig::by_hand()).expect("lab");
    for ns in [&lab.gateway, &lab.converter, &lab.server] {
        // Tens of thousands of short connections per run: room for ports and TIME_WAIT.
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")
            .unwrap();
        ns.sysctl("net.ipv4.tcp_tw_reuse", 1).unwrap();
        ns.sysctl("net.core.somaxconn", 8192).unwrap();
        ns.sysctl("net.ipv4.tcp_max_syn_backlog", 8192).unwrap();
    }
    let mut servers = start_servers(&lab.server);
    let bin = env!("CARGO_BIN_EXE_braid");
    // Each converter process holds 2 descriptors per connection; where the hard open-file
    // limit cannot be raised (20,000 in this project's containers) one process tops out below
    // 10,000 connections, so the idle connections are spread over several processes.
    let processes: u16 = env_or("BRAID_BENCH_CONVERTERS", 2);
    let mut converters = Vec::new();
    let mut configs = Vec::new();
    for i in 0..processes.max(1) {
        let port = CONV_PORT + i;
        // One gateway address opens all the idle connections: lift the per-client limit.
        let config = std::env::temp_dir().join(format!(
            "braid-conns-bench-{}-{port}.toml",
            std::process::id()
        ));
        std::fs::write(
            &config,
            format!(
                "listen = [\"[::]:{port}\"]\nallow_client = [\"10.1.0.0/16\"]\n\
                 allow_dest = [\"10.2.0.0/24\"]\nmax_connections_per_client = 100000\n\
                 max_pending_handshakes = 100000\nmax_pending_per_prefix = 100000\n\
                 handshake_timeout_ms = 120000\n"
            ),
        )
        .unwrap();
        let p = lab
            .converter
            .command(bin)
            .arg("converter")
            .arg("--config")
            .arg(&config)
            // The operator's default level: one log line per connection is part of the cost.
            .env("RUST_LOG", "info")
            .stderr(braid_lab::Output::File(config.with_extension("log")))
            .spawn()
            .expect("braid converter");
        wait_listening(&lab.converter, port);
        converters.push(p);
        configs.push(config);
    }
    let convs: Vec<SocketAddr> = (0..processes.max(1))
        .map(|i| (lab.converter_v4(), CONV_PORT + i).into())
        .collect();
    let conv = convs[0];
    let rr_dest: SocketAddr = (lab.server_v4(), RR_PORT).into();

    println!(
        "# braid connection benchmark: {rounds} interleaved rounds of {secs} s, {concurrency} \
         concurrent clients, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (mut fwd, mut conv_rates) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        fwd.push(rate(&lab.gateway, None, rr_dest, concurrency, secs));
        conv_rates.push(rate(&lab.gateway, Some(conv), rr_dest, concurrency, secs));
    }
    let (f, c) = (median(fwd), median(conv_rates));
    println!();
    println!("| new connections/s | plain TCP, forwarded | through braid converter | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| 16 B request, 100 B response | {f:.0} | {c:.0} | {:.2} |",
        c / f
    );

    let rss = |ps: &Vec<braid_lab::Process>| ps.iter().map(|p| rss_kib(p.pid())).sum::<u64>();
    // Pending handshakes: one byte of a Convert header, then nothing.
    std::thread::sleep(Duration::from_secs(2));
    let pending_rss0 = rss(&converters);
    let stalled = hold_pending(&lab.gateway, &convs, pending);
    std::thread::sleep(Duration::from_secs(2));
    let pending_rss1 = rss(&converters);
    println!();
    println!("| {} pending handshakes | per connection |", stalled.len());
    println!("|---|---|");
    println!(
        "| converter RSS | {:.1} KiB |",
        (pending_rss1 as f64 - pending_rss0 as f64) / stalled.len().max(1) as f64
    );
    drop(stalled);
    // Let the converters finish with the stalled connections before the next measure.
    std::thread::sleep(Duration::from_secs(1));

    // Idle connections: open them, let the subflows settle, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let rss0 = rss(&converters);
    let slab0 = slab_bytes();
    let tcp0 = tcp_mem_bytes();
    let idle_dest: SocketAddr = (lab.server_v4(), IDLE_PORT).into();
    let held = hold_idle(&lab.gateway, convs.clone(), idle_dest, idle);
    // Past the relay's buffer hold time and the allocator's decay of freed pages (jemalloc
    // returns them within 10 s): what is measured is what idling costs.
    std::thread::sleep(braid::relay::BUFFER_IDLE + Duration::from_secs(12));
    let opened = held.count;
    let rss1 = rss(&converters);
    let slab1 = slab_bytes();
    let tcp1 = tcp_mem_bytes();
    // Counted here rather than with an ss port filter, which sometimes matched nothing.
    let ports: Vec<String> = (0..processes.max(1))
        .map(|i| format!(":{}", CONV_PORT + i))
        .collect();
    let ss = lab
        .converter
        .run(["ss", "-Htn", "state", "established"])
        .unwrap_or_else(|e| {
            eprintln!("note: ss failed: {e}");
            String::new()
        });
    let subflows = ss
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(2)
                .is_some_and(|local| ports.iter().any(|p| local.ends_with(p.as_str())))
        })
        .count();
    let per = |d: i64| d as f64 / opened.max(1) as f64;
    println!();
    println!(
        "| {opened} idle converted connections ({subflows} subflows at the converter, {} \
         converter processes) | per connection |",
        converters.len()
    );
    println!("|---|---|");
    println!(
        "| converter RSS | {:.1} KiB |",
        per((rss1 as i64 - rss0 as i64) * 1024) / 1024.0
    );
    println!(
        "| kernel slab, whole machine (all four ends) | {:.1} KiB |",
        per(slab1 as i64 - slab0 as i64) / 1024.0
    );
    println!(
        "| kernel TCP buffer memory, whole machine | {:.1} KiB |",
        per(tcp1 as i64 - tcp0 as i64) / 1024.0
    );
    drop(held);

    for mut p in converters {
        let _ = p.stop();
    }
    let _ = servers.kill();
    for config in configs {
        if opened < idle {
            // Say why, from the converter's own account of the refused connections.
            let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
            for l in log
                .lines()
                .filter(|l| l.contains("outcome=") && !l.contains("outcome=\"closed\""))
                .filter(|l| l.contains(&format!(":{IDLE_PORT}")))
                .take(3)
            {
                eprintln!("converter: {l}");
            }
        }
        let _ = std::fs::remove_file(config.with_extension("log"));
        let _ = std::fs::remove_file(&config);
    }
}

/// Completed request/response exchanges per second, `concurrency` at a time, either straight
/// to `dest` or through the converter at `via`.
fn rate(
    ns: &Netns,
    via: Option<SocketAddr>,
    dest: SocketAddr,
    concurrency: usize,
    secs: f64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (d2, f2) = (done.clone(), failed.clone());
    let started = Instant::now();
    ns.block_on(move || async move {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (done, failed) = (d2.clone(), f2.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    match exchange(via, dest).await {
                        Ok(()) => done.fetch_add(1, Relaxed),
                        Err(_) => failed.fetch_add(1, Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    })
    .expect("runtime in the namespace");
    let elapsed = started.elapsed().as_secs_f64();
    let failed = failed.load(Relaxed);
    if failed > 0 {
        eprintln!("note: {failed} failed exchanges via {via:?}");
    }
    done.load(Relaxed) as f64 / elapsed
}

async fn exchange(via: Option<SocketAddr>, dest: SocketAddr) -> std::io::Result<()> {
    let request = [7u8; 16];
    let (mut stream, mut got) = match via {
        None => {
            let mut s = tokio::net::TcpStream::connect(dest).await?;
            s.write_all(&request).await?;
            (s, 0)
        }
        Some(conv) => {
            let c = client::connect(conv, dest, None, &request, &ClientOptions::default())
                .await
                .map_err(std::io::Error::other)?;
            (c.stream, c.leftover.len())
        }
    };
    // The client never closes first: TIME_WAIT stays on the server side, off the client's ports.
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf).await? {
            0 => break,
            n => got += n,
        }
    }
    if got == RESPONSE {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("short response: {got}")))
    }
}

struct Held {
    count: usize,
    _rt: tokio::runtime::Runtime,
    _streams: Vec<tokio::net::TcpStream>,
}

/// Opens `n` connections round-robin over `convs` that send one byte of a Convert header and
/// stall.
fn hold_pending(ns: &Netns, convs: &[SocketAddr], n: usize) -> Vec<std::net::TcpStream> {
    let convs = convs.to_vec();
    ns.enter(move || {
        (0..n)
            .filter_map(|i| {
                use std::io::Write;
                let mut s = std::net::TcpStream::connect(convs[i % convs.len()]).ok()?;
                s.write_all(&[1]).ok()?;
                Some(s)
            })
            .collect()
    })
    .expect("enter")
}

/// Opens `n` converted connections, round-robin over `convs`, has each exchange 100 bytes
/// each way with the server, and keeps them open.
fn hold_idle(ns: &Netns, convs: Vec<SocketAddr>, dest: SocketAddr, n: usize) -> Held {
    ns.enter(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let streams = rt.block_on(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                let conv = convs[i % convs.len()];
                let permit = sem.clone().acquire_owned().await.unwrap();
                tasks.push(tokio::spawn(async move {
                    let r = async {
                        let mut c =
                            client::connect(conv, dest, None, b"", &ClientOptions::default())
                                .await
                                .map_err(|e| e.to_string())?;
                        let mut echo = [0u8; RESPONSE];
                        c.stream.write_all(&echo).await.map_err(|e| e.to_string())?;
                        c.stream
                            .read_exact(&mut echo)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(c.stream)
                    }
                    .await;
                    drop(permit);
                    r
                }));
            }
            let mut out = Vec::with_capacity(n);
            let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
            for t in tasks {
                match t.await {
                    Ok(Ok(s)) => out.push(s),
                    Ok(Err(e)) => *errors.entry(e).or_default() += 1,
                    Err(e) => *errors.entry(e.to_string()).or_default() += 1,
                }
            }
            for (e, k) in errors {
                eprintln!("note: {k} idle connections failed to open: {e}");
            }
            out
        });
        Held {
            count: streams.len(),
            _rt: rt,
            _streams: streams,
        }
    })
    .expect("enter")
}

/// The request/response server and the idle server, on a runtime whose threads live in `ns`.
/// The request/response and idle servers run in a child process (this benchmark binary again,
/// in the server namespace): holding 10,000 connections at each end inside one process would
/// exceed the hard open-file limit of 20,000 seen here.
fn start_servers(ns: &Netns) -> braid_lab::Process {
    let exe = std::env::current_exe().expect("benchmark binary");
    let p = ns
        .command(exe)
        .env(SERVE_ENV, "1")
        .spawn()
        .expect("server process");
    wait_listening(ns, IDLE_PORT);
    wait_listening(ns, RR_PORT);
    p
}

/// Body of the server child process: serves until killed. Accept errors (out of descriptors)
/// back off instead of ending the loop, which would reset every queued connection.
fn serve_forever() -> ! {
    braid::daemon::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let rr = listen(RR_PORT);
        let idle = listen(IDLE_PORT);
        tokio::spawn(async move {
            loop {
                match idle.accept().await {
                    Ok((mut s, _)) => {
                        // An echo: each idle connection's one exchange moves data both ways.
                        tokio::spawn(async move {
                            let mut b = [0u8; RESPONSE];
                            while let Ok(n) = s.read(&mut b).await {
                                if n == 0 || s.write_all(&b[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        loop {
            match rr.accept().await {
                Ok((mut s, _)) => {
                    tokio::spawn(async move {
                        let mut req = [0u8; 16];
                        if s.read_exact(&mut req).await.is_ok() {
                            let _ = s.write_all(&[1u8; RESPONSE]).await;
                        }
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
}

/// A listener with a deep accept queue (tokio's `bind` uses 1024): bursts of hundreds of
/// connects must not be dropped by the benchmark's own server.
fn listen(port: u16) -> tokio::net::TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .unwrap();
    s.listen(8192).unwrap();
    s.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(s.into()).unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    braid_lab::process::rss_kib(pid).unwrap_or(0)
}

/// Bytes in all slab caches (`num_objs × objsize` summed), machine-wide.
fn slab_bytes() -> u64 {
    std::fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let objs: u64 = f.get(2)?.parse().ok()?;
            let size: u64 = f.get(3)?.parse().ok()?;
            Some(objs * size)
        })
        .sum()
}

/// `TCP: ... mem N` of /proc/net/sockstat: pages charged to TCP sockets, machine-wide.
fn tcp_mem_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|x| *x == "mem")?;
            f.get(i + 1)?.parse::<u64>().ok()
        })
        .map_or(0, |pages| pages * 4096)
}
