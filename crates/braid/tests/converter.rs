//! End-to-end behaviour of `braid converter`: a real converter process in the lab's converter
//! namespace, clients in the gateway namespace (MPTCP over two uplinks), servers in the server
//! namespace. Every transfer is checked byte for byte.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid::client::{self, ClientError, ClientOptions};
use braid_lab::{Signal, StandardConfig};
use braid_proto::convert::ErrorCode;
use common::*;

fn shaped(rates: [u64; 2]) -> StandardConfig {
    StandardConfig {
        uplinks: 2,
        rates: Some(rates.to_vec()),
        ..StandardConfig::by_hand()
    }
}

fn server_v4(cl: &ConverterLab, port: u16) -> SocketAddr {
    (cl.lab.server_v4(), port).into()
}

fn server_v6(cl: &ConverterLab, port: u16) -> SocketAddr {
    (cl.lab.server_v6(), port).into()
}

#[test]
fn relays_ipv4_and_ipv6_and_bridges_families() {
    let cl = ConverterLab::new(
        shaped([200_000_000, 200_000_000]),
        &default_converter_args(),
    );
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let cases = [
        ("v4 → v4", cl.converter_addr_v4(), server_v4(&cl, HASH_PORT)),
        ("v6 → v6", cl.converter_addr_v6(), server_v6(&cl, HASH_PORT)),
        (
            "v4 client → v6 server",
            cl.converter_addr_v4(),
            server_v6(&cl, HASH_PORT),
        ),
        (
            "v6 client → v4 server",
            cl.converter_addr_v6(),
            server_v4(&cl, HASH_PORT),
        ),
    ];
    for (what, conv, dest) in cases {
        let r = in_ns(&cl.lab.gateway, || async move {
            converted_exchange(conv, dest, 3 << 20, 5 << 20, 100, &ClientOptions::default()).await
        });
        assert_eq!(r, Ok(true), "{what}: transfer failed or not MPTCP");
    }
}

#[test]
fn zero_rtt_request_and_data_ride_in_the_syn() {
    let cl = ConverterLab::new(
        shaped([100_000_000, 100_000_000]),
        &default_converter_args(),
    );
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let active0 = counter(&cl.lab.gateway, "TcpExtTCPFastOpenActive");
    let passive0 = counter(&cl.lab.converter, "TcpExtTCPFastOpenPassive");
    let fallback0 = counter(&cl.lab.gateway, "MPTcpExtMPCapableDataFallback");
    let (conv, dest) = (cl.converter_addr_v4(), server_v4(&cl, HASH_PORT));
    for _ in 0..5 {
        // 1000 bytes of application data go with the request in the SYN.
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
        });
        assert_eq!(r, Ok(true), "transfer failed or fell back to TCP");
    }
    let active = counter(&cl.lab.gateway, "TcpExtTCPFastOpenActive") - active0;
    let passive = counter(&cl.lab.converter, "TcpExtTCPFastOpenPassive") - passive0;
    assert!(
        active >= 5,
        "TFO active {active}: the request did not ride in the SYN"
    );
    assert!(
        passive >= 5,
        "TFO passive {passive}: the converter did not take SYN data"
    );
    assert_eq!(
        counter(&cl.lab.gateway, "MPTcpExtMPCapableDataFallback") - fallback0,
        0,
        "data in the SYN made MPTCP fall back"
    );
}

