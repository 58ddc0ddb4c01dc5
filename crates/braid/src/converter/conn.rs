//! One client connection, from accept to close: admission, the Convert handshake, the upstream
//! connect, the reply, the relay, and the log line at the end.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_sys::sockopt::{is_mptcp, mptcp_info, unsent_bytes};
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::config::Settings;
use super::cookie::CookieJar;
use super::limits::{Limits, PendingSlot};
use super::policy::{DestVerdict, Policy};
use super::stats::{Direction, Reason, Stats};
use super::upstream::{self, UpstreamOptions};
use super::wire::{self, Request};
use crate::joins::SubflowPeak;
use crate::relay::{self, reset_on_close};

/// Everything a connection task needs, shared by all of them.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    pub policy: Policy,
    pub cookies: Option<CookieJar>,
    pub limits: Arc<Limits>,
    pub stats: Stats,
    /// Cancelled when the drain deadline passes: relays still running are reset.
    pub hard_stop: CancellationToken,
}

/// Largest read while waiting for the request. The request is at most 1020 bytes; whatever
/// the client sent after it in the same read is application data, kept and forwarded.
const HANDSHAKE_READ: usize = 16 * 1024;
/// Longest wait for the client's handshake ACK before writing a reply anyway.
const HANDSHAKE_ACK: Duration = Duration::from_secs(3);
/// How long to wait for an Error reply to leave before resetting (convert-spec §5.4).
const ERROR_FLUSH: Duration = Duration::from_secs(2);

pub async fn serve(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    let client_ip = peer.ip().to_canonical();
    let peer = SocketAddr::new(client_ip, peer.port());
    // TCP_IS_MPTCP is 0 for a client that spoke plain TCP or fell back during the handshake.
    let mptcp = is_mptcp(&client).unwrap_or(false);
    if !mptcp {
        shared.stats.tcp_fallback.inc();
    }

    if !shared.policy.client_allowed(client_ip) {
        tracing::info!(client = %peer, outcome = "client_not_allowed", "refused");
        send_error_and_reset(&client, &wire::error_reply(32, &[0]), &shared, 32).await;
        shared.stats.outcome("client_not_allowed");
        return;
    }
    let (_conn_slot, pending) = match shared.limits.admit(client_ip) {
        Ok(slots) => slots,
        Err(hit) => {
            tracing::warn!(client = %peer, limit = hit.as_str(), "connection limit reached");
            shared
                .stats
                .limited
                .get_or_create(&Reason {
                    reason: hit.as_str(),
                })
                .inc();
            let reply = wire::error_reply(64, &[shared.settings.backoff_secs]);
            send_error_and_reset(&client, &reply, &shared, 64).await;
            shared.stats.outcome("limited");
            return;
        }
    };
    shared.stats.active.inc();
    let _active = scopeguard(|| {
        shared.stats.active.dec();
    });

    let peak_subflows = SubflowPeak::new(mptcp);
    let outcome = converse(&client, peer, pending, &shared, &peak_subflows).await;
    let subflows = u64::from(peak_subflows.get(&client));
    shared.stats.subflows.inc_by(subflows);
    shared.stats.outcome(outcome.label);
    tracing::info!(
        client = %peer,
        dest = %outcome.dest.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
        up = outcome.up,
        down = outcome.down,
        duration_ms = started.elapsed().as_millis() as u64,
        subflows,
        tcp_fallback = !mptcp,
        outcome = outcome.label,
        detail = %outcome.detail,
        "connection closed"
    );
}

/// What the log line and the metrics say about a connection.
struct Closed {
    dest: Option<SocketAddr>,
    up: u64,
    down: u64,
    label: &'static str,
    detail: String,
}

impl Closed {
    fn early(label: &'static str, detail: impl Into<String>) -> Closed {
        Closed {
            dest: None,
            up: 0,
            down: 0,
            label,
            detail: detail.into(),
        }
    }
}

