//! braid-sys: the one crate that talks to the kernel, through socket options and netlink.
//!
//! - [`socket`]: [`SocketSpec`], the one recipe for every stream socket braid opens (MPTCP or
//!   TCP, Fast Open, congestion control, mark, receive buffer, transparent, bind).
//! - [`sockopt`]: socket options socket2 does not cover — TCP Fast Open (listener queue,
//!   no-cookie mode, connect-with-data), `MPTCP_INFO`, `TCP_IS_MPTCP`, the unsent byte count
//!   (`SIOCOUTQ`), ICMP errors from the error queue.
//! - [`kernel`]: reads of the namespace's sysctls (`net.mptcp.enabled`, `net.ipv4.tcp_fastopen`)
//!   turned into errors that name the sysctl and the command that fixes it.
//! - [`pm`]: the MPTCP path manager over generic netlink: limits and endpoints, read and write.
//! - [`route`]: the TPROXY policy routing over rtnetlink (a rule and a `local` route braid
//!   owns) and whether an address is one of the machine's own.
//! - [`rtnl`]: interfaces, addresses, routes and rules over rtnetlink as plain values, changes
//!   to the ones braid owns, and a stream of link/address/route change notifications.
//! - [`nft`]: a small nftables netlink client for the tables braid owns.
//! - [`rawio`]: TAP devices, packet sockets and real-time scheduling for the test lab's
//!   user-space delay line.
//!
//! `SO_ORIGINAL_DST`, linger and nodelay come from socket2 directly. All `unsafe` of the project
//! lives here, each block with its `SAFETY:` reason.

pub mod kernel;
pub mod nft;
pub mod pm;
pub mod rawio;
pub mod route;
pub mod rtnl;
pub mod socket;
pub mod sockopt;

pub use kernel::{KernelError, TfoMode};
pub use socket::{FastOpen, SocketSpec};
pub use sockopt::MptcpInfo;
