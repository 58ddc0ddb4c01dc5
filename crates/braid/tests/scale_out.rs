//! Several converters behind one address: a router spreads connections to the shared address
//! over two converters by ECMP (hashing the 5-tuple, as any L4 load balancer does); each
//! converter announces its own unique address (`--signal`) and refuses joins to the shared one
//! (`--no-join-initial-addr`, the C flag), so that every extra subflow reaches the converter
//! that holds its connection. A converter taken out of the route and stopped drains: its
//! connections finish over their subflows to its unique address, new ones go to the other.
//!
//! ```text
//!            g1 ─ r1                ra ─ a0  converter A  (10.5.1.2, VIP 10.9.0.1 on lo)
//!  gateway           router (ECMP)
//!            g2 ─ r2                rb ─ b0  converter B  (10.5.2.2, VIP 10.9.0.1 on lo)
//!                    rs ─ s0 server (nginx)
//! ```

mod common;

use std::time::Duration;

use braid_lab::{Link, Netns, Process};
use common::*;

const VIP: &str = "10.9.0.1";

struct Fabric {
    gw: Netns,
    rt: Netns,
    conv: [Netns; 2],
    sv: Netns,
    _links: Vec<Link>,
}

fn ip(ns: &Netns, args: &str) {
    let v: Vec<&str> = args.split_whitespace().collect();
    ns.ip(&v)
        .unwrap_or_else(|e| panic!("ip {args} in {}: {e}", ns.name()));
}

fn fabric() -> Fabric {
    let gw = Netns::create("gw").unwrap();
    let rt = Netns::create("rt").unwrap();
    let conv = [Netns::create("cva").unwrap(), Netns::create("cvb").unwrap()];
    let sv = Netns::create("sv").unwrap();
    let links = vec![
        Link::create(&gw, "g1", &rt, "r1").unwrap(),
        Link::create(&gw, "g2", &rt, "r2").unwrap(),
        Link::create(&rt, "ra", &conv[0], "a0").unwrap(),
        Link::create(&rt, "rb", &conv[1], "b0").unwrap(),
        Link::create(&rt, "rs", &sv, "s0").unwrap(),
    ];
    ip(&gw, "addr add 10.1.1.1/24 dev g1");
    ip(&gw, "addr add 10.1.2.1/24 dev g2");
    // A router as it comes: a default route per uplink. braid gateway does the rest.
    ip(&gw, "route add default via 10.1.1.2 dev g1 metric 10");
    ip(&gw, "route add default via 10.1.2.2 dev g2 metric 20");
    for a in [
        "addr add 10.1.1.2/24 dev r1",
        "addr add 10.1.2.2/24 dev r2",
        "addr add 10.5.1.1/24 dev ra",
        "addr add 10.5.2.1/24 dev rb",
        "addr add 10.2.0.1/24 dev rs",
        // The shared address, spread by a hash of the 5-tuple (policy 1).
        "route add 10.9.0.1/32 nexthop via 10.5.1.2 dev ra nexthop via 10.5.2.2 dev rb",
    ] {
        ip(&rt, a);
    }
    rt.sysctl("net.ipv4.ip_forward", 1).unwrap();
    rt.sysctl("net.ipv4.fib_multipath_hash_policy", 1).unwrap();
    for (i, (c, dev)) in conv.iter().zip(["a0", "b0"]).enumerate() {
        ip(c, &format!("addr add 10.5.{}.2/24 dev {dev}", i + 1));
        ip(c, &format!("addr add {VIP}/32 dev lo"));
        ip(c, &format!("route add default via 10.5.{}.1", i + 1));
    }
    ip(&sv, "addr add 10.2.0.2/24 dev s0");
    ip(&sv, "route add default via 10.2.0.1");
    Fabric {
        gw,
        rt,
        conv,
        sv,
        _links: links,
    }
}

fn converter(ns: &Netns, unique: &str) -> (Process, std::path::PathBuf) {
    converter_in(
        ns,
        &[
            "--listen",
            "0.0.0.0:5124",
            "--allow-client",
            "10.1.0.0/16",
            "--allow-dest",
            "10.2.0.0/24",
            "--signal",
            unique,
            "--no-join-initial-addr",
            "--mptcp-subflows",
            "4",
        ],
    )
}

