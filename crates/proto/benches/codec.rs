//! Codec micro-benchmark: ns per Connect request decoded and encoded, and allocations per
//! operation (divan's allocation profiler counts them). Run: `cargo bench -p braid-proto`.

use std::net::SocketAddr;

use braid_proto::convert::{self, Decoded};
use divan::{AllocProfiler, Bencher, black_box};

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

fn main() {
    divan::main();
}

const V4: &str = "192.0.2.10:443";
const V6: &str = "[2001:db8::10]:443";
const COOKIE: &[u8] = b"0123456789abcdefghij";

fn request(dest: &str, cookie: Option<&[u8]>) -> Vec<u8> {
    convert::encode_connect_request(dest.parse().unwrap(), cookie)
}

fn decode(bencher: Bencher, msg: Vec<u8>) {
    bencher.bench(|| match convert::decode_request(black_box(&msg)) {
        Ok(Decoded::Complete { value, consumed }) => (value.connect.map(|c| c.dest), consumed),
        _ => unreachable!(),
    });
}

#[divan::bench]
fn decode_connect_v4(b: Bencher) {
    decode(b, request(V4, None));
}

#[divan::bench]
fn decode_connect_v6(b: Bencher) {
    decode(b, request(V6, None));
}

#[divan::bench]
fn decode_connect_v4_cookie(b: Bencher) {
    decode(b, request(V4, Some(COOKIE)));
}

/// Encoding into a caller's buffer: what a busy client would do.
#[divan::bench]
fn emit_connect_v4(b: Bencher) {
    let dest: SocketAddr = V4.parse().unwrap();
    let mut out = [0u8; 64];
    b.bench_local(|| {
        convert::emit(
            &[convert::Tlv::Connect {
                dest: black_box(dest),
                options: &[],
            }],
            &mut out,
        )
        .unwrap()
    });
}

/// The convenience encoder, which returns a Vec (one allocation).
#[divan::bench]
fn encode_connect_v6_cookie(b: Bencher) {
    let dest: SocketAddr = V6.parse().unwrap();
    b.bench(|| convert::encode_connect_request(black_box(dest), Some(COOKIE)));
}
