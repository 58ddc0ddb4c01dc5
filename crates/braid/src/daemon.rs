//! The skeleton both daemons share: settings checked or printed, logging, the open-file limit,
//! the runtime; then, while running, accept loops that survive errors, the metrics endpoint,
//! waiting for SIGTERM/SIGINT, and draining on shutdown. A daemon is a [`Role`]: its settings
//! and what it does with them.

use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConfigError;
use crate::logging::LogFormat;

/// A daemon: its validated settings, and how it runs.
pub trait Role: Debug + Sized + 'static {
    fn log_format(&self) -> LogFormat;

    /// Called once the open-file limit is known (the converter caps its connection count to
    /// what the limit allows).
    fn fit_fd_limit(&mut self, _limit: u64) {}

    /// Where the namespace's ledger lives ([`crate::ledger`], `state_dir`).
    fn state_dir(&self) -> &std::path::Path;

    /// The relay's settings; their `relay_memory` caps the process's budget.
    fn relay(&self) -> &crate::relay::RelayConfig;

    /// Runs until a signal and the drain that follows it; `reload` reads the configuration
    /// again (file and flags) for SIGHUP.
    fn run(self, daemon: Daemon, reload: Reload<Self>) -> impl Future<Output = anyhow::Result<()>>;
}

/// Reads the settings again, as at start: the file, with the command line's flags over it.
pub type Reload<R> = Box<dyn Fn() -> Result<R, ConfigError> + Send + Sync>;

/// `braid converter|gateway`: with `check_config`, print the settings and stop; otherwise
/// set up logging, raise the open-file limit and run the role on a multi-threaded runtime,
/// between undoing what a braid process that did not exit cleanly left in the namespace and
/// putting back what this one changed (each setting only when no other braid process there
/// relies on it; also when running failed).
pub fn main<R: Role>(
    settings: Result<R, ConfigError>,
    check_config: bool,
    reload: Reload<R>,
) -> anyhow::Result<()> {
    let mut settings = settings?;
    if check_config {
        let _ = print_or_broken_pipe(&format!("configuration OK\n{settings:#?}\n"));
        return Ok(());
    }
    crate::logging::init(settings.log_format());
    let fd_limit = raise_fd_limit();
    settings.fit_fd_limit(fd_limit);
    // A reloaded file meets the same limit (else every reload would see max_connections
    // "changed").
    let reload: Reload<R> = Box::new(move || {
        reload().map(|mut s| {
            s.fit_fd_limit(fd_limit);
            s
        })
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let state_dir = settings.state_dir().to_path_buf();
    let relay = settings.relay();
    relay.memory.set_cap(relay.memory_cap);
    runtime.block_on(async {
        crate::ledger::tidy(&state_dir).await;
        let result = settings.run(Daemon::default(), reload).await;
        crate::ledger::release(&state_dir).await;
        result
    })
}

/// Writes `text` to standard output. Rust ignores SIGPIPE (the daemons need that), so a closed
/// pipe (`| head`) is an error here rather than a silent exit; `println!` would panic on it.
pub fn print_or_broken_pipe(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// What a running daemon's tasks share: the stop signal of the accept loops, the tracker that
/// shutdown waits for, and the hard stop that resets connections still open at the drain
/// deadline.
#[derive(Debug, Clone, Default)]
pub struct Daemon {
    stop: CancellationToken,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
}

impl Daemon {
    /// Cancelled when the drain deadline passes: relays still running reset themselves.
    pub fn hard_stop(&self) -> &CancellationToken {
        &self.hard_stop
    }

    /// Serves the metrics that `register` puts in a registry on `addr`, if one is configured.
    /// Binds now, so that a bad address fails at start.
    pub async fn serve_metrics(
        &self,
        addr: Option<SocketAddr>,
        register: impl FnOnce(&mut Registry),
    ) -> anyhow::Result<()> {
        crate::metrics::serve_stats(addr, register, &self.stop, &self.tracker).await
    }

    /// Answers `braid status` for `role` with `snapshot()` until shutdown.
    pub fn serve_status(
        &self,
        role: &str,
        snapshot: impl Fn() -> crate::status::Status + Send + Sync + 'static,
    ) {
        if let Some(server) = crate::status::serve(role, snapshot, self.stop.clone()) {
            self.tracker.spawn(server);
        }
    }

    /// Accepts on `listener` until shutdown, running `serve` for each connection as a task the
    /// drain waits for.
    pub fn accept<F, Fut>(&self, listener: TcpListener, serve: F)
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, tracker) = (self.stop.clone(), self.tracker.clone());
        self.tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => r,
                };
                match accepted {
                    Ok((stream, peer)) => {
                        tracker.spawn(serve(stream, peer));
                    }
                    Err(e) => {
                        // Out of descriptors or memory: back off instead of spinning on it.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }

    /// A background task that ends at shutdown (`f` gets the stop token to watch).
    pub fn spawn_until_stop<Fut>(&self, f: impl FnOnce(CancellationToken) -> Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(f(self.stop.clone()));
    }

    /// Tells systemd (`Type=notify`) that the daemon serves: its listeners are bound and, for
    /// the gateway, its capture is in place. Without `NOTIFY_SOCKET` (not under systemd) this
    /// does nothing.
    pub fn ready(&self, status: &str) {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// SIGHUPs from now on (a reload request: `systemctl reload`). Caught, so that a hangup
    /// never ends a daemon by the default action.
    pub fn hangups(&self) -> anyhow::Result<tokio::signal::unix::Signal> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(signal(SignalKind::hangup())?)
    }

    /// Tells systemd a reload is under way (`Type=notify`); [`Daemon::ready`] ends it.
    pub fn reloading(&self) {
        let mut states = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        notify(&states);
    }

    /// Catches SIGTERM and SIGINT from now on; the future returned completes at the first.
    /// Taken before [`Daemon::ready`]: a `systemctl stop` right after the start must drain,
    /// not meet the default action.
    pub fn signals(&self) -> anyhow::Result<impl Future<Output = ()> + use<>> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }

    /// Stops the accept loops, lets running connections finish within `deadline`, then cancels
    /// the hard stop (connections reset themselves on it) and waits for them to go.
    pub async fn drain(&self, deadline: Duration) {
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("draining"),
        ]);
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain deadline passed: resetting the remaining connections");
            self.hard_stop.cancel();
            self.tracker.wait().await;
        }
    }
}

