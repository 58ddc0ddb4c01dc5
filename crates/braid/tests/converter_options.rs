//! The converter's optional kernel-facing features, each with a real converter process in the
//! lab: MPTCP limits and `signal` addresses through the path manager, the C flag, and TCP Fast
//! Open toward servers.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use braid::client::{self, ClientError, ClientOptions};
use braid_lab::{Signal, StandardConfig};
use braid_proto::convert::ErrorCode;
use common::*;

fn with(extra: &[&str]) -> Vec<String> {
    let mut args = default_converter_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn signal_address_brings_a_join_and_is_withdrawn_at_exit() {
    // The gateway has no endpoints of its own: the only way to a second subflow is the
    // converter announcing its address on the second uplink.
    let config = StandardConfig {
        uplinks: 2,
        rates: Some(vec![50_000_000, 50_000_000]),
        mptcp_gateway_endpoints: false,
        ..StandardConfig::by_hand()
    };
    let lab = braid_lab::StandardLab::new(config).expect("lab");
    lab.gateway.mptcp_limits(2, 2).unwrap();
    let announced = lab.uplinks[1].converter_v4.to_string();
    drop(
        lab.converter
            .ip(&["mptcp", "limits", "set", "subflows", "0"]),
    );
    let mut cl = ConverterLab::from_lab(
        lab,
        &with(&[
            "--signal",
            &announced,
            "--mptcp-subflows",
            "4",
            "--mptcp-add-addr-accepted",
            "0",
            "--no-join-initial-addr",
        ]),
    );
    let endpoints = cl.lab.converter.ip(&["mptcp", "endpoint", "show"]).unwrap();
    assert!(
        endpoints.contains(&announced) && endpoints.contains("signal"),
        "signal endpoint missing: {endpoints:?}"
    );
    let limits = cl.lab.converter.ip(&["mptcp", "limits", "show"]).unwrap();
    assert!(
        limits.contains("subflows 4") && limits.contains("add_addr_accepted 0"),
        "{limits:?}"
    );
    assert_eq!(
        cl.lab
            .converter
            .sysctl_get("net.mptcp.allow_join_initial_addr_port")
            .unwrap(),
        "0"
    );

    let add_addr0 = counter(&cl.lab.gateway, "MPTcpExtAddAddr");
    let (conv, dest) = (
        cl.converter_addr_v4(),
        SocketAddr::from((cl.lab.server_v4(), HASH_PORT)),
    );
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let r = in_ns(&cl.lab.gateway, || async move {
        converted_exchange(conv, dest, 8 << 20, 8 << 20, 100, &ClientOptions::default())
            .await
            .map(drop)
    });
    assert_eq!(r, Ok(()));
    assert!(
        counter(&cl.lab.gateway, "MPTcpExtAddAddr") > add_addr0,
        "the gateway never received the announcement"
    );
    let joined = || {
        cl.log_text()
            .lines()
            .any(|l| l.contains("connection closed") && l.contains("subflows=2"))
    };
    assert!(
        eventually(joined),
        "no join to the announced address:\n{}",
        cl.log_text()
    );

    let mut p = cl.converter.take().unwrap();
    p.signal(Signal::SIGTERM).unwrap();
    let status = p.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "converter did not exit cleanly"
    );
    let endpoints = cl.lab.converter.ip(&["mptcp", "endpoint", "show"]).unwrap();
    assert!(
        !endpoints.contains(&announced),
        "the signal endpoint outlived the converter: {endpoints:?}"
    );
}

#[test]
fn upstream_fast_open_carries_early_data_and_keeps_the_error_mapping() {
    let lab = braid_lab::StandardLab::new(StandardConfig::by_hand()).expect("lab");
    lab.server.sysctl("net.ipv4.tcp_fastopen", 3).unwrap();
    let cl = ConverterLab::from_lab(lab, &with(&["--upstream-fastopen"]));
    let _srv = HashServer::start_fastopen(&cl.lab.server, HASH_PORT);
    let server = cl.lab.server_v4();
    let conv = cl.converter_addr_v4();
    let passive0 = counter(&cl.lab.server, "TcpExtTCPFastOpenPassive");
    for _ in 0..4 {
        let dest = SocketAddr::from((server, HASH_PORT));
        let r = in_ns(&cl.lab.gateway, || async move {
            converted_exchange(
                conv,
                dest,
                1 << 20,
                1 << 20,
                1000,
                &ClientOptions::default(),
            )
            .await
            .map(drop)
        });
        assert_eq!(r, Ok(()));
    }
    // The first connection fetches the server's cookie; the others put data in the SYN.
    let passive = counter(&cl.lab.server, "TcpExtTCPFastOpenPassive") - passive0;
    assert!(
        passive >= 3,
        "server saw {passive} Fast Open SYNs with data from the converter"
    );

    // With a cookie for the server's address the SYN to a closed port carries data and is
    // answered by RST: still Error 96, not a success followed by a reset.
    let closed = SocketAddr::from((server, 9));
    let r = in_ns(&cl.lab.gateway, || async move {
        client::connect(conv, closed, None, b"hello", &ClientOptions::default())
            .await
            .map(|_| ())
    });
    assert!(
        matches!(
            r,
            Err(ClientError::Refused {
                code: ErrorCode::ConnectionReset,
                ..
            })
        ),
        "{r:?}"
    );
}

