//! Failover as an application feels it: a paced 4 Mbit/s stream (and bulk downloads) through
//! real `braid gateway` and `braid converter` processes on a router-like lab with two shaped
//! uplinks (20 Mbit/s at 10 ms one way, 30 Mbit/s at 40 ms), while an uplink loses its carrier,
//! silently drops everything, loses packets at random, or flaps. The stream's receiver checks
//! every byte and records the longest gap between arrivals.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use braid_lab::stream::{Flow, Report, Running, Spec};
use braid_lab::{Delay, GatewayRouting, StandardConfig};
use common::*;

fn mbit(m: u64) -> u64 {
    m * 1_000_000
}

fn lab_config() -> StandardConfig {
    StandardConfig {
        congestion_control: Some("reno".into()),
        uplinks: 2,
        rates: Some(vec![mbit(20), mbit(30)]),
        delays: Some(vec![Delay::ms(10), Delay::ms(40)]),
        mptcp_gateway_endpoints: false,
        gateway_routing: GatewayRouting::Router,
        ..StandardConfig::default()
    }
}

/// A lab and a gateway managing its uplinks, with metrics on `metrics_port`.
fn start(extra: &[&str], metrics_port: u16) -> (ConverterLab, Gateway) {
    let cl = ConverterLab::new(lab_config(), &default_converter_args());
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut args = vec!["--transparent", "tproxy", "--metrics", &metrics];
    args.extend_from_slice(extra);
    let gw = gateway_to(&cl, &args);
    (cl, gw)
}

fn stream_addr(cl: &ConverterLab) -> SocketAddr {
    SocketAddr::new(cl.lab.server_v4().into(), 9300)
}

/// A stream with a watchdog: if nothing arrives for [`STALLED`], what the kernel says of the
/// connections then (`ss -Mni` and the MPTCP counters in the gateway's and the converter's
/// namespaces) is captured once, while it is stalled, for the failure message.
struct Watched {
    running: Running,
    stop: Arc<AtomicBool>,
    dog: std::thread::JoinHandle<String>,
}

const STALLED: Duration = Duration::from_secs(3);

impl Watched {
    fn wait(self) -> (Report, String) {
        let r = self.running.wait();
        self.stop.store(true, Ordering::Relaxed);
        let diag = self.dog.join().unwrap_or_default();
        (r.unwrap_or_else(|e| panic!("{e}\n{diag}")), diag)
    }
}

fn stream(cl: &ConverterLab, flow: Flow, secs: u64) -> Watched {
    let running = Running::start(
        &cl.lab.client,
        &cl.lab.server,
        stream_addr(cl),
        flow,
        Spec {
            duration: Duration::from_secs(secs),
            ..Spec::default()
        },
    )
    .expect("stream");
    let live = running.live();
    let stop = Arc::new(AtomicBool::new(false));
    let (gw, cv) = (cl.lab.gateway.clone(), cl.lab.converter.clone());
    let st = stop.clone();
    let dog = std::thread::spawn(move || {
        let (mut seen, mut since) = (0, Instant::now());
        while !st.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let now = live.records();
            if now != seen || now == 0 {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= STALLED {
                let mut out = format!("stalled {STALLED:?} after {now} records:\n");
                for (name, ns) in [("gateway", &gw), ("converter", &cv)] {
                    for cmd in ["ss -Mni", "nstat -az | grep -i mptcp | grep -v ' 0 '"] {
                        out.push_str(&format!(
                            "--- {name}: {cmd}\n{}\n",
                            ns.sh(cmd).unwrap_or_else(|e| e.to_string())
                        ));
                    }
                }
                return out;
            }
        }
        String::new()
    });
    Watched { running, stop, dog }
}

fn status(cl: &ConverterLab) -> braid::status::Status {
    let json = cl
        .lab
        .gateway
        .run([env!("CARGO_BIN_EXE_braid"), "status", "--json"])
        .expect("braid status");
    serde_json::from_str(json.trim()).expect("status JSON")
}

fn health_of(cl: &ConverterLab, uplink: &str) -> String {
    status(cl)
        .uplinks
        .iter()
        .find(|u| u.name == uplink)
        .map(|u| u.health.clone())
        .unwrap_or_default()
}

