//! The gateway's uplinks, programmed into the kernel and kept so: a thin loop around
//! [`super::uplinks`]. It reads links, addresses and routes over rtnetlink, decides, applies the
//! difference (routes, rules over rtnetlink; endpoints over the MPTCP generic netlink family),
//! and waits for the next change the kernel reports (or a periodic re-read, in case an event
//! was lost). What it decided is published for the connections (which source to start from)
//! and for `braid status`.
//!
//! Undone exactly: at exit every route, rule and endpoint it added is removed. After a crash
//! the next start finds them by their numbers (tables, rule priorities and endpoint ids in
//! braid's ranges); nothing braid did not add is touched. The namespace settings it changes
//! (the MPTCP limits, `net.mptcp.stale_loss_cnt`, `rp_filter` of the uplinks) go into the
//! namespace's ledger ([`crate::ledger`]), which puts them back at exit or after a crash.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use braid_sys::pm::{Endpoint, EndpointFlags, PathManager, PmLimits};
use braid_sys::rtnl::Rtnl;
use braid_sys::sockopt::SubflowInfo;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::health::{self, Backups, HealthConfig, Round, Sample, Tracker};
use super::uplinks::{self, Numbers, Observed, Programmed, Selection, Slots, State, Uplink};
use crate::ledger::{self, Change, Session};

/// Re-read everything this often even without events.
const RESYNC: Duration = Duration::from_secs(10);
/// How often the gateway's subflows are sampled for the health checks (progress, stalls,
/// retransmissions), and hold-downs looked at.
const HEALTH_TICK: Duration = Duration::from_millis(500);
/// Events come in bursts (a link going down removes addresses and routes one by one): wait
/// this long after the first before reading the state.
const SETTLE: Duration = Duration::from_millis(20);
/// MPTCP limits while braid manages the uplinks: the kernel's maximum, so that every uplink
/// and every address a converter announces can be used.
const LIMITS: PmLimits = PmLimits {
    subflows: 8,
    add_addr_accepted: 8,
};

/// How the gateway manages its uplinks.
#[derive(Debug, Clone)]
pub struct PathsConfig {
    pub selection: Selection,
    pub numbers: Numbers,
    /// Where the namespace's ledger lives (`/run/braid`).
    pub state_dir: PathBuf,
    pub health: HealthConfig,
    /// Where probes go: the first converter of each family in the order connections would try
    /// them now (one in back-off comes after those that work).
    pub converters: Arc<super::converters::Converters>,
    /// The mark the gateway's own sockets carry (so that its capture lets them through).
    pub mark: Option<u32>,
    /// Endpoints `subflow fullmesh` (`fullmesh`).
    pub fullmesh: bool,
}

/// The namespace settings this gateway has set (or found as it needs them), each recorded in
/// the ledger once.
#[derive(Debug, Default)]
struct Claimed {
    limits: bool,
    stale_loss_cnt: bool,
    /// Interfaces whose `rp_filter` was looked at.
    rp_filter: std::collections::HashSet<String>,
}

/// Bits per second through an interface over the last second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub rx_bps: f64,
    pub tx_bps: f64,
}

/// What `braid status` shows of an uplink's health beyond its state.
#[derive(Debug, Clone)]
pub struct HealthView {
    pub reason: String,
    pub since: std::time::Instant,
    pub probe_rtt: Option<Duration>,
    pub probes_sent: u64,
    pub probes_answered: u64,
}

/// The running uplink manager: its published view, and how to stop it.
#[derive(Debug)]
pub struct Paths {
    pub uplinks: watch::Receiver<Vec<Uplink>>,
    /// Per interface of an uplink.
    pub rates: Arc<Mutex<HashMap<String, Rates>>>,
    /// Per interface of an uplink.
    pub health: Arc<Mutex<HashMap<String, HealthView>>>,
    task: tokio::task::JoinHandle<()>,
    sampler: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    reconfigure: tokio::sync::mpsc::Sender<(Selection, HealthConfig)>,
}

