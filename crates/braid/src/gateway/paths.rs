//! The gateway's uplinks, programmed into the kernel and kept so: a thin loop around
//! [`super::uplinks`]. It reads links, addresses and routes over rtnetlink, decides, applies the
//! difference (routes, rules over rtnetlink; endpoints over the MPTCP generic netlink family),
//! and waits for the next change the kernel reports (or a periodic re-read, in case an event
//! was lost). What it decided is published for the connections (which source to start from)
//! and for `braid status`.
//!
//! Undone exactly: at exit every route, rule and endpoint it added is removed, the MPTCP
//! limits and the `rp_filter` values it changed are put back. After a crash the next start
//! finds its objects by their numbers (tables, rule priorities and endpoint ids in braid's
//! ranges) and the values to restore in a state file under `/run/braid`, one per network
//! namespace; nothing braid did not add is touched.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use braid_sys::pm::{Endpoint, EndpointFlags, PathManager, PmLimits};
use braid_sys::rtnl::Rtnl;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::uplinks::{self, Numbers, Observed, Programmed, Selection, Slots, State, Uplink};

/// Re-read everything this often even without events.
const RESYNC: Duration = Duration::from_secs(10);
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
    /// Where the state file lives (`/run/braid`).
    pub state_dir: PathBuf,
}

/// What the daemon changed that is not found again by its number: the values to put back.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Restore {
    limits: Option<(u32, u32)>,
    /// `net.ipv4.conf.<if>.rp_filter` before braid loosened it.
    rp_filter: BTreeMap<String, String>,
}

/// Bits per second through an interface over the last second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub rx_bps: f64,
    pub tx_bps: f64,
}

/// The running uplink manager: its published view, and how to stop it.
#[derive(Debug)]
pub struct Paths {
    pub uplinks: watch::Receiver<Vec<Uplink>>,
    /// Per interface of an uplink.
    pub rates: Arc<Mutex<HashMap<String, Rates>>>,
    task: tokio::task::JoinHandle<()>,
    sampler: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

/// What the rest of the gateway reads of the uplinks: their state and their rates.
#[derive(Debug, Clone)]
pub struct View {
    pub uplinks: watch::Receiver<Vec<Uplink>>,
    pub rates: Arc<Mutex<HashMap<String, Rates>>>,
}

impl Paths {
    pub fn view(&self) -> View {
        View {
            uplinks: self.uplinks.clone(),
            rates: self.rates.clone(),
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
        let state = StateFile::for_this_namespace(&cfg.state_dir);
        cleanup(&nl, &mut pm, cfg.numbers, &state).await;
        let changes = braid_sys::rtnl::changes().context("subscribing to rtnetlink events")?;
        let (tx, rx) = watch::channel(Vec::new());
        let stop = CancellationToken::new();
        let rates = Arc::new(Mutex::new(HashMap::new()));
        let sampler = tokio::spawn(sample(
            nl.clone(),
            rx.clone(),
            rates.clone(),
            stats,
            registry,
            stop.clone(),
        ));
        let mut m = Manager {
            cfg,
            nl,
            pm,
            state,
            slots: Slots::default(),
            held: Programmed::default(),
            restore: Restore::default(),
            published: tx,
        };
        // The first round runs before start returns: connections opened right after see the
        // uplinks.
        let mut read = m.round().await;
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut changes = Some(changes);
            loop {
                let event = async {
                    match changes.as_mut() {
                        Some(c) => c.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop2.cancelled() => break,
                    ev = event => {
                        if ev.is_none() {
                            tracing::warn!("rtnetlink events ended; re-reading every {RESYNC:?}");
                            changes = None;
                        }
                        tokio::time::sleep(SETTLE).await;
                    }
                    // A round that could not read the state is tried again soon.
                    _ = tokio::time::sleep(if read { RESYNC } else { SETTLE * 10 }) => {}
                }
                read = m.round().await;
            }
            m.undo().await;
        });
        Ok(Paths {
            uplinks: rx,
            rates,
            task,
            sampler,
            stop,
        })
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
    state: StateFile,
    slots: Slots,
    held: Programmed,
    restore: Restore,
    published: watch::Sender<Vec<Uplink>>,
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
        let obs = match self.observe().await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "reading links, addresses and routes");
                return false;
            }
        };
        let ups = uplinks::assess(&self.cfg.selection, &mut self.slots, &obs);
        self.log_changes(&ups);
        if ups.iter().any(|u| u.state == State::Up) {
            self.ensure_limits().await;
        }
        for u in ups.iter().filter(|u| u.state == State::Up) {
            self.loosen_rp_filter(&u.interface);
        }
        let want = uplinks::desired(&ups, self.cfg.numbers);
        let changes = self.held.changes(&want);
        if !changes.is_empty() {
            self.apply(changes).await;
        }
        self.published.send_replace(ups);
        true
    }

    fn log_changes(&self, now: &[Uplink]) {
        let before = self.published.borrow();
        for u in now {
            let old = before.iter().find(|b| b.interface == u.interface);
            if old.map(|o| (o.state, &o.paths)) != Some((u.state, &u.paths)) {
                let addrs: Vec<String> = u.paths.iter().map(|p| p.addr.to_string()).collect();
                let chosen = match self.cfg.selection {
                    Selection::Listed(_) => "listed",
                    Selection::Auto { .. } => "it has a default route",
                };
                tracing::info!(
                    uplink = %u.name,
                    interface = %u.interface,
                    state = u.state.as_str(),
                    addresses = %addrs.join(","),
                    backup = u.backup,
                    chosen,
                    "uplink"
                );
            }
        }
    }

    async fn apply(&mut self, c: uplinks::Changes) {
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

    /// Raises the MPTCP limits once, remembering the old ones.
    async fn ensure_limits(&mut self) {
        if self.restore.limits.is_some() {
            return;
        }
        match self.pm.limits().await {
            Ok(old) if old == LIMITS => {}
            Ok(old) => match self.pm.set_limits(LIMITS).await {
                Ok(()) => {
                    tracing::info!(
                        subflows = LIMITS.subflows,
                        add_addr_accepted = LIMITS.add_addr_accepted,
                        was = format!("{} {}", old.subflows, old.add_addr_accepted),
                        "set MPTCP limits"
                    );
                    self.restore.limits = Some((old.subflows, old.add_addr_accepted));
                    self.state.save(&self.restore);
                }
                Err(e) => tracing::warn!(error = %e, "setting the MPTCP limits"),
            },
            Err(e) => tracing::warn!(error = %e, "reading the MPTCP limits"),
        }
    }

    /// Strict reverse-path filtering (1) drops the replies of a subflow whose address is not
    /// the one the main table would use towards the converter: loose (2) on every uplink.
    fn loosen_rp_filter(&mut self, interface: &str) {
        if self.restore.rp_filter.contains_key(interface) {
            return;
        }
        let key = format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter");
        match std::fs::read_to_string(&key) {
            Ok(v) if v.trim() == "1" => match std::fs::write(&key, "2") {
                Ok(()) => {
                    tracing::info!(interface, "rp_filter set to loose (2)");
                    self.restore
                        .rp_filter
                        .insert(interface.to_string(), v.trim().to_string());
                    self.state.save(&self.restore);
                }
                Err(e) => tracing::warn!(interface, error = %e, "could not loosen rp_filter"),
            },
            _ => {}
        }
    }

    async fn undo(mut self) {
        let all = self.held.changes(&Programmed::default());
        self.apply(all).await;
        restore(&mut self.pm, &self.restore).await;
        self.state.remove();
        tracing::info!("uplink routes, rules and endpoints removed");
    }
}

