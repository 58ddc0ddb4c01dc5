//! Shared pieces of braid's end-to-end tests: a real `braid converter` process in the lab's
//! converter namespace, a checksum server in the server namespace, and kernel counters.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use braid_lab::{Netns, Output, Process, StandardConfig, StandardLab};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const CONVERTER_PORT: u16 = 5124;
pub const HASH_PORT: u16 = 7000;

/// Deterministic bytes: the same `(seed, offset)` always gives the same byte, so both ends can
/// check a stream without holding it.
pub fn pattern(seed: u64, offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let x = (offset + i as u64).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        *b = (x ^ (x >> 32)) as u8;
    }
}

/// SHA-256 of `len` pattern bytes.
pub fn pattern_sha256(seed: u64, len: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().into()
}

/// The lab with a converter running in it.
pub struct ConverterLab {
    pub lab: StandardLab,
    pub converter: Option<Process>,
    pub log: PathBuf,
}

/// Flags every test converter gets: clients from the uplinks, destinations on the server link.
pub fn default_converter_args() -> Vec<String> {
    braid_lab::standard::converter_args(CONVERTER_PORT)
}

impl ConverterLab {
    pub fn new(config: StandardConfig, args: &[String]) -> ConverterLab {
        Self::from_lab(StandardLab::new(config).expect("lab"), args)
    }

    /// A converter in a lab the test has already adjusted.
    pub fn from_lab(lab: StandardLab, args: &[String]) -> ConverterLab {
        let log = std::env::temp_dir().join(format!("{}-converter.log", lab.converter.name()));
        let mut me = ConverterLab {
            lab,
            converter: None,
            log,
        };
        me.start_converter(args);
        me
    }

