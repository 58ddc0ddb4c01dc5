//! The converter's listening sockets: MPTCP (or TCP with `--tcp-only`), dual-stack for `[::]`,
//! and TCP Fast Open in no-cookie mode so the Convert request in the SYN is accepted at once.
//! Without Fast Open on the listener the kernel does not just lose the 0-RTT: an MPTCP client
//! that put data in its SYN falls back to plain TCP.

use std::io;
use std::net::SocketAddr;

use braid_sys::{FastOpen, SocketSpec};

/// Backlog of fully established connections waiting for accept().
const BACKLOG: i32 = 4096;

pub fn bind(addr: SocketAddr, mptcp: bool, tfo_queue: i32) -> io::Result<std::net::TcpListener> {
    SocketSpec {
        mptcp,
        fast_open: Some(FastOpen::ListenNoCookie { queue: tfo_queue }),
        reuse_address: true,
        // `[::]:PORT` serves IPv4 clients too, as users expect from the flag's help.
        only_v6: (addr.is_ipv6() && addr.ip().is_unspecified()).then_some(false),
        ..SocketSpec::default()
    }
    .listen(addr, BACKLOG)
}
