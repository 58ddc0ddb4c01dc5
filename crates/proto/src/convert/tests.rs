//! The byte vectors of the project's Convert specification (RFC 8803 as braid implements
//! it), its malformed cases, and property tests.

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn request(buf: &[u8]) -> Request<'_> {
    match decode_request(buf) {
        Ok(Decoded::Complete { value, consumed }) => {
            assert_eq!(consumed, buf.len());
            value
        }
        other => panic!("{buf:02x?} → {other:?}"),
    }
}

fn reply(buf: &[u8]) -> Reply<'_> {
    match decode_reply(buf) {
        Ok(Decoded::Complete { value, consumed }) => {
            assert_eq!(consumed, buf.len());
            value
        }
        other => panic!("{buf:02x?} → {other:?}"),
    }
}

#[test]
fn vector_bare_reply() {
    let b = hex("01012263");
    assert_eq!(b, BARE_REPLY);
    assert_eq!(reply(&b), Reply::default());
    assert_eq!(encode(&[]).unwrap(), b);
}

#[test]
fn vector_connect_ipv4() {
    let b = hex("01062263 0a051f40 00000000 00000000 0000ffff 7f000001");
    let r = request(&b);
    let c = r.connect.unwrap();
    assert_eq!(c.dest, "127.0.0.1:8000".parse().unwrap());
    assert!(c.options.is_empty());
    assert!(!r.info && r.cookie.is_none());
    assert_eq!(encode_connect_request(c.dest, None), b);
}

#[test]
fn vector_connect_ipv6() {
    let b = hex("01062263 0a051f90 00000000 00000000 00000000 00000001");
    let c = request(&b).connect.unwrap();
    assert_eq!(c.dest, "[::1]:8080".parse().unwrap());
    assert_eq!(encode_connect_request(c.dest, None), b);
}

#[test]
fn vector_connect_with_cookie() {
    let b = hex("01092263 0a051f40 00000000 00000000 0000ffff 7f000001 16030000 636f6f6b 69650000");
    let r = request(&b);
    assert_eq!(r.connect.unwrap().dest, "127.0.0.1:8000".parse().unwrap());
    // Cookies are opaque and padded: the padding comes back with them.
    assert_eq!(r.cookie, Some(&b"cookie\0\0"[..]));
    assert_eq!(
        encode_connect_request("127.0.0.1:8000".parse().unwrap(), Some(b"cookie")),
        b
    );
}

#[test]
fn vector_connect_with_empty_cookie() {
    let b = hex("01072263 0a051f40 00000000 00000000 0000ffff 7f000001 16010000");
    let r = request(&b);
    assert_eq!(r.cookie, Some(&b""[..]));
    assert_eq!(
        encode_connect_request("127.0.0.1:8000".parse().unwrap(), Some(b"")),
        b
    );
}

#[test]
fn vector_info() {
    let b = hex("01022263 01010000");
    let r = request(&b);
    assert!(r.info);
    assert!(r.connect.is_none());
    assert_eq!(encode(&[Tlv::Info]).unwrap(), b);
}

#[test]
fn vector_supported_extensions() {
    let tlv_bytes = hex("15030000 02030408 1e000000");
    let mut b = hex("01042263");
    b.extend_from_slice(&tlv_bytes);
    assert_eq!(supported_extensions_reply(&[2, 3, 4, 8, 30]), b);
    let r = reply(&b);
    assert_eq!(r.supported_kinds().collect::<Vec<_>>(), [2, 3, 4, 8, 30]);
}

#[test]
fn vector_errors() {
    for (code, s) in [
        (ErrorCode::MalformedMessage, "01022263 1e010100"),
        (ErrorCode::MissingCookie, "01022263 1e010300"),
        (ErrorCode::NotAuthorized, "01022263 1e012000"),
        (ErrorCode::ConnectionReset, "01022263 1e016000"),
    ] {
        let b = hex(s);
        assert_eq!(error_reply(code, &[0]), b);
        let e = reply(&b).error().unwrap();
        assert_eq!(e.code, code);
        assert_eq!(e.value, [0]);
    }
}

