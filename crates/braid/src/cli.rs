//! The command line. Every daemon flag also exists as a key of the TOML config file
//! (`--config FILE`); flags given on the command line override the file. The flags of a
//! daemon become that daemon's file structure (`overlay()`), typed, and the daemon validates
//! the file with the flags over it: the library below never sees clap's argument structs.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::converter::config::File as ConverterFile;
use crate::gateway::capture::TransparentMode;
use crate::gateway::config::{File as GatewayFile, UplinkFile};
use crate::logging::LogFormat;
use crate::relay::Engine;

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
                  for a self-contained demonstration in network namespaces (builds with the \
                  default `demo` feature)."
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
    /// Show what the braid daemons of this network namespace are doing: uplinks (state,
    /// rates, subflows) and connections (each subflow with its uplink, RTT and bytes).
    Status(StatusArgs),
    /// Check this machine for what bonding needs (kernel settings, uplinks, the path to the
    /// converter, the converter's listener), each problem with its fix. Exit code 0 only if
    /// no check fails.
    #[command(subcommand)]
    Doctor(DoctorCommand),
    /// Build a namespaced lab (LAN client, gateway with shaped uplinks, converter, server), run
    /// real braid processes in it and show bonding and failover live: each link alone, bonded,
    /// a link cut and back, a silent blackhole; a summary and an SVG plot at the end.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum DoctorCommand {
    /// On a gateway: MPTCP, Fast Open, the uplinks, rp_filter, the path manager's endpoints,
    /// and a connection to each converter from each uplink (does MPTCP survive the path? does
    /// the request ride in the SYN?).
    Gateway(DoctorGatewayArgs),
    /// On a converter: MPTCP, Fast Open, the listener, the TFO window fix, the MPTCP limits,
    /// and (with --destination) the way to a server.
    Converter(DoctorConverterArgs),
}

#[derive(Debug, Args)]
pub struct DoctorGatewayArgs {
    /// A converter to check the paths to (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    pub converter: Vec<SocketAddr>,
    /// Take the converters from this gateway configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The findings as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DoctorConverterArgs {
    /// The converter's port.
    #[arg(long, default_value_t = 5124)]
    pub port: u16,
    /// A server to reach from here (e.g. 93.184.215.14:443).
    #[arg(long, value_name = "ADDR:PORT")]
    pub destination: Option<SocketAddr>,
    /// The findings as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the daemons' JSON instead of tables (one object per daemon, one per line).
    #[arg(long)]
    pub json: bool,
}

/// Flags every daemon has.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TOML configuration file; command-line flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Log line format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Send buffer of the MPTCP sockets: `auto` (sized to each connection's path), 0 (the
    /// kernel's autotuning) or a fixed SO_SNDBUF in bytes [default: auto] (see
    /// `mptcp_send_buffer` in the README).
    #[arg(long, value_name = "auto|0|BYTES")]
    pub mptcp_send_buffer: Option<crate::config::SendBufferValue>,
    /// Relay engine: copy (read/write), splice, or auto (splice reading TCP, copy reading
    /// MPTCP) [default: copy].
    #[arg(long, value_name = "ENGINE", value_enum)]
    pub relay_engine: Option<Engine>,
    /// Largest read of the relay, in bytes (4096 to 67108864; reads start small and grow up
    /// to it) [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub relay_buffer: Option<usize>,
    /// Bytes all relay buffers may hold beyond 64 KiB each (0: no limit) [default: an eighth
    /// of the machine's memory].
    #[arg(long, value_name = "BYTES")]
    pub relay_memory: Option<usize>,
    /// Congestion control for relayed sockets (e.g. reno, cubic, bbr) [default: the system's].
    #[arg(long, value_name = "NAME")]
    pub congestion_control: Option<String>,
}

/// A flag that is either given (`Some(true)`) or left to the file.
fn given(flag: bool) -> Option<bool> {
    flag.then_some(true)
}

/// A repeatable flag: given at least once, it replaces the file's list.
fn list<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

