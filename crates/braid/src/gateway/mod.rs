//! `braid gateway`: the user-side daemon. It captures TCP connections — transparently with
//! nftables TPROXY or REDIRECT, or through a SOCKS5 front — and carries each over MPTCP to a
//! converter with the Convert protocol, the request and the application's first bytes in the
//! SYN.
//!
//! - [`config`]: file + flags → validated settings;
//! - [`capture`]: braid's own nftables table (and, for TPROXY, policy routing via
//!   `braid_sys::route`), removed on exit and replaced after a crash;
//! - [`converters`]: the ordered converter list with back-off and cookies;
//! - [`conn`]: one captured connection, transparent or SOCKS5; [`socks`]: the SOCKS5
//!   exchange and its reply codes;
//! - [`uplinks`]: which interfaces are uplinks and what the kernel must hold for them (pure);
//!   [`health`]: each uplink's health and role from probes and its subflows (pure);
//!   [`paths`]: the loop that observes, probes, decides and programs them over netlink;
//! - [`stats`]: Prometheus metrics.

pub mod capture;
pub mod config;
pub mod conn;
pub mod converters;
pub mod health;
pub mod paths;
pub mod socks;
pub mod stats;
pub mod uplinks;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use braid_sys::SocketSpec;
use braid_sys::kernel::{self, TfoMode};
use socket2::SockRef;
use tokio::net::TcpListener;

use crate::client::ClientOptions;
use crate::daemon::{Daemon, Role};
use crate::logging::LogFormat;
use capture::TransparentMode;
use config::Settings;
use conn::{Mode, Shared};

impl Role for Settings {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }

    fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    fn relay(&self) -> &crate::relay::RelayConfig {
        &self.relay
    }

    async fn run(self, daemon: Daemon, reload: crate::daemon::Reload<Self>) -> anyhow::Result<()> {
        run(self, daemon, reload).await
    }
}

async fn check_kernel(s: &Settings) -> anyhow::Result<()> {
    kernel::check_mptcp().context("the gateway carries connections over MPTCP")?;
    if s.fast_open {
        crate::daemon::ensure_tfo(
            &s.state_dir,
            TfoMode::CLIENT,
            "the client bit",
            true,
            "the gateway needs the client bit (0x1) to send the Convert request in the SYN",
        )
        .await?;
    }
    if s.uplinks.is_none() {
        // The system's own path management, then: say so if it can give only one path.
        let mut pm = braid_sys::pm::PathManager::new().context("opening the MPTCP path manager")?;
        let limits = pm.limits().await.context("reading the MPTCP limits")?;
        let subflow_endpoints = pm
            .endpoints()
            .await
            .map(|eps| eps.iter().filter(|e| e.flags.subflow).count())
            .unwrap_or(0);
        if limits.subflows == 0 || subflow_endpoints == 0 {
            tracing::warn!(
                subflows = limits.subflows,
                subflow_endpoints,
                "manage_uplinks is off and connections will use one path only: add a `subflow` \
                 endpoint per extra uplink (`ip mptcp endpoint add ADDR dev IFACE subflow`) and \
                 raise the limit (`ip mptcp limits set subflows 8 add_addr_accepted 8`)"
            );
        }
    }
    crate::daemon::check_congestion_control(s.congestion_control.as_deref())
}

/// Listeners for transparent capture, one per family: with TPROXY the sockets are
/// `IP_TRANSPARENT`, so the kernel hands them connections addressed to anywhere.
fn transparent_listeners(mode: TransparentMode, port: u16) -> anyhow::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let spec = SocketSpec {
            reuse_address: true,
            only_v6: Some(true),
            transparent: mode == TransparentMode::Tproxy,
            ..SocketSpec::default()
        };
        let addr: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        match spec.listen(addr, 4096) {
            Ok(l) => out.push(TcpListener::from_std(l)?),
            Err(e) if v6 && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                tracing::warn!("no IPv6 here: capturing IPv4 only");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("the capture listener on {addr}"));
            }
        }
    }
    Ok(out)
}