#[test]
fn vector_connect_tlv_odd_address() {
    let tlv_bytes = hex("0a053039 00000000 00000000 000105ee 0badc0de");
    let dest: SocketAddr = "[::1:5ee:bad:c0de]:12345".parse().unwrap();
    let mut b = hex("01062263");
    b.extend_from_slice(&tlv_bytes);
    assert_eq!(request(&b).connect.unwrap().dest, dest);
    assert_eq!(encode_connect_request(dest, None)[4..], tlv_bytes[..]);
}

fn request_error(buf: &[u8]) -> DecodeError {
    match decode_request(buf) {
        Err(e) => e,
        other => panic!("{buf:02x?} decoded as {other:?}"),
    }
}

#[test]
fn malformed_inputs_get_the_right_error() {
    let cases: &[(&str, ErrorCode)] = &[
        ("02012263", ErrorCode::UnsupportedVersion),
        ("00012263", ErrorCode::UnsupportedVersion),
        ("01012264", ErrorCode::MalformedMessage),
        ("01002263", ErrorCode::MalformedMessage),
        ("01022263 01000000", ErrorCode::MalformedMessage),
        ("01022263 0a050000", ErrorCode::MalformedMessage),
        (
            "01052263 0a040000 00000000 00000000 00000000",
            ErrorCode::MalformedMessage,
        ),
        ("01022263 c8010000", ErrorCode::UnsupportedMessage),
        ("01022263 05010000", ErrorCode::UnsupportedMessage),
        ("01022263 1e010100", ErrorCode::UnsupportedMessage),
    ];
    for (s, code) in cases {
        let b = hex(s);
        assert_eq!(request_error(&b).error_code(), *code, "{s}");
    }
}

#[test]
fn short_input_is_incomplete_not_an_error() {
    let full = hex("01062263 0a051f40 00000000 00000000 0000ffff 7f000001");
    for n in 0..full.len() {
        let r = decode_request(&full[..n]).unwrap();
        assert!(
            matches!(r, Decoded::Incomplete { needed } if needed > 0),
            "{n}: {r:?}"
        );
    }
    assert_eq!(
        decode_request(&full[..2]).unwrap(),
        Decoded::Incomplete { needed: 2 }
    );
    assert_eq!(
        decode_request(&full[..10]).unwrap(),
        Decoded::Incomplete { needed: 14 }
    );
}

#[test]
fn unknown_type_in_a_reply_is_rejected() {
    let e = decode_reply(&hex("01022263 05010000")).unwrap_err();
    assert_eq!(e, DecodeError::UnknownTlv { kind: 5 });
    // A Connect has no business in a reply either.
    let b = hex("01062263 0a051f40 00000000 00000000 0000ffff 7f000001");
    assert_eq!(
        decode_reply(&b).unwrap_err(),
        DecodeError::WrongDirection { kind: 10 }
    );
}

#[test]
fn error_values_follow_the_spec() {
    let b = hex("02012263");
    let e = request_error(&b);
    assert_eq!(e.error_reply(&b), hex("01022263 1e010001"));
    let b = hex("01022263 c8010000");
    assert_eq!(request_error(&b).error_reply(&b), hex("01022263 1e0102c8"));
    // Malformed: 0 then an echo of the message.
    let b = hex("01022263 01000000 ffff");
    let reply_bytes = request_error(&b).error_reply(&b);
    assert_eq!(reply_bytes, hex("01042263 1e030100 01022263 01000000"));
    // A maximal malformed message still gets a reply that fits.
    let mut big = vec![0u8; 1020];
    big[..4].copy_from_slice(&[1, 255, 0x22, 0x63]);
    big[4] = 10; // Connect running past the end
    big[5] = 255;
    let e = request_error(&big);
    let r = e.error_reply(&big);
    assert!(r.len() <= MAX_MESSAGE_LEN, "{}", r.len());
    assert_eq!(reply(&r).error().unwrap().code, ErrorCode::MalformedMessage);
}

