//! `braid doctor`: what stands between this machine and working bonding, each finding with
//! the one thing to do about it. The judgements are plain functions over what was read
//! (sysctl values, routes, endpoints, the outcome of a probe connection), tested without
//! root; [`gateway`] and [`converter`] read the machine and print.
//!
//! The path check is the one no configuration file shows: a connection to the converter from
//! each uplink, MPTCP with the Convert request in the SYN, as the gateway opens them. A
//! middlebox that removes the MPTCP option makes the connection fall back to plain TCP (it
//! works, on one link); one that drops SYN data costs every connection a round trip (the
//! request is sent again after the handshake); both are seen on that socket
//! (`TCP_IS_MPTCP`, `tcpi_options`). Where the option goes missing is then traced like a
//! traceroute, with SYNs of growing TTL whose "time exceeded" quotes show the option or not.

use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use braid_proto::convert;
use braid_sys::sockopt::{TCPI_OPT_SYN_DATA, is_mptcp, mptcp_subflows};
use braid_sys::{FastOpen, SocketSpec};
use serde::Serialize;

/// A finding's weight: only `Fail` makes the exit code non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do, when there is something to do.
    pub fix: Option<String>,
}

impl Finding {
    fn pass(check: &str, detail: impl Into<String>) -> Finding {
        Finding {
            check: check.into(),
            verdict: Verdict::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn bad(
        check: &str,
        verdict: Verdict,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            verdict,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.verdict {
            Verdict::Pass => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "[{mark}] {:<14} {}", self.check, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n       fix: {fix}")?;
        }
        Ok(())
    }
}

/// `net.mptcp.enabled` (`None`: the file does not exist: no MPTCP in this kernel).
pub fn mptcp_enabled(value: Option<&str>, kernel: &str) -> Finding {
    match value {
        None => Finding::bad(
            "mptcp",
            Verdict::Fail,
            format!("this kernel ({kernel}) has no MPTCP"),
            "a kernel built with CONFIG_MPTCP=y (Linux 5.19 or later recommended: Debian 12's 6.1 has it)",
        ),
        Some("0") => Finding::bad(
            "mptcp",
            Verdict::Fail,
            "MPTCP is disabled in this network namespace (net.mptcp.enabled = 0)",
            "sysctl -w net.mptcp.enabled=1",
        ),
        Some(_) => Finding::pass("mptcp", "enabled"),
    }
}

/// `net.mptcp.pm_type`: braid drives the in-kernel path manager (0).
pub fn pm_type(value: Option<&str>) -> Finding {
    match value {
        Some("1") => Finding::bad(
            "path manager",
            Verdict::Fail,
            "the userspace path manager is selected (net.mptcp.pm_type = 1): braid's endpoints \
             would be ignored (mptcpd or another daemon owns the subflows)",
            "sysctl -w net.mptcp.pm_type=0, or stop the other path manager",
        ),
        _ => Finding::pass("path manager", "in-kernel (pm_type 0)"),
    }
}

/// `net.ipv4.tcp_fastopen` on a gateway: the client bit (0x1). braid asks for cookie-less
/// Fast Open per socket, so 0x4 is not needed.
pub fn tfo_client(value: u32) -> Finding {
    if value & 0x1 != 0 {
        Finding::pass(
            "fast open",
            format!("client bit set (net.ipv4.tcp_fastopen = {value:#x})"),
        )
    } else {
        Finding::bad(
            "fast open",
            Verdict::Fail,
            format!(
                "the client bit of net.ipv4.tcp_fastopen is off ({value:#x}): every connection \
                 costs a round trip more (the request waits for the handshake)"
            ),
            format!("sysctl -w net.ipv4.tcp_fastopen={}", value | 0x1),
        )
    }
}

/// `net.ipv4.tcp_fastopen` on a converter: the server bit (0x2), which braid sets at start.
pub fn tfo_server(value: u32) -> Finding {
    if value & 0x2 != 0 {
        Finding::pass(
            "fast open",
            format!("server bit set (net.ipv4.tcp_fastopen = {value:#x})"),
        )
    } else {
        Finding::bad(
            "fast open",
            Verdict::Warn,
            format!(
                "the server bit of net.ipv4.tcp_fastopen is off ({value:#x}); braid converter \
                 sets it at start (unless set_sysctls = false), without it every request falls \
                 back to TCP"
            ),
            format!("sysctl -w net.ipv4.tcp_fastopen={}", value | 0x2),
        )
    }
}

/// An uplink as found: an interface with a default route, its global addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UplinkFound {
    pub interface: String,
    pub addresses: Vec<IpAddr>,
    pub gateway: Option<IpAddr>,
    /// `rp_filter` in effect on it: the larger of `all` and the interface's.
    pub rp_filter: u32,
}

pub fn uplinks(found: &[UplinkFound]) -> Finding {
    if found.is_empty() {
        return Finding::bad(
            "uplinks",
            Verdict::Fail,
            "no interface has a default route: nothing to bond",
            "connect the uplinks (each needs a default route, in any table braid can see), or \
             list them in [[uplink]]",
        );
    }
    let list: Vec<String> = found
        .iter()
        .map(|u| {
            format!(
                "{} ({}{})",
                u.interface,
                if u.addresses.is_empty() {
                    "no address".to_string()
                } else {
                    u.addresses
                        .iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                u.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
            )
        })
        .collect();
    if found.len() == 1 {
        Finding::bad(
            "uplinks",
            Verdict::Warn,
            format!("one uplink: {}", list[0]),
            "bonding needs two: connect the second (each with its default route)",
        )
    } else {
        Finding::pass("uplinks", format!("{}: {}", found.len(), list.join("; ")))
    }
}

/// Strict reverse-path filtering (1) on an uplink drops what arrives on it for an address the
/// routing table would reach through another uplink. The gateway sets loose (2) on its
/// uplinks while it runs, and puts the old value back at exit.
pub fn rp_filter(found: &[UplinkFound], gateway_running: bool) -> Finding {
    let strict: Vec<&str> = found
        .iter()
        .filter(|u| u.rp_filter == 1)
        .map(|u| u.interface.as_str())
        .collect();
    if strict.is_empty() {
        return Finding::pass("rp_filter", "no uplink filters strictly");
    }
    let fix = strict
        .iter()
        .map(|i| format!("sysctl -w net.ipv4.conf.{i}.rp_filter=2"))
        .collect::<Vec<_>>()
        .join("; ");
    Finding::bad(
        "rp_filter",
        if gateway_running {
            Verdict::Fail
        } else {
            Verdict::Warn
        },
        format!(
            "strict reverse-path filtering on {}{}",
            strict.join(", "),
            if gateway_running {
                " although braid gateway runs (something set it back)"
            } else {
                " (braid gateway sets it to loose while it runs)"
            }
        ),
        fix,
    )
}

/// The MPTCP endpoints against the uplinks: without a `subflow` endpoint on a second uplink,
/// connections stay on one link.
pub fn endpoints(
    subflow_endpoints: &[IpAddr],
    found: &[UplinkFound],
    gateway_running: bool,
) -> Finding {
    let uplink_addrs: Vec<IpAddr> = found.iter().flat_map(|u| u.addresses.clone()).collect();
    let covered = uplink_addrs
        .iter()
        .filter(|a| subflow_endpoints.contains(a))
        .count();
    if covered > 0 {
        return Finding::pass(
            "endpoints",
            format!("{covered} uplink address(es) have a subflow endpoint"),
        );
    }
    if gateway_running {
        Finding::bad(
            "endpoints",
            Verdict::Fail,
            "braid gateway runs but no uplink address has an MPTCP subflow endpoint: \
             connections use one link",
            "look at `braid status` (are the uplinks dead or down?) and the gateway's log; with \
             manage_uplinks = false, add them: ip mptcp endpoint add ADDR dev IF subflow",
        )
    } else {
        Finding::bad(
            "endpoints",
            Verdict::Warn,
            "no MPTCP subflow endpoint on any uplink address: connections would use one link",
            "start braid gateway (it adds them), or add them by hand: ip mptcp endpoint add ADDR \
             dev IF subflow",
        )
    }
}

/// What a probe connection to the converter showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathProbe {
    /// No handshake (timeout, refused, unreachable).
    Unreachable(String),
    Connected {
        /// The connection stayed MPTCP (false: the MP_CAPABLE option did not come back).
        mptcp: bool,
        /// The SYN-ACK acknowledged the data in our SYN.
        syn_data_acked: bool,
        /// A whole Convert reply arrived (an Error counts: the converter read the request).
        replied: bool,
        rtt: Duration,
    },
}

pub fn path(from: &str, converter: SocketAddr, p: &PathProbe) -> Finding {
    let check = format!("path {from}");
    match p {
        PathProbe::Unreachable(why) => Finding::bad(
            &check,
            Verdict::Fail,
            format!("no connection to {converter}: {why}"),
            "is the converter running and its port open (a firewall on the VPS)? `braid doctor \
             converter` on it says",
        ),
        PathProbe::Connected { mptcp: false, .. } => Finding::bad(
            &check,
            Verdict::Fail,
            format!(
                "to {converter}: the MPTCP option was removed on the way (the connection fell \
                 back to plain TCP): connections from this uplink cannot be bonded"
            ),
            "a middlebox on this uplink strips TCP options (a carrier-grade NAT or a \
             \"TCP optimiser\"): try the converter on another port (443), or ask the provider",
        ),
        PathProbe::Connected { replied: false, .. } => Finding::bad(
            &check,
            Verdict::Fail,
            format!(
                "to {converter}: MPTCP works but no Convert reply came: is it a braid converter?"
            ),
            "check the address and port",
        ),
        PathProbe::Connected {
            syn_data_acked: false,
            rtt,
            ..
        } => Finding::bad(
            &check,
            Verdict::Warn,
            format!(
                "to {converter}: MPTCP and Convert work ({:.1} ms), but the request did not \
                 ride in the SYN (Fast Open data dropped or refused): a round trip more per \
                 connection",
                rtt.as_secs_f64() * 1e3
            ),
            "the converter's server bit of net.ipv4.tcp_fastopen, or a middlebox that drops SYN \
             data on this uplink",
        ),
        PathProbe::Connected { rtt, .. } => Finding::pass(
            &check,
            format!(
                "to {converter}: MPTCP, request in the SYN, reply in {:.1} ms",
                rtt.as_secs_f64() * 1e3
            ),
        ),
    }
}

/// A hop of a TTL-limited trace towards the converter: the router that said "time exceeded",
/// and whether the SYN it quoted still carried the MPTCP option (`None`: the quote stops
/// before the TCP options, as RFC 792 allows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub ttl: u8,
    pub router: IpAddr,
    pub mptcp: Option<bool>,
}

