//! SOCKS version 5 (RFC 1928) with username/password authentication (RFC 1929): every message
//! of the exchange, decoded incrementally and encoded, for both sides.
//!
//! ```text
//! client → server   greeting        05 N methods...
//! server → client   method choice   05 M
//! client → server   auth (M = 02)   01 ULEN user PLEN pass          (RFC 1929)
//! server → client   auth status     01 S                             (S = 0: success)
//! client → server   request         05 CMD 00 ATYP addr port
//! server → client   reply           05 REP 00 ATYP addr port
//! ```
//!
//! ```
//! use braid_proto::socks5::{self, Address, Command, Decoded};
//!
//! let bytes = [5, 1, 0, 3, 11, b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'n', b'e', b't', 0, 80];
//! let Ok(Decoded::Complete { value: req, consumed }) = socks5::decode_request(&bytes) else { panic!() };
//! assert_eq!(req.command, Command::Connect);
//! assert_eq!(req.address, Address::Domain { name: b"example.net", port: 80 });
//! assert_eq!(consumed, bytes.len());
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const VERSION: u8 = 5;
/// Version byte of the RFC 1929 sub-negotiation.
pub const AUTH_VERSION: u8 = 1;

/// Authentication methods (RFC 1928 §3).
pub mod method {
    pub const NO_AUTH: u8 = 0x00;
    pub const GSSAPI: u8 = 0x01;
    pub const USERNAME_PASSWORD: u8 = 0x02;
    pub const NO_ACCEPTABLE: u8 = 0xFF;
}

const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

pub use crate::Decoded;

/// Why bytes are not a valid SOCKS5 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("SOCKS version {0}, expected 5")]
    BadVersion(u8),
    #[error("username/password sub-negotiation version {0}, expected 1")]
    BadAuthVersion(u8),
    #[error("empty username")]
    EmptyUsername,
    #[error("empty domain name")]
    EmptyDomain,
    #[error("address type {0} is not supported")]
    AddressType(u8),
}

impl Error {
    /// The reply a server sends for a request that failed to decode this way.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            Error::AddressType(_) => ReplyCode::AddressTypeNotSupported,
            _ => ReplyCode::GeneralFailure,
        }
    }
}

/// A destination or bound address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Address<'a> {
    Ip(SocketAddr),
    /// A name for the server to resolve (bytes as sent; not necessarily UTF-8).
    Domain {
        name: &'a [u8],
        port: u16,
    },
}

impl Address<'_> {
    pub fn port(&self) -> u16 {
        match self {
            Address::Ip(sa) => sa.port(),
            Address::Domain { port, .. } => *port,
        }
    }

    fn buffer_len(&self) -> usize {
        match self {
            Address::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            Address::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            Address::Domain { name, .. } => 1 + 1 + name.len().min(255) + 2,
        }
    }

    fn emit(&self, out: &mut Vec<u8>) {
        match self {
            Address::Ip(SocketAddr::V4(v4)) => {
                out.push(ATYP_V4);
                out.extend_from_slice(&v4.ip().octets());
            }
            Address::Ip(SocketAddr::V6(v6)) => {
                out.push(ATYP_V6);
                out.extend_from_slice(&v6.ip().octets());
            }
            Address::Domain { name, .. } => {
                // A name longer than 255 bytes cannot be expressed; it is cut (and will fail
                // to resolve) rather than corrupting the stream.
                let name = &name[..name.len().min(255)];
                out.push(ATYP_DOMAIN);
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
        }
        out.extend_from_slice(&self.port().to_be_bytes());
    }
}

impl fmt::Display for Address<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(sa) => write!(f, "{sa}"),
            Address::Domain { name, port } => {
                write!(f, "{}:{port}", String::from_utf8_lossy(name))
            }
        }
    }
}