/// Puts back the limits and sysctls braid changed.
async fn restore(pm: &mut PathManager, r: &Restore) {
    if let Some((subflows, add_addr_accepted)) = r.limits {
        let old = PmLimits {
            subflows,
            add_addr_accepted,
        };
        if let Err(e) = pm.set_limits(old).await {
            tracing::warn!(error = %e, "restoring the MPTCP limits");
        }
    }
    for (interface, value) in &r.rp_filter {
        // The interface may be gone; then so is its setting.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter"),
            value,
        );
    }
}

/// Removes every route, rule and endpoint in braid's ranges and restores what a state file
/// left behind says: the leftovers of a run that did not exit cleanly.
async fn cleanup(nl: &Rtnl, pm: &mut PathManager, n: Numbers, state: &StateFile) {
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
    if let Some(r) = state.load() {
        restore(pm, &r).await;
        removed += 1;
    }
    state.remove();
    if removed > 0 {
        tracing::info!(
            removed,
            "removed uplink routes, rules and endpoints an earlier run left"
        );
    }
}

/// `/run/braid/gateway-<netns inode>.json`: the values to restore, per network namespace (two
/// gateways in two namespaces must not share one).
#[derive(Debug)]
struct StateFile(PathBuf);

impl StateFile {
    fn for_this_namespace(dir: &std::path::Path) -> StateFile {
        use std::os::unix::fs::MetadataExt;
        let ns = std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        StateFile(dir.join(format!("gateway-{ns}.json")))
    }

    fn load(&self) -> Option<Restore> {
        let text = std::fs::read_to_string(&self.0).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, r: &Restore) {
        let write = || -> io::Result<()> {
            if let Some(dir) = self.0.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.0.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(r).map_err(io::Error::other)?)?;
            std::fs::rename(&tmp, &self.0)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %self.0.display(), error = %e, "could not save what to restore after a crash");
        }
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
