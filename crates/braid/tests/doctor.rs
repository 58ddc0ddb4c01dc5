//! `braid doctor` against real trouble in the lab: a path that strips the MPTCP option on one
//! uplink, Fast Open switched off, a gateway with no endpoints, a converter that is not
//! listening. Each check must fail for its cause and say so; a healthy set-up must pass.

mod common;

use braid_lab::{Netns, StandardConfig};
use common::*;

/// `braid doctor ARGS` in `ns`: (exit code, output).
fn doctor(ns: &Netns, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            env!("CARGO_BIN_EXE_braid"),
            "doctor",
        ])
        .args(args)
        .output()
        .expect("braid doctor");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The line of `check` in the doctor's text.
fn line<'a>(text: &'a str, check: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(&format!("] {check}")))
        .unwrap_or_else(|| panic!("no {check} line in:\n{text}"))
}

#[test]
fn a_gateway_doctor_passes_when_all_is_well_and_names_each_cause() {
    let cl = ConverterLab::new(StandardConfig::default(), &default_converter_args());
    let conv = cl.converter_addr_v4().to_string();
    let gw = gateway_to(&cl, &["--transparent", "tproxy"]);
    let (code, text) = doctor(&cl.lab.gateway, &["gateway", "--converter", &conv]);
    eprintln!("{text}");
    assert_eq!(code, 0, "{text}\n{}", gw.log_text());
    for up in ["g-v1", "g-v2"] {
        assert!(
            line(&text, &format!("path {up}")).contains("MPTCP, request in the SYN"),
            "{text}"
        );
    }
    assert!(line(&text, "endpoints").starts_with("[ok"), "{text}");

    // A middlebox on uplink 2's way removes the MPTCP option from the SYNs to the converter.
    cl.lab
        .converter
        .nft(&format!(
            "add table inet strip\n\
             add chain inet strip pre {{ type filter hook prerouting priority -150; }}\n\
             add rule inet strip pre iifname \"{}\" tcp dport {} reset tcp option mptcp",
            cl.lab.uplinks[1].converter_if,
            cl.converter_addr_v4().port()
        ))
        .unwrap();
    let (code, text) = doctor(&cl.lab.gateway, &["gateway", "--converter", &conv]);
    assert_eq!(code, 1, "{text}");
    let l = line(&text, "path g-v2");
    assert!(
        l.contains("FAIL") && l.contains("MPTCP option was removed"),
        "{text}"
    );
    assert!(line(&text, "path g-v1").starts_with("[ok"), "{text}");
    cl.lab.converter.nft("delete table inet strip").unwrap();

    // Fast Open's client bit off.
    let tfo = cl.lab.gateway.sysctl_get("net.ipv4.tcp_fastopen").unwrap();
    cl.lab.gateway.sysctl("net.ipv4.tcp_fastopen", 0).unwrap();
    let (code, text) = doctor(&cl.lab.gateway, &["gateway", "--converter", &conv]);
    cl.lab
        .gateway
        .sysctl("net.ipv4.tcp_fastopen", tfo.trim())
        .unwrap();
    assert_eq!(code, 1, "{text}");
    let l = line(&text, "fast open");
    assert!(
        l.contains("client bit of net.ipv4.tcp_fastopen is off"),
        "{text}"
    );
    assert!(
        text.contains("fix: sysctl -w net.ipv4.tcp_fastopen=1"),
        "{text}"
    );
    drop(gw);

    // A gateway that leaves the path manager alone, with no endpoints: one link only.
    let gw = gateway_to(&cl, &["--transparent", "tproxy", "--no-manage-uplinks"]);
    let (code, text) = doctor(&cl.lab.gateway, &["gateway", "--converter", &conv]);
    assert_eq!(code, 1, "{text}\n{}", gw.log_text());
    assert!(
        line(&text, "endpoints").contains("no uplink address has an MPTCP subflow endpoint"),
        "{text}"
    );
}

#[test]
fn a_converter_doctor_sees_the_listener_the_fix_and_the_way_out() {
    let cl = ConverterLab::new(StandardConfig::default(), &default_converter_args());
    let _nginx = Nginx::start(&cl.lab.server, 1024);
    let server = format!("{}:80", cl.lab.server_v4());
    let port = cl.converter_addr_v4().port().to_string();
    let (code, text) = doctor(
        &cl.lab.converter,
        &["converter", "--port", &port, "--destination", &server],
    );
    assert_eq!(code, 0, "{text}");
    for check in [
        "listener",
        "window fix",
        "limits",
        "destination",
        "fast open",
    ] {
        assert!(line(&text, check).starts_with("[ok"), "{check}: {text}");
    }
    // Nothing on another port.
    let (code, text) = doctor(&cl.lab.converter, &["converter", "--port", "5999"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        line(&text, "listener").contains("nothing listens on port 5999"),
        "{text}"
    );
    // A server that is not there.
    let (code, text) = doctor(
        &cl.lab.converter,
        &["converter", "--port", &port, "--destination", "10.2.0.2:81"],
    );
    assert_eq!(code, 1, "{text}");
    assert!(line(&text, "destination").contains("10.2.0.2:81"), "{text}");
}

/// gateway — router — converter, the router stripping the MPTCP option from what it forwards:
/// the doctor names the last hop whose quote of a TTL-limited SYN still had it.
#[test]
fn the_hop_that_strips_mptcp_is_named() {
    use braid_lab::Link;
    let gw = Netns::create("gw").unwrap();
    let rt = Netns::create("rt").unwrap();
    let cv = Netns::create("cv").unwrap();
    let _l1 = Link::create(&gw, "g1", &rt, "r1").unwrap();
    let _l2 = Link::create(&rt, "rc", &cv, "c0").unwrap();
    for (ns, cmds) in [
        (
            &gw,
            &[
                "addr add 10.1.1.1/24 dev g1",
                "route add default via 10.1.1.2",
            ][..],
        ),
        (
            &rt,
            &["addr add 10.1.1.2/24 dev r1", "addr add 10.5.1.1/24 dev rc"][..],
        ),
        (
            &cv,
            &[
                "addr add 10.5.1.2/24 dev c0",
                "route add default via 10.5.1.1",
            ][..],
        ),
    ] {
        for c in cmds {
            ns.ip(&c.split_whitespace().collect::<Vec<_>>()).unwrap();
        }
    }
    rt.sysctl("net.ipv4.ip_forward", 1).unwrap();
    rt.nft(
        "add table inet strip\n\
         add chain inet strip pass { type filter hook forward priority 0; }\n\
         add rule inet strip pass tcp dport 5124 reset tcp option mptcp",
    )
    .unwrap();
    let (mut conv, log) = converter_in(
        &cv,
        &["--listen", "0.0.0.0:5124", "--allow-client", "10.1.0.0/16"],
    );
    let (code, text) = doctor(&gw, &["gateway", "--converter", "10.5.1.2:5124"]);
    let _ = conv.stop();
    let _ = std::fs::remove_file(&log);
    assert_eq!(code, 1, "{text}");
    let l = line(&text, "path g1");
    assert!(l.contains("MPTCP option was removed"), "{text}");
    assert!(
        l.contains("present at hop 1 (10.1.1.2)") && l.contains("stripped after it"),
        "{text}"
    );
}
