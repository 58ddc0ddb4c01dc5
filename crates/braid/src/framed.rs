//! Reading one framed message (a Convert request or reply, a SOCKS5 message) off a stream: the
//! one loop the converter, the client and the SOCKS front share.
//!
//! Memory follows the bytes that arrived, not a guess: each read goes through a small buffer on
//! the stack and only what came is kept, so a client that sends one byte and stalls costs one
//! byte, not a read buffer. Whatever follows the message in the same read is left in the
//! buffer for the caller (early application data).

use std::io;

use braid_proto::Decoded;
use tokio::net::TcpStream;

/// Most bytes taken per read while looking for a message: a Convert request or reply is at
/// most 1020 bytes and a SOCKS5 message 513; the rest is application data that rode along.
const READ_CHUNK: usize = 2048;

/// Why no message came.
#[derive(Debug)]
pub enum ReadError<E> {
    /// The peer closed before a whole message.
    Closed,
    Io(io::Error),
    /// The bytes are not a valid message.
    Invalid(E),
    /// More than the cap without a whole message.
    TooLong,
}

/// Reads from `stream` into `buf` until `decode` completes a message; returns the message and
/// the number of bytes of `buf` it took (what follows it stays in `buf`). Bytes already in
/// `buf` are decoded first, so several messages can be read from one buffer in turn. Gives up
/// once `cap` bytes are buffered without a whole message.
pub async fn read_message<T, E>(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    cap: usize,
    mut decode: impl FnMut(&[u8]) -> Result<Decoded<T>, E>,
) -> Result<(T, usize), ReadError<E>> {
    loop {
        match decode(buf).map_err(ReadError::Invalid)? {
            Decoded::Complete { value, consumed } => return Ok((value, consumed)),
            Decoded::Incomplete { .. } if buf.len() >= cap => return Err(ReadError::TooLong),
            Decoded::Incomplete { .. } => {}
        }
        stream.readable().await.map_err(ReadError::Io)?;
        let mut chunk = [0u8; READ_CHUNK];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A "message" is a length byte and that many bytes.
    fn decode(b: &[u8]) -> Result<Decoded<Vec<u8>>, &'static str> {
        match b.first() {
            None => Ok(Decoded::Incomplete { needed: 1 }),
            Some(0) => Err("zero length"),
            Some(&n) if b.len() > usize::from(n) => Ok(Decoded::Complete {
                value: b[1..=usize::from(n)].to_vec(),
                consumed: usize::from(n) + 1,
            }),
            Some(&n) => Ok(Decoded::Incomplete {
                needed: usize::from(n) + 1 - b.len(),
            }),
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn split_messages_are_joined_and_what_follows_is_kept() {
        let (mut w, r) = pair().await;
        let writer = tokio::spawn(async move {
            w.write_all(&[3, b'a']).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            w.write_all(&[b'b', b'c', 2, b'x', b'y', b'!'])
                .await
                .unwrap();
            w
        });
        let mut buf = Vec::new();
        let (m, used) = read_message(&r, &mut buf, 64, decode).await.unwrap();
        assert_eq!(m, b"abc");
        buf.drain(..used);
        // The second message is already buffered: no read needed.
        let (m, used) = read_message(&r, &mut buf, 64, decode).await.unwrap();
        assert_eq!(m, b"xy");
        assert_eq!(&buf[used..], b"!");
        drop(writer.await.unwrap());
        buf.clear();
        assert!(matches!(
            read_message(&r, &mut buf, 64, decode).await,
            Err(ReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn invalid_and_too_long_are_told_apart() {
        let (mut w, r) = pair().await;
        w.write_all(&[0]).await.unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            read_message(&r, &mut buf, 64, decode).await,
            Err(ReadError::Invalid("zero length"))
        ));
        w.write_all(&[200; 100]).await.unwrap();
        let mut buf = Vec::new();
        let r2 = read_message(&r, &mut buf, 50, decode).await;
        assert!(matches!(r2, Err(ReadError::TooLong)), "{r2:?}");
    }
}
