//! The converter's TCP connection to the destination server, and the exact mapping of its
//! failures to Convert errors: a RST → 96, an ICMP unreachable or no route → 97 with the ICMP
//! code, a timeout or local failure → 65.
//!
//! The ICMP code comes from the socket's error queue (`IP_RECVERR`): errno alone cannot tell
//! "port unreachable" from a RST (both are ECONNREFUSED) nor give the code.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use braid_proto::convert::ErrorCode;
use braid_sys::sockopt::{IcmpError, take_icmp_error};
use braid_sys::{FastOpen, SocketSpec};
use tokio::net::{TcpSocket, TcpStream};

/// Why the server could not be reached.
#[derive(Debug)]
pub enum UpstreamError {
    /// The server answered the SYN with RST.
    Refused,
    /// ICMP unreachable (with its code), or no route here (code 0 for "network unreachable",
    /// 1 for "host unreachable", as ICMP would say).
    Unreachable { code: u8, error: io::Error },
    /// No answer within the connect timeout.
    Timeout,
    /// The converter itself is out of a resource (descriptors, memory, ports): Error 64,
    /// which tells the client to back off or use another converter.
    Exhausted(io::Error),
    /// The converter itself could not try for another local reason.
    Local(io::Error),
}

impl UpstreamError {
    /// Convert Error code and the one-byte value that goes with it.
    pub fn convert_error(&self) -> (ErrorCode, u8) {
        match self {
            UpstreamError::Refused => (ErrorCode::ConnectionReset, 0),
            UpstreamError::Unreachable { code, .. } => (ErrorCode::DestinationUnreachable, *code),
            UpstreamError::Exhausted(_) => (ErrorCode::ResourceExceeded, 0),
            UpstreamError::Timeout | UpstreamError::Local(_) => (ErrorCode::NetworkFailure, 0),
        }
    }

    /// Short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::Refused => "refused",
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Exhausted(_) => "resource_exhausted",
            UpstreamError::Local(_) => "local_error",
        }
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Refused => write!(f, "connection refused (RST)"),
            UpstreamError::Unreachable { code, error } => {
                write!(f, "destination unreachable (ICMP code {code}): {error}")
            }
            UpstreamError::Timeout => write!(f, "connect timed out"),
            UpstreamError::Exhausted(e) => write!(f, "out of a local resource: {e}"),
            UpstreamError::Local(e) => write!(f, "local error: {e}"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct UpstreamOptions {
    pub connect_timeout: Duration,
    pub congestion_control: Option<String>,
    /// Send the first bytes in the SYN (TCP Fast Open) when there are any.
    pub fastopen: bool,
}

/// Connects to `dest` over plain TCP (never MPTCP: towards a server without MPTCP the socket
/// would fall back to TCP, and the fallen-back receive path is several times slower), both
/// families, whatever family the client used.
///
/// With `opts.fastopen` and non-empty `early`, the early bytes ride in the SYN when the kernel
/// holds a Fast Open cookie for the server (the first connection to a server fetches one).
/// Returns the stream and how many bytes of `early` it already sent; the caller writes the rest.
pub async fn connect(
    dest: SocketAddr,
    opts: &UpstreamOptions,
    early: &[u8],
) -> Result<(TcpStream, usize), UpstreamError> {
    if opts.fastopen && !early.is_empty() {
        return connect_fastopen(dest, opts, early).await;
    }
    plain_connect(dest, opts).await.map(|s| (s, 0))
}

/// The socket toward the server: TCP, ICMP errors kept for the error mapping.
fn upstream_socket(
    dest: SocketAddr,
    opts: &UpstreamOptions,
    fast_open: Option<FastOpen>,
) -> Result<socket2::Socket, UpstreamError> {
    SocketSpec {
        congestion_control: opts.congestion_control.clone(),
        recv_icmp_errors: true,
        fast_open,
        ..SocketSpec::default()
    }
    .open_for(dest)
    .map_err(|e| classify(e, None))
}

async fn plain_connect(
    dest: SocketAddr,
    opts: &UpstreamOptions,
) -> Result<TcpStream, UpstreamError> {
    let socket = upstream_socket(dest, opts, None)?;
    // connect() consumes the socket; a duplicate of the descriptor keeps the error queue
    // readable after a failure.
    let errq: Option<OwnedFd> = socket.as_fd().try_clone_to_owned().ok();
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(opts.connect_timeout, socket.connect(dest)).await {
        Err(_) => Err(UpstreamError::Timeout),
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(classify(e, errq.as_ref().and_then(take_icmp_error))),
    }
}

/// The Fast Open path, done by hand: tokio's `connect` treats the deferred connect of
/// `TCP_FASTOPEN_CONNECT` as already established, so it would report success before the server
/// answered and the refusal/unreachable mapping would be lost.
async fn connect_fastopen(
    dest: SocketAddr,
    opts: &UpstreamOptions,
    early: &[u8],
) -> Result<(TcpStream, usize), UpstreamError> {
    let socket = upstream_socket(dest, opts, Some(FastOpen::Connect))?;
    let errq: Option<OwnedFd> = socket.as_fd().try_clone_to_owned().ok();
    let fail = |e: io::Error| classify(e, errq.as_ref().and_then(take_icmp_error));
    // Ok: the kernel holds a cookie and deferred the SYN until the first write, which then
    // carries the data. EINPROGRESS: no cookie yet, a plain SYN asking for one is out.
    let sent = match socket.connect(&dest.into()) {
        Ok(()) => match socket.send(early) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(fail(e)),
        },
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => 0,
        Err(e) => return Err(fail(e)),
    };
    // Registered now, in SYN_SENT: the first write-readiness is the handshake's end.
    let stream = TcpStream::from_std(socket.into()).map_err(UpstreamError::Local)?;
    match tokio::time::timeout(opts.connect_timeout, stream.writable()).await {
        Err(_) => return Err(UpstreamError::Timeout),
        Ok(Err(e)) => return Err(fail(e)),
        Ok(Ok(())) => {}
    }
    if let Some(e) = stream.take_error().map_err(UpstreamError::Local)? {
        return Err(fail(e));
    }
    // A socket that is writable without an error may still have been reset at once.
    if let Err(e) = stream.peer_addr() {
        return Err(fail(e));
    }
    Ok((stream, sent))
}

