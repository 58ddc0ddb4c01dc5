//! What both daemons do the same way around their connections: the open-file limit, accept
//! loops that survive errors, waiting for SIGTERM/SIGINT, and draining on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// Accepts until `stop`, running `serve` for each connection as a task of `tracker` (so that
/// shutdown can wait for it).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    tracker: TaskTracker,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
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
                // Out of descriptors or memory: back off instead of spinning on the error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Returns at the first SIGTERM or SIGINT.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Stops the accept loops (`stop`), lets running connections finish within `deadline`, then
/// cancels `hard_stop` (connections reset themselves on it) and waits for them to go.
pub async fn drain(
    stop: &CancellationToken,
    tracker: &TaskTracker,
    deadline: Duration,
    hard_stop: &CancellationToken,
) {
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed: resetting the remaining connections");
        hard_stop.cancel();
        tracker.wait().await;
    }
}
