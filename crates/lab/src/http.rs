//! A minimal HTTP file server in a namespace, with no web server package needed: `GET`
//! anything, get `size` bytes of cheap incompressible-looking data. The demo and the
//! benchmarks download from it; the tests use Debian's nginx.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// Bytes in one block of the body: the body is this block over and over.
pub const BLOCK: usize = 1 << 20;

/// The block the body repeats: incompressible-looking but cheap bytes (xorshift). A reader
/// of a download checks byte `i` against `block()[i % BLOCK]`.
pub fn block() -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    block
}

/// The SHA-256 of the first `len` bytes of the body.
pub fn digest(len: u64) -> [u8; 32] {
    let block = block();
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let k = left.min(block.len() as u64) as usize;
        h.update(&block[..k]);
        left -= k as u64;
    }
    h.finalize().into()
}

/// Serves `size` bytes of [`block`] repeated on `port` (both families) in `ns`; returns the
/// SHA-256 of the body.
/// The server's thread lives as long as the process.
pub fn serve_file(ns: &Netns, port: u16, size: u64) -> Result<[u8; 32]> {
    let d = digest(size);
    serve(ns, port, size).map(|()| d)
}

/// [`serve_file`] without the digest, for bodies too large to hash beforehand (a download
/// that is stopped rather than finished, checked against [`block`] as it arrives).
pub fn serve(ns: &Netns, port: u16, size: u64) -> Result<()> {
    let block = Arc::new(block());
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = ns.thread(move || {
        let listener = match std::net::TcpListener::bind(("::", port)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let block = block.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: \
                     application/octet-stream\r\nConnection: close\r\n\r\n"
                );
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let mut left = size;
                while left > 0 {
                    let k = left.min(block.len() as u64) as usize;
                    if conn.write_all(&block[..k]).is_err() {
                        return;
                    }
                    left -= k as u64;
                }
            });
        }
    })?;
    // The server thread lives as long as the demo; detach it.
    std::mem::forget(thread);
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::io(
            format!("file server on port {port}"),
            ns.name(),
            e,
        )),
        Err(_) => Err(Error::Timeout {
            what: format!("file server on port {port}"),
            ns: ns.name().into(),
            after: Duration::from_secs(5),
        }),
    }
}