async fn converse(
    client: &TcpStream,
    peer: SocketAddr,
    pending: PendingSlot,
    shared: &Shared,
    peak_subflows: &SubflowPeak,
) -> Closed {
    let s = &shared.settings;
    shared.stats.pending_handshakes.inc();
    let read = tokio::time::timeout(s.handshake_timeout, read_request(client)).await;
    shared.stats.pending_handshakes.dec();
    let (request, early_data) = match read {
        Err(_) => {
            shared
                .stats
                .handshake_failures
                .get_or_create(&Reason { reason: "timeout" })
                .inc();
            reset_on_close(client);
            return Closed::early("handshake_timeout", "no complete Convert request in time");
        }
        Ok(Err(ReadError::Closed)) => {
            shared
                .stats
                .handshake_failures
                .get_or_create(&Reason { reason: "eof" })
                .inc();
            return Closed::early("handshake_eof", "client closed before a complete request");
        }
        Ok(Err(ReadError::Io(e))) => {
            shared
                .stats
                .handshake_failures
                .get_or_create(&Reason { reason: "io" })
                .inc();
            return Closed::early("handshake_error", e.to_string());
        }
        Ok(Err(ReadError::Invalid { code, value, why })) => {
            send_error_and_reset(client, &wire::error_reply(code, &value), shared, code).await;
            return Closed::early("malformed", why);
        }
        Ok(Ok(parsed)) => parsed,
    };
    drop(pending);

    let Request {
        dest,
        info,
        cookie,
        unsupported_options,
    } = request;
    let Some(dest) = dest else {
        if info {
            // Info: answer with the extensions converted (MPTCP, kind 30), then close.
            let _ = relay::write_all(client, &wire::supported_extensions_reply()).await;
            let _ = SockRef::from(client).shutdown(std::net::Shutdown::Write);
            return Closed::early("info", "answered Info");
        }
        send_error_and_reset(client, &wire::error_reply(1, &[0]), shared, 1).await;
        return Closed::early("malformed", "request without Connect");
    };
    if !unsupported_options.is_empty() {
        send_error_and_reset(
            client,
            &wire::error_reply(33, &unsupported_options),
            shared,
            33,
        )
        .await;
        return Closed {
            dest: Some(dest),
            ..Closed::early("unsupported_option", format!("{unsupported_options:?}"))
        };
    }
    if let Some(jar) = &shared.cookies {
        match cookie {
            None => {
                let mut value = vec![0u8];
                value.extend_from_slice(&jar.issue(peer.ip()));
                send_error_and_reset(client, &wire::error_reply(3, &value), shared, 3).await;
                return Closed {
                    dest: Some(dest),
                    ..Closed::early("missing_cookie", "cookie issued")
                };
            }
            Some(c) if !jar.verify(peer.ip(), &c) => {
                send_error_and_reset(client, &wire::error_reply(32, &[0]), shared, 32).await;
                return Closed {
                    dest: Some(dest),
                    ..Closed::early("bad_cookie", "invalid cookie")
                };
            }
            Some(_) => {}
        }
    }
    match shared.policy.check_destination(dest) {
        DestVerdict::Allowed => {}
        DestVerdict::Forbidden(why) => {
            send_error_and_reset(client, &wire::error_reply(1, &[0]), shared, 1).await;
            return Closed {
                dest: Some(dest),
                ..Closed::early("forbidden_destination", why)
            };
        }
        DestVerdict::NotAuthorized(why) => {
            send_error_and_reset(client, &wire::error_reply(32, &[0]), shared, 32).await;
            return Closed {
                dest: Some(dest),
                ..Closed::early("not_authorized", why)
            };
        }
    }

    let opts = UpstreamOptions {
        connect_timeout: s.connect_timeout,
        congestion_control: s.congestion_control.clone(),
        fastopen: s.upstream_fastopen,
    };
    let (server, sent_in_syn) = match upstream::connect(dest, &opts, &early_data).await {
        Ok(connected) => connected,
        Err(e) => {
            let (code, value) = e.convert_error();
            let value = if code == 64 || code == 65 {
                s.backoff_secs
            } else {
                value
            };
            send_error_and_reset(client, &wire::error_reply(code, &[value]), shared, code).await;
            return Closed {
                dest: Some(dest),
                ..Closed::early(e.label(), e.to_string())
            };
        }
    };
    if let Some(cc) = &s.congestion_control {
        let _ = SockRef::from(client).set_tcp_congestion(cc.as_bytes());
    }

    // Success: the bare header goes out the moment the server accepted.
    if let Err(e) = write_reply(client, &wire::BARE_REPLY).await {
        relay::reset_on_close(&server);
        return Closed {
            dest: Some(dest),
            ..Closed::early("client_gone", e.to_string())
        };
    }
    if early_data.len() > sent_in_syn {
        if let Err(e) = relay::write_all(&server, &early_data[sent_in_syn..]).await {
            reset_on_close(client);
            return Closed {
                dest: Some(dest),
                ..Closed::early("server_gone", e.to_string())
            };
        }
    }
    let early = early_data.len() as u64;

    let relayed = tokio::select! {
        r = relay::relay(client, &server, &s.relay) => r,
        never = peak_subflows.watch(client) => never,
        _ = shared.hard_stop.cancelled() => {
            reset_on_close(client);
            reset_on_close(&server);
            return Closed { dest: Some(dest), up: early, ..Closed::early("shutdown", "drain deadline") };
        }
    };
    let up = relayed.a_to_b + early;
    let down = relayed.b_to_a;
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
    let (label, detail) = relayed.outcome.describe();
    Closed {
        dest: Some(dest),
        up,
        down,
        label,
        detail,
    }
}

