//! Kernel feature checks. Each failure names the sysctl or kernel version that is missing and
//! the command that fixes it, because "Protocol not available" helps nobody at 3 a.m.
//!
//! Sysctls are read from `/proc/sys` of the calling thread's network namespace, which is where
//! `net.mptcp.*` and `net.ipv4.tcp_fastopen` live.

use std::fs;
use std::io;
use std::path::Path;

/// A missing or disabled kernel feature, with the remedy in the message.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this kernel has no MPTCP (no /proc/sys/net/mptcp): braid needs Linux >= 5.19 built with \
         CONFIG_MPTCP=y (6.x recommended); running kernel {kernel}"
    )]
    NoMptcp { kernel: String },
    #[error("MPTCP is disabled in this network namespace: run `sysctl -w net.mptcp.enabled=1`")]
    MptcpDisabled,
    #[error(
        "net.ipv4.tcp_fastopen is {current:#x} and lacks {missing:#x} ({what}): run \
         `sysctl -w net.ipv4.tcp_fastopen={wanted:#x}`"
    )]
    TfoBits {
        current: u32,
        missing: u32,
        wanted: u32,
        what: &'static str,
    },
    #[error("reading or writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

const MPTCP_ENABLED: &str = "/proc/sys/net/mptcp/enabled";
const TCP_FASTOPEN: &str = "/proc/sys/net/ipv4/tcp_fastopen";

/// Bits of `net.ipv4.tcp_fastopen` (Documentation/networking/ip-sysctl.rst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TfoMode;

impl TfoMode {
    /// Client may send data in the SYN.
    pub const CLIENT: u32 = 0x1;
    /// Server accepts data in the SYN.
    pub const SERVER: u32 = 0x2;
    /// Client sends data in the SYN without a cookie (RFC 8803 clients never hold one).
    pub const CLIENT_NO_COOKIE: u32 = 0x4;
    /// Every listener accepts SYN data without a cookie.
    pub const SERVER_NO_COOKIE: u32 = 0x200;
}

fn read_sysctl(path: &str) -> Result<String, KernelError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| KernelError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The running kernel's release, for messages.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Checks that MPTCP exists and is enabled in this namespace.
pub fn check_mptcp() -> Result<(), KernelError> {
    if !Path::new(MPTCP_ENABLED).exists() {
        return Err(KernelError::NoMptcp {
            kernel: kernel_release(),
        });
    }
    match read_sysctl(MPTCP_ENABLED)?.as_str() {
        "0" => Err(KernelError::MptcpDisabled),
        _ => Ok(()),
    }
}

/// Current value of `net.ipv4.tcp_fastopen`.
pub fn tcp_fastopen() -> Result<u32, KernelError> {
    let raw = read_sysctl(TCP_FASTOPEN)?;
    raw.parse().map_err(|_| KernelError::Io {
        path: TCP_FASTOPEN.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, format!("not a number: {raw:?}")),
    })
}

/// The value `net.ipv4.tcp_fastopen` needs so that it has all of `bits`, given its `current`
/// value. Without `may_set`, a missing bit is an error carrying the exact command to run; the
/// caller writes the value (and records that it did).
pub fn tfo_with(
    current: u32,
    bits: u32,
    what: &'static str,
    may_set: bool,
) -> Result<u32, KernelError> {
    let missing = bits & !current;
    if missing == 0 || may_set {
        return Ok(current | bits);
    }
    Err(KernelError::TfoBits {
        current,
        missing,
        wanted: current | bits,
        what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_sysctl_and_the_fix() {
        let e = KernelError::TfoBits {
            current: 0x1,
            missing: 0x2,
            wanted: 0x3,
            what: "server",
        };
        let msg = e.to_string();
        assert!(msg.contains("net.ipv4.tcp_fastopen"), "{msg}");
        assert!(msg.contains("sysctl -w net.ipv4.tcp_fastopen=0x3"), "{msg}");
        assert!(
            KernelError::MptcpDisabled
                .to_string()
                .contains("net.mptcp.enabled=1")
        );
    }

    #[test]
    fn missing_bits_are_added_or_refused_with_the_command() {
        assert_eq!(tfo_with(0x1, TfoMode::SERVER, "s", true).unwrap(), 0x3);
        assert_eq!(tfo_with(0x3, TfoMode::SERVER, "s", false).unwrap(), 0x3);
        let e = tfo_with(0x1, TfoMode::SERVER, "s", false).unwrap_err();
        assert!(e.to_string().contains("tcp_fastopen=0x3"), "{e}");
    }

    #[test]
    fn this_machine_has_mptcp() {
        check_mptcp().unwrap();
        assert!(tcp_fastopen().is_ok());
        // Asking for bits already there never needs a change.
        let cur = tcp_fastopen().unwrap();
        assert_eq!(tfo_with(cur, cur, "nothing", false).unwrap(), cur);
    }
}