#[test]
fn connect_options_are_parsed_and_checked() {
    // MSS 1460 and an empty MPTCP option ("converter fills in"), then padding.
    let opts = [2u8, 4, 0x05, 0xb4, 30, 2];
    let dest: SocketAddr = "192.0.2.1:443".parse().unwrap();
    let b = encode(&[Tlv::Connect {
        dest,
        options: &opts,
    }])
    .unwrap();
    assert_eq!(b.len(), 4 + 28);
    let c = request(&b).connect.unwrap();
    assert_eq!(c.options.as_bytes(), opts);
    let kinds: Vec<_> = c.options.iter().map(|o| (o.kind, o.data.len())).collect();
    assert_eq!(kinds, [(2, 2), (30, 0)]);
    // NOP inside, a length past the TLV, and garbage after EOL are malformed.
    let bads: [[u8; 4]; 4] = [[1, 0, 0, 0], [2, 9, 0, 0], [0, 5, 0, 0], [2, 1, 0, 0]];
    for bad in &bads {
        let mut b = encode(&[Tlv::Connect { dest, options: &[] }]).unwrap();
        b[1] += 1;
        b[5] += 1;
        b.extend_from_slice(&bad[..]);
        assert_eq!(
            request_error(&b).error_code(),
            ErrorCode::MalformedMessage,
            "{bad:?}"
        );
    }
}

#[test]
fn duplicate_connect_is_malformed() {
    let dest: SocketAddr = "192.0.2.1:443".parse().unwrap();
    let b = encode(&[
        Tlv::Connect { dest, options: &[] },
        Tlv::Connect { dest, options: &[] },
    ])
    .unwrap();
    assert_eq!(
        request_error(&b),
        DecodeError::Duplicate { kind: tlv::CONNECT }
    );
}

#[test]
fn error_codes_round_trip_and_have_classes() {
    for c in 0..=255u8 {
        assert_eq!(u8::from(ErrorCode::from(c)), c);
    }
    assert_eq!(ErrorCode::UnsupportedVersion.class(), ErrorClass::Message);
    assert_eq!(ErrorCode::MissingCookie.class(), ErrorClass::Message);
    assert_eq!(ErrorCode::NotAuthorized.class(), ErrorClass::Client);
    assert_eq!(ErrorCode::UnsupportedTcpOption.class(), ErrorClass::Client);
    assert_eq!(ErrorCode::ResourceExceeded.class(), ErrorClass::Converter);
    assert_eq!(ErrorCode::NetworkFailure.class(), ErrorClass::Converter);
    assert_eq!(ErrorCode::ConnectionReset.class(), ErrorClass::Server);
    assert_eq!(
        ErrorCode::DestinationUnreachable.class(),
        ErrorClass::Server
    );
    assert_eq!(ErrorCode::Other(200).class(), ErrorClass::PrivateUse);
    assert_eq!(ErrorCode::Other(150).class(), ErrorClass::Unassigned);
}

#[test]
fn too_long_messages_are_refused_by_the_encoder() {
    let big = [7u8; 1100];
    assert!(encode(&[Tlv::Cookie(&big)]).is_err());
    // The helpers cut instead of failing.
    assert!(error_reply(ErrorCode::MalformedMessage, &big).len() <= MAX_MESSAGE_LEN);
}

// ---- property tests ----

fn arb_dest() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::from((std::net::Ipv4Addr::from(ip), port))),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_filter("IPv4-mapped addresses decode as IPv4", |(ip, _)| {
                Ipv6Addr::from(*ip).to_ipv4_mapped().is_none()
            })
            .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
    ]
}

/// Whole TCP options (kinds 2..=255, no NOP/EOL), at most ~40 bytes.
fn arb_options() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((2u8..=255, prop::collection::vec(any::<u8>(), 0..6)), 0..5).prop_map(
        |opts| {
            let mut v = Vec::new();
            for (kind, data) in opts {
                v.push(kind);
                v.push(2 + data.len() as u8);
                v.extend_from_slice(&data);
            }
            v
        },
    )
}

/// Opaque values whose length is a multiple of 4 and that end in a nonzero byte, so that
/// padding cannot be confused with content.
fn arb_padded_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..10).prop_map(|mut v| {
        while v.len() % 4 != 0 {
            v.push(1);
        }
        v
    })
}

#[derive(Debug, Clone)]
struct ArbRequest {
    dest: Option<(SocketAddr, Vec<u8>)>,
    info: bool,
    cookie: Option<Vec<u8>>,
}

