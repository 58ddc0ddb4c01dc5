//! Refusals every RFC 8803 client reads, and limits that keep one client from starving the
//! others: real `braid converter` processes in the lab, clients written the way independent
//! Convert clients are (the request in the SYN, then whatever the application does).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use braid_lab::StandardConfig;
use braid_proto::convert::{self, ErrorCode};
use braid_sys::{FastOpen, SocketSpec};
use common::*;

/// What an application does right after its `connect()` was turned into a Convert connection.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Writes its request, then reads (HTTP, most clients). An application's "right after"
    /// varies with what it does in between (TLS set-up, its own scheduling), so each try
    /// pauses a little longer, from nothing to beyond the time the Error takes to arrive.
    WriteThenRead,
    /// Reads at once (a server-speaks-first protocol, or a SOCKS-style wait).
    ReadAtOnce,
    /// Writes a large request (an upload) before reading.
    LargeRequest,
    /// Writes its request and half-closes, then reads.
    HalfClose,
    /// Writes its request, reads, and on the Error closes with a reset at once, as RFC 8803
    /// clients do (libconvert, braid's own gateway).
    ResetAfterError,
    /// A plain TCP client (no MPTCP, as an LD_PRELOAD client on an unmodified application is)
    /// that reads at once.
    TcpReadAtOnce,
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";

/// One connection of `shape` through the converter at `conv` to `dest`: the Convert request
/// goes in the SYN (as every RFC 8803 client sends it), then the application's part. Returns
/// the Error code read, once the whole Error message arrived and the connection then ended;
/// a failed write, a reset before the Error, or a hang is an `Err` saying so.
fn refused_as(
    conv: SocketAddr,
    dest: SocketAddr,
    shape: Shape,
    pause: Duration,
) -> Result<ErrorCode, String> {
    let spec = SocketSpec {
        mptcp: !matches!(shape, Shape::TcpReadAtOnce),
        fast_open: Some(FastOpen::ConnectNoCookie),
        ..SocketSpec::default()
    };
    let s = spec.open_for(conv).map_err(|e| e.to_string())?;
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    match s.connect(&conv.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(format!("connect: {e}")),
    }
    let mut s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&convert::encode_connect_request(dest, None))
        .map_err(|e| format!("sending the Convert request: {e}"))?;
    std::thread::sleep(pause);
    let app = match shape {
        Shape::WriteThenRead | Shape::HalfClose | Shape::ResetAfterError => s.write_all(REQUEST),
        Shape::ReadAtOnce | Shape::TcpReadAtOnce => Ok(()),
        Shape::LargeRequest => s.write_all(&vec![b'x'; 256 * 1024]),
    };
    app.map_err(|e| format!("the application's write failed: {e}"))?;
    if let Shape::HalfClose = shape {
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))?;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    if let Shape::ResetAfterError = shape {
        let want = convert::error_reply(ErrorCode::ConnectionReset, &[0]);
        got.resize(want.len(), 0);
        s.read_exact(&mut got)
            .map_err(|e| format!("reading the Error: {e}"))?;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        return match convert::decode_reply(&got) {
            Ok(convert::Decoded::Complete { value, .. }) => {
                value.error().map(|e| e.code).ok_or("not an Error".into())
            }
            _ => Err(format!("no Error: {got:02x?}")),
        };
    }
    let ended = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(e) => return Err(format!("reading after {} bytes: {e}", got.len())),
        }
    };
    match convert::decode_reply(&got) {
        Ok(convert::Decoded::Complete { value, consumed }) if consumed == got.len() => value
            .error()
            .map(|e| e.code)
            .ok_or_else(|| format!("a success reply, not an Error ({ended})")),
        _ => Err(format!("no complete Error before the {ended}: {got:02x?}")),
    }
}