/// Where the option went, from the hops' quotes: after the last hop that still saw it.
pub fn locate(hops: &[Hop]) -> String {
    let last_with = hops.iter().rposition(|h| h.mptcp == Some(true));
    let first_without = hops.iter().position(|h| h.mptcp == Some(false));
    match (last_with, first_without) {
        (_, Some(0)) => format!(
            "already gone at the first hop ({}): this machine or its own link strips it (a local firewall rule?)",
            hops[0].router
        ),
        (Some(i), Some(j)) if j == i + 1 => format!(
            "present at hop {} ({}), gone at hop {} ({}): stripped between them",
            hops[i].ttl, hops[i].router, hops[j].ttl, hops[j].router
        ),
        (Some(i), None) => format!(
            "present at hop {} ({}), the last that answered before the converter: stripped after it",
            hops[i].ttl, hops[i].router
        ),
        _ if hops.is_empty() => {
            "no router on the way answered a TTL-limited SYN: the hop is not known".into()
        }
        _ => "the routers' quotes do not say where".into(),
    }
}

/// A gateway's MPTCP limits against its uplinks: a connection opens at most `subflows` extra
/// subflows. braid gateway raises them (to 8) while it runs and puts them back at exit.
pub fn gateway_limits(subflows: u32, uplinks: usize, gateway_running: bool) -> Finding {
    let needed = uplinks.saturating_sub(1) as u32;
    if subflows >= needed {
        return Finding::pass(
            "limits",
            format!("up to {subflows} extra subflows per connection"),
        );
    }
    Finding::bad(
        "limits",
        if gateway_running {
            Verdict::Fail
        } else {
            Verdict::Warn
        },
        format!(
            "MPTCP subflows limit {subflows} for {uplinks} uplinks: connections cannot use them \
             all{}",
            if gateway_running {
                " although braid gateway runs (something set them back)"
            } else {
                " (braid gateway raises it while it runs)"
            }
        ),
        "ip mptcp limits set subflows 8 add_addr_accepted 8",
    )
}

