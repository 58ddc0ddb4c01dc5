//! The gateway's uplinks as decisions over observations, with no I/O: which interfaces are
//! uplinks and in what state ([`assess`]), and what the kernel must hold so that each subflow
//! leaves by its own link ([`desired`]): per uplink and family, a routing table with the
//! uplink's connected subnet and default route, a source rule `from ADDR lookup TABLE`, and an
//! MPTCP `subflow` endpoint bound to the device. `paths.rs` reads the kernel's state, calls
//! these, and applies the difference ([`Programmed::changes`]).
//!
//! Why each piece: without the source rule and table, a subflow bound to the LTE address still
//! leaves by the DSL line's default route (measured: 18.9 instead of 47 Mbit/s over 20 + 30);
//! without `dev` on the endpoint the kernel may pick another interface; and an endpoint that
//! is deleted and added again makes the kernel open a subflow from it on every running
//! connection at once, which is how a returning uplink (or a new address) is put back to work:
//! the kernel never recreates a subflow it closed by itself.
//!
//! Everything braid adds carries its own numbers: routing tables and rule priorities
//! `base + slot`, endpoint ids `id_base + 2 × slot (+1 for IPv6)`, so that leftovers of a
//! crashed run can be found and removed without touching anything else.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use braid_sys::rtnl::{Address, Link, MAIN_TABLE, Route, Rule};
use ipnet::IpNet;

pub use super::health::Health;

/// At most this many uplinks (the kernel's limit of 8 subflows per connection).
pub const MAX_UPLINKS: u8 = 8;

/// An uplink as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConf {
    pub interface: String,
    /// For logs, metrics and status; the interface name when not given.
    pub name: String,
    /// Carries traffic only when no primary works (MPTCP `backup` priority).
    pub backup: bool,
}

/// Which interfaces are uplinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Listed(Vec<UplinkConf>),
    /// Every interface with a default route in the main table, except loopback and
    /// `exclude` (the interfaces captured from).
    Auto {
        exclude: Vec<String>,
    },
}

/// The numbers braid's kernel objects carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbers {
    /// Routing table of slot 0; slot `i` uses `table_base + i`. Its rules use the same number
    /// as their priority (ahead of the main table's 32766).
    pub table_base: u32,
    /// Endpoint id of slot 0, IPv4; slot `i` uses `id_base + 2i` (IPv4) and `+1` (IPv6).
    pub id_base: u8,
}

impl Numbers {
    pub fn table(&self, slot: u8) -> u32 {
        self.table_base + u32::from(slot)
    }

    pub fn endpoint_id(&self, slot: u8, v6: bool) -> u8 {
        self.id_base + 2 * slot + u8::from(v6)
    }

    /// Whether a table number is one of braid's.
    pub fn owns_table(&self, table: u32) -> bool {
        (self.table_base..self.table_base + u32::from(MAX_UPLINKS)).contains(&table)
    }

    /// Whether an endpoint id is one of braid's.
    pub fn owns_endpoint(&self, id: u8) -> bool {
        (self.id_base..self.id_base.saturating_add(2 * MAX_UPLINKS)).contains(&id)
    }
}

/// What the kernel said, as far as uplinks are concerned.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub links: Vec<Link>,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
}

/// Why an uplink is or is not carrying subflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No such interface (yet): an LTE stick not plugged in.
    Missing,
    /// Administratively down, or no carrier.
    Down,
    /// Up, but no usable global address.
    NoAddress,
    /// Carrying subflows.
    Up,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Missing => "missing",
            State::Down => "down",
            State::NoAddress => "no_address",
            State::Up => "up",
        }
    }
}

/// What an uplink does (decided by [`super::health::roles`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Carries traffic: an endpoint, subflows on every connection, new connections may start
    /// on it. At backup priority, the kernel's scheduler uses it only when no other subflow
    /// can send.
    Carry { backup_prio: bool },
    /// A backup uplink while a primary works: routes and rules (for its probes) but no
    /// endpoint, so not a byte of traffic.
    Standby,
    /// Dead or down: no endpoint; its subflows are closed.
    Out,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Carry { backup_prio: false } => "carrying",
            Role::Carry { backup_prio: true } => "carrying (backup priority)",
            Role::Standby => "standby",
            Role::Out => "out",
        }
    }
}

