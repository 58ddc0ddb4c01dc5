//! The converter's decisions about one connection, as plain functions of what it knows: the
//! client's address, its request, the policy, the cookie jar, what a limit or the upstream
//! connect said. No sockets; the one clock read is the cookie jar's hour. `conn.rs` does the
//! I/O around them.
//!
//! Every refusal is one [`Refusal`] value: the Error code, its value bytes, the outcome label
//! and the detail for the log all come from it, so the bytes sent and the metric counted can
//! never disagree.

use std::net::{IpAddr, SocketAddr};

use braid_proto::convert::{self, DecodeError, ErrorCode};

use super::cookie::CookieJar;
use super::limits::LimitHit;
use super::policy::{DestVerdict, Policy};
use super::upstream::UpstreamError;
use super::wire::Request;

/// A connection the converter refuses, and the Error that tells the client why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    /// The Error TLV's value bytes (a single 0 when the code needs none).
    pub value: Vec<u8>,
    /// Outcome label for the log line and `connections_total{outcome}`.
    pub outcome: &'static str,
    /// Why, for the log line.
    pub detail: String,
}

/// What to do with a complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Refuse(Refusal),
    /// Answer with the Supported TCP Extensions, then close.
    Info,
    /// Connect to this destination and relay.
    Connect(SocketAddr),
}

impl Refusal {
    fn new(
        code: ErrorCode,
        value: Vec<u8>,
        outcome: &'static str,
        detail: impl Into<String>,
    ) -> Refusal {
        Refusal {
            code,
            value,
            outcome,
            detail: detail.into(),
        }
    }

    /// The whole reply: header and Error TLV.
    pub fn reply(&self) -> Vec<u8> {
        convert::error_reply(self.code, &self.value)
    }

    /// A request the codec could not accept: Error 0, 1 or 2 with the value the codec gives.
    pub fn malformed(e: &DecodeError, input: &[u8]) -> Refusal {
        Refusal::new(
            e.error_code(),
            e.error_value(input),
            "malformed",
            e.to_string(),
        )
    }

    /// More than the request's 1020 bytes without a complete request.
    pub fn too_long() -> Refusal {
        Refusal::new(
            ErrorCode::MalformedMessage,
            vec![0],
            "malformed",
            "request too long",
        )
    }

    /// A limit is full: Error 64 with the back-off.
    pub fn limited(hit: LimitHit, backoff_secs: u8) -> Refusal {
        Refusal::new(
            ErrorCode::ResourceExceeded,
            vec![backoff_secs],
            "limited",
            format!("{} limit reached", hit.as_str()),
        )
    }

    /// The upstream connect failed: 96, 97 with the ICMP code, 65 or 64 (the last two with
    /// the back-off, since they are the converter's trouble rather than the destination's).
    pub fn upstream(e: &UpstreamError, backoff_secs: u8) -> Refusal {
        let (code, value) = e.convert_error();
        let value = match code {
            ErrorCode::ResourceExceeded | ErrorCode::NetworkFailure => backoff_secs,
            _ => value,
        };
        Refusal::new(code, vec![value], e.label(), e.to_string())
    }
}

/// Before anything is read: is this client one the converter serves at all?
pub fn admit_client(client: IpAddr, policy: &Policy) -> Result<(), Refusal> {
    if policy.client_allowed(client) {
        Ok(())
    } else {
        Err(Refusal::new(
            ErrorCode::NotAuthorized,
            vec![0],
            "client_not_allowed",
            "client address not allowed",
        ))
    }
}

