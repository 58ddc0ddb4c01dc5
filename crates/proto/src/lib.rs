//! braid-proto: the wire protocols braid speaks, as pure codecs: no sockets, no clock, no
//! async runtime, no panics on any input.
//!
//! - [`convert`]: the 0-RTT TCP Convert protocol (RFC 8803) between a client (braid's gateway)
//!   and a Transport Converter: requests, replies, every TLV and Error code.
//! - [`socks5`]: SOCKS version 5 (RFC 1928) with username/password authentication (RFC 1929),
//!   for the gateway's SOCKS front.
//!
//! Both decode incrementally: "need more bytes" ([`convert::Decoded::Incomplete`],
//! [`socks5::Decoded::Incomplete`]) is not an error, and a complete message reports how many
//! bytes it consumed so the caller forwards the rest as application data.

pub mod convert;
pub mod socks5;
