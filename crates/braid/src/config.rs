//! Pieces shared by the daemons' configurations: reading a TOML file and the error type whose
//! every message names the file, the key and the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;

use crate::relay::{Engine, RelayConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{where_}key `{key}`: {reason}")]
    Invalid {
        where_: String,
        key: String,
        reason: String,
    },
}

impl ConfigError {
    /// A semantic error about `key`; `path` is the config file, if one was read.
    pub fn invalid(path: Option<&Path>, key: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            where_: path
                .map(|p| format!("{}: ", p.display()))
                .unwrap_or_default(),
            key: key.to_owned(),
            reason,
        }
    }
}

/// Reads and parses a TOML file; unknown keys are errors (a typo must not be ignored silently).
/// Values of a closed set (log format, relay engine, capture mode) are typed in the file
/// structs, so a wrong one is a parse error that quotes the line and lists the choices.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Parses TOML `text` that came from `path` (named in errors). A value the file's types
/// refuse (a wrong variant, a negative count) becomes an error about its key, like the
/// semantic checks give; a broken file stays a parse error with toml's own excerpt.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(
        |e| match e.span().and_then(|span| key_at(text, span.start)) {
            Some(key) => ConfigError::invalid(Some(path), key, e.message().to_owned()),
            None => ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            },
        },
    )
}

/// The bare key of a `key = value` line when `offset` falls in its value.
fn key_at(text: &str, offset: usize) -> Option<&str> {
    let head = text.get(..offset)?;
    let line = &head[head.rfind('\n').map_or(0, |i| i + 1)..];
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    bare.then_some(key)
}

/// A setting that the command line overrides: the flag's value when it was given, else the
/// file's. Repeatable flags given at least once replace the file's whole list.
pub fn overlay<T>(file: &mut Option<T>, flag: Option<T>) {
    if flag.is_some() {
        *file = flag;
    }
}

/// Parses a prefix list; a bare address means a single host (/32 or /128). Errors name the
/// element, e.g. `allow_client[2]`.
pub fn parse_prefixes(
    path: Option<&Path>,
    key: &str,
    items: Option<&[String]>,
) -> Result<Vec<IpNet>, ConfigError> {
    items
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            parse_prefix(s)
                .map_err(|reason| ConfigError::invalid(path, &format!("{key}[{i}]"), reason))
        })
        .collect()
}

/// One prefix; a bare address means a single host.
pub fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        // 10.1.2.3/8 is almost always a typo for 10.0.0.0/8; say so rather than guess.
        if net.network() != net.addr() {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(format!(
            "{s:?} is not an IP prefix (like 192.0.2.0/24 or 2001:db8::/32) or address"
        )),
    }
}

/// `relay_engine`, `relay_buffer` and `idle_timeout_secs` (0: never) as one relay setting.
pub fn relay_config(
    path: Option<&Path>,
    engine: Option<Engine>,
    buffer: Option<usize>,
    idle_timeout_secs: Option<u64>,
    memory: Option<usize>,
) -> Result<RelayConfig, ConfigError> {
    let engine = engine.unwrap_or_default();
    let buffer = buffer.unwrap_or(crate::relay::DEFAULT_BUFFER);
    if !(4096..=(64 << 20)).contains(&buffer) {
        return Err(ConfigError::invalid(
            path,
            "relay_buffer",
            format!("{buffer} is outside 4096..=67108864 bytes"),
        ));
    }
    let idle_timeout = match idle_timeout_secs.unwrap_or(3600) {
        0 => None,
        n => Some(Duration::from_secs(n)),
    };
    let memory_cap = match memory {
        None => crate::budget::default_cap().unwrap_or(usize::MAX),
        Some(0) => usize::MAX,
        Some(n) if n >= 1 << 20 => n,
        Some(n) => {
            return Err(ConfigError::invalid(
                path,
                "relay_memory",
                format!("{n} is under 1048576 bytes (0: no limit)"),
            ));
        }
    };
    Ok(RelayConfig {
        engine,
        idle_timeout,
        buffer,
        // Per connection, once its send buffer is known.
        nudge: None,
        memory: crate::budget::Budget::global(),
        memory_cap,
    })
}

/// `mptcp_send_buffer` as written: bytes, or a word (`"auto"`); a flag gives the same.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum SendBufferValue {
    Bytes(usize),
    Word(String),
}

impl std::str::FromStr for SendBufferValue {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse() {
            Ok(n) => SendBufferValue::Bytes(n),
            Err(_) => SendBufferValue::Word(s.to_string()),
        })
    }
}

/// What braid does with its MPTCP sockets' send buffer ([`crate::sendbuf`] says why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SendBuffer {
    /// Sized to each connection's path while it runs (the default).
    #[default]
    Auto,
    /// Left to the kernel's autotuning (`0`).
    Kernel,
    /// A fixed `SO_SNDBUF` of this many bytes (the kernel doubles it).
    Fixed(usize),
}

impl SendBuffer {
    /// The size to set when the socket is made (`Fixed` only; "auto" decides per connection).
    pub fn fixed(self) -> Option<usize> {
        match self {
            SendBuffer::Fixed(n) => Some(n),
            _ => None,
        }
    }
}

