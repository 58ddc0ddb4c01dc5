//! Policy routing for TPROXY over rtnetlink: `ip rule add fwmark M lookup T` and
//! `ip route add local default dev lo table T`, for IPv4 and IPv6. Packets marked by the
//! capture rules are then delivered locally, where the transparent listener takes them.
//!
//! The functions are synchronous (they run a small runtime on a scoped thread, which shares the
//! caller's network namespace) so that they can be called from `Drop` and from non-async
//! start-up code alike.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// `lo` is interface 1 in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

fn nl_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Runs `f` with an rtnetlink handle on a short-lived runtime on a scoped thread of the
/// caller's namespace.
fn with_handle<T, F, Fut>(f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let (conn, handle, _) = rtnetlink::new_connection()?;
                    let task = tokio::spawn(conn);
                    let r = f(handle).await;
                    task.abort();
                    r
                })
            })
            .join()
            .map_err(|_| io::Error::other("netlink thread panicked"))?
    })
}

/// The TPROXY routing of one fwmark and table; [`TproxyRouting::remove`] undoes it.
#[derive(Debug)]
pub struct TproxyRouting {
    mark: u32,
    table: u32,
}

impl TproxyRouting {
    /// Adds the rule and the local default route for both families.
    pub fn install(mark: u32, table: u32) -> io::Result<TproxyRouting> {
        Self::remove_stale(mark, table);
        with_handle(|h| async move {
            for v6 in [false, true] {
                let route = if v6 {
                    RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                        .table_id(table)
                        .kind(RouteType::Local)
                        .scope(RouteScope::Host)
                        .output_interface(LOOPBACK_INDEX)
                        .build()
                } else {
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                        .table_id(table)
                        .kind(RouteType::Local)
                        .scope(RouteScope::Host)
                        .output_interface(LOOPBACK_INDEX)
                        .build()
                };
                h.route()
                    .add(route)
                    .replace()
                    .execute()
                    .await
                    .map_err(|e| {
                        nl_err(
                            &format!("ip route add local default dev lo table {table}"),
                            e,
                        )
                    })?;
                let rule = h
                    .rule()
                    .add()
                    .fw_mark(mark)
                    .table_id(table)
                    .action(RuleAction::ToTable);
                let r = if v6 {
                    rule.v6().execute().await
                } else {
                    rule.v4().execute().await
                };
                r.map_err(|e| nl_err(&format!("ip rule add fwmark {mark:#x} lookup {table}"), e))?;
            }
            Ok(())
        })?;
        Ok(TproxyRouting { mark, table })
    }

    /// Removes what [`install`](Self::install) added.
    pub fn remove(self) {
        Self::remove_stale(self.mark, self.table);
    }

    /// Removes every rule with this mark and table, and the table's routes, in both families:
    /// also what a crashed run left behind. Errors are logged by the caller's absence of
    /// effect only; nothing here can make things worse.
    pub fn remove_stale(mark: u32, table: u32) {
        let _ = with_handle(|h| async move {
            for version in [IpVersion::V4, IpVersion::V6] {
                let rules: Vec<_> = h
                    .rule()
                    .get(version.clone())
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| nl_err("ip rule list", e))?;
                for rule in rules {
                    let ours = rule.attributes.contains(&RuleAttribute::FwMark(mark))
                        && (rule.attributes.contains(&RuleAttribute::Table(table))
                            || u32::from(rule.header.table) == table);
                    if ours {
                        let _ = h.rule().del(rule).execute().await;
                    }
                }
                let filter = match version {
                    IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                        .table_id(table)
                        .build(),
                    IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                        .table_id(table)
                        .build(),
                };
                let routes: Vec<_> = h
                    .route()
                    .get(filter)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| nl_err("ip route list", e))?;
                for route in routes {
                    let in_table = route.attributes.iter().any(|a| {
                        matches!(a, rtnetlink::packet_route::route::RouteAttribute::Table(t) if *t == table)
                    }) || u32::from(route.header.table) == table;
                    if in_table && route.header.kind == RouteType::Local {
                        let _ = h.route().del(route).execute().await;
                    }
                }
            }
            Ok(())
        });
    }

    /// Whether any rule with this mark is installed (for tests and diagnostics).
    pub fn present(mark: u32) -> io::Result<bool> {
        with_handle(|h| async move {
            for version in [IpVersion::V4, IpVersion::V6] {
                let rules: Vec<_> = h
                    .rule()
                    .get(version)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(|e| nl_err("ip rule list", e))?;
                if rules
                    .iter()
                    .any(|r| r.attributes.contains(&RuleAttribute::FwMark(mark)))
                {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }
}

/// Whether `ip` is an address of this namespace's interfaces (or loopback).
pub fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback()
        || nix::ifaddrs::getifaddrs()
            .map(|addrs| {
                addrs.filter_map(|a| a.address).any(|sa| {
                    sa.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())) == Some(ip)
                        || sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())) == Some(ip)
                })
            })
            .unwrap_or(false)
}
