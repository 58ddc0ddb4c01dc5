//! Gateway configuration: the TOML file ([`File`], which is also the shape of the command
//! line's overrides) and its validation into [`Settings`] with errors that name the key.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::capture::TransparentMode;
use super::health::HealthConfig;
use super::uplinks::{MAX_UPLINKS, Numbers, Selection, UplinkConf};
use crate::config::{
    ConfigError, SendBuffer, SendBufferValue, congestion_control, mptcp_send_buffer, overlay,
    parse_prefixes, read_toml, relay_config,
};
use crate::logging::LogFormat;
use crate::relay::{Engine, RelayConfig};

/// Where transparent capture delivers connections when no port is given.
pub const DEFAULT_TRANSPARENT_PORT: u16 = 5180;
/// fwmark of packets the capture steers to the local listener (TPROXY) — and of braid's own
/// sockets, which the output capture must leave alone. "BR" in ASCII, unlikely to collide.
pub const DEFAULT_FWMARK: u32 = 0x4252;
/// Routing table holding the `local default dev lo` route for TPROXY.
pub const DEFAULT_ROUTE_TABLE: u32 = 5180;

/// An uplink as listed in the file (`[[uplink]]`) or on the command line (`--uplink`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkFile {
    pub interface: String,
    /// For logs, metrics and status; the interface name by default.
    pub name: Option<String>,
    /// A metered link that should carry traffic only when no primary works.
    pub backup: Option<bool>,
}

/// `[health]`: how uplinks are probed and judged (see `health.rs` for what each does).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    pub probe_interval_ms: Option<u64>,
    pub probe_idle_interval_secs: Option<u64>,
    pub probe_standby_interval_secs: Option<u64>,
    pub probe_timeout_ms: Option<u64>,
    pub probe_attempts: Option<u8>,
    pub dead_after: Option<u32>,
    pub up_after: Option<u32>,
    pub hold_down_secs: Option<u64>,
    pub hold_down_max_secs: Option<u64>,
    pub flap_window_secs: Option<u64>,
    pub backup_release_secs: Option<u64>,
    pub degraded_loss_percent: Option<f64>,
    /// `net.mptcp.stale_loss_cnt` in the gateway's namespace; 0 leaves it alone.
    pub stale_loss_cnt: Option<u32>,
}

impl HealthFile {
    fn validate(self, path: Option<&Path>) -> Result<HealthConfig, ConfigError> {
        let err = |key: &str, reason: String| {
            ConfigError::invalid(path, &format!("health.{key}"), reason)
        };
        let d = HealthConfig::default();
        // At most a day: longer says nothing more and would overflow the hold-down's doubling.
        let positive =
            |key: &str, v: Option<u64>, unit: fn(u64) -> Duration, default| match v.map(unit) {
                None => Ok(default),
                Some(d) if d.is_zero() => Err(err(key, "must be greater than 0".into())),
                Some(d) if d > Duration::from_secs(86_400) => {
                    Err(err(key, "must be at most a day".into()))
                }
                Some(d) => Ok(d),
            };
        let c = HealthConfig {
            interval: positive(
                "probe_interval_ms",
                self.probe_interval_ms,
                Duration::from_millis,
                d.interval,
            )?,
            idle_interval: positive(
                "probe_idle_interval_secs",
                self.probe_idle_interval_secs,
                Duration::from_secs,
                d.idle_interval,
            )?,
            standby_interval: positive(
                "probe_standby_interval_secs",
                self.probe_standby_interval_secs,
                Duration::from_secs,
                d.standby_interval,
            )?,
            timeout: positive(
                "probe_timeout_ms",
                self.probe_timeout_ms,
                Duration::from_millis,
                d.timeout,
            )?,
            attempts: match self.probe_attempts {
                None => d.attempts,
                // One handshake a round cannot tell loss from silence.
                Some(n @ 2..=16) => n,
                Some(n) => return Err(err("probe_attempts", format!("{n}: give 2 to 16"))),
            },
            dead_after: match self.dead_after {
                None => d.dead_after,
                Some(0) => return Err(err("dead_after", "must be at least 1".into())),
                Some(n) => n,
            },
            up_after: match self.up_after {
                None => d.up_after,
                Some(0) => return Err(err("up_after", "must be at least 1".into())),
                Some(n) => n,
            },
            hold_base: positive(
                "hold_down_secs",
                self.hold_down_secs,
                Duration::from_secs,
                d.hold_base,
            )?,
            hold_max: positive(
                "hold_down_max_secs",
                self.hold_down_max_secs,
                Duration::from_secs,
                d.hold_max,
            )?,
            flap_window: positive(
                "flap_window_secs",
                self.flap_window_secs,
                Duration::from_secs,
                d.flap_window,
            )?,
            backup_release: match self.backup_release_secs {
                None => d.backup_release,
                Some(n) if n > 86_400 => {
                    return Err(err("backup_release_secs", "must be at most a day".into()));
                }
                Some(n) => Duration::from_secs(n),
            },
            degraded_loss: match self.degraded_loss_percent {
                None => d.degraded_loss,
                Some(p) if p > 0.0 && p <= 100.0 => p / 100.0,
                Some(p) => {
                    return Err(err(
                        "degraded_loss_percent",
                        format!("{p}: give a share above 0 and at most 100"),
                    ));
                }
            },
            stale_loss_cnt: match self.stale_loss_cnt {
                None => d.stale_loss_cnt,
                Some(0) => None,
                Some(n @ 1..=64) => Some(n),
                Some(n) => {
                    return Err(err(
                        "stale_loss_cnt",
                        format!("{n}: give 1 to 64, or 0 to leave it"),
                    ));
                }
            },
        };
        if c.hold_max < c.hold_base {
            return Err(err("hold_down_max_secs", "is below hold_down_secs".into()));
        }
        Ok(c)
    }
}

