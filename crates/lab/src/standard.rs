//! The project's standard topology in one call:
//!
//! ```text
//! client ── LAN ── gateway ══ uplink 1..N ══ converter ── server link ── server
//!  c-g            g-c  g-v<i>          v-g<i>   v-s                   s-v
//! ```
//!
//! | segment      | IPv4            | IPv6             | lower end   | upper end   |
//! |--------------|-----------------|------------------|-------------|-------------|
//! | LAN          | 10.0.0.0/24     | fd00:0::/64      | client .1   | gateway .2  |
//! | uplink i     | 10.1.i.0/24     | fd00:1:i::/64    | gateway .1  | converter .2|
//! | server link  | 10.2.0.0/24     | fd00:2::/64      | converter .1| server .2   |
//!
//! All of these addresses exist only inside the lab's namespaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::delay::Delay;
use crate::error::{Error, Result};
use crate::lab::Lab;
use crate::link::{Direction, Link};
use crate::netns::Netns;
use crate::routing::{MptcpEndpoint, Route, Rule};

/// Every uplink subnet, both families: where a converter's clients come from.
pub const UPLINK_PREFIXES: [&str; 2] = ["10.1.0.0/16", "fd00:1::/32"];
/// The server link, both families: where converted connections go.
pub const SERVER_PREFIXES: [&str; 2] = ["10.2.0.0/24", "fd00:2::/64"];

/// `braid converter` flags for a converter in the standard lab: listening on `port`, clients
/// from the uplinks, destinations on the server link (the demo, tests and benchmarks use
/// them).
pub fn converter_args(port: u16) -> Vec<String> {
    let mut a = vec!["--listen".to_string(), format!("[::]:{port}")];
    for p in UPLINK_PREFIXES {
        a.extend(["--allow-client".into(), p.into()]);
    }
    for p in SERVER_PREFIXES {
        a.extend(["--allow-dest".into(), p.into()]);
    }
    a
}

/// `net.ipv4.tcp_fastopen` per role. Bits: 0x1 client, 0x2 server, 0x4 client sends data in
/// the SYN without a cookie, 0x200 server accepts data without a cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastOpen {
    /// LAN client: `0x1`, the kernel default; it talks plain TCP to the gateway.
    pub client: u32,
    /// Gateway: `0x7` = client with data in the first SYN (0x1|0x4, needed for 0-RTT to the
    /// converter) plus server (0x2) for its own local listeners.
    pub gateway: u32,
    /// Converter: `0x3` = server plus client. Not 0x200: the converter's listener must ask
    /// for cookie-less TFO itself (`TCP_FASTOPEN_NO_COOKIE`), as it would on a real host.
    pub converter: u32,
    /// Server: `0x3`.
    pub server: u32,
}

impl Default for FastOpen {
    fn default() -> Self {
        FastOpen {
            client: 0x1,
            gateway: 0x7,
            converter: 0x3,
            server: 0x3,
        }
    }
}

/// How the gateway's uplinks are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayRouting {
    /// Set up by hand as a careful user would: source policy routing (`from <uplink address>
    /// lookup 100+i`, with the uplink's subnet and the server link in table 100+i), the server
    /// link through uplink 1 in the main table, and no default route. With
    /// [`StandardConfig::mptcp_gateway_endpoints`] the kernel then bonds by itself.
    ByHand,
    /// Like a real router out of the box: one default route per uplink (metric 100·i, through
    /// the converter's address on it, each family the uplink has), no source rules, no
    /// endpoints, strict reverse-path filtering (`rp_filter=1`). Bonding is left to braid.
    Router,
}

/// Which address families an uplink has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Families {
    Both,
    V4Only,
    V6Only,
}

impl Families {
    fn v4(self) -> bool {
        self != Families::V6Only
    }
    fn v6(self) -> bool {
        self != Families::V4Only
    }
}

