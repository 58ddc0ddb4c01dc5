//! `braid demo`: the main job, shown on any Linux machine with MPTCP, as root. It builds the
//! standard lab in network namespaces (LAN client, gateway with two shaped uplinks, converter,
//! server), starts real `braid converter` and `braid gateway` processes (this very binary),
//! downloads a file with curl from the LAN client through the transparent capture, prints the
//! rate of each uplink every second and the total, checks the SHA-256, and removes everything,
//! also on Ctrl-C.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use braid_lab::{Netns, Output, StandardConfig, StandardLab};

const CONVERTER_PORT: u16 = 5124;
const HTTP_PORT: u16 = 80;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rates of the two uplinks, in Mbit/s.
    pub rates: Vec<u32>,
    /// Size of the file downloaded, in MiB.
    pub size: u32,
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
    // Ctrl-C reaches curl and the daemons too (same process group), which ends the download;
    // the flag makes the demo skip what is left and clean up instead of dying with its
    // namespaces in place. Handlers (unlike a blocked mask) are not inherited across exec.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let removed = braid_lab::sweep().unwrap_or_default();
    if !removed.is_empty() {
        println!(
            "removed {} namespaces left by an interrupted run",
            removed.len()
        );
    }
    run(&args, &stop)
}

fn run(args: &Options, stop: &AtomicBool) -> anyhow::Result<()> {
    let rates: Vec<u64> = args
        .rates
        .iter()
        .map(|r| u64::from(*r) * 1_000_000)
        .collect();
    let size = u64::from(args.size) << 20;
    println!(
        "building the lab: LAN client — gateway ={}= converter — server",
        rates
            .iter()
            .map(|r| format!(" {} Mbit/s ", r / 1_000_000))
            .collect::<Vec<_>>()
            .join("=")
    );
    let lab = StandardLab::new(StandardConfig {
        uplinks: rates.len(),
        rates: Some(rates.clone()),
        ..StandardConfig::default()
    })
    .context("building the namespaced lab")?;
    let exe = std::env::current_exe().context("finding the braid binary")?;
    let logs = std::env::temp_dir().join(format!("braid-demo-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;

    let digest = braid_lab::http::serve_file(&lab.server, HTTP_PORT, size)?;
    let mut converter = braid_lab::process::spawn_daemon(
        &lab.converter,
        &exe,
        "converter",
        &braid_lab::standard::converter_args(CONVERTER_PORT),
        logs.join("converter.log"),
        "listening",
    )?;
    let converter_addr = format!("{}:{CONVERTER_PORT}", lab.converter_v4());
    let mut gateway = braid_lab::process::spawn_daemon(
        &lab.gateway,
        &exe,
        "gateway",
        &[
            "--converter".into(),
            converter_addr,
            "--transparent".into(),
            "tproxy".into(),
        ],
        logs.join("gateway.log"),
        "gateway running",
    )?;
    println!(
        "braid converter runs in {}, braid gateway (TPROXY capture) in {}",
        lab.converter.name(),
        lab.gateway.name()
    );

    let url = format!("http://{}:{HTTP_PORT}/file", lab.server_v4());
    println!("client: curl {url}  ({} MiB)\n", args.size);
    let mut curl = lab
        .client
        .command("sh")
        .args([
            "-c",
            &format!("curl -sS --max-time 600 '{url}' | sha256sum | cut -d' ' -f1"),
        ])
        .stdout(Output::Piped)
        .spawn()
        .context("starting curl in the client namespace")?;

    let ifaces: Vec<String> = lab.uplinks.iter().map(|u| u.gateway_if.clone()).collect();
    let started = Instant::now();
    let first = uplink_bytes(&lab.gateway, &ifaces);
    let mut last = first.clone();
    let mut last_t = Instant::now();
    let header: Vec<String> = (0..ifaces.len()).map(|i| format!("uplink {i}")).collect();
    println!("  time  {}   total", header.join("   "));
    while curl.try_wait()?.is_none() && !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        if last_t.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let now = uplink_bytes(&lab.gateway, &ifaces);
        let dt = last_t.elapsed().as_secs_f64();
        let per: Vec<f64> = now
            .iter()
            .zip(&last)
            .map(|(n, l)| (n - l) as f64 * 8.0 / dt / 1e6)
            .collect();
        println!(
            "{:>5.0}s  {}   {:>5.1} Mbit/s",
            started.elapsed().as_secs_f64(),
            per.iter()
                .map(|m| format!("{m:>5.1}  "))
                .collect::<Vec<_>>()
                .join(" "),
            per.iter().sum::<f64>()
        );
        last = now;
        last_t = Instant::now();
    }
    let secs = started.elapsed().as_secs_f64();
    let total = uplink_bytes(&lab.gateway, &ifaces);
    if stop.load(Ordering::SeqCst) {
        let _ = curl.kill();
    }
    let mut got = String::new();
    if let Some(mut out) = curl.take_stdout() {
        let _ = out.read_to_string(&mut got);
    }
    let status = curl.wait()?;
    let _ = gateway.stop();
    let _ = converter.stop();
    if stop.load(Ordering::SeqCst) {
        println!("\ninterrupted: cleaning up");
        return Ok(());
    }
    println!();
    for (i, (t, f)) in total.iter().zip(&first).enumerate() {
        println!(
            "uplink {i} ({} Mbit/s): {:.1} MiB, {:.1} Mbit/s on average",
            rates[i] / 1_000_000,
            (t - f) as f64 / (1 << 20) as f64,
            (t - f) as f64 * 8.0 / secs / 1e6
        );
    }
    let rate = size as f64 * 8.0 / secs / 1e6;
    println!(
        "total: {} MiB in {secs:.1} s = {rate:.1} Mbit/s (the uplinks add up to {} Mbit/s)",
        args.size,
        rates.iter().sum::<u64>() / 1_000_000
    );
    let want: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let ok = status.success() && got.trim() == want;
    println!(
        "checksum: {}",
        if ok {
            format!("match (SHA-256 {want})")
        } else {
            format!("MISMATCH: expected {want}, got {:?}", got.trim())
        }
    );
    println!("logs: {}", logs.display());
    if !ok {
        bail!("the download did not arrive intact");
    }
    Ok(())
}

/// Received bytes of each uplink interface of the gateway (downloads arrive there).
fn uplink_bytes(ns: &Netns, ifaces: &[String]) -> Vec<u64> {
    ifaces
        .iter()
        .map(|i| {
            ns.run(["cat", &format!("/sys/class/net/{i}/statistics/rx_bytes")])
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        })
        .collect()
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
