//! Converter configuration: the TOML file ([`File`], which is also the shape of the command
//! line's overrides), and the validation that turns it into [`Settings`]. Parsing and
//! validation are separate steps so that every semantic error can name the key it is about.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::config::{
    ConfigError, SendBuffer, SendBufferValue, congestion_control, mptcp_send_buffer, overlay,
    parse_prefixes, read_toml, relay_config,
};
use crate::logging::LogFormat;
use crate::relay::{Engine, RelayConfig};

/// The converter's port when none is given. RFC 8803 assigns none; this one is braid's.
pub const DEFAULT_PORT: u16 = 5124;

/// The file, as written, or the flags given on the command line (which win over the file, see
/// [`File::overlay`]). Every key is optional; defaults live in [`Settings`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<Vec<SocketAddr>>,
    pub allow_client: Option<Vec<String>>,
    pub allow_any_client: Option<bool>,
    pub allow_dest: Option<Vec<String>>,
    pub deny_dest: Option<Vec<String>>,
    pub allow_ports: Option<Vec<u16>>,
    pub deny_ports: Option<Vec<u16>>,
    pub allow_loopback_dest: Option<bool>,
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub tcp_only: Option<bool>,
    pub tfo_queue: Option<i32>,
    pub tfo_window_fix: Option<bool>,
    pub set_sysctls: Option<bool>,
    pub handshake_timeout_ms: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub drain_timeout_secs: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub max_pending_handshakes: Option<usize>,
    pub max_pending_per_prefix: Option<usize>,
    pub max_connecting_per_prefix: Option<usize>,
    pub client_prefix_v4: Option<u8>,
    pub client_prefix_v6: Option<u8>,
    pub backoff_secs: Option<u8>,
    pub cookies: Option<bool>,
    pub cookie_secret: Option<String>,
    pub relay_engine: Option<Engine>,
    pub relay_buffer: Option<usize>,
    pub relay_memory: Option<usize>,
    pub mptcp_send_buffer: Option<SendBufferValue>,
    pub congestion_control: Option<String>,
    pub upstream_fastopen: Option<bool>,
    pub mptcp_subflows: Option<u32>,
    pub mptcp_add_addr_accepted: Option<u32>,
    pub signal: Option<Vec<String>>,
    pub join_initial_addr: Option<bool>,
    pub stale_loss_cnt: Option<u32>,
    pub state_dir: Option<std::path::PathBuf>,
}

/// Validated settings the converter runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub allow_client: Vec<IpNet>,
    pub allow_any_client: bool,
    pub allow_dest: Vec<IpNet>,
    pub deny_dest: Vec<IpNet>,
    pub allow_ports: Vec<u16>,
    pub deny_ports: Vec<u16>,
    pub allow_loopback_dest: bool,
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// Listen with plain TCP instead of MPTCP (kernels without MPTCP).
    pub tcp_only: bool,
    pub tfo_queue: i32,
    /// Install the nftables SYN-window rule that works around the kernel's 0-RTT window bug.
    pub tfo_window_fix: bool,
    /// Fix `net.ipv4.tcp_fastopen` ourselves (and log it) instead of refusing to start.
    pub set_sysctls: bool,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Connections whose request is incomplete or whose Error or Info reply is being
    /// delivered, in all and per client prefix.
    pub max_pending_handshakes: usize,
    pub max_pending_per_prefix: usize,
    /// Upstream connects in flight per client prefix.
    pub max_connecting_per_prefix: usize,
    /// Prefix lengths that group client addresses for `max_pending_per_prefix`: one subscriber
    /// or one attacker usually holds a whole IPv4 /24 or IPv6 /48, not one address.
    pub client_prefix_v4: u8,
    pub client_prefix_v6: u8,
    /// The back-off value sent with Error 64/65 (0 = the client's default).
    pub backoff_secs: u8,
    pub cookies: bool,
    pub cookie_secret: Option<Vec<u8>>,
    pub relay: RelayConfig,
    /// The MPTCP sockets' send buffer ([`crate::sendbuf`]).
    pub mptcp_send_buffer: SendBuffer,
    /// Congestion control for both sockets of a relayed connection; `None` keeps the system's.
    pub congestion_control: Option<String>,
    pub upstream_fastopen: bool,
    /// MPTCP limits to set at start; `None` keeps the namespace's.
    pub mptcp_subflows: Option<u32>,
    pub mptcp_add_addr_accepted: Option<u32>,
    /// Addresses announced to clients (port 0: the connection's port).
    pub signal: Vec<SocketAddr>,
    /// `net.mptcp.allow_join_initial_addr_port`; false sets the C flag.
    pub join_initial_addr: bool,
    /// `net.mptcp.stale_loss_cnt` to set at start (`None`: keep the namespace's).
    pub stale_loss_cnt: Option<u32>,
    /// Where the ledger of the namespace settings braid changed lives ([`crate::ledger`]).
    pub state_dir: std::path::PathBuf,
}