/// A converter on `port` in the lab's converter namespace, logging to its own file.
fn converter_on(cl: &ConverterLab, port: u16, extra: &[&str]) -> (braid_lab::Process, PathBuf) {
    let mut args = braid_lab::standard::converter_args(port);
    args.extend(extra.iter().map(|s| s.to_string()));
    let (mut p, log) = spawn_converter(&cl.lab.converter, &format!("{port}"), &args);
    wait_listening(&cl.lab.converter, port, &mut p, &log);
    (p, log)
}

/// `braid converter ARGS` in `ns`, logging to a fresh file named after the namespace and
/// `tag`; returns at once.
fn spawn_converter(
    ns: &braid_lab::Netns,
    tag: &str,
    args: &[String],
) -> (braid_lab::Process, PathBuf) {
    let log = std::env::temp_dir().join(format!("{}-converter-{tag}.log", ns.name()));
    let _ = std::fs::remove_file(&log);
    let p = ns
        .command(env!("CARGO_BIN_EXE_braid"))
        .arg("converter")
        .args(args)
        .env("RUST_LOG", daemon_log())
        .stderr(braid_lab::Output::File(log.clone()))
        .spawn()
        .expect("spawn braid converter");
    (p, log)
}

/// A converter on 127.0.0.1:5124 for anyone, and `extra`.
fn local_converter_args(extra: &[&str]) -> Vec<String> {
    strings(&["--listen", "127.0.0.1:5124", "--allow-any-client"])
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

#[test]
fn namespace_settings_go_back_with_the_last_converter_also_after_a_crash() {
    let config = StandardConfig {
        uplinks: 2,
        ..StandardConfig::by_hand()
    };
    let mut cl = ConverterLab::new(config, &default_converter_args());
    // The lab's own converter is not part of this: stopped before anything is recorded here.
    cl.converter.take().unwrap().stop().unwrap();
    let ns = cl.lab.converter.clone();
    let announced = cl.lab.uplinks[1].converter_v4.to_string();
    let foreign = cl.lab.uplinks[0].converter_v4.to_string();
    // The operator's values, none of them braid's.
    ns.sysctl("net.ipv4.tcp_fastopen", 0).unwrap();
    ns.sysctl("net.mptcp.stale_loss_cnt", 4).unwrap();
    ns.sysctl("net.mptcp.allow_join_initial_addr_port", 1)
        .unwrap();
    ns.ip(&[
        "mptcp",
        "limits",
        "set",
        "subflows",
        "1",
        "add_addr_accepted",
        "1",
    ])
    .unwrap();
    ns.ip(&["mptcp", "endpoint", "add", &foreign, "id", "5", "signal"])
        .unwrap();
    let settings = || {
        [
            "net.ipv4.tcp_fastopen",
            "net.mptcp.stale_loss_cnt",
            "net.mptcp.allow_join_initial_addr_port",
        ]
        .map(|k| ns.sysctl_get(k).unwrap())
        .join(" ")
            + " | "
            + ns.ip(&["mptcp", "limits", "show"]).unwrap().trim()
    };
    let endpoints = || ns.ip(&["mptcp", "endpoint", "show"]).unwrap();
    let limits_before = "add_addr_accepted 1 subflows 1";
    assert_eq!(normalize(&settings()), format!("0 4 1 | {limits_before}"));
    let braids = "2 2 0 | add_addr_accepted 1 subflows 4";
    // The ledger of this namespace: `netns-<inode>-<cookie>.json`.
    let inode = ns
        .run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"])
        .unwrap();
    let ledgers = || -> Vec<String> {
        std::fs::read_dir("/run/braid")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&format!("netns-{}-", inode.trim())))
                    .collect()
            })
            .unwrap_or_default()
    };

    let full = [
        "--signal",
        &announced,
        "--mptcp-subflows",
        "4",
        "--no-join-initial-addr",
    ];
    let (mut a, _) = converter_on(&cl, 5130, &full);
    let (mut b, b_log) = converter_on(&cl, 5131, &full);
    assert_eq!(
        normalize(&settings()),
        normalize(braids),
        "{}",
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    assert_eq!(
        endpoints().matches(&announced).count(),
        1,
        "{}",
        endpoints()
    );
    assert_eq!(ledgers().len(), 1, "{:?}", ledgers());
    // The first converter leaves: the second still relies on everything.
    a.signal(Signal::SIGTERM).unwrap();
    assert!(a.wait_timeout(Duration::from_secs(10)).unwrap().is_some());
    assert_eq!(normalize(&settings()), normalize(braids));
    assert_eq!(
        endpoints().matches(&announced).count(),
        1,
        "{}",
        endpoints()
    );
    // The second crashes: what it held stays until the next start.
    b.kill().unwrap();
    assert_eq!(normalize(&settings()), normalize(braids));
    assert!(endpoints().contains(&announced));
    // A converter that sets nothing but the TFO server bit puts back the rest at its start.
    let (mut c, c_log) = converter_on(&cl, 5130, &["--stale-loss-cnt", "0"]);
    let text = std::fs::read_to_string(&c_log).unwrap_or_default();
    assert_eq!(
        normalize(&settings()),
        format!("2 4 1 | {limits_before}"),
        "{text}"
    );
    assert!(!endpoints().contains(&announced), "{}\n{text}", endpoints());
    // An operator's change made while braid runs is theirs to keep.
    ns.sysctl("net.ipv4.tcp_fastopen", 3).unwrap();
    c.signal(Signal::SIGTERM).unwrap();
    assert!(c.wait_timeout(Duration::from_secs(10)).unwrap().is_some());
    assert_eq!(normalize(&settings()), format!("3 4 1 | {limits_before}"));
    let eps = endpoints();
    assert!(
        eps.contains(&format!("{foreign} id 5 signal")),
        "the operator's endpoint: {eps}"
    );
    assert!(!eps.contains(&announced), "{eps}");
    assert_eq!(
        ledgers(),
        Vec::<String>::new(),
        "the ledger outlived the last converter"
    );
}

