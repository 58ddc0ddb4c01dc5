//! `systemctl reload braid-converter` (SIGHUP): the policy and the cookies change for new
//! connections while a running transfer goes on untouched; a file that does not validate
//! changes nothing; keys that need a restart say so.

mod common;

use std::time::Duration;

use braid::client::{ClientError, ClientOptions};
use braid_lab::StandardConfig;
use braid_proto::convert::ErrorCode;
use common::*;
use nix::sys::signal::Signal;

const HASH_PORT: u16 = 7700;

fn write_config(path: &std::path::Path, extra: &str) {
    let prefixes = |v: &[&str]| {
        v.iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(
        path,
        format!(
            "allow_client = [{}]\nallow_dest = [{}]\n{extra}",
            prefixes(&braid_lab::standard::UPLINK_PREFIXES),
            prefixes(&braid_lab::standard::SERVER_PREFIXES)
        ),
    )
    .unwrap();
}

/// SIGHUP to a daemon, and waits until its log (read by `log`) has a new line about the reload.
fn hup(p: &mut braid_lab::Process, log_file: &std::path::Path) {
    let log = || std::fs::read_to_string(log_file).unwrap_or_default();
    let before = log().lines().count();
    p.signal(Signal::SIGHUP).unwrap();
    assert!(
        eventually(|| log().lines().skip(before).any(|l| l.contains("reload"))),
        "no reload line:\n{}",
        log()
    );
}

/// A conversion to the hash server on `port`: Ok, or the Error code.
fn convert_to(cl: &ConverterLab, port: u16) -> Result<(), ErrorCode> {
    let conv = cl.converter_addr_v4();
    let dest = (cl.lab.server_v4(), port).into();
    in_ns(&cl.lab.gateway, || async move {
        match braid::client::connect(conv, dest, None, b"", &ClientOptions::default()).await {
            Ok(_) => Ok(()),
            Err(ClientError::Refused { code, .. }) => Err(code),
            Err(e) => panic!("{e}"),
        }
    })
}

#[test]
fn a_reload_changes_the_policy_for_new_connections_and_keeps_running_ones() {
    let path = std::env::temp_dir().join(format!("braid-reload-{}.toml", std::process::id()));
    write_config(&path, &format!("deny_ports = [{}]\n", HASH_PORT + 1));
    let config = StandardConfig {
        rates: Some(vec![20_000_000, 30_000_000]),
        ..StandardConfig::by_hand()
    };
    let mut cl = ConverterLab::new(
        config,
        &strings(&["--listen", "[::]:5124", "--config", path.to_str().unwrap()]),
    );
    let log = cl.log.clone();
    let _a = HashServer::start(&cl.lab.server, HASH_PORT);
    let _b = HashServer::start(&cl.lab.server, HASH_PORT + 1);
    assert_eq!(
        convert_to(&cl, HASH_PORT + 1),
        Err(ErrorCode::NotAuthorized)
    );

    // A transfer of some seconds over the shaped uplinks, under way across the reload.
    let conv = cl.converter_addr_v4();
    let dest = (cl.lab.server_v4(), HASH_PORT).into();
    let gw = cl.lab.gateway.clone();
    let running = std::thread::spawn(move || {
        in_ns(&gw, || async move {
            converted_exchange(conv, dest, 8 << 20, 8 << 20, 0, &ClientOptions::default()).await
        })
    });
    std::thread::sleep(Duration::from_millis(800));

    // The port opened, the first one closed.
    write_config(&path, &format!("deny_ports = [{}]\n", HASH_PORT + 2));
    hup(cl.converter.as_mut().unwrap(), &log);
    assert!(
        cl.log_text()
            .contains("configuration reloaded: policy and cookies apply"),
        "{}",
        cl.log_text()
    );
    assert_eq!(convert_to(&cl, HASH_PORT + 1), Ok(()));
    assert!(
        running.join().unwrap().is_ok(),
        "the transfer under way broke:\n{}",
        cl.log_text()
    );

    // A file that does not validate changes nothing.
    std::fs::write(&path, "allow_client = [\"10.1.2.3/8\"]\n").unwrap();
    hup(cl.converter.as_mut().unwrap(), &log);
    assert!(
        cl.log_text().contains("reload refused"),
        "{}",
        cl.log_text()
    );
    assert!(cl.log_text().contains("allow_client"), "{}", cl.log_text());
    assert_eq!(convert_to(&cl, HASH_PORT + 1), Ok(()));

    // Keys that shape the listeners take a restart, and say which.
    write_config(&path, "tfo_queue = 16\n");
    hup(cl.converter.as_mut().unwrap(), &log);
    let log = cl.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("take a restart") && l.contains("tfo_queue")),
        "{log}"
    );
    let _ = std::fs::remove_file(&path);
}

