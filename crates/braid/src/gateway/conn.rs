//! One captured connection: find where it was going (the transparent socket's local address,
//! `SO_ORIGINAL_DST`, or the SOCKS5 request), open a converted connection over MPTCP carrying
//! whatever the application already sent, relay, log one line at close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_proto::socks5::{self, Address, Command, Decoded, ReplyCode};
use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::config::Settings;
use super::converters::{ConvertFailure, Converters};
use super::stats::{Direction, Stats};
use crate::client::ClientOptions;
use crate::relay::{self, Outcome};

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    pub converters: Converters,
    pub client: ClientOptions,
    pub stats: Stats,
    pub hard_stop: CancellationToken,
}

/// The SOCKS5 exchange must be over within this (a client that never finishes is dropped).
const SOCKS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Early data read from a captured connection before converting it; more waits for the relay.
const EARLY_MAX: usize = 16 * 1024;

/// How a captured connection reached us.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Tproxy,
    Redirect,
    Socks5,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
            Mode::Socks5 => "socks5",
        }
    }
}

/// A transparently captured connection to `dest`.
pub async fn serve_transparent(
    app: TcpStream,
    peer: SocketAddr,
    dest: SocketAddr,
    mode: Mode,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    shared.stats.active.inc();
    let s = &shared.settings;
    // A connection to our own capture port (not through us) would loop forever.
    if dest.port() == s.transparent_port && braid_sys::route::is_local_address(dest.ip()) {
        relay::reset_on_close(&app);
        finish(
            &shared,
            mode,
            peer,
            dest,
            None,
            started,
            "loop_refused",
            "",
            0,
            0,
            false,
        );
        return;
    }
    // Whatever the application sent already goes with the request, in the SYN.
    let mut early = vec![0u8; EARLY_MAX];
    let n = app.try_read(&mut early).unwrap_or_default();
    early.truncate(n);
    let converted = if s.is_bypassed(dest.ip()) {
        // Rules are removed and reinstalled as a whole; a race can still deliver one.
        direct(dest, &shared).await.map(|c| (c, None, false))
    } else {
        shared
            .converters
            .connect(dest, &early, &shared.client, &shared.stats)
            .await
            .map(|(c, conv)| {
                let leftover = c.leftover;
                ((c.stream, leftover), Some(conv), c.mptcp)
            })
            .map_err(|e| e.to_string())
    };
    let ((server, leftover), conv, mptcp) = match converted {
        Ok(x) => x,
        Err(why) => {
            // The application sees a reset: the closest a transparent proxy can come to
            // "connection refused" once the handshake was accepted.
            relay::reset_on_close(&app);
            finish(
                &shared,
                mode,
                peer,
                dest,
                None,
                started,
                "convert_failed",
                &why,
                0,
                0,
                false,
            );
            return;
        }
    };
    let early_sent = if conv.is_some() {
        early.len() as u64
    } else {
        // Direct: the early bytes still have to go.
        if !early.is_empty() && relay::write_all(&server, &early).await.is_err() {
            relay::reset_on_close(&app);
            finish(
                &shared,
                mode,
                peer,
                dest,
                conv,
                started,
                "server_gone",
                "",
                0,
                0,
                mptcp,
            );
            return;
        }
        early.len() as u64
    };
    relay_and_finish(
        &shared, mode, peer, dest, conv, started, app, server, leftover, early_sent, mptcp,
    )
    .await;
}