/// Parses ATYP + address + port at the start of `buf`.
fn parse_address(buf: &[u8]) -> Result<Decoded<Address<'_>>, Error> {
    let Some(&atyp) = buf.first() else {
        return Ok(Decoded::Incomplete { needed: 1 });
    };
    let (addr_len, start) = match atyp {
        ATYP_V4 => (4, 1),
        ATYP_V6 => (16, 1),
        ATYP_DOMAIN => match buf.get(1) {
            None => return Ok(Decoded::Incomplete { needed: 1 }),
            Some(0) => return Err(Error::EmptyDomain),
            Some(&n) => (usize::from(n), 2),
        },
        other => return Err(Error::AddressType(other)),
    };
    let total = start + addr_len + 2;
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    let addr = &buf[start..start + addr_len];
    let port = u16::from_be_bytes([buf[start + addr_len], buf[start + addr_len + 1]]);
    let value = match atyp {
        ATYP_V4 => {
            let o: [u8; 4] = addr.try_into().map_err(|_| Error::AddressType(atyp))?;
            Address::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
        }
        ATYP_V6 => {
            let o: [u8; 16] = addr.try_into().map_err(|_| Error::AddressType(atyp))?;
            Address::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => Address::Domain { name: addr, port },
    };
    Ok(Decoded::Complete {
        value,
        consumed: total,
    })
}

/// The client's first message: the authentication methods it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting<'a> {
    pub methods: &'a [u8],
}

impl Greeting<'_> {
    pub fn offers(&self, method: u8) -> bool {
        self.methods.contains(&method)
    }

    pub fn encode(&self) -> Vec<u8> {
        let methods = &self.methods[..self.methods.len().min(255)];
        let mut v = vec![VERSION, methods.len() as u8];
        v.extend_from_slice(methods);
        v
    }
}

pub fn decode_greeting(buf: &[u8]) -> Result<Decoded<Greeting<'_>>, Error> {
    let (Some(&ver), Some(&n)) = (buf.first(), buf.get(1)) else {
        if let Some(&ver) = buf.first() {
            if ver != VERSION {
                return Err(Error::BadVersion(ver));
            }
        }
        return Ok(Decoded::Incomplete {
            needed: 2 - buf.len(),
        });
    };
    if ver != VERSION {
        return Err(Error::BadVersion(ver));
    }
    let total = 2 + usize::from(n);
    match buf.get(2..total) {
        None => Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        }),
        Some(methods) => Ok(Decoded::Complete {
            value: Greeting { methods },
            consumed: total,
        }),
    }
}

/// The server's choice of method (`method::NO_ACCEPTABLE` refuses).
pub fn encode_method_choice(method: u8) -> [u8; 2] {
    [VERSION, method]
}

pub fn decode_method_choice(buf: &[u8]) -> Result<Decoded<u8>, Error> {
    two_bytes(buf, VERSION, Error::BadVersion)
}

fn two_bytes(buf: &[u8], version: u8, bad: fn(u8) -> Error) -> Result<Decoded<u8>, Error> {
    match buf {
        [] => Ok(Decoded::Incomplete { needed: 2 }),
        [v, ..] if *v != version => Err(bad(*v)),
        [_] => Ok(Decoded::Incomplete { needed: 1 }),
        [_, b, ..] => Ok(Decoded::Complete {
            value: *b,
            consumed: 2,
        }),
    }
}

/// RFC 1929 username/password request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub username: &'a [u8],
    pub password: &'a [u8],
}

impl fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a password into a log.
        f.debug_struct("Credentials")
            .field("username", &String::from_utf8_lossy(self.username))
            .field("password", &"<hidden>")
            .finish()
    }
}

impl Credentials<'_> {
    /// Fields longer than 255 bytes cannot be expressed and are cut.
    pub fn encode(&self) -> Vec<u8> {
        let u = &self.username[..self.username.len().min(255)];
        let p = &self.password[..self.password.len().min(255)];
        let mut v = Vec::with_capacity(3 + u.len() + p.len());
        v.push(AUTH_VERSION);
        v.push(u.len() as u8);
        v.extend_from_slice(u);
        v.push(p.len() as u8);
        v.extend_from_slice(p);
        v
    }
}

pub fn decode_credentials(buf: &[u8]) -> Result<Decoded<Credentials<'_>>, Error> {
    let Some(&ver) = buf.first() else {
        return Ok(Decoded::Incomplete { needed: 3 });
    };
    if ver != AUTH_VERSION {
        return Err(Error::BadAuthVersion(ver));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(Decoded::Incomplete { needed: 2 });
    };
    if ulen == 0 {
        return Err(Error::EmptyUsername);
    }
    let ulen = usize::from(ulen);
    let Some(&plen) = buf.get(2 + ulen) else {
        return Ok(Decoded::Incomplete {
            needed: 3 + ulen - buf.len(),
        });
    };
    let total = 3 + ulen + usize::from(plen);
    if buf.len() < total {
        return Ok(Decoded::Incomplete {
            needed: total - buf.len(),
        });
    }
    Ok(Decoded::Complete {
        value: Credentials {
            username: &buf[2..2 + ulen],
            password: &buf[3 + ulen..total],
        },
        consumed: total,
    })
}