/// Options of [`StandardLab::new`].
#[derive(Debug, Clone)]
pub struct StandardConfig {
    /// Number of links between gateway and converter, 1 to 8.
    pub uplinks: usize,
    /// tbf rate in bit/s per uplink (both directions); `None` leaves them unshaped.
    pub rates: Option<Vec<u64>>,
    /// One-way delay (and jitter) per uplink, applied in both directions, so uplink i's RTT
    /// is twice its delay; `None` adds none. Changeable later with
    /// [`Link::set_delay`](crate::Link::set_delay).
    pub delays: Option<Vec<Delay>>,
    /// Configure IPv6 addresses and routes as well.
    pub ipv6: bool,
    /// Give the gateway MPTCP limits and a `subflow` endpoint with `dev` on every uplink but the
    /// first (both families), so the kernel opens one subflow per uplink by itself. Only with
    /// [`GatewayRouting::ByHand`].
    pub mptcp_gateway_endpoints: bool,
    pub gateway_routing: GatewayRouting,
    /// The address families of each uplink (`None`: both, as `ipv6` allows). An uplink
    /// without a family still gets the family's addresses in [`Uplink`], unconfigured.
    pub uplink_families: Option<Vec<Families>>,
    /// `net.ipv4.tcp_fastopen` per role.
    pub fast_open: FastOpen,
    /// `net.ipv4.tcp_rto_min_us` in every namespace (20000 cuts failover stalls to ~0.35 s);
    /// `None` keeps the kernel's 200 ms.
    pub rto_min_us: Option<u32>,
    /// `net.ipv4.tcp_congestion_control` in every namespace (`reno` or `bbr` here); `None`
    /// keeps the default inherited from the host.
    pub congestion_control: Option<String>,
}

impl StandardConfig {
    /// The gateway's paths set up by hand ([`GatewayRouting::ByHand`] with endpoints): for
    /// tests whose MPTCP client is not `braid gateway` (the converter's tests), and for
    /// comparing braid's own path management with a careful user's.
    pub fn by_hand() -> Self {
        StandardConfig {
            mptcp_gateway_endpoints: true,
            gateway_routing: GatewayRouting::ByHand,
            ..StandardConfig::default()
        }
    }
}

impl Default for StandardConfig {
    /// Two unshaped uplinks, IPv6 on, the gateway routed like a router out of the box
    /// ([`GatewayRouting::Router`]): bonding is `braid gateway`'s job.
    fn default() -> Self {
        StandardConfig {
            uplinks: 2,
            rates: None,
            delays: None,
            ipv6: true,
            mptcp_gateway_endpoints: false,
            gateway_routing: GatewayRouting::Router,
            uplink_families: None,
            fast_open: FastOpen::default(),
            rto_min_us: None,
            congestion_control: None,
        }
    }
}

/// One segment between two namespaces with the addresses of both ends. `lower` is the end
/// nearer the client (for the LAN: the client; for an uplink: the gateway).
#[derive(Debug, Clone)]
pub struct Segment {
    /// The veth pair; `link.a` is the lower end, `link.b` the upper end.
    pub link: Link,
    /// Lower end's IPv4 address.
    pub lower_v4: Ipv4Addr,
    /// Upper end's IPv4 address.
    pub upper_v4: Ipv4Addr,
    /// Lower end's IPv6 address (`None` without IPv6).
    pub lower_v6: Option<Ipv6Addr>,
    /// Upper end's IPv6 address (`None` without IPv6).
    pub upper_v6: Option<Ipv6Addr>,
    /// The IPv4 subnet.
    pub net_v4: Ipv4Net,
    /// The IPv6 subnet (configured only with IPv6).
    pub net_v6: Ipv6Net,
}

impl Segment {
    /// Interface name of the lower end.
    pub fn lower_if(&self) -> &str {
        self.link.a.ifname()
    }

    /// Interface name of the upper end.
    pub fn upper_if(&self) -> &str {
        self.link.b.ifname()
    }
}

