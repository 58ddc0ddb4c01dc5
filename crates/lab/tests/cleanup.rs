//! Nothing outlives a lab: namespaces go when it drops, also when the test body panics, and
//! `sweep` removes leftovers of dead runs but never those of live ones.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::Command;

use braid_lab::{Lab, StandardConfig, StandardLab, sweep};

fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn ip_netns_list() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn dropping_a_lab_removes_its_namespaces() {
    let lab = StandardLab::new(StandardConfig::by_hand()).unwrap();
    let names: Vec<String> = lab
        .namespaces()
        .iter()
        .map(|n| n.name().to_string())
        .collect();
    lab.server
        .set_hosts(&[(lab.server_v4().into(), "server")])
        .unwrap();
    // A clone held past the lab does not keep the namespace.
    let kept = lab.gateway.clone();
    assert!(names.iter().all(|n| exists(n)));
    drop(lab);
    let list = ip_netns_list();
    for n in &names {
        assert!(!exists(n) && !list.contains(n.as_str()), "{n} left behind");
        assert!(!Path::new("/etc/netns").join(n).exists());
    }
    assert!(kept.run(["true"]).is_err());
}

#[test]
fn a_panicking_test_body_leaves_nothing() {
    let mut names = Vec::new();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let lab = Lab::new().unwrap();
        let a = lab.add_ns("a").unwrap();
        let b = lab.add_ns("b").unwrap();
        lab.link(&a, "x", &b, "y").unwrap();
        names.extend([a.name().to_string(), b.name().to_string()]);
        assert!(exists(&names[0]));
        panic!("test body fails");
    }));
    assert!(r.is_err());
    assert_eq!(names.len(), 2);
    for n in &names {
        assert!(!exists(n), "{n} survived the panic");
    }
}

#[test]
fn a_failed_construction_leaves_nothing() {
    let before: Vec<String> = braid_lab::lab_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("blab-{}-", std::process::id())))
        .collect();
    let lab = Lab::new().unwrap();
    let a = lab.add_ns("a").unwrap();
    let name = a.name().to_string();
    // A second link with a name already taken fails half-way through a topology.
    lab.link(&a, "dup", &lab.add_ns("b").unwrap(), "p1")
        .unwrap();
    let err = lab.link(&a, "dup", &a, "p2").unwrap_err();
    assert!(err.to_string().contains("dup"), "{err}");
    drop(lab);
    assert!(!exists(&name));
    // Invalid configurations are refused before anything is created.
    assert!(
        StandardLab::new(StandardConfig {
            uplinks: 0,
            ..StandardConfig::by_hand()
        })
        .is_err()
    );
    assert!(
        StandardLab::new(StandardConfig {
            uplinks: 2,
            rates: Some(vec![1]),
            ..StandardConfig::by_hand()
        })
        .is_err()
    );
    let after: Vec<String> = braid_lab::lab_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&format!("blab-{}-", std::process::id())))
        .filter(|n| !before.contains(n))
        .collect();
    // Other tests of this binary may run in parallel under `cargo test`; only ours matter.
    assert!(!after.iter().any(|n| n == &name), "{after:?}");
}

#[test]
fn sweep_removes_dead_runs_only() {
    // A pid that is certainly dead: a child we already reaped.
    let mut dead = Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    // A pid that is certainly alive for the whole test.
    let mut live = Command::new("sleep").arg("30").spawn().unwrap();
    let dead_ns = format!("blab-{}-0-fake", dead.id());
    let live_ns = format!("blab-{}-0-fake", live.id());
    let foreign = format!("blabx-{}-0-fake", dead.id());
    for n in [&dead_ns, &live_ns, &foreign] {
        assert!(
            Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap()
                .success()
        );
    }
    std::fs::create_dir_all(format!("/etc/netns/{dead_ns}")).unwrap();

    let removed = sweep().unwrap();
    let (dead_gone, live_kept, foreign_kept) =
        (!exists(&dead_ns), exists(&live_ns), exists(&foreign));
    // Clean up before asserting, so a failure leaves nothing either.
    for n in [&live_ns, &foreign] {
        let _ = Command::new("ip").args(["netns", "del", n]).status();
    }
    let _ = live.kill();
    let _ = live.wait();
    // Another test process's Lab::new may have swept it first; either way it must be gone.
    assert!(dead_gone, "leftover of a dead run survived: {removed:?}");
    assert!(!Path::new(&format!("/etc/netns/{dead_ns}")).exists());
    assert!(live_kept, "sweep removed a live run's namespace");
    assert!(
        foreign_kept,
        "sweep removed a namespace without the lab prefix"
    );
    assert!(!removed.contains(&live_ns));
}
