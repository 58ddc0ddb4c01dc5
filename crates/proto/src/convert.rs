//! The Convert protocol of RFC 8803: the message a client puts at the
//! start of its stream to a Transport Converter, and the converter's reply.
//!
//! Decoding is incremental and direction-aware: [`decode_request`] (what a converter reads)
//! and [`decode_reply`] (what a client reads) return [`Decoded::Incomplete`] until the whole
//! message is in, then the message as a view borrowing the input (no allocation) and the number
//! of bytes it used; whatever follows is application data. Every [`DecodeError`] knows the Error
//! a converter must answer with ([`DecodeError::error_code`], [`DecodeError::error_reply`]).
//!
//! ```
//! use braid_proto::convert::{self, Decoded, ErrorCode};
//!
//! let dest = "192.0.2.1:80".parse().unwrap();
//! let mut stream = convert::encode_connect_request(dest, None);
//! stream.extend_from_slice(b"GET / HTTP/1.1\r\n");
//!
//! // Converter side: a prefix is incomplete, the whole message decodes, the rest is data.
//! assert!(matches!(convert::decode_request(&stream[..10]), Ok(Decoded::Incomplete { .. })));
//! let Ok(Decoded::Complete { value: req, consumed }) = convert::decode_request(&stream) else {
//!     panic!()
//! };
//! assert_eq!(req.connect.unwrap().dest, dest);
//! assert_eq!(&stream[consumed..], b"GET / HTTP/1.1\r\n");
//!
//! // Malformed input maps to the Error the converter sends back.
//! let err = convert::decode_request(&[1, 1, 0x22, 0x64]).unwrap_err();
//! assert_eq!(err.error_code(), ErrorCode::MalformedMessage);
//!
//! // Client side: the converter's answer.
//! let Ok(Decoded::Complete { value: reply, .. }) = convert::decode_reply(&convert::BARE_REPLY)
//! else {
//!     panic!()
//! };
//! assert!(reply.error().is_none());
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The only protocol version.
pub const VERSION: u8 = 1;
/// Magic number of every Convert header (8803).
pub const MAGIC: u16 = 0x2263;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 4;
/// Largest message: 255 words.
pub const MAX_MESSAGE_LEN: usize = 255 * 4;
/// The successful reply without TLVs.
pub const BARE_REPLY: [u8; 4] = [VERSION, 1, 0x22, 0x63];
/// TCP option kind of Multipath TCP, what a braid converter converts.
pub const TCP_OPTION_MPTCP: u8 = 30;

/// TLV types (RFC 8803 §6).
pub mod tlv {
    pub const INFO: u8 = 1;
    pub const CONNECT: u8 = 10;
    pub const EXTENDED_TCP_HEADER: u8 = 20;
    pub const SUPPORTED_TCP_EXTENSIONS: u8 = 21;
    pub const COOKIE: u8 = 22;
    pub const ERROR: u8 = 30;
}

/// Length of a Connect TLV without TCP options: 5 words.
const CONNECT_BASE_LEN: usize = 20;

/// The Error codes of RFC 8803 §6.2.8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    UnsupportedVersion,
    MalformedMessage,
    UnsupportedMessage,
    MissingCookie,
    NotAuthorized,
    UnsupportedTcpOption,
    ResourceExceeded,
    NetworkFailure,
    ConnectionReset,
    DestinationUnreachable,
    /// Any other code: unassigned or private use.
    Other(u8),
}

/// Who an error is about (the code's range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 0-31: the message itself.
    Message,
    /// 32-63: the client.
    Client,
    /// 64-95: the converter.
    Converter,
    /// 96-127: the destination server.
    Server,
    /// 128-191: unassigned.
    Unassigned,
    /// 192-255: private use.
    PrivateUse,
}

impl ErrorCode {
    pub fn class(self) -> ErrorClass {
        match u8::from(self) {
            0..=31 => ErrorClass::Message,
            32..=63 => ErrorClass::Client,
            64..=95 => ErrorClass::Converter,
            96..=127 => ErrorClass::Server,
            128..=191 => ErrorClass::Unassigned,
            192..=255 => ErrorClass::PrivateUse,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "Unsupported Version",
            ErrorCode::MalformedMessage => "Malformed Message",
            ErrorCode::UnsupportedMessage => "Unsupported Message",
            ErrorCode::MissingCookie => "Missing Cookie",
            ErrorCode::NotAuthorized => "Not Authorized",
            ErrorCode::UnsupportedTcpOption => "Unsupported TCP Option",
            ErrorCode::ResourceExceeded => "Resource Exceeded",
            ErrorCode::NetworkFailure => "Network Failure",
            ErrorCode::ConnectionReset => "Connection Reset",
            ErrorCode::DestinationUnreachable => "Destination Unreachable",
            ErrorCode::Other(_) => "Unknown Error",
        }
    }
}