/// Polls `cond` every `every` for up to `limit`; how long until it held.
fn within(limit: Duration, every: Duration, cond: impl Fn() -> bool) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if cond() {
            return Some(t.elapsed());
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Waits up to `limit` for `uplink` to be in `health`; how long it took.
fn until_health(
    cl: &ConverterLab,
    uplink: &str,
    health: &str,
    limit: Duration,
) -> Option<Duration> {
    within(limit, Duration::from_millis(50), || {
        health_of(cl, uplink) == health
    })
}

fn metrics(cl: &ConverterLab, port: u16) -> String {
    cl.lab
        .gateway
        .run(["curl", "-sS", &format!("http://127.0.0.1:{port}/metrics")])
        .unwrap_or_default()
}

fn report_line(what: &str, r: &Report) -> String {
    format!(
        "{what}: {} records, intact {}, longest gap {:.0} ms (at {:.1} s), worst delay {:.0} ms, stalls {:?}",
        r.records,
        r.intact,
        r.longest_gap.as_secs_f64() * 1e3,
        r.longest_gap_at.as_secs_f64(),
        r.worst_delay.as_secs_f64() * 1e3,
        r.stalls
            .iter()
            .map(|(at, g)| format!("{:.1}s:{:.0}ms", at.as_secs_f64(), g.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
    )
}

fn assert_stream(
    what: &str,
    (r, diag): &(Report, String),
    spec_records: u64,
    max_gap: Duration,
    gw: &Gateway,
) {
    eprintln!("{}", report_line(what, r));
    assert!(r.intact, "{what}: {:?}\n{}\n{diag}", r.error, gw.log_text());
    assert_eq!(r.records, spec_records, "{what}: records lost");
    assert!(
        r.longest_gap < max_gap,
        "{}\n{}\n{diag}",
        report_line(what, r),
        gw.log_text()
    );
}

/// The subflows `braid status` shows on `uplink`.
fn subflows_on(cl: &ConverterLab, uplink: &str) -> usize {
    status(cl)
        .uplinks
        .iter()
        .find(|u| u.name == uplink)
        .map_or(0, |u| u.subflows)
}

fn records(secs: u64) -> u64 {
    Spec {
        duration: Duration::from_secs(secs),
        ..Spec::default()
    }
    .records()
}

/// A stream each way while uplink `which` is blackholed for 4 s: nothing lost, the longest
/// gap under 1.5 s, the uplink dead within 3 s, healthy and carrying again within 5 s of the
/// blackhole's end.
fn blackhole_mid_stream(which: usize, port_base: u16) {
    let name = format!("g-v{}", which + 1);
    for (flow, port) in [(Flow::Down, port_base), (Flow::Up, port_base + 1)] {
        let (cl, gw) = start(&[], port);
        let s = stream(&cl, flow, 14);
        std::thread::sleep(Duration::from_secs(3));
        cl.lab.uplinks[which].link.set_blackhole(true).unwrap();
        let dead = until_health(&cl, &name, "dead", Duration::from_secs(5));
        eprintln!("{flow:?}: {name} dead after {dead:?}");
        assert!(
            dead.is_some_and(|d| d <= Duration::from_secs(3)),
            "{flow:?}: not marked dead within 3 s\n{}",
            gw.log_text()
        );
        let m = metrics(&cl, port);
        let line = format!("braid_gateway_uplink_health{{uplink=\"{name}\",health=\"dead\"}} 1");
        assert!(m.contains(&line), "no {line} in:\n{m}");
        std::thread::sleep(Duration::from_secs(4) - dead.unwrap());
        cl.lab.uplinks[which].link.set_blackhole(false).unwrap();
        let healed = Instant::now();
        let up = until_health(&cl, &name, "up", Duration::from_secs(5));
        assert!(
            up.is_some(),
            "{flow:?}: not healthy again within 5 s\n{}",
            gw.log_text()
        );
        let carrying = within(Duration::from_secs(5), Duration::from_millis(50), || {
            subflows_on(&cl, &name) > 0
        })
        .map(|_| healed.elapsed());
        eprintln!("{flow:?}: {name} up again after {up:?}, a subflow on it after {carrying:?}");
        assert!(
            carrying.is_some(),
            "{flow:?}: no subflow on {name} within 5 s\n{}",
            gw.log_text()
        );
        let r = s.wait();
        assert_stream(
            &format!("{flow:?} stream, blackhole on {name}"),
            &r,
            records(14),
            Duration::from_millis(1500),
            &gw,
        );
    }
}

#[test]
fn a_silent_blackhole_mid_stream_is_survived_and_detected() {
    blackhole_mid_stream(1, 9131);
}

/// The initial subflow's uplink (the default route's, where connections start) is the hardest
/// case for the kernel: the connection's first subflow is not one an endpoint opened.
#[test]
fn a_blackhole_on_the_initial_subflows_uplink_is_survived_and_detected() {
    blackhole_mid_stream(0, 9133);
}

#[test]
fn a_carrier_loss_mid_stream_is_survived() {
    for (which, flow, port) in [
        (1usize, Flow::Down, 9135),
        (1, Flow::Up, 9136),
        (0, Flow::Down, 9137),
        (0, Flow::Up, 9138),
    ] {
        let (cl, gw) = start(&[], port);
        let s = stream(&cl, flow, 8);
        std::thread::sleep(Duration::from_secs(3));
        cl.lab.uplinks[which].link.down().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        cl.lab.uplinks[which].link.up().unwrap();
        let r = s.wait();
        assert_stream(
            &format!("{flow:?} stream, uplink {} down for 2 s", which + 1),
            &r,
            records(8),
            Duration::from_secs(1),
            &gw,
        );
    }
}

#[test]
fn a_download_survives_a_blackhole_on_either_uplink() {
    for (which, port) in [(0usize, 9139), (1, 9140)] {
        let (cl, gw) = start(&[], port);
        let size = 24 << 20;
        let nginx = Nginx::start(&cl.lab.server, size);
        let url = format!("http://{}/file", cl.lab.server_v4());
        let client = cl.lab.client.clone();
        let dl = std::thread::spawn(move || curl_sha(&client, &[], &url));
        std::thread::sleep(Duration::from_secs(2));
        cl.lab.uplinks[which].link.set_blackhole(true).unwrap();
        let (ok, digest, secs) = dl.join().unwrap();
        eprintln!("download with uplink {} blackholed: {secs:.1} s", which + 1);
        assert!(
            ok && digest == hex(&nginx.sha256),
            "download broken: {digest}\n{}",
            gw.log_text()
        );
        assert_eq!(health_of(&cl, &format!("g-v{}", which + 1)), "dead");
    }
}

/// `tx_bytes + rx_bytes` of an interface of the gateway.
fn if_bytes(cl: &ConverterLab, ifname: &str) -> u64 {
    ["tx_bytes", "rx_bytes"]
        .iter()
        .map(|c| {
            cl.lab
                .gateway
                .run(["cat", &format!("/sys/class/net/{ifname}/statistics/{c}")])
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Probe handshakes sent on `uplink` so far, from the metrics.
fn probes(cl: &ConverterLab, port: u16, uplink: &str) -> u64 {
    let m = metrics(cl, port);
    ["answered", "unanswered"]
        .iter()
        .filter_map(|r| {
            let key =
                format!("braid_gateway_uplink_probes_total{{uplink=\"{uplink}\",result=\"{r}\"}} ");
            m.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// A gateway configuration file in the lab's scratch directory.
fn config_file(cl: &ConverterLab, name: &str, text: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}-{name}.toml", cl.lab.gateway.name()));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Bytes on an interface over `d`, with the probe handshakes sent meanwhile.
fn quiet_bytes(cl: &ConverterLab, port: u16, ifname: &str, d: Duration) -> (u64, u64) {
    let (b0, p0) = (if_bytes(cl, ifname), probes(cl, port, ifname));
    std::thread::sleep(d);
    (if_bytes(cl, ifname) - b0, probes(cl, port, ifname) - p0)
}

/// Bytes a probe handshake may cost on the wire, both ways: SYN, SYN-ACK, ACK and RST with
/// IPv4 and TCP options, rounded up.
const PROBE_BYTES: u64 = 400;
/// What else crosses an idle veth in a few seconds (IPv6 neighbour discovery, ARP).
const BACKGROUND_BYTES: u64 = 1500;

#[test]
fn a_backup_uplink_carries_nothing_until_every_primary_is_gone() {
    let port = 9141;
    let cl = ConverterLab::new(lab_config(), &default_converter_args());
    let cfg = config_file(
        &cl,
        "backup",
        "[health]\nbackup_release_secs = 4\nprobe_standby_interval_secs = 2\n",
    );
    let metrics_addr = format!("127.0.0.1:{port}");
    let gw = gateway_to(
        &cl,
        &[
            "--config",
            &cfg,
            "--transparent",
            "tproxy",
            "--metrics",
            &metrics_addr,
            "--uplink",
            "g-v1",
            "--uplink",
            "g-v2,backup",
        ],
    );
    let size = 64 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let url = format!("http://{}/file", cl.lab.server_v4());
    let client = cl.lab.client.clone();
    let dl = std::thread::spawn(move || curl_sha(&client, &[], &url));
    std::thread::sleep(Duration::from_secs(1));
    // Primary up: the backup carries probes only.
    let (bytes, probed) = quiet_bytes(&cl, port, "g-v2", Duration::from_secs(4));
    eprintln!("backup while the primary works: {bytes} B, {probed} probe handshakes");
    assert!(probed > 0, "the standby backup is probed");
    assert!(
        bytes <= probed * PROBE_BYTES + BACKGROUND_BYTES,
        "the backup carried {bytes} B beyond {probed} probes\n{}",
        gw.log_text()
    );
    assert_eq!(subflows_on(&cl, "g-v2"), 0);
    // The only primary goes: the download continues on the backup within 1 s.
    let before = if_bytes(&cl, "g-v2");
    cl.lab.uplinks[0].link.down().unwrap();
    let took = within(Duration::from_secs(5), Duration::from_millis(20), || {
        if_bytes(&cl, "g-v2") - before > 200_000
    });
    eprintln!("the backup carries {took:?} after the primary went down");
    assert!(
        took.is_some_and(|t| t <= Duration::from_secs(1)),
        "the backup did not take over within 1 s\n{}",
        gw.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    // The primary returns; the backup is released after the hold-down (4 s here).
    cl.lab.uplinks[0].link.up().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let (bytes, probed) = quiet_bytes(&cl, port, "g-v2", Duration::from_secs(2));
    eprintln!("backup after the primary returned: {bytes} B, {probed} probes");
    assert!(
        bytes <= probed * PROBE_BYTES + BACKGROUND_BYTES,
        "the backup still carries {bytes} B after the primary returned\n{}",
        gw.log_text()
    );
    let (ok, digest, _) = dl.join().unwrap();
    assert!(
        ok && digest == hex(&nginx.sha256),
        "download broken: {digest}\n{}",
        gw.log_text()
    );
}

#[test]
fn a_lossy_uplink_is_degraded_and_the_stream_keeps_its_rate() {
    let port = 9142;
    let (cl, gw) = start(&[], port);
    let s = stream(&cl, Flow::Down, 30);
    std::thread::sleep(Duration::from_secs(3));
    // 20 % of the packets each way on uplink 1: the low-latency one, where the connection's
    // first subflow is.
    let link = &cl.lab.uplinks[0].link;
    link.set_loss(braid_lab::Direction::Both, 20.0).unwrap();
    // 1.5 s on a quiet machine; 15 s was seen in a loaded CI run (probe rounds that time out
    // whole are silence, not loss, and say nothing).
    let degraded = until_health(&cl, "g-v1", "degraded", Duration::from_secs(18));
    eprintln!("g-v1 degraded {degraded:?} after the loss began");
    // Once degraded, the lossy uplink carries next to nothing of the stream.
    std::thread::sleep(Duration::from_secs(2));
    let (b1, b2) = (if_bytes(&cl, "g-v1"), if_bytes(&cl, "g-v2"));
    std::thread::sleep(Duration::from_secs(5));
    let (lossy, good) = (if_bytes(&cl, "g-v1") - b1, if_bytes(&cl, "g-v2") - b2);
    eprintln!("over 5 s once degraded: the lossy uplink {lossy} B, the other {good} B");
    let r = s.wait();
    assert!(
        degraded.is_some(),
        "the lossy uplink was not degraded\n{}",
        gw.log_text()
    );
    assert_eq!(health_of(&cl, "g-v1"), "degraded");
    assert!(
        lossy < good / 20,
        "the degraded uplink still carries {lossy} B of 5 s ({good} B on the other)\n{}",
        gw.log_text()
    );
    // Keeping its rate: every record arrives, none held up as long as a frozen picture.
    assert_stream(
        "stream with 20 % loss on uplink 1",
        &r,
        records(30),
        Duration::from_millis(1500),
        &gw,
    );
}

#[test]
fn a_flapping_uplink_is_held_out_longer_each_time() {
    let port = 9143;
    let (cl, gw) = start(&[], port);
    let s = stream(&cl, Flow::Down, 34);
    std::thread::sleep(Duration::from_secs(2));
    let link = &cl.lab.uplinks[1].link;
    for _ in 0..8 {
        link.down().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        link.up().unwrap();
        std::thread::sleep(Duration::from_secs(2));
    }
    let r = s.wait();
    assert_stream(
        "stream while uplink 2 flaps",
        &r,
        records(34),
        Duration::from_secs(1),
        &gw,
    );
    let log = gw.log_text();
    let holds: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("uplink health") && l.contains("g-v2"))
        .filter_map(|l| {
            let i = l.find("held out ")? + "held out ".len();
            l[i..].split(' ').next()?.parse().ok()
        })
        .collect();
    eprintln!("hold-downs: {holds:?} s");
    assert!(
        holds.len() >= 3 && holds[1] > holds[0] && holds.windows(2).all(|w| w[1] >= w[0]),
        "no growing hold-down: {holds:?}\n{log}"
    );
}
