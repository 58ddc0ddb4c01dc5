//! `braid status`: what a running daemon is doing, asked over a control socket.
//!
//! Each daemon keeps a [`Registry`] of the connections it carries (addresses, age, bytes so
//! far, and the MPTCP socket so that its subflows can be read when asked) and serves a JSON
//! snapshot on an abstract unix socket, `@braid-gateway` or `@braid-converter`. Abstract
//! sockets belong to the network namespace, like everything else braid manages, so each
//! namespace's daemon answers for itself, and there is no file to clean up after a crash.
//! `braid status` connects, prints a table (or the JSON with `--json`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::relay::Moved;

/// The control socket's abstract name for a role.
pub fn socket_name(role: &str) -> String {
    format!("braid-{role}")
}

/// One connection a daemon carries.
#[derive(Debug)]
struct Entry {
    client: SocketAddr,
    dest: SocketAddr,
    /// The converter (gateway) or nothing (converter).
    via: Option<SocketAddr>,
    mode: &'static str,
    started: Instant,
    moved: Arc<Moved>,
    /// The MPTCP side, to read its subflows.
    mptcp: Option<Arc<TcpStream>>,
}

/// The connections of a daemon, for status.
#[derive(Debug, Default)]
pub struct Registry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

/// A registered connection; dropping it removes the entry.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection being relayed; `moved` are its relay's counters (`a` = the
    /// client side), `mptcp` its MPTCP socket.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        self: &Arc<Self>,
        mode: &'static str,
        client: SocketAddr,
        dest: SocketAddr,
        via: Option<SocketAddr>,
        moved: Arc<Moved>,
        mptcp: Option<Arc<TcpStream>>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Entry {
                client,
                dest,
                via,
                mode,
                started: Instant::now(),
                moved,
                mptcp,
            },
        );
        Registration {
            registry: self.clone(),
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connections now, with their subflows (one getsockopt each), oldest first.
    pub fn snapshot(&self) -> Vec<ConnStatus> {
        let entries: Vec<(u64, ConnStatus, Option<Arc<TcpStream>>)> = self
            .lock()
            .iter()
            .map(|(id, e)| {
                let (up, down) = e.moved.get();
                (
                    *id,
                    ConnStatus {
                        id: *id,
                        mode: e.mode.to_string(),
                        client: e.client,
                        dest: e.dest,
                        via: e.via,
                        age_secs: e.started.elapsed().as_secs_f64(),
                        up,
                        down,
                        subflows: Vec::new(),
                    },
                    e.mptcp.clone(),
                )
            })
            .collect();
        // The subflows are read outside the lock: connections come and go meanwhile.
        let mut out: Vec<ConnStatus> = entries
            .into_iter()
            .map(|(_, mut c, sock)| {
                if let Some(s) = sock {
                    c.subflows = braid_sys::sockopt::mptcp_subflows(&*s)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|sf| SubflowStatus {
                            local: unmapped(sf.local),
                            remote: unmapped(sf.remote),
                            uplink: None,
                            rtt_ms: f64::from(sf.rtt_us) / 1000.0,
                            bytes_acked: sf.bytes_acked,
                            bytes_received: sf.bytes_received,
                        })
                        .collect();
                }
                c
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }
}

impl Registry {
    /// Every subflow of every MPTCP connection, as the kernel reports it, with the
    /// connection's id: what the gateway's health checks judge progress and loss by.
    pub fn subflows(&self) -> Vec<(u64, braid_sys::sockopt::SubflowInfo)> {
        let socks: Vec<(u64, Arc<TcpStream>)> = self
            .lock()
            .iter()
            .filter_map(|(id, e)| e.mptcp.clone().map(|s| (*id, s)))
            .collect();
        socks
            .into_iter()
            .flat_map(|(id, s)| {
                braid_sys::sockopt::mptcp_subflows(&*s)
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |mut sf| {
                        sf.local = unmapped(sf.local);
                        sf.remote = unmapped(sf.remote);
                        (id, sf)
                    })
            })
            .collect()
    }
}