/// `ip mptcp limits show` prints its two limits in an order that changed between versions.
fn normalize(s: &str) -> String {
    let (sysctls, limits) = s.split_once(" | ").unwrap_or((s, ""));
    let mut words: Vec<&str> = limits.split_whitespace().collect();
    let mut pairs: Vec<String> = words.chunks_mut(2).map(|c| c.join(" ")).collect();
    pairs.sort();
    format!("{sysctls} | {}", pairs.join(" "))
}

#[test]
fn the_ledger_of_a_namespace_that_is_gone_is_removed() {
    let ledgers_of = |ns: &braid_lab::Netns| -> Vec<PathBuf> {
        let inode = ns
            .run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"])
            .unwrap();
        std::fs::read_dir("/run/braid")
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(&format!("netns-{}-", inode.trim())))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let start = |ns: &braid_lab::Netns| {
        let (mut p, log) = spawn_converter(ns, "ledger", &local_converter_args(&[]));
        wait_listening(ns, 5124, &mut p, &log);
        (p, log)
    };
    let gone = braid_lab::Netns::create("ledger").unwrap();
    // Made while the first exists, so that it cannot get its inode number.
    let other = braid_lab::Netns::create("ledger").unwrap();
    let (mut p, log) = start(&gone);
    let left = ledgers_of(&gone);
    assert_eq!(left.len(), 1, "stale_loss_cnt is recorded: {left:?}");
    p.kill().unwrap();
    drop(gone);
    let _ = std::fs::remove_file(log);
    assert!(left[0].exists(), "a crash leaves the ledger");
    // Any braid start on the machine takes the dead namespace's ledger away.
    let (mut p, log) = start(&other);
    assert!(
        !left[0].exists(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    p.stop().unwrap();
    let _ = std::fs::remove_file(log);
    assert_eq!(ledgers_of(&other), Vec::<PathBuf>::new());
}

#[test]
fn without_a_usable_state_dir_the_converter_runs_and_changes_nothing() {
    let ns = braid_lab::Netns::create("nostate").unwrap();
    ns.sysctl("net.ipv4.tcp_fastopen", 3).unwrap();
    ns.sysctl("net.mptcp.stale_loss_cnt", 4).unwrap();
    // Nothing can make a directory in /proc: as for a daemon without root and without one.
    let conf = std::env::temp_dir().join(format!("{}-nostate.toml", ns.name()));
    std::fs::write(&conf, "state_dir = \"/proc/braid-state\"\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = local_converter_args(&["--config", conf.to_str().unwrap()]);
        args.extend(strings(extra));
        spawn_converter(&ns, "nostate", &args)
    };
    // What it needs is in place: it runs, leaving stale_loss_cnt alone, and says why.
    let (mut p, log) = run(&[]);
    wait_listening(&ns, 5124, &mut p, &log);
    assert_eq!(ns.sysctl_get("net.mptcp.stale_loss_cnt").unwrap(), "4");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("/proc/braid-state"), "{text}");
    p.stop().unwrap();
    // Asked to change the namespace, it refuses to start: the change could not be undone.
    let (mut p, log) = run(&["--mptcp-subflows", "4"]);
    let status = p.wait_timeout(Duration::from_secs(10)).unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{text}");
    assert!(text.contains("need the ledger"), "{text}");
    // And so without the TFO server bit.
    ns.sysctl("net.ipv4.tcp_fastopen", 1).unwrap();
    let (mut p, log) = run(&[]);
    let status = p.wait_timeout(Duration::from_secs(10)).unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{text}");
    assert!(text.contains("tcp_fastopen=0x3"), "{text}");
    assert_eq!(ns.sysctl_get("net.ipv4.tcp_fastopen").unwrap(), "1");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&conf);
}
