//! braid: bond several links into one with MPTCP and RFC 8803 Transport Converters.
//!
//! The library behind the `braid` binary, public so that integration tests and benchmarks run
//! the same code as the daemons. Every module:
//!
//! - [`budget`]: the memory all relay buffers may hold (`relay_memory`).
//! - [`cli`]: the command line (clap), one subcommand per role; it turns flags into each
//!   daemon's configuration overlay and is imported by nothing below it.
//! - [`config`]: what both daemons' configurations share: TOML reading, the error that names
//!   the key, prefix and relay validators.
//! - [`daemon`]: the skeleton both daemons run on ([`daemon::Role`]): logging, the open-file
//!   limit, accept loops, metrics, signals, draining.
//! - [`converter`]: the network-side daemon; [`gateway`]: the user-side daemon.
//! - [`client`]: the client side of the Convert protocol (used by the gateway, tests, benches).
//! - [`framed`]: reading one framed message (Convert, SOCKS5) off a stream, in small reads.
//! - [`relay`]: the bidirectional relay shared by both daemons; [`joins`]: its half-close
//!   waits for the kernel to open the extra subflows, and the subflow sampler.
//! - [`ledger`]: the namespace settings braid changed (sysctls, MPTCP limits, announced
//!   endpoints), shared by every braid process in a namespace and undone by the last one, also
//!   after a crash.
//! - [`metrics`]: the Prometheus endpoint; [`logging`]: text or JSON logs; [`status`]: the
//!   control socket `braid status` asks, and its tables.
//! - [`tfo_fix`]: the nftables workaround for the kernel's 0-RTT window bug.
//! - [`demo`] (cargo feature `demo`, on by default): `braid demo`, the namespaced lab with
//!   real daemons; router builds leave it out (`--no-default-features`).
#![forbid(unsafe_code)]

pub mod budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod converter;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod doctor;
pub mod framed;
pub mod gateway;
pub mod joins;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod sendbuf;
pub mod status;
pub mod tfo_fix;