/// What the rest of the gateway reads of the uplinks: their state and their rates.
#[derive(Debug, Clone)]
pub struct View {
    pub uplinks: watch::Receiver<Vec<Uplink>>,
    pub rates: Arc<Mutex<HashMap<String, Rates>>>,
    pub health: Arc<Mutex<HashMap<String, HealthView>>>,
}

impl Paths {
    pub fn view(&self) -> View {
        View {
            uplinks: self.uplinks.clone(),
            rates: self.rates.clone(),
            health: self.health.clone(),
        }
    }
}

/// The uplink an address belongs to, by name.
pub fn uplink_of(uplinks: &[Uplink], addr: IpAddr) -> Option<&str> {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    uplinks
        .iter()
        .find(|u| u.paths.iter().any(|p| p.addr == addr))
        .map(|u| u.name.as_str())
}

/// Every second: the rate of each uplink's interface, its byte counters and state in the
/// metrics, and how many of the gateway's subflows it carries.
async fn sample(
    nl: Rtnl,
    uplinks: watch::Receiver<Vec<Uplink>>,
    rates: Arc<Mutex<HashMap<String, Rates>>>,
    stats: super::stats::Stats,
    registry: Arc<crate::status::Registry>,
    stop: CancellationToken,
) {
    use super::stats::{UplinkDirection, UplinkLabel};
    let mut last: HashMap<String, (std::time::Instant, u64, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(links) = nl.links().await else {
            continue;
        };
        let ups = uplinks.borrow().clone();
        let mut subflows: HashMap<String, i64> = HashMap::new();
        for c in registry.snapshot() {
            for sf in c.subflows {
                if let Some(name) = uplink_of(&ups, sf.local.ip()) {
                    *subflows.entry(name.to_string()).or_default() += 1;
                }
            }
        }
        let mut now_rates = HashMap::new();
        for u in &ups {
            let label = UplinkLabel {
                uplink: u.name.clone(),
            };
            stats
                .uplink_up
                .get_or_create(&label)
                .set(i64::from(u.state == State::Up));
            stats
                .uplink_subflows
                .get_or_create(&label)
                .set(subflows.get(&u.name).copied().unwrap_or(0));
            let Some(l) = links.iter().find(|l| l.name == u.interface) else {
                continue;
            };
            let now = std::time::Instant::now();
            if let Some((t, rx, tx)) = last.get(&u.interface) {
                let secs = now.duration_since(*t).as_secs_f64().max(1e-3);
                // A counter that went back is an interface that was recreated.
                let (drx, dtx) = (
                    l.rx_bytes.saturating_sub(*rx),
                    l.tx_bytes.saturating_sub(*tx),
                );
                now_rates.insert(
                    u.interface.clone(),
                    Rates {
                        rx_bps: drx as f64 * 8.0 / secs,
                        tx_bps: dtx as f64 * 8.0 / secs,
                    },
                );
                for (direction, d) in [("rx", drx), ("tx", dtx)] {
                    stats
                        .uplink_bytes
                        .get_or_create(&UplinkDirection {
                            uplink: u.name.clone(),
                            direction,
                        })
                        .inc_by(d);
                }
            }
            last.insert(u.interface.clone(), (now, l.rx_bytes, l.tx_bytes));
        }
        *rates.lock().unwrap_or_else(|e| e.into_inner()) = now_rates;
    }
}