/// One uplink between gateway and converter.
#[derive(Debug, Clone)]
pub struct Uplink {
    /// 1-based number, as in the interface names (`g-v1`) and subnets (`10.1.1.0/24`).
    pub index: u8,
    /// The veth pair; `link.a` is the gateway's end, `link.b` the converter's.
    pub link: Link,
    /// Gateway's address on this uplink (the source that selects it).
    pub gateway_v4: Ipv4Addr,
    /// Converter's address on this uplink.
    pub converter_v4: Ipv4Addr,
    /// Gateway's IPv6 address on this uplink.
    pub gateway_v6: Option<Ipv6Addr>,
    /// Converter's IPv6 address on this uplink.
    pub converter_v6: Option<Ipv6Addr>,
    /// Gateway's interface, `g-v<i>`.
    pub gateway_if: String,
    /// Converter's interface, `v-g<i>`.
    pub converter_if: String,
    /// The gateway's routing table for traffic from this uplink's addresses, `100 + i`.
    pub table: u32,
}

/// The standard topology, ready to use. Dropping it deletes everything.
///
/// ```no_run
/// # fn main() -> braid_lab::Result<()> {
/// use braid_lab::{StandardConfig, StandardLab};
/// let lab = StandardLab::new(StandardConfig {
///     rates: Some(vec![20_000_000, 30_000_000]),
///     ..StandardConfig::default()
/// })?;
/// lab.client.run(["ping", "-c1", "-W1", &lab.server_v4().to_string()])?;
/// lab.uplinks[0].link.down()?; // failover test
/// lab.uplinks[0].link.up()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct StandardLab {
    /// LAN client.
    pub client: Netns,
    /// Gateway, MPTCP client side, several uplinks.
    pub gateway: Netns,
    /// Converter, MPTCP server side.
    pub converter: Netns,
    /// Plain TCP server.
    pub server: Netns,
    /// client (lower) ⇄ gateway (upper).
    pub lan: Segment,
    /// gateway ⇄ converter, in order.
    pub uplinks: Vec<Uplink>,
    /// converter (lower) ⇄ server (upper).
    pub server_link: Segment,
    /// The configuration it was built with.
    pub config: StandardConfig,
    // Last: dropped after the handles above, and deletes the namespaces even if a test keeps
    // clones of them.
    lab: Lab,
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

fn v6(seg: [u16; 3], host: u16) -> Ipv6Addr {
    Ipv6Addr::new(seg[0], seg[1], seg[2], 0, 0, 0, 0, host)
}

fn net4(a: Ipv4Addr, len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(a, len).expect("valid prefix"))
}

fn net6(a: Ipv6Addr, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new(a, len).expect("valid prefix"))
}

