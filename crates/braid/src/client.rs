//! The client side of the Convert protocol: open MPTCP to a converter with the request (and
//! any application data already at hand) in the SYN, then read the converter's reply. Used by
//! the gateway, by the end-to-end tests and by the benchmarks, so all of them exercise the
//! same code.
//!
//! Kernel measures applied here:
//! - a fixed `SO_RCVBUF` before the Fast Open connect lowers the advertised window scale, which
//!   keeps the converter's MPTCP send window close to the real one (Linux derives that limit
//!   for a passive Fast Open socket from the SYN's unscaled window shifted by the scale, see
//!   `tfo_fix`);
//! - on request, a fixed `SO_SNDBUF` bounds what the kernel's MPTCP keeps in flight towards
//!   the converter, which its receive path cannot always hold at high rates
//!   (`config::mptcp_send_buffer`);
//! - an Error reply followed by a reset may arrive before we look: the reply is read before a
//!   failed write or a reset is taken to mean "converter down".

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use braid_proto::convert::{self, ErrorCode};
use braid_sys::sockopt::is_mptcp;
use braid_sys::{FastOpen, SocketSpec};
use socket2::SockRef;
use tokio::net::TcpStream;

use crate::framed::{ReadError, read_message};

/// How to reach a converter.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Speak MPTCP (normal) or plain TCP (tests of the converter's TCP path).
    pub mptcp: bool,
    /// Put the request in the SYN (TCP Fast Open). Without, it follows the handshake.
    pub fast_open: bool,
    /// Fixed receive buffer set before connecting (see the module docs); `None` = autotuning.
    pub rcvbuf: Option<usize>,
    /// Fixed send buffer set before connecting (`config::mptcp_send_buffer`); `None` =
    /// autotuning.
    pub sndbuf: Option<usize>,
    /// Source address to bind, selecting the first subflow's link.
    pub bind: Option<SocketAddr>,
    /// Deadline for the whole exchange (connect, request, reply).
    pub timeout: Duration,
    /// Congestion control for the socket.
    pub congestion_control: Option<String>,
    /// `SO_MARK` for the socket (the gateway marks its own sockets so that its output capture
    /// leaves them alone).
    pub mark: Option<u32>,
    /// Local addresses to start the connection from, in order of preference (the gateway's
    /// uplinks that work): the first is tried; when its SYN is not answered within
    /// `attempt_delay`, the next is tried as well, and the first answer wins. Empty: `bind`,
    /// or the routing table's choice. Addresses of the other family than the converter's are
    /// skipped (unless `dual_stack` lets an IPv6 socket use IPv4 addresses).
    pub sources: Vec<std::net::IpAddr>,
    pub attempt_delay: Duration,
    /// Reach an IPv4 converter through an IPv6 socket (its `::ffff:` mapped address): only such
    /// a socket can add IPv6 subflows when the converter announces an IPv6 address.
    pub dual_stack: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            mptcp: true,
            fast_open: true,
            rcvbuf: Some(crate::sendbuf::RECEIVE),
            sndbuf: None,
            bind: None,
            timeout: Duration::from_secs(10),
            congestion_control: None,
            mark: None,
            sources: Vec::new(),
            attempt_delay: Duration::from_millis(500),
            dual_stack: false,
        }
    }
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The converter could not be reached or the connection broke before a reply.
    #[error("converter unreachable: {0}")]
    Unreachable(io::Error),
    /// The converter answered with an Error TLV.
    #[error("converter refused: Error {code}")]
    Refused { code: ErrorCode, value: Vec<u8> },
    /// The converter's reply could not be decoded.
    #[error("bad reply from converter: {0}")]
    BadReply(String),
    #[error("no reply from converter within {0:?}")]
    Timeout(Duration),
}

/// A converted connection, ready to relay.
#[derive(Debug)]
pub struct Converted {
    pub stream: TcpStream,
    /// Application bytes that arrived after the reply in the same read: deliver them first.
    pub leftover: Vec<u8>,
    /// The connection to the converter is MPTCP (false: plain TCP or fell back on the path).
    pub mptcp: bool,
}