/// A converter's MPTCP limits: joins beyond `subflows` are refused.
pub fn converter_limits(subflows: u32) -> Finding {
    if subflows == 0 {
        Finding::bad(
            "limits",
            Verdict::Fail,
            "MPTCP subflows limit 0: every join is refused, connections stay on one link",
            "start braid converter with --mptcp-subflows 8, or: ip mptcp limits set subflows 8 \
             add_addr_accepted 8",
        )
    } else {
        Finding::pass(
            "limits",
            format!("up to {subflows} extra subflows per connection"),
        )
    }
}

pub fn listener(port: u16, listening: bool) -> Finding {
    if listening {
        Finding::pass("listener", format!("something accepts on port {port}"))
    } else {
        Finding::bad(
            "listener",
            Verdict::Fail,
            format!("nothing listens on port {port}"),
            "systemctl start braid-converter (journalctl -u braid-converter says why it stopped)",
        )
    }
}

pub fn window_fix(port: u16, present: bool, listening: bool) -> Finding {
    match (present, listening) {
        (true, _) => Finding::pass(
            "window fix",
            format!("nft table inet braid_tfo_{port} in place"),
        ),
        (false, false) => Finding::pass("window fix", "not needed while nothing listens"),
        (false, true) => Finding::bad(
            "window fix",
            Verdict::Warn,
            format!(
                "no nft table inet braid_tfo_{port}: downloads on 0-RTT connections with two \
                 subflows can stall (a kernel bug braid works around)"
            ),
            "run braid converter without --no-tfo-window-fix (or tfo_window_fix = false)",
        ),
    }
}

