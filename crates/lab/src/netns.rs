//! One network namespace: creation the `ip netns add` way (so `ip netns exec` works on it),
//! running code and commands inside it, and its addresses, routes, rules and sysctls.
//! The namespace, its processes, its delay lines and its `/etc/netns` files go away when the
//! last handle drops (or at [`Netns::delete`]), and [`sweep`] removes what crashed runs left
//! behind.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::{self, Display};
use std::fs::{self, File};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::LinkFlags;
use netlink_packet_route::route::{RouteMessage, RouteScope, RouteType};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use crate::delay::{Delay, DelayLine, DelayStats};
use crate::error::{Error, Result};
use crate::process::{NsCommand, Process};
use crate::routing::{MptcpEndpoint, Route, RouteKind, Rule};

/// Every namespace the lab creates starts with this; [`sweep`] touches nothing else.
pub const PREFIX: &str = "blab-";
const NETNS_DIR: &str = "/run/netns";
const ETC_NETNS: &str = "/etc/netns";

/// Numbers the namespaces of this process, so names stay unique within one test binary.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by the lab.
///
/// Cheap to clone (shared handle). The namespace is deleted when the last clone is dropped or
/// when [`Netns::delete`] is called (a [`Lab`](crate::Lab) calls it for all of its namespaces
/// when it drops, even if tests still hold clones). Deleting first kills every process still
/// running inside it.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    deleted: AtomicBool,
    state: Mutex<State>,
    /// Delay lines by interface. Apart from `state`, because starting or removing one runs
    /// commands (and waits) that must not block the rest of the namespace's bookkeeping.
    delays: Mutex<BTreeMap<String, DelayLine>>,
}

/// What the lab configured, so it can be restored after a link goes down and up again.
#[derive(Default)]
struct State {
    addrs: Vec<(String, IpNet)>,
    routes: Vec<Route>,
    rules: Vec<Rule>,
    /// Drop rules per interface packets arrive on, rendered into the namespace's nft table.
    wire: BTreeMap<String, WireDrop>,
    hosts_written: bool,
}

/// Packets lost on the wire before they arrive on one interface.
///
/// Dropped on arrival (prerouting, before anything else looks at them), not on departure: a
/// drop in the sender's own output path is not loss to the sender's TCP. Measured: with 20 %
/// dropped in the sending namespace's postrouting chain, a subflow counted no retransmission
/// and its receiver no out-of-order segment (the stack is told of a local drop and sends the
/// segment again at once), so neither side saw a lossy path; dropped on arrival, the sender
/// retransmits and the receiver sees the holes, as on a real lossy link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct WireDrop {
    /// Random loss in percent, 0 to 100.
    pub(crate) loss_pct: f64,
    /// Drop everything.
    pub(crate) blackhole: bool,
}

impl fmt::Debug for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Netns").field(&self.inner.name).finish()
    }
}

impl Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.name)
    }
}