/// Opens a connection through `converter` to `dest`, sending `early_data` with the request.
pub async fn connect(
    converter: SocketAddr,
    dest: SocketAddr,
    cookie: Option<&[u8]>,
    early_data: &[u8],
    opts: &ClientOptions,
) -> Result<Converted, ClientError> {
    let first = request_and(dest, cookie, early_data);
    within(opts.timeout, exchange(converter, &first, opts, None)).await
}

/// The Connect request for `dest`, followed by the bytes to send with it.
fn request_and(dest: SocketAddr, cookie: Option<&[u8]>, early_data: &[u8]) -> Vec<u8> {
    let request = convert::encode_connect_request(dest, cookie);
    let mut first = Vec::with_capacity(request.len() + early_data.len());
    first.extend_from_slice(&request);
    first.extend_from_slice(early_data);
    first
}

/// The whole exchange, bounded by the options' timeout.
async fn within(
    timeout: Duration,
    exchange: impl std::future::Future<Output = Result<Converted, ClientError>>,
) -> Result<Converted, ClientError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ClientError::Timeout(timeout)))
}

/// The most an application may send on while its connection waits for the converter's reply
/// (see [`connect_sending_ahead`]): more than the first round trip of a new connection carries
/// (ten segments and what the SYN's acknowledgement adds), and the bound of what is kept for a
/// retry.
pub const AHEAD_MAX: usize = 64 * 1024;

/// [`connect`] for a relay: what `app` sends while the reply is on its way goes on at once.
///
/// The reply leaves the converter only once the client's handshake is complete and comes one
/// round trip over the uplink after it; an upload waiting for it would start one round trip
/// later than over plain TCP. So once the handshake is complete, bytes from `app` (up to
/// [`AHEAD_MAX`]) are sent on as they come, before the reply is read; a converter that refuses
/// discards them (it reads and discards what a refused client sends). They are also appended to
/// `early_data`, so that a retry (the same converter with a cookie, or the next one) sends them
/// again, after the bytes that were there before: nothing read from `app` is lost. An end of
/// stream from `app` ends the sending ahead; the relay reads it again and passes it on.
pub async fn connect_sending_ahead(
    converter: SocketAddr,
    dest: SocketAddr,
    cookie: Option<&[u8]>,
    early_data: &mut Vec<u8>,
    app: &TcpStream,
    opts: &ClientOptions,
) -> Result<Converted, ClientError> {
    let first = request_and(dest, cookie, early_data);
    let ahead = Ahead {
        app,
        sent: early_data,
    };
    within(opts.timeout, exchange(converter, &first, opts, Some(ahead))).await
}

/// Where bytes sent ahead of the reply come from, and where they are kept.
struct Ahead<'a> {
    app: &'a TcpStream,
    sent: &'a mut Vec<u8>,
}

impl ClientOptions {
    /// The socket recipe these options describe (`bind` is set per attempt).
    fn socket(&self) -> SocketSpec {
        SocketSpec {
            mptcp: self.mptcp,
            // RFC 8803 clients never hold a TFO cookie for the converter: cookie-less Fast
            // Open on this socket, so the host needs only the client bit (0x1) of
            // net.ipv4.tcp_fastopen, not the machine-wide 0x4.
            fast_open: self.fast_open.then_some(FastOpen::ConnectNoCookie),
            recv_buffer: self.rcvbuf,
            send_buffer: self.sndbuf,
            congestion_control: self.congestion_control.clone(),
            mark: self.mark,
            ..SocketSpec::default()
        }
    }

    /// Where to connect and which local addresses to try, in the socket's family.
    fn plan(&self, converter: SocketAddr) -> (SocketAddr, Vec<Option<SocketAddr>>) {
        let mapped = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        };
        let v4_via_v6 = self.dual_stack && converter.is_ipv4();
        let target = if v4_via_v6 {
            SocketAddr::new(mapped(converter.ip()), converter.port())
        } else {
            converter
        };
        let sources: Vec<Option<SocketAddr>> = self
            .sources
            .iter()
            .filter(|ip| ip.is_ipv4() == converter.is_ipv4())
            .map(|&ip| {
                let ip = if v4_via_v6 { mapped(ip) } else { ip };
                Some(SocketAddr::new(ip, 0))
            })
            .collect();
        if sources.is_empty() {
            let bind = self.bind.map(|b| {
                if v4_via_v6 {
                    SocketAddr::new(mapped(b.ip()), b.port())
                } else {
                    b
                }
            });
            (target, vec![bind])
        } else {
            (target, sources)
        }
    }
}

