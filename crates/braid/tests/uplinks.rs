//! The gateway managing its own uplinks, on a lab gateway set up like a real router (a default
//! route per uplink, no source rules, no MPTCP endpoints, strict rp_filter): real `braid
//! gateway` and `braid converter` processes, unmodified curl and nginx, shaped (and delayed)
//! links. Every download is checked by SHA-256; rates are asserted on shaped links only.

mod common;

use std::time::{Duration, Instant};

use braid_lab::{Delay, Families, GatewayRouting, Netns, Signal, StandardConfig, StandardLab};
use common::*;

/// A router-like lab: the gateway's uplinks each have a default route and nothing else. reno,
/// not this host's bbr: bbr without the fq qdisc (which this kernel lacks) bonds uneven links
/// badly (10 + 20 + 50 Mbit/s: 52 Mbit/s with bbr, 72 with reno, measured).
fn router(rates: &[u64]) -> StandardConfig {
    StandardConfig {
        congestion_control: Some("reno".into()),
        uplinks: rates.len(),
        rates: Some(rates.to_vec()),
        mptcp_gateway_endpoints: false,
        gateway_routing: GatewayRouting::Router,
        ..StandardConfig::default()
    }
}

/// `router(rates)` with the round trip a home uplink has to a converter on the Internet (a
/// few milliseconds at least: 2 ms each way here). On a sub-millisecond path braid bounds its
/// MPTCP send buffer from the first byte (`sendbuf.rs`: the kernel's receive-window stalls at
/// tens of Gbit/s), which bonds shaped uplinks of different speeds to ~70 % of their sum; only
/// a lab has such uplinks.
fn internet_router(rates: &[u64]) -> StandardConfig {
    StandardConfig {
        delays: Some(vec![Delay::ms(2); rates.len()]),
        ..router(rates)
    }
}

fn mbit(m: u64) -> u64 {
    m * 1_000_000
}