#[derive(Debug, Args)]
pub struct ConverterArgs {
    #[command(flatten)]
    pub common: CommonArgs,
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
    /// Listen with plain TCP (for kernels without MPTCP; clients lose multipath).
    #[arg(long)]
    pub tcp_only: bool,
    /// Do not install the nftables rule that works around the kernel's 0-RTT window bug.
    #[arg(long)]
    pub no_tfo_window_fix: bool,
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
    /// `net.mptcp.stale_loss_cnt` to set at start (0 leaves the namespace's; default 2).
    #[arg(long, value_name = "N")]
    pub stale_loss_cnt: Option<u32>,
    /// Carry the application data that came with the Convert request in the SYN to the
    /// server too (TCP Fast Open toward servers that support it).
    #[arg(long)]
    pub upstream_fastopen: bool,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
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
    /// An uplink to bond (repeatable; `,backup` for a metered link used only when no primary
    /// works) [default: every interface with a default route].
    #[arg(long, value_name = "IFACE[,backup]", value_parser = parse_uplink)]
    pub uplink: Vec<UplinkFile>,
    /// Leave routing tables, source rules and MPTCP endpoints to the system.
    #[arg(long)]
    pub no_manage_uplinks: bool,
    /// MPTCP endpoints `subflow fullmesh`: a subflow from every uplink to every address the
    /// converter announces (needed for converters behind one shared address, which refuse
    /// joins to it).
    #[arg(long)]
    pub fullmesh: bool,
}

/// `IFACE` or `IFACE,backup`.
fn parse_uplink(s: &str) -> Result<UplinkFile, String> {
    let (interface, backup) = match s.split_once(',') {
        None => (s, false),
        Some((i, "backup")) => (i, true),
        Some((_, other)) => return Err(format!("{other:?}: expected IFACE or IFACE,backup")),
    };
    Ok(UplinkFile {
        interface: interface.to_string(),
        name: None,
        backup: Some(backup),
    })
}

impl ConverterArgs {
    /// The flags as the converter's file structure, to put over the file.
    pub fn overlay(&self) -> ConverterFile {
        ConverterFile {
            listen: list(&self.listen),
            allow_client: list(&self.allow_client),
            allow_any_client: given(self.allow_any_client),
            allow_dest: list(&self.allow_dest),
            deny_dest: list(&self.deny_dest),
            allow_loopback_dest: given(self.allow_loopback_dest),
            metrics: self.common.metrics,
            log_format: self.common.log_format,
            tcp_only: given(self.tcp_only),
            tfo_window_fix: self.no_tfo_window_fix.then_some(false),
            relay_engine: self.common.relay_engine,
            relay_buffer: self.common.relay_buffer,
            relay_memory: self.common.relay_memory,
            mptcp_send_buffer: self.common.mptcp_send_buffer.clone(),
            congestion_control: self.common.congestion_control.clone(),
            mptcp_subflows: self.mptcp_subflows,
            mptcp_add_addr_accepted: self.mptcp_add_addr_accepted,
            signal: list(&self.signal),
            join_initial_addr: self.no_join_initial_addr.then_some(false),
            stale_loss_cnt: self.stale_loss_cnt,
            upstream_fastopen: given(self.upstream_fastopen),
            ..ConverterFile::default()
        }
    }
}

impl GatewayArgs {
    /// The flags as the gateway's file structure, to put over the file.
    pub fn overlay(&self) -> GatewayFile {
        GatewayFile {
            converter: list(&self.converter),
            socks5: self.socks5,
            socks5_users: list(&self.socks5_user),
            transparent: self.transparent.map(Some),
            transparent_port: self.transparent_port,
            capture: list(&self.capture),
            bypass: list(&self.bypass),
            capture_source: list(&self.capture_source),
            bypass_ports: list(&self.bypass_port),
            capture_output: given(self.capture_output),
            metrics: self.common.metrics,
            log_format: self.common.log_format,
            uplink: list(&self.uplink),
            manage_uplinks: self.no_manage_uplinks.then_some(false),
            fullmesh: given(self.fullmesh),
            mptcp_send_buffer: self.common.mptcp_send_buffer.clone(),
            relay_engine: self.common.relay_engine,
            relay_buffer: self.common.relay_buffer,
            relay_memory: self.common.relay_memory,
            congestion_control: self.common.congestion_control.clone(),
            ..GatewayFile::default()
        }
    }
}

