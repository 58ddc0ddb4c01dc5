//! Transparent capture: the gateway's nftables table and, for TPROXY, its policy routing.
//!
//! Everything lives in one table of braid's own, `inet braid_gateway`, and one routing table
//! with one `ip rule` per family; nothing else on the machine is touched. The table and rules
//! are removed when [`Capture`] is dropped, and a leftover from a crashed run is replaced at
//! start (the table by name; the rules by their fwmark and table number).
//!
//! Rule order in every chain: packets of braid's own sockets (output only), destinations that
//! are local addresses, the converters, bypassed prefixes and ports all leave the chain first;
//! what remains and matches the capture prefixes (and source prefixes) is captured. TPROXY's
//! prerouting chain first hands packets of captured connections to their transparent socket
//! and lets every packet that is not a first SYN leave, since only first SYNs are captured.

use std::io;
use std::net::IpAddr;

use braid_sys::nft::matches::{eq, nfproto, not_syn_only, set_mark, syn_only, tcp, tcp_dport};
use braid_sys::nft::{
    self, BaseChain, Batch, Expr, Family, Hook, NF_ACCEPT, NFT_RETURN, REG_1, base, fib, meta,
    priority,
};
use ipnet::IpNet;

use super::config::Settings;

pub const TABLE: &str = "braid_gateway";

/// How transparent capture steers connections to the gateway (`transparent`,
/// `--transparent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransparentMode {
    /// nftables TPROXY (forwarded LAN traffic, IPv4 and IPv6).
    Tproxy,
    /// nftables REDIRECT with SO_ORIGINAL_DST.
    Redirect,
}

/// The mark braid's own sockets carry so that the output capture lets them through.
pub fn own_mark(fwmark: u32) -> u32 {
    fwmark.wrapping_add(1)
}

/// Installed capture; dropping it removes the table and the routing rules.
#[derive(Debug)]
pub struct Capture {
    routing: Option<braid_sys::route::TproxyRouting>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = nft::delete_table_if_exists(Family::Inet, TABLE) {
            tracing::warn!(table = TABLE, error = %e, "could not remove the capture table");
        }
        if let Some(r) = self.routing.take() {
            r.remove();
        }
    }
}

