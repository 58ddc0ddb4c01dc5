//! The converter's optional kernel-facing features, each with a real converter process in the
//! lab: MPTCP limits and `signal` addresses through the path manager, the C flag, and TCP Fast
//! Open toward servers.

mod common;

use std::net::SocketAddr;
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