fn classify(e: io::Error, icmp: Option<IcmpError>) -> UpstreamError {
    if let Some(icmp) = icmp {
        // ICMPv4 type 3 / ICMPv6 type 1: destination unreachable; its code goes to the client.
        let unreachable = if icmp.v6 {
            icmp.icmp_type == 1
        } else {
            icmp.icmp_type == 3
        };
        if unreachable {
            return UpstreamError::Unreachable {
                code: icmp.icmp_code,
                error: e,
            };
        }
    }
    match braid_sys::socket::os_error(&e) {
        // A reset that arrives just after the handshake (a server shedding load) is still the
        // server's reset: 96, not a converter failure.
        Some(libc::ECONNREFUSED | libc::ECONNRESET) => UpstreamError::Refused,
        Some(libc::ENETUNREACH) => UpstreamError::Unreachable { code: 0, error: e },
        Some(libc::EHOSTUNREACH | libc::EHOSTDOWN) => {
            UpstreamError::Unreachable { code: 1, error: e }
        }
        Some(libc::ETIMEDOUT) => UpstreamError::Timeout,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL) => {
            UpstreamError::Exhausted(e)
        }
        _ => UpstreamError::Local(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(fastopen: bool) -> UpstreamOptions {
        UpstreamOptions {
            connect_timeout: Duration::from_secs(2),
            congestion_control: Some("reno".into()),
            fastopen,
        }
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        // Bind then drop: the port is closed, loopback answers RST.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        for fastopen in [false, true] {
            let e = connect(([127, 0, 0, 1], port).into(), &opts(fastopen), b"early")
                .await
                .unwrap_err();
            assert!(matches!(e, UpstreamError::Refused), "{e}");
            assert_eq!(e.convert_error(), (ErrorCode::ConnectionReset, 0));
        }
    }

    #[tokio::test]
    async fn open_port_connects() {
        let l = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        for fastopen in [false, true] {
            let (s, sent) = connect(l.local_addr().unwrap(), &opts(fastopen), b"early")
                .await
                .unwrap();
            assert_eq!(s.peer_addr().unwrap(), l.local_addr().unwrap());
            // The listener has no Fast Open: nothing can have gone in the SYN.
            assert_eq!(sent, 0);
        }
    }

    #[test]
    fn running_out_of_local_resources_is_error_64() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
        ] {
            let e = classify(io::Error::from_raw_os_error(errno), None);
            assert_eq!(
                e.convert_error(),
                (ErrorCode::ResourceExceeded, 0),
                "errno {errno}"
            );
        }
        let e = classify(io::Error::from_raw_os_error(libc::EPERM), None);
        assert_eq!(e.convert_error(), (ErrorCode::NetworkFailure, 0));
        let e = classify(io::Error::from_raw_os_error(libc::ECONNRESET), None);
        assert_eq!(e.convert_error(), (ErrorCode::ConnectionReset, 0));
    }

    #[test]
    fn icmp_codes_win_over_errno() {
        let port_unreach = IcmpError {
            v6: false,
            icmp_type: 3,
            icmp_code: 3,
        };
        let e = classify(
            io::Error::from_raw_os_error(libc::ECONNREFUSED),
            Some(port_unreach),
        );
        assert_eq!(e.convert_error(), (ErrorCode::DestinationUnreachable, 3));
        let admin = IcmpError {
            v6: true,
            icmp_type: 1,
            icmp_code: 1,
        };
        let e = classify(io::Error::from_raw_os_error(libc::EACCES), Some(admin));
        assert_eq!(e.convert_error(), (ErrorCode::DestinationUnreachable, 1));
        let e = classify(io::Error::from_raw_os_error(libc::ENETUNREACH), None);
        assert_eq!(e.convert_error(), (ErrorCode::DestinationUnreachable, 0));
    }
}
