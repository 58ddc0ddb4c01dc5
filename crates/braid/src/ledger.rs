//! The ledger of what braid changed in a network namespace's settings: sysctls
//! (`net.ipv4.tcp_fastopen`, `net.mptcp.stale_loss_cnt`, `allow_join_initial_addr_port`,
//! `rp_filter`), the MPTCP limits, and the converter's `signal` endpoints. These are settings
//! of the whole namespace, and several braid processes may rely on one of them at once (two
//! converters on two ports, a gateway and a converter in one namespace), so a process cannot
//! simply put back at exit what it found at start: the other may still need it.
//!
//! Each change is recorded with the value found before braid's first change (`original`), the
//! value braid wrote (`set`) and the processes holding it (pid and start time, so that a reused
//! pid is not taken for the holder). A process that needs a value already braid's joins the
//! holders; one that finds the value it needs set by someone else records nothing and never
//! puts anything back. When the last holder goes, at its exit or, after a crash, at the next
//! start of any braid process in the namespace, the original is put back, but only where the
//! current value is still the one braid set: an operator's change made since is theirs to keep.
//!
//! The decisions ([`Ledger`]) are plain functions over the ledger and the values read, tested
//! without root; [`Session`] is the thin I/O around them: a JSON file per namespace under the
//! state directory, read and written under an exclusive `flock` on that directory, the reads
//! and writes of `/proc/sys` and of the path manager.
//!
//! The file is named after the namespace's inode and its cookie (`SO_NETNS_COOKIE`): the inode
//! is reused as soon as a namespace is gone, the cookie never, so a ledger left by a process
//! killed in a namespace since deleted is never applied to a new one. Such a file is removed
//! by the next braid start on the machine once no process is in its namespace and no
//! `/run/netns` name holds it. `/run` is a tmpfs: after a reboot nothing is left.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use braid_sys::pm::{PathManager, PmLimits};
use serde::{Deserialize, Serialize};

/// The key of the MPTCP limits in the ledger (not a sysctl: set over generic netlink).
pub const LIMITS: &str = "mptcp limits";
/// Sysctl keys are paths under `/proc/sys`, with slashes: an interface name may hold a dot
/// (`eth0.100`), which the dotted form could not tell from a separator.
pub const TCP_FASTOPEN: &str = "net/ipv4/tcp_fastopen";
pub const STALE_LOSS_CNT: &str = "net/mptcp/stale_loss_cnt";
pub const JOIN_INITIAL: &str = "net/mptcp/allow_join_initial_addr_port";

/// `net/ipv4/conf/<interface>/rp_filter`.
pub fn rp_filter(interface: &str) -> String {
    format!("net/ipv4/conf/{interface}/rp_filter")
}

/// How long a process waits for another braid process to finish its turn with the ledger.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// A braid process, told apart from a later process with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// `starttime` of `/proc/<pid>/stat`, in clock ticks since boot.
    pub start: u64,
}

impl Holder {
    /// This process.
    pub fn me() -> Holder {
        let pid = std::process::id();
        Holder {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether the process still runs (the same one, not a successor with its pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// Field 22 of `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first, so field 22 is the 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One setting braid changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The value before braid's first change.
    pub original: String,
    /// The value braid wrote last.
    pub set: String,
    pub holders: Vec<Holder>,
}

/// An MPTCP endpoint braid added (the kernel's id and the address, which together tell it
/// from an endpoint someone added later with a reused id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedEndpoint {
    pub id: u8,
    pub addr: IpAddr,
    pub holders: Vec<Holder>,
}

/// What braid changed in one namespace and who relies on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    #[serde(default)]
    pub settings: BTreeMap<String, Claim>,
    #[serde(default)]
    pub endpoints: Vec<OwnedEndpoint>,
}

/// A setting to put back: `original`, if the current value is still `set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub key: String,
    pub original: String,
    pub set: String,
}

