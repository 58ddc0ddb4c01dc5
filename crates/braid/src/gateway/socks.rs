//! The SOCKS5 front (RFC 1928, with RFC 1929 username/password): the exchange up to the
//! request's destination, and the reply code a Convert failure becomes, so that SOCKS clients
//! print the right reason ("connection refused", "host unreachable", "not allowed").

use std::net::SocketAddr;
use std::time::Duration;

use braid_proto::convert::ErrorCode;
use braid_proto::socks5::{self, Address, Command, ReplyCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::conn::Shared;
use super::converters::ConvertFailure;
use crate::framed::{ReadError, read_message};

/// The SOCKS5 exchange must be over within this (a client that never finishes is dropped).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest SOCKS5 message: a request with a 255-byte name is 262 bytes, credentials 513.
const MESSAGE_CAP: usize = 1024;

/// RFC 1928 reply codes for a Convert failure.
pub fn reply_code(e: &ConvertFailure) -> ReplyCode {
    match e {
        ConvertFailure::Refused { code, .. } => match code {
            ErrorCode::ConnectionReset => ReplyCode::ConnectionRefused,
            ErrorCode::DestinationUnreachable | ErrorCode::NetworkFailure => {
                ReplyCode::HostUnreachable
            }
            ErrorCode::MalformedMessage | ErrorCode::NotAuthorized => {
                ReplyCode::NotAllowedByRuleset
            }
            _ => ReplyCode::GeneralFailure,
        },
        ConvertFailure::NoConverter(_) => ReplyCode::GeneralFailure,
    }
}

/// Reads the greeting, authenticates, reads the request and resolves its destination (the
/// caller bounds it with [`HANDSHAKE_TIMEOUT`]). Failures have already been answered when this
/// returns `Err`.
pub async fn handshake(app: &mut TcpStream, shared: &Shared) -> Result<SocketAddr, String> {
    let users = &shared.settings.socks5_users;
    let mut buf = Vec::new();

    let methods: Vec<u8> = next(app, &mut buf, |b| {
        socks5::decode_greeting(b).map(|d| d.map(|g| g.methods.to_vec()))
    })
    .await?;
    let method = if users.is_empty() { 0x00 } else { 0x02 };
    if !methods.contains(&method) {
        let _ = app.write_all(&socks5::encode_method_choice(0xff)).await;
        return Err(format!(
            "client offers no acceptable method (wanted {method:#04x})"
        ));
    }
    app.write_all(&socks5::encode_method_choice(method))
        .await
        .map_err(|e| e.to_string())?;

    if method == 0x02 {
        let (user, pass) = next(app, &mut buf, |b| {
            socks5::decode_credentials(b)
                .map(|d| d.map(|c| (c.username.to_vec(), c.password.to_vec())))
        })
        .await?;
        let ok = users.iter().any(|u| {
            u.user.as_bytes() == user.as_slice() && u.password.as_bytes() == pass.as_slice()
        });
        let _ = app.write_all(&socks5::encode_auth_status(ok)).await;
        if !ok {
            return Err(format!(
                "bad credentials for user {:?}",
                String::from_utf8_lossy(&user)
            ));
        }
    }

    enum Target {
        Ip(SocketAddr),
        Name(String, u16),
    }
    let request = next(app, &mut buf, |b| {
        socks5::decode_request(b).map(|d| {
            d.map(|r| {
                let target = match r.address {
                    Address::Ip(sa) => Ok(Target::Ip(sa)),
                    Address::Domain { name, port } => match std::str::from_utf8(name) {
                        Ok(n) => Ok(Target::Name(n.to_owned(), port)),
                        Err(_) => Err(()),
                    },
                };
                (r.command, target)
            })
        })
    })
    .await;
    let (command, target) = match request {
        Ok(r) => r,
        Err(why) => return Err(answer(app, ReplyCode::GeneralFailure, why).await),
    };
    if command != Command::Connect {
        let why = format!("command {command:?} not supported");
        return Err(answer(app, ReplyCode::CommandNotSupported, why).await);
    }
    let dest = match target {
        Ok(Target::Ip(sa)) => sa,
        Ok(Target::Name(name, port)) => match tokio::net::lookup_host((name.as_str(), port))
            .await
            .map(|mut it| it.next())
        {
            Ok(Some(sa)) => sa,
            _ => {
                let why = format!("cannot resolve {name:?}");
                return Err(answer(app, ReplyCode::HostUnreachable, why).await);
            }
        },
        Err(()) => {
            let why = "domain name is not UTF-8".to_string();
            return Err(answer(app, ReplyCode::HostUnreachable, why).await);
        }
    };
    if !buf.is_empty() {
        // A client must wait for our reply before sending data; one that did not is broken.
        let why = "data sent before the SOCKS5 reply".to_string();
        return Err(answer(app, ReplyCode::GeneralFailure, why).await);
    }
    Ok(dest)
}

/// Sends a failure reply; returns `why` for the log.
async fn answer(app: &mut TcpStream, code: ReplyCode, why: String) -> String {
    let _ = app.write_all(&socks5::encode_reply(code, None)).await;
    why
}

/// The next message of the exchange, consumed from `buf` (what follows stays).
async fn next<T>(
    app: &TcpStream,
    buf: &mut Vec<u8>,
    decode: impl FnMut(&[u8]) -> Result<braid_proto::Decoded<T>, socks5::Error>,
) -> Result<T, String> {
    match read_message(app, buf, MESSAGE_CAP, decode).await {
        Ok((value, consumed)) => {
            buf.drain(..consumed);
            Ok(value)
        }
        Err(ReadError::Invalid(e)) => Err(format!("malformed SOCKS5 message: {e}")),
        Err(ReadError::TooLong) => Err("SOCKS5 message too long".into()),
        Err(ReadError::Closed) => Err("client closed during the SOCKS5 handshake".into()),
        Err(ReadError::Io(e)) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convert_errors_become_the_socks_reply_clients_explain() {
        let c: SocketAddr = "192.0.2.1:5124".parse().unwrap();
        let refused = |code| ConvertFailure::Refused { code, converter: c };
        for (code, want) in [
            (ErrorCode::ConnectionReset, ReplyCode::ConnectionRefused),
            (
                ErrorCode::DestinationUnreachable,
                ReplyCode::HostUnreachable,
            ),
            (ErrorCode::NetworkFailure, ReplyCode::HostUnreachable),
            (ErrorCode::NotAuthorized, ReplyCode::NotAllowedByRuleset),
            (ErrorCode::MalformedMessage, ReplyCode::NotAllowedByRuleset),
            (ErrorCode::ResourceExceeded, ReplyCode::GeneralFailure),
        ] {
            assert_eq!(reply_code(&refused(code)), want, "{code}");
        }
        assert_eq!(
            reply_code(&ConvertFailure::NoConverter("down".into())),
            ReplyCode::GeneralFailure
        );
    }
}
