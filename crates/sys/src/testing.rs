//! What the root tests of this crate share: a fresh network namespace per test, and `ip` to
//! set up and look at what the code under test did (tests may shell out; the code may not).

/// Runs `f` on a thread that has entered a new, empty network namespace (root only); the
/// namespace goes with the thread.
pub fn in_fresh_netns(f: impl FnOnce() + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            f();
        })
        .join()
        .expect("test thread");
    });
}

/// `ip ARGS`, its standard output.
pub fn ip(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