impl From<u8> for ErrorCode {
    fn from(c: u8) -> Self {
        match c {
            0 => ErrorCode::UnsupportedVersion,
            1 => ErrorCode::MalformedMessage,
            2 => ErrorCode::UnsupportedMessage,
            3 => ErrorCode::MissingCookie,
            32 => ErrorCode::NotAuthorized,
            33 => ErrorCode::UnsupportedTcpOption,
            64 => ErrorCode::ResourceExceeded,
            65 => ErrorCode::NetworkFailure,
            96 => ErrorCode::ConnectionReset,
            97 => ErrorCode::DestinationUnreachable,
            other => ErrorCode::Other(other),
        }
    }
}

impl From<ErrorCode> for u8 {
    fn from(c: ErrorCode) -> u8 {
        match c {
            ErrorCode::UnsupportedVersion => 0,
            ErrorCode::MalformedMessage => 1,
            ErrorCode::UnsupportedMessage => 2,
            ErrorCode::MissingCookie => 3,
            ErrorCode::NotAuthorized => 32,
            ErrorCode::UnsupportedTcpOption => 33,
            ErrorCode::ResourceExceeded => 64,
            ErrorCode::NetworkFailure => 65,
            ErrorCode::ConnectionReset => 96,
            ErrorCode::DestinationUnreachable => 97,
            ErrorCode::Other(c) => c,
        }
    }
}

/// `64 (Resource Exceeded)`: the number first, as people quote Error codes.
impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", u8::from(*self), self.name())
    }
}

pub use crate::Decoded;

/// Why bytes are not a valid Convert message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported Convert version {0}")]
    UnsupportedVersion(u8),
    #[error("bad magic number {0:#06x}")]
    BadMagic(u16),
    #[error("total length 0")]
    ZeroLength,
    #[error("TLV at offset {offset} has length 0")]
    TlvZeroLength { offset: usize },
    #[error("TLV at offset {offset} runs past the message")]
    TlvOverrun { offset: usize },
    #[error("Connect TLV of {words} words (at least 5 needed)")]
    ConnectTooShort { words: u8 },
    #[error("malformed TCP option at offset {offset} of a Connect TLV")]
    BadTcpOption { offset: usize },
    #[error("Error TLV without a code")]
    ErrorTooShort,
    #[error("TLV type {kind} appears twice")]
    Duplicate { kind: u8 },
    #[error("unknown TLV type {kind}")]
    UnknownTlv { kind: u8 },
    #[error("TLV type {kind} is not allowed in this direction")]
    WrongDirection { kind: u8 },
}

impl DecodeError {
    /// The Error code a converter answers this request with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownTlv { .. } | DecodeError::WrongDirection { .. } => {
                ErrorCode::UnsupportedMessage
            }
            _ => ErrorCode::MalformedMessage,
        }
    }

    /// The Error value bytes that go with [`DecodeError::error_code`]: the versions supported
    /// for Error 0, the TLV type for Error 2, and for Error 1 a zero byte followed by an echo
    /// of the offending message (`input`, cut to the message's declared length), truncated so
    /// that the whole reply fits in [`MAX_MESSAGE_LEN`].
    pub fn error_value(&self, input: &[u8]) -> Vec<u8> {
        match self {
            DecodeError::UnsupportedVersion(_) => vec![VERSION],
            DecodeError::UnknownTlv { kind } | DecodeError::WrongDirection { kind } => {
                vec![*kind]
            }
            _ => {
                let declared = input.get(1).map_or(0, |w| usize::from(*w) * 4);
                let msg = &input[..input.len().min(declared.max(HEADER_LEN))];
                let mut v = Vec::with_capacity(1 + msg.len());
                v.push(0);
                v.extend_from_slice(&msg[..msg.len().min(MAX_ERROR_VALUE - 1)]);
                v
            }
        }
    }

    /// The whole reply (header + Error TLV) a converter sends for this error.
    pub fn error_reply(&self, input: &[u8]) -> Vec<u8> {
        error_reply(self.error_code(), &self.error_value(input))
    }
}

/// The largest Error value that fits a reply: 1020 - 4 (header) - 3 (type, length, code).
pub const MAX_ERROR_VALUE: usize = MAX_MESSAGE_LEN - HEADER_LEN - 3;