/// `mptcp_send_buffer`: `"auto"` (absent: the same), `0` (the kernel's autotuning) or a fixed
/// size in bytes, 65536..=64 MiB.
pub fn mptcp_send_buffer(
    path: Option<&Path>,
    v: Option<SendBufferValue>,
) -> Result<SendBuffer, ConfigError> {
    let bad = |what: String| ConfigError::invalid(path, "mptcp_send_buffer", what);
    match v {
        None => Ok(SendBuffer::Auto),
        Some(SendBufferValue::Word(w)) if w == "auto" => Ok(SendBuffer::Auto),
        Some(SendBufferValue::Word(w)) => Err(bad(format!(
            "{w:?} is neither \"auto\" nor a size in bytes (0: the kernel's autotuning)"
        ))),
        Some(SendBufferValue::Bytes(0)) => Ok(SendBuffer::Kernel),
        Some(SendBufferValue::Bytes(n)) if (64 * 1024..=(64 << 20)).contains(&n) => {
            Ok(SendBuffer::Fixed(n))
        }
        Some(SendBufferValue::Bytes(n)) => Err(bad(format!(
            "{n} is outside 65536..=67108864 bytes (0: the kernel's autotuning; \"auto\": sized to the path)"
        ))),
    }
}

/// `congestion_control`: a kernel name (checked for shape here; whether the namespace allows
/// it is only known when a socket asks).
pub fn congestion_control(path: Option<&Path>, v: Option<&str>) -> Result<(), ConfigError> {
    match v {
        Some(cc)
            if cc.is_empty()
                || cc.len() > 15
                || !cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            Err(ConfigError::invalid(
                path,
                "congestion_control",
                format!("{cc:?} is not a congestion control name (e.g. reno, cubic, bbr)"),
            ))
        }
        _ => Ok(()),
    }
}

/// Where both daemons keep the ledger of the namespace settings they changed
/// ([`crate::ledger`]): a tmpfs, so that nothing is left to restore after a reboot.
pub const DEFAULT_STATE_DIR: &str = "/run/braid";

/// `state_dir`: an absolute path (a relative one would follow the daemon's working
/// directory, and a restarted daemon must find the same file). By default the directory
/// systemd made for the unit (`RuntimeDirectory=`, `$RUNTIME_DIRECTORY`): with
/// `ProtectSystem=strict` nothing else under `/run` is writable, and with `DynamicUser=` each
/// unit runs as its own user and needs a directory of its own.
pub fn state_dir(path: Option<&Path>, v: Option<PathBuf>) -> Result<PathBuf, ConfigError> {
    state_dir_with(path, v, std::env::var_os("RUNTIME_DIRECTORY"))
}

fn state_dir_with(
    path: Option<&Path>,
    v: Option<PathBuf>,
    runtime_directory: Option<std::ffi::OsString>,
) -> Result<PathBuf, ConfigError> {
    // Several directories are separated by colons; the first is the unit's own.
    let systemd = runtime_directory
        .as_deref()
        .and_then(|d| d.to_str()?.split(':').next().map(PathBuf::from))
        .filter(|d| d.is_absolute());
    match v {
        None => Ok(systemd.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))),
        Some(d) if d.is_absolute() => Ok(d),
        Some(d) => Err(ConfigError::invalid(
            path,
            "state_dir",
            format!("{} is not an absolute path", d.display()),
        )),
    }
}

#[cfg(test)]
mod state_dir_tests {
    use super::*;

    #[test]
    fn the_units_runtime_directory_unless_told() {
        let rd = |s: &str| Some(std::ffi::OsString::from(s));
        let dir = |v: Option<&str>, env| state_dir_with(None, v.map(PathBuf::from), env);
        assert_eq!(dir(None, None).unwrap(), Path::new("/run/braid"));
        assert_eq!(
            dir(None, rd("/run/braid-converter:/run/other")).unwrap(),
            Path::new("/run/braid-converter")
        );
        assert_eq!(dir(None, rd("relative")).unwrap(), Path::new("/run/braid"));
        assert_eq!(
            dir(Some("/var/run/x"), rd("/run/braid-converter")).unwrap(),
            Path::new("/var/run/x")
        );
        let e = dir(Some("run/x"), None).unwrap_err().to_string();
        assert!(e.contains("state_dir") && e.contains("absolute"), "{e}");
    }
}

#[cfg(test)]
mod send_buffer_tests {
    use super::*;

    #[test]
    fn mptcp_send_buffer_is_auto_unless_told() {
        use SendBufferValue::*;
        let word = |w: &str| Some(Word(w.to_string()));
        assert_eq!(mptcp_send_buffer(None, None).unwrap(), SendBuffer::Auto);
        assert_eq!(
            mptcp_send_buffer(None, word("auto")).unwrap(),
            SendBuffer::Auto
        );
        assert_eq!(
            mptcp_send_buffer(None, Some(Bytes(0))).unwrap(),
            SendBuffer::Kernel
        );
        assert_eq!(
            mptcp_send_buffer(None, Some(Bytes(4 << 20))).unwrap(),
            SendBuffer::Fixed(4 << 20)
        );
        for (v, says) in [(Some(Bytes(1000)), "65536"), (word("big"), "\"big\"")] {
            let e = mptcp_send_buffer(None, v).unwrap_err().to_string();
            assert!(e.contains("mptcp_send_buffer") && e.contains(says), "{e}");
        }
        // As a flag: a number or a word.
        assert_eq!(
            "auto".parse::<SendBufferValue>().unwrap(),
            Word("auto".into())
        );
        assert_eq!("65536".parse::<SendBufferValue>().unwrap(), Bytes(65536));
    }
}
