//! The machine's interfaces, addresses, routes and policy rules over rtnetlink, as plain values,
//! and changes to the routes and rules braid owns; plus a stream of "something changed"
//! notifications (link, address and route events). What the gateway's uplink management reads
//! and writes, with no `ip` process.
//!
//! Values are deliberately small: only what deciding about uplinks needs. A route or rule read
//! from the kernel can be deleted again through the same value.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{Stream, StreamExt, TryStreamExt};
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, MulticastGroup, RouteMessageBuilder};

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

fn nl_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Runs a dump again when the kernel says it changed while it was being read (EBUSY: the
/// dump was interrupted), which happens whenever routes or addresses change at that moment,
/// as they do when a link comes up.
async fn dump<T, F, Fut>(what: &str, mut f: F) -> io::Result<Vec<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, rtnetlink::Error>>,
{
    let mut tries = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EBUSY && tries < 8 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5 * tries)).await;
            }
            Err(e) => return Err(nl_err(what, e)),
        }
    }
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Carrier: the link below works (`IFF_LOWER_UP`).
    pub carrier: bool,
    /// The loopback interface.
    pub loopback: bool,
    /// Bytes received and sent since the interface was created.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// An address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// Scope global (not link-local, not host).
    pub global: bool,
    /// IPv6 duplicate address detection has not finished (or failed): not usable yet.
    pub tentative: bool,
    /// IPv6: past its preferred lifetime (a renumbered prefix on its way out).
    pub deprecated: bool,
    /// IPv6: a temporary (privacy) address; IPv4: a secondary address of the subnet.
    pub secondary: bool,
}

impl Address {
    /// The subnet the address is on.
    pub fn net(&self) -> IpNet {
        IpNet::new(self.addr, self.prefix_len)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(self.addr))
    }
}

/// A unicast route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub table: u32,
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub pref_src: Option<IpAddr>,
    pub metric: Option<u32>,
}

impl Route {
    pub fn is_default(&self) -> bool {
        self.dst.prefix_len() == 0
    }
}

/// A policy rule `from SRC lookup TABLE` at a priority.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub priority: u32,
    pub table: u32,
    pub src: Option<IpNet>,
    pub v6: bool,
}

/// An rtnetlink connection on the caller's tokio runtime (its socket belongs to the network
/// namespace of the thread that opens it).
#[derive(Debug, Clone)]
pub struct Rtnl {
    handle: Handle,
}

impl Rtnl {
    /// Opens the connection; its task runs on the current runtime until the last clone drops.
    pub fn new() -> io::Result<Rtnl> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Rtnl { handle })
    }

    pub async fn links(&self) -> io::Result<Vec<Link>> {
        let msgs = dump("ip link show", || {
            self.handle.link().get().execute().try_collect()
        })
        .await?;
        Ok(msgs
            .into_iter()
            .map(|m| Link {
                index: m.header.index,
                name: m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                    .unwrap_or_default(),
                up: m.header.flags.contains(LinkFlags::Up),
                carrier: m.header.flags.contains(LinkFlags::LowerUp),
                loopback: m.header.flags.contains(LinkFlags::Loopback),
                rx_bytes: stats(&m.attributes).0,
                tx_bytes: stats(&m.attributes).1,
            })
            .collect())
    }

    pub async fn addresses(&self) -> io::Result<Vec<Address>> {
        let msgs = dump("ip address show", || {
            self.handle.address().get().execute().try_collect()
        })
        .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                // IFA_LOCAL is the interface's own address on point-to-point links (PPP);
                // IFA_ADDRESS is then the peer's. Elsewhere they are the same.
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let addr = local.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                let flags = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Flags(f) => Some(*f),
                    _ => None,
                });
                let has = |flag| flags.is_some_and(|f: AddressFlags| f.contains(flag));
                Some(Address {
                    index: m.header.index,
                    addr,
                    prefix_len: m.header.prefix_len,
                    global: m.header.scope == AddressScope::Universe,
                    tentative: has(AddressFlags::Tentative) || has(AddressFlags::Dadfailed),
                    deprecated: has(AddressFlags::Deprecated),
                    secondary: has(AddressFlags::Secondary),
                })
            })
            .collect())
    }

    /// Every unicast route of both families, in every table.
    pub async fn routes(&self) -> io::Result<Vec<Route>> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let filter = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let msgs = dump("ip route show table all", || {
                self.handle
                    .route()
                    .get(filter.clone())
                    .execute()
                    .try_collect()
            })
            .await?;
            out.extend(msgs.iter().filter_map(route_of));
        }
        Ok(out)
    }

    /// Adds (or replaces) a route.
    pub async fn add_route(&self, r: &Route) -> io::Result<()> {
        self.handle
            .route()
            .add(route_message(r))
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err(&format!("ip route replace {}", describe_route(r)), e))
    }

    /// Deletes a route; one that is already gone is not an error.
    pub async fn del_route(&self, r: &Route) -> io::Result<()> {
        match self.handle.route().del(route_message(r)).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(e) => Err(nl_err(&format!("ip route del {}", describe_route(r)), e)),
        }
    }

    /// Every policy rule of both families.
    pub async fn rules(&self) -> io::Result<Vec<Rule>> {
        let mut out = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let msgs: Vec<RuleMessage> = dump("ip rule show", || {
                self.handle
                    .rule()
                    .get(version.clone())
                    .execute()
                    .try_collect()
            })
            .await?;
            out.extend(msgs.iter().map(rule_of));
        }
        Ok(out)
    }

    pub async fn add_rule(&self, r: &Rule) -> io::Result<()> {
        let req = self
            .handle
            .rule()
            .add()
            .table_id(r.table)
            .priority(r.priority)
            .action(RuleAction::ToTable);
        let result = match (r.v6, r.src) {
            (false, Some(IpNet::V4(n))) => {
                req.v4()
                    .source_prefix(n.addr(), n.prefix_len())
                    .execute()
                    .await
            }
            (true, Some(IpNet::V6(n))) => {
                req.v6()
                    .source_prefix(n.addr(), n.prefix_len())
                    .execute()
                    .await
            }
            (false, None) => req.v4().execute().await,
            (true, None) => req.v6().execute().await,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "rule source of the other family",
                ));
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(nl_err(&format!("ip rule add {}", describe_rule(r)), e)),
        }
    }

    /// Deletes a rule; one that is already gone is not an error.
    pub async fn del_rule(&self, r: &Rule) -> io::Result<()> {
        let mut msg = RuleMessage::default();
        msg.header.family = if r.v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.action = RuleAction::ToTable;
        msg.attributes.push(RuleAttribute::Priority(r.priority));
        msg.attributes.push(RuleAttribute::Table(r.table));
        if let Some(src) = r.src {
            msg.header.src_len = src.prefix_len();
            msg.attributes.push(RuleAttribute::Source(src.addr()));
        }
        match self.handle.rule().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::ENOENT || e.raw_code() == -libc::ESRCH =>
            {
                Ok(())
            }
            Err(e) => Err(nl_err(&format!("ip rule del {}", describe_rule(r)), e)),
        }
    }
}

