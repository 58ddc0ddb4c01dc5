//! Who may use the converter and where they may go. The converter is never an open proxy: a
//! client must be inside an allowed prefix, and destinations pass three gates:
//!
//! 1. Addresses no converter should ever reach (unspecified, multicast, broadcast, link-local,
//!    loopback unless allowed for tests, the converter's own addresses, port 0) make the Connect
//!    malformed: Error 1 (a destination that is merely outside policy gets Error 32).
//! 2. Ports: `deny_ports`, and `allow_ports` when it is not empty: Error 32.
//! 3. Prefixes, by longest match as in a routing table: `deny_dest` and `allow_dest` entries,
//!    plus built-in denies for private and ULA space (so `allow_dest = ["10.2.0.0/16"]` opens that
//!    part of 10/8, while `0.0.0.0/0` does not). When `allow_dest` is not empty, a destination
//!    that matches no allow entry is refused. At equal length an explicit deny beats an explicit
//    allow, which beats the built-in private deny. Refusal: Error 32.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use ipnet::IpNet;

use super::config::Settings;

/// What the policy says about a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestVerdict {
    Allowed,
    /// A destination no converter may reach: Error 1.
    Forbidden(&'static str),
    /// Outside the operator's policy: Error 32.
    NotAuthorized(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Allow,
    Deny,
    /// Private or ULA space, denied unless a longer allow entry opens part of it.
    Private,
}

#[derive(Debug)]
pub struct Policy {
    allow_clients: Vec<IpNet>,
    allow_any_client: bool,
    rules: Vec<(IpNet, Rule)>,
    allow_list: bool,
    allow_ports: Vec<u16>,
    deny_ports: Vec<u16>,
    allow_loopback: bool,
    /// The converter's own addresses, refreshed by the daemon as interfaces change.
    own: RwLock<Arc<Vec<IpAddr>>>,
}

const PRIVATE: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

impl Policy {
    pub fn new(s: &Settings) -> Policy {
        let mut rules: Vec<(IpNet, Rule)> = PRIVATE
            .iter()
            .map(|p| (p.parse().expect("built-in prefix"), Rule::Private))
            .collect();
        rules.extend(s.allow_dest.iter().map(|n| (*n, Rule::Allow)));
        rules.extend(s.deny_dest.iter().map(|n| (*n, Rule::Deny)));
        Policy {
            allow_clients: s.allow_client.clone(),
            allow_any_client: s.allow_any_client,
            rules,
            allow_list: !s.allow_dest.is_empty(),
            allow_ports: s.allow_ports.clone(),
            deny_ports: s.deny_ports.clone(),
            allow_loopback: s.allow_loopback_dest,
            own: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// Replaces the set of the converter's own addresses.
    pub fn set_own_addresses(&self, addrs: Vec<IpAddr>) {
        let addrs = addrs.into_iter().map(|a| a.to_canonical()).collect();
        *self.own.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(addrs);
    }

    pub fn client_allowed(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.allow_any_client || self.allow_clients.iter().any(|n| n.contains(&client))
    }

    pub fn check_destination(&self, dest: SocketAddr) -> DestVerdict {
        let ip = dest.ip().to_canonical();
        if let Some(why) = self.forbidden(ip) {
            return DestVerdict::Forbidden(why);
        }
        if dest.port() == 0 {
            return DestVerdict::Forbidden("port 0");
        }
        if self.deny_ports.contains(&dest.port()) {
            return DestVerdict::NotAuthorized("port denied");
        }
        if !self.allow_ports.is_empty() && !self.allow_ports.contains(&dest.port()) {
            return DestVerdict::NotAuthorized("port not allowed");
        }
        // Longest prefix wins; at equal length an explicit deny beats an explicit allow, which
        // beats the built-in private deny.
        let best = self
            .rules
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, rule)| {
                let rank = match rule {
                    Rule::Private => 0,
                    Rule::Allow => 1,
                    Rule::Deny => 2,
                };
                (net.prefix_len(), rank)
            })
            .map(|(_, rule)| *rule);
        match best {
            Some(Rule::Deny) => DestVerdict::NotAuthorized("destination denied"),
            Some(Rule::Private) => DestVerdict::NotAuthorized("private destination not allowed"),
            Some(Rule::Allow) => DestVerdict::Allowed,
            None if self.allow_list => DestVerdict::NotAuthorized("destination not allowed"),
            None => DestVerdict::Allowed,
        }
    }

    fn forbidden(&self, ip: IpAddr) -> Option<&'static str> {
        if ip.is_unspecified() {
            return Some("unspecified address");
        }
        if ip.is_multicast() {
            return Some("multicast address");
        }
        if ip.is_loopback() && !self.allow_loopback {
            return Some("loopback address");
        }
        match ip {
            IpAddr::V4(v4) => {
                if v4 == Ipv4Addr::BROADCAST {
                    return Some("broadcast address");
                }
                if v4.is_link_local() {
                    return Some("link-local address");
                }
                // 0.0.0.0/8 means "this network": never a destination.
                if v4.octets()[0] == 0 {
                    return Some("unspecified address");
                }
            }
            IpAddr::V6(v6) => {
                if v6.is_unicast_link_local() {
                    return Some("link-local address");
                }
            }
        }
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        if own.contains(&ip) && !(ip.is_loopback() && self.allow_loopback) {
            return Some("the converter's own address");
        }
        None
    }
}

