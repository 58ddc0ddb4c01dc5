//! `braid demo`: the main job, shown on any Linux machine with MPTCP, as root. It builds the
//! standard lab in network namespaces (LAN client, gateway with shaped uplinks of different
//! rates and delays, converter, server) and tells the story in phases:
//!
//! 1. each uplink alone: one plain TCP connection per uplink, side by side, no braid (the
//!    "best single link" the bond is compared with, measured in the same run);
//! 2. real `braid converter` and `braid gateway` processes (this very binary) start from
//!    generated config files (their paths printed, so a user can read a working config);
//! 3. bonded: curl downloads through the transparent capture while a paced 4 Mbit/s live
//!    stream flows server → client; a link is cut and comes back, another is blackholed
//!    (carrier up, everything dropped) and heals ([`story::timeline`]).
//!
//! A live view ([`view`]) shows each uplink's rate and health; at the end a summary (rates,
//! bonding gain, the longest stall at each event, bytes lost, checksum), an SVG plot
//! ([`plot`]) and, with `--json`, the same for machines. Every byte of the download is checked
//! against what the server sends as it arrives, every record of the stream by its sequence.
//! Everything is removed at the end, also on Ctrl-C and on a panic (the lab's drops).

mod plot;
mod story;
mod view;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use braid_lab::stream::{Flow, Running, Spec};
use braid_lab::{Delay, Netns, Output, StandardConfig, StandardLab};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use story::{DEFAULT_UPLINKS, UplinkSpec, parse_uplinks};

/// `--uplinks`, parsed.
#[derive(Debug, Clone)]
pub struct Uplinks(pub Vec<UplinkSpec>);
use story::{Kind, Sample};

const CONVERTER_PORT: u16 = 5124;
const HTTP_PORT: u16 = 80;
const STREAM_PORT: u16 = 9300;
/// Metrics of each daemon, on the loopback of its own namespace.
const GATEWAY_METRICS: &str = "127.0.0.1:9464";
const CONVERTER_METRICS: &str = "127.0.0.1:9465";
/// How long each uplink is measured alone, all side by side (they share nothing).
const ALONE: Duration = Duration::from_secs(4);
/// How often the counters are read and the view drawn.
const TICK: Duration = Duration::from_millis(250);
/// Gaps shorter than this are not stalls (the stream's records come every 2 ms, the
/// download's reads every few ms); the summary says "< 20 ms" for them.
const GAP: Duration = braid_lab::stream::Live::GAP;
/// Samples the rates shown and plotted are averaged over (1 s).
const SMOOTH: usize = 4;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub uplinks: Vec<UplinkSpec>,
    /// Length of the bonded phase.
    pub duration: Duration,
    pub failover: bool,
    /// Leave the lab up at the end until Ctrl-C, with the commands to look at it.
    pub keep: bool,
    /// Results as JSON on standard output (the progress goes to standard error).
    pub json: bool,
}

