//! braid-proto: the wire protocols braid speaks, as pure codecs: no sockets, no clock, no
//! async runtime, no panics on any input.
//!
//! - [`convert`]: the 0-RTT TCP Convert protocol (RFC 8803) between a client (braid's gateway)
//!   and a Transport Converter: requests, replies, every TLV and Error code.
//! - [`socks5`]: SOCKS version 5 (RFC 1928) with username/password authentication (RFC 1929),
//!   for the gateway's SOCKS front.
//!
//! Both decode incrementally into one [`Decoded`]: "need more bytes"
//! ([`Decoded::Incomplete`]) is not an error, and a complete message reports how many bytes it
//! consumed so the caller forwards the rest as application data.
#![forbid(unsafe_code)]

pub mod convert;
pub mod socks5;

/// Result of feeding bytes to a decoder of either protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// Not a whole message yet: at least `needed` more bytes are required.
    Incomplete { needed: usize },
    /// A whole message, and how many input bytes it took.
    Complete { value: T, consumed: usize },
}

impl<T> Decoded<T> {
    /// The same result with the message turned into something else (typically an owned value
    /// that outlives the input buffer).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Decoded<U> {
        match self {
            Decoded::Incomplete { needed } => Decoded::Incomplete { needed },
            Decoded::Complete { value, consumed } => Decoded::Complete {
                value: f(value),
                consumed,
            },
        }
    }
}