/// First routing table (and rule priority) of the uplinks, after the TPROXY table.
pub const UPLINK_TABLE_OFFSET: u32 = 1;
/// First MPTCP endpoint id braid gives its uplinks (ids 200-215).
pub const UPLINK_ENDPOINT_ID_BASE: u8 = 200;

/// The file, as written, or the flags given on the command line (which win over the file, see
/// [`File::overlay`]). Every key is optional; defaults live in [`Settings`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub converter: Option<Vec<SocketAddr>>,
    pub socks5: Option<SocketAddr>,
    pub socks5_users: Option<Vec<String>>,
    /// `Some(None)` is `transparent = "off"`.
    #[serde(default, deserialize_with = "transparent_key")]
    pub transparent: Option<Option<TransparentMode>>,
    pub transparent_port: Option<u16>,
    pub capture: Option<Vec<String>>,
    pub bypass: Option<Vec<String>>,
    pub capture_source: Option<Vec<String>>,
    pub bypass_ports: Option<Vec<u16>>,
    pub capture_output: Option<bool>,
    pub fwmark: Option<u32>,
    pub route_table: Option<u32>,
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub connect_timeout_ms: Option<u64>,
    pub early_data_wait_ms: Option<u64>,
    pub default_backoff_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub drain_timeout_secs: Option<u64>,
    pub relay_engine: Option<Engine>,
    pub relay_buffer: Option<usize>,
    pub relay_memory: Option<usize>,
    pub mptcp_send_buffer: Option<SendBufferValue>,
    pub fast_open: Option<bool>,
    pub congestion_control: Option<String>,
    /// `[[uplink]]` tables.
    pub uplink: Option<Vec<UplinkFile>>,
    /// The same as `uplink` (the name of earlier versions).
    pub uplinks: Option<Vec<UplinkFile>>,
    /// Program the uplinks (routing tables, source rules, MPTCP endpoints and limits).
    pub manage_uplinks: Option<bool>,
    /// The uplinks' endpoints are `subflow fullmesh` (converters behind one address).
    pub fullmesh: Option<bool>,
    pub state_dir: Option<std::path::PathBuf>,
    /// `[health]`.
    pub health: Option<HealthFile>,
}

/// `transparent = "tproxy" | "redirect" | "off"`.
fn transparent_key<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<TransparentMode>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Key {
        Off,
        Tproxy,
        Redirect,
    }
    Ok(Some(match Key::deserialize(d)? {
        Key::Off => None,
        Key::Tproxy => Some(TransparentMode::Tproxy),
        Key::Redirect => Some(TransparentMode::Redirect),
    }))
}