/// Output of a command that ran to completion.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Netns {
    /// Creates a namespace named `blab-<pid>-<counter>-<role>`.
    ///
    /// `role` is 1 to 10 characters of `[a-z0-9]` and only makes the name readable
    /// (`ip netns list` shows `blab-4711-3-gw`). The namespace gets `lo` up, IPv6 DAD off and
    /// IPv6 addresses kept across link down (both needed for links that flap at runtime), and
    /// `net.mptcp.enabled=1`.
    pub fn create(role: &str) -> Result<Netns> {
        if role.is_empty()
            || role.len() > 10
            || !role
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(Error::Config(format!(
                "namespace role {role:?} must be 1-10 chars of [a-z0-9]"
            )));
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        host_cmd(&["ip", "netns", "add", &name])?;
        // From here on the handle owns the namespace: an error below drops it and deletes it.
        let ns = Netns {
            inner: Arc::new(Inner {
                name,
                deleted: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                delays: Mutex::new(BTreeMap::new()),
            }),
        };
        // `default` values are copied into devices created later, so veths made after this
        // get them too.
        for (key, value) in [
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv6.conf.all.keep_addr_on_down", "1"),
            ("net.ipv6.conf.default.keep_addr_on_down", "1"),
            ("net.mptcp.enabled", "1"),
        ] {
            ns.sysctl(key, value)?;
        }
        ns.link_up("lo")?;
        tracing::debug!(ns = %ns, "namespace created");
        Ok(ns)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `/run/netns/<name>`, the bind mount that keeps the namespace alive.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.inner.name)
    }

    fn open(&self) -> Result<File> {
        // Fails with ENOENT once the namespace is deleted.
        File::open(self.path())
            .map_err(|e| Error::io(format!("open {}", self.path().display()), self.name(), e))
    }

    /// Runs `f` on a fresh thread that has entered the namespace, and waits for it.
    ///
    /// Sockets opened in `f` belong to the namespace (and stay there if they are returned).
    /// A panic in `f` is resumed in the caller.
    pub fn enter<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        let ns = self.name();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("ns:{ns}"))
                .spawn_scoped(s, move || {
                    // Only this thread moves; the rest of the process stays where it was.
                    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map(|()| f())
                })
                .map_err(|e| Error::io("spawn thread", ns, e))?;
            match handle.join() {
                Ok(r) => r.map_err(|source| Error::Setns {
                    ns: ns.to_string(),
                    source,
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs async code to completion on a two-thread tokio runtime whose threads live in the
    /// namespace (they are spawned from a thread that entered it, and inherit it), so every
    /// socket the code opens belongs to the namespace.
    pub fn block_on<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let ns = self.name();
        self.enter(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| Error::io("build tokio runtime", ns, e))?;
            Ok(rt.block_on(f()))
        })?
    }

    /// Starts `f` on a thread inside the namespace and returns once the thread is there.
    pub fn thread<F, R>(&self, f: F) -> Result<NsThread<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let (tx, rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name(format!("ns:{}", self.name()))
            .spawn(
                move || match nix::sched::setns(&file, CloneFlags::CLONE_NEWNET) {
                    Ok(()) => {
                        let _ = tx.send(Ok(()));
                        Some(f())
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        None
                    }
                },
            )
            .map_err(|e| Error::io("spawn thread", self.name(), e))?;
        match rx.recv() {
            Ok(Ok(())) => Ok(NsThread { handle }),
            Ok(Err(source)) => Err(Error::Setns {
                ns: self.name().to_string(),
                source,
            }),
            Err(_) => Err(Error::io(
                "start thread",
                self.name(),
                std::io::Error::other("thread ended before entering the namespace"),
            )),
        }
    }

    /// A command to run inside the namespace through `ip netns exec` (so
    /// `/etc/netns/<name>/hosts` applies). Configure it, then `spawn()` or `output()`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> NsCommand {
        NsCommand::new(self.clone(), program.as_ref())
    }

    /// Runs `args[0]` with the remaining arguments, waits, and returns its standard output.
    /// A non-zero exit is an [`Error::Command`] carrying stderr.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut it = args.into_iter();
        let program = it
            .next()
            .ok_or_else(|| Error::Config("run: empty command".into()))?;
        Ok(self.command(program).args(it).output()?.stdout)
    }

    /// Runs a shell command line (`sh -c LINE`) and returns its standard output.
    pub fn sh(&self, line: &str) -> Result<String> {
        self.run(["sh", "-c", line])
    }

    /// Spawns `args[0]` with the remaining arguments; stdout and stderr go to /dev/null
    /// (use [`Netns::command`] to capture them). The process is stopped when the handle drops.
    pub fn spawn<I, S>(&self, args: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut it = args.into_iter();
        let program = it
            .next()
            .ok_or_else(|| Error::Config("spawn: empty command".into()))?;
        self.command(program).args(it).spawn()
    }

    /// Runs `ip -n <ns> ARGS...` and returns its stdout.
    pub fn ip<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let mut full = vec!["ip", "-n", self.name()];
        full.extend(args.iter().map(AsRef::as_ref));
        run_host(&full, self.name())
    }

    /// Runs `tc -n <ns> ARGS...` and returns its stdout.
    pub fn tc<S: AsRef<str>>(&self, args: &[S]) -> Result<String> {
        let mut full = vec!["tc", "-n", self.name()];
        full.extend(args.iter().map(AsRef::as_ref));
        run_host(&full, self.name())
    }

    /// Loads an nftables script inside the namespace (`nft -f -`).
    pub fn nft(&self, script: &str) -> Result<()> {
        self.command("nft")
            .args(["-f", "-"])
            .stdin_bytes(script.as_bytes().to_vec())
            .output()
            .map(drop)
    }

    /// Sets a sysctl of this namespace, e.g. `ns.sysctl("net.ipv4.ip_forward", 1)`.
    ///
    /// Written through `/proc/sys` from a thread inside the namespace: the `net.*` tree there
    /// belongs to the namespace of the thread that opens it.
    pub fn sysctl(&self, key: &str, value: impl Display) -> Result<()> {
        let path = sysctl_path(key);
        let value = value.to_string();
        self.enter(|| fs::write(&path, value.as_bytes()))?
            .map_err(|e| Error::io(format!("sysctl -w {key}={value}"), self.name(), e))
    }

    /// Reads a sysctl of this namespace (trimmed).
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        self.enter(|| fs::read_to_string(&path))?
            .map(|s| s.trim().to_string())
            .map_err(|e| Error::io(format!("sysctl {key}"), self.name(), e))
    }

    /// Writes `/etc/netns/<name>/hosts` (with `localhost` entries first), which
    /// `ip netns exec` shows to processes as `/etc/hosts`. Removed when the namespace goes.
    pub fn set_hosts(&self, entries: &[(IpAddr, &str)]) -> Result<()> {
        let dir = Path::new(ETC_NETNS).join(self.name());
        let mut text = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip}\t{name}\n"));
        }
        self.state().hosts_written = true;
        fs::create_dir_all(&dir)
            .and_then(|()| fs::write(dir.join("hosts"), text))
            .map_err(|e| Error::io(format!("write {}/hosts", dir.display()), self.name(), e))
    }

    /// Sets an interface up.
    pub fn link_up(&self, ifname: &str) -> Result<()> {
        self.link_set(ifname, true)
    }

    /// Sets an interface down. The kernel then deletes the routes through it; use
    /// [`LinkEnd::up`](crate::LinkEnd::up) or [`Netns::restore`] to get them back.
    pub fn link_down(&self, ifname: &str) -> Result<()> {
        self.link_set(ifname, false)
    }

    fn link_set(&self, ifname: &str, up: bool) -> Result<()> {
        let name = ifname.to_string();
        let op = format!("set {ifname} {}", if up { "up" } else { "down" });
        self.netlink(op, move |h| async move {
            let b = LinkUnspec::new_with_name(&name);
            let msg = if up { b.up() } else { b.down() }.build();
            h.link().set(msg).execute().await
        })
    }

    /// Adds an address to an interface and remembers it (see [`Netns::restore`]).
    /// IPv6 addresses are added `nodad`, usable at once.
    pub fn add_addr(&self, ifname: &str, addr: IpNet) -> Result<()> {
        self.addr_kernel_add(ifname, addr)?;
        let mut st = self.state();
        if !st.addrs.iter().any(|(i, a)| i == ifname && *a == addr) {
            st.addrs.push((ifname.to_string(), addr));
        }
        Ok(())
    }

    /// Removes an address and forgets it.
    pub fn del_addr(&self, ifname: &str, addr: IpNet) -> Result<()> {
        self.state()
            .addrs
            .retain(|(i, a)| !(i == ifname && *a == addr));
        self.addr_kernel_del(ifname, addr)
    }

    /// The addresses the lab put on `ifname`.
    pub fn addrs(&self, ifname: &str) -> Vec<IpNet> {
        self.state()
            .addrs
            .iter()
            .filter(|(i, _)| i == ifname)
            .map(|(_, a)| *a)
            .collect()
    }

    pub(crate) fn addr_kernel_add(&self, ifname: &str, addr: IpNet) -> Result<()> {
        let name = ifname.to_string();
        self.netlink(
            format!("add address {addr} to {ifname}"),
            move |h| async move {
                let index = ifindex(&h, &name).await?;
                // replace: re-adding an address that is still there is not an error.
                let mut req = h
                    .address()
                    .add(index, addr.addr(), addr.prefix_len())
                    .replace();
                if addr.addr().is_ipv6() {
                    req.message_mut()
                        .attributes
                        .push(AddressAttribute::Flags(AddressFlags::Nodad));
                }
                req.execute().await
            },
        )
    }

    pub(crate) fn addr_kernel_del(&self, ifname: &str, addr: IpNet) -> Result<()> {
        let name = ifname.to_string();
        self.netlink(
            format!("delete address {addr} from {ifname}"),
            move |h| async move {
                let index = ifindex(&h, &name).await?;
                let mut found = h
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .set_address_filter(addr.addr())
                    .set_prefix_length_filter(addr.prefix_len())
                    .execute();
                // Deleting an address that is already gone is fine: the goal is its absence.
                while let Some(msg) = found.try_next().await? {
                    h.address().del(msg).execute().await?;
                }
                Ok(())
            },
        )
    }

    /// Adds (or replaces) a route and remembers it, so it comes back after its link flaps.
    pub fn add_route(&self, route: &Route) -> Result<()> {
        self.route_kernel(route, true)?;
        let mut st = self.state();
        if !st.routes.contains(route) {
            st.routes.push(route.clone());
        }
        Ok(())
    }

    /// Deletes a route and forgets it.
    pub fn del_route(&self, route: &Route) -> Result<()> {
        self.state().routes.retain(|r| r != route);
        self.route_kernel(route, false)
    }

    fn route_kernel(&self, route: &Route, add: bool) -> Result<()> {
        let r = route.clone();
        let op = format!("{} route {route}", if add { "add" } else { "delete" });
        if let Some(via) = r.via {
            if via.is_ipv4() != r.dst.addr().is_ipv4() {
                return Err(Error::Config(format!("{op}: next hop of another family")));
            }
        }
        self.netlink(op, move |h| async move {
            let index = match &r.dev {
                Some(dev) => Some(ifindex(&h, dev).await?),
                None => None,
            };
            let msg = route_message(&r, index);
            if add {
                h.route().add(msg).replace().execute().await
            } else {
                h.route().del(msg).execute().await
            }
        })
    }

    /// Adds a policy rule (`ip rule add ...`) and remembers it (for [`Netns::replace_addr`];
    /// rules do not go away with a link).
    pub fn add_rule(&self, rule: &Rule) -> Result<()> {
        self.ip(&rule.ip_args())?;
        let mut st = self.state();
        if !st.rules.contains(rule) {
            st.rules.push(rule.clone());
        }
        Ok(())
    }

    /// Deletes a policy rule (`ip rule del ...`) and forgets it.
    pub fn del_rule(&self, rule: &Rule) -> Result<()> {
        self.state().rules.retain(|r| r != rule);
        let mut args = rule.ip_args();
        args[2] = "del".into();
        self.ip(&args).map(drop)
    }

    /// Replaces address `old` of `ifname` by `new` in the kernel and in what the lab restores,
    /// and moves the lab's routes with preferred source `old` and its rules `from old/32`
    /// (`/128`) to `new`. `new` is added before `old` is removed, with IPv4 secondaries
    /// promoted, so the interface keeps an address throughout and the kernel flushes none of
    /// its routes. See [`LinkEnd::replace_addr`](crate::LinkEnd::replace_addr), which also
    /// updates the peer's routes via `old`.
    pub fn replace_addr(&self, ifname: &str, old: IpNet, new: IpNet) -> Result<()> {
        if old.addr().is_ipv4() != new.addr().is_ipv4() {
            return Err(Error::Config(format!(
                "replace {old} by {new} on {ifname}: not the same family"
            )));
        }
        if !self.addrs(ifname).contains(&old) {
            return Err(Error::Config(format!(
                "replace {old} on {ifname} in {self}: the lab did not configure it"
            )));
        }
        if old == new {
            return Ok(());
        }
        self.addr_kernel_add(ifname, new)?;
        {
            let mut st = self.state();
            for (i, a) in st.addrs.iter_mut() {
                if i == ifname && *a == old {
                    *a = new;
                }
            }
            dedup(&mut st.addrs);
        }
        let (old_ip, new_ip) = (old.addr(), new.addr());
        self.rewrite_routes(|r| {
            (r.src == Some(old_ip)).then(|| Route {
                src: Some(new_ip),
                ..r.clone()
            })
        })?;
        let host = |ip: IpAddr| IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).ok();
        let rules: Vec<Rule> = self
            .state()
            .rules
            .iter()
            .filter(|r| r.from.is_some() && r.from == host(old_ip))
            .cloned()
            .collect();
        for r in rules {
            let moved = Rule {
                from: host(new_ip),
                ..r.clone()
            };
            self.del_rule(&r)?;
            self.add_rule(&moved)?;
        }
        if old_ip.is_ipv4() {
            // Without this, deleting the primary address also deletes `new` if it is a
            // secondary in the same subnet.
            self.sysctl(&format!("net.ipv4.conf.{ifname}.promote_secondaries"), 1)?;
        }
        self.addr_kernel_del(ifname, old)?;
        tracing::debug!(ns = %self, ifname, %old, %new, "address replaced");
        Ok(())
    }

    /// Makes the lab's routes via `old` (through `dev` or through no device) go via `new`.
    pub(crate) fn replace_gateway(&self, dev: &str, old: IpAddr, new: IpAddr) -> Result<()> {
        self.rewrite_routes(|r| {
            (r.via == Some(old) && r.dev.as_deref().is_none_or(|d| d == dev)).then(|| Route {
                via: Some(new),
                ..r.clone()
            })
        })
    }

    /// Rewrites the remembered routes `f` picks and installs the new versions. Only the
    /// next hop or the source changes, which are not part of a route's key, so the kernel
    /// replaces each route in place. A route through a device that is down cannot be
    /// installed; it stays remembered and comes back with [`LinkEnd::up`](crate::LinkEnd::up).
    fn rewrite_routes(&self, f: impl Fn(&Route) -> Option<Route>) -> Result<()> {
        let moved: Vec<Route> = {
            let mut st = self.state();
            let mut moved = Vec::new();
            for r in st.routes.iter_mut() {
                if let Some(n) = f(r) {
                    *r = n.clone();
                    moved.push(n);
                }
            }
            dedup(&mut st.routes);
            moved
        };
        for r in &moved {
            if let Err(e) = self.route_kernel(r, true) {
                match &r.dev {
                    Some(dev) if !self.is_up(dev)? => {
                        tracing::debug!(ns = %self, route = %r, "device down, route kept for up");
                    }
                    _ => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Whether interface `ifname` is administratively up.
    pub fn is_up(&self, ifname: &str) -> Result<bool> {
        let name = ifname.to_string();
        self.netlink(format!("get link {ifname}"), move |h| async move {
            let mut links = h.link().get().match_name(name).execute();
            match links.try_next().await? {
                Some(msg) => Ok(msg.header.flags.contains(LinkFlags::Up)),
                None => Err(rtnetlink::Error::RequestFailed),
            }
        })
    }

    /// `ip mptcp limits set subflows N add_addr_accepted M`.
    pub fn mptcp_limits(&self, subflows: u32, add_addr_accepted: u32) -> Result<()> {
        self.ip(&[
            "mptcp",
            "limits",
            "set",
            "subflows",
            &subflows.to_string(),
            "add_addr_accepted",
            &add_addr_accepted.to_string(),
        ])
        .map(drop)
    }

    /// `ip mptcp endpoint add ...`.
    pub fn mptcp_endpoint_add(&self, ep: &MptcpEndpoint) -> Result<()> {
        self.ip(&ep.ip_args()).map(drop)
    }

    /// `ip mptcp endpoint delete id N` for the endpoint with this address (no-op if none).
    pub fn mptcp_endpoint_del(&self, addr: IpAddr) -> Result<()> {
        // The kernel deletes by id; `ip mptcp endpoint show` lines read "ADDR id N ...".
        let shown = self.ip(&["mptcp", "endpoint", "show"])?;
        let addr = addr.to_string();
        for line in shown.lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some(addr.as_str()) && words.next() == Some("id") {
                if let Some(id) = words.next() {
                    self.ip(&["mptcp", "endpoint", "delete", "id", id])?;
                }
            }
        }
        Ok(())
    }

    /// `ip mptcp endpoint flush`.
    pub fn mptcp_endpoint_flush(&self) -> Result<()> {
        self.ip(&["mptcp", "endpoint", "flush"]).map(drop)
    }

    /// Re-installs what the lab configured on `ifname` (its addresses, then the remembered
    /// routes through it) after the kernel dropped them (link down, address removed).
    pub fn restore(&self, ifname: &str) -> Result<()> {
        let (addrs, routes) = {
            let st = self.state();
            let addrs: Vec<_> = st
                .addrs
                .iter()
                .filter(|(i, _)| i == ifname)
                .map(|(_, a)| *a)
                .collect();
            let routes: Vec<_> = st
                .routes
                .iter()
                .filter(|r| r.dev.as_deref() == Some(ifname))
                .cloned()
                .collect();
            (addrs, routes)
        };
        for a in addrs {
            self.addr_kernel_add(ifname, a)?;
        }
        for r in &routes {
            self.route_kernel(r, true)?;
        }
        // Routes without a device may depend on this one; they fail harmlessly if their next
        // hop is still unreachable by another way.
        let loose: Vec<_> = self
            .state()
            .routes
            .iter()
            .filter(|r| r.dev.is_none())
            .cloned()
            .collect();
        for r in &loose {
            if let Err(e) = self.route_kernel(r, true) {
                tracing::debug!(ns = %self, error = %e, "route not restored");
            }
        }
        Ok(())
    }

    /// Sets what is lost of the packets arriving on `ifname`.
    pub(crate) fn set_wire_drop(&self, ifname: &str, f: impl FnOnce(&mut WireDrop)) -> Result<()> {
        let script = {
            let mut st = self.state();
            let e = st.wire.entry(ifname.to_string()).or_default();
            f(e);
            if *e == WireDrop::default() {
                st.wire.remove(ifname);
            }
            nft_wire_script(&st.wire)
        };
        self.nft(&script)
    }

    /// Delays the packets leaving `ifname` (see [`LinkEnd::set_delay`](crate::LinkEnd::set_delay)):
    /// starts, changes or (with [`Delay::NONE`]) removes its delay line.
    pub(crate) fn set_delay(&self, ifname: &str, delay: Delay) -> Result<()> {
        delay.validate()?;
        let mut lines = self.delays();
        if delay.is_none() {
            let Some(line) = lines.remove(ifname) else {
                return Ok(());
            };
            drop(lines);
            return line.remove(self);
        }
        if let Some(line) = lines.get(ifname) {
            line.set(delay);
            return Ok(());
        }
        // Started under the lock, so two callers cannot put two lines on one interface.
        let line = DelayLine::start(self, ifname, delay)?;
        lines.insert(ifname.to_string(), line);
        Ok(())
    }

    /// The delay set on `ifname` ([`Delay::NONE`] if none).
    pub(crate) fn delay(&self, ifname: &str) -> Delay {
        self.delays()
            .get(ifname)
            .map_or(Delay::NONE, DelayLine::delay)
    }

    /// Counters of the delay line on `ifname`, if it has one.
    pub(crate) fn delay_stats(&self, ifname: &str) -> Option<DelayStats> {
        self.delays().get(ifname).map(DelayLine::stats)
    }

    /// Waits until a TCP connect from inside the namespace to `addr` succeeds.
    pub fn wait_for_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let ok = self.enter(|| {
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })?;
        if ok {
            Ok(())
        } else {
            Err(Error::Timeout {
                what: format!("TCP connect to {addr}"),
                ns: self.name().into(),
                after: timeout,
            })
        }
    }

    /// Whether something in this namespace listens on TCP `port`, as the kernel sees it (`ss`):
    /// unlike a probe connection, asking costs the listener nothing.
    pub fn is_listening(&self, port: u16) -> Result<bool> {
        Ok(!self
            .run(["ss", "-Hltn", &format!("sport = :{port}")])?
            .trim()
            .is_empty())
    }

    /// Waits until something listens on TCP `port`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.is_listening(port)? {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("a listener on port {port}"),
                    ns: self.name().into(),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Runs `f` with an rtnetlink handle whose socket lives in this namespace.
    ///
    /// Each call gets its own thread and current-thread runtime: netlink sockets belong to the
    /// namespace of the thread that opens them, and a short-lived thread cannot leak its
    /// namespace into unrelated code.
    pub fn netlink<F, Fut, T>(&self, op: impl Into<String>, f: F) -> Result<T>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, rtnetlink::Error>>,
        T: Send,
    {
        let op = op.into();
        let ns = self.name();
        self.enter(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| Error::io("build tokio runtime", ns, e))?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| Error::io("open netlink socket", ns, e))?;
                let task = tokio::spawn(conn);
                let r = f(handle).await;
                task.abort();
                r.map_err(|source| Error::Netlink {
                    op: op.clone(),
                    ns: ns.to_string(),
                    source,
                })
            })
        })?
    }

    /// Deletes the namespace now: kills the processes inside, unmounts it and removes its
    /// `/etc/netns` directory. Idempotent; later operations on this handle fail.
    pub fn delete(&self) -> Result<()> {
        if self.inner.deleted.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Threads first: they hold the TAPs, which the namespace's deletion would pull away.
        drop(std::mem::take(&mut *self.delays()));
        let hosts = self.state().hosts_written;
        let r = remove_namespace(self.name());
        if hosts {
            let _ = fs::remove_dir_all(Path::new(ETC_NETNS).join(self.name()));
        }
        tracing::debug!(ns = %self, "namespace deleted");
        r
    }

    fn delays(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DelayLine>> {
        // As for `state`: what a panicking holder left is still right for cleanup.
        self.inner
            .delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in a way that
        // matters for cleanup, so poisoning is ignored.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.deleted.swap(true, Ordering::SeqCst) {
            return;
        }
        let lines = self
            .delays
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(std::mem::take(lines));
        if let Err(e) = remove_namespace(&self.name) {
            tracing::warn!(ns = %self.name, error = %e, "could not delete namespace");
        }
        let hosts = self
            .state
            .get_mut()
            .map(|s| s.hosts_written)
            .unwrap_or(true);
        if hosts {
            let _ = fs::remove_dir_all(Path::new(ETC_NETNS).join(&self.name));
        }
    }
}