impl Paths {
    /// Removes what a crashed run left, programs the uplinks and keeps them programmed until
    /// [`Paths::stop`].
    pub async fn start(
        cfg: PathsConfig,
        stats: super::stats::Stats,
        registry: Arc<crate::status::Registry>,
    ) -> anyhow::Result<Paths> {
        let nl = Rtnl::new().context("rtnetlink")?;
        let mut pm = PathManager::new().context("opening the MPTCP path manager")?;
        cleanup(&nl, &mut pm, cfg.numbers).await;
        let changes = braid_sys::rtnl::changes().context("subscribing to rtnetlink events")?;
        let (tx, rx) = watch::channel(Vec::new());
        let stop = CancellationToken::new();
        let rates = Arc::new(Mutex::new(HashMap::new()));
        let sampler = tokio::spawn(sample(
            nl.clone(),
            rx.clone(),
            rates.clone(),
            stats.clone(),
            registry.clone(),
            stop.clone(),
        ));
        let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel(64);
        let (reconf_tx, mut reconf_rx) = tokio::sync::mpsc::channel(4);
        let mut m = Manager {
            cfg,
            nl,
            pm,
            slots: Slots::default(),
            held: Programmed::default(),
            published: tx,
            obs: None,
            claimed: Claimed::default(),
            trackers: HashMap::new(),
            backups: Backups::default(),
            probing: std::collections::HashSet::new(),
            probe_tx,
            last_subflows: HashMap::new(),
            learned: HashMap::new(),
            registry,
            stats: stats.clone(),
            health_view: Arc::new(Mutex::new(HashMap::new())),
        };
        let health_view = m.health_view.clone();
        // The first round runs before start returns: connections opened right after see the
        // uplinks.
        let read = m.round().await;
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut changes = Some(changes);
            let mut tick = tokio::time::interval(HEALTH_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut resync = tokio::time::Instant::now() + if read { RESYNC } else { SETTLE * 10 };
            loop {
                let event = async {
                    match changes.as_mut() {
                        Some(c) => c.next().await,
                        None => std::future::pending().await,
                    }
                };
                let reread = tokio::select! {
                    _ = stop2.cancelled() => break,
                    ev = event => {
                        if ev.is_none() {
                            tracing::warn!("rtnetlink events ended; re-reading every {RESYNC:?}");
                            changes = None;
                        }
                        tokio::time::sleep(SETTLE).await;
                        true
                    }
                    // A round that could not read the state is tried again soon.
                    _ = tokio::time::sleep_until(resync) => true,
                    Some((interface, r)) = probe_rx.recv() => {
                        m.probed(&interface, r);
                        false
                    }
                    // A reload: the uplinks to manage and how they are judged. The next round
                    // assesses them afresh; trackers of uplinks that stay keep their history.
                    Some((selection, health)) = reconf_rx.recv() => {
                        m.cfg.selection = selection;
                        m.cfg.health = health;
                        true
                    }
                    _ = tick.tick() => {
                        m.health_tick();
                        false
                    }
                };
                if reread {
                    let read = m.round().await;
                    resync = tokio::time::Instant::now() + if read { RESYNC } else { SETTLE * 10 };
                } else if m.health_changed() {
                    m.decide().await;
                }
                m.start_probes();
            }
            m.undo().await;
        });
        Ok(Paths {
            uplinks: rx,
            rates,
            health: health_view,
            task,
            sampler,
            stop,
            reconfigure: reconf_tx,
        })
    }

    /// Manages `selection` from now on, judging uplinks by `health` (a reload).
    pub async fn reconfigure(&self, selection: Selection, health: HealthConfig) {
        let _ = self.reconfigure.send((selection, health)).await;
    }

    /// Removes everything it added and puts back what it changed.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.sampler.await;
        let _ = self.task.await;
    }
}

struct Manager {
    cfg: PathsConfig,
    nl: Rtnl,
    pm: PathManager,
    slots: Slots,
    held: Programmed,
    published: watch::Sender<Vec<Uplink>>,
    /// The kernel's state as last read.
    obs: Option<Observed>,
    /// The namespace settings already set (or found as needed) and recorded in the ledger.
    claimed: Claimed,
    /// Per interface.
    trackers: HashMap<String, Tracker>,
    backups: Backups,
    /// Interfaces with a probe round under way.
    probing: std::collections::HashSet<String>,
    probe_tx: tokio::sync::mpsc::Sender<(String, Round)>,
    /// Each subflow's counters at the previous sample: (connection, local, remote) → info.
    last_subflows: HashMap<(u64, std::net::SocketAddr, std::net::SocketAddr), SubflowInfo>,
    /// Converter addresses seen on subflows, per family (an IPv6 uplink can be probed at the
    /// converter's IPv6 address even when only its IPv4 one is configured).
    learned: HashMap<bool, std::net::SocketAddr>,
    registry: Arc<crate::status::Registry>,
    stats: super::stats::Stats,
    health_view: Arc<Mutex<HashMap<String, HealthView>>>,
}

