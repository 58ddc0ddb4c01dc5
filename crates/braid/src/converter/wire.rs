//! The codec calls the converter makes, in the converter's terms: a request decoded into
//! owned values (it outlives the read buffer), and the replies it sends.

use std::net::SocketAddr;

use braid_proto::convert::{self, ErrorCode};

pub use braid_proto::convert::BARE_REPLY;

/// TCP options a Connect may ask for with length 2 ("converter fills in"): the kernel puts
/// MSS, window scale, SACK-permitted and timestamps on every SYN anyway. Anything else the
/// converter cannot promise, so it is refused with Error 33.
const FILLED_BY_KERNEL: [u8; 4] = [2, 3, 4, 8];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub dest: Option<SocketAddr>,
    pub info: bool,
    pub cookie: Option<Vec<u8>>,
    /// Kinds of Connect options the converter will not honour (Error 33 if not empty).
    pub unsupported_options: Vec<u8>,
}

#[derive(Debug)]
pub enum Decoded {
    Incomplete,
    Invalid {
        code: u8,
        value: Vec<u8>,
        why: String,
    },
    Complete {
        request: Request,
        consumed: usize,
    },
}

pub fn decode_request(buf: &[u8]) -> Decoded {
    match convert::decode_request(buf) {
        Ok(convert::Decoded::Incomplete { .. }) => Decoded::Incomplete,
        Ok(convert::Decoded::Complete { value, consumed }) => {
            let unsupported_options = value
                .connect
                .map(|c| {
                    c.options
                        .iter()
                        .filter(|o| !(o.data.is_empty() && FILLED_BY_KERNEL.contains(&o.kind)))
                        .map(|o| o.kind)
                        .collect()
                })
                .unwrap_or_default();
            Decoded::Complete {
                request: Request {
                    dest: value.connect.map(|c| c.dest),
                    info: value.info,
                    cookie: value.cookie.map(<[u8]>::to_vec),
                    unsupported_options,
                },
                consumed,
            }
        }
        Err(e) => Decoded::Invalid {
            code: e.error_code().into(),
            value: e.error_value(buf),
            why: e.to_string(),
        },
    }
}

pub fn error_reply(code: u8, value: &[u8]) -> Vec<u8> {
    convert::error_reply(ErrorCode::from(code), value)
}

/// The answer to Info: this converter converts MPTCP.
pub fn supported_extensions_reply() -> Vec<u8> {
    convert::supported_extensions_reply(&[convert::TCP_OPTION_MPTCP])
}
