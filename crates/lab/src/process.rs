//! Processes inside a namespace: a builder that runs a program through `ip netns exec` and a
//! handle that stops it (SIGTERM, then SIGKILL after a grace period) when it drops, so a
//! failing test never leaves a server running.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::netns::{CmdOutput, Netns};

/// Where a spawned process's stdout or stderr goes.
#[derive(Debug, Clone, Default)]
pub enum Output {
    /// Discard (the default for [`NsCommand::spawn`]).
    #[default]
    Null,
    /// Share the test's own stdout/stderr (bypasses the test harness's capture).
    Inherit,
    /// A pipe, taken with [`Process::take_stdout`] / [`Process::take_stderr`]. Read it, or the
    /// process blocks once the pipe buffer (64 KiB) is full.
    Piped,
    /// Truncate and write to this file.
    File(PathBuf),
}

/// A command to run inside a namespace, built by [`Netns::command`].
#[derive(Debug)]
pub struct NsCommand {
    ns: Netns,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    stdout: Output,
    stderr: Output,
    stdin: Option<Vec<u8>>,
    grace: Duration,
}

impl NsCommand {
    pub(crate) fn new(ns: Netns, program: &OsStr) -> Self {
        NsCommand {
            ns,
            program: program.to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            stdout: Output::Null,
            stderr: Output::Null,
            stdin: None,
            grace: Duration::from_millis(500),
        }
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable.
    #[must_use]
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Where stdout goes when spawned ([`NsCommand::output`] always captures).
    #[must_use]
    pub fn stdout(mut self, out: Output) -> Self {
        self.stdout = out;
        self
    }

    /// Where stderr goes when spawned ([`NsCommand::output`] always captures).
    #[must_use]
    pub fn stderr(mut self, out: Output) -> Self {
        self.stderr = out;
        self
    }

    /// Bytes written to the process's stdin (then closed). Without it stdin is /dev/null.
    #[must_use]
    pub fn stdin_bytes(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    /// How long [`Process::stop`] (and drop) waits after SIGTERM before SIGKILL.
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The command line as it is run, for messages.
    pub fn display(&self) -> String {
        let mut s = format!(
            "ip netns exec {} {}",
            self.ns.name(),
            self.program.to_string_lossy()
        );
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    fn command(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns.name()])
            .arg(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        c
    }

    fn spawn_err(&self, source: std::io::Error) -> Error {
        Error::Spawn {
            cmd: self.display(),
            ns: self.ns.name().to_string(),
            source,
        }
    }

    /// Starts the process. `ip netns exec` execs the program, so [`Process::pid`] is the
    /// program's own pid and signals reach it directly.
    pub fn spawn(self) -> Result<Process> {
        let mut c = self.command();
        c.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.stdout(self.stdio(&self.stdout)?);
        c.stderr(self.stdio(&self.stderr)?);
        let mut child = c.spawn().map_err(|e| self.spawn_err(e))?;
        if let (Some(bytes), Some(mut stdin)) = (self.stdin.as_ref(), child.stdin.take()) {
            // Small inputs only (scripts); a large one could block against a full stdout.
            stdin.write_all(bytes).map_err(|e| self.spawn_err(e))?;
        }
        let mut p = Process {
            child,
            cmd: self.display(),
            ns: self.ns.name().to_string(),
            grace: self.grace,
            status: None,
        };
        // Return only once the child is inside the namespace, so that deleting the namespace
        // right after (which kills what is inside) cannot miss it.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.ns.contains_pid(p.pid()) && p.try_wait()?.is_none() {
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("`{}` to enter the namespace", p.cmd),
                    ns: p.ns.clone(),
                    after: Duration::from_secs(2),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(p)
    }

    fn stdio(&self, out: &Output) -> Result<Stdio> {
        Ok(match out {
            Output::Null => Stdio::null(),
            Output::Inherit => Stdio::inherit(),
            Output::Piped => Stdio::piped(),
            Output::File(p) => Stdio::from(
                File::create(p)
                    .map_err(|e| Error::io(format!("create {}", p.display()), self.ns.name(), e))?,
            ),
        })
    }

    /// Runs to completion and returns stdout and stderr; a non-zero exit is an
    /// [`Error::Command`] carrying stderr.
    pub fn output(self) -> Result<CmdOutput> {
        let mut c = self.command();
        c.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| self.spawn_err(e))?;
        if let (Some(bytes), Some(mut stdin)) = (self.stdin.as_ref(), child.stdin.take()) {
            stdin.write_all(bytes).map_err(|e| self.spawn_err(e))?;
        }
        let out = child.wait_with_output().map_err(|e| self.spawn_err(e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !out.status.success() {
            return Err(Error::Command {
                cmd: self.display(),
                ns: self.ns.name().to_string(),
                status: out.status.to_string(),
                stderr,
            });
        }
        Ok(CmdOutput { stdout, stderr })
    }
}

/// A running process inside a namespace; stopped (SIGTERM, grace, SIGKILL) on drop.
pub struct Process {
    child: Child,
    cmd: String,
    ns: String,
    grace: Duration,
    status: Option<ExitStatus>,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.child.id())
            .field("cmd", &self.cmd)
            .field("status", &self.status)
            .finish()
    }
}

/// Starts `exe ROLE ARGS...` (a braid binary) in `ns` with its log in `log`, and waits (10 s
/// at most) until the log shows `ready`. The demo and the benchmarks start their daemons so.
/// Their log level is `warn,braid=info` unless `BRAID_DAEMON_LOG` says otherwise (a
/// `RUST_LOG` filter, e.g. `info,braid::sendbuf=debug`).
pub fn spawn_daemon(
    ns: &Netns,
    exe: &std::path::Path,
    role: &str,
    args: &[String],
    log: std::path::PathBuf,
    ready: &str,
) -> Result<Process> {
    let mut p = ns
        .command(exe)
        .arg(role)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("BRAID_DAEMON_LOG").unwrap_or_else(|_| "warn,braid=info".into()),
        )
        .stderr(Output::File(log.clone()))
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(ready) {
            return Ok(p);
        }
        if !p.is_running() || Instant::now() > deadline {
            let _ = p.kill();
            return Err(Error::Config(format!(
                "braid {role} did not start:\n{text}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS`), `None` once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

impl Process {
    /// The program's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal, unless the process has already been reaped (its pid may be reused).
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        match kill(Pid::from_raw(self.child.id() as i32), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::io(
                format!("kill -{sig} {}", self.child.id()),
                &self.ns,
                e.into(),
            )),
        }
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| Error::io(format!("wait for `{}`", self.cmd), &self.ns, e))?;
        }
        Ok(self.status)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout`; `Ok(None)` if it is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self
            .child
            .wait()
            .map_err(|e| Error::io(format!("wait for `{}`", self.cmd), &self.ns, e))?;
        self.status = Some(s);
        Ok(s)
    }

    /// SIGTERM, wait for the grace period, then SIGKILL; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        self.signal(Signal::SIGTERM)?;
        if let Some(s) = self.wait_timeout(self.grace)? {
            return Ok(s);
        }
        self.kill()
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait()
    }

    /// Takes the stdout pipe (with [`Output::Piped`]).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the stderr pipe (with [`Output::Piped`]).
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// Stops the process and returns whatever its piped stdout held (empty if not piped).
    pub fn stop_and_read_stdout(&mut self) -> Result<String> {
        self.stop()?;
        let mut s = String::new();
        if let Some(mut out) = self.take_stdout() {
            out.read_to_string(&mut s)
                .map_err(|e| Error::io(format!("read stdout of `{}`", self.cmd), &self.ns, e))?;
        }
        Ok(s)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(cmd = %self.cmd, error = %e, "could not stop process");
        }
    }
}
