//! Deployment as a user gets it: the Debian package built by `scripts/package` (installed on
//! this machine and purged again), its systemd units checked by `systemd-analyze verify`, each
//! daemon started the way its unit starts it (same arguments, a notify socket) until it says
//! READY, and the example configs checked by `--check-config`.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use braid_lab::{Netns, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The arguments of a unit's `ExecStart=`, after the binary.
fn exec_start(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("dist/systemd").join(unit)).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words = line.split_whitespace().map(String::from);
    assert_eq!(words.next().as_deref(), Some("/usr/bin/braid"));
    words.collect()
}

/// Purges the package when dropped, whatever the test did.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "braid"]).output();
    }
}

#[test]
fn the_debian_package_installs_verifies_and_purges() {
    if Path::new("/usr/bin/braid").exists() {
        eprintln!("skipped: /usr/bin/braid exists on this machine (not ours to replace)");
        return;
    }
    let out = tempdir("pkg");
    let (ok, text) = run(Command::new(repo().join("scripts/package")).args([
        "--binary",
        env!("CARGO_BIN_EXE_braid"),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "scripts/package failed:\n{text}");
    let deb = PathBuf::from(text.lines().last().unwrap().trim());
    assert!(deb.exists(), "{text}");
    let (_, listing) = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/braid",
        "./lib/systemd/system/braid-converter.service",
        "./lib/systemd/system/braid-gateway.service",
        "./etc/braid/converter.toml",
        "./etc/braid/gateway.toml",
        "./usr/share/doc/braid/examples/gateway-laptop.toml",
        "./usr/share/doc/braid/braid-gateway.txt",
    ] {
        assert!(
            listing.contains(path),
            "{path} not in the package:\n{listing}"
        );
    }

    let _purge = Purge;
    let (ok, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i:\n{text}");
    let (ok, version) = run(Command::new("/usr/bin/braid").arg("--version"));
    assert!(
        ok && version.contains(env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let (ok, text) = run(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/braid-converter.service",
        "/lib/systemd/system/braid-gateway.service",
    ]));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    for (role, conf) in [
        ("converter", "/etc/braid/converter.toml"),
        ("gateway", "/etc/braid/gateway.toml"),
    ] {
        let (ok, text) =
            run(Command::new("/usr/bin/braid").args([role, "--config", conf, "--check-config"]));
        assert!(ok, "{conf}: {text}");
    }
    let (ok, text) = run(Command::new("dpkg").args(["--purge", "braid"]));
    assert!(ok, "dpkg --purge:\n{text}");
    assert!(!Path::new("/usr/bin/braid").exists());
    assert!(!Path::new("/etc/braid/converter.toml").exists());
    let _ = std::fs::remove_dir_all(&out);
}

fn tempdir(what: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("braid-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_example_config_passes_the_check() {
    for (role, file) in [
        ("converter", "converter-vps.toml"),
        ("gateway", "gateway-home-router.toml"),
        ("gateway", "gateway-laptop.toml"),
    ] {
        let path = repo().join("dist/examples").join(file);
        let (ok, text) = run(Command::new(env!("CARGO_BIN_EXE_braid")).args([
            role,
            "--config",
            path.to_str().unwrap(),
            "--check-config",
        ]));
        assert!(ok && text.starts_with("configuration OK"), "{file}: {text}");
    }
}

/// Starts `braid <args>` in a fresh namespace with `NOTIFY_SOCKET` (and `JOURNAL_STREAM`, as
/// systemd sets them) and returns what it notified until READY=1, and its log.
fn until_ready(args: &[String]) -> (Vec<String>, String) {
    let dir = tempdir("notify");
    let sock_path = dir.join(format!("notify-{}", args[0]));
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let ns = Netns::create("sd").unwrap();
    let log = dir.join(format!("{}.log", args[0]));
    let mut p = ns
        .command(env!("CARGO_BIN_EXE_braid"))
        .args(args)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("JOURNAL_STREAM", "8:12345")
        .stderr(Output::File(log.clone()))
        .grace(Duration::from_secs(10))
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(10)
        && !got.iter().any(|m: &String| m.contains("READY=1"))
    {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let _ = p.stop();
    // What it says while stopping.
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (got, text)
}

#[test]
fn each_daemon_started_as_its_unit_starts_it_says_ready() {
    for (unit, example) in [
        ("braid-converter.service", "converter-vps.toml"),
        ("braid-gateway.service", "gateway-home-router.toml"),
    ] {
        // The unit's own arguments, with its /etc/braid file replaced by the example it is
        // installed from.
        let args: Vec<String> = exec_start(unit)
            .into_iter()
            .map(|a| {
                if a.starts_with("/etc/braid/") {
                    repo()
                        .join("dist/examples")
                        .join(example)
                        .display()
                        .to_string()
                } else {
                    a
                }
            })
            .collect();
        let (notes, log) = until_ready(&args);
        assert!(
            notes.iter().any(|n| n.contains("READY=1")),
            "{unit}: no READY=1 in {notes:?}\n{log}"
        );
        assert!(
            notes.iter().any(|n| n.contains("STOPPING=1")),
            "{unit}: no STOPPING=1 on SIGTERM in {notes:?}\n{log}"
        );
        // Under the journal, no timestamp of its own: lines start with the level.
        let first = log.lines().next().unwrap_or_default();
        assert!(
            first.trim_start().starts_with("INFO") || first.trim_start().starts_with("WARN"),
            "{unit}: {first:?}"
        );
    }
}
