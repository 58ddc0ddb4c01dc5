//! Socket options of MPTCP and TCP Fast Open that socket2 lacks. Constants come from the
//! kernel's uapi headers (`linux/tcp.h`, `linux/mptcp.h`); libc does not export all of them.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::os::fd::{AsFd, AsRawFd};

/// `IPPROTO_MPTCP`.
pub const IPPROTO_MPTCP: i32 = 262;
/// `SOL_MPTCP`.
pub const SOL_MPTCP: i32 = 284;
const MPTCP_INFO: i32 = 1;
const TCP_FASTOPEN: i32 = 23;
const TCP_FASTOPEN_CONNECT: i32 = 30;
const TCP_FASTOPEN_NO_COOKIE: i32 = 34;
const TCP_IS_MPTCP: i32 = 43;
/// `SO_SNDBUFFORCE` from `<asm-generic/socket.h>` (the libc crate exports it for Android
/// only): like `SO_SNDBUF`, past `net.core.wmem_max`, with `CAP_NET_ADMIN`.
pub const SO_SNDBUFFORCE: i32 = 32;
/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14; not in the libc crate).
const SO_NETNS_COOKIE: i32 = 71;
/// `SIOCOUTQ` is `TIOCOUTQ` on Linux: bytes in the send queue not yet acknowledged.
const SIOCOUTQ: libc::c_ulong = 0x5411;

/// `mptcpi_flags` bit: the connection fell back to plain TCP.
pub const MPTCP_INFO_FLAG_FALLBACK: u32 = 1 << 0;
/// `mptcpi_flags` bit: the peer's key arrived, i.e. the MPTCP handshake completed.
pub const MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED: u32 = 1 << 1;

fn setsockopt_int(fd: &impl AsFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: `fd` is a live descriptor borrowed for the call; the option value is a valid
    // c_int whose size is passed alongside.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn getsockopt_int(fd: &impl AsFd, level: i32, name: i32) -> io::Result<i32> {
    let fd = fd.as_fd().as_raw_fd();
    let mut value: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the buffer size.
    let r = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Enables TCP Fast Open on a listener with a pending-request queue of `qlen`.
pub fn set_tcp_fastopen(fd: &impl AsFd, qlen: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_FASTOPEN, qlen)
}

/// Accepts data in a SYN that carries no TFO cookie (RFC 8803 clients never have one).
pub fn set_tcp_fastopen_no_cookie(fd: &impl AsFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
}

/// Makes the first `write` after `connect` go out in the SYN (client side of 0-RTT).
pub fn set_tcp_fastopen_connect(fd: &impl AsFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
}

/// Whether the connection is (still) MPTCP. `Ok(false)` for plain TCP sockets and for MPTCP
/// connections that fell back to TCP.
pub fn is_mptcp(fd: &impl AsFd) -> io::Result<bool> {
    Ok(getsockopt_int(fd, libc::IPPROTO_TCP, TCP_IS_MPTCP)? != 0)
}

