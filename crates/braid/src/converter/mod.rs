//! `braid converter`: the RFC 8803 Transport Converter daemon.
//!
//! - [`config`]: file + flags → validated [`config::Settings`].
//! - [`policy`]: which clients and destinations are allowed; [`cookie`]: Convert cookies;
//!   [`limits`]: what one client and all of them may cost.
//! - [`handshake`]: the decisions about one connection (admit, refuse with which Error, answer
//!   Info, connect), pure functions with unit tests; [`wire`]: the codec calls it makes.
//! - [`listener`]: MPTCP + TFO listening sockets; [`conn`]: one connection from accept to
//!   close, the I/O around the decisions; [`upstream`]: the TCP connect to the server and its
//!   error mapping.
//! - [`pathmgr`]: MPTCP limits, announced addresses, the C flag.
//! - [`stats`]: Prometheus metrics.

pub mod config;
pub mod conn;
pub mod cookie;
pub mod handshake;
pub mod limits;
pub mod listener;
pub mod pathmgr;
pub mod policy;
pub mod stats;
pub mod upstream;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use braid_sys::kernel::{self, TfoMode};
use tokio::net::TcpListener;

use crate::daemon::{Daemon, Role};
use crate::logging::LogFormat;
use config::Settings;
use conn::Shared;

/// How often the converter re-reads its own interface addresses (refused as destinations).
const OWN_ADDRESS_REFRESH: Duration = Duration::from_secs(10);

