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
use crate::joins::SubflowPeak;
use crate::relay;

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

/// The account of one captured connection, logged and counted once when it ends.
struct Record {
    mode: Mode,
    peer: SocketAddr,
    dest: SocketAddr,
    converter: Option<SocketAddr>,
    mptcp: bool,
    /// Peak subflow count of the converted connection (0: direct or not connected).
    subflows: u8,
    started: Instant,
    up: u64,
    down: u64,
}

impl Record {
    fn new(shared: &Shared, mode: Mode, peer: SocketAddr, dest: SocketAddr) -> Record {
        shared.stats.active.inc();
        Record {
            mode,
            peer,
            dest,
            converter: None,
            mptcp: false,
            subflows: 0,
            started: Instant::now(),
            up: 0,
            down: 0,
        }
    }

    fn close(self, shared: &Shared, outcome: &'static str, detail: &str) {
        let stats = &shared.stats;
        stats.active.dec();
        stats.closed(self.mode.label(), outcome);
        for (direction, n) in [("up", self.up), ("down", self.down)] {
            stats
                .bytes
                .get_or_create(&Direction { direction })
                .inc_by(n);
        }
        stats.subflows.inc_by(u64::from(self.subflows));
        let converter = self
            .converter
            .map_or_else(|| "direct".to_string(), |c| c.to_string());
        tracing::info!(
            mode = self.mode.label(),
            client = %self.peer,
            dest = %self.dest,
            converter,
            up = self.up,
            down = self.down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            mptcp = self.mptcp,
            subflows = self.subflows,
            outcome,
            detail,
            "connection closed"
        );
    }
}

/// The server side of a captured connection: converted, or direct for a bypassed destination.
struct Upstream {
    stream: TcpStream,
    /// Application bytes that came with the converter's reply.
    leftover: Vec<u8>,
    converter: Option<SocketAddr>,
    mptcp: bool,
}

#[derive(Debug)]
enum OpenError {
    Direct(String),
    Convert(ConvertFailure),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Direct(why) => f.write_str(why),
            OpenError::Convert(e) => e.fmt(f),
        }
    }
}

/// Opens the way to `dest`: through a converter with `early` in the SYN, or direct (then
/// `early` is written here) for a bypassed destination — rules are removed and reinstalled as a
/// whole, and a race or a SOCKS request can still bring one.
async fn open(dest: SocketAddr, early: &[u8], shared: &Shared) -> Result<Upstream, OpenError> {
    if !shared.settings.is_bypassed(dest.ip()) {
        let (c, conv) = shared
            .converters
            .connect(dest, early, &shared.client, &shared.stats)
            .await
            .map_err(OpenError::Convert)?;
        return Ok(Upstream {
            stream: c.stream,
            leftover: c.leftover,
            converter: Some(conv),
            mptcp: c.mptcp,
        });
    }
    let stream = direct(dest, shared).await.map_err(OpenError::Direct)?;
    if !early.is_empty() {
        relay::write_all(&stream, early)
            .await
            .map_err(|e| OpenError::Direct(format!("direct write to {dest}: {e}")))?;
    }
    Ok(Upstream {
        stream,
        leftover: Vec::new(),
        converter: None,
        mptcp: false,
    })
}

/// A transparently captured connection to `dest`.
pub async fn serve_transparent(
    app: TcpStream,
    peer: SocketAddr,
    dest: SocketAddr,
    mode: Mode,
    shared: Arc<Shared>,
) {
    let mut rec = Record::new(&shared, mode, peer, dest);
    // A connection to our own capture port (not through us) would loop forever.
    if dest.port() == shared.settings.transparent_port
        && braid_sys::route::is_local_address(dest.ip())
    {
        relay::reset_on_close(&app);
        rec.close(&shared, "loop_refused", "");
        return;
    }
    // Whatever the application sent already goes with the request, in the SYN. The buffer is
    // gone before the relay starts: idle connections should not keep 16 KiB each.
    let (sent, opened) = {
        let mut early = vec![0u8; EARLY_MAX];
        let n = app.try_read(&mut early).unwrap_or_default();
        (n as u64, open(dest, &early[..n], &shared).await)
    };
    match opened {
        Ok(up) => {
            rec.up = sent;
            relay_and_close(&shared, rec, app, up).await;
        }
        Err(e) => {
            // The application sees a reset: the closest a transparent proxy can come to
            // "connection refused" once the handshake was accepted.
            relay::reset_on_close(&app);
            rec.close(&shared, "convert_failed", &e.to_string());
        }
    }
}

/// A SOCKS5 client.
pub async fn serve_socks(mut app: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut rec = Record::new(&shared, Mode::Socks5, peer, unknown);
    let handshake =
        tokio::time::timeout(SOCKS_HANDSHAKE_TIMEOUT, socks_handshake(&mut app, &shared)).await;
    rec.dest = match handshake {
        Ok(Ok(dest)) => dest,
        Ok(Err(why)) => return rec.close(&shared, "socks_refused", &why),
        Err(_) => return rec.close(&shared, "socks_timeout", ""),
    };
    let up = match open(rec.dest, &[], &shared).await {
        Ok(up) => up,
        Err(e) => {
            let code = match &e {
                OpenError::Convert(c) => socks_code(c),
                OpenError::Direct(_) => ReplyCode::GeneralFailure,
            };
            let _ = app.write_all(&socks5::encode_reply(code, None)).await;
            let _ = app.shutdown().await;
            return rec.close(&shared, "convert_failed", &e.to_string());
        }
    };
    let bound = up.stream.local_addr().ok();
    if app
        .write_all(&socks5::encode_reply(ReplyCode::Succeeded, bound))
        .await
        .is_err()
    {
        relay::reset_on_close(&up.stream);
        rec.converter = up.converter;
        return rec.close(&shared, "client_gone", "");
    }
    relay_and_close(&shared, rec, app, up).await;
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
async fn direct(dest: SocketAddr, shared: &Shared) -> Result<TcpStream, String> {
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
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("direct connect to {dest}: {e}")),
        Err(_) => Err(format!("direct connect to {dest}: timed out")),
    }
}

/// Relays until the connection ends and closes its record. `rec.up` holds the early bytes
/// already sent.
async fn relay_and_close(shared: &Shared, mut rec: Record, app: TcpStream, up: Upstream) {
    rec.converter = up.converter;
    rec.mptcp = up.mptcp;
    if up.converter.is_some() && !up.mptcp {
        shared.stats.fallback.inc();
        tracing::warn!(
            peer = %rec.peer,
            dest = %rec.dest,
            converter = ?up.converter,
            "connection to the converter is plain TCP: MPTCP was stripped on the path or refused"
        );
    }
    let server = up.stream;
    if !up.leftover.is_empty() && relay::write_all(&app, &up.leftover).await.is_err() {
        relay::reset_on_close(&server);
        return rec.close(shared, "client_gone", "");
    }
    rec.down = up.leftover.len() as u64;
    let peak = SubflowPeak::new(up.mptcp);
    let relayed = tokio::select! {
        r = relay::relay(&app, &server, &shared.settings.relay) => r,
        never = peak.watch(&server) => never,
        _ = shared.hard_stop.cancelled() => {
            relay::reset_on_close(&app);
            relay::reset_on_close(&server);
            return rec.close(shared, "shutdown", "");
        }
    };
    rec.subflows = peak.get(&server);
    rec.up += relayed.a_to_b;
    rec.down += relayed.b_to_a;
    let (label, detail) = relayed.outcome.describe();
    rec.close(shared, label, &detail);
}