impl Restore {
    /// The value to write, given the current one: none when someone changed it since.
    pub fn write_over(&self, current: &str) -> Option<&str> {
        (current == self.set).then_some(self.original.as_str())
    }
}

/// What the last holders leaving take away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Undo {
    pub settings: Vec<Restore>,
    /// Endpoints to delete, where the id still carries the address.
    pub endpoints: Vec<(u8, IpAddr)>,
}

impl Undo {
    pub fn is_empty(&self) -> bool {
        self.settings.is_empty() && self.endpoints.is_empty()
    }
}

impl Ledger {
    pub fn is_empty(&self) -> bool {
        self.settings.is_empty() && self.endpoints.is_empty()
    }

    /// `me` needs `key` to be `wanted`; it is `current` now. Returns the value to write, if
    /// any, and records the claim as if that write succeeded.
    pub fn claim(&mut self, me: Holder, key: &str, current: &str, wanted: &str) -> Option<String> {
        if let Some(c) = self.settings.get(key)
            && c.set != current
        {
            // Changed since braid set it: the value is someone else's now, and so is the
            // original braid would have put back.
            self.settings.remove(key);
        }
        match self.settings.get_mut(key) {
            Some(c) => {
                if !c.holders.contains(&me) {
                    c.holders.push(me);
                }
                (wanted != current).then(|| {
                    c.set = wanted.to_string();
                    c.set.clone()
                })
            }
            None if wanted == current => None,
            None => {
                self.settings.insert(
                    key.to_string(),
                    Claim {
                        original: current.to_string(),
                        set: wanted.to_string(),
                        holders: vec![me],
                    },
                );
                Some(wanted.to_string())
            }
        }
    }

    /// Every process holding something, with repeats.
    pub fn holders(&self) -> impl Iterator<Item = &Holder> {
        self.settings
            .values()
            .flat_map(|c| &c.holders)
            .chain(self.endpoints.iter().flat_map(|e| &e.holders))
    }

    /// Whether the endpoint `(id, addr)` is braid's.
    pub fn owns_endpoint(&self, id: u8, addr: IpAddr) -> bool {
        self.endpoints.iter().any(|e| e.id == id && e.addr == addr)
    }

    /// `me` added the endpoint, or relies on one braid added.
    pub fn hold_endpoint(&mut self, me: Holder, id: u8, addr: IpAddr) {
        match self
            .endpoints
            .iter_mut()
            .find(|e| e.id == id && e.addr == addr)
        {
            Some(e) if e.holders.contains(&me) => {}
            Some(e) => e.holders.push(me),
            None => self.endpoints.push(OwnedEndpoint {
                id,
                addr,
                holders: vec![me],
            }),
        }
    }

    /// Takes the holders for which `gone` is true off every claim; what no holder is left for
    /// is removed from the ledger and returned, to be undone.
    pub fn release(&mut self, gone: impl Fn(&Holder) -> bool) -> Undo {
        let mut undo = Undo::default();
        self.settings.retain(|key, c| {
            c.holders.retain(|h| !gone(h));
            let keep = !c.holders.is_empty();
            if !keep {
                undo.settings.push(Restore {
                    key: key.clone(),
                    original: c.original.clone(),
                    set: c.set.clone(),
                });
            }
            keep
        });
        self.endpoints.retain_mut(|e| {
            e.holders.retain(|h| !gone(h));
            let keep = !e.holders.is_empty();
            if !keep {
                undo.endpoints.push((e.id, e.addr));
            }
            keep
        });
        undo
    }
}

/// What a setting call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It had the value needed.
    Unchanged,
    Set {
        from: String,
        to: String,
    },
}