#[test]
fn request_split_over_many_segments_is_reassembled() {
    use std::io::{Read, Write};
    let cl = ConverterLab::new(StandardConfig::by_hand(), &default_converter_args());
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let conv = cl.converter_addr_v4();
    let dest = server_v4(&cl, HASH_PORT);
    let segments = cl
        .lab
        .gateway
        .enter(move || {
            let mut s = std::net::TcpStream::connect(conv).unwrap();
            s.set_nodelay(true).unwrap();
            let mut msg = braid_proto::convert::encode_connect_request(dest, None);
            // The hash protocol header and 10 bytes of upload follow in the same stream.
            msg.extend_from_slice(&early_data(100, 2, 1, 10));
            // One byte per segment: the converter must wait and reassemble.
            for b in &msg {
                s.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = Vec::new();
            s.read_to_end(&mut reply).unwrap();
            (msg.len(), reply)
        })
        .unwrap();
    let (sent, reply) = segments;
    assert!(sent > 40);
    // Bare header, then 100 pattern bytes, then the digest of the 10 bytes uploaded.
    assert_eq!(&reply[..4], &[1, 1, 0x22, 0x63]);
    let mut want = vec![0u8; 100];
    pattern(2, 0, &mut want);
    assert_eq!(&reply[4..104], &want[..]);
    assert_eq!(&reply[104..], &pattern_sha256(1, 10)[..]);
}

#[test]
fn half_close_works_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cl = ConverterLab::new(StandardConfig::by_hand(), &default_converter_args());
    // Server A: reads to EOF, then answers (client half-closes first).
    // Server B: sends and half-closes at once, then keeps reading (server half-closes first).
    let (conv, lab_server_v4) = (cl.converter_addr_v4(), cl.lab.server_v4());
    let server = in_ns_thread(&cl.lab.server, move || async move {
        let a = tokio::net::TcpListener::bind((lab_server_v4, 7101))
            .await
            .unwrap();
        let b = tokio::net::TcpListener::bind((lab_server_v4, 7102))
            .await
            .unwrap();
        let (mut sa, _) = a.accept().await.unwrap();
        let mut req = Vec::new();
        sa.read_to_end(&mut req).await.unwrap();
        sa.write_all(format!("got {} bytes", req.len()).as_bytes())
            .await
            .unwrap();
        sa.shutdown().await.unwrap();
        let (mut sb, _) = b.accept().await.unwrap();
        sb.write_all(b"early goodbye").await.unwrap();
        sb.shutdown().await.unwrap();
        let mut rest = Vec::new();
        sb.read_to_end(&mut rest).await.unwrap();
        rest
    });
    std::thread::sleep(Duration::from_millis(100));
    let (a, b) = in_ns(&cl.lab.gateway, || async move {
        let opts = ClientOptions::default();
        let dest_a: SocketAddr = (lab_server_v4, 7101).into();
        let mut c = client::connect(conv, dest_a, None, b"0123456789", &opts)
            .await
            .unwrap();
        c.stream.write_all(b"abc").await.unwrap();
        c.stream.shutdown().await.unwrap();
        let mut a = c.leftover;
        c.stream.read_to_end(&mut a).await.unwrap();

        let dest_b: SocketAddr = (lab_server_v4, 7102).into();
        let mut c = client::connect(conv, dest_b, None, b"", &opts)
            .await
            .unwrap();
        let mut b = c.leftover;
        c.stream.read_to_end(&mut b).await.unwrap();
        // The server's FIN arrived; our direction must still work.
        c.stream.write_all(b"still talking").await.unwrap();
        c.stream.shutdown().await.unwrap();
        (a, b)
    });
    assert_eq!(a, b"got 13 bytes");
    assert_eq!(b, b"early goodbye");
    assert_eq!(server.join().unwrap(), b"still talking");
}

/// Sends a raw request (no TFO) and returns the reply bytes up to the converter's reset or FIN.
fn raw_exchange(cl: &ConverterLab, request: Vec<u8>) -> Vec<u8> {
    use std::io::{Read, Write};
    let conv = cl.converter_addr_v4();
    cl.lab
        .gateway
        .enter(move || {
            let mut s = std::net::TcpStream::connect(conv).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // A converter may refuse (Error, then reset) before the request has left; the
            // Error is still queued for us, so a failed write is no reason to stop here.
            let _ = s.write_all(&request);
            let mut reply = Vec::new();
            let mut buf = [0u8; 2048];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                    Err(e) => panic!("reading reply: {e}"),
                }
            }
            reply
        })
        .unwrap()
}

/// The Error code of a reply, asserting it is a complete Convert error message.
fn error_code(reply: &[u8]) -> u8 {
    assert!(reply.len() >= 8, "not an error reply: {reply:02x?}");
    assert_eq!(&reply[..4], &[1, reply[1], 0x22, 0x63], "{reply:02x?}");
    assert_eq!(reply[4], 0x1e, "first TLV is not Error: {reply:02x?}");
    reply[6]
}