/// TCP options carried in a Connect or Extended TCP Header TLV: whole options (kind, length,
/// value), without padding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions<'a>(&'a [u8]);

/// One TCP option. A Connect option of length 2 asks the converter to fill in the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOption<'a> {
    pub kind: u8,
    pub data: &'a [u8],
}

impl<'a> TcpOptions<'a> {
    /// Validates `bytes` as a sequence of whole options followed only by zero padding; returns
    /// the options without the padding, or the offset of the first bad byte.
    pub fn parse(bytes: &'a [u8]) -> Result<TcpOptions<'a>, usize> {
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                // EOL: only padding may follow.
                0 => {
                    return match bytes[i..].iter().position(|b| *b != 0) {
                        None => Ok(TcpOptions(&bytes[..i])),
                        Some(p) => Err(i + p),
                    };
                }
                // NOP has no place in a Convert TLV: options are whole (kind, length, value).
                1 => return Err(i),
                _ => {
                    let len = *bytes.get(i + 1).ok_or(i)? as usize;
                    if len < 2 || i + len > bytes.len() {
                        return Err(i);
                    }
                    i += len;
                }
            }
        }
        Ok(TcpOptions(bytes))
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = TcpOption<'a>> + 'a {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            // `parse` checked the layout, so these reads stay in bounds; `get` keeps it so.
            let kind = *rest.first()?;
            let len = usize::from(*rest.get(1)?);
            let opt = TcpOption {
                kind,
                data: rest.get(2..len)?,
            };
            rest = rest.get(len..)?;
            Some(opt)
        })
    }
}

impl fmt::Debug for TcpOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A Connect TLV: where the client wants to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    /// IPv4 destinations (sent as `::ffff:a.b.c.d`) come back as IPv4.
    pub dest: SocketAddr,
    /// TCP options the client wants on the converter's SYN toward the server.
    pub options: TcpOptions<'a>,
}

/// A client's request, as a converter decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request<'a> {
    pub connect: Option<Connect<'a>>,
    /// An Info TLV asks which TCP extensions the converter supports.
    pub info: bool,
    /// The Cookie TLV's value, zero padding included (cookies are opaque and padded).
    pub cookie: Option<&'a [u8]>,
}

/// An Error TLV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorTlv<'a> {
    pub code: ErrorCode,
    /// The value bytes, zero padding included.
    pub value: &'a [u8],
}

/// A converter's reply, as a client decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reply<'a> {
    /// The TCP options of the server's SYN+ACK.
    pub extended_tcp_header: Option<TcpOptions<'a>>,
    /// TCP option kinds the converter supports (answer to Info), zero padding included.
    pub supported_extensions: Option<&'a [u8]>,
    pub cookie: Option<&'a [u8]>,
    pub error: Option<ErrorTlv<'a>>,
}

impl<'a> Reply<'a> {
    /// The Error TLV, if the converter refused.
    pub fn error(&self) -> Option<ErrorTlv<'a>> {
        self.error
    }

    /// Supported TCP option kinds, padding removed (kind 0 is End of Options, never one).
    pub fn supported_kinds(&self) -> impl Iterator<Item = u8> + 'a {
        self.supported_extensions
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|k| *k != 0)
    }
}

/// Checks the fixed header; returns the message length in bytes, or how many bytes are missing.
fn header(buf: &[u8]) -> Result<Result<usize, usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(Err(HEADER_LEN - buf.len()));
    }
    if buf[0] != VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[0]));
    }
    let magic = u16::from_be_bytes([buf[2], buf[3]]);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let len = usize::from(buf[1]) * 4;
    if len == 0 {
        return Err(DecodeError::ZeroLength);
    }
    if buf.len() < len {
        return Ok(Err(len - buf.len()));
    }
    Ok(Ok(len))
}

/// Walks the TLVs of a complete message, handing each (offset, type, whole TLV) to `f`.
fn for_each_tlv<'a>(
    msg: &'a [u8],
    mut f: impl FnMut(usize, u8, &'a [u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut off = HEADER_LEN;
    while off < msg.len() {
        let (Some(&kind), Some(&words)) = (msg.get(off), msg.get(off + 1)) else {
            return Err(DecodeError::TlvOverrun { offset: off });
        };
        if words == 0 {
            return Err(DecodeError::TlvZeroLength { offset: off });
        }
        let end = off + usize::from(words) * 4;
        let Some(tlv) = msg.get(off..end) else {
            return Err(DecodeError::TlvOverrun { offset: off });
        };
        f(off, kind, tlv)?;
        off = end;
    }
    Ok(())
}

