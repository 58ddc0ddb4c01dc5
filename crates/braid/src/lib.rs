//! braid: bond several links into one with MPTCP and RFC 8803 Transport Converters.
//!
//! The library behind the `braid` binary, public so that integration tests and benchmarks run
//! the same code as the daemons.
//!
//! - [`cli`]: the command line (clap), one subcommand per role; [`config`]: TOML helpers.
//! - [`converter`]: the network-side daemon.
//! - [`client`]: the client side of the Convert protocol (used by the gateway, tests, benches).
//! - [`relay`]: the bidirectional relay shared by both daemons; [`joins`]: its half-close
//!   waits for the kernel to open the extra subflows.
//! - [`metrics`], [`logging`]: operations.
//! - [`tfo_fix`]: the nftables workaround for the kernel's 0-RTT window bug.

pub mod cli;
pub mod client;
pub mod config;
pub mod converter;
pub mod daemon;
pub mod demo;
pub mod gateway;
pub mod joins;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod tfo_fix;