/// `tcpi_state` of `TCP_INFO` (`TCP_ESTABLISHED` = 1, `TCP_SYN_SENT` = 2, ...); on an MPTCP
/// socket, the state of the connection as its first subflow has it.
pub fn tcp_state(fd: &impl AsFd) -> io::Result<u8> {
    let fd = fd.as_fd().as_raw_fd();
    // The state is the first byte of `struct tcp_info`; a short buffer is allowed.
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is valid for `len` bytes of writes and the kernel writes at most `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        Ok(info[0])
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the send buffer to `bytes` (the kernel doubles it for its bookkeeping, as for
/// `SO_SNDBUF`) and locks it: the kernel no longer autotunes it. Uses `SO_SNDBUFFORCE` where
/// the process has `CAP_NET_ADMIN`, because `SO_SNDBUF` silently caps the value at
/// `net.core.wmem_max` (212992 on a stock kernel: a quarter of what braid asks for); falls
/// back to `SO_SNDBUF` without the capability. Returns the size in effect, read back.
pub fn set_send_buffer(fd: &impl AsFd, bytes: usize) -> io::Result<usize> {
    let v = i32::try_from(bytes).unwrap_or(i32::MAX);
    match setsockopt_int(fd, libc::SOL_SOCKET, SO_SNDBUFFORCE, v) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v)?
        }
        r => r?,
    }
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?.max(0) as usize)
}

/// `TCP_SYN_SENT`: the SYN is out and unanswered.
pub const TCP_SYN_SENT: u8 = 2;

/// Bytes written but not yet acknowledged by the peer.
pub fn unsent_bytes(fd: &impl AsFd) -> io::Result<u32> {
    let fd = fd.as_fd().as_raw_fd();
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which is valid for writes.
    let r = unsafe { libc::ioctl(fd, SIOCOUTQ, &raw mut n) };
    if r == 0 {
        Ok(n.max(0) as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `struct mptcp_info` of `linux/mptcp.h` (kernel 6.18 layout). Older kernels return a shorter
/// struct; the missing tail then reads as zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MptcpInfo {
    /// Extra subflows (the initial one is not counted).
    pub subflows: u8,
    pub add_addr_signal: u8,
    pub add_addr_accepted: u8,
    pub subflows_max: u8,
    pub add_addr_signal_max: u8,
    pub add_addr_accepted_max: u8,
    pub flags: u32,
    pub token: u32,
    pub write_seq: u64,
    pub snd_una: u64,
    pub rcv_nxt: u64,
    pub local_addr_used: u8,
    pub local_addr_max: u8,
    pub csum_enabled: u8,
    pub retransmits: u32,
    pub bytes_retrans: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// All subflows, the initial one included, that ever existed.
    pub subflows_total: u8,
    _reserved: [u8; 3],
    pub last_data_sent: u32,
    pub last_data_recv: u32,
    pub last_ack_recv: u32,
}

impl MptcpInfo {
    /// The connection fell back to plain TCP.
    pub fn fell_back(&self) -> bool {
        self.flags & MPTCP_INFO_FLAG_FALLBACK != 0
    }

    /// The MPTCP handshake has completed (the peer's key arrived).
    pub fn remote_key_received(&self) -> bool {
        self.flags & MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED != 0
    }
}

/// The cookie of the network namespace the socket was made in: unique until reboot and never
/// given to another namespace, unlike the namespace's inode number, which is reused as soon as
/// the namespace is gone.
pub fn netns_cookie(fd: &impl AsFd) -> io::Result<u64> {
    let fd = fd.as_fd().as_raw_fd();
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the buffer size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads `MPTCP_INFO`. Fails with `EOPNOTSUPP` on a connection that fell back to TCP and on
/// plain TCP sockets.
pub fn mptcp_info(fd: &impl AsFd) -> io::Result<MptcpInfo> {
    let fd = fd.as_fd().as_raw_fd();
    let mut info = MaybeUninit::<MptcpInfo>::zeroed();
    let mut len = size_of::<MptcpInfo>() as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes of writes; the kernel writes at most `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            SOL_MPTCP,
            MPTCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and every field is plain integers, so any bytes the kernel
    // wrote (or left zero, for a shorter struct) form a valid value.
    Ok(unsafe { info.assume_init() })
}

/// One subflow of an MPTCP connection, as `MPTCP_FULL_INFO` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubflowInfo {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
    /// The lowest round-trip time seen (`tcpi_min_rtt`), microseconds; 0 if unknown.
    pub min_rtt_us: u32,
    /// Bytes the peer acknowledged, and bytes received, on this subflow.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// `tcpi_state` (1 = established).
    pub state: u8,
    /// `tcpi_backoff`: RTOs in a row without progress (0 when data is being acknowledged).
    pub backoff: u8,
    /// `tcpi_options`: `TCPI_OPT_*` bits negotiated on the handshake ([`TCPI_OPT_SYN_DATA`]:
    /// the data in our SYN was acknowledged by the SYN-ACK).
    pub options: u8,
    /// Segments sent but not yet acknowledged.
    pub unacked: u32,
    /// Segments retransmitted over the subflow's life, and data segments sent.
    pub total_retrans: u32,
    pub data_segs_out: u32,
    /// Data segments that arrived out of order (each loss on the way in shows as out-of-order
    /// arrivals until the retransmission fills the hole).
    pub rcv_ooopack: u32,
}

/// `tcpi_options` bit: SYN-ACK acknowledged the data sent in the SYN (TCP Fast Open worked).
pub const TCPI_OPT_SYN_DATA: u8 = 32;

const MPTCP_FULL_INFO: i32 = 4;
/// What is read of each subflow's `struct tcp_info`: up to `tcpi_rcv_ooopack` (Linux 5.4).
const TCPINFO_LEN: usize = 228;
/// `struct mptcp_subflow_info`: a u32 id, padding to 8, two `sockaddr_storage`.
const SFINFO_LEN: usize = 8 + 2 * 128;
/// Subflows asked for: the kernel's maximum per connection, with the initial one.
const MAX_SUBFLOWS: usize = 9;