async fn run(
    settings: Settings,
    daemon: Daemon,
    reload: crate::daemon::Reload<Settings>,
) -> anyhow::Result<()> {
    check_kernel(&settings).await?;

    let mut transparent = Vec::new();
    if let Some(mode) = settings.transparent {
        for l in transparent_listeners(mode, settings.transparent_port)? {
            transparent.push((mode, l));
        }
    }
    let socks = match settings.socks5 {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("SOCKS5 listener on {addr}"))?,
        ),
        None => None,
    };
    let stats = stats::Stats::default();
    let registry = Arc::new(crate::status::Registry::default());
    // Shared with the uplinks' probes, which ask the converter connections would use now.
    let converter_list = Arc::new(converters::Converters::new(
        settings.converters.clone(),
        settings.default_backoff,
    ));
    let paths = match &settings.uplinks {
        Some(selection) => {
            let p = paths::Paths::start(
                paths::PathsConfig {
                    selection: selection.clone(),
                    numbers: settings.uplink_numbers,
                    state_dir: settings.state_dir.clone(),
                    health: settings.health.clone(),
                    converters: converter_list.clone(),
                    mark: settings
                        .capture_output
                        .then(|| capture::own_mark(settings.fwmark)),
                    fullmesh: settings.fullmesh,
                },
                stats.clone(),
                registry.clone(),
            )
            .await
            .context("managing the uplinks")?;
            let found = p.uplinks.borrow().len();
            if found == 0 {
                tracing::warn!(
                    "no uplink found: no interface has a default route (list them with \
                     [[uplink]] or --uplink); connections use the main routing table"
                );
            }
            Some(p)
        }
        None => None,
    };
    let capture = match settings.transparent {
        Some(mode) => Some(
            capture::install(&settings, mode)
                .context("installing the capture rules (nftables, policy routing)")?,
        ),
        None => None,
    };

    let client = ClientOptions {
        fast_open: settings.fast_open,
        timeout: settings.connect_timeout,
        congestion_control: settings.congestion_control.clone(),
        mark: settings
            .capture_output
            .then(|| capture::own_mark(settings.fwmark)),
        // An IPv6 socket even to an IPv4 converter: only then can IPv6 subflows join when
        // the converter announces an IPv6 address.
        dual_stack: true,
        sndbuf: settings.mptcp_send_buffer.fixed(),
        ..ClientOptions::default()
    };
    let shared = Arc::new(Shared {
        converters: converter_list.clone(),
        client,
        uplinks: paths.as_ref().map(|p| p.uplinks.clone()),
        stats,
        registry,
        hard_stop: daemon.hard_stop().clone(),
        settings,
    });

    daemon
        .serve_metrics(shared.settings.metrics, |r| shared.stats.register(r))
        .await?;
    {
        let registry = shared.registry.clone();
        let view = paths.as_ref().map(paths::Paths::view);
        daemon.serve_status("gateway", move || status(&registry, view.as_ref()));
    }
    for (mode, l) in transparent {
        tracing::info!(addr = %l.local_addr()?, ?mode, "listening (transparent capture)");
        let shared = shared.clone();
        daemon.accept(l, move |stream, peer| {
            serve_captured(stream, peer, mode, shared.clone())
        });
    }
    if let Some(l) = socks {
        tracing::info!(addr = %l.local_addr()?, "listening (SOCKS5)");
        let shared = shared.clone();
        daemon.accept(l, move |stream, peer| {
            conn::serve_socks(stream, unmap(peer), shared.clone())
        });
    }
    tracing::info!(converters = ?shared.settings.converters, "gateway running");
    let stop = daemon.signals()?;
    let mut hangups = daemon.hangups()?;
    let paths = paths.map(Arc::new);
    {
        let (paths, d) = (paths.clone(), daemon.clone());
        let mut current = shared.settings.clone();
        daemon.spawn_until_stop(|cancel| async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = hangups.recv() => {
                        d.reloading();
                        apply_reload(paths.as_deref(), &mut current, reload()).await;
                        d.ready("gateway running");
                    }
                }
            }
        });
    }
    daemon.ready("gateway running");
    stop.await;
    // New connections go direct from here on; running ones drain.
    drop(capture);
    tracing::info!(
        active = shared.stats.active.get(),
        "stopping: capture removed, draining"
    );
    daemon.drain(shared.settings.drain_timeout).await;
    // The reload task ended with the drain: this is the last reference.
    if let Some(p) = paths.and_then(|p| {
        Arc::try_unwrap(p)
            .map_err(|_| tracing::error!("uplinks still in use at exit: left for the next start"))
            .ok()
    }) {
        p.stop().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: the uplinks (`[[uplink]]`: which, their names, backup) and `[health]` apply at
/// once, connections go on (an uplink no longer listed loses its endpoint like a dead one);
/// every other key takes a restart, and the log names them. A file that does not validate
/// changes nothing.
async fn apply_reload(
    paths: Option<&paths::Paths>,
    current: &mut Settings,
    new: Result<Settings, crate::config::ConfigError>,
) {
    let Some(new) = crate::daemon::reloaded(new) else {
        return;
    };
    // Managing the uplinks or not is decided at start: only a managing gateway takes a new
    // list.
    let took_uplinks = match (paths, &new.uplinks) {
        (Some(p), Some(selection)) => {
            p.reconfigure(selection.clone(), new.health.clone()).await;
            true
        }
        _ => false,
    };
    let applied = Settings {
        health: new.health.clone(),
        uplinks: if took_uplinks {
            new.uplinks.clone()
        } else {
            current.uplinks.clone()
        },
        ..current.clone()
    };
    let restart = crate::daemon::differing_fields(
        &applied,
        &Settings {
            health: applied.health.clone(),
            uplinks: if took_uplinks {
                applied.uplinks.clone()
            } else {
                new.uplinks.clone()
            },
            ..new
        },
    );
    crate::daemon::log_reload("uplinks and health", &restart);
    *current = applied;
}

/// What `braid status` shows of the gateway: its uplinks (rates over the last second, the
/// subflows each carries) and its connections, each subflow named by its uplink.
fn status(registry: &crate::status::Registry, view: Option<&paths::View>) -> crate::status::Status {
    let mut connections = registry.snapshot();
    let ups = view.map(|v| v.uplinks.borrow().clone()).unwrap_or_default();
    let rates = view
        .map(|v| v.rates.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default();
    let health = view
        .map(|v| v.health.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default();
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for c in &mut connections {
        for sf in &mut c.subflows {
            sf.uplink = paths::uplink_of(&ups, sf.local.ip()).map(str::to_string);
            if let Some(u) = &sf.uplink {
                *counts.entry(u.clone()).or_default() += 1;
            }
        }
    }
    crate::status::Status {
        role: "gateway".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uplinks: ups
            .iter()
            .map(|u| {
                let r = rates.get(&u.interface).copied().unwrap_or_default();
                let h = health.get(&u.interface);
                crate::status::UplinkStatus {
                    health: u.health.as_str().into(),
                    health_reason: h.map(|h| h.reason.clone()).unwrap_or_default(),
                    health_secs: h.map_or(0.0, |h| h.since.elapsed().as_secs_f64()),
                    role: u.role.as_str().into(),
                    probe_rtt_ms: h.and_then(|h| h.probe_rtt).map(|d| d.as_secs_f64() * 1e3),
                    probes_sent: h.map_or(0, |h| h.probes_sent),
                    probes_answered: h.map_or(0, |h| h.probes_answered),
                    name: u.name.clone(),
                    interface: u.interface.clone(),
                    state: u.state.as_str().into(),
                    backup: u.backup,
                    addresses: u.paths.iter().map(|p| p.addr).collect(),
                    rx_bps: r.rx_bps,
                    tx_bps: r.tx_bps,
                    subflows: counts.get(&u.name).copied().unwrap_or(0),
                }
            })
            .collect(),
        connections,
    }
}

/// A transparently captured connection: find where it was going, then serve it.
async fn serve_captured(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    mode: TransparentMode,
    shared: Arc<Shared>,
) {
    let dest = match mode {
        // TPROXY keeps the original destination as the socket's local address.
        TransparentMode::Tproxy => stream.local_addr(),
        TransparentMode::Redirect => original_dst(&stream, peer),
    };
    let Ok(dest) = dest else {
        tracing::warn!(%peer, "captured connection without a destination");
        return;
    };
    let m = match mode {
        TransparentMode::Tproxy => Mode::Tproxy,
        TransparentMode::Redirect => Mode::Redirect,
    };
    conn::serve_transparent(stream, unmap(peer), unmap(dest), m, shared).await;
}

/// `SO_ORIGINAL_DST`: where a REDIRECTed connection was going.
fn original_dst(stream: &tokio::net::TcpStream, peer: SocketAddr) -> std::io::Result<SocketAddr> {
    let s = SockRef::from(stream);
    let addr = if peer.is_ipv4() {
        s.original_dst_v4()?
    } else {
        s.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// IPv4-mapped IPv6 addresses as plain IPv4 (dual-stack sockets report them so).
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}
