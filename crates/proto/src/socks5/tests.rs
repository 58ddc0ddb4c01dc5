//! SOCKS5 vectors (RFC 1928/1929 layouts) and property tests.

use super::*;
use proptest::prelude::*;

fn complete<T: std::fmt::Debug>(r: Result<Decoded<T>, Error>) -> (T, usize) {
    match r {
        Ok(Decoded::Complete { value, consumed }) => (value, consumed),
        other => panic!("{other:?}"),
    }
}

#[test]
fn greeting() {
    let b = [5, 2, 0, 2];
    let (g, n) = complete(decode_greeting(&b));
    assert_eq!(n, 4);
    assert!(g.offers(method::NO_AUTH) && g.offers(method::USERNAME_PASSWORD));
    assert!(!g.offers(method::GSSAPI));
    assert_eq!(g.encode(), b);
    assert_eq!(
        decode_greeting(&b[..3]),
        Ok(Decoded::Incomplete { needed: 1 })
    );
    assert_eq!(decode_greeting(&[4]), Err(Error::BadVersion(4)));
    assert_eq!(decode_greeting(&[4, 1, 0]), Err(Error::BadVersion(4)));
    // No method at all is valid: the answer is "no acceptable method".
    assert_eq!(complete(decode_greeting(&[5, 0])).0.methods, b"");
}

#[test]
fn method_choice() {
    assert_eq!(encode_method_choice(method::NO_ACCEPTABLE), [5, 0xff]);
    assert_eq!(complete(decode_method_choice(&[5, 2, 9])), (2, 2));
    assert_eq!(
        decode_method_choice(&[5]),
        Ok(Decoded::Incomplete { needed: 1 })
    );
    assert_eq!(decode_method_choice(&[1, 0]), Err(Error::BadVersion(1)));
}

#[test]
fn username_password() {
    let b = [1, 4, b'u', b's', b'e', b'r', 3, b'p', b'w', b'd'];
    let (c, n) = complete(decode_credentials(&b));
    assert_eq!(
        (c.username, c.password, n),
        (&b"user"[..], &b"pwd"[..], b.len())
    );
    assert_eq!(c.encode(), b);
    assert!(
        !format!("{c:?}").contains("pwd"),
        "password must not be printed"
    );
    for k in 0..b.len() {
        assert!(
            matches!(decode_credentials(&b[..k]), Ok(Decoded::Incomplete { .. })),
            "{k}"
        );
    }
    assert_eq!(decode_credentials(&[5, 1]), Err(Error::BadAuthVersion(5)));
    assert_eq!(decode_credentials(&[1, 0, 0]), Err(Error::EmptyUsername));
    // An empty password is allowed.
    assert_eq!(
        complete(decode_credentials(&[1, 1, b'u', 0])).0.password,
        b""
    );
    assert_eq!(encode_auth_status(true), [1, 0]);
    assert_eq!(encode_auth_status(false), [1, 1]);
    assert!(complete(decode_auth_status(&[1, 0])).0);
    assert!(!complete(decode_auth_status(&[1, 1])).0);
}

#[test]
fn requests_with_every_address_type() {
    let v4 = [5, 1, 0, 1, 10, 2, 0, 2, 0, 80];
    let (r, n) = complete(decode_request(&v4));
    assert_eq!(n, v4.len());
    assert_eq!(r.command, Command::Connect);
    assert_eq!(r.address, Address::Ip("10.2.0.2:80".parse().unwrap()));
    assert_eq!(r.encode(), v4);

    let mut v6 = vec![5, 1, 0, 4];
    v6.extend_from_slice(&"fd00:2::2".parse::<Ipv6Addr>().unwrap().octets());
    v6.extend_from_slice(&[0x1f, 0x90]);
    let (r, _) = complete(decode_request(&v6));
    assert_eq!(r.address, Address::Ip("[fd00:2::2]:8080".parse().unwrap()));
    assert_eq!(r.encode(), v6);

    let dom = [5, 1, 0, 3, 3, b'w', b'e', b'b', 1, 187];
    let (r, _) = complete(decode_request(&dom));
    assert_eq!(
        r.address,
        Address::Domain {
            name: b"web",
            port: 443
        }
    );
    assert_eq!(r.address.to_string(), "web:443");
    assert_eq!(r.encode(), dom);

    let bind = [5, 2, 0, 1, 0, 0, 0, 0, 0, 0];
    assert_eq!(complete(decode_request(&bind)).0.command, Command::Bind);
    let udp = [5, 3, 0, 1, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        complete(decode_request(&udp)).0.command,
        Command::UdpAssociate
    );
    let other = [5, 9, 0, 1, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        complete(decode_request(&other)).0.command,
        Command::Other(9)
    );

    for k in 0..v4.len() {
        assert!(
            matches!(decode_request(&v4[..k]), Ok(Decoded::Incomplete { .. })),
            "{k}"
        );
    }
    let e = decode_request(&[5, 1, 0, 7, 0]).unwrap_err();
    assert_eq!(e, Error::AddressType(7));
    assert_eq!(e.reply_code(), ReplyCode::AddressTypeNotSupported);
    assert_eq!(
        decode_request(&[5, 1, 0, 3, 0, 0, 80]),
        Err(Error::EmptyDomain)
    );
    assert_eq!(decode_request(&[4, 1, 0]), Err(Error::BadVersion(4)));
}