/// `tries` connections of `shape`, ten at a time, the application pausing 0 to `max_pause`
/// before its part; panics with every failure unless all read `want`.
fn all_read(
    ns: &braid_lab::Netns,
    conv: SocketAddr,
    dest: SocketAddr,
    shape: Shape,
    want: ErrorCode,
    tries: usize,
    max_pause: Duration,
) {
    let fallbacks_before = counter(ns, "MPTcpExtMPCapableDataFallback");
    let failures: Vec<String> = ns
        .enter(move || {
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..10)
                    .map(|_| {
                        s.spawn(move || {
                            let steps = (tries / 10).max(1) as u32;
                            (0..steps)
                                .map(|i| max_pause * i / steps)
                                .filter_map(|pause| match refused_as(conv, dest, shape, pause) {
                                    Ok(code) if code == want => None,
                                    Ok(code) => Some(format!("Error {code}")),
                                    Err(e) => Some(e),
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap())
                    .collect()
            })
        })
        .unwrap();
    // The kernel's own failure, told apart by its counter (docs/architecture.md, kernel
    // workarounds): the client fell back to TCP when data came without a DSS mapping while the
    // converter stayed MPTCP, and each MPTCP-level retransmission of the Error reached the
    // client as new bytes. The Error arrives whole, repeated; nothing braid sends or can see
    // differs.
    let kernel_fallbacks = counter(ns, "MPTcpExtMPCapableDataFallback") - fallbacks_before;
    let want_reply = convert::error_reply(want, &[0]);
    let repeated = |f: &String| {
        f.starts_with("no complete Error")
            && f.contains(
                &format!("{:02x?}", want_reply)
                    .trim_matches(['[', ']'])
                    .to_string(),
            )
    };
    let explained = failures.iter().filter(|f| repeated(f)).count() as u64;
    if !failures.is_empty() && explained == failures.len() as u64 && kernel_fallbacks >= explained {
        eprintln!(
            "{shape:?} to {dest}: {explained} of {tries} read the Error repeated after the \
             client's MPTCP fell back (MPCapableDataFallback +{kernel_fallbacks}): the kernel's \
             duplicate delivery, counted, not braid's: {failures:?}"
        );
        return;
    }
    assert!(
        failures.is_empty(),
        "{shape:?} to {dest} (Error {want}): {} of {tries} failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        mptcp_counters()
    );
}

/// The MPTCP counters that are not zero in every namespace of this test process (a reply read
/// twice is the kernel's: they say whether a side fell back, or dropped duplicates).
fn mptcp_counters() -> String {
    let mine = format!("blab-{}-", std::process::id());
    braid_lab::lab_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&mine))
        .map(|n| {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &n, "nstat", "-az"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = out
                .lines()
                .filter(|l| l.starts_with("MPTcp"))
                .filter(|l| l.split_whitespace().nth(1).is_some_and(|v| v != "0"))
                .collect();
            format!("--- {n}:\n{}", lines.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Converter flags that make each of the four errors reachable: 96 (a closed port), 97 (a
/// destination the converter has no route to), 32 (a denied destination), 1 (multicast).
fn converter_args() -> Vec<String> {
    let mut args = default_converter_args();
    for a in [
        "--allow-client",
        "127.0.0.0/8",
        "--deny-dest",
        "10.2.0.99/32",
        "--allow-dest",
        "10.4.0.0/16",
    ] {
        args.push(a.into());
    }
    args
}

fn destinations(cl: &ConverterLab) -> [(SocketAddr, ErrorCode); 4] {
    cl.lab
        .converter
        .ip(&["route", "add", "unreachable", "10.4.0.0/24"])
        .unwrap();
    [
        ((cl.lab.server_v4(), 9).into(), ErrorCode::ConnectionReset),
        (
            ([10, 4, 0, 1], 80).into(),
            ErrorCode::DestinationUnreachable,
        ),
        (([10, 2, 0, 99], 80).into(), ErrorCode::NotAuthorized),
        (([224, 0, 0, 1], 80).into(), ErrorCode::MalformedMessage),
    ]
}

/// 100 tries of [`Shape::WriteThenRead`] for each of the four errors, from `ns`.
fn every_error_read_by_a_client_that_writes_first(
    cl: &ConverterLab,
    ns: &braid_lab::Netns,
    conv: SocketAddr,
    pause: Duration,
) {
    for (dest, code) in destinations(cl) {
        all_read(ns, conv, dest, Shape::WriteThenRead, code, 100, pause);
    }
}

#[test]
fn a_client_that_writes_first_reads_every_error_on_loopback() {
    let cl = ConverterLab::new(StandardConfig::by_hand(), &converter_args());
    let conv: SocketAddr = ([127, 0, 0, 1], CONVERTER_PORT).into();
    let pause = Duration::from_millis(5);
    every_error_read_by_a_client_that_writes_first(&cl, &cl.lab.converter, conv, pause);
    // The other shapes, to the closed port.
    let closed: SocketAddr = (cl.lab.server_v4(), 9).into();
    for shape in [Shape::ReadAtOnce, Shape::LargeRequest, Shape::HalfClose] {
        all_read(
            &cl.lab.converter,
            conv,
            closed,
            shape,
            ErrorCode::ConnectionReset,
            30,
            pause,
        );
    }
}

/// The longest `duration_ms` of the converter's close lines in `log`.
fn slowest_close(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("connection closed"))
        .filter_map(|l| {
            l.split("duration_ms=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn one_flooding_client_does_not_starve_the_others() {
    let mut args = default_converter_args();
    let cfg = std::env::temp_dir().join(format!("braid-flood-{}.toml", std::process::id()));
    std::fs::write(&cfg, "backoff_secs = 7\nhandshake_timeout_ms = 8000\n").unwrap();
    args.extend(["--config".into(), cfg.display().to_string()]);
    let mut cl = ConverterLab::new(StandardConfig::by_hand(), &args);
    let _ = std::fs::remove_file(&cfg);
    let _srv = HashServer::start(&cl.lab.server, HASH_PORT);
    let pid = cl.converter.as_mut().unwrap().pid();
    let rss_kib = |pid| braid_lab::process::rss_kib(pid).unwrap_or(0);
    let conv = cl.converter_addr_v4();
    let dest: SocketAddr = (cl.lab.server_v4(), HASH_PORT).into();
    // The flood comes from uplink 1's address; the normal client from uplink 2's, another /24.
    let flood_src = cl.lab.uplinks[0].gateway_v4;
    let normal_src: SocketAddr = (cl.lab.uplinks[1].gateway_v4, 0).into();
    // Twice the default limit of pending handshakes (4096), all from one address.
    const FLOOD: usize = 8192;
    braid::daemon::raise_fd_limit();

    let rss_before = rss_kib(pid);
    let (flood, served_in, peak_rss) = cl
        .lab
        .gateway
        .enter(move || {
            // Each slow client sends the first byte of a Convert header and holds.
            let mut flood = Vec::with_capacity(FLOOD);
            for _ in 0..FLOOD {
                let spec = SocketSpec {
                    bind: Some((flood_src, 0).into()),
                    ..SocketSpec::default()
                };
                let s = spec.open_for(conv).unwrap();
                s.set_nonblocking(false).unwrap();
                if s.connect(&conv.into()).is_err() {
                    continue;
                }
                let _ = s.send(&[1]);
                s.set_nonblocking(true).unwrap();
                flood.push(std::net::TcpStream::from(s));
            }
            let peak_rss = rss_kib(pid);
            // During the flood, a normal client elsewhere is served at once.
            let t = Instant::now();
            let opts = braid::client::ClientOptions {
                bind: Some(normal_src),
                ..braid::client::ClientOptions::default()
            };
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(converted_exchange(conv, dest, 1000, 1000, 100, &opts));
            assert!(served.is_ok(), "normal client refused: {served:?}");
            (flood, t.elapsed(), peak_rss.max(rss_kib(pid)))
        })
        .unwrap();
    assert!(
        served_in < Duration::from_secs(1),
        "the normal client took {served_in:?}"
    );
    // What the flood got: most were refused with Error 64 and the back-off, a share is held.
    let (mut error_64, mut held) = (0, 0);
    let want = convert::error_reply(ErrorCode::ResourceExceeded, &[7]);
    for mut s in flood.iter() {
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(n) if buf[..n].starts_with(&want) => error_64 += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => held += 1,
            _ => {}
        }
    }
    drop(flood);
    eprintln!(
        "flood of {FLOOD}: {held} held, {error_64} read Error 64; converter RSS {rss_before} \
         KiB before, {peak_rss} KiB at the peak"
    );
    assert!(held <= 256, "one prefix held {held} pending handshakes");
    assert!(error_64 > FLOOD / 2, "only {error_64} read Error 64 (7 s)");
    assert!(
        peak_rss < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {peak_rss} KiB"
    );
    assert!(
        cl.log_text().contains("pending_per_prefix limit reached"),
        "the limit is not in the log"
    );
}

#[test]
fn a_client_that_writes_first_reads_every_error_across_a_delayed_link() {
    // 20 ms each way and a shaped rate on both uplinks: a WAN, where the Error, the reset of
    // old and the application's write cross in flight.
    let config = StandardConfig {
        rates: Some(vec![20_000_000, 30_000_000]),
        delays: Some(vec![braid_lab::Delay::ms(20), braid_lab::Delay::ms(20)]),
        ..StandardConfig::by_hand()
    };
    let cl = ConverterLab::new(config, &converter_args());
    let conv = cl.converter_addr_v4();
    // Pauses up to four round trips: the write lands before the Error, with it, and after
    // the reset an Error used to be followed by (about two and a half round trips in).
    let pause = Duration::from_millis(160);
    every_error_read_by_a_client_that_writes_first(&cl, &cl.lab.gateway, conv, pause);
    // A refused small request is over in a few round trips: the client reads the Error and
    // closes, and the converter lets go at once.
    let slowest = cl
        .log_text()
        .lines()
        .filter(|l| l.contains("connection closed"))
        .filter_map(|l| {
            l.split("duration_ms=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(slowest < 1000, "a refusal took {slowest} ms");
    let closed: SocketAddr = (cl.lab.server_v4(), 9).into();
    // A client that resets as soon as it has the Error lets the converter go at once too.
    let before = cl.log_text().len();
    all_read(
        &cl.lab.gateway,
        conv,
        closed,
        Shape::ResetAfterError,
        ErrorCode::ConnectionReset,
        50,
        Duration::ZERO,
    );
    let log = cl.log_text();
    let slowest = slowest_close(&log[before..]);
    assert!(
        slowest < 1000,
        "a refusal to a resetting client took {slowest} ms"
    );
    for shape in [
        Shape::ReadAtOnce,
        Shape::TcpReadAtOnce,
        Shape::LargeRequest,
        Shape::HalfClose,
    ] {
        all_read(
            &cl.lab.gateway,
            conv,
            closed,
            shape,
            ErrorCode::ConnectionReset,
            20,
            pause,
        );
    }
}
