//! Feeds arbitrary bytes to every SOCKS5 decoder; whatever decodes must re-encode to the
//! bytes it was decoded from.
#![no_main]

use braid_proto::socks5::{self, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Complete { value, consumed }) = socks5::decode_greeting(data) {
        assert_eq!(value.encode(), &data[..consumed]);
    }
    if let Ok(Decoded::Complete { value, consumed }) = socks5::decode_credentials(data) {
        assert_eq!(value.encode(), &data[..consumed]);
    }
    if let Ok(Decoded::Complete { value, consumed }) = socks5::decode_request(data) {
        // The reserved byte is not checked on input, and is always 0 on output.
        let mut expect = data[..consumed].to_vec();
        expect[2] = 0;
        assert_eq!(value.encode(), expect);
    }
    let _ = socks5::decode_reply(data);
    let _ = socks5::decode_method_choice(data);
    let _ = socks5::decode_auth_status(data);
});
