//! The gateway's Prometheus metrics. Labels are small closed sets (mode, outcome, direction),
//! never addresses.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Captured {
    /// `tproxy`, `redirect` or `socks5`.
    pub mode: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Converter {
    pub converter: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UplinkLabel {
    pub uplink: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UplinkDirection {
    pub uplink: String,
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UplinkHealth {
    pub uplink: String,
    pub health: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UplinkProbe {
    pub uplink: String,
    pub result: &'static str,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// 1 for an uplink's current health (`up`, `degraded`, `dead`, `down`), 0 for the others.
    pub uplink_health: Family<UplinkHealth, Gauge>,
    /// Changes of health, by the health changed to.
    pub uplink_health_changes: Family<UplinkHealth, Counter>,
    /// Probe handshakes, `answered` or `unanswered`.
    pub uplink_probes: Family<UplinkProbe, Counter>,
    /// 1 while an uplink's link is up with an address, 0 otherwise (at most 8 uplinks: a
    /// bounded label).
    pub uplink_up: Family<UplinkLabel, Gauge>,
    /// Bytes through an uplink's interface (all of its traffic), `rx` and `tx`.
    pub uplink_bytes: Family<UplinkDirection, Counter>,
    /// Subflows of the gateway's connections on an uplink now.
    pub uplink_subflows: Family<UplinkLabel, Gauge>,
    /// Captured connections at close, by capture mode and outcome.
    pub connections: Family<Captured, Counter>,
    /// Bytes relayed: `up` is application → server, `down` server → application.
    pub bytes: Family<Direction, Counter>,
    /// Connections to a converter that ended up plain TCP (MPTCP stripped on the path).
    pub fallback: Counter,
    /// Times a converter was skipped or failed over, by converter address (a short,
    /// operator-given list, so a bounded label).
    pub converter_failures: Family<Converter, Counter>,
    /// Sum over closed converted connections of their peak subflow count: divided by the
    /// converted connections, how many links a connection used on average.
    pub subflows: Counter,
    pub active: Gauge,
}

impl Stats {
    pub fn register(&self, reg: &mut Registry) {
        let r = reg.sub_registry_with_prefix("braid_gateway");
        r.register(
            "connections",
            "Captured connections at close, by mode and outcome",
            self.connections.clone(),
        );
        r.register("bytes", "Bytes relayed, by direction", self.bytes.clone());
        crate::sendbuf::register_nudges(r);
        crate::budget::Budget::global().register(r);
        r.register(
            "mptcp_fallback",
            "Connections to a converter that fell back to plain TCP",
            self.fallback.clone(),
        );
        r.register(
            "converter_failures",
            "Converter connection attempts that failed, by converter",
            self.converter_failures.clone(),
        );
        r.register(
            "subflows",
            "Peak subflows of closed MPTCP connections, summed",
            self.subflows.clone(),
        );
        r.register(
            "uplink_up",
            "1 while an uplink's link is up with an address",
            self.uplink_up.clone(),
        );
        r.register(
            "uplink_health",
            "1 for an uplink's current health (up, degraded, dead, down)",
            self.uplink_health.clone(),
        );
        r.register(
            "uplink_health_changes",
            "Changes of an uplink's health, by the new health",
            self.uplink_health_changes.clone(),
        );
        r.register(
            "uplink_probes",
            "Probe handshakes through an uplink to the converter, by result",
            self.uplink_probes.clone(),
        );
        r.register(
            "uplink_bytes",
            "Bytes through an uplink's interface, by direction (rx, tx)",
            self.uplink_bytes.clone(),
        );
        r.register(
            "uplink_subflows",
            "Subflows of the gateway's connections on an uplink",
            self.uplink_subflows.clone(),
        );
        r.register(
            "active_connections",
            "Captured connections open now",
            self.active.clone(),
        );
    }

    pub fn closed(&self, mode: &'static str, outcome: &'static str) {
        self.connections
            .get_or_create(&Captured { mode, outcome })
            .inc();
    }
}