fn gateway_file(path: &std::path::Path, converter: std::net::SocketAddr, uplinks: &[&str]) {
    let mut text = format!("converter = [\"{converter}\"]\nsocks5 = \"127.0.0.1:1080\"\n");
    for u in uplinks {
        text.push_str(&format!("\n[[uplink]]\n{u}\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn endpoints(ns: &braid_lab::Netns) -> String {
    ns.ip(&["mptcp", "endpoint", "show"]).unwrap_or_default()
}

#[test]
fn a_gateway_reload_takes_new_uplinks_and_names_what_needs_a_restart() {
    let cl = ConverterLab::new(StandardConfig::default(), &default_converter_args());
    let path = std::env::temp_dir().join(format!("braid-gw-reload-{}.toml", std::process::id()));
    let conv = cl.converter_addr_v4();
    gateway_file(&path, conv, &["interface = \"g-v1\""]);
    let mut gw = Gateway::start(
        &cl.lab.gateway,
        &strings(&["--config", path.to_str().unwrap()]),
    );
    let gw_log = gw.log.clone();
    assert!(eventually(
        || endpoints(&cl.lab.gateway).contains("10.1.1.1")
    ));
    assert!(!endpoints(&cl.lab.gateway).contains("10.1.2.1"));

    // The second uplink listed, with a name: managed at once, no restart.
    gateway_file(
        &path,
        conv,
        &[
            "interface = \"g-v1\"",
            "interface = \"g-v2\"\nname = \"lte\"",
        ],
    );
    hup(gw.process.as_mut().unwrap(), &gw_log);
    assert!(
        gw.log_text()
            .contains("configuration reloaded: uplinks and health apply now"),
        "{}",
        gw.log_text()
    );
    assert!(
        eventually(|| endpoints(&cl.lab.gateway).contains("10.1.2.1")),
        "no endpoint for the uplink added by the reload: {}\n{}",
        endpoints(&cl.lab.gateway),
        gw.log_text()
    );
    let status = cl
        .lab
        .gateway
        .run([env!("CARGO_BIN_EXE_braid"), "status"])
        .unwrap();
    assert!(status.contains("lte"), "{status}");

    // A bad file changes nothing; another converter takes a restart, and the log says so.
    std::fs::write(
        &path,
        "converter = [\"not an address\"]\nsocks5 = \"127.0.0.1:1080\"\n",
    )
    .unwrap();
    hup(gw.process.as_mut().unwrap(), &gw_log);
    assert!(
        gw.log_text().contains("reload refused"),
        "{}",
        gw.log_text()
    );
    gateway_file(
        &path,
        (cl.lab.converter_v4(), 6000).into(),
        &[
            "interface = \"g-v1\"",
            "interface = \"g-v2\"\nname = \"lte\"",
        ],
    );
    hup(gw.process.as_mut().unwrap(), &gw_log);
    assert!(
        gw.log_text()
            .lines()
            .any(|l| l.contains("take a restart") && l.contains("converters")),
        "{}",
        gw.log_text()
    );
    assert!(endpoints(&cl.lab.gateway).contains("10.1.2.1"));
    let _ = std::fs::remove_file(&path);
}