/// A reload's new settings, or `None` (logged) when the file does not validate: then the
/// running configuration stays.
pub fn reloaded<R>(new: Result<R, ConfigError>) -> Option<R> {
    new.map_err(|e| tracing::warn!(error = %e, "reload refused: the running configuration stays"))
        .ok()
}

/// Logs a reload that applied `what`, naming the changed keys that take a restart.
pub fn log_reload(what: &str, restart: &[String]) {
    if restart.is_empty() {
        tracing::info!("configuration reloaded: {what} apply now");
    } else {
        tracing::warn!(
            keys = restart.join(", "),
            "configuration reloaded ({what}); these keys changed and take a restart"
        );
    }
}

/// The top-level fields of two values of the same settings type that differ, read off their
/// pretty `Debug` (one top-level field per entry): what a reload cannot apply is named from
/// it, with no second list of keys to keep in step.
pub fn differing_fields<T: Debug>(old: &T, new: &T) -> Vec<String> {
    fn fields<T: Debug>(s: &T) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = Vec::new();
        for line in format!("{s:#?}").lines().skip(1) {
            let top = line.strip_prefix("    ").filter(|l| !l.starts_with(' '));
            match (top.and_then(|l| l.split_once(':')), v.last_mut()) {
                (Some((k, rest)), _) => v.push((k.to_string(), rest.to_string())),
                (None, Some(last)) => last.1.push_str(line),
                (None, None) => {}
            }
        }
        v
    }
    fields(new)
        .into_iter()
        .zip(fields(old))
        .filter(|(n, o)| n != o)
        .map(|(n, _)| n.0)
        .collect()
}

/// A systemd notification; a failure to send one is logged, not fatal (systemd then times the
/// start out and says so).
fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "could not notify systemd");
        }
    }
}

/// `congestion_control`, if set, must be one this namespace allows: checked once at start, so
/// that a wrong name is one clear error instead of every connection failing.
pub fn check_congestion_control(cc: Option<&str>) -> anyhow::Result<()> {
    match cc {
        Some(cc) => {
            braid_sys::socket::check_congestion_control(cc).context("key `congestion_control`")
        }
        None => Ok(()),
    }
}

/// Makes sure `net.ipv4.tcp_fastopen` has `bits` (`what` and `why` go into the messages),
/// setting the missing ones when `may_set` and recording the change in the namespace's ledger,
/// so that it is undone when the last braid process relying on it exits.
pub async fn ensure_tfo(
    state_dir: &std::path::Path,
    bits: u32,
    what: &'static str,
    may_set: bool,
    why: &'static str,
) -> anyhow::Result<()> {
    use braid_sys::kernel;
    let mut ledger = match crate::ledger::Session::open(state_dir).await {
        Ok(l) => l,
        // Without a ledger nothing may be changed, which is fine if nothing needs to be.
        Err(e) => {
            let current = kernel::tcp_fastopen()?;
            return match kernel::tfo_with(current, bits, what, false) {
                Ok(_) => Ok(()),
                Err(missing) => Err(anyhow::Error::new(missing)
                    .context(format!("{e:#}: a change braid could not record"))),
            };
        }
    };
    let change = ledger.sysctl(crate::ledger::TCP_FASTOPEN, |current| {
        let current: u32 = current
            .parse()
            .with_context(|| format!("net.ipv4.tcp_fastopen is not a number: {current:?}"))?;
        Ok(kernel::tfo_with(current, bits, what, may_set)?.to_string())
    })?;
    if let crate::ledger::Change::Set { from, to } = change {
        tracing::warn!(
            from,
            to,
            "set net.ipv4.tcp_fastopen (restored at exit): {why}"
        );
    }
    Ok(())
}

/// Raises the open-file limit. Each relayed connection holds two sockets (six descriptors with
/// splice pipes): the default soft limit of 1024 would cap a daemon at a few hundred
/// connections.
///
/// As root the hard limit is raised too, up to `fs.nr_open` (at most 2^20): capacity should be
/// set by the daemon's own limits, not by a login shell's default. Returns the soft limit in
/// effect.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let ceiling: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard)
        .min(1 << 20);
    if ceiling > hard && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok() {
        return ceiling;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}
