//! Uplink benchmark (prints figures, asserts nothing): what a bonded download through `braid
//! gateway` + `braid converter` reaches, as a fraction of what the links carry alone (measured
//! in the same run), and how long a returning uplink takes to carry traffic again, for three
//! ways of running the gateway:
//! - (a) kernel defaults: a router-like gateway, braid's path management off (no endpoints,
//!   no source rules): what a user gets out of the box;
//! - (b) by hand: endpoints and source routing configured as a careful user would (the lab's
//!   hand-made set-up), braid's path management off;
//! - braid: a router-like gateway, braid managing its uplinks.
//!
//! Run: `cargo bench -p braid --bench uplinks` (as root; about 4 minutes). Knobs:
//! `BRAID_BENCH_SIZE_MIB` (48). Congestion control reno in every namespace (this host's bbr
//! without the fq qdisc bonds uneven links badly, see the README).

mod support;

use std::time::{Duration, Instant};

use braid_lab::Process;
use braid_lab::{Delay, StandardConfig, StandardLab};
use support::env_or;

const HTTP_PORT: u16 = 8080;

/// A caption, the uplinks' rates and their one-way delays.
type Scenario = (&'static str, Vec<u64>, Option<Vec<Delay>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Defaults,
    ByHand,
    Braid,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Defaults => "(a) kernel defaults",
            Mode::ByHand => "(b) by hand",
            Mode::Braid => "braid",
        }
    }
}

struct Run {
    lab: StandardLab,
    _daemons: Vec<Process>,
    url: String,
}

fn start(mode: Mode, rates: &[u64], delays: Option<Vec<Delay>>, size: u64) -> Run {
    let cfg = StandardConfig {
        uplinks: rates.len(),
        rates: Some(rates.to_vec()),
        delays,
        congestion_control: Some("reno".into()),
        ..match mode {
            Mode::ByHand => StandardConfig::by_hand(),
            _ => StandardConfig::default(),
        }
    };
    let lab = StandardLab::new(cfg).expect("lab");
    braid_lab::http::serve_file(&lab.server, HTTP_PORT, size).expect("file server");
    let mut gw_args = vec!["--transparent".to_string(), "tproxy".into()];
    if mode != Mode::Braid {
        gw_args.push("--no-manage-uplinks".into());
    }
    let daemons = support::start_daemons(&lab, &[], &gw_args);
    let url = format!("http://{}:{HTTP_PORT}/file", lab.server_v4());
    Run {
        lab,
        _daemons: daemons,
        url,
    }
}

/// One curl download from the LAN client, Mbit/s.
fn download(run: &Run, size: u64) -> f64 {
    let t = Instant::now();
    let out = run.lab.client.run([
        "curl",
        "-sS",
        "--max-time",
        "120",
        "-o",
        "/dev/null",
        &run.url,
    ]);
    match out {
        Ok(_) => size as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6,
        Err(e) => {
            eprintln!("download failed: {e}");
            f64::NAN
        }
    }
}

fn if_bytes(lab: &StandardLab, ifname: &str) -> u64 {
    lab.gateway
        .run([
            "cat",
            &format!("/sys/class/net/{ifname}/statistics/rx_bytes"),
        ])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// What happens to uplink 2 mid-download.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// Down for 3 s, then up.
    Flap,
    /// A new address (a DHCP renewal or PPP reconnect).
    NewAddress,
}