#[test]
fn every_error_code_is_sent_for_real() {
    let mut args = default_converter_args();
    for a in [
        "--deny-dest",
        "10.2.0.99/32",
        "--allow-dest",
        "10.3.0.0/16",
        "--allow-dest",
        "10.4.0.0/16",
    ] {
        args.push(a.into());
    }
    let cl = ConverterLab::new(StandardConfig::by_hand(), &args);
    let connect = |dest: SocketAddr| braid_proto::convert::encode_connect_request(dest, None);
    let server = cl.lab.server_v4();

    // 96: closed port on the server (RST).
    assert_eq!(
        error_code(&raw_exchange(&cl, connect((server, 9).into()))),
        96
    );
    // 97 with the ICMP code: the server namespace routes 10.3.0.0/24 to "prohibit", so it
    // answers the converter's SYN with ICMP unreachable, code 13 (administratively prohibited).
    cl.lab
        .converter
        .ip(&["route", "add", "10.3.0.0/24", "via", "10.2.0.2"])
        .unwrap();
    cl.lab.server.sysctl("net.ipv4.ip_forward", 1).unwrap();
    cl.lab
        .server
        .ip(&["route", "add", "prohibit", "10.3.0.0/24"])
        .unwrap();
    let reply = raw_exchange(&cl, connect(([10, 3, 0, 1], 80).into()));
    assert_eq!(error_code(&reply), 97);
    assert_eq!(
        reply[7], 13,
        "the ICMP code travels to the client: {reply:02x?}"
    );
    // 97 without ICMP: no route at all on the converter (local "network unreachable", code 0).
    cl.lab
        .converter
        .ip(&["route", "add", "unreachable", "10.4.0.0/24"])
        .unwrap();
    let reply = raw_exchange(&cl, connect(([10, 4, 0, 1], 80).into()));
    assert_eq!(error_code(&reply), 97);
    // 32: denied destination; 1: a destination no converter may reach.
    assert_eq!(
        error_code(&raw_exchange(&cl, connect(([10, 2, 0, 99], 80).into()))),
        32
    );
    assert_eq!(
        error_code(&raw_exchange(&cl, connect(([224, 0, 0, 1], 80).into()))),
        1
    );
    // 1: malformed (bad magic), 0: unsupported version, 2: unknown TLV.
    assert_eq!(error_code(&raw_exchange(&cl, vec![1, 1, 0x22, 0x64])), 1);
    let reply = raw_exchange(&cl, vec![2, 1, 0x22, 0x63]);
    assert_eq!(error_code(&reply), 0);
    assert_eq!(reply[7], 1, "Error 0 lists the supported version");
    assert_eq!(
        error_code(&raw_exchange(&cl, vec![1, 2, 0x22, 0x63, 0xc8, 1, 0, 0])),
        2
    );
    // Info gets Supported TCP Extensions with MPTCP (kind 30).
    let reply = raw_exchange(&cl, vec![1, 2, 0x22, 0x63, 1, 1, 0, 0]);
    assert_eq!(reply[4], 0x15, "{reply:02x?}");
    assert!(reply[8..].contains(&30), "{reply:02x?}");
}

#[test]
fn cookies_and_limits_are_enforced() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut args = default_converter_args();
    let cfg = std::env::temp_dir().join(format!("braid-cookie-{}.toml", std::process::id()));
    std::fs::write(&cfg, "cookies = true\nmax_connections_per_client = 2\n").unwrap();
    args.extend(["--config".into(), cfg.display().to_string()]);
    let cl = ConverterLab::new(StandardConfig::by_hand(), &args);
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let (conv, dest) = (cl.converter_addr_v4(), server_v4(&cl, HASH_PORT));
    let outcome = in_ns(&cl.lab.gateway, || async move {
        let opts = ClientOptions::default();
        // No cookie: Error 3 carrying one.
        let e = client::connect(conv, dest, None, b"", &opts)
            .await
            .unwrap_err();
        let ClientError::Refused {
            code: ErrorCode::MissingCookie,
            value,
        } = e
        else {
            panic!("expected Error 3, got {e}")
        };
        let cookie = value[1..].to_vec();
        // A refused connection whose client has read the Error but not closed: the converter
        // lingers over it (up to 3 s) without counting it against the per-client limit.
        let mut lingering = tokio::net::TcpStream::connect(conv).await.unwrap();
        lingering
            .write_all(&braid_proto::convert::encode_connect_request(dest, None))
            .await
            .unwrap();
        let mut reply = [0u8; 64];
        assert!(lingering.read(&mut reply).await.unwrap() > 0, "no Error 3");
        // A wrong cookie: Error 32.
        let e = client::connect(conv, dest, Some(b"not a cookie"), b"", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Refused {
                    code: ErrorCode::NotAuthorized,
                    ..
                }
            ),
            "{e}"
        );
        // The right one: through, at once, twice, though the refusals may still linger.
        let early = early_data(10, 2, 1, 0);
        let through = || async {
            client::connect(conv, dest, Some(&cookie), &early, &opts)
                .await
                .expect("admitted: a refusal gives its per-client slot back")
        };
        let held1 = through().await;
        let held2 = through().await;
        // A third connection from the same client exceeds the per-client limit: Error 64.
        let e = client::connect(conv, dest, Some(&cookie), &early, &opts)
            .await
            .unwrap_err();
        drop((held1, held2, lingering));
        e
    });
    let _ = std::fs::remove_file(&cfg);
    assert!(
        matches!(
            outcome,
            ClientError::Refused {
                code: ErrorCode::ResourceExceeded,
                ..
            }
        ),
        "{outcome}"
    );
}