/// Removes what a crashed run may have left: the table and the TPROXY routing.
pub fn remove_stale(s: &Settings) {
    match nft::delete_table_if_exists(Family::Inet, TABLE) {
        Ok(true) => tracing::info!(
            table = TABLE,
            "removed a capture table left by an earlier run"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not check for a stale capture table"),
    }
    braid_sys::route::TproxyRouting::remove_stale(s.fwmark, s.route_table);
}

/// Installs the capture for `mode`.
pub fn install(s: &Settings, mode: TransparentMode) -> io::Result<Capture> {
    remove_stale(s);
    let routing = match mode {
        TransparentMode::Tproxy => Some(braid_sys::route::TproxyRouting::install(
            s.fwmark,
            s.route_table,
        )?),
        TransparentMode::Redirect => None,
    };
    let capture = Capture { routing };
    let mut batch = Batch::new(Family::Inet);
    batch.add_table(TABLE);
    match mode {
        TransparentMode::Tproxy => {
            let pre = BaseChain {
                name: "prerouting".into(),
                kind: "filter",
                hook: Hook::Prerouting,
                priority: priority::MANGLE,
            };
            batch.add_chain(TABLE, &pre);
            // Later packets of captured connections go to the transparent socket as well.
            batch.add_rule(
                TABLE,
                &pre.name,
                &[
                    tcp(),
                    vec![Expr::SocketTransparent { dreg: REG_1 }],
                    vec![eq(vec![1])],
                    set_mark(s.fwmark),
                    vec![Expr::Verdict(NF_ACCEPT)],
                ]
                .concat(),
            );
            // Only first SYNs are captured by address (below), so every other packet leaves
            // here: the MPTCP traffic arriving on the uplinks, and forwarded traffic, then
            // costs one socket lookup and this compare per packet instead of a FIB lookup and
            // every exclusion rule as well.
            batch.add_rule(
                TABLE,
                &pre.name,
                &[tcp(), not_syn_only(), vec![Expr::Verdict(NFT_RETURN)]].concat(),
            );
            add_exclusions(&mut batch, &pre.name, s, false);
            for m in matches(s) {
                for family in [Family::Ipv4, Family::Ipv6] {
                    if !m.fits(family) {
                        continue;
                    }
                    batch.add_rule(
                        TABLE,
                        &pre.name,
                        &[
                            nfproto(family),
                            tcp(),
                            // Only a connection's first packet is captured by address; its
                            // later packets find the transparent socket (rule above). Without
                            // this, replies of forwarded connections that were not captured
                            // (bypassed, or inbound) would be taken as well.
                            syn_only(),
                            m.exprs(family),
                            set_mark(s.fwmark),
                            vec![
                                Expr::Immediate {
                                    dreg: REG_1,
                                    data: s.transparent_port.to_be_bytes().to_vec(),
                                },
                                Expr::Tproxy {
                                    family,
                                    port_reg: REG_1,
                                },
                                Expr::Verdict(NF_ACCEPT),
                            ],
                        ]
                        .concat(),
                    );
                }
            }
            if s.capture_output {
                // Locally generated packets are marked here, routed to `lo` by the policy rule,
                // and come back through prerouting, where the rules above capture them.
                let out = BaseChain {
                    name: "output".into(),
                    kind: "route",
                    hook: Hook::Output,
                    priority: priority::MANGLE,
                };
                batch.add_chain(TABLE, &out);
                add_exclusions(&mut batch, &out.name, s, true);
                for m in matches(s) {
                    for family in [Family::Ipv4, Family::Ipv6] {
                        if m.fits(family) {
                            batch.add_rule(
                                TABLE,
                                &out.name,
                                &[nfproto(family), tcp(), m.exprs(family), set_mark(s.fwmark)]
                                    .concat(),
                            );
                        }
                    }
                }
            }
        }
        TransparentMode::Redirect => {
            let mut chains = vec![BaseChain {
                name: "prerouting".into(),
                kind: "nat",
                hook: Hook::Prerouting,
                priority: priority::DSTNAT,
            }];
            if s.capture_output {
                chains.push(BaseChain {
                    name: "output".into(),
                    kind: "nat",
                    hook: Hook::Output,
                    priority: priority::DSTNAT,
                });
            }
            for chain in &chains {
                batch.add_chain(TABLE, chain);
                add_exclusions(&mut batch, &chain.name, s, chain.hook == Hook::Output);
                for m in matches(s) {
                    for family in [Family::Ipv4, Family::Ipv6] {
                        if m.fits(family) {
                            batch.add_rule(
                                TABLE,
                                &chain.name,
                                &[
                                    nfproto(family),
                                    tcp(),
                                    m.exprs(family),
                                    vec![
                                        Expr::Immediate {
                                            dreg: REG_1,
                                            data: s.transparent_port.to_be_bytes().to_vec(),
                                        },
                                        Expr::Redirect { port_reg: REG_1 },
                                    ],
                                ]
                                .concat(),
                            );
                        }
                    }
                }
            }
        }
    }
    batch.commit()?;
    tracing::info!(
        table = TABLE,
        ?mode,
        port = s.transparent_port,
        "capture installed"
    );
    Ok(capture)
}

/// Rules that let a packet leave the chain uncaptured.
fn add_exclusions(batch: &mut Batch, chain: &str, s: &Settings, output: bool) {
    let ret = Expr::Verdict(NFT_RETURN);
    if output {
        // braid's own connections to converters and servers.
        batch.add_rule(
            TABLE,
            chain,
            &[
                vec![Expr::Meta {
                    key: meta::MARK,
                    dreg: REG_1,
                }],
                vec![eq(own_mark(s.fwmark).to_ne_bytes().to_vec())],
                vec![ret.clone()],
            ]
            .concat(),
        );
    }
    // Connections to the gateway itself (its SOCKS port, ssh, ...) are not "through" it.
    batch.add_rule(
        TABLE,
        chain,
        &[
            tcp(),
            vec![Expr::Fib {
                dreg: REG_1,
                result: fib::RESULT_ADDRTYPE,
                flags: fib::F_DADDR,
            }],
            vec![eq(fib::RTN_LOCAL.to_ne_bytes().to_vec())],
            vec![ret.clone()],
        ]
        .concat(),
    );
    let converters: Vec<IpNet> = s.converters.iter().map(|c| IpNet::from(c.ip())).collect();
    for net in converters.iter().chain(&s.bypass) {
        let family = family_of(net.addr());
        batch.add_rule(
            TABLE,
            chain,
            &[
                nfproto(family),
                tcp(),
                prefix_match(*net, Side::Destination),
                vec![ret.clone()],
            ]
            .concat(),
        );
    }
    for port in &s.bypass_ports {
        batch.add_rule(
            TABLE,
            chain,
            &[tcp(), tcp_dport(*port), vec![ret.clone()]].concat(),
        );
    }
}

/// One capture rule's address conditions: a destination prefix (or any) and a source prefix
/// (or any).
struct Match {
    dest: Option<IpNet>,
    source: Option<IpNet>,
}

impl Match {
    fn fits(&self, family: Family) -> bool {
        [self.dest, self.source]
            .iter()
            .flatten()
            .all(|n| family_of(n.addr()) == family)
    }

    fn exprs(&self, _family: Family) -> Vec<Expr> {
        let mut v = Vec::new();
        if let Some(d) = self.dest {
            v.extend(prefix_match(d, Side::Destination));
        }
        if let Some(src) = self.source {
            v.extend(prefix_match(src, Side::Source));
        }
        v
    }
}

/// Every (destination, source) pair to capture; empty lists mean "any".
fn matches(s: &Settings) -> Vec<Match> {
    let dests: Vec<Option<IpNet>> = if s.capture.is_empty() {
        vec![None]
    } else {
        s.capture.iter().copied().map(Some).collect()
    };
    let sources: Vec<Option<IpNet>> = if s.capture_source.is_empty() {
        vec![None]
    } else {
        s.capture_source.iter().copied().map(Some).collect()
    };
    let mut v = Vec::new();
    for d in &dests {
        for src in &sources {
            v.push(Match {
                dest: *d,
                source: *src,
            });
        }
    }
    v
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::Ipv4,
        IpAddr::V6(_) => Family::Ipv6,
    }
}

/// `ip[6] saddr|daddr & mask == network` (needs a `nfproto` match before it).
fn prefix_match(net: IpNet, side: Side) -> Vec<Expr> {
    let (offset, len, network, mask) = match (net, side) {
        (IpNet::V4(n), Side::Source) => (
            12,
            4,
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
        (IpNet::V4(n), Side::Destination) => (
            16,
            4,
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
        (IpNet::V6(n), Side::Source) => (
            8,
            16,
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
        (IpNet::V6(n), Side::Destination) => (
            24,
            16,
            n.network().octets().to_vec(),
            n.netmask().octets().to_vec(),
        ),
    };
    let mut v = vec![Expr::Payload {
        base: base::NETWORK,
        offset,
        len,
        dreg: REG_1,
    }];
    if net.prefix_len() < net.max_prefix_len() {
        v.push(Expr::Bitwise {
            reg: REG_1,
            mask,
            xor: vec![0; len as usize],
        });
    }
    v.push(eq(network));
    v
}