/// RFC 1929 status: 0 is success, anything else is failure (and the server closes).
pub fn encode_auth_status(success: bool) -> [u8; 2] {
    [AUTH_VERSION, if success { 0 } else { 1 }]
}

pub fn decode_auth_status(buf: &[u8]) -> Result<Decoded<bool>, Error> {
    Ok(two_bytes(buf, AUTH_VERSION, Error::BadAuthVersion)?.map(|status| status == 0))
}

/// The request's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect,
    Bind,
    UdpAssociate,
    /// Unknown: answer with [`ReplyCode::CommandNotSupported`].
    Other(u8),
}

impl From<u8> for Command {
    fn from(c: u8) -> Self {
        match c {
            1 => Command::Connect,
            2 => Command::Bind,
            3 => Command::UdpAssociate,
            other => Command::Other(other),
        }
    }
}

impl From<Command> for u8 {
    fn from(c: Command) -> u8 {
        match c {
            Command::Connect => 1,
            Command::Bind => 2,
            Command::UdpAssociate => 3,
            Command::Other(c) => c,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub command: Command,
    pub address: Address<'a>,
}

impl Request<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(3 + self.address.buffer_len());
        v.extend_from_slice(&[VERSION, self.command.into(), 0]);
        self.address.emit(&mut v);
        v
    }
}

pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request<'_>>, Error> {
    if let Some(&ver) = buf.first() {
        if ver != VERSION {
            return Err(Error::BadVersion(ver));
        }
    }
    if buf.len() < 4 {
        return Ok(Decoded::Incomplete {
            needed: 4 - buf.len(),
        });
    }
    // The reserved byte is not checked: clients in the wild are not all careful with it.
    Ok(match parse_address(&buf[3..])? {
        Decoded::Incomplete { needed } => Decoded::Incomplete { needed },
        Decoded::Complete { value, consumed } => Decoded::Complete {
            value: Request {
                command: buf[1].into(),
                address: value,
            },
            consumed: 3 + consumed,
        },
    })
}

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyCode {
    Succeeded,
    GeneralFailure,
    NotAllowedByRuleset,
    NetworkUnreachable,
    HostUnreachable,
    ConnectionRefused,
    TtlExpired,
    CommandNotSupported,
    AddressTypeNotSupported,
    Other(u8),
}

impl From<u8> for ReplyCode {
    fn from(c: u8) -> Self {
        match c {
            0 => ReplyCode::Succeeded,
            1 => ReplyCode::GeneralFailure,
            2 => ReplyCode::NotAllowedByRuleset,
            3 => ReplyCode::NetworkUnreachable,
            4 => ReplyCode::HostUnreachable,
            5 => ReplyCode::ConnectionRefused,
            6 => ReplyCode::TtlExpired,
            7 => ReplyCode::CommandNotSupported,
            8 => ReplyCode::AddressTypeNotSupported,
            other => ReplyCode::Other(other),
        }
    }
}

impl From<ReplyCode> for u8 {
    fn from(c: ReplyCode) -> u8 {
        match c {
            ReplyCode::Succeeded => 0,
            ReplyCode::GeneralFailure => 1,
            ReplyCode::NotAllowedByRuleset => 2,
            ReplyCode::NetworkUnreachable => 3,
            ReplyCode::HostUnreachable => 4,
            ReplyCode::ConnectionRefused => 5,
            ReplyCode::TtlExpired => 6,
            ReplyCode::CommandNotSupported => 7,
            ReplyCode::AddressTypeNotSupported => 8,
            ReplyCode::Other(c) => c,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    pub code: ReplyCode,
    pub bound: Address<'a>,
}

impl Reply<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(3 + self.bound.buffer_len());
        v.extend_from_slice(&[VERSION, self.code.into(), 0]);
        self.bound.emit(&mut v);
        v
    }
}

/// A reply with an unspecified bound address, as servers send on failure.
pub fn encode_reply(code: ReplyCode, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    Reply {
        code,
        bound: Address::Ip(bound),
    }
    .encode()
}

pub fn decode_reply(buf: &[u8]) -> Result<Decoded<Reply<'_>>, Error> {
    Ok(decode_request(buf)?.map(|r| Reply {
        code: u8::from(r.command).into(),
        bound: r.address,
    }))
}

#[cfg(test)]
mod tests;