/// A SOCKS5 client.
pub async fn serve_socks(mut app: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    shared.stats.active.inc();
    let dest =
        match tokio::time::timeout(SOCKS_HANDSHAKE_TIMEOUT, socks_handshake(&mut app, &shared))
            .await
        {
            Ok(Ok(dest)) => dest,
            Ok(Err(why)) => {
                let dest = SocketAddr::from(([0, 0, 0, 0], 0));
                finish(
                    &shared,
                    Mode::Socks5,
                    peer,
                    dest,
                    None,
                    started,
                    "socks_refused",
                    &why,
                    0,
                    0,
                    false,
                );
                return;
            }
            Err(_) => {
                let dest = SocketAddr::from(([0, 0, 0, 0], 0));
                finish(
                    &shared,
                    Mode::Socks5,
                    peer,
                    dest,
                    None,
                    started,
                    "socks_timeout",
                    "",
                    0,
                    0,
                    false,
                );
                return;
            }
        };
    let converted = if shared.settings.is_bypassed(dest.ip()) {
        direct(dest, &shared)
            .await
            .map(|c| (c, None, false))
            .map_err(|e| (ReplyCode::GeneralFailure, e))
    } else {
        shared
            .converters
            .connect(dest, &[], &shared.client, &shared.stats)
            .await
            .map(|(c, conv)| ((c.stream, c.leftover), Some(conv), c.mptcp))
            .map_err(|e| (socks_code(&e), e.to_string()))
    };
    let ((server, leftover), conv, mptcp) = match converted {
        Ok(x) => x,
        Err((code, why)) => {
            let _ = app.write_all(&socks5::encode_reply(code, None)).await;
            let _ = app.shutdown().await;
            finish(
                &shared,
                Mode::Socks5,
                peer,
                dest,
                None,
                started,
                "convert_failed",
                &why,
                0,
                0,
                false,
            );
            return;
        }
    };
    let bound = server.local_addr().ok();
    if app
        .write_all(&socks5::encode_reply(ReplyCode::Succeeded, bound))
        .await
        .is_err()
    {
        relay::reset_on_close(&server);
        finish(
            &shared,
            Mode::Socks5,
            peer,
            dest,
            conv,
            started,
            "client_gone",
            "",
            0,
            0,
            mptcp,
        );
        return;
    }
    relay_and_finish(
        &shared,
        Mode::Socks5,
        peer,
        dest,
        conv,
        started,
        app,
        server,
        leftover,
        0,
        mptcp,
    )
    .await;
}

/// RFC 1928 reply codes for a Convert failure, so SOCKS clients print the right reason.
fn socks_code(e: &ConvertFailure) -> ReplyCode {
    match e {
        ConvertFailure::Refused { code: 96, .. } => ReplyCode::ConnectionRefused,
        ConvertFailure::Refused { code: 97, .. } => ReplyCode::HostUnreachable,
        ConvertFailure::Refused { code: 65, .. } => ReplyCode::HostUnreachable,
        ConvertFailure::Refused { code: 1 | 32, .. } => ReplyCode::NotAllowedByRuleset,
        ConvertFailure::Refused { .. } | ConvertFailure::NoConverter(_) => {
            ReplyCode::GeneralFailure
        }
    }
}