/// The ledger of this namespace, locked for one process's turn; saved when dropped.
pub struct Session {
    _lock: nix::fcntl::Flock<File>,
    file: PathBuf,
    pub ledger: Ledger,
    me: Holder,
    pm: Option<PathManager>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("file", &self.file)
            .field("ledger", &self.ledger)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Locks and reads the ledger of this namespace under `dir`, first undoing what processes
    /// that no longer run (a crash, a `kill -9`) left.
    pub async fn open(dir: &Path) -> anyhow::Result<Session> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
        let lock = lock(dir).await?;
        let (inode, cookie) = namespace_id()?;
        let file = dir.join(format!("netns-{inode}-{cookie}.json"));
        let ledger = match std::fs::read_to_string(&file) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), error = %e,
                    "unreadable state file: what it recorded cannot be restored");
                Ledger::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ledger::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", file.display()));
            }
        };
        let mut s = Session {
            _lock: lock,
            file,
            ledger,
            me: Holder::me(),
            pm: None,
        };
        let undo = s.ledger.release(|h| !h.alive());
        if !undo.is_empty() {
            tracing::info!("restoring what a braid process that did not exit cleanly changed");
            s.undo(undo).await;
        }
        Ok(s)
    }

    /// Sets a sysctl (a key under `/proc/sys`) to what `decide` makes of its current value,
    /// and records it. `decide` may refuse (a setting braid must not change).
    pub fn sysctl(
        &mut self,
        key: &str,
        decide: impl FnOnce(&str) -> anyhow::Result<String>,
    ) -> anyhow::Result<Change> {
        let path = sysctl_path(key);
        let current = read_trimmed(&path).with_context(|| format!("reading {}", path.display()))?;
        let wanted = decide(&current)?;
        let before = self.ledger.clone();
        match self.ledger.claim(self.me, key, &current, &wanted) {
            None => Ok(Change::Unchanged),
            Some(v) => match std::fs::write(&path, &v) {
                Ok(()) => Ok(Change::Set {
                    from: current,
                    to: v,
                }),
                Err(e) => {
                    self.ledger = before;
                    Err(e).with_context(|| format!("writing {v} to {}", path.display()))
                }
            },
        }
    }

    /// Sets the MPTCP limits, and records them.
    pub async fn limits(&mut self, wanted: PmLimits) -> anyhow::Result<Change> {
        let pm = self.pm()?;
        let current = pm.limits().await.context("reading the MPTCP limits")?;
        let before = self.ledger.clone();
        match self
            .ledger
            .claim(self.me, LIMITS, &limits_text(current), &limits_text(wanted))
        {
            None => Ok(Change::Unchanged),
            Some(v) => match self.pm()?.set_limits(wanted).await {
                Ok(()) => Ok(Change::Set {
                    from: limits_text(current),
                    to: v,
                }),
                Err(e) => {
                    self.ledger = before;
                    Err(e).context("setting the MPTCP limits")
                }
            },
        }
    }

    /// Whether an endpoint found in the kernel is braid's (added by a braid process still
    /// running).
    pub fn owns_endpoint(&self, id: u8, addr: IpAddr) -> bool {
        self.ledger.owns_endpoint(id, addr)
    }

    /// Records that this process added the endpoint or relies on braid's.
    pub fn hold_endpoint(&mut self, id: u8, addr: IpAddr) {
        self.ledger.hold_endpoint(self.me, id, addr);
    }

    /// Takes this process off the ledger and undoes what it was the last to hold.
    pub async fn release(mut self) {
        let me = self.me;
        let undo = self.ledger.release(|h| *h == me);
        self.undo(undo).await;
    }

    fn pm(&mut self) -> anyhow::Result<&mut PathManager> {
        let pm = match self.pm.take() {
            Some(pm) => pm,
            None => PathManager::new().context("opening the MPTCP path manager")?,
        };
        Ok(self.pm.insert(pm))
    }

    async fn undo(&mut self, undo: Undo) {
        if !undo.endpoints.is_empty() {
            match self.pm() {
                Ok(pm) => match pm.endpoints().await {
                    Ok(now) => {
                        for (id, addr) in &undo.endpoints {
                            if now.iter().any(|e| e.id == *id && e.addr == *addr) {
                                match pm.delete_endpoint(*id).await {
                                    Ok(()) => tracing::info!(id, %addr, "removed MPTCP endpoint"),
                                    Err(e) => tracing::warn!(id, %addr, error = %e,
                                        "could not remove MPTCP endpoint"),
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "listing MPTCP endpoints to remove"),
                },
                Err(e) => tracing::warn!(error = %e, "could not remove MPTCP endpoints"),
            }
        }
        for r in &undo.settings {
            if let Err(e) = self.restore(r).await {
                tracing::warn!(key = r.key, error = format!("{e:#}"), "could not restore");
            }
        }
    }

    async fn restore(&mut self, r: &Restore) -> anyhow::Result<()> {
        let current = if r.key == LIMITS {
            limits_text(self.pm()?.limits().await?)
        } else {
            match read_trimmed(&sysctl_path(&r.key)) {
                Ok(v) => v,
                // An interface that is gone took its settings with it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        };
        let Some(value) = r.write_over(&current) else {
            tracing::info!(
                key = r.key,
                current,
                braid_set = r.set,
                "left as it is: changed since braid set it"
            );
            return Ok(());
        };
        if r.key == LIMITS {
            let limits = parse_limits(value).context("a malformed limits entry")?;
            self.pm()?.set_limits(limits).await?;
        } else {
            std::fs::write(sysctl_path(&r.key), value)?;
        }
        tracing::info!(key = r.key, from = current, to = value, "restored");
        Ok(())
    }

    fn save(&self) -> io::Result<()> {
        if self.ledger.is_empty() {
            return match std::fs::remove_file(&self.file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let tmp = self.file.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&self.ledger).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &self.file)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Before the lock goes (fields drop after this).
        if let Err(e) = self.save() {
            tracing::warn!(file = %self.file.display(), error = %e,
                "could not save what to restore after a crash");
        }
    }
}

/// Opens a session only to undo what dead processes left; each daemon does so at start. A
/// directory that cannot be made or locked (a daemon run without root, which cannot change
/// namespace settings either) is only warned about here: a change that needs recording fails
/// where it is asked for.
pub async fn tidy(dir: &Path) {
    match Session::open(dir).await {
        // The other namespaces' ledgers are looked at here only: a walk over /proc.
        Ok(s) => sweep(dir, &s.file),
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "the ledger of namespace settings (state_dir) cannot be used: braid changes none"
        ),
    }
}

/// Takes this process off the ledger at exit; failures are logged.
pub async fn release(dir: &Path) {
    match Session::open(dir).await {
        Ok(s) => s.release().await,
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "could not restore the namespace settings braid changed"
        ),
    }
}

/// An exclusive `flock` on the state directory: one braid process at a time reads, changes and
/// writes a ledger (the turns take milliseconds). Not blocking the runtime: tried every 10 ms.
async fn lock(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    let mut file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if tokio::time::Instant::now() < deadline => {
                file = f;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((_, e)) => {
                return Err(io::Error::from(e)).with_context(|| {
                    format!(
                        "locking {} (another braid process holds it longer than {LOCK_WAIT:?})",
                        dir.display()
                    )
                });
            }
        }
    }
}

/// The inode and the cookie of this thread's network namespace: the name of its ledger.
fn namespace_id() -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading /proc/thread-self/ns/net")?
        .ino();
    let probe = std::os::unix::net::UnixDatagram::unbound()?;
    let cookie = braid_sys::sockopt::netns_cookie(&probe)
        .context("reading the network namespace's cookie (SO_NETNS_COOKIE, Linux >= 5.14)")?;
    Ok((inode, cookie))
}