/// `tx_bytes + rx_bytes` of an interface in `ns`.
fn if_bytes(ns: &Netns, ifname: &str) -> u64 {
    ["tx_bytes", "rx_bytes"]
        .iter()
        .map(|c| {
            ns.run(["cat", &format!("/sys/class/net/{ifname}/statistics/{c}")])
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// A download of `size` bytes from nginx through the gateway: (rate in Mbit/s, digest ok).
fn download(cl: &ConverterLab, nginx: &Nginx, size: u64) -> (f64, bool) {
    let url = format!("http://{}/file", cl.lab.server_v4());
    let (ok, digest, secs) = curl_sha(&cl.lab.client, &[], &url);
    assert!(ok, "curl failed: {digest}");
    (size as f64 * 8.0 / secs / 1e6, digest == hex(&nginx.sha256))
}

/// The gateway's routing rules, routes of braid's tables and MPTCP endpoints, as text.
fn gateway_objects(ns: &Netns) -> String {
    let mut out = String::new();
    for v in ["-4", "-6"] {
        out += &ns.run(["ip", v, "rule", "show"]).unwrap_or_default();
        out += &ns
            .run(["ip", v, "route", "show", "table", "all"])
            .unwrap_or_default();
    }
    out += &ns
        .run(["ip", "mptcp", "endpoint", "show"])
        .unwrap_or_default();
    out
}

/// Whether anything of braid's (tables 5181-5188, endpoint ids 200-215) is left.
fn braid_objects_left(ns: &Netns) -> Vec<String> {
    gateway_objects(ns)
        .lines()
        .filter(|l| {
            (5181..=5188)
                .any(|t| l.contains(&format!("table {t}")) || l.contains(&format!("lookup {t}")))
                || (200..=215).any(|id| l.contains(&format!(" id {id} ")))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn two_uplinks_found_by_themselves_bond_to_their_sum() {
    let cl = ConverterLab::new(
        internet_router(&[mbit(20), mbit(30)]),
        &default_converter_args(),
    );
    let alone = cl.lab.single_link_rates(Duration::from_secs(2));
    let size = 48 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    // Zero configuration: both uplinks were found, each with its table, rule and endpoint.
    let log = gw.log_text();
    for ifname in ["g-v1", "g-v2"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("interface={ifname} state=\"up\""))),
            "{ifname} not taken as an uplink:\n{log}"
        );
    }
    let objects = gateway_objects(&cl.lab.gateway);
    for want in [
        "from 10.1.1.1 lookup 5181",
        "from 10.1.2.1 lookup 5182",
        "default via 10.1.2.2 dev g-v2 table 5182",
        "10.1.2.1 id 202 subflow dev g-v2",
    ] {
        assert!(objects.contains(want), "missing {want:?} in:\n{objects}");
    }
    assert_eq!(
        cl.lab
            .gateway
            .sysctl_get("net.ipv4.conf.g-v2.rp_filter")
            .unwrap(),
        "2",
        "strict rp_filter loosened on the uplink"
    );
    let (rate, intact) = download(&cl, &nginx, size);
    let sum: f64 = alone.iter().sum();
    eprintln!("2 uplinks alone {alone:.1?} Mbit/s (sum {sum:.1}); bonded {rate:.1} Mbit/s");
    assert!(intact, "download corrupted");
    assert!(
        rate >= 0.9 * sum,
        "{rate:.1} Mbit/s is below 90% of {sum:.1}"
    );
}

#[test]
fn three_listed_uplinks_bond_to_their_sum() {
    let cl = ConverterLab::new(
        internet_router(&[mbit(10), mbit(20), mbit(50)]),
        &default_converter_args(),
    );
    let alone = cl.lab.single_link_rates(Duration::from_secs(2));
    let size = 80 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let cfg = std::env::temp_dir().join(format!("braid-uplinks-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[uplink]]\ninterface = \"g-v1\"\nname = \"dsl\"\n\n\
         [[uplink]]\ninterface = \"g-v2\"\nname = \"lte\"\n\n\
         [[uplink]]\ninterface = \"g-v3\"\nname = \"fibre\"\n",
    )
    .unwrap();
    let gw = gateway_to(
        &cl,
        &[
            "--transparent",
            "tproxy",
            "--config",
            &cfg.display().to_string(),
        ],
    );
    let _ = std::fs::remove_file(&cfg);
    assert!(gw.log_text().contains("uplink=fibre"), "{}", gw.log_text());
    let (rate, intact) = download(&cl, &nginx, size);
    let sum: f64 = alone.iter().sum();
    eprintln!("3 uplinks alone {alone:.1?} Mbit/s (sum {sum:.1}); bonded {rate:.1} Mbit/s");
    assert!(intact, "download corrupted");
    assert!(
        rate >= 0.9 * sum,
        "{rate:.1} Mbit/s is below 90% of {sum:.1}"
    );
}

#[test]
fn delayed_uplinks_beat_the_best_single_link() {
    let cfg = StandardConfig {
        delays: Some(vec![Delay::ms(10), Delay::ms(40)]),
        ..router(&[mbit(20), mbit(30)])
    };
    let cl = ConverterLab::new(cfg, &default_converter_args());
    let alone = cl.lab.single_link_rates(Duration::from_secs(2));
    let size = 32 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let _gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    let (rate, intact) = download(&cl, &nginx, size);
    let sum: f64 = alone.iter().sum();
    let best = alone.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "20 Mbit/s at 10 ms + 30 Mbit/s at 40 ms alone {alone:.1?}; bonded {rate:.1} Mbit/s \
         ({:.0}% of the sum)",
        rate / sum * 100.0
    );
    assert!(intact, "download corrupted");
    assert!(
        rate > best,
        "{rate:.1} Mbit/s does not beat the best link ({best:.1})"
    );
}

/// Samples, every 50 ms until `d` after `since`, how many bytes crossed `ifname` (times
/// relative to `since`).
fn watch_interface(ns: &Netns, ifname: &str, since: Instant, d: Duration) -> Vec<(Duration, u64)> {
    let mut out = Vec::new();
    while since.elapsed() < d {
        out.push((since.elapsed(), if_bytes(ns, ifname)));
        std::thread::sleep(Duration::from_millis(50));
    }
    out
}

/// When, after the first sample, traffic on the interface first exceeded 100 kB in 100 ms.
fn carrying_again(samples: &[(Duration, u64)]) -> Option<Duration> {
    samples
        .windows(3)
        .find(|w| w[2].1.saturating_sub(w[0].1) > 100_000)
        .map(|w| w[2].0)
}

#[test]
fn an_uplink_that_flaps_carries_again_within_two_seconds() {
    let cl = ConverterLab::new(router(&[mbit(20), mbit(30)]), &default_converter_args());
    let size = 60 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    let url = format!("http://{}/file", cl.lab.server_v4());
    let client = cl.lab.client.clone();
    let dl = std::thread::spawn(move || curl_sha(&client, &[], &url));
    std::thread::sleep(Duration::from_secs(2));
    for (which, up) in [(1usize, &cl.lab.uplinks[1]), (0, &cl.lab.uplinks[0])] {
        up.link.down().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        up.link.up().unwrap();
        let samples = watch_interface(
            &cl.lab.gateway,
            &up.gateway_if,
            Instant::now(),
            Duration::from_secs(3),
        );
        let back = carrying_again(&samples);
        eprintln!(
            "uplink {} carries again {back:?} after coming up",
            which + 1
        );
        assert!(
            back.is_some_and(|b| b <= Duration::from_secs(2)),
            "uplink {} did not carry within 2 s of coming back: {samples:?}\n{}",
            which + 1,
            gw.log_text()
        );
    }
    let (ok, digest, _) = dl.join().unwrap();
    assert!(
        ok && digest == hex(&nginx.sha256),
        "download broken: {digest}"
    );
}

#[test]
fn a_new_address_on_an_uplink_gets_a_subflow_within_two_seconds() {
    let cl = ConverterLab::new(router(&[mbit(20), mbit(30)]), &default_converter_args());
    let size = 40 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    let url = format!("http://{}/file", cl.lab.server_v4());
    let client = cl.lab.client.clone();
    let dl = std::thread::spawn(move || curl_sha(&client, &[], &url));
    std::thread::sleep(Duration::from_secs(2));
    // A DHCP renewal that changes the address of uplink 2.
    let end = &cl.lab.uplinks[1].link.a;
    end.replace_addr(
        "10.1.2.1/24".parse().unwrap(),
        "10.1.2.5/24".parse().unwrap(),
    )
    .unwrap();
    let changed = Instant::now();
    // Once the old endpoint is replaced (its subflow closed with it), what crosses g-v2 comes
    // from the new address.
    assert!(
        eventually(|| gateway_objects(&cl.lab.gateway).contains("10.1.2.5 id 202")),
        "no endpoint for the new address:\n{}",
        gw.log_text()
    );
    let samples = watch_interface(&cl.lab.gateway, "g-v2", changed, Duration::from_secs(3));
    let back = carrying_again(&samples);
    eprintln!("the new address carries {back:?} after the change");
    assert!(
        back.is_some_and(|b| b <= Duration::from_secs(2)),
        "the new address did not carry within 2 s: {samples:?}\n{}",
        gw.log_text()
    );
    let objects = gateway_objects(&cl.lab.gateway);
    assert!(
        !objects.contains("from 10.1.2.1 lookup") && !objects.contains("10.1.2.1 id"),
        "the old address's rule or endpoint is left:\n{objects}"
    );
    assert!(objects.contains("from 10.1.2.5 lookup 5182"), "{objects}");
    let (ok, digest, _) = dl.join().unwrap();
    assert!(
        ok && digest == hex(&nginx.sha256),
        "download broken: {digest}"
    );
}

#[test]
fn new_connections_avoid_a_dead_default_uplink() {
    let cl = ConverterLab::new(router(&[mbit(20), mbit(30)]), &default_converter_args());
    let nginx = Nginx::start(&cl.lab.server, 1 << 20);
    let _gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    // The default route's uplink silently drops everything; its carrier stays up.
    cl.lab.uplinks[0].link.set_blackhole(true).unwrap();
    for i in 0..5 {
        let url = format!("http://{}/file", cl.lab.server_v4());
        let (ok, digest, secs) = curl_sha(&cl.lab.client, &["-o", "/dev/stdout"], &url);
        assert!(ok && digest == hex(&nginx.sha256), "try {i}: {digest}");
        eprintln!("try {i}: {secs:.2} s");
        assert!(secs < 1.5, "try {i} took {secs:.2} s");
    }
}

#[test]
fn an_ipv4_only_and_an_ipv6_only_uplink_carry_one_download() {
    let cfg = StandardConfig {
        uplink_families: Some(vec![Families::V4Only, Families::V6Only]),
        ..router(&[mbit(20), mbit(30)])
    };
    let lab = StandardLab::new(cfg).expect("lab");
    // The converter announces its IPv6 address on uplink 2: the gateway's IPv4 connection
    // joins it over the IPv6-only uplink.
    let v6 = lab.uplinks[1].converter_v6.expect("ipv6 on uplink 2");
    let mut args = default_converter_args();
    args.extend(["--signal".into(), v6.to_string()]);
    let cl = ConverterLab::from_lab(lab, &args);
    let size = 24 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let _gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    let before = (
        if_bytes(&cl.lab.gateway, "g-v1"),
        if_bytes(&cl.lab.gateway, "g-v2"),
    );
    let (rate, intact) = download(&cl, &nginx, size);
    let moved = (
        if_bytes(&cl.lab.gateway, "g-v1") - before.0,
        if_bytes(&cl.lab.gateway, "g-v2") - before.1,
    );
    eprintln!(
        "IPv4 uplink {} MB, IPv6 uplink {} MB, {rate:.1} Mbit/s",
        moved.0 >> 20,
        moved.1 >> 20
    );
    assert!(intact, "download corrupted");
    assert!(
        moved.0 > size / 5 && moved.1 > size / 5,
        "both uplinks should carry the download: {moved:?}"
    );
}

#[test]
fn everything_braid_adds_goes_at_exit_and_after_a_crash_and_nothing_else() {
    let cl = ConverterLab::new(router(&[mbit(100), mbit(100)]), &default_converter_args());
    let g = &cl.lab.gateway;
    // What braid did not add: a rule, and an endpoint on an extra address.
    g.ip(&[
        "rule", "add", "pref", "1234", "from", "10.9.9.9", "lookup", "999",
    ])
    .unwrap();
    g.ip(&["addr", "add", "10.1.1.77/24", "dev", "g-v1"])
        .unwrap();
    g.ip(&["mptcp", "endpoint", "add", "10.1.1.77", "id", "5", "signal"])
        .unwrap();
    // Without the client bit, which the gateway then sets (0x2 | 0x1).
    g.sysctl("net.ipv4.tcp_fastopen", 2).unwrap();
    let limits_before = g.run(["ip", "mptcp", "limits", "show"]).unwrap();
    let stale_before = g.sysctl_get("net.mptcp.stale_loss_cnt").unwrap();
    let foreign = |ns: &Netns| {
        let o = gateway_objects(ns);
        assert!(
            o.contains("from 10.9.9.9 lookup 999"),
            "foreign rule gone:\n{o}"
        );
        assert!(
            o.contains("10.1.1.77 id 5 signal"),
            "foreign endpoint gone:\n{o}"
        );
    };
    let args: Vec<String> = strings(&[
        "--converter",
        &cl.converter_addr_v4().to_string(),
        "--socks5",
        "127.0.0.1:1080",
    ]);
    let mut gw = Gateway::start(g, &args);
    assert!(
        !braid_objects_left(g).is_empty(),
        "nothing programmed:\n{}\n{}",
        gateway_objects(g),
        gw.log_text()
    );
    assert_eq!(g.sysctl_get("net.mptcp.stale_loss_cnt").unwrap(), "2");
    assert_eq!(g.sysctl_get("net.ipv4.tcp_fastopen").unwrap(), "3");
    // SIGTERM: all gone, limits, rp_filter, stale_loss_cnt and tcp_fastopen as before; what
    // braid did not add still there.
    let stop_and_check = |gw: &mut Gateway, when: &str| {
        let p = gw.process.as_mut().unwrap();
        p.signal(Signal::SIGTERM).unwrap();
        p.wait_timeout(Duration::from_secs(15)).unwrap();
        assert_eq!(braid_objects_left(g), Vec::<String>::new(), "{when}");
        assert_eq!(
            g.run(["ip", "mptcp", "limits", "show"]).unwrap(),
            limits_before
        );
        assert_eq!(g.sysctl_get("net.ipv4.conf.g-v1.rp_filter").unwrap(), "1");
        assert_eq!(
            g.sysctl_get("net.mptcp.stale_loss_cnt").unwrap(),
            stale_before
        );
        assert_eq!(g.sysctl_get("net.ipv4.tcp_fastopen").unwrap(), "2");
        foreign(g);
    };
    stop_and_check(&mut gw, "left after SIGTERM");
    // SIGKILL: left behind; the next start removes the leftovers and programs anew.
    // Each start waits for its own "gateway running": the log starts empty.
    let _ = std::fs::remove_file(&gw.log);
    gw.restart(g, &args);
    gw.process.as_mut().unwrap().kill().unwrap();
    assert!(
        !braid_objects_left(g).is_empty(),
        "a crash leaves its objects"
    );
    assert_eq!(g.sysctl_get("net.ipv4.tcp_fastopen").unwrap(), "3");
    let _ = std::fs::remove_file(&gw.log);
    gw.restart(g, &args);
    let objects = gateway_objects(g);
    assert_eq!(
        objects.matches("from 10.1.1.1 lookup 5181").count(),
        1,
        "programmed once after the crash:\n{objects}"
    );
    stop_and_check(&mut gw, "left after the crash and restart");
}

#[test]
fn status_shows_uplinks_connections_and_subflows() {
    let cl = ConverterLab::new(router(&[mbit(20), mbit(30)]), &default_converter_args());
    let size = 40 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let gw = gateway_to(
        &cl,
        &["--transparent", "tproxy", "--metrics", "127.0.0.1:9125"],
    );
    let url = format!("http://{}/file", cl.lab.server_v4());
    let client = cl.lab.client.clone();
    let dl = std::thread::spawn(move || curl_sha(&client, &[], &url));
    std::thread::sleep(Duration::from_secs(3));
    let bin = env!("CARGO_BIN_EXE_braid");
    let json = cl
        .lab
        .gateway
        .run([bin, "status", "--json"])
        .expect("braid status");
    let s: braid::status::Status = serde_json::from_str(json.trim()).expect("status JSON");
    assert_eq!(s.role, "gateway");
    assert_eq!(s.uplinks.len(), 2, "{json}");
    for u in &s.uplinks {
        assert_eq!(u.state, "up", "{json}");
        assert!(u.rx_bps > 1e6, "{} carries nothing: {json}", u.name);
        assert_eq!(u.subflows, 1, "{json}");
    }
    let c = s
        .connections
        .iter()
        .find(|c| c.dest.port() == 80)
        .expect("the download in status");
    let named: Vec<_> = c
        .subflows
        .iter()
        .filter_map(|sf| sf.uplink.clone())
        .collect();
    assert_eq!(named.len(), 2, "each subflow with its uplink: {json}");
    assert!(
        c.down > 1 << 20 && c.subflows.iter().all(|sf| sf.rtt_ms > 0.0),
        "{json}"
    );
    let table = cl.lab.gateway.run([bin, "status"]).unwrap();
    assert!(
        table.contains("g-v1") && table.contains("Mbit/s"),
        "{table}"
    );
    let conv = cl.lab.converter.run([bin, "status", "--json"]).unwrap();
    let cs: braid::status::Status = serde_json::from_str(conv.trim()).unwrap();
    assert_eq!(cs.role, "converter");
    assert!(
        cs.connections.iter().any(|c| c.subflows.len() == 2),
        "{conv}"
    );
    let metrics = cl
        .lab
        .gateway
        .run(["curl", "-sS", "http://127.0.0.1:9125/metrics"])
        .unwrap();
    for m in [
        "braid_gateway_uplink_up{uplink=\"g-v1\"} 1",
        "braid_gateway_uplink_subflows{uplink=\"g-v2\"} 1",
        "braid_gateway_uplink_bytes_total{uplink=\"g-v1\",direction=\"rx\"}",
    ] {
        assert!(metrics.contains(m), "no {m} in:\n{metrics}");
    }
    let (ok, digest, _) = dl.join().unwrap();
    assert!(
        ok && digest == hex(&nginx.sha256),
        "download broken: {digest}"
    );
    drop(gw);
}

#[test]
fn an_uplink_that_appears_after_start_joins() {
    let cl = ConverterLab::new(router(&[mbit(20)]), &default_converter_args());
    let size = 40 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    let url = format!("http://{}/file", cl.lab.server_v4());
    let client = cl.lab.client.clone();
    let dl = std::thread::spawn(move || curl_sha(&client, &[], &url));
    std::thread::sleep(Duration::from_secs(2));
    // A USB LTE stick: a new interface with an address and a default route (DHCP).
    let link = cl
        .lab
        .lab()
        .link(&cl.lab.gateway, "g-usb", &cl.lab.converter, "v-usb")
        .unwrap();
    link.b.add_addr("10.1.9.2/24".parse().unwrap()).unwrap();
    link.a.add_addr("10.1.9.1/24".parse().unwrap()).unwrap();
    link.shape(mbit(30)).unwrap();
    cl.lab
        .gateway
        .ip(&[
            "route", "add", "default", "via", "10.1.9.2", "dev", "g-usb", "metric", "900",
        ])
        .unwrap();
    let plugged = Instant::now();
    let samples = watch_interface(&cl.lab.gateway, "g-usb", plugged, Duration::from_secs(3));
    let carrying = carrying_again(&samples);
    eprintln!("the new uplink carries {carrying:?} after it appeared");
    assert!(
        carrying.is_some_and(|c| c <= Duration::from_secs(2)),
        "the new uplink was not used: {samples:?}\n{}",
        gw.log_text()
    );
    assert!(gw.log_text().contains("interface=g-usb state=\"up\""));
    let (ok, digest, _) = dl.join().unwrap();
    assert!(
        ok && digest == hex(&nginx.sha256),
        "download broken: {digest}"
    );
}

#[test]
fn a_dual_stack_uplink_is_used_with_both_families() {
    let lab = StandardLab::new(router(&[mbit(20), mbit(30)])).expect("lab");
    // The converter has both families on uplink 2 and announces its IPv6 address there.
    let v6 = lab.uplinks[1].converter_v6.expect("ipv6");
    let mut args = default_converter_args();
    args.extend([
        "--signal".into(),
        v6.to_string(),
        "--mptcp-subflows".into(),
        "8".into(),
    ]);
    let cl = ConverterLab::from_lab(lab, &args);
    let size = 32 << 20;
    let nginx = Nginx::start(&cl.lab.server, size);
    let _gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    let url = format!("http://{}/file", cl.lab.server_v4());
    let client = cl.lab.client.clone();
    let dl = std::thread::spawn(move || curl_sha(&client, &[], &url));
    let bin = env!("CARGO_BIN_EXE_braid");
    let families = eventually(|| {
        let Ok(json) = cl.lab.gateway.run([bin, "status", "--json"]) else {
            return false;
        };
        let Ok(s) = serde_json::from_str::<braid::status::Status>(json.trim()) else {
            return false;
        };
        s.connections.iter().any(|c| {
            c.subflows.iter().any(|sf| sf.local.is_ipv6())
                && c.subflows.iter().any(|sf| sf.local.is_ipv4())
        })
    });
    let (ok, digest, _) = dl.join().unwrap();
    assert!(
        ok && digest == hex(&nginx.sha256),
        "download broken: {digest}"
    );
    assert!(families, "no connection had subflows of both families");
}