#[test]
fn clients_outside_the_allow_list_are_refused() {
    let args: Vec<String> = [
        "--listen",
        "[::]:5124",
        "--allow-client",
        "192.0.2.0/24",
        "--allow-dest",
        "10.2.0.0/24",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cl = ConverterLab::new(StandardConfig::by_hand(), &args);
    let reply = raw_exchange(
        &cl,
        braid_proto::convert::encode_connect_request((cl.lab.server_v4(), 80).into(), None),
    );
    assert_eq!(error_code(&reply), 32);
}

#[test]
fn a_client_that_never_finishes_its_request_is_dropped() {
    let mut args = default_converter_args();
    let cfg = std::env::temp_dir().join(format!("braid-slow-{}.toml", std::process::id()));
    std::fs::write(&cfg, "handshake_timeout_ms = 500\n").unwrap();
    args.extend(["--config".into(), cfg.display().to_string()]);
    let cl = ConverterLab::new(StandardConfig::by_hand(), &args);
    let conv = cl.converter_addr_v4();
    let elapsed = cl
        .lab
        .gateway
        .enter(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(conv).unwrap();
            // Half a header, then silence.
            s.write_all(&[1, 6]).unwrap();
            let t = Instant::now();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 16];
            let r = s.read(&mut b);
            assert!(
                matches!(&r, Ok(0))
                    || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{r:?}"
            );
            t.elapsed()
        })
        .unwrap();
    let _ = std::fs::remove_file(&cfg);
    assert!(
        elapsed >= Duration::from_millis(400),
        "dropped too early: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(3), "not dropped: {elapsed:?}");
    assert!(eventually(|| cl.log_text().contains("handshake_timeout")));
}