impl File {
    /// Puts `flags` over the file: every key the command line gave replaces the file's.
    pub fn overlay(&mut self, flags: File) {
        macro_rules! keys {
            ($($k:ident),* $(,)?) => { $(overlay(&mut self.$k, flags.$k);)* };
        }
        keys!(
            listen,
            allow_client,
            allow_any_client,
            allow_dest,
            deny_dest,
            allow_ports,
            deny_ports,
            allow_loopback_dest,
            metrics,
            log_format,
            tcp_only,
            tfo_queue,
            tfo_window_fix,
            set_sysctls,
            handshake_timeout_ms,
            connect_timeout_ms,
            idle_timeout_secs,
            drain_timeout_secs,
            max_connections,
            max_connections_per_client,
            max_pending_handshakes,
            max_pending_per_prefix,
            max_connecting_per_prefix,
            client_prefix_v4,
            client_prefix_v6,
            backoff_secs,
            cookies,
            cookie_secret,
            relay_engine,
            relay_buffer,
            relay_memory,
            mptcp_send_buffer,
            congestion_control,
            upstream_fastopen,
            mptcp_subflows,
            mptcp_add_addr_accepted,
            signal,
            join_initial_addr,
            stale_loss_cnt,
            state_dir,
        );
    }
}

impl Settings {
    /// Reads the file at `path` (if any), puts the command line's `flags` over it and
    /// validates the result.
    pub fn load(path: Option<&Path>, flags: File) -> Result<Settings, ConfigError> {
        let mut file = match path {
            Some(path) => read_toml::<File>(path)?,
            None => File::default(),
        };
        file.overlay(flags);
        Settings::validate(file, path)
    }

