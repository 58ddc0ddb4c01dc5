//! The health of each uplink, and what follows from it, as decisions over observations with no
//! I/O: a [`Tracker`] per uplink turns what is seen (carrier and address, progress of the
//! gateway's own subflows on it, answers to probes) into `up`, `degraded`, `dead` or `down`;
//! [`roles`] turns the uplinks' health into what each does (carry traffic, carry it only as a
//! last resort, stand by, or stay out). `paths.rs` feeds them and programs the result.
//!
//! Why probes, and why these: a DSL or LTE link commonly stays up while passing nothing, and
//! nothing in the kernel says so (carrier, addresses and routes stay). The gateway's own
//! subflows show it only while they have data to send: a download's subflow at the gateway
//! only sends ACKs, so the silence of a blackhole looks like a converter that chose another
//! subflow. So, whenever an uplink shows no progress of its own (bytes acknowledged or received
//! on its subflows), the gateway asks: a TCP handshake to the converter's port from the
//! uplink's address (what real traffic looks like to every firewall on the way), several in
//! parallel per round so that a lossy link is not taken for a dead one (with 20 % loss each
//! way, a handshake fails 36 % of the time; four in a row 1.7 %, two such rounds 0.03 %). A
//! round with no answer is repeated at once; two in a row make the uplink dead, within
//! `interval + 2 × timeout` of the silence (3 s with the defaults). Progress that stops, and a
//! subflow whose retransmission timer fired, start a round at once.
//!
//! Why a hold-down: a link that fails, returns and fails again (a marginal LTE cell) costs every
//! connection a stall each time it fails. The first return is immediate (a link that flapped
//! once is back within the 2 s the uplinks promise); a failure within `flap_window` of the
//! previous return doubles the time it is held out, from `hold_base` up to `hold_max`.
//!
//! Loss makes an uplink degraded (at backup priority: the others carry first): the share of probe
//! handshakes unanswered over the last rounds, or of the subflows' segments retransmitted over
//! the last samples, above `degraded_loss`; it leaves degraded below half of that. A subflow's
//! retransmissions while its RTT shows a full queue ([`queue_built`]) are congestion, a busy
//! link doing its job, and do not count.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::uplinks::{Role, State, Uplink};

/// How uplinks are judged. The defaults are in [`HealthConfig::default`].
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Between probe rounds while an uplink carries subflows but shows no progress, while it
    /// is dead, or after a failed round.
    pub interval: Duration,
    /// Between probe rounds of an uplink that carries nothing.
    pub idle_interval: Duration,
    /// Between probe rounds of a backup uplink standing by (metered: every round costs bytes).
    pub standby_interval: Duration,
    /// How long a round waits for an answer.
    pub timeout: Duration,
    /// Handshakes per round, in parallel.
    pub attempts: u8,
    /// Rounds without an answer, in a row, that make an uplink dead.
    pub dead_after: u32,
    /// Answered rounds, in a row, that bring a dead uplink back.
    pub up_after: u32,
    /// The first hold-down of a flapping uplink; doubled with each further flap.
    pub hold_base: Duration,
    pub hold_max: Duration,
    /// A failure this soon after the previous return is a flap.
    pub flap_window: Duration,
    /// A backup uplink carries traffic until a primary has been healthy this long.
    pub backup_release: Duration,
    /// Share of lost handshakes or retransmitted segments that makes an uplink degraded.
    pub degraded_loss: f64,
    /// `net.mptcp.stale_loss_cnt` to set in the gateway's namespace (`None`: leave it).
    pub stale_loss_cnt: Option<u32>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(1),
            idle_interval: Duration::from_secs(10),
            standby_interval: Duration::from_secs(30),
            timeout: Duration::from_millis(800),
            attempts: 4,
            dead_after: 2,
            up_after: 2,
            hold_base: Duration::from_secs(4),
            hold_max: Duration::from_secs(120),
            flap_window: Duration::from_secs(60),
            backup_release: Duration::from_secs(10),
            degraded_loss: 0.10,
            stale_loss_cnt: Some(2),
        }
    }
}

/// An uplink's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Answers and makes progress.
    Up,
    /// Works, but loses much: used only when nothing better does.
    Degraded,
    /// Up, but passes nothing (probes unanswered), or held out after flapping.
    Dead,
    /// No carrier or no address.
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Degraded => "degraded",
            Health::Dead => "dead",
            Health::Down => "down",
        }
    }

    /// Whether an uplink in this health may carry traffic.
    pub fn usable(self) -> bool {
        matches!(self, Health::Up | Health::Degraded)
    }
}

/// The outcome of one probe round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub sent: u8,
    pub answered: u8,
    /// The fastest answer's handshake time.
    pub rtt: Option<Duration>,
}