/// A socket address from a `sockaddr_storage`'s bytes.
fn sockaddr_of(b: &[u8]) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let family = u16::from_ne_bytes(b.get(..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(Ipv4Addr::from(ip).into(), port))
        }
        libc::AF_INET6 => {
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            Some(SocketAddr::new(Ipv6Addr::from(ip).into(), port))
        }
        _ => None,
    }
}

/// The subflows of an MPTCP connection with their addresses, RTT and byte counts
/// (`MPTCP_FULL_INFO`, Linux 6.3 and later). Fails with `EOPNOTSUPP` on a connection that fell
/// back to TCP and on plain TCP sockets.
pub fn mptcp_subflows(fd: &impl AsFd) -> io::Result<Vec<SubflowInfo>> {
    mptcp_full(fd).map(|(_, subflows)| subflows)
}

/// The connection's `MPTCP_INFO` and its subflows, in one `MPTCP_FULL_INFO` read (see
/// [`mptcp_subflows`]).
pub fn mptcp_full(fd: &impl AsFd) -> io::Result<(MptcpInfo, Vec<SubflowInfo>)> {
    let fd = fd.as_fd().as_raw_fd();
    let mut sfinfo = vec![0u8; SFINFO_LEN * MAX_SUBFLOWS];
    let mut tcpinfo = vec![0u8; TCPINFO_LEN * MAX_SUBFLOWS];
    // struct mptcp_full_info: six u32 sizes and counts, two u64 pointers, struct mptcp_info.
    let mut full = vec![0u8; 6 * 4 + 2 * 8 + size_of::<MptcpInfo>()];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    put32(&mut full, 4, TCPINFO_LEN as u32);
    put32(&mut full, 12, SFINFO_LEN as u32);
    put32(&mut full, 20, MAX_SUBFLOWS as u32);
    full[24..32].copy_from_slice(&(sfinfo.as_mut_ptr() as u64).to_ne_bytes());
    full[32..40].copy_from_slice(&(tcpinfo.as_mut_ptr() as u64).to_ne_bytes());
    let mut len = full.len() as libc::socklen_t;
    // SAFETY: `full` is valid for `len` bytes of writes; the two pointers in it point to
    // buffers of `size_arrays_user` (MAX_SUBFLOWS) elements of the sizes declared next to
    // them, which live until after the call; the kernel writes at most that into each.
    let r = unsafe {
        libc::getsockopt(
            fd,
            SOL_MPTCP,
            MPTCP_FULL_INFO,
            full.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let get32 = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4"));
    let get64 = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8"));
    let n = (get32(&full, 16) as usize).min(MAX_SUBFLOWS);
    let sf_size = (get32(&full, 12) as usize).min(SFINFO_LEN);
    let tcp_size = (get32(&full, 4) as usize).min(TCPINFO_LEN);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let sf = &sfinfo[i * SFINFO_LEN..i * SFINFO_LEN + sf_size];
        let ti = &tcpinfo[i * TCPINFO_LEN..i * TCPINFO_LEN + tcp_size];
        let (Some(local), Some(remote)) = (sockaddr_of(&sf[8..]), sockaddr_of(&sf[8 + 128..]))
        else {
            continue;
        };
        out.push(SubflowInfo {
            local,
            remote,
            state: ti.first().copied().unwrap_or(0),
            rtt_us: if ti.len() >= 72 { get32(ti, 68) } else { 0 },
            min_rtt_us: if ti.len() >= 152 { get32(ti, 148) } else { 0 },
            bytes_acked: if ti.len() >= 128 { get64(ti, 120) } else { 0 },
            bytes_received: if ti.len() >= 136 { get64(ti, 128) } else { 0 },
            backoff: ti.get(4).copied().unwrap_or(0),
            options: ti.get(5).copied().unwrap_or(0),
            unacked: if ti.len() >= 28 { get32(ti, 24) } else { 0 },
            total_retrans: if ti.len() >= 104 { get32(ti, 100) } else { 0 },
            data_segs_out: if ti.len() >= 160 { get32(ti, 156) } else { 0 },
            rcv_ooopack: if ti.len() >= 228 { get32(ti, 224) } else { 0 },
        });
    }
    let at = 6 * 4 + 2 * 8;
    // SAFETY: `full` holds `at + size_of::<MptcpInfo>()` bytes (it was sized so), the read is
    // unaligned-safe, and `MptcpInfo` is plain integers, for which every bit pattern is valid.
    let info = unsafe { std::ptr::read_unaligned(full[at..].as_ptr().cast::<MptcpInfo>()) };
    Ok((info, out))
}

/// The socket's `SO_SNDBUF` (what the kernel uses: twice what was set).
pub fn send_buffer(fd: &impl AsFd) -> io::Result<usize> {
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?.max(0) as usize)
}