/// `n` downloads through the gateway's SOCKS5 listener, `parallel` at a time, each piped to
/// sha256sum: the digests, one per line.
fn downloads(gw: &Netns, n: usize, parallel: usize, extra: &str) -> Vec<String> {
    let script = format!(
        "seq {n} | xargs -P {parallel} -I{{}} sh -c \
         'curl -sS {extra} -x socks5://127.0.0.1:1080 http://10.2.0.2/file | sha256sum | cut -d\" \" -f1'"
    );
    gw.sh(&script)
        .unwrap_or_else(|e| panic!("{e}"))
        .lines()
        .map(String::from)
        .collect()
}

fn closed_lines(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("connection closed") && !l.contains("outcome=\"empty\""))
        .count()
}

#[test]
fn two_converters_behind_one_address_share_the_load_and_drain() {
    let f = fabric();
    let (a, b) = (
        converter(&f.conv[0], "10.5.1.2"),
        converter(&f.conv[1], "10.5.2.2"),
    );
    let logs = [a.1, b.1];
    let mut convs = [a.0, b.0];
    let nginx = Nginx::start(&f.sv, 256 << 10);
    let gw = Gateway::start(
        &f.gw,
        &strings(&[
            "--converter",
            &format!("{VIP}:5124"),
            "--socks5",
            "127.0.0.1:1080",
            "--fullmesh",
        ]),
    );
    std::thread::sleep(Duration::from_secs(1));
    let ctx = |what: &str| {
        format!(
            "{what}\n--- converter A:\n{}\n--- converter B:\n{}\n--- gateway:\n{}",
            std::fs::read_to_string(&logs[0]).unwrap_or_default(),
            std::fs::read_to_string(&logs[1]).unwrap_or_default(),
            gw.log_text()
        )
    };

    // 200 connections, every byte right.
    let want = hex(&nginx.sha256);
    let got = downloads(&f.gw, 200, 10, "");
    assert_eq!(got.len(), 200, "{}", ctx("downloads"));
    assert!(
        got.iter().all(|d| *d == want),
        "{}",
        ctx("a digest differs")
    );
    // Spread over both, and every join found its connection.
    let (a, b) = (closed_lines(&logs[0]), closed_lines(&logs[1]));
    eprintln!("connections: converter A {a}, converter B {b}");
    assert!(a >= 40 && b >= 40, "{}", ctx(&format!("spread {a} / {b}")));
    for c in &f.conv {
        eprintln!(
            "{}: joins {} (SYN {}), to the shared address refused {}",
            c.name(),
            counter(c, "MPTcpExtMPJoinAckRx"),
            counter(c, "MPTcpExtMPJoinSynRx"),
            counter(c, "MPTcpExtMPJoinRejected")
        );
        assert_eq!(
            counter(c, "MPTcpExtMPJoinNoTokenFound"),
            0,
            "{}",
            ctx("a join reached the wrong converter")
        );
    }
    // A subflow from each uplink to the converter's own address, on every connection.
    let joins: u64 = f
        .conv
        .iter()
        .map(|c| counter(c, "MPTcpExtMPJoinAckRx"))
        .sum();
    assert!(
        joins as usize >= 2 * (a + b) * 95 / 100,
        "{}",
        ctx(&format!("{joins} joins for {} connections", a + b))
    );

    // Converter A leaves: the route stops sending it new connections, then it drains. Slow
    // downloads under way finish over their subflows to A's own address.
    let slow = {
        let gw = f.gw.clone();
        std::thread::spawn(move || downloads(&gw, 10, 10, "--limit-rate 100k"))
    };
    std::thread::sleep(Duration::from_millis(800));
    let a_before = closed_lines(&logs[0]);
    ip(&f.rt, "route replace 10.9.0.1/32 via 10.5.2.2 dev rb");
    convs[0].signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let fresh = downloads(&f.gw, 40, 10, "");
    assert!(
        fresh.iter().all(|d| *d == want) && fresh.len() == 40,
        "{}",
        ctx("after A left")
    );
    let slow = slow.join().unwrap();
    assert!(
        slow.len() == 10 && slow.iter().all(|d| *d == want),
        "{}",
        ctx(&format!("downloads under way when A left: {slow:?}"))
    );
    let status = convs[0].wait_timeout(Duration::from_secs(40)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        ctx("A did not drain and exit")
    );
    let a_after = closed_lines(&logs[0]);
    assert!(
        a_after - a_before <= 10,
        "{}",
        ctx("new connections reached A after it left")
    );
    drop(gw);
    let _ = convs[1].stop();
    for l in &logs {
        let _ = std::fs::remove_file(l);
    }
    drop(f.rt);
}
