//! braid-lab: test networks for braid, built from Linux network namespaces. Needs root.
//!
//! - [`netns`]: [`Netns`], one namespace made the `ip netns add` way (`ip netns exec` works on
//!   it): run Rust code inside it ([`Netns::enter`], [`Netns::thread`]), run commands
//!   ([`Netns::run`], [`Netns::spawn`], [`Netns::command`]), addresses, routes, rules,
//!   sysctls, MPTCP limits and endpoints, `/etc/hosts`; and [`sweep`] for crashed runs.
//! - [`link`]: [`Link`], a veth pair between two namespaces, and what tests do to it while
//!   traffic runs: shaping (tbf), one-way delay and jitter, random loss and blackholing (nft,
//!   dropped on arrival at the peer, as the wire would), down/up, address removal and
//!   replacement.
//! - [`delay`]: the user-space delay line behind [`LinkEnd::set_delay`] (this kernel has no
//!   netem), and its [`Delay`] setting.
//! - [`lab`]: [`Lab`], a set of namespaces deleted together when it drops, panics included.
//! - [`standard`]: [`StandardLab`], the project's client → gateway ⇉ converter → server
//!   topology in one call.
//! - [`process`]: [`Process`], a program running in a namespace, stopped when dropped.
//! - [`bulk`]: a one-connection TCP/MPTCP transfer that measures throughput; [`iperf3`]: an
//!   iperf3 run with a server of its own; [`http`]: a minimal HTTP file server; [`stream`]: a
//!   paced live stream whose receiver checks every byte and records the longest gap.
//! - [`cgroup`]: [`cgroup::CpuQuota`], processes held to a fraction of a core (benchmarks of
//!   a small router's CPU).
//! - [`routing`]: [`Route`], [`Rule`] and [`MptcpEndpoint`] values.
//!
//! Namespaces are named `blab-<pid>-<n>-<role>`, so parallel test processes never collide,
//! and [`sweep`] (run by [`Lab::new`]) removes exactly those whose `<pid>` is dead. Interfaces
//! are created directly inside their namespaces, so their short names (`g-v1`) never meet
//! in the host namespace. Links, addresses and routes go through rtnetlink; rules, MPTCP,
//! tc and nft through their command-line tools.
//!
//! ```no_run
//! use std::time::Duration;
//! use braid_lab::{StandardConfig, StandardLab, bulk::Bulk};
//!
//! # fn main() -> braid_lab::Result<()> {
//! let lab = StandardLab::new(StandardConfig {
//!     uplinks: 2,
//!     rates: Some(vec![20_000_000, 30_000_000]),
//!     ..StandardConfig::default()
//! })?;
//! // A server in its namespace (a process, stopped when `srv` drops); the client waits for it.
//! let _srv = lab.server.spawn(["iperf3", "-s", "-p", "5201"])?;
//! lab.client.wait_for_tcp((lab.server_v4(), 5201).into(), Duration::from_secs(2))?;
//! // Bulk transfer from the gateway over uplink 2 (its source address selects the link).
//! let up = &lab.uplinks[1];
//! let t = Bulk::new(&lab.gateway, &lab.converter, (up.converter_v4, 5001).into())
//!     .src(up.gateway_v4.into())
//!     .duration(Duration::from_secs(2))
//!     .measure()?;
//! println!("uplink 2: {t}"); // ~28.7 Mbit/s of payload on a 30 Mbit/s link
//! up.link.down()?; // failover
//! up.link.up()?; // addresses and routes come back
//! // 20 ms each way on uplink 2 (RTT 40 ms), changeable while traffic runs.
//! up.link.set_delay(braid_lab::Direction::Both, Duration::from_millis(20))?;
//! // Rust code inside a namespace, e.g. to open sockets there.
//! let listener = lab.server.enter(|| std::net::TcpListener::bind("0.0.0.0:9000"))?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod bulk;
pub mod cgroup;
pub mod delay;
mod error;
pub mod http;
pub mod iperf3;
pub mod lab;
pub mod link;
pub mod netns;
pub mod process;
pub mod routing;
pub mod standard;
pub mod stream;
pub mod upload;

pub use delay::{Delay, DelayStats};
pub use error::{Error, Result};
pub use lab::Lab;
pub use link::{Direction, Link, LinkEnd};
pub use netns::{CmdOutput, Netns, NsThread, PREFIX, lab_namespaces, sweep};
pub use process::{NsCommand, Output, Process, Signal};
pub use routing::{EndpointKind, MptcpEndpoint, Route, RouteKind, Rule};
pub use standard::{
    Families, FastOpen, GatewayRouting, Segment, StandardConfig, StandardLab, Uplink,
};