/// `[::ffff:a.b.c.d]:p` as `a.b.c.d:p`: an IPv6 socket's IPv4 subflows.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(v4.into(), v6.port())),
        v4 => v4,
    }
}

/// A connection, as `braid status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnStatus {
    pub id: u64,
    pub mode: String,
    pub client: SocketAddr,
    pub dest: SocketAddr,
    pub via: Option<SocketAddr>,
    pub age_secs: f64,
    /// Bytes client → server and server → client so far.
    pub up: u64,
    pub down: u64,
    pub subflows: Vec<SubflowStatus>,
}

/// One subflow of a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubflowStatus {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The uplink it leaves by (gateway).
    pub uplink: Option<String>,
    pub rtt_ms: f64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// An uplink, as `braid status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub name: String,
    pub interface: String,
    pub state: String,
    pub backup: bool,
    pub addresses: Vec<std::net::IpAddr>,
    /// Bits per second over the last second, all traffic of the interface.
    pub rx_bps: f64,
    pub tx_bps: f64,
    pub subflows: usize,
    /// `up`, `degraded`, `dead`, `down`, and why.
    #[serde(default)]
    pub health: String,
    #[serde(default)]
    pub health_reason: String,
    /// Seconds in this health.
    #[serde(default)]
    pub health_secs: f64,
    /// `carrying`, `carrying (backup priority)`, `standby`, `out`.
    #[serde(default)]
    pub role: String,
    /// The last probe handshake's time, milliseconds.
    #[serde(default)]
    pub probe_rtt_ms: Option<f64>,
    /// Probe handshakes sent and answered.
    #[serde(default)]
    pub probes_sent: u64,
    #[serde(default)]
    pub probes_answered: u64,
}

/// What a daemon answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub role: String,
    pub version: String,
    pub uplinks: Vec<UplinkStatus>,
    pub connections: Vec<ConnStatus>,
}

/// Serves `snapshot()` as JSON to every connection on the role's control socket, until
/// `stop`. A socket that cannot be bound (another daemon of the role in this namespace) is
/// logged, not fatal.
pub fn serve(
    role: &str,
    snapshot: impl Fn() -> Status + Send + Sync + 'static,
    stop: tokio_util::sync::CancellationToken,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    use std::os::linux::net::SocketAddrExt;
    let name = socket_name(role);
    let bound = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a))
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        });
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(socket = %format!("@{name}"), error = %e, "no status socket: `braid status` will not see this daemon");
            return None;
        }
    };
    let snapshot = Arc::new(snapshot);
    Some(async move {
        loop {
            let (mut conn, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(_) => continue,
                },
            };
            let snapshot = snapshot.clone();
            tokio::spawn(async move {
                let body = tokio::task::spawn_blocking(move || {
                    serde_json::to_vec(&snapshot()).unwrap_or_default()
                })
                .await
                .unwrap_or_default();
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    })
}

/// Reads the status of the role's daemon in this network namespace.
pub fn fetch(role: &str) -> std::io::Result<Status> {
    use std::io::Read;
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(socket_name(role).as_bytes())?;
    let mut s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    serde_json::from_slice(&body).map_err(std::io::Error::other)
}

fn rate(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} Gbit/s", bps / 1e9)
    } else if bps >= 1e6 {
        format!("{:.1} Mbit/s", bps / 1e6)
    } else {
        format!("{:.0} kbit/s", bps / 1e3)
    }
}

