//! The codec calls the converter makes, in the converter's terms: a request decoded into
//! owned values (it outlives the read buffer), a malformed one as the [`Refusal`] it gets, and
//! the Info answer.

use std::net::SocketAddr;

use braid_proto::Decoded;
use braid_proto::convert;

use super::handshake::Refusal;

pub use braid_proto::convert::BARE_REPLY;

/// TCP options a Connect may ask for with length 2 ("converter fills in"): the kernel puts
/// MSS, window scale, SACK-permitted and timestamps on every SYN anyway. Anything else the
/// converter cannot promise, so it is refused with Error 33.
const FILLED_BY_KERNEL: [u8; 4] = [2, 3, 4, 8];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub dest: Option<SocketAddr>,
    pub info: bool,
    pub cookie: Option<Vec<u8>>,
    /// Kinds of Connect options the converter will not honour (Error 33 if not empty).
    pub unsupported_options: Vec<u8>,
}

/// Decodes the request at the start of `buf`; a malformed one is refused with the Error the
/// codec maps it to (0, 1 or 2).
pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request>, Refusal> {
    let decoded = convert::decode_request(buf).map_err(|e| Refusal::malformed(&e, buf))?;
    Ok(decoded.map(|value| Request {
        dest: value.connect.as_ref().map(|c| c.dest),
        info: value.info,
        cookie: value.cookie.map(<[u8]>::to_vec),
        unsupported_options: value
            .connect
            .map(|c| {
                c.options
                    .iter()
                    .filter(|o| !(o.data.is_empty() && FILLED_BY_KERNEL.contains(&o.kind)))
                    .map(|o| o.kind)
                    .collect()
            })
            .unwrap_or_default(),
    }))
}

/// The answer to Info: this converter converts MPTCP.
pub fn supported_extensions_reply() -> Vec<u8> {
    convert::supported_extensions_reply(&[convert::TCP_OPTION_MPTCP])
}