/// A connection attempt's socket, reset when dropped unless it is taken: a losing attempt
/// whose SYN did reach the converter must not leave it converting for nobody.
struct Attempt(Option<TcpStream>);

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            crate::relay::reset_on_close(s);
        }
    }
}

/// One attempt from `src`: the socket is connected (the SYN answered) when it returns, with
/// how many bytes of `first` went out in the SYN.
async fn attempt(
    target: SocketAddr,
    src: Option<SocketAddr>,
    first: &[u8],
    opts: &ClientOptions,
) -> Result<(Attempt, usize), ClientError> {
    let spec = SocketSpec {
        bind: src,
        only_v6: target.is_ipv6().then_some(false),
        ..opts.socket()
    };
    let s = spec.open_for(target).map_err(ClientError::Unreachable)?;
    if !opts.fast_open {
        let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(s));
        let stream = sock
            .connect(target)
            .await
            .map_err(ClientError::Unreachable)?;
        return Ok((Attempt(Some(stream)), 0));
    }
    // With TCP_FASTOPEN_CONNECT, connect() returns at once and the first write goes out in
    // the SYN; the socket turns writable when the SYN is answered.
    match s.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(ClientError::Unreachable(e)),
    }
    let stream = Attempt(Some(
        TcpStream::from_std(s.into()).map_err(ClientError::Unreachable)?,
    ));
    let sock = stream.0.as_ref().expect("just set");
    sock.writable().await.map_err(ClientError::Unreachable)?;
    let sent = match sock.try_write(first) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(ClientError::Unreachable(e)),
    };
    // The readiness that let the write go is still set: forget it, then look at the state
    // (an answer that came in between is seen here) before waiting for the next edge.
    while braid_sys::sockopt::tcp_state(sock).map_err(ClientError::Unreachable)?
        == braid_sys::sockopt::TCP_SYN_SENT
    {
        let _ = sock.try_io(tokio::io::Interest::WRITABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
        if braid_sys::sockopt::tcp_state(sock).map_err(ClientError::Unreachable)?
            != braid_sys::sockopt::TCP_SYN_SENT
        {
            break;
        }
        sock.writable().await.map_err(ClientError::Unreachable)?;
    }
    match sock.take_error().map_err(ClientError::Unreachable)? {
        // Answered, then reset: an Error reply may be queued before the reset, and the reply
        // reader is what can tell.
        Some(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok((stream, sent)),
        // Refused or unreachable through this uplink: the next one may work.
        Some(e) => Err(ClientError::Unreachable(e)),
        None => Ok((stream, sent)),
    }
}

/// The attempts of [`ClientOptions::sources`], staggered by `attempt_delay`: the first whose
/// SYN is answered wins and the others are reset. A failed attempt starts the next at once.
async fn race(
    target: SocketAddr,
    sources: &[Option<SocketAddr>],
    first: &[u8],
    opts: &ClientOptions,
) -> Result<(TcpStream, usize), ClientError> {
    use futures::StreamExt;
    let mut running = futures::stream::FuturesUnordered::new();
    let mut next = 0;
    let mut last_error = None;
    loop {
        if running.is_empty() {
            match sources.get(next) {
                Some(src) => {
                    running.push(attempt(target, *src, first, opts));
                    next += 1;
                }
                None => {
                    return Err(last_error.unwrap_or_else(|| {
                        ClientError::Unreachable(io::Error::other("no source to connect from"))
                    }));
                }
            }
        }
        tokio::select! {
            done = running.next() => match done {
                Some(Ok((mut won, sent))) => {
                    let stream = won.0.take().expect("an attempt holds its socket");
                    return Ok((stream, sent));
                }
                Some(Err(e)) => last_error = Some(e),
                None => {}
            },
            _ = tokio::time::sleep(opts.attempt_delay), if next < sources.len() => {
                tracing::debug!(source = ?sources[next], "SYN unanswered: trying the next uplink too");
                running.push(attempt(target, sources[next], first, opts));
                next += 1;
            }
        }
    }
}

async fn exchange(
    converter: SocketAddr,
    first: &[u8],
    opts: &ClientOptions,
    ahead: Option<Ahead<'_>>,
) -> Result<Converted, ClientError> {
    let (target, sources) = opts.plan(converter);
    let (stream, sent) = race(target, &sources, first, opts).await?;
    // Before the first write, as the relay would (`relay` module docs): what follows the SYN's
    // bytes goes out at once, not behind their acknowledgement.
    let _ = stream.set_nodelay(true);
    let mut write_error = crate::relay::write_all(&stream, &first[sent..]).await.err();
    let reply = match ahead {
        Some(ahead) if write_error.is_none() => {
            send_ahead_until_reply(&stream, ahead, &mut write_error).await
        }
        _ => read_reply(&stream).await,
    };
    match reply {
        Ok(leftover) => {
            let mptcp = opts.mptcp && is_mptcp(&stream).unwrap_or(false);
            if let Some(e) = write_error {
                // A reply without our request having left cannot be a success.
                return Err(ClientError::Unreachable(e));
            }
            Ok(Converted {
                stream,
                leftover,
                mptcp,
            })
        }
        Err(ClientError::Unreachable(e)) => Err(ClientError::Unreachable(write_error.unwrap_or(e))),
        Err(e) => Err(e),
    }
}

/// Reads the converter's reply while sending on what `ahead.app` sends meanwhile (see
/// [`connect_sending_ahead`]); a failed write stops the sending and is left in `write_error`,
/// and the reply is still read (an Error may be queued before a reset).
async fn send_ahead_until_reply(
    stream: &TcpStream,
    ahead: Ahead<'_>,
    write_error: &mut Option<io::Error>,
) -> Result<Vec<u8>, ClientError> {
    let reply = read_reply(stream);
    tokio::pin!(reply);
    let mut room = AHEAD_MAX;
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            biased;
            r = &mut reply => return r,
            ready = ahead.app.readable(), if room > 0 => {
                if ready.is_err() {
                    room = 0;
                    continue;
                }
                buf.resize(room.min(16 * 1024), 0);
                match ahead.app.try_read(&mut buf) {
                    Ok(n) if n > 0 => {
                        // Kept first: whatever happens to the write, a retry sends it.
                        ahead.sent.extend_from_slice(&buf[..n]);
                        room -= n;
                        if let Err(e) = crate::relay::write_all(stream, &buf[..n]).await {
                            *write_error = Some(e);
                            room = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The end of the stream or an error: the relay meets it again.
                    _ => room = 0,
                }
            }
        }
    }
}

/// Reads the converter's reply; returns the application bytes that followed it.
async fn read_reply(stream: &TcpStream) -> Result<Vec<u8>, ClientError> {
    let mut buf = Vec::new();
    let decoded = read_message(stream, &mut buf, convert::MAX_MESSAGE_LEN, |b| {
        // The reply's verdict, owned: an Error's code and value, or nothing for success.
        convert::decode_reply(b)
            .map(|d| d.map(|reply| reply.error().map(|e| (e.code, e.value.to_vec()))))
    })
    .await;
    match decoded {
        Ok((None, consumed)) => Ok(buf.split_off(consumed)),
        Ok((Some((code, value)), _)) => {
            // The converter resets after an Error; make sure we do too.
            let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
            Err(ClientError::Refused { code, value })
        }
        Err(ReadError::Closed) => Err(ClientError::Unreachable(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "converter closed before replying",
        ))),
        Err(ReadError::Io(e)) => Err(ClientError::Unreachable(e)),
        Err(ReadError::Invalid(e)) => Err(ClientError::BadReply(e.to_string())),
        Err(ReadError::TooLong) => Err(ClientError::BadReply("reply too long".into())),
    }
}
