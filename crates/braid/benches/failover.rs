//! Failover benchmark (prints figures, asserts nothing): the longest stall and the bytes lost
//! of a paced 4 Mbit/s stream through `braid gateway` + `braid converter`, each way, while an
//! uplink fails, for two ways of running the gateway:
//! - by hand: endpoints and source routing configured as a careful user would (the lab's
//!   hand-made set-up), braid's path management and health checks off; the kernel alone
//!   copes with each failure;
//! - braid: a router-like gateway, braid managing its uplinks and their health, and both
//!   daemons setting `net.mptcp.stale_loss_cnt` to 2 (by hand leaves the kernel's 4).
//!
//! Two uplinks, 20 Mbit/s at 10 ms and 30 Mbit/s at 40 ms one way; uplink 1 is where
//! connections start (the default route), so a failure there hits the initial subflow.
//!
//! Run: `cargo bench -p braid --bench failover` (as root; about 7 minutes). Congestion control
//! reno in every namespace. Knobs, to measure what the kernel's own settings change (applied
//! in the gateway's and the converter's namespaces): `BRAID_BENCH_STALE_LOSS_CNT` (sets
//! `net.mptcp.stale_loss_cnt`), `BRAID_BENCH_RTO_MIN_US` (sets `net.ipv4.tcp_rto_min_us`),
//! `BRAID_BENCH_EVENTS` (a comma-separated subset of `down2,down1,blackhole2,blackhole1,flap2,
//! backup`), `BRAID_BENCH_MODES` (`hand,braid`).

use std::net::SocketAddr;
use std::time::Duration;

mod support;

use braid_lab::stream::{Flow, Running, Spec};
use braid_lab::{Delay, Process, StandardConfig, StandardLab};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ByHand,
    Braid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    LinkDown(usize),
    Blackhole(usize),
    /// Down 2 s, up 2 s, three times.
    Flap(usize),
    /// Uplink 2 is a backup; uplink 1 goes down.
    BackupTakeover,
}

impl Event {
    fn label(self) -> String {
        match self {
            Event::LinkDown(i) => format!("uplink {} loses its carrier for 4 s", i + 1),
            Event::Blackhole(i) => {
                format!("uplink {} drops everything for 4 s (carrier up)", i + 1)
            }
            Event::Flap(i) => format!("uplink {} flaps (2 s down, 2 s up, 3 times)", i + 1),
            Event::BackupTakeover => "backup takeover: the only primary goes down".into(),
        }
    }
}

struct Run {
    lab: StandardLab,
    _daemons: Vec<Process>,
}

fn start(mode: Mode, backup: bool) -> Run {
    let cfg = StandardConfig {
        uplinks: 2,
        rates: Some(vec![20_000_000, 30_000_000]),
        delays: Some(vec![Delay::ms(10), Delay::ms(40)]),
        congestion_control: Some("reno".into()),
        ..match mode {
            Mode::ByHand => StandardConfig::by_hand(),
            Mode::Braid => StandardConfig::default(),
        }
    };
    let lab = StandardLab::new(cfg).expect("lab");
    for ns in [&lab.gateway, &lab.converter] {
        if let Ok(v) = std::env::var("BRAID_BENCH_STALE_LOSS_CNT") {
            ns.sysctl("net.mptcp.stale_loss_cnt", v)
                .expect("stale_loss_cnt");
        }
        if let Ok(v) = std::env::var("BRAID_BENCH_RTO_MIN_US") {
            ns.sysctl("net.ipv4.tcp_rto_min_us", v)
                .expect("tcp_rto_min_us");
        }
    }
    let mut args = vec!["--transparent".to_string(), "tproxy".into()];
    match mode {
        Mode::ByHand => {
            args.push("--no-manage-uplinks".into());
            if backup {
                // What a careful user does for a backup link: its endpoint flagged backup.
                let eps = lab
                    .gateway
                    .run(["ip", "mptcp", "endpoint", "show"])
                    .unwrap_or_default();
                for line in eps
                    .lines()
                    .filter(|l| l.contains(&lab.uplinks[1].gateway_if))
                {
                    if let Some(id) = line.split_whitespace().skip_while(|w| *w != "id").nth(1) {
                        let _ = lab
                            .gateway
                            .run(["ip", "mptcp", "endpoint", "change", "id", id, "backup"]);
                    }
                }
            }
        }
        Mode::Braid if backup => {
            for a in ["--uplink", "g-v1", "--uplink", "g-v2,backup"] {
                args.push(a.into());
            }
        }
        Mode::Braid => {}
    }
    // By hand, the kernel's defaults everywhere: the converter leaves stale_loss_cnt alone.
    let converter_args: &[&str] = match mode {
        Mode::ByHand => &["--stale-loss-cnt", "0"],
        Mode::Braid => &[],
    };
    let daemons = support::start_daemons(&lab, converter_args, &args);
    Run {
        lab,
        _daemons: daemons,
    }
}

