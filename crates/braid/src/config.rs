//! Pieces shared by the daemons' configurations: reading a TOML file and the error type whose
//! every message names the file, the key and the reason.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::de::DeserializeOwned;

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
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
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