fn set_once<T>(slot: &mut Option<T>, value: T, kind: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Duplicate { kind });
    }
    *slot = Some(value);
    Ok(())
}

fn parse_connect(off: usize, tlv: &[u8]) -> Result<Connect<'_>, DecodeError> {
    if tlv.len() < CONNECT_BASE_LEN {
        return Err(DecodeError::ConnectTooShort {
            words: (tlv.len() / 4) as u8,
        });
    }
    let port = u16::from_be_bytes([tlv[2], tlv[3]]);
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&tlv[4..20]);
    let ip = Ipv6Addr::from(octets);
    let dest = match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    };
    let options =
        TcpOptions::parse(&tlv[CONNECT_BASE_LEN..]).map_err(|at| DecodeError::BadTcpOption {
            offset: off + CONNECT_BASE_LEN + at,
        })?;
    Ok(Connect { dest, options })
}

/// Decodes what a client sent to a converter.
pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request<'_>>, DecodeError> {
    let len = match header(buf)? {
        Ok(len) => len,
        Err(needed) => return Ok(Decoded::Incomplete { needed }),
    };
    let mut req = Request::default();
    for_each_tlv(&buf[..len], |off, kind, tlv| match kind {
        tlv::INFO => {
            req.info = true;
            Ok(())
        }
        tlv::CONNECT => set_once(&mut req.connect, parse_connect(off, tlv)?, kind),
        tlv::COOKIE => set_once(&mut req.cookie, &tlv[4.min(tlv.len())..], kind),
        tlv::EXTENDED_TCP_HEADER | tlv::SUPPORTED_TCP_EXTENSIONS | tlv::ERROR => {
            Err(DecodeError::WrongDirection { kind })
        }
        _ => Err(DecodeError::UnknownTlv { kind }),
    })?;
    Ok(Decoded::Complete {
        value: req,
        consumed: len,
    })
}

/// Decodes what a converter sent to a client. Unknown TLVs are rejected: a client must not
/// guess at what a converter meant.
pub fn decode_reply(buf: &[u8]) -> Result<Decoded<Reply<'_>>, DecodeError> {
    let len = match header(buf)? {
        Ok(len) => len,
        Err(needed) => return Ok(Decoded::Incomplete { needed }),
    };
    let mut reply = Reply::default();
    for_each_tlv(&buf[..len], |off, kind, tlv| match kind {
        tlv::EXTENDED_TCP_HEADER => {
            let opts = TcpOptions::parse(&tlv[4.min(tlv.len())..]).map_err(|at| {
                DecodeError::BadTcpOption {
                    offset: off + 4 + at,
                }
            })?;
            set_once(&mut reply.extended_tcp_header, opts, kind)
        }
        tlv::SUPPORTED_TCP_EXTENSIONS => set_once(
            &mut reply.supported_extensions,
            &tlv[4.min(tlv.len())..],
            kind,
        ),
        tlv::COOKIE => set_once(&mut reply.cookie, &tlv[4.min(tlv.len())..], kind),
        tlv::ERROR => {
            let code = *tlv.get(2).ok_or(DecodeError::ErrorTooShort)?;
            let value = tlv.get(3..).unwrap_or_default();
            set_once(
                &mut reply.error,
                ErrorTlv {
                    code: code.into(),
                    value,
                },
                kind,
            )
        }
        tlv::INFO | tlv::CONNECT => Err(DecodeError::WrongDirection { kind }),
        _ => Err(DecodeError::UnknownTlv { kind }),
    })?;
    Ok(Decoded::Complete {
        value: reply,
        consumed: len,
    })
}

