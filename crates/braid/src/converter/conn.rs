//! One client connection, from accept to close, as I/O around the decisions of
//! [`super::handshake`]: admission, reading the request, the upstream connect, the reply or
//! the refusal, the relay, and the log line at the end.
//!
//! A refusal is delivered so that every client shape reads it (connect then write then read,
//! read at once, a large request, a half-close): the Error goes out once the MPTCP handshake is
//! complete, followed by a FIN, and the converter keeps reading (and discarding) what the
//! client sends until the client closes; only then, or at a short deadline, is the connection
//! reset. Resetting right after the Error, as RFC 8803 describes it, loses the Error for a
//! client whose first write comes after the reset arrived: its write fails with "connection
//! reset" and it never reads. While it lingers, a refusal holds a pending-handshake slot, so a
//! flood of refused connections stays bounded; one that finds no slot free gets the Error
//! only if its handshake is already complete, and is reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid_sys::sockopt::{is_mptcp, mptcp_info, set_send_buffer, unsent_bytes};
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::config::Settings;
use super::cookie::CookieJar;
use super::handshake::{self, Refusal, Verdict};
use super::limits::{ConnSlot, LimitHit, Limits, PendingSlot};
use super::policy::Policy;
use super::stats::{Direction, Stats};
use super::upstream::{self, UpstreamOptions};
use super::wire::{self, Request};
use crate::framed::{ReadError, read_message};
use crate::joins::SubflowPeak;
use crate::relay::{self, reset_on_close};
use crate::sendbuf;

/// Everything a connection task needs, shared by all of them.
#[derive(Debug)]
pub struct Shared {
    /// As started; the policy and the cookies below may have been reloaded since (SIGHUP).
    pub settings: Settings,
    pub policy: std::sync::RwLock<Arc<Policy>>,
    pub cookies: std::sync::RwLock<Option<Arc<CookieJar>>>,
    pub limits: Arc<Limits>,
    pub stats: Stats,
    /// Cancelled when the drain deadline passes: relays still running are reset.
    pub hard_stop: CancellationToken,
    /// The connections being relayed, for `braid status`.
    pub registry: Arc<crate::status::Registry>,
}

