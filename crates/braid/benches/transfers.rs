//! Transfer benchmark (prints figures, asserts nothing): how long a new connection takes to
//! move 30 KB to 10 MB through `braid gateway` + `braid converter` over two shaped, delayed
//! uplinks, against the same transfer forwarded over the faster uplink alone (no braid), in the
//! same run. A bulk benchmark shows the sum of the links; what users feel first is how soon a
//! page's objects, an upload or a short download are done, where slow start, the first round
//! trips and any waiting in the relays count for much.
//!
//! Downloads: curl in the LAN client fetching a file from the server (its size checked).
//! Uploads: a client in the LAN that writes a 1,000-byte head and, 10 ms later, the rest, and a
//! server that answers one byte once it has every byte in order; the time runs from connect to
//! that answer.
//!
//! Run: `cargo bench -p braid --bench transfers` (as root; about 2 minutes). Knobs:
//! `BRAID_BENCH_RATES` (Mbit/s per uplink, "100,50"), `BRAID_BENCH_DELAYS` (one-way ms per
//! uplink, "10,25"; the first uplink is the forwarded path), `BRAID_BENCH_SIZES` (bytes,
//! "30000,300000,1000000,3000000,10000000"), `BRAID_BENCH_N` (transfers per cell, 7; the
//! median is shown), `BRAID_BENCH_DIRS` ("up,down"). Congestion control reno everywhere.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use braid_lab::{Delay, Netns, StandardConfig, StandardLab, upload};
use support::{env_or, median};

const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 9100;
/// Bytes the upload client writes before its 10 ms pause.
const HEAD: usize = 1000;

fn list<T: std::str::FromStr>(key: &str, default: &str) -> Vec<T> {
    env_or(key, default.to_string())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// The lab with braid's daemons running, or set up by hand to forward over uplink 1 (the
/// lab's hand-made routing sends the server link through it).
fn lab(braid: bool, rates: &[u64], delays: &[u64]) -> (StandardLab, Vec<braid_lab::Process>) {
    let cfg = StandardConfig {
        uplinks: rates.len(),
        rates: Some(rates.iter().map(|r| r * 1_000_000).collect()),
        delays: Some(delays.iter().map(|d| Delay::ms(*d)).collect()),
        congestion_control: Some("reno".into()),
        ..if braid {
            StandardConfig::default()
        } else {
            StandardConfig::by_hand()
        }
    };
    let lab = StandardLab::new(cfg).expect("lab");
    let daemons = if braid {
        support::start_daemons(&lab, &[], &["--transparent".to_string(), "tproxy".into()])
    } else {
        Vec::new()
    };
    (lab, daemons)
}

/// One upload's time in ms, NaN if it failed or arrived damaged.
fn upload(ns: &Netns, dest: SocketAddr, size: usize) -> f64 {
    upload::send(ns, dest, HEAD, Duration::from_millis(10), size)
        .map_or(f64::NAN, |t| t.as_secs_f64() * 1000.0)
}

/// One download's time in ms (curl's total), NaN if it failed or came short.
fn download(ns: &Netns, url: &str, size: u64) -> f64 {
    let out = ns.run([
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{time_total}",
        url,
    ]);
    let Ok(out) = out else { return f64::NAN };
    let mut it = out.split_whitespace();
    match (
        it.next().and_then(|v| v.parse::<u64>().ok()),
        it.next().and_then(|v| v.parse::<f64>().ok()),
    ) {
        (Some(n), Some(t)) if n == size => t * 1000.0,
        _ => f64::NAN,
    }
}

/// Median ms per (direction, size) for one way of running the lab.
fn measure(braid: bool, rates: &[u64], delays: &[u64], sizes: &[u64], n: usize) -> Vec<[f64; 2]> {
    let (lab, _daemons) = lab(braid, rates, delays);
    let [up, down] = support::dirs_wanted();
    // Let braid's uplinks settle (endpoints, first health probes) before timing anything.
    std::thread::sleep(Duration::from_secs(2));
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let d = if down {
                let port = HTTP_PORT + i as u16;
                braid_lab::http::serve_file(&lab.server, port, size).expect("file server");
                let url = format!("http://{}:{port}/file", lab.server_v4());
                median((0..n).map(|_| download(&lab.client, &url, size)).collect())
            } else {
                f64::NAN
            };
            let u = if up {
                let port = SINK_PORT + i as u16;
                let _sink = upload::sink(&lab.server, port, size as usize).expect("sink");
                let dest = (lab.server_v4(), port).into();
                median(
                    (0..n)
                        .map(|_| upload(&lab.client, dest, size as usize))
                        .collect(),
                )
            } else {
                f64::NAN
            };
            [u, d]
        })
        .collect()
}

fn main() {
    let rates: Vec<u64> = list("BRAID_BENCH_RATES", "100,50");
    let delays: Vec<u64> = list("BRAID_BENCH_DELAYS", "10,25");
    let sizes: Vec<u64> = list("BRAID_BENCH_SIZES", "30000,300000,1000000,3000000,10000000");
    let n: usize = env_or("BRAID_BENCH_N", 7);
    assert_eq!(rates.len(), delays.len(), "one delay per uplink");
    let links: Vec<String> = rates
        .iter()
        .zip(&delays)
        .map(|(r, d)| format!("{r} Mbit/s {d} ms"))
        .collect();
    println!(
        "# braid transfer benchmark: new connections, uplinks {} (one way), reno, median of {n}; \
         forwarded = the first uplink alone, no braid",
        links.join(" + ")
    );
    let forwarded = measure(false, &rates, &delays, &sizes, n);
    let braid = measure(true, &rates, &delays, &sizes, n);
    println!();
    println!("| size | direction | forwarded ms | gateway + converter ms | braid / forwarded |");
    println!("|---|---|---|---|---|");
    for (dir, k) in [("client → server", 0), ("server → client", 1)] {
        for (i, size) in sizes.iter().enumerate() {
            let (f, b) = (forwarded[i][k], braid[i][k]);
            if f.is_nan() && b.is_nan() {
                continue;
            }
            println!(
                "| {} | {dir} | {f:.1} | {b:.1} | {:.2} |",
                if *size >= 1_000_000 {
                    format!("{} MB", size / 1_000_000)
                } else {
                    format!("{} KB", size / 1000)
                },
                b / f
            );
        }
    }
}
