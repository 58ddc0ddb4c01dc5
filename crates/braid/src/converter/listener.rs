//! The converter's listening sockets: MPTCP (or TCP with `--tcp-only`), dual-stack for `[::]`,
//! and TCP Fast Open in no-cookie mode so the Convert request in the SYN is accepted at once.
//! Without TFO an MPTCP client that puts data in its SYN falls back to plain TCP (KERNEL.md).

use std::io;
use std::net::SocketAddr;

use braid_sys::sockopt::{mptcp_socket, set_tcp_fastopen, set_tcp_fastopen_no_cookie};
use socket2::{Domain, Socket, Type};

/// Backlog of fully established connections waiting for accept().
const BACKLOG: i32 = 4096;

pub fn bind(addr: SocketAddr, mptcp: bool, tfo_queue: i32) -> io::Result<std::net::TcpListener> {
    let domain = Domain::for_address(addr);
    let socket = if mptcp {
        mptcp_socket(domain)?
    } else {
        Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?
    };
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]:PORT` serves IPv4 clients too, as users expect from the flag's help.
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    set_tcp_fastopen(&socket, tfo_queue)?;
    set_tcp_fastopen_no_cookie(&socket)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