/// One probe handshake: a plain TCP connection from `src` to the converter, reset as soon as it
/// is established (no TIME_WAIT, nothing for the converter to serve). Only a completed
/// handshake counts: a refusal may come from the first hop (a modem whose own uplink is down
/// answers with a reset or an ICMP error).
async fn probe_once(
    src: IpAddr,
    target: std::net::SocketAddr,
    mark: Option<u32>,
) -> io::Result<Duration> {
    let spec = braid_sys::SocketSpec {
        mark,
        bind: Some(std::net::SocketAddr::new(src, 0)),
        ..braid_sys::SocketSpec::default()
    };
    let sock = spec.open_for(target)?;
    sock.set_nonblocking(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    let t = std::time::Instant::now();
    match sock.connect(target).await {
        Ok(s) => {
            let rtt = t.elapsed();
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            Ok(rtt)
        }
        Err(e) => Err(e),
    }
}

/// A probe round: `attempts` handshakes at once, each given `timeout`.
async fn probe_round(
    src: IpAddr,
    target: std::net::SocketAddr,
    attempts: u8,
    timeout: Duration,
    mark: Option<u32>,
) -> Round {
    // An attempt that fails early (refused, an ICMP error) still takes the whole `timeout`,
    // as silence does: otherwise a round against a converter that refuses (one that is down,
    // not yet known to be in back-off) ends within a millisecond, its repeat too, and the
    // uplink is dead 30 ms after start, before the first connection has moved on to the next
    // converter (seen in CI). The dead verdict keeps its bound, `interval + 2 × timeout`.
    let attempt = || async move {
        let r = probe_once(src, target, mark).await;
        if r.is_err() {
            tokio::time::sleep(timeout).await;
        }
        r
    };
    let mut set: futures::stream::FuturesUnordered<_> = (0..attempts)
        .map(|_| tokio::time::timeout(timeout, attempt()))
        .collect();
    let (mut answered, mut rtt) = (0u8, None::<Duration>);
    while let Some(r) = set.next().await {
        if let Ok(Ok(d)) = r {
            answered += 1;
            rtt = Some(rtt.map_or(d, |x| x.min(d)));
        }
    }
    Round {
        sent: attempts,
        answered,
        rtt,
    }
}

impl Manager {
    async fn observe(&self) -> io::Result<Observed> {
        Ok(Observed {
            links: self.nl.links().await?,
            addresses: self.nl.addresses().await?,
            routes: self.nl.routes().await?,
        })
    }

    /// One read–decide–apply round; false when the state could not be read.
    async fn round(&mut self) -> bool {
        match self.observe().await {
            Ok(o) => self.obs = Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "reading links, addresses and routes");
                return false;
            }
        }
        self.decide().await;
        true
    }

    /// Decides from the state last read and the uplinks' health, and applies the difference.
    async fn decide(&mut self) {
        let Some(obs) = &self.obs else { return };
        let mut ups = uplinks::assess(&self.cfg.selection, &mut self.slots, obs);
        let now = std::time::Instant::now();
        for u in &ups {
            let up = u.state == State::Up;
            let t = self
                .trackers
                .entry(u.interface.clone())
                .or_insert_with(|| Tracker::new(up, now));
            if let Some(tr) = t.link(up, now, &self.cfg.health) {
                log_transition(&self.stats, u, &tr);
            }
        }
        // An uplink found by its default route vanishes with the route when its link goes
        // down: for its health (and hold-down) that is a link down.
        for (interface, t) in self.trackers.iter_mut() {
            if !ups.iter().any(|u| &u.interface == interface)
                && let Some(tr) = t.link(false, now, &self.cfg.health)
            {
                let published = self.published.borrow();
                if let Some(u) = published.iter().find(|u| &u.interface == interface) {
                    log_transition(&self.stats, u, &tr);
                }
            }
        }
        let trackers = &self.trackers;
        health::roles(
            &mut ups,
            |u| {
                trackers
                    .get(&u.interface)
                    .map_or(uplinks::Health::Up, Tracker::health)
            },
            &mut self.backups,
            now,
            &self.cfg.health,
        );
        self.log_changes(&ups);
        let up: Vec<&str> = ups
            .iter()
            .filter(|u| u.state == State::Up)
            .map(|u| u.interface.as_str())
            .collect();
        self.claim_settings(&up).await;
        let want = uplinks::desired(&ups, self.cfg.numbers);
        let changes = self.held.changes(&want);
        if !changes.is_empty() {
            self.apply(changes).await;
        }
        // Every uplink seen, also one that vanished with its default route (down).
        let mut gauges: Vec<(String, &'static str)> = ups
            .iter()
            .map(|u| (u.name.clone(), u.health.as_str()))
            .collect();
        for interface in self.trackers.keys() {
            if !ups.iter().any(|u| &u.interface == interface) {
                gauges.push((interface.clone(), uplinks::Health::Down.as_str()));
            }
        }
        for (name, h) in gauges {
            for other in ["up", "degraded", "dead", "down"] {
                self.stats
                    .uplink_health
                    .get_or_create(&super::stats::UplinkHealth {
                        uplink: name.clone(),
                        health: other,
                    })
                    .set(i64::from(other == h));
            }
        }
        self.published.send_replace(ups);
        self.publish_health();
    }

    /// Whether the health or role of an uplink now differs from what was published.
    fn health_changed(&mut self) -> bool {
        let now = std::time::Instant::now();
        let published = self.published.borrow();
        let mut changed = false;
        for u in published.iter() {
            if let Some(t) = self.trackers.get_mut(&u.interface) {
                if let Some(tr) = t.tick(now, &self.cfg.health) {
                    log_transition(&self.stats, u, &tr);
                }
                changed |= t.health() != u.health;
            }
        }
        // A backup's release is a matter of time alone.
        changed || self.backups.release_due(now, &self.cfg.health)
    }

    /// A probe round ended.
    fn probed(&mut self, interface: &str, r: Round) {
        self.probing.remove(interface);
        let now = std::time::Instant::now();
        let published = self.published.borrow();
        let Some(u) = published.iter().find(|u| u.interface == interface) else {
            return;
        };
        for (result, n) in [
            ("answered", r.answered),
            ("unanswered", r.sent - r.answered),
        ] {
            self.stats
                .uplink_probes
                .get_or_create(&super::stats::UplinkProbe {
                    uplink: u.name.clone(),
                    result,
                })
                .inc_by(u64::from(n));
        }
        if let Some(t) = self.trackers.get_mut(interface)
            && let Some(tr) = t.round(r, now, &self.cfg.health)
        {
            log_transition(&self.stats, u, &tr);
        }
    }

    /// Samples the gateway's subflows: per uplink, whether they make progress, stall or
    /// retransmit much.
    fn health_tick(&mut self) {
        let now = std::time::Instant::now();
        let subflows = self.registry.subflows();
        let published = self.published.borrow().clone();
        let mut samples: HashMap<&str, Sample> = HashMap::new();
        let mut seen = HashMap::new();
        let ports: Vec<u16> = self
            .cfg
            .converters
            .order()
            .iter()
            .map(|c| c.port())
            .collect();
        for (id, sf) in subflows {
            if ports.contains(&sf.remote.port()) {
                self.learned.insert(sf.remote.is_ipv6(), sf.remote);
            }
            let key = (id, sf.local, sf.remote);
            let Some(name) = published
                .iter()
                .find(|u| u.paths.iter().any(|p| p.addr == sf.local.ip()))
                .map(|u| u.interface.as_str())
            else {
                seen.insert(key, sf);
                continue;
            };
            let s = samples.entry(name).or_default();
            s.subflows += 1;
            if let Some(prev) = self.last_subflows.get(&key) {
                s.progress |=
                    sf.bytes_acked > prev.bytes_acked || sf.bytes_received > prev.bytes_received;
                let retrans = sf.total_retrans.saturating_sub(prev.total_retrans);
                s.retrans += retrans;
                // The queue of the previous sample counts too: a loss drains it (the sender
                // halves its window) before the next sample sees the retransmissions.
                let queued = [&sf, prev].iter().any(|i| {
                    health::queue_built(
                        Duration::from_micros(i.rtt_us.into()),
                        Duration::from_micros(i.min_rtt_us.into()),
                    )
                });
                if queued {
                    s.congestion_retrans += retrans;
                }
                s.segs += sf.data_segs_out.saturating_sub(prev.data_segs_out);
                s.ooo += sf.rcv_ooopack.saturating_sub(prev.rcv_ooopack);
            }
            s.stalled |= sf.unacked > 0 && sf.backoff >= 1;
            seen.insert(key, sf);
        }
        self.last_subflows = seen;
        let traffic = samples.values().any(|s| s.progress);
        for u in &published {
            let Some(t) = self.trackers.get_mut(&u.interface) else {
                continue;
            };
            let mut s = samples
                .get(u.interface.as_str())
                .copied()
                .unwrap_or_default();
            s.traffic = traffic;
            if let Some(tr) = t.sample(s, now, &self.cfg.health) {
                log_transition(&self.stats, u, &tr);
            }
        }
        self.publish_health();
    }

    fn publish_health(&self) {
        let view = self
            .trackers
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    HealthView {
                        reason: t.reason().to_string(),
                        since: t.since(),
                        probe_rtt: t.rtt(),
                        probes_sent: t.probes_sent,
                        probes_answered: t.probes_answered,
                    },
                )
            })
            .collect();
        *self.health_view.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }

    /// Starts the probe rounds that are due.
    fn start_probes(&mut self) {
        let now = std::time::Instant::now();
        let order = self.cfg.converters.order();
        let published = self.published.borrow().clone();
        for u in published.iter().filter(|u| u.state == State::Up) {
            if self.probing.contains(&u.interface) {
                continue;
            }
            let Some(t) = self.trackers.get_mut(&u.interface) else {
                continue;
            };
            if t.next_probe(u.role, now, &self.cfg.health)
                .is_none_or(|due| due > now)
            {
                continue;
            }
            // The first path with a converter address of its family to ask.
            let Some((src, target)) = u.paths.iter().find_map(|p| {
                let v6 = p.addr.is_ipv6();
                order
                    .iter()
                    .find(|c| c.is_ipv6() == v6)
                    .or_else(|| self.learned.get(&v6))
                    .map(|c| (p.addr, *c))
            }) else {
                continue;
            };
            t.probing();
            self.probing.insert(u.interface.clone());
            let tx = self.probe_tx.clone();
            let (interface, c) = (u.interface.clone(), self.cfg.health.clone());
            let mark = self.cfg.mark;
            tokio::spawn(async move {
                let r = probe_round(src, target, c.attempts, c.timeout, mark).await;
                let _ = tx.send((interface, r)).await;
            });
        }
    }

    fn log_changes(&self, now: &[Uplink]) {
        let before = self.published.borrow();
        for u in now {
            let old = before.iter().find(|b| b.interface == u.interface);
            if old.map(|o| (o.state, &o.paths, o.role)) != Some((u.state, &u.paths, u.role)) {
                let addrs: Vec<String> = u.paths.iter().map(|p| p.addr.to_string()).collect();
                let chosen = match self.cfg.selection {
                    Selection::Listed(_) => "listed",
                    Selection::Auto { .. } => "it has a default route",
                };
                tracing::info!(
                    uplink = %u.name,
                    interface = %u.interface,
                    state = u.state.as_str(),
                    health = u.health.as_str(),
                    role = u.role.as_str(),
                    addresses = %addrs.join(","),
                    backup = u.backup,
                    chosen,
                    "uplink"
                );
            }
        }
    }

    async fn apply(&mut self, c: uplinks::Changes) {
        for e in c.announce_priority {
            // Deleted and added again below; what is held follows those.
            if let Err(err) = self.pm.set_backup(e.id, e.backup).await {
                tracing::debug!(
                    id = e.id,
                    addr = %e.addr,
                    backup = e.backup,
                    error = %err,
                    "announcing an MPTCP endpoint's priority before replacing it"
                )
            }
        }
        for e in c.set_priority {
            match self.pm.set_backup(e.id, e.backup).await {
                Ok(()) => {
                    self.held.endpoints.retain(|h| h.id != e.id);
                    self.held.endpoints.insert(e);
                }
                Err(err) => {
                    tracing::warn!(id = e.id, addr = %e.addr, backup = e.backup, error = %err, "changing an MPTCP endpoint's priority")
                }
            }
        }
        for e in c.del_endpoints {
            match self.pm.delete_endpoint(e.id).await {
                Ok(()) => {
                    self.held.endpoints.remove(&e);
                }
                Err(err) => {
                    tracing::warn!(id = e.id, addr = %e.addr, error = %err, "deleting an MPTCP endpoint")
                }
            }
        }
        for r in c.del_rules {
            match self.nl.del_rule(&r.rule()).await {
                Ok(()) => {
                    self.held.rules.remove(&r);
                }
                Err(e) => tracing::warn!(error = %e, "deleting a source rule"),
            }
        }
        for r in c.del_routes {
            match self.nl.del_route(&r.route()).await {
                Ok(()) => {
                    self.held.routes.remove(&r);
                }
                Err(e) => tracing::warn!(error = %e, "deleting an uplink route"),
            }
        }
        for r in c.add_routes {
            match self.nl.add_route(&r.route()).await {
                Ok(()) => {
                    self.held.routes.insert(r);
                }
                Err(e) => tracing::warn!(error = %e, "adding an uplink route"),
            }
        }
        for r in c.add_rules {
            match self.nl.add_rule(&r.rule()).await {
                Ok(()) => {
                    self.held.rules.insert(r);
                }
                Err(e) => tracing::warn!(error = %e, "adding a source rule"),
            }
        }
        for e in c.add_endpoints {
            let ep = Endpoint {
                id: e.id,
                addr: e.addr,
                port: None,
                flags: EndpointFlags {
                    subflow: true,
                    backup: e.backup,
                    // A subflow to every address the converter is known by, not only to the
                    // one the connection started with: a converter that announces its own
                    // address and refuses joins to the first (the C flag: several converters
                    // behind one address) gets a subflow from every uplink. Without fullmesh
                    // the kernel opens one join there, from the first uplink only. Not the
                    // default: on for every gateway, two tests towards ordinary converters
                    // failed, not explained yet (docs/architecture.md).
                    fullmesh: self.cfg.fullmesh,
                    ..EndpointFlags::default()
                },
                ifindex: Some(e.ifindex),
            };
            match self.pm.add_endpoint(&ep).await {
                Ok(()) => {
                    self.held.endpoints.insert(e);
                }
                Err(err) => {
                    tracing::warn!(endpoint = %ep, error = %err, "adding an MPTCP endpoint")
                }
            }
        }
    }

    /// Sets, once each and while an uplink is up, the namespace settings the uplinks need,
    /// all in one turn with the ledger, which records the old values:
    /// - the MPTCP limits ([`LIMITS`]);
    /// - `net.mptcp.stale_loss_cnt`: after that many MPTCP-level retransmission intervals with
    ///   data outstanding and no progress, the kernel's scheduler ignores a subflow (default
    ///   4). Measured on a blackholed uplink carrying a connection's first subflow (20 Mbit/s
    ///   10 ms + 30 Mbit/s 40 ms, a 4 Mbit/s stream, set in both namespaces): longest stall
    ///   median 0.99 s with 4, 0.69 s with 2; `tcp_rto_min_us` = 50 ms instead gave
    ///   0.69–0.92 s and touches all of the router's TCP;
    /// - `rp_filter` of each uplink: strict (1) drops the replies of a subflow whose address is
    ///   not the one the main table would use towards the converter, so loose (2).
    async fn claim_settings(&mut self, up: &[&str]) {
        let limits = !up.is_empty() && !self.claimed.limits;
        let stale = self
            .cfg
            .health
            .stale_loss_cnt
            .filter(|_| !up.is_empty() && !self.claimed.stale_loss_cnt);
        let rp: Vec<&str> = up
            .iter()
            .copied()
            .filter(|i| !self.claimed.rp_filter.contains(*i))
            .collect();
        if !limits && stale.is_none() && rp.is_empty() {
            return;
        }
        let mut ledger = match Session::open(&self.cfg.state_dir).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the MPTCP limits, stale_loss_cnt and rp_filter are left as they are"
                );
                return;
            }
        };
        if limits {
            match ledger.limits(LIMITS).await {
                Ok(change) => {
                    if let Change::Set { from, .. } = change {
                        tracing::info!(
                            subflows = LIMITS.subflows,
                            add_addr_accepted = LIMITS.add_addr_accepted,
                            was = from,
                            "set MPTCP limits"
                        );
                    }
                    self.claimed.limits = true;
                }
                Err(e) => tracing::warn!(error = format!("{e:#}"), "setting the MPTCP limits"),
            }
        }
        if let Some(want) = stale {
            match ledger.sysctl(ledger::STALE_LOSS_CNT, |_| Ok(want.to_string())) {
                Ok(change) => {
                    if let Change::Set { from, to } = change {
                        tracing::info!(was = from, now = to, "set net.mptcp.stale_loss_cnt");
                    }
                    self.claimed.stale_loss_cnt = true;
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "could not set net.mptcp.stale_loss_cnt"
                ),
            }
        }
        for interface in rp {
            let loose = |v: &str| Ok(if v == "1" { "2" } else { v }.to_string());
            match ledger.sysctl(&ledger::rp_filter(interface), loose) {
                Ok(change) => {
                    if change != Change::Unchanged {
                        tracing::info!(interface, "rp_filter set to loose (2)");
                    }
                    self.claimed.rp_filter.insert(interface.to_string());
                }
                Err(e) => tracing::warn!(
                    interface,
                    error = format!("{e:#}"),
                    "could not loosen rp_filter"
                ),
            }
        }
    }

    async fn undo(mut self) {
        let all = self.held.changes(&Programmed::default());
        self.apply(all).await;
        tracing::info!("uplink routes, rules and endpoints removed");
    }
}

