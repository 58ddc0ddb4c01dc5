//! The namespace primitives: code and commands run inside, sysctls are per namespace, veths
//! carry traffic, hosts files apply to `ip netns exec`, processes stop on drop.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use braid_lab::{Lab, Output, Route};

#[test]
fn sysctls_are_per_namespace() {
    let lab = Lab::new().unwrap();
    let a = lab.add_ns("a").unwrap();
    let b = lab.add_ns("b").unwrap();
    a.sysctl("net.ipv4.tcp_fastopen", 0x605).unwrap();
    b.sysctl("net.ipv4.tcp_fastopen", 5).unwrap();
    assert_eq!(a.sysctl_get("net.ipv4.tcp_fastopen").unwrap(), "1541");
    assert_eq!(b.sysctl_get("net.ipv4.tcp_fastopen").unwrap(), "5");
    // The command-line view agrees with what the setns'd thread wrote.
    let out = a.run(["sysctl", "-n", "net.ipv4.tcp_fastopen"]).unwrap();
    assert_eq!(out.trim(), "1541");
    assert_eq!(a.sysctl_get("net.mptcp.enabled").unwrap(), "1");
}

#[test]
fn veth_addresses_routes_and_hosts() {
    let lab = Lab::new().unwrap();
    let a = lab.add_ns("a").unwrap();
    let b = lab.add_ns("b").unwrap();
    let link = lab.link(&a, "a-b", &b, "b-a").unwrap();
    link.a.add_addr("192.168.77.1/24".parse().unwrap()).unwrap();
    link.b.add_addr("192.168.77.2/24".parse().unwrap()).unwrap();
    link.a.add_addr("fd77::1/64".parse().unwrap()).unwrap();
    link.b.add_addr("fd77::2/64".parse().unwrap()).unwrap();
    // A host route behind b, reached through it.
    b.add_addr("lo", "192.168.78.1/32".parse().unwrap())
        .unwrap();
    a.add_route(
        &Route::to("192.168.78.0/24".parse().unwrap())
            .via("192.168.77.2".parse().unwrap())
            .dev("a-b"),
    )
    .unwrap();

    let listener = b.enter(|| TcpListener::bind("[::]:7000").unwrap()).unwrap();
    let server = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"hi").unwrap();
        }
    });
    for dst in ["192.168.77.2:7000", "[fd77::2]:7000", "192.168.78.1:7000"] {
        let got = a
            .enter(|| {
                let mut s = TcpStream::connect(dst).unwrap();
                let mut v = String::new();
                s.read_to_string(&mut v).unwrap();
                v
            })
            .unwrap();
        assert_eq!(got, "hi", "via {dst}");
    }
    server.join().unwrap();

    // A long-running thread inside a namespace.
    let t = b
        .thread(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap())
        .unwrap();
    b.sysctl("net.ipv4.ip_forward", 1).unwrap();
    assert!(t.join().is_ok());

    // MPTCP endpoints and rules, added and removed.
    a.mptcp_endpoint_add(&braid_lab::MptcpEndpoint::subflow(
        "192.168.77.1".parse().unwrap(),
        "a-b",
    ))
    .unwrap();
    a.mptcp_endpoint_del("192.168.77.1".parse().unwrap())
        .unwrap();
    assert_eq!(
        a.run(["ip", "mptcp", "endpoint", "show"]).unwrap().trim(),
        ""
    );
    let rule = braid_lab::Rule::fwmark(1, 100).pref(90);
    a.add_rule(&rule).unwrap();
    assert!(
        a.run(["ip", "rule"])
            .unwrap()
            .contains("fwmark 0x1 lookup 100")
    );
    a.del_rule(&rule).unwrap();
    assert!(!a.run(["ip", "rule"]).unwrap().contains("fwmark 0x1"));

    // /etc/netns/<name>/hosts applies to `ip netns exec`.
    a.set_hosts(&[("192.168.77.2".parse().unwrap(), "bee")])
        .unwrap();
    let out = a.run(["getent", "hosts", "bee"]).unwrap();
    assert!(out.starts_with("192.168.77.2"), "{out}");
    let hosts_dir = format!("/etc/netns/{}", a.name());
    assert!(std::path::Path::new(&hosts_dir).exists());
    drop(lab);
    assert!(!std::path::Path::new(&hosts_dir).exists());
}

#[test]
fn processes_run_and_stop() {
    let lab = Lab::new().unwrap();
    let a = lab.add_ns("a").unwrap();

    // Errors say what failed, where, and what the command printed.
    let err = a.run(["sh", "-c", "echo oops >&2; exit 3"]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(a.name()) && msg.contains("oops"), "{msg}");

    let mut p = a
        .command("sh")
        .args(["-c", "echo started; exec sleep 30"])
        .stdout(Output::Piped)
        .spawn()
        .unwrap();
    assert!(
        p.wait_timeout(Duration::from_millis(100))
            .unwrap()
            .is_none()
    );
    let out = p.stop_and_read_stdout().unwrap();
    assert_eq!(out, "started\n");

    // A process that ignores SIGTERM is killed after the grace period.
    let mut stubborn = a
        .command("sh")
        .args(["-c", "trap '' TERM; sleep 30"])
        .grace(Duration::from_millis(100))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let status = stubborn.stop().unwrap();
    assert!(!status.success());

    // Logs to a file.
    let log = std::env::temp_dir().join(format!("{}.log", a.name()));
    let mut p = a
        .command("ip")
        .args(["-br", "link"])
        .stdout(Output::File(log.clone()))
        .spawn()
        .unwrap();
    assert!(p.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(text.contains("lo"), "{text}");

    // Anything still running in a namespace dies with it.
    let orphan = a.spawn(["sleep", "30"]).unwrap();
    let pid = orphan.pid();
    std::mem::forget(orphan);
    drop(lab);
    std::thread::sleep(Duration::from_millis(100));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Killed: gone or a zombie waiting for us to reap it.
    assert!(state.is_empty() || state.contains(") Z "), "{state}");
}
