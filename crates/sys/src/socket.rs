//! One recipe for every stream socket braid opens: listeners and connections of both daemons,
//! MPTCP or TCP, with the options they need applied in the order the kernel needs them (receive
//! buffer and Fast Open before connect, `IP_TRANSPARENT` and reuse before bind).
//!
//! One error policy: an option that was asked for and that the kernel refuses fails the whole
//! socket, with the option named in the error. A daemon checks its settings once at start
//! ([`check_congestion_control`]), so a refusal later is a real failure, not noise.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::sockopt::{set_tcp_fastopen, set_tcp_fastopen_connect, set_tcp_fastopen_no_cookie};

/// TCP Fast Open, as a socket uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastOpen {
    /// Connecting: the first write goes out in the SYN when the kernel holds a cookie for the
    /// server (`TCP_FASTOPEN_CONNECT`).
    Connect,
    /// Connecting to a Transport Converter: the first write always goes in the SYN, without a
    /// cookie (RFC 8803 clients never hold one), so the host needs only the client bit of
    /// `net.ipv4.tcp_fastopen`.
    ConnectNoCookie,
    /// Listening: accept data in SYNs without a cookie, with a queue of this many pending
    /// Fast Open requests.
    ListenNoCookie { queue: i32 },
}

/// How to build a stream socket. Every field off by default: `SocketSpec::default()` is a
/// plain non-blocking TCP socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketSpec {
    /// `IPPROTO_MPTCP` instead of TCP.
    pub mptcp: bool,
    pub fast_open: Option<FastOpen>,
    /// `TCP_CONGESTION` (a name the namespace allows, e.g. `reno`, `cubic`, `bbr`).
    pub congestion_control: Option<String>,
    /// `SO_MARK`, e.g. so that a capture rule can recognise the daemon's own sockets.
    pub mark: Option<u32>,
    /// A fixed `SO_RCVBUF` (disables receive autotuning; it also fixes the window scale that
    /// the SYN advertises).
    pub recv_buffer: Option<usize>,
    /// A fixed `SO_SNDBUF` (disables send autotuning; bounds what the socket keeps in flight).
    pub send_buffer: Option<usize>,
    /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`: accept connections to any address (TPROXY).
    pub transparent: bool,
    /// `SO_REUSEADDR` (listeners restarted while old connections linger).
    pub reuse_address: bool,
    /// `IPV6_V6ONLY` for IPv6 sockets: `Some(false)` makes `[::]` serve IPv4 as well.
    pub only_v6: Option<bool>,
    /// `IP_RECVERR` / `IPV6_RECVERR`: keep ICMP errors on the error queue so that a failed
    /// connect can be explained exactly.
    pub recv_icmp_errors: bool,
    /// Address to bind (selects the source, and for MPTCP the first subflow's link).
    pub bind: Option<SocketAddr>,
}

/// A socket option the kernel refused: names it, so "Operation not permitted" says which one,
/// and keeps the errno (see [`os_error`]).
#[derive(Debug)]
struct OptionError {
    name: &'static str,
    source: io::Error,
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.source)
    }
}

impl std::error::Error for OptionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn option(name: &'static str) -> impl FnOnce(io::Error) -> io::Error {
    move |source| io::Error::new(source.kind(), OptionError { name, source })
}

/// The errno of an error from [`SocketSpec`] (or any `io::Error`), also when an option's name
/// was added to it.
pub fn os_error(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()?
            .downcast_ref::<OptionError>()?
            .source
            .raw_os_error()
    })
}

impl SocketSpec {
    /// A non-blocking, close-on-exec socket of `domain` with every option applied and bound if
    /// [`SocketSpec::bind`] says so; not yet connected or listening.
    pub fn open(&self, domain: Domain) -> io::Result<Socket> {
        let protocol = if self.mptcp {
            Protocol::MPTCP
        } else {
            Protocol::TCP
        };
        let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(protocol))?;
        let v6 = domain == Domain::IPV6;
        if self.reuse_address {
            s.set_reuse_address(true).map_err(option("SO_REUSEADDR"))?;
        }
        if let (true, Some(only)) = (v6, self.only_v6) {
            s.set_only_v6(only).map_err(option("IPV6_V6ONLY"))?;
        }
        if self.transparent {
            if v6 {
                s.set_ip_transparent_v6(true)
            } else {
                s.set_ip_transparent_v4(true)
            }
            .map_err(option("IP_TRANSPARENT (needs CAP_NET_ADMIN)"))?;
        }
        if let Some(size) = self.recv_buffer {
            s.set_recv_buffer_size(size).map_err(option("SO_RCVBUF"))?;
        }
        if let Some(size) = self.send_buffer {
            crate::sockopt::set_send_buffer(&s, size).map_err(option("SO_SNDBUF"))?;
        }
        if let Some(cc) = &self.congestion_control {
            s.set_tcp_congestion(cc.as_bytes())
                .map_err(option("TCP_CONGESTION"))?;
        }
        if let Some(mark) = self.mark {
            s.set_mark(mark)
                .map_err(option("SO_MARK (needs CAP_NET_ADMIN)"))?;
        }
        if self.recv_icmp_errors {
            crate::sockopt::set_recv_icmp_errors(&s, v6).map_err(option("IP_RECVERR"))?;
        }
        match self.fast_open {
            None => {}
            Some(FastOpen::Connect) => {
                set_tcp_fastopen_connect(&s).map_err(option("TCP_FASTOPEN_CONNECT"))?
            }
            Some(FastOpen::ConnectNoCookie) => {
                set_tcp_fastopen_connect(&s).map_err(option("TCP_FASTOPEN_CONNECT"))?;
                set_tcp_fastopen_no_cookie(&s).map_err(option("TCP_FASTOPEN_NO_COOKIE"))?;
            }
            Some(FastOpen::ListenNoCookie { queue }) => {
                set_tcp_fastopen(&s, queue).map_err(option("TCP_FASTOPEN"))?;
                set_tcp_fastopen_no_cookie(&s).map_err(option("TCP_FASTOPEN_NO_COOKIE"))?;
            }
        }
        if let Some(addr) = self.bind {
            s.bind(&addr.into())?;
        }
        Ok(s)
    }

    /// The socket for connecting to `dest` (its family decides the domain).
    pub fn open_for(&self, dest: SocketAddr) -> io::Result<Socket> {
        self.open(Domain::for_address(dest))
    }

    /// A listener on `addr` with `backlog` (bound here; [`SocketSpec::bind`] is ignored).
    pub fn listen(&self, addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
        let spec = SocketSpec {
            bind: Some(addr),
            ..self.clone()
        };
        let s = spec.open(Domain::for_address(addr))?;
        s.listen(backlog)?;
        Ok(s.into())
    }
}

/// Whether sockets of this namespace may use congestion control `name`: a daemon asks once at
/// start, so that a name the kernel does not allow is one clear error, not a failure of every
/// connection. The error names the sysctl that lists the allowed ones.
pub fn check_congestion_control(name: &str) -> io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_tcp_congestion(name.as_bytes()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "congestion control {name:?} is not available here ({e}); the allowed ones are \
                 in net.ipv4.tcp_allowed_congestion_control (a module may need loading, e.g. \
                 tcp_{name})"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_plain_tcp() {
        let s = SocketSpec::default().open(Domain::IPV4).unwrap();
        assert_eq!(s.protocol().unwrap(), Some(Protocol::TCP));
        assert!(s.nonblocking().unwrap());
    }

    #[test]
    fn options_are_applied() {
        let spec = SocketSpec {
            mptcp: true,
            recv_buffer: Some(1 << 20),
            congestion_control: Some("reno".into()),
            reuse_address: true,
            only_v6: Some(false),
            fast_open: Some(FastOpen::ConnectNoCookie),
            ..SocketSpec::default()
        };
        let s = spec.open(Domain::IPV6).unwrap();
        assert_eq!(s.protocol().unwrap(), Some(Protocol::MPTCP));
        assert!(s.reuse_address().unwrap());
        assert!(!s.only_v6().unwrap());
        assert!(s.tcp_congestion().unwrap().starts_with(b"reno\0"));
        // The kernel doubles SO_RCVBUF for its bookkeeping.
        assert!(s.recv_buffer_size().unwrap() >= 1 << 20);
    }

    #[test]
    fn a_refused_option_fails_the_socket_and_is_named() {
        let spec = SocketSpec {
            congestion_control: Some("no_such_cc".into()),
            ..SocketSpec::default()
        };
        let e = spec.open(Domain::IPV4).unwrap_err();
        assert!(e.to_string().contains("TCP_CONGESTION"), "{e}");
        assert_eq!(
            os_error(&e),
            Some(libc::ENOENT),
            "the errno survives the naming"
        );
        let e = check_congestion_control("no_such_cc").unwrap_err();
        assert!(
            e.to_string()
                .contains("net.ipv4.tcp_allowed_congestion_control"),
            "{e}"
        );
        check_congestion_control("reno").unwrap();
    }

    #[test]
    fn listener_serves_both_families_on_the_unspecified_v6_address() {
        let spec = SocketSpec {
            mptcp: true,
            only_v6: Some(false),
            reuse_address: true,
            fast_open: Some(FastOpen::ListenNoCookie { queue: 16 }),
            ..SocketSpec::default()
        };
        let l = spec.listen("[::]:0".parse().unwrap(), 16).unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        drop(c);
    }
}