/// What the demo needs of the machine, as found.
#[derive(Debug, Clone)]
struct Facts {
    root: bool,
    /// Tools the lab runs, with whether each was found on the PATH.
    tools: Vec<(&'static str, bool)>,
    /// `Err`: the kernel's own words on why MPTCP cannot be used.
    mptcp: Result<(), String>,
    netns: bool,
    tun: bool,
}

impl Facts {
    fn gather() -> Facts {
        Facts {
            root: nix::unistd::geteuid().is_root(),
            tools: ["ip", "nft", "tc", "curl", "nstat"]
                .into_iter()
                .map(|t| (t, which(t).is_some()))
                .collect(),
            mptcp: braid_sys::kernel::check_mptcp().map_err(|e| e.to_string()),
            netns: std::path::Path::new("/proc/self/ns/net").exists(),
            tun: std::path::Path::new("/dev/net/tun").exists(),
        }
    }
}

/// Every reason the demo cannot run here, each with the one thing to do about it (all at once:
/// a newcomer should not fix them one run at a time).
fn problems(f: &Facts) -> Vec<String> {
    let mut v = Vec::new();
    if !f.root {
        v.push("not root: the demo builds network namespaces; run `sudo ./scripts/demo`".into());
    }
    let missing: Vec<&str> = f.tools.iter().filter(|t| !t.1).map(|t| t.0).collect();
    if !missing.is_empty() {
        v.push(format!(
            "missing {}: `apt-get install iproute2 nftables curl procps` (./scripts/demo does it)",
            missing.join(", ")
        ));
    }
    if let Err(e) = &f.mptcp {
        v.push(e.clone());
    }
    if !f.netns {
        v.push("no network namespaces (/proc/self/ns/net): a kernel with CONFIG_NET_NS=y".into());
    }
    if !f.tun {
        v.push(
            "no /dev/net/tun (the lab's delay lines need it): `modprobe tun`, or a kernel with \
             CONFIG_TUN"
                .into(),
        );
    }
    v
}

pub fn main(args: Options) -> anyhow::Result<()> {
    let found = problems(&Facts::gather());
    if !found.is_empty() {
        bail!(
            "braid demo cannot run on this machine:\n  - {}",
            found.join("\n  - ")
        );
    }
    let least = if args.failover {
        story::MIN_DURATION_WITH_FAILOVER
    } else {
        story::MIN_DURATION
    };
    if args.duration < least {
        bail!(
            "--duration {}: the story needs at least {} s{}",
            args.duration.as_secs(),
            least.as_secs(),
            if args.failover {
                " with its failures (or give --no-failover)"
            } else {
                ""
            }
        );
    }
    // Ctrl-C reaches curl and the daemons too (same process group), which ends the download;
    // the flag makes the demo skip what is left and clean up instead of dying with its
    // namespaces in place. Handlers (unlike a blocked mask) are not inherited across exec.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let mut out: Box<dyn Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let removed = braid_lab::sweep().unwrap_or_default();
    if !removed.is_empty() {
        writeln!(
            out,
            "removed {} namespaces left by an interrupted run",
            removed.len()
        )?;
    }
    let Some(results) = run(&args, &stop, &mut out)? else {
        return Ok(());
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    if !results.checksum_ok || results.bytes_lost > 0 {
        bail!("the download or the stream did not arrive intact (see above)");
    }
    Ok(())
}

/// What the demo found, for people (the summary) and machines (`--json`).
#[derive(Debug, Serialize)]
struct Results {
    uplinks: Vec<UplinkResult>,
    best_single_link: String,
    best_single_mbit: f64,
    /// The download's rate while every uplink worked.
    bonded_mbit: f64,
    /// `bonded_mbit / best_single_mbit`.
    bonding_gain: f64,
    /// The sum of what each uplink carried alone.
    sum_alone_mbit: f64,
    events: Vec<EventResult>,
    stream: StreamResult,
    download: DownloadResult,
    /// Stream bytes that never arrived plus download bytes that arrived wrong.
    bytes_lost: u64,
    checksum_ok: bool,
    svg: PathBuf,
    gateway_config: PathBuf,
    converter_config: PathBuf,
    logs: PathBuf,
}

#[derive(Debug, Serialize)]
struct UplinkResult {
    #[serde(flatten)]
    spec: UplinkSpec,
    /// One plain TCP connection over this uplink alone.
    alone_mbit: f64,
    /// On the link (both ways, headers included) while every uplink worked.
    bonded_mbit: f64,
    /// Bytes on the link during the bonded phase.
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct EventResult {
    /// On the demo's clock (from the start of the single-link phase), as in the event log
    /// and the plot.
    at_secs: f64,
    kind: Kind,
    uplink: String,
    caption: String,
    /// Longest gap between arrivals of the live stream from the event to the next one; 0 when
    /// none was longer than 20 ms.
    stream_stall_ms: f64,
    /// The same for the download's bytes.
    download_stall_ms: f64,
    /// The failover bound the stream stall is held to.
    bound_ms: f64,
    within_bound: bool,
    /// When braid's view of the uplink caught up: down, dead, or back up.
    noticed_after_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct StreamResult {
    records_sent: u64,
    records_received: u64,
    intact: bool,
    longest_gap_ms: f64,
    worst_delay_ms: f64,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct DownloadResult {
    bytes: u64,
    mbit: f64,
    /// Every byte received is the byte the server sent at that offset.
    intact: bool,
    sha256_received: String,
    sha256_sent: String,
}

/// The download as it arrives: bytes counted and checked against what the server sends.
#[derive(Default)]
struct DownloadLive {
    bytes: AtomicU64,
    /// Gaps between arrivals longer than [`GAP`]: (when each ended, its length).
    gaps: Mutex<Vec<(Instant, Duration)>>,
    /// The offset of the first byte that differs from the server's.
    first_bad: Mutex<Option<u64>>,
}

/// Reads the body from curl, checks each byte against the server's repeating block, hashes
/// it. Returns the SHA-256 of what arrived.
fn check_download(mut r: impl Read, live: &DownloadLive) -> [u8; 32] {
    let block = braid_lab::http::block();
    let mut buf = vec![0u8; 1 << 16];
    let mut h = Sha256::new();
    let mut at: u64 = 0;
    let mut last = Instant::now();
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        if at > 0 && now - last > GAP {
            if let Ok(mut g) = live.gaps.lock() {
                g.push((now, now - last));
            }
        }
        last = now;
        h.update(&buf[..n]);
        let mut bad = live.first_bad.lock().ok();
        if bad.as_ref().is_some_and(|b| b.is_none()) {
            for (i, b) in buf[..n].iter().enumerate() {
                let off = at + i as u64;
                if *b != block[(off % block.len() as u64) as usize] {
                    if let Some(slot) = bad.as_mut() {
                        **slot = Some(off);
                    }
                    break;
                }
            }
        }
        drop(bad);
        at += n as u64;
        live.bytes.store(at, Ordering::Relaxed);
    }
    h.finalize().into()
}

/// Bytes both ways on each of `ifaces` in `ns` (`/proc/net/dev` read from a thread inside).
fn if_bytes(ns: &Netns, ifaces: &[String]) -> Vec<u64> {
    let text = ns
        .enter(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    ifaces
        .iter()
        .map(|i| {
            text.lines()
                .find_map(|l| l.trim_start().strip_prefix(&format!("{i}:")))
                .map_or(0, |rest| {
                    let f: Vec<u64> = rest
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    f.first().copied().unwrap_or(0) + f.get(8).copied().unwrap_or(0)
                })
        })
        .collect()
}

/// What the gateway says of each uplink (by name): (health, role, subflows).
fn uplink_states(ns: &Netns) -> Vec<(String, String, String, usize)> {
    ns.enter(|| crate::status::fetch("gateway"))
        .ok()
        .and_then(Result::ok)
        .map(|s| {
            s.uplinks
                .into_iter()
                .map(|u| (u.name, u.health, u.role, u.subflows))
                .collect()
        })
        .unwrap_or_default()
}

/// The word the view shows for an uplink.
fn shown_state(health: &str, role: &str) -> String {
    match (health, role) {
        ("up", "standby") => "standby".into(),
        ("up", r) if r.starts_with("carrying (backup") => "backup".into(),
        (h, _) => h.into(),
    }
}

fn hex32(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_configs(
    dir: &Path,
    lab: &StandardLab,
    uplinks: &[UplinkSpec],
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let quoted = |v: &[&str]| {
        v.iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let converter = format!(
        "# braid converter, as the demo runs it (network side: a VPS in real life).\n\
         listen = [\"[::]:{CONVERTER_PORT}\"]\n\
         # Who may use it: the gateway's uplink addresses. An open converter is an open proxy.\n\
         allow_client = [{}]\n\
         # Where they may go: the lab's server.\n\
         allow_dest = [{}]\n\
         metrics = \"{CONVERTER_METRICS}\"\n",
        quoted(&braid_lab::standard::UPLINK_PREFIXES),
        quoted(&braid_lab::standard::SERVER_PREFIXES),
    );
    let mut gateway = format!(
        "# braid gateway, as the demo runs it (user side: a home router in real life).\n\
         converter = [\"{}:{CONVERTER_PORT}\"]\n\
         # Capture the LAN's TCP connections transparently (nftables TPROXY).\n\
         transparent = \"tproxy\"\n\
         metrics = \"{GATEWAY_METRICS}\"\n",
        lab.converter_v4()
    );
    for (spec, u) in uplinks.iter().zip(&lab.uplinks) {
        gateway.push_str(&format!(
            "\n[[uplink]]\n# {} Mbit/s, {} ms one way\ninterface = \"{}\"\nname = \"{}\"\n{}",
            spec.rate_bps as f64 / 1e6,
            spec.delay.as_millis(),
            u.gateway_if,
            spec.name,
            if spec.backup {
                "# Metered: carries nothing while a primary works.\nbackup = true\n"
            } else {
                ""
            }
        ));
    }
    let c = dir.join("converter.toml");
    let g = dir.join("gateway.toml");
    std::fs::write(&c, converter)?;
    std::fs::write(&g, gateway)?;
    Ok((c, g))
}

/// The moment-by-moment state the loop keeps.
struct Tracker {
    t0: Instant,
    samples: Vec<Sample>,
    /// Latest (health, role, subflows) per uplink.
    states: Vec<(String, String, usize)>,
    log: Vec<String>,
    caption: String,
}

impl Tracker {
    fn at(&self) -> Duration {
        self.t0.elapsed()
    }

    fn note(&mut self, text: String) {
        self.log
            .push(format!("{:>5.1} s  {text}", self.at().as_secs_f64()));
    }

    /// Mbit/s per uplink and of the download over the last second of samples.
    fn current(&self) -> (Vec<f64>, f64) {
        let n = self.samples.len();
        if n < 2 {
            return (vec![0.0; self.states.len()], 0.0);
        }
        story::rates(
            &self.samples[n.saturating_sub(SMOOTH + 1)],
            &self.samples[n - 1],
        )
    }

    fn frame(&self, uplinks: &[UplinkSpec], stream_gap: Option<Duration>) -> view::Frame {
        let (per, dl) = self.current();
        let n = self.samples.len();
        let rows = uplinks
            .iter()
            .enumerate()
            .map(|(i, u)| view::UplinkRow {
                name: u.name.clone(),
                spec: format!(
                    "{} Mbit/s, {} ms",
                    u.rate_bps as f64 / 1e6,
                    u.delay.as_millis()
                ),
                state: self
                    .states
                    .get(i)
                    .map_or_else(String::new, |s| shown_state(&s.0, &s.1)),
                mbit: per.get(i).copied().unwrap_or(0.0),
                history: (1..n)
                    .map(|k| story::rates(&self.samples[k - 1], &self.samples[k]).0[i])
                    .collect(),
                capacity: u.rate_bps as f64 / 1e6,
            })
            .collect();
        view::Frame {
            t: self.at(),
            caption: self.caption.clone(),
            uplinks: rows,
            download_mbit: dl,
            download_bytes: self.samples.last().map_or(0, |s| s.download),
            stream_gap,
            events: self.log.clone(),
        }
    }

    fn sample(
        &mut self,
        lab: &StandardLab,
        ifaces: &[String],
        download: u64,
        names: &[String],
        daemons: bool,
    ) {
        self.samples.push(Sample {
            t: self.at(),
            uplink_bytes: if_bytes(&lab.gateway, ifaces),
            download,
        });
        if !daemons {
            return;
        }
        let got = uplink_states(&lab.gateway);
        for (i, name) in names.iter().enumerate() {
            let Some((_, h, r, sf)) = got.iter().find(|s| &s.0 == name) else {
                continue;
            };
            let new = (h.clone(), r.clone(), *sf);
            let old = std::mem::replace(&mut self.states[i], new);
            if old.0 != *h && !old.0.is_empty() {
                self.note(format!("braid: {name} is {h}"));
            }
        }
    }
}

/// Runs the story; `None` when Ctrl-C cut it short (everything is removed all the same: the
/// lab and the processes go with their owners' drops).
fn run(
    args: &Options,
    stop: &AtomicBool,
    out: &mut Box<dyn Write>,
) -> anyhow::Result<Option<Results>> {
    let specs = &args.uplinks;
    let names: Vec<String> = specs.iter().map(|u| u.name.clone()).collect();
    writeln!(
        out,
        "building the lab: LAN client — gateway ={}= converter — server",
        specs
            .iter()
            .map(|u| format!(" {} ", u.describe()))
            .collect::<Vec<_>>()
            .join("=")
    )?;
    let lab = StandardLab::new(StandardConfig {
        uplinks: specs.len(),
        rates: Some(specs.iter().map(|u| u.rate_bps).collect()),
        delays: Some(specs.iter().map(|u| Delay::new(u.delay)).collect()),
        // The kernel's classic congestion control, so that the figures do not depend on
        // this host's default (bbr needs pacing this lab does not give it).
        congestion_control: Some("reno".into()),
        ..StandardConfig::default()
    })
    .context("building the namespaced lab")?;
    writeln!(
        out,
        "namespaces: client {}, gateway {}, converter {}, server {}",
        lab.client.name(),
        lab.gateway.name(),
        lab.converter.name(),
        lab.server.name()
    )?;
    let exe = std::env::current_exe().context("finding the braid binary")?;
    let dir = std::env::temp_dir().join(format!("braid-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (converter_config, gateway_config) = write_configs(&dir, &lab, specs)?;
    writeln!(
        out,
        "configs: {} and {}",
        gateway_config.display(),
        converter_config.display()
    )?;
    let ifaces: Vec<String> = lab.uplinks.iter().map(|u| u.gateway_if.clone()).collect();

    let mut view = view::View::new(args.json, std::mem::replace(out, Box::new(std::io::sink())));
    let mut tr = Tracker {
        t0: Instant::now(),
        samples: Vec::new(),
        states: vec![(String::new(), String::new(), 0); specs.len()],
        log: Vec::new(),
        caption: "each uplink alone: one plain TCP connection per uplink, no braid".into(),
    };

    // Phase 1: every uplink alone, side by side (the links share nothing but this CPU). Slow
    // start needs a few round trips to fill a link: a satellite's 600 ms RTT needs seconds.
    let rtt = specs.iter().map(|u| u.delay * 2).max().unwrap_or_default();
    let warmup = (rtt * 6).max(Duration::from_millis(500));
    let alone: Vec<_> = lab
        .uplinks
        .iter()
        .map(|u| {
            braid_lab::bulk::Bulk::new(&lab.converter, &lab.gateway, (u.gateway_v4, 7400).into())
                .src(u.converter_v4.into())
                .warmup(warmup)
                .duration(ALONE)
        })
        .map(|b| std::thread::spawn(move || b.measure().map_or(0.0, |t| t.mbit_per_sec())))
        .collect();
    while alone.iter().any(|h| !h.is_finished()) && !stop.load(Ordering::SeqCst) {
        tr.sample(&lab, &ifaces, 0, &names, false);
        view.draw(&tr.frame(specs, None));
        std::thread::sleep(TICK);
    }
    if stop.load(Ordering::SeqCst) {
        view.finish();
        println_interrupted(args);
        return Ok(None);
    }
    let alone_end = tr.at();
    let alone: Vec<f64> = alone.into_iter().map(|h| h.join().unwrap_or(0.0)).collect();
    for (u, m) in specs.iter().zip(&alone) {
        tr.note(format!("{} alone: {m:.1} Mbit/s", u.name));
    }

    // The daemons, from the files written above.
    tr.caption = "starting braid converter and braid gateway".into();
    view.draw(&tr.frame(specs, None));
    braid_lab::http::serve(&lab.server, HTTP_PORT, 1 << 40)?;
    let mut converter = braid_lab::process::spawn_daemon(
        &lab.converter,
        &exe,
        "converter",
        &["--config".into(), converter_config.display().to_string()],
        dir.join("converter.log"),
        "listening",
    )?;
    let mut gateway = braid_lab::process::spawn_daemon(
        &lab.gateway,
        &exe,
        "gateway",
        &["--config".into(), gateway_config.display().to_string()],
        dir.join("gateway.log"),
        "gateway running",
    )?;
    let ready = Instant::now();
    while ready.elapsed() < Duration::from_secs(8) && !stop.load(Ordering::SeqCst) {
        tr.sample(&lab, &ifaces, 0, &names, true);
        if tr
            .states
            .iter()
            .zip(specs)
            .all(|(s, u)| s.0 == "up" && (u.backup || s.2 > 0 || s.1.starts_with("carrying")))
        {
            break;
        }
        std::thread::sleep(TICK);
    }
    tr.note("braid converter and gateway running".into());

    // Phase 2: bonded, with the scripted failures.
    let events = story::timeline(specs, args.duration, args.failover);
    let url = format!("http://{}:{HTTP_PORT}/file", lab.server_v4());
    let mut curl = lab
        .client
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            &(args.duration.as_secs() + 60).to_string(),
            &url,
        ])
        .stdout(Output::Piped)
        .spawn()
        .context("starting curl in the client namespace")?;
    let body = curl.take_stdout().context("curl's output")?;
    let dl = Arc::new(DownloadLive::default());
    let reader = {
        let dl = dl.clone();
        std::thread::spawn(move || check_download(body, &dl))
    };
    let spec = Spec {
        duration: args.duration,
        ..Spec::default()
    };
    let stream = Running::start(
        &lab.client,
        &lab.server,
        (lab.server_v4(), STREAM_PORT).into(),
        Flow::Down,
        spec,
    )?;
    let live = stream.live();
    let tb = tr.at();
    let bonded_from = tr.samples.len();
    tr.note(format!("curl {url} and a live stream (4 Mbit/s) start"));
    let mut next = 0;
    let mut noticed: Vec<Option<Duration>> = vec![None; events.len()];
    while tr.at() - tb < args.duration && !stop.load(Ordering::SeqCst) {
        let t = tr.at() - tb;
        while next < events.len() && events[next].at <= t {
            let e = &events[next];
            let link = &lab.uplinks[e.uplink].link;
            let done = match e.kind {
                Kind::Cut => link.down(),
                Kind::Back => link.up(),
                Kind::Blackhole => link.set_blackhole(true),
                Kind::Clear => link.set_blackhole(false),
            };
            let what = e.caption(specs);
            match done {
                Ok(()) => tr.note(format!(">> {what}")),
                Err(err) => tr.note(format!(">> {what}: FAILED: {err}")),
            }
            next += 1;
        }
        tr.caption = format!("bonded phase — {}", story::caption_at(t, &events, specs));
        tr.sample(
            &lab,
            &ifaces,
            dl.bytes.load(Ordering::Relaxed),
            &names,
            true,
        );
        for (i, e) in events.iter().enumerate().take(next) {
            if noticed[i].is_none() {
                let (h, _, sf) = &tr.states[e.uplink];
                let seen = match e.kind {
                    Kind::Cut => h == "down" || h == "dead",
                    Kind::Blackhole => h == "dead",
                    Kind::Back | Kind::Clear => h == "up" && (*sf > 0 || specs[e.uplink].backup),
                };
                if seen {
                    noticed[i] = Some((tr.at() - tb).saturating_sub(e.at));
                }
            }
        }
        view.draw(&tr.frame(specs, Some(live.longest_gap())));
        std::thread::sleep(TICK);
    }
    let end = tr.at() - tb;
    let _ = curl.kill();
    let received_sha = reader.join().unwrap_or([0; 32]);
    view.finish();
    if stop.load(Ordering::SeqCst) {
        let _ = gateway.stop();
        let _ = converter.stop();
        println_interrupted(args);
        return Ok(None);
    }
    let report = stream.wait().ok();
    let mut out: Box<dyn Write> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };

    // The figures.
    let bonded: Vec<Sample> = tr.samples[bonded_from..]
        .iter()
        .map(|s| Sample {
            t: s.t.saturating_sub(tb),
            ..s.clone()
        })
        .collect();
    let steady = (
        Duration::from_secs(1),
        story::steady_end(&events, args.duration),
    );
    let bonded_mbit = story::download_rate(&bonded, steady.0, steady.1).unwrap_or(0.0);
    let link_rates = match (
        bonded.iter().find(|s| s.t >= steady.0),
        bonded.iter().rev().find(|s| s.t <= steady.1),
    ) {
        (Some(a), Some(b)) => story::rates(a, b).0,
        _ => vec![0.0; specs.len()],
    };
    let (best_i, best) = alone
        .iter()
        .copied()
        .enumerate()
        .fold((0, 0.0), |m, (i, r)| if r > m.1 { (i, r) } else { m });
    let rel = |gaps: Vec<(Instant, Duration)>| -> Vec<(Duration, Duration)> {
        gaps.into_iter()
            .map(|(at, g)| (at.saturating_duration_since(tr.t0).saturating_sub(tb), g))
            .collect()
    };
    let stream_gaps = rel(live.gaps());
    let download_gaps = rel(dl.gaps.lock().map(|g| g.clone()).unwrap_or_default());
    let event_results: Vec<EventResult> = events
        .iter()
        .zip(story::windows(&events, end))
        .zip(&noticed)
        .map(|((e, (from, to)), n)| {
            let s = story::longest_gap_in(&stream_gaps, from, to);
            EventResult {
                at_secs: (tb + e.at).as_secs_f64(),
                kind: e.kind,
                uplink: specs[e.uplink].name.clone(),
                caption: e.caption(specs),
                stream_stall_ms: s.as_secs_f64() * 1e3,
                download_stall_ms: story::longest_gap_in(&download_gaps, from, to).as_secs_f64()
                    * 1e3,
                bound_ms: e.kind.bound().as_secs_f64() * 1e3,
                within_bound: s < e.kind.bound(),
                noticed_after_ms: n.map(|d| d.as_secs_f64() * 1e3),
            }
        })
        .collect();
    let dl_bytes = dl.bytes.load(Ordering::Relaxed);
    let sent_sha = braid_lab::http::digest(dl_bytes);
    let first_bad = dl.first_bad.lock().ok().and_then(|b| *b);
    let download = DownloadResult {
        bytes: dl_bytes,
        mbit: dl_bytes as f64 * 8.0 / end.as_secs_f64().max(1e-3) / 1e6,
        intact: first_bad.is_none() && sent_sha == received_sha && dl_bytes > 0,
        sha256_received: hex32(&received_sha),
        sha256_sent: hex32(&sent_sha),
    };
    let stream_result = match &report {
        Some(r) => StreamResult {
            records_sent: spec.records(),
            records_received: r.records,
            intact: r.intact && r.records == spec.records(),
            longest_gap_ms: r.longest_gap.as_secs_f64() * 1e3,
            worst_delay_ms: r.worst_delay.as_secs_f64() * 1e3,
            error: r.error.clone(),
        },
        None => StreamResult {
            records_sent: spec.records(),
            records_received: live.records(),
            intact: false,
            longest_gap_ms: live.longest_gap().as_secs_f64() * 1e3,
            worst_delay_ms: 0.0,
            error: Some("the stream failed".into()),
        },
    };
    let bytes_lost = spec
        .records()
        .saturating_sub(stream_result.records_received)
        * spec.record as u64
        + first_bad.map_or(0, |b| dl_bytes - b);
    let uplink_results: Vec<UplinkResult> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| UplinkResult {
            spec: s.clone(),
            alone_mbit: alone[i],
            bonded_mbit: link_rates.get(i).copied().unwrap_or(0.0),
            bytes: match (bonded.first(), bonded.last()) {
                (Some(a), Some(b)) => b.uplink_bytes[i].saturating_sub(a.uplink_bytes[i]),
                _ => 0,
            },
        })
        .collect();

    // The picture.
    let svg = dir.join("demo.svg");
    let secs = |d: Duration| d.as_secs_f64();
    let smoothed = |k: usize| -> (f64, Vec<f64>, f64) {
        let a = &tr.samples[k.saturating_sub(SMOOTH)];
        let b = &tr.samples[k];
        let (per, dl) = story::rates(a, b);
        (secs(b.t), per, dl)
    };
    let pts: Vec<(f64, Vec<f64>, f64)> = (1..tr.samples.len()).map(smoothed).collect();
    let series: Vec<plot::Series> = specs
        .iter()
        .enumerate()
        .map(|(i, u)| plot::Series {
            name: u.name.clone(),
            points: pts.iter().map(|(t, per, _)| (*t, per[i])).collect(),
        })
        .collect();
    let total = plot::Series {
        name: "total on the uplinks".into(),
        points: pts
            .iter()
            .map(|(t, per, _)| (*t, per.iter().sum()))
            .collect(),
    };
    let download_series = plot::Series {
        name: "download through braid (goodput)".into(),
        points: pts
            .iter()
            .filter(|(t, _, _)| *t >= secs(tb))
            .map(|(t, _, d)| (*t, *d))
            .collect(),
    };
    let marks: Vec<plot::Mark> = events
        .iter()
        .map(|e| plot::Mark {
            at: secs(tb + e.at),
            caption: e.caption(specs),
            failure: matches!(e.kind, Kind::Cut | Kind::Blackhole),
        })
        .collect();
    let plotted = plot::write_svg(
        &svg,
        &plot::Plot {
            title: format!(
                "braid demo: {} bonded",
                specs
                    .iter()
                    .map(UplinkSpec::describe)
                    .collect::<Vec<_>>()
                    .join(" + ")
            ),
            uplinks: &series,
            total: &total,
            download: &download_series,
            alone: Some((0.0, secs(alone_end))),
            marks: &marks,
        },
    );
    if let Err(e) = &plotted {
        writeln!(out, "could not draw the plot: {e:#}")?;
    }

    let results = Results {
        best_single_link: specs[best_i].name.clone(),
        best_single_mbit: best,
        bonded_mbit,
        bonding_gain: if best > 0.0 { bonded_mbit / best } else { 0.0 },
        sum_alone_mbit: alone.iter().sum(),
        uplinks: uplink_results,
        events: event_results,
        checksum_ok: download.intact,
        download,
        stream: stream_result,
        bytes_lost,
        svg,
        gateway_config,
        converter_config,
        logs: dir.clone(),
    };
    print_summary(&mut out, &results, &tr.log)?;
    if args.keep {
        keep(&mut out, &lab, &exe, stop)?;
    }
    let _ = gateway.stop();
    let _ = converter.stop();
    Ok(Some(results))
}

fn println_interrupted(args: &Options) {
    if args.json {
        eprintln!("\ninterrupted: cleaning up");
    } else {
        println!("\ninterrupted: cleaning up");
    }
}

fn print_summary(out: &mut Box<dyn Write>, r: &Results, log: &[String]) -> std::io::Result<()> {
    writeln!(out, "\nevents")?;
    for l in log {
        writeln!(out, "  {l}")?;
    }
    writeln!(out, "\nsummary")?;
    writeln!(
        out,
        "  {:<8} {:>10} {:>8}  {:>12} {:>12} {:>10}",
        "uplink", "shaped", "delay", "alone", "bonded", "carried"
    )?;
    for u in &r.uplinks {
        writeln!(
            out,
            "  {:<8} {:>5.0} Mbit/s {:>5.0} ms  {:>5.1} Mbit/s {:>5.1} Mbit/s {:>6.1} MiB{}",
            u.spec.name,
            u.spec.rate_bps as f64 / 1e6,
            u.spec.delay.as_secs_f64() * 1e3,
            u.alone_mbit,
            u.bonded_mbit,
            u.bytes as f64 / f64::from(1 << 20),
            if u.spec.backup { "  (backup)" } else { "" }
        )?;
    }
    writeln!(
        out,
        "  best single link: {} at {:.1} Mbit/s; bonded download {:.1} Mbit/s = {:.2}x the best single link ({:.0} % of the links' sum alone)",
        r.best_single_link,
        r.best_single_mbit,
        r.bonded_mbit,
        r.bonding_gain,
        if r.sum_alone_mbit > 0.0 {
            r.bonded_mbit / r.sum_alone_mbit * 100.0
        } else {
            0.0
        }
    )?;
    if !r.events.is_empty() {
        writeln!(
            out,
            "  at each event, the longest stall (live stream; download):"
        )?;
    }
    let ms = |v: f64| {
        if v == 0.0 {
            format!("< {} ms", GAP.as_millis())
        } else {
            format!("{v:.0} ms")
        }
    };
    for e in &r.events {
        writeln!(
            out,
            "    {:>5.1} s  {:<34} stream {:>8} (bound {:.0} ms: {}), download {:>8}{}",
            e.at_secs,
            e.caption,
            ms(e.stream_stall_ms),
            e.bound_ms,
            if e.within_bound { "ok" } else { "EXCEEDED" },
            ms(e.download_stall_ms),
            e.noticed_after_ms
                .map(|n| format!(", braid saw it after {:.1} s", n / 1e3))
                .unwrap_or_default()
        )?;
    }
    let s = &r.stream;
    writeln!(
        out,
        "  live stream: {} of {} records, {}, longest gap {:.0} ms, worst delay {:.0} ms",
        s.records_received,
        s.records_sent,
        if s.intact { "intact" } else { "BROKEN" },
        s.longest_gap_ms,
        s.worst_delay_ms
    )?;
    writeln!(
        out,
        "  download: {:.1} MiB at {:.1} Mbit/s on average",
        r.download.bytes as f64 / f64::from(1 << 20),
        r.download.mbit
    )?;
    writeln!(out, "  bytes lost: {}", r.bytes_lost)?;
    writeln!(
        out,
        "  checksum: {}",
        if r.checksum_ok {
            format!(
                "match (SHA-256 {} of every byte received, as sent)",
                r.download.sha256_received
            )
        } else {
            format!(
                "MISMATCH: sent {}, received {}",
                r.download.sha256_sent, r.download.sha256_received
            )
        }
    )?;
    writeln!(out, "  plot: {}", r.svg.display())?;
    writeln!(out, "  logs and configs: {}", r.logs.display())?;
    Ok(())
}

/// `--keep`: the lab stays up, with the daemons, until Ctrl-C.
fn keep(
    out: &mut Box<dyn Write>,
    lab: &StandardLab,
    exe: &Path,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let g = lab.gateway.name();
    writeln!(out, "\nthe lab stays up until Ctrl-C; look at it with:")?;
    writeln!(out, "  ip netns exec {g} {} status", exe.display())?;
    writeln!(out, "  ip netns exec {g} ss -Mni")?;
    writeln!(out, "  ip netns exec {} ss -Mni", lab.converter.name())?;
    writeln!(
        out,
        "  ip netns exec {g} curl -s http://{GATEWAY_METRICS}/metrics"
    )?;
    writeln!(
        out,
        "  ip netns exec {} curl -s http://{CONVERTER_METRICS}/metrics",
        lab.converter.name()
    )?;
    writeln!(
        out,
        "  ip netns exec {} curl -o /dev/null --max-time 10 http://{}/file   (a download through braid)",
        lab.client.name(),
        lab.server_v4()
    )?;
    out.flush()?;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    writeln!(out, "cleaning up")?;
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(tool))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> Facts {
        Facts {
            root: true,
            tools: vec![("ip", true), ("nft", true), ("curl", true)],
            mptcp: Ok(()),
            netns: true,
            tun: true,
        }
    }

    #[test]
    fn a_ready_machine_has_no_problems() {
        assert!(problems(&fine()).is_empty());
    }

    #[test]
    fn every_problem_is_named_with_its_fix_at_once() {
        let f = Facts {
            root: false,
            tools: vec![("ip", true), ("nft", false), ("curl", false)],
            mptcp: Err(braid_sys::kernel::KernelError::NoMptcp {
                kernel: "5.4.0".into(),
            }
            .to_string()),
            netns: true,
            tun: false,
        };
        let p = problems(&f);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].contains("sudo ./scripts/demo"));
        assert!(p[1].contains("nft, curl") && p[1].contains("apt-get install"));
        assert!(
            p[2].contains("CONFIG_MPTCP") && p[2].contains("5.4.0"),
            "{}",
            p[2]
        );
        assert!(p[3].contains("modprobe tun"));
        let disabled = Facts {
            mptcp: Err(braid_sys::kernel::KernelError::MptcpDisabled.to_string()),
            ..fine()
        };
        assert!(problems(&disabled)[0].contains("sysctl -w net.mptcp.enabled=1"));
    }
}