/// One family of an uplink: its address and how traffic from it leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Path {
    pub addr: IpAddr,
    /// The connected subnet.
    pub net: IpNet,
    /// The default route's gateway (`None`: on-link, as on PPP, or no default route at all).
    pub gateway: Option<IpAddr>,
    /// The main table has a default route through this uplink for this family.
    pub default_route: bool,
    /// That route's metric (lower is preferred).
    pub metric: Option<u32>,
}

/// An uplink and what is known about it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub slot: u8,
    pub name: String,
    pub interface: String,
    pub backup: bool,
    pub ifindex: Option<u32>,
    pub state: State,
    /// Up to one path per family (IPv4 first).
    pub paths: Vec<Path>,
    /// Its health as probed and observed ([`super::health`]); `Up` until judged.
    pub health: Health,
    pub role: Role,
}

/// Interface → slot, kept for the daemon's life so that an uplink keeps its table and
/// endpoint ids when it flaps or when others appear.
#[derive(Debug, Clone, Default)]
pub struct Slots(BTreeMap<String, u8>);

impl Slots {
    /// The slot of `interface`, taking the lowest free one the first time; `None` when all
    /// [`MAX_UPLINKS`] are taken.
    pub fn of(&mut self, interface: &str) -> Option<u8> {
        if let Some(s) = self.0.get(interface) {
            return Some(*s);
        }
        let used: BTreeSet<u8> = self.0.values().copied().collect();
        let free = (0..MAX_UPLINKS).find(|s| !used.contains(s))?;
        self.0.insert(interface.to_string(), free);
        Some(free)
    }
}

/// The best usable global address of a family on `ifindex`: not tentative, not deprecated,
/// a stable one before a temporary (privacy) one, as the kernel prefers for long-lived use.
fn best_address(obs: &Observed, ifindex: u32, v6: bool) -> Option<&Address> {
    obs.addresses
        .iter()
        .filter(|a| a.index == ifindex && a.addr.is_ipv6() == v6 && a.global)
        .filter(|a| !a.tentative && !a.deprecated)
        .filter(|a| !(v6 && is_unicast_link_local(a.addr)))
        .min_by_key(|a| (a.secondary, a.addr))
}

fn is_unicast_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// The main table's default route of a family through `ifindex` with the lowest metric.
fn default_route(obs: &Observed, ifindex: u32, v6: bool) -> Option<&Route> {
    obs.routes
        .iter()
        .filter(|r| r.table == MAIN_TABLE && r.is_default() && r.dst.addr().is_ipv6() == v6)
        .filter(|r| r.oif == Some(ifindex))
        .min_by_key(|r| r.metric.unwrap_or(0))
}

/// The uplinks now: configured ones, or detected ones (see [`Selection::Auto`]).
pub fn assess(sel: &Selection, slots: &mut Slots, obs: &Observed) -> Vec<Uplink> {
    let confs: Vec<UplinkConf> = match sel {
        Selection::Listed(list) => list.clone(),
        Selection::Auto { exclude } => {
            let mut names: Vec<&Link> = obs
                .links
                .iter()
                .filter(|l| !l.loopback && !exclude.contains(&l.name))
                .filter(|l| {
                    default_route(obs, l.index, false).is_some()
                        || default_route(obs, l.index, true).is_some()
                })
                .collect();
            names.sort_by_key(|l| l.index);
            names
                .into_iter()
                .map(|l| UplinkConf {
                    interface: l.name.clone(),
                    name: l.name.clone(),
                    backup: false,
                })
                .collect()
        }
    };
    confs
        .into_iter()
        .filter_map(|c| {
            let slot = slots.of(&c.interface)?;
            let link = obs.links.iter().find(|l| l.name == c.interface);
            let mut paths = Vec::new();
            let state = match link {
                None => State::Missing,
                Some(l) if !(l.up && l.carrier) => State::Down,
                Some(l) => {
                    for v6 in [false, true] {
                        if let Some(a) = best_address(obs, l.index, v6) {
                            let route = default_route(obs, l.index, v6);
                            paths.push(Path {
                                addr: a.addr,
                                net: a.net(),
                                gateway: route.and_then(|r| r.gateway),
                                default_route: route.is_some(),
                                metric: route.and_then(|r| r.metric),
                            });
                        }
                    }
                    if paths.is_empty() {
                        State::NoAddress
                    } else {
                        State::Up
                    }
                }
            };
            // Until health and roles are applied, as the links say: an uplink that is up
            // carries traffic, a backup at backup priority.
            let (health, role) = if state == State::Up {
                (
                    Health::Up,
                    Role::Carry {
                        backup_prio: c.backup,
                    },
                )
            } else {
                (Health::Down, Role::Out)
            };
            Some(Uplink {
                slot,
                name: c.name,
                interface: c.interface,
                backup: c.backup,
                ifindex: link.map(|l| l.index),
                state,
                paths,
                health,
                role,
            })
        })
        .collect()
}