/// An ICMP error the kernel queued for a socket (`IP_RECVERR`): what a router or the destination
/// said about our SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    /// True for ICMPv6.
    pub v6: bool,
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// Asks the kernel to queue ICMP errors on the socket's error queue, so that a failed connect
/// can be explained with the exact ICMP type and code instead of a bare errno.
pub fn set_recv_icmp_errors(fd: &impl AsFd, v6: bool) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    if v6 {
        setsockopt(fd, sockopt::Ipv6RecvErr, &true)?;
    } else {
        setsockopt(fd, sockopt::Ipv4RecvErr, &true)?;
    }
    Ok(())
}

/// Pops the first ICMP error from the socket's error queue, if any.
pub fn take_icmp_error(fd: &impl AsFd) -> Option<IcmpError> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    const SO_EE_ORIGIN_ICMP: u8 = 2;
    const SO_EE_ORIGIN_ICMP6: u8 = 3;
    let mut data = [0u8; 64];
    let mut iov = [io::IoSliceMut::new(&mut data)];
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        fd.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    for c in msg.cmsgs().ok()? {
        let (ee, v6) = match c {
            ControlMessageOwned::Ipv4RecvErr(ee, _) => (ee, false),
            ControlMessageOwned::Ipv6RecvErr(ee, _) => (ee, true),
            _ => continue,
        };
        if ee.ee_origin == SO_EE_ORIGIN_ICMP || ee.ee_origin == SO_EE_ORIGIN_ICMP6 {
            return Some(IcmpError {
                v6,
                icmp_type: ee.ee_type,
                icmp_code: ee.ee_code,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::Domain;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};

    #[test]
    fn the_namespace_cookie_is_the_same_for_every_socket_of_a_namespace() {
        let a = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cookie = netns_cookie(&a).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(netns_cookie(&b).unwrap(), cookie);
    }

    #[test]
    fn mptcp_info_layout_matches_the_kernel() {
        // sizeof(struct mptcp_info) on 6.18 (x86_64 and aarch64 alike).
        assert_eq!(size_of::<MptcpInfo>(), 96);
        assert_eq!(std::mem::offset_of!(MptcpInfo, flags), 8);
        assert_eq!(std::mem::offset_of!(MptcpInfo, subflows_total), 80);
    }

    /// A loopback MPTCP connection: the options read back as the kernel reports them.
    #[test]
    fn loopback_mptcp_connection_reports_mptcp() {
        let mptcp = crate::SocketSpec {
            mptcp: true,
            ..Default::default()
        };
        let listener = match mptcp.open(Domain::IPV4) {
            Ok(s) => s,
            Err(e) => panic!("MPTCP socket: {e} (is net.mptcp.enabled=1?)"),
        };
        listener.set_nonblocking(false).unwrap();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&addr.into()).unwrap();
        set_tcp_fastopen(&listener, 16).unwrap();
        set_tcp_fastopen_no_cookie(&listener).unwrap();
        listener.listen(16).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();

        let client = mptcp.open(Domain::IPV4).unwrap();
        client.set_nonblocking(false).unwrap();
        client.connect(&addr.into()).unwrap();
        let mut client: TcpStream = client.into();
        client.write_all(b"ping").unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut server: TcpStream = server.into();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        assert!(is_mptcp(&server).unwrap());
        let subflows = mptcp_subflows(&client).unwrap();
        assert_eq!(subflows.len(), 1, "{subflows:?}");
        assert_eq!(subflows[0].remote, addr);
        assert_eq!(subflows[0].state, 1);
        assert!(subflows[0].bytes_acked >= 4, "{subflows:?}");
        let info = mptcp_info(&client).unwrap();
        assert!(!info.fell_back());
        assert!(info.remote_key_received());
        assert_eq!(unsent_bytes(&server).unwrap(), 0);
    }

    #[test]
    fn plain_tcp_is_not_mptcp() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(!is_mptcp(&c).unwrap());
        assert_eq!(
            mptcp_info(&c).unwrap_err().raw_os_error(),
            Some(libc::EOPNOTSUPP)
        );
    }
}