#[test]
fn sigterm_stops_accepting_and_drains() {
    let cl_args = default_converter_args();
    let mut cl = ConverterLab::new(shaped([20_000_000, 20_000_000]), &cl_args);
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let (conv, dest) = (cl.converter_addr_v4(), server_v4(&cl, HASH_PORT));
    // A 4 MiB download takes ~1 s on 2 × 20 Mbit/s: SIGTERM lands in the middle of it.
    let gw = cl.lab.gateway.clone();
    let transfer = std::thread::spawn(move || {
        in_ns(&gw, || async move {
            converted_exchange(conv, dest, 1000, 4 << 20, 0, &ClientOptions::default()).await
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    cl.converter
        .as_mut()
        .unwrap()
        .signal(Signal::SIGTERM)
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // New connections are refused while the old one drains.
    let refused = in_ns(&cl.lab.gateway, || async move {
        client::connect(conv, dest, None, b"", &ClientOptions::default())
            .await
            .is_err()
    });
    assert!(refused, "accepted a connection after SIGTERM");
    assert_eq!(
        transfer.join().unwrap(),
        Ok(true),
        "draining connection broke"
    );
    let status = cl
        .converter
        .as_mut()
        .unwrap()
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "converter did not exit cleanly: {status:?}"
    );
    assert!(cl.log_text().contains("draining"));
}

#[test]
fn bulk_200_mib_each_way_over_two_subflows() {
    let cl = ConverterLab::new(
        shaped([400_000_000, 600_000_000]),
        &default_converter_args(),
    );
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let (conv, dest) = (cl.converter_addr_v4(), server_v4(&cl, HASH_PORT));
    let r = in_ns(&cl.lab.gateway, || async move {
        converted_exchange(
            conv,
            dest,
            200 << 20,
            200 << 20,
            1000,
            &ClientOptions::default(),
        )
        .await
    });
    assert_eq!(r, Ok(true));
    // The converter logs the connection once both directions are closed, just after the
    // client is done: give it a moment.
    let closed_with_two_subflows = || {
        cl.log_text()
            .lines()
            .any(|l| l.contains("connection closed") && l.contains("subflows=2"))
    };
    if !eventually(closed_with_two_subflows) {
        let mptcp = |ns: &braid_lab::Netns| {
            let mut v: Vec<_> = counters(ns)
                .into_iter()
                .filter(|(k, v)| k.starts_with("MPTcp") && *v > 0)
                .collect();
            v.sort();
            v
        };
        panic!(
            "no connection with 2 subflows in the log\ngateway MPTCP counters: {:?}\n\
             converter MPTCP counters: {:?}\nlog:\n{}",
            mptcp(&cl.lab.gateway),
            mptcp(&cl.lab.converter),
            cl.log_text()
        );
    }
}

#[test]
fn a_thousand_concurrent_connections() {
    let cl = ConverterLab::new(StandardConfig::by_hand(), &default_converter_args());
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let (conv, dest) = (cl.converter_addr_v4(), server_v4(&cl, HASH_PORT));
    let failures = in_ns(&cl.lab.gateway, || async move {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let opts = ClientOptions {
                        rcvbuf: None,
                        ..ClientOptions::default()
                    };
                    let early = early_data(4096, i, i + 1, 0);
                    let c = client::connect(conv, dest, None, &early, &opts)
                        .await
                        .map_err(|e| e.to_string())?;
                    // All 1000 are open at the same time before any finishes.
                    barrier.wait().await;
                    hash_exchange(c.stream, c.leftover, 4096, i + 1, 16, 4096, i).await
                })
            })
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                failures.push(e);
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
}

#[test]
fn metrics_and_json_logs_report_each_connection() {
    let mut args = default_converter_args();
    for a in ["--metrics", "127.0.0.1:9124", "--log-format", "json"] {
        args.push(a.into());
    }
    let cl = ConverterLab::new(StandardConfig::by_hand(), &args);
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let (conv, dest) = (cl.converter_addr_v4(), server_v4(&cl, HASH_PORT));
    let r = in_ns(&cl.lab.gateway, || async move {
        converted_exchange(conv, dest, 1000, 2000, 100, &ClientOptions::default()).await
    });
    assert_eq!(r, Ok(true));
    let _ = raw_exchange(&cl, vec![1, 1, 0x22, 0x64]);
    std::thread::sleep(Duration::from_millis(200));
    let body = cl
        .lab
        .converter
        .run(["curl", "-sf", "http://127.0.0.1:9124/metrics"])
        .expect("metrics endpoint");
    for want in [
        "braid_converter_connections_total{outcome=\"closed\"} 1",
        "braid_converter_connections_total{outcome=\"malformed\"} 1",
        "braid_converter_errors_total{code=\"1\"} 1",
        "braid_converter_bytes_total{direction=\"up\"} 1016",
        "braid_converter_bytes_total{direction=\"down\"} 2032",
        "braid_converter_active_connections 0",
        // Two small exchanges never fill a bounded send buffer.
        "braid_converter_mptcp_ack_nudges_total 0",
    ] {
        assert!(body.contains(want), "missing {want:?} in:\n{body}");
    }
    eventually(|| cl.log_text().matches("\"connection closed\"").count() >= 2);
    let closed: Vec<String> = cl
        .log_text()
        .lines()
        .filter(|l| l.contains("\"connection closed\""))
        .map(String::from)
        .collect();
    assert_eq!(closed.len(), 2, "{closed:?}");
    for key in [
        "\"client\"",
        "\"dest\"",
        "\"up\"",
        "\"down\"",
        "\"duration_ms\"",
        "\"subflows\"",
        "\"tcp_fallback\"",
        "\"outcome\"",
    ] {
        assert!(closed[0].contains(key), "{key} missing in {}", closed[0]);
    }
}

#[test]
fn check_config_names_the_bad_key() {
    let bin = env!("CARGO_BIN_EXE_braid");
    let dir = std::env::temp_dir();
    let bad = dir.join(format!("braid-bad-{}.toml", std::process::id()));
    std::fs::write(&bad, "allow_client = [\"10.0.0.0/8\", \"300.1.1.1\"]\n").unwrap();
    let out = std::process::Command::new(bin)
        .args(["converter", "--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allow_client[1]") && err.contains("300.1.1.1"),
        "{err}"
    );

    std::fs::write(
        &bad,
        "allow_client = [\"10.0.0.0/8\"]\nlisten = [\"[::]:6000\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["converter", "--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bad);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

/// A plain TCP server in `ns` on `port` that answers "pong" to each connection's first 4
/// bytes and records, per connection that sent anything, how many bytes it received.
struct CountingServer {
    seen: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _thread: braid_lab::NsThread<()>,
}

impl CountingServer {
    fn start(ns: &braid_lab::Netns, port: u16) -> CountingServer {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let l = ns
            .enter(move || std::net::TcpListener::bind(("0.0.0.0", port)).unwrap())
            .unwrap();
        l.set_nonblocking(true).unwrap();
        let thread = ns
            .thread(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let (seen, stop) = (seen2.clone(), stop2.clone());
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        let (mut got, mut buf, mut answered) = (0u64, [0u8; 4096], false);
                        let slot = {
                            let mut v = seen.lock().unwrap();
                            v.push(0);
                            v.len() - 1
                        };
                        while !stop.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => got += n as u64,
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => break,
                            }
                            seen.lock().unwrap()[slot] = got;
                            if got >= 4 && !answered {
                                answered = s.write_all(b"pong").is_ok();
                            }
                        }
                    });
                }
            })
            .unwrap();
        CountingServer {
            seen,
            stop,
            _thread: thread,
        }
    }

    /// Bytes received by each connection that received any.
    fn with_data(&self) -> Vec<u64> {
        let v = self.seen.lock().unwrap();
        v.iter().copied().filter(|n| *n > 0).collect()
    }
}