    pub fn start_converter(&mut self, args: &[String]) {
        let bin = env!("CARGO_BIN_EXE_braid");
        let p = self
            .lab
            .converter
            .command(bin)
            .arg("converter")
            .args(args)
            .env("RUST_LOG", daemon_log())
            .stderr(Output::File(self.log.clone()))
            .spawn()
            .expect("spawn braid converter");
        self.converter = Some(p);
        wait_listening(
            &self.lab.converter,
            CONVERTER_PORT,
            self.converter.as_mut().unwrap(),
            &self.log,
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn converter_addr_v4(&self) -> SocketAddr {
        (self.lab.converter_v4(), CONVERTER_PORT).into()
    }

    pub fn converter_addr_v6(&self) -> SocketAddr {
        (self.lab.converter_v6(), CONVERTER_PORT).into()
    }
}

impl Drop for ConverterLab {
    fn drop(&mut self) {
        if let Some(mut p) = self.converter.take() {
            let _ = p.stop();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- converter log ({}):\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `braid converter ARGS` in a namespace of the test's own making (not a [`ConverterLab`]),
/// logging to the temp dir; returns once it listens on port 5124. Stopping it waits for its
/// drain.
pub fn converter_in(ns: &Netns, args: &[&str]) -> (Process, PathBuf) {
    let log = std::env::temp_dir().join(format!("{}-converter.log", ns.name()));
    let mut p = ns
        .command(env!("CARGO_BIN_EXE_braid"))
        .arg("converter")
        .args(args)
        .env("RUST_LOG", daemon_log())
        .stderr(Output::File(log.clone()))
        .grace(Duration::from_secs(40))
        .spawn()
        .expect("spawn braid converter");
    wait_listening(ns, CONVERTER_PORT, &mut p, &log);
    (p, log)
}

/// Waits until this daemon says it listens on `port` (its log) and the kernel agrees (`ss`),
/// without making a test connection; panics with the log if the daemon exits first. The log
/// is the authority because a closed MPTCP listener can linger in `ss` for a moment.
pub fn wait_listening(ns: &Netns, port: u16, p: &mut Process, log: &PathBuf) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let said = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("listening") && l.contains(&format!(":{port}")));
        if said && ns.is_listening(port).unwrap_or(false) {
            return;
        }
        if !p.is_running() || Instant::now() > deadline {
            panic!(
                "daemon not listening on :{port}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Absolute values of the kernel's SNMP/netstat counters in a namespace (`nstat -asz`).
pub fn counters(ns: &Netns) -> HashMap<String, u64> {
    let out = ns.run(["nstat", "-asz"]).expect("nstat");
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// The MPTCP counters that moved between two [`counters`] readings, as "Name +delta" pairs:
/// what a failing subflow assertion prints so that the kernel's side of it is on record.
pub fn mptcp_deltas(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> String {
    let mut moved: Vec<String> = after
        .keys()
        .filter(|k| k.starts_with("MPTcp"))
        .filter_map(|k| {
            let d = delta(before, after, k);
            (d > 0).then(|| format!("{} +{d}", k.trim_start_matches("MPTcpExt")))
        })
        .collect();
    moved.sort();
    moved.join(", ")
}

/// Polls `cond` for up to 5 s. Daemons write a connection's log line when both directions are
/// done, which can be just after the client has finished: tests that read logs wait with this.
pub fn eventually(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How much counter `name` moved between two [`counters`] readings.
pub fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, name: &str) -> u64 {
    let get = |m: &HashMap<String, u64>| m.get(name).copied().unwrap_or(0);
    get(after).saturating_sub(get(before))
}

pub fn counter(ns: &Netns, name: &str) -> u64 {
    counters(ns).get(name).copied().unwrap_or(0)
}

/// A server in the server namespace that speaks the tests' "hash" protocol on `[::]:port`:
/// the client sends `n` (u64, big-endian, bytes it wants back) and `seed` (u64), then any
/// data, then FIN. The server sends `n` pattern bytes of `seed` concurrently and, after the
/// client's FIN, the SHA-256 of everything it received after the 16-byte header, then FIN.
/// Every byte is checked both ways and half-close is exercised on every connection.
pub struct HashServer {
    thread: Option<braid_lab::NsThread<()>>,
    stop: tokio_util::sync::CancellationToken,
}

impl HashServer {
    pub fn start(ns: &Netns, port: u16) -> HashServer {
        Self::start_with(ns, port, false)
    }

    /// A server whose listener accepts data in the SYN (TCP Fast Open, with cookies).
    pub fn start_fastopen(ns: &Netns, port: u16) -> HashServer {
        Self::start_with(ns, port, true)
    }

    fn start_with(ns: &Netns, port: u16, fastopen: bool) -> HashServer {
        let stop = tokio_util::sync::CancellationToken::new();
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns
            .thread(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let sock =
                        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
                            .unwrap();
                    sock.set_only_v6(false).unwrap();
                    sock.set_reuse_address(true).unwrap();
                    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
                    sock.bind(&addr.into()).unwrap();
                    if fastopen {
                        braid_sys::sockopt::set_tcp_fastopen(&sock, 128).unwrap();
                    }
                    sock.listen(4096).unwrap();
                    sock.set_nonblocking(true).unwrap();
                    let l = tokio::net::TcpListener::from_std(sock.into()).unwrap();
                    tx.send(()).unwrap();
                    loop {
                        tokio::select! {
                            _ = stop2.cancelled() => return,
                            r = l.accept() => {
                                if let Ok((s, _)) = r {
                                    tokio::spawn(serve_hash(s));
                                }
                            }
                        }
                    }
                });
            })
            .expect("server thread");
        rx.recv_timeout(Duration::from_secs(5))
            .expect("server listening");
        HashServer {
            thread: Some(thread),
            stop,
        }
    }
}

impl Drop for HashServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_hash(s: tokio::net::TcpStream) {
    let (mut r, mut w) = s.into_split();
    let mut hdr = [0u8; 16];
    if r.read_exact(&mut hdr).await.is_err() {
        return;
    }
    let n = u64::from_be_bytes(hdr[..8].try_into().unwrap());
    let seed = u64::from_be_bytes(hdr[8..].try_into().unwrap());
    let sender = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        let mut off = 0u64;
        while off < n {
            let k = (n - off).min(buf.len() as u64) as usize;
            pattern(seed, off, &mut buf[..k]);
            if w.write_all(&buf[..k]).await.is_err() {
                return None;
            }
            off += k as u64;
        }
        Some(w)
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => h.update(&buf[..k]),
            Err(_) => return,
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    if let Ok(Some(mut w)) = sender.await {
        let _ = w.write_all(&digest).await;
        let _ = w.shutdown().await;
    }
}

/// Runs async code on a tokio runtime whose threads live in `ns` (sockets they open belong
/// to it).
pub fn in_ns<F, Fut, T>(ns: &Netns, f: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
    T: Send,
{
    ns.block_on(f).expect("tokio runtime in the namespace")
}

/// Runs async code on a thread of its own with a tokio runtime in `ns`, in the background:
/// [`in_ns`] for something the test goes on beside (a server, a client it times).
pub fn in_ns_thread<F, Fut, T>(ns: &Netns, f: F) -> braid_lab::NsThread<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    ns.thread(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
    .expect("thread in the namespace")
}

/// The client half of the hash protocol over an established (converted) stream: asks for
/// `down` bytes of `down_seed`, sends `up` bytes of `up_seed` (of which `already_sent` went
/// with the request as early data, header included), half-closes, and checks every byte that
/// comes back plus the server's digest of what it received.
pub async fn hash_exchange(
    stream: tokio::net::TcpStream,
    leftover: Vec<u8>,
    up: u64,
    up_seed: u64,
    already_sent: u64,
    down: u64,
    down_seed: u64,
) -> Result<(), String> {
    let (mut r, mut w) = stream.into_split();
    let writer = async move {
        let mut buf = vec![0u8; 1 << 16];
        // The header and the first bytes may have gone as early data with the request.
        let mut off = already_sent.saturating_sub(16);
        if already_sent == 0 {
            let mut hdr = [0u8; 16];
            hdr[..8].copy_from_slice(&down.to_be_bytes());
            hdr[8..].copy_from_slice(&down_seed.to_be_bytes());
            w.write_all(&hdr)
                .await
                .map_err(|e| format!("write header: {e}"))?;
        }
        while off < up {
            let k = (up - off).min(buf.len() as u64) as usize;
            pattern(up_seed, off, &mut buf[..k]);
            w.write_all(&buf[..k])
                .await
                .map_err(|e| format!("write at {off}: {e}"))?;
            off += k as u64;
        }
        // Like the relay: an MPTCP client's FIN waits for the kernel's joins (braid::joins).
        braid::joins::settle(w.as_ref(), braid::joins::HALF_CLOSE_WAIT).await;
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(w)
    };
    let reader = async move {
        let mut got = 0u64;
        let mut expect = vec![0u8; 1 << 16];
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut pending = leftover;
        loop {
            let chunk: &[u8] = if !pending.is_empty() {
                &pending
            } else {
                let n = r
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("read at {got}: {e}"))?;
                if n == 0 {
                    break;
                }
                &buf[..n]
            };
            // Bytes up to `down` are pattern; anything after is the digest.
            let data_len = ((down - got.min(down)) as usize).min(chunk.len());
            let (data, rest) = chunk.split_at(data_len);
            pattern(down_seed, got, &mut expect[..data.len()]);
            if data != &expect[..data.len()] {
                return Err(format!("downloaded bytes differ near offset {got}"));
            }
            got += data.len() as u64;
            tail.extend_from_slice(rest);
            pending.clear();
        }
        if got != down {
            return Err(format!("downloaded {got} of {down} bytes"));
        }
        Ok::<_, String>(tail)
    };
    let (w, tail) = tokio::join!(writer, reader);
    let _w = w?;
    let tail = tail?;
    let want = pattern_sha256(up_seed, up);
    if tail.len() != 32 || tail[..] != want[..] {
        return Err(format!(
            "server's digest of the upload does not match ({} bytes of digest)",
            tail.len()
        ));
    }
    Ok(())
}

/// Header + the first `k` bytes of the upload, to send as early data with the request.
pub fn early_data(down: u64, down_seed: u64, up_seed: u64, k: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + k);
    v.extend_from_slice(&down.to_be_bytes());
    v.extend_from_slice(&down_seed.to_be_bytes());
    let mut p = vec![0u8; k];
    pattern(up_seed, 0, &mut p);
    v.extend_from_slice(&p);
    v
}

/// nginx (Debian's) serving `/file` of `size` pattern bytes on port 80, IPv4 and IPv6, from a
/// private directory; stopped and removed on drop.
pub struct Nginx {
    process: Process,
    dir: PathBuf,
    pub sha256: [u8; 32],
}

impl Nginx {
    pub fn start(ns: &Netns, size: u64) -> Nginx {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("{}-nginx", ns.name()));
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        // nginx workers run as nobody: everything they read must be world-readable.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&www, std::fs::Permissions::from_mode(0o755)).unwrap();
        {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(std::fs::File::create(www.join("file")).unwrap());
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < size {
                let k = (size - off).min(buf.len() as u64) as usize;
                pattern(42, off, &mut buf[..k]);
                f.write_all(&buf[..k]).unwrap();
                off += k as u64;
            }
        }
        std::fs::set_permissions(www.join("file"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             sendfile on;\n server {{ listen 80; listen [::]:80; root {d}/www; }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let process = ns
            .command("nginx")
            .args(["-c", &format!("{d}/nginx.conf"), "-g", "daemon off;"])
            .spawn()
            .expect("nginx (Debian package nginx-light)");
        if let Err(e) = ns.wait_listening(80, Duration::from_secs(10)) {
            panic!(
                "nginx did not start ({e}): {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        Nginx {
            process,
            sha256: pattern_sha256(42, size),
            dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.process.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `braid gateway` process in the lab's gateway namespace, logging to a file.
pub struct Gateway {
    pub process: Option<Process>,
    pub log: PathBuf,
}

impl Gateway {
    pub fn start(ns: &Netns, args: &[String]) -> Gateway {
        let log = std::env::temp_dir().join(format!("{}-gateway.log", ns.name()));
        let _ = std::fs::remove_file(&log);
        let mut g = Gateway { process: None, log };
        g.restart(ns, args);
        g
    }

    /// Starts the process (again), waiting until it says it is running.
    pub fn restart(&mut self, ns: &Netns, args: &[String]) {
        let bin = env!("CARGO_BIN_EXE_braid");
        let mut p = ns
            .command(bin)
            .arg("gateway")
            .args(args)
            .env("RUST_LOG", daemon_log())
            .stderr(Output::File(self.log.clone()))
            .spawn()
            .expect("spawn braid gateway");
        // The log file starts empty with every start.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.log_text();
            if text.contains("gateway running") {
                break;
            }
            if !p.is_running() || Instant::now() > deadline {
                panic!("gateway did not start; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(p);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.stop();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- gateway log ({}):\n{}",
                self.log.display(),
                self.log_text()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// One converted connection running the hash protocol; `k` upload bytes ride with the request.
pub async fn converted_exchange(
    converter: SocketAddr,
    dest: SocketAddr,
    up: u64,
    down: u64,
    k: usize,
    opts: &braid::client::ClientOptions,
) -> Result<bool, String> {
    let early = early_data(down, 2, 1, k.min(up as usize));
    let c = braid::client::connect(converter, dest, None, &early, opts)
        .await
        .map_err(|e| e.to_string())?;
    let mptcp = c.mptcp;
    hash_exchange(c.stream, c.leftover, up, 1, early.len() as u64, down, 2).await?;
    Ok(mptcp)
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `curl URL | sha256sum` in `ns`; returns (exit ok, digest or stderr, seconds).
pub fn curl_sha(ns: &Netns, extra: &[&str], url: &str) -> (bool, String, f64) {
    let t = Instant::now();
    let script = format!(
        "set -o pipefail; curl -sS --max-time 60 {} '{url}' | sha256sum | cut -d' ' -f1",
        extra.join(" ")
    );
    let out = ns.command("bash").args(["-c", &script]).output();
    let secs = t.elapsed().as_secs_f64();
    match out {
        Ok(o) => (true, o.stdout.trim().to_string(), secs),
        Err(e) => (false, e.to_string(), secs),
    }
}

/// Starts a gateway in the lab's gateway namespace with the lab's converter (IPv4) and `extra`.
pub fn gateway_to(cl: &ConverterLab, extra: &[&str]) -> Gateway {
    let mut args = strings(&["--converter", &cl.converter_addr_v4().to_string()]);
    args.extend(strings(extra));
    Gateway::start(&cl.lab.gateway, &args)
}

/// The daemons' log filter: `info`, or `BRAID_DAEMON_LOG` (e.g. `info,braid::sendbuf=debug`)
/// when a failing test needs more.
pub fn daemon_log() -> String {
    std::env::var("BRAID_DAEMON_LOG").unwrap_or_else(|_| "info".into())
}
