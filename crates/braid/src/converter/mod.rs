//! `braid converter`: the RFC 8803 Transport Converter daemon.
//!
//! - [`config`]: file + flags → validated [`config::Settings`].
//! - [`policy`]: which clients and destinations are allowed; [`cookie`]: Convert cookies;
//!   [`limits`]: what one client and all of them may cost.
//! - [`listener`]: MPTCP + TFO listening sockets; [`conn`]: one connection from accept to
//!   close; [`upstream`]: the TCP connect to the server and its error mapping; [`wire`]: the
//!   codec calls the converter makes.
//! - [`stats`]: Prometheus metrics.

pub mod config;
pub mod conn;
pub mod cookie;
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
use braid_sys::kernel::{self, TfoChange, TfoMode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::ConverterArgs;
use config::Settings;
use conn::Shared;

/// How often the converter re-reads its own interface addresses (refused as destinations).
const OWN_ADDRESS_REFRESH: Duration = Duration::from_secs(10);

pub fn main(args: ConverterArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&args)?;
    if args.check_config {
        println!("configuration OK\n{settings:#?}");
        return Ok(());
    }
    crate::logging::init(settings.log_format);
    let mut settings = settings;
    let fd_limit = crate::daemon::raise_fd_limit();
    // Running out of descriptors mid-connection helps nobody: cap the connection count so
    // that the limit answers with Error 64 first.
    let fits = fd_limit.saturating_sub(256) / fds_per_connection(&settings);
    if (settings.max_connections as u64) > fits {
        tracing::warn!(
            fd_limit,
            max_connections = settings.max_connections,
            effective = fits,
            "the open-file limit allows fewer connections than max_connections; raise it \
             (systemd: LimitNOFILE=, shell: ulimit -n) to use the configured value"
        );
        settings.max_connections = fits.max(1) as usize;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(settings))
}

/// Descriptors one relayed connection holds: two sockets, plus two pipes for splice.
fn fds_per_connection(s: &Settings) -> u64 {
    match s.relay.engine {
        crate::relay::Engine::Copy => 2,
        crate::relay::Engine::Splice => 6,
    }
}

async fn check_kernel(s: &Settings) -> anyhow::Result<()> {
    if s.tcp_only {
        tracing::warn!("--tcp-only: listening with plain TCP; clients get no multipath");
    } else {
        kernel::check_mptcp().context("MPTCP is needed (or run with --tcp-only)")?;
    }
    match kernel::ensure_tfo(TfoMode::SERVER, "the server bit", s.set_sysctls)? {
        TfoChange::Unchanged => {}
        TfoChange::Set { from, to } => tracing::warn!(
            from = format!("{from:#x}"),
            to = format!("{to:#x}"),
            "set net.ipv4.tcp_fastopen: the converter needs the server bit (0x2) to accept \
             the Convert request in the SYN"
        ),
    }
    Ok(())
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    check_kernel(&settings).await?;
    let endpoints = if settings.tcp_only {
        pathmgr::Added::default()
    } else {
        pathmgr::setup(&settings).await?
    };
    // Announced addresses are withdrawn whether serving ended well or not.
    let result = serve(settings).await;
    pathmgr::cleanup(endpoints).await;
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
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

    let stop = CancellationToken::new();
    let shared = Arc::new(Shared {
        policy: policy::Policy::new(&settings),
        cookies: settings
            .cookies
            .then(|| cookie::CookieJar::new(settings.cookie_secret.clone())),
        limits: limits::Limits::new(
            settings.max_connections,
            settings.max_connections_per_client,
            settings.max_pending_handshakes,
        ),
        stats: stats::Stats::default(),
        hard_stop: CancellationToken::new(),
        settings,
    });
    shared.policy.set_own_addresses(policy::local_addresses());

    let tracker = TaskTracker::new();
    crate::metrics::serve_stats(
        shared.settings.metrics,
        |r| shared.stats.register(r),
        &stop,
        &tracker,
    )
    .await?;
    for (addr, l) in listeners {
        tracing::info!(%addr, mptcp = !shared.settings.tcp_only, "listening");
        let shared = shared.clone();
        tracker.spawn(crate::daemon::accept_loop(
            l,
            stop.clone(),
            tracker.clone(),
            move |stream, peer| conn::serve(stream, peer, shared.clone()),
        ));
    }
    {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OWN_ADDRESS_REFRESH);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => shared.policy.set_own_addresses(policy::local_addresses()),
                }
            }
        });
    }

    crate::daemon::wait_for_signal().await?;
    tracing::info!(
        active = shared.limits.active(),
        deadline_secs = shared.settings.drain_timeout.as_secs(),
        "stopping: no new connections, draining"
    );
    crate::daemon::drain(
        &stop,
        &tracker,
        shared.settings.drain_timeout,
        &shared.hard_stop,
    )
    .await;
    Ok(())
}