impl StandardLab {
    /// Builds the topology: namespaces, links, addresses, routes (both families), forwarding
    /// on gateway and converter, one routing table and `from` rule per uplink on the gateway,
    /// MPTCP limits on the converter (and endpoints on the gateway if asked), sysctls, shaping,
    /// delays.
    ///
    /// Anything that fails half-way is undone before the error is returned.
    pub fn new(config: StandardConfig) -> Result<StandardLab> {
        let n = config.uplinks;
        if !(1..=8).contains(&n) {
            return Err(Error::Config(format!("uplinks must be 1..=8, not {n}")));
        }
        if let Some(r) = &config.rates {
            if r.len() != n {
                return Err(Error::Config(format!("{} rates for {n} uplinks", r.len())));
            }
        }
        let families = config
            .uplink_families
            .clone()
            .unwrap_or_else(|| vec![Families::Both; n]);
        if families.len() != n {
            return Err(Error::Config(format!(
                "{} uplink families for {n} uplinks",
                families.len()
            )));
        }
        if (!config.ipv6
            && families
                .iter()
                .any(|f| *f != Families::V4Only && *f != Families::Both))
            || (config.mptcp_gateway_endpoints && config.gateway_routing == GatewayRouting::Router)
        {
            return Err(Error::Config(
                "IPv6-only uplinks need ipv6; gateway endpoints need GatewayRouting::ByHand".into(),
            ));
        }
        if let Some(d) = &config.delays {
            if d.len() != n {
                return Err(Error::Config(format!("{} delays for {n} uplinks", d.len())));
            }
            d.iter().try_for_each(Delay::validate)?;
        }
        let lab = Lab::new()?;
        let client = lab.add_ns("cl")?;
        let gateway = lab.add_ns("gw")?;
        let converter = lab.add_ns("cv")?;
        let server = lab.add_ns("sv")?;
        let ipv6 = config.ipv6;

        let segment = |lower: &Netns,
                       lower_if: &str,
                       upper: &Netns,
                       upper_if: &str,
                       net: [u8; 3],
                       net6: [u16; 3],
                       fam: Families|
         -> Result<Segment> {
            let link = lab.link(lower, lower_if, upper, upper_if)?;
            let lower_v4 = v4(net[0], net[1], net[2], 1);
            let upper_v4 = v4(net[0], net[1], net[2], 2);
            if fam.v4() {
                link.a.add_addr(net4(lower_v4, 24))?;
                link.b.add_addr(net4(upper_v4, 24))?;
            }
            let (lower_v6, upper_v6) = if ipv6 && fam.v6() {
                let (l, u) = (v6(net6, 1), v6(net6, 2));
                link.a.add_addr(net6_(l))?;
                link.b.add_addr(net6_(u))?;
                (Some(l), Some(u))
            } else {
                (None, None)
            };
            Ok(Segment {
                link,
                lower_v4,
                upper_v4,
                lower_v6,
                upper_v6,
                net_v4: Ipv4Net::new(v4(net[0], net[1], net[2], 0), 24).expect("valid"),
                net_v6: Ipv6Net::new(v6(net6, 0), 64).expect("valid"),
            })
        };
        fn net6_(a: Ipv6Addr) -> IpNet {
            net6(a, 64)
        }

        let lan = segment(
            &client,
            "c-g",
            &gateway,
            "g-c",
            [10, 0, 0],
            [0xfd00, 0, 0],
            Families::Both,
        )?;
        let server_link = segment(
            &converter,
            "v-s",
            &server,
            "s-v",
            [10, 2, 0],
            [0xfd00, 2, 0],
            Families::Both,
        )?;
        let mut uplinks = Vec::with_capacity(n);
        for i in 1..=n as u8 {
            let (gif, cif) = (format!("g-v{i}"), format!("v-g{i}"));
            let s = segment(
                &gateway,
                &gif,
                &converter,
                &cif,
                [10, 1, i],
                [0xfd00, 1, i.into()],
                families[usize::from(i) - 1],
            )?;
            uplinks.push(Uplink {
                index: i,
                link: s.link,
                gateway_v4: s.lower_v4,
                converter_v4: s.upper_v4,
                gateway_v6: s.lower_v6,
                converter_v6: s.upper_v6,
                gateway_if: gif,
                converter_if: cif,
                table: 100 + u32::from(i),
            });
        }

        // Sysctls per role.
        let fo = config.fast_open;
        for (ns, tfo) in [
            (&client, fo.client),
            (&gateway, fo.gateway),
            (&converter, fo.converter),
            (&server, fo.server),
        ] {
            ns.sysctl("net.ipv4.tcp_fastopen", tfo)?;
            if let Some(us) = config.rto_min_us {
                ns.sysctl("net.ipv4.tcp_rto_min_us", us)?;
            }
            if let Some(cc) = &config.congestion_control {
                ns.sysctl("net.ipv4.tcp_congestion_control", cc)?;
            }
        }
        for ns in [&gateway, &converter] {
            ns.sysctl("net.ipv4.ip_forward", 1)?;
            if ipv6 {
                ns.sysctl("net.ipv6.conf.all.forwarding", 1)?;
            }
        }

        // The client and the server: a default route to their neighbour.
        client.add_route(&Route::default_v4().via(lan.upper_v4.into()).dev("c-g"))?;
        server.add_route(
            &Route::default_v4()
                .via(server_link.lower_v4.into())
                .dev("s-v"),
        )?;
        if ipv6 {
            let (Some(lan_gw), Some(srv_gw)) = (lan.upper_v6, server_link.lower_v6) else {
                unreachable!("ipv6 addresses are set when ipv6 is on");
            };
            client.add_route(&Route::default_v6().via(lan_gw.into()).dev("c-g"))?;
            server.add_route(&Route::default_v6().via(srv_gw.into()).dev("s-v"))?;
        }
        let has_v4 = |u: &&Uplink| families[usize::from(u.index) - 1].v4();
        let first_v4 = uplinks.iter().find(has_v4);
        let first_v6 = uplinks.iter().find(|u| u.gateway_v6.is_some());
        // The converter reaches the LAN (forwarded traffic that is not converted) through the
        // first uplink of each family.
        if let Some(u) = first_v4 {
            converter.add_route(
                &Route::to(lan.net_v4.into())
                    .via(u.gateway_v4.into())
                    .dev(&u.converter_if),
            )?;
        }
        if let (Some(u), true) = (first_v6, ipv6) {
            converter.add_route(
                &Route::to(lan.net_v6.into())
                    .via(u.gateway_v6.expect("found by it").into())
                    .dev(&u.converter_if),
            )?;
        }
        match config.gateway_routing {
            GatewayRouting::ByHand => {
                // Everything not bound to an uplink address uses the first uplink; source
                // policy routing sends traffic from uplink i's address out of uplink i. None
                // on the converter: it would send join SYN-ACKs out of the wrong link.
                if let Some(u) = first_v4 {
                    gateway.add_route(
                        &Route::to(server_link.net_v4.into())
                            .via(u.converter_v4.into())
                            .dev(&u.gateway_if),
                    )?;
                }
                if let (Some(u), true) = (first_v6, ipv6) {
                    gateway.add_route(
                        &Route::to(server_link.net_v6.into())
                            .via(u.converter_v6.expect("with gateway_v6").into())
                            .dev(&u.gateway_if),
                    )?;
                }
                let uplink_net4 = net4(v4(10, 1, 0, 0), 16);
                let uplink_net6 = net6(v6([0xfd00, 1, 0], 0), 48);
                for u in &uplinks {
                    if has_v4(&u) {
                        gateway
                            .add_rule(&Rule::from(net4(u.gateway_v4, 32), u.table).pref(u.table))?;
                        gateway.add_route(
                            &Route::to(uplink_net4)
                                .dev(&u.gateway_if)
                                .src(u.gateway_v4.into())
                                .table(u.table),
                        )?;
                        gateway.add_route(
                            &Route::to(server_link.net_v4.into())
                                .via(u.converter_v4.into())
                                .dev(&u.gateway_if)
                                .table(u.table),
                        )?;
                    }
                    if let (Some(g6), Some(c6)) = (u.gateway_v6, u.converter_v6) {
                        gateway.add_rule(&Rule::from(net6(g6, 128), u.table).pref(u.table))?;
                        gateway.add_route(
                            &Route::to(uplink_net6)
                                .dev(&u.gateway_if)
                                .src(g6.into())
                                .table(u.table),
                        )?;
                        gateway.add_route(
                            &Route::to(server_link.net_v6.into())
                                .via(c6.into())
                                .dev(&u.gateway_if)
                                .table(u.table),
                        )?;
                    }
                }
            }
            GatewayRouting::Router => {
                // A default route per uplink and family, the first uplink preferred, and strict
                // reverse-path filtering, as a router's DHCP/PPP client leaves it.
                gateway.sysctl("net.ipv4.conf.all.rp_filter", 1)?;
                for u in &uplinks {
                    let metric = 100 * u32::from(u.index);
                    gateway.sysctl(&format!("net.ipv4.conf.{}.rp_filter", u.gateway_if), 1)?;
                    if has_v4(&u) {
                        gateway.add_route(
                            &Route::default_v4()
                                .via(u.converter_v4.into())
                                .dev(&u.gateway_if)
                                .metric(metric),
                        )?;
                    }
                    if let Some(c6) = u.converter_v6 {
                        gateway.add_route(
                            &Route::default_v6()
                                .via(c6.into())
                                .dev(&u.gateway_if)
                                .metric(metric),
                        )?;
                    }
                }
            }
        }

        // MPTCP: the converter accepts joins; the gateway optionally opens them.
        let limit = (n as u32).clamp(2, 8);
        converter.mptcp_limits(limit, limit)?;
        if config.mptcp_gateway_endpoints {
            gateway.mptcp_limits(limit, limit)?;
            for u in &uplinks[1..] {
                if families[usize::from(u.index) - 1].v4() {
                    gateway.mptcp_endpoint_add(&MptcpEndpoint::subflow(
                        u.gateway_v4.into(),
                        &u.gateway_if,
                    ))?;
                }
                if let Some(g6) = u.gateway_v6 {
                    gateway
                        .mptcp_endpoint_add(&MptcpEndpoint::subflow(g6.into(), &u.gateway_if))?;
                }
            }
        }

        if let Some(rates) = &config.rates {
            for (u, &r) in uplinks.iter().zip(rates) {
                u.link.shape(r)?;
            }
        }
        if let Some(delays) = &config.delays {
            for (u, &d) in uplinks.iter().zip(delays) {
                u.link.set_delay(Direction::Both, d)?;
            }
        }

        Ok(StandardLab {
            client,
            gateway,
            converter,
            server,
            lan,
            uplinks,
            server_link,
            config,
            lab,
        })
    }

