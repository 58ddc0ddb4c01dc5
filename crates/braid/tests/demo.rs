//! `braid demo` as a newcomer runs it: the whole story in a namespaced lab of its own, its
//! results read from `--json`, and nothing left behind however it ends.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Lab namespaces of the process `pid` (their names start with `blab-<pid>-`).
fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("blab-{pid}-")))
        .map(String::from)
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

#[test]
fn the_demo_tells_the_whole_story_and_its_figures_hold() {
    let child = Command::new(env!("CARGO_BIN_EXE_braid"))
        .args(["demo", "--json", "--duration", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("braid demo");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{progress}");
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let ctx = || format!("{r:#}\n{progress}");

    // Bonded beats the best single link, both measured in this run.
    let (bonded, best) = (num(&r, "bonded_mbit"), num(&r, "best_single_mbit"));
    assert!(best > 5.0, "single links not measured: {}", ctx());
    assert!(
        bonded > best * 1.2,
        "bonded {bonded} vs best {best}: {}",
        ctx()
    );
    let uplinks = r["uplinks"].as_array().unwrap();
    assert_eq!(uplinks.len(), 2);
    for u in uplinks {
        assert!(num(u, "bytes") > 1e6, "{u} carried nothing: {}", ctx());
    }

    // Each scripted failure and recovery, with the stream's stall within the failover bounds.
    let events = r["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["cut", "back", "blackhole", "clear"], "{}", ctx());
    for e in events {
        assert!(
            e["within_bound"].as_bool().unwrap() && num(e, "stream_stall_ms") < num(e, "bound_ms"),
            "{e}: {}",
            ctx()
        );
    }
    // braid judged the blackholed uplink dead within 3 s.
    assert!(num(&events[2], "noticed_after_ms") <= 3000.0, "{}", ctx());

    // Nothing lost, the download's checksum right.
    assert_eq!(r["bytes_lost"].as_u64(), Some(0), "{}", ctx());
    assert_eq!(r["checksum_ok"].as_bool(), Some(true), "{}", ctx());
    assert_eq!(r["stream"]["intact"].as_bool(), Some(true), "{}", ctx());
    let dl = &r["download"];
    assert!(num(dl, "bytes") > 10e6, "{}", ctx());
    assert_eq!(dl["sha256_received"], dl["sha256_sent"]);

    // The picture: a line per uplink, named in the legend, with the events marked.
    let svg = std::fs::read_to_string(r["svg"].as_str().unwrap()).expect("the SVG");
    for u in uplinks {
        let name = u["name"].as_str().unwrap();
        assert!(
            svg.contains(&format!("{name} (Mbit/s")),
            "no line for {name}"
        );
    }
    assert!(svg.matches("<polyline").count() >= uplinks.len() + 2);
    assert!(svg.contains("lte cut") && svg.contains("time (s)"));

    // The configs it printed are the ones the daemons ran with, and they pass the check.
    for (role, key) in [
        ("gateway", "gateway_config"),
        ("converter", "converter_config"),
    ] {
        let path = r[key].as_str().unwrap();
        assert!(progress.contains(path), "{path} not printed");
        let check = Command::new(env!("CARGO_BIN_EXE_braid"))
            .args([role, "--config", path, "--check-config"])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    assert!(
        namespaces_of(pid).is_empty(),
        "left behind: {:?}",
        namespaces_of(pid)
    );
    let _ = std::fs::remove_dir_all(r["logs"].as_str().unwrap());
}

#[test]
fn an_interrupted_demo_removes_everything() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_braid"))
        .args(["demo", "--duration", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("braid demo");
    let pid = child.id();
    // Into the bonded phase: the daemons and clients run.
    let t = Instant::now();
    while namespaces_of(pid).len() < 4 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(namespaces_of(pid).len(), 4, "the lab never came up");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the demo did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("interrupted: cleaning up"), "{text}");
    assert!(
        namespaces_of(pid).is_empty(),
        "left behind: {:?}",
        namespaces_of(pid)
    );
}
