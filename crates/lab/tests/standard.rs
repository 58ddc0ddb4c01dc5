//! The standard topology works end to end: the client reaches the server over both families
//! through gateway and converter, and every uplink carries traffic from its own address.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use braid_lab::{Netns, StandardConfig, StandardLab};

/// Serves one "hello from server" per connection to `n` clients, from inside `ns`.
fn serve(ns: &Netns, addr: SocketAddr, n: usize) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    let listener = ns.enter(|| TcpListener::bind(addr).unwrap()).unwrap();
    std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (mut s, peer) = listener.accept().unwrap();
                s.write_all(b"hello from server").unwrap();
                peer
            })
            .collect()
    })
}

fn fetch(ns: &Netns, dst: SocketAddr, src: Option<IpAddr>) -> String {
    ns.enter(|| {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        if let Some(ip) = src {
            s.bind(&SocketAddr::new(ip, 0).into()).unwrap();
        }
        s.connect_timeout(&dst.into(), Duration::from_secs(2))
            .unwrap();
        let mut s: TcpStream = s.into();
        let mut v = String::new();
        s.read_to_string(&mut v).unwrap();
        v
    })
    .unwrap()
}

#[test]
fn client_reaches_server_over_both_families() {
    let t0 = Instant::now();
    let lab = StandardLab::new(StandardConfig::by_hand()).unwrap();
    eprintln!("standard lab built in {:?}", t0.elapsed());

    for dst in [
        SocketAddr::new(lab.server_v4().into(), 8080),
        SocketAddr::new(lab.server_v6().into(), 8080),
    ] {
        let server = serve(&lab.server, dst, 1);
        assert_eq!(fetch(&lab.client, dst, None), "hello from server");
        let peers = server.join().unwrap();
        // Routed, not translated: the server sees the client's own address.
        let client: IpAddr = if dst.is_ipv4() {
            lab.client_v4().into()
        } else {
            lab.client_v6().into()
        };
        assert_eq!(peers[0].ip(), client);
    }
    // Each uplink address leaves by its own uplink (policy routing), for both families.
    for u in &lab.uplinks {
        for (src, dst) in [
            (
                IpAddr::from(u.gateway_v4),
                SocketAddr::new(lab.server_v4().into(), 8081),
            ),
            (
                u.gateway_v6.unwrap().into(),
                SocketAddr::new(lab.server_v6().into(), 8081),
            ),
        ] {
            let route = lab
                .gateway
                .run([
                    "ip",
                    "route",
                    "get",
                    &dst.ip().to_string(),
                    "from",
                    &src.to_string(),
                ])
                .unwrap();
            assert!(route.contains(&format!("dev {}", u.gateway_if)), "{route}");
            let server = serve(&lab.server, dst, 1);
            assert_eq!(fetch(&lab.gateway, dst, Some(src)), "hello from server");
            assert_eq!(server.join().unwrap()[0].ip(), src);
        }
    }

    // Forwarding, TFO and MPTCP settings per role.
    assert_eq!(lab.gateway.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        lab.converter
            .sysctl_get("net.ipv6.conf.all.forwarding")
            .unwrap(),
        "1"
    );
    assert_eq!(lab.client.sysctl_get("net.ipv4.ip_forward").unwrap(), "0");
    assert_eq!(
        lab.gateway.sysctl_get("net.ipv4.tcp_fastopen").unwrap(),
        "7"
    );
    let eps = lab
        .gateway
        .run(["ip", "mptcp", "endpoint", "show"])
        .unwrap();
    assert!(
        eps.contains("10.1.2.1") && eps.contains("dev g-v2"),
        "{eps}"
    );
    let limits = lab
        .converter
        .run(["ip", "mptcp", "limits", "show"])
        .unwrap();
    assert!(limits.contains("subflows 2"), "{limits}");
}

#[test]
fn mptcp_opens_a_subflow_per_uplink() {
    let lab = StandardLab::new(StandardConfig {
        uplinks: 2,
        rates: Some(vec![20_000_000, 20_000_000]),
        ipv6: false,
        ..StandardConfig::by_hand()
    })
    .unwrap();
    let dst = SocketAddr::new(lab.converter_v4().into(), 5201);
    let flow = braid_lab::bulk::Bulk::new(&lab.gateway, &lab.converter, dst)
        .mptcp(true)
        .start()
        .unwrap();
    let t = flow.rate_over(Duration::from_millis(1500));
    let ss = lab
        .gateway
        .run(["ss", "-tniH", "state", "established"])
        .unwrap();
    flow.stop().unwrap();
    // One subflow per uplink, both shaped to 20 Mbit/s: well over one link's worth.
    assert!(ss.contains("10.1.1.1") && ss.contains("10.1.2.1"), "{ss}");
    assert!(
        t.mbit_per_sec() > 25.0,
        "MPTCP over two 20 Mbit/s uplinks: {t}"
    );
    eprintln!("MPTCP over 2 × 20 Mbit/s: {t}");
}
