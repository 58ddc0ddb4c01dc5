//! One captured connection: find where it was going (the transparent socket's local address,
//! `SO_ORIGINAL_DST`, or the SOCKS5 request), open a converted connection over MPTCP carrying
//! whatever the application already sent, relay, log one line at close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_proto::socks5::{self, ReplyCode};
use braid_sys::SocketSpec;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::config::Settings;
use super::converters::{ConvertFailure, Converters};
use super::socks;
use super::stats::{Direction, Stats};
use crate::client::ClientOptions;
use crate::joins::SubflowPeak;
use crate::relay;
use crate::sendbuf;

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    pub converters: std::sync::Arc<Converters>,
    pub client: ClientOptions,
    /// The uplinks as braid manages them (`None`: left to the system).
    pub uplinks: Option<tokio::sync::watch::Receiver<Vec<super::uplinks::Uplink>>>,
    pub stats: Stats,
    pub hard_stop: CancellationToken,
    /// The connections being relayed, for `braid status`.
    pub registry: Arc<crate::status::Registry>,
}

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

/// Opens the way to `dest`: through a converter with `early` in the SYN (and, with `app`, what
/// it sends while the reply is awaited, appended to `early`), or direct (then `early` is
/// written here) for a bypassed destination — rules are removed and reinstalled as a whole, and
/// a race or a SOCKS request can still bring one.
async fn open(
    dest: SocketAddr,
    early: &mut Vec<u8>,
    app: Option<&TcpStream>,
    shared: &Shared,
) -> Result<Upstream, OpenError> {
    if !shared.settings.is_bypassed(dest.ip()) {
        let opts = match &shared.uplinks {
            // Start from the best working uplink, and from the next when its SYN goes
            // unanswered.
            Some(ups) => std::borrow::Cow::Owned(ClientOptions {
                sources: super::uplinks::sources(&ups.borrow()),
                ..shared.client.clone()
            }),
            None => std::borrow::Cow::Borrowed(&shared.client),
        };
        let (c, conv) = shared
            .converters
            .connect(dest, early, app, &opts, &shared.stats)
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
        relay::write_all(&stream, early.as_slice())
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
    // The application's first bytes go with the request, in the SYN, and what it sends next
    // follows as soon as the handshake is complete. The buffer is gone before the relay
    // starts: idle connections should not keep 16 KiB each.
    let (sent, opened) = {
        let mut early = vec![0u8; EARLY_MAX];
        let n = first_bytes(&app, &mut early, shared.settings.early_data_wait).await;
        early.truncate(n);
        let opened = open(dest, &mut early, Some(&app), &shared).await;
        (early.len() as u64, opened)
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

/// Reads what the application sends first, waiting up to `wait` for it. A client that speaks
/// first (HTTP, a TLS ClientHello) sends it right behind its handshake, which the accept
/// returns on, so it is often not there yet; in the SYN it reaches the converter with the
/// request instead of after the converter's reply, and the answer comes one round trip over
/// the uplinks sooner (measured in
/// `a_client_that_speaks_first_gets_its_answer_one_round_trip_sooner`). A server that speaks
/// first (SMTP, SSH's banner) costs the wait once per connection.
async fn first_bytes(app: &TcpStream, buf: &mut [u8], wait: Duration) -> usize {
    match app.try_read(buf) {
        Ok(n) => return n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => return 0,
    }
    if wait.is_zero() {
        return 0;
    }
    match tokio::time::timeout(wait, app.readable()).await {
        Ok(Ok(())) => app.try_read(buf).unwrap_or_default(),
        _ => 0,
    }
}

/// A SOCKS5 client.
pub async fn serve_socks(mut app: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut rec = Record::new(&shared, Mode::Socks5, peer, unknown);
    let handshake = tokio::time::timeout(
        socks::HANDSHAKE_TIMEOUT,
        socks::handshake(&mut app, &shared),
    )
    .await;
    rec.dest = match handshake {
        Ok(Ok(dest)) => dest,
        Ok(Err(why)) => return rec.close(&shared, "socks_refused", &why),
        Err(_) => return rec.close(&shared, "socks_timeout", ""),
    };
    let up = match open(rec.dest, &mut Vec::new(), None, &shared).await {
        Ok(up) => up,
        Err(e) => {
            let code = match &e {
                OpenError::Convert(c) => socks::reply_code(c),
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

/// A direct TCP connection (bypassed destination), marked so the output capture ignores it,
/// with the configured congestion control like every other socket of the gateway.
async fn direct(dest: SocketAddr, shared: &Shared) -> Result<TcpStream, String> {
    let socket = SocketSpec {
        mark: shared.client.mark,
        congestion_control: shared.client.congestion_control.clone(),
        ..SocketSpec::default()
    }
    .open_for(dest)
    .map_err(|e| format!("direct socket to {dest}: {e}"))?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
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
    // Shared with the status registry while relaying (it reads the subflows).
    let server = Arc::new(up.stream);
    if !up.leftover.is_empty() && relay::write_all(&app, &up.leftover).await.is_err() {
        relay::reset_on_close(&server);
        return rec.close(shared, "client_gone", "");
    }
    rec.down = up.leftover.len() as u64;
    let peak = SubflowPeak::new(up.mptcp);
    let moved = Arc::new(relay::Moved::default());
    let _registered = shared.registry.register(
        rec.mode.label(),
        rec.peer,
        rec.dest,
        rec.converter,
        moved.clone(),
        up.mptcp.then(|| server.clone()),
    );
    let send_buffer = sendbuf::Watch::start(&server, shared.settings.mptcp_send_buffer, up.mptcp);
    let cfg = relay::RelayConfig {
        nudge: send_buffer.bounded().then_some(relay::Side::B),
        ..shared.settings.relay.clone()
    };
    let relayed = tokio::select! {
        r = relay::relay(&app, &server, &cfg, &moved) => r,
        never = peak.watch(&server) => never,
        never = send_buffer.run(&server, &moved) => never,
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
