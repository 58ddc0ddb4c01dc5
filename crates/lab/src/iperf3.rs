//! iperf3 runs between two namespaces, each with a server of its own: `iperf3 -s -1` serves
//! exactly one test and exits, and the next run waits for it to be gone. A long-lived server
//! answers "the server is busy running a test" when a run starts before the previous one's
//! control connection has closed on its side, which made tests fail on busy machines.

use std::net::IpAddr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::netns::Netns;

/// The figures of one run, from iperf3's JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Iperf3 {
    /// `end.sum_received.bits_per_second`: what arrived, all streams together.
    pub received_bps: f64,
    /// `end.sum_received.bytes`.
    pub received_bytes: u64,
    /// The whole JSON report, for anything else a caller wants.
    pub json: String,
}

/// Runs `iperf3 -c dest -p port -J ARGS...` in `client` against a one-off server started in
/// `server` for this run (`-s -1`), and waits for that server to exit.
pub fn run(
    server: &Netns,
    client: &Netns,
    dest: IpAddr,
    port: u16,
    args: &[&str],
) -> Result<Iperf3> {
    let port_s = port.to_string();
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-p", &port_s])
        .spawn()?;
    // Listening, as the kernel sees it: a probe connection would be taken as the one test.
    server.wait_listening(port, Duration::from_secs(5))?;
    let dest_s = dest.to_string();
    let mut full = vec!["-c", dest_s.as_str(), "-p", port_s.as_str(), "-J"];
    full.extend_from_slice(args);
    let out = client.command("iperf3").args(&full).output();
    // The server exits after its one test; a client that never reached it leaves it waiting.
    if srv.wait_timeout(Duration::from_secs(5))?.is_none() {
        let _ = srv.kill();
    }
    let out = out?;
    let field = |name: &str| {
        out.stdout
            .split("\"sum_received\":")
            .nth(1)
            .and_then(|s| s.split(&format!("\"{name}\":")).nth(1))
            .and_then(|s| s.split([',', '}']).next())
            .and_then(|s| s.trim().parse::<f64>().ok())
    };
    let received_bytes = field("bytes").unwrap_or(0.0) as u64;
    let received_bps = field("bits_per_second").ok_or_else(|| {
        Error::Config(format!(
            "iperf3 gave no received rate: {} {}",
            out.stdout, out.stderr
        ))
    })?;
    Ok(Iperf3 {
        received_bps,
        received_bytes,
        json: out.stdout,
    })
}