impl File {
    /// Puts `flags` over the file: every key the command line gave replaces the file's.
    pub fn overlay(&mut self, flags: File) {
        macro_rules! keys {
            ($($k:ident),* $(,)?) => { $(overlay(&mut self.$k, flags.$k);)* };
        }
        keys!(
            converter,
            socks5,
            socks5_users,
            transparent,
            transparent_port,
            capture,
            bypass,
            capture_source,
            bypass_ports,
            capture_output,
            fwmark,
            route_table,
            metrics,
            log_format,
            connect_timeout_ms,
            early_data_wait_ms,
            default_backoff_secs,
            idle_timeout_secs,
            drain_timeout_secs,
            relay_engine,
            relay_buffer,
            relay_memory,
            mptcp_send_buffer,
            fast_open,
            congestion_control,
            uplink,
            uplinks,
            manage_uplinks,
            fullmesh,
            state_dir,
            health,
        );
    }
}

/// A SOCKS5 account (RFC 1929).
#[derive(Clone, PartialEq, Eq)]
pub struct SocksUser {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for SocksUser {
    // Passwords stay out of `--check-config` output and logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:***", self.user)
    }
}

/// Validated settings the gateway runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub converters: Vec<SocketAddr>,
    pub socks5: Option<SocketAddr>,
    pub socks5_users: Vec<SocksUser>,
    pub transparent: Option<TransparentMode>,
    pub transparent_port: u16,
    /// Destinations captured; empty = all (both families).
    pub capture: Vec<IpNet>,
    pub bypass: Vec<IpNet>,
    /// Sources captured; empty = any.
    pub capture_source: Vec<IpNet>,
    pub bypass_ports: Vec<u16>,
    pub capture_output: bool,
    pub fwmark: u32,
    pub route_table: u32,
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub connect_timeout: Duration,
    /// How long a captured connection's first bytes are waited for, to go in the SYN.
    pub early_data_wait: Duration,
    /// How long a converter that failed without naming a back-off is avoided.
    pub default_backoff: Duration,
    pub drain_timeout: Duration,
    pub relay: RelayConfig,
    /// The MPTCP sockets' send buffer ([`crate::sendbuf`]).
    pub mptcp_send_buffer: SendBuffer,
    pub fast_open: bool,
    pub congestion_control: Option<String>,
    /// The uplinks braid manages (`None`: left to the system, `manage_uplinks = false`).
    pub uplinks: Option<Selection>,
    pub uplink_numbers: Numbers,
    /// Endpoints `subflow fullmesh`: a subflow from every uplink to every address the
    /// converter announces, for converters that refuse joins to their first address.
    pub fullmesh: bool,
    pub state_dir: std::path::PathBuf,
    pub health: HealthConfig,
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

        let converters = f.converter.unwrap_or_default();
        if converters.is_empty() {
            return Err(err(
                "converter",
                "empty: name at least one converter (--converter ADDR:PORT)".into(),
            ));
        }
        for (i, c) in converters.iter().enumerate() {
            if c.ip().is_unspecified() || c.ip().is_multicast() || c.port() == 0 {
                return Err(err(
                    &format!("converter[{i}]"),
                    format!("{c} is not a converter's address"),
                ));
            }
        }
        let transparent = f.transparent.flatten();
        if transparent.is_none() && f.socks5.is_none() {
            return Err(err(
                "transparent",
                "nothing to capture: enable --transparent tproxy|redirect and/or --socks5 ADDR:PORT"
                    .into(),
            ));
        }
        let capture_output = f.capture_output.unwrap_or(false);
        if capture_output && transparent.is_none() {
            return Err(err(
                "capture_output",
                "needs transparent capture (--transparent tproxy|redirect)".into(),
            ));
        }
        let transparent_port = f.transparent_port.unwrap_or(DEFAULT_TRANSPARENT_PORT);
        if transparent_port == 0 {
            return Err(err("transparent_port", "must not be 0".into()));
        }
        let mut socks5_users = Vec::new();
        for (i, entry) in f.socks5_users.iter().flatten().enumerate() {
            let key = format!("socks5_users[{i}]");
            let (user, password) = entry
                .split_once(':')
                .ok_or_else(|| err(&key, "expected \"user:password\"".into()))?;
            // RFC 1929: one length byte each, and an empty name cannot be sent.
            if user.is_empty() || user.len() > 255 || password.len() > 255 {
                return Err(err(
                    &key,
                    "user must be 1-255 bytes and password at most 255 bytes".into(),
                ));
            }
            socks5_users.push(SocksUser {
                user: user.into(),
                password: password.into(),
            });
        }
        if !socks5_users.is_empty() && f.socks5.is_none() {
            return Err(err(
                "socks5_users",
                "accounts given but no SOCKS5 listener (--socks5 ADDR:PORT)".into(),
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
        let connect_timeout = match f.connect_timeout_ms.unwrap_or(5_000) {
            0 => return Err(err("connect_timeout_ms", "must be greater than 0".into())),
            n => Duration::from_millis(n),
        };
        let early_data_wait = match f.early_data_wait_ms.unwrap_or(5) {
            n @ 0..=1000 => Duration::from_millis(n),
            n => {
                return Err(err(
                    "early_data_wait_ms",
                    format!(
                        "{n}: give 0 to 1000 (it delays a connection whose server speaks first)"
                    ),
                ));
            }
        };
        let fwmark = f.fwmark.unwrap_or(DEFAULT_FWMARK);
        if fwmark == 0 {
            return Err(err("fwmark", "must not be 0".into()));
        }
        let route_table = f.route_table.unwrap_or(DEFAULT_ROUTE_TABLE);
        // 253-255 are the kernel's default/main/local tables; 0 is "unspecified".
        if route_table == 0 || (253..=255).contains(&route_table) {
            return Err(err(
                "route_table",
                format!("{route_table} is reserved; pick another table number"),
            ));
        }
        let (key, listed) = match (f.uplink, f.uplinks) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "uplinks",
                    "give the uplinks once, as [[uplink]] tables".into(),
                ));
            }
            (Some(l), None) => ("uplink", l),
            (None, Some(l)) => ("uplinks", l),
            (None, None) => ("uplink", Vec::new()),
        };
        let mut confs: Vec<UplinkConf> = Vec::new();
        for (i, u) in listed.into_iter().enumerate() {
            if u.interface.is_empty() || u.interface.len() > 15 || u.interface.contains(['/', ' '])
            {
                return Err(err(
                    &format!("{key}[{i}].interface"),
                    format!("{:?} is not an interface name", u.interface),
                ));
            }
            if confs.iter().any(|c| c.interface == u.interface) {
                return Err(err(
                    &format!("{key}[{i}].interface"),
                    format!("{} is listed twice", u.interface),
                ));
            }
            confs.push(UplinkConf {
                name: u.name.unwrap_or_else(|| u.interface.clone()),
                interface: u.interface,
                backup: u.backup.unwrap_or(false),
            });
        }
        if confs.len() > usize::from(MAX_UPLINKS) {
            return Err(err(
                key,
                format!(
                    "{} uplinks; a connection can use {MAX_UPLINKS} at most",
                    confs.len()
                ),
            ));
        }
        let manage = f.manage_uplinks.unwrap_or(true);
        if !manage && !confs.is_empty() {
            return Err(err(
                "manage_uplinks",
                "false, but uplinks are listed: list none, or let braid manage them".into(),
            ));
        }
        let uplinks = match (manage, confs.is_empty()) {
            (false, _) => None,
            (true, true) => Some(Selection::Auto {
                exclude: Vec::new(),
            }),
            (true, false) => Some(Selection::Listed(confs)),
        };
        let capture = parse_prefixes(path, "capture", f.capture.as_deref())?;
        let bypass = parse_prefixes(path, "bypass", f.bypass.as_deref())?;
        let capture_source = parse_prefixes(path, "capture_source", f.capture_source.as_deref())?;
        Ok(Settings {
            converters,
            socks5: f.socks5,
            socks5_users,
            transparent,
            transparent_port,
            capture,
            bypass,
            capture_source,
            bypass_ports: f.bypass_ports.unwrap_or_default(),
            capture_output,
            fwmark,
            route_table,
            metrics: f.metrics,
            log_format,
            connect_timeout,
            early_data_wait,
            default_backoff: Duration::from_secs(f.default_backoff_secs.unwrap_or(30)),
            drain_timeout: Duration::from_secs(f.drain_timeout_secs.unwrap_or(10)),
            relay,
            mptcp_send_buffer,
            fast_open: f.fast_open.unwrap_or(true),
            congestion_control: f.congestion_control,
            uplinks,
            uplink_numbers: Numbers {
                table_base: route_table + UPLINK_TABLE_OFFSET,
                id_base: UPLINK_ENDPOINT_ID_BASE,
            },
            fullmesh: f.fullmesh.unwrap_or(false),
            state_dir: crate::config::state_dir(path, f.state_dir)?,
            health: f.health.unwrap_or_default().validate(path)?,
        })
    }

    /// Whether a destination address may be captured at all: converters are never captured
    /// (that would loop), and neither are bypassed prefixes.
    pub fn is_bypassed(&self, ip: IpAddr) -> bool {
        self.converters.iter().any(|c| c.ip() == ip) || self.bypass.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(toml_text: &str, flags: File) -> Result<Settings, ConfigError> {
        let path = Path::new("g.toml");
        let mut file: File = crate::config::parse_toml(path, toml_text)?;
        file.overlay(flags);
        Settings::validate(file, Some(path))
    }

    #[test]
    fn a_minimal_gateway_is_valid() {
        let s = from_toml(
            "",
            File {
                converter: Some(vec!["192.0.2.1:5124".parse().unwrap()]),
                transparent: Some(Some(TransparentMode::Tproxy)),
                ..File::default()
            },
        )
        .unwrap();
        assert_eq!(s.transparent, Some(TransparentMode::Tproxy));
        assert_eq!(s.transparent_port, DEFAULT_TRANSPARENT_PORT);
        assert!(s.is_bypassed("192.0.2.1".parse().unwrap()));
        assert!(!s.is_bypassed("192.0.2.2".parse().unwrap()));
    }

    #[test]
    fn flags_override_the_file() {
        let s = from_toml(
            "converter = [\"192.0.2.1:1\"]\nsocks5 = \"127.0.0.1:1080\"\n",
            File {
                converter: Some(vec!["192.0.2.2:2".parse().unwrap()]),
                ..File::default()
            },
        )
        .unwrap();
        assert_eq!(s.converters, ["192.0.2.2:2".parse().unwrap()]);
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = "converter = [\"192.0.2.1:5124\"]\nsocks5 = \"127.0.0.1:1080\"\n";
        let cases = [
            ("socks5 = \"127.0.0.1:1080\"", "converter"),
            ("converter = [\"192.0.2.1:5124\"]", "transparent"),
            (
                "converter = [\"0.0.0.0:5124\"]\nsocks5 = \"127.0.0.1:1\"",
                "converter[0]",
            ),
            (&format!("{base}transparent = \"magic\""), "transparent"),
            (&format!("{base}capture = [\"10.0.0.1/8\"]"), "capture[0]"),
            (&format!("{base}bypass = [\"x\"]"), "bypass[0]"),
            (
                &format!("{base}socks5_users = [\"nopass\"]"),
                "socks5_users[0]",
            ),
            (&format!("{base}capture_output = true"), "capture_output"),
            (&format!("{base}route_table = 254"), "route_table"),
            (&format!("{base}fwmark = 0"), "fwmark"),
            (
                &format!("{base}early_data_wait_ms = 5000"),
                "early_data_wait_ms",
            ),
            (
                &format!("{base}uplinks = [{{ interface = \"\" }}]"),
                "uplinks[0].interface",
            ),
            (&format!("{base}relay_engine = \"zero\""), "relay_engine"),
            (
                &format!("{base}mptcp_send_buffer = 1000"),
                "mptcp_send_buffer",
            ),
            (
                &format!("{base}[health]\nprobe_attempts = 1"),
                "health.probe_attempts",
            ),
            (
                &format!("{base}[health]\nprobe_timeout_ms = 0"),
                "health.probe_timeout_ms",
            ),
            (
                &format!("{base}[health]\nhold_down_secs = 10\nhold_down_max_secs = 5"),
                "health.hold_down_max_secs",
            ),
            (
                &format!("{base}[health]\nhold_down_max_secs = 99999999999"),
                "health.hold_down_max_secs",
            ),
            (
                &format!("{base}[health]\ndegraded_loss_percent = 0"),
                "health.degraded_loss_percent",
            ),
        ];
        for (text, key) in cases {
            let e = from_toml(text, File::default()).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{text:?} gave {e:?}");
            assert!(e.contains("g.toml"), "{e}");
        }
    }

    #[test]
    fn transparent_off_in_the_file_turns_capture_off() {
        let s = from_toml(
            "converter = [\"192.0.2.1:1\"]\nsocks5 = \"127.0.0.1:1080\"\ntransparent = \"off\"",
            File::default(),
        )
        .unwrap();
        assert_eq!(s.transparent, None);
    }

    #[test]
    fn passwords_are_not_printed() {
        let s = from_toml(
            "converter = [\"192.0.2.1:5124\"]\nsocks5 = \"127.0.0.1:1080\"\n\
             socks5_users = [\"alice:s3cret\"]",
            File::default(),
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(
            shown.contains("alice") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
