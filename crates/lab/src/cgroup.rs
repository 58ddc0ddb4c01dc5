//! [`CpuQuota`]: a CPU cgroup that holds processes to a fraction of one core (the CFS quota),
//! so that a benchmark can run a relay as a small router's CPU would: a quarter of a core, say.
//!
//! Works with the cgroup v2 `cpu` controller (`cpu.max`) where it is enabled, else with the v1
//! `cpu` hierarchy (`cpu.cfs_quota_us`), as on these machines (a v2 mount without the `cpu`
//! controller). The group is named `blab-<pid>-<n>-cpu`, and dropping it moves its processes
//! back to the root group and removes it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The CFS period; the quota is a fraction of it.
const PERIOD_US: u64 = 100_000;

#[derive(Debug)]
pub struct CpuQuota {
    dir: PathBuf,
    /// The hierarchy's root, where processes go back when the group is removed.
    root: PathBuf,
    fraction: f64,
}

impl CpuQuota {
    /// A new group allowed `fraction` of one core (0.25 = a quarter), with no process in it.
    pub fn new(fraction: f64) -> Result<CpuQuota> {
        if !(fraction > 0.0 && fraction <= 64.0) {
            return Err(Error::Config(format!(
                "CPU quota {fraction} must be a positive fraction of a core"
            )));
        }
        let name = format!(
            "blab-{}-{}-cpu",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let quota = ((fraction * PERIOD_US as f64) as u64).max(1000);
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_has_cpu = std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"));
        let (root, dir) = if v2_has_cpu {
            let dir = v2.join(&name);
            mkdir(&dir)?;
            write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            (v2.to_path_buf(), dir)
        } else {
            let root = v2.join("cpu");
            if !root.join("cpu.cfs_quota_us").exists() {
                return Err(Error::Config(
                    "no CPU cgroup controller: neither cgroup v2 with `cpu` in \
                     /sys/fs/cgroup/cgroup.subtree_control nor the v1 hierarchy \
                     /sys/fs/cgroup/cpu"
                        .into(),
                ));
            }
            let dir = root.join(&name);
            mkdir(&dir)?;
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            (root, dir)
        };
        Ok(CpuQuota {
            dir,
            root,
            fraction,
        })
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add(&self, pid: u32) -> Result<()> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Times the group's processes were held back by the quota (`nr_throttled` in
    /// `cpu.stat`): a check that the budget really binds.
    pub fn throttled(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("cpu.stat"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = write(&self.root.join("cgroup.procs"), pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| {
        Error::io(
            format!("writing {value:?} to {}", path.display()),
            "host",
            e,
        )
    })
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), "host", e))
}