impl Role for Settings {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }

    /// Running out of descriptors mid-connection helps nobody: cap the connection count so
    /// that the limit answers with Error 64 first.
    fn fit_fd_limit(&mut self, fd_limit: u64) {
        let (pending, connections) = fit_fds(
            fd_limit,
            self.max_pending_handshakes,
            self.max_connections,
            fds_per_connection(self),
        );
        if pending < self.max_pending_handshakes {
            tracing::warn!(
                fd_limit,
                max_pending_handshakes = self.max_pending_handshakes,
                effective = pending,
                "the open-file limit allows fewer pending handshakes than max_pending_handshakes \
                 (they may take a quarter of it); raise it (systemd: LimitNOFILE=, shell: \
                 ulimit -n) to use the configured value"
            );
            self.max_pending_handshakes = pending;
        }
        if connections < self.max_connections {
            tracing::warn!(
                fd_limit,
                max_connections = self.max_connections,
                effective = connections,
                "the open-file limit allows fewer connections than max_connections; raise it \
                 (systemd: LimitNOFILE=, shell: ulimit -n) to use the configured value"
            );
            self.max_connections = connections;
        }
    }

    fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    fn relay(&self) -> &crate::relay::RelayConfig {
        &self.relay
    }

    /// Announced addresses are withdrawn and the settings put back after this returns, well or
    /// not ([`crate::daemon::main`]).
    async fn run(self, daemon: Daemon, reload: crate::daemon::Reload<Self>) -> anyhow::Result<()> {
        check_kernel(&self).await?;
        if !self.tcp_only {
            pathmgr::setup(&self).await?;
        }
        serve(self, daemon, reload).await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// SIGHUP: the policy (clients, destinations, ports) and the cookies take effect for new
/// connections at once; running connections keep going. Keys that shape sockets, listeners
/// and limits need a restart, and say so. A file that does not validate changes nothing.
fn apply_reload(
    shared: &Shared,
    current: &mut Settings,
    new: Result<Settings, crate::config::ConfigError>,
) {
    let Some(new) = crate::daemon::reloaded(new) else {
        return;
    };
    let restart = restart_needed(current, &new);
    let policy = Arc::new(policy::Policy::new(&new));
    policy.set_own_addresses(policy::local_addresses());
    *shared.policy.write().unwrap_or_else(|e| e.into_inner()) = policy;
    // The same cookie settings keep the same jar: cookies handed out stay valid.
    if (new.cookies, &new.cookie_secret) != (current.cookies, &current.cookie_secret) {
        *shared.cookies.write().unwrap_or_else(|e| e.into_inner()) = new
            .cookies
            .then(|| Arc::new(cookie::CookieJar::new(new.cookie_secret.clone())));
    }
    crate::daemon::log_reload("policy and cookies", &restart);
    // What runs now: the policy and cookies of `new`, the rest as started (so that the next
    // reload compares against what runs).
    *current = with_reloaded(current, &new);
}

/// `base` with the keys a reload applies (policy and cookies) taken from `from`.
fn with_reloaded(base: &Settings, from: &Settings) -> Settings {
    Settings {
        allow_client: from.allow_client.clone(),
        allow_any_client: from.allow_any_client,
        allow_dest: from.allow_dest.clone(),
        deny_dest: from.deny_dest.clone(),
        allow_ports: from.allow_ports.clone(),
        deny_ports: from.deny_ports.clone(),
        allow_loopback_dest: from.allow_loopback_dest,
        cookies: from.cookies,
        cookie_secret: from.cookie_secret.clone(),
        ..base.clone()
    }
}

/// The keys whose change a reload cannot apply: every key but the policy and the cookies
/// (a key added later needs a restart unless it is added to [`with_reloaded`]).
fn restart_needed(old: &Settings, new: &Settings) -> Vec<String> {
    crate::daemon::differing_fields(old, &with_reloaded(new, old))
}

/// Descriptors one relayed connection holds: two sockets, plus two pipes for splice.
/// How many pending handshakes and connections fit into `fd_limit` descriptors: 256 are kept
/// for listeners, metrics and the like; refusals being delivered hold a socket each beyond the
/// connections (up to the pending handshakes), which may take at most a quarter of the rest, so
/// that a large `max_pending_handshakes` cannot leave no room for connections (it did: 100,000
/// pending handshakes under a 20,000 limit made the converter refuse every connection).
fn fit_fds(
    fd_limit: u64,
    pending: usize,
    connections: usize,
    per_connection: u64,
) -> (usize, usize) {
    let usable = fd_limit.saturating_sub(256);
    // Both results are at most their usize inputs, so the conversions back cannot fail.
    let pending = (pending as u64).min(usable / 4);
    let fits = usable.saturating_sub(pending) / per_connection;
    let connections = (connections as u64).min(fits).max(1);
    (pending as usize, connections as usize)
}

fn fds_per_connection(s: &Settings) -> u64 {
    match s.relay.engine {
        crate::relay::Engine::Copy => 2,
        // One pipe: only the direction read from TCP splices.
        crate::relay::Engine::Auto => 4,
        crate::relay::Engine::Splice => 6,
    }
}

async fn check_kernel(s: &Settings) -> anyhow::Result<()> {
    if s.tcp_only {
        tracing::warn!("--tcp-only: listening with plain TCP; clients get no multipath");
    } else {
        kernel::check_mptcp().context("MPTCP is needed (or run with --tcp-only)")?;
    }
    crate::daemon::ensure_tfo(
        &s.state_dir,
        TfoMode::SERVER,
        "the server bit",
        s.set_sysctls,
        "the converter needs the server bit (0x2) to accept the Convert request in the SYN",
    )
    .await?;
    crate::daemon::check_congestion_control(s.congestion_control.as_deref())
}

async fn serve(
    settings: Settings,
    daemon: Daemon,
    reload: crate::daemon::Reload<Settings>,
) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for addr in &settings.listen {
        let std_listener = listener::bind(*addr, !settings.tcp_only, settings.tfo_queue)
            .with_context(|| format!("listening on {addr}"))?;
        listeners.push((*addr, TcpListener::from_std(std_listener)?));
    }
    let ports: Vec<u16> = settings.listen.iter().map(SocketAddr::port).collect();
    let _window_fix = if settings.tfo_window_fix && !settings.tcp_only {
        Some(crate::tfo_fix::install(&ports).context("installing the TFO SYN-window rule")?)
    } else {
        None
    };

    let stats = stats::Stats::default();
    let shared = Arc::new(Shared {
        policy: std::sync::RwLock::new(Arc::new(policy::Policy::new(&settings))),
        cookies: std::sync::RwLock::new(
            settings
                .cookies
                .then(|| Arc::new(cookie::CookieJar::new(settings.cookie_secret.clone()))),
        ),
        limits: limits::Limits::new(
            limits::LimitConfig {
                max_total: settings.max_connections,
                max_per_client: settings.max_connections_per_client,
                max_pending: settings.max_pending_handshakes,
                max_pending_per_prefix: settings.max_pending_per_prefix,
                max_connecting_per_prefix: settings.max_connecting_per_prefix,
                prefix_v4: settings.client_prefix_v4,
                prefix_v6: settings.client_prefix_v6,
            },
            stats.pending_handshakes.clone(),
        ),
        stats,
        hard_stop: daemon.hard_stop().clone(),
        registry: Arc::default(),
        settings,
    });
    shared.policy().set_own_addresses(policy::local_addresses());

    daemon
        .serve_metrics(shared.settings.metrics, |r| shared.stats.register(r))
        .await?;
    {
        let registry = shared.registry.clone();
        daemon.serve_status("converter", move || crate::status::Status {
            role: "converter".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            uplinks: Vec::new(),
            connections: registry.snapshot(),
        });
    }
    for (addr, l) in listeners {
        tracing::info!(%addr, mptcp = !shared.settings.tcp_only, "listening");
        let shared = shared.clone();
        daemon.accept(l, move |stream, peer| {
            conn::serve(stream, peer, shared.clone())
        });
    }
    {
        let shared = shared.clone();
        daemon.spawn_until_stop(|stop| async move {
            let mut tick = tokio::time::interval(OWN_ADDRESS_REFRESH);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => shared.policy().set_own_addresses(policy::local_addresses()),
                }
            }
        });
    }

    let stop = daemon.signals()?;
    let mut hangups = daemon.hangups()?;
    {
        let (shared, d) = (shared.clone(), daemon.clone());
        daemon.spawn_until_stop(|cancel| async move {
            let mut current = shared.settings.clone();
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = hangups.recv() => {
                        d.reloading();
                        apply_reload(&shared, &mut current, reload());
                        d.ready("listening");
                    }
                }
            }
        });
    }
    daemon.ready("listening");
    stop.await;
    tracing::info!(
        active = shared.limits.active(),
        deadline_secs = shared.settings.drain_timeout.as_secs(),
        "stopping: no new connections, draining"
    );
    daemon.drain(shared.settings.drain_timeout).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_shared_between_pending_handshakes_and_connections() {
        // Plenty: nothing changes.
        assert_eq!(fit_fds(1 << 20, 4096, 10_000, 2), (4096, 10_000));
        // Tight: the connections get what the pending handshakes leave.
        assert_eq!(
            fit_fds(20_000, 4096, 100_000, 2),
            (4096, (20_000 - 256 - 4096) / 2)
        );
        // Pending handshakes beyond a quarter of the limit are cut, so connections still fit.
        let (p, c) = fit_fds(20_000, 100_000, 100_000, 2);
        assert_eq!(p, (20_000 - 256) / 4);
        assert_eq!(c, (20_000 - 256 - p) / 2);
        // Absurdly low: one connection, no pending slot beyond it.
        assert_eq!(fit_fds(100, 4096, 100, 2), (0, 1));
    }

    fn settings(extra: &str) -> Settings {
        let f: config::File =
            toml::from_str(&format!("allow_client = [\"10.0.0.0/8\"]\n{extra}")).expect("toml");
        Settings::validate(f, None).expect("valid")
    }

    #[test]
    fn a_reload_names_exactly_the_keys_that_take_a_restart() {
        let old = settings("");
        assert!(restart_needed(&old, &settings("deny_ports = [25]\ncookies = true")).is_empty());
        assert_eq!(
            restart_needed(&old, &settings("tfo_queue = 16\ndeny_ports = [25]")),
            ["tfo_queue"]
        );
        assert_eq!(
            restart_needed(
                &old,
                &settings("listen = [\"0.0.0.0:9\"]\ndrain_timeout_secs = 5")
            ),
            ["listen", "drain_timeout"]
        );
        let now = with_reloaded(&old, &settings("deny_ports = [25]\ntfo_queue = 16"));
        assert_eq!(
            (now.deny_ports.as_slice(), now.tfo_queue),
            (&[25][..], old.tfo_queue)
        );
    }
}