/// A stream that yields once per batch of link, address or route events of this namespace:
/// a cue to read the state again, not the change itself (re-reading is what stays right when
/// events are lost or come out of order).
pub fn changes() -> io::Result<impl Stream<Item = ()> + Send + Unpin> {
    let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    tokio::spawn(conn);
    Ok(messages.map(|_| ()))
}

/// (rx, tx) bytes of a link message.
fn stats(attrs: &[LinkAttribute]) -> (u64, u64) {
    attrs
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Stats64(s) => Some((s.rx_bytes, s.tx_bytes)),
            _ => None,
        })
        .unwrap_or((0, 0))
}

fn addr_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}

/// The route a kernel message describes, if it is a plain unicast route.
fn route_of(m: &RouteMessage) -> Option<Route> {
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let v6 = m.header.address_family == AddressFamily::Inet6;
    let mut r = Route {
        table: u32::from(m.header.table),
        dst: if v6 {
            IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).ok()?
        } else {
            IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).ok()?
        },
        gateway: None,
        oif: None,
        pref_src: None,
        metric: None,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Destination(d) => {
                r.dst = IpNet::new(addr_of(d)?, m.header.destination_prefix_length).ok()?
            }
            RouteAttribute::Gateway(g) => r.gateway = addr_of(g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::PrefSource(s) => r.pref_src = addr_of(s),
            RouteAttribute::Priority(p) => r.metric = Some(*p),
            _ => {}
        }
    }
    Some(r)
}

fn route_message(r: &Route) -> RouteMessage {
    let scope = if r.gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    let mut m = match r.dst {
        IpNet::V4(d) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .table_id(r.table)
                .protocol(RouteProtocol::Static)
                .scope(scope);
            if let Some(IpAddr::V4(g)) = r.gateway {
                b = b.gateway(g);
            }
            if let Some(IpAddr::V4(s)) = r.pref_src {
                b = b.pref_source(s);
            }
            b.build()
        }
        IpNet::V6(d) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .table_id(r.table)
                .protocol(RouteProtocol::Static)
                .scope(scope);
            if let Some(IpAddr::V6(g)) = r.gateway {
                b = b.gateway(g);
            }
            if let Some(IpAddr::V6(s)) = r.pref_src {
                b = b.pref_source(s);
            }
            b.build()
        }
    };
    if let Some(i) = r.oif {
        m.attributes.push(RouteAttribute::Oif(i));
    }
    if let Some(p) = r.metric {
        m.attributes.push(RouteAttribute::Priority(p));
    }
    m
}

fn rule_of(m: &RuleMessage) -> Rule {
    let mut r = Rule {
        priority: 0,
        table: u32::from(m.header.table),
        src: None,
        v6: m.header.family == AddressFamily::Inet6,
    };
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => r.priority = *p,
            RuleAttribute::Table(t) => r.table = *t,
            RuleAttribute::Source(s) => r.src = IpNet::new(*s, m.header.src_len).ok(),
            _ => {}
        }
    }
    r
}

fn describe_route(r: &Route) -> String {
    let mut s = format!("{} table {}", r.dst, r.table);
    if let Some(g) = r.gateway {
        s += &format!(" via {g}");
    }
    if let Some(i) = r.oif {
        s += &format!(" dev #{i}");
    }
    if let Some(p) = r.pref_src {
        s += &format!(" src {p}");
    }
    s
}

fn describe_rule(r: &Rule) -> String {
    match r.src {
        Some(src) => format!("pref {} from {src} lookup {}", r.priority, r.table),
        None => format!("pref {} lookup {}", r.priority, r.table),
    }
}