/// Reads the SOCKS5 greeting, authenticates, reads the request and resolves its destination.
/// Failures have already been answered when this returns `Err`.
async fn socks_handshake(app: &mut TcpStream, shared: &Shared) -> Result<SocketAddr, String> {
    let users = &shared.settings.socks5_users;
    let mut buf = Vec::with_capacity(512);

    let methods: Vec<u8> = read_msg(app, &mut buf, |b| {
        socks5::decode_greeting(b).map(|d| map_decoded(d, |g| g.methods.to_vec()))
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
        let (user, pass) = read_msg(app, &mut buf, |b| {
            socks5::decode_credentials(b)
                .map(|d| map_decoded(d, |c| (c.username.to_vec(), c.password.to_vec())))
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
    let request = read_msg(app, &mut buf, |b| {
        socks5::decode_request(b).map(|d| {
            map_decoded(d, |r| {
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
        Err(why) => {
            let _ = app
                .write_all(&socks5::encode_reply(ReplyCode::GeneralFailure, None))
                .await;
            return Err(why);
        }
    };
    if command != Command::Connect {
        let _ = app
            .write_all(&socks5::encode_reply(ReplyCode::CommandNotSupported, None))
            .await;
        return Err(format!("command {command:?} not supported"));
    }
    let dest = match target {
        Ok(Target::Ip(sa)) => sa,
        Ok(Target::Name(name, port)) => match tokio::net::lookup_host((name.as_str(), port))
            .await
            .map(|mut it| it.next())
        {
            Ok(Some(sa)) => sa,
            _ => {
                let _ = app
                    .write_all(&socks5::encode_reply(ReplyCode::HostUnreachable, None))
                    .await;
                return Err(format!("cannot resolve {name:?}"));
            }
        },
        Err(()) => {
            let _ = app
                .write_all(&socks5::encode_reply(ReplyCode::HostUnreachable, None))
                .await;
            return Err("domain name is not UTF-8".into());
        }
    };
    if !buf.is_empty() {
        // A client must wait for our reply before sending data; one that did not is broken.
        let _ = app
            .write_all(&socks5::encode_reply(ReplyCode::GeneralFailure, None))
            .await;
        return Err("data sent before the SOCKS5 reply".into());
    }
    Ok(dest)
}

fn map_decoded<T, U>(d: Decoded<T>, f: impl FnOnce(T) -> U) -> Decoded<U> {
    match d {
        Decoded::Incomplete { needed } => Decoded::Incomplete { needed },
        Decoded::Complete { value, consumed } => Decoded::Complete {
            value: f(value),
            consumed,
        },
    }
}

/// Reads until `decode` completes a message; consumes it from `buf` (keeping what follows).
async fn read_msg<T>(
    app: &mut TcpStream,
    buf: &mut Vec<u8>,
    decode: impl Fn(&[u8]) -> Result<Decoded<T>, socks5::Error>,
) -> Result<T, String> {
    loop {
        match decode(buf) {
            Ok(Decoded::Complete { value, consumed }) => {
                buf.drain(..consumed);
                return Ok(value);
            }
            Ok(Decoded::Incomplete { .. }) => {}
            Err(e) => return Err(format!("malformed SOCKS5 message: {e}")),
        }
        if buf.len() > 1024 {
            return Err("SOCKS5 message too long".into());
        }
        app.readable().await.map_err(|e| e.to_string())?;
        let mut chunk = [0u8; 512];
        match app.try_read(&mut chunk) {
            Ok(0) => return Err("client closed during the SOCKS5 handshake".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A direct TCP connection (bypassed destination), marked so the output capture ignores it.
async fn direct(dest: SocketAddr, shared: &Shared) -> Result<(TcpStream, Vec<u8>), String> {
    let socket = match dest {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| e.to_string())?;
    if let Some(mark) = shared.client.mark {
        SockRef::from(&socket)
            .set_mark(mark)
            .map_err(|e| e.to_string())?;
    }
    match tokio::time::timeout(shared.settings.connect_timeout, socket.connect(dest)).await {
        Ok(Ok(s)) => Ok((s, Vec::new())),
        Ok(Err(e)) => Err(format!("direct connect to {dest}: {e}")),
        Err(_) => Err(format!("direct connect to {dest}: timed out")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_and_finish(
    shared: &Shared,
    mode: Mode,
    peer: SocketAddr,
    dest: SocketAddr,
    conv: Option<SocketAddr>,
    started: Instant,
    app: TcpStream,
    server: TcpStream,
    leftover: Vec<u8>,
    early_sent: u64,
    mptcp: bool,
) {
    if conv.is_some() && !mptcp {
        shared.stats.fallback.inc();
        tracing::warn!(%peer, %dest, converter = ?conv, "connection to the converter is plain TCP: MPTCP was stripped on the path or refused");
    }
    if !leftover.is_empty() && relay::write_all(&app, &leftover).await.is_err() {
        relay::reset_on_close(&server);
        finish(
            shared,
            mode,
            peer,
            dest,
            conv,
            started,
            "client_gone",
            "",
            early_sent,
            0,
            mptcp,
        );
        return;
    }
    let relayed = tokio::select! {
        r = relay::relay(&app, &server, &shared.settings.relay) => r,
        _ = shared.hard_stop.cancelled() => {
            relay::reset_on_close(&app);
            relay::reset_on_close(&server);
            finish(shared, mode, peer, dest, conv, started, "shutdown", "", early_sent, leftover.len() as u64, mptcp);
            return;
        }
    };
    let up = relayed.a_to_b + early_sent;
    let down = relayed.b_to_a + leftover.len() as u64;
    let (label, detail) = match relayed.outcome {
        Outcome::Closed => ("closed", String::new()),
        Outcome::Idle => ("idle_timeout", String::new()),
        Outcome::Reset { side, error } => (
            match side {
                relay::Side::A => "reset_by_client",
                relay::Side::B => "reset_by_server",
            },
            error.to_string(),
        ),
    };
    finish(
        shared, mode, peer, dest, conv, started, label, &detail, up, down, mptcp,
    );
}

#[allow(clippy::too_many_arguments)]
fn finish(
    shared: &Shared,
    mode: Mode,
    peer: SocketAddr,
    dest: SocketAddr,
    conv: Option<SocketAddr>,
    started: Instant,
    outcome: &'static str,
    detail: &str,
    up: u64,
    down: u64,
    mptcp: bool,
) {
    shared.stats.active.dec();
    shared.stats.closed(mode.label(), outcome);
    shared
        .stats
        .bytes
        .get_or_create(&Direction { direction: "up" })
        .inc_by(up);
    shared
        .stats
        .bytes
        .get_or_create(&Direction { direction: "down" })
        .inc_by(down);
    let converter = conv
        .map(|c| c.to_string())
        .unwrap_or_else(|| "direct".into());
    tracing::info!(
        mode = mode.label(),
        client = %peer,
        dest = %dest,
        converter,
        up,
        down,
        duration_ms = started.elapsed().as_millis() as u64,
        mptcp,
        outcome,
        detail,
        "connection closed"
    );
}