/// Removes the ledgers of namespaces that are gone: no holder runs and nothing holds a
/// namespace with that inode (a process in it, a `/run/netns` name). A namespace kept only
/// by an open descriptor or a bind mount elsewhere, or only by processes braid may not look at,
/// would lose its ledger; one with a process in it (any daemon, a shell) does not. Only as
/// root: another user sees only its own processes' namespaces.
fn sweep(dir: &Path, mine: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let others: Vec<(PathBuf, u64)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != mine)
        .filter_map(|p| {
            let inode = ledger_inode(p.file_name()?.to_str()?)?;
            Some((p, inode))
        })
        .collect();
    if others.is_empty() || !nix::unistd::geteuid().is_root() {
        return;
    }
    let Some(live) = live_namespaces() else {
        return;
    };
    for (path, inode) in others {
        if live.contains(&inode) {
            continue;
        }
        let abandoned = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Ledger>(&t).ok())
            .is_none_or(|l| !l.holders().any(|h| h.alive()));
        if abandoned && std::fs::remove_file(&path).is_ok() {
            tracing::info!(file = %path.display(), "removed the ledger of a namespace that is gone");
        }
    }
}

/// `netns-<inode>-<cookie>.json` → the inode.
fn ledger_inode(name: &str) -> Option<u64> {
    let (inode, cookie) = name
        .strip_prefix("netns-")?
        .strip_suffix(".json")?
        .split_once('-')?;
    cookie.parse::<u64>().ok()?;
    inode.parse().ok()
}