/// A thread started by [`Netns::thread`].
#[derive(Debug)]
pub struct NsThread<R> {
    handle: JoinHandle<Option<R>>,
}

impl<R> NsThread<R> {
    /// Waits for the thread; `Err` carries its panic, as with [`JoinHandle::join`].
    pub fn join(self) -> std::thread::Result<R> {
        // `None` is only returned when setns failed, and then no NsThread was handed out.
        self.handle
            .join()
            .map(|r| r.expect("thread entered its namespace"))
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Removes later duplicates, keeping the first of each.
fn dedup<T: PartialEq>(v: &mut Vec<T>) {
    let mut i = 0;
    while i < v.len() {
        if v[..i].contains(&v[i]) {
            v.remove(i);
        } else {
            i += 1;
        }
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

async fn ifindex(h: &rtnetlink::Handle, name: &str) -> std::result::Result<u32, rtnetlink::Error> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await? {
        Some(msg) => Ok(msg.header.index),
        None => Err(rtnetlink::Error::RequestFailed),
    }
}

fn route_message(r: &Route, index: Option<u32>) -> RouteMessage {
    let mut msg = match r.dst {
        IpNet::V4(n) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.network(), n.prefix_len());
            if let Some(IpAddr::V4(gw)) = r.via {
                b = b.gateway(gw);
            }
            if let Some(IpAddr::V4(src)) = r.src {
                b = b.pref_source(src);
            }
            b.build()
        }
        IpNet::V6(n) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.network(), n.prefix_len());
            if let Some(IpAddr::V6(gw)) = r.via {
                b = b.gateway(gw);
            }
            if let Some(IpAddr::V6(src)) = r.src {
                b = b.pref_source(src);
            }
            b.build()
        }
    };
    // Rebuild the tail through a generic builder to share the family-independent settings.
    let mut b = RouteMessageBuilder::<IpAddr>::new();
    *b.get_mut() = std::mem::take(&mut msg);
    if let Some(i) = index {
        b = b.output_interface(i);
    }
    if let Some(t) = r.table {
        b = b.table_id(t);
    }
    if let Some(m) = r.metric {
        b = b.priority(m);
    }
    match r.kind {
        RouteKind::Blackhole => b = b.kind(RouteType::BlackHole),
        // Like `ip route`: a route without a gateway is link-scoped.
        RouteKind::Unicast if r.via.is_none() && r.dst.addr().is_ipv4() => {
            b = b.scope(RouteScope::Link);
        }
        RouteKind::Unicast => {}
    }
    b.build()
}