/// The verdict on a complete request from `client`: options, cookie, then the destination,
/// in that order (a client without a cookie learns nothing about the policy).
pub fn decide(
    req: &Request,
    client: IpAddr,
    policy: &Policy,
    cookies: Option<&CookieJar>,
) -> Verdict {
    let Some(dest) = req.dest else {
        if req.info {
            return Verdict::Info;
        }
        return Verdict::Refuse(Refusal::new(
            ErrorCode::MalformedMessage,
            vec![0],
            "malformed",
            "request without Connect",
        ));
    };
    if !req.unsupported_options.is_empty() {
        return Verdict::Refuse(Refusal::new(
            ErrorCode::UnsupportedTcpOption,
            req.unsupported_options.clone(),
            "unsupported_option",
            format!("{:?}", req.unsupported_options),
        ));
    }
    if let Some(jar) = cookies {
        match &req.cookie {
            None => {
                // Error 3's value: a 0 byte, then the cookie for this client.
                let mut value = vec![0u8];
                value.extend_from_slice(&jar.issue(client));
                return Verdict::Refuse(Refusal::new(
                    ErrorCode::MissingCookie,
                    value,
                    "missing_cookie",
                    "cookie issued",
                ));
            }
            Some(c) if !jar.verify(client, c) => {
                return Verdict::Refuse(Refusal::new(
                    ErrorCode::NotAuthorized,
                    vec![0],
                    "bad_cookie",
                    "invalid cookie",
                ));
            }
            Some(_) => {}
        }
    }
    match policy.check_destination(dest) {
        DestVerdict::Allowed => Verdict::Connect(dest),
        DestVerdict::Forbidden(why) => Verdict::Refuse(Refusal::new(
            ErrorCode::MalformedMessage,
            vec![0],
            "forbidden_destination",
            why,
        )),
        DestVerdict::NotAuthorized(why) => Verdict::Refuse(Refusal::new(
            ErrorCode::NotAuthorized,
            vec![0],
            "not_authorized",
            why,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::converter::config::{File, Settings};
    use crate::converter::wire;
    use braid_proto::Decoded;
    use std::io;

    const CLIENT: &str = "10.1.1.1";

    fn policy() -> Policy {
        let s = Settings::validate(
            File {
                allow_client: Some(vec!["10.1.0.0/16".into()]),
                allow_dest: Some(vec!["10.2.0.0/24".into(), "192.0.2.0/24".into()]),
                deny_ports: Some(vec![25]),
                ..File::default()
            },
            None,
        )
        .unwrap();
        let p = Policy::new(&s);
        p.set_own_addresses(vec!["10.2.0.1".parse().unwrap()]);
        p
    }

    fn client() -> IpAddr {
        CLIENT.parse().unwrap()
    }

    /// The verdict on these request bytes, as the converter reaches it.
    fn verdict_on(bytes: &[u8], cookies: Option<&CookieJar>) -> Verdict {
        match wire::decode_request(bytes) {
            Err(r) => Verdict::Refuse(r),
            Ok(Decoded::Incomplete { .. }) => panic!("incomplete"),
            Ok(Decoded::Complete { value, .. }) => decide(&value, client(), &policy(), cookies),
        }
    }

    fn connect(dest: &str) -> Vec<u8> {
        convert::encode_connect_request(dest.parse().unwrap(), None)
    }

    fn refused(v: Verdict) -> Refusal {
        match v {
            Verdict::Refuse(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// The reply bytes of a refusal always carry the code that is counted.
    fn code_of(r: &Refusal) -> ErrorCode {
        let reply = r.reply();
        match convert::decode_reply(&reply) {
            Ok(Decoded::Complete { value, .. }) => {
                let e = value.error().expect("an Error TLV");
                assert_eq!(e.code, r.code, "bytes and code agree");
                assert_eq!(e.value, &r.value[..]);
                e.code
            }
            other => panic!("reply does not decode: {other:?}"),
        }
    }

    #[test]
    fn an_allowed_destination_is_connected() {
        assert_eq!(
            verdict_on(&connect("10.2.0.2:80"), None),
            Verdict::Connect("10.2.0.2:80".parse().unwrap())
        );
    }

    #[test]
    fn info_is_answered() {
        let info = [1, 2, 0x22, 0x63, 1, 1, 0, 0];
        assert_eq!(verdict_on(&info, None), Verdict::Info);
    }

    #[test]
    fn error_0_unsupported_version() {
        let r = refused(verdict_on(&[2, 1, 0x22, 0x63], None));
        assert_eq!(code_of(&r), ErrorCode::UnsupportedVersion);
        assert_eq!(r.value, [1], "the versions supported");
    }

    #[test]
    fn error_1_malformed_forbidden_or_without_connect() {
        let bad_magic = [1, 1, 0x22, 0x64];
        let r = refused(verdict_on(&bad_magic, None));
        assert_eq!(code_of(&r), ErrorCode::MalformedMessage);
        assert_eq!(r.outcome, "malformed");
        for forbidden in [
            "127.0.0.1:80",
            "224.0.0.1:80",
            "10.2.0.1:80",
            "[fe80::1]:80",
        ] {
            let r = refused(verdict_on(&connect(forbidden), None));
            assert_eq!(code_of(&r), ErrorCode::MalformedMessage, "{forbidden}");
            assert_eq!(r.outcome, "forbidden_destination");
        }
        let bare = convert::BARE_REPLY;
        let r = refused(verdict_on(&bare, None));
        assert_eq!(code_of(&r), ErrorCode::MalformedMessage);
        assert_eq!(r.detail, "request without Connect");
        assert_eq!(code_of(&Refusal::too_long()), ErrorCode::MalformedMessage);
    }

    #[test]
    fn error_2_unknown_tlv() {
        let unknown = [1, 2, 0x22, 0x63, 99, 1, 0, 0];
        let r = refused(verdict_on(&unknown, None));
        assert_eq!(code_of(&r), ErrorCode::UnsupportedMessage);
        assert_eq!(r.value, [99], "the type");
    }

    #[test]
    fn error_3_and_32_cookies() {
        let jar = CookieJar::new(Some(b"0123456789abcdef".to_vec()));
        let r = refused(verdict_on(&connect("10.2.0.2:80"), Some(&jar)));
        assert_eq!(code_of(&r), ErrorCode::MissingCookie);
        assert_eq!(r.value[0], 0);
        let cookie = r.value[1..].to_vec();
        assert!(
            jar.verify(client(), &cookie),
            "Error 3 carries a cookie for this client"
        );
        let with = convert::encode_connect_request("10.2.0.2:80".parse().unwrap(), Some(&cookie));
        assert_eq!(
            verdict_on(&with, Some(&jar)),
            Verdict::Connect("10.2.0.2:80".parse().unwrap())
        );
        let forged =
            convert::encode_connect_request("10.2.0.2:80".parse().unwrap(), Some(&[0u8; 20]));
        let r = refused(verdict_on(&forged, Some(&jar)));
        assert_eq!(code_of(&r), ErrorCode::NotAuthorized);
        assert_eq!(r.outcome, "bad_cookie");
    }

    #[test]
    fn error_32_client_or_destination_not_allowed() {
        let p = policy();
        assert!(admit_client(client(), &p).is_ok());
        let r = admit_client("192.0.2.9".parse().unwrap(), &p).unwrap_err();
        assert_eq!(code_of(&r), ErrorCode::NotAuthorized);
        assert_eq!(r.outcome, "client_not_allowed");
        for outside in ["198.51.100.1:80", "10.2.0.2:25"] {
            let r = refused(verdict_on(&connect(outside), None));
            assert_eq!(code_of(&r), ErrorCode::NotAuthorized, "{outside}");
            assert_eq!(r.outcome, "not_authorized");
        }
    }

    #[test]
    fn error_33_unsupported_tcp_option() {
        let with_options = |options: &[u8]| {
            convert::encode(&[convert::Tlv::Connect {
                dest: "10.2.0.2:80".parse().unwrap(),
                options,
            }])
            .unwrap()
        };
        // MSS with length 2 is filled in by the kernel; kind 254 is not.
        let tlv_request = with_options(&[2, 2, 254, 2]);
        let r = refused(verdict_on(&tlv_request, None));
        assert_eq!(code_of(&r), ErrorCode::UnsupportedTcpOption);
        assert_eq!(r.value, [254]);
        assert!(matches!(
            verdict_on(&with_options(&[2, 2, 4, 2]), None),
            Verdict::Connect(_)
        ));
    }

    #[test]
    fn error_64_limits_and_local_exhaustion_carry_the_backoff() {
        for hit in [
            LimitHit::Total,
            LimitHit::PerClient,
            LimitHit::Pending,
            LimitHit::PendingPerPrefix,
            LimitHit::ConnectingPerPrefix,
        ] {
            let r = Refusal::limited(hit, 9);
            assert_eq!(code_of(&r), ErrorCode::ResourceExceeded);
            assert_eq!(r.value, [9]);
        }
        let r = Refusal::upstream(
            &UpstreamError::Exhausted(io::Error::from_raw_os_error(libc::EMFILE)),
            9,
        );
        assert_eq!(code_of(&r), ErrorCode::ResourceExceeded);
        assert_eq!(r.value, [9]);
    }

    #[test]
    fn upstream_failures_map_to_65_96_97() {
        let r = Refusal::upstream(&UpstreamError::Timeout, 7);
        assert_eq!(code_of(&r), ErrorCode::NetworkFailure);
        assert_eq!(r.value, [7], "65 carries the back-off");
        let r = Refusal::upstream(&UpstreamError::Refused, 7);
        assert_eq!(code_of(&r), ErrorCode::ConnectionReset);
        assert_eq!(r.value, [0]);
        let r = Refusal::upstream(
            &UpstreamError::Unreachable {
                code: 3,
                error: io::Error::from_raw_os_error(libc::ECONNREFUSED),
            },
            7,
        );
        assert_eq!(code_of(&r), ErrorCode::DestinationUnreachable);
        assert_eq!(r.value, [3], "the ICMP code, not the back-off");
    }
}