/// (longest stall in ms, bytes lost) of one stream through one event; NaN if it broke.
fn measure(mode: Mode, event: Event, flow: Flow) -> (f64, String) {
    let run = start(mode, event == Event::BackupTakeover);
    let secs = 14;
    let spec = Spec {
        duration: Duration::from_secs(secs),
        ..Spec::default()
    };
    let addr = SocketAddr::new(run.lab.server_v4().into(), 9300);
    let s = Running::start(&run.lab.client, &run.lab.server, addr, flow, spec).expect("stream");
    std::thread::sleep(Duration::from_secs(3));
    let link = |i: usize| &run.lab.uplinks[i].link;
    match event {
        Event::LinkDown(i) => {
            link(i).down().unwrap();
            std::thread::sleep(Duration::from_secs(4));
            link(i).up().unwrap();
        }
        Event::Blackhole(i) => {
            link(i).set_blackhole(true).unwrap();
            std::thread::sleep(Duration::from_secs(4));
            link(i).set_blackhole(false).unwrap();
        }
        Event::Flap(i) => {
            for _ in 0..3 {
                link(i).down().unwrap();
                std::thread::sleep(Duration::from_secs(2));
                link(i).up().unwrap();
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Event::BackupTakeover => {
            link(0).down().unwrap();
            std::thread::sleep(Duration::from_secs(4));
            link(0).up().unwrap();
        }
    }
    match s.wait() {
        Ok(r) => {
            let lost = spec.records().saturating_sub(r.records) * spec.record as u64;
            let lost = if r.intact {
                format!("{lost}")
            } else {
                format!("{lost} (broken: {})", r.error.unwrap_or_default())
            };
            (r.longest_gap.as_secs_f64() * 1e3, lost)
        }
        Err(e) => (f64::NAN, format!("stream failed: {e}")),
    }
}

fn main() {
    let all = [
        ("down2", Event::LinkDown(1)),
        ("down1", Event::LinkDown(0)),
        ("blackhole2", Event::Blackhole(1)),
        ("blackhole1", Event::Blackhole(0)),
        ("flap2", Event::Flap(1)),
        ("backup", Event::BackupTakeover),
    ];
    let wanted = std::env::var("BRAID_BENCH_EVENTS").unwrap_or_default();
    let events: Vec<Event> = all
        .iter()
        .filter(|(k, _)| wanted.is_empty() || wanted.split(',').any(|w| w == *k))
        .map(|(_, e)| *e)
        .collect();
    let modes_wanted = std::env::var("BRAID_BENCH_MODES").unwrap_or_default();
    let modes: Vec<Mode> = [("hand", Mode::ByHand), ("braid", Mode::Braid)]
        .iter()
        .filter(|(k, _)| modes_wanted.is_empty() || modes_wanted.split(',').any(|w| w == *k))
        .map(|(_, m)| *m)
        .collect();
    for k in ["BRAID_BENCH_STALE_LOSS_CNT", "BRAID_BENCH_RTO_MIN_US"] {
        if let Ok(v) = std::env::var(k) {
            println!("# {k}={v}");
        }
    }
    println!(
        "# braid failover benchmark: a 4 Mbit/s stream for 14 s, the failure at 3 s; two uplinks \
         20 Mbit/s 10 ms + 30 Mbit/s 40 ms one way; reno; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| failure | by hand: longest stall down / up | braid: longest stall down / up | bytes lost (by hand / braid) |"
    );
    println!("|---|---|---|---|");
    for e in events {
        let mut stalls = Vec::new();
        let mut lost = Vec::new();
        for mode in [Mode::ByHand, Mode::Braid] {
            if !modes.contains(&mode) {
                stalls.push("-".into());
                lost.push("-".into());
                continue;
            }
            let (down, ld) = measure(mode, e, Flow::Down);
            let (up, lu) = measure(mode, e, Flow::Up);
            stalls.push(format!("{down:.0} / {up:.0} ms"));
            lost.push(if ld == "0" && lu == "0" {
                "0".to_string()
            } else {
                format!("{ld}, {lu}")
            });
        }
        println!(
            "| {} | {} | {} | {} / {} |",
            e.label(),
            stalls[0],
            stalls[1],
            lost[0],
            lost[1]
        );
    }
}