/// Every address configured on this host's interfaces (in the current network namespace).
pub fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| {
            let sa = ifa.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::converter::config::File;

    /// A policy from the converter's flags of the same names.
    fn policy(flags: &[&str]) -> Policy {
        let mut f = File::default();
        let mut it = flags.iter();
        while let Some(flag) = it.next() {
            let list = match *flag {
                "--allow-any-client" => {
                    f.allow_any_client = Some(true);
                    continue;
                }
                "--allow-loopback-dest" => {
                    f.allow_loopback_dest = Some(true);
                    continue;
                }
                "--allow-client" => &mut f.allow_client,
                "--allow-dest" => &mut f.allow_dest,
                "--deny-dest" => &mut f.deny_dest,
                other => panic!("no such flag in this test: {other}"),
            };
            let value = it.next().expect("flag value").to_string();
            list.get_or_insert_with(Vec::new).push(value);
        }
        let mut s = Settings::validate(f, None).unwrap();
        s.allow_ports = vec![];
        Policy::new(&s)
    }

    fn dest(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clients_must_be_listed() {
        let p = policy(&[
            "--allow-client",
            "10.1.0.0/16",
            "--allow-client",
            "2001:db8::/32",
        ]);
        assert!(p.client_allowed("10.1.2.3".parse().unwrap()));
        assert!(
            p.client_allowed("::ffff:10.1.2.3".parse().unwrap()),
            "mapped v4 client"
        );
        assert!(p.client_allowed("2001:db8::1".parse().unwrap()));
        assert!(!p.client_allowed("10.2.0.1".parse().unwrap()));
        assert!(policy(&["--allow-any-client"]).client_allowed("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn never_reachable_destinations_are_malformed() {
        let p = policy(&["--allow-any-client"]);
        p.set_own_addresses(vec!["198.51.100.7".parse().unwrap()]);
        for d in [
            "0.0.0.0:80",
            "[::]:80",
            "224.0.0.1:80",
            "[ff02::1]:80",
            "255.255.255.255:80",
            "169.254.1.1:80",
            "[fe80::1]:80",
            "127.0.0.1:80",
            "[::1]:80",
            "198.51.100.7:80",
            "0.1.2.3:80",
            "198.51.100.8:0",
        ] {
            assert!(
                matches!(p.check_destination(dest(d)), DestVerdict::Forbidden(_)),
                "{d}"
            );
        }
        let lo = policy(&["--allow-any-client", "--allow-loopback-dest"]);
        assert_eq!(
            lo.check_destination(dest("127.0.0.1:80")),
            DestVerdict::Allowed
        );
    }

    #[test]
    fn private_space_needs_an_explicit_allow() {
        let p = policy(&["--allow-any-client"]);
        assert_eq!(
            p.check_destination(dest("192.0.2.1:80")),
            DestVerdict::Allowed
        );
        for d in [
            "10.2.0.2:80",
            "192.168.1.1:80",
            "[fd00::1]:80",
            "100.64.0.1:80",
        ] {
            assert!(
                matches!(p.check_destination(dest(d)), DestVerdict::NotAuthorized(_)),
                "{d}"
            );
        }
        let p = policy(&["--allow-any-client", "--allow-dest", "10.2.0.0/24"]);
        assert_eq!(
            p.check_destination(dest("10.2.0.2:80")),
            DestVerdict::Allowed
        );
        // A non-empty allow list refuses the rest...
        assert!(matches!(
            p.check_destination(dest("192.0.2.1:80")),
            DestVerdict::NotAuthorized(_)
        ));
        // ...and a default route does not open private space.
        let p = policy(&["--allow-any-client", "--allow-dest", "0.0.0.0/0"]);
        assert!(matches!(
            p.check_destination(dest("10.2.0.2:80")),
            DestVerdict::NotAuthorized(_)
        ));
        assert_eq!(
            p.check_destination(dest("192.0.2.1:80")),
            DestVerdict::Allowed
        );
    }

    #[test]
    fn longest_match_and_deny_wins_a_tie() {
        let p = policy(&[
            "--allow-any-client",
            "--allow-dest",
            "10.0.0.0/8",
            "--deny-dest",
            "10.9.0.0/16",
            "--deny-dest",
            "10.1.0.0/16",
            "--allow-dest",
            "10.1.0.0/16",
        ]);
        assert_eq!(
            p.check_destination(dest("10.2.0.2:80")),
            DestVerdict::Allowed
        );
        assert!(matches!(
            p.check_destination(dest("10.9.0.1:80")),
            DestVerdict::NotAuthorized(_)
        ));
        assert!(matches!(
            p.check_destination(dest("10.1.0.1:80")),
            DestVerdict::NotAuthorized(_)
        ));
    }

    #[test]
    fn ports() {
        let mut p = policy(&["--allow-any-client"]);
        p.deny_ports = vec![25];
        assert!(matches!(
            p.check_destination(dest("192.0.2.1:25")),
            DestVerdict::NotAuthorized(_)
        ));
        p.allow_ports = vec![80, 443];
        assert_eq!(
            p.check_destination(dest("192.0.2.1:443")),
            DestVerdict::Allowed
        );
        assert!(matches!(
            p.check_destination(dest("192.0.2.1:22")),
            DestVerdict::NotAuthorized(_)
        ));
    }
}