impl Drop for CountingServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A converted connection to a [`CountingServer`] with "ping" in the SYN; returns the stream
/// and the server's 4-byte answer (within 10 s).
async fn ping(
    conv: SocketAddr,
    dest: SocketAddr,
    opts: &ClientOptions,
) -> Result<(tokio::net::TcpStream, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    let mut c = client::connect(conv, dest, None, b"ping", opts)
        .await
        .map_err(|e| e.to_string())?;
    let mut got = c.leftover.clone();
    while got.len() < 4 {
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), c.stream.read(&mut b))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".to_string());
        }
        got.extend_from_slice(&b[..n]);
    }
    Ok((c.stream, got))
}

/// A gateway whose SYN reached the converter while the answer was lost (an uplink that sends
/// and does not receive) gets its connection from the next uplink. The converter holds the
/// first attempt too, its handshake never complete: the request it carried must not reach the
/// server from there (twice in all: a POST done twice), only from the attempt that won.
#[test]
fn a_request_whose_handshake_never_completes_is_not_delivered() {
    const PORT: u16 = 7090;
    let cl = ConverterLab::new(StandardConfig::by_hand(), &default_converter_args());
    let server = CountingServer::start(&cl.lab.server, PORT);
    // Uplink 1 loses everything the converter sends on it.
    cl.lab
        .converter
        .nft(&format!(
            "table inet lost_answers {{ chain out {{ type filter hook output priority 0; \
             oifname \"{}\" drop; }}; }}",
            cl.lab.uplinks[0].converter_if
        ))
        .unwrap();
    let conv = cl.converter_addr_v4();
    let dest = server_v4(&cl, PORT);
    let sources = vec![
        cl.lab.uplinks[0].gateway_v4.into(),
        cl.lab.uplinks[1].gateway_v4.into(),
    ];
    let start = Instant::now();
    let answer = in_ns(&cl.lab.gateway, || async move {
        let opts = ClientOptions {
            sources,
            attempt_delay: Duration::from_millis(300),
            ..ClientOptions::default()
        };
        let (_held, got) = ping(conv, dest, &opts).await?;
        // Held open past the converter's wait for the lost attempt's handshake.
        tokio::time::sleep(Duration::from_secs(7).saturating_sub(start.elapsed())).await;
        Ok::<_, String>(got)
    });
    assert_eq!(answer, Ok(b"pong".to_vec()));
    assert_eq!(
        server.with_data(),
        vec![4],
        "the request reached the server more than once"
    );
    assert!(
        eventually(|| cl.log_text().contains("handshake_incomplete")),
        "{}",
        cl.log_text()
    );

    // A handshake that is only slow (the answers lost for 1.5 s, then through: the client's
    // next SYN at 3 s draws one) is served, its request delivered once.
    let uplink1 = cl.lab.uplinks[0].gateway_v4;
    let slow = in_ns_thread(&cl.lab.gateway, move || async move {
        let opts = ClientOptions {
            bind: Some((uplink1, 0).into()),
            ..ClientOptions::default()
        };
        ping(conv, dest, &opts).await.map(|(_, got)| got)
    });
    std::thread::sleep(Duration::from_millis(1500));
    cl.lab
        .converter
        .nft("delete table inet lost_answers")
        .unwrap();
    assert_eq!(slow.join().unwrap(), Ok(b"pong".to_vec()));
    assert_eq!(server.with_data(), vec![4, 4]);
}