    /// The underlying [`Lab`] (to add more namespaces that die with this one).
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// Client's LAN address, `10.0.0.1`.
    pub fn client_v4(&self) -> Ipv4Addr {
        self.lan.lower_v4
    }

    /// Client's LAN address, `fd00::1`. Panics without IPv6.
    pub fn client_v6(&self) -> Ipv6Addr {
        self.lan.lower_v6.expect("lab built without ipv6")
    }

    /// Gateway's LAN address, `10.0.0.2`.
    pub fn gateway_lan_v4(&self) -> Ipv4Addr {
        self.lan.upper_v4
    }

    /// Gateway's LAN address, `fd00::2`. Panics without IPv6.
    pub fn gateway_lan_v6(&self) -> Ipv6Addr {
        self.lan.upper_v6.expect("lab built without ipv6")
    }

    /// Converter's address on uplink 1, `10.1.1.2`: where the gateway connects.
    pub fn converter_v4(&self) -> Ipv4Addr {
        self.uplinks[0].converter_v4
    }

    /// Converter's address on uplink 1, `fd00:1:1::2`. Panics without IPv6.
    pub fn converter_v6(&self) -> Ipv6Addr {
        self.uplinks[0]
            .converter_v6
            .expect("lab built without ipv6")
    }

    /// Server's address, `10.2.0.2`.
    pub fn server_v4(&self) -> Ipv4Addr {
        self.server_link.upper_v4
    }