enum ReadError {
    Closed,
    Io(io::Error),
    Invalid {
        code: u8,
        value: Vec<u8>,
        why: String,
    },
}

/// Reads until a whole Convert request is in; returns it with the bytes that followed it.
async fn read_request(client: &TcpStream) -> Result<(Request, Vec<u8>), ReadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    loop {
        client.readable().await.map_err(ReadError::Io)?;
        let old = buf.len();
        buf.resize(old + HANDSHAKE_READ, 0);
        match client.try_read(&mut buf[old..]) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => buf.truncate(old + n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buf.truncate(old);
                continue;
            }
            Err(e) => return Err(ReadError::Io(e)),
        }
        match wire::decode_request(&buf) {
            wire::Decoded::Incomplete => {
                // A request can never be larger than this; the decoder says Invalid first,
                // but never keep reading on a client's word alone.
                if buf.len() > 64 * 1024 {
                    return Err(ReadError::Invalid {
                        code: 1,
                        value: vec![0],
                        why: "request too long".into(),
                    });
                }
            }
            wire::Decoded::Invalid { code, value, why } => {
                return Err(ReadError::Invalid { code, value, why });
            }
            wire::Decoded::Complete { request, consumed } => {
                let rest = buf.split_off(consumed);
                return Ok((request, rest));
            }
        }
    }
}

/// Writes the Convert reply so that it leaves now.
///
/// With TCP Fast Open the converter holds the client's socket from its SYN on and often has
/// the reply ready before the client's handshake ACK arrives (always, when the client's RTT
/// exceeds the upstream connect). Bytes an MPTCP socket queues before the handshake completes
/// are not sent when it does: they wait until the client sends again, and a client waiting for
/// the reply (SOCKS-style) hangs (KERNEL.md, "Reply stuck"; setting TCP_NODELAY after the write
/// pushes only if the handshake is already complete, so it does not help here). So: wait until
/// MPTCP_INFO shows the peer's key — the handshake is complete — then write. A prompt ACK
/// costs one getsockopt; a late one costs the short polls below, bounded by `HANDSHAKE_ACK`.
async fn write_reply(client: &TcpStream, reply: &[u8]) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + HANDSHAKE_ACK;
    let mut pause = Duration::from_micros(500);
    loop {
        match mptcp_info(client) {
            Ok(info) if !info.remote_key_received() && !info.fell_back() => {}
            // Complete, fallen back to TCP, or not MPTCP at all: nothing to wait for.
            _ => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    relay::write_all(client, reply).await?;
    client.set_nodelay(true)
}

/// Sends a Convert error reply, waits (bounded) until it has left, then resets: a reset
/// discards unsent bytes, and the client must see the Error, not a bare RST.
async fn send_error_and_reset(client: &TcpStream, reply: &[u8], shared: &Shared, code: u8) {
    shared.stats.error_sent(code);
    let _ = tokio::time::timeout(ERROR_FLUSH, async {
        if write_reply(client, reply).await.is_err() {
            return;
        }
        while unsent_bytes(client).map(|n| n > 0).unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    reset_on_close(client);
}

/// Runs a closure when dropped (decrementing a gauge on every exit path).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    Guard(Some(f))
}
