//! Feeds arbitrary bytes to both Convert decoders. Beyond "never panics": anything that decodes
//! must encode back to bytes that decode to the same message, every error must produce a reply
//! that fits in a Convert message, and every prefix of a valid message must be "incomplete".
#![no_main]

use braid_proto::convert::{self, Decoded, Tlv};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match convert::decode_request(data) {
        Ok(Decoded::Complete { value, consumed }) => {
            assert!(consumed <= data.len() && consumed <= convert::MAX_MESSAGE_LEN);
            for n in 0..consumed {
                assert!(matches!(
                    convert::decode_request(&data[..n]),
                    Ok(Decoded::Incomplete { .. })
                ));
            }
            let mut tlvs = Vec::new();
            if value.info {
                tlvs.push(Tlv::Info);
            }
            if let Some(c) = value.connect {
                tlvs.push(Tlv::Connect { dest: c.dest, options: c.options.as_bytes() });
            }
            if let Some(c) = value.cookie {
                tlvs.push(Tlv::Cookie(c));
            }
            let bytes = convert::encode(&tlvs).expect("a decoded request fits");
            let Ok(Decoded::Complete { value: again, .. }) = convert::decode_request(&bytes) else {
                panic!("re-encoded request does not decode")
            };
            assert_eq!(again.info, value.info);
            assert_eq!(again.cookie, value.cookie);
            assert_eq!(again.connect, value.connect);
        }
        Ok(Decoded::Incomplete { needed }) => assert!(needed > 0),
        Err(e) => {
            let reply = e.error_reply(data);
            assert!(reply.len() <= convert::MAX_MESSAGE_LEN);
            assert!(matches!(convert::decode_reply(&reply), Ok(Decoded::Complete { .. })));
        }
    }
    if let Ok(Decoded::Complete { value, .. }) = convert::decode_reply(data) {
        let mut tlvs = Vec::new();
        if let Some(o) = value.extended_tcp_header {
            tlvs.push(Tlv::ExtendedTcpHeader(o.as_bytes()));
        }
        if let Some(k) = value.supported_extensions {
            tlvs.push(Tlv::SupportedTcpExtensions(k));
        }
        if let Some(c) = value.cookie {
            tlvs.push(Tlv::Cookie(c));
        }
        if let Some(e) = value.error() {
            tlvs.push(Tlv::Error { code: e.code, value: e.value });
        }
        let bytes = convert::encode(&tlvs).expect("a decoded reply fits");
        let Ok(Decoded::Complete { value: again, .. }) = convert::decode_reply(&bytes) else {
            panic!("re-encoded reply does not decode")
        };
        assert_eq!(again.extended_tcp_header, value.extended_tcp_header);
        assert_eq!(again.supported_extensions, value.supported_extensions);
        assert_eq!(again.cookie, value.cookie);
        // An Error value is zero-padded on the wire; padding may grow by re-encoding.
        assert_eq!(again.error().map(|e| e.code), value.error().map(|e| e.code));
    }
});