/// A TLV to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tlv<'a> {
    Info,
    /// `options`: whole TCP options (kind, length, value), unpadded.
    Connect {
        dest: SocketAddr,
        options: &'a [u8],
    },
    /// Whole TCP options, unpadded.
    ExtendedTcpHeader(&'a [u8]),
    /// TCP option kinds.
    SupportedTcpExtensions(&'a [u8]),
    Cookie(&'a [u8]),
    Error {
        code: ErrorCode,
        value: &'a [u8],
    },
    /// Any other type; `value` follows the type and length bytes.
    Unknown {
        kind: u8,
        value: &'a [u8],
    },
}

fn padded(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Tlv<'_> {
    /// Encoded length in bytes, padding included.
    pub fn buffer_len(&self) -> usize {
        padded(match self {
            Tlv::Info => 4,
            Tlv::Connect { options, .. } => CONNECT_BASE_LEN + options.len(),
            Tlv::ExtendedTcpHeader(v) | Tlv::SupportedTcpExtensions(v) | Tlv::Cookie(v) => {
                4 + v.len()
            }
            Tlv::Error { value, .. } => 3 + value.len(),
            Tlv::Unknown { value, .. } => 2 + value.len(),
        })
    }

    /// Writes the TLV into `out` (exactly `buffer_len()` bytes, zeroed first).
    fn emit(&self, out: &mut [u8]) {
        out.fill(0);
        out[1] = (out.len() / 4) as u8;
        match self {
            Tlv::Info => out[0] = tlv::INFO,
            Tlv::Connect { dest, options } => {
                out[0] = tlv::CONNECT;
                out[2..4].copy_from_slice(&dest.port().to_be_bytes());
                let ip = match dest.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                out[4..20].copy_from_slice(&ip.octets());
                out[20..20 + options.len()].copy_from_slice(options);
            }
            Tlv::ExtendedTcpHeader(v) | Tlv::SupportedTcpExtensions(v) | Tlv::Cookie(v) => {
                out[0] = match self {
                    Tlv::ExtendedTcpHeader(_) => tlv::EXTENDED_TCP_HEADER,
                    Tlv::SupportedTcpExtensions(_) => tlv::SUPPORTED_TCP_EXTENSIONS,
                    _ => tlv::COOKIE,
                };
                out[4..4 + v.len()].copy_from_slice(v);
            }
            Tlv::Error { code, value } => {
                out[0] = tlv::ERROR;
                out[2] = (*code).into();
                out[3..3 + value.len()].copy_from_slice(value);
            }
            Tlv::Unknown { kind, value } => {
                out[0] = *kind;
                out[2..2 + value.len()].copy_from_slice(value);
            }
        }
    }
}

/// The message would exceed 1020 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Convert message of {len} bytes exceeds the maximum of 1020")]
pub struct TooLong {
    pub len: usize,
}

/// Encoded length of a message made of `tlvs`.
pub fn buffer_len(tlvs: &[Tlv<'_>]) -> usize {
    HEADER_LEN + tlvs.iter().map(Tlv::buffer_len).sum::<usize>()
}

/// Writes header + `tlvs` into `out`, which must hold [`buffer_len`] bytes; returns the length.
pub fn emit(tlvs: &[Tlv<'_>], out: &mut [u8]) -> Result<usize, TooLong> {
    let len = buffer_len(tlvs);
    if len > MAX_MESSAGE_LEN || out.len() < len {
        return Err(TooLong { len });
    }
    out[0] = VERSION;
    out[1] = (len / 4) as u8;
    out[2..4].copy_from_slice(&MAGIC.to_be_bytes());
    let mut off = HEADER_LEN;
    for t in tlvs {
        let n = t.buffer_len();
        t.emit(&mut out[off..off + n]);
        off += n;
    }
    Ok(len)
}

/// Encodes header + `tlvs` into a new vector.
pub fn encode(tlvs: &[Tlv<'_>]) -> Result<Vec<u8>, TooLong> {
    let mut out = vec![0u8; buffer_len(tlvs)];
    emit(tlvs, &mut out)?;
    Ok(out)
}

/// A client's Connect request, with a cookie if the converter handed one out.
/// Cookies longer than fit in a message are cut (a converter's cookie is never that long).
pub fn encode_connect_request(dest: SocketAddr, cookie: Option<&[u8]>) -> Vec<u8> {
    let max_cookie = MAX_MESSAGE_LEN - HEADER_LEN - CONNECT_BASE_LEN - 4;
    let tlvs = [
        Tlv::Connect { dest, options: &[] },
        Tlv::Cookie(cookie.map_or(&[][..], |c| &c[..c.len().min(max_cookie)])),
    ];
    let n = if cookie.is_some() { 2 } else { 1 };
    encode(&tlvs[..n]).unwrap_or_default()
}

/// An Error reply; `value` is cut to [`MAX_ERROR_VALUE`] bytes so the reply always fits.
pub fn error_reply(code: ErrorCode, value: &[u8]) -> Vec<u8> {
    let value = &value[..value.len().min(MAX_ERROR_VALUE)];
    encode(&[Tlv::Error { code, value }]).unwrap_or_default()
}

/// The answer to Info: the TCP option kinds a converter converts.
pub fn supported_extensions_reply(kinds: &[u8]) -> Vec<u8> {
    let kinds = &kinds[..kinds.len().min(MAX_MESSAGE_LEN - HEADER_LEN - 4)];
    encode(&[Tlv::SupportedTcpExtensions(kinds)]).unwrap_or_default()
}

#[cfg(test)]
mod tests;