/// The lab's own nft table in a namespace, rebuilt whole on every change. Declaring then
/// deleting the table first makes the load atomic and idempotent.
fn nft_wire_script(wire: &BTreeMap<String, WireDrop>) -> String {
    let mut s = String::from("table inet blab_wire {}\ndelete table inet blab_wire\n");
    if wire.is_empty() {
        return s;
    }
    s.push_str(
        "table inet blab_wire {\n  chain pre {\n    type filter hook prerouting priority -300; policy accept;\n",
    );
    for (ifname, e) in wire {
        if e.blackhole || e.loss_pct >= 100.0 {
            s.push_str(&format!("    iifname \"{ifname}\" counter drop\n"));
        } else if e.loss_pct > 0.0 {
            // Hundredths of a percent, so fractional loss rates work.
            let n = (e.loss_pct * 100.0).round() as u32;
            s.push_str(&format!(
                "    iifname \"{ifname}\" numgen random mod 10000 < {n} counter drop\n"
            ));
        }
    }
    s.push_str("  }\n}\n");
    s
}

/// Runs a command in the host namespace, checking its exit status.
pub(crate) fn host_cmd(args: &[&str]) -> Result<String> {
    run_host(args, "host")
}

fn run_host(args: &[&str], ns: &str) -> Result<String> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            cmd: cmd.clone(),
            ns: ns.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd,
            ns: ns.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Netns {
    /// Whether process `pid` (its main thread) is inside this namespace.
    pub fn contains_pid(&self, pid: u32) -> bool {
        same_netns(&self.path(), pid as i32)
    }
}