    /// Server's address, `fd00:2::2`. Panics without IPv6.
    pub fn server_v6(&self) -> Ipv6Addr {
        self.server_link.upper_v6.expect("lab built without ipv6")
    }

    /// All four namespaces, client to server.
    pub fn namespaces(&self) -> [&Netns; 4] {
        [&self.client, &self.gateway, &self.converter, &self.server]
    }

    /// What each uplink carries alone towards the gateway, in Mbit/s: one TCP connection
    /// from the converter to the gateway's end of that uplink for `d` (NaN where the transfer
    /// failed). The measured "sum of the links" that bonding is held to.
    pub fn single_link_rates(&self, d: std::time::Duration) -> Vec<f64> {
        self.uplinks
            .iter()
            .map(|u| {
                crate::bulk::Bulk::new(&self.converter, &self.gateway, (u.gateway_v4, 7400).into())
                    .src(u.converter_v4.into())
                    .duration(d)
                    .measure()
                    .map_or(f64::NAN, |t| t.mbit_per_sec())
            })
            .collect()
    }

    /// `(address, name)` pairs for `/etc/hosts`: `client`, `gateway`, `converter`, `server`
    /// (IPv4 addresses as above, plus IPv6 ones when configured), handy for
    /// [`Netns::set_hosts`].
    pub fn hosts(&self) -> Vec<(IpAddr, &'static str)> {
        let mut v: Vec<(IpAddr, &'static str)> = vec![
            (self.client_v4().into(), "client"),
            (self.gateway_lan_v4().into(), "gateway"),
            (self.converter_v4().into(), "converter"),
            (self.server_v4().into(), "server"),
        ];
        if self.config.ipv6 {
            v.extend([
                (self.client_v6().into(), "client"),
                (self.gateway_lan_v6().into(), "gateway"),
                (self.converter_v6().into(), "converter"),
                (self.server_v6().into(), "server"),
            ]);
        }
        v
    }
}