/// What one sample of the gateway's subflows on an uplink showed, since the previous sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// Subflows on the uplink.
    pub subflows: u32,
    /// Bytes acknowledged by the peer or received grew on one of them.
    pub progress: bool,
    /// The same on any uplink: the gateway is carrying traffic that may need this one.
    pub traffic: bool,
    /// One of them has unacknowledged data and its retransmission timer fired.
    pub stalled: bool,
    /// Data segments retransmitted and sent, summed over them.
    pub retrans: u32,
    /// Of `retrans`, those of subflows whose queue had built up ([`queue_built`]): the loss of
    /// a full queue, which says the link is busy, not that it is bad.
    pub congestion_retrans: u32,
    pub segs: u32,
    /// Data segments received out of order.
    pub ooo: u32,
}

/// A change of health, for the log and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
    pub reason: String,
}

/// Traffic this recent makes a quiet uplink worth asking every `interval`.
const TRAFFIC_RECENT: Duration = Duration::from_secs(5);
/// Signs of loss this recent keep a working uplink asked every `interval`, to measure it.
const LOSS_RECENT: Duration = Duration::from_secs(5);
/// Probe rounds remembered for the loss estimate, and samples for the retransmission share.
const ROUNDS_KEPT: usize = 10;
const SAMPLES_KEPT: usize = 10;
/// A degraded uplink stays degraded at least this long: its share of retransmissions falls
/// fast when the traffic of a failed uplink moves onto it (seen: 13 % and back under 5 % in
/// half a second), and each change of health is a priority change on every connection.
const DEGRADED_MIN: Duration = Duration::from_secs(5);
/// Fewer handshakes or segments than this say nothing about loss.
const MIN_ATTEMPTS: u32 = 12;
const MIN_SEGS: u32 = 300;

/// Whether a subflow's smoothed RTT shows a queue building on its path: above its lowest RTT by
/// a quarter of it, and by at least 5 ms. Why: a bulk transfer that fills an uplink loses
/// segments whenever the bottleneck's queue overflows (reno, cubic and bbr alike), 10–20 % of
/// them in the seconds after a slow start into a shallow queue (measured: a 200 Mbit/s uplink,
/// 20 ms one way, tbf with a 50 ms queue), while the link itself loses nothing; such loss
/// comes with the queue's delay, the loss of a bad link (radio, a failing line) without it.
pub fn queue_built(rtt: Duration, min_rtt: Duration) -> bool {
    !min_rtt.is_zero() && rtt >= min_rtt + (min_rtt / 4).max(Duration::from_millis(5))
}

/// One uplink's health and the evidence behind it.
#[derive(Debug, Clone)]
pub struct Tracker {
    health: Health,
    reason: String,
    since: Instant,
    link_up: bool,
    /// Unanswered rounds in a row, answered rounds in a row.
    fails: u32,
    oks: u32,
    probe_dead: bool,
    degraded: bool,
    /// When it last became degraded: it stays so at least [`DEGRADED_MIN`].
    degraded_at: Option<Instant>,
    rounds: VecDeque<(u8, u8)>,
    samples: VecDeque<(u32, u32)>,
    /// The last answer's handshake time, and the lowest seen.
    rtt: Option<Duration>,
    base_rtt: Option<Duration>,
    /// Flaps counted towards the hold-down, and when the uplink last came back.
    flaps: u32,
    last_return: Option<Instant>,
    /// No link, or probes unanswered: what a return and a flap are counted from.
    was_bad: bool,
    /// Whether it ever worked: the first link-up is not a return.
    ever_up: bool,
    held_until: Option<Instant>,
    last_probe: Option<Instant>,
    urgent: bool,
    last_progress: bool,
    /// When a sample last showed retransmissions or out-of-order arrivals.
    loss_seen: Option<Instant>,
    subflows: u32,
    /// When the gateway last carried traffic on any uplink.
    last_traffic: Option<Instant>,
    pub probes_sent: u64,
    pub probes_answered: u64,
}