pub fn destination(dest: SocketAddr, r: &Result<Duration, String>) -> Finding {
    match r {
        Ok(rtt) => Finding::pass(
            "destination",
            format!("{dest} answers ({:.1} ms)", rtt.as_secs_f64() * 1e3),
        ),
        Err(e) => Finding::bad(
            "destination",
            Verdict::Fail,
            format!("{dest}: {e}"),
            "the converter's own routing or firewall towards the Internet",
        ),
    }
}

// ---- I/O ----

fn sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_string())
}

fn sysctl_u32(key: &str) -> u32 {
    sysctl(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Interfaces with a default route (any table but local), their addresses and rp_filter.
async fn find_uplinks() -> std::io::Result<Vec<UplinkFound>> {
    let rt = braid_sys::rtnl::Rtnl::new()?;
    let links = rt.links().await?;
    let addrs = rt.addresses().await?;
    let routes = rt.routes().await?;
    let all_rp = sysctl_u32("net.ipv4.conf.all.rp_filter");
    let mut v: Vec<UplinkFound> = Vec::new();
    for r in routes.iter().filter(|r| r.is_default() && r.table != 255) {
        let Some(link) = r.oif.and_then(|i| links.iter().find(|l| l.index == i)) else {
            continue;
        };
        if link.loopback {
            continue;
        }
        if let Some(u) = v.iter_mut().find(|u| u.interface == link.name) {
            u.gateway = u.gateway.or(r.gateway);
            continue;
        }
        v.push(UplinkFound {
            interface: link.name.clone(),
            addresses: addrs
                .iter()
                .filter(|a| a.index == link.index && a.global && !a.tentative)
                .map(|a| a.addr)
                .collect(),
            gateway: r.gateway,
            rp_filter: all_rp.max(sysctl_u32(&format!(
                "net.ipv4.conf.{}.rp_filter",
                link.name
            ))),
        });
    }
    Ok(v)
}

/// A connection to `converter` from `src` as the gateway opens one: MPTCP, Fast Open with the
/// request in the SYN (a request for the converter's own address, which it refuses: any
/// complete reply proves the exchange), then the reply.
fn probe(converter: SocketAddr, src: Option<IpAddr>, timeout: Duration) -> PathProbe {
    let spec = SocketSpec {
        mptcp: true,
        fast_open: Some(FastOpen::ConnectNoCookie),
        bind: src.map(|ip| SocketAddr::new(ip, 0)),
        ..SocketSpec::default()
    };
    let started = Instant::now();
    let sock = match spec.open_for(converter) {
        Ok(s) => s,
        Err(e) => return PathProbe::Unreachable(e.to_string()),
    };
    let _ = sock.set_nonblocking(false);
    let _ = sock.set_read_timeout(Some(timeout));
    let _ = sock.set_write_timeout(Some(timeout));
    // With TCP_FASTOPEN_CONNECT, connect() returns at once and the first write sends the SYN
    // with the data.
    if let Err(e) = sock.connect_timeout(&converter.into(), timeout) {
        return PathProbe::Unreachable(e.to_string());
    }
    let mut stream = std::net::TcpStream::from(sock);
    let request = convert::encode_connect_request(converter, None);
    if let Err(e) = stream.write_all(&request) {
        return PathProbe::Unreachable(e.to_string());
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let replied = loop {
        match convert::decode_reply(&got) {
            Ok(convert::Decoded::Complete { .. }) => break true,
            Err(_) => break false,
            Ok(_) => {}
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    };
    let rtt = started.elapsed();
    let mptcp = is_mptcp(&stream).unwrap_or(false);
    let syn_data_acked = mptcp_subflows(&stream)
        .ok()
        .and_then(|s| s.first().map(|f| f.options & TCPI_OPT_SYN_DATA != 0))
        .unwrap_or(false);
    if !replied && !mptcp && got.is_empty() && rtt >= timeout {
        return PathProbe::Unreachable(format!("no answer within {timeout:?}"));
    }
    PathProbe::Connected {
        mptcp,
        syn_data_acked,
        replied,
        rtt,
    }
}

/// A traceroute made of MPTCP SYNs (TTL 1, 2, ...) from `src` to `converter`, reading the
/// routers' "time exceeded" messages on a raw ICMP socket: each quotes our SYN, and a quote long
/// enough shows whether the MPTCP option was still in it. The SYNs are written by hand on a
/// raw socket: an MPTCP socket refuses `IP_TTL` (EOPNOTSUPP, Linux 6.18). IPv4 only; stops
/// when the converter answers (the kernel resets that half-open handshake: no socket has it).
fn trace(converter: SocketAddr, src: Option<IpAddr>) -> Vec<Hop> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (SocketAddr::V4(conv4), Some(IpAddr::V4(src4))) = (converter, src) else {
        return Vec::new();
    };
    let (Ok(icmp), Ok(tcp)) = (
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)),
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)),
    ) else {
        return Vec::new();
    };
    for s in [&icmp, &tcp] {
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    }
    if tcp.bind(&SocketAddr::new(src4.into(), 0).into()).is_err() {
        return Vec::new();
    }
    let mut hops = Vec::new();
    for ttl in 1..=8u8 {
        let sport = rand::random::<u16>() | 0x8000;
        let packet = syn_with_mp_capable(src4, *conv4.ip(), sport, converter.port());
        let _ = tcp.set_ttl_v4(u32::from(ttl));
        if tcp
            .send_to(&packet, &SocketAddr::new((*conv4.ip()).into(), 0).into())
            .is_err()
        {
            break;
        }
        let deadline = Instant::now() + Duration::from_millis(700);
        let mut found = None;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline && found.is_none() {
            if let Ok(n) = (&tcp).read(&mut buf)
                && answered(&buf[..n], *conv4.ip(), converter.port(), sport)
            {
                return hops;
            }
            if let Ok(n) = (&icmp).read(&mut buf) {
                found = quoted_syn(&buf[..n], *conv4.ip(), converter.port(), sport);
            }
        }
        if let Some((router, mptcp)) = found {
            hops.push(Hop { ttl, router, mptcp });
        }
    }
    hops
}

