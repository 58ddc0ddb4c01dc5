//! The lab's one error type. Every variant names the namespace and the operation, so a failing
//! test says which step of which topology broke without a debugger.

use std::io;
use std::time::Duration;

/// Result alias for the lab.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong while building or driving a lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A command ran but exited unsuccessfully.
    #[error("`{cmd}` in {ns} failed ({status}): {stderr}")]
    Command {
        /// The command line, as it would be typed.
        cmd: String,
        /// Namespace it ran in (`host` for the host namespace).
        ns: String,
        /// Exit status, as printed by std.
        status: String,
        /// Trimmed standard error of the command.
        stderr: String,
    },
    /// A command could not be started (missing binary, bad arguments).
    #[error("could not start `{cmd}` in {ns}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Namespace it was meant to run in.
        ns: String,
        /// Why `spawn` failed.
        source: io::Error,
    },
    /// A netlink request was refused by the kernel.
    #[error("netlink: {op} in {ns}: {source}")]
    Netlink {
        /// What was being done, e.g. `add address 10.0.0.1/24 to c-g`.
        op: String,
        /// Namespace the request was sent in.
        ns: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// A file or socket operation failed.
    #[error("{op} in {ns}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// Namespace it was done in.
        ns: String,
        /// The OS error.
        source: io::Error,
    },
    /// Entering a namespace (`setns`) failed; usually the namespace was already deleted.
    #[error("entering namespace {ns}: {source}")]
    Setns {
        /// The namespace.
        ns: String,
        /// The errno from `setns` or `open`.
        source: nix::Error,
    },
    /// Something did not happen within its deadline.
    #[error("{what} in {ns}: timed out after {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// Namespace it was awaited in.
        ns: String,
        /// How long we waited.
        after: Duration,
    },
    /// The requested topology or parameter is impossible (bad name, zero uplinks, ...).
    #[error("invalid lab configuration: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn io(op: impl Into<String>, ns: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op: op.into(),
            ns: ns.into(),
            source,
        }
    }
}