#[test]
fn every_reply_code() {
    let names = [
        ReplyCode::Succeeded,
        ReplyCode::GeneralFailure,
        ReplyCode::NotAllowedByRuleset,
        ReplyCode::NetworkUnreachable,
        ReplyCode::HostUnreachable,
        ReplyCode::ConnectionRefused,
        ReplyCode::TtlExpired,
        ReplyCode::CommandNotSupported,
        ReplyCode::AddressTypeNotSupported,
    ];
    for (i, code) in names.iter().enumerate() {
        assert_eq!(u8::from(*code), i as u8);
        let b = encode_reply(*code, None);
        assert_eq!(b, [5, i as u8, 0, 1, 0, 0, 0, 0, 0, 0]);
        let (r, n) = complete(decode_reply(&b));
        assert_eq!((r.code, n), (*code, b.len()));
    }
    for c in 0..=255u8 {
        assert_eq!(u8::from(ReplyCode::from(c)), c);
        assert_eq!(u8::from(Command::from(c)), c);
    }
    let b = encode_reply(
        ReplyCode::Succeeded,
        Some("[fd00::1]:1080".parse().unwrap()),
    );
    assert_eq!(
        complete(decode_reply(&b)).0.bound,
        Address::Ip("[fd00::1]:1080".parse().unwrap())
    );
}

fn arb_address() -> impl Strategy<Value = (Vec<u8>, Option<SocketAddr>, u16)> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| (
            vec![],
            Some(SocketAddr::from((Ipv4Addr::from(ip), p))),
            p
        )),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| (
            vec![],
            Some(SocketAddr::from((Ipv6Addr::from(ip), p))),
            p
        )),
        (prop::collection::vec(any::<u8>(), 1..=255), any::<u16>()).prop_map(|(n, p)| (n, None, p)),
    ]
}

proptest! {
    #[test]
    fn request_round_trips(cmd in any::<u8>(), addr in arb_address(), trailer in prop::collection::vec(any::<u8>(), 0..8)) {
        let (name, ip, port) = addr;
        let address = match ip {
            Some(sa) => Address::Ip(sa),
            None => Address::Domain { name: &name, port },
        };
        let req = Request { command: cmd.into(), address };
        let mut bytes = req.encode();
        let len = bytes.len();
        for k in 0..len {
            let incomplete = matches!(decode_request(&bytes[..k]), Ok(Decoded::Incomplete { .. }));
            prop_assert!(incomplete, "prefix {}", k);
        }
        bytes.extend_from_slice(&trailer);
        let (got, n) = complete(decode_request(&bytes));
        prop_assert_eq!(got, req);
        prop_assert_eq!(n, len);
    }

    #[test]
    fn credentials_round_trip(u in prop::collection::vec(any::<u8>(), 1..=255), p in prop::collection::vec(any::<u8>(), 0..=255)) {
        let c = Credentials { username: &u, password: &p };
        let bytes = c.encode();
        let (got, n) = complete(decode_credentials(&bytes));
        prop_assert_eq!(got, c);
        prop_assert_eq!(n, bytes.len());
    }

    #[test]
    fn greeting_round_trips(m in prop::collection::vec(any::<u8>(), 0..=255)) {
        let g = Greeting { methods: &m };
        let bytes = g.encode();
        prop_assert_eq!(complete(decode_greeting(&bytes)), (g, bytes.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_greeting(&bytes);
        let _ = decode_method_choice(&bytes);
        let _ = decode_credentials(&bytes);
        let _ = decode_auth_status(&bytes);
        let _ = decode_request(&bytes);
        let _ = decode_reply(&bytes);
    }
}
