//! The command line. Every daemon flag also exists as a key of the TOML config file
//! (`--config FILE`); flags given on the command line override the file.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "braid",
    version,
    about = "Bond several network links into one: TCP carried over Multipath TCP through an \
             RFC 8803 Transport Converter",
    long_about = "braid bonds several network links (DSL, LTE, Ethernet, Wi-Fi; IPv4 and IPv6) \
                  into one. On the user side, `braid gateway` captures ordinary TCP connections \
                  (transparently or through SOCKS5) and carries each over Multipath TCP to a \
                  converter, using every uplink at once. On the network side, `braid converter` \
                  accepts those MPTCP connections, learns the destination from the Convert \
                  protocol (RFC 8803, carried in the SYN with TCP Fast Open: no extra round \
                  trip) and relays to the server over plain TCP.\n\nTry `braid demo` (as root) \
                  for a self-contained demonstration in network namespaces."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Network side: accept MPTCP + Convert connections and relay them to servers over TCP.
    Converter(ConverterArgs),
    /// User side: capture LAN TCP connections and carry them over MPTCP to a converter.
    Gateway(GatewayArgs),
    /// Build a namespaced lab (LAN client, gateway with two shaped uplinks, converter, server),
    /// run real braid processes in it, download a file and report per-uplink rates.
    Demo(DemoArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Args)]
pub struct ConverterArgs {
    /// Address to accept MPTCP connections on (repeatable). `[::]:PORT` listens dual-stack.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Client prefix allowed to use this converter (repeatable). There is no default: an
    /// empty list refuses to start unless --allow-any-client is given.
    #[arg(long, value_name = "PREFIX")]
    pub allow_client: Vec<String>,
    /// Let any client use the converter (an open proxy: only for closed networks).
    #[arg(long)]
    pub allow_any_client: bool,
    /// Destination prefix allowed (repeatable). Private and ULA destinations are refused
    /// unless allowed here.
    #[arg(long, value_name = "PREFIX")]
    pub allow_dest: Vec<String>,
    /// Destination prefix refused (repeatable); wins over --allow-dest.
    #[arg(long, value_name = "PREFIX")]
    pub deny_dest: Vec<String>,
    /// Allow loopback destinations (for tests only).
    #[arg(long)]
    pub allow_loopback_dest: bool,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// TOML configuration file; command-line flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log line format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Listen with plain TCP (for kernels without MPTCP; clients lose multipath).
    #[arg(long)]
    pub tcp_only: bool,
    /// Do not install the nftables rule that works around the kernel's 0-RTT window bug.
    #[arg(long)]
    pub no_tfo_window_fix: bool,
    /// Relay engine: copy (read/write) or splice [default: copy].
    #[arg(long, value_name = "ENGINE")]
    pub relay_engine: Option<crate::relay::Engine>,
    /// Congestion control for relayed sockets (e.g. reno, cubic, bbr) [default: the system's].
    #[arg(long, value_name = "NAME")]
    pub congestion_control: Option<String>,
    /// Set the MPTCP subflow limit of this namespace (`ip mptcp limits`, 0-8) [default: keep
    /// it, warn if 0].
    #[arg(long, value_name = "N")]
    pub mptcp_subflows: Option<u32>,
    /// Set the MPTCP add_addr_accepted limit of this namespace (0-8) [default: keep it].
    #[arg(long, value_name = "N")]
    pub mptcp_add_addr_accepted: Option<u32>,
    /// Announce this address to clients so they open subflows to it (repeatable; `ADDR` or
    /// `ADDR:PORT`): bonding IPv4 with IPv6, or a unique address per converter behind a shared
    /// one. Removed again at exit.
    #[arg(long, value_name = "ADDR")]
    pub signal: Vec<String>,
    /// Refuse joins to the address clients first connected to (the C flag); clients join the
    /// --signal addresses instead. For several converters behind one ECMP address.
    #[arg(long)]
    pub no_join_initial_addr: bool,
    /// Carry the application data that came with the Convert request in the SYN to the
    /// server too (TCP Fast Open toward servers that support it).
    #[arg(long)]
    pub upstream_fastopen: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransparentMode {
    /// nftables TPROXY (forwarded LAN traffic, IPv4 and IPv6).
    Tproxy,
    /// nftables REDIRECT with SO_ORIGINAL_DST.
    Redirect,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Converter to use, in order of preference (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    pub converter: Vec<SocketAddr>,
    /// Serve SOCKS5 on this address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub socks5: Option<SocketAddr>,
    /// Capture LAN TCP connections transparently.
    #[arg(long, value_enum)]
    pub transparent: Option<TransparentMode>,
    /// Local port the transparent capture delivers connections to [default: 5180].
    #[arg(long, value_name = "PORT")]
    pub transparent_port: Option<u16>,
    /// Destination prefix to capture (repeatable; default: everything not bypassed).
    #[arg(long, value_name = "PREFIX")]
    pub capture: Vec<String>,
    /// Destination prefix that goes direct, never captured (repeatable).
    #[arg(long, value_name = "PREFIX")]
    pub bypass: Vec<String>,
    /// Source prefix whose connections are captured (repeatable; default: any source).
    #[arg(long, value_name = "PREFIX")]
    pub capture_source: Vec<String>,
    /// Destination port that goes direct, never captured (repeatable).
    #[arg(long, value_name = "PORT")]
    pub bypass_port: Vec<u16>,
    /// Also capture this machine's own outgoing connections (not only forwarded ones).
    #[arg(long)]
    pub capture_output: bool,
    /// SOCKS5 username:password (repeatable); without any, SOCKS5 needs no authentication.
    #[arg(long, value_name = "USER:PASSWORD")]
    pub socks5_user: Vec<String>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// TOML configuration file; command-line flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log line format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Rates of the two uplinks, in Mbit/s.
    #[arg(long, value_name = "MBIT", num_args = 2, default_values_t = [20, 30])]
    pub rates: Vec<u32>,
    /// Size of the file downloaded, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    pub size: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn repeatable_flags_collect() {
        let cli = Cli::try_parse_from([
            "braid",
            "converter",
            "--listen",
            "[::]:5124",
            "--listen",
            "0.0.0.0:5125",
            "--allow-client",
            "10.0.0.0/8",
        ])
        .unwrap();
        let Command::Converter(a) = cli.command else {
            panic!("wrong subcommand")
        };
        assert_eq!(a.listen.len(), 2);
        assert_eq!(a.allow_client, ["10.0.0.0/8"]);
    }
}