fn bytes(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30))
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20))
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// The human table of `braid status`.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "braid {} {}", s.role, s.version);
    if !s.uplinks.is_empty() {
        let _ = writeln!(out, "\nuplinks");
        let _ = writeln!(
            out,
            "  {:<10} {:<10} {:<10} {:<9} {:<8} {:<6} {:>13} {:>13} {:>8} {:>8}  addresses",
            "name",
            "interface",
            "state",
            "health",
            "role",
            "backup",
            "down",
            "up",
            "subflows",
            "probe"
        );
        for u in &s.uplinks {
            let addrs: Vec<String> = u.addresses.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "  {:<10} {:<10} {:<10} {:<9} {:<8} {:<6} {:>13} {:>13} {:>8} {:>8}  {}",
                u.name,
                u.interface,
                u.state,
                u.health,
                u.role.split(' ').next().unwrap_or(""),
                if u.backup { "yes" } else { "no" },
                rate(u.rx_bps),
                rate(u.tx_bps),
                u.subflows,
                u.probe_rtt_ms
                    .map(|ms| format!("{ms:.1} ms"))
                    .unwrap_or_else(|| "-".into()),
                addrs.join(" ")
            );
            if !u.health_reason.is_empty() && u.health != "up" {
                let _ = writeln!(
                    out,
                    "  {:<10} {} for {:.0} s: {}",
                    "", u.health, u.health_secs, u.health_reason
                );
            }
        }
    }
    let _ = writeln!(out, "\nconnections: {}", s.connections.len());
    for c in &s.connections {
        let via = c.via.map(|v| format!(" via {v}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "  #{} {} {} -> {}{via}  {:.0} s  up {}  down {}",
            c.id,
            c.mode,
            c.client,
            c.dest,
            c.age_secs,
            bytes(c.up),
            bytes(c.down)
        );
        for sf in &c.subflows {
            let _ = writeln!(
                out,
                "      {} -> {}  {}rtt {:.1} ms  sent {}  received {}",
                sf.local,
                sf.remote,
                sf.uplink
                    .as_deref()
                    .map(|u| format!("{u}  "))
                    .unwrap_or_default(),
                sf.rtt_ms,
                bytes(sf.bytes_acked),
                bytes(sf.bytes_received)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_come_and_go_and_are_served_as_json() {
        let reg = Arc::new(Registry::default());
        let moved = Arc::new(Moved::default());
        moved.a_to_b.store(1500, Ordering::Relaxed);
        let r = reg.register(
            "socks5",
            "10.0.0.1:4000".parse().unwrap(),
            "192.0.2.1:443".parse().unwrap(),
            Some("198.51.100.1:5124".parse().unwrap()),
            moved,
            None,
        );
        let snap = reg.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!((snap[0].up, snap[0].down), (1500, 0));
        let status = Status {
            role: "test".into(),
            version: "0".into(),
            uplinks: vec![UplinkStatus {
                name: "dsl".into(),
                interface: "ppp0".into(),
                state: "up".into(),
                backup: false,
                addresses: vec!["198.51.100.7".parse().unwrap()],
                rx_bps: 20e6,
                tx_bps: 1e6,
                subflows: 1,
                health: "dead".into(),
                health_reason: "2 probe rounds in a row unanswered".into(),
                health_secs: 3.0,
                role: "out".into(),
                probe_rtt_ms: Some(21.5),
                probes_sent: 12,
                probes_answered: 4,
            }],
            connections: snap,
        };
        let table = render(&status);
        assert!(
            table.contains("dsl") && table.contains("20.0 Mbit/s"),
            "{table}"
        );
        assert!(
            table.contains("dead for 3 s: 2 probe rounds in a row unanswered"),
            "{table}"
        );
        assert!(
            table.contains("192.0.2.1:443") && table.contains("1.5 KiB"),
            "{table}"
        );
        drop(r);
        assert!(reg.is_empty());
        // Served over the abstract socket (unique name: tests run in parallel).
        let role = format!("test-{}", std::process::id());
        let stop = tokio_util::sync::CancellationToken::new();
        let s2 = status.clone();
        let server = serve(&role, move || s2.clone(), stop.clone()).expect("bind");
        let task = tokio::spawn(server);
        let got = tokio::task::spawn_blocking(move || fetch(&role))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, status);
        stop.cancel();
        task.await.unwrap();
    }
}
