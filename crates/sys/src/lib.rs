//! braid-sys: the one crate that talks to the kernel about sockets.
//!
//! - [`sockopt`]: socket options socket2 does not cover — TCP Fast Open (listener queue,
//!   no-cookie mode, connect-with-data), `MPTCP_INFO`, `TCP_IS_MPTCP`, the unsent byte count
//!   (`SIOCOUTQ`) — and [`sockopt::mptcp_socket`] to open an MPTCP socket.
//! - [`kernel`]: reads of the namespace's sysctls (`net.mptcp.enabled`, `net.ipv4.tcp_fastopen`)
//!   turned into errors that name the sysctl and the command that fixes it.
//!
//! Everything else (congestion control, `IP_TRANSPARENT`, `SO_ORIGINAL_DST`, linger, nodelay)
//! comes from socket2 directly. All `unsafe` of the project lives here.

pub mod kernel;
pub mod nft;
pub mod pm;
pub mod route;
pub mod sockopt;

pub use kernel::{KernelError, TfoMode};
pub use sockopt::{MptcpInfo, mptcp_socket};