    /// Turns the file (with the flags already over it) into settings; `path` names the file in
    /// errors.
    pub fn validate(f: File, path: Option<&Path>) -> Result<Settings, ConfigError> {
        let err = |key: &str, reason: String| ConfigError::invalid(path, key, reason);

        let listen = f.listen.unwrap_or_else(|| {
            vec![SocketAddr::new(
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                DEFAULT_PORT,
            )]
        });
        if listen.is_empty() {
            return Err(err("listen", "at least one address is needed".into()));
        }
        let allow_client = parse_prefixes(path, "allow_client", f.allow_client.as_deref())?;
        let allow_any_client = f.allow_any_client.unwrap_or(false);
        if allow_client.is_empty() && !allow_any_client {
            return Err(err(
                "allow_client",
                "empty: say which client prefixes may use this converter (for example \
                 --allow-client 192.0.2.0/24), or run an open converter on purpose with \
                 --allow-any-client"
                    .into(),
            ));
        }
        let log_format = f.log_format.unwrap_or_default();
        let relay = relay_config(
            path,
            f.relay_engine,
            f.relay_buffer,
            f.idle_timeout_secs,
            f.relay_memory,
        )?;
        congestion_control(path, f.congestion_control.as_deref())?;
        let mptcp_send_buffer = mptcp_send_buffer(path, f.mptcp_send_buffer)?;
        let ms = |key: &str, v: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(err(key, "must be greater than 0".into())),
                n => Ok(Duration::from_millis(n)),
            }
        };
        let handshake_timeout = ms("handshake_timeout_ms", f.handshake_timeout_ms, 5_000)?;
        let connect_timeout = ms("connect_timeout_ms", f.connect_timeout_ms, 10_000)?;
        let drain_timeout = Duration::from_secs(f.drain_timeout_secs.unwrap_or(30));
        let positive = |key: &str, v: Option<usize>, default: usize| match v.unwrap_or(default) {
            0 => Err(err(key, "must be greater than 0".into())),
            n => Ok(n),
        };
        let max_connections = positive("max_connections", f.max_connections, 100_000)?;
        // A gateway multiplexes a whole household through one address: hundreds at least.
        let max_connections_per_client = positive(
            "max_connections_per_client",
            f.max_connections_per_client,
            4_096,
        )?;
        let max_pending_handshakes =
            positive("max_pending_handshakes", f.max_pending_handshakes, 4_096)?;
        // One client prefix may hold 1/16 of the handshakes: a flood from one source leaves
        // the rest to everyone else. Legitimate clients hold almost none (their request rides
        // in the SYN), so the share bites only on slow or stuck ones.
        let max_pending_per_prefix = positive(
            "max_pending_per_prefix",
            f.max_pending_per_prefix,
            (max_pending_handshakes / 16).max(1),
        )?;
        // A blackholed destination holds connects for the connect timeout: one prefix may hold
        // 1/16 of the connection table that way, which no household's burst reaches.
        let max_connecting_per_prefix = positive(
            "max_connecting_per_prefix",
            f.max_connecting_per_prefix,
            (max_connections / 16).max(1),
        )?;
        let client_prefix_v4 = f.client_prefix_v4.unwrap_or(24);
        if !(1..=32).contains(&client_prefix_v4) {
            return Err(err(
                "client_prefix_v4",
                format!("{client_prefix_v4} is not a prefix length of 1 to 32"),
            ));
        }
        let client_prefix_v6 = f.client_prefix_v6.unwrap_or(48);
        if !(1..=128).contains(&client_prefix_v6) {
            return Err(err(
                "client_prefix_v6",
                format!("{client_prefix_v6} is not a prefix length of 1 to 128"),
            ));
        }
        let tfo_queue = f.tfo_queue.unwrap_or(4_096);
        if tfo_queue <= 0 {
            return Err(err("tfo_queue", "must be greater than 0".into()));
        }
        let cookie_secret = match f.cookie_secret {
            None => None,
            Some(hex_secret) => {
                let bytes = hex::decode(hex_secret.trim())
                    .map_err(|e| err("cookie_secret", format!("not hexadecimal: {e}")))?;
                if bytes.len() < 16 {
                    return Err(err(
                        "cookie_secret",
                        format!("{} bytes is too short; use at least 16", bytes.len()),
                    ));
                }
                Some(bytes)
            }
        };
        for (key, v) in [
            ("mptcp_subflows", f.mptcp_subflows),
            ("mptcp_add_addr_accepted", f.mptcp_add_addr_accepted),
        ] {
            if let Some(n) = v
                && n > 8
            {
                return Err(err(key, format!("{n} is above the kernel's maximum of 8")));
            }
        }
        let mut signal = Vec::new();
        for (i, text) in f.signal.iter().flatten().enumerate() {
            let key = format!("signal[{i}]");
            let text = text.trim();
            let addr = text
                .parse::<SocketAddr>()
                .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
                .map_err(|_| err(&key, format!("{text:?} is not an address or ADDR:PORT")))?;
            if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.ip().is_loopback() {
                return Err(err(
                    &key,
                    format!("{} cannot be announced to clients", addr.ip()),
                ));
            }
            signal.push(addr);
        }
        Ok(Settings {
            listen,
            allow_client,
            allow_any_client,
            allow_dest: parse_prefixes(path, "allow_dest", f.allow_dest.as_deref())?,
            deny_dest: parse_prefixes(path, "deny_dest", f.deny_dest.as_deref())?,
            allow_ports: f.allow_ports.unwrap_or_default(),
            deny_ports: f.deny_ports.unwrap_or_default(),
            allow_loopback_dest: f.allow_loopback_dest.unwrap_or(false),
            metrics: f.metrics,
            log_format,
            tcp_only: f.tcp_only.unwrap_or(false),
            tfo_queue,
            tfo_window_fix: f.tfo_window_fix.unwrap_or(true),
            set_sysctls: f.set_sysctls.unwrap_or(true),
            handshake_timeout,
            connect_timeout,
            drain_timeout,
            max_connections,
            max_connections_per_client,
            max_pending_handshakes,
            max_pending_per_prefix,
            max_connecting_per_prefix,
            client_prefix_v4,
            client_prefix_v6,
            backoff_secs: f.backoff_secs.unwrap_or(0),
            cookies: f.cookies.unwrap_or(false),
            cookie_secret,
            relay,
            mptcp_send_buffer,
            congestion_control: f.congestion_control,
            upstream_fastopen: f.upstream_fastopen.unwrap_or(false),
            mptcp_subflows: f.mptcp_subflows,
            mptcp_add_addr_accepted: f.mptcp_add_addr_accepted,
            signal,
            join_initial_addr: f.join_initial_addr.unwrap_or(true),
            stale_loss_cnt: match f.stale_loss_cnt {
                None => Some(2),
                Some(0) => None,
                Some(n @ 1..=64) => Some(n),
                Some(n) => {
                    return Err(err(
                        "stale_loss_cnt",
                        format!("{n}: give 1 to 64, or 0 to leave the namespace's"),
                    ));
                }
            },
            state_dir: crate::config::state_dir(path, f.state_dir)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(toml_text: &str, flags: File) -> Result<Settings, ConfigError> {
        let path = Path::new("c.toml");
        let mut file: File = crate::config::parse_toml(path, toml_text)?;
        file.overlay(flags);
        Settings::validate(file, Some(path))
    }

    fn any_client() -> File {
        File {
            allow_any_client: Some(true),
            ..File::default()
        }
    }

    #[test]
    fn empty_allow_list_is_refused_with_the_key_named() {
        let e = from_toml("", File::default()).unwrap_err().to_string();
        assert!(e.contains("allow_client"), "{e}");
        assert!(e.contains("--allow-any-client"), "{e}");
        assert!(from_toml("", any_client()).is_ok());
    }

    #[test]
    fn flags_override_the_file() {
        let s = from_toml(
            "listen = [\"127.0.0.1:1000\"]\nallow_client = [\"10.0.0.0/8\"]\n",
            File {
                listen: Some(vec!["127.0.0.1:2000".parse().unwrap()]),
                allow_client: Some(vec!["192.0.2.1".into()]),
                ..File::default()
            },
        )
        .unwrap();
        assert_eq!(s.listen, ["127.0.0.1:2000".parse().unwrap()]);
        assert_eq!(s.allow_client, ["192.0.2.1/32".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("allow_client = [\"10.0.0.0/33\"]", "allow_client[0]"),
            (
                "allow_any_client = true\ndeny_dest = [\"x\"]",
                "deny_dest[0]",
            ),
            (
                "allow_any_client = true\nrelay_engine = \"zero\"",
                "relay_engine",
            ),
            (
                "allow_any_client = true\nmptcp_send_buffer = 1000",
                "mptcp_send_buffer",
            ),
            (
                "allow_any_client = true\nhandshake_timeout_ms = 0",
                "handshake_timeout_ms",
            ),
            (
                "allow_any_client = true\ncookie_secret = \"abcd\"",
                "cookie_secret",
            ),
            (
                "allow_any_client = true\nlog_format = \"xml\"",
                "log_format",
            ),
            (
                "allow_any_client = true\ncongestion_control = \"a b\"",
                "congestion_control",
            ),
            (
                "allow_any_client = true\nmptcp_subflows = 9",
                "mptcp_subflows",
            ),
            (
                "allow_any_client = true\nstale_loss_cnt = 1000",
                "stale_loss_cnt",
            ),
            (
                "allow_any_client = true\nstate_dir = \"run/braid\"",
                "state_dir",
            ),
            (
                "allow_any_client = true\nrelay_memory = 4096",
                "relay_memory",
            ),
            (
                "allow_any_client = true\nsignal = [\"10.0.0.1\", \"nope\"]",
                "signal[1]",
            ),
            (
                "allow_any_client = true\nsignal = [\"[::]:5\"]",
                "signal[0]",
            ),
            (
                "allow_any_client = true\nmax_pending_per_prefix = 0",
                "max_pending_per_prefix",
            ),
            (
                "allow_any_client = true\nclient_prefix_v4 = 33",
                "client_prefix_v4",
            ),
        ];
        for (text, key) in cases {
            let e = from_toml(text, File::default()).unwrap_err().to_string();
            assert!(e.contains(key), "{text:?} gave {e:?}");
            assert!(e.contains("c.toml"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<File>("lisen = []")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
    }
}