#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The uplinks, each `name:rate:delay[:backup]` (rate in kbit/mbit/gbit, one-way delay in
    /// ms or s); a backup carries nothing while a primary works.
    #[arg(long, value_name = "LIST", default_value = crate::demo::DEFAULT_UPLINKS,
          value_parser = parse_demo_uplinks)]
    pub uplinks: crate::demo::Uplinks,
    /// Seconds of the bonded phase (a link is cut at 20 % of it and back at 40 %, another
    /// blackholed from 55 to 75 %).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub duration: u64,
    /// Bonding only: no link cut, no blackhole.
    #[arg(long)]
    pub no_failover: bool,
    /// Leave the lab and the daemons up at the end, until Ctrl-C, and print the commands to
    /// look at them.
    #[arg(long)]
    pub keep: bool,
    /// Print the results as JSON on standard output (progress goes to standard error).
    #[arg(long)]
    pub json: bool,
}

#[cfg(feature = "demo")]
fn parse_demo_uplinks(s: &str) -> Result<crate::demo::Uplinks, String> {
    crate::demo::parse_uplinks(s).map(crate::demo::Uplinks)
}

#[cfg(feature = "demo")]
impl DemoArgs {
    pub fn options(&self) -> crate::demo::Options {
        crate::demo::Options {
            uplinks: self.uplinks.0.clone(),
            duration: std::time::Duration::from_secs(self.duration),
            failover: !self.no_failover,
            keep: self.keep,
            json: self.json,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn converter(extra: &[&str]) -> ConverterArgs {
        let mut v = vec!["braid", "converter"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Converter(a) => a,
            _ => unreachable!(),
        }
    }

    fn gateway(extra: &[&str]) -> GatewayArgs {
        let mut v = vec!["braid", "gateway"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Gateway(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn converter_flags_win_over_the_file_and_unset_flags_do_not() {
        let mut file = ConverterFile {
            listen: Some(vec!["127.0.0.1:1000".parse().unwrap()]),
            allow_client: Some(vec!["10.0.0.0/8".into()]),
            backoff_secs: Some(7),
            ..ConverterFile::default()
        };
        file.overlay(
            converter(&[
                "--listen",
                "127.0.0.1:2000",
                "--log-format",
                "json",
                "--relay-engine",
                "splice",
                "--relay-buffer",
                "262144",
                "--no-join-initial-addr",
            ])
            .overlay(),
        );
        let s = crate::converter::config::Settings::validate(file, None).unwrap();
        assert_eq!(s.listen, ["127.0.0.1:2000".parse().unwrap()]);
        assert_eq!(
            s.allow_client,
            ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
        );
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.relay.engine, Engine::Splice);
        assert_eq!(s.relay.buffer, 262144);
        assert!(!s.join_initial_addr);
        assert_eq!(
            s.backoff_secs, 7,
            "a key no flag touched keeps the file's value"
        );
    }

    #[test]
    fn gateway_flags_become_typed_settings() {
        let a = gateway(&[
            "--converter",
            "192.0.2.1:5124",
            "--transparent",
            "redirect",
            "--capture-output",
            "--uplink",
            "wan0",
            "--uplink",
            "lte0,backup",
            "--relay-engine",
            "auto",
            "--relay-buffer",
            "65536",
            "--congestion-control",
            "reno",
        ]);
        let s = crate::gateway::config::Settings::validate(a.overlay(), None).unwrap();
        assert_eq!(s.transparent, Some(TransparentMode::Redirect));
        // The relay's and the sockets' flags are the converter's too.
        assert_eq!(s.relay.engine, Engine::Auto);
        assert_eq!(s.relay.buffer, 65536);
        assert_eq!(s.congestion_control.as_deref(), Some("reno"));
        assert!(s.capture_output);
        let Some(crate::gateway::uplinks::Selection::Listed(ups)) = &s.uplinks else {
            panic!("uplinks not listed: {:?}", s.uplinks)
        };
        assert_eq!(
            ups.iter()
                .map(|u| (u.interface.as_str(), u.backup))
                .collect::<Vec<_>>(),
            [("wan0", false), ("lte0", true)]
        );
        let mut file = GatewayFile {
            converter: Some(vec!["192.0.2.1:1".parse().unwrap()]),
            socks5: Some("127.0.0.1:1080".parse().unwrap()),
            ..GatewayFile::default()
        };
        file.overlay(gateway(&["--converter", "192.0.2.2:2"]).overlay());
        let s = crate::gateway::config::Settings::validate(file, None).unwrap();
        assert_eq!(s.converters, ["192.0.2.2:2".parse().unwrap()]);
        assert_eq!(s.socks5, Some("127.0.0.1:1080".parse().unwrap()));
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