fn log_transition(stats: &super::stats::Stats, u: &Uplink, t: &health::Transition) {
    tracing::info!(
        uplink = %u.name,
        interface = %u.interface,
        from = t.from.as_str(),
        to = t.to.as_str(),
        reason = %t.reason,
        "uplink health"
    );
    stats
        .uplink_health_changes
        .get_or_create(&super::stats::UplinkHealth {
            uplink: u.name.clone(),
            health: t.to.as_str(),
        })
        .inc();
}

/// Removes every route, rule and endpoint in braid's ranges: the leftovers of a run that did
/// not exit cleanly (the settings it changed are the ledger's, put back at the daemon's start).
async fn cleanup(nl: &Rtnl, pm: &mut PathManager, n: Numbers) {
    let mut removed = 0usize;
    if let Ok(rules) = nl.rules().await {
        for r in rules
            .iter()
            .filter(|r| n.owns_table(r.table) && r.priority == r.table)
        {
            removed += usize::from(nl.del_rule(r).await.is_ok());
        }
    }
    if let Ok(routes) = nl.routes().await {
        for r in routes.iter().filter(|r| n.owns_table(r.table)) {
            removed += usize::from(nl.del_route(r).await.is_ok());
        }
    }
    if let Ok(eps) = pm.endpoints().await {
        for e in eps
            .iter()
            .filter(|e| n.owns_endpoint(e.id) && e.flags.subflow && !e.flags.signal)
        {
            removed += usize::from(pm.delete_endpoint(e.id).await.is_ok());
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            "removed uplink routes, rules and endpoints an earlier run left"
        );
    }
}