/// The inodes of every network namespace a process braid may look at is in, or `/run/netns`
/// names.
fn live_namespaces() -> Option<std::collections::HashSet<u64>> {
    use std::os::unix::fs::MetadataExt;
    let mut live = std::collections::HashSet::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        if !e
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        // Exited meanwhile, a kernel thread, or one braid may not look at (a process that
        // made itself non-dumpable): left out.
        if let Ok(m) = std::fs::metadata(e.path().join("ns/net")) {
            live.insert(m.ino());
        }
    }
    if let Ok(names) = std::fs::read_dir("/run/netns") {
        live.extend(
            names
                .flatten()
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .map(|m| m.ino()),
        );
    }
    Some(live)
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key)
}

fn read_trimmed(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path).map(|s| s.trim().to_string())
}

fn limits_text(l: PmLimits) -> String {
    format!("{} {}", l.subflows, l.add_addr_accepted)
}

fn parse_limits(text: &str) -> Option<PmLimits> {
    let (s, a) = text.split_once(' ')?;
    Some(PmLimits {
        subflows: s.parse().ok()?,
        add_addr_accepted: a.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Holder = Holder { pid: 10, start: 1 };
    const B: Holder = Holder { pid: 11, start: 2 };

    #[test]
    fn a_value_already_in_place_is_not_claimed_and_never_put_back() {
        let mut l = Ledger::default();
        assert_eq!(l.claim(A, STALE_LOSS_CNT, "2", "2"), None);
        assert!(l.is_empty());
        assert!(l.release(|h| *h == A).is_empty());
    }

    #[test]
    fn the_last_holder_puts_the_original_back() {
        let mut l = Ledger::default();
        assert_eq!(l.claim(A, STALE_LOSS_CNT, "4", "2").as_deref(), Some("2"));
        // B relies on the value braid set: it joins, writes nothing.
        assert_eq!(l.claim(B, STALE_LOSS_CNT, "2", "2"), None);
        assert!(l.release(|h| *h == A).is_empty(), "B still holds it");
        let undo = l.release(|h| *h == B);
        assert_eq!(
            undo.settings,
            vec![Restore {
                key: STALE_LOSS_CNT.into(),
                original: "4".into(),
                set: "2".into()
            }]
        );
        assert!(l.is_empty());
    }

    #[test]
    fn bits_added_by_two_holders_go_back_to_the_first_original() {
        // tcp_fastopen: the converter adds the server bit, a gateway the client bit.
        let mut l = Ledger::default();
        assert_eq!(l.claim(A, TCP_FASTOPEN, "0", "2").as_deref(), Some("2"));
        assert_eq!(l.claim(B, TCP_FASTOPEN, "2", "3").as_deref(), Some("3"));
        assert!(l.release(|h| *h == B).is_empty());
        let undo = l.release(|h| *h == A);
        assert_eq!(undo.settings[0].original, "0");
        assert_eq!(undo.settings[0].write_over("3"), Some("0"));
    }

    #[test]
    fn a_change_made_since_is_kept() {
        let mut l = Ledger::default();
        l.claim(A, STALE_LOSS_CNT, "4", "2");
        let undo = l.clone().release(|h| *h == A);
        // The operator set 3 while braid ran: nothing is written over it.
        assert_eq!(undo.settings[0].write_over("3"), None);
        assert_eq!(undo.settings[0].write_over("2"), Some("4"));
        // And a later claim finding 3 records 3 as the original, not braid's old 4.
        assert_eq!(l.claim(B, STALE_LOSS_CNT, "3", "2").as_deref(), Some("2"));
        assert_eq!(l.settings[STALE_LOSS_CNT].original, "3");
        assert_eq!(l.settings[STALE_LOSS_CNT].holders, vec![B]);
    }

    #[test]
    fn dead_holders_are_released_and_live_ones_kept() {
        let mut l = Ledger::default();
        let ep: IpAddr = "10.0.0.1".parse().unwrap();
        l.claim(A, LIMITS, "2 0", "4 0");
        l.claim(B, JOIN_INITIAL, "1", "0");
        l.hold_endpoint(A, 3, ep);
        l.hold_endpoint(A, 3, ep);
        assert!(l.owns_endpoint(3, ep));
        assert!(!l.owns_endpoint(4, ep));
        let undo = l.release(|h| *h == A);
        assert_eq!(undo.endpoints, vec![(3, ep)]);
        assert_eq!(undo.settings.len(), 1);
        assert_eq!(undo.settings[0].key, LIMITS);
        assert_eq!(l.settings.keys().collect::<Vec<_>>(), vec![JOIN_INITIAL]);
        assert!(l.endpoints.is_empty());
    }

    #[test]
    fn a_shared_endpoint_goes_with_its_last_holder() {
        let mut l = Ledger::default();
        let ep: IpAddr = "fd00::1".parse().unwrap();
        l.hold_endpoint(A, 7, ep);
        l.hold_endpoint(B, 7, ep);
        assert!(l.release(|h| *h == A).is_empty());
        assert_eq!(l.release(|h| *h == B).endpoints, vec![(7, ep)]);
    }

    #[test]
    fn the_file_round_trips_and_reads_an_empty_object() {
        let mut l = Ledger::default();
        l.claim(A, &rp_filter("eth0.100"), "1", "2");
        l.hold_endpoint(B, 1, "10.0.0.1".parse().unwrap());
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<Ledger>(&text).unwrap(), l);
        assert_eq!(
            serde_json::from_str::<Ledger>("{}").unwrap(),
            Ledger::default()
        );
        assert_eq!(
            sysctl_path(&rp_filter("eth0.100")),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
    }

    #[test]
    fn ledger_files_name_their_namespace() {
        assert_eq!(ledger_inode("netns-4026532429-8193.json"), Some(4026532429));
        assert_eq!(ledger_inode("netns-4026532429.json"), None);
        assert_eq!(ledger_inode("netns-1-2.json.tmp"), None);
        assert_eq!(ledger_inode("gateway-1.json"), None);
        let (inode, _) = namespace_id().unwrap();
        assert!(live_namespaces().unwrap().contains(&inode));
    }

    #[test]
    fn limits_text_round_trips() {
        let l = PmLimits {
            subflows: 8,
            add_addr_accepted: 0,
        };
        assert_eq!(parse_limits(&limits_text(l)), Some(l));
        assert_eq!(parse_limits("8"), None);
    }

    #[test]
    fn start_time_is_read_after_the_command_name() {
        // A name with a space and a parenthesis, as a process may give itself.
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        let me = Holder::me();
        assert!(me.alive());
        assert!(
            !Holder {
                pid: me.pid,
                start: me.start + 1
            }
            .alive()
        );
    }
}
