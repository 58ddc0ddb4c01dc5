//! Timed uploads of a new connection, checked byte for byte: a server that answers one byte
//! once it has an upload's bytes in order, and a client that writes a head, pauses, writes the
//! rest and waits for that answer. Measures how soon an upload is done as the client sees it
//! (the transfer benchmark, the gateway's upload tests).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::netns::{Netns, NsThread};

/// Byte `i` of every upload.
pub fn byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// Accepts uploads of `size` bytes on `port` (IPv4) in `ns`, one connection after the other,
/// answering `k` to one that arrived whole and in order and `x` otherwise. The thread lives
/// as long as the namespace's listener (the process, or until the namespace goes).
pub fn sink(ns: &Netns, port: u16, size: usize) -> Result<NsThread<()>> {
    let l = ns
        .enter(move || TcpListener::bind(("0.0.0.0", port)))?
        .map_err(|e| Error::io(format!("bind upload sink on {port}"), ns.name(), e))?;
    ns.thread(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let (mut got, mut intact, mut buf) = (0, true, vec![0u8; 1 << 16]);
            while got < size {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        intact &= buf[..n]
                            .iter()
                            .enumerate()
                            .all(|(k, b)| *b == byte(got + k));
                        got += n;
                    }
                }
            }
            let _ = s.write_all(if intact && got == size { b"k" } else { b"x" });
        }
    })
}

/// One upload from `ns` to a [`sink`] at `dest`, a new connection: the first `head` bytes, a
/// pause of `pause`, then the rest of `size`. Returns the time from connect to the sink's
/// answer, or why it failed (no answer within 30 s, or the bytes arrived damaged).
pub fn send(
    ns: &Netns,
    dest: SocketAddr,
    head: usize,
    pause: Duration,
    size: usize,
) -> std::result::Result<Duration, String> {
    ns.enter(move || {
        let data: Vec<u8> = (0..size).map(byte).collect();
        let head = head.min(size);
        let t = Instant::now();
        let mut s = TcpStream::connect(dest).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        s.write_all(&data[..head])
            .map_err(|e| format!("write: {e}"))?;
        std::thread::sleep(pause);
        s.write_all(&data[head..])
            .map_err(|e| format!("write: {e}"))?;
        let mut k = [0u8; 1];
        s.read_exact(&mut k)
            .map_err(|e| format!("waiting for the answer: {e}"))?;
        match &k {
            b"k" => Ok(t.elapsed()),
            _ => Err("the server got other bytes than were sent".into()),
        }
    })
    .map_err(|e| e.to_string())?
}