/// A TCP SYN with MSS and an MP_CAPABLE option (version 1, HMAC-SHA256), checksummed.
fn syn_with_mp_capable(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut t = vec![0u8; 28];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&rand::random::<u32>().to_be_bytes());
    t[12] = 7 << 4; // 28 bytes of header
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t[20..28].copy_from_slice(&[2, 4, 0x05, 0xb4, 30, 4, 0x01, 0x01]);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&(t.len() as u16).to_be_bytes());
    add(&t);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    t[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    t
}

/// `pkt` (an IPv4 packet from a raw TCP socket) is the converter's SYN-ACK to our SYN.
fn answered(pkt: &[u8], from: std::net::Ipv4Addr, sport: u16, dport: u16) -> bool {
    let ihl = usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4;
    let (Some(src), Some(tcp)) = (pkt.get(12..16), pkt.get(ihl..)) else {
        return false;
    };
    tcp.len() >= 14
        && src == from.octets()
        && u16::from_be_bytes([tcp[0], tcp[1]]) == sport
        && u16::from_be_bytes([tcp[2], tcp[3]]) == dport
        && tcp[13] & 0x12 == 0x12
}

/// `(router, the quote shows the MPTCP option)` if `pkt` (an IPv4 packet with an ICMP "time
/// exceeded" in it) quotes our SYN from `sport` to `dst:dport`.
fn quoted_syn(
    pkt: &[u8],
    dst: std::net::Ipv4Addr,
    dport: u16,
    sport: u16,
) -> Option<(IpAddr, Option<bool>)> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    let router = IpAddr::from(<[u8; 4]>::try_from(pkt.get(12..16)?).ok()?);
    let icmp = pkt.get(ihl..)?;
    if icmp.first() != Some(&11) {
        return None;
    }
    let inner = icmp.get(8..)?;
    let iihl = usize::from(inner.first()? & 0x0f) * 4;
    if inner.get(9) != Some(&6) || inner.get(16..20)? != dst.octets() {
        return None;
    }
    let tcp = inner.get(iihl..)?;
    let (sp, dp) = (
        u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]),
        u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]),
    );
    if sp != sport || dp != dport {
        return None;
    }
    let Some(off) = tcp.get(12).map(|b| usize::from(b >> 4) * 4) else {
        return Some((router, None));
    };
    let Some(opts) = tcp.get(20..off) else {
        return Some((router, None));
    };
    Some((router, Some(has_option(opts, 30))))
}