/// Does `event` to uplink 2 during a download and returns how long after it it carried more
/// than 100 kB in 100 ms again (`None`: not within 10 s).
fn recovery(run: &Run, event: Event) -> Option<Duration> {
    let client = run.lab.client.clone();
    let url = run.url.clone();
    let dl = std::thread::spawn(move || {
        client.run(["curl", "-sS", "--max-time", "120", "-o", "/dev/null", &url])
    });
    std::thread::sleep(Duration::from_secs(2));
    let up = &run.lab.uplinks[1];
    let t;
    match event {
        Event::Flap => {
            up.link.down().ok()?;
            std::thread::sleep(Duration::from_secs(3));
            up.link.up().ok()?;
            t = Instant::now();
        }
        Event::NewAddress => {
            t = Instant::now();
            up.link
                .a
                .replace_addr(
                    "10.1.2.1/24".parse().expect("prefix"),
                    "10.1.2.5/24".parse().expect("prefix"),
                )
                .ok()?;
            // The old address's subflow may still send for a moment: look from when it must
            // have stopped (times still count from the change).
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let mut samples = Vec::new();
    let mut back = None;
    while t.elapsed() < Duration::from_secs(10) {
        samples.push((t.elapsed(), if_bytes(&run.lab, &up.gateway_if)));
        if samples.len() >= 3 {
            let n = samples.len();
            if samples[n - 1].1.saturating_sub(samples[n - 3].1) > 100_000 {
                back = Some(samples[n - 1].0);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = dl.join();
    back
}

fn main() {
    let size: u64 = env_or("BRAID_BENCH_SIZE_MIB", 48u64) << 20;
    let scenarios: [Scenario; 4] = [
        (
            "2 uplinks, 20 + 30 Mbit/s",
            vec![20_000_000, 30_000_000],
            None,
        ),
        (
            "3 uplinks, 10 + 20 + 50 Mbit/s",
            vec![10_000_000, 20_000_000, 50_000_000],
            None,
        ),
        (
            "2 uplinks, 20 Mbit/s 10 ms + 30 Mbit/s 40 ms (one way)",
            vec![20_000_000, 30_000_000],
            Some(vec![Delay::ms(10), Delay::ms(40)]),
        ),
        (
            "3 uplinks, 10 Mbit/s 10 ms + 20 Mbit/s 20 ms + 50 Mbit/s 40 ms",
            vec![10_000_000, 20_000_000, 50_000_000],
            Some(vec![Delay::ms(10), Delay::ms(20), Delay::ms(40)]),
        ),
    ];
    println!(
        "# braid uplink benchmark: one curl download of {} MiB per cell, reno, {} cores",
        size >> 20,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| links | links alone, Mbit/s | (a) kernel defaults | (b) by hand | braid |");
    println!("|---|---|---|---|---|");
    for (name, rates, delays) in &scenarios {
        let mut cells = Vec::new();
        let mut alone = Vec::new();
        for mode in [Mode::Defaults, Mode::ByHand, Mode::Braid] {
            let run = start(mode, rates, delays.clone(), size);
            if mode == Mode::Braid {
                alone = run.lab.single_link_rates(Duration::from_secs(3));
            }
            cells.push(download(&run, size));
        }
        let sum: f64 = alone.iter().sum();
        let cell = |r: f64| format!("{r:.1} Mbit/s ({:.0}%)", r / sum * 100.0);
        println!(
            "| {name} | {} (sum {sum:.1}) | {} | {} | {} |",
            alone
                .iter()
                .map(|a| format!("{a:.1}"))
                .collect::<Vec<_>>()
                .join(" + "),
            cell(cells[0]),
            cell(cells[1]),
            cell(cells[2]),
        );
    }
    println!();
    println!(
        "| mid-download, 20 + 30 Mbit/s | uplink 2 down 3 s: carries again after it is up | \
         uplink 2 gets a new address: carries again after |"
    );
    println!("|---|---|---|");
    for mode in [Mode::Defaults, Mode::ByHand, Mode::Braid] {
        let show = |d: Option<Duration>| {
            d.map_or("not within 10 s".to_string(), |d| {
                format!("{} ms", d.as_millis())
            })
        };
        let flap = recovery(
            &start(mode, &[20_000_000, 30_000_000], None, size * 2),
            Event::Flap,
        );
        let readdr = recovery(
            &start(mode, &[20_000_000, 30_000_000], None, size * 2),
            Event::NewAddress,
        );
        println!("| {} | {} | {} |", mode.label(), show(flap), show(readdr));
    }
}