/// The addresses a new connection may start from, best first: uplinks that carry traffic, at
/// normal priority before backup priority, those with a default route before those without,
/// then by the route's metric (the order the routing table itself would choose in). When none
/// carries (every uplink judged dead: the converter may be down, or the probes wrong), every
/// uplink that is up, in the same order: a connection attempt costs nothing to try.
pub fn sources(uplinks: &[Uplink]) -> Vec<IpAddr> {
    let order = |carrying_only: bool| {
        let mut v: Vec<(bool, bool, u32, u8, IpAddr)> = uplinks
            .iter()
            .filter(|u| u.state == State::Up)
            .filter(|u| !carrying_only || matches!(u.role, Role::Carry { .. }))
            .flat_map(|u| {
                let low = match u.role {
                    Role::Carry { backup_prio } => backup_prio,
                    _ => u.backup,
                };
                u.paths
                    .iter()
                    .map(move |p| (low, !p.default_route, p.metric.unwrap_or(0), u.slot, p.addr))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(.., addr)| addr).collect::<Vec<_>>()
    };
    let v = order(true);
    if v.is_empty() { order(false) } else { v }
}

/// An MPTCP endpoint braid wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WantedEndpoint {
    pub id: u8,
    pub addr: IpAddr,
    pub ifindex: u32,
    pub backup: bool,
}

/// The kernel objects braid wants, or holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Programmed {
    pub routes: BTreeSet<RouteKey>,
    pub rules: BTreeSet<RuleKey>,
    pub endpoints: BTreeSet<WantedEndpoint>,
}

/// A route as compared (the kernel's `Route` without what it fills in itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub table: u32,
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub pref_src: Option<IpAddr>,
}

impl RouteKey {
    pub fn route(&self) -> Route {
        Route {
            table: self.table,
            dst: self.dst,
            gateway: self.gateway,
            oif: Some(self.oif),
            pref_src: self.pref_src,
            metric: None,
        }
    }
}

/// A source rule as compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub priority: u32,
    pub table: u32,
    pub src: IpNet,
}

impl RuleKey {
    pub fn rule(&self) -> Rule {
        Rule {
            priority: self.priority,
            table: self.table,
            src: Some(self.src),
            v6: self.src.addr().is_ipv6(),
        }
    }
}

/// What the kernel should hold for these uplinks: for every path of an uplink that is up, its
/// table (connected subnet with the uplink's source, default route via its gateway or on-link)
/// and its source rule, so that its probes leave by it whatever its role; and its endpoint
/// only while it carries traffic.
pub fn desired(uplinks: &[Uplink], n: Numbers) -> Programmed {
    let mut p = Programmed::default();
    for u in uplinks.iter().filter(|u| u.state == State::Up) {
        let Some(oif) = u.ifindex else { continue };
        let table = n.table(u.slot);
        for path in &u.paths {
            let v6 = path.addr.is_ipv6();
            p.routes.insert(RouteKey {
                table,
                dst: path.net,
                gateway: None,
                oif,
                pref_src: Some(path.addr),
            });
            let any = if v6 {
                IpNet::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0)
            } else {
                IpNet::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0)
            }
            .expect("prefix 0 is valid");
            // Without a default route in the main table the uplink still reaches its own
            // subnet (a converter there); with one, everything.
            if path.default_route {
                p.routes.insert(RouteKey {
                    table,
                    dst: any,
                    gateway: path.gateway,
                    oif,
                    pref_src: Some(path.addr),
                });
            }
            p.rules.insert(RuleKey {
                priority: table,
                table,
                src: IpNet::from(path.addr),
            });
            if let Role::Carry { backup_prio } = u.role {
                p.endpoints.insert(WantedEndpoint {
                    id: n.endpoint_id(u.slot, v6),
                    addr: path.addr,
                    ifindex: oif,
                    backup: backup_prio,
                });
            }
        }
    }
    p
}

