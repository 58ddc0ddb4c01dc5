//! The converter's Prometheus metrics. Labels are small closed sets (outcome, error code,
//! direction), never addresses, so the series count stays bounded however many clients come.

use braid_proto::convert::ErrorCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: u8,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Connections at close, by outcome.
    pub connections: Family<Outcome, Counter>,
    /// Convert Error TLVs sent, by code.
    pub errors: Family<Code, Counter>,
    /// Handshakes that did not produce a request, by reason (timeout, eof, ...).
    pub handshake_failures: Family<Reason, Counter>,
    /// Bytes relayed: `up` is client → server, `down` server → client.
    pub bytes: Family<Direction, Counter>,
    /// Clients whose connection is plain TCP (no MPTCP, or fell back).
    pub tcp_fallback: Counter,
    /// Subflows of closed MPTCP connections, summed (divide by connections for a mean).
    pub subflows: Counter,
    /// Connections refused by a limit, by limit.
    pub limited: Family<Reason, Counter>,
    pub active: Gauge,
    pub pending_handshakes: Gauge,
}

impl Stats {
    pub fn register(&self, reg: &mut Registry) {
        let r = reg.sub_registry_with_prefix("braid_converter");
        r.register(
            "connections",
            "Client connections at close, by outcome",
            self.connections.clone(),
        );
        r.register(
            "errors",
            "Convert Error TLVs sent, by code",
            self.errors.clone(),
        );
        r.register(
            "handshake_failures",
            "Client handshakes that never delivered a Convert request, or never completed after it, by reason",
            self.handshake_failures.clone(),
        );
        r.register("bytes", "Bytes relayed, by direction", self.bytes.clone());
        crate::sendbuf::register_nudges(r);
        crate::budget::Budget::global().register(r);
        r.register(
            "tcp_fallback",
            "Client connections that are plain TCP instead of MPTCP",
            self.tcp_fallback.clone(),
        );
        r.register(
            "subflows",
            "Subflows of closed MPTCP connections, summed",
            self.subflows.clone(),
        );
        r.register(
            "limited",
            "Connections refused with Error 64, by limit",
            self.limited.clone(),
        );
        r.register(
            "active_connections",
            "Connections open now",
            self.active.clone(),
        );
        r.register(
            "pending_handshakes",
            "Connections whose request is incomplete or whose Error or Info reply is being \
             delivered",
            self.pending_handshakes.clone(),
        );
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.connections.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn error_sent(&self, code: ErrorCode) {
        self.errors.get_or_create(&Code { code: code.into() }).inc();
    }

    /// A connection refused because limit `reason` is full.
    pub fn limit_hit(&self, reason: &'static str) {
        self.limited.get_or_create(&Reason { reason }).inc();
    }

    /// A handshake that never delivered a request (`timeout`, `eof`, `io`).
    pub fn handshake_failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&Reason { reason })
            .inc();
    }
}