fn arb_request() -> impl Strategy<Value = ArbRequest> {
    (
        prop::option::of((arb_dest(), arb_options())),
        any::<bool>(),
        prop::option::of(arb_padded_value()),
    )
        .prop_map(|(dest, info, cookie)| ArbRequest { dest, info, cookie })
}

fn encode_arb(r: &ArbRequest) -> Vec<u8> {
    let mut tlvs = Vec::new();
    if r.info {
        tlvs.push(Tlv::Info);
    }
    if let Some((dest, opts)) = &r.dest {
        tlvs.push(Tlv::Connect {
            dest: *dest,
            options: opts,
        });
    }
    if let Some(c) = &r.cookie {
        tlvs.push(Tlv::Cookie(c));
    }
    encode(&tlvs).unwrap()
}

proptest! {
    #[test]
    fn request_round_trips(r in arb_request()) {
        let bytes = encode_arb(&r);
        let got = request(&bytes);
        prop_assert_eq!(got.info, r.info);
        prop_assert_eq!(got.cookie, r.cookie.as_deref());
        match (&r.dest, got.connect) {
            (None, None) => {}
            (Some((dest, opts)), Some(c)) => {
                prop_assert_eq!(c.dest, *dest);
                prop_assert_eq!(c.options.as_bytes(), &opts[..]);
            }
            (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
        }
    }

    #[test]
    fn reply_round_trips(
        eth in prop::option::of(arb_options()),
        kinds in prop::option::of(arb_padded_value()),
        cookie in prop::option::of(arb_padded_value()),
        error in prop::option::of((any::<u8>(), prop::collection::vec(any::<u8>(), 0..8))),
    ) {
        let mut tlvs = Vec::new();
        if let Some(e) = &eth { tlvs.push(Tlv::ExtendedTcpHeader(e)); }
        if let Some(k) = &kinds { tlvs.push(Tlv::SupportedTcpExtensions(k)); }
        if let Some(c) = &cookie { tlvs.push(Tlv::Cookie(c)); }
        if let Some((code, value)) = &error {
            tlvs.push(Tlv::Error { code: (*code).into(), value });
        }
        let bytes = encode(&tlvs).unwrap();
        let got = reply(&bytes);
        prop_assert_eq!(got.extended_tcp_header.map(|o| o.as_bytes()), eth.as_deref());
        prop_assert_eq!(got.supported_extensions, kinds.as_deref());
        prop_assert_eq!(got.cookie, cookie.as_deref());
        match (&error, got.error()) {
            (None, None) => {}
            (Some((code, value)), Some(e)) => {
                prop_assert_eq!(u8::from(e.code), *code);
                // The value comes back padded with zeros.
                prop_assert_eq!(&e.value[..value.len()], &value[..]);
                prop_assert!(e.value[value.len()..].iter().all(|b| *b == 0));
            }
            (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1100)) {
        for r in [decode_request(&bytes).err(), decode_reply(&bytes).err()].into_iter().flatten() {
            let reply_bytes = r.error_reply(&bytes);
            prop_assert!(reply_bytes.len() <= MAX_MESSAGE_LEN);
        }
    }

    /// Starting from a valid header makes the fuzzing reach the TLV walker.
    #[test]
    fn arbitrary_tlvs_never_panic(words in 1u8..=255, body in prop::collection::vec(any::<u8>(), 0..1100)) {
        let mut bytes = vec![1, words, 0x22, 0x63];
        bytes.extend_from_slice(&body);
        let _ = decode_request(&bytes);
        let _ = decode_reply(&bytes);
    }

    #[test]
    fn byte_at_a_time_matches_all_at_once(r in arb_request(), trailer in prop::collection::vec(any::<u8>(), 0..20)) {
        let msg = encode_arb(&r);
        let mut stream = msg.clone();
        stream.extend_from_slice(&trailer);
        for n in 0..msg.len() {
            let partial = decode_request(&stream[..n]);
            prop_assert!(matches!(partial, Ok(Decoded::Incomplete { .. })), "prefix {}: {:?}", n, partial);
        }
        let whole = decode_request(&stream).unwrap();
        let exact = decode_request(&msg).unwrap();
        prop_assert_eq!(&whole, &exact);
        let Decoded::Complete { consumed, .. } = whole else { unreachable!() };
        prop_assert_eq!(consumed, msg.len(), "bytes after the message are not consumed");
    }
}