/// How to get from what is held to what is wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Endpoints whose priority alone changes while no other uplink carries at normal
    /// priority: changed in place (MP_PRIO on their subflows), not closed.
    pub set_priority: Vec<WantedEndpoint>,
    /// Endpoints whose priority changes by replacement (in `del_endpoints` and
    /// `add_endpoints`), given their new priority in place first, so that the subflows the
    /// replacement leaves behind carry it too: the deletion only half-closes a connection's
    /// first subflow (`__mptcp_close_ssk()` keeps `msk->first` and sends a FIN), and the peer
    /// keeps sending on it until the REMOVE_ADDR (one option, over that same lossy subflow)
    /// or the FIN arrives (seen: the converter still sending on it 5 s later), or this MP_PRIO.
    pub announce_priority: Vec<WantedEndpoint>,
    pub del_endpoints: Vec<WantedEndpoint>,
    pub del_rules: Vec<RuleKey>,
    pub del_routes: Vec<RouteKey>,
    pub add_routes: Vec<RouteKey>,
    pub add_rules: Vec<RuleKey>,
    pub add_endpoints: Vec<WantedEndpoint>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

impl Programmed {
    /// The changes that turn `self` (held) into `want`. An endpoint whose address or device
    /// changed is deleted and added again (its id stays), which is also what makes the kernel
    /// open subflows from it on running connections. One whose priority alone changed is
    /// replaced the same way while an endpoint of another uplink is held and stays at normal
    /// priority, and changed in place (MP_PRIO) only when none is. Why not always in place:
    /// the kernel sends MP_PRIO once, on one pure ACK, over the uplink whose loss made it
    /// degraded; lost, the converter keeps sending on the lossy subflow, and what it loses
    /// there waits for that subflow's backed-off retransmissions (docs/architecture.md, kernel
    /// workarounds). A rejoin carries the priority in its MP_JOIN SYN, retransmitted until
    /// answered. Why not always a rejoin: with no other established path it would leave
    /// connections with none for a round trip or more, and there a lost MP_PRIO matters
    /// less (the peer turns to a backup subflow by itself once the others go stale).
    /// Deletions come first, and endpoints go before the routes they need and come after them.
    pub fn changes(&self, want: &Programmed) -> Changes {
        fn gone<T: Ord + Copy>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> Vec<T> {
            a.difference(b).copied().collect()
        }
        let mut del_endpoints = gone(&self.endpoints, &want.endpoints);
        let mut add_endpoints = gone(&want.endpoints, &self.endpoints);
        let same = |a: &WantedEndpoint, b: &WantedEndpoint| {
            (a.id, a.addr, a.ifindex) == (b.id, b.addr, b.ifindex)
        };
        let other_carrier = |a: &WantedEndpoint| {
            want.endpoints
                .iter()
                .any(|w| w.ifindex != a.ifindex && !w.backup && self.endpoints.contains(w))
        };
        // Priority-only changes: replaced (and announced first) beside another carrier, else
        // set in place.
        let (announce_priority, set_priority): (Vec<WantedEndpoint>, Vec<WantedEndpoint>) =
            add_endpoints
                .iter()
                .filter(|a| del_endpoints.iter().any(|d| same(a, d)))
                .partition(|a| other_carrier(a));
        del_endpoints.retain(|d| !set_priority.iter().any(|a| same(a, d)));
        add_endpoints.retain(|a| !set_priority.contains(a));
        Changes {
            set_priority,
            announce_priority,
            del_endpoints,
            del_rules: gone(&self.rules, &want.rules),
            del_routes: gone(&self.routes, &want.routes),
            add_routes: gone(&want.routes, &self.routes),
            add_rules: gone(&want.rules, &self.rules),
            add_endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: Numbers = Numbers {
        table_base: 5181,
        id_base: 200,
    };

    fn link(index: u32, name: &str, up: bool) -> Link {
        Link {
            index,
            name: name.into(),
            up,
            carrier: up,
            loopback: name == "lo",
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    fn addr(index: u32, a: &str, len: u8) -> Address {
        Address {
            index,
            addr: a.parse().unwrap(),
            prefix_len: len,
            global: true,
            tentative: false,
            deprecated: false,
            secondary: false,
        }
    }

    fn default(index: u32, gw: &str, metric: u32) -> Route {
        let gw: IpAddr = gw.parse().unwrap();
        Route {
            table: MAIN_TABLE,
            dst: if gw.is_ipv6() {
                "::/0".parse().unwrap()
            } else {
                "0.0.0.0/0".parse().unwrap()
            },
            gateway: Some(gw),
            oif: Some(index),
            pref_src: None,
            metric: Some(metric),
        }
    }

    /// A home router: LAN on 2, DSL on 3 (IPv4 and IPv6), LTE on 4 (IPv4, CGNAT).
    fn router() -> Observed {
        Observed {
            links: vec![
                link(1, "lo", true),
                link(2, "lan0", true),
                link(3, "dsl0", true),
                link(4, "lte0", true),
            ],
            addresses: vec![
                addr(2, "192.168.1.1", 24),
                addr(3, "198.51.100.7", 24),
                addr(3, "2001:db8:1::7", 64),
                addr(4, "100.64.3.9", 10),
            ],
            routes: vec![
                default(3, "198.51.100.1", 100),
                default(3, "fe80::1", 100),
                default(4, "100.64.0.1", 200),
            ],
        }
    }

    fn auto() -> Selection {
        Selection::Auto {
            exclude: vec!["lan0".into()],
        }
    }

    #[test]
    fn auto_detection_takes_interfaces_with_a_default_route() {
        let ups = assess(&auto(), &mut Slots::default(), &router());
        let names: Vec<_> = ups.iter().map(|u| u.interface.as_str()).collect();
        assert_eq!(names, ["dsl0", "lte0"]);
        assert!(ups.iter().all(|u| u.state == State::Up));
        let dsl = &ups[0];
        assert_eq!(dsl.paths.len(), 2, "both families");
        assert_eq!(dsl.paths[1].gateway, Some("fe80::1".parse().unwrap()));
        // The LAN has no default route, loopback never counts; excluded even if it had one.
        let mut obs = router();
        obs.routes.push(default(2, "192.168.1.254", 50));
        let ups = assess(&auto(), &mut Slots::default(), &obs);
        assert!(ups.iter().all(|u| u.interface != "lan0"));
    }

    #[test]
    fn each_path_gets_a_table_a_rule_and_an_endpoint() {
        let ups = assess(&auto(), &mut Slots::default(), &router());
        let p = desired(&ups, N);
        assert_eq!(p.rules.len(), 3);
        assert!(p.rules.contains(&RuleKey {
            priority: 5182,
            table: 5182,
            src: "100.64.3.9/32".parse().unwrap()
        }));
        let lte_default = RouteKey {
            table: 5182,
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some("100.64.0.1".parse().unwrap()),
            oif: 4,
            pref_src: Some("100.64.3.9".parse().unwrap()),
        };
        assert!(p.routes.contains(&lte_default));
        let ids: Vec<u8> = p.endpoints.iter().map(|e| e.id).collect();
        assert_eq!(ids, [200, 201, 202], "dsl v4, dsl v6, lte v4");
        assert!(p.endpoints.iter().all(|e| N.owns_endpoint(e.id)));
        assert!(p.routes.iter().all(|r| N.owns_table(r.table)));
    }

    #[test]
    fn connections_start_from_the_best_uplink() {
        let mut obs = router();
        let ups = assess(&auto(), &mut Slots::default(), &obs);
        let order: Vec<String> = sources(&ups).iter().map(|a| a.to_string()).collect();
        assert_eq!(order, ["198.51.100.7", "2001:db8:1::7", "100.64.3.9"]);
        // LTE's route becomes the better one; DSL goes down.
        obs.routes.retain(|r| r.oif != Some(4));
        obs.routes.push(default(4, "100.64.0.1", 10));
        let ups = assess(&auto(), &mut Slots::default(), &obs);
        assert_eq!(sources(&ups)[0].to_string(), "100.64.3.9");
        obs.links[2].carrier = false;
        let ups = assess(&auto(), &mut Slots::default(), &obs);
        assert_eq!(sources(&ups).len(), 1);
        // A backup comes last.
        let sel = Selection::Listed(vec![
            UplinkConf {
                interface: "lte0".into(),
                name: "lte".into(),
                backup: true,
            },
            UplinkConf {
                interface: "dsl0".into(),
                name: "dsl".into(),
                backup: false,
            },
        ]);
        let ups = assess(&sel, &mut Slots::default(), &router());
        assert_eq!(sources(&ups).last().unwrap().to_string(), "100.64.3.9");
    }

    #[test]
    fn a_listed_uplink_without_default_route_still_reaches_its_subnet() {
        let sel = Selection::Listed(vec![UplinkConf {
            interface: "lan0".into(),
            name: "direct".into(),
            backup: true,
        }]);
        let ups = assess(&sel, &mut Slots::default(), &router());
        assert_eq!(ups[0].state, State::Up);
        let p = desired(&ups, N);
        assert_eq!(p.routes.len(), 1, "the connected subnet only");
        assert!(p.endpoints.iter().all(|e| e.backup));
    }

    #[test]
    fn states_follow_the_link() {
        let sel = Selection::Listed(vec![
            UplinkConf {
                interface: "dsl0".into(),
                name: "dsl".into(),
                backup: false,
            },
            UplinkConf {
                interface: "usb0".into(),
                name: "lte".into(),
                backup: false,
            },
        ]);
        let mut slots = Slots::default();
        let mut obs = router();
        let ups = assess(&sel, &mut slots, &obs);
        assert_eq!((ups[0].state, ups[1].state), (State::Up, State::Missing));
        obs.links[2].carrier = false;
        assert_eq!(assess(&sel, &mut slots, &obs)[0].state, State::Down);
        obs.links[2].carrier = true;
        obs.addresses.retain(|a| a.index != 3);
        assert_eq!(assess(&sel, &mut slots, &obs)[0].state, State::NoAddress);
        // A tentative or deprecated address is not used; a stable one beats a temporary one.
        let mut tentative = addr(3, "2001:db8:1::8", 64);
        tentative.tentative = true;
        let mut temporary = addr(3, "2001:db8:1::1", 64);
        temporary.secondary = true;
        obs.addresses
            .extend([tentative, temporary, addr(3, "2001:db8:1::9", 64)]);
        let ups = assess(&sel, &mut slots, &obs);
        assert_eq!(
            ups[0].paths[0].addr,
            "2001:db8:1::9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn slots_are_stable_when_uplinks_come_and_go() {
        let mut slots = Slots::default();
        let mut obs = router();
        let first = assess(&auto(), &mut slots, &obs);
        // LTE loses its default route (it is no longer detected), then an interface appears.
        obs.routes.retain(|r| r.oif != Some(4));
        obs.links.push(link(5, "wlan0", true));
        obs.addresses.push(addr(5, "10.9.0.2", 24));
        obs.routes.push(default(5, "10.9.0.1", 300));
        let second = assess(&auto(), &mut slots, &obs);
        assert_eq!(
            second.iter().find(|u| u.interface == "dsl0").unwrap().slot,
            first[0].slot
        );
        assert_eq!(
            second.iter().find(|u| u.interface == "wlan0").unwrap().slot,
            2
        );
        // LTE returns: same slot, same table, same endpoint ids.
        obs.routes.push(default(4, "100.64.0.1", 200));
        let third = assess(&auto(), &mut slots, &obs);
        assert_eq!(
            third.iter().find(|u| u.interface == "lte0").unwrap().slot,
            first[1].slot
        );
    }

    #[test]
    fn a_new_address_replaces_the_endpoint_rule_and_routes() {
        let mut slots = Slots::default();
        let mut obs = router();
        let before = desired(&assess(&auto(), &mut slots, &obs), N);
        obs.addresses
            .retain(|a| a.addr != "100.64.3.9".parse::<IpAddr>().unwrap());
        obs.addresses.push(addr(4, "100.64.7.1", 10));
        let after = desired(&assess(&auto(), &mut slots, &obs), N);
        let c = before.changes(&after);
        assert_eq!(c.del_endpoints.len(), 1);
        assert_eq!(c.add_endpoints.len(), 1);
        assert_eq!(
            c.del_endpoints[0].id, c.add_endpoints[0].id,
            "the id is kept"
        );
        assert_eq!(
            c.add_endpoints[0].addr,
            "100.64.7.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!((c.del_rules.len(), c.add_rules.len()), (1, 1));
        assert_eq!((c.del_routes.len(), c.add_routes.len()), (2, 2));
        assert!(after.changes(&after).is_empty());
    }

    #[test]
    fn a_link_that_goes_down_loses_everything_and_gets_it_back() {
        let mut slots = Slots::default();
        let mut obs = router();
        let up = desired(&assess(&auto(), &mut slots, &obs), N);
        // Down: the kernel also drops its routes, so auto-detection loses it; a listed
        // uplink would say Down. Either way nothing of it stays wanted.
        obs.links[3].carrier = false;
        let down = desired(&assess(&auto(), &mut slots, &obs), N);
        let c = up.changes(&down);
        assert_eq!(c.del_endpoints.len(), 1);
        assert!(c.add_endpoints.is_empty());
        let back = down.changes(&up);
        assert_eq!(back.add_endpoints.len(), 1, "re-added: subflows come back");
    }

    #[test]
    fn a_priority_change_replaces_the_endpoint_while_another_uplink_carries() {
        let ep = |id: u8, ifindex: u32, backup: bool| WantedEndpoint {
            id,
            addr: IpAddr::from([10, 1, id, 1]),
            ifindex,
            backup,
        };
        let held = |eps: &[WantedEndpoint]| Programmed {
            endpoints: eps.iter().copied().collect(),
            ..Programmed::default()
        };
        // Degraded beside a healthy uplink, and back: closed and joined again, each time
        // with the priority in the join itself.
        for (from, to) in [(false, true), (true, false)] {
            let c = held(&[ep(1, 3, from), ep(2, 4, false)])
                .changes(&held(&[ep(1, 3, to), ep(2, 4, false)]));
            assert!(c.set_priority.is_empty(), "{c:?}");
            assert_eq!(c.announce_priority, [ep(1, 3, to)]);
            assert_eq!(c.del_endpoints, [ep(1, 3, from)]);
            assert_eq!(c.add_endpoints, [ep(1, 3, to)]);
        }
        // The other uplink gone, at backup priority, or only now added (its subflows not
        // joined yet): in place, nothing closed while it may be all there is.
        for (before, want) in [
            (
                &[ep(1, 3, true), ep(2, 4, false)][..],
                held(&[ep(1, 3, false)]),
            ),
            (
                &[ep(1, 3, true), ep(2, 4, false)],
                held(&[ep(1, 3, false), ep(2, 4, true)]),
            ),
            (&[ep(1, 3, true)], held(&[ep(1, 3, false), ep(2, 4, false)])),
        ] {
            let c = held(before).changes(&want);
            assert!(c.set_priority.contains(&ep(1, 3, false)), "{c:?}");
            assert!(!c.del_endpoints.contains(&ep(1, 3, true)));
            assert!(!c.add_endpoints.contains(&ep(1, 3, false)));
        }
        // Another endpoint of the same uplink (its IPv6 address) is no other carrier.
        let mut v6 = ep(5, 3, false);
        v6.addr = "fd00:1:1::1".parse().unwrap();
        let mut v6b = v6;
        v6b.backup = true;
        let c = held(&[ep(1, 3, false), v6]).changes(&held(&[ep(1, 3, true), v6b]));
        assert_eq!(c.set_priority.len(), 2, "{c:?}");
    }
}
