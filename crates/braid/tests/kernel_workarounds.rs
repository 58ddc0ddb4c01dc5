//! The converter's workarounds for kernel bugs (docs/architecture.md, "Kernel workarounds"), each
//! tested where the bug bites: downloads on 0-RTT connections with two subflows, a reply
//! written before the client's handshake ACK, and the nftables rule's life cycle.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid::client::{self, ClientOptions};
use braid_lab::{Netns, StandardConfig};
use common::*;

fn shaped(rates: [u64; 2]) -> StandardConfig {
    StandardConfig {
        uplinks: 2,
        rates: Some(rates.to_vec()),
        ..StandardConfig::by_hand()
    }
}

fn braid_tables(ns: &Netns) -> String {
    ns.run(["nft", "list", "tables"]).unwrap_or_default()
}

/// Without the SYN-window rule, 28 of 40 such downloads stalled for 5-30 s on this kernel.
/// The client keeps an autotuned receive buffer (no client-side help) so that the
/// converter-side rule is what is tested.
#[test]
fn zero_rtt_downloads_over_two_subflows_do_not_stall() {
    let cl = ConverterLab::new(
        shaped([400_000_000, 600_000_000]),
        &default_converter_args(),
    );
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let (conv, dest): (SocketAddr, SocketAddr) = (
        cl.converter_addr_v4(),
        (cl.lab.server_v4(), HASH_PORT).into(),
    );
    let (gw0, conv0) = (counters(&cl.lab.gateway), counters(&cl.lab.converter));
    let times = in_ns(&cl.lab.gateway, || async move {
        let opts = ClientOptions {
            rcvbuf: None,
            ..ClientOptions::default()
        };
        let mut times = Vec::new();
        for i in 0..20u64 {
            let t = Instant::now();
            let early = early_data(64 << 20, i, 0, 0);
            let c = client::connect(conv, dest, None, &early, &opts)
                .await
                .unwrap();
            assert!(c.mptcp, "download {i} is not MPTCP");
            hash_exchange(c.stream, c.leftover, 0, 0, 16, 64 << 20, i)
                .await
                .unwrap_or_else(|e| panic!("download {i}: {e}"));
            times.push(t.elapsed());
        }
        times
    });
    let (gw1, conv1) = (counters(&cl.lab.gateway), counters(&cl.lab.converter));
    let passive = delta(&conv0, &conv1, "TcpExtTCPFastOpenPassive");
    assert!(passive >= 20, "only {passive} of 20 connections were 0-RTT");
    let mut sorted = times.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let worst = sorted[sorted.len() - 1];
    assert!(
        worst <= median * 10,
        "a download stalled: worst {worst:?}, median {median:?}, all {times:?}"
    );
    // Two subflows carried them (the converter samples the count while relaying).
    let two = || {
        cl.log_text()
            .lines()
            .filter(|l| l.contains("connection closed") && l.contains("subflows=2"))
            .count()
    };
    eventually(|| two() >= 15);
    let kernel = format!(
        "gateway: {}\nconverter: {}",
        mptcp_deltas(&gw0, &gw1),
        mptcp_deltas(&conv0, &conv1)
    );
    // Every connection joined its second subflow (the client holds its FIN until the kernel
    // has, as the relay does), and the converter saw two while relaying most of them (it
    // samples the count; the last sample can come after a subflow closed).
    let joins = delta(&gw0, &gw1, "MPTcpExtMPJoinSynAckRx");
    assert_eq!(joins, 20, "only {joins} of 20 joins completed\n{kernel}");
    assert!(
        two() >= 15,
        "only {} of 20 downloads had two subflows\n{kernel}",
        two()
    );
}

/// A client that waits for the Convert reply before sending anything else (as a SOCKS client
/// does) must get it even when its handshake ACK reaches the converter after the converter has
/// already connected upstream and written the reply.
#[test]
fn the_reply_leaves_even_when_the_handshake_ack_is_late() {
    let cl = ConverterLab::new(shaped([2_000_000, 2_000_000]), &default_converter_args());
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    // Fill uplink 1's queue (gateway → converter): the client's ACK waits behind ~50 ms of
    // bulk data while the converter's upstream connect takes well under a millisecond.
    let up = &cl.lab.uplinks[0];
    let filler = braid_lab::bulk::Bulk::new(
        &cl.lab.gateway,
        &cl.lab.converter,
        (up.converter_v4, 6001).into(),
    )
    .src(up.gateway_v4.into())
    .start()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (conv, dest): (SocketAddr, SocketAddr) = (
        cl.converter_addr_v4(),
        (cl.lab.server_v4(), HASH_PORT).into(),
    );
    let bind: SocketAddr = (up.gateway_v4, 0).into();
    let waits = in_ns(&cl.lab.gateway, || async move {
        let opts = ClientOptions {
            bind: Some(bind),
            timeout: Duration::from_secs(5),
            ..ClientOptions::default()
        };
        let mut waits = Vec::new();
        for i in 0..5 {
            let t = Instant::now();
            // The request and the hash header ride in the SYN; then the client only reads.
            let early = early_data(0, i, 0, 0);
            let c = client::connect(conv, dest, None, &early, &opts).await;
            waits.push((t.elapsed(), c.map(|_| ()).map_err(|e| e.to_string())));
        }
        waits
    });
    drop(filler);
    for (i, (t, r)) in waits.iter().enumerate() {
        assert!(r.is_ok(), "connection {i}: {r:?} after {t:?}");
        assert!(
            *t < Duration::from_secs(2),
            "connection {i}: reply took {t:?}"
        );
    }
}

#[test]
fn the_nft_rule_lives_and_dies_with_the_converter() {
    let mut cl = ConverterLab::new(StandardConfig::by_hand(), &default_converter_args());
    let ns = cl.lab.converter.clone();
    assert!(
        braid_tables(&ns).contains("braid_tfo_5124"),
        "rule not installed"
    );
    let rules = ns
        .run(["nft", "list", "table", "inet", "braid_tfo_5124"])
        .unwrap();
    assert_eq!(
        rules.matches("tcp window set tcp window >>").count(),
        14,
        "{rules}"
    );
    // One rule for every packet; the fourteen only for SYNs to the port.
    assert!(
        rules.contains("tcp flags syn / syn,ack tcp dport 5124 jump by_scale"),
        "{rules}"
    );
    assert_eq!(
        rules
            .matches("tcp option mptcp subtype 0 tcp option window count")
            .count(),
        14,
        "{rules}"
    );

    // SIGTERM: removed.
    cl.converter.as_mut().unwrap().stop().unwrap();
    assert!(
        !braid_tables(&ns).contains("braid_"),
        "{}",
        braid_tables(&ns)
    );

    // SIGKILL leaves it behind; the next start replaces it.
    cl.start_converter(&default_converter_args());
    cl.converter.as_mut().unwrap().kill().unwrap();
    assert!(braid_tables(&ns).contains("braid_tfo_5124"));
    cl.start_converter(&default_converter_args());
    assert!(cl.log_text().contains("removed a stale TFO window rule"));
    let rules = ns
        .run(["nft", "list", "table", "inet", "braid_tfo_5124"])
        .unwrap();
    assert_eq!(
        rules.matches("tcp window set").count(),
        14,
        "rule doubled: {rules}"
    );

    // Disabled by flag: no table.
    cl.converter.as_mut().unwrap().stop().unwrap();
    let mut args = default_converter_args();
    args.push("--no-tfo-window-fix".into());
    cl.start_converter(&args);
    assert!(!braid_tables(&ns).contains("braid_"));
}