impl Shared {
    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The cookie jar in force now, if cookies are required.
    pub fn cookies(&self) -> Option<Arc<CookieJar>> {
        self.cookies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Longest wait for the client's handshake ACK before writing a refusal anyway (a refusal
/// delivers nothing to a server; a success waits up to `handshake_timeout`, then resets).
const HANDSHAKE_ACK: Duration = Duration::from_secs(3);
/// How long a refused client (or one answered Info) may stay silent before the converter lets
/// go, and how long it may linger at most while it still sends (a large request on a slow link
/// takes its time to arrive, and its sender reads only once it is written).
const FINAL_QUIET: Duration = Duration::from_secs(3);
const FINAL_LINGER: Duration = Duration::from_secs(10);
/// Bytes a refused client may still send (and have discarded) while it gets to reading the
/// Error: enough for any request and a modest body.
const FINAL_DRAIN: usize = 1 << 20;
/// While looking for the request: most bytes buffered without a complete one. The request is
/// at most 1020 bytes and the codec says how long it is from its first bytes, so this is only a
/// backstop.
const REQUEST_CAP: usize = 4 * 1024;

/// The outcome of a connection that ended before its first byte: counted, logged at debug
/// level only (gateways probe once a second per uplink when there is no traffic to judge by).
const EMPTY: &str = "empty";

pub async fn serve(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    // Shared with the status registry while relaying (it reads the subflows).
    let client = Arc::new(client);
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    // TCP_IS_MPTCP is 0 for a client that spoke plain TCP or fell back during the handshake.
    let mptcp = is_mptcp(&client).unwrap_or(false);
    if !mptcp {
        shared.stats.tcp_fallback.inc();
    }
    let closed = match shared.limits.admit(peer.ip()) {
        Ok((conn_slot, pending)) => {
            shared.stats.active.inc();
            let _active = scopeguard(|| {
                shared.stats.active.dec();
            });
            let peak_subflows = SubflowPeak::new(mptcp);
            let mut closed =
                converse(&client, peer, conn_slot, pending, &shared, &peak_subflows).await;
            closed.subflows = peak_subflows.get(&client);
            shared.stats.subflows.inc_by(u64::from(closed.subflows));
            closed
        }
        Err(hit) => {
            // The close line below says which limit (outcome `limited`); a flood would
            // double its log with a line of its own.
            shared.stats.limit_hit(hit.as_str());
            let refusal = Refusal::limited(hit, shared.settings.backoff_secs);
            refuse_if_room(&client, peer, &refusal, &shared, Some(hit)).await;
            Closed::refused(None, refusal)
        }
    };
    shared.stats.outcome(closed.label);
    if closed.label == EMPTY {
        tracing::debug!(client = %peer, detail = %closed.detail, "connection closed");
        return;
    }
    tracing::info!(
        client = %peer,
        dest = %closed.dest.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
        up = closed.up,
        down = closed.down,
        duration_ms = started.elapsed().as_millis() as u64,
        subflows = closed.subflows,
        tcp_fallback = !mptcp,
        outcome = closed.label,
        detail = %closed.detail,
        "connection closed"
    );
}

/// What the log line and the metrics say about a connection.
struct Closed {
    dest: Option<SocketAddr>,
    up: u64,
    down: u64,
    subflows: u8,
    label: &'static str,
    detail: String,
}

impl Closed {
    fn early(dest: Option<SocketAddr>, label: &'static str, detail: impl Into<String>) -> Closed {
        Closed {
            dest,
            up: 0,
            down: 0,
            subflows: 0,
            label,
            detail: detail.into(),
        }
    }

    fn refused(dest: Option<SocketAddr>, r: Refusal) -> Closed {
        Closed::early(dest, r.outcome, r.detail)
    }
}

/// Takes the connection's slot (total and per client) and gives it back as soon as the
/// connection is refused: delivering the Error holds only a pending slot (limits.rs), so a
/// client refused for, say, a missing cookie that reconnects at once with one is not turned
/// away by its own refusals, which linger until it closes (up to [`FINAL_QUIET`] if it does not).
async fn converse(
    client: &Arc<TcpStream>,
    peer: SocketAddr,
    conn_slot: ConnSlot,
    pending: PendingSlot,
    shared: &Shared,
    peak_subflows: &SubflowPeak,
) -> Closed {
    let s = &shared.settings;
    let stats = &shared.stats;
    // Both the request and the client's handshake must be in by then.
    let handshake_deadline = tokio::time::Instant::now() + s.handshake_timeout;
    if let Err(r) = handshake::admit_client(peer.ip(), &shared.policy()) {
        drop(conn_slot);
        refuse(client, &r, shared).await;
        return Closed::refused(None, r);
    }

    let mut buf = Vec::new();
    let read = tokio::time::timeout_at(
        handshake_deadline,
        read_message(client, &mut buf, REQUEST_CAP, wire::decode_request),
    )
    .await;
    let (request, early_data): (Request, Vec<u8>) = match read {
        Ok(Ok((request, consumed))) => (request, buf.split_off(consumed)),
        Err(_) => {
            stats.handshake_failure("timeout");
            reset_on_close(client);
            return Closed::early(
                None,
                "handshake_timeout",
                "no complete Convert request in time",
            );
        }
        // Closed or reset before a single byte: what a health check does (braid's gateways
        // probe each uplink with a bare handshake), not a failed client.
        Ok(Err(ReadError::Closed)) if buf.is_empty() => {
            return Closed::early(None, EMPTY, "closed before sending a byte (a probe)");
        }
        Ok(Err(ReadError::Io(e)))
            if buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset =>
        {
            return Closed::early(None, EMPTY, "reset before sending a byte (a probe)");
        }
        Ok(Err(ReadError::Closed)) => {
            stats.handshake_failure("eof");
            return Closed::early(
                None,
                "handshake_eof",
                "client closed before a complete request",
            );
        }
        Ok(Err(ReadError::Io(e))) => {
            stats.handshake_failure("io");
            return Closed::early(None, "handshake_error", e.to_string());
        }
        Ok(Err(ReadError::Invalid(r))) => {
            drop(conn_slot);
            refuse(client, &r, shared).await;
            return Closed::refused(None, r);
        }
        Ok(Err(ReadError::TooLong)) => {
            let r = Refusal::too_long();
            drop(conn_slot);
            refuse(client, &r, shared).await;
            return Closed::refused(None, r);
        }
    };
    drop(buf);

    let dest = match handshake::decide(
        &request,
        peer.ip(),
        &shared.policy(),
        shared.cookies().as_deref(),
    ) {
        Verdict::Connect(dest) => {
            // The request is in: the upstream connect is counted apart (see limits.rs).
            drop(pending);
            dest
        }
        Verdict::Info => {
            // The extensions converted (MPTCP, kind 30); then the connection ends.
            drop(conn_slot);
            if !finish(
                client,
                &wire::supported_extensions_reply(),
                &shared.hard_stop,
            )
            .await
            {
                reset_on_close(client);
            }
            return Closed::early(None, "info", "answered Info");
        }
        Verdict::Refuse(r) => {
            drop(conn_slot);
            refuse(client, &r, shared).await;
            return Closed::refused(request.dest, r);
        }
    };

    let opts = UpstreamOptions {
        connect_timeout: s.connect_timeout,
        congestion_control: s.congestion_control.clone(),
        fastopen: s.upstream_fastopen,
    };
    let connecting = match shared.limits.connecting_slot(peer.ip()) {
        Ok(slot) => slot,
        Err(hit) => {
            stats.limit_hit(hit.as_str());
            let r = Refusal::limited(hit, s.backoff_secs);
            drop(conn_slot);
            refuse_if_room(client, peer, &r, shared, None).await;
            return Closed::refused(Some(dest), r);
        }
    };
    let connected = upstream::connect(dest, &opts, &early_data).await;
    drop(connecting);
    let (server, sent_in_syn) = match connected {
        Ok(connected) => connected,
        Err(e) => {
            let r = Refusal::upstream(&e, s.backoff_secs);
            drop(conn_slot);
            refuse_if_room(client, peer, &r, shared, None).await;
            return Closed::refused(Some(dest), r);
        }
    };
    if let Some(cc) = &s.congestion_control {
        let _ = SockRef::from(client).set_tcp_congestion(cc.as_bytes());
    }
    // On request, a fixed send buffer (`sendbuf` says why; "auto" runs beside the relay). A
    // socket that fell back to TCP does not need it; a refusal would only cost speed.
    if let (Some(n), true) = (s.mptcp_send_buffer.fixed(), peak_subflows.mptcp()) {
        let _ = set_send_buffer(client.as_ref(), n);
    }

    // Success: the bare header goes out the moment the server accepted and the client's
    // handshake is complete, and the bytes that came with the request go to the server only
    // then. A gateway whose SYN arrived while the answer was lost (an uplink that sends and
    // does not receive) wins the connection from another uplink, with the same request; the
    // attempt left here never completes its handshake (the lost answers are not retried by
    // anything the gateway still holds), so it must deliver nothing, or the request reaches
    // the server twice (measured: a second copy after the former 3 s wait for the handshake).
    // A client still in its handshake at `handshake_timeout` is reset. Sending the request
    // before the reply would end a client-first exchange up to one converter-server round
    // trip sooner (43 instead of 54 ms, uplinks 20 ms and server 10 ms round trip), and a
    // lost answer would then deliver it twice.
    if !handshake_completes(client, handshake_deadline).await {
        stats.handshake_failure("incomplete");
        reset_on_close(&server);
        reset_on_close(client);
        return Closed::early(
            Some(dest),
            "handshake_incomplete",
            "the client's handshake never completed (our answers to its SYN lost?): \
             request not delivered",
        );
    }
    if let Err(e) = send_reply(client, &wire::BARE_REPLY).await {
        reset_on_close(&server);
        return Closed::early(Some(dest), "client_gone", e.to_string());
    }
    if early_data.len() > sent_in_syn {
        if let Err(e) = relay::write_all(&server, &early_data[sent_in_syn..]).await {
            reset_on_close(client);
            return Closed::early(Some(dest), "server_gone", e.to_string());
        }
    }
    let early = early_data.len() as u64;
    drop(early_data);

    let moved = Arc::new(relay::Moved::default());
    let _registered = shared.registry.register(
        "converted",
        peer,
        dest,
        None,
        moved.clone(),
        peak_subflows.mptcp().then(|| client.clone()),
    );
    let send_buffer = sendbuf::Watch::start(client, s.mptcp_send_buffer, peak_subflows.mptcp());
    let cfg = relay::RelayConfig {
        nudge: send_buffer.bounded().then_some(relay::Side::A),
        ..s.relay.clone()
    };
    let relayed = tokio::select! {
        r = relay::relay(client, &server, &cfg, &moved) => r,
        never = peak_subflows.watch(client) => never,
        never = send_buffer.run(client, &moved) => never,
        _ = shared.hard_stop.cancelled() => {
            reset_on_close(client);
            reset_on_close(&server);
            return Closed { up: early, ..Closed::early(Some(dest), "shutdown", "drain deadline") };
        }
    };
    let up = relayed.a_to_b + early;
    let down = relayed.b_to_a;
    stats
        .bytes
        .get_or_create(&Direction { direction: "up" })
        .inc_by(up);
    stats
        .bytes
        .get_or_create(&Direction { direction: "down" })
        .inc_by(down);
    let (label, detail) = relayed.outcome.describe();
    Closed {
        up,
        down,
        label,
        detail,
        ..Closed::early(Some(dest), "", "")
    }
}

/// Waits until the client's handshake is complete, so that bytes written now leave; false if
/// `deadline` passes first.
///
/// With TCP Fast Open the converter holds the client's socket from its SYN on and often has
/// the reply ready before the client's handshake ACK arrives (always, when the client's RTT
/// exceeds the upstream connect). Bytes an MPTCP socket queues before the handshake completes
/// are not sent when it does: they wait until the client sends again, and a client waiting for
/// the reply (SOCKS-style) hangs (setting TCP_NODELAY after the write pushes only if the
/// handshake is already complete, so it does not help here). So: wait until MPTCP_INFO shows
/// the peer's key — the handshake is complete — or the socket fell back to TCP or is not
/// MPTCP. A prompt ACK costs one getsockopt; a late one costs the short polls below.
async fn handshake_completes(client: &TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut pause = Duration::from_micros(500);
    loop {
        if handshake_complete(client) {
            return true;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Writes a reply and pushes it out (the handshake is complete, or as complete as it gets).
async fn send_reply(client: &TcpStream, reply: &[u8]) -> std::io::Result<()> {
    relay::write_all(client, reply).await?;
    client.set_nodelay(true)
}

/// Delivers a refusal holding a pending-handshake slot of the client's prefix, if one is free
/// (`hit` says the pending limits are already known to be full); otherwise the Error is
/// written only if the handshake is complete (bytes written earlier stay queued and a reset
/// would discard them anyway), and the connection is reset.
async fn refuse_if_room(
    client: &TcpStream,
    peer: SocketAddr,
    r: &Refusal,
    shared: &Shared,
    hit: Option<LimitHit>,
) {
    let pending_full = matches!(hit, Some(LimitHit::Pending | LimitHit::PendingPerPrefix));
    let slot = if pending_full {
        None
    } else {
        shared.limits.pending_slot(peer.ip()).ok()
    };
    match slot {
        Some(_slot) => refuse(client, r, shared).await,
        None => {
            shared.stats.error_sent(r.code);
            if handshake_complete(client) {
                let _ = client.try_write(&r.reply());
            }
            reset_on_close(client);
        }
    }
}

/// The client's MPTCP handshake is complete (or it is plain TCP): bytes written now leave.
fn handshake_complete(client: &TcpStream) -> bool {
    match mptcp_info(client) {
        Ok(info) => info.remote_key_received() || info.fell_back(),
        Err(_) => true,
    }
}

/// Delivers a refusal (see the module docs), then resets.
async fn refuse(client: &TcpStream, r: &Refusal, shared: &Shared) {
    shared.stats.error_sent(r.code);
    let _ = finish(client, &r.reply(), &shared.hard_stop).await;
    reset_on_close(client);
}

/// Sends a final reply and a FIN, then reads and discards what the client sends until it
/// closes; true once the client has closed and our reply and FIN are acknowledged, false
/// after [`FINAL_QUIET`] without a byte or [`FINAL_LINGER`] in all, on a reset, or when the
/// client sends more than [`FINAL_DRAIN`].
///
/// Waiting for the client's close (rather than for our bytes' ACK, as RFC 8803's "Error, then
/// RST" would) is what lets a client that writes before it reads still read the reply: its
/// writes land on an open socket instead of drawing a reset.
async fn finish(client: &TcpStream, reply: &[u8], hard_stop: &CancellationToken) -> bool {
    let delivered = async {
        // An Error reaches no server, so it is written even if the handshake never completes.
        handshake_completes(client, tokio::time::Instant::now() + HANDSHAKE_ACK).await;
        send_reply(client, reply).await.ok()?;
        SockRef::from(client)
            .shutdown(std::net::Shutdown::Write)
            .ok()?;
        let mut discarded = 0usize;
        loop {
            tokio::time::timeout(FINAL_QUIET, client.readable())
                .await
                .ok()?
                .ok()?;
            let mut chunk = [0u8; 4096];
            match client.try_read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    discarded += n;
                    if discarded > FINAL_DRAIN {
                        return None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return None,
            }
        }
        // The client closed. Our reply may still be unacknowledged (it may have sent its FIN
        // right after its request, before reading): a reset now would discard it. Our FIN
        // counts one in the send queue and is not waited for: once the reply is acknowledged
        // the client has it, and a reset after that costs it nothing.
        let acked = async {
            while unsent_bytes(client).map(|n| n > 1).unwrap_or(false) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::time::timeout(FINAL_QUIET, acked).await.ok()
    };
    tokio::select! {
        r = tokio::time::timeout(FINAL_LINGER, delivered) => matches!(r, Ok(Some(()))),
        // Shutting down: the drain deadline is not extended for a refusal.
        _ = hard_stop.cancelled() => false,
    }
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