impl Tracker {
    /// A new uplink, as its link is now.
    pub fn new(link_up: bool, now: Instant) -> Tracker {
        Tracker {
            health: if link_up { Health::Up } else { Health::Down },
            reason: if link_up { "link up" } else { "no link" }.into(),
            since: now,
            link_up,
            fails: 0,
            oks: 0,
            probe_dead: false,
            degraded: false,
            degraded_at: None,
            rounds: VecDeque::new(),
            samples: VecDeque::new(),
            rtt: None,
            base_rtt: None,
            flaps: 0,
            last_return: None,
            was_bad: !link_up,
            ever_up: link_up,
            held_until: None,
            last_probe: None,
            // Probe at once: an uplink that is up but dead from the start must not wait.
            urgent: link_up,
            last_progress: false,
            loss_seen: None,
            subflows: 0,
            last_traffic: None,
            probes_sent: 0,
            probes_answered: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// The remaining hold-down, if the uplink is held out.
    pub fn held_for(&self, now: Instant) -> Option<Duration> {
        self.held_until
            .filter(|t| *t > now)
            .map(|t| t.duration_since(now))
    }

    /// The share of probe handshakes unanswered over the rounds remembered, if enough were
    /// sent to say. Rounds with no answer at all are not loss but silence (they count towards
    /// dead), and are left out.
    pub fn probe_loss(&self) -> Option<f64> {
        let (sent, answered) = self
            .rounds
            .iter()
            .filter(|r| r.1 > 0)
            .fold((0u32, 0u32), |(s, a), r| {
                (s + u32::from(r.0), a + u32::from(r.1))
            });
        (sent >= MIN_ATTEMPTS).then(|| f64::from(sent - answered) / f64::from(sent))
    }

    /// The share of segments retransmitted over the samples remembered, if enough were sent.
    pub fn retrans_share(&self) -> Option<f64> {
        let (r, s) = self
            .samples
            .iter()
            .fold((0u32, 0u32), |(r, s), x| (r + x.0, s + x.1));
        (s >= MIN_SEGS).then(|| f64::from(r) / f64::from(s))
    }

    /// The link (carrier and a usable address) as the kernel reports it.
    pub fn link(&mut self, up: bool, now: Instant, cfg: &HealthConfig) -> Option<Transition> {
        if up != self.link_up {
            self.link_up = up;
            // A link that comes back starts afresh: its old probe failures say nothing now.
            self.fails = 0;
            self.oks = 0;
            self.probe_dead = false;
            self.rounds.clear();
            self.urgent = up;
        }
        self.evaluate(
            now,
            cfg,
            if up {
                "link up"
            } else {
                "link down or no address"
            },
        )
    }

    /// A sample of the gateway's subflows on this uplink.
    pub fn sample(&mut self, s: Sample, now: Instant, cfg: &HealthConfig) -> Option<Transition> {
        if (self.last_progress && !s.progress && s.subflows > 0) || s.stalled {
            // The silence of a blackhole, or a retransmission timeout: ask now.
            self.urgent = true;
        }
        self.last_progress = s.progress;
        if s.retrans > 0 || s.ooo > 0 {
            self.loss_seen = Some(now);
        }
        self.subflows = s.subflows;
        if s.traffic || s.progress {
            self.last_traffic = Some(now);
        }
        // Congestion loss is the transport's business; only the rest says the link is bad.
        let retrans = s.retrans.saturating_sub(s.congestion_retrans);
        self.samples.push_back((retrans, s.segs));
        if self.samples.len() > SAMPLES_KEPT {
            self.samples.pop_front();
        }
        self.evaluate(now, cfg, "loss back to normal")
    }

    /// A probe round's outcome.
    pub fn round(&mut self, r: Round, now: Instant, cfg: &HealthConfig) -> Option<Transition> {
        self.last_probe = Some(now);
        self.probes_sent += u64::from(r.sent);
        self.probes_answered += u64::from(r.answered);
        self.rounds.push_back((r.sent, r.answered));
        if self.rounds.len() > ROUNDS_KEPT {
            self.rounds.pop_front();
        }
        let why;
        if r.answered == 0 {
            self.fails += 1;
            self.oks = 0;
            // Repeat at once, until it is dead: the sooner the second round, the sooner a dead
            // uplink is out; once out, every `interval` (a link that fails at once, with no
            // route or an ICMP error, must not turn this into a loop).
            self.urgent = self.fails < cfg.dead_after;
            if self.fails >= cfg.dead_after && !self.probe_dead {
                self.probe_dead = true;
                // What it lost before says nothing of how it will do when it returns.
                self.rounds.clear();
                self.samples.clear();
            }
            why = format!(
                "{} probe rounds in a row unanswered ({} handshakes each, {} ms)",
                self.fails,
                r.sent,
                cfg.timeout.as_millis()
            );
        } else {
            self.fails = 0;
            self.oks += 1;
            if let Some(rtt) = r.rtt {
                self.rtt = Some(rtt);
                self.base_rtt = Some(self.base_rtt.map_or(rtt, |b| b.min(rtt)));
            }
            if self.probe_dead && self.oks >= cfg.up_after {
                self.probe_dead = false;
            }
            why = format!("probes answered ({} of {})", r.answered, r.sent);
        }
        self.evaluate(now, cfg, &why)
    }

    /// When the next probe round is due, given the uplink's role; `None`: not now. An uplink
    /// with subflows but no progress of its own while the gateway carries traffic elsewhere is
    /// asked every `interval` (a live stream may need it any moment); one whose connections are
    /// all idle, every `idle_interval` (a gateway with idle connections costs the converter
    /// little).
    pub fn next_probe(&self, role: Role, now: Instant, cfg: &HealthConfig) -> Option<Instant> {
        if !self.link_up {
            return None;
        }
        let Some(last) = self.last_probe else {
            return Some(self.since);
        };
        if self.urgent {
            return Some(last);
        }
        let every = if role == Role::Standby && self.fails == 0 && !self.probe_dead {
            cfg.standby_interval
        } else if role == Role::Standby {
            // A dead backup standing by: every `interval` would be 4 handshakes a second
            // on a metered link for as long as it is dead.
            cfg.standby_interval.min(cfg.idle_interval)
        } else if self.fails > 0 || self.probe_dead || self.held_until.is_some() || self.degraded {
            // Dead or held: to see it come back; degraded: loss is only measured by probes
            // once traffic has left it.
            cfg.interval
        } else if self.last_progress
            && self
                .loss_seen
                .is_some_and(|t| now.duration_since(t) < LOSS_RECENT)
        {
            // It works but loses: the probes measure how much (a download's loss shows at
            // the gateway only as out-of-order arrivals, which congestion also causes). Lost
            // recently, not in the last sample: a subflow whose window a lossy link has
            // collapsed gets a segment through now and then, and a half-second sample of it
            // often holds no arrival out of order, so asking only after such samples left a
            // download's lossy uplink unmeasured, and not degraded, for up to 18 s.
            cfg.interval
        } else if self.last_progress {
            // Its own subflows prove it works: nothing to ask.
            return None;
        } else if self.subflows > 0
            && self
                .last_traffic
                .is_some_and(|t| now.duration_since(t) < TRAFFIC_RECENT)
        {
            cfg.interval
        } else {
            cfg.idle_interval
        };
        last.checked_add(every)
    }

    /// Called when a round is started: an urgent request is served.
    pub fn probing(&mut self) {
        self.urgent = false;
    }

    /// Time passes: a hold-down may end.
    pub fn tick(&mut self, now: Instant, cfg: &HealthConfig) -> Option<Transition> {
        self.evaluate(now, cfg, "hold-down over")
    }

    fn evaluate(&mut self, now: Instant, cfg: &HealthConfig, why: &str) -> Option<Transition> {
        // Loss: enter degraded above the threshold, leave below half of it.
        let loss = [self.probe_loss(), self.retrans_share()]
            .into_iter()
            .flatten()
            .fold(None::<f64>, |m, x| Some(m.map_or(x, |m| m.max(x))));
        if let Some(l) = loss {
            if l >= cfg.degraded_loss {
                if !self.degraded {
                    self.degraded_at = Some(now);
                }
                self.degraded = true;
            } else if l < cfg.degraded_loss / 2.0
                && self
                    .degraded_at
                    .is_none_or(|at| now.duration_since(at) >= DEGRADED_MIN)
            {
                self.degraded = false;
            }
        }
        let bad = !self.link_up || self.probe_dead;
        if bad && !self.was_bad {
            // Gone bad: a flap if it comes this soon after the last return.
            self.flaps = match self.last_return {
                Some(r) if now.duration_since(r) < cfg.flap_window => self.flaps + 1,
                _ => 0,
            };
            self.held_until = None;
        }
        if !bad && self.was_bad && self.ever_up {
            let hold = if self.flaps == 0 {
                Duration::ZERO
            } else {
                let doublings = (self.flaps - 1).min(16);
                cfg.hold_base
                    .checked_mul(1 << doublings)
                    .unwrap_or(cfg.hold_max)
                    .min(cfg.hold_max)
            };
            // The flap window counts from when it carries again, after its hold-down.
            self.last_return = now.checked_add(hold);
            if !hold.is_zero() {
                self.held_until = now.checked_add(hold);
            }
        }
        if !bad {
            self.ever_up = true;
        }
        self.was_bad = bad;
        let mut why = why.to_string();
        if self.held_until.is_some_and(|t| t <= now) {
            self.held_until = None;
            why = "hold-down over".into();
        }
        let (to, reason) = if !self.link_up {
            (Health::Down, why)
        } else if self.probe_dead {
            (Health::Dead, why)
        } else if let Some(left) = self.held_for(now) {
            (
                Health::Dead,
                format!(
                    "held out {} s after {} flaps",
                    left.as_secs_f64().ceil(),
                    self.flaps
                ),
            )
        } else if self.degraded {
            (
                Health::Degraded,
                format!("loss {:.0} %", loss.unwrap_or(0.0) * 100.0),
            )
        } else {
            (Health::Up, why)
        };
        self.settle(now, to, reason)
    }

    fn settle(&mut self, now: Instant, to: Health, reason: String) -> Option<Transition> {
        if to == self.health {
            return None;
        }
        let t = Transition {
            from: self.health,
            to,
            reason: reason.clone(),
        };
        self.health = to;
        self.reason = reason;
        self.since = now;
        Some(t)
    }
}

/// Whether backup uplinks are carrying, and since when a primary has been healthy.
#[derive(Debug, Clone, Default)]
pub struct Backups {
    pub active: bool,
    primary_since: Option<Instant>,
}

impl Backups {
    /// Whether carrying backups are due to be released (a decision to make now).
    pub fn release_due(&self, now: Instant, cfg: &HealthConfig) -> bool {
        self.active
            && self
                .primary_since
                .is_some_and(|s| now.duration_since(s) >= cfg.backup_release)
    }
}

/// What each uplink does, from its link state, its health and its configuration:
/// - a healthy primary carries traffic; a degraded one carries it at backup priority (the
///   kernel's scheduler then uses it only when no other subflow can send), and still counts as
///   a working primary: a lossy line is better than paying for the metered backup;
/// - when every uplink that is up is dead, none is taken out (see below);
/// - a backup stands by (no endpoint, no subflow: not a byte but probes) while a primary is
///   usable, carries traffic (at backup priority) when none is, and keeps carrying until a
///   primary has been usable for `backup_release`, so that a primary that flickers back does
///   not bounce every connection;
/// - a dead or down uplink stays out (no endpoint; its subflows are closed, and new
///   connections do not start on it).
pub fn roles(
    uplinks: &mut [Uplink],
    health: impl Fn(&Uplink) -> Health,
    backups: &mut Backups,
    now: Instant,
    cfg: &HealthConfig,
) {
    // Every uplink that is up judged dead at once is the converter not answering (or the
    // probes wrong), not every link failing together: then health says nothing, and taking
    // every endpoint away would only cost the connections their subflows.
    let all_dead = uplinks
        .iter()
        .filter(|u| u.state == State::Up)
        .all(|u| health(u) == Health::Dead);
    let usable = |u: &Uplink| u.state == State::Up && (all_dead || health(u).usable());
    let primary_ok = uplinks.iter().any(|u| !u.backup && usable(u));
    if !primary_ok {
        backups.primary_since = None;
        backups.active = uplinks.iter().any(|u| u.backup && usable(u));
    } else {
        let since = *backups.primary_since.get_or_insert(now);
        if backups.active && now.duration_since(since) >= cfg.backup_release {
            backups.active = false;
        }
    }
    // Healthy primaries: a degraded one yields to them, and only to them.
    let healthy_primaries = uplinks
        .iter()
        .filter(|u| !u.backup && u.state == State::Up && health(u) == Health::Up)
        .count();
    for u in uplinks.iter_mut() {
        let h = if u.state == State::Up {
            health(u)
        } else {
            Health::Down
        };
        u.health = h;
        u.role = if !usable(u) {
            Role::Out
        } else if u.backup {
            if backups.active {
                Role::Carry { backup_prio: true }
            } else {
                Role::Standby
            }
        } else {
            // Backup priority says "the others first": with no healthy primary to go first it
            // says nothing, and it costs a priority change on every connection (MP_PRIO) with
            // the kernel's scheduler left choosing among backup subflows. Seen once with the
            // other uplink dead: the surviving uplink's subflows set to backup and back within
            // half a second, then an upload that stood still (docs/architecture.md).
            Role::Carry {
                backup_prio: h == Health::Degraded && healthy_primaries > 0,
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig::default()
    }

    fn dead_round() -> Round {
        Round {
            sent: 4,
            answered: 0,
            rtt: None,
        }
    }

    fn ok_round(answered: u8) -> Round {
        Round {
            sent: 4,
            answered,
            rtt: Some(Duration::from_millis(20)),
        }
    }

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    /// Drives a tracker through a blackhole the way the loop does: rounds when due, each
    /// taking `timeout` when unanswered. Returns when it went dead.
    fn blackhole_detected_after(t: &mut Tracker, t0: Instant, c: &HealthConfig) -> Duration {
        let mut now = t0;
        loop {
            let due = t
                .next_probe(Role::Carry { backup_prio: false }, now, c)
                .unwrap();
            now = now.max(due);
            t.probing();
            now += c.timeout;
            if let Some(tr) = t.round(dead_round(), now, c)
                && tr.to == Health::Dead
            {
                return now.duration_since(t0);
            }
        }
    }

    #[test]
    fn a_silent_uplink_is_dead_within_three_seconds() {
        let c = cfg();
        let t0 = Instant::now();
        let mut t = Tracker::new(true, t0);
        t.probing();
        assert_eq!(t.round(ok_round(4), t0, &c), None);
        // A download on it: progress, so no probes are needed.
        let busy = Sample {
            subflows: 1,
            progress: true,
            ..Sample::default()
        };
        t.sample(busy, secs(t0, 0.5), &c);
        assert_eq!(
            t.next_probe(Role::Carry { backup_prio: false }, secs(t0, 0.5), &c),
            None
        );
        // Blackhole at 0.6 s: the next sample (1.0 s) sees no progress and asks at once.
        let quiet = Sample {
            subflows: 1,
            ..Sample::default()
        };
        t.sample(quiet, secs(t0, 1.0), &c);
        let took = blackhole_detected_after(&mut t, secs(t0, 1.0), &c);
        assert!(
            took + Duration::from_millis(400) <= Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(t.health(), Health::Dead);
        assert!(t.reason().contains("unanswered"), "{}", t.reason());
        // Dead: asked every interval, not in a loop.
        let last = t.last_probe.unwrap();
        let carry = Role::Carry { backup_prio: false };
        assert_eq!(t.next_probe(carry, last, &c), Some(last + c.interval));
        // It stays dead on one answered round, returns on the second.
        let now = secs(t0, 5.0);
        assert_eq!(t.round(ok_round(1), now, &c), None);
        let back = t.round(ok_round(3), secs(t0, 6.0), &c).unwrap();
        assert_eq!((back.from, back.to), (Health::Dead, Health::Up));
    }

    #[test]
    fn an_idle_uplink_is_probed_rarely_and_a_standby_one_more_rarely() {
        let c = cfg();
        let t0 = Instant::now();
        let mut t = Tracker::new(true, t0);
        assert_eq!(
            t.next_probe(Role::Out, t0, &c),
            Some(t0),
            "a new uplink at once"
        );
        t.probing();
        t.round(ok_round(4), t0, &c);
        let carry = Role::Carry { backup_prio: false };
        assert_eq!(t.next_probe(carry, t0, &c), Some(t0 + c.idle_interval));
        assert_eq!(
            t.next_probe(Role::Standby, t0, &c),
            Some(t0 + c.standby_interval)
        );
        // Subflows, quiet, and nothing elsewhere: idle connections, asked rarely.
        let quiet = Sample {
            subflows: 2,
            ..Sample::default()
        };
        t.sample(quiet, t0, &c);
        assert_eq!(t.next_probe(carry, t0, &c), Some(t0 + c.idle_interval));
        // Traffic on another uplink: this one may be needed any moment.
        let elsewhere = Sample {
            subflows: 2,
            traffic: true,
            ..Sample::default()
        };
        t.sample(elsewhere, t0, &c);
        assert_eq!(t.next_probe(carry, t0, &c), Some(t0 + c.interval));
        t.sample(quiet, secs(t0, 6.0), &c);
        assert_eq!(
            t.next_probe(carry, secs(t0, 6.0), &c),
            Some(t0 + c.idle_interval)
        );
        // Progress says it works; progress with losses asks how much.
        let busy = Sample {
            subflows: 2,
            progress: true,
            ..Sample::default()
        };
        t.sample(busy, t0, &c);
        assert_eq!(t.next_probe(carry, t0, &c), None);
        t.sample(Sample { ooo: 5, ..busy }, t0, &c);
        assert_eq!(t.next_probe(carry, t0, &c), Some(t0 + c.interval));
        // And keeps asking while the loss is recent, though samples between show none: a
        // collapsed window passes a segment now and then.
        t.sample(busy, secs(t0, 4.5), &c);
        assert_eq!(
            t.next_probe(carry, secs(t0, 4.5), &c),
            Some(t0 + c.interval)
        );
        t.sample(busy, secs(t0, 5.0), &c);
        assert_eq!(t.next_probe(carry, secs(t0, 5.0), &c), None);
        // A stalled subflow asks at once.
        t.sample(
            Sample {
                subflows: 2,
                stalled: true,
                ..Sample::default()
            },
            t0,
            &c,
        );
        assert_eq!(t.next_probe(carry, t0, &c), Some(t0));
        // Down: no probes at all.
        t.link(false, t0, &c);
        assert_eq!(t.next_probe(carry, t0, &c), None);
    }

    #[test]
    fn a_lossy_uplink_is_degraded_not_dead() {
        let c = cfg();
        let t0 = Instant::now();
        let mut t = Tracker::new(true, t0);
        // Rounds with one or two of four handshakes lost (one fully lost round in between).
        let mut now = t0;
        for (i, answered) in [3, 2, 3, 0, 3, 2, 4, 3].into_iter().enumerate() {
            now = secs(t0, i as f64);
            let r = if answered == 0 {
                dead_round()
            } else {
                ok_round(answered)
            };
            t.round(r, now, &c);
            assert_ne!(t.health(), Health::Dead);
        }
        assert_eq!(t.health(), Health::Degraded, "{}", t.reason());
        // Clean rounds bring it back once loss is below half the threshold, and not before
        // it has been degraded for DEGRADED_MIN.
        for i in 0..10 {
            t.round(ok_round(4), now + Duration::from_secs(i + 1), &c);
        }
        assert_eq!(t.health(), Health::Up);
        let mut d = Tracker::new(true, t0);
        let lossy = Sample {
            subflows: 1,
            progress: true,
            retrans: 40,
            segs: 300,
            ..Sample::default()
        };
        d.sample(lossy, t0, &c);
        assert_eq!(d.health(), Health::Degraded);
        let clean = Sample {
            retrans: 0,
            segs: 20_000,
            ..lossy
        };
        d.sample(clean, secs(t0, 0.5), &c);
        assert_eq!(d.health(), Health::Degraded, "not after half a second");
        d.sample(clean, secs(t0, 5.0), &c);
        assert_eq!(d.health(), Health::Up);
        // Retransmissions say the same, without probes.
        for i in 0..5 {
            t.sample(
                Sample {
                    subflows: 1,
                    progress: true,
                    retrans: 30,
                    segs: 150,
                    ..Sample::default()
                },
                now + Duration::from_secs(20 + i),
                &c,
            );
        }
        assert_eq!(t.health(), Health::Degraded);
        assert!(t.reason().contains("loss 20 %"), "{}", t.reason());
        // Ordinary congestion (1 % retransmitted) is not degradation, and the loss of a full
        // queue, however much, is not either.
        let busy = Sample {
            subflows: 1,
            progress: true,
            ..Sample::default()
        };
        for (retrans, congestion_retrans, segs) in [(2, 0, 200), (60, 60, 300)] {
            let mut t = Tracker::new(true, t0);
            for i in 0..10 {
                let s = Sample {
                    retrans,
                    congestion_retrans,
                    segs,
                    ..busy
                };
                t.sample(s, secs(t0, f64::from(i)), &c);
            }
            assert_eq!(
                t.health(),
                Health::Up,
                "{retrans} of {segs}: {}",
                t.reason()
            );
        }
    }

    #[test]
    fn a_queue_shows_as_rtt_above_the_lowest() {
        let ms = Duration::from_millis;
        // A 40 ms path with 50 ms of queue; the same path with jitter only.
        assert!(queue_built(ms(90), ms(40)));
        assert!(!queue_built(ms(45), ms(40)));
        // A LAN-fast path: 5 ms of queue at least, whatever its RTT.
        assert!(queue_built(ms(6), Duration::from_micros(50)));
        assert!(!queue_built(ms(2), Duration::from_micros(50)));
        // A long path needs a quarter of its RTT.
        assert!(!queue_built(ms(220), ms(200)));
        assert!(queue_built(ms(260), ms(200)));
        // Unknown lowest RTT: no claim.
        assert!(!queue_built(ms(500), Duration::ZERO));
    }

    #[test]
    fn a_flapping_uplink_is_held_out_longer_each_time() {
        let c = cfg();
        let t0 = Instant::now();
        let mut t = Tracker::new(true, t0);
        let mut now = t0;
        let mut holds = Vec::new();
        for _ in 0..5 {
            now += Duration::from_secs(2);
            assert_eq!(t.link(false, now, &c).unwrap().to, Health::Down);
            now += Duration::from_secs(2);
            t.link(true, now, &c);
            holds.push(t.held_for(now).unwrap_or_default().as_secs());
            // Held: dead, and it comes back by itself when the hold-down ends.
            if let Some(h) = t.held_for(now) {
                assert_eq!(t.health(), Health::Dead);
                assert!(t.reason().contains("held out"), "{}", t.reason());
                assert_eq!(t.tick(now + h / 2, &c), None);
                let back = t.tick(now + h, &c).unwrap();
                assert_eq!(back.to, Health::Up);
                now += h;
            } else {
                assert_eq!(t.health(), Health::Up);
            }
        }
        assert_eq!(holds, [0, 4, 8, 16, 32], "the first return is at once");
        // Stable for longer than the flap window: forgiven.
        now += c.flap_window + Duration::from_secs(1);
        t.link(false, now, &c);
        t.link(true, now + Duration::from_secs(1), &c);
        assert_eq!(t.health(), Health::Up);
        // The hold-down has a ceiling, and a link that keeps flapping reaches it (the flap
        // window counts from the end of each hold-down).
        let mut t = Tracker::new(true, t0);
        let mut now = t0;
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            now += Duration::from_secs(1);
            t.link(false, now, &c);
            t.link(true, now, &c);
            if let Some(h) = t.held_for(now) {
                assert!(h <= c.hold_max);
                last = h;
                now += h;
                t.tick(now, &c);
            }
        }
        assert_eq!(last, c.hold_max);
        // The first link-up of an uplink that started down is not a return.
        let mut t = Tracker::new(false, t0);
        t.link(true, secs(t0, 1.0), &c);
        t.link(false, secs(t0, 2.0), &c);
        t.link(true, secs(t0, 3.0), &c);
        assert_eq!(t.held_for(secs(t0, 3.0)), None);
    }

    fn uplink(slot: u8, backup: bool) -> Uplink {
        Uplink {
            slot,
            name: format!("u{slot}"),
            interface: format!("eth{slot}"),
            backup,
            ifindex: Some(u32::from(slot) + 2),
            state: State::Up,
            paths: vec![],
            health: Health::Up,
            role: Role::Out,
        }
    }

    #[test]
    fn backups_stand_by_take_over_and_are_released_after_the_hold_down() {
        let c = cfg();
        let t0 = Instant::now();
        let mut ups = vec![uplink(0, false), uplink(1, false), uplink(2, true)];
        let mut b = Backups::default();
        let all_up = |_: &Uplink| Health::Up;
        roles(&mut ups, all_up, &mut b, t0, &c);
        let r: Vec<Role> = ups.iter().map(|u| u.role).collect();
        assert_eq!(
            r,
            [
                Role::Carry { backup_prio: false },
                Role::Carry { backup_prio: false },
                Role::Standby
            ]
        );
        // One primary dead: still no backup.
        roles(
            &mut ups,
            |u| {
                if u.slot == 0 {
                    Health::Dead
                } else {
                    Health::Up
                }
            },
            &mut b,
            t0,
            &c,
        );
        assert_eq!((ups[0].role, ups[2].role), (Role::Out, Role::Standby));
        // Both dead: the backup carries.
        let primaries_dead = |u: &Uplink| if u.backup { Health::Up } else { Health::Dead };
        roles(&mut ups, primaries_dead, &mut b, secs(t0, 1.0), &c);
        assert_eq!(ups[2].role, Role::Carry { backup_prio: true });
        // A primary returns: the backup keeps carrying until the release time has passed.
        roles(&mut ups, all_up, &mut b, secs(t0, 2.0), &c);
        assert_eq!(ups[2].role, Role::Carry { backup_prio: true });
        roles(&mut ups, all_up, &mut b, secs(t0, 11.9), &c);
        assert_eq!(ups[2].role, Role::Carry { backup_prio: true });
        roles(&mut ups, all_up, &mut b, secs(t0, 12.0), &c);
        assert_eq!(ups[2].role, Role::Standby);
        // A degraded primary carries at backup priority behind a healthy one; down ones are
        // out.
        let first_degraded = |u: &Uplink| {
            if u.slot == 0 {
                Health::Degraded
            } else {
                Health::Up
            }
        };
        roles(&mut ups, first_degraded, &mut b, secs(t0, 12.5), &c);
        assert_eq!(ups[0].role, Role::Carry { backup_prio: true });
        assert_eq!(ups[1].role, Role::Carry { backup_prio: false });
        // With no healthy primary to go first, a degraded one keeps its priority: there is
        // nothing to yield to (and a metered backup is not preferred to it).
        ups[1].state = State::Down;
        roles(&mut ups, |_| Health::Degraded, &mut b, secs(t0, 13.0), &c);
        assert_eq!(ups[0].role, Role::Carry { backup_prio: false });
        assert_eq!((ups[1].role, ups[1].health), (Role::Out, Health::Down));
        assert_eq!(ups[2].role, Role::Standby, "a degraded primary still works");
        // Everything dead at once: the converter, not the links; no primary is taken out
        // (and a backup would not help).
        ups[1].state = State::Up;
        roles(&mut ups, |_| Health::Dead, &mut b, secs(t0, 14.0), &c);
        let r: Vec<Role> = ups.iter().map(|u| u.role).collect();
        assert_eq!(
            r,
            [
                Role::Carry { backup_prio: false },
                Role::Carry { backup_prio: false },
                Role::Standby
            ]
        );
    }
}
