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
//! - an Error reply followed by a reset may arrive before we look: the reply is read before a
//!   failed write or a reset is taken to mean "converter down".

use std::io;
use std::net::SocketAddr;
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
    /// Source address to bind, selecting the first subflow's link.
    pub bind: Option<SocketAddr>,
    /// Deadline for the whole exchange (connect, request, reply).
    pub timeout: Duration,
    /// Congestion control for the socket.
    pub congestion_control: Option<String>,
    /// `SO_MARK` for the socket (the gateway marks its own sockets so that its output capture
    /// leaves them alone).
    pub mark: Option<u32>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            mptcp: true,
            fast_open: true,
            rcvbuf: Some(4 << 20),
            bind: None,
            timeout: Duration::from_secs(10),
            congestion_control: None,
            mark: None,
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
    let request = convert::encode_connect_request(dest, cookie);
    let mut first = Vec::with_capacity(request.len() + early_data.len());
    first.extend_from_slice(&request);
    first.extend_from_slice(early_data);
    match tokio::time::timeout(opts.timeout, exchange(converter, &first, opts)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout(opts.timeout)),
    }
}

impl ClientOptions {
    /// The socket recipe these options describe.
    fn socket(&self) -> SocketSpec {
        SocketSpec {
            mptcp: self.mptcp,
            // RFC 8803 clients never hold a TFO cookie for the converter: cookie-less Fast
            // Open on this socket, so the host needs only the client bit (0x1) of
            // net.ipv4.tcp_fastopen, not the machine-wide 0x4.
            fast_open: self.fast_open.then_some(FastOpen::ConnectNoCookie),
            recv_buffer: self.rcvbuf,
            congestion_control: self.congestion_control.clone(),
            mark: self.mark,
            bind: self.bind,
            ..SocketSpec::default()
        }
    }
}

async fn exchange(
    converter: SocketAddr,
    first: &[u8],
    opts: &ClientOptions,
) -> Result<Converted, ClientError> {
    let s = opts
        .socket()
        .open_for(converter)
        .map_err(ClientError::Unreachable)?;
    let stream = if opts.fast_open {
        // With TCP_FASTOPEN_CONNECT, connect() returns at once and the first write goes out
        // in the SYN.
        match s.connect(&converter.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(ClientError::Unreachable(e)),
        }
        TcpStream::from_std(s.into()).map_err(ClientError::Unreachable)?
    } else {
        let std_stream: std::net::TcpStream = s.into();
        let sock = tokio::net::TcpSocket::from_std_stream(std_stream);
        sock.connect(converter)
            .await
            .map_err(ClientError::Unreachable)?
    };
    let write_error = crate::relay::write_all(&stream, first).await.err();
    match read_reply(&stream).await {
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