fn same_netns(path: &Path, pid: i32) -> bool {
    match (
        fs::metadata(path),
        fs::metadata(format!("/proc/{pid}/ns/net")),
    ) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// Pids whose (main thread's) network namespace is the one mounted at `path`.
fn pids_in(path: &Path) -> Vec<i32> {
    let Ok(target) = fs::metadata(path) else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
        })
        .collect()
}

fn remove_namespace(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    // Processes would keep the namespace (and its veths and ports) alive after the unmount.
    for pid in pids_in(&path) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    match host_cmd(&["ip", "netns", "delete", name]) {
        Ok(_) => Ok(()),
        Err(_) if !path.exists() => Ok(()),
        Err(e) => Err(e),
    }
}

fn pid_alive(pid: i32) -> bool {
    // EPERM would also mean "exists"; as root we never get it.
    !matches!(
        kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// The creating pid encoded in a lab namespace name, `blab-<pid>-...`.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Removes what crashed runs left behind: namespaces (and `/etc/netns` directories) named
/// `blab-<pid>-...` whose `<pid>` is no longer alive, after killing the processes inside.
/// Namespaces of live processes and names without the prefix are never touched.
/// Returns the names removed. [`Lab::new`](crate::Lab::new) calls this.
pub fn sweep() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for dir in [NETNS_DIR, ETC_NETNS] {
        if let Ok(rd) = fs::read_dir(dir) {
            names.extend(rd.filter_map(|e| e.ok()?.file_name().into_string().ok()));
        }
    }
    names.sort();
    names.dedup();
    for name in names {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        // Another process may be sweeping the same leftover; losing that race is fine.
        if Path::new(NETNS_DIR).join(&name).exists() {
            if let Err(e) = remove_namespace(&name) {
                tracing::warn!(ns = %name, error = %e, "sweep could not delete namespace");
                continue;
            }
        }
        let _ = fs::remove_dir_all(Path::new(ETC_NETNS).join(&name));
        tracing::info!(ns = %name, "swept leftover namespace");
        removed.push(name);
    }
    Ok(removed)
}

/// Names of the lab namespaces that currently exist (any run), as in `/run/netns`.
pub fn lab_namespaces() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(PREFIX))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_lab_names() {
        assert_eq!(owner_pid("blab-123-4-gw"), Some(123));
        assert_eq!(owner_pid("blab-x-4-gw"), None);
        assert_eq!(owner_pid("labx-g"), None);
    }

    #[test]
    fn nft_script_empty_only_deletes() {
        let s = nft_wire_script(&BTreeMap::new());
        assert!(s.ends_with("delete table inet blab_wire\n"));
        let mut m = BTreeMap::new();
        m.insert(
            "g-v1".to_string(),
            WireDrop {
                loss_pct: 2.5,
                blackhole: false,
            },
        );
        let s = nft_wire_script(&m);
        assert!(s.contains("iifname \"g-v1\" numgen random mod 10000 < 250 counter drop"));
    }
}