/// Whether TCP options `opts` hold one of `kind`.
fn has_option(opts: &[u8], kind: u8) -> bool {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return false,
            1 => i += 1,
            k => {
                if k == kind {
                    return true;
                }
                let len = usize::from(*opts.get(i + 1).unwrap_or(&0));
                if len < 2 {
                    return false;
                }
                i += len;
            }
        }
    }
    false
}

fn report(findings: &[Finding], json: bool) -> anyhow::Result<bool> {
    let ok = findings.iter().all(|f| f.verdict != Verdict::Fail);
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(findings)?)
    } else {
        let mut t: String = findings.iter().map(|f| format!("{f}\n")).collect();
        let (fails, warns) = (
            findings
                .iter()
                .filter(|f| f.verdict == Verdict::Fail)
                .count(),
            findings
                .iter()
                .filter(|f| f.verdict == Verdict::Warn)
                .count(),
        );
        t.push_str(&if ok {
            format!("all checks passed ({warns} warnings)\n")
        } else {
            format!("{fails} checks failed, {warns} warnings\n")
        });
        t
    };
    let _ = crate::daemon::print_or_broken_pipe(&text);
    Ok(ok)
}

/// The checks of a gateway, towards `converters`. Returns whether every check passed.
pub fn gateway(converters: &[SocketAddr], json: bool) -> anyhow::Result<bool> {
    let mut f = vec![mptcp_enabled(
        sysctl("net.mptcp.enabled").as_deref(),
        &braid_sys::kernel::kernel_release(),
    )];
    f.push(pm_type(sysctl("net.mptcp.pm_type").as_deref()));
    f.push(tfo_client(sysctl_u32("net.ipv4.tcp_fastopen")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let found = rt.block_on(find_uplinks())?;
    let eps: Vec<IpAddr> = rt
        .block_on(async {
            let mut pm = braid_sys::pm::PathManager::new()?;
            pm.endpoints().await
        })
        .map(|v| {
            v.into_iter()
                .filter(|e| e.flags.subflow)
                .map(|e| e.addr)
                .collect()
        })
        .unwrap_or_default();
    let running = crate::status::fetch("gateway").is_ok();
    if let Ok(l) = rt.block_on(braid_sys::pm::limits()) {
        f.push(gateway_limits(l.subflows, found.len(), running));
    }
    f.push(uplinks(&found));
    f.push(rp_filter(&found, running));
    f.push(endpoints(&eps, &found, running));
    for conv in converters {
        let sources: Vec<(String, IpAddr)> = found
            .iter()
            .flat_map(|u| {
                u.addresses
                    .iter()
                    .filter(|a| a.is_ipv4() == conv.is_ipv4())
                    .map(|a| (u.interface.clone(), *a))
                    .collect::<Vec<_>>()
            })
            .collect();
        if sources.is_empty() {
            f.push(path(
                "(default route)",
                *conv,
                &probe(*conv, None, Duration::from_secs(3)),
            ));
        }
        for (ifname, src) in sources {
            let p = probe(*conv, Some(src), Duration::from_secs(3));
            let mut finding = path(&ifname, *conv, &p);
            if let PathProbe::Connected { mptcp: false, .. } = p {
                // Where on the way: the routers' quotes of TTL-limited SYNs.
                finding.detail =
                    format!("{}; {}", finding.detail, locate(&trace(*conv, Some(src))));
            }
            f.push(finding);
        }
    }
    if converters.is_empty() {
        f.push(Finding::bad(
            "converter",
            Verdict::Warn,
            "no converter given: the paths were not checked",
            "braid doctor gateway --converter ADDR:PORT (or --config with the gateway's file)",
        ));
    }
    report(&f, json)
}

/// The checks of a converter listening on `port`, and of its way to `dest`.
pub fn converter(port: u16, dest: Option<SocketAddr>, json: bool) -> anyhow::Result<bool> {
    let mut f = vec![mptcp_enabled(
        sysctl("net.mptcp.enabled").as_deref(),
        &braid_sys::kernel::kernel_release(),
    )];
    f.push(tfo_server(sysctl_u32("net.ipv4.tcp_fastopen")));
    let listening = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ]
    .iter()
    .any(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok());
    f.push(listener(port, listening));
    let table =
        braid_sys::nft::table_exists(braid_sys::nft::Family::Inet, &format!("braid_tfo_{port}"))
            .unwrap_or(false);
    f.push(window_fix(port, table, listening));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limits = rt.block_on(braid_sys::pm::limits());
    f.push(match limits {
        Ok(l) => converter_limits(l.subflows),
        Err(e) => Finding::bad(
            "limits",
            Verdict::Warn,
            format!("could not read the MPTCP limits: {e}"),
            "run as root (CAP_NET_ADMIN)",
        ),
    });
    if let Some(d) = dest {
        let t = Instant::now();
        let r = std::net::TcpStream::connect_timeout(&d, Duration::from_secs(3))
            .map(|_| t.elapsed())
            .map_err(|e| e.to_string());
        f.push(destination(d, &r));
    }
    report(&f, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, addr: [u8; 4], rp: u32) -> UplinkFound {
        UplinkFound {
            interface: name.into(),
            addresses: vec![IpAddr::from(addr)],
            gateway: None,
            rp_filter: rp,
        }
    }

    #[test]
    fn kernel_settings_are_judged_with_their_fix() {
        assert_eq!(mptcp_enabled(Some("1"), "6.1").verdict, Verdict::Pass);
        let f = mptcp_enabled(Some("0"), "6.1");
        assert_eq!(f.verdict, Verdict::Fail);
        assert_eq!(f.fix.as_deref(), Some("sysctl -w net.mptcp.enabled=1"));
        assert!(mptcp_enabled(None, "5.4.0").detail.contains("5.4.0"));
        assert_eq!(pm_type(Some("1")).verdict, Verdict::Fail);
        assert_eq!(pm_type(Some("0")).verdict, Verdict::Pass);
        let f = tfo_client(0);
        assert_eq!(f.verdict, Verdict::Fail);
        assert_eq!(f.fix.as_deref(), Some("sysctl -w net.ipv4.tcp_fastopen=1"));
        assert_eq!(tfo_client(0x1).verdict, Verdict::Pass);
        assert_eq!(
            tfo_server(0x1).fix.as_deref(),
            Some("sysctl -w net.ipv4.tcp_fastopen=3")
        );
        assert_eq!(converter_limits(0).verdict, Verdict::Fail);
        assert_eq!(gateway_limits(0, 2, false).verdict, Verdict::Warn);
        assert_eq!(gateway_limits(0, 2, true).verdict, Verdict::Fail);
        assert_eq!(gateway_limits(8, 3, true).verdict, Verdict::Pass);
        assert_eq!(gateway_limits(0, 1, false).verdict, Verdict::Pass);
        assert_eq!(converter_limits(8).verdict, Verdict::Pass);
    }

    #[test]
    fn uplinks_rp_filter_and_endpoints() {
        let two = [up("dsl", [10, 0, 0, 2], 0), up("lte", [10, 1, 0, 2], 1)];
        assert_eq!(uplinks(&[]).verdict, Verdict::Fail);
        assert_eq!(uplinks(&two[..1]).verdict, Verdict::Warn);
        assert_eq!(uplinks(&two).verdict, Verdict::Pass);
        let f = rp_filter(&two, false);
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(f.detail.contains("lte") && !f.detail.contains("dsl"));
        assert_eq!(
            f.fix.as_deref(),
            Some("sysctl -w net.ipv4.conf.lte.rp_filter=2")
        );
        assert_eq!(rp_filter(&two, true).verdict, Verdict::Fail);
        assert_eq!(endpoints(&[], &two, false).verdict, Verdict::Warn);
        let f = endpoints(&[], &two, true);
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(
            f.detail
                .contains("no uplink address has an MPTCP subflow endpoint")
        );
        assert_eq!(
            endpoints(&[IpAddr::from([10, 1, 0, 2])], &two, true).verdict,
            Verdict::Pass
        );
    }

    #[test]
    fn the_hop_that_strips_the_option_is_named_from_the_quotes() {
        let hop = |ttl, last: u8, mptcp| Hop {
            ttl,
            router: IpAddr::from([10, 0, ttl, last]),
            mptcp,
        };
        let l = locate(&[hop(1, 1, Some(true)), hop(2, 1, Some(false))]);
        assert!(
            l.contains("present at hop 1 (10.0.1.1), gone at hop 2 (10.0.2.1)"),
            "{l}"
        );
        let l = locate(&[hop(1, 1, Some(true))]);
        assert!(l.contains("stripped after it"), "{l}");
        assert!(locate(&[hop(1, 1, Some(false))]).contains("first hop"));
        assert!(locate(&[]).contains("not known"));
        assert!(locate(&[hop(1, 1, None)]).contains("do not say"));
    }

    #[test]
    fn a_time_exceeded_quote_is_read_down_to_the_tcp_options() {
        // Outer IPv4 header (from 10.0.0.1), ICMP 11/0, the quoted IPv4 header to
        // 192.0.2.1, TCP 40000 -> 5124 with MSS and MP_CAPABLE options.
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 1, 1, 1,
        ];
        p.extend([11, 0, 0, 0, 0, 0, 0, 0]);
        p.extend([
            0x45, 0, 0, 0, 0, 0, 0, 0, 1, 6, 0, 0, 10, 1, 1, 1, 192, 0, 2, 1,
        ]);
        p.extend([
            0x9c, 0x40, 0x14, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0x02, 0, 0, 0, 0, 0, 0,
        ]);
        p.extend([2, 4, 5, 0xb4, 30, 4, 0x81, 0x01, 1, 1, 1, 1]);
        let dst = std::net::Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(
            quoted_syn(&p, dst, 5124, 40000),
            Some((IpAddr::from([10, 0, 0, 1]), Some(true)))
        );
        assert_eq!(
            quoted_syn(&p, dst, 5124, 40001),
            None,
            "another socket's SYN"
        );
        // A quote cut after 8 bytes of TCP (RFC 792) says nothing of the options.
        assert_eq!(
            quoted_syn(&p[..20 + 8 + 20 + 8], dst, 5124, 40000),
            Some((IpAddr::from([10, 0, 0, 1]), None))
        );
        assert!(!has_option(&[2, 4, 5, 0xb4, 1, 0], 30));
    }

    #[test]
    fn a_hand_made_syn_carries_mp_capable_and_checks_out() {
        let (src, dst) = (
            std::net::Ipv4Addr::new(10, 1, 1, 1),
            std::net::Ipv4Addr::new(192, 0, 2, 1),
        );
        let t = syn_with_mp_capable(src, dst, 40000, 5124);
        assert!(has_option(&t[20..], 30) && t[13] == 0x02);
        // The ones' complement sum over the pseudo-header and the segment is all ones.
        let mut sum: u32 = 0;
        let mut bytes = Vec::new();
        bytes.extend(src.octets());
        bytes.extend(dst.octets());
        bytes.extend([0, 6, 0, t.len() as u8]);
        bytes.extend(&t);
        for c in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn each_path_outcome_names_its_cause() {
        let c: SocketAddr = ([192, 0, 2, 1], 5124).into();
        let ok = |mptcp, syn_data_acked, replied| PathProbe::Connected {
            mptcp,
            syn_data_acked,
            replied,
            rtt: Duration::from_millis(30),
        };
        assert_eq!(path("dsl", c, &ok(true, true, true)).verdict, Verdict::Pass);
        let f = path("dsl", c, &ok(false, true, true));
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.detail.contains("MPTCP option was removed"), "{f}");
        assert_eq!(
            path("dsl", c, &ok(true, false, true)).verdict,
            Verdict::Warn
        );
        assert!(
            path("dsl", c, &ok(true, false, true))
                .detail
                .contains("did not ride in the SYN")
        );
        assert_eq!(
            path("dsl", c, &ok(true, true, false)).verdict,
            Verdict::Fail
        );
        let f = path("lte", c, &PathProbe::Unreachable("timed out".into()));
        assert!(f.check.contains("lte") && f.detail.contains("timed out"));
        assert_eq!(listener(5124, false).verdict, Verdict::Fail);
        assert_eq!(window_fix(5124, false, true).verdict, Verdict::Warn);
        assert_eq!(window_fix(5124, false, false).verdict, Verdict::Pass);
    }
}
